"""The public workflow: :func:`fit_augmenter` → :func:`plan_augmentation` → :func:`generate` → :func:`quality_report`.

:func:`fit_augmenter` trains, on the real training set,

* the class- and attribute-conditional denoiser (:mod:`privdebias_jax.augment.diffusion`), by
  default in the shape/colour latent of the images (:mod:`privdebias_jax.augment.latent`) with
  the shape conditioned on the class and the colour on the attribute;
* two *guidance* classifiers (MLPs on the denoiser's resolution, differentiable on x̂₀),
  one for the class and one for the attribute;
* two *judge* classifiers (small CNNs at the data's resolution, another seed and another
  architecture), which label the generated samples in :func:`quality_report`, so the
  quality figures are not measured by the very networks the sampler was steered with.

On data where class and attribute are confounded (ρ = 0.99) a classifier trained on the raw
data learns the shortcut (colour for class). The classifiers are therefore trained on data in
which the attribute is independent of the class: with a ``counterfactual(ds, a_new)``
function (``DataSplits.counterfactual``: the same digit recoloured) on
``counterfactual_copies`` copies of the training set in uniformly random attributes; without
one, on a resample of the training set with every non-empty (y, a) cell equally likely
(weaker: the rare cells hold few distinct images).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from privdebias_jax.augment.config import AugmentConfig, check_scale
from privdebias_jax.augment.denoiser import create_denoiser
from privdebias_jax.augment.diffusion import (
    DiffusionState,
    from_model_scale,
    to_model_scale,
    train_denoiser,
)
from privdebias_jax.augment.guidance import make_guidance_loss
from privdebias_jax.augment.latent import (
    ColourCodec,
    PCACodec,
    decode,
    encode,
    fit_colour_codec,
    fit_pca_codec,
    project,
    project_routed,
)
from privdebias_jax.augment.sampler import make_sampler
from privdebias_jax.augment.schedule import Schedule, make_schedule
from privdebias_jax.data.dataset import Dataset, validate_dataset
from privdebias_jax.metrics import attribute_counts, cell_accuracy_from_counts, confusion_counts
from privdebias_jax.models import create_model
from privdebias_jax.train import create_train_state, fit, make_optimizer, predict
from privdebias_jax.types import Params, PrivDebiasError, PRNGKey

Counterfactual = Callable[[Dataset, Any], Dataset]


@dataclasses.dataclass
class TrainedClassifier:
    """A Flax classifier and its trained parameters (``model_state`` is ``{}`` for these nets)."""

    model: nn.Module
    params: Params
    model_state: Any
    image_size: int

    def logits(self, x01: jax.Array) -> jax.Array:
        """Logits for images in ``[0, 1]`` (resized to the classifier's resolution; differentiable)."""
        x01 = resize_images(x01, self.image_size)
        logits, _ = self.model.apply({"params": self.params, **self.model_state}, x01, train=False)
        return logits

    def predict(self, x01: np.ndarray) -> np.ndarray:
        """Predicted labels for images in ``[0, 1]`` (batched, NumPy)."""
        x = np.asarray(resize_images(jnp.asarray(x01), self.image_size))
        logits, _ = predict(self.model, self.params, self.model_state, x)
        return np.argmax(logits, axis=-1)


def guidance_options(
    codec: PCACodec | ColourCodec | None,
    space: str,
    classify_class: Callable[[Any, jax.Array], jax.Array],
    classify_attr: Callable[[Any, jax.Array], jax.Array],
    **loss_options: Any,
) -> dict[str, Any]:
    """The KL-guidance arguments of :func:`~privdebias_jax.augment.sampler.make_sampler` for a
    codec (or ``None``: pixel space) and a resolved ``guidance_space`` (``image`` / ``latent`` /
    ``routed``, :attr:`AugmentConfig.resolved_guidance_space`).

    * ``latent``: ``guidance_loss`` decodes the latent itself (the gradient is taken on ``z``);
    * ``image``: ``guidance_loss`` on images and ``image_codec = (decode, project)``;
    * ``routed``: also ``routed_guidance = (class term, KL term, project_routed)``.

    ``loss_options`` go to :func:`~privdebias_jax.augment.guidance.make_guidance_loss`
    (``num_classes``, ``class_weight``, ``smoothing``, ``group_by``).
    """
    in_image = codec is not None and space in ("image", "routed")
    opts: dict[str, Any] = {
        "guidance_loss": make_guidance_loss(
            classify_class, classify_attr,
            decode=None if codec is None or in_image else (lambda z: decode(codec, z)), **loss_options,
        )
    }
    if in_image:
        opts["image_codec"] = (lambda z: decode(codec, z), lambda z, x: project(codec, z, x))
    if codec is not None and space == "routed":
        kl_only = {**loss_options, "class_weight": 0.0}
        opts["routed_guidance"] = (
            make_guidance_loss(classify_class, classify_attr, kl_weight=0.0, **loss_options),
            make_guidance_loss(classify_class, classify_attr, **kl_only),
            lambda z, img_y, img_a: project_routed(codec, z, img_y, img_a),
        )
    return opts


@dataclasses.dataclass
class Augmenter:
    """A trained bias-guided diffusion augmenter (what :func:`fit_augmenter` returns).

    Attributes:
      config: the :class:`AugmentConfig` it was trained with.
      denoiser, schedule, state: the denoiser module, noise schedule and trained
        :class:`~privdebias_jax.augment.diffusion.DiffusionState` (sampling uses ``ema_params``).
      guide_class, guide_attr: real-data classifiers used for KL guidance on x̂₀.
      judge_class, judge_attr: independent real-data classifiers used by :func:`quality_report`.
      num_classes, num_attributes: the label ranges.
      data_shape: ``(H, W, C)`` of the real samples (generated samples get the same shape).
      real_counts: ``(C, A)`` counts of the real training set.
      codec: the latent codec (shape/colour for ``config.latent == "colour"``, per-channel PCA
        for ``"pca"``) or ``None`` (pixel space).
      info: training times and histories.
    """

    config: AugmentConfig
    denoiser: nn.Module
    schedule: Schedule
    state: DiffusionState
    guide_class: TrainedClassifier
    guide_attr: TrainedClassifier
    judge_class: TrainedClassifier
    judge_attr: TrainedClassifier
    num_classes: int
    num_attributes: int
    data_shape: tuple[int, ...]
    real_counts: np.ndarray
    codec: PCACodec | ColourCodec | None = None
    info: dict = dataclasses.field(default_factory=dict)
    _samplers: dict = dataclasses.field(default_factory=dict, repr=False)

    def sampler(self, *, cfg: bool, kl: bool, stochastic: bool) -> Callable[..., jax.Array]:
        """The jitted scan sampler for these flags (built once, cached)."""
        flags = (bool(cfg), bool(kl), bool(stochastic))
        if flags not in self._samplers:
            guidance: dict[str, Any] = {}
            if kl:
                gc, ga = self.guide_class, self.guide_attr

                def classify_class(p, x):
                    return dataclasses.replace(gc, params=p).logits(x)

                def classify_attr(p, x):
                    return dataclasses.replace(ga, params=p).logits(x)

                guidance = guidance_options(
                    self.codec, self.config.resolved_guidance_space, classify_class, classify_attr,
                    num_classes=self.num_classes, class_weight=self.config.class_weight,
                    smoothing=self.config.target_smoothing, group_by=self.config.guidance_groups,
                )
            fn = make_sampler(
                self.denoiser, self.schedule, image_shape=self.model_shape, num_classes=self.num_classes,
                num_attributes=self.num_attributes, steps=self.config.sample_steps, cfg=cfg,
                stochastic=stochastic, clip=1.0 if self.codec is None else self.codec.clip, **guidance,
            )
            self._samplers[flags] = jax.jit(fn)
        return self._samplers[flags]

    @property
    def model_shape(self) -> tuple[int, ...]:
        """The shape of one sample as the denoiser sees it: ``(S, S, C)``, or ``(latent_dim,)`` in a latent."""
        if self.codec is not None:
            return (self.codec.latent_dim,)
        return (self.config.image_size, self.config.image_size, int(self.data_shape[-1]))

    def decode_images(self, x: jax.Array) -> jax.Array:
        """Denoiser samples → images ``(B, S, S, C)`` in the diffusion scale ``[−1, 1]`` (latent decode or identity)."""
        return x if self.codec is None else decode(self.codec, x)

    @property
    def guide_params(self) -> tuple[Params, Params]:
        """``(class_params, attr_params)`` of the guidance classifiers."""
        return (self.guide_class.params, self.guide_attr.params)


def resize_images(x: Any, size: int) -> jax.Array:
    """Resize ``(N, H, W, C)`` images to ``(N, size, size, C)`` (bilinear, antialiased; identity if equal)."""
    x = jnp.asarray(x, jnp.float32)
    if x.shape[1] == size and x.shape[2] == size:
        return x
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "linear", antialias=True)


