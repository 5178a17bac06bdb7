"""Driver of ``privdebias augment`` and ``experiments/augment_mnist.py``: augment a biased MNIST
variant, then measure the dataset's bias, the samples' quality and a downstream model's
unbiased accuracy (original vs augmented training data).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from privdebias_jax.augment.augmenter import (
    fit_augmenter,
    generate,
    quality_report,
    save_sample_grid,
)
from privdebias_jax.augment.config import AugmentConfig
from privdebias_jax.augment.planner import plan_augmentation, table_bias
from privdebias_jax.config import get_config
from privdebias_jax.data import Dataset, concat, load_dataset, next_free_id
from privdebias_jax.metrics import attribute_counts
from privdebias_jax.models import create_model
from privdebias_jax.train import create_train_state, evaluate, fit, make_optimizer
from privdebias_jax.types import PrivDebiasError

DATASETS = ("biased-mnist", "colored-mnist")


def dataset_bias(ds: Dataset, C: int, A: int) -> dict[str, float]:
    """``I(τ; y)`` and ``Σ_y p(y) KL(D(τ | y) ‖ U(τ))`` of a dataset, in nats."""
    counts = np.asarray(attribute_counts(np.asarray(ds.y), np.asarray(ds.a), C, A))
    return {"mutual_information": table_bias(counts, "marginal"), "kl_vs_uniform": table_bias(counts, "uniform")}


def train_downstream(dataset: str, train: Dataset, splits: Any, key: jax.Array, quick: bool) -> dict[str, float]:
    """The dataset's CPU classifier (``get_config(dataset, "cpu")``) trained on ``train``."""
    c = get_config(dataset, "cpu")
    epochs = 1 if quick else int(c.epochs)
    model = create_model(c.model, splits.num_classes, **dict(c.model_options))
    tx = make_optimizer(c.optimizer, c.learning_rate, c.weight_decay)
    k_init, k_fit = jax.random.split(key)
    state = create_train_state(model, tx, k_init, splits.input_shape)
    t0 = time.perf_counter()
    state = fit(model, tx, state, train, epochs=epochs, batch_size=c.batch_size, key=k_fit, progress=False).state
    seconds = time.perf_counter() - t0
    out = {"model": c.model, "epochs": epochs, "train_size": len(train), "train_seconds": seconds}
    for name, ds in (("biased", splits.test), ("unbiased", splits.test_unbiased)):
        rep = evaluate(model, state.params, state.model_state, ds, splits.num_classes, splits.num_attributes)
        out[f"acc_{name}"] = float(rep["acc"])
        if name == "unbiased":
            out["worst_group_acc_unbiased"] = float(rep["worst_group_acc"])
            out["acc_conflicting_unbiased"] = float(rep.get("acc_conflicting", float("nan")))
    return out


