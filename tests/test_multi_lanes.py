"""Lanes computed ``lane_batch`` at a time on a device, and CPU cores as devices (:mod:`privdebias_jax.multi`).

The reference for every lane is the same lane trained on its own (a width-1 program, which
runs ``fn`` without ``vmap``): with ``lane_batch=1`` (``lax.map`` of the unvmapped program, one
lane after the other) each lane must match it *bitwise*, at every width, layout and number of
devices; ``vmap``-ed chunks (``lane_batch=k`` with a remainder, ``None`` = all lanes) only up
to float rounding. SISA: forgetting with ``lane_batch=1`` reproduces the from-scratch training
bitwise at the same and at another program width. The device count is fixed when JAX starts,
so the multi-device checks run in child processes.

Data: tiny synthetic tabular sets, a 6-8-3 MLP, Adam, 1–2 epochs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from shared_checks import assert_state_bitwise_equal, child_result

from privdebias_jax.cli import main as cli_main
from privdebias_jax.data import make_dataset, remove_ids
from privdebias_jax.data.dataset import Batch
from privdebias_jax.models import create_model
from privdebias_jax.multi import (
    init_program,
    parse_lane_batch,
    resolve_lane_batch,
    run_stage,
    train_models,
    tree_stack,
    use_cpu_devices,
)
from privdebias_jax.train import make_optimizer
from privdebias_jax.types import PrivDebiasError
from privdebias_jax.unlearn import (
    PADDING_ID,
    ShardPlan,
    SISAConfig,
    SISAModel,
    make_plan,
    train_shards,
)

ROOT = Path(__file__).resolve().parents[1]
D = 6
MODEL = create_model("tabular_mlp", 3, hidden=(8,))
TX = make_optimizer("adam", 1e-2)  # one object: the compiled stage programs are cached per tx


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _labels(x):
    return ((x[..., 0] + 0.5 * x[..., 1] > 0).astype(np.int32) + (x[..., 2] > 1)).astype(np.int32)


def _tabular(n: int, seed: int, id_offset: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D))
    a = rng.integers(0, 2, n)
    idx = id_offset + 3 * rng.permutation(n)
    return make_dataset(x, _labels(x), a, idx=idx, num_classes=3, num_attributes=2)


def _lane_problem(width: int, rows: int = 20, seed: int = 0):
    """Stacked initial states, per-lane data blocks ``(W, M, ...)`` and lane keys ``(W, 2)``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(width, rows, D)).astype(np.float32)
    data = Batch(
        x=x,
        y=_labels(x),
        a=rng.integers(0, 2, (width, rows)).astype(np.int32),
        idx=np.arange(width * rows, dtype=np.int32).reshape(width, rows),
        mask=(rng.random((width, rows)) < 0.8).astype(np.float32),
    )
    init = init_program(MODEL, TX, (D,))
    states = tree_stack([jax.device_get(init(jax.random.PRNGKey(100 + w))) for w in range(width)])
    keys = np.stack([np.asarray(jax.random.PRNGKey(200 + w)) for w in range(width)])
    return states, data, keys


def _lanes_of(tree, lo: int, hi: int):
    return jax.tree_util.tree_map(lambda v: np.asarray(v)[lo:hi], tree)


def _leaves(tree):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


def assert_close(a, b, what=""):
    for i, (x, y) in enumerate(zip(_leaves(a), _leaves(b), strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what} leaf {i}"
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=f"{what} leaf {i}")


def assert_lanes_distinct(stacked):
    """The lanes are distinct models (not copies of one lane): every kernel pair differs."""
    kernels = [leaf for leaf in _leaves(stacked) if leaf.ndim == 3]
    assert kernels
    width = kernels[0].shape[0]
    for i in range(width):
        for j in range(i + 1, width):
            assert not np.array_equal(kernels[0][i], kernels[0][j]), (i, j)


# ------------------------------------------------------------------------------------------
# run_stage and train_models
# ------------------------------------------------------------------------------------------

W = 5
STAGE = {"epochs": 2, "batch_size": 8}  # M = 20 rows: 3 batches, the last one padded


