"""``privdebias attack``: every membership-inference attack on a saved model.

:func:`attack_and_report` takes a model saved by ``privdebias train --out DIR`` (its
``results.json`` gives the data config), samples balanced members (training set) and
non-members (the test set drawn like the training set), trains ``R`` reference models
together for LiRA and the shadow attack, runs the suite and writes ``out/results.json`` and
``out/roc.png`` (log-log ROC curves).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections

from privdebias_jax.config import get_config
from privdebias_jax.data import concat
from privdebias_jax.pipeline import load_model, load_splits
from privdebias_jax.privacy import attacks as atk
from privdebias_jax.privacy.metrics import plot_roc, roc_curve
from privdebias_jax.report import write_json
from privdebias_jax.types import PrivDebiasError


def attack_and_report(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    attacks: tuple[str, ...] = atk.ALL_ATTACKS,
    members: int = 500,
    reference_models: int = 8,
    reference_epochs: int | None = None,
    seed: int = 0,
    num_resamples: int = 200,
) -> dict[str, Any]:
    """Run the attack suite on the model saved in ``model_dir`` (a ``privdebias train`` output).

    Raises:
      PrivDebiasError: a directory without ``results.json`` / ``model``, unknown attacks, too few
        samples, an odd number of reference models.
    """
    src = Path(model_dir)
    results_file = src / "results.json"
    if not results_file.is_file():
        raise PrivDebiasError(
            f"{src}: no results.json (train a model with `privdebias train --out {src}`)"
        )
    saved = ml_collections.ConfigDict(json.loads(results_file.read_text())["config"])
    config = get_config(saved.dataset)
    for field in saved:
        config[field] = saved[field]
    model, state, spec = load_model(src / "model")
    _, tx = spec.build()
    splits = load_splits(config)
    key = jax.random.PRNGKey(int(seed))
    mem, non = atk.sample_members(splits.train, splits.test, members, jax.random.fold_in(key, 0))
    reference = None
    if any(a in atk.REFERENCE_ATTACKS for a in attacks):
        pool = concat(mem, non)
        reference = atk.train_reference_models(
            model,
            tx,
            pool,
            int(reference_models),
            key=jax.random.fold_in(key, 1),
            epochs=int(reference_epochs or config.epochs),
            batch_size=int(config.batch_size),
        )
    suite = atk.attack_suite(
        (model, state.params, state.model_state),
        mem,
        non,
        key=jax.random.fold_in(key, 2),
        attacks=attacks,
        reference=reference,
        num_resamples=num_resamples,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {name: roc_curve(sc, lab)[:2] for name, (sc, lab) in suite.pop("scores").items()}
    plot_roc(curves, out / "roc.png")
    results = {
        "model_dir": str(src),
        "dataset": config.dataset,
        "members": len(mem),
        "nonmembers": len(non),
        "reference_models": 0 if reference is None else int(reference_models),
        "reference_seconds": None if reference is None else reference.seconds,
        **suite,
    }
    write_json(out / "results.json", results)
    return results


__all__ = ["attack_and_report"]
