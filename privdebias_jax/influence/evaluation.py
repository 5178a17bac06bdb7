"""Influence judged against retraining: the linear datamodeling score and removal correlations.

The ground truth for a training-data attribution method is what retraining does. With the
influence ``I(z, t) = −∇ℓ_tᵀ H_λ⁻¹ ∇ℓ(z)`` of training sample ``z`` on the loss ``ℓ_t`` of test
example ``t`` (the sign and scale of :mod:`privdebias_jax.influence.influence`), removing the
samples outside a subset ``S`` of the ``n`` training samples changes ``ℓ_t``, to first order, by

    Δℓ_t(S) ≈ −(1/n) Σ_{z∉S} I(z, t).

* **Linear datamodeling score** (LDS; Park et al. 2023, "TRAK: Attributing model behavior at
  scale", §2): draw ``m`` subsets ``S_j`` holding a fraction ``α`` of the training set
  (:func:`draw_subsets`), retrain on each with the same recipe and record ``ℓ_t(S_j)``; the
  prediction is ``g_t(S_j) = ℓ_t(θ̂) + Δℓ_t(S_j)``; the LDS is the Spearman rank correlation of
  ``g_t(S_j)`` with ``ℓ_t(S_j)`` over the subsets ``j``, averaged over the test examples ``t``
  (:func:`linear_datamodeling_score`). Constant factors (``1/n`` against ``1/|S|``) do not move
  a rank correlation.
* **Leave-one-out and group removal** (Koh & Liang 2017, Fig. 2; the dattri benchmark of Deng
  et al. 2024): remove one sample, or a group, retrain, and correlate (Pearson) the predicted
  with the actual change of each test loss over the removals (:func:`removal_correlation`).

The retraining is the caller's: ``retrain(keep) -> losses`` maps a boolean ``(R, n)`` array of
kept samples to the ``(R, T)`` test losses of the ``R`` retrained models, so the same evaluation
runs on any model (:func:`evaluate_lds`, :func:`evaluate_removals`). ``benchmarks/influence_quality.py``
runs it for every solver and curvature of this library.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from privdebias_jax.data.dataset import Batch, Dataset
from privdebias_jax.influence.problem import (
    CurvatureProblem,
    iterate_per_example_grads,
    per_example_products,
)
from privdebias_jax.influence.solvers import Diagnostics, InverseHVPSolver, as_solver
from privdebias_jax.types import PrivDebiasError, PRNGKey

Retrainer = Callable[[np.ndarray], np.ndarray]
MIN_SUBSETS = 10


def _as_key(key: PRNGKey | int) -> jax.Array:
    """An int seeds a typed key; typed and legacy (``uint32[2]``) keys pass through."""
    return jax.random.key(int(key)) if isinstance(key, (int, np.integer)) else key


def _num(data: Dataset | Batch) -> int:
    return int(np.shape(data.y)[0])


@dataclasses.dataclass
class InfluenceMatrix:
    """``scores[z, t] = I(z, t) = −∇ℓ_tᵀ H_λ⁻¹ ∇ℓ(z)`` for every training sample ``z`` (rows) and
    test example ``t`` (columns), with one solve's :class:`Diagnostics` per test example."""

    scores: np.ndarray
    diagnostics: list[Diagnostics]
    prepare_seconds: float
    solve_seconds: float
    seconds: float

    @property
    def max_residual(self) -> float:
        """The largest ``‖H_λ x − v‖/‖v‖`` over the test examples' solves."""
        return float(np.nanmax([d.residual for d in self.diagnostics])) if self.diagnostics else float("nan")

    @property
    def all_converged(self) -> bool:
        """Whether every solve reported ``converged``."""
        return all(d.converged for d in self.diagnostics)


