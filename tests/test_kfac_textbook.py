"""K-FAC and EK-FAC against the textbook factors, computed independently in float64 NumPy.

Martens & Grosse (2015): for a dense layer ``z = a W + b`` the per-example gradient of
``[W; b]`` is ``ā gᵀ`` with ``ā = [a, 1]`` and ``g = ∂ℓ/∂z``; the block is ``A ⊗ G`` with
``A = E[ā āᵀ]`` over every example (mask-weighted) and ``G = E[g gᵀ]`` (true labels for the
empirical Fisher, each class weighted by ``p(c | x)`` for the true Fisher). EK-FAC (George et
al. 2018) keeps the eigenbases and refits ``Λ_jc = E[(Q_Aᵀ Ĝ Q_G)²_jc]``.

The reference runs the MLP's forward and backward passes by hand in NumPy (no JAX), builds
``kron(A, G) + λI`` explicitly and solves it with ``np.linalg.solve``. Rows are chosen so that
every ReLU unit after ``dense_0`` is off for some examples: their ``g`` at ``dense_0`` is 0,
they still count in ``A``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privdebias_jax.data.dataset import Batch
from privdebias_jax.influence import make_problem, make_solver
from privdebias_jax.models import init_model
from privdebias_jax.models.mlp import MLP
from privdebias_jax.train import make_loss_fn
from privdebias_jax.types import PrivDebiasError

D, H0, H1, C = 6, 5, 4, 3
N_LIVE, N_DEAD, N_PAD = 20, 6, 4
LAM = 0.1
WD = 0.03
LAYERS = (("dense_0", None), ("dense_1", "dense_0"), ("head", "dense_1"))


@pytest.fixture(scope="module")
def net():
    model = MLP(C, hidden=(H0, H1))
    params, _ = init_model(model, jax.random.key(3), (D,))
    params = jax.tree_util.tree_map(lambda a: a, params)
    params = {k: dict(v) for k, v in params.items()}
    rng = np.random.default_rng(0)
    # non-zero biases so that no vector is special
    for k in params:
        params[k]["bias"] = jnp.asarray(0.3 * rng.normal(size=params[k]["bias"].shape), jnp.float32)
    w0 = np.asarray(params["dense_0"]["kernel"], np.float64)
    b0 = np.asarray(params["dense_0"]["bias"], np.float64)
    x_live = rng.normal(size=(N_LIVE, D))
    # dead rows: x W0 + b0 = −(1 + |noise|) < 0 for every unit of dense_0 (W0 has rank H0 < D)
    target = -(1.0 + np.abs(rng.normal(size=(N_DEAD, H0)))) - b0
    x_dead = np.linalg.lstsq(w0.T, target.T, rcond=None)[0].T
    x_pad = rng.normal(size=(N_PAD, D))
    x = np.concatenate([x_live, x_dead, x_pad]).astype(np.float32)
    n = len(x)
    y = rng.integers(0, C, n).astype(np.int32)
    mask = np.concatenate([np.ones(N_LIVE + N_DEAD), np.zeros(N_PAD)]).astype(np.float32)
    batch = Batch(x, y, np.zeros(n, np.int32), np.arange(n), mask)
    return model, params, batch


# ------------------------------------------------------------------------------------------
# the float64 NumPy reference
# ------------------------------------------------------------------------------------------


def np_forward(params, x):
    """Inputs of each dense layer and the logits, by hand in float64."""
    p = {k: {kk: np.asarray(vv, np.float64) for kk, vv in v.items()} for k, v in params.items()}
    a0 = np.asarray(x, np.float64)
    z0 = a0 @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]
    a1 = np.maximum(z0, 0.0)
    z1 = a1 @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]
    a2 = np.maximum(z1, 0.0)
    z2 = a2 @ p["head"]["kernel"] + p["head"]["bias"]
    return p, {"dense_0": a0, "dense_1": a1, "head": a2}, (z0, z1), z2


def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_output_grads(p, pre, logits, labels):
    """``g = ∂ℓ/∂z`` of each dense layer for the given labels (backprop by hand)."""
    z0, z1 = pre
    d2 = np_softmax(logits) - np.eye(C)[labels]
    d1 = (d2 @ p["head"]["kernel"].T) * (z1 > 0)
    d0 = (d1 @ p["dense_1"]["kernel"].T) * (z0 > 0)
    return {"dense_0": d0, "dense_1": d1, "head": d2}


def reference_factors(params, batch, fisher, drop_unreadable=False):
    """Per layer ``(A, G, [(weights, ā, g) per label set])`` with mask-weighted means.

    ``drop_unreadable`` reproduces the activation read-out ``ā = Ĝ g / ‖g‖²``: an example whose
    ``g`` is 0 is left out of ``A``."""
    p, acts, pre, logits = np_forward(params, batch.x)
    mask = np.asarray(batch.mask, np.float64)
    n = len(mask)
    if fisher == "true":
        probs = np_softmax(logits)
        sets = [(probs[:, c] * mask / mask.sum(), np.full(n, c)) for c in range(C)]
    else:
        sets = [(mask / mask.sum(), np.asarray(batch.y))]
    grads = [(w, np_output_grads(p, pre, logits, labels)) for w, labels in sets]
    out = {}
    for layer, _ in LAYERS:
        abar = np.concatenate([acts[layer], np.ones((n, 1))], 1)
        wa = mask / mask.sum()
        if drop_unreadable:
            readable = np.zeros(n, bool)
            for _, g in grads:
                readable |= np.linalg.norm(g[layer], axis=1) > 0
            wa = mask * readable / np.sum(mask * readable)
        a_mat = np.einsum("n,ni,nj->ij", wa, abar, abar)
        g_mat = sum(np.einsum("n,ni,nj->ij", w, g[layer], g[layer]) for w, g in grads)
        out[layer] = (a_mat, g_mat, [(w, abar, g[layer]) for w, g in grads])
    return out


def ekfac_eigenvalues(a_mat, g_mat, per_example):
    qa, qg = np.linalg.eigh(a_mat)[1], np.linalg.eigh(g_mat)[1]
    lam = np.zeros((len(a_mat), len(g_mat)))
    for w, abar, g in per_example:
        rot = np.einsum("ji,nj,nk,kl->nil", qa, abar, g, qg, optimize=True)  # Q_Aᵀ (ā gᵀ) Q_G
        lam += np.einsum("n,nil->il", w, rot * rot)
    return qa, qg, lam


def reference_solve(factors, v, lam, eigen_corrected=False):
    """``(A ⊗ G + λI)⁻¹ vec([V_W; v_b])`` per layer, from explicit Kronecker products."""
    out = {}
    for layer, _ in LAYERS:
        a_mat, g_mat, per_example = factors[layer]
        if eigen_corrected:
            qa, qg, ev = ekfac_eigenvalues(a_mat, g_mat, per_example)
            q = np.kron(qa, qg)
            mat = (q * ev.reshape(-1)) @ q.T
        else:
            mat = np.kron(a_mat, g_mat)
        vmat = np.concatenate([v[f"{layer}/kernel"], v[f"{layer}/bias"][None]], 0).astype(np.float64)
        sol = np.linalg.solve(mat + lam * np.eye(len(mat)), vmat.ravel()).reshape(vmat.shape)
        out[f"{layer}/kernel"], out[f"{layer}/bias"] = sol[:-1], sol[-1]
    return out


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def rhs(problem):
    v = np.random.default_rng(7).normal(size=problem.num_params).astype(np.float32)
    tree = problem.unravel(jnp.asarray(v))
    return tree, {k: np.asarray(a) for k, a in tree.items()}


def compare(x_tree, ref, tol=1e-4):
    for k, r in ref.items():
        assert rel(x_tree[k], r) < tol, (k, rel(x_tree[k], r))


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------


def test_fixture_has_examples_with_every_unit_off(net):
    _, params, batch = net
    p, _, (z0, _), logits = np_forward(params, batch.x)
    dead = np.all(z0 <= 0, axis=1)
    assert dead[N_LIVE : N_LIVE + N_DEAD].all() and not dead[:N_LIVE].all()
    g = np_output_grads(p, (z0, _), logits, np.asarray(batch.y))["dense_0"]
    assert np.all(g[dead] == 0)  # these examples' dense_0 gradients are exactly 0


@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("eigen_corrected", [False, True], ids=["kfac", "ekfac"])
def test_solve_equals_explicit_kronecker_inverse(net, fisher, eigen_corrected):
    model, params, batch = net
    prob = make_problem(make_loss_fn(model), params, batch, damping=LAM, model=model)
    solver = make_solver("ekfac" if eigen_corrected else "kfac", fisher=fisher)
    state = solver.prepare(prob)
    v_tree, v = rhs(prob)
    x, diag = solver.solve(state, v_tree)
    ref = reference_solve(reference_factors(params, batch, fisher), v, LAM, eigen_corrected)
    compare(x, ref)
    assert "activation_readout" not in diag.flags
    assert diag.flags["dense_layers"] == ["dense_0", "dense_1", "head"]
    # the factors themselves: Q diag(Λ) Qᵀ of the state equals kron(A, G)
    if not eigen_corrected:
        factors = reference_factors(params, batch, fisher)
        for layer, _ in LAYERS:
            qa, qg, lam = (np.asarray(m, np.float64) for m in state["blocks"][layer])
            q = np.kron(qa, qg)
            mat = (q * lam.reshape(-1)) @ q.T
            want = np.kron(factors[layer][0], factors[layer][1])
            np.testing.assert_allclose(mat, want, atol=1e-5 * np.abs(want).max())


def test_dead_relu_examples_count_in_a(net):
    """Without the model the activations are read off the gradients and the examples with
    ``g = 0`` at ``dense_0`` are left out of ``A`` (flagged, warned); with the model they count."""
    model, params, batch = net
    loss_fn = make_loss_fn(model)
    textbook = reference_factors(params, batch, "empirical")
    readout = reference_factors(params, batch, "empirical", drop_unreadable=True)
    assert rel(readout["dense_0"][0], textbook["dense_0"][0]) > 1e-2  # the read-out A is another matrix

    with_model = make_problem(loss_fn, params, batch, damping=LAM, model=model)
    v_tree, v = rhs(with_model)
    x, diag = make_solver("kfac", fisher="empirical").solve(
        make_solver("kfac", fisher="empirical").prepare(with_model), v_tree)
    ref_textbook = reference_solve(textbook, v, LAM)
    ref_readout = reference_solve(readout, v, LAM)
    assert rel(ref_readout["dense_0/kernel"], ref_textbook["dense_0/kernel"]) > 1e-2
    compare(x, ref_textbook)

    no_model = make_problem(loss_fn, params, batch, damping=LAM)
    solver = make_solver("kfac", fisher="empirical")
    with pytest.warns(UserWarning, match="left out of the factor A"):
        state = solver.prepare(no_model)
    x_ro, diag_ro = solver.solve(state, v_tree)
    compare(x_ro, ref_readout)
    assert rel(x_ro["dense_0/kernel"], ref_textbook["dense_0/kernel"]) > 1e-2
    assert diag_ro.flags["activation_readout"] == ["dense_0", "dense_1", "head"]
    n_dead = int(np.sum(np.linalg.norm(np_output_grads(*[np_forward(params, batch.x)[i] for i in (0, 2, 3)],
                                                        np.asarray(batch.y))["dense_0"], axis=1)[: N_LIVE + N_DEAD] == 0))
    assert n_dead >= N_DEAD
    assert diag_ro.flags["examples_without_activation_readout"]["dense_0"] == n_dead


def weight_decay(params, batch, logits, features):
    return 0.5 * WD * sum(jnp.sum(a * a) for a in jax.tree_util.tree_leaves(params))


def kernel_decay(params, batch, logits, features):
    return 0.5 * WD * sum(jnp.sum(params[k]["kernel"] ** 2) for k in params)


@pytest.mark.parametrize("eigen_corrected", [False, True], ids=["kfac", "ekfac"])
def test_weight_decay_adds_its_coefficient_to_the_damping(net, eigen_corrected):
    model, params, batch = net
    name = "ekfac" if eigen_corrected else "kfac"
    plain = make_problem(make_loss_fn(model), params, batch, damping=LAM, model=model)
    decayed = make_problem(make_loss_fn(model, regularizer=weight_decay), params, batch, damping=LAM, model=model)
    s_plain, s_dec = make_solver(name).prepare(plain), make_solver(name).prepare(decayed)
    for layer, _ in LAYERS:  # the same factors: the regulariser's gradient is taken out
        for got, want in zip(s_dec["blocks"][layer], s_plain["blocks"][layer], strict=True):
            got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
            if got.ndim == 2 and got.shape[0] == got.shape[1] and not np.allclose(got, want, atol=1e-5):
                got = got * np.sign(np.sum(got * want, 0))  # an eigenvector's sign is arbitrary
            np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()))
    v_tree, v = rhs(decayed)
    x, diag = make_solver(name).solve(s_dec, v_tree)
    assert diag.flags["parameter_term_curvature"] == pytest.approx(WD, rel=1e-5)
    compare(x, reference_solve(reference_factors(params, batch, "true"), v, LAM + WD, eigen_corrected))
    # pcg preconditions with the same damping and solves the decayed Hessian (of the head, where
    # it is positive definite) to CG's tolerance
    head = make_problem(make_loss_fn(model, regularizer=weight_decay), params, batch, select=r"^head/",
                        damping=LAM, model=model)
    pcg = make_solver("pcg", preconditioner=name)
    _, d_pcg = pcg.solve(pcg.prepare(head), rhs(head)[0])
    assert d_pcg.converged and d_pcg.residual < 1e-4
    assert d_pcg.flags["parameter_term_curvature"] == pytest.approx(WD, rel=1e-5)


def test_non_isotropic_parameter_term_raises(net):
    model, params, batch = net
    prob = make_problem(make_loss_fn(model, regularizer=kernel_decay), params, batch, damping=LAM, model=model)
    for name in ("kfac", "ekfac"):
        with pytest.raises(PrivDebiasError, match="non-isotropic curvature.*use cg/exact or drop the term"):
            make_solver(name).prepare(prob)
    with pytest.raises(PrivDebiasError, match="non-isotropic"):
        make_solver("pcg").prepare(prob)
    # restricted to the head's kernel and bias, a kernel-only decay is still not c·I
    head = make_problem(make_loss_fn(model, regularizer=kernel_decay), params, batch, select=r"^head/",
                        damping=LAM, model=model)
    with pytest.raises(PrivDebiasError, match="non-isotropic"):
        make_solver("kfac").prepare(head)


def test_gauss_newton_ignores_the_parameter_term_curvature(net):
    """The Gauss-Newton product covers the cross-entropy only: the regulariser's gradient is
    taken out of the per-example gradients and nothing is added to the damping."""
    model, params, batch = net
    prob = make_problem(make_loss_fn(model, regularizer=kernel_decay), params, batch, damping=LAM,
                        curvature="gauss_newton", model=model)
    v_tree, v = rhs(prob)
    solver = make_solver("kfac")
    x, diag = solver.solve(solver.prepare(prob), v_tree)
    assert diag.flags["parameter_term_curvature"] == 0.0
    compare(x, reference_solve(reference_factors(params, batch, "true"), v, LAM))


class TwiceApplied(nn.Module):
    """One dense layer applied twice per forward pass (weight sharing)."""

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        dense = nn.Dense(x.shape[-1], name="dense_0")
        h = nn.relu(dense(nn.relu(dense(x))))
        return nn.Dense(C, name="head")(h), h


def test_dense_layer_applied_twice_raises(net):
    _, _, batch = net
    model = TwiceApplied()
    params, _ = init_model(model, jax.random.key(0), (D,))
    prob = make_problem(make_loss_fn(model), params, batch, damping=LAM, model=model)
    with pytest.raises(PrivDebiasError, match="'dense_0' is applied 2 times"):
        make_solver("kfac").prepare(prob)
    head_only = make_problem(make_loss_fn(model), params, batch, select=r"^head/", damping=LAM, model=model)
    make_solver("kfac").prepare(head_only)  # the head alone is applied once


def test_wrong_model_is_detected(net):
    """A model that is not the one ``loss_fn`` applies gives inputs that do not reproduce the
    per-example gradients."""
    model, params, batch = net
    other = MLP(C, hidden=(H0, H1))
    scaled = {k: dict(v) for k, v in params.items()}
    scaled["dense_0"] = {"kernel": params["dense_0"]["kernel"] * 2.0, "bias": params["dense_0"]["bias"]}

    def loss_fn(p, b, model_state=None):  # the loss of the network with dense_0's kernel doubled
        q = {k: dict(v) for k, v in p.items()}
        q["dense_0"] = {"kernel": p["dense_0"]["kernel"] * 2.0, "bias": p["dense_0"]["bias"]}
        return make_loss_fn(other)(q, b)

    prob = make_problem(loss_fn, params, batch, damping=LAM, model=model)
    with pytest.raises(PrivDebiasError, match="per-example gradients"):
        make_solver("kfac").prepare(prob)
