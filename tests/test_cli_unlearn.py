"""``privdebias unlearn``: the SISA job end to end on a tiny Colored-MNIST, and its bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from privdebias_jax.cli import main
from privdebias_jax.unlearn.driver import read_ids

pytestmark = pytest.mark.integration

TINY = [
    "--train-size",
    "240",
    "--epochs",
    "2",
    "--batch-size",
    "32",
    "--shards",
    "2",
    "--slices",
    "2",
    "--no-progress",
]


def test_unlearn_cli_forgets_and_reports_baselines(tmp_path, capsys):
    ids_file = tmp_path / "ids.txt"
    out = tmp_path / "out"
    # the ids of the tiny training set come from the loader: take them from a first run's plan
    assert (
        main(
            [
                "unlearn",
                *TINY,
                "--baselines",
                "retrain,newton,finetune,gradient_ascent",
                "--forget-fraction",
                "0.05",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["forget"]["ids"] == 12  # 5% of 240
    assert res["forget"]["forgotten_total"] == 12
    assert res["plan"]["shards"] == 2 and res["plan"]["slices"] == 2
    ledger = json.loads((out / "sisa" / "ledger.json").read_text())
    assert len(ledger["entries"]) == 12 and all(e["status"] == "done" for e in ledger["entries"])
    for m in ("retrain", "newton", "finetune", "gradient_ascent"):
        assert 0.0 <= res["baselines"][m]["acc_biased"] <= 1.0
        assert res["baselines"][m]["seconds"] > 0
    assert res["baselines"]["retrain"]["distance_to_retrain"] == 0.0
    assert res["baselines"]["newton"]["distance_to_retrain"] > 0.0
    # a second run forgets more ids from a file; the ledger grows, old ids stay forgotten
    meta = json.loads((out / "sisa" / "meta.json").read_text())
    slots = np.asarray(meta["plan"]["slots"])
    already = [e["id"] for e in ledger["entries"]]
    fresh = [int(i) for i in slots[slots >= 0] if int(i) not in already][:3]
    ids_file.write_text(", ".join(str(i) for i in fresh + already[:2]))
    capsys.readouterr()
    assert (
        main(
            ["unlearn", *TINY, "--baselines", "", "--forget-file", str(ids_file), "--out", str(out)]
        )
        == 0
    )
    res2 = json.loads((out / "results.json").read_text())
    assert res2["forget"]["forgotten_total"] == 15
    assert res2["forget"]["steps"][0]["new"] == 3
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shards", "200", "--slices", "4"], "exceeds"),
        (["--baselines", "magic"], "unknown baseline"),
        (["--forget-file", "/nonexistent/ids.txt"], "does not exist"),
    ],
)
def test_unlearn_cli_bad_input_exits_2(tmp_path, capsys, extra, message):
    assert main(["unlearn", *TINY, *extra, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_unlearn_cli_other_plan_directory_is_rejected(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["unlearn", *TINY, "--baselines", "", "--out", out]) == 0
    assert (
        main(
            [
                "unlearn",
                *TINY[:-5],
                "--shards",
                "3",
                "--slices",
                "2",
                "--no-progress",
                "--baselines",
                "",
                "--out",
                out,
            ]
        )
        == 2
    )
    assert "another SISA plan" in capsys.readouterr().err


def test_read_ids_parses_and_rejects(tmp_path):
    p = tmp_path / "ids.txt"
    p.write_text("3 5,7\n11\n")
    np.testing.assert_array_equal(read_ids(p), [3, 5, 7, 11])
    p.write_text("3 x")
    from privdebias_jax.types import PrivDebiasError

    with pytest.raises(PrivDebiasError, match="ids.txt"):
        read_ids(p)
