"""Debiasing methods (EnD, LearnedMixin, RUBi, ReBias): each term against a hand computation in
NumPy on a tiny batch, a one-step smoke test of every method, bad input, the CLI, the study and
the CelebA config at tiny sizes."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from privdebias_jax.data import Batch, Dataset, make_dataset, stack_batches
from privdebias_jax.debias import (
    METHODS,
    BiasBranchNet,
    end_disentangle,
    end_entangle,
    hsic_unbiased,
    learned_mixin_loss,
    main_train_state,
    make_end_regularizer,
    rbf_hsic,
    rubi_loss,
    setup_method,
)
from privdebias_jax.debias.branch import bias_branch_outputs, mixin_gate
from privdebias_jax.debias.rebias import make_rebias_regularizer, median_bandwidth
from privdebias_jax.debias.study import principal_component_fits, seed_summary
from privdebias_jax.models import create_model
from privdebias_jax.train import apply_model, create_train_state, make_optimizer, make_train_step
from privdebias_jax.types import PrivDebiasError

# tensorflow_datasets leaves temp folders behind on mock data: keep them in tmp_path
pytestmark = pytest.mark.usefixtures("contained_tempdir")

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
# a 6-sample batch, the last sample padding: targets, bias labels, mask, signed features
T = np.array([0, 0, 1, 1, 0, 1])
B = np.array([0, 1, 0, 0, 1, 2])
M = np.array([1, 1, 1, 1, 1, 0], np.float32)
H = RNG.normal(size=(6, 5)).astype(np.float32)


def _unit(h, center=False, m=M):
    h = h.astype(np.float64)
    if center:
        h = h - (h * m[:, None]).sum(0) / m.sum()
    return h / np.linalg.norm(h, axis=1, keepdims=True)


@pytest.mark.parametrize("center", [False, True])
def test_end_terms_match_hand_computation(center):
    d = _unit(H, center)
    g = np.clip(d @ d.T, -1, 1)
    real = [i for i in range(6) if M[i]]
    # R⊥: per bias class, |sum of G over its pairs|, over the total pair count
    per_class, count = {}, 0
    for i, j in itertools.combinations(real, 2):
        if B[i] == B[j]:
            per_class[B[i]] = per_class.get(B[i], 0.0) + g[i, j]
            count += 1
    r_perp = sum(abs(v) for v in per_class.values()) / count
    # R∥: pairs with the same target and different bias
    sims = [(1 + g[i, j]) / 2 for i, j in itertools.combinations(real, 2) if T[i] == T[j] and B[i] != B[j]]
    r_par = 1 - np.mean(sims)
    got_perp = end_disentangle(jnp.asarray(H), jnp.asarray(B), jnp.asarray(M), 3, center)
    got_par = end_entangle(jnp.asarray(H), jnp.asarray(T), jnp.asarray(B), jnp.asarray(M), center)
    np.testing.assert_allclose(float(got_perp), r_perp, rtol=1e-5)
    np.testing.assert_allclose(float(got_par), r_par, rtol=1e-5)
    reg = make_end_regularizer(3, alpha=0.3, beta=0.7, center=center)
    batch = Batch(x=None, y=jnp.asarray(T), a=jnp.asarray(B), idx=None, mask=jnp.asarray(M))
    np.testing.assert_allclose(float(reg(None, batch, None, jnp.asarray(H))), 0.3 * r_perp + 0.7 * r_par, rtol=1e-5)


def test_end_terms_are_zero_without_pairs_and_with_dead_features():
    # all bias labels distinct and all targets distinct: no pair for either term
    y, b, m = jnp.arange(4), jnp.arange(4), jnp.ones(4)
    h = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
    assert float(end_disentangle(h, b, m, 4)) == 0.0
    assert float(end_entangle(h, y, b, m)) == 0.0
    # all-zero (dead ReLU) features: finite value and gradient
    grad = jax.jit(jax.grad(lambda f: end_disentangle(f, jnp.zeros(4, int), m, 2)))(jnp.zeros((4, 3)))
    assert np.all(np.isfinite(np.asarray(grad)))


def _np_ce(logits, y, m):
    logits = logits.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ce = lse - logits[np.arange(len(y)), y]
    return float((ce * m).sum() / m.sum())


def _log_softmax(z):
    z = z.astype(np.float64)
    return z - (np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) + z.max(1, keepdims=True))


def test_rubi_and_learned_mixin_losses_match_hand_computation():
    f = RNG.normal(size=(6, 4)).astype(np.float32)
    g = RNG.normal(size=(6, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 1, 0])
    sig = 1 / (1 + np.exp(-g.astype(np.float64)))
    expected_rubi = _np_ce(f * sig, y, M) + _np_ce(g, y, M)
    np.testing.assert_allclose(float(rubi_loss(f, g, y, M)), expected_rubi, rtol=1e-5)
    gate = np.abs(RNG.normal(size=(6, 1))).astype(np.float32)
    mixed = _log_softmax(f) + gate * _log_softmax(g)
    expected_mixin = _np_ce(mixed, y, M) + _np_ce(g, y, M)
    np.testing.assert_allclose(float(learned_mixin_loss(f, g, gate, y, M)), expected_mixin, rtol=1e-5)


def _tiny_branch(combine):
    main = create_model("mlp", 4, hidden=(8,))
    bias = create_model("small_cnn", 4, widths=(3, 5), kernel_size=1, strides=(1, 2))
    return BiasBranchNet(main=main, bias=bias, combine=combine)


@pytest.mark.parametrize("combine", ["rubi", "learned_mixin"])
def test_branch_training_logits_and_main_only_prediction(combine):
    model = _tiny_branch(combine)
    x = jnp.asarray(RNG.uniform(size=(6, 4, 4, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    f, h = model.main.apply({"params": params["main"]}, x)
    g, _ = bias_branch_outputs(model, params, x)
    g_direct, _ = model.bias.apply({"params": params["bias"]}, x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_direct), rtol=1e-6)
    train_logits, train_feats = model.apply({"params": params}, x, train=True)
    f, g, h = (np.asarray(v, np.float64) for v in (f, g, h))
    if combine == "rubi":
        expected = f * (1 / (1 + np.exp(-g)))
    else:
        k, b0 = np.asarray(params["mixin"]["kernel"]), np.asarray(params["mixin"]["bias"])
        gate = np.log1p(np.exp(h @ k + b0))
        np.testing.assert_allclose(np.asarray(mixin_gate(params, jnp.asarray(h, jnp.float32))), gate, rtol=1e-5)
        expected = _log_softmax(f) + gate * _log_softmax(g)
    np.testing.assert_allclose(np.asarray(train_logits), expected, rtol=1e-4, atol=1e-5)
    eval_logits, eval_feats = model.apply({"params": params}, x, train=False)
    np.testing.assert_allclose(np.asarray(eval_logits), f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(eval_feats), h, rtol=1e-5, atol=1e-6)


def _hsic_by_definition(k, lm):
    """Song et al.'s U-statistic, summing over distinct index tuples."""
    n = k.shape[0]
    idx = range(n)
    t1 = np.mean([k[i, j] * lm[i, j] for i, j in itertools.permutations(idx, 2)])
    t2 = np.mean([k[i, j] * lm[q, r] for i, j, q, r in itertools.permutations(idx, 4)])
    t3 = np.mean([k[i, j] * lm[i, q] for i, j, q in itertools.permutations(idx, 3)])
    return t1 + t2 - 2 * t3


