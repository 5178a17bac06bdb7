"""Training: a pure, jit-able train step (optax), a fit loop (scanned or per-batch, chosen by measurement),
a regulariser hook, evaluation by accumulated counts, and resumable orbax checkpoints.

The pieces, smallest first:

* :class:`TrainState`: ``step``, ``params``, ``model_state`` (``batch_stats`` or ``{}``),
  ``opt_state``; a pytree, updated with ``.replace``.
* :func:`make_train_step` ``(model, tx, loss=, regularizer=) -> step(state, batch, key)``:
  minimises ``loss(logits, batch) + regularizer(params, batch, logits, features)``, where
  ``loss`` defaults to the masked mean cross-entropy. Regularisers (EnD, HSIC, ...) plug in
  here. A batch whose ``mask`` is all zero leaves the state unchanged (so epochs padded to a
  whole number of scan chunks train exactly like unpadded ones). The step is pure: the
  caller jits it.
* :func:`make_epoch_fn`: ``jax.lax.scan`` of the step over stacked batches.
* :func:`fit`: epochs of shuffled batches (keys ``fold_in(key, epoch)``; a scan over the
  epoch for convolution-free models, one jitted call per batch for CNNs), progress bar,
  checkpoint after every epoch, resume from the newest checkpoint. Deterministic given the key:
  an interrupted and resumed run ends with the same parameters as an uninterrupted one.
* :func:`predict` / :func:`evaluate`: fixed-shape batches; ``evaluate`` accumulates the
  count tensor ``C[y, a, ŷ]`` and the summed loss over batches and divides at the end.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from privdebias_jax import checkpoint as ckpt
from privdebias_jax.data.dataset import Batch, Dataset, num_batches, stack_batches
from privdebias_jax.metrics import fairness
from privdebias_jax.models import init_model
from privdebias_jax.types import ModelState, Params, PrivDebiasError, PRNGKey

#: ``regularizer(params, batch, logits, features) -> scalar`` (already weighted).
Regularizer = Callable[[Params, Batch, jax.Array, jax.Array], jax.Array]
#: ``loss(logits, batch) -> scalar``: the data term of the objective.
DataLoss = Callable[[jax.Array, Batch], jax.Array]


class TrainState(struct.PyTreeNode):
    """Everything that changes during training; a pytree (checkpointed as a whole)."""

    step: jax.Array
    params: Params
    model_state: ModelState
    opt_state: optax.OptState


def make_optimizer(
    name: str = "adam", learning_rate: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.9
) -> optax.GradientTransformation:
    """``adam`` (L2 weight decay added to the gradient, as in PyTorch's Adam), ``adamw`` or ``sgd``.

    Raises:
      PrivDebiasError: unknown name, non-positive learning rate or negative weight decay.
    """
    if not learning_rate > 0:
        raise PrivDebiasError(f"learning_rate must be positive, got {learning_rate}")
    if weight_decay < 0:
        raise PrivDebiasError(f"weight_decay must be non-negative, got {weight_decay}")
    if name == "adam":
        parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
        return optax.chain(*parts, optax.adam(learning_rate))
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
        return optax.chain(*parts, optax.sgd(learning_rate, momentum=momentum))
    raise PrivDebiasError(f"unknown optimizer {name!r}; expected adam, adamw or sgd")


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, key: PRNGKey, input_shape: tuple[int, ...]
) -> TrainState:
    """Initialise parameters (from ``key``) and the optimiser state."""
    params, model_state = init_model(model, key, input_shape)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state, opt_state=tx.init(params))


def apply_model(
    model: nn.Module,
    params: Params,
    model_state: ModelState,
    x: jax.Array,
    *,
    train: bool = False,
    key: PRNGKey | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, ModelState]:
    """Run ``model`` and return ``(logits, features, new_model_state)``.

    In training mode the mutable collections (``batch_stats``) are updated; ``key`` feeds
    dropout; ``mask`` (``(B,)``, 1 = real sample) keeps padding rows out of batch-norm
    statistics. In evaluation mode ``new_model_state`` is ``model_state``.
    """
    variables = {"params": params, **model_state}
    rngs = {"dropout": key} if key is not None else None
    if train and model_state:
        (logits, features), new_state = model.apply(
            variables, x, train=True, mask=mask, rngs=rngs, mutable=list(model_state.keys())
        )
        return logits, features, dict(new_state)
    logits, features = model.apply(variables, x, train=train, mask=mask, rngs=rngs)
    return logits, features, model_state


def cross_entropy_loss(logits: jax.Array, batch: Batch) -> jax.Array:
    """Masked mean softmax cross-entropy: ``Σ_i m_i · CE(logits_i, y_i) / max(Σ_i m_i, 1)``."""
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
    mask = batch.mask.astype(per_example.dtype)
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_loss_fn(
    model: nn.Module, loss: DataLoss = cross_entropy_loss, regularizer: Regularizer | None = None
) -> Callable[..., jax.Array]:
    """``loss_fn(params, batch, model_state={}) -> scalar`` in evaluation mode.

    This is the library's objective contract (``loss_fn(params, batch)``), used by influence
    functions and unlearning. ``model_state`` (batch-norm statistics) is an argument, never
    closed over, so jit does not constant-fold it.
    """

    def loss_fn(params: Params, batch: Batch, model_state: ModelState | None = None) -> jax.Array:
        logits, features, _ = apply_model(model, params, model_state or {}, batch.x, train=False)
        value = loss(logits, batch)
        if regularizer is not None:
            value = value + regularizer(params, batch, logits, features)
        return value

    return loss_fn


class StepMetrics(NamedTuple):
    """Sums over a batch (or an epoch): divide at the end, never average averages."""

    loss_sum: jax.Array
    reg_sum: jax.Array
    correct: jax.Array
    count: jax.Array


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    loss: DataLoss = cross_entropy_loss,
    regularizer: Regularizer | None = None,
) -> Callable[[TrainState, Batch, PRNGKey], tuple[TrainState, StepMetrics]]:
    """A pure train step ``step(state, batch, key) -> (state, metrics)``.

    Minimises ``J(θ) = loss(logits, batch) + regularizer(θ, batch, logits, features)`` with one
    optax update. ``key`` is folded with ``state.step`` for dropout, so a step is a function
    of its inputs. ``metrics`` holds batch *sums* (loss × count, correct, count). A batch with
    ``Σ mask = 0`` leaves the state unchanged. Jit it (``jax.jit(step)``) or scan it
    (:func:`make_epoch_fn`).
    """

    def objective(params: Params, model_state: ModelState, batch: Batch, key: PRNGKey):
        logits, features, new_state = apply_model(
            model, params, model_state, batch.x, train=True, key=key, mask=batch.mask
        )
        data = loss(logits, batch)
        reg = regularizer(params, batch, logits, features) if regularizer is not None else jnp.zeros(())
        return data + reg, (data, reg, logits, new_state)

    def step(state: TrainState, batch: Batch, key: PRNGKey) -> tuple[TrainState, StepMetrics]:
        step_key = jax.random.fold_in(key, state.step)
        grads, (data, reg, logits, new_model_state) = jax.grad(objective, has_aux=True)(
            state.params, state.model_state, batch, step_key
        )
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        count = jnp.sum(batch.mask)
        nonempty = count > 0
        new = TrainState(
            step=state.step + nonempty.astype(state.step.dtype),
            params=new_params,
            model_state=new_model_state,
            opt_state=new_opt_state,
        )
        new = jax.tree_util.tree_map(lambda n, o: jnp.where(nonempty, n, o), new, state)
        correct = jnp.sum((jnp.argmax(logits, -1) == batch.y) * batch.mask)
        return new, StepMetrics(data * count, reg * count, correct, count)

    return step


def make_epoch_fn(
    train_step: Callable[[TrainState, Batch, PRNGKey], tuple[TrainState, StepMetrics]],
) -> Callable[[TrainState, Batch, PRNGKey], tuple[TrainState, StepMetrics]]:
    """``epoch(state, stacked_batches, key) -> (state, summed metrics)`` via ``jax.lax.scan``.

    ``stacked_batches`` has a leading batch axis (see :func:`~privdebias_jax.data.stack_batches`).
    """

    def epoch(state: TrainState, batches: Batch, key: PRNGKey) -> tuple[TrainState, StepMetrics]:
        def body(s: TrainState, b: Batch):
            return train_step(s, b, key)

        state, metrics = jax.lax.scan(body, state, batches)
        return state, StepMetrics(*(jnp.sum(m) for m in metrics))

    return epoch


class FitResult(NamedTuple):
    """The final state and one history row per epoch (mean loss, accuracy, seconds)."""

    state: TrainState
    history: list[dict[str, float]]


def _pad_batches(batches: Batch, multiple: int) -> Batch:
    nb = batches.mask.shape[0]
    extra = (-nb) % multiple
    if extra == 0:
        return batches

    def pad(v: np.ndarray) -> np.ndarray:
        filler = np.zeros((extra,) + v.shape[1:], v.dtype) if v is batches.mask else np.repeat(v[:1], extra, 0)
        return np.concatenate([v, filler])

    return Batch(*(pad(v) for v in batches))


@functools.lru_cache(maxsize=32)
def _compiled_train_fn(model: nn.Module, tx, loss, regularizer, per_batch: bool):
    """The jitted step (``per_batch``, state donated) or scanned epoch function of ``fit``, cached
    per (model, optimiser, loss, regulariser): repeated ``fit`` calls reuse the compiled code."""
    train_step = make_train_step(model, tx, loss=loss, regularizer=regularizer)
    if per_batch:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(make_epoch_fn(train_step))


def _train_fn(model: nn.Module, tx, loss, regularizer, per_batch: bool):
    try:
        return _compiled_train_fn(model, tx, loss, regularizer, per_batch)
    except TypeError:  # an unhashable model/optimiser/loss: compile for this call only
        return _compiled_train_fn.__wrapped__(model, tx, loss, regularizer, per_batch)


def fit(
    model: nn.Module,
    tx: optax.GradientTransformation,
    state: TrainState,
    train_set: Dataset,
    *,
    epochs: int,
    batch_size: int,
    key: PRNGKey,
    loss: DataLoss = cross_entropy_loss,
    regularizer: Regularizer | None = None,
    steps_per_call: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    max_to_keep: int | None = 2,
    progress: bool = True,
    desc: str = "train",
    on_epoch_end: Callable[[int, TrainState, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``state`` for ``epochs`` epochs of shuffled batches of ``train_set``.

    Epoch ``e`` shuffles with ``fold_in(key, e)``. With ``steps_per_call = 1`` every batch is one
    call of the jitted step (state buffers donated); with ``k > 1`` batches are scanned ``k`` at
    a time under one jit (the last chunk padded with empty batches, which do not change the
    state); both give the same parameters up to float rounding. ``None`` picks by measurement
    (``benchmarks/fit_loop.py``, 2 CPU cores): one call per batch for models with convolution
    kernels (XLA's CPU convolutions run 11–15× slower inside ``lax.scan``), the whole epoch in
    one scan otherwise (1.45× faster than the loop for the 3×100 MLP). With ``checkpoint_dir``, the state is saved after
    every epoch as checkpoint ``e + 1``; with ``resume`` an existing newest checkpoint is
    restored and training continues from the epoch after it; without ``resume`` existing
    checkpoints in ``checkpoint_dir`` are deleted first (a fresh run). ``epochs = 0`` returns
    ``state`` unchanged.

    Raises:
      PrivDebiasError: for negative ``epochs``, non-positive ``batch_size``, an empty
        ``train_set``, a checkpoint to resume from that is beyond ``epochs``, or a loss that
        becomes NaN/inf.
    """
    if int(epochs) < 0:
        raise PrivDebiasError(f"epochs must be non-negative, got {epochs}")
    if int(batch_size) <= 0:
        raise PrivDebiasError(f"batch_size must be positive, got {batch_size}")
    if len(train_set) == 0:
        raise PrivDebiasError("train_set is empty")
    start_epoch = 0
    if checkpoint_dir is not None and resume and ckpt.latest_step(checkpoint_dir) is not None:
        start_epoch = int(ckpt.latest_step(checkpoint_dir))
        if start_epoch > int(epochs):
            raise PrivDebiasError(
                f"cannot resume: {checkpoint_dir} holds a checkpoint of epoch {start_epoch}, "
                f"beyond the requested {epochs} epochs"
            )
        state = ckpt.restore_checkpoint(checkpoint_dir, state, start_epoch)
    elif checkpoint_dir is not None:
        ckpt.clear_checkpoints(checkpoint_dir)  # a fresh run: never resume from an older one's state
    if steps_per_call is None:  # auto: measured in benchmarks/fit_loop.py
        has_conv = any(np.ndim(leaf) == 4 for leaf in jax.tree_util.tree_leaves(state.params))
        per_batch = has_conv
        steps_per_call = 1 if has_conv else num_batches(len(train_set), int(batch_size))
    per_batch = int(steps_per_call) <= 1
    if per_batch:
        step_fn = _train_fn(model, tx, loss, regularizer, True)
        state = jax.tree_util.tree_map(jnp.copy, state)  # donation must not invalidate the caller's state
    else:
        epoch_fn = _train_fn(model, tx, loss, regularizer, False)
    history: list[dict[str, float]] = []
    bar = None
    if progress and epochs > start_epoch:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(epochs) - start_epoch, desc=desc, unit="epoch", leave=False)
    for epoch in range(start_epoch, int(epochs)):
        t0 = time.perf_counter()
        ekey = jax.random.fold_in(key, epoch)
        batches = stack_batches(train_set, batch_size, jax.random.fold_in(ekey, 0))
        nb = batches.mask.shape[0]
        step_key = jax.random.fold_in(ekey, 1)
        totals = None
        if per_batch:
            device_batches = Batch(*(jnp.asarray(v) for v in batches))
            for i in range(nb):
                state, metrics = step_fn(state, Batch(*(v[i] for v in device_batches)), step_key)
                totals = metrics if totals is None else jax.tree_util.tree_map(jnp.add, totals, metrics)
        else:
            chunk = max(1, min(int(steps_per_call), nb))
            batches = _pad_batches(batches, chunk)
            for c in range(math.ceil(nb / chunk)):
                part = Batch(*(v[c * chunk : (c + 1) * chunk] for v in batches))
                state, metrics = epoch_fn(state, part, step_key)
                totals = metrics if totals is None else jax.tree_util.tree_map(jnp.add, totals, metrics)
        sums = np.array([float(m) for m in totals])
        row = {
            "epoch": epoch + 1,
            "loss": sums[0] / max(sums[3], 1.0),
            "reg": sums[1] / max(sums[3], 1.0),
            "acc": sums[2] / max(sums[3], 1.0),
            "seconds": time.perf_counter() - t0,
        }
        if not np.isfinite(row["loss"]):
            raise PrivDebiasError(f"training diverged: loss is {row['loss']} at epoch {epoch + 1}")
        history.append(row)
        if checkpoint_dir is not None:
            ckpt.save_checkpoint(checkpoint_dir, epoch + 1, state, max_to_keep=max_to_keep, overwrite=True)
        if on_epoch_end is not None:  # a copy: the next step donates the live state's buffers
            on_epoch_end(epoch + 1, jax.tree_util.tree_map(jnp.copy, state) if per_batch else state, row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return FitResult(state, history)


def _forward(model: nn.Module, params: Params, model_state: ModelState, x: jax.Array):
    logits, features, _ = apply_model(model, params, model_state, x, train=False)
    return logits, features


_forward_jit = jax.jit(_forward, static_argnums=0)


def predict(
    model: nn.Module,
    params: Params,
    model_state: ModelState,
    data: Dataset | Any,
    batch_size: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, num_classes)`` and features ``(N, F)`` in evaluation mode, as NumPy.

    ``data`` is a :class:`Dataset` or an array of inputs. Batches have a fixed shape (the last
    one padded), so the forward pass compiles once per batch size.
    """
    x = np.asarray(data.x if isinstance(data, Dataset) else data)
    n = x.shape[0]
    if n == 0:
        raise PrivDebiasError("predict: no samples")
    bs = min(int(batch_size), n)
    logits, feats = [], []
    for start in range(0, n, bs):
        chunk = x[start : start + bs]
        real = chunk.shape[0]
        if real < bs:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], bs - real, 0)])
        lg, ft = _forward_jit(model, params, model_state, jnp.asarray(chunk))
        logits.append(np.asarray(lg)[:real])
        feats.append(np.asarray(ft)[:real])
    return np.concatenate(logits), np.concatenate(feats)


def _eval_counts(model, num_classes, num_attributes, params, model_state, batch):
    logits, _ = _forward(model, params, model_state, batch.x)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
    counts = fairness.confusion_counts(
        batch.y, batch.a, jnp.argmax(logits, -1), num_classes, num_attributes, mask=batch.mask
    )
    return counts, jnp.sum(per_example * batch.mask)


_eval_counts_jit = jax.jit(_eval_counts, static_argnums=(0, 1, 2))


def evaluate(
    model: nn.Module,
    params: Params,
    model_state: ModelState,
    ds: Dataset,
    num_classes: int,
    num_attributes: int,
    batch_size: int = 500,
) -> dict[str, Any]:
    """Accuracy, loss and fairness of a model on ``ds`` from counts accumulated over batches.

    Accumulates ``C[y, a, ŷ]`` (see :func:`privdebias_jax.metrics.confusion_counts`) and the
    summed cross-entropy batch by batch, then derives every rate from the totals. Returns the
    :func:`privdebias_jax.metrics.fairness_report_from_counts` fields plus ``loss`` and ``counts``.
    """
    counts = np.zeros((num_classes, num_attributes, num_classes), np.float64)
    loss_sum = 0.0
    for batch in _batches_for_eval(ds, batch_size):
        c, ls = _eval_counts_jit(model, num_classes, num_attributes, params, model_state, batch)
        counts += np.asarray(c, np.float64)
        loss_sum += float(ls)
    report = fairness.fairness_report_from_counts(counts)
    report["loss"] = loss_sum / max(counts.sum(), 1.0)
    report["counts"] = counts
    return report


def _batches_for_eval(ds: Dataset, batch_size: int):
    if len(ds) == 0:
        raise PrivDebiasError("evaluate: the dataset is empty")
    stacked = stack_batches(ds, min(int(batch_size), len(ds)))
    for i in range(stacked.mask.shape[0]):
        yield Batch(*(jnp.asarray(v[i]) for v in stacked))


__all__ = [
    "TrainState",
    "Regularizer",
    "DataLoss",
    "StepMetrics",
    "FitResult",
    "make_optimizer",
    "create_train_state",
    "apply_model",
    "cross_entropy_loss",
    "make_loss_fn",
    "make_train_step",
    "make_epoch_fn",
    "fit",
    "predict",
    "evaluate",
]
