"""Inverse-HVP solvers with one signature, selected by name.

``solver = make_solver(name, **options)`` returns an :class:`InverseHVPSolver`
``(name, prepare, solve)`` in the style of optax's ``GradientTransformation``:

    state = solver.prepare(problem)          # factorise / estimate once
    x, diagnostics = solver.solve(state, v)  # x ≈ H_λ⁻¹ v, reusable for many v

``problem`` is a :class:`~privdebias_jax.influence.problem.CurvatureProblem`; ``v`` a tree shaped
like its parameter subset. Every solve reports :class:`Diagnostics`: iterations, relative
residual ``‖H_λ x − v‖ / ‖v‖`` measured with one exact product, seconds, and flags.

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
import time
from collections.abc import Callable
from typing import Any, NamedTuple

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
    """What a solve reports. ``residual`` is ``‖H_λ x − v‖ / ‖v‖`` with the exact product."""

    solver: str
    iterations: int
    residual: float
    seconds: float
    converged: bool
    flags: dict[str, Any] = dataclasses.field(default_factory=dict)

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


def _finish(name, problem, v_flat, x_flat, iterations, t0, converged, flags, check_residual=True) -> tuple[Tree, Diagnostics]:
    x = problem.unravel(x_flat)
    finite = bool(jnp.all(jnp.isfinite(x_flat)))
    if check_residual and finite:
        r = problem.ravel(problem.matvec(x)) - v_flat
        residual = float(jnp.linalg.norm(r) / jnp.maximum(jnp.linalg.norm(v_flat), 1e-30))
    else:
        residual = float("nan")
    flags = dict(flags)
    if not finite:
        flags["non_finite"] = True
        converged = False
    return x, Diagnostics(name, int(iterations), residual, time.perf_counter() - t0, bool(converged), flags)


# --------------------------------------------------------------------------------------------
# exact
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _dense_restricted_hessian(loss_fn, selected, frozen, batch, model_state):
    return dense_hessian(lambda s, fr, b, ms: _restricted_loss(loss_fn, s, fr, b, ms), selected, frozen, batch, model_state)


def dense_curvature(problem: CurvatureProblem) -> jax.Array:
    """The undamped curvature matrix ``(P, P)`` of the problem (Hessian or Gauss-Newton)."""
    if problem.curvature == "hessian":
        return _dense_restricted_hessian(problem.loss_fn, problem.selected, problem.frozen, problem.batch,
                                         problem.model_state)
    return matrix_from_products(problem.undamped_matvec, problem.selected)


def exact(method: str = "eigh", allow_indefinite: bool = False) -> InverseHVPSolver:
    """Dense ``H_λ`` of the subset, factored once (``eigh`` or ``cholesky``).

    With ``eigh``, ``x = Q diag(1/(Λ + λ)) Qᵀ v``. A curvature with ``min(Λ) + λ ≤ 0`` (a
    non-convex Hessian) raises unless ``allow_indefinite``, in which case eigenvalues are
    replaced by ``max(|Λ + λ|, λ)`` and ``flags["indefinite"]`` is set.
    """
    if method not in ("eigh", "cholesky"):
        raise PrivDebiasError(f"exact solver method must be 'eigh' or 'cholesky', got {method!r}")

    def prepare(problem: CurvatureProblem):
        t0 = time.perf_counter()
        h = dense_curvature(problem)
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
        return _finish("exact", problem, vf, x, 1, t0, True, state["flags"])

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


def linear_head(head: str = "head") -> InverseHVPSolver:
    """Closed-form inverse for a linear softmax head (the subset must be ``head/kernel`` and
    ``head/bias``), using the model's features: exact when the loss is the mean cross-entropy.

    Raises (in ``prepare``): if the subset is not exactly that pair, or there is no model.
    """

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
        return _finish("linear_head", problem, vf, x, 1, t0, True, {})

    return InverseHVPSolver("linear_head", prepare, solve)


# --------------------------------------------------------------------------------------------
# conjugate gradient
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("loss_fn", "curvature_fn", "maxiter", "reuse", "pre_layers",
                                             "pre_others"))
def _cg_program(loss_fn, curvature_fn, damping, selected, frozen, batch, model_state, b, tol, pre_blocks=None,
                pre_diags=None, *, maxiter: int, reuse: bool = True, pre_layers: tuple | None = None,
                pre_others: tuple = ()):
    """(Preconditioned) conjugate gradient from ``x₀ = 0`` as one compiled ``lax.while_loop``
    (one HVP per iteration).

    With ``pre_layers`` (not None) the residual is preconditioned by the K-FAC inverse
    ``z = (A ⊗ G + λI)⁻¹ r`` of :func:`_kfac_apply` (factors ``pre_blocks``/``pre_diags``):
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
            return ravel_pytree(_kfac_apply(pre_blocks, pre_diags, pre_layers, pre_others, damping, unravel(r)))[0]
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


