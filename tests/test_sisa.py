"""SISA training and exact forgetting (:mod:`privdebias_jax.unlearn.sisa`) and the shard ensemble.

The reference for every forget is an independent from-scratch SISA run: the same plan with the
forgotten ids turned into padding (``ShardPlan(slots with the ids replaced by -1)``), the
training set without them (:func:`~privdebias_jax.data.remove_ids`), the same key and settings,
in another directory. Forgetting must reproduce it *bitwise*: every leaf of every shard's
``TrainState`` (step, params, model state, optimiser state) ``np.array_equal``.

Data: a synthetic tabular set of 118 samples with non-contiguous ids (shards 2 and 3 have a
padding slot), ``S = 4`` shards × ``R = 3`` slices, a 6-8-3 MLP, Adam; one tiny CNN test on
8×8 Colored-MNIST for ``layout="loop"`` and batch norm.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from shared_checks import assert_state_bitwise_equal

from privdebias_jax.data import make_dataset, remove_ids, subset
from privdebias_jax.models import create_model
from privdebias_jax.multi import auto_program_width
from privdebias_jax.train import evaluate, make_optimizer, predict
from privdebias_jax.types import PrivDebiasError
from privdebias_jax.unlearn import (
    PADDING_ID,
    ShardPlan,
    SISAConfig,
    SISAModel,
    aggregate_logits,
    ensemble_from_states,
    make_plan,
    sisa_epochs,
    store,
    train_shards,
)

S, R = 4, 3
N = 118
EPOCHS = (1, 2, 1)
BATCH = 8
KEY = 7
MODEL = create_model("tabular_mlp", 3, hidden=(8,))
TX = make_optimizer("adam", 1e-2)  # one object: the compiled stage programs are cached per tx


def _tabular(n: int, seed: int, id_offset: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    a = rng.integers(0, 2, n)
    idx = id_offset + 7 * rng.permutation(n)
    return make_dataset(x, y, a, idx=idx, num_classes=3, num_attributes=2)


DATA = _tabular(N, 0, 5000)
PLAN = make_plan(DATA.idx, S, R, key=11)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def pick(plan: ShardPlan, shard: int, slice_: int, k: int = 0) -> int:
    """The id in slot ``k`` of ``(shard, slice_)``."""
    i = int(plan.slots[shard, slice_, k])
    assert i != PADDING_ID
    return i


def train(directory, ds=DATA, plan=PLAN, model=MODEL, **kw):
    settings = {"key": KEY, "epochs_per_slice": EPOCHS, "batch_size": BATCH, **kw}
    return train_shards(model, TX, ds, plan, directory, **settings)


_REFERENCES: dict[tuple[int, ...], SISAModel] = {}


def reference(directory, forgotten, ds=DATA, plan=PLAN, model=MODEL, **kw) -> SISAModel:
    """SISA trained from scratch without ``forgotten``: their slots padding, their rows gone.

    With the default data, plan, model and settings the result is cached per id set (several
    crash tests compare against the same reference).
    """
    forgotten = np.asarray(sorted(forgotten), np.int64)
    default = ds is DATA and plan is PLAN and model is MODEL and not kw
    key = tuple(forgotten.tolist())
    if default and key in _REFERENCES:
        return _REFERENCES[key]
    padded = ShardPlan(
        np.where(np.isin(plan.slots, forgotten), PADDING_ID, plan.slots), plan.strategy
    )
    sisa, _ = train(directory, ds=remove_ids(ds, forgotten), plan=padded, model=model, **kw)
    if default:
        _REFERENCES[key] = sisa
    return sisa


def assert_shards_equal(sisa: SISAModel, ref: SISAModel):
    assert sisa.plan.num_shards == ref.plan.num_shards
    for s in range(sisa.plan.num_shards):
        assert_state_bitwise_equal(sisa.shard_state(s), ref.shard_state(s), f"shard {s}")


def states_differ(a, b) -> bool:
    return any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """``{relative path: (mtime_ns, sha256)}`` of every file under ``root``."""
    root = Path(root)
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def under(snap: dict, prefix: str) -> dict:
    return {k: v for k, v in snap.items() if k.startswith(prefix)}


def ledger_entries(directory: Path) -> dict[int, str]:
    data = json.loads((Path(directory) / "ledger.json").read_text())
    return {e["id"]: e["status"] for e in data["entries"]}


def copy_of(base: Path, tmp_path: Path) -> tuple[Path, SISAModel]:
    """A private copy of a trained SISA directory, reopened from disk."""
    d = tmp_path / "sisa"
    shutil.copytree(base, d)
    return d, SISAModel.open(d, MODEL, TX, DATA)


def expected_cost(plan, start: dict[int, int], forgotten, width: int) -> tuple[int, int, int]:
    """``(programs, lane_stages, sample_epochs)`` of retraining ``start`` (independent count)."""
    programs = sample_epochs = 0
    for t in range(min(start.values()), plan.num_slices):
        lanes = [s for s, r0 in start.items() if r0 <= t]
        programs += math.ceil(len(lanes) / width)
        for s in lanes:
            ids = plan.slots[s, : t + 1].reshape(-1)
            alive = (ids != PADDING_ID) & ~np.isin(ids, forgotten)
            sample_epochs += int(alive.sum()) * EPOCHS[t]
    return programs, programs * width, sample_epochs


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A trained SISA directory (W = S); tests copy it before changing anything."""
    d = tmp_path_factory.mktemp("base") / "sisa"
    train(d)
    return d


