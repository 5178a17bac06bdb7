"""The two verdicts of every inverse-HVP solve (:class:`~privdebias_jax.influence.Diagnostics`).

``iteration_converged`` is the solver's own stopping test; ``converged`` adds
``residual ≤ residual_tol`` with the residual ``‖H_λ x − v‖ / ‖v‖`` measured against the
problem's curvature. The residuals are checked against a float64 dense matrix built from
:func:`~privdebias_jax.influence.dense_curvature`, on a 2-hidden-layer ReLU MLP with random
weights and 40 random examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privdebias_jax.data.dataset import Batch
from privdebias_jax.debias import warnings_of
from privdebias_jax.influence import (
    LAST_LAYER,
    SOLVERS,
    Diagnostics,
    dense_curvature,
    make_problem,
    make_solver,
)
from privdebias_jax.models import init_model
from privdebias_jax.models.mlp import MLP
from privdebias_jax.train import make_loss_fn
from privdebias_jax.types import PrivDebiasError

N, D, C = 40, 5, 3


@pytest.fixture(scope="module")
def net():
    model = MLP(C, hidden=(6, 4))
    params, _ = init_model(model, jax.random.key(0), (D,))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = rng.integers(0, C, N).astype(np.int32)
    batch = Batch(x, y, np.zeros(N, np.int32), np.arange(N), np.ones(N, np.float32))
    return model, params, batch, make_loss_fn(model)


def _problem(net, select=None, damping=0.1):
    model, params, batch, loss_fn = net
    return make_problem(loss_fn, params, batch, select=select, damping=damping, model=model)


def _rhs(problem, seed=1):
    v = np.random.default_rng(seed).normal(size=problem.num_params).astype(np.float32)
    return v, problem.unravel(jnp.asarray(v))


def _independent_residual(problem, x, v) -> float:
    h = np.asarray(dense_curvature(problem), np.float64)
    h = 0.5 * (h + h.T) + problem.damping * np.eye(len(h))
    xf = np.asarray(problem.ravel(x), np.float64)
    return float(np.linalg.norm(h @ xf - v) / np.linalg.norm(v))


def test_exact_is_converged_both_ways(net):
    prob = _problem(net, select=LAST_LAYER)
    v, vt = _rhs(prob)
    x, d = make_solver("exact").solve(make_solver("exact").prepare(prob), vt)
    assert d.residual < 1e-4
    assert d.iteration_converged is True and d.converged is True
    assert d.residual_tol == 1e-3
    assert abs(d.residual - _independent_residual(prob, x, v)) < 1e-5
    # the same solve against a tolerance float32 cannot reach: iterated yes, converged no
    strict = make_solver("exact", residual_tol=1e-12)
    _, d2 = strict.solve(strict.prepare(prob), vt)
    assert d2.iteration_converged is True and d2.converged is False and d2.residual_tol == 1e-12
    assert d2.residual > 1e-12
    as_dict = d.as_dict()
    assert as_dict["iteration_converged"] is True and as_dict["converged"] is True
    assert as_dict["residual_tol"] == 1e-3


def test_cg_at_its_iteration_cap_fails_both(net):
    prob = _problem(net, select=LAST_LAYER, damping=1e-4)  # ill-conditioned: κ ≈ λ_max / 1e-4
    h = np.asarray(dense_curvature(prob), np.float64)
    ev = np.linalg.eigvalsh(0.5 * (h + h.T))
    assert (ev[-1] + 1e-4) / (max(ev[0], 0.0) + 1e-4) > 1e3
    v, vt = _rhs(prob)
    solver = make_solver("cg", maxiter=2)
    x, d = solver.solve(solver.prepare(prob), vt)
    assert d.iterations == 2
    assert d.iteration_converged is False and d.converged is False
    assert d.residual > 1e-2
    assert abs(d.residual - _independent_residual(prob, x, v)) < 1e-4 * max(1.0, d.residual)


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
def test_kfac_residual_is_against_the_true_hessian(net, name):
    """K-FAC on a 2-hidden-layer MLP with the Hessian as curvature: the reported residual is
    that of the dense damped Hessian, far above 1e-3, so ``converged`` is false."""
    prob = _problem(net, damping=0.5)
    v, vt = _rhs(prob)
    solver = make_solver(name)
    x, d = solver.solve(solver.prepare(prob), vt)
    ref = _independent_residual(prob, x, v)
    assert abs(d.residual - ref) <= 1e-4 * max(1.0, ref), (d.residual, ref)
    assert d.iteration_converged is True
    assert d.converged == (d.residual <= d.residual_tol)
    assert d.residual > 1e-3 and d.converged is False
    assert d.flags["dense_layers"] == ["dense_0", "dense_1", "head"]


def test_arnoldi_low_rank_iterates_but_does_not_converge(net):
    prob = _problem(net, damping=0.1)
    v, vt = _rhs(prob)
    assert prob.num_params > 50
    solver = make_solver("arnoldi", num_iters=8, top_k=3)
    x, d = solver.solve(solver.prepare(prob), vt)
    assert d.iteration_converged is True
    assert d.converged is False
    assert d.residual > 1e-2
    assert abs(d.residual - _independent_residual(prob, x, v)) < 1e-4 * max(1.0, d.residual)


def test_lissa_divergence_is_not_iteration_convergence(net):
    prob = _problem(net, select=LAST_LAYER, damping=0.1)
    _, vt = _rhs(prob)
    solver = make_solver("lissa", scale=0.01, depth=50, batch_size=None)
    _, d = solver.solve(solver.prepare(prob), vt)
    assert d.flags["diverged"] is True
    assert d.iteration_converged is False and d.converged is False


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_residual_tol_option_of_every_solver(name):
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(PrivDebiasError, match="residual_tol"):
            make_solver(name, residual_tol=bad)
    make_solver(name, residual_tol=1e-2)  # accepted and passed through


def test_residual_tol_is_passed_through(net):
    prob = _problem(net, select=LAST_LAYER)
    _, vt = _rhs(prob)
    for name in ("linear_head", "cg", "pcg", "kfac"):
        solver = make_solver(name, residual_tol=0.5)
        _, d = solver.solve(solver.prepare(prob), vt)
        assert d.residual_tol == 0.5
        assert d.converged == (d.iteration_converged and d.residual <= 0.5)


def test_diagnostics_built_by_hand_keep_their_verdict():
    d = Diagnostics("proximal_newton_cg", 3, 1e-6, 0.1, True, {})
    assert d.iteration_converged is True and d.residual_tol is None
    assert Diagnostics("x", 1, 1.0, 0.0, False).iteration_converged is False


def _report(diag: Diagnostics) -> dict:
    return {"method": "fmd", "biased": True, "solver_diagnostics": diag.as_dict()}


def test_debias_warning_names_the_failed_verdict(net):
    prob = _problem(net, select=LAST_LAYER, damping=1e-4)
    _, vt = _rhs(prob)
    cg = make_solver("cg", maxiter=2)
    _, d_cap = cg.solve(cg.prepare(prob), vt)
    (line,) = warnings_of(_report(d_cap))
    assert "solver cg stopped at its iteration cap" in line and "2 iterations" in line
    kf = make_solver("kfac")
    _, d_res = kf.solve(kf.prepare(prob), vt)
    assert d_res.iteration_converged and not d_res.converged
    (line,) = warnings_of(_report(d_res))
    assert "solver kfac: residual" in line and "against the true curvature above tol 0.001" in line
    ex = make_solver("exact")
    _, d_ok = ex.solve(ex.prepare(_problem(net, select=LAST_LAYER)), vt)
    assert warnings_of(_report(d_ok)) == []
    prox = Diagnostics("proximal_newton_cg", 5, 0.2, 0.0, False, {"hit_cap": True})
    (line,) = warnings_of(_report(prox))
    assert "did not converge" in line and "gradient norm 0.2" in line