def cg(tol: float = 1e-6, maxiter: int = 200) -> InverseHVPSolver:
    """Conjugate gradient on ``H_λ x = v`` with one HVP per iteration, from ``x₀ = 0``.

    Stops when ``‖r‖ ≤ tol ‖v‖`` or after ``maxiter`` iterations. A direction with
    ``pᵀ H_λ p ≤ 0`` (negative curvature) stops the run with ``flags["negative_curvature"]``.
    """
    return _cg_solver("cg", tol, maxiter, lambda problem: {"problem": problem})


def _cg_solver(name: str, tol: float, maxiter: int, prepare: Callable[[CurvatureProblem], dict],
               preconditioner: str | None = None) -> InverseHVPSolver:
    """``cg`` and ``pcg`` share this: ``prepare`` gives the state (``pcg``'s holds the K-FAC
    factors, used as the preconditioner when ``preconditioner`` is set), ``solve`` runs
    :func:`_cg_program` and reports its diagnostics."""
    if tol <= 0 or maxiter < 1:
        raise PrivDebiasError(f"{name} needs tol > 0 and maxiter ≥ 1, got tol={tol}, maxiter={maxiter}")

    def solve(state, v):
        t0 = time.perf_counter()
        problem = state["problem"]
        vf = _check_rhs(problem, v)
        pre = {} if preconditioner is None else dict(
            pre_blocks=state["blocks"], pre_diags=state["diags"], pre_layers=tuple(state["layers"]),
            pre_others=tuple(state["others"]))
        x, it, converged, negative = _cg_program(
            problem.loss_fn, problem._curvature_fn(), jnp.asarray(problem.damping, jnp.float32), problem.selected,
            problem.frozen, problem.batch, problem.model_state, vf, jnp.asarray(tol, vf.dtype), maxiter=int(maxiter),
            reuse=problem.reuse_linearization, **pre,
        )
        flags: dict[str, Any] = {} if preconditioner is None else {"preconditioner": preconditioner}
        if bool(negative):
            flags["negative_curvature"] = True
        return _finish(name, problem, vf, x, int(it), t0, bool(converged), flags)

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
        return _finish("lissa", problem, vf, x, depth * repeats, t0, converged, flags)

    return InverseHVPSolver("lissa", prepare, solve)


# --------------------------------------------------------------------------------------------
# Arnoldi
# --------------------------------------------------------------------------------------------


def arnoldi(num_iters: int = 100, top_k: int = 50, key: PRNGKey | int = 0) -> InverseHVPSolver:
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
        return {"problem": problem, "u": u, "inv": jnp.asarray(1.0 / shifted, jnp.float32), "flags": flags,
                "steps": steps, "seconds": time.perf_counter() - t0}

    def solve(state, v):
        t0 = time.perf_counter()
        problem = state["problem"]
        vf = _check_rhs(problem, v)
        u = state["u"]
        x = u @ (state["inv"] * (u.T @ vf))
        return _finish("arnoldi", problem, vf, x, state["steps"], t0, True, state["flags"])

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


