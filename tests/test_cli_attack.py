"""``privdebias attack`` on a model saved by ``privdebias train``: JSON, ROC plot, bad input."""

from __future__ import annotations

import json

import pytest

from privdebias_jax.cli import main

pytestmark = pytest.mark.integration


def test_attack_cli_writes_every_attack(tmp_path, capsys):
    model_dir = tmp_path / "m"
    assert (
        main(
            [
                "train",
                "--dataset",
                "colored-mnist",
                "--train-size",
                "200",
                "--epochs",
                "2",
                "--batch-size",
                "50",
                "--no-progress",
                "--out",
                str(model_dir),
            ]
        )
        == 0
    )
    out = tmp_path / "a"
    assert (
        main(
            [
                "attack",
                "--from",
                str(model_dir),
                "--members",
                "40",
                "--reference-models",
                "2",
                "--reference-epochs",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert set(res["attacks"]) == {
        "loss",
        "confidence",
        "entropy",
        "modified_entropy",
        "m_loss",
        "m_mean",
        "m_moments",
        "lira_online",
        "lira_offline",
        "shadow",
    }
    for rep in res["attacks"].values():
        assert 0.0 <= rep["auc"]["ci_low"] <= rep["auc"]["value"] <= rep["auc"]["ci_high"] <= 1.0
    assert res["members"] == res["nonmembers"] == 40
    assert (out / "roc.png").stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_attack_cli_bad_input(tmp_path, capsys):
    assert main(["attack", "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")]) == 2
    assert "no results.json" in capsys.readouterr().err
