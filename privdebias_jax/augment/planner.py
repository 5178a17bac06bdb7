"""How many synthetic samples each (class, attribute) cell needs to bring the dataset's bias to a target.

The bias is Pan et al. 2024's KL bias from :mod:`privdebias_jax.metrics.fairness`, on the class ×
attribute count table ``N[y, a]``:

    B(N) = Σ_y p(y) KL(D(τ | y) ‖ P(τ))

with ``P(τ)`` the attribute's marginal in the table (``prior="marginal"``, the default: then
``B = I(τ; y)``, the mutual information, in nats), the uniform distribution
(``prior="uniform"``: the partial bias against a balanced attribute) or a given target
distribution ``π`` (an array of ``A`` probabilities summing to 1).

**Plan (water filling per class).** Let ``r = π`` for a given target, else uniform. For a
level ``λ ∈ [0, 1]`` every cell is filled up to ``λ · r_a · max_a' (N[y, a'] / r_a')``:
``M_λ[y, a] = max(0, ⌈λ r_a max_a' (N[y, a'] / r_a')⌉ − N[y, a])``. At ``λ = 1`` every class
row is proportional to ``r``, so the bias is 0; filling the emptiest cells first is the
cheapest way to reshape a row. The planner bisects for the smallest ``λ`` whose
augmented table ``N + M_λ`` has bias ≤ the target, then (with ``max_new``) lowers ``λ`` until
the total fits the budget and spends the rest of the budget one sample at a time on the
emptiest cells of the next level; the target may then be missed (the returned plan's bias is
what :func:`planned_bias` reports).
"""

from __future__ import annotations

import numpy as np

from privdebias_jax.data.dataset import Dataset
from privdebias_jax.metrics import attribute_counts, kl_bias_from_counts
from privdebias_jax.types import PrivDebiasError

PRIORS = ("marginal", "uniform")


Prior = str | np.ndarray


