"""Influence functions (Koh & Liang, ICML 2017) on any scalar objective, and Newton-step removal.

**Sign convention and scale.** Training minimises the mean loss ``L(θ) = (1/n) Σ_i ℓ(z_i, θ)``
with Hessian ``H = ∇²L`` (mean over the ``n`` training examples, plus damping ``λ``).
Upweighting one example by ``ε`` moves the optimum by ``dθ/dε = −H⁻¹ ∇ℓ(z)``; the influence
of ``z`` on a scalar objective ``f(θ)`` (the bias ``B(θ)``, a test loss) is

    I(z) = d f(θ_ε) / dε |_{ε=0} = −∇f(θ)ᵀ H⁻¹ ∇ℓ(z, θ).

``I(z) > 0``: giving ``z`` more weight *raises* ``f``, so removing it lowers ``f``. Removing
``z`` is ``ε = −1/n``, so ``Δf ≈ −I(z)/n`` and ``Δθ ≈ +(1/n) H⁻¹ ∇ℓ(z)``. For FMD, the
harmful samples are those with the largest ``I(z)`` on the bias.

* :func:`objective_gradient`: ``∇_{θ_S} f`` for ``f(params, batch)`` on the parameter subset.
* :func:`influence_scores`: ``I(z_i)`` for every sample, with one inverse-HVP (``s = H⁻¹∇f``)
  and chunked per-example gradients (memory ``chunk × P``).
* :func:`self_influence`: ``∇ℓ(z)ᵀ H⁻¹ ∇ℓ(z)``, one solve per example (exact solvers reuse
  their factorisation).
* :func:`newton_update`: ``θ_S' = θ_S + scale · H⁻¹ Σ_k (∇ℓ(z_k) − ∇ℓ(z̄_k))`` — removal
  (``z̄`` absent) or counterfactual replacement, ``scale = 1/n`` by default.
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
    _restricted_loss,
    iterate_per_example_grads,
    per_example_products,
)
from privdebias_jax.influence.solvers import Diagnostics, InverseHVPSolver, as_solver
from privdebias_jax.types import Params, PrivDebiasError

Tree = Any


def objective_gradient(
    problem: CurvatureProblem, objective: Callable[..., jax.Array], objective_batch: Any
) -> dict[str, Any]:
    """``∇_{θ_S} f`` for ``f = objective(params, objective_batch)`` at the problem's parameters.

    ``objective`` follows the ``loss_fn(params, batch)`` contract (it may take
    ``model_state`` as a third argument when the problem has one).
    """
    g = jax.grad(lambda s: _restricted_loss(objective, s, problem.frozen, objective_batch, problem.model_state))(
        problem.selected
    )
    flat = ravel_pytree(g)[0]
    if not bool(jnp.all(jnp.isfinite(flat))):
        raise PrivDebiasError("the objective's gradient holds NaN or inf")
    return g


@dataclasses.dataclass
class InfluenceResult:
    """Scores ``I(z_i)`` (``(N,)``, in the order of the data), ``s = H⁻¹∇f`` and the solve's diagnostics."""

    scores: np.ndarray
    ihvp: Tree
    diagnostics: Diagnostics
    seconds: float

    def top_k(self, k: int, ids: Any | None = None) -> np.ndarray:
        """Positions (or ``ids``) of the ``k`` largest scores: the samples whose removal lowers ``f`` most.

        Raises:
          PrivDebiasError: if ``k`` is not in ``[1, N]``.
        """
        n = len(self.scores)
        if not 1 <= int(k) <= n:
            raise PrivDebiasError(f"K must be in [1, {n}] (the number of scored samples), got {k}")
        order = np.argsort(-self.scores, kind="stable")[: int(k)]
        return order if ids is None else np.asarray(ids)[order]


def influence_scores(
    problem: CurvatureProblem,
    objective_grad: Tree,
    data: Dataset | Batch,
    solver: str | InverseHVPSolver = "cg",
    solver_options: dict | None = None,
    chunk_size: int = 32,
    prepared: Any | None = None,
) -> InfluenceResult:
    """``I(z_i) = −∇fᵀ H_λ⁻¹ ∇ℓ(z_i)`` for every example of ``data``.

    ``objective_grad`` is ``∇_{θ_S} f`` (:func:`objective_gradient`); ``prepared`` is a solver
    state from ``solver.prepare(problem)`` to reuse (FMD calls it for several objectives). The
    scores are :func:`~privdebias_jax.influence.per_example_products` in chunks of ``chunk_size``.
    """
    t0 = time.perf_counter()
    s = as_solver(solver, solver_options)
    state = prepared if prepared is not None else s.prepare(problem)
    ihvp, diag = s.solve(state, objective_grad)
    scores = -per_example_products(problem, data, ravel_pytree(ihvp)[0], chunk_size)
    return InfluenceResult(scores, ihvp, diag, time.perf_counter() - t0)


