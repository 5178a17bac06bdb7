"""Inverse-HVP solvers with one signature, selected by name.

``solver = make_solver(name, **options)`` returns an :class:`InverseHVPSolver`
``(name, prepare, solve)`` in the style of optax's ``GradientTransformation``:

    state = solver.prepare(problem)          # factorise / estimate once
    x, diagnostics = solver.solve(state, v)  # x ≈ H_λ⁻¹ v, reusable for many v

``problem`` is a :class:`~privdebias_jax.influence.problem.CurvatureProblem`; ``v`` a tree shaped
like its parameter subset. Every solve reports :class:`Diagnostics`: iterations, the relative
residual ``‖H_λ x − v‖ / ‖v‖`` measured with one product of the problem's own curvature
(:meth:`~privdebias_jax.influence.problem.CurvatureProblem.matvec`), seconds, flags, and two
verdicts:

* ``iteration_converged``: the method's own stopping test passed. ``cg``/``pcg``:
  ``‖r‖ ≤ tol ‖v‖`` before ``maxiter`` (and no negative curvature); ``lissa``: no divergence and
  a final relative change below ``tol``; ``arnoldi``: the Krylov iteration completed its steps or
  reached an invariant subspace; ``exact``, ``linear_head``, ``kfac``, ``ekfac``: the
  factorisation was applied.
* ``converged``: ``iteration_converged`` and a finite ``residual ≤ residual_tol`` (a keyword
  of every solver factory, default ``1e-3``, recorded in the diagnostics). An approximate
  inverse (``kfac``, ``ekfac``, ``arnoldi`` with ``top_k < P``) on a real network has a residual
  far above it and reports ``converged=False`` while its ``iteration_converged`` is true.

| name          | method                                                                     |
|---------------|----------------------------------------------------------------------------|
| ``exact``     | dense ``H`` of the subset, ``eigh`` (or Cholesky), factored once            |
| ``linear_head``| closed-form Hessian of a linear softmax head (multiclass logistic regression) |
| ``cg``        | conjugate gradient on ``H_λ`` (Hestenes & Stiefel 1952), matrix-free        |
| ``pcg``       | ``cg`` preconditioned by the K-FAC / EK-FAC inverse (exact ``H_λ`` solved)   |
| ``lissa``     | stochastic Neumann series (Agarwal et al. 2017; Koh & Liang 2017)          |
| ``arnoldi``   | top-k eigenpairs by Arnoldi iteration, inverse in that subspace (Schioppa et al. 2022) |
| ``kfac``      | Kronecker-factored Fisher per dense layer (Martens & Grosse 2015)           |
| ``ekfac``     | eigenvalue-corrected K-FAC (George et al. 2018; Grosse et al. 2023)         |
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from privdebias_jax.influence.hvp import dense_hessian, matrix_from_products
from privdebias_jax.influence.params import merge_params
from privdebias_jax.influence.problem import (
    CurvatureProblem,
    _apply_damped,
    _damped_hvp,
    _linearized_hvp,
    _restricted_loss,
    iterate_per_example_grads,
)
from privdebias_jax.train import apply_model
from privdebias_jax.types import PrivDebiasError, PRNGKey

Tree = Any


@dataclasses.dataclass
class Diagnostics:
    """What a solve reports.

    Attributes:
      solver: the solver's name.
      iterations: iterations (or products, or 1 for a factorisation) the solve took.
      residual: ``‖H_λ x − v‖ / ‖v‖`` with one product of the problem's curvature (NaN when
        ``x`` is not finite).
      seconds: wall time of the solve.
      converged: ``iteration_converged`` and ``residual ≤ residual_tol`` (finite).
      flags: solver-specific details.
      iteration_converged: the solver's own stopping test passed (see the module docstring);
        when not given, ``converged``.
      residual_tol: the tolerance ``converged`` applies to ``residual``; None when
        ``converged`` is not a residual test (a ``Diagnostics`` built by another iteration).
    """

    solver: str
    iterations: int
    residual: float
    seconds: float
    converged: bool
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)
    iteration_converged: bool | None = None
    residual_tol: float | None = None

    def __post_init__(self) -> None:
        if self.iteration_converged is None:
            self.iteration_converged = bool(self.converged)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class InverseHVPSolver(NamedTuple):
    """``prepare(problem) -> state`` once; ``solve(state, v) -> (x, Diagnostics)`` per right-hand side."""

    name: str
    prepare: Callable[[CurvatureProblem], Any]
    solve: Callable[[Any, Tree], tuple[Tree, Diagnostics]]


def _check_rhs(problem: CurvatureProblem, v: Tree) -> jax.Array:
    if jax.tree_util.tree_structure(v) != jax.tree_util.tree_structure(problem.selected):
        raise PrivDebiasError(
            "the right-hand side does not match the parameter subset: "
            f"{sorted(v) if isinstance(v, dict) else type(v).__name__} vs {sorted(problem.selected)}"
        )
    for path, (a, b) in {k: (v[k], problem.selected[k]) for k in problem.selected}.items():
        if np.shape(a) != np.shape(b):
            raise PrivDebiasError(f"right-hand side leaf {path} has shape {np.shape(a)}, expected {np.shape(b)}")
    flat = ravel_pytree(v)[0]
    if not bool(jnp.all(jnp.isfinite(flat))):
        raise PrivDebiasError("the right-hand side holds NaN or inf")
    return flat


def _check_residual_tol(name: str, residual_tol: float) -> float:
    tol = float(residual_tol)
    if not tol > 0:  # also rejects NaN
        raise PrivDebiasError(f"{name} needs residual_tol > 0, got {residual_tol}")
    return tol


def _finish(name, problem, v_flat, x_flat, iterations, t0, iteration_converged, flags,
            residual_tol) -> tuple[Tree, Diagnostics]:
    """``x`` as a tree and the :class:`Diagnostics` of a solve: the residual from one product of
    the problem's curvature, ``converged = iteration_converged and residual ≤ residual_tol``."""
    x = problem.unravel(x_flat)
    finite = bool(jnp.all(jnp.isfinite(x_flat)))
    if finite:
        r = problem.ravel(problem.matvec(x)) - v_flat
        residual = float(jnp.linalg.norm(r) / jnp.maximum(jnp.linalg.norm(v_flat), 1e-30))
    else:
        residual = float("nan")
    flags = dict(flags)
    if not finite:
        flags["non_finite"] = True
        iteration_converged = False
    iteration_converged = bool(iteration_converged)
    converged = iteration_converged and bool(np.isfinite(residual)) and residual <= residual_tol
    return x, Diagnostics(name, int(iterations), residual, time.perf_counter() - t0, converged, flags,
                          iteration_converged=iteration_converged, residual_tol=float(residual_tol))


