"""Smoke tests of ``experiments/sync_cifar10.py`` and ``experiments/sync_celeba.py`` on
``tfds.testing.mock_data`` (offline), plus the tint attribute against independent references.

The two experiments run the main job (:func:`privdebias_jax.run.run_main_job`) in quick mode at
their smoke sizes (8×8 images, 160 training images, 1 round, 2 shards). To fit the test
budget the diffusion augmenter is replaced by a *perfect generator* test double (real training
images of the requested class, given the requested attribute: re-tinted exactly for CIFAR-10,
relabelled for CelebA), as in ``tests/test_sync.py``; the augmenter itself is tested in
``tests/test_augment*.py``. Everything else is real: TFDS loading, the tint attribute, the
vanilla model, FMD (CIFAR-10) or its skip (CelebA), SISA, the loop, the naive baseline, the
attacks and the report.

Budget: the default suite is at its time budget, and the two end-to-end runs take minutes on 2
CPU cores (XLA compilation of the main job's many programs, not the data size, dominates), so
they run only with ``PRIVDEBIAS_TFDS_E2E=1``; the tint tests always run (seconds).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

import privdebias_jax.augment as augment_pkg  # noqa: E402
from privdebias_jax.data import Dataset, make_dataset, subset  # noqa: E402
from privdebias_jax.data.mnist import PALETTE  # noqa: E402
from privdebias_jax.data.tfds_sources import load_cifar10  # noqa: E402
from privdebias_jax.data.tint import retint, tint, tinted_splits  # noqa: E402
from privdebias_jax.metrics import fairness  # noqa: E402
from privdebias_jax.types import PrivDebiasError  # noqa: E402

# tensorflow_datasets leaves temp folders behind on mock data: keep them in tmp_path
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("contained_tempdir")]

ROOT = Path(__file__).resolve().parents[1]
N = 160  # mock records per split


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------
# the tint attribute
# ------------------------------------------------------------------------------------------


def test_tint_counterfactual_is_exact_and_aligned_fraction_is_rho():
    rng = np.random.default_rng(0)
    x = rng.random((50, 4, 4, 3)).astype(np.float32)
    a, b = rng.integers(0, 10, 50), rng.integers(0, 10, 50)
    xa = tint(x, a, 0.5)
    # independent reference: a convex blend with the palette colour, computed in float64
    np.testing.assert_allclose(xa, 0.5 * x + 0.5 * PALETTE[a][:, None, None, :], atol=1e-6)
    cf = retint(Dataset(xa, np.zeros(50), a, np.arange(50)), b, 0.5)
    np.testing.assert_allclose(cf.x, tint(x, b, 0.5), atol=1e-6)  # re-tinting == tinting the original
    np.testing.assert_array_equal(cf.a, b)
    back = retint(cf, a, 0.5)
    np.testing.assert_allclose(back.x, xa, atol=1e-6)
    with pytest.raises(PrivDebiasError, match="strength"):
        tint(x, a, 1.0)
    with pytest.raises(PrivDebiasError, match="outside"):
        retint(cf, np.full(50, 10), 0.5)

    # P(a = y) = rho on a large plain dataset (binomial: 4 standard deviations)
    n, rho = 4000, 0.9
    y = np.arange(n) % 10
    ds = make_dataset(np.full((n, 2, 2, 3), 0.5, np.float32), y, np.zeros(n, np.int32), np.arange(n))
    test = make_dataset(np.full((400, 2, 2, 3), 0.5, np.float32), np.arange(400) % 10,
                        np.zeros(400, np.int32), np.arange(n, n + 400))
    from privdebias_jax.data import DataSplits

    s = tinted_splits(DataSplits("plain", ds, test, None, 10, 1, None, {}), rho, jax.random.key(1))
    frac = float(np.mean(s.train.y == s.train.a))
    assert abs(frac - rho) < 4 * np.sqrt(rho * (1 - rho) / n)
    # conflicting colours are spread over the 9 others; the unbiased half has P(a = y) ≈ 0.1
    off = s.train.a[s.train.y != s.train.a]
    assert len(np.unique(off)) == 10
    assert len(s.test) + len(s.test_unbiased) == 400
    assert not set(s.test.idx.tolist()) & set(s.test_unbiased.idx.tolist())
    assert abs(np.mean(s.test_unbiased.y == s.test_unbiased.a) - 0.1) < 0.1
    # the pixel colour *is* the attribute: the mean colour of a plain grey image is the palette blend
    np.testing.assert_allclose(s.train.x[:, 0, 0, :], 0.25 + 0.5 * PALETTE[s.train.a], atol=1e-6)


def test_load_cifar10_tint_on_mock_data():
    with tfds.testing.mock_data(num_examples=40):
        plain = load_cifar10(max_examples=40, image_size=8)
        s = load_cifar10(attribute="tint", max_examples=40, image_size=8, rho=0.95, key=3)
    assert s.name == "cifar10-tint" and s.num_attributes == 10 and s.counterfactual is not None
    np.testing.assert_array_equal(s.train.idx, plain.train.idx)
    # every tinted image is the plain image blended with its palette colour
    np.testing.assert_allclose(s.train.x, tint(plain.train.x, s.train.a, 0.5), atol=1e-6)
    test_all = np.concatenate([s.test.idx, s.test_unbiased.idx])
    np.testing.assert_array_equal(np.sort(test_all), plain.test.idx)
    rows = np.searchsorted(plain.test.idx, s.test_unbiased.idx)
    np.testing.assert_allclose(s.test_unbiased.x, tint(plain.test.x[rows], s.test_unbiased.a, 0.5), atol=1e-6)


# ------------------------------------------------------------------------------------------
# the experiments end to end on mock data
# ------------------------------------------------------------------------------------------


def _fake_fit(train_set, *, num_classes, num_attributes, config, key, checkpoint_dir=None, progress=False,
              counterfactual=None):
    return SimpleNamespace(pool=train_set, counterfactual=counterfactual, config=config,
                           num_classes=num_classes, num_attributes=num_attributes)


def _fake_generate(augmenter, cell_counts, *, key, start_id, **kw):
    """Real training images of class y given attribute a (re-tinted when possible)."""
    pool = augmenter.pool
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
    rows, attrs = [], []
    for y in range(cell_counts.shape[0]):
        for a in range(cell_counts.shape[1]):
            n = int(cell_counts[y, a])
            if n:
                same = np.flatnonzero(np.asarray(pool.y) == y)
                rows += rng.choice(same if same.size else np.arange(len(pool)), n).tolist()
                attrs += [a] * n
    ds = subset(pool, np.asarray(rows, np.int64))
    attrs = np.asarray(attrs, np.int32)
    if augmenter.counterfactual is not None:
        ds = augmenter.counterfactual(ds, attrs)
    return Dataset(np.asarray(ds.x), np.asarray(ds.y), attrs, start_id + np.arange(len(rows), dtype=np.int64))


@pytest.fixture(scope="module")
def perfect_generator():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(augment_pkg, "fit_augmenter", _fake_fit)
        mp.setattr(augment_pkg, "generate", _fake_generate)
        mp.setattr(augment_pkg, "quality_report", lambda augmenter, synthetic, **kw: {})
        yield


def _records(name: str, split: str, n: int) -> list[dict]:
    source = tfds.data_source(name, split=split)
    return [source[i] for i in range(min(n, len(source)))]


def _check_report(res: dict, out: Path) -> None:
    """results.json and report.md agree; the loop's bookkeeping adds up."""
    report = (out / "report.md").read_text()
    assert res["quick"] is True
    syn = res["sync"]
    assert syn["rounds"] == len(syn["history"]) - 1 == 1
    last = syn["history"][-1]
    assert res["measured"]["sync"]["data_kl_bias"] == last["data_kl_bias"]
    assert f"{last['data_kl_bias']:.3f}" in report
    assert sum(syn["forgotten_per_round"]) == round(0.1 * res["data"]["train_size"])
    # training data = originals - forgotten + synthetic
    assert last["data_size"] == res["data"]["train_size"] - sum(syn["forgotten_per_round"]) + syn["synthetic_total"]
    assert "| training samples (originals − forgotten + synthetic) |" in report
    v = res["measured"]["vanilla"]
    strongest = v["membership"]["strongest_balanced_accuracy"]
    assert 0.0 <= strongest <= 1.0 and f"{strongest:.3f}" in report
    state = json.loads((out / "sync" / "state.json").read_text())
    assert state["round"] == 1 and state["stopped"]
    for fig in res["figures"].values():
        assert (out / fig).stat().st_size > 1000