@pytest.fixture(scope="module")
def base_sisa(base) -> SISAModel:
    return SISAModel.open(base, MODEL, TX, DATA)


# ------------------------------------------------------------------------------------------
# exactness
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [None, 1], ids=["W=S", "W=1"])
def test_forget_matches_from_scratch(tmp_path, width):
    sisa, cost = train(tmp_path / "a", program_width=width)
    w = S if width is None else width
    assert cost.shards == {0: 0, 1: 0, 2: 0, 3: 0}
    assert cost.programs == R * math.ceil(S / w)
    before = [sisa.shard_state(s) for s in range(S)]
    # ids in three shards: the first, the last and a middle slice
    ids = [pick(PLAN, 0, 0), pick(PLAN, 2, R - 1, 3), pick(PLAN, 3, 1, 5)]
    report = sisa.forget(ids)
    assert report.requested == sorted(ids)
    assert report.new == sorted(ids)
    assert report.recovered == []
    start = {0: 0, 2: R - 1, 3: 1}
    assert report.cost.shards == start
    c = report.cost
    assert (c.programs, c.lane_stages, c.sample_epochs) == expected_cost(PLAN, start, ids, w)
    assert c.seconds >= c.restore_seconds + c.save_seconds > 0
    ref = reference(tmp_path / "ref", ids, program_width=width)
    assert_shards_equal(sisa, ref)
    assert_state_bitwise_equal(sisa.shard_state(1), before[1], "untouched shard 1")
    for s in (0, 2, 3):
        assert states_differ(sisa.shard_state(s).params, before[s].params), f"shard {s} unchanged"
    # the checkpoints on disk hold the same states
    reopened = SISAModel.open(tmp_path / "a", MODEL, TX, DATA)
    assert_shards_equal(reopened, ref)


def test_two_successive_forgets_match_from_scratch_without_the_union(tmp_path):
    # W = 3 with S = 4: the second program of a stage has two dummy lanes
    sisa, _ = train(tmp_path / "a", program_width=3)
    first = [pick(PLAN, 1, 0, 4), pick(PLAN, 3, 2)]
    second = [pick(PLAN, 1, 2, 1), pick(PLAN, 0, 1, 7)]
    r1 = sisa.forget(first)
    r2 = sisa.forget(second)
    assert r1.cost.shards == {1: 0, 3: 2}
    assert r2.new == sorted(second)
    assert r2.cost.shards == {0: 1, 1: 2}
    c = r2.cost
    expected = expected_cost(PLAN, {0: 1, 1: 2}, first + second, 3)
    assert (c.programs, c.lane_stages, c.sample_epochs) == expected
    assert sisa.forgotten.tolist() == sorted(first + second)
    ref = reference(tmp_path / "ref", first + second, program_width=3)
    assert_shards_equal(sisa, ref)
    assert ledger_entries(tmp_path / "a") == {i: "done" for i in first + second}


