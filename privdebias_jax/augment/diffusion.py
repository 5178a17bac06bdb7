"""Training the conditional denoiser: ε-prediction loss, a pure jit-able step, epochs, orbax checkpoints.

Loss (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", eq. 14, the "simple" loss):

    L(θ) = E_{x_0, t ~ U{0..T−1}, ε ~ N(0, I)} ‖ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t, ỹ, ã)‖²

(mean over pixels), where the condition is dropped for classifier-free guidance (Ho &
Salimans 2021): ``ỹ`` is the null token with probability ``cond_dropout`` and, independently,
so is ``ã``. Adam; an exponential moving average of the parameters (``ema_decay``) is kept
and used for sampling.

:func:`train_denoiser` runs epochs of shuffled batches (epoch ``e`` draws from
``fold_in(key, e)``), saves the state with orbax after every ``checkpoint_every`` epochs
and resumes from the newest checkpoint: an interrupted and resumed run ends with exactly the
parameters of an uninterrupted one. The checkpoint folder records the configuration's
fingerprint; resuming from a checkpoint of another configuration raises.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from privdebias_jax import checkpoint as ckpt
from privdebias_jax.augment.config import AugmentConfig, fingerprint_json
from privdebias_jax.augment.schedule import Schedule, q_sample
from privdebias_jax.data.dataset import num_batches
from privdebias_jax.types import Params, PrivDebiasError, PRNGKey

FINGERPRINT_FILE = "augment_fingerprint.json"


class DiffusionState(struct.PyTreeNode):
    """``step``, ``params``, ``ema_params`` (used for sampling) and the optimiser state."""

    step: jax.Array
    params: Params
    ema_params: Params
    opt_state: optax.OptState


def make_denoiser_optimizer(config: AugmentConfig) -> optax.GradientTransformation:
    """Adam (or AdamW with ``weight_decay``) with gradient clipping at global norm 1."""
    opt = optax.adamw(config.learning_rate, weight_decay=config.weight_decay) if config.weight_decay else optax.adam(
        config.learning_rate
    )
    return optax.chain(optax.clip_by_global_norm(1.0), opt)


def init_diffusion_state(
    denoiser: nn.Module, tx: optax.GradientTransformation, key: PRNGKey, image_shape: tuple[int, ...]
) -> DiffusionState:
    """Initialise the denoiser on a dummy batch ``(1, *image_shape)`` and the optimiser (one jit:
    eager initialisation compiles every layer's ops one by one)."""

    def init(k: PRNGKey) -> DiffusionState:
        x = jnp.zeros((1, *image_shape), jnp.float32)
        z = jnp.zeros((1,), jnp.int32)
        params = denoiser.init(k, x, z, z, z)["params"]
        return DiffusionState(jnp.zeros((), jnp.int32), params, params, tx.init(params))

    return jax.jit(init)(key)


def diffusion_loss(
    denoiser: nn.Module,
    params: Params,
    schedule: Schedule,
    x0: jax.Array,
    y: jax.Array,
    a: jax.Array,
    mask: jax.Array,
    key: PRNGKey,
    *,
    num_classes: int,
    num_attributes: int,
    cond_dropout: float,
) -> jax.Array:
    """The masked mean ε-prediction loss of one batch (``x0`` in ``[−1, 1]``, ``mask`` 1 = real row)."""
    b = x0.shape[0]
    k_t, k_eps, k_y, k_a = jax.random.split(key, 4)
    t = jax.random.randint(k_t, (b,), 0, schedule.alphas_cumprod.shape[0])
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t = q_sample(schedule, x0, eps, t)
    y_in = jnp.where(jax.random.uniform(k_y, (b,)) < cond_dropout, num_classes, y)
    a_in = jnp.where(jax.random.uniform(k_a, (b,)) < cond_dropout, num_attributes, a)
    pred = denoiser.apply({"params": params}, x_t, t, y_in, a_in, train=True)
    per_example = jnp.mean((pred - eps) ** 2, axis=tuple(range(1, x0.ndim)))
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_diffusion_step(
    denoiser: nn.Module,
    tx: optax.GradientTransformation,
    schedule: Schedule,
    config: AugmentConfig,
    num_classes: int,
    num_attributes: int,
) -> Callable[[DiffusionState, tuple[jax.Array, ...], PRNGKey], tuple[DiffusionState, jax.Array]]:
    """A pure step ``step(state, (x0, y, a, mask), key) -> (state, loss)``; jit or scan it.

    The step's randomness is ``fold_in(key, state.step)``; the EMA update is
    ``θ_ema ← d θ_ema + (1 − d) θ`` with ``d = min(ema_decay, (1 + n) / (10 + n))`` (warm-up).
    """

    def step(state: DiffusionState, batch: tuple[jax.Array, ...], key: PRNGKey):
        x0, y, a, mask = batch
        k = jax.random.fold_in(key, state.step)
        loss, grads = jax.value_and_grad(
            lambda p: diffusion_loss(
                denoiser, p, schedule, x0, y, a, mask, k, num_classes=num_classes,
                num_attributes=num_attributes, cond_dropout=config.cond_dropout,
            )
        )(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        n = state.step.astype(jnp.float32)
        d = jnp.minimum(config.ema_decay, (1.0 + n) / (10.0 + n)) if config.ema_decay > 0 else 0.0
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        return DiffusionState(state.step + 1, params, ema, opt_state), loss

    return step


def _check_fingerprint(directory: str | os.PathLike, fingerprint: str) -> None:
    path = Path(directory).expanduser().resolve() / FINGERPRINT_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        current = json.loads(fingerprint)
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff)
            raise PrivDebiasError(
                f"the checkpoint in {path.parent} was written by another configuration ({detail}); "
                "use another checkpoint_dir or the same configuration"
            )
    elif ckpt.latest_step(directory) is not None:
        raise PrivDebiasError(f"{Path(directory).resolve()} holds checkpoints but no {FINGERPRINT_FILE}")


@functools.lru_cache(maxsize=16)
def _training_program(denoiser: nn.Module, config: AugmentConfig, num_classes: int, num_attributes: int,
                      per_batch: bool) -> Callable[..., tuple[DiffusionState, jax.Array]]:
    """The jitted step (``per_batch``) or scanned epoch, cached per model and configuration so
    repeated and resumed trainings compile once (the schedule is an argument, not a constant)."""
    tx = make_denoiser_optimizer(config)

    def run(state: DiffusionState, batches: tuple[jax.Array, ...], key: PRNGKey, schedule: Schedule):
        step = make_diffusion_step(denoiser, tx, schedule, config, num_classes, num_attributes)
        if per_batch:
            return step(state, batches, key)
        state, losses = jax.lax.scan(lambda s, b: step(s, b, key), state, batches)
        return state, jnp.mean(losses)

    return jax.jit(run, donate_argnums=0)


@functools.lru_cache(maxsize=16)
def _init_program(denoiser: nn.Module, config: AugmentConfig, image_shape: tuple[int, ...]):
    tx = make_denoiser_optimizer(config)

    def init(k: PRNGKey) -> DiffusionState:
        x = jnp.zeros((1, *image_shape), jnp.float32)
        z = jnp.zeros((1,), jnp.int32)
        params = denoiser.init(k, x, z, z, z)["params"]
        return DiffusionState(jnp.zeros((), jnp.int32), params, params, tx.init(params))

    return jax.jit(init)


def train_denoiser(
    denoiser: nn.Module,
    schedule: Schedule,
    config: AugmentConfig,
    x0: np.ndarray,
    y: np.ndarray,
    a: np.ndarray,
    *,
    num_classes: int,
    num_attributes: int,
    key: PRNGKey,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = False,
    epochs: int | None = None,
) -> tuple[DiffusionState, list[dict[str, float]]]:
    """Train the denoiser on images ``x0`` ``(N, H, W, C)`` in ``[−1, 1]`` with labels ``y``, ``a``.

    ``epochs`` (default ``config.epochs``) lets a caller stop early (tests of resume). Batches
    drop the remainder (every step has the full batch size). Convolution-free denoisers scan
    a whole epoch under one jit; convolutional ones call a jitted step per batch (XLA CPU
    convolutions are slow inside ``lax.scan``; ``benchmarks/fit_loop.py`` measures it).

    Returns:
      The final :class:`DiffusionState` and one history row per epoch trained in this call
      (``epoch``, ``loss``, ``seconds``).

    Raises:
      PrivDebiasError: fewer samples than one batch, a checkpoint of another configuration,
        or a loss that becomes NaN.
    """
    epochs = config.epochs if epochs is None else int(epochs)
    n = int(x0.shape[0])
    bs = min(config.batch_size, n)
    if n == 0:
        raise PrivDebiasError("cannot train the denoiser on an empty dataset")
    nb = num_batches(n, bs, drop_remainder=True)
    k_init, k_train = jax.random.split(key)
    state = _init_program(denoiser, config, tuple(x0.shape[1:]))(k_init)
    fingerprint = fingerprint_json(
        config, {"image_shape": list(x0.shape[1:]), "num_classes": num_classes, "num_attributes": num_attributes}
    )
    start = 0
    if checkpoint_dir is not None:
        _check_fingerprint(checkpoint_dir, fingerprint)
        last = ckpt.latest_step(checkpoint_dir)
        if last is not None:
            if last > epochs:
                raise PrivDebiasError(f"cannot resume: {checkpoint_dir} holds epoch {last}, beyond {epochs} epochs")
            state = ckpt.restore_checkpoint(checkpoint_dir, state, last)
            start = int(last)
        root = Path(checkpoint_dir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        (root / FINGERPRINT_FILE).write_text(fingerprint)
    has_conv = any(np.ndim(v) == 4 for v in jax.tree_util.tree_leaves(state.params))
    program = _training_program(denoiser, config, num_classes, num_attributes, has_conv)
    xs, ys, as_ = jnp.asarray(x0, jnp.float32), jnp.asarray(y, jnp.int32), jnp.asarray(a, jnp.int32)
    ones = jnp.ones((nb, bs), jnp.float32)
    history: list[dict[str, float]] = []
    bar = None
    if progress and epochs > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs - start, desc="denoiser", unit="epoch", leave=False)
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        ekey = jax.random.fold_in(k_train, epoch)
        order = jax.random.permutation(jax.random.fold_in(ekey, 0), n)[: nb * bs].reshape(nb, bs)
        batches = (xs[order], ys[order], as_[order], ones)
        skey = jax.random.fold_in(ekey, 1)
        if has_conv:
            losses = []
            for i in range(nb):
                state, loss = program(state, tuple(v[i] for v in batches), skey, schedule)
                losses.append(loss)
            loss = float(jnp.mean(jnp.stack(losses)))
        else:
            state, loss = program(state, batches, skey, schedule)
            loss = float(loss)
        if not np.isfinite(loss):
            raise PrivDebiasError(f"denoiser training diverged: loss {loss} at epoch {epoch + 1}")
        history.append({"epoch": epoch + 1, "loss": loss, "seconds": time.perf_counter() - t0})
        if checkpoint_dir is not None and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == epochs):
            ckpt.save_checkpoint(checkpoint_dir, epoch + 1, state, max_to_keep=2, overwrite=True)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return state, history