def _prior_vector(prior: Prior, num_attributes: int) -> np.ndarray | None:
    if isinstance(prior, str):
        if prior == "marginal":
            return None
        if prior == "uniform":
            return np.full(num_attributes, 1.0 / num_attributes, np.float32)
        raise PrivDebiasError(f"unknown bias prior {prior!r}; expected one of {PRIORS} or a distribution")
    p = np.asarray(prior, np.float64)
    if p.shape != (num_attributes,):
        raise PrivDebiasError(f"the target distribution must have shape ({num_attributes},), got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise PrivDebiasError("the target distribution must hold finite, non-negative probabilities")
    if abs(p.sum() - 1.0) > 1e-5:
        raise PrivDebiasError(f"the target distribution must sum to 1, sums to {p.sum():.6g}")
    if np.any(p == 0):
        raise PrivDebiasError("the target distribution must give every attribute a positive probability")
    return p.astype(np.float32)


def _fill_shape(prior: Prior, num_attributes: int) -> np.ndarray:
    p = _prior_vector(prior, num_attributes)
    return np.full(num_attributes, 1.0 / num_attributes) if p is None else np.asarray(p, np.float64)


def table_bias(counts: np.ndarray, prior: Prior = "marginal") -> float:
    """``B(N)`` of a ``(C, A)`` count table (nats); see the module docstring."""
    counts = np.asarray(counts, np.float64)
    return float(kl_bias_from_counts(counts.astype(np.float32), _prior_vector(prior, counts.shape[1])))


def _fill(counts: np.ndarray, level: float, shape: np.ndarray) -> np.ndarray:
    top = (counts / shape[None, :]).max(axis=1, keepdims=True)
    target = np.ceil(level * top * shape[None, :] - 1e-9)
    return np.maximum(target - counts, 0).astype(np.int64)


def planned_bias(counts: np.ndarray, plan: np.ndarray, prior: Prior = "marginal") -> float:
    """The bias of the table after adding ``plan``: ``B(N + M)``."""
    return table_bias(np.asarray(counts) + np.asarray(plan), prior)


def plan_from_counts(
    counts: np.ndarray,
    *,
    target_bias: float | None = None,
    max_new: int | None = None,
    prior: Prior = "marginal",
    tol: float = 1e-4,
) -> np.ndarray:
    """The water-filling plan ``M`` ``(C, A)`` (int64) for a count table ``N`` (see the module docstring).

    ``target_bias`` defaults to 20 % of the current bias (an 80 % reduction).

    Raises:
      PrivDebiasError: a table that is not 2-D, negative or NaN counts, a negative or NaN
        target, a negative ``max_new``, an unknown prior or a target distribution that does
        not sum to 1 (or has a zero).
    """
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 2 or 0 in counts.shape:
        raise PrivDebiasError(f"counts must be a non-empty (num_classes, num_attributes) table, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise PrivDebiasError("counts must be finite and non-negative")
    if counts.sum() <= 0:
        raise PrivDebiasError("counts are all zero: nothing to plan from")
    shape = _fill_shape(prior, counts.shape[1])
    current = table_bias(counts, prior)
    if target_bias is None:
        target_bias = 0.2 * current
    target_bias = float(target_bias)
    if not np.isfinite(target_bias) or target_bias < 0:
        raise PrivDebiasError(f"target_bias must be a finite non-negative number of nats, got {target_bias}")
    if max_new is not None and int(max_new) < 0:
        raise PrivDebiasError(f"max_new must be non-negative, got {max_new}")
    if current <= target_bias:
        plan = np.zeros(counts.shape, np.int64)
    else:
        lo, hi = 0.0, 1.0
        while hi - lo > tol:
            mid = 0.5 * (lo + hi)
            if planned_bias(counts, _fill(counts, mid, shape), prior) <= target_bias:
                hi = mid
            else:
                lo = mid
        plan = _fill(counts, hi, shape)
    if max_new is not None and plan.sum() > int(max_new):
        lo, hi = 0.0, 1.0
        while hi - lo > tol:
            mid = 0.5 * (lo + hi)
            if _fill(counts, mid, shape).sum() <= int(max_new):
                lo = mid
            else:
                hi = mid
        plan = _fill(counts, lo, shape)
        # spend what is left of the budget one sample at a time on the emptiest cells the next
        # level would fill, so the capped plan uses exactly ``max_new`` samples
        extra = _fill(counts, hi, shape) - plan
        left = int(max_new) - int(plan.sum())
        while left > 0 and extra.sum() > 0:
            level = np.where(extra > 0, (counts + plan) / shape[None, :], np.inf)
            cell = np.unravel_index(np.argmin(level), level.shape)
            plan[cell] += 1
            extra[cell] -= 1
            left -= 1
    return plan


def plan_augmentation(
    train_set: Dataset,
    num_classes: int,
    num_attributes: int,
    *,
    target_bias: float | None = None,
    max_new: int | None = None,
    prior: Prior = "marginal",
) -> np.ndarray:
    """How many samples each ``(y, a)`` cell needs so the dataset's bias drops to ``target_bias``.

    Args:
      train_set: the real data (its ``y`` and ``a`` are counted).
      num_classes, num_attributes: the table's shape ``(C, A)``.
      target_bias: the bias to reach in nats (default: 20 % of the current bias). The bias is
        the mutual information ``I(τ; y)`` (``prior="marginal"``) or the partial bias
        ``Σ_y p(y) KL(D(τ | y) ‖ U(τ))`` against the uniform attribute (``prior="uniform"``)
        or against a given target distribution (``prior`` an array summing to 1).
      max_new: optional cap on the total number of new samples (the target may then be missed).

    Returns:
      ``(C, A)`` int64 counts of samples to generate per cell.

    Raises:
      PrivDebiasError: bad labels, a bad target or cap (see :func:`plan_from_counts`).
    """
    counts = np.asarray(attribute_counts(np.asarray(train_set.y), np.asarray(train_set.a), num_classes, num_attributes))
    return plan_from_counts(counts, target_bias=target_bias, max_new=max_new, prior=prior)


__all__ = ["PRIORS", "table_bias", "planned_bias", "plan_from_counts", "plan_augmentation"]