def test_hsic_matches_the_u_statistic_definition_and_masks_padding():
    x = RNG.normal(size=(6, 3))
    y = x[:, :2] + 0.3 * RNG.normal(size=(6, 2))
    sx, sy = 1.3, 0.8
    d2 = lambda a: ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)  # noqa: E731
    k, l = np.exp(-d2(x) / (2 * sx**2)), np.exp(-d2(y) / (2 * sy**2))  # noqa: E741
    np.testing.assert_allclose(float(hsic_unbiased(jnp.asarray(k), jnp.asarray(l))), _hsic_by_definition(k, l), rtol=1e-4)
    got = rbf_hsic(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), sigma_x=sx, sigma_y=sy)
    np.testing.assert_allclose(float(got), _hsic_by_definition(k, l), rtol=1e-4)
    # padding row 5 is ignored: equal to the definition on the first 5 samples
    got_masked = rbf_hsic(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), jnp.asarray(M), sx, sy)
    np.testing.assert_allclose(float(got_masked), _hsic_by_definition(k[:5, :5], l[:5, :5]), rtol=1e-4)
    # the median heuristic: the median of the distances between distinct real samples
    dist = np.sqrt(d2(x[:5]))[np.triu_indices(5, 1)]
    np.testing.assert_allclose(float(median_bandwidth(jnp.asarray(x, jnp.float32), jnp.asarray(M))), np.median(dist), rtol=1e-5)


