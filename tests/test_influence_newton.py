"""Influence scores and Newton-step unlearning against retraining from scratch.

The reference problem is strongly convex so that "retraining" has one exact answer: the
backbone of a trained MLP is frozen and only the head is trained, on the objective

    L(θ) = (1/n) Σ_i CE(h_i W + b, y_i) + (λ/2) ‖θ_head‖²      (multiclass logistic regression)

written as the library's ``loss_fn(params, batch)`` (so each per-example loss is
``ℓ_i = CE_i + (λ/2)‖θ‖²`` and ``L = mean ℓ_i``, which is what removal re-normalises).
Retraining is an independent NumPy float64 Newton method with backtracking on the same
objective, started from zero and run until ‖∇L‖ < 1e-10: its optimum is the exact minimiser,
whatever method is used to reach it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import pearsonr

from privdebias_jax.data import as_batch, colored_mnist, other_attribute, subset
from privdebias_jax.influence import (
    LAST_LAYER,
    influence_scores,
    make_problem,
    make_solver,
    newton_update,
    objective_gradient,
)
from privdebias_jax.metrics.fairness import counterfactual_bias_from_logits
from privdebias_jax.models import create_model
from privdebias_jax.train import apply_model, create_train_state, fit, make_loss_fn, make_optimizer

L2 = 0.03
HIDDEN, C = 8, 10


# ------------------------------------------------------------------------------------------
# NumPy float64 reference: the regularised linear head and its exact retraining
# ------------------------------------------------------------------------------------------


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def unpack(t):
    """θ in the subset's ravel order: ``head/bias`` (C), then ``head/kernel`` (F×C) row-major."""
    m = t.reshape(HIDDEN + 1, C)
    return m[1:], m[0]


def pack(head) -> np.ndarray:
    """A head (``{"bias", "kernel"}`` or a subset dict ``{"head/bias", "head/kernel"}``) as θ."""
    if "head/bias" in head:
        head = {"bias": head["head/bias"], "kernel": head["head/kernel"]}
    return np.concatenate(
        [np.asarray(head["bias"], np.float64)[None], np.asarray(head["kernel"], np.float64)]
    ).ravel()


def objective(t, feats, y, lam=L2):
    w, b = unpack(t)
    p = softmax(feats @ w + b)
    return float(-np.mean(np.log(p[np.arange(len(y)), y])) + 0.5 * lam * t @ t)


def per_example_grads(t, feats, y, lam=L2):
    """∇ℓ_i = ∇CE_i + λθ: ``[p − e_y, h (p − e_y)ᵀ] + λθ`` per row."""
    w, b = unpack(t)
    r = softmax(feats @ w + b)
    r[np.arange(len(y)), y] -= 1.0
    u = np.concatenate([np.ones((len(y), 1)), feats], axis=1)
    return np.einsum("nf,nc->nfc", u, r).reshape(len(y), -1) + lam * t


def hessian(t, feats, lam=L2):
    w, b = unpack(t)
    p = softmax(feats @ w + b)
    u = np.concatenate([np.ones((len(feats), 1)), feats], axis=1)
    s = p[:, :, None] * np.eye(C)[None] - p[:, :, None] * p[:, None, :]
    h = np.einsum("ni,nj,nab->iajb", u, u, s).reshape(len(t), len(t)) / len(feats)
    return h + lam * np.eye(len(t))


def retrain(feats, y, t0=None, lam=L2):
    """Exact minimiser by Newton's method with Armijo backtracking, from zero by default."""
    t = np.zeros((HIDDEN + 1) * C) if t0 is None else t0.copy()
    for _ in range(100):
        g = per_example_grads(t, feats, y, lam).mean(0)
        if np.linalg.norm(g) < 1e-10:
            return t
        d = np.linalg.solve(hessian(t, feats, lam), g)
        f0, step = objective(t, feats, y, lam), 1.0
        while objective(t - step * d, feats, y, lam) > f0 - 1e-4 * step * g @ d and step > 1e-6:
            step *= 0.5
        t = t - step * d
    raise AssertionError(f"Newton retraining did not converge: ‖∇L‖ = {np.linalg.norm(g):.3g}")


def heldout_loss(t, feats, y):
    return objective(t, feats, y, lam=0.0)