@pytest.mark.parametrize("layout", ["scan", "loop"])
def test_run_stage_lane_batch_matches_each_lane_alone(layout):
    states, data, keys = _lane_problem(W)
    alone = tree_stack(
        [
            jax.tree_util.tree_map(
                lambda v: v[0],
                run_stage(
                    MODEL,
                    TX,
                    _lanes_of(states, w, w + 1),
                    _lanes_of(data, w, w + 1),
                    keys[w : w + 1],
                    layout=layout,
                    lane_batch=1,
                    **STAGE,
                ),
            )
            for w in range(W)
        ]
    )
    assert_lanes_distinct(alone)
    # the lanes trained: every lane moved away from its initial state
    for w in range(W):
        assert not np.array_equal(
            _leaves(_lanes_of(alone, w, w + 1))[1], _leaves(_lanes_of(states, w, w + 1))[1]
        )

    def run(lane_batch):
        return run_stage(
            MODEL, TX, states, data, keys, layout=layout, lane_batch=lane_batch, **STAGE
        )

    one_by_one = run(1)
    assert_state_bitwise_equal(one_by_one, alone, f"{layout} lane_batch=1: ")
    # chunks of vmapped lanes: 2 + 2 + a single remainder lane; 3 + a remainder of 2 lanes
    for lane_batch in (2, 3):
        assert_close(run(lane_batch), alone, f"{layout} lane_batch={lane_batch}")
    everything = run(None)
    assert_close(everything, alone, f"{layout} lane_batch=None")
    # a lane_batch of at least the width is the one vmap of every lane
    assert_state_bitwise_equal(run(W + 2), everything, f"{layout} lane_batch={W + 2} vs None: ")


@pytest.mark.parametrize("layout", ["scan", "loop"])
def test_train_models_lane_batch_matches_each_model_alone(layout):
    data = _tabular(26, 1)
    rng = np.random.default_rng(2)
    masks = (rng.random((4, len(data))) < 0.6).astype(np.float32)
    masks[:, 0] = 1  # no model without rows
    key = jax.random.PRNGKey(3)
    common = {"epochs": 2, "batch_size": 8, "layout": layout, "mesh": None}

    alone = train_models(MODEL, TX, data, masks, key, width=1, lane_batch=1, **common)
    assert_lanes_distinct(alone)
    # the documented contract, built by hand: model i from fold_in(fold_in(key, i), 0), lane key
    # fold_in(fold_in(key, i), 1), the shared rows with its own mask
    init = init_program(MODEL, TX, (D,))
    for i in (0, 3):
        k_i = jax.random.fold_in(key, i)
        block = Batch(
            np.asarray(data.x),
            np.asarray(data.y, np.int32),
            np.asarray(data.a, np.int32),
            np.asarray(data.idx),
            masks[i : i + 1],
        )
        by_hand = run_stage(
            MODEL,
            TX,
            tree_stack([jax.device_get(init(jax.random.fold_in(k_i, 0)))]),
            block,
            np.asarray(jax.random.fold_in(k_i, 1))[None],
            epochs=2,
            batch_size=8,
            layout=layout,
            shared_data=True,
            lane_batch=1,
        )
        assert_state_bitwise_equal(_lanes_of(alone, i, i + 1), by_hand, f"model {i} by hand: ")

    together = train_models(MODEL, TX, data, masks, key, width=4, lane_batch=1, **common)
    assert_state_bitwise_equal(together, alone, f"{layout} width=4 lane_batch=1: ")
    # width 3: a second program of one model and two padding lanes
    padded = train_models(MODEL, TX, data, masks, key, width=3, lane_batch=1, **common)
    assert_state_bitwise_equal(padded, alone, f"{layout} width=3 lane_batch=1: ")
    vmapped = train_models(MODEL, TX, data, masks, key, width=4, lane_batch=None, **common)
    assert_close(vmapped, alone, f"{layout} width=4 lane_batch=None")


# ------------------------------------------------------------------------------------------
# lane_batch settings
# ------------------------------------------------------------------------------------------


def test_resolve_lane_batch_table():
    assert jax.default_backend() == "cpu"
    assert resolve_lane_batch("auto") == 1
    assert resolve_lane_batch(1) == 1
    assert resolve_lane_batch(3) == 3
    assert resolve_lane_batch(np.int64(4)) == 4 and type(resolve_lane_batch(np.int64(4))) is int
    assert resolve_lane_batch(None) is None
    for bad in (0, -1, True, False, "x", "all", "1", 1.5, 2.0):
        with pytest.raises(PrivDebiasError, match="lane_batch"):
            resolve_lane_batch(bad)


def test_parse_lane_batch_table():
    assert parse_lane_batch("auto") == "auto"
    assert parse_lane_batch("all") is None
    assert parse_lane_batch(None) is None
    assert parse_lane_batch("1") == 1
    assert parse_lane_batch("16") == 16
    assert parse_lane_batch(3) == 3
    for bad in ("0", "-2", "x", "1.5", "", "ALL", " 3 ", 0, -1, 2.5, True, np.float32(2.0)):
        with pytest.raises(PrivDebiasError, match="lane_batch"):
            parse_lane_batch(bad)
    # every parsed value is one resolve_lane_batch takes
    for text in ("auto", "all", "2"):
        resolve_lane_batch(parse_lane_batch(text))