def test_rebias_regularizer_value_and_min_max_gradients():
    model = _tiny_branch("none")
    x = jnp.asarray(RNG.uniform(size=(6, 4, 4, 3)), jnp.float32)
    y = jnp.asarray([0, 1, 2, 3, 1, 0])
    params = model.init(jax.random.key(1), x)["params"]
    batch = Batch(x=x, y=y, a=y, idx=jnp.arange(6), mask=jnp.asarray(M))
    _, h = model.apply({"params": params}, x)
    g_logits, g_feats = bias_branch_outputs(model, params, x)
    reg = make_rebias_regularizer(model, lambda_main=0.5, lambda_bias=2.0)
    hs = float(rbf_hsic(h, g_feats, batch.mask))
    expected = _np_ce(np.asarray(g_logits), np.asarray(y), M) + 0.5 * hs - 2.0 * hs
    np.testing.assert_allclose(float(reg(params, batch, None, h)), expected, rtol=1e-5)
    # the main network descends λ_f·HSIC, the bias network ascends λ_g·HSIC
    def total(p):
        _, feats = model.apply({"params": p}, x)
        return reg(p, batch, None, feats)

    def hsic_of(p):
        _, feats = model.apply({"params": p}, x)
        return rbf_hsic(feats, bias_branch_outputs(model, p, x)[1], batch.mask)

    def bias_ce(p):
        return float(_np_ce(np.asarray(bias_branch_outputs(model, p, x)[0]), np.asarray(y), M))

    gr, gh = jax.jit(jax.grad(total))(params), jax.jit(jax.grad(hsic_of))(params)
    np.testing.assert_allclose(np.asarray(gr["main"]["head"]["kernel"]), 0.0, atol=1e-7)  # head is not in HSIC
    np.testing.assert_allclose(
        np.asarray(gr["main"]["dense_0"]["kernel"]), 0.5 * np.asarray(gh["main"]["dense_0"]["kernel"]), rtol=1e-4, atol=1e-7
    )
    ce_grad = jax.jit(jax.grad(lambda p: rubi_like_ce(model, p, x, y)))(params)
    np.testing.assert_allclose(
        np.asarray(gr["bias"]["head"]["kernel"]),
        np.asarray(ce_grad["bias"]["head"]["kernel"]) - 2.0 * np.asarray(gh["bias"]["head"]["kernel"]),
        rtol=1e-4, atol=1e-6,
    )
    assert bias_ce(params) > 0


def rubi_like_ce(model, p, x, y):
    logits, _ = bias_branch_outputs(model, p, x)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y) * M) / M.sum()


