"""Smoke tests (tiny sizes) of the privacy experiments and the shadow-model benchmark, plus the
unlearning audit on a SISA ensemble checked against attacking its members directly."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from privdebias_jax.data import load_dataset, subset
from privdebias_jax.models import create_model
from privdebias_jax.privacy.attacks import attack_suite, unlearning_audit
from privdebias_jax.privacy.membership import loss_score
from privdebias_jax.privacy.metrics import roc_auc
from privdebias_jax.train import make_optimizer, predict
from privdebias_jax.types import PrivDebiasError
from privdebias_jax.unlearn import make_plan, train_shards

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def _load(relpath: str):
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_privacy_experiment_quick(tmp_path):
    exp = _load("experiments/privacy_biased_mnist.py")
    res = exp.main(["--quick", "--models", "overfit", "--out", str(tmp_path)])
    row = res["models"]["overfit"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["models"]["overfit"]["summary"] == json.loads(json.dumps(row["summary"]))
    attacks = {
        "loss", "confidence", "entropy", "modified_entropy", "m_loss", "m_mean", "m_moments",
        "lira_online", "lira_offline", "shadow",
    }  # fmt: skip
    assert set(row["membership"]["attacks"]) == attacks
    for rep in row["membership"]["attacks"].values():
        assert rep["auc"]["ci_low"] <= rep["auc"]["value"] <= rep["auc"]["ci_high"]
        assert set(rep["by_attribute"]) and set(rep["by_class"])
    parts = row["suite_seconds_parts"]
    assert row["suite_seconds"] == pytest.approx(sum(parts.values()), rel=1e-6)
    assert 0.0 <= row["attribute_probe"]["accuracy"] <= 1.0
    assert row["reconstruction"]["n_test"] > 0
    assert (tmp_path / "roc_overfit.png").stat().st_size > 0
    assert (tmp_path / "reconstruction_overfit.png").stat().st_size > 0


def test_shadow_benchmark_quick(tmp_path):
    bench = _load("benchmarks/shadow_models.py")
    out = tmp_path / "b.json"
    res = bench.main(["--quick", "--out", str(out)])
    e = res["results"]["mlp"]["4"]
    v = e["variants"]
    assert set(v) == {"teams", "lanes", "loop_per_batch"}
    for name in v:
        assert v[name]["examples_per_s"] == pytest.approx(v[name]["examples"] / v[name]["seconds"])
    # every layout trains 4 models on half of the 128-row pool for 1 epoch
    assert all(x["examples"] == 4 * 64 for x in v.values())
    assert e["ratios"]["teams/loop_per_batch"] == pytest.approx(
        v["teams"]["examples_per_s"] / v["loop_per_batch"]["examples_per_s"]
    )
    assert e["ratios"]["lanes/loop_per_batch"] == pytest.approx(
        v["lanes"]["examples_per_s"] / v["loop_per_batch"]["examples_per_s"]
    )
    # the target is judged on the MLP's auto layout (lanes)
    assert res["target"]["layout"] == "lanes"
    assert json.loads(out.read_text())["machine"]["cpu_count"] >= 1


def test_unlearning_audit_on_sisa_ensemble(tmp_path):
    """The audit reads a SISA ensemble through the shared logits interface: its LOSS AUC equals
    the AUC of ``log p̄_y`` computed from the shard members' own softmax outputs; forgetting a
    shard's samples changes only that shard, and bad sets raise."""
    ds = load_dataset("colored-mnist", image_size=6, train_size=60)
    train, test = ds.train, subset(ds.test, np.arange(12))
    model = create_model("mlp", 10, hidden=(16,))
    tx = make_optimizer("adam", 1e-2)
    plan = make_plan(train.idx, 2, 1, key=0)
    sisa, _ = train_shards(
        model, tx, train, plan, tmp_path / "s", key=1, epochs_per_slice=3, batch_size=10
    )
    forget = subset(train, np.arange(12))
    before = sisa.ensemble()
    audit = unlearning_audit(
        {"before": before}, forget, test, key=jax.random.PRNGKey(0), attacks=("loss",),
        num_resamples=20,
    )  # fmt: skip
    # independent reference: average the members' probabilities by hand, on the eval split
    suite = attack_suite(
        before, forget, test, key=jax.random.PRNGKey(0), attacks=("loss",), num_resamples=20,
        slices=False,
    )  # fmt: skip
    assert audit["before"]["loss"]["auc"] == suite["attacks"]["loss"]["auc"]
    both = [forget, test]
    probs = []
    for s in range(2):
        st = sisa.shard_state(s)
        lg = [np.asarray(predict(model, st.params, st.model_state, d)[0]) for d in both]
        probs.append([np.exp(z - z.max(1, keepdims=True)) for z in lg])
    mean = [
        (
            probs[0][j] / probs[0][j].sum(1, keepdims=True)
            + probs[1][j] / probs[1][j].sum(1, keepdims=True)
        )
        / 2
        for j in range(2)
    ]
    scores = np.concatenate(
        [np.log(m[np.arange(len(d)), np.asarray(d.y)]) for m, d in zip(mean, both, strict=True)]
    )
    labels = np.concatenate([np.ones(len(forget)), np.zeros(len(test))])
    ens_scores = np.concatenate([loss_score(predict(*before, d)[0], d.y) for d in both])
    np.testing.assert_allclose(ens_scores, scores, rtol=1e-4, atol=1e-5)
    assert roc_auc(ens_scores, labels) == pytest.approx(roc_auc(scores, labels), abs=1e-9)
    with pytest.raises(PrivDebiasError, match="overlap"):
        unlearning_audit(
            {"before": before}, forget, subset(train, np.arange(5, 20)), key=jax.random.PRNGKey(0)
        )
    with pytest.raises(PrivDebiasError, match="non-members"):
        unlearning_audit(
            {"before": before}, forget, subset(test, np.arange(0)), key=jax.random.PRNGKey(0)
        )


def test_unlearning_audit_experiment_quick(tmp_path):
    exp = _load("experiments/unlearning_audit.py")
    res = exp.main(["--quick", "--out", str(tmp_path)])
    assert set(res["summary"]) == {"single_before", "retrained", "sisa_before", "sisa_after"}
    assert res["forget_size"] == 20 and res["nonmember_size"] == 20
    for attacks in res["summary"].values():
        assert set(attacks) == {"loss", "m_mean"}  # --quick runs two attacks
        for m in attacks.values():
            assert m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1]