def self_influence(
    problem: CurvatureProblem,
    data: Dataset | Batch,
    solver: str | InverseHVPSolver = "exact",
    solver_options: dict | None = None,
    chunk_size: int = 256,
) -> np.ndarray:
    """``∇ℓ(z_i)ᵀ H_λ⁻¹ ∇ℓ(z_i)`` for every example (Koh & Liang's self-influence, up to sign).

    One inverse-HVP per example: cheap with ``exact``/``linear_head``/``kfac``/``ekfac``/``arnoldi``
    (a prepared factorisation), one full solve each with ``cg``/``lissa``.
    """
    s = as_solver(solver, solver_options)
    state = s.prepare(problem)
    unravel = ravel_pytree(problem.selected)[1]
    out = np.zeros(len(data.y), np.float64)
    for rows, g in iterate_per_example_grads(problem, data, chunk_size):
        for i, gi in zip(range(rows.start, rows.stop), g, strict=True):
            x, _ = s.solve(state, unravel(gi))
            out[i] = float(gi @ ravel_pytree(x)[0])
    return out


def summed_gradient(problem: CurvatureProblem, data: Dataset | Batch | None, chunk_size: int = 256) -> jax.Array:
    """``Σ_i ∇ℓ(z_i)`` over ``data`` as a flat vector (zeros when ``data`` is None)."""
    total = jnp.zeros(problem.num_params, jnp.float32)
    if data is None:
        return total
    for _, g in iterate_per_example_grads(problem, data, chunk_size):
        total = total + jnp.sum(g, axis=0)
    return total


@dataclasses.dataclass
class NewtonUpdate:
    """The result of :func:`newton_update`: new full parameters and what changed."""

    params: Params
    delta: Tree
    diagnostics: Diagnostics
    num_params_updated: int
    seconds: float


def newton_update(
    problem: CurvatureProblem,
    remove: Dataset | Batch | None,
    add: Dataset | Batch | None = None,
    *,
    scale: float | None = None,
    solver: str | InverseHVPSolver = "exact",
    solver_options: dict | None = None,
    prepared: Any | None = None,
    chunk_size: int = 256,
) -> NewtonUpdate:
    """One Newton step that removes ``remove`` and adds ``add`` (Koh & Liang 2017; FMD eq. for removal):

        θ_S' = θ_S + scale · H_λ⁻¹ (Σ_{z ∈ remove} ∇ℓ(z) − Σ_{z̄ ∈ add} ∇ℓ(z̄))

    with ``scale = 1/n`` (``n`` = the problem's number of examples) by default. With ``add``
    the counterfactuals of ``remove`` this is FMD's replacement update. Only the subset
    ``S`` changes; the returned ``params`` is the full tree.

    Raises:
      PrivDebiasError: if both sets are empty / None.
    """
    t0 = time.perf_counter()
    if (remove is None or len(remove.y) == 0) and (add is None or len(add.y) == 0):
        raise PrivDebiasError("newton_update needs samples to remove or to add")
    rm = None if remove is None or len(remove.y) == 0 else remove
    ad = None if add is None or len(add.y) == 0 else add
    rhs = summed_gradient(problem, rm, chunk_size) - summed_gradient(problem, ad, chunk_size)
    s = as_solver(solver, solver_options)
    state = prepared if prepared is not None else s.prepare(problem)
    x, diag = s.solve(state, problem.unravel(rhs))
    c = (1.0 / problem.num_examples) if scale is None else float(scale)
    delta = jax.tree_util.tree_map(lambda d: c * d, x)
    new_selected = jax.tree_util.tree_map(lambda p, d: p + d, problem.selected, delta)
    return NewtonUpdate(problem.with_selected(new_selected), delta, diag, problem.num_params, time.perf_counter() - t0)



__all__ = [
    "InfluenceResult",
    "NewtonUpdate",
    "objective_gradient",
    "influence_scores",
    "self_influence",
    "summed_gradient",
    "newton_update",
]