@pytest.fixture(scope="module")
def tiny_data():
    rng = np.random.default_rng(3)
    n = 24
    y = rng.integers(0, 4, n)
    a = np.where(rng.uniform(size=n) < 0.8, y, rng.integers(0, 4, n))
    return make_dataset(rng.uniform(size=(n, 6, 6, 3)), y, a, num_classes=4, num_attributes=4)


@pytest.mark.parametrize("name", METHODS)
def test_one_step_of_every_method(name, tiny_data):
    main = create_model("mlp", 4, hidden=(8,))
    setup = setup_method(name, main, 4, 4, (6, 6, 3), train_set=tiny_data,
                         bias_model=create_model("small_cnn", 4, widths=(3,), kernel_size=1, strides=(2,)))
    tx = make_optimizer("adam", 1e-2)
    state = create_train_state(setup.model, tx, jax.random.key(0), (6, 6, 3))
    batch = Batch(*(jnp.asarray(v[0]) for v in stack_batches(tiny_data, 16)))
    step = jax.jit(make_train_step(setup.model, tx, loss=setup.loss, regularizer=setup.regularizer))
    new, metrics = step(state, batch, jax.random.key(1))
    # the step minimises data term + regulariser: recompute both at the old parameters
    logits, feats, _ = apply_model(setup.model, state.params, state.model_state, batch.x, train=True)
    data = float(setup.loss(logits, batch))
    reg = float(setup.regularizer(state.params, batch, logits, feats)) if setup.regularizer else 0.0
    np.testing.assert_allclose(float(metrics.loss_sum) / 16, data, rtol=1e-5)
    np.testing.assert_allclose(float(metrics.reg_sum) / 16, reg, rtol=1e-4, atol=1e-6)
    moved = jax.tree_util.tree_map(lambda p, q: float(jnp.max(jnp.abs(p - q))), new.params, state.params)
    assert max(jax.tree_util.tree_leaves(moved)) > 0
    # the main-network state predicts exactly like the trained module in evaluation mode
    only = main_train_state(setup, new, tx)
    x = jnp.asarray(tiny_data.x)
    lg_main, ft_main = main.apply({"params": only.params}, x)
    lg_full, ft_full = setup.model.apply({"params": new.params}, x)
    np.testing.assert_allclose(lg_main, lg_full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ft_main, ft_full, rtol=1e-5, atol=1e-6)


def test_bad_input_is_named(tiny_data):
    main = create_model("small_cnn", 4, widths=(4,), strides=(1,))
    with pytest.raises(PrivDebiasError, match="unknown debiasing method 'fairness'"):
        setup_method("fairness", main, 4, 4, (6, 6, 3))
    with pytest.raises(PrivDebiasError, match="alpha"):
        setup_method("end", main, 4, 4, (6, 6, 3), alpha=-0.1)
    with pytest.raises(PrivDebiasError, match="beta"):
        setup_method("end", main, 4, 4, (6, 6, 3), beta=-1.0)
    with pytest.raises(PrivDebiasError, match="beta"):
        setup_method("rebias", main, 4, 4, (6, 6, 3), beta=float("nan"))
    with pytest.raises(PrivDebiasError, match="takes no alpha"):
        setup_method("rubi", main, 4, 4, (6, 6, 3), alpha=1.0)
    # a dataset without a bias label (CIFAR-10 style: one attribute value) for EnD
    with pytest.raises(PrivDebiasError, match="needs a bias label"):
        setup_method("end", main, 4, 1, (6, 6, 3), train_set=tiny_data)
    with pytest.raises(PrivDebiasError, match="bias label per training sample"):
        setup_method("end", main, 4, 4, (6, 6, 3), train_set=Dataset(tiny_data.x, tiny_data.y, None, tiny_data.idx))
    with pytest.raises(PrivDebiasError, match="needs images"):
        setup_method("rubi", create_model("mlp", 4, hidden=(4,)), 4, 2, (5,))