e2e = pytest.mark.skipif(
    os.environ.get("PRIVDEBIAS_TFDS_E2E") != "1",
    reason="end-to-end runs take minutes on 2 CPU cores: set PRIVDEBIAS_TFDS_E2E=1",
)


@e2e
def test_sync_cifar10_quick_on_mock_data(tmp_path, perfect_generator):
    exp = _load("sync_cifar10")
    full = exp.get_config()
    assert (full.dataset, full.attribute, full.image_size, full.model) == ("cifar10", "tint", 32, "resnet")
    assert full.augment.denoiser == "unet" and full.augment.image_size == 32  # AugmentConfig.paper
    out = tmp_path / "cifar"
    with tfds.testing.mock_data(num_examples=N):
        res = exp.main(["--out", str(out), "--quick", "--no-progress"])
    assert res["dataset"] == "cifar10-tint"
    # the planted tint agrees with the class at rho = 0.99 (binomial, 160 samples)
    assert res["data"]["train_size"] == N and abs(res["data"]["fraction_aligned"] - 0.99) < 0.05
    # the synthetic samples fill under-represented cells and carry their tint in the pixels:
    # x - s * c_a = (1 - s) * x_original lies in [0, 1 - s] (s = 0.5)
    with np.load(out / "sync" / "synthetic_1.npz") as f:
        sx, sy, sa = f["x"], f["y"], f["a"]
    assert len(sy) == res["sync"]["synthetic_total"] > 0 and np.mean(sy != sa) > 0.5
    base = sx - 0.5 * PALETTE[sa][:, None, None, :]
    assert base.min() >= -1e-5 and base.max() <= 0.5 + 1e-5
    # FMD ran (counterfactuals exist) and the report has its column and the FMD pass
    assert res["fmd"] is not None and res["fmd_pass"] is not None
    assert {"vanilla", "proximal_finetune", "SISA", "naive", "sync", "sync+proximal_finetune"} == set(res["measured"])
    assert "counterfactual bias" in (out / "report.md").read_text()
    _check_report(res, out)


