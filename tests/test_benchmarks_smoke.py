"""Smoke test of ``benchmarks/train_step.py --smoke`` (``--quick`` at 8×8, one size per model):
it runs, and its JSON is complete.

Runs the script in a subprocess exactly as documented (from the repository root, with this
interpreter), so the ``sys.path`` handling of the benchmark scripts is exercised too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_train_step_quick(tmp_path):
    out = tmp_path / "x.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "--smoke", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(out.read_text())

    machine = result["machine"]
    for field in ("platform", "cpu_count", "python", "versions", "jax_backend", "jax_device_kinds"):
        assert field in machine, field
    assert machine["versions"]["jax"] != "not installed"
    assert machine["cpu_count"] >= 1
    assert result["timestamp_utc"]

    settings = result["settings"]
    assert settings["quick"] is True and settings["smoke"] is True
    assert settings["batch_size"] == 32

    models = result["models"]
    assert set(models) == {"mlp@8", "small_cnn@8", "simple_conv@8"}
    for name, entry in models.items():
        assert entry["examples_per_s"] > 0, name
        assert entry["ms_per_step"] > 0, name
        assert entry["num_params"] > 0, name
        for variant in ("donate", "no_donate"):
            assert entry["variants"][variant]["examples_per_s"] > 0, (name, variant)
            assert entry["compile_s"][variant] > 0, (name, variant)
        assert entry["best_variant"] in ("donate", "no_donate")

    epoch = result["epoch_scan_vs_loop"]
    assert epoch["scan"]["examples_per_s"] > 0 and epoch["loop"]["examples_per_s"] > 0
    assert epoch["scan_over_loop"] > 0

    torch_info = result["torch"]
    if isinstance(torch_info, str):
        assert torch_info == "not installed"
    else:
        for name in ("mlp@8", "small_cnn@8"):
            t = torch_info["results"][name]
            assert t["examples_per_s"] > 0 and t["jax_over_torch"] > 0
            assert t["same_param_count"], name
