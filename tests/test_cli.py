"""The command line and the main job, end to end on tiny settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from privdebias_jax.cli import main
from privdebias_jax.config import load_config_file
from privdebias_jax.data import other_attribute
from privdebias_jax.metrics import counterfactual_bias_from_logits
from privdebias_jax.pipeline import load_model, load_splits
from privdebias_jax.train import predict

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--image-size", "8", "--train-size", "300", "--no-progress"]


def test_train_writes_results_that_match_the_saved_model(tmp_path):
    out = tmp_path / "cm"
    assert main(["train", "--dataset", "colored-mnist", *TINY, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("acc_biased", "acc_unbiased", "counterfactual_bias", "kl_bias", "dp_diff", "eo_diff", "train_seconds"):
        assert np.isfinite(res[key]), key
    # Independent reference: reload the saved model, recompute accuracy and bias by hand.
    model, state, spec = load_model(out / "model")
    config = load_config_file(ROOT / "experiments" / "vanilla_colored_mnist.py")
    config.image_size, config.train_size, config.seed = 8, 300, 0
    splits = load_splits(config)
    logits, _ = predict(model, state.params, state.model_state, splits.test_unbiased)
    assert res["acc_unbiased"] == pytest.approx(np.mean(logits.argmax(-1) == splits.test_unbiased.y))
    logits_b, _ = predict(model, state.params, state.model_state, splits.test)
    assert res["acc_biased"] == pytest.approx(np.mean(logits_b.argmax(-1) == splits.test.y))
    counts = np.zeros((10, 10))
    np.add.at(counts, (splits.train.y, splits.train.a), 1)
    p = counts / counts.sum()
    py, pa = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    assert res["kl_bias"] == pytest.approx(float(np.sum(p[nz] * np.log(p[nz] / (py @ pa)[nz]))), rel=1e-4)
    assert spec.model == "mlp" and res["num_params"] == sum(x.size for x in __import__("jax").tree.leaves(state.params))
    assert 0.0 <= res["counterfactual_bias"] <= 1.0


def test_counterfactual_bias_in_results_is_reproducible(tmp_path):
    out = tmp_path / "bm"
    assert main(["train", "--dataset", "biased-mnist", *TINY, "--model", "mlp", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    model, state, _ = load_model(out / "model")
    from privdebias_jax.config import get_config

    c = get_config("biased-mnist")
    c.image_size, c.train_size, c.model = 8, 300, "mlp"
    splits = load_splits(c)
    import jax

    key = jax.random.fold_in(jax.random.key(0), 4)
    cf = splits.counterfactual(splits.test, other_attribute(splits.test.a, 10, key))
    lg, _ = predict(model, state.params, state.model_state, splits.test)
    lg_cf, _ = predict(model, state.params, state.model_state, cf)
    sm = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
    p, q = sm(lg), sm(lg_cf)
    yhat = p.argmax(1)
    by_hand = np.mean(np.abs(p[np.arange(len(p)), yhat] - q[np.arange(len(q)), yhat]))
    assert res["counterfactual_bias"] == pytest.approx(by_hand, abs=1e-5)
    assert float(counterfactual_bias_from_logits(lg, lg_cf)) == pytest.approx(by_hand, abs=1e-5)


def test_train_resume_continues_to_the_same_parameters(tmp_path):
    import jax

    a, b = tmp_path / "a", tmp_path / "b"
    args = ["train", "--dataset", "colored-mnist", "--image-size", "8", "--train-size", "300", "--no-progress"]
    assert main([*args, "--epochs", "3", "--out", str(a)]) == 0
    assert main([*args, "--epochs", "1", "--out", str(b)]) == 0
    assert main([*args, "--epochs", "3", "--out", str(b), "--resume"]) == 0
    _, sa, _ = load_model(a / "model")
    _, sb, _ = load_model(b / "model")
    for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params), strict=False):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_run_quick_writes_the_results_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--quick", "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["quick"] is True and res["dataset"] == "biased-mnist"
    v = res["vanilla"]
    assert 0.0 <= v["acc_unbiased"] <= 1.0 and 0.0 <= v["acc_biased"] <= 1.0
    # The data's aligned fraction is close to rho = 0.99 (binomial, 600 samples).
    assert abs(res["data"]["fraction_aligned"] - 0.99) < 0.03
    report = (out / "report.md").read_text()
    assert "accuracy, unbiased test" in report and f"{v['acc_unbiased']:.3f}" in report
    assert "{" not in report  # every placeholder filled
    # the FMD pass on the loop's result is its own column, measured like the others
    assert "sync+proximal_finetune" in report and res["fmd_pass"]["num_params_updated"] > 0
    assert res["measured"]["sync+proximal_finetune"]["data_kl_bias"] == res["measured"]["sync"]["data_kl_bias"]
    for fig in (
        "samples.png", "cell_accuracy_vanilla.png", "cell_accuracy_fmd.png", "training.png",
        "generated_per_cell.png", "rounds.png", "roc.png",
    ):
        assert (out / fig).stat().st_size > 1000
    assert "accuracy, unbiased test" in capsys.readouterr().out
    # the sync loop: rounds recorded, its last round is the "sync" column, data bias recomputable
    sync_res = res["sync"]
    assert sync_res["rounds"] == len(sync_res["history"]) - 1 >= 1
    last = sync_res["history"][-1]
    assert res["measured"]["sync"]["data_kl_bias"] == last["data_kl_bias"]
    assert f"{last['data_kl_bias']:.3f}" in report and "naive" in report
    assert sum(sync_res["forgotten_per_round"]) == round(0.1 * res["data"]["train_size"])
    state = json.loads((out / "sync" / "state.json").read_text())
    assert state["round"] == sync_res["rounds"] and state["stopped"]
    # a second run into the same folder is refused; bad loop options are named
    assert main(["run", "--quick", "--no-progress", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    for flag, value, message in [
        ("--rounds", "0", "rounds"),
        ("--forget-rate", "1.5", "forget rate"),
        ("--shards", "0", "shards"),
        ("--program-width", "3", "program_width"),  # more lanes than the quick job's 2 shards
    ]:
        assert main(["run", "--quick", "--no-progress", "--out", str(tmp_path / "bad"), flag, value]) == 2
        assert message in capsys.readouterr().err


def test_run_resume_with_nothing_to_resume_is_refused(tmp_path, capsys):
    out = tmp_path / "fresh"
    assert main(["run", "--quick", "--no-progress", "--out", str(out), "--resume"]) == 2
    assert "holds no run to resume (no run.json)" in capsys.readouterr().err
    assert not out.exists()  # nothing written or left behind


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "biased-mnist", "--rho", "1.5"], "rho must be in [0, 1]"),
        (["train", "--dataset", "nope"], "invalid choice"),
        (["train", "--dataset", "biased-mnist", "--epochs", "-1"], "positive integer"),
        (["train", "--dataset", "biased-mnist", "--epochs", "0"], "expected a positive integer, got 0"),
        (["run", "--quick", "--epochs", "0"], "expected a positive integer, got 0"),
        (["train", "--dataset", "biased-mnist", "--batch-size", "0"], "positive integer"),
    ],
)
def test_bad_arguments_are_named(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_dataset_and_missing_adult_files(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path)]) == 2
    assert "--dataset is required" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--dataset", "adult", "--data-dir", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "adult.data" in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.py"), "--out", str(tmp_path)]) == 2
    assert "config file not found" in capsys.readouterr().err


CONFIG_FILES = [p for p in sorted((ROOT / "experiments").glob("*.py")) if "def get_config" in p.read_text()]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_experiment_configs_load(path):
    config = load_config_file(path)
    assert config.dataset in ("colored-mnist", "biased-mnist", "adult", "celeba", "cifar10")


def test_rho_sweep_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import vanilla_rho_sweep
    finally:
        sys.path.pop(0)
    out = tmp_path / "sweep.json"
    payload = vanilla_rho_sweep.main(["--out", str(out), "--rhos", "0.9", "--datasets", "colored-mnist",
                                      "--epochs", "1", "--train-size", "200", "--image-size", "8"])
    assert json.loads(out.read_text())["rows"][0]["rho"] == 0.9
    assert payload["summary"]["colored-mnist@0.9"]["n"] == 1


def test_console_script_is_installed():
    exe = shutil.which("privdebias") or str(Path(sys.executable).with_name("privdebias"))
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "train" in proc.stdout and "run" in proc.stdout