def test_forget_with_cnn_loop_layout_and_batch_norm_matches_from_scratch(tmp_path, colored8):
    ds = subset(colored8.train, np.arange(120))
    plan = make_plan(ds.idx, 3, 2, key=4)
    cnn = create_model("small_cnn", 10, widths=(4, 8), strides=(2, 2), norm="batch")
    kw = {"model": cnn, "ds": ds, "plan": plan, "batch_size": 16, "epochs_per_slice": (1, 1)}
    sisa, _ = train(tmp_path / "a", program_width=2, layout="loop", **kw)
    assert sisa.layout == "loop"
    ids = [pick(plan, 1, 1, 2), pick(plan, 2, 0, 6)]
    report = sisa.forget(ids)
    assert report.cost.shards == {1: 1, 2: 0}
    assert report.cost.programs == 2  # one per stage and group (not per batch)
    ref = reference(tmp_path / "ref", ids, program_width=2, layout="loop", **kw)
    assert_shards_equal(sisa, ref)  # params, optimiser state and batch statistics
    # batch statistics go into the ensemble, member by member
    _, params, model_state = sisa.ensemble()
    for s in range(3):
        member = jax.tree_util.tree_map(
            lambda v, s=s: np.asarray(v[s]), model_state["batch_stats"]["members"]
        )
        assert_state_bitwise_equal(
            member, sisa.shard_state(s).model_state["batch_stats"], f"bn {s}"
        )
        member = jax.tree_util.tree_map(lambda v, s=s: np.asarray(v[s]), params["members"])
        assert_state_bitwise_equal(member, sisa.shard_state(s).params, f"params {s}")
    # ... and the ensemble predicts with each member's own statistics
    x = np.asarray(colored8.test.x[:6])
    logits, _ = predict(*sisa.ensemble(), x)
    members = [
        predict(cnn, sisa.shard_state(s).params, sisa.shard_state(s).model_state, x)[0]
        for s in range(3)
    ]
    np.testing.assert_allclose(
        logits, np_log_mean_softmax(np.stack(members))[0], rtol=1e-5, atol=1e-5
    )
    states = [sisa.shard_state(s) for s in range(3)]
    swapped = [states[0], states[1].replace(model_state=states[0].model_state), states[2]]
    assert states_differ(states[0].model_state, states[1].model_state)
    other = predict(*ensemble_from_states(cnn, swapped), x)[0]
    assert not np.allclose(other, logits, rtol=0, atol=1e-6), "batch statistics had no effect"


def test_auto_layout_resolves_by_model(tmp_path, colored8):
    ds = subset(colored8.train, np.arange(40))
    plan = make_plan(ds.idx, 2, 2, key=0)
    cnn = create_model("small_cnn", 10, widths=(4, 8), strides=(2, 2))
    mlp = create_model("mlp", 10, hidden=(16,))
    config = SISAConfig((1, 1), 8)
    assert SISAModel(cnn, TX, ds, plan, config, tmp_path / "c", key=0).layout == "loop"
    assert SISAModel(mlp, TX, ds, plan, config, tmp_path / "m", key=0).layout == "scan"
    # the automatic program width follows the same rule: one lane for a CNN on the CPU
    shape = tuple(np.shape(ds.x)[1:])
    assert jax.default_backend() == "cpu"
    assert auto_program_width(cnn, TX, shape, 4) == 1
    assert auto_program_width(mlp, TX, shape, 4) == 4
    with pytest.raises(PrivDebiasError, match="num_shards"):
        auto_program_width(mlp, TX, shape, 0)


def test_forget_after_reopen_matches_from_scratch(base, tmp_path):
    d, sisa = copy_of(base, tmp_path)
    ids = [pick(PLAN, 2, 0, 1), pick(PLAN, 2, 2, 8)]
    assert sisa.forget(ids).cost.shards == {2: 0}
    assert_shards_equal(sisa, reference(tmp_path / "ref", ids))


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------


def test_forget_rewrites_only_the_affected_checkpoints(base, tmp_path):
    d, sisa = copy_of(base, tmp_path)
    before = snapshot(d)
    report = sisa.forget([pick(PLAN, 0, 1, 3), pick(PLAN, 2, 2), pick(PLAN, 1, 0, 2)])
    assert report.cost.shards == {0: 1, 1: 0, 2: 2}
    # saves: stages 2..R of shard 0, 1..R of shard 1 (not its initial state), 3..R of shard 2
    assert (report.cost.saves, report.cost.restores) == ((R - 1) + R + (R - 2), 2)
    after = snapshot(d)
    for s in (3,):  # unaffected shard: not a byte, not an mtime changed
        assert under(after, f"shards/{s}/") == under(before, f"shards/{s}/")
        assert under(before, f"shards/{s}/")
    # affected shards: checkpoints up to the start stage kept, the later ones rewritten
    for s, r0 in ((0, 1), (1, 0), (2, 2)):
        for t in range(R + 1):
            old, new = under(before, f"shards/{s}/{t}/"), under(after, f"shards/{s}/{t}/")
            assert old and new
            if t <= r0:
                assert new == old, f"shard {s} checkpoint {t} was rewritten"
            else:
                assert new != old, f"shard {s} checkpoint {t} was not rewritten"
    assert after["meta.json"] == before["meta.json"]
    assert "ledger.json" not in before and "ledger.json" in after