# ------------------------------------------------------------------------------------------
# SISA
# ------------------------------------------------------------------------------------------

S, R = 4, 2
SISA_DATA = _tabular(56, 0, id_offset=1000)
PLAN = make_plan(SISA_DATA.idx, S, R, key=11)
SETTINGS = {"key": 7, "epochs_per_slice": (1, 2), "batch_size": 8}


def _train(directory, ds=SISA_DATA, plan=PLAN, **kw):
    return train_shards(MODEL, TX, ds, plan, directory, **SETTINGS, **kw)[0]


def _reference(directory, ids, **kw) -> SISAModel:
    """SISA from scratch without ``ids``: their slots padding, their rows gone."""
    slots = np.where(np.isin(PLAN.slots, ids), PADDING_ID, PLAN.slots)
    return _train(
        directory, ds=remove_ids(SISA_DATA, ids), plan=ShardPlan(slots, PLAN.strategy), **kw
    )


def _assert_shards_bitwise(a: SISAModel, b: SISAModel, what: str):
    for s in range(S):
        assert_state_bitwise_equal(a.shard_state(s), b.shard_state(s), f"{what} shard {s}")


def _meta(directory) -> dict:
    return json.loads((Path(directory) / "meta.json").read_text())


def _old_fingerprint(meta: dict) -> str:
    """The fingerprint of a directory written before ``lane_batch`` existed (independent
    re-implementation: plan fingerprint, the 4-field config, key bytes, model repr)."""
    c = meta["config"]
    old = {k: c[k] for k in ("epochs_per_slice", "batch_size", "program_width", "layout")}
    h = hashlib.sha256(ShardPlan.from_json(meta["plan"]).fingerprint().encode())
    h.update(json.dumps(old, sort_keys=True).encode())
    h.update(np.asarray(meta["key"], np.uint32).tobytes())
    h.update(meta["model"].encode())
    return h.hexdigest()


def test_sisa_forget_with_lane_batch_1_is_exact_at_every_width(tmp_path):
    ids = [int(PLAN.slots[0, 0, 1]), int(PLAN.slots[2, 1, 0])]
    sisa = _train(tmp_path / "a", program_width=S, lane_batch=1)
    assert sisa.config.lane_batch == 1
    assert _meta(tmp_path / "a")["config"]["lane_batch"] == 1
    report = sisa.forget(ids)
    assert sorted(report.cost.shards) == [0, 2]
    same_width = _reference(tmp_path / "b", ids, program_width=S, lane_batch=1)
    _assert_shards_bitwise(sisa, same_width, "W=S: ")
    # the new property: a lane's result does not depend on the program width
    one_wide = _reference(tmp_path / "c", ids, program_width=1, lane_batch=1)
    _assert_shards_bitwise(sisa, one_wide, "W=1: ")
    assert_lanes_distinct(tree_stack([sisa.shard_state(s) for s in range(S)]))
    # the default "auto" is 1 on a CPU: it reopens the lane_batch=1 directory as the same one
    again = SISAModel.open(tmp_path / "a", MODEL, TX, SISA_DATA, recover=False)
    assert again.config.lane_batch == 1 and again.fingerprint == sisa.fingerprint
    resumed = _train(tmp_path / "a", program_width=S)  # lane_batch="auto"
    assert resumed.fingerprint == sisa.fingerprint


def test_sisa_config_auto_resolves_to_1_on_cpu(tmp_path):
    sisa = SISAModel(MODEL, TX, SISA_DATA, PLAN, SISAConfig((1, 2), 8), tmp_path / "d", key=7)
    assert SISAConfig((1, 2)).lane_batch == "auto"
    assert sisa.config.lane_batch == 1
    assert _meta(tmp_path / "d")["config"]["lane_batch"] == 1


