"""SISA plans (:mod:`privdebias_jax.unlearn.plan`) and the deletion ledger (:mod:`~.ledger`).

References: brute-force scans of ``plan.slots``, hand-computed weighted placements and
hand-written ledger files. No training here, so the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from privdebias_jax.types import PrivDebiasError
from privdebias_jax.unlearn import PADDING_ID, Ledger, ShardPlan, make_plan
from privdebias_jax.unlearn.ledger import atomic_write_json

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _ids(n: int, offset: int = 1000) -> np.ndarray:
    """``n`` unique, non-contiguous, unsorted sample ids (so positions never pass for ids)."""
    rng = np.random.default_rng(n)
    return offset + 3 * rng.permutation(n).astype(np.int64)


def _brute_locate(plan: ShardPlan, i: int) -> tuple[int, int]:
    hits = np.argwhere(plan.slots == i)
    assert hits.shape[0] == 1, f"id {i} found {hits.shape[0]} times"
    return int(hits[0, 0]), int(hits[0, 1])


def _sizes(plan: ShardPlan) -> tuple[np.ndarray, np.ndarray]:
    real = plan.slots != PADDING_ID
    return real.sum(axis=(1, 2)), real.sum(axis=2)


SHAPES = [(12, 2, 3), (23, 3, 2), (50, 4, 3), (7, 7, 1), (10, 1, 10), (101, 5, 4)]


# ------------------------------------------------------------------------------------------
# make_plan: layout
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
@pytest.mark.parametrize(("n", "s", "r"), SHAPES)
def test_every_id_appears_exactly_once(n, s, r, weighted):
    ids = _ids(n)
    probs = np.random.default_rng(1).random(n) if weighted else None
    plan = make_plan(ids, s, r, key=3, deletion_probs=probs)
    c = -(-n // (s * r))
    assert plan.slots.shape == (s, r, c)
    assert plan.slots.dtype == np.int64
    assert (plan.num_shards, plan.num_slices, plan.slice_capacity) == (s, r, c)
    assert plan.shard_capacity == r * c
    flat = plan.slots.reshape(-1)
    real = flat[flat != PADDING_ID]
    assert real.size == n
    np.testing.assert_array_equal(np.sort(real), np.sort(ids))
    np.testing.assert_array_equal(plan.ids, np.sort(ids))
    assert np.sum(flat == PADDING_ID) == s * r * c - n
    assert plan.strategy == ("weighted" if weighted else "uniform")


@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
@pytest.mark.parametrize(("n", "s", "r"), SHAPES)
def test_shard_and_slice_sizes_are_balanced(n, s, r, weighted):
    probs = np.random.default_rng(2).random(n) if weighted else None
    plan = make_plan(_ids(n), s, r, key=5, deletion_probs=probs)
    shard_sizes, slice_sizes = _sizes(plan)
    assert shard_sizes.sum() == n
    assert shard_sizes.max() - shard_sizes.min() <= 1
    assert np.all(slice_sizes >= 1), "every slice must hold at least one sample"
    for k in range(s):
        assert slice_sizes[k].max() - slice_sizes[k].min() <= 1
    # padding only at the end of a slice: the real ids of slice j are a prefix of its slots
    real = plan.slots != PADDING_ID
    assert np.all(real[..., :-1] >= real[..., 1:])
    np.testing.assert_array_equal(plan.shard_sizes(), shard_sizes)


def test_same_key_same_plan_different_key_different_plan():
    ids = _ids(60)
    a = make_plan(ids, 3, 2, key=7)
    b = make_plan(ids, 3, 2, key=7)
    c = make_plan(ids, 3, 2, key=8)
    np.testing.assert_array_equal(a.slots, b.slots)
    assert a.fingerprint() == b.fingerprint()
    assert not np.array_equal(a.slots, c.slots)
    assert a.fingerprint() != c.fingerprint()
    # an int key and the PRNGKey built from it are the same key
    d = make_plan(ids, 3, 2, key=jax.random.PRNGKey(7))
    np.testing.assert_array_equal(a.slots, d.slots)
    # the uniform plan is a shuffle, not the ids in input order
    assert not np.array_equal(a.slots.reshape(-1)[:60], ids)


def test_ids_order_of_input_does_not_matter_for_membership():
    ids = _ids(40)
    plan = make_plan(ids[::-1], 2, 2, key=0)
    np.testing.assert_array_equal(plan.ids, np.sort(ids))


# ------------------------------------------------------------------------------------------
# locate / shard_sizes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "s", "r"), SHAPES)
def test_locate_matches_brute_force_scan(n, s, r):
    ids = _ids(n)
    plan = make_plan(ids, s, r, key=11)
    query = np.random.default_rng(0).permutation(ids)
    shards, slices = plan.locate(query)
    expected = np.array([_brute_locate(plan, int(i)) for i in query])
    np.testing.assert_array_equal(shards, expected[:, 0])
    np.testing.assert_array_equal(slices, expected[:, 1])
    # a single id (Python int) and repeated ids
    one_s, one_r = plan.locate(int(query[0]))
    assert (int(one_s[0]), int(one_r[0])) == tuple(expected[0])
    rep_s, _ = plan.locate([query[1], query[1]])
    assert rep_s.tolist() == [expected[1, 0]] * 2


def test_locate_on_a_plan_with_padding_slots_replaced():
    """A plan whose ids were turned into padding (the from-scratch reference of a deletion)."""
    ids = _ids(30)
    plan = make_plan(ids, 3, 2, key=1)
    gone = plan.slots[1, 0, :2].copy()
    padded = ShardPlan(np.where(np.isin(plan.slots, gone), PADDING_ID, plan.slots))
    keep = np.setdiff1d(ids, gone)
    s1, r1 = padded.locate(keep)
    s2, r2 = plan.locate(keep)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(r1, r2)
    with pytest.raises(PrivDebiasError, match="unknown sample id"):
        padded.locate(gone[:1])


@pytest.mark.parametrize(
    ("query", "match"),
    [
        ([5], r"unknown sample id\(s\) \[5\]"),
        ([10**9], "unknown sample id"),
        ([-1], "non-negative"),
        ([-7, 1000], "non-negative"),
    ],
    ids=["below-range", "above-range", "padding-id", "negative-with-valid"],
)
def test_locate_rejects_unknown_and_negative_ids(query, match):
    plan = make_plan(_ids(20), 2, 2, key=0)  # ids are 1000 + 3k
    with pytest.raises(PrivDebiasError, match=match):
        plan.locate(query)


def test_locate_error_names_the_unknown_id_among_known_ones():
    ids = _ids(20)
    plan = make_plan(ids, 2, 2, key=0)
    with pytest.raises(PrivDebiasError, match=r"\[1001\]"):
        plan.locate([int(ids[0]), 1001, int(ids[3])])


def test_shard_sizes_with_deleted_ids_matches_brute_force():
    ids = _ids(45)
    plan = make_plan(ids, 3, 3, key=2)
    deleted = np.concatenate([plan.slots[0, 0, :2], plan.slots[2, 2, :1]])
    expected = [
        int(np.sum(np.isin(plan.slots[k], ids) & ~np.isin(plan.slots[k], deleted)))
        for k in range(3)
    ]
    assert plan.shard_sizes(deleted).tolist() == expected
    assert plan.shard_sizes(deleted).tolist() == [13, 15, 14]


# ------------------------------------------------------------------------------------------
# weighted (distribution-aware) placement, hand-computed
# ------------------------------------------------------------------------------------------


def test_weighted_plan_matches_hand_computed_layout():
    # 12 ids, S = 2, R = 3 → c = 2, every slice full. Distinct probabilities: no ties.
    ids = np.array([40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51])
    probs = np.array([0.05, 0.9, 0.3, 0.8, 0.01, 0.6, 0.2, 0.7, 0.4, 0.5, 0.1, 0.02])
    # ids by decreasing probability: 41 43 47 45 49 48 | 42 46 50 40 51 44
    plan = make_plan(ids, 2, 3, key=0, deletion_probs=probs)
    expected = np.array(
        [
            [[49, 48], [47, 45], [41, 43]],  # shard 0: the six most likely, most likely last
            [[51, 44], [50, 40], [42, 46]],
        ]
    )
    np.testing.assert_array_equal(plan.slots, expected)
    assert plan.strategy == "weighted"
    # the same for any key: no ties to break
    np.testing.assert_array_equal(
        make_plan(ids, 2, 3, key=99, deletion_probs=probs).slots, expected
    )


def test_weighted_plan_with_uneven_slices_fills_last_slices_first():
    # 10 ids, S = 2, R = 2 → c = 3; each shard has 5 = 3 + 2: slice 0 gets the extra sample,
    # the last slice (2 samples) gets the two most likely deletions of the shard.
    ids = np.arange(10)
    probs = np.array([0.0, 1.0, 0.2, 0.9, 0.3, 0.8, 0.4, 0.7, 0.5, 0.6])
    # decreasing: 1 3 5 7 9 | 8 6 4 2 0
    plan = make_plan(ids, 2, 2, key=0, deletion_probs=probs)
    expected = np.array(
        [
            [[5, 7, 9], [1, 3, PADDING_ID]],
            [[4, 2, 0], [8, 6, PADDING_ID]],
        ]
    )
    np.testing.assert_array_equal(plan.slots, expected)


def test_weighted_plan_breaks_ties_at_random_within_a_probability_level():
    ids = np.arange(100, 112)
    probs = np.where(ids < 104, 0.9, 0.1)  # 4 likely deletions, 8 unlikely
    plans = [make_plan(ids, 2, 3, key=k, deletion_probs=probs) for k in range(6)]
    for plan in plans:
        # the 4 likely ids fill shard 0's slices 2 and 1 (4 slots), whatever the key
        np.testing.assert_array_equal(np.sort(plan.slots[0, 1:].reshape(-1)), np.arange(100, 104))
        assert not np.isin(plan.slots[1], np.arange(100, 104)).any()
    layouts = {plan.slots.tobytes() for plan in plans}
    assert len(layouts) > 1, "ties must be broken by the key"


def test_weighted_plan_with_equal_probabilities_is_a_valid_plan():
    ids = _ids(30)
    plan = make_plan(ids, 3, 2, key=4, deletion_probs=np.full(30, 0.5))
    np.testing.assert_array_equal(plan.ids, np.sort(ids))
    shard_sizes, _ = _sizes(plan)
    assert shard_sizes.tolist() == [10, 10, 10]


# ------------------------------------------------------------------------------------------
# make_plan: errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ids": np.arange(10), "num_shards": 0, "num_slices": 2}, "at least 1"),
        ({"ids": np.arange(10), "num_shards": 2, "num_slices": 0}, "at least 1"),
        ({"ids": np.arange(10), "num_shards": -1, "num_slices": 2}, "at least 1"),
        (
            {"ids": np.arange(10), "num_shards": 4, "num_slices": 3},
            r"S·R = 4·3 = 12 exceeds the 10",
        ),
        ({"ids": np.arange(0), "num_shards": 1, "num_slices": 1}, "exceeds the 0"),
        ({"ids": [1, 2, 3, 3, 4], "num_shards": 2, "num_slices": 1}, "unique"),
        ({"ids": [1, 2, -3, 4], "num_shards": 2, "num_slices": 1}, "non-negative"),
        ({"ids": [1.0, 2.0, 3.0], "num_shards": 1, "num_slices": 1}, "integers"),
    ],
    ids=["S=0", "R=0", "S<0", "SR>N", "empty", "duplicate", "negative", "float-ids"],
)
def test_make_plan_rejects_bad_arguments(kwargs, match):
    with pytest.raises(PrivDebiasError, match=match):
        make_plan(**kwargs, key=0)


@pytest.mark.parametrize(
    ("probs", "match"),
    [
        (np.full(11, 0.1), "11 entries for 12 ids"),
        (np.full(5, 0.1), "5 entries for 12 ids"),
        (np.r_[np.full(11, 0.1), -0.5], "non-negative"),
        (np.r_[np.full(11, 0.1), np.nan], "finite"),
        (np.r_[np.full(11, 0.1), np.inf], "finite"),
    ],
    ids=["too-short", "much-too-short", "negative", "nan", "inf"],
)
def test_make_plan_rejects_bad_deletion_probs(probs, match):
    with pytest.raises(PrivDebiasError, match=match):
        make_plan(np.arange(12), 2, 3, key=0, deletion_probs=probs)


# ------------------------------------------------------------------------------------------
# fingerprint and JSON
# ------------------------------------------------------------------------------------------


def test_fingerprint_changes_when_slots_or_strategy_change():
    plan = make_plan(_ids(24), 2, 3, key=0)
    fp = plan.fingerprint()
    assert len(fp) == 64 and all(ch in "0123456789abcdef" for ch in fp)
    assert ShardPlan(plan.slots.copy(), plan.strategy).fingerprint() == fp
    swapped = plan.slots.copy()
    swapped[0, 0, 0], swapped[1, 2, 1] = swapped[1, 2, 1], swapped[0, 0, 0]
    assert ShardPlan(swapped, plan.strategy).fingerprint() != fp
    padded = plan.slots.copy()
    padded[0, 1, 0] = PADDING_ID
    assert ShardPlan(padded, plan.strategy).fingerprint() != fp
    assert ShardPlan(plan.slots, "weighted").fingerprint() != fp
    # the same ids in a different (S, R, c) shape are a different plan
    reshaped = ShardPlan(plan.slots.reshape(3, 2, 4), plan.strategy)
    assert reshaped.fingerprint() != fp


@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
def test_plan_json_round_trip(weighted):
    ids = _ids(23)
    probs = np.linspace(0, 1, 23) if weighted else None
    plan = make_plan(ids, 3, 2, key=9, deletion_probs=probs)
    text = json.dumps(plan.to_json())  # must be JSON-serialisable as is
    back = ShardPlan.from_json(json.loads(text))
    np.testing.assert_array_equal(back.slots, plan.slots)
    assert back.slots.dtype == np.int64
    assert back.slots.shape == plan.slots.shape
    assert back.strategy == plan.strategy
    assert back.fingerprint() == plan.fingerprint()
    q = ids[::4]
    for a, b in zip(back.locate(q), plan.locate(q), strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------
# ledger
# ------------------------------------------------------------------------------------------


def _read(path) -> dict:
    return json.loads(open(path).read())


def test_ledger_add_is_idempotent_and_numbers_requests(tmp_path):
    path = tmp_path / "ledger.json"
    led = Ledger(path, "fp")
    assert not path.exists()  # nothing written before the first request
    assert led.forgotten.size == 0 and led.pending.size == 0
    new = led.add([7, 3, 7, 11])
    assert new.tolist() == [3, 7, 11]
    assert led.pending.tolist() == [3, 7, 11]
    assert led.add([3, 7]).tolist() == []  # repeated ids: nothing new
    assert led.add(np.array([11, 20])).tolist() == [20]
    assert led.forgotten.tolist() == [3, 7, 11, 20]
    data = _read(path)
    assert data["plan_fingerprint"] == "fp"
    assert data["requests"] == 2  # the all-repeated call is not a request
    assert [(e["id"], e["status"], e["request"]) for e in data["entries"]] == [
        (3, "pending", 1),
        (7, "pending", 1),
        (11, "pending", 1),
        (20, "pending", 2),
    ]


def test_ledger_repeated_add_does_not_rewrite_the_file(tmp_path):
    path = tmp_path / "ledger.json"
    led = Ledger(path, "fp")
    led.add([1, 2])
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    assert led.add([2, 1]).size == 0
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
    led.mark_done()
    led_bytes = path.read_bytes()
    led.mark_done()  # nothing pending any more: no write
    assert path.read_bytes() == led_bytes
    assert before[0] != led_bytes  # mark_done did write once


def test_ledger_pending_to_done(tmp_path):
    led = Ledger(tmp_path / "ledger.json", "fp")
    led.add([5, 6])
    led.mark_done()
    assert led.pending.size == 0
    assert led.forgotten.tolist() == [5, 6]
    led.add([6, 9])
    assert led.pending.tolist() == [9]
    assert led.forgotten.tolist() == [5, 6, 9]
    statuses = {e["id"]: e["status"] for e in _read(tmp_path / "ledger.json")["entries"]}
    assert statuses == {5: "done", 6: "done", 9: "pending"}


def test_ledger_survives_reopening(tmp_path):
    path = tmp_path / "ledger.json"
    led = Ledger(path, "fp")
    led.add([4, 2])
    led.mark_done()
    led.add([8])
    again = Ledger(path, "fp")
    assert again.forgotten.tolist() == [2, 4, 8]
    assert again.pending.tolist() == [8]
    assert again.requests == 2
    assert again.add([2, 4, 8]).size == 0
    assert again.add([10]).tolist() == [10]
    assert again.entries[10]["request"] == 3
    again.mark_done()
    third = Ledger(path, "fp")
    assert third.pending.size == 0
    assert third.forgotten.tolist() == [2, 4, 8, 10]


def test_ledger_fingerprint_mismatch_raises(tmp_path):
    path = tmp_path / "ledger.json"
    Ledger(path, "plan-a").add([1])
    with pytest.raises(PrivDebiasError, match="fingerprint mismatch"):
        Ledger(path, "plan-b")


@pytest.mark.parametrize("text", ['{"plan_fingerprint": "fp", "entries": [', "", "not json"])
def test_ledger_corrupt_json_raises(tmp_path, text):
    path = tmp_path / "ledger.json"
    path.write_text(text)
    with pytest.raises(PrivDebiasError, match="not valid JSON"):
        Ledger(path, "fp")


def test_ledger_valid_json_of_wrong_type_raises_privdebias_error(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(PrivDebiasError):
        Ledger(path, "fp")


def test_atomic_write_json_leaves_no_tmp_file(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"a": [1, 2, 3]})
    assert _read(path) == {"a": [1, 2, 3]}
    atomic_write_json(path, {"b": 2})  # replaces an existing file
    assert _read(path) == {"b": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_write_json_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})  # not JSON-serialisable
    assert _read(path) == {"ok": 1}