def test_reopen_gives_the_same_states_and_ledger_and_writes_nothing(base, tmp_path):
    d, sisa = copy_of(base, tmp_path)
    ids = [pick(PLAN, 1, 1, 1), pick(PLAN, 3, 0)]
    sisa.forget(ids)
    before = snapshot(d)
    again = SISAModel.open(d, MODEL, TX, DATA)
    assert snapshot(d) == before
    assert again.forgotten.tolist() == sorted(ids)
    assert again.ledger.pending.size == 0
    assert again.ledger.entries == sisa.ledger.entries
    for s in range(S):
        assert_state_bitwise_equal(again.shard_state(s), sisa.shard_state(s), f"shard {s}")


def test_resume_retrains_only_the_missing_last_stage(base, tmp_path):
    d = tmp_path / "sisa"
    shutil.copytree(base, d)
    shutil.rmtree(d / "shards" / "2" / str(R))
    before = snapshot(d)
    sisa, cost = train(d, resume=True)
    assert cost.shards == {2: R - 1}
    assert (cost.programs, cost.lane_stages) == (1, S)
    assert (d / "shards" / "2" / str(R)).is_dir()
    after = snapshot(d)
    for s in (0, 1, 3):
        assert under(after, f"shards/{s}/") == under(before, f"shards/{s}/")
    for t in range(R):
        assert under(after, f"shards/2/{t}/") == under(before, f"shards/2/{t}/")
    original = SISAModel.open(base, MODEL, TX, DATA)
    assert_shards_equal(sisa, original)
    # a complete directory: nothing to do
    _, cost = train(d, resume=True)
    assert cost.shards == {} and cost.programs == 0


# ------------------------------------------------------------------------------------------
# crash injection
# ------------------------------------------------------------------------------------------


def crash_on_save(monkeypatch, after: int) -> list:
    """Let ``after`` shard saves through, then raise on the next one."""
    saved = []
    original = SISAModel._save

    def flaky(self, shard, stage_done, state):
        if len(saved) >= after:
            raise RuntimeError("injected crash")
        saved.append((shard, stage_done))
        return original(self, shard, stage_done, state)

    monkeypatch.setattr(SISAModel, "_save", flaky)
    return saved


# ids in (shard 0, slice 0) and (shard 2, slice 1): saves (0,1) (0,2) (2,2) (0,3) (2,3)
# (checkpoint 0, the initial state, is never rewritten);
# ids in (shard 0, slice 1) and (shard 2, slice 2): saves (0,2) (0,3) (2,3), the first one
# after restoring and retraining a stage.
SCENARIOS = {
    "from-init": ((0, 0), (2, 1)),
    "from-checkpoint": ((0, 1), (2, 2)),
}


@pytest.mark.parametrize(
    ("scenario", "after"),
    [
        ("from-init", 0),
        ("from-init", 2),
        ("from-init", 4),
        ("from-checkpoint", 0),
        ("from-checkpoint", 2),
    ],
)
def test_crash_during_forget_then_open_recovers_exactly(
    base, tmp_path, monkeypatch, scenario, after
):
    d, sisa = copy_of(base, tmp_path)
    ids = [pick(PLAN, s, r, 4) for s, r in SCENARIOS[scenario]]
    before = snapshot(d)
    saved = crash_on_save(monkeypatch, after)
    with pytest.raises(RuntimeError, match="injected crash"):
        sisa.forget(ids)
    assert len(saved) == after
    monkeypatch.undo()
    # the request was recorded before anything changed, and is still pending
    assert ledger_entries(d) == {i: "pending" for i in ids}
    if after == 0:
        assert under(snapshot(d), "shards/") == under(before, "shards/")
    recovered = SISAModel.open(d, MODEL, TX, DATA)
    assert ledger_entries(d) == {i: "done" for i in ids}
    assert recovered.forgotten.tolist() == sorted(ids)
    assert_shards_equal(recovered, reference(tmp_path / "ref", ids))


