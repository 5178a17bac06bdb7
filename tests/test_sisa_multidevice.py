"""SISA on 8 (fake) CPU devices: the shard axis split over a ``Mesh`` with ``shard_map``.

The device count is fixed when JAX starts, so each setting runs in its own Python process:
one with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and one with a single device.
Each trains the same ``S = 8`` shards, forgets ids, trains the from-scratch reference (the
forgotten slots padding, the rows removed) in the same setting, and reports as JSON; the
states go to an ``.npz`` file. Checked here: the 8-device run builds an 8-device mesh (and a
4-device one for ``W = 4``), forgetting is bitwise exact under the mesh, and the 8-device
states match the single-device ones up to float rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from shared_checks import child_result

pytestmark = pytest.mark.integration  # runs the shards in subprocesses with fake devices

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, tempfile
import jax
import numpy as np
from privdebias_jax.data import make_dataset, remove_ids
from privdebias_jax.models import create_model
from privdebias_jax.train import make_optimizer
from privdebias_jax.unlearn import PADDING_ID, ShardPlan, make_plan, train_shards

out = sys.argv[1]
rng = np.random.default_rng(0)
n = 160
x = rng.normal(size=(n, 6))
y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
ds = make_dataset(x, y, rng.integers(0, 2, n), idx=100 + 3 * rng.permutation(n))
model = create_model("tabular_mlp", 3, hidden=(8,))
tx = make_optimizer("adam", 1e-2)
plan = make_plan(ds.idx, 8, 2, key=1)
settings = dict(key=7, epochs_per_slice=(1, 2), batch_size=8)


def leaves(state):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(state)]


def exact(a, b):
    return all(
        all(u.dtype == v.dtype and np.array_equal(u, v) for u, v in zip(leaves(a.shard_state(s)), leaves(b.shard_state(s))))
        for s in range(a.plan.num_shards)
    )


def reference(directory, ids, **kw):
    slots = np.where(np.isin(plan.slots, ids), PADDING_ID, plan.slots)
    ref, _ = train_shards(model, tx, remove_ids(ds, ids), ShardPlan(slots, plan.strategy), directory, **settings, **kw)
    return ref


ids = [int(plan.slots[0, 0, 0]), int(plan.slots[3, 1, 2]), int(plan.slots[6, 0, 5])]
result = {"devices": len(jax.devices())}
arrays = {}
with tempfile.TemporaryDirectory() as d:
    sisa, cost = train_shards(model, tx, ds, plan, d + "/a", **settings)
    result["mesh"] = None if sisa.mesh is None else int(sisa.mesh.devices.size)
    result["mesh_axes"] = None if sisa.mesh is None else list(sisa.mesh.axis_names)
    for s in range(8):
        for i, v in enumerate(leaves(sisa.shard_state(s))):
            arrays[f"trained_{s}_{i}"] = v
    report = sisa.forget(ids)
    result["new"] = report.new
    result["shards"] = {str(k): v for k, v in report.cost.shards.items()}
    for s in range(8):
        for i, v in enumerate(leaves(sisa.shard_state(s))):
            arrays[f"forgotten_{s}_{i}"] = v
    result["exact"] = exact(sisa, reference(d + "/b", ids))
    # W = 4 lanes per program: the mesh spans gcd(4, #devices) devices
    sisa4, _ = train_shards(model, tx, ds, plan, d + "/c", program_width=4, **settings)
    result["mesh_w4"] = None if sisa4.mesh is None else int(sisa4.mesh.devices.size)
    sisa4.forget(ids)
    result["exact_w4"] = exact(sisa4, reference(d + "/e", ids, program_width=4))
np.savez(out, **arrays)
print("RESULT " + json.dumps(result))
"""


def _start(tmp_path: Path, devices: int) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out = tmp_path / f"states_{devices}.npz"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, out


def _finish(proc: subprocess.Popen, out: Path) -> tuple[dict, dict]:
    result, _ = child_result(proc, timeout=600)
    with np.load(out) as f:
        arrays = {k: f[k] for k in f.files}
    return result, arrays


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both settings, run side by side (one process each)."""
    tmp = tmp_path_factory.mktemp("multidevice")
    started = {devices: _start(tmp, devices) for devices in (8, 1)}
    try:
        return {devices: _finish(*started[devices]) for devices in (8, 1)}
    finally:
        for proc, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_eight_devices_build_a_mesh_over_the_shard_axis(runs):
    result, _ = runs[8]
    assert result["devices"] == 8
    assert result["mesh"] == 8
    assert result["mesh_axes"] == ["models"]
    assert result["mesh_w4"] == 4


def test_single_device_runs_without_a_mesh(runs):
    result, _ = runs[1]
    assert result["devices"] == 1
    assert result["mesh"] is None and result["mesh_w4"] is None


@pytest.mark.parametrize("devices", [8, 1])
def test_forget_is_bitwise_exact(runs, devices):
    result, _ = runs[devices]
    assert result["shards"] == {"0": 0, "3": 1, "6": 0}
    assert len(result["new"]) == 3
    assert result["exact"] is True
    assert result["exact_w4"] is True


@pytest.mark.parametrize("stage", ["trained", "forgotten"])
def test_eight_device_states_match_single_device(runs, stage):
    _, multi = runs[8]
    _, single = runs[1]
    keys = sorted(k for k in multi if k.startswith(stage + "_"))
    assert keys == sorted(k for k in single if k.startswith(stage + "_"))
    assert len(keys) >= 8 * 4  # every shard: step, params and Adam state
    for k in keys:
        assert multi[k].dtype == single[k].dtype and multi[k].shape == single[k].shape, k
        np.testing.assert_allclose(multi[k], single[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # the shards are distinct models, not copies of one lane
    kernels = [multi[f"{stage}_{s}_1"] for s in range(8)]
    assert all(not np.array_equal(kernels[0], kernels[s]) for s in range(1, 8))
