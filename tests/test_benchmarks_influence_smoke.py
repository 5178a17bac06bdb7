"""Smoke tests of the influence benchmarks: ``hvp_cost``, ``solvers`` and ``torch_reference``.

Each script runs with ``--quick --out tmp_path/...json`` in a subprocess, exactly as documented
(from the repository root, with this interpreter), and its JSON must hold the machine, the
settings and positive, finite key figures. ``hvp_cost`` runs at 8×8 and ``solvers`` with
``--smoke`` (smaller problems) to keep the suite's time down.
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


def run_quick(script: str, out: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}.py", "--quick", "--out", str(out), *extra],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(out.read_text())
    assert result["benchmark"] == script
    assert result["timestamp_utc"]
    machine = result["machine"]
    for field in ("platform", "cpu_count", "python", "versions", "jax_backend"):
        assert field in machine, field
    assert result["settings"]["quick"] is True
    return result


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_hvp_cost_quick(tmp_path):
    # 8x8 images (the script's own --image-size option): the MLP and the CNN, each compiled once
    result = run_quick("hvp_cost", tmp_path / "hvp_cost.json", "--image-size", "8")
    configs = result["configs"]
    assert set(configs) == {"mlp@8", "small_cnn@8"}
    for name, entry in configs.items():
        assert set(entry["subsets"]) == {"all", "head"}, name
        for subset, e in entry["subsets"].items():
            for fn in ("forward", "grad", "hvp", "gnvp", "linearize", "hvp_linearized", "library_matvec_hessian"):
                assert positive(e["ms"][fn]), (name, subset, fn)
            assert positive(e["hvp_linearized_over_grad"]) and isinstance(e["meets_target_linearized"], bool)
            # One product of the linearization is the same product as the one-off HVP.
            assert e["checks"]["hvp_linearized_vs_hvp_rel_diff"] < 1e-4, (name, subset)
            assert positive(e["hvp_over_grad"]) and positive(e["gnvp_over_grad"]), (name, subset)
            assert isinstance(e["meets_target"], bool)
            assert e["num_params"] > 0
            # XLA's cost analysis: the HVP does more arithmetic than the gradient, which does more
            # than the forward pass
            fl = e["xla_flops"]
            assert fl["hvp"] > fl["grad"] > fl["forward"] > 0 and e["hvp_over_grad_flops"] == fl["hvp"] / fl["grad"]
            # The HVP is a symmetric map and the library's matvec computes the same product.
            assert e["checks"]["hvp_symmetry_rel_err"] < 1e-3, (name, subset)
            assert e["checks"]["library_matvec_vs_hvp_rel_diff"] < 1e-4, (name, subset)
        assert entry["subsets"]["head"]["num_params"] < entry["subsets"]["all"]["num_params"]
    assert set(result["summary"]["hvp_over_grad"]) == {
        f"{n}/{s}" for n in configs for s in ("all", "head")
    }


def test_solvers_quick(tmp_path):
    out = tmp_path / "solvers.json"
    # --smoke: --quick with smaller problems (a 16-unit head on 100 digits); the head problem only
    # (--problems head): the all-parameter Gauss-Newton solvers are checked against a dense solve
    # in tests/test_influence.py::test_solver_against_dense_solve[all_gn-*]
    result = run_quick("solvers", out, "--smoke", "--problems", "head")
    assert result["settings"]["smoke"] is True
    assert out.with_suffix(".png").stat().st_size > 0
    problems = result["problems"]
    assert set(problems) == {"head"}
    for pname, p in problems.items():
        assert p["library_influence_scores_rel_diff"] < 1e-4, pname
        solvers = p["solvers"]
        expected = {"exact", "cg", "lissa", "lissa_oracle_scale", "arnoldi", "kfac", "ekfac"}
        assert expected <= set(solvers), pname
        for label, e in solvers.items():
            assert "error" not in e, (pname, label, e.get("error"))
            assert positive(e["prepare_plus_solve_s"]), (pname, label)
            assert e["memory"]["tracemalloc_peak_mb"] >= 0
            for obj in ("counterfactual_bias", "test_loss"):
                o = e["objectives"][obj]
                assert math.isfinite(o["rel_err"]) and o["rel_err"] >= 0, (pname, label, obj)
                assert -1.0 <= o["spearman"] <= 1.0, (pname, label, obj)
        # The exact solve and converged CG reproduce the float64 reference.
        for label in ("exact", "cg"):
            o = solvers[label]["objectives"]["counterfactual_bias"]
            assert o["spearman"] > 0.99 and o["rel_err"] < 1e-3, (pname, label)
    assert "linear_head" in problems["head"]["solvers"]
    assert problems["head"]["kfac_ekfac_dense_check"]["kfac"]["library_vs_independent_rel"] < 1e-3


def test_torch_reference_quick(tmp_path):
    result = run_quick("torch_reference", tmp_path / "torch_reference.json")
    if result["torch"] == "not installed":
        return
    assert result["torch"]["num_threads"] >= 1
    configs = result["configs"]
    assert {"mlp@28", "small_cnn@28"} <= set(configs)
    for name, e in configs.items():
        for fn in ("jax_hvp", "jax_grad", "torch_hvp", "torch_grad"):
            assert positive(e["ms"][fn]), (name, fn)
        assert positive(e["jax_over_torch_hvp"]), name
        assert e["check"]["passed"], (name, e["check"])
        assert e["check"]["hvp_rel_err"] < 1e-3, name
        assert e["num_params"] == e["torch_num_params"], name
        # The fixed-point products of both frameworks (linearized JAX, retained-graph PyTorch).
        assert positive(e["jax_linearized_over_torch_graph_reuse"]), name
        for vname in ("jax_linearized_apply", "torch_graph_reuse"):
            assert e["variants"][vname]["rel_err_vs_baseline"] < 1e-3, (name, vname)
    cnn = configs["small_cnn@28"]
    assert cnn["variants"], "the CNN investigation ran no variant"
    for vname, v in cnn["variants"].items():
        assert positive(v["ms_per_hvp"]), vname
        assert v["rel_err_vs_baseline"] < 1e-3, vname
    assert isinstance(result["investigation"]["findings"], list)
