"""benchmarks/fmd_diagnosis.py against independent references.

The float64 curvatures, gradients and Newton solves of the benchmark module are compared with
``jax.hessian`` / ``jax.grad`` of the same losses written directly in JAX (x64), with explicit
per-sample outer products, and with ``scipy.optimize.minimize`` (L-BFGS); ``--quick`` is run once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import fmd_diagnosis as fd  # noqa: E402

pytestmark = pytest.mark.integration


# ---- the same losses, written in JAX (x64) ---------------------------------------------------
# One problem size for every last-layer test, so each jitted reference compiles once.
N, F, C = 60, 3, 3


def _ce(z, y):
    return jnp.mean(jax.nn.logsumexp(z, axis=1) - z[jnp.arange(len(y)), y])


def _head_logits(theta, A):
    f = A.shape[1]
    W = theta.reshape(f + 1, -1)
    return A @ W[:f] + W[f]


def _two_logits(theta, A, f, d, c):
    p1 = (f + 1) * d
    U = theta[:p1].reshape(f + 1, d)
    W = theta[p1:].reshape(d + 1, c)
    return jax.nn.relu(A @ U[:f] + U[f]) @ W[:d] + W[d]


def _head_objective(t, A, y, nu, lam, anchor, lin):
    """mean CE + ν/2‖θ‖² + λ/2‖θ − anchor‖² − linᵀθ."""
    reg = 0.5 * nu * jnp.sum(t**2) + 0.5 * lam * jnp.sum((t - anchor) ** 2) - lin @ t
    return _ce(_head_logits(t, A), y) + reg


_grad = jax.jit(jax.grad(_head_objective))
_hess = jax.jit(jax.hessian(_head_objective))
_value_and_grad = jax.jit(jax.value_and_grad(_head_objective))
_per_sample = jax.jit(
    jax.vmap(
        lambda t, a, y: jax.grad(lambda th: _ce(_head_logits(th, a[None]), y[None]))(t),
        in_axes=(None, 0, 0),
    )
)


def _ref(fn, theta, A, y, nu=0.0, lam=0.0, anchor=None, lin=None):
    """``fn`` (one of the jitted references) in float64, as NumPy."""
    zero = np.zeros(len(theta))
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(v, np.float64)) for v in (theta, A)] + [jnp.asarray(y)]
        extra = [jnp.float64(nu), jnp.float64(lam)]
        extra += [
            jnp.asarray(zero if anchor is None else anchor),
            jnp.asarray(zero if lin is None else lin),
        ]
        out = fn(*args, *extra)
    return jax.tree.map(np.asarray, out)


def _per_sample_grads(theta, A, y):
    with jax.enable_x64(True):
        return np.asarray(_per_sample(jnp.asarray(theta), jnp.asarray(A), jnp.asarray(y)))


def _lbfgs_ref(A, y, theta0, lam=0.0, anchor=None):
    """The proximal optimum by scipy's L-BFGS on the JAX objective."""

    def fun(t):
        v, g = _ref(_value_and_grad, t, A, y, lam=lam, anchor=anchor)
        return float(v), np.asarray(g, np.float64)

    res = scipy.optimize.minimize(
        fun,
        theta0,
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-11, "ftol": 1e-16, "maxiter": 20000, "maxcor": 50},
    )
    return res.x


def _problem(seed):
    rng = np.random.default_rng(seed)
    return rng, rng.standard_normal((N, F)), rng.integers(0, C, N)


# ---- curvatures -------------------------------------------------------------------------------