def test_seed_summary_and_pc1_fits_by_hand():
    s = seed_summary([0.2, 0.4, 0.3])
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * np.std([0.2, 0.4, 0.3], ddof=1) / np.sqrt(3)
    assert s["mean"] == pytest.approx(0.3) and s["ci_high"] - s["mean"] == pytest.approx(half)
    assert seed_summary([0.5])["ci_low"] is None
    with pytest.raises(PrivDebiasError):
        seed_summary([])
    # two groups separated along one axis: PC1 is that axis, the fits are the group moments
    h = np.concatenate([RNG.normal([-3, 0], [0.5, 0.1], size=(50, 2)), RNG.normal([3, 0], [0.5, 0.1], size=(50, 2))])
    a = np.repeat([0, 1], 50)
    res = principal_component_fits(h, a)
    z = (h[:, 0] - h[:, 0].mean()) * np.sign(1.0)
    z = z / z.std()
    assert res["fits"][0]["mean"] == pytest.approx(z[:50].mean(), rel=1e-3)
    assert res["fits"][1]["std"] == pytest.approx(z[50:].std(), rel=1e-2)
    assert res["separation"] > 10


@pytest.mark.integration
def test_cli_train_with_a_method(tmp_path):
    from privdebias_jax.cli import main
    from privdebias_jax.pipeline import load_model

    out = tmp_path / "end"
    args = ["train", "--dataset", "biased-mnist", "--model", "mlp", "--epochs", "1", "--image-size", "8",
            "--train-size", "200", "--no-progress"]
    assert main([*args, "--method", "end", "--alpha", "0.5", "--beta", "0.2", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "end" and res["method_settings"]["alpha"] == 0.5
    model, state, _ = load_model(out / "model")  # the saved model reloads for the attacks
    assert np.isfinite(res["acc_unbiased"])
    assert main([*args, "--method", "nope", "--out", str(tmp_path / "x")]) == 2
    assert main([*args, "--method", "end", "--alpha", "-1", "--out", str(tmp_path / "y")]) == 2


@pytest.mark.integration
def test_study_script_tiny(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", ROOT / "experiments" / "debias_privacy_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    payload = study.main(["--quick", "--model", "mlp", "--rhos", "0.99", "--methods", "vanilla", "end",
                          "--seeds", "0", "--out", str(tmp_path)])
    for name in ("fig4_private_polar.png", "fig5_private_vs_target.png", "fig8_pc1_gaussians.png",
                 "fig6_reconstruction_vanilla.png", "fig6_reconstruction_end.png", "results.json", "report.md"):
        assert (tmp_path / name).is_file(), name
    rows = [r for r in payload["rows"] if r["method"] == "end"]
    summ = payload["summary"]["end@0.99"]
    assert summ["private_accuracy"]["mean"] == pytest.approx(np.mean([r["private_accuracy"] for r in rows]))
    assert summ["anchor_private"] == 0.146 and all(r["private_ci_low"] <= r["private_accuracy"] for r in rows)
    assert study.get_config().method == "end"


@pytest.mark.integration
def test_celeba_config_on_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import importlib.util

    spec = importlib.util.spec_from_file_location("celeba_privacy", ROOT / "experiments" / "celeba_privacy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    assert (c.target, c.attribute, c.method) == ("Blond_Hair", "Male", "end")
    with tfds.testing.mock_data(num_examples=24):
        payload = mod.main(["--out", str(tmp_path), "--max-train", "24", "--max-test", "24", "--image-size", "8",
                            "--epochs", "1", "--model", "mlp", "--methods", "end"])
    assert [r["method"] for r in payload["rows"]] == ["end"]
    for r in payload["rows"]:
        assert 0.0 <= r["target_accuracy"] <= 1.0 and r["private_ci"][0] <= r["private_accuracy"] <= r["private_ci"][1]
    assert json.loads((tmp_path / "results.json").read_text())["train_size"] == 24
