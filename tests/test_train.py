"""Tests of privdebias_jax.train against hand-written references.

References: a NumPy log-softmax cross-entropy, an MLP forward pass written with plain ``jnp``
ops (differentiated with ``jax.grad``, independent of Flax and optax), Python loops of jitted
steps, the documented key schedule of ``fit`` replayed by hand, and NumPy confusion tables.
"""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from privdebias_jax.data import Batch, as_batch, iterate_batches, stack_batches, subset
from privdebias_jax.models import create_model
from privdebias_jax.train import (
    TrainState,
    apply_model,
    create_train_state,
    cross_entropy_loss,
    evaluate,
    fit,
    make_epoch_fn,
    make_loss_fn,
    make_optimizer,
    make_train_step,
    predict,
)
from privdebias_jax.types import PrivDebiasError

INPUT = (8, 8, 3)


# ------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------


def np_masked_ce(logits, y, mask) -> float:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ce = -logp[np.arange(len(y)), np.asarray(y)]
    m = np.asarray(mask, np.float64)
    return float((ce * m).sum() / max(m.sum(), 1.0))


def hand_mlp_loss(params, x, y, mask):
    """Masked mean CE of the MLP, written with plain jnp ops (no Flax, no optax)."""
    h = x.reshape(x.shape[0], -1)
    i = 0
    while f"dense_{i}" in params:
        h = jnp.maximum(h @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"], 0.0)
        i += 1
    z = h @ params["head"]["kernel"] + params["head"]["bias"]
    z = z - jax.lax.stop_gradient(z.max(axis=1, keepdims=True))
    logp = z - jnp.log(jnp.exp(z).sum(axis=1, keepdims=True))
    ce = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _batch(ds, rows, mask=None) -> Batch:
    s = subset(ds, rows)
    m = np.ones(len(s), np.float32) if mask is None else np.asarray(mask, np.float32)
    return Batch(*(jnp.asarray(v) for v in s), mask=jnp.asarray(m))


def _state(model, tx, seed=0):
    return create_train_state(model, tx, jax.random.key(seed), INPUT)


def _assert_trees_equal(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    chex.assert_trees_all_equal(a, b)


# ------------------------------------------------------------------------------------------
# loss
# ------------------------------------------------------------------------------------------


def test_cross_entropy_matches_numpy_with_mask():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(9, 5)).astype(np.float32) * 3
    y = rng.integers(0, 5, 9)
    for mask in (np.ones(9), (rng.random(9) < 0.5).astype(np.float32), np.zeros(9)):
        b = Batch(None, jnp.asarray(y), None, None, jnp.asarray(mask, jnp.float32))
        got = float(cross_entropy_loss(jnp.asarray(logits), b))
        assert got == pytest.approx(np_masked_ce(logits, y, mask), rel=1e-5, abs=1e-6)
    # padding rows do not count: same value as the real rows alone
    mask = np.r_[np.ones(6), np.zeros(3)].astype(np.float32)
    b_pad = Batch(None, jnp.asarray(y), None, None, jnp.asarray(mask))
    b_real = Batch(None, jnp.asarray(y[:6]), None, None, jnp.ones(6))
    assert float(cross_entropy_loss(jnp.asarray(logits), b_pad)) == pytest.approx(
        float(cross_entropy_loss(jnp.asarray(logits[:6]), b_real)), rel=1e-6
    )


def test_make_loss_fn_matches_hand_loss(biased8, tiny_mlp):
    params = _state(tiny_mlp, optax.sgd(0.1)).params
    b = _batch(biased8.train, np.arange(20), mask=np.r_[np.ones(15), np.zeros(5)])
    loss_fn = make_loss_fn(tiny_mlp)
    ref = float(hand_mlp_loss(params, b.x, b.y, b.mask))
    assert float(loss_fn(params, b)) == pytest.approx(ref, rel=1e-5)
    reg = make_loss_fn(tiny_mlp, regularizer=lambda p, bt, lg, ft: 0.5 * jnp.sum(ft**2))
    logits, feats = tiny_mlp.apply({"params": params}, b.x)
    assert float(reg(params, b)) == pytest.approx(ref + 0.5 * float(jnp.sum(feats**2)), rel=1e-5)


# ------------------------------------------------------------------------------------------
# one train step
# ------------------------------------------------------------------------------------------


def test_sgd_step_equals_manual_update(biased8, tiny_mlp):
    lr = 0.3
    tx = optax.sgd(lr)
    state = _state(tiny_mlp, tx)
    b = _batch(biased8.train, np.arange(32))
    new, metrics = jax.jit(make_train_step(tiny_mlp, tx))(state, b, jax.random.key(0))
    grads = jax.grad(hand_mlp_loss)(state.params, b.x, b.y, b.mask)
    expected = jax.tree_util.tree_map(lambda p, g: p - lr * g, state.params, grads)
    chex.assert_trees_all_close(new.params, expected, rtol=1e-5, atol=1e-6)
    assert int(new.step) == 1
    # metrics are batch sums
    logits, _ = tiny_mlp.apply({"params": state.params}, b.x)
    ce = np_masked_ce(logits, b.y, b.mask)
    assert float(metrics.count) == 32
    assert float(metrics.loss_sum) == pytest.approx(32 * ce, rel=1e-5)
    assert float(metrics.correct) == float(np.sum(np.argmax(logits, 1) == np.asarray(b.y)))
    assert float(metrics.reg_sum) == 0.0


def test_adam_step_equals_manual_adam(biased8, tiny_mlp):
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    tx = make_optimizer("adam", lr)
    state = _state(tiny_mlp, tx)
    step = jax.jit(make_train_step(tiny_mlp, tx))
    params = jax.tree_util.tree_map(np.asarray, state.params)
    m = jax.tree_util.tree_map(np.zeros_like, params)
    v = jax.tree_util.tree_map(np.zeros_like, params)
    for t in range(1, 4):
        b = _batch(biased8.train, np.arange(16 * t, 16 * t + 16))
        g = jax.tree_util.tree_map(np.asarray, jax.grad(hand_mlp_loss)(params, b.x, b.y, b.mask))
        m = jax.tree_util.tree_map(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, g)
        v = jax.tree_util.tree_map(lambda vi, gi: b2 * vi + (1 - b2) * gi**2, v, g)
        params = jax.tree_util.tree_map(
            lambda p, mi, vi, t=t: p - lr * (mi / (1 - b1**t)) / (np.sqrt(vi / (1 - b2**t)) + eps),
            params,
            m,
            v,
        )
        state, _ = step(state, b, jax.random.key(0))
    chex.assert_trees_all_close(state.params, params, rtol=1e-4, atol=1e-6)


def test_all_zero_mask_batch_leaves_state_bit_identical(biased8, tiny_mlp):
    tx = make_optimizer("adam", 1e-2)
    step = jax.jit(make_train_step(tiny_mlp, tx))
    state = _state(tiny_mlp, tx)
    # one real step first, so the optimiser state is non-trivial
    state, _ = step(state, _batch(biased8.train, np.arange(8)), jax.random.key(0))
    empty = _batch(biased8.train, np.arange(8, 16), mask=np.zeros(8))
    new, metrics = step(state, empty, jax.random.key(0))
    _assert_trees_equal(new, state)
    assert int(new.step) == 1
    assert (
        float(metrics.count) == 0 and float(metrics.loss_sum) == 0 and float(metrics.correct) == 0
    )


def test_all_zero_mask_batch_leaves_batch_stats_unchanged(biased8):
    model = create_model("simple_conv", 10, widths=(4, 4), strides=(1, 2), kernel_size=3)
    tx = optax.sgd(0.1)
    state = _state(model, tx)
    step = jax.jit(make_train_step(model, tx))
    new, _ = step(state, _batch(biased8.train, np.arange(8), mask=np.zeros(8)), jax.random.key(0))
    _assert_trees_equal(new, state)
    moved, _ = step(state, _batch(biased8.train, np.arange(8)), jax.random.key(0))
    assert not np.allclose(moved.model_state["batch_stats"]["norm_0"]["mean"], 0.0)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_padded_batch_gives_same_update_as_unpadded(biased8, tiny_mlp, tiny_cnn, model_name):
    model = tiny_mlp if model_name == "mlp" else tiny_cnn
    tx = make_optimizer("adam", 1e-2)
    state = _state(model, tx)
    step = jax.jit(make_train_step(model, tx))
    real = _batch(biased8.train, np.arange(11))
    # padded with copies of row 0, as stack_batches does
    rows = np.r_[np.arange(11), np.zeros(5, int)]
    padded = _batch(biased8.train, rows, mask=np.r_[np.ones(11), np.zeros(5)])
    s_real, m_real = step(state, real, jax.random.key(0))
    s_pad, m_pad = step(state, padded, jax.random.key(0))
    chex.assert_trees_all_close(s_pad, s_real, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(m_pad, m_real, rtol=1e-5)


def test_padded_batch_same_update_with_batch_norm(biased8):
    model = create_model("simple_conv", 10, widths=(4, 4), strides=(1, 2), kernel_size=3)
    tx = optax.sgd(0.1)
    state = _state(model, tx)
    step = jax.jit(make_train_step(model, tx))
    real = _batch(biased8.train, np.arange(11))
    padded = _batch(
        biased8.train, np.r_[np.arange(11), np.zeros(5, int)], mask=np.r_[np.ones(11), np.zeros(5)]
    )
    s_real, _ = step(state, real, jax.random.key(0))
    s_pad, _ = step(state, padded, jax.random.key(0))
    chex.assert_trees_all_close(s_pad, s_real, rtol=1e-5, atol=1e-7)


def test_regularizer_adds_its_gradient(biased8, tiny_mlp):
    lr, lam = 0.1, 0.05
    tx = optax.sgd(lr)
    state = _state(tiny_mlp, tx)
    b = _batch(biased8.train, np.arange(24))

    def l2(params, batch, logits, features):
        return lam * sum(jnp.sum(p**2) for p in jax.tree_util.tree_leaves(params))

    new, metrics = jax.jit(make_train_step(tiny_mlp, tx, regularizer=l2))(
        state, b, jax.random.key(0)
    )
    g_ce = jax.grad(hand_mlp_loss)(state.params, b.x, b.y, b.mask)
    expected = jax.tree_util.tree_map(lambda p, g: p - lr * (g + 2 * lam * p), state.params, g_ce)
    chex.assert_trees_all_close(new.params, expected, rtol=1e-5, atol=1e-6)
    reg = lam * sum(
        float(np.sum(np.asarray(p, np.float64) ** 2))
        for p in jax.tree_util.tree_leaves(state.params)
    )
    assert float(metrics.reg_sum) == pytest.approx(24 * reg, rel=1e-5)


def test_regularizer_sees_logits_and_features(biased8, tiny_mlp):
    seen = {}

    def reg(params, batch, logits, features):
        seen["shapes"] = (logits.shape, features.shape, batch.x.shape)
        return 0.0 * jnp.sum(features)

    tx = optax.sgd(0.1)
    state = _state(tiny_mlp, tx)
    b = _batch(biased8.train, np.arange(6))
    with_reg, _ = make_train_step(tiny_mlp, tx, regularizer=reg)(state, b, jax.random.key(0))
    without, _ = make_train_step(tiny_mlp, tx)(state, b, jax.random.key(0))
    assert seen["shapes"] == ((6, 10), (6, 16), (6, *INPUT))
    chex.assert_trees_all_close(with_reg, without)


def test_custom_data_loss(biased8, tiny_mlp):
    """The ``loss=`` hook replaces cross-entropy: a squared-logit loss gives its own gradient."""
    lr = 0.01
    tx = optax.sgd(lr)
    state = _state(tiny_mlp, tx)
    b = _batch(biased8.train, np.arange(10))

    def sq(logits, batch):
        return jnp.mean(jnp.sum(logits**2, axis=1))

    new, _ = make_train_step(tiny_mlp, tx, loss=sq)(state, b, jax.random.key(0))

    def hand(params):
        h = jnp.maximum(
            b.x.reshape(10, -1) @ params["dense_0"]["kernel"] + params["dense_0"]["bias"], 0
        )
        z = h @ params["head"]["kernel"] + params["head"]["bias"]
        return jnp.mean(jnp.sum(z**2, axis=1))

    expected = jax.tree_util.tree_map(
        lambda p, g: p - lr * g, state.params, jax.grad(hand)(state.params)
    )
    chex.assert_trees_all_close(new.params, expected, rtol=1e-5, atol=1e-6)


def test_step_compiles_once_for_an_epoch_with_ragged_last_batch(biased8, tiny_mlp):
    tx = make_optimizer("sgd", 0.05)
    step = jax.jit(chex.assert_max_traces(make_train_step(tiny_mlp, tx), n=1))
    state = _state(tiny_mlp, tx)
    ds = subset(biased8.train, np.arange(50))
    for epoch in range(2):
        batches = list(iterate_batches(ds, 16, jax.random.key(epoch)))
        assert [float(b.mask.sum()) for b in batches] == [16, 16, 16, 2]
        for b in batches:
            state, _ = step(state, b, jax.random.key(0))
    assert int(state.step) == 8


def test_fit_traces_its_epoch_once(biased8, tiny_mlp):
    """fit jits the scanned epoch once, even with a padded last chunk (7 batches, chunks of 3)."""
    traces = []

    def counting_loss(logits, batch):
        traces.append(logits.shape)
        return cross_entropy_loss(logits, batch)

    tx = make_optimizer("adam", 1e-2)
    fit(
        tiny_mlp,
        tx,
        _state(tiny_mlp, tx),
        biased8.train,
        epochs=3,
        batch_size=64,
        key=jax.random.key(0),
        loss=counting_loss,
        steps_per_call=3,
        progress=False,
    )
    assert traces == [(64, 10)]


# ------------------------------------------------------------------------------------------
# epochs and fit
# ------------------------------------------------------------------------------------------


def test_epoch_fn_equals_python_loop_of_steps(biased8, tiny_mlp):
    tx = make_optimizer("adam", 1e-2)
    state = _state(tiny_mlp, tx)
    train_step = make_train_step(tiny_mlp, tx)
    batches = stack_batches(subset(biased8.train, np.arange(70)), 16, jax.random.key(3))
    key = jax.random.key(9)
    s_scan, m_scan = jax.jit(make_epoch_fn(train_step))(state, batches, key)
    step = jax.jit(train_step)
    s_loop, sums = state, np.zeros(4)
    for i in range(batches.mask.shape[0]):
        s_loop, m = step(s_loop, Batch(*(v[i] for v in batches)), key)
        sums += np.array([float(v) for v in m])
    chex.assert_trees_all_close(s_scan, s_loop, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(v) for v in m_scan], sums, rtol=1e-5)
    assert float(m_scan.count) == 70 and int(s_scan.step) == 5


def test_fit_follows_documented_key_schedule(biased8, tiny_mlp):
    """Epoch e shuffles with fold_in(fold_in(key, e), 0) and steps with fold_in(fold_in(key, e), 1)."""
    tx = make_optimizer("adam", 1e-2)
    state = _state(tiny_mlp, tx)
    key = jax.random.key(42)
    ds = subset(biased8.train, np.arange(150))
    res = fit(tiny_mlp, tx, state, ds, epochs=2, batch_size=32, key=key, progress=False)
    step = jax.jit(make_train_step(tiny_mlp, tx))
    s = state
    for e in range(2):
        ekey = jax.random.fold_in(key, e)
        for b in iterate_batches(ds, 32, jax.random.fold_in(ekey, 0)):
            s, _ = step(s, b, jax.random.fold_in(ekey, 1))
    chex.assert_trees_all_close(res.state, s, rtol=1e-5, atol=1e-6)
    assert int(res.state.step) == 10
    assert [r["epoch"] for r in res.history] == [1, 2]


def test_fit_deterministic_and_chunking_invariant(biased8, tiny_mlp):
    tx = make_optimizer("adam", 1e-2)
    state = _state(tiny_mlp, tx)
    kw = dict(epochs=2, batch_size=64, key=jax.random.key(1), progress=False)
    r1 = fit(tiny_mlp, tx, state, biased8.train, **kw)
    r2 = fit(tiny_mlp, tx, state, biased8.train, **kw)
    _assert_trees_equal(r1.state, r2.state)
    # 7 batches per epoch → chunks 3 + 3 + (1 real + 2 empty)
    r3 = fit(tiny_mlp, tx, state, biased8.train, steps_per_call=3, **kw)
    chex.assert_trees_all_close(r3.state.params, r1.state.params, rtol=1e-6, atol=1e-6)
    assert int(r3.state.step) == int(r1.state.step) == 14
    for h1, h3 in zip(r1.history, r3.history, strict=True):
        assert h3["loss"] == pytest.approx(h1["loss"], rel=1e-5)
        assert h3["acc"] == pytest.approx(h1["acc"])
    r4 = fit(tiny_mlp, tx, state, biased8.train, **{**kw, "key": jax.random.key(2)})
    assert not np.allclose(r4.state.params["head"]["kernel"], r1.state.params["head"]["kernel"])


def test_fit_zero_epochs_returns_state(biased8, tiny_mlp):
    tx = make_optimizer("adam", 1e-2)
    state = _state(tiny_mlp, tx)
    res = fit(
        tiny_mlp,
        tx,
        state,
        biased8.train,
        epochs=0,
        batch_size=32,
        key=jax.random.key(0),
        progress=False,
    )
    assert res.history == []
    _assert_trees_equal(res.state, state)


def test_fit_learns_colour_task(colour_task, tiny_mlp):
    sp = colour_task
    tx = make_optimizer("adam", 1e-2)
    state = _state(tiny_mlp, tx)
    calls = []
    res = fit(
        tiny_mlp,
        tx,
        state,
        sp.train,
        epochs=8,
        batch_size=32,
        key=jax.random.key(0),
        progress=False,
        on_epoch_end=lambda e, s, row: calls.append((e, int(s.step), row["loss"])),
    )
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < 0.5 * losses[0]
    assert all(b <= a * 1.05 for a, b in itertools.pairwise(losses))
    assert [c[0] for c in calls] == list(range(1, 9))
    assert [c[1] for c in calls] == [13 * e for e in range(1, 9)]  # ceil(400 / 32) = 13 steps
    assert res.history[-1]["acc"] > 0.9
    # colour determines the label (ρ = 1), so the biased test set is nearly solved
    report = evaluate(tiny_mlp, res.state.params, res.state.model_state, sp.test, 10, 10)
    assert report["acc"] > 0.95
    logits, _ = predict(tiny_mlp, res.state.params, res.state.model_state, sp.test)
    assert np.mean(logits.argmax(1) == sp.test.y) == pytest.approx(report["acc"])
    # ... while on the unbiased set (ρ = 0.1) the colour shortcut fails for most digits
    unbiased = evaluate(tiny_mlp, res.state.params, res.state.model_state, sp.test_unbiased, 10, 10)
    assert unbiased["acc"] < 0.4


def test_fit_with_batch_norm_model_updates_stats(biased8):
    model = create_model("simple_conv", 10, widths=(4, 8), strides=(1, 2), kernel_size=3)
    tx = make_optimizer("adam", 1e-2)
    state = _state(model, tx)
    res = fit(
        model,
        tx,
        state,
        subset(biased8.train, np.arange(128)),
        epochs=1,
        batch_size=64,
        key=jax.random.key(0),
        progress=False,
    )
    assert int(res.state.step) == 2
    # two momentum updates from (0, 1): |mean| grows, and eval uses the new stats
    assert not np.allclose(res.state.model_state["batch_stats"]["norm_1"]["mean"], 0.0)
    lg_new, _ = predict(
        model, res.state.params, res.state.model_state, biased8.test, batch_size=100
    )
    lg_old, _ = predict(model, res.state.params, state.model_state, biased8.test, batch_size=100)
    assert not np.allclose(lg_new, lg_old)


# ------------------------------------------------------------------------------------------
# predict / evaluate
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_mlp(biased8, tiny_mlp):
    tx = make_optimizer("adam", 1e-2)
    res = fit(
        tiny_mlp,
        tx,
        _state(tiny_mlp, tx),
        biased8.train,
        epochs=3,
        batch_size=64,
        key=jax.random.key(0),
        progress=False,
    )
    return res.state


def test_predict_matches_apply_and_is_batch_size_invariant(biased8, tiny_mlp, trained_mlp):
    p = trained_mlp.params
    ds = biased8.test
    ref_logits, ref_feats = tiny_mlp.apply({"params": p}, jnp.asarray(ds.x))
    lg, ft = predict(tiny_mlp, p, {}, ds, batch_size=1000)
    assert lg.shape == (1000, 10) and ft.shape == (1000, 16)
    np.testing.assert_allclose(lg, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ft, ref_feats, rtol=1e-5, atol=1e-5)
    for bs in (7, 333, 5000):
        lg2, ft2 = predict(tiny_mlp, p, {}, ds, batch_size=bs)
        np.testing.assert_allclose(lg2, lg, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ft2, ft, rtol=1e-6, atol=1e-6)
    # an array of inputs works the same as a Dataset
    lg3, _ = predict(tiny_mlp, p, {}, ds.x[:13], batch_size=5)
    np.testing.assert_allclose(lg3, lg[:13], rtol=1e-6, atol=1e-6)
    with pytest.raises(PrivDebiasError, match="no samples"):
        predict(tiny_mlp, p, {}, ds.x[:0])


def test_evaluate_counts_equal_numpy_confusion_table(biased8, tiny_mlp, trained_mlp):
    p = trained_mlp.params
    ds = biased8.test_unbiased
    logits, _ = predict(tiny_mlp, p, {}, ds)
    pred = logits.argmax(1)
    table = np.zeros((10, 10, 10))
    for yi, ai, pi in zip(ds.y, ds.a, pred, strict=True):
        table[yi, ai, pi] += 1
    rep = evaluate(tiny_mlp, p, {}, ds, 10, 10, batch_size=7)
    np.testing.assert_array_equal(rep["counts"], table)
    assert rep["acc"] == pytest.approx(np.mean(pred == ds.y), abs=1e-6)
    assert rep["n"] == len(ds)
    assert rep["loss"] == pytest.approx(np_masked_ce(logits, ds.y, np.ones(len(ds))), rel=1e-5)
    for g in range(10):
        sel = ds.a == g
        assert rep["group_acc"][g] == pytest.approx(np.mean(pred[sel] == ds.y[sel]), abs=1e-6)
        assert rep["group_count"][g] == sel.sum()
    aligned = ds.a == ds.y
    assert rep["acc_aligned"] == pytest.approx(np.mean(pred[aligned] == ds.y[aligned]), abs=1e-6)
    assert rep["acc_conflicting"] == pytest.approx(
        np.mean(pred[~aligned] == ds.y[~aligned]), abs=1e-6
    )


def test_evaluate_accumulates_instead_of_averaging_batches(biased8, tiny_mlp, trained_mlp):
    p = trained_mlp.params
    ds = subset(biased8.test, np.arange(101))  # 7 does not divide 101: the last batch is ragged
    small = evaluate(tiny_mlp, p, {}, ds, 10, 10, batch_size=7)
    whole = evaluate(tiny_mlp, p, {}, ds, 10, 10, batch_size=1000)
    np.testing.assert_array_equal(small["counts"], whole["counts"])
    assert small["acc"] == whole["acc"]
    assert small["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    # the mean of per-batch accuracies would differ from the pooled accuracy here
    logits, _ = predict(tiny_mlp, p, {}, ds)
    correct = logits.argmax(1) == ds.y
    batch_means = [correct[i : i + 7].mean() for i in range(0, 101, 7)]
    assert small["acc"] == pytest.approx(correct.mean(), abs=1e-6)
    assert not np.isclose(np.mean(batch_means), correct.mean())


def test_evaluate_and_loss_agree_on_full_batch(biased8, tiny_mlp, trained_mlp):
    p = trained_mlp.params
    ds = subset(biased8.test, np.arange(64))
    rep = evaluate(tiny_mlp, p, {}, ds, 10, 10)
    assert rep["loss"] == pytest.approx(float(make_loss_fn(tiny_mlp)(p, as_batch(ds))), rel=1e-5)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def test_fit_bad_input(biased8, tiny_mlp):
    tx = make_optimizer("sgd", 0.1)
    state = _state(tiny_mlp, tx)
    kw = dict(key=jax.random.key(0), progress=False)
    with pytest.raises(PrivDebiasError, match="epochs"):
        fit(tiny_mlp, tx, state, biased8.train, epochs=-1, batch_size=8, **kw)
    with pytest.raises(PrivDebiasError, match="batch_size"):
        fit(tiny_mlp, tx, state, biased8.train, epochs=1, batch_size=0, **kw)
    with pytest.raises(PrivDebiasError, match="empty"):
        fit(
            tiny_mlp,
            tx,
            state,
            subset(biased8.train, np.zeros(len(biased8.train), bool)),
            epochs=1,
            batch_size=8,
            **kw,
        )


def test_fit_diverging_loss_raises(biased8, tiny_mlp):
    tx = optax.sgd(1e30)
    state = _state(tiny_mlp, tx)
    with pytest.raises(PrivDebiasError, match="diverged"):
        fit(
            tiny_mlp,
            tx,
            state,
            biased8.train,
            epochs=3,
            batch_size=64,
            key=jax.random.key(0),
            progress=False,
        )


def test_make_optimizer():
    with pytest.raises(PrivDebiasError, match="unknown optimizer 'rmsprop'"):
        make_optimizer("rmsprop")
    for lr in (-1e-3, 0.0, float("nan")):
        with pytest.raises(PrivDebiasError, match="learning_rate"):
            make_optimizer("adam", lr)
    with pytest.raises(PrivDebiasError, match="weight_decay"):
        make_optimizer("sgd", 0.1, weight_decay=-1.0)
    # sgd with momentum and weight decay: first two updates by hand
    tx = make_optimizer("sgd", 0.1, weight_decay=0.01, momentum=0.5)
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.25])}
    st = tx.init(p)
    u1, st = tx.update(g, st, p)
    d1 = np.array([0.5, 0.25]) + 0.01 * np.array([1.0, -2.0])
    np.testing.assert_allclose(u1["w"], -0.1 * d1, rtol=1e-6)
    u2, _ = tx.update(g, st, p)
    np.testing.assert_allclose(u2["w"], -0.1 * (d1 + 0.5 * d1), rtol=1e-6)
    # adam's weight decay is L2 added to the gradient (PyTorch Adam), adamw decouples it
    adam = make_optimizer("adam", 0.1, weight_decay=0.5)
    u, _ = adam.update(g, adam.init(p), p)
    np.testing.assert_allclose(
        u["w"], -0.1 * np.sign(np.array([0.5 + 0.5 * 1.0, 0.25 + 0.5 * -2.0])), atol=1e-5
    )
    adamw = make_optimizer("adamw", 0.1, weight_decay=0.5)
    u, _ = adamw.update(g, adamw.init(p), p)
    np.testing.assert_allclose(
        u["w"], -0.1 * (np.sign([0.5, 0.25]) + 0.5 * np.array([1.0, -2.0])), atol=1e-5
    )


def test_train_state_is_a_pytree(tiny_mlp):
    tx = make_optimizer("adam", 1e-3)
    state = _state(tiny_mlp, tx)
    assert isinstance(state, TrainState)
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    doubled = jax.tree_util.tree_map(lambda v: v * 2, state)
    assert isinstance(doubled, TrainState)
    np.testing.assert_array_equal(
        doubled.params["head"]["kernel"], 2 * state.params["head"]["kernel"]
    )
    lg, ft, ms = apply_model(tiny_mlp, state.params, state.model_state, jnp.zeros((2, *INPUT)))
    assert ms == {} and lg.shape == (2, 10) and ft.shape == (2, 16)
