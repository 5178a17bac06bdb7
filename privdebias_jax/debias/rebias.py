"""ReBias: de-biased representations from biased ones (Bahng, Chun, Yun, Choo & Oh, ICML 2020).

A min-max game on the Hilbert-Schmidt independence criterion between the main network's
bottleneck ``f(x)`` and a bias-only network's ``g(x)`` (1×1 kernels: it can only see colour)::

    min_f  CE(f) + λ_f · HSIC(f(x), g(x)),        min_g  CE(g) − λ_g · HSIC(f(x), g(x))

The main network is pushed to be statistically independent of every representation the bias
network can form, while the bias network looks for the most dependent one. Here both players
take one simultaneous gradient step per batch (Bahng et al. alternate): the regulariser is

    R = CE(g) + λ_f · HSIC(f, sg(g)) − λ_g · HSIC(sg(f), g)

with ``sg`` the stop-gradient, so ``∂R/∂θ_f`` is the main player's gradient and ``∂R/∂θ_g``
the bias player's. Defaults λ_f = λ_g = 1 (Bahng et al.'s Biased-MNIST settings).

HSIC is the unbiased estimator of Song et al. (JMLR 2012), with RBF kernels
``k(u, v) = exp(−‖u − v‖² / (2σ²))`` and the bandwidth σ set per batch to the median pairwise
distance of the real samples (held constant under differentiation; Bahng et al. set it from
the median once per run)::

    HSIC₁ = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3))

where ``K̃``, ``L̃`` are the kernel matrices with zeroed diagonals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from privdebias_jax.data.dataset import Batch
from privdebias_jax.debias.branch import BiasBranchNet, bias_branch_outputs
from privdebias_jax.debias.end import check_weight
from privdebias_jax.debias.rubi import masked_cross_entropy
from privdebias_jax.types import Params

#: Bahng et al.'s weights of the HSIC term for the main (λ_f) and the bias (λ_g) player.
DEFAULT_LAMBDA_MAIN = 1.0
DEFAULT_LAMBDA_BIAS = 1.0


def _flat(x: jax.Array) -> jax.Array:
    return jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32)


def squared_distances(x: jax.Array) -> jax.Array:
    """Pairwise squared Euclidean distances ``‖x_i − x_j‖²`` ``(B, B)`` (clipped at 0)."""
    x = _flat(x)
    sq = jnp.sum(x * x, axis=-1)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)


def median_bandwidth(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """σ = median of ``‖x_i − x_j‖`` over pairs ``i ≠ j`` of real samples (floored at 1e-3),
    as a constant (stop-gradient)."""
    x = jax.lax.stop_gradient(_flat(x))
    n = x.shape[0]
    m = jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    valid = (m[:, None] * m[None, :] * (1.0 - jnp.eye(n))) > 0
    dist = jnp.sqrt(squared_distances(x))
    med = jnp.nanmedian(jnp.where(valid, dist, jnp.nan))
    return jnp.maximum(jnp.nan_to_num(med, nan=1.0), 1e-3)


def rbf_kernel(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """``K_ij = exp(−‖x_i − x_j‖² / (2σ²))``."""
    return jnp.exp(-squared_distances(x) / (2.0 * sigma**2))


def hsic_unbiased(k: jax.Array, l: jax.Array, mask: jax.Array | None = None) -> jax.Array:  # noqa: E741
    """Song et al.'s unbiased HSIC estimator from kernel matrices ``k``, ``l`` ``(B, B)``.

    With ``mask`` only the real samples count (rows and columns of padding are zeroed and
    ``n = Σ mask``). Returns 0 when fewer than 4 samples are real (the estimator needs n ≥ 4).
    """
    b = k.shape[0]
    m = jnp.ones((b,), k.dtype) if mask is None else mask.astype(k.dtype)
    keep = m[:, None] * m[None, :] * (1.0 - jnp.eye(b, dtype=k.dtype))
    kt, lt = k * keep, l * keep
    n = jnp.sum(m)
    safe = jnp.maximum(n, 4.0)
    trace = jnp.sum(kt * lt)
    sums = jnp.sum(kt) * jnp.sum(lt) / ((safe - 1.0) * (safe - 2.0))
    cross = 2.0 / (safe - 2.0) * jnp.dot(jnp.sum(kt, 0), jnp.sum(lt, 0))
    value = (trace + sums - cross) / (safe * (safe - 3.0))
    return jnp.where(n >= 4, value, 0.0)


def rbf_hsic(
    x: jax.Array, y: jax.Array, mask: jax.Array | None = None, sigma_x=None, sigma_y=None
) -> jax.Array:
    """Unbiased HSIC between features ``x`` ``(B, F)`` and ``y`` ``(B, G)`` with RBF kernels.

    Bandwidths default to the median heuristic (:func:`median_bandwidth`).
    """
    sx = median_bandwidth(x, mask) if sigma_x is None else jnp.asarray(sigma_x, jnp.float32)
    sy = median_bandwidth(y, mask) if sigma_y is None else jnp.asarray(sigma_y, jnp.float32)
    return hsic_unbiased(rbf_kernel(x, sx), rbf_kernel(y, sy), mask)


def make_rebias_regularizer(
    model: BiasBranchNet,
    lambda_main: float = DEFAULT_LAMBDA_MAIN,
    lambda_bias: float = DEFAULT_LAMBDA_BIAS,
):
    """``R = CE(g) + λ_f HSIC(f, sg g) − λ_g HSIC(sg f, g)`` on the bottlenecks of ``model``.

    ``features`` (the regulariser's argument) is the main bottleneck ``f(x)``; the bias branch
    runs from ``params``.

    Raises:
      PrivDebiasError: for a negative or non-finite λ.
    """
    lam_f = check_weight(lambda_main, "alpha (ReBias λ for the main network)")
    lam_g = check_weight(lambda_bias, "beta (ReBias λ for the bias network)")

    def regularizer(params: Params, batch: Batch, logits: jax.Array, features: jax.Array) -> jax.Array:
        del logits
        bias_logits, bias_features = bias_branch_outputs(model, params, batch.x)
        value = masked_cross_entropy(bias_logits, batch.y, batch.mask)
        if lam_f:
            value = value + lam_f * rbf_hsic(features, jax.lax.stop_gradient(bias_features), batch.mask)
        if lam_g:
            value = value - lam_g * rbf_hsic(jax.lax.stop_gradient(features), bias_features, batch.mask)
        return value

    return regularizer


__all__ = [
    "DEFAULT_LAMBDA_MAIN",
    "DEFAULT_LAMBDA_BIAS",
    "squared_distances",
    "median_bandwidth",
    "rbf_kernel",
    "hsic_unbiased",
    "rbf_hsic",
    "make_rebias_regularizer",
]