def test_sisa_lane_batch_none_has_no_key_and_reopens(tmp_path):
    sisa = _train(tmp_path / "v", lane_batch=None)
    meta = _meta(tmp_path / "v")
    assert "lane_batch" not in meta["config"]
    # the same fingerprint as a directory written before the setting existed
    assert meta["fingerprint"] == _old_fingerprint(meta) == sisa.fingerprint
    again = SISAModel.open(tmp_path / "v", MODEL, TX, SISA_DATA)
    assert again.config.lane_batch is None
    _assert_shards_bitwise(again, sisa, "reopened: ")
    # train_shards with the default "auto" resumes it as it was trained (one vmap), not as 1
    resumed = _train(tmp_path / "v")
    assert resumed.config.lane_batch is None and resumed.fingerprint == sisa.fingerprint
    _assert_shards_bitwise(resumed, sisa, "resumed: ")
    # a directory of lane_batch=1 whose meta lost the key (fingerprint left) is another config
    _train(tmp_path / "one", program_width=2, lane_batch=1)
    path = tmp_path / "one" / "meta.json"
    meta = json.loads(path.read_text())
    del meta["config"]["lane_batch"]
    path.write_text(json.dumps(meta))
    with pytest.raises(PrivDebiasError, match="fingerprint mismatch"):
        SISAModel.open(tmp_path / "one", MODEL, TX, SISA_DATA, recover=False)
    # ... and, with the fingerprint an old version wrote, it is an old directory: one vmap
    meta["fingerprint"] = _old_fingerprint(meta)
    path.write_text(json.dumps(meta))
    old = SISAModel.open(tmp_path / "one", MODEL, TX, SISA_DATA, recover=False)
    assert old.config.lane_batch is None and old.width == 2


@pytest.mark.parametrize("bad", [0, -3, "x", True])
def test_train_shards_rejects_bad_lane_batch_before_creating_the_directory(tmp_path, bad):
    with pytest.raises(PrivDebiasError, match="lane_batch"):
        _train(tmp_path / "never", lane_batch=bad)
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------------------------------
# CPU devices
# ------------------------------------------------------------------------------------------

CHILD_API = r"""
import json
import numpy as np
import privdebias_jax.cli  # noqa: F401  (importing the package must not start the backend)
import privdebias_jax.unlearn  # noqa: F401
from jax._src import xla_bridge
from privdebias_jax.data.dataset import Batch
from privdebias_jax.multi import default_mesh, init_program, run_stage, tree_stack, use_cpu_devices
from privdebias_jax.models import create_model
from privdebias_jax.train import make_optimizer
from privdebias_jax.types import PrivDebiasError

result = {"started_by_imports": xla_bridge.backends_are_initialized()}
result["returned"] = use_cpu_devices(2)
import jax

result["devices"] = jax.device_count()
model = create_model("tabular_mlp", 3, hidden=(8,))
tx = make_optimizer("adam", 1e-2)
rng = np.random.default_rng(0)
W, M = 4, 20
x = rng.normal(size=(W, M, 6)).astype(np.float32)
y = ((x[..., 0] > 0).astype(np.int32) + (x[..., 2] > 1)).astype(np.int32)
data = Batch(x, y, rng.integers(0, 2, (W, M)).astype(np.int32),
             np.arange(W * M, dtype=np.int32).reshape(W, M),
             (rng.random((W, M)) < 0.8).astype(np.float32))
init = init_program(model, tx, (6,))
states = tree_stack([jax.device_get(init(jax.random.PRNGKey(100 + w))) for w in range(W)])
keys = np.stack([np.asarray(jax.random.PRNGKey(200 + w)) for w in range(W)])
mesh = default_mesh(W)
result["mesh"] = None if mesh is None else int(mesh.devices.size)
lanes = lambda t, lo, hi: jax.tree_util.tree_map(lambda v: np.asarray(v)[lo:hi], t)
for layout in ("scan", "loop"):
    kw = dict(epochs=2, batch_size=8, layout=layout, lane_batch=1)
    split = run_stage(model, tx, states, data, keys, mesh=mesh, **kw)
    exact = []
    for w in range(W):
        alone = run_stage(model, tx, lanes(states, w, w + 1), lanes(data, w, w + 1),
                          keys[w:w + 1], mesh=None, **kw)
        exact.append(all(
            u.dtype == v.dtype and np.array_equal(u, v)
            for u, v in zip(jax.tree_util.tree_leaves(lanes(split, w, w + 1)),
                            jax.tree_util.tree_leaves(alone))))
    result["exact_" + layout] = exact
result["again"] = use_cpu_devices(2)
try:
    use_cpu_devices(3)
    result["three"] = "no error"
except PrivDebiasError as err:
    result["three"] = str(err)
print("RESULT " + json.dumps(result))
"""

CHILD_CLI = r"""
import json
from privdebias_jax.cli import main
rc = main(["--cpu-devices", "2", "attack", "--from", "nowhere", "--out", "nowhere",
           "--attacks", "no_such_attack"])
import jax
print("RESULT " + json.dumps({"rc": rc, "devices": jax.device_count()}))
"""