def test_crash_that_deleted_a_checkpoint_mid_overwrite_recovers_exactly(
    base, tmp_path, monkeypatch
):
    """The harshest point: the background writer removed the old checkpoint, then died."""
    d, sisa = copy_of(base, tmp_path)
    ids = [pick(PLAN, 1, 1, 2), pick(PLAN, 3, 0, 3)]  # writes (3,1) (1,2) (3,2) (1,3) (3,3)
    calls = []
    original = store.write_checkpoint

    def dying(path, state):
        calls.append((Path(path).parent.name, int(Path(path).name)))
        if len(calls) == 3:
            shutil.rmtree(path)  # the old checkpoint is gone ...
            raise OSError("injected: disk full")  # ... and the new one never written
        return original(path, state)

    monkeypatch.setattr(store, "write_checkpoint", dying)
    with pytest.raises(OSError, match="disk full"):
        sisa.forget(ids)
    monkeypatch.undo()
    assert calls[-1] == ("3", 2)  # no write after the failed one
    assert not (d / "shards" / "3" / "2").exists()
    assert ledger_entries(d) == {i: "pending" for i in ids}
    recovered = SISAModel.open(d, MODEL, TX, DATA)
    assert (d / "shards" / "3" / "2").is_dir()
    assert_shards_equal(recovered, reference(tmp_path / "ref", ids))


def test_crash_then_next_forget_on_the_same_object_completes_the_pending_ids(
    base, tmp_path, monkeypatch
):
    d, sisa = copy_of(base, tmp_path)
    crashed = [pick(PLAN, 0, 0, 1), pick(PLAN, 2, 1, 2)]
    crash_on_save(monkeypatch, 3)
    with pytest.raises(RuntimeError):
        sisa.forget(crashed)
    monkeypatch.undo()
    extra = [pick(PLAN, 3, 2, 0)]
    report = sisa.forget(extra + crashed[:1])  # one crashed id asked for again
    assert report.recovered == sorted(crashed)
    assert report.new == extra
    assert report.cost.shards == {0: 0, 2: 1, 3: 2}
    assert ledger_entries(d) == {i: "done" for i in crashed + extra}
    assert_shards_equal(sisa, reference(tmp_path / "ref", crashed + extra))


def test_recover_completes_pending_ids_and_is_then_a_no_op(base, tmp_path, monkeypatch):
    d, sisa = copy_of(base, tmp_path)
    ids = [pick(PLAN, 1, 2, 5)]
    crash_on_save(monkeypatch, 0)
    with pytest.raises(RuntimeError):
        sisa.forget(ids)
    monkeypatch.undo()
    report = sisa.recover()
    assert (report.requested, report.new, report.recovered) == ([], [], ids)
    assert report.cost.shards == {1: 2}
    assert_shards_equal(sisa, reference(tmp_path / "ref", ids))
    again = sisa.recover()
    assert again.recovered == [] and again.cost.shards == {}


# ------------------------------------------------------------------------------------------
# idempotence, identity and bad requests
# ------------------------------------------------------------------------------------------


def test_forgetting_the_same_ids_twice_does_nothing_the_second_time(base, tmp_path):
    d, sisa = copy_of(base, tmp_path)
    ids = [pick(PLAN, 0, 2, 2), pick(PLAN, 1, 0, 8)]
    sisa.forget(ids)
    states = [sisa.shard_state(s) for s in range(S)]
    before = snapshot(d)
    report = sisa.forget(ids[::-1] + ids)
    assert report.requested == sorted(ids)
    assert report.new == [] and report.recovered == []
    assert report.cost.shards == {}
    assert (report.cost.programs, report.cost.lane_stages, report.cost.sample_epochs) == (0, 0, 0)
    assert snapshot(d) == before  # neither the ledger nor any checkpoint rewritten
    for s in range(S):
        assert_state_bitwise_equal(sisa.shard_state(s), states[s], f"shard {s}")


def test_partly_repeated_request_retrains_only_for_the_new_ids(base, tmp_path):
    d, sisa = copy_of(base, tmp_path)
    a, b, c = pick(PLAN, 0, 1, 0), pick(PLAN, 2, 0, 0), pick(PLAN, 3, 2, 4)
    sisa.forget([a, b])
    report = sisa.forget([b, c])
    assert report.new == [c]
    assert report.cost.shards == {3: 2}
    data = json.loads((d / "ledger.json").read_text())
    assert data["requests"] == 2
    assert {e["id"]: e["request"] for e in data["entries"]} == {a: 1, b: 1, c: 2}


