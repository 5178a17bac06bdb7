"""KL-gradient guidance on the predicted clean sample x̂₀ (Pan et al. 2024's bias metric as a guide).

Seed 000 ("Privacy-Preserving Debiasing using Data Augmentation and Machine Unlearning",
arXiv 2404.13194) measures the partial bias of an attribute τ as ``KL(D(τ) ‖ P(τ))`` and
guides its diffusion model with that KL. Here, at every sampler step, the batch's predicted
clean samples x̂₀ are labelled by an attribute classifier and a class classifier trained on
real data, and the sampler moves x̂₀ down the gradient of

    L(x̂₀) = Σ_g n_g · KL(q̄_g ‖ π̃_g)  +  λ · Σ_i CE(f_y(x̂₀_i), y_i)

* the batch is split into groups ``g``; by default a group is one requested ``(y, a)`` cell
  (``group_by="cell"``), or one requested class (``group_by="class"``: the literal partial
  bias ``KL(D(τ | y) ‖ P(τ))`` of Pan et al. 2024, which only constrains the group's attribute
  *mixture*: with several attributes requested for a class, any sample may take any of them);
* ``q̄_g = (1/n_g) Σ_{i ∈ g} m_i softmax(f_a(x̂₀_i))``: the batch's attribute distribution in
  group ``g`` (``m_i`` masks padding rows, ``n_g = Σ_{i ∈ g} m_i``);
* ``π̃_g = (1 − δ) π_g + δ / A``: the target, ``π_g`` the distribution of the *requested*
  attributes in the group (one-hot for a cell), smoothed by δ (``target_smoothing``) so the
  KL stays finite where the target is 0;
* the second term (weight ``λ = class_weight``) keeps each sample recognisable as its class.

The sum over groups weighted by ``n_g`` (not ``n_g / n``) makes the gradient of one sample
independent of the batch size. The update (:func:`guide_x0`) is ``x̂₀ ← clip(x̂₀ − s ∇L, −1, 1)``
with scale ``s`` (``kl_scale``); the sampler then recomputes the noise consistent with the
corrected x̂₀ (:func:`~privdebias_jax.augment.schedule.eps_from_x0`): classifier guidance on
x̂₀ in the spirit of "universal guidance" (Bansal et al. 2023), the gradient taken with
respect to x̂₀ (the denoiser is not differentiated).

With a latent denoiser the step can be taken on the decoded image and projected back, and with
the shape/colour latent it is *routed* (the CPU default): the class term's step (``kl_weight =
0``) sets the shape and the KL term's step (``class_weight = 0``) sets the colour; see
:func:`~privdebias_jax.augment.sampler.make_sampler` and
:func:`~privdebias_jax.augment.latent.project_routed`.
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


GROUPINGS = ("cell", "class")


def batch_attribute_distributions(
    attr_probs: jax.Array, y: jax.Array, a: jax.Array, mask: jax.Array, num_classes: int, group_by: str = "cell"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per group ``g`` (a requested cell ``y·A + a``, or a requested class): ``q̄_g`` ``(G, A)``,
    the requested attribute distribution ``π_g`` ``(G, A)`` and the counts ``n_g`` ``(G,)``
    (rows of groups absent from the batch are 0)."""
    num_attributes = attr_probs.shape[-1]
    if group_by == "cell":
        group, size = y * num_attributes + a, num_classes * num_attributes
    elif group_by == "class":
        group, size = y, num_classes
    else:
        raise PrivDebiasError(f"unknown guidance grouping {group_by!r}; expected one of {GROUPINGS}")
    onehot_y = jax.nn.one_hot(group, size, dtype=attr_probs.dtype) * mask[:, None]
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
    group_by: str = "cell",
    kl_weight: float = 1.0,
) -> jax.Array:
    """``L = κ Σ_g n_g KL(q̄_g ‖ π̃_g) + λ Σ_i m_i CE(class_logits_i, y_i)`` (see the module docstring;
    ``κ = kl_weight``, 1 by default, 0 for the class term alone).

    Args:
      class_logits: ``(B, num_classes)`` class-classifier logits on x̂₀.
      attr_logits: ``(B, A)`` attribute-classifier logits on x̂₀.
      y, a: ``(B,)`` the requested class and attribute of each sample.
      mask: ``(B,)`` 1 for a real request, 0 for padding.
    """
    q, pi, n_c = batch_attribute_distributions(jax.nn.softmax(attr_logits, -1), y, a, mask, num_classes, group_by)
    target = smoothed_target(pi, smoothing)
    kl = jnp.sum(jnp.where(q > 0, q * (jnp.log(jnp.where(q > 0, q, 1.0)) - jnp.log(target)), 0.0), axis=-1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(class_logits, -1), y[:, None], axis=-1)[:, 0]
    return kl_weight * jnp.sum(n_c * kl) + class_weight * jnp.sum(mask * ce)


def make_guidance_loss(
    classify_class: Classifier,
    classify_attr: Classifier,
    *,
    num_classes: int,
    class_weight: float = 1.0,
    smoothing: float = 0.01,
    decode: Callable[[jax.Array], jax.Array] | None = None,
    group_by: str = "cell",
    kl_weight: float = 1.0,
) -> Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]:
    """``loss(guide_params, x0, y, a, mask)`` with ``x0`` in the diffusion scale.

    ``guide_params = (class_params, attr_params)``; the classifiers see ``(img + 1) / 2`` with
    ``img = decode(x0)`` (a latent decoder, e.g. the PCA codec) or ``img = x0``. ``kl_weight = 0``
    gives the class-consistency term alone and ``class_weight = 0`` the KL term alone (the two
    halves of the routed guidance of :func:`~privdebias_jax.augment.sampler.make_sampler`).

    Raises:
      PrivDebiasError: a negative or NaN ``class_weight`` or ``kl_weight``, ``smoothing`` outside ``[0, 1)``.
    """
    check_scale(class_weight, "class_weight")
    check_scale(kl_weight, "kl_weight")
    if not 0.0 <= float(smoothing) < 1.0:
        raise PrivDebiasError(f"target smoothing must be in [0, 1), got {smoothing}")
    if group_by not in GROUPINGS:
        raise PrivDebiasError(f"unknown guidance grouping {group_by!r}; expected one of {GROUPINGS}")

    def loss(guide_params: Any, x0: jax.Array, y: jax.Array, a: jax.Array, mask: jax.Array) -> jax.Array:
        class_params, attr_params = guide_params
        img = ((decode(x0) if decode is not None else x0) + 1.0) / 2.0
        return kl_guidance_loss(
            classify_class(class_params, img), classify_attr(attr_params, img), y, a, mask,
            num_classes=num_classes, class_weight=class_weight, smoothing=smoothing, group_by=group_by,
            kl_weight=kl_weight,
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
    "GROUPINGS",
    "smoothed_target",
    "batch_attribute_distributions",
    "kl_guidance_loss",
    "make_guidance_loss",
    "guide_x0",
]
