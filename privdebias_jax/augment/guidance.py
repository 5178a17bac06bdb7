"""KL-gradient guidance on the predicted clean sample x̂₀ (seed 000's bias metric as a guide).

Seed 000 ("Privacy-Preserving Debiasing using Data Augmentation and Machine Unlearning",
arXiv 2404.13194) measures the partial bias of an attribute τ as ``KL(D(τ) ‖ P(τ))`` and
guides its diffusion model with that KL. Here, at every sampler step, the batch's predicted
clean samples x̂₀ are labelled by an attribute classifier and a class classifier trained on
real data, and the sampler moves x̂₀ down the gradient of

    L(x̂₀) = Σ_c n_c · KL(q̄_c ‖ π̃_c)  +  λ · Σ_i CE(f_y(x̂₀_i), y_i)

* ``q̄_c = (1/n_c) Σ_{i: y_i = c} m_i softmax(f_a(x̂₀_i))``: the batch's attribute
  distribution among the samples requested for class ``c`` (``m_i`` masks padding rows,
  ``n_c = Σ_{i: y_i = c} m_i``);
* ``π̃_c = (1 − δ) π_c + δ / A``: the target, ``π_c`` the distribution of the *requested*
  attributes of those samples, smoothed by δ (``target_smoothing``) so the KL stays finite
  where the target is 0;
* the second term (weight ``λ = class_weight``) keeps each sample recognisable as its class.

The sum over classes weighted by ``n_c`` (not ``n_c / n``) makes the gradient of one sample
independent of the batch size. The update (:func:`guide_x0`) is ``x̂₀ ← clip(x̂₀ − s ∇L, −1, 1)``
with scale ``s`` (``kl_scale``); the sampler then recomputes the noise consistent with the
corrected x̂₀ (:func:`~privdebias_jax.augment.schedule.eps_from_x0`): classifier guidance on
x̂₀ in the spirit of "universal guidance" (Bansal et al. 2023), the gradient taken with
respect to x̂₀ (the denoiser is not differentiated).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from privdebias_jax.augment.config import check_scale
from privdebias_jax.types import PrivDebiasError

#: ``classify(params, images01) -> logits``: a classifier on images in ``[0, 1]``.
Classifier = Callable[[Any, jax.Array], jax.Array]


def smoothed_target(target: jax.Array, smoothing: float) -> jax.Array:
    """``(1 − δ) π + δ / A`` along the last axis."""
    a = target.shape[-1]
    return (1.0 - smoothing) * target + smoothing / a


def batch_attribute_distributions(
    attr_probs: jax.Array, y: jax.Array, a: jax.Array, mask: jax.Array, num_classes: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per requested class ``c``: ``q̄_c`` ``(C, A)``, the requested attribute distribution
    ``π_c`` ``(C, A)`` and the counts ``n_c`` ``(C,)`` (rows of classes absent from the batch are 0)."""
    num_attributes = attr_probs.shape[-1]
    onehot_y = jax.nn.one_hot(y, num_classes, dtype=attr_probs.dtype) * mask[:, None]
    n_c = onehot_y.sum(axis=0)
    safe = jnp.where(n_c > 0, n_c, 1.0)[:, None]
    q = onehot_y.T @ attr_probs / safe
    pi = onehot_y.T @ jax.nn.one_hot(a, num_attributes, dtype=attr_probs.dtype) / safe
    return q, pi, n_c


def kl_guidance_loss(
    class_logits: jax.Array,
    attr_logits: jax.Array,
    y: jax.Array,
    a: jax.Array,
    mask: jax.Array,
    *,
    num_classes: int,
    class_weight: float = 1.0,
    smoothing: float = 0.01,
) -> jax.Array:
    """``L = Σ_c n_c KL(q̄_c ‖ π̃_c) + λ Σ_i m_i CE(class_logits_i, y_i)`` (see the module docstring).

    Args:
      class_logits: ``(B, num_classes)`` class-classifier logits on x̂₀.
      attr_logits: ``(B, A)`` attribute-classifier logits on x̂₀.
      y, a: ``(B,)`` the requested class and attribute of each sample.
      mask: ``(B,)`` 1 for a real request, 0 for padding.
    """
    q, pi, n_c = batch_attribute_distributions(jax.nn.softmax(attr_logits, -1), y, a, mask, num_classes)
    target = smoothed_target(pi, smoothing)
    kl = jnp.sum(jnp.where(q > 0, q * (jnp.log(jnp.where(q > 0, q, 1.0)) - jnp.log(target)), 0.0), axis=-1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(class_logits, -1), y[:, None], axis=-1)[:, 0]
    return jnp.sum(n_c * kl) + class_weight * jnp.sum(mask * ce)


def make_guidance_loss(
    classify_class: Classifier,
    classify_attr: Classifier,
    *,
    num_classes: int,
    class_weight: float = 1.0,
    smoothing: float = 0.01,
    decode: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]:
    """``loss(guide_params, x0, y, a, mask)`` with ``x0`` in the diffusion scale.

    ``guide_params = (class_params, attr_params)``; the classifiers see ``(img + 1) / 2`` with
    ``img = decode(x0)`` (a latent decoder, e.g. the PCA codec) or ``img = x0``.

    Raises:
      PrivDebiasError: a negative or NaN ``class_weight``, ``smoothing`` outside ``[0, 1)``.
    """
    check_scale(class_weight, "class_weight")
    if not 0.0 <= float(smoothing) < 1.0:
        raise PrivDebiasError(f"target smoothing must be in [0, 1), got {smoothing}")

    def loss(guide_params: Any, x0: jax.Array, y: jax.Array, a: jax.Array, mask: jax.Array) -> jax.Array:
        class_params, attr_params = guide_params
        img = ((decode(x0) if decode is not None else x0) + 1.0) / 2.0
        return kl_guidance_loss(
            classify_class(class_params, img), classify_attr(attr_params, img), y, a, mask,
            num_classes=num_classes, class_weight=class_weight, smoothing=smoothing,
        )

    return loss


def guide_x0(
    loss: Callable[..., jax.Array],
    guide_params: Any,
    x0: jax.Array,
    y: jax.Array,
    a: jax.Array,
    mask: jax.Array,
    scale: float | jax.Array,
    clip: float | None = 1.0,
) -> jax.Array:
    """``clip(x̂₀ − s ∇_{x̂₀} L(x̂₀), −clip, clip)``: one guidance correction of the predicted clean batch."""
    grad = jax.grad(loss, argnums=1)(guide_params, x0, y, a, mask)
    x0 = x0 - scale * grad
    return x0 if clip is None else jnp.clip(x0, -clip, clip)


__all__ = [
    "Classifier",
    "smoothed_target",
    "batch_attribute_distributions",
    "kl_guidance_loss",
    "make_guidance_loss",
    "guide_x0",
]
