"""The sync loop (:mod:`privdebias_jax.sync`): its pieces against independent references, and
the loop's resumability.

The loop is run with a *perfect generator* test double (real held-out digits of the requested
class, recoloured to the requested attribute with :func:`privdebias_jax.data.mnist.recolor`) and
a fixed planner, so these tests exercise the loop's logic (add → forget → measure → checkpoint,
resume) in seconds; the diffusion model itself is tested in ``tests/test_augment*.py`` and the
whole job by ``privdebias run --quick`` in ``tests/test_cli.py``.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

import privdebias_jax.augment as augment_pkg
from privdebias_jax import sync
from privdebias_jax.config import get_config
from privdebias_jax.data import Dataset, make_dataset, subset
from privdebias_jax.data.mnist import recolor
from privdebias_jax.pipeline import load_splits
from privdebias_jax.privacy.membership import cross_entropy
from privdebias_jax.train import predict
from privdebias_jax.types import PrivDebiasError


def _config(rounds=2):
    c = get_config("biased-mnist")
    c.image_size, c.train_size, c.epochs, c.batch_size = 8, 400, 2, 64
    c.model = "mlp"
    c.sync = sync.get_sync_options(quick=True)
    c.sync.rounds, c.sync.shards, c.sync.slices = rounds, 2, 2
    c.sync.attack_size = 30
    c.sync.forget_rate = 0.05
    c.sync.capacity = 7  # several steps per round
    return c


CONFIG = _config()
SPLITS = load_splits(CONFIG)


def _perfect_generate(augmenter, cell_counts, *, key, start_id, **kw):
    """Real test digits of class y recoloured to attribute a (ids from ``start_id``)."""
    pool = SPLITS.test_unbiased
    rows, attrs = [], []
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    for y in range(cell_counts.shape[0]):
        for a in range(cell_counts.shape[1]):
            n = int(cell_counts[y, a])
            if n:
                rows += rng.choice(np.flatnonzero(np.asarray(pool.y) == y), n).tolist()
                attrs += [a] * n
    ds = subset(pool, np.asarray(rows))
    ds = recolor(ds, np.asarray(attrs), SPLITS.info.get("color_mode", "background"))
    return Dataset(ds.x, ds.y, ds.a, start_id + np.arange(len(rows)))


def _fixed_plan(train_set, num_classes, num_attributes, *, target_bias=None, max_new=None):
    counts = np.ones((num_classes, num_attributes), np.int64)
    np.fill_diagonal(counts, 0)
    return counts  # 90 bias-conflicting samples per round


@pytest.fixture(scope="module")
def doubles():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(augment_pkg, "generate", _perfect_generate, raising=False)
        mp.setattr(augment_pkg, "plan_augmentation", _fixed_plan, raising=False)
        yield


@pytest.fixture(scope="module")
def whole(doubles, tmp_path_factory):
    """One uninterrupted 2-round loop, shared by the tests below."""
    return _run(tmp_path_factory.mktemp("sync"), "whole")


def test_forget_budget_and_options():
    assert sync.forget_budget(400, 0.05, 2) == [10, 10]
    assert sync.forget_budget(401, 0.1, 3) == [14, 13, 13]  # round(40.1) = 40
    assert sum(sync.forget_budget(4000, 0.1, 7)) == 400
    for field, value, match in [
        ("rounds", 0, "rounds"),
        ("forget_rate", 0.0, "forget rate"),
        ("forget_rate", 1.0, "forget rate"),
        ("forget_rate", float("nan"), "forget rate"),
        ("shards", 0, "shards"),
        ("forget_strategy", "oldest", "forget strategy"),
        ("delta", -1.0, "delta"),
        ("attack_size", 2, "attack_size"),
        ("added_epochs", -1, "added_epochs"),
        ("lira", "yes", "lira"),
        ("program_width", 3, "program_width"),  # more lanes than the 2 shards
        ("program_width", -1, "program_width"),
    ]:
        s = ml_collections.ConfigDict({**CONFIG.sync.to_dict(), field: value})
        with pytest.raises(PrivDebiasError, match=match):
            sync.check_sync_options(s)


def test_data_bias_matches_sklearn_mutual_information():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    a = np.where(rng.random(500) < 0.7, y, rng.integers(0, 3, 500))
    ds = make_dataset(np.zeros((500, 2)), y, a, num_classes=3, num_attributes=3)
    b = sync.data_bias(ds, 3, 3)
    assert b["mi_bias"] == pytest.approx(mutual_info_score(y, a), rel=1e-5)
    assert b["kl_bias"] == pytest.approx(mutual_info_score(y, a), rel=1e-5)  # Σ p(y) KL = I(a; y)
    assert b["fraction_aligned"] == pytest.approx(np.mean(y == a)) and b["size"] == 500


def test_choose_forget_ids_exposed_are_the_lowest_loss_samples():
    from privdebias_jax.models import create_model, init_model

    model = create_model("mlp", 10, hidden=(16,))
    params, state = init_model(model, jax.random.PRNGKey(0), SPLITS.input_shape)
    target = (model, params, state)
    cand = subset(SPLITS.train, np.arange(50))
    logits, _ = predict(model, params, state, cand)
    loss = cross_entropy(np.asarray(logits), np.asarray(cand.y))
    ids = sync.choose_forget_ids(target, cand, 7, "exposed", jax.random.PRNGKey(1))
    expected = np.sort(np.asarray(cand.idx)[np.argsort(loss, kind="stable")[:7]])
    assert np.array_equal(ids, expected)
    rnd = sync.choose_forget_ids(target, cand, 7, "random", jax.random.PRNGKey(1))
    assert rnd.size == 7 and np.all(np.isin(rnd, cand.idx))
    assert np.array_equal(rnd, sync.choose_forget_ids(target, cand, 7, "random", jax.random.PRNGKey(1)))


def _run(tmp_path, name, key=0):
    out = tmp_path / name
    ctx = sync.make_context(CONFIG, SPLITS, None, out, jax.random.PRNGKey(key))
    state = sync.run_sync(ctx, out / "sync", jax.random.PRNGKey(key), say=lambda s: None)
    return ctx, state, out


def _leaves(ctx, directory, data):
    sisa = ctx.open_sisa(directory, data)
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(sisa.stacked_state().params)], sisa


@pytest.mark.slow
def test_loop_adds_forgets_and_resumes_to_the_same_state(tmp_path, whole, monkeypatch):
    ctx, state, out = whole
    assert state.round == 2 and len(state.history) == 3 and state.stopped
    budget = sync.forget_budget(len(SPLITS.train), 0.05, 2)
    assert [len(f) for f in state.forgotten] == budget
    added = [sync.load_dataset_file(out / "sync" / f) for f in state.synthetic]
    assert [len(d) for d in added] == [90, 90]
    data = sync.concat(SPLITS.train, *added)
    leaves, sisa = _leaves(ctx, out / "sync" / "sisa", data)
    assert sorted(sisa.forgotten.tolist()) == sorted(sum(state.forgotten, []))
    assert np.all(np.isin(np.concatenate([d.idx for d in added]), sisa.plan.ids))
    # the recorded data bias is that of originals − forgotten + synthetic
    alive = sync.remove_ids(data, sisa.forgotten)
    assert state.history[-1]["data_kl_bias"] == pytest.approx(
        mutual_info_score(np.asarray(alive.y), np.asarray(alive.a)), rel=1e-5
    )
    assert state.history[-1]["data_kl_bias"] < state.history[0]["data_kl_bias"]
    # each round's matched held-out set mirrors its choice: the same fraction of the test pool
    # left after earlier rounds' matches (disjoint rounds), picked by exposure like the forgotten
    matched = [json.loads((out / "sync" / f"forget_{r}.json").read_text())["matched"] for r in (1, 2)]
    assert not set(matched[0]) & set(matched[1])
    n_test, remaining = len(SPLITS.test), len(SPLITS.train)
    for r, ids in enumerate(matched):
        assert set(ids) <= set(np.asarray(SPLITS.test.idx).tolist())
        assert len(ids) == max(2, round(budget[r] / remaining * n_test))
        n_test, remaining = n_test - len(ids), remaining - budget[r]
    # the vanilla directory is untouched by the loop
    assert ctx.open_sisa(out / "sisa_vanilla", SPLITS.train).forgotten.size == 0

    # interrupted in round 2 after the synthetic samples were added, during the forget steps
    calls = {"n": 0}
    original = sync.SISAModel.forget

    def crash(self, ids):
        calls["n"] += 1
        # each round takes 2 steps of ≤ 7 ids; the first is forgotten inside the add (one
        # retraining), the second by ``forget``: call 2 is round 2's second step
        if calls["n"] == 2:
            raise KeyboardInterrupt("injected")
        return original(self, ids)

    monkeypatch.setattr(sync.SISAModel, "forget", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "crashed")
    monkeypatch.setattr(sync.SISAModel, "forget", original)
    saved = json.loads((tmp_path / "crashed" / "sync" / "state.json").read_text())
    assert saved["round"] == 1
    ctx2, state2, out2 = _run(tmp_path, "crashed")
    assert state2.round == 2 and state2.forgotten == state.forgotten
    leaves2, _ = _leaves(ctx2, out2 / "sync" / "sisa", data)
    for a, b in zip(leaves, leaves2, strict=True):
        assert np.array_equal(a, b)
    for k in ("data_kl_bias", "acc_unbiased", "counterfactual_bias"):
        assert state2.history[-1][k] == pytest.approx(state.history[-1][k], abs=1e-6)


def test_naive_combination_uses_one_augmentation_and_one_forget(whole):
    ctx, state, out = whole
    naive = sync.naive_combination(ctx, out / "naive", out / "sisa_vanilla", jax.random.PRNGKey(1))
    m = naive["metrics"]
    assert m["added"] == 90 and m["forgotten_now"] == round(0.05 * len(SPLITS.train))
    assert json.loads((out / "naive" / "naive.json").read_text())["metrics"]["added"] == 90
    assert 0.0 <= m["membership"]["strongest_balanced_accuracy"] <= 1.0
    assert "membership_forgotten" in m


def test_fmd_pass_debiases_every_shard_head_and_nothing_else(whole):
    """The FMD pass on the loop's result: backbones bitwise unchanged, each shard's external bias
    as recomputed from its new head and lowered, the ensemble = mean softmax of its members."""
    from jax.scipy.special import logsumexp

    from privdebias_jax.data import other_attribute
    from privdebias_jax.debias.fmd import counterfactual_bias_value, split_external

    ctx, state, out = whole
    external, _ = split_external(SPLITS.test_unbiased, 60, key=3)
    res = sync.fmd_pass(ctx, out / "sync", state, external, jax.random.key(5), proximal=0.05)
    module, params, model_state = res["model"]
    sisa, _ = sync._current(ctx, out / "sync", state.round)
    members = params["members"]
    for s_ in range(sisa.plan.num_shards):
        old = sisa.shard_state(s_)
        new = jax.tree_util.tree_map(lambda v, i=s_: v[i], members)
        for name in old.params:
            same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
                jax.tree_util.tree_leaves(old.params[name]), jax.tree_util.tree_leaves(new[name]), strict=True))
            assert same == (name != "head"), name
        k0 = jax.random.split(jax.random.fold_in(jax.random.key(5), s_), 2)[0]
        cf = SPLITS.counterfactual(external, other_attribute(external.a, 10, k0))
        rep = res["shards"][s_]
        assert rep["bias_external_after"] == pytest.approx(
            counterfactual_bias_value(sisa.model, new, old.model_state, external, cf), abs=1e-5)
        assert rep["bias_external_after"] < rep["bias_external_before"]
    # the ensemble's logits are log of the members' mean softmax
    x = SPLITS.test_unbiased
    got, _ = predict(module, params, model_state, x)
    logps = [jax.nn.log_softmax(predict(sisa.model, jax.tree_util.tree_map(lambda v, i=i: v[i], members),
                                        sisa.shard_state(i).model_state, x)[0]) for i in range(sisa.plan.num_shards)]
    want = logsumexp(np.stack(logps), axis=0) - np.log(len(logps))
    np.testing.assert_allclose(jax.nn.log_softmax(got), want, atol=1e-5)
    acc = float(np.mean(np.argmax(want, 1) == np.asarray(x.y)))
    assert res["metrics"]["acc_unbiased"] == pytest.approx(acc, abs=1e-6)
    assert res["num_params_updated"] == sum(r["num_params_updated"] for r in res["shards"]) > 0


def test_lira_offline_uses_the_vanilla_shards_that_did_not_train_on_each_sample(whole):
    """Offline LiRA in every measurement: the reference models are the vanilla SISA shards, a
    sample is IN for exactly the shard whose slots hold it, and the scores equal a direct
    Gaussian fit with one global variance (numpy/scipy, from each shard's own predictions)."""
    from scipy.stats import norm

    from privdebias_jax.data import concat
    from privdebias_jax.privacy.attacks import membership_scores
    from privdebias_jax.privacy.membership import scaled_logit

    ctx, state, out = whole
    refs = ctx.references()
    vanilla = ctx.open_sisa(out / "sisa_vanilla", SPLITS.train)
    pool_ids = np.asarray(refs.pool.idx)
    assert set(pool_ids.tolist()) == set(np.asarray(SPLITS.train.idx).tolist()) | set(np.asarray(SPLITS.test.idx).tolist())
    for r in range(vanilla.plan.num_shards):
        shard_ids = vanilla.plan.slots[r][vanilla.plan.slots[r] >= 0]
        np.testing.assert_array_equal(refs.member[r].astype(bool), np.isin(pool_ids, shard_ids))
    assert np.all(refs.member[:, np.isin(pool_ids, np.asarray(SPLITS.test.idx))] == 0)
    assert np.all(refs.member[:, np.isin(pool_ids, np.asarray(SPLITS.train.idx))].sum(0) == 1)
    assert refs.global_variance
    # the scores of the loop's final ensemble on 20 members and 20 non-members
    sisa, _ = sync._current(ctx, out / "sync", state.round)
    target = sisa.ensemble(ctx.aggregate)
    members, nonmembers = subset(SPLITS.train, np.arange(20)), subset(SPLITS.test, np.arange(20))
    got = membership_scores(target, members, nonmembers, key=jax.random.key(0), attacks=("lira_offline",),
                            reference=refs)["scores"]["lira_offline"]
    data = concat(members, nonmembers)
    y = np.asarray(data.y)
    phi = scaled_logit(predict(*target, data)[0], y)
    ref_phi = np.stack([scaled_logit(predict(vanilla.model, vanilla.shard_state(r).params,
                                             vanilla.shard_state(r).model_state, data)[0], y)
                        for r in range(vanilla.plan.num_shards)])
    out_mask = np.stack([~np.isin(np.asarray(data.idx), vanilla.plan.slots[r][vanilla.plan.slots[r] >= 0])
                         for r in range(vanilla.plan.num_shards)])
    mu = np.array([ref_phi[out_mask[:, i], i].mean() for i in range(len(y))])
    dev = np.concatenate([ref_phi[out_mask[:, i], i] - mu[i] for i in range(len(y))])
    sd = np.sqrt((dev ** 2).sum() / (out_mask.sum() - len(y))) + 1e-6
    np.testing.assert_allclose(got, norm.logcdf((phi - mu) / sd), rtol=1e-5, atol=1e-6)
    # and it is part of every round's measurement (members and forgotten originals)
    last = state.history[-1]
    assert "lira_offline" in last["membership"]["attacks"]
    assert "lira_offline" in last["membership_forgotten"]["attacks"]
    assert 0.0 <= last["membership"]["attacks"]["lira_offline"]["auc"] <= 1.0