def decorrelated_training_set(
    train_set: Dataset,
    num_classes: int,
    num_attributes: int,
    key: PRNGKey,
    *,
    counterfactual: Counterfactual | None = None,
    copies: int = 4,
) -> Dataset:
    """Real samples in which the attribute is independent of the class (for the classifiers).

    With ``counterfactual``: the training set plus ``copies`` counterfactual copies, each sample
    in a uniformly random attribute. Without: ``N`` samples drawn with probability
    ``∝ 1 / N[y_i, a_i]`` (every non-empty cell equally likely). Ids are renumbered ``0..``
    (the set only trains classifiers).
    """
    parts = [train_set]
    n = len(train_set)
    if counterfactual is not None:
        for c in range(int(copies)):
            a_new = np.asarray(jax.random.randint(jax.random.fold_in(key, c), (n,), 0, num_attributes), np.int32)
            parts.append(counterfactual(train_set, a_new))
    else:
        counts = np.asarray(attribute_counts(np.asarray(train_set.y), np.asarray(train_set.a), num_classes, num_attributes))
        w = 1.0 / counts[np.asarray(train_set.y), np.asarray(train_set.a)]
        rows = np.asarray(jax.random.choice(key, n, (n,), replace=True, p=jnp.asarray(w / w.sum())))
        parts = [Dataset(*(np.asarray(v)[rows] for v in train_set))]
    x = np.concatenate([np.asarray(p.x, np.float32) for p in parts])
    y = np.concatenate([np.asarray(p.y, np.int32) for p in parts])
    a = np.concatenate([np.asarray(p.a, np.int32) for p in parts])
    return Dataset(x, y, a, np.arange(len(y), dtype=np.int64))


