"""``privdebias unlearn``: train SISA shards, forget ids exactly, compare with the baselines.

:func:`unlearn_and_evaluate` loads the dataset of a training config, plans ``S × R`` shards,
trains them (resuming an existing ``out/sisa`` directory of the same plan), evaluates the
ensemble, forgets the requested ids (all at once, or step-wise within a deletion capacity),
evaluates again, and optionally runs the baselines (full retraining, Newton step, fine-tuning,
gradient ascent) from a single model trained on all the data. Everything goes to
``out/results.json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from privdebias_jax.config import get_config
from privdebias_jax.multi import parse_lane_batch
from privdebias_jax.pipeline import evaluate_model, load_splits, spec_from_config
from privdebias_jax.report import write_json
from privdebias_jax.train import TrainState, create_train_state, fit
from privdebias_jax.types import PrivDebiasError
from privdebias_jax.unlearn import baselines as bl
from privdebias_jax.unlearn.plan import make_plan
from privdebias_jax.unlearn.sisa import sisa_epochs, train_shards

SUMMARY_KEYS = ("acc_biased", "acc_unbiased", "acc", "counterfactual_bias", "dp_diff", "eo_diff")


def get_unlearn_config(
    dataset: str = "colored-mnist", preset: str = "cpu"
) -> ml_collections.ConfigDict:
    """The training config of ``dataset`` plus an ``unlearn`` section.

    ``unlearn`` fields: ``shards`` (S), ``slices`` (R), ``program_width`` (W; 0 = S),
    ``lane_batch`` (lanes a device computes together: ``auto``, ``all`` or a positive integer;
    see :func:`privdebias_jax.multi.resolve_lane_batch`),
    ``forget_fraction`` (of the training set, used when no ids are given), ``forget_seed``,
    ``capacity`` (deletions per step; 0 = one step), ``aggregate`` (``mean_softmax`` / ``vote``),
    ``baselines`` (comma-separated subset of retrain,newton,finetune,gradient_ascent; ``""`` none).
    ``epochs`` of the training config is the single-model ``E``; each SISA stage trains
    ``⌈2E/(R+1)⌉`` epochs (Bourtoule et al.).
    """
    c = get_config(dataset, preset)
    c.unlearn = ml_collections.ConfigDict()
    c.unlearn.shards = 8
    c.unlearn.slices = 4
    c.unlearn.program_width = 0
    c.unlearn.lane_batch = "auto"
    c.unlearn.forget_fraction = 0.01
    c.unlearn.forget_seed = 0
    c.unlearn.capacity = 0
    c.unlearn.aggregate = "mean_softmax"
    c.unlearn.baselines = "retrain,newton"
    return c


def read_ids(path: str | os.PathLike) -> np.ndarray:
    """Sample ids from a text file: integers separated by whitespace or commas.

    Raises:
      PrivDebiasError: a missing file or a token that is not an integer.
    """
    path = Path(path)
    if not path.is_file():
        raise PrivDebiasError(f"forget-id file {path} does not exist")
    tokens = path.read_text().replace(",", " ").split()
    try:
        return np.asarray([int(t) for t in tokens], np.int64)
    except ValueError as err:
        raise PrivDebiasError(f"forget-id file {path}: {err}") from None


def _summary(evaluation: dict[str, Any]) -> dict[str, float]:
    return {k: float(evaluation[k]) for k in SUMMARY_KEYS if evaluation.get(k) is not None}


def unlearn_and_evaluate(
    config: ml_collections.ConfigDict,
    out: str | os.PathLike,
    forget_ids: Any | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the SISA unlearning job of ``config`` in ``out`` and return (and write) its results.

    Raises:
      PrivDebiasError: bad settings (S, R, W, fraction, capacity, unknown baseline), unknown
        or negative ids, a deletion that would empty a shard, or an ``out/sisa`` directory of
        another plan.
    """
    u = config.unlearn
    methods = [m.strip() for m in str(u.baselines).split(",") if m.strip()]
    unknown = sorted(set(methods) - set(bl.METHODS))
    if unknown:
        raise PrivDebiasError(f"unknown baseline(s) {unknown}; expected a subset of {bl.METHODS}")
    if not 0.0 < float(u.forget_fraction) < 1.0 and forget_ids is None:
        raise PrivDebiasError(f"forget_fraction must be in (0, 1), got {u.forget_fraction}")
    if int(u.capacity) < 0:
        raise PrivDebiasError(f"capacity must be ≥ 0 (0 = one step), got {u.capacity}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(config)
    spec = spec_from_config(config, splits)
    model, tx = spec.build()
    key = jax.random.PRNGKey(int(config.seed))
    train = splits.train
    epochs = sisa_epochs(int(config.epochs), int(u.slices))
    plan = make_plan(train.idx, int(u.shards), int(u.slices), key=jax.random.fold_in(key, 2))
    width = int(u.program_width) or None
    lane_batch = parse_lane_batch(u.get("lane_batch", "auto"))
    sisa, train_cost = train_shards(
        model,
        tx,
        train,
        plan,
        out / "sisa",
        key=jax.random.fold_in(key, 3),
        epochs_per_slice=epochs,
        batch_size=int(config.batch_size),
        program_width=width,
        lane_batch=lane_batch,
        progress=progress,
    )

    def ensemble_eval() -> dict[str, Any]:
        module, params, model_state = sisa.ensemble(str(u.aggregate))
        state = TrainState(
            step=np.zeros((), np.int32), params=params, model_state=model_state, opt_state=()
        )
        return evaluate_model(module, state, splits, key=jax.random.fold_in(key, 4))

    before = ensemble_eval()
    if forget_ids is None:
        rng = np.random.default_rng(int(u.forget_seed))
        n = max(1, int(round(float(u.forget_fraction) * len(train))))
        forget_ids = rng.choice(np.asarray(train.idx, np.int64), size=n, replace=False)
    forget_ids = np.asarray(forget_ids, np.int64).reshape(-1)
    if forget_ids.size == 0:
        raise PrivDebiasError("no ids to forget")
    t0 = time.perf_counter()
    if int(u.capacity) > 0:
        reports = sisa.forget_stepwise(forget_ids, int(u.capacity))
    else:
        reports = [sisa.forget(forget_ids)]
    forget_seconds = time.perf_counter() - t0
    after = ensemble_eval()
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "plan": {
            "shards": plan.num_shards,
            "slices": plan.num_slices,
            "slice_capacity": plan.slice_capacity,
            "strategy": plan.strategy,
            "program_width": sisa.width,
            "lane_batch": "all" if sisa.config.lane_batch is None else sisa.config.lane_batch,
            "layout": sisa.layout,
            "epochs_per_slice": list(epochs),
            "devices": 1 if sisa.mesh is None else int(sisa.mesh.size),
        },
        "train_cost": train_cost.to_json(),
        "forget": {
            "ids": int(np.unique(forget_ids).size),
            "steps": [r.to_json() for r in reports],
            "seconds": forget_seconds,
            "forgotten_total": int(sisa.forgotten.size),
        },
        "sisa_before": _summary(before),
        "sisa_after": _summary(after),
        "baselines": {},
    }
    if methods:
        input_shape = tuple(np.shape(train.x)[1:])
        t0 = time.perf_counter()
        full = fit(
            model,
            tx,
            create_train_state(model, tx, jax.random.fold_in(key, 0), input_shape),
            train,
            epochs=int(config.epochs),
            batch_size=int(config.batch_size),
            key=jax.random.fold_in(key, 1),
            progress=progress,
            desc="single model",
        ).state
        results["single_model"] = {
            **_summary(evaluate_model(model, full, splits, key=jax.random.fold_in(key, 4))),
            "train_seconds": time.perf_counter() - t0,
        }
        done: dict[str, bl.UnlearnResult] = {}
        bkey = jax.random.fold_in(key, 5)
        for m in methods:
            if m == "retrain":
                r = bl.retrain(
                    model,
                    tx,
                    train,
                    forget_ids,
                    key=key,
                    epochs=int(config.epochs),
                    batch_size=int(config.batch_size),
                    progress=progress,
                )
            elif m == "newton":
                r = bl.newton_removal(model, full, train, forget_ids)
            elif m == "finetune":
                r = bl.finetune(
                    model, tx, full, train, forget_ids, key=bkey, batch_size=int(config.batch_size)
                )
            else:
                r = bl.gradient_ascent(
                    model, full, train, forget_ids, key=bkey, batch_size=int(config.batch_size)
                )
            done[m] = r
            results["baselines"][m] = {
                "seconds": r.seconds,
                **r.info,
                **_summary(evaluate_model(model, r.state, splits, key=jax.random.fold_in(key, 4))),
            }
        if "retrain" in done:
            for m, r in done.items():
                results["baselines"][m]["distance_to_retrain"] = bl.param_distance(
                    r.state.params, done["retrain"].state.params
                )
            results["speedup_vs_retrain"] = done["retrain"].seconds / max(forget_seconds, 1e-9)
    write_json(out / "results.json", results)
    return results


__all__ = ["get_unlearn_config", "read_ids", "unlearn_and_evaluate"]