def load_denoiser_state(
    denoiser: nn.Module, config: AugmentConfig, checkpoint_dir: str | os.PathLike, image_shape: tuple[int, ...],
    *, num_classes: int, num_attributes: int,
) -> DiffusionState:
    """Restore the newest denoiser checkpoint of ``checkpoint_dir`` (fingerprint checked).

    Raises:
      PrivDebiasError: no checkpoint, or one written by another configuration.
    """
    fingerprint = fingerprint_json(
        config, {"image_shape": list(image_shape), "num_classes": num_classes, "num_attributes": num_attributes}
    )
    _check_fingerprint(checkpoint_dir, fingerprint)
    tx = make_denoiser_optimizer(config)
    template = jax.eval_shape(lambda k: init_diffusion_state(denoiser, tx, k, tuple(image_shape)), jax.random.key(0))
    return ckpt.restore_checkpoint(checkpoint_dir, template)


def to_model_scale(x: Any) -> np.ndarray:
    """Images in ``[0, 1]`` → diffusion scale ``[−1, 1]``: ``2x − 1``."""
    return 2.0 * np.asarray(x, np.float32) - 1.0


def from_model_scale(x: Any) -> jax.Array:
    """Diffusion scale → ``[0, 1]``: ``clip((x + 1) / 2, 0, 1)``."""
    return jnp.clip((jnp.asarray(x) + 1.0) / 2.0, 0.0, 1.0)


__all__ = [
    "DiffusionState",
    "FINGERPRINT_FILE",
    "make_denoiser_optimizer",
    "init_diffusion_state",
    "diffusion_loss",
    "make_diffusion_step",
    "train_denoiser",
    "load_denoiser_state",
    "to_model_scale",
    "from_model_scale",
]