def bias(t, feats, feats_cf):
    """FMD's counterfactual bias mean_i |p(ŷ_i | x_i) − p(ŷ_i | x̄_i)| in NumPy."""
    w, b = unpack(t)
    p, q = softmax(feats @ w + b), softmax(feats_cf @ w + b)
    k = p.argmax(1)
    i = np.arange(len(k))
    return float(np.mean(np.abs(p[i, k] - q[i, k])))


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    splits = colored_mnist(0.95, key=0, image_size=6, train_size=300, test_per_class=10)
    model = create_model("mlp", C, hidden=(HIDDEN,))
    tx = make_optimizer("adam", 1e-2)
    state = create_train_state(model, tx, jax.random.key(0), splits.input_shape)
    params = fit(
        model,
        tx,
        state,
        splits.train,
        epochs=15,
        batch_size=50,
        key=jax.random.key(1),
        progress=False,
    ).state.params
    w0 = np.asarray(params["dense_0"]["kernel"], np.float64)
    b0 = np.asarray(params["dense_0"]["bias"], np.float64)

    def feats(ds):
        return np.maximum(np.asarray(ds.x, np.float64).reshape(len(ds), -1) @ w0 + b0, 0.0)

    train, test = splits.train, splits.test
    test_cf = splits.counterfactual(test, other_attribute(test.a, splits.num_attributes))
    f_tr, y_tr = feats(train), np.asarray(train.y)
    theta = retrain(f_tr, y_tr)  # the optimum of the full training set, from scratch
    w, b = unpack(theta)
    params_star = {
        **params,
        "head": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(b, jnp.float32)},
    }
    ce = make_loss_fn(model)

    def loss_reg(p, batch):
        head = p["head"]
        return ce(p, batch) + 0.5 * L2 * (jnp.sum(head["kernel"] ** 2) + jnp.sum(head["bias"] ** 2))

    problem = make_problem(
        loss_reg, params_star, train, select=LAST_LAYER, damping=0.0, model=model
    )

    def bias_objective(p, xs):
        logits, _, _ = apply_model(model, p, {}, xs[0])
        logits_cf, _, _ = apply_model(model, p, {}, xs[1])
        return counterfactual_bias_from_logits(logits, logits_cf)

    objectives = {
        "test_loss": (
            ce,
            as_batch(test),
            lambda t: heldout_loss(t, feats(test), np.asarray(test.y)),
        ),
        "bias": (
            bias_objective,
            (jnp.asarray(test.x), jnp.asarray(test_cf.x)),
            lambda t: bias(t, feats(test), feats(test_cf)),
        ),
    }
    return {
        "splits": splits,
        "model": model,
        "params": params_star,
        "feats": feats,
        "f_tr": f_tr,
        "y_tr": y_tr,
        "theta": theta,
        "problem": problem,
        "objectives": objectives,
    }


@pytest.fixture(scope="module")
def exact(setup):
    """The exact solver and its factorisation of H (prepared once, reused like FMD does)."""
    solver = make_solver("exact")
    return solver, solver.prepare(setup["problem"])


@pytest.fixture(scope="module")
def scores(setup, exact):
    out = {}
    prob = setup["problem"]
    solver, state = exact
    for name, (fn, batch, _) in setup["objectives"].items():
        out[name] = influence_scores(
            prob,
            objective_gradient(prob, fn, batch),
            setup["splits"].train,
            solver=solver,
            prepared=state,
        )
    return out


def test_reference_is_at_the_optimum(setup, exact):
    """The problem is posed at the retrained optimum (float32 rounding aside) and is convex."""
    prob = setup["problem"]
    g = np.asarray(prob.ravel(prob.gradient()), np.float64)
    assert np.linalg.norm(g) < 1e-5
    h = hessian(setup["theta"], setup["f_tr"])
    x, diag = exact[0].solve(exact[1], prob.unravel(jnp.ones(prob.num_params)))
    np.testing.assert_allclose(
        np.asarray(prob.ravel(x)), np.linalg.solve(h, np.ones(len(h))), rtol=1e-3, atol=1e-5
    )
    assert diag.flags["min_eigenvalue"] > 0.9 * L2


# ------------------------------------------------------------------------------------------
# 7. influence scores vs leave-one-out retraining
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["test_loss", "bias"])
def test_influence_predicts_leave_one_out(name, setup, scores, capsys):
    res = scores[name]
    f_np = setup["objectives"][name][2]
    n = len(setup["y_tr"])
    theta, f_tr, y_tr = setup["theta"], setup["f_tr"], setup["y_tr"]
    f0 = f_np(theta)
    top = np.argsort(-np.abs(res.scores))[:10]
    predicted, actual = [], []
    for j in top:
        keep = np.arange(n) != j
        predicted.append(-res.scores[j] / n)  # Δf ≈ −I(z)/n
        actual.append(f_np(retrain(f_tr[keep], y_tr[keep])) - f0)
    predicted, actual = np.array(predicted), np.array(actual)
    r = pearsonr(predicted, actual)[0]
    slope = float(predicted @ actual / (predicted @ predicted))
    with capsys.disabled():
        print(f"\nLOO {name}: Pearson {r:.4f}, slope actual/predicted {slope:.3f}")
    assert r >= 0.9
    assert np.all(np.sign(predicted) == np.sign(actual))
    assert 0.7 < slope < 1.5  # the scale (1/n, the sign convention) is right, not only the ranking


# ------------------------------------------------------------------------------------------
# 8. Newton-step removal vs retraining, counterfactual replacement
# ------------------------------------------------------------------------------------------


