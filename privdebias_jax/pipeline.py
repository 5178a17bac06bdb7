"""The canonical driver: load data, build a model, train, evaluate, save.

``train_and_evaluate(config, workdir)`` (Flax-examples style) is what ``privdebias train``
and ``privdebias run`` call. ``evaluate_model`` computes the metrics every later stage
reports (accuracy on the biased and unbiased test sets, bias-aligned / bias-conflicting
accuracy, FMD's counterfactual bias, DP/EO differences), and ``save_model`` / ``load_model``
write a trained model as ``model.json`` (architecture + optimiser settings) plus an orbax
checkpoint, so ``privdebias attack`` and friends can reload it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from privdebias_jax import checkpoint as ckpt
from privdebias_jax.data import Dataset, DataSplits, load_dataset, other_attribute
from privdebias_jax.metrics import fairness
from privdebias_jax.models import count_params, create_model
from privdebias_jax.train import (
    TrainState,
    create_train_state,
    evaluate,
    fit,
    make_optimizer,
    predict,
)
from privdebias_jax.types import PrivDebiasError, PRNGKey


def load_splits(config: ml_collections.ConfigDict) -> DataSplits:
    """The dataset named by ``config.dataset`` with the config's ρ, size and seed.

    ``cifar10`` and ``celeba`` come through TFDS (:mod:`privdebias_jax.data.tfds_sources`) from
    ``config.data_dir``, capped at ``train_size`` / ``test_size`` records; ``cifar10`` takes
    ``attribute`` (``"tint"``: the synthetic colour-tint attribute at ``rho`` with
    ``tint_strength``), ``celeba`` takes ``target`` and ``attribute``.

    Raises:
      PrivDebiasError: unknown dataset, ρ outside [0, 1], missing Adult files, a TFDS dataset
        not prepared under ``data_dir``.
    """
    name = config.dataset
    if name in ("colored-mnist", "biased-mnist"):
        return load_dataset(
            name,
            rho=float(config.rho),
            key=jax.random.fold_in(jax.random.key(int(config.seed)), 1),
            image_size=int(config.image_size),
            train_size=config.get("train_size"),
        )
    if name == "adult":
        return load_dataset(name, data_dir=config.get("data_dir"))
    if name == "cifar10":
        # attribute "tint": the synthetic colour-tint attribute (privdebias_jax.data.tint)
        return load_dataset(
            name,
            data_dir=config.get("data_dir"),
            attribute=str(config.get("attribute", "none")),
            image_size=int(config.image_size),
            max_examples=config.get("train_size"),
            max_test=config.get("test_size"),
            rho=float(config.get("rho", 0.99)),
            tint_strength=float(config.get("tint_strength", 0.5)),
            key=jax.random.fold_in(jax.random.key(int(config.seed)), 1),
        )
    if name == "celeba":
        return load_dataset(
            name,
            target=str(config.get("target", "Blond_Hair")),
            attribute=str(config.get("attribute", "Male")),
            image_size=int(config.image_size),
            data_dir=config.get("data_dir"),
            max_train=config.get("train_size"),
            max_test=config.get("test_size"),
        )
    return load_dataset(name)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a model and its optimiser: saved as ``model.json`` next to the checkpoint."""

    model: str
    num_classes: int
    input_shape: tuple[int, ...]
    options: dict
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0

    def build(self) -> tuple[nn.Module, optax.GradientTransformation]:
        """The Flax module and the optax transformation this spec describes."""
        model = create_model(self.model, self.num_classes, **self.options)
        tx = make_optimizer(self.optimizer, self.learning_rate, self.weight_decay)
        return model, tx


def spec_from_config(config: ml_collections.ConfigDict, splits: DataSplits) -> ModelSpec:
    """The :class:`ModelSpec` of a training config on a dataset."""
    return ModelSpec(
        model=str(config.model),
        num_classes=int(splits.num_classes),
        input_shape=tuple(int(s) for s in splits.input_shape),
        options=dict(config.model_options.to_dict()) if config.get("model_options") else {},
        optimizer=str(config.optimizer),
        learning_rate=float(config.learning_rate),
        weight_decay=float(config.weight_decay),
    )


