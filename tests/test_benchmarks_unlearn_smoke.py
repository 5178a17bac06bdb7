"""Smoke tests of ``benchmarks/shards_vmap.py`` and ``benchmarks/unlearn_speed.py`` (``--quick``).

Each script runs in a subprocess exactly as documented (from the repository root, with this
interpreter), so their ``sys.path`` handling and, for ``shards_vmap --devices 2``, the
re-run under ``XLA_FLAGS=--xla_force_host_platform_device_count`` are exercised too. The
figures of a quick run are noise; only the JSON's shape and sanity are checked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, out: Path, *extra: str, size: str = "--quick") -> dict:
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", size, "--out", str(out), *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_machine(result: dict) -> None:
    machine = result["machine"]
    for field in ("platform", "cpu_count", "python", "versions", "jax_backend"):
        assert field in machine, field
    assert machine["versions"]["jax"] != "not installed"
    assert result["timestamp_utc"]


def test_shards_vmap_quick(tmp_path):
    # one shard count (S = 8, the target's), on one device and on 2 fake devices
    result = _run("shards_vmap.py", tmp_path / "sv.json", "--devices", "2", "--shards", "8")
    _check_machine(result)
    assert result["benchmark"] == "shards_vmap"
    settings = result["settings"]
    assert settings["quick"] is True and settings["model"] == "mlp"
    assert settings["primary"] == "program_scan"
    assert settings["lane_batch"] == 1  # auto on a CPU: lanes one after the other
    assert settings["batch_size"] == 64 and settings["epochs"] >= 1
    shards = result["shards"]
    assert set(shards) == {str(s) for s in settings["shards"]} and "8" in shards
    for s, entry in shards.items():
        variants = entry["variants"]
        expected = {"program_scan", "vmap_scan", "loop_per_batch", "loop_scan", "loop_stage_w1"}
        assert expected <= set(variants), s
        for name, v in variants.items():
            assert _positive(v["examples_per_s"]) and _positive(v["seconds"]), (s, name)
            assert len(v["raw_seconds"]) == settings["repeats"]
            if name != "program_scan":
                # the variants compute the same thing: close after one epoch already
                assert v["vs_program"]["rel_l2"] < 1e-2, (s, name, v["vs_program"])
        # lanes in sequence compute exactly what one shard alone computes
        assert variants["loop_stage_w1"]["vs_program"]["max_abs_diff"] == 0.0
        ratio = (
            variants["program_scan"]["examples_per_s"]
            / variants["loop_per_batch"]["examples_per_s"]
        )
        assert math.isclose(entry["program_over_loop_per_batch"], ratio, rel_tol=1e-9)
        assert _positive(entry["program_over_loop_scan"])
        assert entry["one_epoch_loop_scan_vs_program"]["rel_l2"] < 1e-3
    assert result["target_met"] is None  # the target applies to the full 28x28 run only
    assert isinstance(result["target"]["met_at_these_sizes"], bool)
    devices = result["devices"]
    assert devices["device_count"] == 2
    # with several devices the target is judged in that process: mesh vs its own loop
    assert result["target"]["ratio"] == devices["shards"]["8"]["mesh_over_loop_per_batch"]
    for s, entry in devices["shards"].items():
        assert entry["mesh_devices"] == 2, s
        for key in (
            "examples_per_s_mesh",
            "examples_per_s_one_device",
            "examples_per_s_loop_scan",
            "examples_per_s_loop_per_batch_devices",
        ):
            assert _positive(entry[key]), (s, key)
        # one lane at a time on each device: bitwise the single-device program's result
        assert entry["equal_to_single_device"] is True, s
        assert entry["mesh_vs_parent_program"]["max_abs_diff"] == 0.0
        assert entry["mesh_vs_parent_loop"]["rel_l2"] < 1e-2, (s, entry["mesh_vs_parent_loop"])


def test_unlearn_speed_quick(tmp_path):
    # --smoke: --quick with 160 samples and k = 1 only
    result = _run("unlearn_speed.py", tmp_path / "us.json", size="--smoke")
    _check_machine(result)
    assert result["benchmark"] == "unlearn_speed"
    settings = result["settings"]
    assert settings["quick"] is True and settings["smoke"] is True
    assert settings["num_forget"] == [1] and settings["train_size"] == 160
    assert result["published_sisa_speedups"]["purchase"] == 4.63
    assert result["published_sisa_speedups"]["svhn"] == 2.45
    assert result["ours"] == {"S": settings["shards"], "R": settings["slices"]}

    def acc_ok(acc: dict) -> bool:
        return all(0.0 <= v <= 1.0 for v in acc.values()) and "test" in acc

    assert acc_ok(result["single_model"]["accuracy"])
    widths = [str(w) for w in settings["widths"]]
    for w in widths:
        info = result["sisa_training"][w]
        assert acc_ok(info["ensemble_accuracy"])
        assert _positive(info["train_cost_cold"]["seconds"])
    for k in map(str, settings["num_forget"]):
        entry = result["forget"][k]
        assert len(entry["draws"]) == settings["draws"]
        for row in entry["draws"]:
            for name in ("retrain", "newton", "finetune", "gradient_ascent"):
                m = row["methods"][name]
                assert _positive(m["seconds"]) and acc_ok(m["accuracy"]), (k, name)
                assert m["distance_to_retrain"] >= 0
            assert row["methods"]["retrain"]["distance_to_retrain"] == 0.0
            for w in widths:
                sisa = row["sisa"][w]
                assert _positive(sisa["seconds"]) and acc_ok(sisa["ensemble_accuracy"])
                assert 1 <= sisa["num_shards_retrained"] <= settings["shards"]
        summary = entry["summary"]
        for w in widths:
            s = summary["sisa"][w]
            assert _positive(s["speedup"]) and _positive(s["speedup_compute_only"])
            # SISA forgetting is exact: the affected shards equal shards trained from scratch
            assert s["max_affected_shard_distance_to_scratch"] == 0.0
            assert s["bitwise_equal_to_scratch"] is True
    assert set(result["targets"]["forget_one"]) == set(widths)
    by_slice = result["forget_one_by_slice"]
    for w in widths:
        assert set(by_slice[w]["slices"]) == {str(r) for r in range(settings["slices"])}
        assert _positive(by_slice[w]["speedup_expected_uniform"])
        # a later slice never needs more checkpoint saves than an earlier one
        saves = [
            by_slice[w]["slices"][str(r)]["checkpoint_saves"] for r in range(settings["slices"])
        ]
        assert saves == sorted(saves, reverse=True)
    for v in result["targets"]["ensemble_accuracy"].values():
        assert 0.0 <= v["ensemble_test_acc"] <= 1.0
    assert isinstance(result["target_met"]["ensemble_accuracy"], bool)