def _spawn(code: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def children():
    """Both child processes, run side by side."""
    procs = {"api": _spawn(CHILD_API), "cli": _spawn(CHILD_CLI)}
    try:
        return {name: child_result(proc, timeout=300) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_two_cpu_devices_lanes_bitwise_equal_each_lane_alone(children):
    result, _ = children["api"]
    assert result["started_by_imports"] is False
    assert result["returned"] == 2
    assert result["devices"] == 2
    assert result["mesh"] == 2
    assert result["exact_scan"] == [True] * 4
    assert result["exact_loop"] == [True] * 4
    assert result["again"] == 2
    assert "2 device(s)" in result["three"] and "(3)" in result["three"]


def test_cli_cpu_devices_flag_sets_the_device_count(children):
    result, stderr = children["cli"]
    assert result["devices"] == 2
    assert result["rc"] == 2 and "no_such_attack" in stderr


def test_use_cpu_devices_after_the_backend_started():
    have = len(jax.devices("cpu"))  # starts the backend if no test did yet
    assert use_cpu_devices(have) == have
    with pytest.raises(PrivDebiasError, match=rf"{have} device\(s\).*\({have + 1}\)"):
        use_cpu_devices(have + 1)
    for bad in (0, -1):
        with pytest.raises(PrivDebiasError, match="at least 1"):
            use_cpu_devices(bad)
    assert len(jax.devices("cpu")) == have


def test_cli_cpu_devices_rejects_bad_counts(capsys):
    for bad in ("0", "-2", "x"):
        with pytest.raises(SystemExit) as exc:
            cli_main(["--cpu-devices", bad, "attack", "--from", "a", "--out", "b"])
        assert exc.value.code == 2
        assert "positive integer" in capsys.readouterr().err
    # a count other than the running backend's: a one-line error, exit status 2
    have = len(jax.devices("cpu"))
    rc = cli_main(["--cpu-devices", str(have + 1), "attack", "--from", "a", "--out", "b"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already started" in err


def test_cli_unlearn_rejects_a_bad_lane_batch_before_loading_data(capsys, tmp_path):
    for bad in ("0", "x", "-1"):
        with pytest.raises(SystemExit) as exc:
            cli_main(["unlearn", "--lane-batch", bad, "--out", str(tmp_path / "u")])
        assert exc.value.code == 2
        assert "lane_batch must be" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


def test_epochs_cut_to_the_largest_lane_equal_full_epochs_and_too_few_batches_raise():
    # run_stage(batches=b): b batches per epoch instead of ceil(M / batch_size); with every
    # lane's alive rows inside them the result is bitwise that of the full epochs (the batches
    # dropped would hold padding only, which leaves a state unchanged)
    data = _tabular(40, 5)
    rng = np.random.default_rng(6)
    masks = np.zeros((3, len(data)), np.float32)
    for i, n in enumerate((9, 15, 4)):
        masks[i, rng.choice(len(data), n, replace=False)] = 1
    init = init_program(MODEL, TX, (D,))
    states = tree_stack([jax.device_get(init(jax.random.PRNGKey(i))) for i in range(3)])
    keys = np.stack([np.asarray(jax.random.PRNGKey(10 + i)) for i in range(3)])
    block = Batch(
        np.asarray(data.x),
        np.asarray(data.y, np.int32),
        np.asarray(data.a, np.int32),
        np.asarray(data.idx),
        masks,
    )
    common = {"epochs": 3, "batch_size": 4, "layout": "scan", "shared_data": True}
    full = run_stage(MODEL, TX, states, block, keys, **common)  # 10 batches per epoch
    cut = run_stage(MODEL, TX, states, block, keys, batches=4, **common)  # 15 rows -> 4
    assert_state_bitwise_equal(cut, full, "4 of 10 batches: ")
    assert_lanes_distinct(full)
    with pytest.raises(PrivDebiasError, match="cannot hold a lane's 15 rows"):
        run_stage(MODEL, TX, states, block, keys, batches=3, **common)


def test_train_models_typed_and_legacy_keys_give_the_same_models():
    data = _tabular(20, 1)
    masks = np.ones((2, len(data)), np.float32)
    masks[1, :5] = 0
    common = {"epochs": 1, "batch_size": 8, "layout": "loop", "mesh": None, "width": 2, "lane_batch": 1}
    legacy = train_models(MODEL, TX, data, masks, jax.random.PRNGKey(4), **common)
    typed = train_models(MODEL, TX, data, masks, jax.random.key(4), **common)
    for a, b in zip(jax.tree_util.tree_leaves(legacy.params), jax.tree_util.tree_leaves(typed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