def save_model(directory: str | os.PathLike, spec: ModelSpec, state: TrainState) -> Path:
    """Write ``directory/model.json`` and the state as checkpoint 0 in ``directory/checkpoint``."""
    directory = Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    ckpt.save_checkpoint(directory / "checkpoint", 0, state, overwrite=True)
    (directory / "model.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2))
    return directory


def load_model(directory: str | os.PathLike) -> tuple[nn.Module, TrainState, ModelSpec]:
    """Rebuild a model saved by :func:`save_model`: ``(module, state, spec)``.

    Raises:
      PrivDebiasError: when ``model.json`` or the checkpoint is missing or does not match.
    """
    directory = Path(directory).expanduser().resolve()
    meta = directory / "model.json"
    if not meta.is_file():
        raise PrivDebiasError(f"no saved model in {directory}: {meta.name} is missing")
    raw = json.loads(meta.read_text())
    raw["input_shape"] = tuple(raw["input_shape"])
    spec = ModelSpec(**raw)
    model, tx = spec.build()
    template = create_train_state(model, tx, jax.random.key(0), spec.input_shape)
    state = ckpt.restore_checkpoint(directory / "checkpoint", template)
    return model, state, spec


def counterfactual_bias_of_model(
    model: nn.Module,
    state: TrainState,
    splits: DataSplits,
    split: str = "test",
    key: PRNGKey | None = None,
) -> float:
    """FMD's counterfactual bias ``B(θ) = mean_i |p(ŷ_i | x_i, a_i) − p(ŷ_i | x_i, ā_i)|`` on a split.

    ``ā_i`` is another attribute value (flipped when binary, a uniformly drawn other colour
    from ``key`` otherwise; a fixed cyclic shift when ``key`` is None).

    Raises:
      PrivDebiasError: when the dataset has no counterfactual (images that cannot be recoloured).
    """
    if splits.counterfactual is None:
        raise PrivDebiasError(f"dataset {splits.name!r} has no counterfactual construction")
    ds = getattr(splits, split)
    cf = splits.counterfactual(ds, other_attribute(ds.a, splits.num_attributes, key))
    logits, _ = predict(model, state.params, state.model_state, ds)
    logits_cf, _ = predict(model, state.params, state.model_state, cf)
    return float(fairness.counterfactual_bias_from_logits(logits, logits_cf))


def evaluate_model(
    model: nn.Module, state: TrainState, splits: DataSplits, key: PRNGKey | None = None
) -> dict[str, Any]:
    """Every metric of a trained model on a dataset, JSON-ready.

    * MNIST variants: ``acc_biased`` (test set drawn with the training ρ), ``acc_unbiased``
      (ρ = 0.1), bias-aligned / bias-conflicting accuracy on the unbiased set, and
      ``dp_diff`` / ``eo_diff`` on the unbiased set (where colour is independent of the digit,
      so any gap is the model's).
    * Adult: ``acc``, ``dp_diff``, ``eo_diff`` on the test set.
    * Both: ``counterfactual_bias`` on the test set, ``kl_bias`` / ``mi_bias`` of the
      training data (Pan et al. 2024's KL with the data's marginal prior, which equals
      ``I(a; y)`` in nats), ``kl_bias_uniform`` (KL against a uniform attribute prior),
      and the per-split reports under ``splits``.
    """
    out: dict[str, Any] = {"splits": {}}
    for split in ("train", "test", "test_unbiased"):
        ds = getattr(splits, split)
        if ds is None:
            continue
        rep = evaluate(model, state.params, state.model_state, ds, splits.num_classes, splits.num_attributes)
        rep.pop("counts")
        out["splits"][split] = rep
    fair_split = "test_unbiased" if splits.test_unbiased is not None else "test"
    if splits.test_unbiased is not None:
        out["acc_biased"] = out["splits"]["test"]["acc"]
        out["acc_unbiased"] = out["splits"]["test_unbiased"]["acc"]
        out["acc_aligned"] = out["splits"]["test_unbiased"].get("acc_aligned")
        out["acc_conflicting"] = out["splits"]["test_unbiased"].get("acc_conflicting")
    else:
        out["acc"] = out["splits"]["test"]["acc"]
    out["acc_train"] = out["splits"]["train"]["acc"]
    out["dp_diff"] = out["splits"][fair_split]["dp_diff"]
    out["eo_diff"] = out["splits"][fair_split]["eo_diff"]
    out["fairness_split"] = fair_split
    if splits.counterfactual is not None:
        out["counterfactual_bias"] = counterfactual_bias_of_model(model, state, splits, "test", key)
    tr = splits.train
    out["kl_bias"] = float(fairness.kl_bias(tr.y, tr.a, splits.num_classes, splits.num_attributes))
    out["mi_bias"] = float(fairness.mutual_information_bias(tr.y, tr.a, splits.num_classes, splits.num_attributes))
    uniform = np.full(splits.num_attributes, 1.0 / splits.num_attributes)
    out["kl_bias_uniform"] = float(
        fairness.kl_bias(tr.y, tr.a, splits.num_classes, splits.num_attributes, prior=uniform)
    )
    return out


@dataclasses.dataclass
class TrainedModel:
    """The outcome of :func:`train_and_evaluate`: ``evaluation`` is :func:`evaluate_model` of the
    trained model on ``splits``; ``results`` adds the training record to it (``None`` /
    ``{}`` for a model loaded from disk and not evaluated yet)."""

    model: nn.Module
    state: TrainState
    spec: ModelSpec
    splits: DataSplits
    results: dict[str, Any]
    evaluation: dict[str, Any] | None = None


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike | None = None,
    *,
    splits: DataSplits | None = None,
    progress: bool = True,
    resume: bool = False,
) -> TrainedModel:
    """Train a model as ``config`` says, evaluate it, and save it under ``workdir``.

    ``config.method`` (optional, default ``vanilla``) picks a debiasing method of
    :mod:`privdebias_jax.debias.methods` (``end``, ``learned_mixin``, ``rubi``, ``rebias``) with
    ``config.alpha`` / ``config.beta``; the saved, evaluated and returned model is the main
    network alone (any bias branch is dropped after training).

    Keys: the parameters start from ``fold_in(key(seed), 2)``, batches from
    ``fold_in(key(seed), 3)``, counterfactual colours from ``fold_in(key(seed), 4)``: the
    same config gives the same model. With ``workdir`` the run checkpoints every epoch
    (``workdir/train_ckpt``, resumable with ``resume=True``) and saves the final model in
    ``workdir/model``.
    """
    t0 = time.perf_counter()
    splits = splits if splits is not None else load_splits(config)
    data_seconds = time.perf_counter() - t0
    spec = spec_from_config(config, splits)
    model, tx = spec.build()
    root = jax.random.key(int(config.seed))
    from privdebias_jax.debias.methods import main_train_state, method_from_config, setup_method

    method, alpha, beta = method_from_config(config)
    setup = setup_method(
        method, model, splits.num_classes, splits.num_attributes, spec.input_shape,
        train_set=splits.train, alpha=alpha, beta=beta, preset=str(config.get("preset", "cpu")),
        end_center=bool(config.get("end_center", True)),
    )
    state = create_train_state(setup.model, tx, jax.random.fold_in(root, 2), spec.input_shape)
    ckpt_dir = Path(workdir).resolve() / "train_ckpt" if workdir is not None else None
    t1 = time.perf_counter()
    result = fit(
        setup.model,
        tx,
        state,
        splits.train,
        epochs=int(config.epochs),
        batch_size=int(config.batch_size),
        key=jax.random.fold_in(root, 3),
        loss=setup.loss,
        regularizer=setup.regularizer,
        checkpoint_dir=ckpt_dir,
        resume=resume,
        progress=progress,
        desc=f"train {config.model} ({method}) on {splits.name}",
    )
    jax.block_until_ready(result.state.params)
    train_seconds = time.perf_counter() - t1
    result = result._replace(state=main_train_state(setup, result.state, tx))
    evaluation = evaluate_model(model, result.state, splits, key=jax.random.fold_in(root, 4))
    results = dict(evaluation)
    results.update(
        dataset=splits.name,
        rho=splits.info.get("rho"),
        model=spec.model,
        method=method,
        method_settings=setup.settings,
        num_params=count_params(result.state.params),
        train_size=len(splits.train),
        epochs=int(config.epochs),
        batch_size=int(config.batch_size),
        train_seconds=train_seconds,
        data_seconds=data_seconds,
        history=result.history,
        config=config.to_dict(),
    )
    if workdir is not None:
        save_model(Path(workdir) / "model", spec, result.state)
    return TrainedModel(model, result.state, spec, splits, results, evaluation)