def test_head_hessian_gradient_and_fisher_match_jax():
    rng, A, y = _problem(0)
    model = fd.LinearHead(F, C)
    theta = rng.standard_normal(model.size)
    obj = fd.Objective(model, A, y)
    H_ref = _ref(_hess, theta, A, y)
    np.testing.assert_allclose(obj.grad(theta), _ref(_grad, theta, A, y), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(obj.dense(theta, "hessian"), H_ref, rtol=1e-10, atol=1e-13)
    # a linear head: Hessian = Gauss-Newton
    np.testing.assert_allclose(obj.dense(theta, "ggn"), H_ref, rtol=1e-10, atol=1e-13)
    # empirical Fisher = mean of per-sample gradient outer products
    G = _per_sample_grads(theta, A, y)
    np.testing.assert_allclose(
        obj.dense(theta, "empirical_fisher"), G.T @ G / N, rtol=1e-10, atol=1e-13
    )
    v = rng.standard_normal(model.size)
    np.testing.assert_allclose(obj.hessp(theta, v), H_ref @ v, rtol=1e-10, atol=1e-13)


def test_two_layer_hessian_and_gauss_newton_match_jax():
    rng = np.random.default_rng(1)
    f, d, c = 4, 5, 3
    A, y = rng.standard_normal((30, f)), rng.integers(0, c, 30)
    model = fd.TwoLayer(f, d, c)
    theta = rng.standard_normal(model.size)
    obj = fd.Objective(model, A, y)
    with jax.enable_x64(True):
        At, yt = jnp.asarray(A), jnp.asarray(y)
        loss = lambda t: _ce(_two_logits(t, At, f, d, c), yt)  # noqa: E731
        H_ref = np.asarray(jax.hessian(loss)(jnp.asarray(theta)))
        J = np.asarray(
            jax.jacfwd(lambda t: _two_logits(t, At, f, d, c))(jnp.asarray(theta))
        )  # (n, C, P)
        p = np.asarray(jax.nn.softmax(_two_logits(jnp.asarray(theta), At, f, d, c), axis=1))
    S = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p]) / len(y)
    G_ref = np.einsum("icp,icd,idq->pq", J, S, J)
    G = obj.dense(theta, "ggn")
    H = obj.add_residual(G.copy(), theta)
    np.testing.assert_allclose(G, G_ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(H, H_ref, rtol=1e-10, atol=1e-13)
    assert np.abs(H - G).max() > 1e-3  # the two differ for two layers
    v = rng.standard_normal(model.size)
    np.testing.assert_allclose(obj.hessp(theta, v), H_ref @ v, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(obj.hessp(theta, v, kind="ggn"), G_ref @ v, rtol=1e-10, atol=1e-13)


def test_bias_gradient_matches_jax():
    rng, A, _ = _problem(2)
    Acf = A + 0.5 * rng.standard_normal(A.shape)
    model = fd.LinearHead(F, C)
    theta = rng.standard_normal(model.size)

    def bias(t):
        z, zc = _head_logits(t, jnp.asarray(A)), _head_logits(t, jnp.asarray(Acf))
        yh = jnp.argmax(z, axis=1)
        ar = jnp.arange(len(A))
        return jnp.mean(jnp.abs(jax.nn.softmax(z, 1)[ar, yh] - jax.nn.softmax(zc, 1)[ar, yh]))

    with jax.enable_x64(True):
        ref = np.asarray(jax.grad(bias)(jnp.asarray(theta)))
        b_ref = float(bias(jnp.asarray(theta)))
    np.testing.assert_allclose(fd.pair_bias_grad(model, theta, A, Acf), ref, rtol=1e-10, atol=1e-14)
    assert fd.pair_bias(model, theta, A, Acf) == pytest.approx(b_ref, rel=1e-12)


# ---- retraining and the one-step ----------------------------------------------------------------


def test_proximal_retraining_is_stationary_and_matches_lbfgs():
    rng, A, y = _problem(3)
    lam = 0.05
    model = fd.LinearHead(F, C)
    theta_hat = rng.standard_normal(model.size)
    A2 = A.copy()
    A2[:6] += 2.0  # the modified training set
    theta, info = fd.newton_minimize(
        fd.Objective(model, A2, y, lam=lam, anchor=theta_hat), theta_hat
    )
    assert info["converged"] and info["grad_norm"] <= 1e-8
    # ∇L'(θ*) + λ(θ* − θ̂) = 0, evaluated by JAX
    assert np.linalg.norm(_ref(_grad, theta, A2, y, lam=lam, anchor=theta_hat)) <= 1e-8
    np.testing.assert_allclose(
        theta, _lbfgs_ref(A2, y, theta_hat, lam=lam, anchor=theta_hat), atol=1e-6
    )


def _g_k(model, theta, A, Acf, y, top):
    E, aux = fd.residuals(model, theta, A, y)
    Ec, auxc = fd.residuals(model, theta, Acf, y)
    n = len(y)
    return fd._set_gradient(model, theta, aux, A, E, top, n) - fd._set_gradient(
        model, theta, auxc, Acf, Ec, top, n
    )


def test_one_step_is_the_first_newton_iterate():
    """At a trained optimum (ridge ν, so ∇[L + ν/2‖θ‖²](θ̂) = 0), the first Newton iterate on the
    proximal objective L'(θ) + ν/2‖θ‖² + λ/2‖θ − θ̂‖² from θ̂ is θ̂ + (C + λI)⁻¹ g_K: with C the
    Hessian of the unmodified loss it is FMD's one-step, with C the Hessian of the modified loss the
    ``hessian_modified`` variant; on the gradient-corrected (PBRF) objective the identity holds at
    any θ̂."""
    rng, A, y = _problem(4)
    nu, lam = 1e-2, 0.1
    model = fd.LinearHead(F, C)
    theta_hat, info = fd.newton_minimize(
        fd.Objective(model, A, y, ridge=nu), np.zeros(model.size), gtol=1e-13
    )
    assert info["grad_norm"] <= 1e-12
    top = np.array([1, 7, 12, 30])
    Acf = A.copy()
    Acf[top] = A[top][:, ::-1] + 1.0
    g_k = _g_k(model, theta_hat, A, Acf, y, top)
    H_train = fd.Objective(model, A, y, ridge=nu).dense(theta_hat)  # includes ν
    one_step = fd.DenseCurvature(H_train, eig=True).solve(lam, g_k)
    obj_mod = fd.Objective(model, Acf, y, lam=lam, anchor=theta_hat, ridge=nu)
    modified, _, neg = fd.conjugate_gradient(
        lambda v: obj_mod.hessp(theta_hat, v), g_k, 1e-13, 10000
    )
    assert not neg
    # references: the gradient and Hessians of the proximal objective at θ̂, by JAX
    grad = _ref(_grad, theta_hat, Acf, y, nu=nu, lam=lam, anchor=theta_hat)
    H_mod = _ref(_hess, theta_hat, Acf, y, nu=nu, lam=lam, anchor=theta_hat)
    H_frozen = _ref(_hess, theta_hat, A, y, nu=nu) + lam * np.eye(model.size)
    np.testing.assert_allclose(-np.linalg.solve(H_frozen, grad), one_step, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(-np.linalg.solve(H_mod, grad), modified, rtol=1e-9, atol=1e-12)
    # PBRF objective L'(θ) − ∇L(θ̂)ᵀθ + λ/2‖θ − θ̂‖² at an arbitrary θ̂ (no ridge): the first Newton
    # iterate with the Hessian of L frozen at θ̂ is the one-step
    th_any = rng.standard_normal(model.size)
    g_train = _ref(_grad, th_any, A, y)
    grad_b = _ref(_grad, th_any, Acf, y, lam=lam, anchor=th_any, lin=g_train)
    H_b = _ref(_hess, th_any, A, y) + lam * np.eye(model.size)
    step_any = fd.DenseCurvature(fd.Objective(model, A, y).dense(th_any), eig=True).solve(
        lam, _g_k(model, th_any, A, Acf, y, top)
    )
    np.testing.assert_allclose(-np.linalg.solve(H_b, grad_b), step_any, rtol=1e-9, atol=1e-12)


def test_run_context_cell_matches_references():
    """One cell of run_context on synthetic features against a re-derivation: influence ranking,
    the one-step, proximal retraining by L-BFGS, the cosine / relative norm / multiplier."""
    rng, A, y = _problem(5)
    k, lam = 6, 0.1
    model = fd.LinearHead(F, C)
    theta = 0.5 * rng.standard_normal(model.size)

    def shift(X):  # the "recolouring"
        return X + np.array([1.5, -1.0, 0.5])

    ctx = {
        "model": model,
        "theta": theta,
        "A_tr": A,
        "y_tr": y,
        "a_tr": rng.integers(0, C, N),
        "A_cf": {"others": shift(A)},
        "a_cf": {"others": rng.integers(0, C, N)},
        "A_ex": rng.standard_normal((20, F)),
        "A_tu": rng.standard_normal((30, F)),
        "y_tu": rng.integers(0, C, 30),
        "A_tb": rng.standard_normal((30, F)),
        "y_tb": rng.integers(0, C, 30),
        "forward_check_max_abs": 0.0,
    }
    ctx["A_ex_cf"], ctx["A_tu_cf"] = shift(ctx["A_ex"]), shift(ctx["A_tu"])
    _, cells = fd.run_context(
        ctx,
        lams=[lam],
        ks=[k],
        all_colour_ks=[],
        curvatures=["hessian"],
        retrains=["proximal"],
        damped_lams=[lam, 1.0],
        plain_maxiter=10,
        log=lambda s: None,
    )
    (cell,) = cells
    # references
    H = _ref(_hess, theta, A, y)
    Hl = H + lam * np.eye(model.size)
    gB = fd.pair_bias_grad(model, theta, ctx["A_ex"], ctx["A_ex_cf"])  # checked against JAX above
    G, Gc = _per_sample_grads(theta, A, y), _per_sample_grads(theta, shift(A), y)
    top = np.argsort(-(-G @ np.linalg.solve(Hl, gB)), kind="stable")[:k]
    step = np.linalg.solve(Hl, (G[top] - Gc[top]).sum(0) / N)
    A2 = A.copy()
    A2[top] = shift(A)[top]
    d = _lbfgs_ref(A2, y, theta, lam=lam, anchor=theta) - theta
    one = cell["one_step"]["hessian"]
    assert one["delta_norm"] == pytest.approx(np.linalg.norm(step), rel=1e-9)
    assert one["vs_proximal"]["cos"] == pytest.approx(
        step @ d / np.linalg.norm(step) / np.linalg.norm(d), abs=1e-6
    )
    assert one["vs_proximal"]["rel_norm"] == pytest.approx(
        np.linalg.norm(step) / np.linalg.norm(d), rel=1e-6
    )
    alpha = float(np.clip(step @ d / (step @ step), 0, 1))
    assert one["vs_proximal"]["alpha_star"] == pytest.approx(alpha, abs=1e-6)
    assert cell["retrain"]["proximal"]["delta_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-6)
    assert cell["selection"]["aligned_fraction"] == pytest.approx(
        float(np.mean(y[top] == ctx["a_tr"][top]))
    )
    # the damped direction at λ' = 1 on the same samples
    step1 = np.linalg.solve(H + np.eye(model.size), (G[top] - Gc[top]).sum(0) / N)
    assert cell["damped"]["lams"] == [lam, 1.0]
    cos1 = step1 @ d / np.linalg.norm(step1) / np.linalg.norm(d)
    assert cell["damped"]["proximal"]["cos"][1] == pytest.approx(cos1, abs=1e-6)


# ---- the quick run ----------------------------------------------------------------------------------


def test_quick_run_writes_the_expected_json(tmp_path):
    out = tmp_path / "diag.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fmd_diagnosis.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {
        "benchmark",
        "command",
        "settings",
        "cuts",
        "runtime_seconds",
        "headline",
        "contexts",
        "summary",
        "cells",
        "machine",
        "timestamp_utc",
    } <= set(res)
    assert (
        res["command"].startswith("python benchmarks/fmd_diagnosis.py")
        and "--quick" in res["command"]
    )
    assert (tmp_path / "diag.png").stat().st_size > 10_000
    assert {(c["training"], c["layers"]) for c in res["contexts"]} == {
        ("saturated", "last"),
        ("short", "last"),
    }
    ver = res["contexts"][0]["verification"]
    assert ver["head_hessian_vs_true_fisher"] < 1e-10 and ver["hessian_vs_product"] < 1e-10
    assert ver["head_hessian_vs_ggn"] == 0.0 and ver["hessian_vs_finite_differences"] < 1e-5
    for cell in res["cells"]:
        assert {
            "K",
            "lam",
            "cf_colours",
            "seed",
            "retrain",
            "one_step",
            "damped",
            "selection",
        } <= set(cell)
        assert (
            cell["retrain"]["proximal"]["converged"]
            and cell["retrain"]["proximal"]["grad_norm"] <= 1e-8
        )
        for curv in ("hessian", "empirical_fisher", "hessian_modified"):
            rec = cell["one_step"][curv]
            assert {"cos", "rel_norm", "alpha_star", "alpha_residual", "alpha_metrics"} <= set(
                rec["vs_proximal"]
            )
            assert set(rec["metrics"]) == {"bias", "acc_unbiased", "acc_biased", "bias_external"}
    assert {h["training"] for h in res["headline"]} == {"saturated", "short"}
    assert len(res["summary"]) == len(res["cells"])  # one seed: one cell per group
