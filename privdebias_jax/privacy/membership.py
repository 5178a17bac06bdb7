"""Membership-inference attacks: per-sample scores, higher = "more likely a training member".

Every attack reads a model through ``(module, params, model_state)`` and
:func:`privdebias_jax.train.predict`, so a single model and a SISA ensemble
(:meth:`privdebias_jax.unlearn.SISAModel.ensemble`) are attacked the same way.

Score functions of the target's output ``p = softmax(z)`` on ``(x, y)``:

* LOSS (Yeom et al. 2018): ``−CE(z, y) = log p_y``.
* confidence: ``p_y``; entropy: ``−H(p) = Σ_j p_j log p_j`` (Song & Mittal 2021).
* modified entropy (Song & Mittal 2021): ``Mentr = −(1 − p_y) log p_y − Σ_{j≠y} p_j log(1 − p_j)``;
  score ``−Mentr``.
* LiRA's scaled logit (Carlini et al. 2022): ``φ = log(p_y / (1 − p_y)) = z_y − logsumexp_{j≠y} z_j``.

Augmentation-aware attacks (Yu et al., "How Does Data Augmentation Affect Privacy in Machine
Learning?", AAAI 2021), from ``ℓ_i = CE(f(t_i(x)), y)`` over ``k`` copies (``t_0`` the identity,
``t_1..t_{k−1}`` random shifts of up to ``max_shift`` pixels for images, Gaussian noise for rows):
M-Loss thresholds one augmented copy's loss (``−ℓ_1``), M-Mean the mean (``−(1/k) Σ ℓ_i``),
M-Moments feeds ``m_p = ((1/k) Σ ℓ_i^p)^{1/p}``, ``p = 1..20``, to a small MLP trained on a
balanced calibration set.

LiRA (Carlini et al. 2022) fits Gaussians to ``φ`` of reference models that did (IN) and did not
(OUT) train on each sample: online ``log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²)``, offline
``log Φ((φ − μ_out)/σ_out)``. The shadow-model attack (Shokri et al. 2017) trains a classifier
on the reference models' outputs (sorted top probabilities and ``log p_y``) labelled IN/OUT and
applies it to the target's.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.special import log_ndtr, logsumexp

from privdebias_jax.data.dataset import Dataset
from privdebias_jax.train import predict
from privdebias_jax.types import PrivDebiasError, PRNGKey


def _check_logits(logits: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(logits, np.float64)
    y = np.asarray(y).reshape(-1)
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise PrivDebiasError(
            f"logits must be (N, C) with N = len(y) = {y.shape[0]}, got {z.shape}"
        )
    if z.shape[0] == 0:
        raise PrivDebiasError("no samples to score")
    if not np.all(np.isfinite(z)):
        raise PrivDebiasError("logits contain NaN or inf")
    if np.any(y < 0) or np.any(y >= z.shape[1]):
        raise PrivDebiasError(f"labels must be in [0, {z.shape[1]})")
    return z, y.astype(np.int64)


def log_softmax(logits: Any) -> np.ndarray:
    """``log softmax`` in float64."""
    z = np.asarray(logits, np.float64)
    return z - logsumexp(z, axis=-1, keepdims=True)


def cross_entropy(logits: Any, y: Any) -> np.ndarray:
    """Per-sample ``CE(z, y) = −log softmax(z)_y``."""
    z, y = _check_logits(logits, y)
    return -log_softmax(z)[np.arange(len(y)), y]


def loss_score(logits: Any, y: Any) -> np.ndarray:
    """LOSS attack score ``−CE(z, y)`` (Yeom et al. 2018)."""
    return -cross_entropy(logits, y)


def confidence_score(logits: Any, y: Any) -> np.ndarray:
    """``p_y`` (Song & Mittal 2021)."""
    return np.exp(-cross_entropy(logits, y))


def entropy_score(logits: Any, y: Any | None = None) -> np.ndarray:
    """``−H(p) = Σ_j p_j log p_j``: confident (low-entropy) outputs score high."""
    lp = log_softmax(logits)
    return np.sum(np.exp(lp) * lp, axis=-1)


def modified_entropy_score(logits: Any, y: Any) -> np.ndarray:
    """``−Mentr(p, y)``, ``Mentr = −(1−p_y) log p_y − Σ_{j≠y} p_j log(1−p_j)`` (Song & Mittal 2021)."""
    z, y = _check_logits(logits, y)
    lp = log_softmax(z)
    p = np.exp(lp)
    rows = np.arange(len(y))
    log1m = np.log1p(-np.minimum(p, 1 - 1e-12))
    terms = -p * log1m
    terms[rows, y] = -(1.0 - p[rows, y]) * lp[rows, y]
    return -np.sum(terms, axis=-1)


def scaled_logit(logits: Any, y: Any) -> np.ndarray:
    """LiRA's ``φ = log(p_y/(1−p_y)) = z_y − logsumexp_{j≠y} z_j`` (stable)."""
    z, y = _check_logits(logits, y)
    rows = np.arange(len(y))
    others = z.copy()
    others[rows, y] = -np.inf
    return z[rows, y] - logsumexp(others, axis=-1)