def _train_classifier(
    model_name: str,
    ds: Dataset,
    labels: np.ndarray,
    num_out: int,
    image_size: int,
    config: AugmentConfig,
    key: PRNGKey,
    checkpoint_dir: Path | None,
    progress: bool,
    desc: str,
    **model_options: Any,
) -> TrainedClassifier:
    x = np.asarray(resize_images(ds.x, image_size))
    data = Dataset(x, labels.astype(np.int32), np.asarray(ds.a), np.asarray(ds.idx))
    model = create_model(model_name, num_out, **model_options)
    tx = make_optimizer("adam", 1e-3)
    k_init, k_fit = jax.random.split(key)
    state = create_train_state(model, tx, k_init, x.shape[1:])
    result = fit(
        model, tx, state, data, epochs=config.classifier_epochs, batch_size=config.classifier_batch_size,
        key=k_fit, checkpoint_dir=checkpoint_dir, resume=True, progress=progress, desc=desc,
    )
    return TrainedClassifier(model, result.state.params, result.state.model_state, image_size)


def fit_augmenter(
    train_set: Dataset,
    *,
    num_classes: int,
    num_attributes: int,
    config: AugmentConfig,
    key: PRNGKey,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = False,
    counterfactual: Counterfactual | None = None,
) -> Augmenter:
    """Train the conditional denoiser and the real-data classifiers on ``train_set``.

    Args:
      train_set: real images ``(N, H, W, C)`` in ``[0, 1]`` with class ``y`` and attribute ``a``.
      num_classes, num_attributes: label ranges.
      config: the :class:`AugmentConfig` (``AugmentConfig.cpu_default()`` on CPU).
      key: the only source of randomness (split for the denoiser and each classifier).
      checkpoint_dir: if given, the denoiser (``DIR/denoiser``) and each classifier
        (``DIR/guide_class`` ...) are checkpointed with orbax and training resumes from the
        newest checkpoint; a checkpoint of another configuration raises.
      progress: show progress bars.
      counterfactual: optional ``counterfactual(ds, a_new)`` (see the module docstring).

    Raises:
      PrivDebiasError: data that is not images in ``[0, 1]``, labels out of range, fewer than
        two samples, a checkpoint from another configuration.
    """
    config = config.validate()
    validate_dataset(train_set, num_classes, num_attributes, name="train_set")
    x = np.asarray(train_set.x, np.float32)
    if x.ndim != 4:
        raise PrivDebiasError(f"train_set.x must hold images (N, H, W, C), got shape {x.shape}")
    if len(train_set) < 2:
        raise PrivDebiasError(f"train_set needs at least 2 samples, got {len(train_set)}")
    if x.min() < -1e-6 or x.max() > 1 + 1e-6:
        raise PrivDebiasError(f"train_set.x must lie in [0, 1], got range [{x.min():.3g}, {x.max():.3g}]")
    root = None if checkpoint_dir is None else Path(checkpoint_dir).expanduser().resolve()
    k_den, k_data, k_gc, k_ga, k_jc, k_ja = jax.random.split(key, 6)
    channels = x.shape[-1]
    denoiser = create_denoiser(config, num_classes, num_attributes, channels)
    schedule = make_schedule(config)
    x_model = to_model_scale(np.asarray(resize_images(x, config.image_size)))
    codec = None
    if config.latent == "colour":
        codec = fit_colour_codec(x_model, config.latent_dim)
    elif config.latent == "pca":
        codec = fit_pca_codec(x_model, config.latent_dim)
    if codec is not None:
        x_model = np.asarray(jax.jit(encode)(codec, jnp.asarray(x_model)))
    t0 = time.perf_counter()
    state, history = train_denoiser(
        denoiser, schedule, config, x_model, np.asarray(train_set.y), np.asarray(train_set.a),
        num_classes=num_classes, num_attributes=num_attributes, key=k_den,
        checkpoint_dir=None if root is None else root / "denoiser", progress=progress,
    )
    denoiser_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    decor = decorrelated_training_set(
        train_set, num_classes, num_attributes, k_data, counterfactual=counterfactual,
        copies=config.counterfactual_copies,
    )

    def sub(name: str) -> Path | None:
        return None if root is None else root / name

    hidden = tuple(config.classifier_hidden)
    data_size = int(x.shape[1])
    guide_class = _train_classifier("mlp", decor, np.asarray(decor.y), num_classes, config.image_size, config,
                                    k_gc, sub("guide_class"), progress, "guide class", hidden=hidden)
    guide_attr = _train_classifier("mlp", decor, np.asarray(decor.a), num_attributes, config.image_size, config,
                                   k_ga, sub("guide_attr"), progress, "guide attribute", hidden=hidden)
    judge_class = _train_classifier("small_cnn", decor, np.asarray(decor.y), num_classes, data_size, config,
                                    k_jc, sub("judge_class"), progress, "judge class")
    judge_attr = _train_classifier("small_cnn", decor, np.asarray(decor.a), num_attributes, data_size, config,
                                   k_ja, sub("judge_attr"), progress, "judge attribute")
    classifier_seconds = time.perf_counter() - t0
    counts = np.asarray(attribute_counts(np.asarray(train_set.y), np.asarray(train_set.a), num_classes, num_attributes))
    info = {
        "denoiser_seconds": denoiser_seconds,
        "classifier_seconds": classifier_seconds,
        "denoiser_history": history,
        "classifier_data": "counterfactual" if counterfactual is not None else "cell-balanced resample",
        "config": config.to_dict(),
    }
    if root is not None:
        (root / "augmenter.json").write_text(json.dumps({"config": config.to_dict(), "data_shape": list(x.shape[1:]),
                                                         "num_classes": num_classes, "num_attributes": num_attributes}))
    return Augmenter(config, denoiser, schedule, state, guide_class, guide_attr, judge_class, judge_attr,
                     int(num_classes), int(num_attributes), tuple(x.shape[1:]), counts, codec, info)