# --------------------------------------------------------------------------------------------
# exact
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _dense_restricted_hessian(loss_fn, selected, frozen, batch, model_state):
    return dense_hessian(lambda s, fr, b, ms: _restricted_loss(loss_fn, s, fr, b, ms), selected, frozen, batch, model_state)


def _available_bytes() -> int:
    """Memory the OS reports as available (``MemAvailable`` of ``/proc/meminfo``; physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 2**63 - 1


DENSE_COPIES = 3  # the matrix, its symmetrised copy and the eigenvectors (or the Cholesky factor)


def check_dense_fits(num_params: int, what: str = "exact", available: int | None = None) -> int:
    """Estimate the memory of a dense ``(P, P)`` float32 curvature and its factorisation,
    ``3 · 4 · P²`` bytes, before anything is allocated; returns the estimate.

    Raises:
      PrivDebiasError: when the estimate exceeds the available memory (``available`` bytes, by
        default what the OS reports), naming the size and the matrix-free solvers to use instead.
    """
    need = DENSE_COPIES * 4 * int(num_params) ** 2
    avail = _available_bytes() if available is None else int(available)
    if need > avail:
        raise PrivDebiasError(
            f"{what}: a dense {num_params:,} × {num_params:,} curvature needs about {need / 2**30:.1f} GiB "
            f"({DENSE_COPIES} float32 copies) but {avail / 2**30:.1f} GiB are available; use cg, pcg, lissa, "
            "arnoldi, kfac or ekfac, or select fewer parameters"
        )
    return need


def dense_curvature(problem: CurvatureProblem, what: str = "dense curvature") -> jax.Array:
    """The undamped curvature matrix ``(P, P)`` of the problem (Hessian, Gauss-Newton or empirical
    Fisher). Its memory is checked first (:func:`check_dense_fits`; ``what`` names the caller in
    its message)."""
    check_dense_fits(problem.num_params, what)
    if problem.curvature == "hessian":
        return _dense_restricted_hessian(problem.loss_fn, problem.selected, problem.frozen, problem.batch,
                                         problem.model_state)
    return matrix_from_products(problem.undamped_matvec, problem.selected)


def exact(method: str = "eigh", allow_indefinite: bool = False, residual_tol: float = 1e-3) -> InverseHVPSolver:
    """Dense ``H_λ`` of the subset, factored once (``eigh`` or ``cholesky``).

    With ``eigh``, ``x = Q diag(1/(Λ + λ)) Qᵀ v``. A curvature with ``min(Λ) + λ ≤ 0`` (a
    non-convex Hessian) raises unless ``allow_indefinite``, in which case eigenvalues are
    replaced by ``max(|Λ + λ|, λ)`` and ``flags["indefinite"]`` is set.
    """
    if method not in ("eigh", "cholesky"):
        raise PrivDebiasError(f"exact solver method must be 'eigh' or 'cholesky', got {method!r}")
    residual_tol = _check_residual_tol("exact", residual_tol)

    def prepare(problem: CurvatureProblem):
        t0 = time.perf_counter()
        h = dense_curvature(problem, "exact")
        h = 0.5 * (h + h.T)
        lam = problem.damping
        if method == "cholesky":
            chol = jnp.linalg.cholesky(h + lam * jnp.eye(h.shape[0], dtype=h.dtype))
            if not bool(jnp.all(jnp.isfinite(chol))):
                raise PrivDebiasError(
                    "the damped curvature is not positive definite (Cholesky failed); raise the damping "
                    "or use method='eigh' with allow_indefinite=True"
                )
            return {"problem": problem, "chol": chol, "seconds": time.perf_counter() - t0, "flags": {}}
        evals, evecs = jnp.linalg.eigh(h)
        shifted = evals + lam
        flags = {"min_eigenvalue": float(evals[0]), "max_eigenvalue": float(evals[-1])}
        if float(shifted[0]) <= 0:
            if not allow_indefinite:
                raise PrivDebiasError(
                    f"the damped curvature is not positive definite: min eigenvalue {float(evals[0]):.3g} "
                    f"+ damping {lam:.3g} ≤ 0; raise the damping, use curvature='gauss_newton', "
                    "or pass allow_indefinite=True"
                )
            flags["indefinite"] = True
            shifted = jnp.maximum(jnp.abs(shifted), lam if lam > 0 else 1e-8)
        return {"problem": problem, "evals": shifted, "evecs": evecs, "seconds": time.perf_counter() - t0,
                "flags": flags, "hessian": h}

    def solve(state, v):
        t0 = time.perf_counter()
        problem = state["problem"]
        vf = _check_rhs(problem, v)
        if "chol" in state:
            y = jax.scipy.linalg.solve_triangular(state["chol"], vf, lower=True)
            x = jax.scipy.linalg.solve_triangular(state["chol"].T, y, lower=False)
        else:
            q = state["evecs"]
            x = q @ ((q.T @ vf) / state["evals"])
        return _finish("exact", problem, vf, x, 1, t0, True, state["flags"], residual_tol)

    return InverseHVPSolver("exact", prepare, solve)


# --------------------------------------------------------------------------------------------
# closed form for a linear softmax head
# --------------------------------------------------------------------------------------------


def linear_head_hessian(features: jax.Array, probs: jax.Array, mask: jax.Array) -> jax.Array:
    """Hessian of the mean softmax cross-entropy of a linear head ``z = h W + b``.

    Multiclass logistic regression: with ``u_i = [1, h_i]`` and ``S_i = diag(p_i) − p_i p_iᵀ``,
    ``H = (1/Σm) Σ_i m_i (u_i u_iᵀ) ⊗ S_i`` in the ``ravel_pytree`` order of
    ``{"…/bias": b, "…/kernel": W}`` (the bias block first, then ``W`` row-major), shape
    ``((F+1)C, (F+1)C)``.
    """
    n, f = features.shape
    c = probs.shape[1]
    w = mask / jnp.maximum(jnp.sum(mask), 1.0)
    u = jnp.concatenate([jnp.ones((n, 1), features.dtype), features], axis=1)
    diag_part = jnp.einsum("ij,ic,ik->jck", u * w[:, None], probs, u)  # (F+1, C, F+1)
    outer = (u[:, :, None] * probs[:, None, :]).reshape(n, (f + 1) * c)  # u ⊗ p
    h = -(outer * w[:, None]).T @ outer
    h = h.reshape(f + 1, c, f + 1, c)
    idx = jnp.arange(c)
    h = h.at[:, idx, :, idx].add(jnp.transpose(diag_part, (1, 0, 2)))
    return h.reshape((f + 1) * c, (f + 1) * c)


def linear_head(head: str = "head", residual_tol: float = 1e-3) -> InverseHVPSolver:
    """Closed-form inverse for a linear softmax head (the subset must be ``head/kernel`` and
    ``head/bias``), using the model's features: exact when the loss is the mean cross-entropy.

    Raises (in ``prepare``): if the subset is not exactly that pair, or there is no model.
    """
    residual_tol = _check_residual_tol("linear_head", residual_tol)

    def prepare(problem: CurvatureProblem):
        t0 = time.perf_counter()
        want = {f"{head}/bias", f"{head}/kernel"}
        if set(problem.selected) != want:
            raise PrivDebiasError(
                f"linear_head needs the subset {sorted(want)} (select=r'^{head}/'); got {sorted(problem.selected)}"
            )
        if problem.model is None:
            raise PrivDebiasError("linear_head needs the model to compute the head's input features")
        params = merge_params(problem.selected, problem.frozen)
        logits, feats, _ = apply_model(problem.model, params, problem.model_state or {}, problem.batch.x)
        h = linear_head_hessian(feats, jax.nn.softmax(logits, -1), problem.batch.mask)
        # The closed form assumes loss_fn is the mean cross-entropy of the head: check one product.
        probe = jax.random.normal(jax.random.key(0), (h.shape[0],), h.dtype)
        ref = problem.ravel(problem.undamped_matvec(problem.unravel(probe)))
        mismatch = float(jnp.linalg.norm(h @ probe - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))
        if mismatch > 1e-3:
            raise PrivDebiasError(
                f"linear_head: the closed-form head Hessian differs from loss_fn's by {mismatch:.2g} (relative); "
                "it covers only the mean cross-entropy (a regulariser or another loss needs 'exact' or 'cg')"
            )
        h = h + problem.damping * jnp.eye(h.shape[0], dtype=h.dtype)
        chol = jnp.linalg.cholesky(h)
        if not bool(jnp.all(jnp.isfinite(chol))):
            raise PrivDebiasError("the damped head Hessian is singular; use damping > 0")
        return {"problem": problem, "chol": chol, "seconds": time.perf_counter() - t0}

    def solve(state, v):
        t0 = time.perf_counter()
        problem = state["problem"]
        vf = _check_rhs(problem, v)
        y = jax.scipy.linalg.solve_triangular(state["chol"], vf, lower=True)
        x = jax.scipy.linalg.solve_triangular(state["chol"].T, y, lower=False)
        return _finish("linear_head", problem, vf, x, 1, t0, True, {}, residual_tol)

    return InverseHVPSolver("linear_head", prepare, solve)


# --------------------------------------------------------------------------------------------
# conjugate gradient
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("loss_fn", "curvature_fn", "maxiter", "reuse", "pre_layers",
                                             "pre_others"))
def _cg_program(loss_fn, curvature_fn, damping, selected, frozen, batch, model_state, b, tol, pre_blocks=None,
                pre_diags=None, pre_damping=None, *, maxiter: int, reuse: bool = True,
                pre_layers: tuple | None = None, pre_others: tuple = ()):
    """(Preconditioned) conjugate gradient from ``x₀ = 0`` as one compiled ``lax.while_loop``
    (one HVP per iteration).

    With ``pre_layers`` (not None) the residual is preconditioned by the K-FAC inverse
    ``z = (A ⊗ G + λ'I)⁻¹ r`` of :func:`_kfac_apply` (factors ``pre_blocks``/``pre_diags``,
    ``λ' = pre_damping``, ``damping`` when None):
    ``α = rᵀz / pᵀH_λp``, ``p ← z + (r'ᵀz' / rᵀz) p``; without, ``z = r`` (plain CG).
    Returns ``(x, iterations, converged, negative_curvature)``: stops once ``‖r‖ ≤ tol ‖b‖``,
    after ``maxiter`` iterations, or (leaving ``x`` as it was) at a direction with
    ``pᵀ H_λ p ≤ 0`` or a non-finite curvature.
    """
    unravel = ravel_pytree(selected)[1]
    if pre_layers is None:
        def precondition(r):
            return r
    else:
        def precondition(r):
            lam = damping if pre_damping is None else pre_damping
            return ravel_pytree(_kfac_apply(pre_blocks, pre_diags, pre_layers, pre_others, lam, unravel(r)))[0]
    if curvature_fn is None and reuse:
        # One linearization of the gradient before the loop: each iteration runs only the
        # tangent pass (the forward and backward pass at θ are the same every iteration).
        linear_map = _linearized_hvp(loss_fn, selected, frozen, batch, model_state)

        def mv(x):
            return ravel_pytree(_apply_damped(linear_map, damping, unravel(x)))[0]
    else:
        def mv(x):
            hv = _damped_hvp(loss_fn, curvature_fn, damping, selected, frozen, batch, model_state, unravel(x))
            return ravel_pytree(hv)[0]

    bnorm = jnp.linalg.norm(b)

    def cond(c):
        it, _, _, _, _, converged, negative = c
        return (it < maxiter) & ~converged & ~negative

    def body(c):
        it, x, r, p, rz, _, _ = c
        ap = mv(p)
        pap = p @ ap
        negative = ~jnp.isfinite(pap) | (pap <= 0)
        alpha = jnp.where(negative, 0.0, rz / jnp.where(negative, 1.0, pap))
        x_new, r_new = x + alpha * p, r - alpha * ap
        z_new = precondition(r_new)
        rz_new = r_new @ z_new
        converged = jnp.linalg.norm(r_new) <= tol * bnorm
        p_new = z_new + (rz_new / jnp.where(rz == 0, 1.0, rz)) * p
        keep = lambda new, old: jnp.where(negative, old, new)  # noqa: E731
        return (jnp.where(negative, it, it + 1), keep(x_new, x), keep(r_new, r), keep(p_new, p), keep(rz_new, rz),
                converged & ~negative, negative)

    z0 = precondition(b)
    start = (jnp.int32(0), jnp.zeros_like(b), b, z0, b @ z0, bnorm == 0, jnp.bool_(False))
    it, x, _, _, _, converged, negative = jax.lax.while_loop(cond, body, start)
    return x, it, converged, negative


def cg(tol: float = 1e-6, maxiter: int = 200, residual_tol: float = 1e-3) -> InverseHVPSolver:
    """Conjugate gradient on ``H_λ x = v`` with one HVP per iteration, from ``x₀ = 0``.

    Stops when ``‖r‖ ≤ tol ‖v‖`` or after ``maxiter`` iterations. A direction with
    ``pᵀ H_λ p ≤ 0`` (negative curvature) stops the run with ``flags["negative_curvature"]``.
    """
    return _cg_solver("cg", tol, maxiter, lambda problem: {"problem": problem}, residual_tol=residual_tol)


def _cg_solver(name: str, tol: float, maxiter: int, prepare: Callable[[CurvatureProblem], dict],
               preconditioner: str | None = None, residual_tol: float = 1e-3) -> InverseHVPSolver:
    """``cg`` and ``pcg`` share this: ``prepare`` gives the state (``pcg``'s holds the K-FAC
    factors, used as the preconditioner when ``preconditioner`` is set), ``solve`` runs
    :func:`_cg_program` and reports its diagnostics."""
    if tol <= 0 or maxiter < 1:
        raise PrivDebiasError(f"{name} needs tol > 0 and maxiter ≥ 1, got tol={tol}, maxiter={maxiter}")
    residual_tol = _check_residual_tol(name, residual_tol)

    def solve(state, v):
        t0 = time.perf_counter()
        problem = state["problem"]
        vf = _check_rhs(problem, v)
        pre = {} if preconditioner is None else dict(
            pre_blocks=state["blocks"], pre_diags=state["diags"], pre_layers=tuple(state["layers"]),
            pre_others=tuple(state["others"]),
            pre_damping=jnp.asarray(problem.damping + state["parameter_term_curvature"], jnp.float32))
        x, it, converged, negative = _cg_program(
            problem.loss_fn, problem._curvature_fn(), jnp.asarray(problem.damping, jnp.float32), problem.selected,
            problem.frozen, problem.batch, problem.model_state, vf, jnp.asarray(tol, vf.dtype), maxiter=int(maxiter),
            reuse=problem.reuse_linearization, **pre,
        )
        flags: dict[str, Any] = {} if preconditioner is None else {"preconditioner": preconditioner}
        if bool(negative):
            flags["negative_curvature"] = True
        if preconditioner is not None and "parameter_term_curvature" in state["flags"]:
            flags["parameter_term_curvature"] = state["flags"]["parameter_term_curvature"]
        return _finish(name, problem, vf, x, int(it), t0, bool(converged), flags, residual_tol)

    return InverseHVPSolver(name, prepare, solve)


# --------------------------------------------------------------------------------------------
# LiSSA
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _lissa_run(loss_fn, curv, n, bs, depth, scale, selected, frozen, batch, model_state, v_flat, key, damping):
    """``depth`` LiSSA steps under one jit (compiled once per loss, sizes and settings)."""
    unravel = ravel_pytree(selected)[1]

    def body(h, kk):
        rows = jax.random.choice(kk, n, (bs,), replace=False) if bs < n else jnp.arange(n)
        mb = jax.tree_util.tree_map(lambda a: a[rows], batch)
        hv = ravel_pytree(_damped_hvp(loss_fn, curv, damping, selected, frozen, mb, model_state, unravel(h)))[0]
        new = v_flat + h - hv / scale
        return new, jnp.linalg.norm(new)

    h, norms = jax.lax.scan(body, v_flat, jax.random.split(key, depth))
    return h / scale, norms


def lissa(
    scale: float = 10.0,
    depth: int = 1000,
    repeats: int = 1,
    batch_size: int | None = 256,
    key: PRNGKey | int = 0,
    tol: float = 1e-4,
    raise_on_divergence: bool = False,
    residual_tol: float = 1e-3,
) -> InverseHVPSolver:
    """LiSSA: ``h₀ = v``, ``h_j = v + h_{j−1} − H̃_j h_{j−1} / s``, ``x ≈ h_depth / s``.

    ``H̃_j`` is ``H_λ`` on a random minibatch of ``batch_size`` rows (the whole batch when None),
    drawn from ``key``; ``repeats`` runs are averaged. The series converges when
    ``s > λ_max(H_λ)``; otherwise it blows up: a run whose iterate becomes non-finite or grows
    by more than 10× over its last tenth is flagged ``flags["diverged"]`` (and raises with
    ``raise_on_divergence``). ``flags["final_change"]`` is the relative change of the last step.
    """
    if scale <= 0 or depth < 1 or repeats < 1:
        raise PrivDebiasError(f"lissa needs scale > 0, depth ≥ 1, repeats ≥ 1; got {scale}, {depth}, {repeats}")
    residual_tol = _check_residual_tol("lissa", residual_tol)
    root = jax.random.key(key) if isinstance(key, int) else key

    def prepare(problem: CurvatureProblem):
        n = int(problem.batch.y.shape[0])
        bs = n if batch_size is None else min(int(batch_size), n)

        def run(selected, batch, v_flat, k):
            return _lissa_run(problem.loss_fn, problem._curvature_fn(), n, bs, int(depth), float(scale),
                              selected, problem.frozen, batch, problem.model_state, v_flat, k,
                              jnp.asarray(problem.damping, jnp.float32))

        return {"problem": problem, "run": run}

    def solve(state, v):
        t0 = time.perf_counter()
        problem = state["problem"]
        vf = _check_rhs(problem, v)
        xs, diverged, changes = [], False, []
        for r in range(repeats):
            x, norms = state["run"](problem.selected, problem.batch, vf, jax.random.fold_in(root, r))
            norms = np.asarray(norms)
            tail = max(1, depth // 10)
            if not np.all(np.isfinite(norms)) or norms[-1] > 10 * max(norms[-tail - 1] if depth > tail else norms[0], 1e-30):
                diverged = True
            if depth > 1 and np.isfinite(norms[-1]):
                changes.append(abs(norms[-1] - norms[-2]) / max(norms[-1], 1e-30))
            xs.append(x)
        x = jnp.mean(jnp.stack(xs), 0)
        flags = {"diverged": diverged, "final_change": float(max(changes)) if changes else float("nan")}
        if diverged and raise_on_divergence:
            raise PrivDebiasError(
                f"LiSSA diverged (scale {scale} is below the largest eigenvalue of the damped curvature?); "
                "raise `scale` or the damping"
            )
        converged = (not diverged) and bool(changes) and max(changes) < tol
        return _finish("lissa", problem, vf, x, depth * repeats, t0, converged, flags, residual_tol)

    return InverseHVPSolver("lissa", prepare, solve)


# --------------------------------------------------------------------------------------------
# Arnoldi
# --------------------------------------------------------------------------------------------


def arnoldi(num_iters: int = 100, top_k: int = 50, key: PRNGKey | int = 0,
            residual_tol: float = 1e-3) -> InverseHVPSolver:
    """Schioppa et al. (AAAI 2022), "Scaling up influence functions": ``num_iters`` Arnoldi steps
    on the undamped curvature from a random start (full re-orthogonalisation), the ``top_k``
    eigenpairs of the projected matrix by magnitude, and ``x = U diag(1/(Λ_k + λ)) Uᵀ v``.

    Directions outside the top-k eigenspace are dropped (their influence is treated as 0):
    the approximation the paper makes. ``flags["eigenvalues"]`` lists the kept ones. On a Krylov breakdown (an
    invariant subspace: repeated eigenvalues, a null space) the iteration restarts from a
    random vector orthogonal to the basis (``flags["restarts"]``).
    """
    if num_iters < 1 or top_k < 1 or top_k > num_iters:
        raise PrivDebiasError(f"arnoldi needs 1 ≤ top_k ≤ num_iters, got top_k={top_k}, num_iters={num_iters}")
    residual_tol = _check_residual_tol("arnoldi", residual_tol)
    root = jax.random.key(key) if isinstance(key, int) else key

    def prepare(problem: CurvatureProblem):
        t0 = time.perf_counter()
        p = problem.num_params
        m = min(num_iters, p)
        mv = lambda x: np.asarray(  # noqa: E731
            problem.ravel(problem.undamped_matvec(problem.unravel(jnp.asarray(x, jnp.float32)))), np.float64
        )
        q0 = np.asarray(jax.random.normal(root, (p,), jnp.float32), np.float64)
        qmat = np.zeros((m + 1, p))
        qmat[0] = q0 / np.linalg.norm(q0)
        hess = np.zeros((m + 1, m), np.float64)
        steps = m
        restarts = 0
        rng = np.random.default_rng(int(jax.random.randint(root, (), 0, 2**31 - 1)))
        for j in range(m):
            w = mv(qmat[j])
            coeffs = qmat[: j + 1] @ w
            w = w - qmat[: j + 1].T @ coeffs
            c2 = qmat[: j + 1] @ w  # re-orthogonalise (classical Gram-Schmidt twice)
            w = w - qmat[: j + 1].T @ c2
            hess[: j + 1, j] = coeffs + c2
            beta = float(np.linalg.norm(w))
            if beta < 1e-8 * max(1.0, float(np.abs(hess[: j + 1, j]).max())):
                # Breakdown: the Krylov space is invariant. Restart from a fresh random vector
                # orthogonal to the basis (hess[j+1, j] = 0), so repeated eigenvalues and the
                # null space are reached too.
                restarts += 1
                w = rng.standard_normal(p)
                for _ in range(2):
                    w = w - qmat[: j + 1].T @ (qmat[: j + 1] @ w)
                beta_new = float(np.linalg.norm(w))
                if j + 1 >= p or beta_new < 1e-8:
                    steps = j + 1
                    break
                qmat[j + 1] = w / beta_new
                continue
            hess[j + 1, j] = beta
            qmat[j + 1] = w / beta
        qmat = qmat[:steps]
        small = hess[:steps, :steps]
        small = 0.5 * (small + small.T)
        evals, evecs = np.linalg.eigh(small)
        order = np.argsort(-np.abs(evals))[: min(top_k, steps)]
        lam, vecs = evals[order], evecs[:, order]
        u = jnp.asarray(qmat.T @ vecs, jnp.float32)
        shifted = lam + problem.damping
        flags = {"eigenvalues": [float(e) for e in lam], "krylov_steps": steps, "restarts": restarts}
        if np.any(shifted <= 0):
            flags["nonpositive_kept"] = int(np.sum(shifted <= 0))
            shifted = np.where(shifted <= 0, np.maximum(np.abs(shifted), 1e-8), shifted)
        # The iteration's own verdict: it ran its steps (or stopped at an invariant subspace)
        # on finite products.
        completed = bool(np.all(np.isfinite(hess[: steps + 1, :steps]))) and steps >= 1
        return {"problem": problem, "u": u, "inv": jnp.asarray(1.0 / shifted, jnp.float32), "flags": flags,
                "steps": steps, "completed": completed, "seconds": time.perf_counter() - t0}

    def solve(state, v):
        t0 = time.perf_counter()
        problem = state["problem"]
        vf = _check_rhs(problem, v)
        u = state["u"]
        x = u @ (state["inv"] * (u.T @ vf))
        return _finish("arnoldi", problem, vf, x, state["steps"], t0, state["completed"], state["flags"],
                       residual_tol)

    return InverseHVPSolver("arnoldi", prepare, solve)


# --------------------------------------------------------------------------------------------
# K-FAC and EK-FAC
# --------------------------------------------------------------------------------------------


def _dense_layers(selected: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Module prefixes with a 2-D ``kernel`` and a ``bias`` in the subset; the other leaves."""
    prefixes = []
    for path, leaf in selected.items():
        if path.endswith("/kernel") and np.ndim(leaf) == 2:
            prefix = path[: -len("/kernel")]
            if f"{prefix}/bias" in selected:
                prefixes.append(prefix)
    covered = {f"{p}/kernel" for p in prefixes} | {f"{p}/bias" for p in prefixes}
    return sorted(prefixes), sorted(set(selected) - covered)


def _layout(selected: dict[str, Any]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Offset and shape of every leaf in ``ravel_pytree`` order (sorted keys)."""
    out, off = {}, 0
    for k in sorted(selected):
        shape = tuple(np.shape(selected[k]))
        out[k] = (off, shape)
        off += int(np.prod(shape, dtype=np.int64))
    return out


def _dense_layer_inputs(problem: CurvatureProblem, layers: list[str]) -> tuple[jax.Array, dict[str, np.ndarray]]:
    """The model's logits on the problem's batch and the input ``a`` (``(N, in)``, float64) of
    every ``nn.Dense`` whose module path (``"dense_1"`` for ``"dense_1/kernel"``) is in
    ``layers``, recorded by a :func:`flax.linen.intercept_methods` interceptor during one
    forward pass. A layer the forward pass never enters through ``nn.Dense.__call__`` is left
    out of the dict.

    Raises:
      PrivDebiasError: a selected dense layer applied more than once per forward pass, or to
        inputs that are not ``(N, in)`` (then one example's gradient is a sum of rank-one
        terms and ``ā gᵀ`` does not hold).
    """
    wanted = set(layers)
    seen: dict[str, list] = {p: [] for p in layers}

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            path = "/".join(str(part) for part in context.module.path)
            if path in wanted:
                seen[path].append(args[0])
        return next_fun(*args, **kwargs)

    params = merge_params(problem.selected, problem.frozen)
    with nn.intercept_methods(interceptor):
        logits, _, _ = apply_model(problem.model, params, problem.model_state or {}, problem.batch.x)
    n = int(problem.batch.y.shape[0])
    out = {}
    for p, calls in seen.items():
        if not calls:
            continue
        if len(calls) > 1:
            raise PrivDebiasError(
                f"K-FAC: dense layer {p!r} is applied {len(calls)} times in one forward pass; its per-example "
                "gradient is a sum of rank-one terms, which the Kronecker factors A ⊗ G do not model "
                "(leave the layer out of the subset or use cg/exact)"
            )
        a = np.asarray(calls[0], np.float64)
        fan_in = int(np.shape(problem.selected[f"{p}/kernel"])[0])
        if a.shape != (n, fan_in):
            raise PrivDebiasError(
                f"K-FAC: dense layer {p!r} is applied to inputs of shape {a.shape}, expected ({n}, {fan_in}) "
                "(one input row per example); its per-example gradient is then a sum of rank-one terms"
            )
        out[p] = a
    return logits, out


def _parameter_term(problem: CurvatureProblem, name: str) -> tuple[np.ndarray | None, float]:
    """The gradient (flat, float64, or None when there is none) and the isotropic curvature ``c``
    to add to the damping of a parameter-only term ``R(θ)`` of ``loss_fn``.

    ``loss_fn`` on the batch with every mask weight 0 keeps only ``R`` (the masked mean
    cross-entropy divides by ``max(Σm, 1)``, so its data part vanishes). ``R`` is absent when its
    gradient and its HVPs on two random probes are exactly 0. With ``curvature="hessian"`` the
    problem's ``H`` holds ``∇²R``: it is added to the damping when it is ``c·I`` (both probes'
    products equal ``c·probe`` to 1e-5 relative), otherwise this raises. The Gauss-Newton
    product covers the cross-entropy only, so there ``c`` is 0 (the gradient is still removed
    from the per-example gradients). Any other curvature holds ``∇R`` inside every per-example
    gradient, which the factors cannot represent: that raises.
    """
    zero = problem.batch._replace(mask=jnp.zeros_like(problem.batch.mask))
    grad = np.asarray(problem.ravel(problem.gradient(zero)), np.float64)
    probes = [jax.random.normal(jax.random.key(k), (problem.num_params,), jnp.float32) for k in (0, 1)]
    prods = [
        np.asarray(problem.ravel(_damped_hvp(problem.loss_fn, None, jnp.float32(0.0), problem.selected, problem.frozen,
                                             zero, problem.model_state, problem.unravel(u))), np.float64)
        for u in probes
    ]
    if not (np.all(np.isfinite(grad)) and all(np.all(np.isfinite(h)) for h in prods)):
        raise PrivDebiasError(
            f"{name}: loss_fn on the batch with every mask weight 0 is not finite; K-FAC separates the data term "
            "from parameter-only terms that way and needs a loss that honours the mask (a masked mean)"
        )
    if not np.any(grad) and not any(np.any(h) for h in prods):
        return None, 0.0
    if problem.curvature == "gauss_newton":
        return grad, 0.0
    if problem.curvature != "hessian":
        raise PrivDebiasError(
            f"{name}: loss_fn has a parameter-only term (gradient norm {np.linalg.norm(grad):.3g} at zero mask) and "
            f"the problem's {problem.curvature!r} curvature carries its gradient in every per-example gradient; "
            "K-FAC covers only the data term: use cg/exact or drop the term"
        )
    cs = []
    for u, h in zip(probes, prods, strict=True):
        u = np.asarray(u, np.float64)
        c = float(u @ h / (u @ u))
        if np.linalg.norm(h - c * u) > 1e-5 * max(np.linalg.norm(h), 1e-30) and np.any(h):
            cs = None
            break
        cs.append(c)
    if cs is None or abs(cs[0] - cs[1]) > 1e-5 * max(abs(cs[0]), abs(cs[1])):
        raise PrivDebiasError(
            f"{name}: loss_fn has a parameter-only term (what remains of it with every mask weight 0) with "
            "non-isotropic curvature (its Hessian on the subset is not c·I); K-FAC covers only the data term: "
            "use cg/exact or drop the term"
        )
    return grad, float(np.mean(cs))


def kronecker_factored(eigen_corrected: bool = False, fisher: str = "true", chunk_size: int = 256,
                       residual_tol: float = 1e-3) -> InverseHVPSolver:
    """K-FAC (Martens & Grosse 2015) or EK-FAC (George et al. 2018) for the dense layers of the subset.

    For a dense layer ``z = a W + b`` applied once per example, the per-example gradient of
    ``[W; b]`` is the rank-one ``Ĝ = ā gᵀ`` with ``ā = [a, 1]`` and ``g = ∂ℓ/∂z``. The
    curvature block is approximated by ``A ⊗ G`` with ``A = E[ā āᵀ]`` and ``G = E[g gᵀ]``, both
    mask-weighted means over the batch (every example counts in ``A``, also one whose ``g`` is 0:
    ReLU units all off after the layer, a saturated output). With the eigenbases
    ``A = Q_A Λ_A Q_Aᵀ``, ``G = Q_G Λ_G Q_Gᵀ``, ``x = Q_A [(Q_Aᵀ V Q_G) / (Λ + λ)] Q_Gᵀ`` where
    ``Λ = Λ_A ⊗ Λ_G`` (K-FAC) or, for EK-FAC, ``Λ_jc = E[(Q_Aᵀ Ĝ Q_G)²_jc]`` refitted in the
    eigenbasis. Leaves outside dense pairs (convolution kernels, norms) get a diagonal block.

    Activations: with ``problem.model``, each selected ``nn.Dense``'s input ``a`` is recorded
    during one forward pass (:func:`flax.linen.intercept_methods`; the layer at module path
    ``"dense_1"`` for the leaves ``"dense_1/kernel"``, ``"dense_1/bias"``); the product ``ā gᵀ``
    is checked against the per-example gradients (a mismatch above 1e-3 raises: the model is
    not the one ``loss_fn`` applies). A layer applied more than once per forward pass raises.
    Without a model (``fisher="empirical"`` only), or for a kernel/bias pair the forward pass
    does not enter through ``nn.Dense``, ``ā`` is read off the per-example gradient as
    ``Ĝ g / ‖g‖²``: an example with ``g = 0`` cannot be read out and is left out of ``A``
    (``flags["activation_readout"]`` lists such layers, ``flags["examples_without_activation_readout"]``
    counts the examples, and a warning is issued). Pass ``model=`` to the problem for the
    textbook ``A``.

    ``fisher="true"`` averages over labels drawn from the model, exactly: each example's
    gradient for every class weighted by ``p(c | x)`` (needs the model; equals the
    Gauss-Newton matrix's expectation). ``fisher="empirical"`` uses the true labels.

    A parameter-only term ``R(θ)`` in ``loss_fn`` (weight decay through
    ``make_loss_fn(model, regularizer=...)``) adds ``∇R`` to every per-example gradient; it is
    found by evaluating ``loss_fn`` with every mask weight 0 and removed from the per-example
    gradients before the factors are formed. With ``curvature="hessian"`` its curvature must be
    ``c·I`` (L2 weight decay: ``c`` its coefficient), and ``c`` is added to the damping of the
    inverse (``flags["parameter_term_curvature"]``); a non-isotropic one raises. With
    ``gauss_newton`` (which covers the cross-entropy only) ``c`` is 0; with the
    ``empirical_fisher`` curvature such a term raises.

    Raises (in ``prepare``): ``fisher="true"`` without a model, a batch with ``Σ mask = 0``, the
    cases above.
    """
    if fisher not in ("true", "empirical"):
        raise PrivDebiasError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
    name = "ekfac" if eigen_corrected else "kfac"
    residual_tol = _check_residual_tol(name, residual_tol)

    def prepare(problem: CurvatureProblem):
        t0 = time.perf_counter()
        layers, others = _dense_layers(problem.selected)
        layout = _layout(problem.selected)
        batch = problem.batch
        n = int(batch.y.shape[0])
        mask = np.asarray(batch.mask, np.float64)
        total = float(mask.sum())
        if not total > 0:
            raise PrivDebiasError(f"{name}: the problem's batch has no example with mask weight > 0")
        if fisher == "true" and problem.model is None:
            raise PrivDebiasError(f"{name} with fisher='true' needs the model (or use fisher='empirical')")
        term_grad, term_curvature = _parameter_term(problem, name)
        activations: dict[str, np.ndarray] = {}
        if problem.model is not None and (layers or fisher == "true"):
            logits, activations = _dense_layer_inputs(problem, layers)
        if fisher == "true":
            probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
            label_sets = [(np.full(n, c, np.int32), probs[:, c]) for c in range(probs.shape[1])]
        else:
            label_sets = [(np.asarray(batch.y), np.ones(n))]
        readout = [p for p in layers if p not in activations]
        live = mask > 0

        abar_best = {p: np.zeros((n, int(np.shape(problem.selected[f"{p}/kernel"])[0]) + 1)) for p in readout}
        gn_best = {p: np.zeros(n) for p in readout}
        g_acc = {p: 0.0 for p in layers}
        mismatch = {p: [0.0, 0.0] for p in activations}  # ‖Ĝ − ā gᵀ‖², ‖Ĝ‖²
        diag_acc = {k: 0.0 for k in others}

        def layer_grads(g: np.ndarray, p: str) -> tuple[np.ndarray, np.ndarray]:
            ko, kshape = layout[f"{p}/kernel"]
            bo, bshape = layout[f"{p}/bias"]
            gk = g[:, ko : ko + int(np.prod(kshape))].reshape(-1, *kshape)
            gb = g[:, bo : bo + bshape[0]]
            return np.concatenate([gk, gb[:, None, :]], axis=1), gb  # (B, in+1, out) = ā gᵀ, and g

        def example_grads(data):
            """Per-example gradients of the data term, unweighted (a row of mask 0 is 0)."""
            for rows, g in iterate_per_example_grads(problem, data, chunk_size):
                g = np.asarray(g, np.float64)
                m = mask[rows]
                g = g / np.where(m > 0, m, 1.0)[:, None]  # iterate_per_example_grads weights rows by the mask
                if term_grad is not None:
                    g = g - np.where(m > 0, 1.0, 0.0)[:, None] * term_grad[None, :]
                yield rows, g

        passes = []
        for labels, weight in label_sets:
            data = batch._replace(y=jnp.asarray(labels))
            passes.append((data, weight * mask / total))
            for rows, g in example_grads(data):
                w = passes[-1][1][rows]
                for p in layers:
                    full, gb = layer_grads(g, p)
                    g_acc[p] = g_acc[p] + np.einsum("b,bi,bj->ij", w, gb, gb)
                    if p in activations:
                        a = activations[p][rows]
                        abar = np.concatenate([a, np.ones((len(a), 1))], axis=1)
                        diff = full - abar[:, :, None] * gb[:, None, :]
                        on = live[rows]
                        mismatch[p][0] += float(np.sum(diff[on] ** 2))
                        mismatch[p][1] += float(np.sum(full[on] ** 2))
                        continue
                    gn2 = np.sum(gb * gb, axis=1)
                    # ā = Ĝ g / ‖g‖² is the same for every label: keep the best-conditioned read-out.
                    better = gn2 > np.maximum(gn_best[p][rows], 1e-20)
                    abar = np.einsum("bio,bo->bi", full, gb) / np.where(gn2 > 0, gn2, 1.0)[:, None]
                    abar_best[p][rows] = np.where(better[:, None], abar, abar_best[p][rows])
                    gn_best[p][rows] = np.where(better, gn2, gn_best[p][rows])
                for k in others:
                    o, shape = layout[k]
                    seg = g[:, o : o + int(np.prod(shape))]
                    diag_acc[k] = diag_acc[k] + np.einsum("b,bi->i", w, seg * seg)
        for p, (num, den) in mismatch.items():
            rel_err = float(np.sqrt(num / den)) if den > 0 else 0.0
            if rel_err > 1e-3:
                raise PrivDebiasError(
                    f"{name}: the inputs recorded at dense layer {p!r} times its output gradients differ from its "
                    f"per-example gradients by {rel_err:.3g} (relative): problem.model is not the model loss_fn "
                    "applies, or the layer's output reaches the loss other than through one application"
                )
        blocks, no_readout = {}, {}
        for p in layers:
            if p in activations:
                a = activations[p]
                abar = np.concatenate([a, np.ones((n, 1))], axis=1)
                wa = mask / total
            else:
                ok = gn_best[p] > 1e-20
                no_readout[p] = int(np.sum((~ok) & live))
                abar = abar_best[p]
                wa = mask * ok / max(float(np.sum(mask * ok)), 1e-30)
            a_mat = np.einsum("b,bi,bj->ij", wa, abar, abar)
            la, qa = np.linalg.eigh(a_mat)
            lg, qg = np.linalg.eigh(g_acc[p])
            la, lg = np.maximum(la, 0.0), np.maximum(lg, 0.0)
            blocks[p] = [qa, qg, np.outer(la, lg)]
        if any(no_readout.values()):
            warnings.warn(
                f"{name}: {sum(no_readout.values())} example(s) have a zero output gradient at dense layer(s) "
                f"{sorted(p for p, c in no_readout.items() if c)} and cannot have their activations read off the "
                "gradient; they are left out of the factor A (pass model= to the problem for the textbook A)",
                stacklevel=2,
            )
        if eigen_corrected and layers:
            refit = {p: 0.0 for p in layers}
            for data, w_all in passes:  # second pass: Λ_jc = E[(Q_Aᵀ Ĝ Q_G)²_jc]
                for rows, g in example_grads(data):
                    for p in layers:
                        full, _ = layer_grads(g, p)
                        qa, qg, _ = blocks[p]
                        rot = np.matmul(np.matmul(qa.T, full), qg)  # Q_Aᵀ Ĝ Q_G per example
                        refit[p] = refit[p] + np.einsum("b,bil->il", w_all[rows], rot * rot, optimize=True)
            for p in layers:
                blocks[p][2] = refit[p]
        blocks = {p: tuple(jnp.asarray(m, jnp.float32) for m in b) for p, b in blocks.items()}
        diags = {k: jnp.asarray(diag_acc[k], jnp.float32) for k in others}
        flags: dict[str, Any] = {"dense_layers": layers, "diagonal_leaves": others}
        if readout:
            flags["activation_readout"] = readout
            flags["examples_without_activation_readout"] = no_readout
        if term_grad is not None:
            flags["parameter_term_curvature"] = term_curvature
            flags["parameter_term_gradient_norm"] = float(np.linalg.norm(term_grad))
        return {"problem": problem, "blocks": blocks, "diags": diags, "layout": layout, "layers": layers,
                "others": others, "no_readout": no_readout, "parameter_term_curvature": term_curvature,
                "flags": flags, "seconds": time.perf_counter() - t0}

    def solve(state, v):
        t0 = time.perf_counter()
        problem = state["problem"]
        vf = _check_rhs(problem, v)
        lam_d = problem.damping + state["parameter_term_curvature"]
        out = _kfac_apply(state["blocks"], state["diags"], tuple(state["layers"]), tuple(state["others"]), lam_d, v)
        flags = dict(state["flags"])
        if lam_d <= 0:
            flags["undamped"] = True
        return _finish(name, problem, vf, ravel_pytree(out)[0], 1, t0, True, flags, residual_tol)

    return InverseHVPSolver(name, prepare, solve)


def _kfac_apply(blocks: dict, diags: dict, layers: tuple, others: tuple, damping: Any, v: Tree) -> dict:
    """``(A ⊗ G + λI)⁻¹ v`` per dense layer in the Kronecker eigenbasis,
    ``Q_A [(Q_Aᵀ V Q_G) / (Λ + λ)] Q_Gᵀ`` with ``V = [W; b]``, and ``v / (d + λ)`` for the
    diagonal leaves: the K-FAC / EK-FAC inverse, a pure function (jittable)."""
    out = {}
    for p in layers:
        qa, qg, lam = blocks[p]
        full = jnp.concatenate([v[f"{p}/kernel"], v[f"{p}/bias"][None, :]], axis=0)
        rot = qa.T @ full @ qg
        sol = qa @ (rot / (lam + damping)) @ qg.T
        out[f"{p}/kernel"] = sol[:-1]
        out[f"{p}/bias"] = sol[-1]
    for k in others:
        out[k] = v[k] / (diags[k].reshape(np.shape(v[k])) + damping)
    return out


def pcg(preconditioner: str = "kfac", tol: float = 1e-6, maxiter: int = 200, fisher: str = "true",
        chunk_size: int = 256, residual_tol: float = 1e-3) -> InverseHVPSolver:
    """Conjugate gradient on ``H_λ x = v`` preconditioned by K-FAC or EK-FAC (``preconditioner``).

    ``prepare`` fits the Kronecker factors once (:func:`kronecker_factored`); each CG iteration
    then costs one HVP and one application of ``M⁻¹ = (A ⊗ G + λI)⁻¹`` (two small matrix
    products per dense layer). The solution is CG's (same stopping rule ``‖r‖ ≤ tol ‖v‖``, the
    exact ``H_λ`` being solved): the preconditioner only changes how fast it gets there, which
    on the ill-conditioned heads of FMD is most of the cost (Martens 2010 uses a diagonal
    preconditioner for Hessian-free optimisation; K-FAC's inverse is the block-structured one).
    The preconditioner's damping is ``λ`` plus the curvature ``c`` of an isotropic
    parameter-only term of the loss (see :func:`kronecker_factored`).
    """
    if preconditioner not in ("kfac", "ekfac"):
        raise PrivDebiasError(f"pcg preconditioner must be 'kfac' or 'ekfac', got {preconditioner!r}")
    inner = kronecker_factored(preconditioner == "ekfac", fisher, chunk_size, residual_tol)
    return _cg_solver("pcg", tol, maxiter, inner.prepare, preconditioner, residual_tol)


def kfac(fisher: str = "true", chunk_size: int = 256, residual_tol: float = 1e-3) -> InverseHVPSolver:
    """K-FAC: :func:`kronecker_factored` without eigenvalue correction."""
    return kronecker_factored(False, fisher, chunk_size, residual_tol)


def ekfac(fisher: str = "true", chunk_size: int = 256, residual_tol: float = 1e-3) -> InverseHVPSolver:
    """EK-FAC: :func:`kronecker_factored` with the eigenvalues refitted in the Kronecker eigenbasis."""
    return kronecker_factored(True, fisher, chunk_size, residual_tol)


SOLVERS: dict[str, Callable[..., InverseHVPSolver]] = {
    "exact": exact,
    "linear_head": linear_head,
    "cg": cg,
    "pcg": pcg,
    "lissa": lissa,
    "arnoldi": arnoldi,
    "kfac": kfac,
    "ekfac": ekfac,
}


def make_solver(name: str, **options: Any) -> InverseHVPSolver:
    """The solver called ``name`` (see :data:`SOLVERS`) with its options.

    Raises:
      PrivDebiasError: unknown name or option.
    """
    if name not in SOLVERS:
        raise PrivDebiasError(f"unknown inverse-HVP solver {name!r}; known: {', '.join(SOLVERS)}")
    try:
        return SOLVERS[name](**options)
    except TypeError as err:
        raise PrivDebiasError(f"bad options for solver {name!r}: {err}") from err


def as_solver(solver: str | InverseHVPSolver, options: dict | None = None) -> InverseHVPSolver:
    """``solver`` itself, or :func:`make_solver` of a name with ``options``."""
    return make_solver(solver, **(options or {})) if isinstance(solver, str) else solver


def inverse_hvp(problem: CurvatureProblem, v: Tree, solver: str | InverseHVPSolver = "cg", **options: Any) -> tuple[Tree, Diagnostics]:
    """One-shot ``H_λ⁻¹ v``: ``make_solver(solver, **options)``, ``prepare``, ``solve``."""
    s = as_solver(solver, options)
    return s.solve(s.prepare(problem), v)


__all__ = [
    "Diagnostics",
    "InverseHVPSolver",
    "SOLVERS",
    "make_solver",
    "as_solver",
    "inverse_hvp",
    "dense_curvature",
    "check_dense_fits",
    "linear_head_hessian",
    "exact",
    "linear_head",
    "cg",
    "pcg",
    "lissa",
    "arnoldi",
    "kfac",
    "ekfac",
    "kronecker_factored",
]
