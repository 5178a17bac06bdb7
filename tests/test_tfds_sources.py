"""Tests of the TFDS loaders (CIFAR-10, CelebA) on ``tfds.testing.mock_data`` (offline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from privdebias_jax.data.tfds_sources import (  # noqa: E402
    CELEBA_ATTRIBUTES,
    load_celeba,
    load_cifar10,
    resize_images,
)
from privdebias_jax.types import PrivDebiasError  # noqa: E402

# tensorflow_datasets leaves temp folders behind on mock data: keep them in tmp_path
pytestmark = pytest.mark.usefixtures("contained_tempdir")


def _records(name: str, split: str, n: int) -> list[dict]:
    """The first ``n`` records of a split, read independently of the loaders."""
    source = tfds.data_source(name, split=split)
    return [source[i] for i in range(min(n, len(source)))]


def _check_ids(splits) -> None:
    n_tr, n_te = len(splits.train), len(splits.test)
    np.testing.assert_array_equal(splits.train.idx, np.arange(n_tr))
    np.testing.assert_array_equal(splits.test.idx, np.arange(n_tr, n_tr + n_te))
    assert len(np.unique(np.concatenate([splits.train.idx, splits.test.idx]))) == n_tr + n_te


def test_cifar10_mock_native_size() -> None:
    with tfds.testing.mock_data(num_examples=6):
        s = load_cifar10(max_examples=4)
        train_recs = _records("cifar10", "train", 4)
        test_recs = _records("cifar10", "test", 4)
    assert s.name == "cifar10" and s.num_classes == 10 and s.num_attributes == 1
    assert s.counterfactual is None and s.test_unbiased is None
    assert s.train.x.shape == (4, 32, 32, 3) and s.test.x.shape == (4, 32, 32, 3)
    assert s.train.x.dtype == np.float32 and s.train.y.dtype == np.int32
    # native size: x is exactly image / 255
    expected = np.stack([r["image"] for r in train_recs]).astype(np.float32) / 255.0
    np.testing.assert_array_equal(s.train.x, expected)
    np.testing.assert_array_equal(s.train.y, [int(r["label"]) for r in train_recs])
    np.testing.assert_array_equal(s.test.y, [int(r["label"]) for r in test_recs])
    np.testing.assert_array_equal(s.train.a, 0)
    np.testing.assert_array_equal(s.test.a, 0)
    assert len(s.info["tfds_ids"]["train"]) == 4
    _check_ids(s)


def test_cifar10_mock_resized() -> None:
    with tfds.testing.mock_data(num_examples=5):
        s = load_cifar10(max_examples=8, image_size=16)  # fewer records than max_examples
        recs = _records("cifar10", "train", 8)
    assert s.train.x.shape == (5, 16, 16, 3)
    assert s.input_shape == (16, 16, 3)
    assert float(s.train.x.min()) >= 0.0 and float(s.train.x.max()) <= 1.0
    np.testing.assert_array_equal(s.train.y, [int(r["label"]) for r in recs])
    # antialiased resize preserves each image's mean intensity closely
    full = np.stack([r["image"] for r in recs]).astype(np.float32) / 255.0
    np.testing.assert_allclose(s.train.x.mean(axis=(1, 2)), full.mean(axis=(1, 2)), atol=0.02)
    _check_ids(s)


def test_cifar10_rejects_attribute() -> None:
    with pytest.raises(PrivDebiasError, match="no protected attribute"):
        load_cifar10(attribute="color")
    with pytest.raises(PrivDebiasError, match="max_examples"):
        load_cifar10(max_examples=0)


def test_celeba_mock() -> None:
    with tfds.testing.mock_data(num_examples=8):
        s = load_celeba(image_size=16, max_train=8, max_test=5)
        train_recs = _records("celeb_a", "train", 8)
        test_recs = _records("celeb_a", "test", 5)
    assert s.name == "celeba" and s.num_classes == 2 and s.num_attributes == 2
    assert s.counterfactual is None and s.test_unbiased is None
    assert s.train.x.shape == (8, 16, 16, 3) and s.test.x.shape == (5, 16, 16, 3)
    assert s.train.x.dtype == np.float32
    for ds in (s.train, s.test):
        assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0
    for ds, recs in ((s.train, train_recs), (s.test, test_recs)):
        np.testing.assert_array_equal(ds.y, [int(r["attributes"]["Blond_Hair"]) for r in recs])
        np.testing.assert_array_equal(ds.a, [int(r["attributes"]["Male"]) for r in recs])
    # the hard-coded attribute list matches the dataset's features
    assert set(train_recs[0]["attributes"]) == set(CELEBA_ATTRIBUTES)
    assert train_recs[0]["image"].shape == (218, 178, 3)
    _check_ids(s)


def test_celeba_other_target() -> None:
    with tfds.testing.mock_data(num_examples=4):
        s = load_celeba(target="Smiling", attribute="Young", image_size=8, max_train=4, max_test=2)
        recs = _records("celeb_a", "train", 4)
    np.testing.assert_array_equal(s.train.y, [int(r["attributes"]["Smiling"]) for r in recs])
    np.testing.assert_array_equal(s.train.a, [int(r["attributes"]["Young"]) for r in recs])
    assert s.info["target"] == "Smiling" and s.info["attribute"] == "Young"


def test_celeba_unknown_attribute() -> None:
    with pytest.raises(PrivDebiasError, match="Blond_Hair") as err:
        load_celeba(attribute="Gender")
    assert "Gender" in str(err.value) and "Male" in str(err.value)
    with pytest.raises(PrivDebiasError, match="target"):
        load_celeba(target="blond")
    with pytest.raises(PrivDebiasError):
        load_celeba(target="Male", attribute="Male")


def test_not_prepared_raises(tmp_path: Path) -> None:
    """Outside mock data an empty data_dir gives a clear error (no download is attempted)."""
    with pytest.raises(PrivDebiasError, match="tfds build") as err:
        load_cifar10(data_dir=tmp_path, max_examples=2)
    assert str(tmp_path) in str(err.value)


def test_resize_images_range_and_shape() -> None:
    imgs = np.random.default_rng(0).integers(0, 256, size=(3, 20, 10, 3), dtype=np.uint8)
    out = resize_images(imgs, 7)
    assert out.shape == (3, 7, 7, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(resize_images(imgs[:, :10], 10), imgs[:, :10] / np.float32(255))