SCORES = {
    "loss": loss_score,
    "confidence": confidence_score,
    "entropy": entropy_score,
    "modified_entropy": modified_entropy_score,
}


# ------------------------------------------------------------------------------------------
# Augmentations (Yu et al. 2021)
# ------------------------------------------------------------------------------------------


def augment(x: Any, key: PRNGKey, *, max_shift: int = 2, noise_std: float = 0.05) -> np.ndarray:
    """One random augmentation of every sample: images ``(N, H, W, C)`` are shifted by a random
    ``(dy, dx) ∈ [−max_shift, max_shift]²`` with zero fill; other inputs get Gaussian noise of
    standard deviation ``noise_std``."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4:
        return x + float(noise_std) * np.asarray(jax.random.normal(key, x.shape), np.float32)
    n, h, w, _ = x.shape
    shifts = np.asarray(jax.random.randint(key, (n, 2), -max_shift, max_shift + 1))
    out = np.zeros_like(x)
    for i, (dy, dx) in enumerate(shifts):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, yd, xd] = x[i, ys, xs]
    return out


def augmented_losses(
    target: tuple[Any, Any, Any],
    data: Dataset,
    *,
    key: PRNGKey,
    k: int = 10,
    max_shift: int = 2,
    noise_std: float = 0.05,
    batch_size: int = 500,
) -> np.ndarray:
    """``(N, k)`` losses ``ℓ_i = CE(f(t_i(x)), y)``; copy 0 is the identity, copies ``i ≥ 1`` use
    :func:`augment` with ``fold_in(key, i)``."""
    if int(k) < 2:
        raise PrivDebiasError(f"k (augmented copies) must be at least 2, got {k}")
    module, params, model_state = target
    out = []
    for i in range(int(k)):
        x = (
            np.asarray(data.x)
            if i == 0
            else augment(
                data.x, jax.random.fold_in(key, i), max_shift=max_shift, noise_std=noise_std
            )
        )
        logits, _ = predict(module, params, model_state, x, batch_size)
        out.append(cross_entropy(logits, data.y))
    return np.stack(out, axis=1)


def loss_moments(losses: Any, max_order: int = 20) -> np.ndarray:
    """``m_p = ((1/k) Σ_i ℓ_i^p)^{1/p}`` for ``p = 1..max_order`` (computed in log space)."""
    ell = np.maximum(np.asarray(losses, np.float64), 1e-12)
    k = ell.shape[1]
    orders = np.arange(1, int(max_order) + 1, dtype=np.float64)
    logs = np.log(ell)
    return np.exp(
        (logsumexp(orders[None, :, None] * logs[:, None, :], axis=-1) - math.log(k))
        / orders[None, :]
    )


# ------------------------------------------------------------------------------------------
# A small MLP attack classifier (M-Moments, shadow attack)
# ------------------------------------------------------------------------------------------


def _attack_logit(p: dict[str, jax.Array], v: jax.Array) -> jax.Array:
    return jax.nn.relu(v @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


@functools.partial(jax.jit, static_argnums=(4, 5))
def _fit_attack_mlp(params, xs, yv, w, steps: int, learning_rate: float):
    """Full-batch Adam on the weighted logistic loss; data are arguments (compiled once per
    shape, not per call)."""
    tx = optax.adam(learning_rate)

    def loss(p):
        return jnp.sum(w * optax.sigmoid_binary_cross_entropy(_attack_logit(p, xs), yv))

    def body(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
    return p


def train_attack_classifier(
    features: Any,
    labels: Any,
    *,
    key: PRNGKey,
    hidden: int = 32,
    steps: int = 500,
    learning_rate: float = 1e-2,
) -> Any:
    """Fit a 1-hidden-layer MLP ``member logit = w₂ᵀ relu(W₁ x̃ + b₁) + b₂`` on standardised
    features ``x̃`` (full-batch Adam on the balanced logistic loss: each class weighted by half).
    Returns a callable ``scores(features) -> member logits``."""
    x = np.asarray(features, np.float64)
    lab = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] != lab.shape[0] or x.shape[0] == 0:
        raise PrivDebiasError(
            f"attack features must be (N, D) with N = {lab.shape[0]} > 0, got {x.shape}"
        )
    if not np.all(np.isfinite(x)):
        raise PrivDebiasError("attack features contain NaN or inf")
    if set(np.unique(lab).tolist()) != {0, 1}:
        raise PrivDebiasError("attack training needs both members (1) and non-members (0)")
    mean, std = x.mean(0), x.std(0) + 1e-8
    xs = jnp.asarray((x - mean) / std, jnp.float32)
    yv = jnp.asarray(lab, jnp.float32)
    w = jnp.where(yv > 0, 0.5 / yv.sum(), 0.5 / (1 - yv).sum())
    k1, k2 = jax.random.split(key)
    d = xs.shape[1]
    params = {
        "w1": jax.random.normal(k1, (d, hidden)) * jnp.sqrt(2.0 / d),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden,)) * jnp.sqrt(1.0 / hidden),
        "b2": jnp.zeros(()),
    }

    fitted = _fit_attack_mlp(params, xs, yv, w, int(steps), float(learning_rate))

    def scores(features_new: Any) -> np.ndarray:
        v = (np.asarray(features_new, np.float64) - mean) / std
        return np.asarray(_attack_logit(fitted, jnp.asarray(v, jnp.float32)), np.float64)

    return scores


# ------------------------------------------------------------------------------------------
# LiRA and the shadow-model attack, from reference models' outputs
# ------------------------------------------------------------------------------------------


def lira_scores(
    target_phi: Any,
    reference_phi: Any,
    reference_in: Any,
    *,
    online: bool = True,
    global_variance: bool = False,
) -> np.ndarray:
    """LiRA scores of ``N`` samples from the target's ``φ`` ``(N,)`` and ``R`` reference models'
    ``φ`` ``(R, N)`` with membership ``reference_in`` ``(R, N)`` (1 = the reference model trained on
    the sample). Online needs IN and OUT models for every sample; offline only OUT.
    ``global_variance`` uses one variance over all samples (Carlini et al., for few models).

    Raises:
      PrivDebiasError: shape mismatch, or a sample without OUT (or, online, IN) models.
    """
    phi = np.asarray(target_phi, np.float64).reshape(-1)
    ref = np.asarray(reference_phi, np.float64)
    inn = np.asarray(reference_in).astype(bool)
    if ref.ndim != 2 or ref.shape[1] != phi.shape[0] or inn.shape != ref.shape:
        raise PrivDebiasError(
            f"reference_phi and reference_in must be (R, {phi.shape[0]}), got {ref.shape}, {inn.shape}"
        )
    if not (np.all(np.isfinite(phi)) and np.all(np.isfinite(ref))):
        raise PrivDebiasError("LiRA inputs contain NaN or inf")
    n_out = (~inn).sum(0)
    n_in = inn.sum(0)
    if np.any(n_out < 1) or (online and np.any(n_in < 1)):
        raise PrivDebiasError(
            "every sample needs OUT reference models (and IN models for online LiRA)"
        )

    def stats(mask, count):
        mu = np.where(mask, ref, 0).sum(0) / np.maximum(count, 1)
        var = np.where(mask, (ref - mu) ** 2, 0).sum(0) / np.maximum(count - 1, 1)
        if global_variance:
            var = np.full_like(
                var, np.where(mask, (ref - mu) ** 2, 0).sum() / max(mask.sum() - mask.shape[1], 1)
            )
        return mu, np.sqrt(var) + 1e-6

    mu_out, sd_out = stats(~inn, n_out)
    if not online:
        return log_ndtr((phi - mu_out) / sd_out)
    mu_in, sd_in = stats(inn, n_in)

    def log_normal(v, mu, sd):
        return -0.5 * ((v - mu) / sd) ** 2 - np.log(sd)

    return log_normal(phi, mu_in, sd_in) - log_normal(phi, mu_out, sd_out)


def shadow_features(logits: Any, y: Any, top: int = 3) -> np.ndarray:
    """Shokri et al.'s attack input: the ``top`` largest probabilities (sorted) and ``log p_y``."""
    z, y = _check_logits(logits, y)
    lp = log_softmax(z)
    p = np.sort(np.exp(lp), axis=-1)[:, ::-1][:, : int(top)]
    return np.concatenate([p, lp[np.arange(len(y)), y][:, None]], axis=1)


__all__ = [
    "SCORES",
    "augment",
    "augmented_losses",
    "confidence_score",
    "cross_entropy",
    "entropy_score",
    "log_softmax",
    "loss_moments",
    "loss_score",
    "lira_scores",
    "modified_entropy_score",
    "scaled_logit",
    "shadow_features",
    "train_attack_classifier",
]