def test_newton_removal_matches_retraining(setup, scores, capsys):
    prob, theta = setup["problem"], setup["theta"]
    f_tr, y_tr, n = setup["f_tr"], setup["y_tr"], len(setup["y_tr"])
    k = 10
    res = scores["test_loss"]
    top = res.top_k(k)  # the samples whose removal lowers the test loss most
    keep = np.ones(n, bool)
    keep[top] = False
    theta_rt = retrain(f_tr[keep], y_tr[keep])
    up = newton_update(prob, subset(setup["splits"].train, top), solver="exact")
    theta_nt = pack(up.params["head"])

    # the Newton step itself, by hand: θ + (1/n) H⁻¹ Σ_k ∇ℓ(z_k)
    h = hessian(theta, f_tr)
    by_hand = theta + np.linalg.solve(h, per_example_grads(theta, f_tr[top], y_tr[top]).sum(0)) / n
    np.testing.assert_allclose(theta_nt, by_hand, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(pack(up.delta), theta_nt - pack(setup["params"]["head"]), atol=1e-6)
    assert up.num_params_updated == (HIDDEN + 1) * C

    # only the head moved; the frozen backbone is bitwise identical
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(
            np.asarray(up.params["dense_0"][leaf]), np.asarray(setup["params"]["dense_0"][leaf])
        )
    assert not np.array_equal(
        np.asarray(up.params["head"]["kernel"]), np.asarray(setup["params"]["head"]["kernel"])
    )

    ratio = np.linalg.norm(theta_nt - theta_rt) / np.linalg.norm(theta - theta_rt)
    f_te = setup["feats"](setup["splits"].test)
    pred = {
        t_name: (f_te @ unpack(t)[0] + unpack(t)[1]).argmax(1)
        for t_name, t in (("newton", theta_nt), ("retrained", theta_rt))
    }
    agreement = float(np.mean(pred["newton"] == pred["retrained"]))
    f_np = setup["objectives"]["test_loss"][2]
    d_newton, d_retrain = f_np(theta_nt) - f_np(theta), f_np(theta_rt) - f_np(theta)
    d_linear = -res.scores[top].sum() / n
    with capsys.disabled():
        print(
            f"\nNewton removal K={k}: ‖θN−θR‖/‖θ0−θR‖ = {ratio:.3f}, agreement {agreement:.3f}, "
            f"Δloss newton {d_newton:.4e} / linear {d_linear:.4e} / retrained {d_retrain:.4e}"
        )
    assert ratio < 0.3
    assert agreement >= 0.99
    assert d_retrain < 0 and d_newton < 0 and d_linear < 0
    assert abs(d_newton - d_retrain) < 0.3 * abs(d_retrain)
    assert abs(d_linear - d_retrain) < 0.3 * abs(d_retrain)


def test_newton_scale_and_prepared_state(setup, exact):
    prob = setup["problem"]
    rows = np.arange(5)
    solver, state = exact
    base = newton_update(prob, subset(setup["splits"].train, rows), solver="exact")
    reused = newton_update(prob, subset(setup["splits"].train, rows), solver=solver, prepared=state)
    np.testing.assert_allclose(pack(reused.delta), pack(base.delta), rtol=1e-6, atol=1e-9)
    scaled = newton_update(
        prob, subset(setup["splits"].train, rows), solver=solver, prepared=state, scale=1.0 / 295
    )
    np.testing.assert_allclose(
        pack(scaled.delta), pack(base.delta) * 300 / 295, rtol=1e-5, atol=1e-9
    )


def test_counterfactual_replacement_by_hand(setup, scores, exact):
    prob, theta, n = setup["problem"], setup["theta"], len(setup["y_tr"])
    splits = setup["splits"]
    rows = scores["bias"].top_k(8)
    original = subset(splits.train, rows)
    cf = splits.counterfactual(original, other_attribute(original.a, splits.num_attributes))
    assert not np.array_equal(cf.x, original.x)
    np.testing.assert_array_equal(cf.idx, original.idx)
    f_o, f_c = setup["feats"](original), setup["feats"](cf)
    g_o = per_example_grads(theta, f_o, np.asarray(original.y)).sum(0)
    g_c = per_example_grads(theta, f_c, np.asarray(cf.y)).sum(0)
    h_inv = np.linalg.inv(hessian(theta, setup["f_tr"]))
    tol = {"rtol": 1e-3, "atol": 1e-6}

    solver, state = exact
    replaced = newton_update(prob, original, add=cf, solver=solver, prepared=state)
    np.testing.assert_allclose(pack(replaced.delta), h_inv @ (g_o - g_c) / n, **tol)
    added = newton_update(prob, None, add=cf, solver=solver, prepared=state)
    np.testing.assert_allclose(pack(added.delta), -h_inv @ g_c / n, **tol)
    removed = newton_update(prob, original, solver=solver, prepared=state)
    np.testing.assert_allclose(
        pack(replaced.delta), pack(removed.delta) + pack(added.delta), rtol=1e-3, atol=1e-6
    )
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(
            np.asarray(replaced.params["dense_0"][leaf]),
            np.asarray(setup["params"]["dense_0"][leaf]),
        )
