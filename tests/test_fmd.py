"""The influence-based debiasing methods (FMD: Chen et al. 2023; head_retrain;
proximal_finetune) against independent references: dense Hessians in NumPy, scipy minimisation
of the modified objective, hand-made collapses for the guard, and the CLI end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.optimize import minimize

from privdebias_jax.cli import main
from privdebias_jax.data import Dataset, colored_mnist, concat, other_attribute, subset
from privdebias_jax.debias import (
    fmd,
    get_debias_method,
    head_retrain,
    proximal_finetune,
    warnings_of,
)
from privdebias_jax.debias.counterfactual_update import (
    LinearHead,
    counterfactual_bias_value,
    counterfactual_update,
    drop_ids,
    identify_bias,
    split_external,
)
from privdebias_jax.models import create_model
from privdebias_jax.train import create_train_state, fit, make_optimizer, predict
from privdebias_jax.types import PrivDebiasError


@pytest.fixture(scope="module")
def trained():
    splits = colored_mnist(0.95, key=0, image_size=8, train_size=300)
    external, rest = split_external(splits.test_unbiased, 100, key=1)
    model = create_model("mlp", 10, hidden=(16,))
    tx = make_optimizer("adam", 5e-3)
    state = create_train_state(model, tx, jax.random.key(0), splits.input_shape)
    state = fit(model, tx, state, splits.train, epochs=15, batch_size=100, key=jax.random.key(1), progress=False).state
    return splits, external, rest, model, state


def _features(model, state, ds):
    return predict(model, state.params, state.model_state, ds)[1].astype(np.float64)


def _head_loss_np(theta, feats, y, c):
    """Mean cross-entropy of a linear head in NumPy (bias first, then kernel row-major)."""
    b = theta[:c]
    w = theta[c:].reshape(feats.shape[1], c)
    z = feats @ w + b
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    p = np.exp(logp)
    loss = -np.mean(logp[np.arange(len(y)), y])
    g = p.copy()
    g[np.arange(len(y)), y] -= 1.0
    g /= len(y)
    grad = np.concatenate([g.sum(0), (feats.T @ g).reshape(-1)])
    return loss, grad


def _head_hessian_np(theta, feats, c):
    b = theta[:c]
    w = theta[c:].reshape(feats.shape[1], c)
    z = feats @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    u = np.concatenate([np.ones((len(feats), 1)), feats], 1)
    h = np.zeros((u.shape[1] * c, u.shape[1] * c))
    for ui, pi in zip(u, p, strict=True):
        h += np.kron(np.outer(ui, ui), np.diag(pi) - np.outer(pi, pi))
    return h / len(feats)


def test_single_newton_step_matches_dense_numpy(trained):
    splits, external, _, model, state = trained
    k = 40
    res = counterfactual_update(model, state, external, splits.counterfactual, 10, mode="train", train=splits.train, k=k,
                     damping=0.05, solver="exact", newton_iterations=1, step_sizes=(1.0,), min_kept=0.0,
                     max_acc_drop=1.0, key=jax.random.key(3))
    # the counterfactual colours are drawn from the same key split as counterfactual_update does
    k1 = jax.random.split(jax.random.key(3), 2)[1]
    order = np.argsort(-res.influence.scores, kind="stable")[:k]
    # the reported harmful ids are the K most harmful by the returned scores, in that order
    np.testing.assert_array_equal(np.asarray(res.report["harmful_ids"]), np.asarray(splits.train.idx)[order])
    harmful = subset(splits.train, order)
    harmful_cf = splits.counterfactual(harmful, other_attribute(harmful.a, 10, k1))
    theta0 = np.asarray(ravel_pytree({"head/bias": state.params["head"]["bias"],
                                      "head/kernel": state.params["head"]["kernel"]})[0], np.float64)
    f_train = _features(model, state, splits.train)
    h = _head_hessian_np(theta0, f_train, 10) + 0.05 * np.eye(theta0.size)
    g_rm = sum(_head_loss_np(theta0, _features(model, state, subset(harmful, [i])), harmful.y[i:i + 1], 10)[1]
               for i in range(k))
    g_add = sum(_head_loss_np(theta0, _features(model, state, subset(harmful_cf, [i])), harmful_cf.y[i:i + 1], 10)[1]
                for i in range(k))
    expected = theta0 + np.linalg.solve(h, g_rm - g_add) / len(splits.train)
    new = res.state.params["head"]
    got = np.concatenate([np.asarray(new["bias"]), np.asarray(new["kernel"]).reshape(-1)])
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-4)
    # nothing outside the head changed
    for a, b in zip(jax.tree.leaves(state.params["dense_0"]), jax.tree.leaves(res.state.params["dense_0"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert res.report["num_params_updated"] == 17 * 10


def test_feature_space_path_equals_full_model_path(trained):
    splits, external, _, model, state = trained
    kw = dict(mode="train", train=splits.train, k=30, damping=0.1, solver="exact", newton_iterations=5,
              step_sizes=(1.0,), min_kept=0.0, max_acc_drop=1.0, key=jax.random.key(4))
    fast = counterfactual_update(model, state, external, splits.counterfactual, 10, **kw)
    slow = counterfactual_update(model, state, external, splits.counterfactual, 10, feature_cache=False, **kw)
    assert fast.report["feature_space"] and not slow.report["feature_space"]
    np.testing.assert_allclose(np.asarray(fast.state.params["head"]["kernel"]),
                               np.asarray(slow.state.params["head"]["kernel"]), rtol=1e-3, atol=1e-4)
    assert fast.report["harmful_ids"] == slow.report["harmful_ids"]


def test_iterated_newton_converges_to_retraining_the_head(trained):
    """Iterated train mode = the head retrained on the counterfactual-replaced set with the
    proximal term (λ/2)‖θ − θ̂‖² (scipy L-BFGS in float64)."""
    splits, external, _, model, state = trained
    lam = 0.01
    res = counterfactual_update(model, state, external, splits.counterfactual, 10, mode="train", train=splits.train,
                                k=len(splits.train), damping=lam, solver="cg", newton_iterations=60,
                                cg_iterations=60, step_sizes=(1.0,), min_kept=0.0, max_acc_drop=1.0,
                                key=jax.random.key(5))
    k1 = jax.random.split(jax.random.key(5), 2)[1]
    cf = splits.counterfactual(splits.train, other_attribute(splits.train.a, 10, k1))
    feats, y = _features(model, state, cf), np.asarray(cf.y)
    theta0 = np.concatenate([np.asarray(state.params["head"]["bias"]), np.asarray(state.params["head"]["kernel"]).reshape(-1)]).astype(np.float64)

    def objective(theta):
        loss, grad = _head_loss_np(theta, feats, y, 10)
        return loss + 0.5 * lam * np.sum((theta - theta0) ** 2), grad + lam * (theta - theta0)

    opt = minimize(objective, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-10, "ftol": 1e-15})
    new = res.state.params["head"]
    got = np.concatenate([np.asarray(new["bias"]), np.asarray(new["kernel"]).reshape(-1)]).astype(np.float64)
    assert objective(got)[0] == pytest.approx(opt.fun, abs=1e-5)
    assert np.linalg.norm(got - opt.x) <= 2e-3 * np.linalg.norm(opt.x - theta0)
    hist = res.report["newton_history"]
    assert hist[-1]["loss"] <= hist[0]["loss"] and res.report["solver_diagnostics"]["converged"]


def test_fmd_lowers_external_bias_and_only_touches_the_head(trained):
    splits, external, rest, model, state = trained
    res = counterfactual_update(model, state, external, splits.counterfactual, 10, mode="train", train=splits.train,
                     k=len(splits.train), damping=0.01, solver="cg", newton_iterations=10,
                     step_sizes=(0.25, 0.5, 1.0), max_acc_drop=0.05, key=jax.random.key(6))
    assert res.report["bias_external_after"] < res.report["bias_external_before"]
    cf = splits.counterfactual(rest, other_attribute(rest.a, 10, jax.random.key(9)))
    assert counterfactual_bias_value(model, res.state.params, {}, rest, cf) < counterfactual_bias_value(
        model, state.params, {}, rest, cf)
    np.testing.assert_array_equal(np.asarray(state.params["dense_0"]["kernel"]),
                                  np.asarray(res.state.params["dense_0"]["kernel"]))


def test_external_mode_and_identify(trained):
    splits, external, _, model, state = trained
    res = counterfactual_update(model, state, external, splits.counterfactual, 10, mode="external", damping=0.1,
                     solver="linear_head", step_sizes=(0.0, 0.5, 1.0), key=jax.random.key(7))
    assert res.report["mode"] == "external" and res.report["external_size"] == len(external)
    steps = {c["step"]: c["bias_external"] for c in res.report["candidates"]}
    assert steps[0.0] == pytest.approx(res.report["bias_external_before"], abs=1e-6)
    # above the threshold nothing changes
    unchanged = counterfactual_update(model, state, external, splits.counterfactual, 10, delta=1.0)
    assert unchanged.report["updated"] is False and unchanged.state is state
    cf = splits.counterfactual(external, other_attribute(external.a, 10))
    flagged = identify_bias(model, state, {"colour": (external, cf)}, delta=0.01)
    assert flagged["colour"]["biased"] and flagged["colour"]["bias"] == pytest.approx(
        counterfactual_bias_value(model, state.params, {}, external, cf))
    with pytest.raises(PrivDebiasError, match="does not pair"):
        identify_bias(model, state, {"colour": (external, subset(cf, np.arange(5)))})


def test_iterated_external_mode_minimises_the_proximal_objective(trained):
    """Iterated external FMD = the minimiser of mean CE over D_ex and its counterfactuals plus
    (μ/2)‖θ − θ⁰‖² on the head (scipy, float64), the same through the feature cache and the
    whole model, and never touching the backbone."""
    splits, external, _, model, state = trained
    mu = 0.05
    kw = dict(mode="external", newton_iterations=40, cg_iterations=60, proximal=mu, step_sizes=(1.0,),
              max_acc_drop=1.0, min_kept=0.0, key=jax.random.key(8))
    res = counterfactual_update(model, state, external, splits.counterfactual, 10, **kw)
    k0 = jax.random.split(jax.random.key(8), 2)[0]
    cf = splits.counterfactual(external, other_attribute(external.a, 10, k0))
    feats = np.concatenate([_features(model, state, external), _features(model, state, cf)])
    y = np.concatenate([np.asarray(external.y), np.asarray(cf.y)])
    head = state.params["head"]
    theta0 = np.concatenate([np.asarray(head["bias"]), np.asarray(head["kernel"]).reshape(-1)]).astype(np.float64)

    def objective(theta):
        loss, grad = _head_loss_np(theta, feats, y, 10)
        return loss + 0.5 * mu * np.sum((theta - theta0) ** 2), grad + mu * (theta - theta0)

    opt = minimize(objective, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-10, "ftol": 1e-15})
    new = res.state.params["head"]
    got = np.concatenate([np.asarray(new["bias"]), np.asarray(new["kernel"]).reshape(-1)]).astype(np.float64)
    assert np.linalg.norm(got - opt.x) <= 1e-3 * np.linalg.norm(opt.x - theta0)
    assert objective(got)[0] == pytest.approx(opt.fun, abs=1e-5)
    hist = res.report["newton_history"]
    assert hist[-1]["grad_norm"] < 1e-3 and res.report["proximal"] == mu and res.report["uses_training_set"] is False
    np.testing.assert_array_equal(np.asarray(state.params["dense_0"]["kernel"]),
                                  np.asarray(res.state.params["dense_0"]["kernel"]))
    slow = counterfactual_update(model, state, external, splits.counterfactual, 10, feature_cache=False, **kw)
    np.testing.assert_allclose(np.asarray(slow.state.params["head"]["kernel"]), np.asarray(new["kernel"]),
                               rtol=1e-3, atol=1e-4)
    # a larger μ keeps the head closer to the trained one
    near = counterfactual_update(model, state, external, splits.counterfactual, 10, **{**kw, "proximal": 1.0})
    dist = lambda r: float(np.linalg.norm(np.asarray(r.state.params["head"]["kernel"]) - np.asarray(head["kernel"])))  # noqa: E731
    assert dist(near) < dist(res)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="nope"), "unknown mode"),
        (dict(replacement="some"), "unknown replacement"),
        (dict(damping=(0.1, -1.0)), "damping must be > 0"),
        (dict(select="^nothing/"), "matches no parameter"),
        (dict(max_acc_drop=2.0), "max_acc_drop must be in"),
        (dict(min_kept=-0.1), "min_kept must be in"),
        (dict(mode="train"), "needs the training set"),
        (dict(mode="train", train="TRAIN", k=0), "K must be in"),
        (dict(mode="train", train="TRAIN", k=10**6), "K must be in"),
        (dict(damping=0.0), "damping must be > 0"),
        (dict(newton_iterations=3, proximal=0.0), "proximal > 0"),
        (dict(newton_iterations=3, proximal=float("nan")), "proximal > 0"),
        (dict(newton_iterations=3, cg_iterations=0), "cg_iterations must be"),
        (dict(newton_iterations=0), "must be ≥ 1"),
        (dict(step_sizes=()), "step_sizes is empty"),
    ],
)
def test_bad_input(trained, kwargs, message):
    splits, external, _, model, state = trained
    if kwargs.get("train") == "TRAIN":
        kwargs["train"] = splits.train
    with pytest.raises(PrivDebiasError, match=message):
        counterfactual_update(model, state, external, splits.counterfactual, 10, **kwargs)


def test_split_external_and_drop_ids(trained):
    splits = trained[0]
    ext, rest = split_external(splits.test, 50, key=0)
    assert len(ext) == 50 and len(rest) == len(splits.test) - 50
    assert not set(ext.idx) & set(rest.idx)
    assert len(drop_ids(splits.test, ext.idx)) == len(rest)
    with pytest.raises(PrivDebiasError):
        split_external(splits.test, len(splits.test), key=0)
    assert len(concat(ext, rest)) == len(splits.test)


def test_linear_head_module_matches_model_head(trained):
    splits, _, _, model, state = trained
    logits, feats = predict(model, state.params, {}, splits.test)
    z, _ = LinearHead(10).apply({"params": {"head": state.params["head"]}}, jnp.asarray(feats))
    np.testing.assert_allclose(np.asarray(z), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_cli_debias_end_to_end(tmp_path):
    out = tmp_path / "fmd"
    argv = ["debias", "--dataset", "colored-mnist", "--epochs", "20", "--image-size", "8", "--train-size", "300",
            "--external-size", "100", "--iterations", "5", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["external_size"] == 100 and res["method"] == "proximal_finetune"
    assert res["num_params_updated"] == 101 * 10  # the 3×100 MLP's head
    assert res["after"]["counterfactual_bias"] < res["before"]["counterfactual_bias"]
    assert res["debias_seconds"] > 0 and (out / "model" / "model.json").is_file()
    # --from a trained directory
    src = tmp_path / "vanilla"
    assert main(["train", "--dataset", "colored-mnist", "--epochs", "2", "--image-size", "8", "--train-size", "300",
                 "--no-progress", "--out", str(src)]) == 0
    # --from a training folder and from its model folder; FMD's one step by name
    for src_dir, method in ((src, "fmd"), (src / "model", "head_retrain")):
        assert main(["debias", "--from", str(src_dir), "--method", method, "--external-size", "100",
                     "--iterations", "2", "--no-progress", "--out", str(tmp_path / f"d_{method}")]) == 0
        assert json.loads((tmp_path / f"d_{method}" / "results.json").read_text())["method"] == method
    assert main(["debias", "--method", "end", "--dataset", "colored-mnist", "--out", str(tmp_path / "x")]) == 2
    assert main(["debias", "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")]) == 2
    assert main(["debias", "--from", str(src), "--damping", "0", "--out", str(tmp_path / "z")]) == 2


def test_closed_form_head_program_follows_the_generic_newton_cg(trained):
    """The class-major closed-form Newton-CG of the feature-space path takes the same steps as the
    generic forward-over-reverse program on the same head objective, and its candidate scores
    equal the full model's bias and accuracy."""
    from privdebias_jax.debias.counterfactual_update import (
        _default_loss,
        _head_candidates,
        _pair_scores,
        _proximal_newton,
        _proximal_newton_head,
    )
    from privdebias_jax.influence import make_problem

    splits, external, _, model, state = trained
    cf = splits.counterfactual(external, other_attribute(external.a, 10, jax.random.key(3)))
    both = Dataset(*(np.concatenate([np.asarray(getattr(external, f)), np.asarray(getattr(cf, f))])
                     for f in ("x", "y", "a")), idx=np.arange(2 * len(external)))
    feats = predict(model, state.params, state.model_state, both)[1]
    work = LinearHead(10)
    ds = Dataset(x=feats, y=both.y, a=both.a, idx=both.idx)
    head = state.params["head"]
    prob = make_problem(_default_loss(work), {"head": head}, ds, select=None, damping=0.01, model=work, model_state={})
    for mu in (0.5, 0.05):  # one compilation per program (same static iteration cap)
        sel, hist = _proximal_newton(_default_loss(work), prob.selected, prob.frozen, prob.batch, {}, jnp.float32(mu),
                                     iterations=30, cg_iterations=40)
        kernel, bias, hist2 = _proximal_newton_head(head["kernel"], head["bias"], jnp.asarray(feats),
                                                    jnp.asarray(both.y), jnp.float32(mu), iterations=30,
                                                    cg_iterations=40)
        done, done2 = int(hist["steps_done"]), int(hist2["steps_done"])
        # both converge; they may stop one step apart where ‖∇F‖ crosses 1e-5 in float32
        assert abs(done - done2) <= 1 and max(done, done2) < 30
        assert float(hist["grad_norm"][done]) < 1e-4 and float(hist2["grad_norm"][done2]) < 1e-4
        if mu == 0.5:  # well conditioned: the same iterates, step by step
            k = min(done, done2)
            assert k >= 3
            np.testing.assert_allclose(np.asarray(hist2["value"])[: k + 1], np.asarray(hist["value"])[: k + 1],
                                       rtol=1e-4)
            np.testing.assert_allclose(np.asarray(hist2["step"])[: k + 1], np.asarray(hist["step"])[: k + 1])
        np.testing.assert_allclose(np.asarray(kernel), np.asarray(sel["head/kernel"]), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(np.asarray(bias), np.asarray(sel["head/bias"]), rtol=1e-3, atol=1e-4)
    dk, db = kernel - head["kernel"], bias - head["bias"]
    mults = jnp.asarray([0.0, 0.5, 1.0], jnp.float32)
    _, _, _, right0 = _pair_scores(model, state.params, state.model_state, both, None)
    biases, accs, kepts = _head_candidates(head["kernel"], head["bias"], dk, db, mults, jnp.asarray(feats),
                                           jnp.asarray(both.y), jnp.asarray(right0))
    for m, b, acc, kept in zip(np.asarray(mults), np.asarray(biases), np.asarray(accs), np.asarray(kepts), strict=True):
        params = {**state.params, "head": {"kernel": head["kernel"] + m * dk, "bias": head["bias"] + m * db}}
        ref_b, ref_acc, ref_kept, _ = _pair_scores(model, params, state.model_state, both, right0)
        assert float(b) == pytest.approx(ref_b, abs=1e-5) and float(acc) == pytest.approx(ref_acc)
        assert float(kept) == pytest.approx(ref_kept)


def test_guard_rejects_a_collapse_that_lowers_the_bias(trained):
    """A step that sends every prediction to one class has bias 0 on D_ex, yet the guard refuses
    it: the predictions that were right are lost (kept ≈ 1/10), counted by hand."""
    from privdebias_jax.debias.counterfactual_update import _pair_scores

    splits, external, _, model, state = trained
    cf = splits.counterfactual(external, other_attribute(external.a, 10, jax.random.key(0)))
    both = Dataset(*(np.concatenate([np.asarray(getattr(external, f)), np.asarray(getattr(cf, f))])
                     for f in ("x", "y", "a")), idx=np.arange(2 * len(external)))
    head = state.params["head"]
    collapsed = {**state.params, "head": {"kernel": jnp.zeros_like(head["kernel"]),
                                          "bias": jnp.zeros_like(head["bias"]).at[3].set(50.0)}}
    _, _, _, right0 = _pair_scores(model, state.params, {}, both, None)
    b, acc, kept, _ = _pair_scores(model, collapsed, {}, both, right0)
    y = np.asarray(both.y)
    assert b == pytest.approx(0.0, abs=1e-6) and acc == pytest.approx(np.mean(y == 3))
    assert kept == pytest.approx(np.mean(y[right0] == 3))
    assert kept < 0.5  # so min_kept = 0.5 rejects it


def test_named_methods_are_the_engine_with_their_settings(trained):
    """fmd = one step, head_retrain = the training-set Newton iterations, proximal_finetune = the
    iterated external mode: bitwise the engine with the same settings; unknown names refused."""
    splits, external, _, model, state = trained
    cf, na, key = splits.counterfactual, 10, jax.random.key(11)
    a = fmd(model, state, external, cf, na, damping=0.1, step_sizes=(1.0,), min_kept=0.0, max_acc_drop=1.0, key=key)
    b = counterfactual_update(model, state, external, cf, na, mode="external", damping=0.1, newton_iterations=1,
                              step_sizes=(1.0,), min_kept=0.0, max_acc_drop=1.0, key=key)
    np.testing.assert_array_equal(np.asarray(a.state.params["head"]["kernel"]), np.asarray(b.state.params["head"]["kernel"]))
    assert a.report["method"] == "fmd" and a.report["newton_iterations"] == 1
    c = head_retrain(model, state, splits.train, external, cf, na, k=50, iterations=3, damping=0.1, solver="exact",
                     min_kept=0.0, max_acc_drop=1.0, key=key)
    d = counterfactual_update(model, state, external, cf, na, mode="train", train=splits.train, k=50,
                              newton_iterations=3, damping=0.1, solver="exact", min_kept=0.0, max_acc_drop=1.0, key=key)
    np.testing.assert_array_equal(np.asarray(c.state.params["head"]["kernel"]), np.asarray(d.state.params["head"]["kernel"]))
    assert c.report["method"] == "head_retrain" and c.report["harmful_ids"] == d.report["harmful_ids"]
    e = proximal_finetune(model, state, external, cf, na, proximal=0.05, iterations=5, min_kept=0.0,
                          max_acc_drop=1.0, key=key)
    assert e.report["method"] == "proximal_finetune" and e.report["proximal"] == 0.05
    assert get_debias_method("fmd") is fmd
    with pytest.raises(PrivDebiasError, match="unknown debiasing method 'nope'; available: fmd"):
        get_debias_method("nope")
    with pytest.raises(PrivDebiasError, match="unknown FMD variant"):
        fmd(model, state, external, cf, na, variant="both")
    with pytest.raises(PrivDebiasError, match="at least 2 attribute values"):
        fmd(model, state, external, cf, 1)
    with pytest.raises(PrivDebiasError, match="iterations ≥ 2"):
        head_retrain(model, state, splits.train, external, cf, na, iterations=1)
    with pytest.raises(PrivDebiasError, match="proximal > 0"):
        proximal_finetune(model, state, external, cf, na, proximal=0.0)


def test_fmd_damping_grid_picks_the_qualifying_candidate_with_the_lowest_external_bias(trained):
    splits, external, _, model, state = trained
    res = fmd(model, state, external, splits.counterfactual, 10, damping=(0.01, 0.1, 1.0),
              step_sizes=(0.25, 1.0), key=jax.random.key(12))
    cands = res.report["candidates"]
    assert {c["damping"] for c in cands if c["step"] > 0} == {0.01, 0.1, 1.0} and len(cands) == 1 + 3 * 2
    ok = [c for c in cands if c["qualified"]]
    best = min(ok, key=lambda c: (c["bias_external"], c["step"]))
    assert (res.report["step"], res.report["damping_chosen"]) == (best["step"], best["damping"])
    for c in cands:
        if c["step"] > 0:
            assert c["qualified"] == (c["acc_external"] >= res.report["acc_external_before"] - 0.05 and c["kept"] >= 0.5)
    if res.report["kept_original"]:
        assert any("guard rejected every step" in w for w in warnings_of(res.report))


def test_a_diverged_solver_step_is_never_taken_and_is_said(trained):
    """LiSSA with a scale far below the curvature blows up to inf/NaN: the guard refuses that step
    and the warning names it."""
    splits, external, _, model, state = trained
    res = fmd(model, state, external, splits.counterfactual, 10, damping=0.1, solver="lissa",
              solver_options={"scale": 1e-4, "depth": 200}, min_kept=0.0, max_acc_drop=1.0, key=jax.random.key(2))
    assert res.report["non_finite_steps"] and res.report["kept_original"]
    np.testing.assert_array_equal(np.asarray(res.state.params["head"]["kernel"]), np.asarray(state.params["head"]["kernel"]))
    assert any("holds NaN or inf" in w for w in warnings_of(res.report))
