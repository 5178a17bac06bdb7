"""benchmarks/influence_quality.py: its float64 retraining against an independent solver, and a tiny run
whose convex head must match retraining."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from scipy.optimize import minimize

from benchmarks.influence_quality import per_example_ce, refit64, tail_forward

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_refit64_matches_scipy_on_a_softmax_head():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
    params = {"head": {"kernel": np.zeros((5, 3)), "bias": np.zeros(3)}}
    keep = np.ones((2, 60), bool)
    keep[1, :20] = False
    thetas, gnorm, _ = refit64((), x, y, 0.05, params, keep)
    assert gnorm.max() <= 1e-8

    for row, k in zip(thetas, keep, strict=True):
        def f(t, k=k):
            w, b = t[:15].reshape(5, 3), t[15:]  # scipy's own layout
            logits = x[k] @ w + b
            lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
            return np.mean(lse - logits[np.arange(k.sum()), y[k]]) + 0.025 * t @ t

        ref = minimize(f, np.zeros(18), method="BFGS", options={"gtol": 1e-10}).x
        # ravel order of {"head": {"bias", "kernel"}}: bias first
        np.testing.assert_allclose(row[3:], ref[:15], atol=1e-5)
        np.testing.assert_allclose(row[:3], ref[15:], atol=1e-5)
    with jax.enable_x64(True):
        ce = per_example_ce(tail_forward({"head": {"kernel": np.eye(3)[:, :3], "bias": np.zeros(3)}}, (), np.eye(3)),
                            np.array([0, 1, 2]))
    np.testing.assert_allclose(np.asarray(ce), np.log(np.e + 2) - 1)


def test_quick_run_convex_head_matches_retraining(tmp_path):
    out = tmp_path / "iq.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/influence_quality.py", "--quick", "--problems", "mlp_head", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (prob,) = result["problems"]
    assert prob["retrain_check"]["max_gradient_norm"] <= 1e-8
    rows = {r["label"]: r for r in prob["solvers"]}
    exact = rows["exact/hessian"]
    # first-order influence on a strongly convex head, judged by float64 retraining
    assert exact["lds_0.9"] >= 0.9 and exact["loo"] >= 0.95, exact
    assert exact["converged"] == exact["solves"]
    # the closed-form head solver and CG solve the same system
    for label in ("linear_head/hessian", "cg/hessian"):
        assert rows[label]["lds_0.5"] == pytest.approx(exact["lds_0.5"], abs=0.02)
    # the saved plan re-creates the subsets: α·n kept samples each
    n = prob["train_examples"]
    assert {len(s) for s in prob["plan"]["lds_0.5"]} == {round(0.5 * n)}
    assert all(len(g) == 1 for g in prob["plan"]["loo"])


def test_unknown_problem_is_one_line():
    proc = subprocess.run([sys.executable, "benchmarks/influence_quality.py", "--problems", "resnet_all"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown problem(s) ['resnet_all']" in proc.stderr


def test_docs_tables_carry_the_json_figures(tmp_path):
    from benchmarks.write_docs import main as write_docs

    rows = {"problems": [{"problem": "p", "num_params": 12, "train_examples": 40, "test_examples": 5, "damping": 0.1,
                          "retraining": "r", "retrain_check": {"max_gradient_norm": 1e-9}, "noise_ceiling": None,
                          "solvers": [{"label": "exact/hessian", "lds_0.5": 0.8766, "lds_0.9": 0.9, "lds_0.99": 0.99,
                                       "loo": 0.95, "group_top": 0.5, "group_random": 0.25, "seconds": 3.25,
                                       "max_residual": 1e-6, "converged": 5, "solves": 5},
                                      {"label": "kfac/true_fisher", "error": "boom"}]}],
            "command": "python x.py", "commit": "abc", "timestamp_utc": "2026-01-01",
            "machine": {"jax_backend": "cpu", "jax_device_kinds": ["cpu"], "cpu_count_usable": 2}}
    (tmp_path / "influence_quality.json").write_text(json.dumps(rows))
    out = write_docs(tmp_path / "b.md", tmp_path).read_text()
    assert "| exact/hessian | 0.877 | 0.900 | 0.990 | 0.950 | 0.500 | 0.250 | 3.2 | 1.0e-06 | 5/5 |" in out
    assert "error: boom" in out and "`python x.py`" in out and "commit `abc`" in out
    assert "_influence_throughput.json: not run yet._" in out