__all__ = [
    "ModelSpec",
    "TrainedModel",
    "load_splits",
    "spec_from_config",
    "save_model",
    "load_model",
    "counterfactual_bias_of_model",
    "evaluate_model",
    "train_and_evaluate",
    "split_for_external",
    "run_debias_method",
    "debias_and_evaluate",
]


def split_for_external(splits: DataSplits, size: int, key: PRNGKey | int) -> tuple[Dataset, DataSplits]:
    """Draw FMD's external set ``D_ex`` and remove its ids from every evaluation split.

    ``D_ex`` comes from the unbiased test set when there is one (colour independent of the
    digit), else from the test set; the returned splits never evaluate on it.
    """
    from privdebias_jax.debias.fmd import drop_ids, split_external

    pool = splits.test_unbiased if splits.test_unbiased is not None else splits.test
    external, _ = split_external(pool, size, key)
    return external, dataclasses.replace(
        splits,
        test=drop_ids(splits.test, external.idx),
        test_unbiased=None if splits.test_unbiased is None else drop_ids(splits.test_unbiased, external.idx),
    )


_SUMMARY_KEYS = ("acc_biased", "acc_unbiased", "acc", "acc_conflicting", "counterfactual_bias", "dp_diff", "eo_diff")


def run_debias_method(
    settings: ml_collections.ConfigDict,
    model: nn.Module,
    state: TrainState,
    splits: DataSplits,
    external: Dataset,
    key: PRNGKey,
):
    """Run the post-training debiasing method ``settings.method`` (a config's ``fmd`` section,
    :func:`privdebias_jax.config.get_fmd_config`) on ``state``; returns its
    :class:`~privdebias_jax.debias.DebiasResult`.

    Raises:
      PrivDebiasError: an unknown method, a dataset without counterfactuals, and the method's
        own errors.
    """
    from privdebias_jax.debias import get_debias_method

    f = settings
    name = str(f.get("method", "proximal_finetune"))
    method = get_debias_method(name)
    if splits.counterfactual is None:
        raise PrivDebiasError(f"{name} needs counterfactuals; dataset {splits.name!r} has none")
    guard = dict(step_sizes=tuple(float(x) for x in f.step_sizes), max_acc_drop=float(f.max_acc_drop),
                 min_kept=float(f.get("min_kept", 0.5)), delta=float(f.delta), key=key, select=str(f.select))
    common = (model, state)
    if name == "fmd":
        k = int(f.k) if int(f.k) > 0 else len(splits.train)
        damping = f.get("fmd_damping", f.damping)
        damping = tuple(float(x) for x in damping) if isinstance(damping, (list, tuple)) else float(damping)
        return method(*common, external, splits.counterfactual, splits.num_attributes,
                      variant=str(f.get("variant", "external")), train=splits.train, k=k, damping=damping,
                      solver=str(f.solver), **guard)
    if name == "head_retrain":
        k = int(f.k) if int(f.k) > 0 else None
        return method(*common, splits.train, external, splits.counterfactual, splits.num_attributes, k=k,
                      replacement=str(f.get("replacement", "others")), iterations=int(f.iterations),
                      cg_iterations=int(f.cg_iterations), damping=float(f.damping), solver=str(f.solver), **guard)
    return method(*common, external, splits.counterfactual, splits.num_attributes, proximal=float(f.proximal),
                  iterations=int(f.iterations), cg_iterations=int(f.cg_iterations), **guard)


