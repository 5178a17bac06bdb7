"""Shadow / reference models trained together (teams layout) against plain training replayed
model by model; the one-by-one loop against ``fit``; the team design's balance; bad input."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from privdebias_jax.data import Batch, load_dataset, subset
from privdebias_jax.models import create_model
from privdebias_jax.privacy import shadow as sh
from privdebias_jax.privacy.attacks import train_reference_models
from privdebias_jax.train import create_train_state, fit, make_optimizer, make_train_step
from privdebias_jax.types import PrivDebiasError


@pytest.fixture(scope="module")
def tiny():
    pool = load_dataset("colored-mnist", image_size=6, train_size=44).train
    model = create_model("mlp", 10, hidden=(16,))
    tx = make_optimizer("adam", 1e-2)
    return pool, model, tx


def test_team_design_is_balanced():
    d = sh.team_design(8, 103, jax.random.PRNGKey(0), 10)
    assert d.teams.shape == (10, 4)
    for t in range(5):  # team t + T/2 is the complement of team t
        assert sorted(np.concatenate([d.teams[t], d.teams[t + 5]]).tolist()) == list(range(8))
    np.testing.assert_array_equal(d.member.sum(0), np.full(103, 4))  # every sample IN for R/2
    sizes = np.bincount(d.team_of, minlength=10)
    assert sizes.max() - sizes.min() <= 1
    for r in range(8):  # model r trains on the rows of exactly the teams that list it
        expected = np.isin(d.team_of, np.flatnonzero((d.teams == r).any(1)))
        np.testing.assert_array_equal(d.member[r] > 0, expected)
    assert 5 * 10 <= d.member[0].sum() <= 5 * 11  # T/2 teams of 10 or 11 rows
    again = sh.team_design(8, 103, jax.random.PRNGKey(0), 10)
    np.testing.assert_array_equal(again.member, d.member)


def test_team_layout_splits_teams_evenly():
    d = sh.team_design(4, 70, jax.random.PRNGKey(1), 2)  # teams of 35 rows
    lay = sh.team_layout(d, 16)
    assert (lay.num_batches, lay.batch) == (3, 12)  # 35 = 12 + 12 + 11, not 16 + 16 + 3
    np.testing.assert_array_equal(lay.valid.sum(1), [35, 35])


@pytest.mark.parametrize("inner", ["scan", "loop"])
def test_teams_equal_plain_training_replayed_per_model(tiny, inner):
    pool, model, tx = tiny
    key = jax.random.PRNGKey(7)
    design = sh.team_design(4, len(pool), jax.random.PRNGKey(2), 4)
    states = sh.train_team_models(model, tx, pool, design, key, epochs=2, batch_size=6, inner=inner)
    lay = sh.team_layout(design, 6)
    step = jax.jit(make_train_step(model, tx))
    init = sh.initial_states(model, tx, pool.x.shape[1:], 4, key)
    data = [np.asarray(v) for v in pool]
    for r in range(4):
        state = jax.tree_util.tree_map(lambda v, r=r: v[r], init)
        taken = 0
        for e in range(2):
            rows, valid, order, step_key = sh.team_epoch_plan(
                jax.random.fold_in(key, 4), e, lay.rows, lay.valid, lay.num_batches
            )
            for s in np.asarray(order):
                t, b = divmod(int(s), lay.num_batches)
                if r not in design.teams[t]:
                    continue
                sel = np.asarray(rows[t, b * lay.batch : (b + 1) * lay.batch])
                m = np.asarray(valid[t, b * lay.batch : (b + 1) * lay.batch])
                batch = Batch(data[0][sel], data[1][sel].astype(np.int32), data[2][sel], sel, m)
                state, _ = step(state, batch, step_key)
                taken += 1
        assert taken == 2 * 2 * lay.num_batches  # T/2 teams per epoch
        for got, want in zip(
            jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda v, r=r: v[r], states.params)),
            jax.tree_util.tree_leaves(state.params),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    again = sh.train_team_models(model, tx, pool, design, key, epochs=2, batch_size=6, inner=inner)
    for a, b in zip(
        jax.tree_util.tree_leaves(again.params),
        jax.tree_util.tree_leaves(states.params),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_one_by_one_equals_fit(tiny):
    pool, model, tx = tiny
    key = jax.random.PRNGKey(3)
    member = np.zeros((2, len(pool)), np.float32)
    member[0, ::2] = 1
    member[1, 1::2] = 1
    states = sh.train_models_one_by_one(
        model, tx, pool, member, key, epochs=2, batch_size=8, inner="loop"
    )
    for r in range(2):
        k_r = jax.random.fold_in(key, r)
        state = create_train_state(model, tx, jax.random.fold_in(k_r, 0), pool.x.shape[1:])
        want = fit(
            model,
            tx,
            state,
            subset(pool, np.flatnonzero(member[r])),
            epochs=2,
            batch_size=8,
            key=jax.random.fold_in(k_r, 1),
            steps_per_call=1,
            progress=False,
        ).state
        for got, w in zip(
            jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda v, r=r: v[r], states.params)),
            jax.tree_util.tree_leaves(want.params),
            strict=True,
        ):
            np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_reference_models_layouts_and_bad_input(tiny):
    pool, model, tx = tiny
    ref = train_reference_models(
        model, tx, pool, 4, key=jax.random.PRNGKey(0), epochs=1, batch_size=11
    )
    np.testing.assert_array_equal(ref.member.sum(0), np.full(len(pool), 2))
    assert jax.tree_util.tree_leaves(ref.states.params)[0].shape[0] == 4
    with pytest.raises(PrivDebiasError, match="layout"):
        train_reference_models(
            model, tx, pool, 4, key=jax.random.PRNGKey(0), epochs=1, batch_size=8, layout="fast"
        )
    with pytest.raises(PrivDebiasError, match="even"):
        sh.team_design(3, 10, jax.random.PRNGKey(0), 2)
    with pytest.raises(PrivDebiasError, match="teams must be even"):
        sh.team_design(4, 10, jax.random.PRNGKey(0), 3)
    with pytest.raises(PrivDebiasError, match="at least 12 pool samples"):
        sh.team_design(4, 10, jax.random.PRNGKey(0), 12)
    d = sh.team_design(4, 10, jax.random.PRNGKey(0), 2)
    with pytest.raises(PrivDebiasError, match="covers 10 rows"):
        sh.train_team_models(model, tx, pool, d, jax.random.PRNGKey(0), epochs=1, batch_size=4)
    with pytest.raises(PrivDebiasError, match="positive"):
        train_reference_models(
            model, tx, pool, 4, key=jax.random.PRNGKey(0), epochs=0, batch_size=8
        )
    with pytest.raises(PrivDebiasError, match="no training rows"):
        sh.train_models_one_by_one(
            model, tx, pool, np.zeros((1, len(pool))), jax.random.PRNGKey(0), epochs=1, batch_size=4
        )
