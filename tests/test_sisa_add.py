"""Adding samples to a trained SISA model (:meth:`SISAModel.add`, :meth:`ShardPlan.extend`).

Reference: SISA trained from scratch on the *extended* plan and the combined data, same key and
settings, in another directory. After ``add`` every shard must equal it bitwise; shards that got
no new sample must keep their parameters exactly; forgetting a new id afterwards must equal the
from-scratch run without it.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from privdebias_jax.data import concat, make_dataset, remove_ids
from privdebias_jax.types import PrivDebiasError
from privdebias_jax.unlearn import PADDING_ID, ShardPlan, SISAModel, train_shards
from tests.test_sisa import BATCH, DATA, EPOCHS, KEY, MODEL, PLAN, TX, _tabular

NEW = _tabular(10, 3, 90000)  # 10 new samples, fresh ids


def _train(directory, ds, plan, epochs=EPOCHS):
    return train_shards(MODEL, TX, ds, plan, directory, key=KEY, epochs_per_slice=epochs, batch_size=BATCH)


def _assert_equal(a, b, what):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), what


def test_extend_places_every_new_id_once_and_keeps_old_slots():
    plan = PLAN.extend(NEW.idx, key=1, shards=[1, 3])
    c = PLAN.slice_capacity
    assert plan.slots.shape == (PLAN.num_shards, PLAN.num_slices + 1, c)  # 10 ids ≤ 2 shards × c
    assert np.array_equal(plan.slots[:, : PLAN.num_slices], PLAN.slots)
    new_part = plan.slots[:, PLAN.num_slices :]
    placed = new_part[new_part != PADDING_ID]
    assert sorted(placed.tolist()) == sorted(np.asarray(NEW.idx).tolist())
    # only the chosen shards receive samples, evenly (5 and 5)
    per_shard = (new_part != PADDING_ID).reshape(PLAN.num_shards, -1).sum(1)
    assert per_shard.tolist() == [0, 5, 0, 5]
    assert plan.slice_is_empty(0, PLAN.num_slices) and not plan.slice_is_empty(1, PLAN.num_slices)
    # many new ids over all shards: k = ⌈n / (S·c)⌉ new slices, balanced
    many = np.arange(10**6, 10**6 + 3 * PLAN.num_shards * c + 1)
    big = PLAN.extend(many, key=2)
    assert big.num_slices == PLAN.num_slices + 4
    counts = (big.slots[:, PLAN.num_slices :] != PADDING_ID).reshape(PLAN.num_shards, -1).sum(1)
    assert counts.max() - counts.min() <= 1 and counts.sum() == many.size


@pytest.mark.parametrize(
    "ids, shards, match",
    [
        ([], None, "at least one"),
        ([-3], None, "non-negative"),
        ([900001, 900001], None, "unique"),
        (None, None, "already in the plan"),
        ([900001], [4], "shard indices"),
        ([900001], [1, 1], "shard indices"),
    ],
)
def test_extend_rejects_bad_input(ids, shards, match):
    ids = [int(PLAN.ids[0])] if ids is None else ids
    with pytest.raises(PrivDebiasError, match=match):
        PLAN.extend(np.asarray(ids, np.int64), shards=shards)


def test_add_equals_from_scratch_on_extended_plan_and_untouched_shards_keep_params(tmp_path):
    sisa, _ = _train(tmp_path / "inc", DATA, PLAN)
    before = [sisa.shard_state(s) for s in range(PLAN.num_shards)]
    cost = sisa.add(NEW, key=1, shards=[1, 3])
    assert sisa.plan.num_slices == PLAN.num_slices + 1
    assert sorted(cost.shards) == [0, 1, 2, 3]  # every shard visited; 0 and 2 skip the stage
    assert cost.programs == 1  # one vmapped program for the two receiving shards (W = S)
    ref, _ = _train(tmp_path / "ref", concat(DATA, NEW), sisa.plan, epochs=EPOCHS + (EPOCHS[-1],))
    for s in range(PLAN.num_shards):
        _assert_equal(sisa.shard_state(s), ref.shard_state(s), f"shard {s} after add")
    for s in (0, 2):
        _assert_equal(sisa.shard_state(s), before[s], f"untouched shard {s}")
    for s in (1, 3):
        p0 = jax.tree_util.tree_leaves(before[s].params)[0]
        p1 = jax.tree_util.tree_leaves(sisa.shard_state(s).params)[0]
        assert not np.array_equal(np.asarray(p0), np.asarray(p1))
    # the directory is reopenable with the combined data, and forgetting a new id is exact
    reopened = SISAModel.open(tmp_path / "inc", MODEL, TX, concat(DATA, NEW))
    gone = int(np.asarray(NEW.idx)[0])
    shard = int(reopened.plan.locate([gone])[0][0])
    reopened.forget([gone])
    padded = ShardPlan(np.where(reopened.plan.slots == gone, PADDING_ID, reopened.plan.slots))
    ref2, _ = _train(
        tmp_path / "ref2", remove_ids(concat(DATA, NEW), [gone]), padded, epochs=EPOCHS + (EPOCHS[-1],)
    )
    _assert_equal(reopened.shard_state(shard), ref2.shard_state(shard), "forget after add")
    meta = json.loads((tmp_path / "inc" / "meta.json").read_text())
    assert meta["lineage"] != meta["fingerprint"]  # the ledger keeps the original identity


def test_interrupted_add_is_completed_by_open(tmp_path, monkeypatch):
    sisa, _ = _train(tmp_path / "inc", DATA, PLAN)
    calls = {"n": 0}
    original = SISAModel._run_stage

    def crash(self, *args, **kw):
        calls["n"] += 1
        raise KeyboardInterrupt("injected crash")

    monkeypatch.setattr(SISAModel, "_run_stage", crash)
    with pytest.raises(KeyboardInterrupt):
        sisa.add(NEW, key=1)
    monkeypatch.setattr(SISAModel, "_run_stage", original)
    assert calls["n"] == 1
    with pytest.raises(PrivDebiasError, match="lacks"):
        SISAModel.open(tmp_path / "inc", MODEL, TX, DATA)  # the new samples are required
    reopened = SISAModel.open(tmp_path / "inc", MODEL, TX, concat(DATA, NEW))
    ref, _ = _train(tmp_path / "ref", concat(DATA, NEW), reopened.plan, epochs=EPOCHS + (EPOCHS[-1],))
    for s in range(PLAN.num_shards):
        _assert_equal(reopened.shard_state(s), ref.shard_state(s), f"shard {s} after recovery")


def test_add_rejects_bad_input(tmp_path):
    sisa, _ = _train(tmp_path / "inc", DATA, PLAN)
    sisa.forget([int(PLAN.slots[0, 2, 0])])
    fp = sisa.fingerprint
    wrong_shape = make_dataset(np.zeros((2, 5)), [0, 1], [0, 1], idx=[90000, 90001])
    with pytest.raises(PrivDebiasError, match="shape"):
        sisa.add(wrong_shape)
    reused = make_dataset(np.zeros((1, 6)), [0], [0], idx=[int(PLAN.slots[0, 2, 0])])
    with pytest.raises(PrivDebiasError, match="forgotten"):
        sisa.add(reused)
    with pytest.raises(PrivDebiasError, match="epochs"):
        sisa.add(NEW, epochs=0)
    with pytest.raises(PrivDebiasError, match="already in the plan"):
        sisa.add(make_dataset(np.zeros((1, 6)), [0], [0], idx=[int(PLAN.ids[5])]))
    assert sisa.fingerprint == fp and sisa.plan is not None and sisa.plan.num_slices == PLAN.num_slices


def test_add_with_forget_is_one_retraining_equal_to_add_then_forget(tmp_path):
    """``add(new, forget=ids)`` retrains each shard once; the shards equal, bitwise, ``add`` then
    ``forget`` in another directory, and the merged call trains fewer sample-epochs."""
    old = int(PLAN.slots[1, 0, 0])  # first slice of shard 1: that shard retrains everything
    new = int(np.asarray(NEW.idx)[3])
    seq, _ = _train(tmp_path / "seq", DATA, PLAN)
    cost_add = seq.add(NEW, key=1)
    cost_forget = seq.forget([old, new]).cost
    merged, _ = _train(tmp_path / "merged", DATA, PLAN)
    cost = merged.add(NEW, key=1, forget=[old, new])
    assert merged.plan.fingerprint() == seq.plan.fingerprint()
    assert sorted(merged.forgotten.tolist()) == sorted([old, new])
    assert merged.ledger.pending.size == 0
    for s in range(PLAN.num_shards):
        _assert_equal(merged.shard_state(s), seq.shard_state(s), f"shard {s}: merged vs add+forget")
    # the shards holding a forgotten id train their new stage once instead of twice; the others
    # train only their new stage, as in ``add``
    assert cost_forget.sample_epochs <= cost.sample_epochs < cost_add.sample_epochs + cost_forget.sample_epochs
    # reopening sees the same state; the forgotten ids stay forgotten
    reopened = SISAModel.open(tmp_path / "merged", MODEL, TX, concat(DATA, NEW))
    assert sorted(reopened.forgotten.tolist()) == sorted([old, new])


def test_add_with_bad_forget_ids_changes_nothing(tmp_path):
    sisa, _ = _train(tmp_path / "inc", DATA, PLAN)
    fp, meta = sisa.fingerprint, (tmp_path / "inc" / "meta.json").read_text()
    with pytest.raises(PrivDebiasError, match="unknown|not in the plan"):
        sisa.add(NEW, key=1, forget=[10**8])
    whole_shard = PLAN.slots[2][PLAN.slots[2] != PADDING_ID]
    with pytest.raises(PrivDebiasError, match="no samples"):
        sisa.add(NEW, key=1, shards=[0], forget=whole_shard)
    assert sisa.fingerprint == fp and (tmp_path / "inc" / "meta.json").read_text() == meta
    assert sisa.forgotten.size == 0 and sisa.plan.num_slices == PLAN.num_slices