def debias_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike | None = None,
    *,
    trained: TrainedModel | None = None,
    external: Dataset | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or take) a vanilla model, debias it as ``config.fmd`` says (method by name:
    :func:`run_debias_method`), evaluate both.

    The external set is drawn with ``fold_in(key(seed), 5)`` and removed from the evaluation
    splits before anything is trained or measured. Returns (and writes to
    ``workdir/results.json`` with the debiased model in ``workdir/model``) the before/after
    metrics, FMD's report, debiasing seconds, parameters updated and the external-set size.
    With both ``trained`` and ``external`` given, ``trained.splits`` must already exclude
    ``external`` (see :func:`split_for_external`).
    """

    root = jax.random.key(int(config.seed))
    if trained is not None and external is not None:  # the caller already split D_ex off
        splits = trained.splits
    elif trained is None:
        splits = load_splits(config)
        external, splits = split_for_external(splits, int(config.fmd.external_size), jax.random.fold_in(root, 5))
        trained = train_and_evaluate(config, None, splits=splits, progress=progress)
    else:
        external, splits = split_for_external(trained.splits, int(config.fmd.external_size), jax.random.fold_in(root, 5))
        trained = dataclasses.replace(trained, splits=splits, evaluation=None)
    before = trained.evaluation
    if before is None:  # a model loaded from disk: evaluate it on the splits without D_ex
        before = evaluate_model(trained.model, trained.state, splits, key=jax.random.fold_in(root, 4))
    from privdebias_jax.debias import warnings_of

    result = run_debias_method(config.fmd, trained.model, trained.state, splits, external, jax.random.fold_in(root, 6))
    after = evaluate_model(trained.model, result.state, splits, key=jax.random.fold_in(root, 4))
    report = {k2: v for k2, v in result.report.items() if k2 != "harmful_ids"}
    results = {
        "dataset": splits.name,
        "rho": splits.info.get("rho"),
        "model": trained.spec.model,
        "method": result.report["method"],
        "before": {k2: before.get(k2) for k2 in _SUMMARY_KEYS if before.get(k2) is not None},
        "after": {k2: after.get(k2) for k2 in _SUMMARY_KEYS if after.get(k2) is not None},
        "debias_seconds": result.report["seconds"]["total"],
        "train_seconds": trained.results.get("train_seconds"),
        "num_params_updated": result.report.get("num_params_updated", 0),
        "num_params_total": count_params(trained.state.params),
        "external_size": len(external),
        "debias_report": report,
        "warnings": warnings_of(result.report),
        "before_full": before,
        "after_full": after,
        "config": config.to_dict(),
    }
    if workdir is not None:
        from privdebias_jax.report import write_json

        save_model(Path(workdir) / "model", trained.spec, result.state)
        write_json(Path(workdir) / "results.json", results)
    return results