def influence_matrix(
    problem: CurvatureProblem,
    train: Dataset | Batch,
    test: Dataset | Batch,
    solver: str | InverseHVPSolver = "cg",
    solver_options: dict[str, Any] | None = None,
    *,
    test_loss_fn: Callable[..., jax.Array] | None = None,
    chunk_size: int = 256,
    prepared: Any | None = None,
) -> InfluenceMatrix:
    """``I(z, t) = −∇ℓ_tᵀ H_λ⁻¹ ∇ℓ(z)`` for all training samples ``z`` and test examples ``t``.

    One inverse-HVP per test example, ``s_t = H_λ⁻¹ ∇ℓ_t`` (the solver prepared once), then
    ``I = −G S`` with the per-example training gradients ``G`` (``(N, P)``, never formed: chunks of
    ``chunk_size`` rows meet ``S = [s_1 … s_T]`` (``(P, T)``) in one program,
    :func:`~privdebias_jax.influence.per_example_products`). ``test_loss_fn`` gives ``ℓ_t``
    (default: the problem's ``loss_fn`` on the example alone; pass the data loss when the
    problem's loss carries a regulariser).

    Returns:
      :class:`InfluenceMatrix` with ``scores`` of shape ``(N, T)`` (float64).

    Raises:
      PrivDebiasError: an empty training or test set.
    """
    t0 = time.perf_counter()
    if _num(train) == 0:
        raise PrivDebiasError("influence_matrix: the training set has no samples")
    if _num(test) == 0:
        raise PrivDebiasError("influence_matrix: the test set has no samples")
    s = as_solver(solver, solver_options)
    state = prepared if prepared is not None else s.prepare(problem)
    t1 = time.perf_counter()
    test_problem = problem if test_loss_fn is None else dataclasses.replace(problem, loss_fn=test_loss_fn)
    solutions, diagnostics = [], []
    for _, g in iterate_per_example_grads(test_problem, test, chunk_size):
        for row in np.asarray(g):
            x, diag = s.solve(state, problem.unravel(jnp.asarray(row)))
            solutions.append(ravel_pytree(x)[0])
            diagnostics.append(diag)
    t2 = time.perf_counter()
    scores = -per_example_products(problem, train, jnp.stack(solutions, axis=1), chunk_size)  # (N, T)
    return InfluenceMatrix(scores, diagnostics, t1 - t0, t2 - t1, time.perf_counter() - t0)


def draw_subsets(key: PRNGKey | int, num_train: int, fraction: float, num_subsets: int) -> np.ndarray:
    """``num_subsets`` random subsets of ``range(num_train)``, each of ``round(fraction · num_train)``
    samples drawn without replacement, as a boolean ``(num_subsets, num_train)`` array of kept
    samples (row ``j`` is ``S_j``). Deterministic in ``key`` (typed or legacy key, or an int).

    Raises:
      PrivDebiasError: ``fraction`` outside ``(0, 1)``, fewer than 10 subsets, or a subset size
        that would keep no sample or every sample.
    """
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        raise PrivDebiasError(f"the subset fraction must lie in (0, 1), got {fraction}")
    if int(num_subsets) < MIN_SUBSETS:
        raise PrivDebiasError(f"the LDS needs at least {MIN_SUBSETS} subsets, got {num_subsets}")
    size = int(round(fraction * int(num_train)))
    if not 1 <= size < int(num_train):
        raise PrivDebiasError(
            f"a fraction {fraction} of {num_train} training samples keeps {size}: it must keep at least one "
            "sample and remove at least one"
        )
    root = _as_key(key)
    keep = np.zeros((int(num_subsets), int(num_train)), bool)
    for j in range(int(num_subsets)):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(root, j), int(num_train)))
        keep[j, perm[:size]] = True
    return keep