@pytest.mark.parametrize(
    "change",
    [
        {"plan": make_plan(DATA.idx, S, R, key=12)},
        {"key": KEY + 1},
        {"batch_size": BATCH * 2},
        {"epochs_per_slice": (1, 1, 1)},
        {"program_width": 2},
        {"layout": "loop"},
        {"model": create_model("tabular_mlp", 3, hidden=(9,))},
    ],
    ids=["plan", "key", "batch_size", "epochs", "program_width", "layout", "model"],
)
def test_reusing_a_directory_with_other_settings_raises(base, change):
    before = snapshot(base)
    with pytest.raises(PrivDebiasError, match="fingerprint mismatch"):
        train(base, **change)
    assert snapshot(base) == before


def test_open_with_another_model_or_no_meta_raises(base, tmp_path):
    before = snapshot(base)
    with pytest.raises(PrivDebiasError, match="fingerprint mismatch"):
        SISAModel.open(base, create_model("tabular_mlp", 3, hidden=(9,)), TX, DATA)
    assert snapshot(base) == before
    with pytest.raises(PrivDebiasError, match="no meta.json"):
        SISAModel.open(tmp_path / "empty", MODEL, TX, DATA)
    with pytest.raises(PrivDebiasError, match="lacks 1 id"):
        SISAModel.open(base, MODEL, TX, remove_ids(DATA, [pick(PLAN, 1, 1)]))


def test_open_with_corrupt_meta_raises_privdebias_error(base, tmp_path):
    d = tmp_path / "sisa"
    shutil.copytree(base, d)
    (d / "meta.json").write_text('{"fingerprint": ')
    with pytest.raises(PrivDebiasError, match="not valid JSON"):
        train(d)  # passes: _check_directory wraps the decode error
    with pytest.raises(PrivDebiasError):
        SISAModel.open(d, MODEL, TX, DATA)


def _whole_shard(plan, s):
    ids = plan.slots[s].reshape(-1)
    return ids[ids != PADDING_ID].tolist()


@pytest.mark.parametrize(
    ("make_ids", "match"),
    [
        (lambda p: [pick(p, 0, 0), 123], r"unknown sample id\(s\) \[123\]"),
        (lambda p: [pick(p, 0, 0), -3], "non-negative"),
        (lambda p: [PADDING_ID], "non-negative"),
        (lambda p: _whole_shard(p, 1), r"leave shard\(s\) \[1\] with no samples"),
        (lambda p: [pick(p, 2, 0)] + _whole_shard(p, 3), r"shard\(s\) \[3\]"),
    ],
    ids=["unknown", "negative", "padding-id", "empties-shard", "empties-shard-plus-valid"],
)
def test_bad_forget_requests_raise_and_change_nothing(base, tmp_path, make_ids, match):
    d, sisa = copy_of(base, tmp_path)
    sisa.forget([pick(PLAN, 0, 2, 9)])  # a ledger exists already
    before = snapshot(d)
    with pytest.raises(PrivDebiasError, match=match):
        sisa.forget(make_ids(PLAN))
    assert snapshot(d) == before
    assert sisa.forgotten.tolist() == [pick(PLAN, 0, 2, 9)]
    assert sisa.ledger.pending.size == 0
    with pytest.raises(PrivDebiasError, match=match):
        sisa.forget_stepwise(make_ids(PLAN), capacity=1)
    assert snapshot(d) == before


