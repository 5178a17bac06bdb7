"""The DDIM sampler as one ``jax.lax.scan`` (jit it end to end), with classifier-free and KL guidance.

:func:`make_sampler` returns a pure function

    sample(params, guide_params, y, a, mask, key, guidance_scale, kl_scale, eta) -> x_0 ∈ [−1, 1]

that draws ``x_T ~ N(0, I)`` from ``key`` and runs the DDIM steps (Song et al. 2021) under
``lax.scan`` with the carry ``x_t``; step ``k`` draws its noise from ``fold_in(key, k + 1)``
(only when ``stochastic``). At every step:

1. **classifier-free guidance** (Ho & Salimans 2021): one batched call of the denoiser on the
   conditional and the null condition, ``ε̂ = ε(x_t, ∅) + w (ε(x_t, y, a) − ε(x_t, ∅))``;
2. ``x̂₀ = clip((x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t)``;
3. **KL guidance** (optional, :mod:`privdebias_jax.augment.guidance`): ``x̂₀ ← clip(x̂₀ − s ∇L)``
   (on the latent, on the decoded image and projected back, or routed: the class term's step
   sets the shape and the KL term's step the colour; see :func:`make_sampler`) and
   ``ε̂ ← (x_t − √ᾱ_t x̂₀) / √(1 − ᾱ_t)``;
4. the DDIM update with ``σ_t(η)`` and fresh noise (:func:`~privdebias_jax.augment.schedule.ddim_update`).

Whether CFG, KL guidance and noise are used is fixed when the sampler is built (they change
the traced program); their scales are traced arguments (no recompilation per value).
:func:`sample_loop` is the reference: a Python loop calling a jitted denoiser and diffusers'
``FlaxDDIMScheduler.step`` step by step (deterministic DDIM with CFG only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from privdebias_jax.augment.guidance import guide_x0
from privdebias_jax.augment.schedule import (
    Schedule,
    ddim_timesteps,
    ddim_update,
    eps_from_x0,
    predict_x0,
)
from privdebias_jax.types import Params, PrivDebiasError, PRNGKey


def make_eps_fn(
    denoiser: nn.Module, num_classes: int, num_attributes: int, cfg: bool
) -> Callable[[Params, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]:
    """``eps(params, x_t, t, y, a, w)``: the (guided) noise prediction for a batch at scalar step ``t``.

    With ``cfg`` the denoiser runs once on ``2B`` rows (condition and null condition) and
    returns ``ε(∅) + w (ε(y, a) − ε(∅))``; without it, ``ε(y, a)`` (``w`` ignored).
    """

    def eps(params: Params, x: jax.Array, t: jax.Array, y: jax.Array, a: jax.Array, w: jax.Array) -> jax.Array:
        b = x.shape[0]
        tt = jnp.full((b,), t, jnp.int32)
        if not cfg:
            return denoiser.apply({"params": params}, x, tt, y, a)
        out = denoiser.apply(
            {"params": params},
            jnp.concatenate([x, x]),
            jnp.concatenate([tt, tt]),
            jnp.concatenate([y, jnp.full_like(y, num_classes)]),
            jnp.concatenate([a, jnp.full_like(a, num_attributes)]),
        )
        cond, uncond = out[:b], out[b:]
        return uncond + w * (cond - uncond)

    return eps


def make_sampler(
    denoiser: nn.Module,
    schedule: Schedule,
    *,
    image_shape: tuple[int, ...],
    num_classes: int,
    num_attributes: int,
    steps: int,
    cfg: bool = True,
    guidance_loss: Callable[..., jax.Array] | None = None,
    stochastic: bool = False,
    clip: float | None = 1.0,
    image_codec: tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array, jax.Array], jax.Array]] | None = None,
    routed_guidance: tuple[Callable[..., jax.Array], Callable[..., jax.Array], Callable[..., jax.Array]] | None = None,
) -> Callable[..., jax.Array]:
    """Build the scan sampler (see the module docstring); the caller jits it.

    Args:
      denoiser: a module from :func:`~privdebias_jax.augment.denoiser.create_denoiser`.
      schedule: the noise schedule the denoiser was trained with.
      image_shape: ``(H, W, C)`` of one sample.
      steps: DDIM steps ``S`` (timesteps ``k · ⌊T/S⌋``).
      cfg: use classifier-free guidance (else the conditional prediction alone).
      guidance_loss: ``loss(guide_params, x0, y, a, mask)`` for KL guidance, or ``None``.
      stochastic: add ``σ_t(η) z`` noise (else ``eta`` is ignored: deterministic DDIM).
      clip: x̂₀ is clipped to ``[−clip, clip]`` (1 for images in ``[−1, 1]``; the PCA latent's
        own bound; ``None`` for no clipping).
      image_codec: ``(decode, project)`` of a latent codec (``project(z_ref, img)``: the latent
        of an image near ``decode(z_ref)``, :func:`~privdebias_jax.augment.latent.project`), or
        ``None``. With it, the KL guidance step is taken on the decoded image and projected
        back, ``x̂₀ ← project(x̂₀, clip(decode(x̂₀) − s ∇_img L, −1, 1))``, so ``guidance_loss``
        must take images; a linear codec thus moves the latent by the least-squares image of
        the pixel step, ``(JᵀJ)⁻¹ Jᵀ`` rather than ``Jᵀ`` (which over-weights coordinates
        spread over many pixels, such as a colour).
      routed_guidance: ``(shape_loss, colour_loss, merge)`` or ``None``. With it (and
        ``image_codec``, whose ``decode`` it uses; ``guidance_loss`` is then ignored) the KL
        guidance step is split: ``img_y = decode(x̂₀) − s ∇ shape_loss`` (the class term) and
        ``img_a = decode(x̂₀) − s ∇ colour_loss`` (the attribute KL), then
        ``x̂₀ ← merge(x̂₀, img_y, img_a)`` takes the shape from ``img_y`` and the colour from
        ``img_a`` (:func:`~privdebias_jax.augment.latent.project_routed`): the attribute term
        cannot deform the shape, nor the class term recolour it.

    Returns:
      ``sample(params, guide_params, y, a, mask, key, guidance_scale, kl_scale, eta)`` →
      ``(B, *image_shape)`` samples in the diffusion scale.
    """
    if routed_guidance is not None and image_codec is None:
        raise PrivDebiasError("routed guidance needs image_codec=(decode, project)")
    ts, prev = ddim_timesteps(schedule.alphas_cumprod.shape[0], steps)
    ts, prev = jnp.asarray(ts), jnp.asarray(prev)
    eps_fn = make_eps_fn(denoiser, num_classes, num_attributes, cfg)

    def sample(
        params: Params,
        guide_params: Any,
        y: jax.Array,
        a: jax.Array,
        mask: jax.Array,
        key: PRNGKey,
        guidance_scale: float | jax.Array = 1.0,
        kl_scale: float | jax.Array = 0.0,
        eta: float | jax.Array = 0.0,
    ) -> jax.Array:
        y = jnp.asarray(y, jnp.int32)
        a = jnp.asarray(a, jnp.int32)
        x = jax.random.normal(jax.random.fold_in(key, 0), (y.shape[0], *image_shape), jnp.float32)

        def body(x_t: jax.Array, inputs: tuple[jax.Array, jax.Array, jax.Array]):
            k, t, t_prev = inputs
            eps = eps_fn(params, x_t, t, y, a, guidance_scale)
            x0 = predict_x0(schedule, x_t, eps, t, clip)
            if routed_guidance is not None:
                shape_loss, colour_loss, merge = routed_guidance
                img = image_codec[0](x0)
                img_y = guide_x0(shape_loss, guide_params, img, y, a, mask, kl_scale, 1.0)
                img_a = guide_x0(colour_loss, guide_params, img, y, a, mask, kl_scale, 1.0)
                x0 = merge(x0, img_y, img_a)
                x0 = x0 if clip is None else jnp.clip(x0, -clip, clip)
                eps = eps_from_x0(schedule, x_t, x0, t)
            elif guidance_loss is not None:
                if image_codec is None:
                    x0 = guide_x0(guidance_loss, guide_params, x0, y, a, mask, kl_scale, clip)
                else:
                    decode, project = image_codec
                    img = guide_x0(guidance_loss, guide_params, decode(x0), y, a, mask, kl_scale, 1.0)
                    x0 = project(x0, img) if clip is None else jnp.clip(project(x0, img), -clip, clip)
                eps = eps_from_x0(schedule, x_t, x0, t)
            step_key = jax.random.fold_in(key, k + 1) if stochastic else None
            return ddim_update(schedule, x_t, x0, eps, t, t_prev, eta if stochastic else 0.0, step_key), None

        x, _ = jax.lax.scan(body, x, (jnp.arange(ts.shape[0]), ts, prev))
        return x

    return sample


def sample_loop(
    denoiser: nn.Module,
    params: Params,
    scheduler: Any,
    scheduler_state: Any,
    y: jax.Array,
    a: jax.Array,
    key: PRNGKey,
    *,
    image_shape: tuple[int, ...],
    num_classes: int,
    num_attributes: int,
    steps: int,
    guidance_scale: float = 1.0,
    eps_fn: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """Reference sampler: a Python loop over diffusers' ``FlaxDDIMScheduler.step`` (η = 0).

    Same initial noise (``fold_in(key, 0)``), timesteps and CFG as :func:`make_sampler`, so for
    deterministic DDIM without KL guidance the two agree to float rounding. ``eps_fn`` is a
    jitted :func:`make_eps_fn` (built here when omitted; pass one to reuse its compilation).
    """
    if eps_fn is None:
        eps_fn = jax.jit(make_eps_fn(denoiser, num_classes, num_attributes, guidance_scale != 1.0))
    y = jnp.asarray(y, jnp.int32)
    a = jnp.asarray(a, jnp.int32)
    state = scheduler.set_timesteps(scheduler_state, steps)
    x = jax.random.normal(jax.random.fold_in(key, 0), (y.shape[0], *image_shape), jnp.float32)
    w = jnp.float32(guidance_scale)
    for t in state.timesteps:
        eps = eps_fn(params, x, t, y, a, w)
        x = scheduler.step(state, eps, t, x).prev_sample
    return x


__all__ = ["make_eps_fn", "make_sampler", "sample_loop"]