def predicted_losses(base_losses: np.ndarray, scores: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``g_t(S_j) = ℓ_t(θ̂) − (1/n) Σ_{z∉S_j} I(z, t)``: ``(R, T)`` from ``base_losses`` ``(T,)``,
    ``scores`` ``(n, T)`` and ``keep`` ``(R, n)``."""
    scores = np.asarray(scores, np.float64)
    keep = np.asarray(keep, bool)
    base = np.asarray(base_losses, np.float64)
    if keep.ndim != 2 or keep.shape[1] != scores.shape[0]:
        raise PrivDebiasError(f"keep has shape {keep.shape}; expected (R, {scores.shape[0]}) for {scores.shape[0]} training samples")
    if base.shape != (scores.shape[1],):
        raise PrivDebiasError(f"base_losses has shape {base.shape}; expected ({scores.shape[1]},)")
    return base[None, :] - (~keep).astype(np.float64) @ scores / scores.shape[0]


def _column_ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=0)


def _columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0, keepdims=True)
    b = b - b.mean(0, keepdims=True)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(0) / np.where(den > 0, den, 1.0), np.nan)


def _check_pair(predicted: np.ndarray, actual: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(predicted, np.float64)
    a = np.asarray(actual, np.float64)
    if p.ndim != 2 or p.shape != a.shape:
        raise PrivDebiasError(f"{what}: predicted {p.shape} and actual {a.shape} must both be (R, T)")
    if p.shape[0] < 2 or p.shape[1] < 1:
        raise PrivDebiasError(f"{what} needs at least 2 rows (subsets or removals) and 1 test example, got {p.shape}")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(a))):
        raise PrivDebiasError(f"{what}: the predicted or actual losses hold NaN or inf")
    return p, a


def linear_datamodeling_score(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, np.ndarray]:
    """LDS: the Spearman correlation over subsets (rows) of predicted with actual test losses, per
    test example (columns), and its mean over the test examples whose actual losses vary.

    Returns ``(mean, per_test)``; ``per_test`` is NaN where a column is constant.
    """
    p, a = _check_pair(predicted, actual, "linear_datamodeling_score")
    per_test = _columnwise_pearson(_column_ranks(p), _column_ranks(a))
    return (float(np.nanmean(per_test)) if np.any(np.isfinite(per_test)) else float("nan")), per_test


def removal_correlation(predicted_change: np.ndarray, actual_change: np.ndarray) -> tuple[float, np.ndarray]:
    """Pearson correlation over removals (rows) of predicted with actual change of each test loss
    (columns), averaged over the test examples; returns ``(mean, per_test)``."""
    p, a = _check_pair(predicted_change, actual_change, "removal_correlation")
    per_test = _columnwise_pearson(p, a)
    return (float(np.nanmean(per_test)) if np.any(np.isfinite(per_test)) else float("nan")), per_test


@dataclasses.dataclass
class LDSResult:
    """One LDS evaluation: the score, per test example, and everything needed to re-score it.

    ``subsets`` is the ``(m, n)`` boolean array of kept samples, ``actual`` the retrained test
    losses ``(m, T)``; :func:`rescore` recomputes the LDS for other influence scores.
    """

    fraction: float
    score: float
    per_test: np.ndarray
    subsets: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    base_losses: np.ndarray

    def rescore(self, scores: np.ndarray) -> float:
        """The LDS of other influence ``scores`` ``(n, T)`` against the same retrained losses."""
        return linear_datamodeling_score(predicted_losses(self.base_losses, scores, self.subsets), self.actual)[0]


def evaluate_lds(
    scores: np.ndarray,
    base_losses: np.ndarray,
    retrain: Retrainer,
    key: PRNGKey | int,
    fraction: float = 0.5,
    num_subsets: int = 50,
) -> LDSResult:
    """Draw subsets (:func:`draw_subsets`), retrain on each (``retrain(keep) -> (m, T)``) and score
    ``scores`` ``(n, T)`` by :func:`linear_datamodeling_score`."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise PrivDebiasError(f"scores must be (n_train, n_test) with at least one test example, got {scores.shape}")
    keep = draw_subsets(key, scores.shape[0], fraction, num_subsets)
    actual = np.asarray(retrain(keep), np.float64)
    if actual.shape != (keep.shape[0], scores.shape[1]):
        raise PrivDebiasError(f"retrain returned {actual.shape}; expected {(keep.shape[0], scores.shape[1])}")
    predicted = predicted_losses(base_losses, scores, keep)
    score, per_test = linear_datamodeling_score(predicted, actual)
    return LDSResult(float(fraction), score, per_test, keep, predicted, actual, np.asarray(base_losses, np.float64))


def removal_masks(num_train: int, groups: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """The ``(R, n)`` kept-sample array that removes ``groups[r]`` (indices) in row ``r``.

    Raises:
      PrivDebiasError: an index outside ``[0, n)`` or an empty group.
    """
    keep = np.ones((len(groups), int(num_train)), bool)
    for r, g in enumerate(groups):
        g = np.atleast_1d(np.asarray(g, np.int64))
        if g.size == 0:
            raise PrivDebiasError(f"removal group {r} is empty")
        if g.min() < 0 or g.max() >= num_train:
            raise PrivDebiasError(f"removal group {r} holds an index outside [0, {num_train})")
        keep[r, g] = False
    return keep


def evaluate_removals(
    scores: np.ndarray, base_losses: np.ndarray, retrain: Retrainer, groups: list[np.ndarray] | np.ndarray
) -> dict[str, Any]:
    """Remove each group, retrain, and correlate predicted with actual change of each test loss.

    ``groups`` is a list of index arrays (one sample each for leave-one-out). Returns
    ``{"pearson", "per_test", "predicted_change", "actual_change", "groups"}``.
    """
    scores = np.asarray(scores, np.float64)
    keep = removal_masks(scores.shape[0], groups)
    actual = np.asarray(retrain(keep), np.float64) - np.asarray(base_losses, np.float64)[None, :]
    predicted = predicted_losses(base_losses, scores, keep) - np.asarray(base_losses, np.float64)[None, :]
    pearson, per_test = removal_correlation(predicted, actual)
    return {"pearson": pearson, "per_test": per_test, "predicted_change": predicted, "actual_change": actual,
            "groups": [np.atleast_1d(np.asarray(g)).tolist() for g in groups]}


__all__ = [
    "InfluenceMatrix",
    "LDSResult",
    "MIN_SUBSETS",
    "influence_matrix",
    "draw_subsets",
    "predicted_losses",
    "linear_datamodeling_score",
    "removal_correlation",
    "evaluate_lds",
    "removal_masks",
    "evaluate_removals",
]