def kronecker_factored(eigen_corrected: bool = False, fisher: str = "true", chunk_size: int = 256) -> InverseHVPSolver:
    """K-FAC (Martens & Grosse 2015) or EK-FAC (George et al. 2018) for the dense layers of the subset.

    For a dense layer ``z = a W + b`` applied once per example, the per-example gradient of
    ``[W; b]`` is the rank-one ``ā gᵀ`` with ``ā = [a, 1]`` and ``g = ∂ℓ/∂z`` (the bias
    gradient), so ``ā`` and ``g`` are read off the per-example gradients exactly. The Fisher
    block is approximated by ``A ⊗ G`` with ``A = E[ā āᵀ]``, ``G = E[g gᵀ]``; with the
    eigenbases ``A = Q_A Λ_A Q_Aᵀ``, ``G = Q_G Λ_G Q_Gᵀ``,
    ``x = Q_A [(Q_Aᵀ V Q_G) / (Λ + λ)] Q_Gᵀ`` where ``Λ = Λ_A ⊗ Λ_G`` (K-FAC) or, for EK-FAC,
    ``Λ_jc = E[(Q_Aᵀ Ĝ Q_G)²_jc]`` refitted in the eigenbasis. Leaves outside dense pairs
    (convolution kernels, norms) get a diagonal Fisher block.

    ``fisher="true"`` averages over labels drawn from the model, exactly: each example's
    gradient for every class weighted by ``p(c | x)`` (needs the model; equals the
    Gauss-Newton matrix's expectation). ``fisher="empirical"`` uses the true labels.
    """
    if fisher not in ("true", "empirical"):
        raise PrivDebiasError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
    name = "ekfac" if eigen_corrected else "kfac"

    def prepare(problem: CurvatureProblem):
        t0 = time.perf_counter()
        layers, others = _dense_layers(problem.selected)
        layout = _layout(problem.selected)
        batch = problem.batch
        n = int(batch.y.shape[0])
        mask = np.asarray(batch.mask, np.float64)
        if fisher == "true":
            if problem.model is None:
                raise PrivDebiasError(f"{name} with fisher='true' needs the model (or use fisher='empirical')")
            params = merge_params(problem.selected, problem.frozen)
            logits, _, _ = apply_model(problem.model, params, problem.model_state or {}, batch.x)
            probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
            label_sets = [(np.full(n, c, np.int32), probs[:, c]) for c in range(probs.shape[1])]
        else:
            label_sets = [(np.asarray(batch.y), np.ones(n))]

        total = mask.sum()
        abar_best = {p: None for p in layers}
        gn_best = {p: np.zeros(n) for p in layers}
        g_acc = {p: 0.0 for p in layers}
        diag_acc = {k: 0.0 for k in others}

        def layer_grads(g: np.ndarray, p: str) -> tuple[np.ndarray, np.ndarray]:
            ko, kshape = layout[f"{p}/kernel"]
            bo, bshape = layout[f"{p}/bias"]
            gk = g[:, ko : ko + int(np.prod(kshape))].reshape(-1, *kshape)
            gb = g[:, bo : bo + bshape[0]]
            return np.concatenate([gk, gb[:, None, :]], axis=1), gb  # (B, in+1, out) = ā gᵀ, and g

        passes = []
        for labels, weight in label_sets:
            data = batch._replace(y=jnp.asarray(labels))
            passes.append((data, weight * mask / total))
            for rows, g in iterate_per_example_grads(problem, data, chunk_size):
                g = np.asarray(g, np.float64)
                w = passes[-1][1][rows]
                for p in layers:
                    full, gb = layer_grads(g, p)
                    gn2 = np.sum(gb * gb, axis=1)
                    # ā = Ĝ g / ‖g‖² is the same for every label: keep the best-conditioned read-out.
                    if abar_best[p] is None:
                        abar_best[p] = np.zeros((n, full.shape[1]))
                    better = gn2 > np.maximum(gn_best[p][rows], 1e-20)
                    abar = np.einsum("bio,bo->bi", full, gb) / np.where(gn2 > 0, gn2, 1.0)[:, None]
                    abar_best[p][rows] = np.where(better[:, None], abar, abar_best[p][rows])
                    gn_best[p][rows] = np.where(better, gn2, gn_best[p][rows])
                    g_acc[p] = g_acc[p] + np.einsum("b,bi,bj->ij", w, gb, gb)
                for k in others:
                    o, shape = layout[k]
                    seg = g[:, o : o + int(np.prod(shape))]
                    diag_acc[k] = diag_acc[k] + np.einsum("b,bi->i", w, seg * seg)
        blocks, no_readout = {}, {}
        for p in layers:
            ok = gn_best[p] > 1e-20
            no_readout[p] = int(np.sum((~ok) & (mask > 0)))
            wa = mask * ok / max(float(np.sum(mask * ok)), 1e-30)
            a_mat = np.einsum("b,bi,bj->ij", wa, abar_best[p], abar_best[p])
            la, qa = np.linalg.eigh(a_mat)
            lg, qg = np.linalg.eigh(g_acc[p])
            la, lg = np.maximum(la, 0.0), np.maximum(lg, 0.0)
            blocks[p] = [qa, qg, np.outer(la, lg)]
        if eigen_corrected and layers:
            refit = {p: 0.0 for p in layers}
            for data, w_all in passes:  # second pass: Λ_jc = E[(Q_Aᵀ Ĝ Q_G)²_jc]
                for rows, g in iterate_per_example_grads(problem, data, chunk_size):
                    g = np.asarray(g, np.float64)
                    for p in layers:
                        full, _ = layer_grads(g, p)
                        qa, qg, _ = blocks[p]
                        rot = np.matmul(np.matmul(qa.T, full), qg)  # Q_Aᵀ Ĝ Q_G per example
                        refit[p] = refit[p] + np.einsum("b,bil->il", w_all[rows], rot * rot, optimize=True)
            for p in layers:
                blocks[p][2] = refit[p]
        blocks = {p: tuple(jnp.asarray(m, jnp.float32) for m in b) for p, b in blocks.items()}
        diags = {k: jnp.asarray(diag_acc[k], jnp.float32) for k in others}
        return {"problem": problem, "blocks": blocks, "diags": diags, "layout": layout, "layers": layers,
                "others": others, "no_readout": no_readout, "seconds": time.perf_counter() - t0}

    def solve(state, v):
        t0 = time.perf_counter()
        problem = state["problem"]
        vf = _check_rhs(problem, v)
        lam_d = problem.damping
        out = _kfac_apply(state["blocks"], state["diags"], tuple(state["layers"]), tuple(state["others"]), lam_d, v)
        flags = {"dense_layers": state["layers"], "diagonal_leaves": state["others"],
                 "examples_without_activation_readout": state["no_readout"]}
        if lam_d <= 0:
            flags["undamped"] = True
        return _finish(name, problem, vf, ravel_pytree(out)[0], 1, t0, True, flags)

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
        chunk_size: int = 256) -> InverseHVPSolver:
    """Conjugate gradient on ``H_λ x = v`` preconditioned by K-FAC or EK-FAC (``preconditioner``).

    ``prepare`` fits the Kronecker factors once (:func:`kronecker_factored`); each CG iteration
    then costs one HVP and one application of ``M⁻¹ = (A ⊗ G + λI)⁻¹`` (two small matrix
    products per dense layer). The solution is CG's (same stopping rule ``‖r‖ ≤ tol ‖v‖``, the
    exact ``H_λ`` being solved): the preconditioner only changes how fast it gets there, which
    on the ill-conditioned heads of FMD is most of the cost (Martens 2010 uses a diagonal
    preconditioner for Hessian-free optimisation; K-FAC's inverse is the block-structured one).
    """
    if preconditioner not in ("kfac", "ekfac"):
        raise PrivDebiasError(f"pcg preconditioner must be 'kfac' or 'ekfac', got {preconditioner!r}")
    inner = kronecker_factored(preconditioner == "ekfac", fisher, chunk_size)
    return _cg_solver("pcg", tol, maxiter, inner.prepare, preconditioner)


def kfac(fisher: str = "true", chunk_size: int = 256) -> InverseHVPSolver:
    """K-FAC: :func:`kronecker_factored` without eigenvalue correction."""
    return kronecker_factored(False, fisher, chunk_size)


def ekfac(fisher: str = "true", chunk_size: int = 256) -> InverseHVPSolver:
    """EK-FAC: :func:`kronecker_factored` with the eigenvalues refitted in the Kronecker eigenbasis."""
    return kronecker_factored(True, fisher, chunk_size)


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
