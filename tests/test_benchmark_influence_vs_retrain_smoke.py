"""benchmarks/influence_vs_retrain.py: its bookkeeping against hand-computed tables, and a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.influence_vs_retrain import judge, summarize, time_to_quality

CURVE = [
    {"epoch": 1, "seconds": 1.0, "counterfactual_bias": 0.70, "acc_unbiased": 0.30, "acc_biased": 0.99},
    {"epoch": 2, "seconds": 2.0, "counterfactual_bias": 0.40, "acc_unbiased": 0.50, "acc_biased": 0.97},
    {"epoch": 3, "seconds": 3.0, "counterfactual_bias": 0.20, "acc_unbiased": 0.80, "acc_biased": 0.95},
]


def test_time_to_quality_is_the_first_epoch_reaching_both():
    assert time_to_quality(CURVE, 0.45, 0.45) == {"epoch": 2, "seconds": 2.0, "acc_biased": 0.97}
    assert time_to_quality(CURVE, 0.45, 0.60)["epoch"] == 3  # bias reached at 2, accuracy only at 3
    assert time_to_quality(CURVE, 0.10, 0.10) == {"epoch": None, "seconds": None, "acc_biased": None}


def test_summary_and_targets_by_hand():
    seeds = [
        {"seed": s, "vanilla": {"counterfactual_bias": 0.8, "acc_unbiased": 0.3, "acc_biased": 0.99},
         "retrain": {"warm": CURVE},
         "methods": {"fmd[external,exact]": {"method": "fmd", "counterfactual_bias": b, "acc_unbiased": u,
                                             "acc_biased": 0.96, "seconds_warm": 0.01, "speedup_warm": 2.0 / 0.01},
                     "head_retrain[others]": {"method": "head_retrain", "counterfactual_bias": 0.3,
                                              "acc_unbiased": 0.7, "acc_biased": 0.6, "seconds_warm": 0.1}}}
        for s, (b, u) in enumerate([(0.35, 0.5), (0.45, 0.4)])
    ]
    summary = summarize(seeds)
    row = summary["fmd[external,exact]"]["counterfactual_bias"]
    assert row == {"mean": pytest.approx(0.40), "min": 0.35, "max": 0.45, "n": 2}
    verdicts = judge("mlp", seeds)["per_seed"]
    # seed 0: cut 1 − 0.35/0.8 = 0.5625, gain 0.2; retraining first reaches bias ≤ 0.35 at epoch 3 (biased 0.95)
    assert verdicts[0]["bias_cut"] == pytest.approx(1 - 0.35 / 0.8) and verdicts[0]["bias_cut_at_least_50pct"]
    assert verdicts[0]["unbiased_gain"] == pytest.approx(0.2) and verdicts[0]["unbiased_up_15_points"]
    assert verdicts[0]["retrain_biased_acc_at_same_bias"] == 0.95 and verdicts[0]["biased_within_5_points_of_retraining"]
    assert verdicts[0]["head_retrain_over_fmd_time_warm"] == pytest.approx(10.0)
    # the head frontier at bias ≤ 0.40 reaches 0.7 unbiased: FMD's 0.5 is 20 points below it
    assert verdicts[0]["head_frontier_unbiased_at_fmd_bias"] == 0.7
    assert verdicts[0]["fmd_within_5_points_of_head_frontier"] is False
    assert not verdicts[1]["bias_cut_at_least_50pct"] and not verdicts[1]["unbiased_up_15_points"]


@pytest.mark.integration
def test_quick_run_writes_json_and_png(tmp_path):
    out = tmp_path / "ivr.json"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "benchmarks" / "influence_vs_retrain.py"), "--quick",
                    "--settings", "mlp", "--skip-unlearning", "--out", str(out)], check=True, cwd=root, timeout=600)
    res = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file() and res["machine"]["cpu_count"] >= 1
    seed = res["debiasing"]["mlp"]["seeds"][0]
    assert {"fmd[external,exact]", "fmd[external,cg]", "fmd[train,K=10%]", "head_retrain[others]",
            "proximal_finetune[mu=0.01]"} <= set(seed["methods"])
    # the warm retraining curve is cumulative and as long as the recipe
    secs = [r["seconds"] for r in seed["retrain"]["warm"]]
    assert len(secs) == seed["epochs"] and np.all(np.diff(secs) > 0)
    # the exact and cg solvers give the same one-step FMD model
    a, b = seed["methods"]["fmd[external,exact]"], seed["methods"]["fmd[external,cg]"]
    assert a["counterfactual_bias"] == pytest.approx(b["counterfactual_bias"], abs=2e-3)