def augment_and_evaluate(
    dataset: str,
    out: str | os.PathLike,
    *,
    quick: bool = False,
    seed: int = 0,
    config: AugmentConfig | None = None,
    rho: float = 0.99,
    image_size: int = 14,
    target_fraction: float = 0.2,
    max_new: int | None = None,
    guidance_scale: float | None = None,
    kl_scale: float | None = None,
    eta: float = 0.0,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Augment one MNIST variant and measure bias, sample quality and downstream accuracy.

    Steps: load ``dataset`` at ``rho``; :func:`fit_augmenter` (with the dataset's recolouring
    counterfactual for the classifiers); :func:`plan_augmentation` to ``target_fraction`` of
    the mutual-information bias (optionally capped at ``max_new``); :func:`generate`;
    :func:`quality_report`; train the dataset's CPU classifier (``get_config(dataset, "cpu")``)
    on the original and on the augmented set; unbiased (ρ = 0.1) test accuracy of both. Writes
    ``OUT/<dataset>_samples.png``; returns a JSON-ready dict (``targets`` says which of the
    issue's targets were met).

    Raises:
      PrivDebiasError: an unknown dataset, ρ outside ``[0, 1]``, a bad fraction or scale.
    """
    if dataset not in DATASETS:
        raise PrivDebiasError(f"augment supports {DATASETS}, got {dataset!r}")
    if not 0.0 <= float(target_fraction) < 1.0:
        raise PrivDebiasError(f"target_fraction must be in [0, 1), got {target_fraction}")
    out = Path(out)
    key = jax.random.key(seed)
    k_data, k_fit, k_gen, k_orig, k_aug = jax.random.split(key, 5)
    splits = load_dataset(dataset, rho=rho, key=int(seed), image_size=image_size,
                          train_size=150 if quick else None, test_per_class=20 if quick else 100)
    C, A = splits.num_classes, splits.num_attributes
    if config is None:
        config = AugmentConfig.tiny() if quick else AugmentConfig.cpu_default(image_size=image_size)
    t0 = time.perf_counter()
    augmenter = fit_augmenter(splits.train, num_classes=C, num_attributes=A, config=config, key=k_fit,
                              checkpoint_dir=checkpoint_dir, progress=progress, counterfactual=splits.counterfactual)
    fit_seconds = time.perf_counter() - t0
    before = dataset_bias(splits.train, C, A)
    plan = plan_augmentation(splits.train, C, A, target_bias=target_fraction * before["mutual_information"],
                             max_new=max_new)
    t0 = time.perf_counter()
    gen = dict(guidance_scale=guidance_scale, kl_scale=kl_scale, eta=eta)
    synthetic = generate(augmenter, plan, key=k_gen, start_id=next_free_id(splits.train), **gen)
    jax.block_until_ready(synthetic.x)
    gen_seconds = time.perf_counter() - t0
    augmented = concat(splits.train, synthetic)
    after = dataset_bias(augmented, C, A)
    quality = quality_report(augmenter, synthetic)
    # the real data's own recognisability by the same judges (a ceiling for the synthetic figures)
    real_quality = quality_report(augmenter, splits.test_unbiased)
    grid_counts = np.ones((C, A), np.int64)
    grid = generate(augmenter, grid_counts, key=jax.random.fold_in(k_gen, 1), start_id=0, **gen)
    png = save_sample_grid(grid, out / f"{dataset}_samples.png", C, A,
                           title=f"{dataset} ρ={rho}: synthetic sample per (class row, colour column)")
    original = train_downstream(dataset, splits.train, splits, k_orig, quick)
    with_aug = train_downstream(dataset, augmented, splits, k_aug, quick)
    mi_drop = 1.0 - after["mutual_information"] / before["mutual_information"]
    return {
        "dataset": dataset,
        "rho": rho,
        "image_size": image_size,
        "train_size": len(splits.train),
        "augment_config": config.to_dict(),
        "guidance": {"guidance_scale": config.guidance_scale if guidance_scale is None else guidance_scale,
                     "kl_scale": config.kl_scale if kl_scale is None else kl_scale, "eta": eta},
        "target_fraction": target_fraction,
        "fit_seconds": fit_seconds,
        "denoiser_seconds": augmenter.info["denoiser_seconds"],
        "classifier_seconds": augmenter.info["classifier_seconds"],
        "classifier_data": augmenter.info["classifier_data"],
        "denoiser_final_loss": augmenter.info["denoiser_history"][-1]["loss"] if augmenter.info["denoiser_history"] else None,
        "generate_seconds": gen_seconds,
        "samples_per_second": len(synthetic) / gen_seconds,
        "plan": plan.tolist(),
        "num_synthetic": len(synthetic),
        "bias_before": before,
        "bias_after": after,
        "mi_reduction": mi_drop,
        "quality": quality,
        "real_test_quality": {k: real_quality[k] for k in ("class_acc", "attr_acc", "all_cells")},
        "downstream_original": original,
        "downstream_augmented": with_aug,
        "unbiased_acc_gain": with_aug["acc_unbiased"] - original["acc_unbiased"],
        "targets": {
            "every_cell_class_ge_90": quality["all_cells"].get("class_acc_min", 0.0) >= 0.9,
            "every_cell_attr_ge_90": quality["all_cells"].get("attr_acc_min", 0.0) >= 0.9,
            "mi_reduced_ge_80pct": mi_drop >= 0.8 - 1e-9,
            "unbiased_acc_gain": with_aug["acc_unbiased"] > original["acc_unbiased"],
        },
        "grid_png": str(png),
    }


def summary_line(r: dict[str, Any]) -> str:
    q = r["quality"]["all_cells"]
    rare = r["quality"]["rare_cells"]
    return (
        f"{r['dataset']}: MI {r['bias_before']['mutual_information']:.3f} -> {r['bias_after']['mutual_information']:.3f} "
        f"(-{100 * r['mi_reduction']:.0f}%, {r['num_synthetic']} samples in {r['generate_seconds']:.1f}s); "
        f"cells min class acc {q.get('class_acc_min', float('nan')):.2f}, min colour acc {q.get('attr_acc_min', float('nan')):.2f} "
        f"(rare cells {rare.get('class_acc_min', float('nan')):.2f}/{rare.get('attr_acc_min', float('nan')):.2f}); "
        f"unbiased acc {r['downstream_original']['acc_unbiased']:.3f} -> {r['downstream_augmented']['acc_unbiased']:.3f}; "
        f"denoiser {r['denoiser_seconds']:.0f}s"
    )



__all__ = ["DATASETS", "dataset_bias", "augment_and_evaluate", "train_downstream", "summary_line"]
