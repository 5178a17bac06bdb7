"""EnD: entangling and disentangling the bottleneck (Tartaglione, Barbano & Grangetto, CVPR 2021).

EnD adds two terms on the L2-normalised bottleneck features to the cross-entropy::

    L = CE + α · R⊥ + β · R∥,        d_i = h_i / ‖h_i‖,    G_ij = clip(d_i · d_j, −1, 1)

* **R⊥ (disentangle)**: samples that share a bias label ``b`` should not share features::

      R⊥ = Σ_b | Σ_{i > j, b_i = b_j = b} G_ij |  /  #{(i, j): i > j, b_i = b_j}

* **R∥ (entangle)**: samples of the same target ``t`` but different bias labels should align::

      R∥ = 1 − Σ_{i > j, t_i = t_j, b_i ≠ b_j} (1 + G_ij) / 2  /  #{those pairs}

Each term is 0 when its batch holds no such pair (as in the reference code). Only real samples
(``mask = 1``) form pairs. The reference implementation (EIDOSLab/entangling-disentangling-bias,
``EnD.py``) takes the absolute value per bias class as here; for its entangling term it
visits each unordered cross-bias pair once through an ordering of the bias classes, so it
averages over a subset of the pairs: we average over all of them (the mean the paper writes).
Defaults α = β = 0.1 (the reference's local-run command; Adam 1e-3, weight decay 1e-4, batch
256). In seed paper 001 (Barbano et al. 2021) the bias label is the private attribute, and EnD is
the method that removes it from the bottleneck.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from privdebias_jax.data.dataset import Batch
from privdebias_jax.types import Params, PrivDebiasError

#: EnD's default weights (α for R⊥, β for R∥).
DEFAULT_ALPHA = 0.1
DEFAULT_BETA = 0.1


def normalized_gram(features: jax.Array, mask: jax.Array | None = None, center: bool = False) -> jax.Array:
    """``G = clip(D Dᵀ, −1, 1)`` with ``D`` the rows of ``features`` ``(B, F)`` scaled to unit norm.

    With ``center`` the mean of the real rows (``mask = 1``) is subtracted first. An all-zero row
    stays zero (its norm is floored at 1e-12), so dead ReLU features give no NaN.
    """
    h = jnp.reshape(features, (features.shape[0], -1)).astype(jnp.float32)
    if center:
        m = jnp.ones((h.shape[0],), h.dtype) if mask is None else mask.astype(h.dtype)
        mean = jnp.sum(h * m[:, None], axis=0) / jnp.maximum(jnp.sum(m), 1.0)
        h = h - mean
    sq = jnp.sum(h * h, axis=-1, keepdims=True)
    d = h * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))
    return jnp.clip(d @ d.T, -1.0, 1.0)


def _pair_mask(mask: jax.Array) -> jax.Array:
    """``P_ij = m_i m_j [i > j]``: each unordered pair of real samples once."""
    m = mask.astype(jnp.float32)
    return jnp.tril(m[:, None] * m[None, :], k=-1)


def end_disentangle(
    features: jax.Array, bias: jax.Array, mask: jax.Array, num_bias: int, center: bool = False
) -> jax.Array:
    """EnD's R⊥ = Σ_b |Σ_{i>j, b_i=b_j=b} G_ij| / #{i > j: b_i = b_j} (0 without such pairs).

    Args:
      features: bottleneck features ``(B, F)`` (normalised here).
      bias: bias labels ``(B,)`` int in ``[0, num_bias)``.
      mask: ``(B,)``, 1 for real samples, 0 for padding.
      num_bias: number of bias values (static).
      center: subtract the batch mean of the real rows before normalising.
    """
    g = normalized_gram(features, mask, center)
    pairs = _pair_mask(mask)
    onehot = jax.nn.one_hot(bias, num_bias, dtype=g.dtype)  # (B, K)
    per_class = jnp.einsum("ik,ij,jk->k", onehot, g * pairs, onehot)
    count = jnp.sum(jnp.einsum("ik,ij,jk->k", onehot, pairs, onehot))
    return jnp.where(count > 0, jnp.sum(jnp.abs(per_class)) / jnp.maximum(count, 1.0), 0.0)


def end_entangle(
    features: jax.Array, target: jax.Array, bias: jax.Array, mask: jax.Array, center: bool = False
) -> jax.Array:
    """EnD's R∥ = 1 − mean over pairs (i > j, t_i = t_j, b_i ≠ b_j) of (1 + G_ij)/2 (0 without pairs).

    Args:
      features: bottleneck features ``(B, F)``.
      target: target labels ``(B,)``; bias: bias labels ``(B,)``; mask: ``(B,)`` real-sample mask.
      center: subtract the batch mean of the real rows before normalising.
    """
    g = normalized_gram(features, mask, center)
    same_t = (target[:, None] == target[None, :]).astype(g.dtype)
    diff_b = (bias[:, None] != bias[None, :]).astype(g.dtype)
    pairs = _pair_mask(mask) * same_t * diff_b
    count = jnp.sum(pairs)
    mean_sim = jnp.sum(0.5 * (1.0 + g) * pairs) / jnp.maximum(count, 1.0)
    return jnp.where(count > 0, 1.0 - mean_sim, 0.0)


def check_weight(value: float, name: str) -> float:
    """``value`` as a float; raises :class:`PrivDebiasError` if it is negative, NaN or infinite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PrivDebiasError(f"{name} must be a non-negative number, got {value!r}") from None
    if not (v >= 0.0) or v == float("inf"):
        raise PrivDebiasError(f"{name} must be a non-negative finite number, got {value!r}")
    return v


def make_end_regularizer(
    num_bias: int, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, center: bool = False
):
    """``regularizer(params, batch, logits, features) = α R⊥ + β R∥`` with ``batch.a`` as the bias label.

    Plugs into :func:`privdebias_jax.train.make_train_step` / :func:`~privdebias_jax.train.fit`
    next to the cross-entropy data term (Tartaglione et al., CVPR 2021).

    Raises:
      PrivDebiasError: for negative or non-finite ``alpha`` / ``beta``, or ``num_bias < 2``
        (no bias label to disentangle).
    """
    alpha = check_weight(alpha, "alpha")
    beta = check_weight(beta, "beta")
    if int(num_bias) < 2:
        raise PrivDebiasError(
            f"EnD needs a bias label with at least 2 values, got num_attributes = {num_bias}"
        )
    k = int(num_bias)

    def regularizer(params: Params, batch: Batch, logits: jax.Array, features: jax.Array) -> jax.Array:
        del params, logits
        value = jnp.zeros((), jnp.float32)
        if alpha:
            value = value + alpha * end_disentangle(features, batch.a, batch.mask, k, center)
        if beta:
            value = value + beta * end_entangle(features, batch.y, batch.a, batch.mask, center)
        return value

    return regularizer


__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BETA",
    "normalized_gram",
    "end_disentangle",
    "end_entangle",
    "check_weight",
    "make_end_regularizer",
]