def test_emptying_a_shard_over_two_requests_raises(base, tmp_path):
    d, sisa = copy_of(base, tmp_path)
    shard3 = _whole_shard(PLAN, 3)
    sisa.forget(shard3[:-1])  # leaves one sample: allowed
    before = snapshot(d)
    with pytest.raises(PrivDebiasError, match=r"shard\(s\) \[3\]"):
        sisa.forget(shard3[-1:])
    assert snapshot(d) == before
    assert sisa.forgotten.tolist() == sorted(shard3[:-1])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"program_width": 0}, r"program_width must be in \[1, 4\]"),
        ({"program_width": S + 1}, r"program_width must be in \[1, 4\]"),
        ({"epochs_per_slice": (1, 1)}, "2 entries for 3 slices"),
        ({"epochs_per_slice": (1, 1, 1, 1)}, "4 entries for 3 slices"),
        ({"epochs_per_slice": (1, 0, 1)}, "epochs_per_slice must be"),
        ({"epochs_per_slice": 0}, "epochs_per_slice must be"),
        ({"layout": "bogus"}, "unknown layout 'bogus'"),
        ({"batch_size": 0}, "batch_size must be positive"),
    ],
    ids=[
        "W=0",
        "W>S",
        "epochs-short",
        "epochs-long",
        "epochs-zero-entry",
        "epochs-zero",
        "layout",
        "batch",
    ],
)
def test_bad_settings_raise_before_creating_the_directory(tmp_path, kw, match):
    with pytest.raises(PrivDebiasError, match=match):
        train(tmp_path / "sisa", **kw)
    assert not (tmp_path / "sisa").exists()


def test_train_set_without_a_planned_id_raises(tmp_path):
    gone = pick(PLAN, 2, 1, 3)
    with pytest.raises(PrivDebiasError, match=rf"lacks 1 id\(s\) of the plan, e.g. \[{gone}\]"):
        train(tmp_path / "sisa", ds=remove_ids(DATA, [gone]))


def test_shard_state_out_of_range_raises(base_sisa):
    with pytest.raises(PrivDebiasError, match="out of range"):
        base_sisa.shard_state(S)
    with pytest.raises(PrivDebiasError, match="out of range"):
        base_sisa.shard_state(-1)


def test_sisa_epochs():
    assert sisa_epochs(20, 4) == (8, 8, 8, 8)  # ⌈40 / 5⌉
    assert sisa_epochs(10, 2) == (7, 7)  # ⌈20 / 3⌉
    assert sisa_epochs(1, 4) == (1, 1, 1, 1)  # ⌈2 / 5⌉ = 1
    assert sisa_epochs(3, 1) == (3,)  # ⌈6 / 2⌉
    with pytest.raises(PrivDebiasError):
        sisa_epochs(0, 2)
    with pytest.raises(PrivDebiasError):
        sisa_epochs(5, 0)


# ------------------------------------------------------------------------------------------
# step-wise forgetting
# ------------------------------------------------------------------------------------------


def test_forget_stepwise_matches_a_single_forget(base, tmp_path):
    d, sisa = copy_of(base, tmp_path / "stepwise")
    stream = [
        pick(PLAN, 3, 1, 0),
        pick(PLAN, 0, 0, 5),
        pick(PLAN, 3, 1, 0),
        pick(PLAN, 2, 2, 2),
        pick(PLAN, 1, 1, 6),
        pick(PLAN, 0, 2, 1),
    ]
    unique_in_order = list(dict.fromkeys(stream))
    capacity = 2
    reports = sisa.forget_stepwise(stream, capacity=capacity)
    assert len(reports) == math.ceil(len(unique_in_order) / capacity) == 3
    for k, rep in enumerate(reports):
        assert 1 <= len(rep.new) <= capacity
        assert rep.new == sorted(unique_in_order[k * capacity : (k + 1) * capacity])
    assert sisa.forgotten.tolist() == sorted(unique_in_order)
    _, single = copy_of(base, tmp_path / "single")
    single.forget(stream)
    assert_shards_equal(sisa, single)


def test_forget_stepwise_skips_already_forgotten_ids(base, tmp_path):
    d, sisa = copy_of(base, tmp_path)
    a, b, c = pick(PLAN, 0, 0, 0), pick(PLAN, 1, 0, 0), pick(PLAN, 2, 0, 0)
    sisa.forget([a])
    reports = sisa.forget_stepwise([a, b, c], capacity=1)
    assert [r.new for r in reports] == [[b], [c]]
    assert [r.cost.shards for r in reports] == [{1: 0}, {2: 0}]
    assert sisa.forget_stepwise([a, b, c], capacity=5) == []


@pytest.mark.parametrize("capacity", [0, -2])
def test_forget_stepwise_rejects_capacity_below_one(base_sisa, capacity):
    with pytest.raises(PrivDebiasError, match="capacity must be at least 1"):
        base_sisa.forget_stepwise([pick(PLAN, 0, 0)], capacity=capacity)


# ------------------------------------------------------------------------------------------
# the shard ensemble
# ------------------------------------------------------------------------------------------


