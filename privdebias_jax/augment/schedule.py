"""The noise schedule and the DDIM update, as pure functions of arrays.

The schedule ``ᾱ_t = Π_{s ≤ t} (1 − β_s)`` comes from diffusers' ``FlaxDDIMScheduler`` state
(same betas: ``linear``, ``scaled_linear`` or the cosine ``squaredcos_cap_v2``), so a model
trained here runs under diffusers' scheduler too. The update is written out here because
diffusers' ``eta > 0`` adds no noise (it takes no key) and ``FlaxDDPMScheduler.step`` fails on
current jax.

* Forward process (Ho et al. 2020, eq. 4): ``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε``.
* Predicted clean sample (Song et al. 2021, DDIM eq. 12): ``x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t``,
  clipped to ``[−1, 1]``.
* DDIM step from ``t`` to ``t' = t − T/S`` (eq. 12 and 16):
  ``σ_t = η √((1 − ᾱ_t') / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_t')``,
  ``x_t' = √ᾱ_t' x̂_0 + √(1 − ᾱ_t' − σ_t²) ε̂ + σ_t z``, ``z ~ N(0, I)`` from an explicit key;
  ``ᾱ_t' = 1`` past the last step. ``η = 0`` is deterministic DDIM, ``η = 1`` is DDPM-like.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from privdebias_jax.augment.config import AugmentConfig
from privdebias_jax.types import PrivDebiasError, PRNGKey


class Schedule(NamedTuple):
    """``alphas_cumprod`` ``(T,)`` float32 and ``final_alpha_cumprod`` (ᾱ after the last step)."""

    alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array


def ddim_scheduler(config: AugmentConfig):
    """diffusers' ``FlaxDDIMScheduler`` for ``config`` and its state (timesteps not yet set)."""
    from diffusers import FlaxDDIMScheduler
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    scheduler = FlaxDDIMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        clip_sample=True,
        set_alpha_to_one=True,
        prediction_type="epsilon",
    )
    return scheduler, scheduler.create_state()


def make_schedule(config: AugmentConfig) -> Schedule:
    """The schedule of ``config`` (the ``ᾱ_t`` of diffusers' scheduler state; cached per schedule)."""
    return _cached_schedule(config.num_train_timesteps, config.beta_schedule, config.beta_start, config.beta_end)


@functools.lru_cache(maxsize=16)
def _cached_schedule(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float) -> Schedule:
    config = AugmentConfig(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                           beta_start=beta_start, beta_end=beta_end)
    _, state = ddim_scheduler(config)
    return Schedule(
        jnp.asarray(np.asarray(state.common.alphas_cumprod), jnp.float32),
        jnp.asarray(np.asarray(state.final_alpha_cumprod), jnp.float32),
    )


def ddim_timesteps(num_train_timesteps: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The DDIM timesteps ``t_k = k · ⌊T/S⌋`` in decreasing order and their predecessors ``t_k − ⌊T/S⌋``.

    Same grid as diffusers' ``FlaxDDIMScheduler.set_timesteps`` (``steps_offset = 0``); the
    last predecessor is negative (meaning ``ᾱ = 1``).

    Raises:
      PrivDebiasError: ``steps`` outside ``[1, num_train_timesteps]``.
    """
    if not 1 <= int(steps) <= int(num_train_timesteps):
        raise PrivDebiasError(f"sample steps must be in [1, {num_train_timesteps}], got {steps}")
    ratio = int(num_train_timesteps) // int(steps)
    ts = (np.arange(int(steps)) * ratio)[::-1].astype(np.int32)
    return ts, (ts - ratio).astype(np.int32)


def _alpha(schedule: Schedule, t: jax.Array) -> jax.Array:
    t = jnp.asarray(t, jnp.int32)
    return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], schedule.final_alpha_cumprod)


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε`` for per-sample timesteps ``t`` ``(B,)``."""
    ab = _bcast(schedule.alphas_cumprod[t], x0)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def predict_x0(
    schedule: Schedule, x_t: jax.Array, eps: jax.Array, t: jax.Array, clip: float | None = 1.0
) -> jax.Array:
    """``x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t`` (``t`` scalar or ``(B,)``), clipped to ``[−clip, clip]``
    (no clipping for ``clip=None``)."""
    ab = _bcast(_alpha(schedule, t), x_t)
    x0 = (x_t - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)
    return x0 if clip is None else jnp.clip(x0, -clip, clip)


def eps_from_x0(schedule: Schedule, x_t: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
    """The noise consistent with ``x_t`` and ``x̂_0``: ``ε = (x_t − √ᾱ_t x̂_0) / √(1 − ᾱ_t)``."""
    ab = _bcast(_alpha(schedule, t), x_t)
    return (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)


def ddim_sigma(schedule: Schedule, t: jax.Array, t_prev: jax.Array, eta: float | jax.Array) -> jax.Array:
    """``σ_t = η √((1 − ᾱ_t') / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_t')`` (DDIM eq. 16)."""
    a_t, a_prev = _alpha(schedule, t), _alpha(schedule, t_prev)
    return eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))


def ddim_update(
    schedule: Schedule,
    x_t: jax.Array,
    x0: jax.Array,
    eps: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    eta: float | jax.Array = 0.0,
    key: PRNGKey | None = None,
) -> jax.Array:
    """``x_t' = √ᾱ_t' x̂_0 + √(1 − ᾱ_t' − σ_t²) ε̂ + σ_t z`` given ``x̂_0`` and ``ε̂``.

    ``key`` draws ``z``; it is required when ``eta`` may be non-zero (pass ``None`` only for
    deterministic DDIM, ``eta = 0``).
    """
    a_prev = _alpha(schedule, t_prev)
    sigma = ddim_sigma(schedule, t, t_prev, eta)
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps
    if key is not None:
        x_prev = x_prev + sigma * jax.random.normal(key, x_t.shape, x_t.dtype)
    return x_prev


def ddim_step(
    schedule: Schedule,
    x_t: jax.Array,
    eps: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    eta: float | jax.Array = 0.0,
    key: PRNGKey | None = None,
    clip: float | None = 1.0,
) -> jax.Array:
    """One DDIM step from the model's noise prediction: :func:`predict_x0` then :func:`ddim_update`.

    With ``eta = 0`` and ``clip = 1`` this equals diffusers' ``FlaxDDIMScheduler.step``
    (``clip_sample=True``).
    """
    x0 = predict_x0(schedule, x_t, eps, t, clip)
    return ddim_update(schedule, x_t, x0, eps, t, t_prev, eta, key)


__all__ = [
    "Schedule",
    "ddim_scheduler",
    "make_schedule",
    "ddim_timesteps",
    "q_sample",
    "predict_x0",
    "eps_from_x0",
    "ddim_sigma",
    "ddim_update",
    "ddim_step",
]