@e2e
def test_sync_celeba_quick_on_mock_data(tmp_path, perfect_generator):
    exp = _load("sync_celeba")
    full = exp.get_config()
    assert (full.target, full.attribute, full.image_size, full.sync.fmd_pass) == ("Blond_Hair", "Male", 64, False)
    assert full.augment.denoiser == "unet" and full.augment.image_size == 64
    out = tmp_path / "celeba"
    with tfds.testing.mock_data(num_examples=N):
        res = exp.main(["--out", str(out), "--quick", "--no-progress", "--delta", "0"])
        recs = _records("celeb_a", "train", N)
    y = np.asarray([int(r["attributes"]["Blond_Hair"]) for r in recs])
    a = np.asarray([int(r["attributes"]["Male"]) for r in recs])
    assert res["dataset"] == "celeba" and res["data"]["train_size"] == N
    # independent reference: the data's KL/MI bias from the raw mock records
    assert res["data"]["kl_bias"] == pytest.approx(float(fairness.kl_bias(y, a, 2, 2)), abs=1e-6)
    # no counterfactual: FMD and the FMD pass skipped, said so, no counterfactual bias anywhere
    assert res["fmd"] is None and res["fmd_pass"] is None
    assert {"vanilla", "SISA", "naive", "sync"} == set(res["measured"])
    report = (out / "report.md").read_text()
    assert "Debiasing and the loop's proximal_finetune pass were skipped" in report and "counterfactual bias B" not in report
    assert all("counterfactual_bias" not in h for h in res["sync"]["history"])
    _check_report(res, out)