def np_log_mean_softmax(member_logits):
    z = np.asarray(member_logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.log(p.mean(0)), p.mean(0)


def test_aggregate_logits_mean_softmax_matches_numpy():
    z = np.random.default_rng(0).normal(scale=3.0, size=(5, 7, 4)).astype(np.float32)
    out = np.asarray(aggregate_logits(z, "mean_softmax"))
    expected, mean = np_log_mean_softmax(z)
    assert out.shape == (7, 4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, rtol=1e-5)
    # the default is mean_softmax
    np.testing.assert_array_equal(np.asarray(aggregate_logits(z)), out)


def test_aggregate_logits_vote_majority_and_ties():
    def weak(c):  # a barely-confident vote for class c
        return np.eye(3)[c] * 0.1

    def strong(c):  # a confident vote for class c
        return np.eye(3)[c] * 20.0

    members = np.stack(
        [
            # sample 0: three weak votes for 1 beat one confident vote for 0 (mean_softmax says 0)
            [weak(1), weak(1), weak(1), strong(0)],
            # sample 1: 2–2 tie between 2 (weak) and 0 (strong): the mean softmax breaks it → 0
            [weak(2), weak(2), strong(0), strong(0)],
            # sample 2: the same tie, now 2 is the confident one → 2
            [strong(2), strong(2), weak(0), weak(0)],
        ],
        axis=1,
    ).astype(np.float32)  # (S=4, B=3, C=3)
    vote = np.asarray(aggregate_logits(members, "vote"))
    mean = np.asarray(aggregate_logits(members, "mean_softmax"))
    assert vote.argmax(-1).tolist() == [1, 0, 2]
    assert mean.argmax(-1).tolist() == [0, 0, 2]
    # softmax(vote logits) = (votes + p̄) / (S + 1)
    votes = np.stack([np.bincount(members[:, b].argmax(-1), minlength=3) for b in range(3)])
    _, pbar = np_log_mean_softmax(members)
    np.testing.assert_allclose(np.exp(vote), (votes + pbar) / 5.0, rtol=1e-5, atol=1e-7)


def test_unknown_aggregate_and_empty_ensemble_raise(base_sisa):
    z = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(PrivDebiasError, match="unknown aggregate 'median'"):
        aggregate_logits(z, "median")
    with pytest.raises(PrivDebiasError, match="unknown aggregate"):
        base_sisa.ensemble("median")
    with pytest.raises(PrivDebiasError, match="at least one member"):
        ensemble_from_states(MODEL, [])


@pytest.mark.parametrize("aggregate", ["mean_softmax", "vote"])
def test_sisa_ensemble_predicts_like_its_shards_aggregated(base_sisa, aggregate):
    test = _tabular(37, 1, 0)
    module, params, model_state = base_sisa.ensemble(aggregate)
    logits, feats = predict(module, params, model_state, test, batch_size=16)  # padded last batch
    member_logits, member_feats = zip(
        *(
            predict(
                MODEL, base_sisa.shard_state(s).params, base_sisa.shard_state(s).model_state, test
            )
            for s in range(S)
        ),
        strict=True,
    )
    member_logits = np.stack(member_logits)
    log_pbar, pbar = np_log_mean_softmax(member_logits)
    if aggregate == "mean_softmax":
        expected = log_pbar
    else:
        votes = (member_logits.argmax(-1)[..., None] == np.arange(3)).sum(0)
        expected = np.log((votes + pbar) / (S + 1))
    assert logits.shape == (37, 3)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats, np.concatenate(member_feats, axis=1), rtol=1e-6, atol=1e-6)
    # evaluate() accepts the ensemble like any model: counts and loss from the ensemble logits
    report = evaluate(
        module, params, model_state, test, num_classes=3, num_attributes=2, batch_size=16
    )
    pred = logits.argmax(-1)
    counts = np.zeros((3, 2, 3))
    np.add.at(counts, (test.y, test.a, pred), 1)
    np.testing.assert_array_equal(report["counts"], counts)
    assert report["acc"] == pytest.approx(np.mean(pred == test.y))
    z = np.asarray(logits, np.float64)
    ce = -(z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(37), test.y]
    assert report["loss"] == pytest.approx(ce.mean(), rel=1e-5)


def test_shard_ensemble_is_evaluation_only(base_sisa):
    module, params, model_state = base_sisa.ensemble()
    x = np.asarray(DATA.x[:4])
    with pytest.raises(PrivDebiasError, match="evaluation-only"):
        module.apply({"params": params, **model_state}, x, train=True)
