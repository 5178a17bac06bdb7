"""Smoke test of benchmarks/influence_unlearning.py (tiny sizes) and of its float64 last-layer
reference against an independent scipy fit."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, special

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.influence_unlearning import HeadObjective, fit_head  # noqa: E402

pytestmark = pytest.mark.integration


def _scipy_objective(features, labels, normaliser, damping, anchor, num_classes):
    """The same objective written independently: softmax cross-entropy via logsumexp."""
    f = features.shape[1]

    def fun(theta):
        w, b = theta[: f * num_classes].reshape(f, num_classes), theta[f * num_classes :]
        z = features @ w + b
        nll = special.logsumexp(z, axis=1) - z[np.arange(len(labels)), labels]
        return nll.sum() / normaliser + 0.5 * damping * np.sum((theta - anchor) ** 2)

    return fun


def test_fit_head_matches_scipy_on_a_separable_problem():
    rng = np.random.default_rng(0)
    n, f, c = 60, 5, 3
    labels = rng.integers(0, c, n)
    centres = 4.0 * rng.normal(size=(c, f))
    features = centres[labels] + 0.3 * rng.normal(size=(n, f))  # linearly separable
    anchor = rng.normal(size=f * c + c)
    obj = HeadObjective(features, labels, n + 3, 1e-2, anchor, c)
    fun = _scipy_objective(features, labels, n + 3, 1e-2, anchor, c)
    # gradient and Hessian product against central finite differences of the independent value
    theta = rng.normal(size=anchor.size)
    eps = 1e-6
    fd = np.array(
        [(fun(theta + eps * e) - fun(theta - eps * e)) / (2 * eps) for e in np.eye(theta.size)]
    )
    value, grad = obj.value_and_grad(theta)
    assert value == pytest.approx(fun(theta), rel=1e-12)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)
    v = rng.normal(size=theta.size)
    fd_hv = (obj.value_and_grad(theta + eps * v)[1] - obj.value_and_grad(theta - eps * v)[1]) / (
        2 * eps
    )
    np.testing.assert_allclose(obj.hessian_operator(theta)(v), fd_hv, rtol=1e-5, atol=1e-8)
    # the minimiser: Newton in fit_head vs scipy's trust-region fit on the independent objective
    mine, info = fit_head(obj, anchor, 1e-12)
    assert info["converged"] and info["grad_norm"] <= 1e-12
    ref = optimize.minimize(
        fun, anchor, jac=lambda t: obj.value_and_grad(t)[1], method="BFGS", options={"gtol": 1e-10}
    )
    assert np.linalg.norm(mine - ref.x) <= 1e-6 * np.linalg.norm(ref.x)
    assert fun(mine) <= fun(ref.x) + 1e-12


def test_influence_unlearning_quick(tmp_path):
    out = tmp_path / "iu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "influence_unlearning.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["jax_backend"]
    assert res["command"].startswith("python benchmarks/influence_unlearning.py") and (
        "--quick" in res["command"]
    )
    st = res["settings"]
    assert st["quick"] and st["sizes"] == [1, 10] and st["draws"] == 1
    assert st["solvers"] == ["exact", "cg"] and st["damping"] > 0
    # the original head is the float64 optimum of its proximal objective
    assert res["original_model"]["head_fit"]["grad_norm"] <= 1e-12

    for k in ("1", "10"):
        entry = res["sizes"][k]
        (draw,) = entry["draws"]
        methods = draw["methods"]
        assert len(draw["ids"]) == int(k) and draw["retained"] == st["train_size"] - int(k)
        # full retraining is the reference: it agrees with itself, and retraining again with
        # the same key reproduces it exactly
        for split in ("test", "test_unbiased", "forget"):
            assert methods["full_retrain"][f"agreement_{split}"] == 1.0
            assert draw["retrain_repeat"]["same_key"][f"agreement_{split}"] == 1.0
            for name, row in methods.items():
                assert 0.0 <= row[f"agreement_{split}"] <= 1.0, name
        assert draw["retrain_repeat"]["same_key"]["distance_to_full_retrain"] == 0.0
        # the float64 reference reached its gradient tolerance
        fit = methods["last_layer_exact"]["fit"]
        assert fit["converged"] and fit["grad_norm"] <= min(1e-8, fit["gtol"])
        assert draw["reference_head_displacement"] > 0
        # two independent solvers give the same Newton step, both converged
        for solver in ("exact", "cg"):
            diag = methods[f"newton_{solver}"]["diagnostics"]
            assert diag["converged"] and diag["residual"] < 1e-3, (solver, diag)
        assert methods["newton_cg"]["error_vs_exact_solver"] < 1e-2
        assert methods["sisa"]["shards_retrained"] >= 1
        summary = entry["summary"]["methods"]
        retrain_s = summary["full_retrain"]["seconds"]["median"]
        for row in summary.values():
            if "seconds" in row:
                assert row["seconds"]["median"] > 0
                assert row["speedup_vs_full_retrain"] == retrain_s / row["seconds"]["median"]
    # a one-sample Newton removal with the exact solver lands on the float64 retraining of the
    # last layer (relative to how far that retraining moves the head)
    one = res["sizes"]["1"]["draws"][0]["methods"]
    assert one["newton_exact"]["distance"] < 0.05
    assert one["finetune"]["distance"] > 0  # all parameters, to full retraining
    assert res["not_converged"] == []

    # the membership attack runs on the largest size: the strongest is the maximum over attacks
    assert st["attack"]["size"] == 10
    (draw,) = res["sizes"]["10"]["draws"]
    for name, att in draw["membership"].items():
        assert att["strongest_balanced_accuracy"] == max(att["balanced_accuracy"].values())
        assert att["strongest_auc"] == max(att["auc"].values())
        assert set(att["balanced_accuracy"]) == set(st["attack"]["attacks"])
        assert all(0.0 <= v <= 1.0 for v in att["auc"].values()), name
    assert {"original", "full_retrain", "sisa", "newton_exact"} <= set(draw["membership"])
    assert "membership" not in res["sizes"]["1"]["draws"][0]
    mem = res["sizes"]["10"]["summary"]["membership"]["full_retrain"]
    assert math.isclose(
        mem["strongest_balanced_accuracy"]["mean"],
        draw["membership"]["full_retrain"]["strongest_balanced_accuracy"],
    )
