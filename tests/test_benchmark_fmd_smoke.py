"""Smoke tests of benchmarks/fmd_vs_retrain.py and benchmarks/fit_loop.py (tiny sizes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_fmd_vs_retrain_quick(tmp_path):
    # the external mode only (the train mode's FMD is checked against references in test_fmd.py):
    # cold, one warm call, then one interleaved warm call per retraining epoch
    out = tmp_path / "fvr.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fmd_vs_retrain.py"), "--quick", "--model", "mlp", "--warm-repeats", "1",
         "--modes", "external", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["fmd"]) == {"external"} and res["settings"]["modes"] == ["external"]
    row = res["fmd"]["external"]
    assert row["seconds_cold"] > 0 and row["seconds_warm"] > 0
    assert len(row["seconds_warm_all"]) == 1 + 2  # + one per retraining epoch
    assert row["seconds_warm"] == float(np.median(row["seconds_warm_all"]))
    # the ratios are what the timings say, and finite
    assert row["ratio_warm"] == row["retrain_seconds_warm"] / row["seconds_warm"]
    assert row["ratio_cold"] == (row["retrain_seconds_warm"] + res["retrain_compile_seconds"]) / row["seconds_cold"]
    assert math.isfinite(row["ratio_warm"]) and row["ratio_warm"] > 0
    assert math.isfinite(row["ratio_cold"]) and row["ratio_cold"] > 0
    assert 0 <= row["metrics"]["counterfactual_bias"] <= 1
    assert 0 <= row["metrics"]["acc_unbiased"] <= 1 and math.isfinite(row["bias_reduction"])
    assert len(res["retrain_epochs"]) == 2 and res["machine"]["cpu_count"] >= 1
    assert row["samples_forwarded"] == 2 * res["settings"]["external_size"]


def test_fit_loop_quick(tmp_path):
    out = tmp_path / "fl.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fit_loop.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for e in json.loads(out.read_text())["entries"]:
        assert e["examples_per_s_scan"] > 0 and e["examples_per_s_loop"] > 0
        assert e["loop_speedup_over_scan"] == e["seconds_scan"] / e["seconds_loop"]
