"""Smoke tests of benchmarks/fmd_vs_retrain.py and benchmarks/fit_loop.py (tiny sizes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fmd_vs_retrain_quick(tmp_path):
    out = tmp_path / "fvr.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fmd_vs_retrain.py"), "--quick", "--model", "mlp", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["fmd_seconds_cold"] > 0 and res["fmd_seconds_warm"] > 0
    assert res["ratio_retrain_over_fmd_cold"] > 0 and len(res["retrain_epochs"]) == 2
    # the ratio is what the two timings say
    assert res["ratio_retrain_over_fmd_warm"] == res["retrain_seconds_to_fmd_bias"] / res["fmd_seconds_warm"]
    assert 0 <= res["fmd"]["counterfactual_bias"] <= 1 and res["machine"]["cpu_count"] >= 1


def test_fit_loop_quick(tmp_path):
    out = tmp_path / "fl.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fit_loop.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for e in json.loads(out.read_text())["entries"]:
        assert e["examples_per_s_scan"] > 0 and e["examples_per_s_loop"] > 0
        assert e["loop_speedup_over_scan"] == e["seconds_scan"] / e["seconds_loop"]