def cell_labels(cell_counts: np.ndarray | Mapping[tuple[int, int], int], num_classes: int, num_attributes: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Expand per-cell counts into label vectors ``(y, a)``, cell by cell in row-major order.

    ``cell_counts`` is a ``(C, A)`` array of non-negative integers or a mapping ``{(y, a): n}``.

    Raises:
      PrivDebiasError: a wrong shape, an unknown cell (out of range), negative, NaN or
        non-integer counts.
    """
    if isinstance(cell_counts, Mapping):
        table = np.zeros((num_classes, num_attributes), np.int64)
        for cell, n in cell_counts.items():
            try:
                yy, aa = (int(v) for v in cell)
            except (TypeError, ValueError):
                raise PrivDebiasError(f"a cell must be a pair (y, a), got {cell!r}") from None
            if not (0 <= yy < num_classes and 0 <= aa < num_attributes):
                raise PrivDebiasError(
                    f"unknown cell (y={yy}, a={aa}): classes are 0..{num_classes - 1}, attributes 0..{num_attributes - 1}"
                )
            table[yy, aa] += _count(n, (yy, aa))
        cell_counts = table
    counts = np.asarray(cell_counts)
    if counts.shape != (num_classes, num_attributes):
        raise PrivDebiasError(
            f"cell_counts must have shape (num_classes, num_attributes) = ({num_classes}, {num_attributes}), "
            f"got {counts.shape}: it names cells the augmenter does not know"
        )
    if np.issubdtype(counts.dtype, np.floating):
        if not np.all(np.isfinite(counts)) or not np.all(counts == np.round(counts)):
            raise PrivDebiasError("cell_counts must hold whole numbers (no NaN, inf or fractions)")
    elif not np.issubdtype(counts.dtype, np.integer):
        raise PrivDebiasError(f"cell_counts must hold integers, got dtype {counts.dtype}")
    if np.any(counts < 0):
        raise PrivDebiasError("cell_counts must be non-negative")
    counts = counts.astype(np.int64)
    cells = np.repeat(np.arange(num_classes * num_attributes), counts.reshape(-1))
    return (cells // num_attributes).astype(np.int32), (cells % num_attributes).astype(np.int32)


def _count(n: Any, cell: tuple[int, int]) -> int:
    try:
        v = float(n)
    except (TypeError, ValueError):
        raise PrivDebiasError(f"count of cell {cell} must be a non-negative integer, got {n!r}") from None
    if not np.isfinite(v) or v < 0 or v != int(v):
        raise PrivDebiasError(f"count of cell {cell} must be a non-negative integer, got {n!r}")
    return int(v)


def generate(
    augmenter: Augmenter,
    cell_counts: np.ndarray | Mapping[tuple[int, int], int],
    *,
    key: PRNGKey,
    start_id: int,
    guidance_scale: float | None = None,
    kl_scale: float | None = None,
    eta: float = 0.0,
    batch_size: int | None = None,
) -> Dataset:
    """Generate ``cell_counts[y, a]`` samples of every cell with the guided DDIM sampler.

    Args:
      augmenter: from :func:`fit_augmenter`.
      cell_counts: ``(C, A)`` non-negative integers (e.g. :func:`plan_augmentation`) or ``{(y, a): n}``.
      key: batch ``b`` samples with ``fold_in(key, b)``; the same key gives the same samples.
      start_id: the first new sample id (e.g. :func:`~privdebias_jax.data.next_free_id`).
      guidance_scale: classifier-free guidance weight ``w ≥ 0`` (default ``config.guidance_scale``).
      kl_scale: KL-guidance step ``s ≥ 0`` (default ``config.kl_scale``; 0 disables it).
      eta: DDIM η ≥ 0 (0 = deterministic; > 0 adds ``σ_t(η)`` noise from ``key``).
      batch_size: samples per sampler call (default ``config.sample_batch``; one compilation).

    Returns:
      A :class:`Dataset` with ``x`` of the real data's shape, float32 in ``[0, 1]``, labels
      ``y``, attributes ``a`` (cell by cell) and ids ``start_id, start_id + 1, …``.

    Raises:
      PrivDebiasError: an unknown cell or bad counts (see :func:`cell_labels`), a negative or
        NaN scale or η, a negative ``start_id``.
    """
    cfg = augmenter.config
    w = check_scale(cfg.guidance_scale if guidance_scale is None else guidance_scale, "guidance_scale")
    s = check_scale(cfg.kl_scale if kl_scale is None else kl_scale, "kl_scale")
    eta = check_scale(eta, "eta")
    if int(start_id) < 0:
        raise PrivDebiasError(f"start_id must be non-negative, got {start_id}")
    y, a = cell_labels(cell_counts, augmenter.num_classes, augmenter.num_attributes)
    n = len(y)
    h, wd, c = augmenter.data_shape
    if n == 0:
        return Dataset(np.zeros((0, h, wd, c), np.float32), y, a, np.zeros(0, np.int64))
    bs = min(int(batch_size or cfg.sample_batch), n)
    sampler = augmenter.sampler(cfg=w != 1.0, kl=s > 0, stochastic=eta > 0)
    params = augmenter.state.ema_params
    out = []
    for b, start in enumerate(range(0, n, bs)):
        yb, ab = y[start : start + bs], a[start : start + bs]
        real = len(yb)
        mask = np.zeros(bs, np.float32)
        mask[:real] = 1.0
        if real < bs:
            yb = np.concatenate([yb, np.full(bs - real, yb[0], np.int32)])
            ab = np.concatenate([ab, np.full(bs - real, ab[0], np.int32)])
        xb = sampler(params, augmenter.guide_params, jnp.asarray(yb), jnp.asarray(ab), jnp.asarray(mask),
                     jax.random.fold_in(key, b), jnp.float32(w), jnp.float32(s), jnp.float32(eta))
        out.append(np.asarray(resize_images(from_model_scale(augmenter.decode_images(xb)), h))[:real])
    x = np.clip(np.concatenate(out), 0.0, 1.0).astype(np.float32)
    ids = np.arange(int(start_id), int(start_id) + n, dtype=np.int64)
    return Dataset(x, y, a, ids)


def quality_report(augmenter: Augmenter, synthetic: Dataset, rare_threshold: int = 10) -> dict[str, Any]:
    """How recognisable the synthetic samples are, by the independent real-data judges.

    For every cell ``(y, a)`` with synthetic samples: the fraction the class judge labels
    ``y`` (``class_acc_per_cell``) and the fraction the attribute judge labels ``a``
    (``attr_acc_per_cell``), from accumulated counts (:func:`privdebias_jax.metrics.confusion_counts`);
    ``None`` for cells without samples. Also overall accuracies, the minimum over cells, and
    the same restricted to *rare* cells (fewer than ``rare_threshold`` real training samples).

    Raises:
      PrivDebiasError: an empty or malformed synthetic set, or one whose image shape differs
        from the real data's.
    """
    validate_dataset(synthetic, augmenter.num_classes, augmenter.num_attributes, name="synthetic")
    if len(synthetic) == 0:
        raise PrivDebiasError("quality_report: the synthetic set is empty")
    if tuple(np.shape(synthetic.x)[1:]) != tuple(augmenter.data_shape):
        raise PrivDebiasError(
            f"synthetic samples have shape {np.shape(synthetic.x)[1:]}, the real data {augmenter.data_shape}"
        )
    C, A = augmenter.num_classes, augmenter.num_attributes
    y, a = np.asarray(synthetic.y), np.asarray(synthetic.a)
    pred_y = augmenter.judge_class.predict(synthetic.x)
    pred_a = augmenter.judge_attr.predict(synthetic.x)
    cc = np.asarray(confusion_counts(y, a, pred_y, C, A), np.float64)
    ca = np.asarray(confusion_counts(a, y, pred_a, A, C), np.float64)
    class_cell = np.asarray(cell_accuracy_from_counts(cc), np.float64)  # (C, A), NaN where empty
    attr_cell = np.asarray(cell_accuracy_from_counts(ca), np.float64).T  # (C, A)
    n_cell = cc.sum(axis=2)
    has = n_cell > 0
    rare = has & (augmenter.real_counts < rare_threshold)

    def nanlist(m: np.ndarray) -> list:
        return [[None if not np.isfinite(v) else float(v) for v in row] for row in m]

    def summary(sel: np.ndarray) -> dict[str, Any]:
        if not sel.any():
            return {"cells": 0}
        return {
            "cells": int(sel.sum()),
            "class_acc_min": float(class_cell[sel].min()),
            "attr_acc_min": float(attr_cell[sel].min()),
            "class_acc_mean": float(class_cell[sel].mean()),
            "attr_acc_mean": float(attr_cell[sel].mean()),
            "cells_both_ge_90": int(((class_cell >= 0.9) & (attr_cell >= 0.9) & sel).sum()),
        }

    return {
        "num_samples": int(len(synthetic)),
        "class_acc": float(np.mean(pred_y == y)),
        "attr_acc": float(np.mean(pred_a == a)),
        "class_acc_per_cell": nanlist(class_cell),
        "attr_acc_per_cell": nanlist(attr_cell),
        "samples_per_cell": n_cell.astype(int).tolist(),
        "real_per_cell": np.asarray(augmenter.real_counts).astype(int).tolist(),
        "all_cells": summary(has),
        "rare_cells": summary(rare),
        "rare_threshold": int(rare_threshold),
    }


def save_sample_grid(synthetic: Dataset, path: str | os.PathLike, num_classes: int, num_attributes: int,
                     title: str | None = None) -> Path:
    """A PNG grid with one synthetic sample per cell: row = class ``y``, column = attribute ``a``
    (blank where a cell has none)."""
    from privdebias_jax.report import save_image_grid

    x = np.asarray(synthetic.x, np.float32)
    if x.ndim != 4:
        raise PrivDebiasError(f"expected images (N, H, W, C), got shape {x.shape}")
    grid = np.zeros((num_classes * num_attributes, *x.shape[1:]), np.float32) + 1.0
    y, a = np.asarray(synthetic.y), np.asarray(synthetic.a)
    for cell in range(num_classes * num_attributes):
        rows = np.flatnonzero((y == cell // num_attributes) & (a == cell % num_attributes))
        if len(rows):
            grid[cell] = x[rows[0]]
    return save_image_grid(grid, path, num_classes, num_attributes,
                           row_labels=[f"y={i}" for i in range(num_classes)],
                           col_labels=[f"a={j}" for j in range(num_attributes)], title=title)


__all__ = [
    "Augmenter",
    "TrainedClassifier",
    "Counterfactual",
    "resize_images",
    "decorrelated_training_set",
    "fit_augmenter",
    "guidance_options",
    "cell_labels",
    "generate",
    "quality_report",
    "save_sample_grid",
]
