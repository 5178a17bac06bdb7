"""Tests of privdebias_jax.data.dataset: the (x, y, a, idx) contract, batching and id algebra.

References are plain NumPy / Python: sets of ids, hand-built permutations, explicit loops.
"""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from privdebias_jax.data import (
    Batch,
    Dataset,
    as_batch,
    concat,
    iterate_batches,
    make_dataset,
    next_free_id,
    num_batches,
    other_attribute,
    remove_ids,
    stack_batches,
    subset,
    validate_dataset,
)
from privdebias_jax.types import PrivDebiasError


def _ds(n: int = 10, start: int = 0, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return make_dataset(
        rng.normal(size=(n, 2, 2, 1)),
        rng.integers(0, 4, n),
        rng.integers(0, 3, n),
        idx=np.arange(start, start + n),
    )


# ------------------------------------------------------------------------------------------
# make_dataset / validate_dataset
# ------------------------------------------------------------------------------------------


def test_make_dataset_canonical_dtypes_and_values():
    x = np.arange(12, dtype=np.float64).reshape(3, 4) / 7.0
    y = np.array([2.0, 0.0, 1.0])  # float labels that are integers are accepted
    a = np.array([1, 0, 1], dtype=np.uint8)
    ds = make_dataset(x, y, a)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
    assert ds.a.dtype == np.int32 and ds.idx.dtype == np.int64
    np.testing.assert_array_equal(ds.x, x.astype(np.float32))
    np.testing.assert_array_equal(ds.y, [2, 0, 1])
    np.testing.assert_array_equal(ds.a, [1, 0, 1])
    np.testing.assert_array_equal(ds.idx, [0, 1, 2])  # arange(N) when omitted
    assert len(ds) == ds.size == 3
    ds2 = make_dataset(x, [0, 1, 2], [0, 0, 0], idx=np.array([7, 3, 9], dtype=np.int32))
    assert ds2.idx.dtype == np.int64
    np.testing.assert_array_equal(ds2.idx, [7, 3, 9])


def test_dataset_is_a_pytree():
    ds = _ds(5)
    leaves = jax.tree_util.tree_leaves(ds)
    assert len(leaves) == 4
    doubled = jax.tree_util.tree_map(lambda v: v * 2, ds)
    assert isinstance(doubled, Dataset)
    np.testing.assert_array_equal(doubled.idx, ds.idx * 2)


def test_validate_mismatched_lengths_raises():
    ds = Dataset(
        np.zeros((4, 3), np.float32), np.zeros(4, np.int32), np.zeros(3, np.int32), np.arange(4)
    )
    with pytest.raises(PrivDebiasError, match="lengths disagree"):
        validate_dataset(ds)
    with pytest.raises(PrivDebiasError, match="lengths disagree"):
        make_dataset(np.zeros((4, 3)), np.zeros(5, int), np.zeros(4, int))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_validate_non_finite_x_raises(bad):
    x = np.zeros((5, 2, 2))
    x[1, 0, 1] = bad
    x[3, 1, 1] = bad
    with pytest.raises(PrivDebiasError, match="2 of 5 samples"):
        make_dataset(x, np.zeros(5, int), np.zeros(5, int))


def test_validate_labels_out_of_range_raise():
    x = np.zeros((3, 2))
    with pytest.raises(PrivDebiasError, match=r"labels `y` out of range \[0, 3\)"):
        make_dataset(x, [0, 1, 3], [0, 0, 0], num_classes=3)
    with pytest.raises(PrivDebiasError, match="labels `y` out of range"):
        make_dataset(x, [0, -1, 2], [0, 0, 0], num_classes=3)
    with pytest.raises(PrivDebiasError, match=r"attributes `a` out of range \[0, 2\)"):
        make_dataset(x, [0, 1, 2], [0, 2, 0], num_attributes=2)
    # the same data are fine with a large enough range
    make_dataset(x, [0, 1, 3], [0, 2, 0], num_classes=4, num_attributes=3)


def test_validate_duplicate_ids_raise():
    with pytest.raises(PrivDebiasError, match="not unique"):
        make_dataset(np.zeros((3, 2)), [0, 1, 2], [0, 0, 0], idx=[5, 6, 5])


def test_float_non_integer_labels_raise():
    with pytest.raises(PrivDebiasError, match="integer labels"):
        make_dataset(np.zeros((3, 2)), [0.0, 1.5, 2.0], [0, 0, 0])
    with pytest.raises(PrivDebiasError, match="integer labels"):
        make_dataset(np.zeros((3, 2)), [0, 1, 2], [0.0, np.nan, 1.0])
    # validate_dataset on a hand-built float field: rejected by dtype
    ds = Dataset(
        np.zeros((2, 2), np.float32), np.array([0.0, 1.0]), np.zeros(2, np.int32), np.arange(2)
    )
    with pytest.raises(PrivDebiasError, match="`y` must hold integers"):
        validate_dataset(ds)


def test_validate_two_dimensional_labels_raise():
    ds = Dataset(
        np.zeros((2, 2), np.float32),
        np.zeros((2, 1), np.int32),
        np.zeros(2, np.int32),
        np.arange(2),
    )
    with pytest.raises(PrivDebiasError, match="1-D"):
        validate_dataset(ds)


def test_validate_returns_dataset_unchanged():
    ds = _ds(6)
    assert validate_dataset(ds, num_classes=4, num_attributes=3) is ds


# ------------------------------------------------------------------------------------------
# stack_batches / iterate_batches
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,bs", [(10, 3), (10, 5), (7, 10), (1, 1), (13, 4)])
def test_stack_batches_shapes_padding_and_coverage(n, bs):
    ds = _ds(n, start=50)
    b = stack_batches(ds, bs, jax.random.key(1))
    nb = -(-n // bs)
    assert nb == num_batches(n, bs)
    assert b.x.shape == (nb, bs, 2, 2, 1)
    for v in (b.y, b.a, b.idx, b.mask):
        assert v.shape == (nb, bs)
    assert b.mask.dtype == np.float32
    assert float(b.mask.sum()) == n
    # every real row exactly once, and its fields travel with it
    real = b.mask.reshape(-1) == 1
    ids = b.idx.reshape(-1)[real]
    assert sorted(ids.tolist()) == sorted(ds.idx.tolist())
    pos = {int(i): k for k, i in enumerate(ds.idx)}
    rows = np.array([pos[int(i)] for i in ids])
    np.testing.assert_array_equal(b.x.reshape(-1, 2, 2, 1)[real], ds.x[rows])
    np.testing.assert_array_equal(b.y.reshape(-1)[real], ds.y[rows])
    np.testing.assert_array_equal(b.a.reshape(-1)[real], ds.a[rows])
    # padding only at the end
    flat_mask = b.mask.reshape(-1)
    np.testing.assert_array_equal(flat_mask, np.r_[np.ones(n), np.zeros(nb * bs - n)])


def test_stack_batches_order_follows_jax_permutation():
    ds = _ds(11, start=20)
    key = jax.random.key(7)
    b = stack_batches(ds, 4, key)
    perm = np.asarray(jax.random.permutation(key, 11))
    expected = np.r_[ds.idx[perm], np.full(1, ds.idx[perm[0]])]
    np.testing.assert_array_equal(b.idx.reshape(-1), expected)
    # no key: dataset order
    b0 = stack_batches(ds, 4)
    np.testing.assert_array_equal(b0.idx.reshape(-1)[:11], ds.idx)


def test_stack_batches_same_key_same_order_different_key_different_order():
    ds = _ds(40)
    b1 = stack_batches(ds, 8, jax.random.key(3))
    b2 = stack_batches(ds, 8, jax.random.key(3))
    b3 = stack_batches(ds, 8, jax.random.key(4))
    for u, v in zip(b1, b2, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(b1.idx, b3.idx)
    assert set(b1.idx.ravel()) == set(b3.idx.ravel())


def test_stack_batches_drop_remainder():
    ds = _ds(10)
    b = stack_batches(ds, 3, jax.random.key(0), drop_remainder=True)
    assert b.idx.shape == (3, 3) and num_batches(10, 3, True) == 3
    assert float(b.mask.sum()) == 9
    assert len(set(b.idx.ravel().tolist())) == 9
    with pytest.raises(PrivDebiasError, match="drop_remainder"):
        stack_batches(ds, 11, drop_remainder=True)


def test_stack_batches_bad_input():
    with pytest.raises(PrivDebiasError, match="batch_size must be positive"):
        stack_batches(_ds(4), 0)
    with pytest.raises(PrivDebiasError, match="empty"):
        stack_batches(subset(_ds(4), np.zeros(4, bool)), 2)


def test_iterate_batches_equals_stack_batches_slices():
    ds = _ds(23)
    key = jax.random.key(5)
    stacked = stack_batches(ds, 5, key)
    batches = list(iterate_batches(ds, 5, key))
    assert len(batches) == stacked.mask.shape[0] == 5
    for i, b in enumerate(batches):
        assert isinstance(b, Batch)
        for u, v in zip(b, stacked, strict=True):
            np.testing.assert_array_equal(u, v[i])


def test_as_batch():
    ds = _ds(6)
    b = as_batch(ds)
    np.testing.assert_array_equal(b.mask, np.ones(6))
    for u, v in zip(b[:4], ds, strict=True):
        np.testing.assert_array_equal(u, v)


# ------------------------------------------------------------------------------------------
# subset / concat / remove_ids / next_free_id
# ------------------------------------------------------------------------------------------


def test_subset_with_index_and_boolean_mask():
    ds = _ds(8, start=100)
    s = subset(ds, [5, 1, 1])
    np.testing.assert_array_equal(s.idx, [105, 101, 101])
    np.testing.assert_array_equal(s.x, ds.x[[5, 1, 1]])
    m = np.arange(8) % 3 == 0
    s2 = subset(ds, m)
    np.testing.assert_array_equal(s2.idx, [100, 103, 106])
    np.testing.assert_array_equal(s2.y, ds.y[[0, 3, 6]])


def test_concat_and_duplicate_ids():
    a, b = _ds(4, start=0, seed=1), _ds(3, start=10, seed=2)
    c = concat(a, b)
    np.testing.assert_array_equal(c.idx, [0, 1, 2, 3, 10, 11, 12])
    np.testing.assert_array_equal(c.x, np.concatenate([a.x, b.x]))
    np.testing.assert_array_equal(c.y, np.concatenate([a.y, b.y]))
    with pytest.raises(PrivDebiasError, match="share sample ids"):
        concat(a, _ds(3, start=3))


def test_remove_ids():
    ds = _ds(10, start=20)
    out = remove_ids(ds, [21, 25, 29])
    expected_rows = [i for i in range(10) if 20 + i not in (21, 25, 29)]
    np.testing.assert_array_equal(out.idx, ds.idx[expected_rows])
    np.testing.assert_array_equal(out.x, ds.x[expected_rows])
    np.testing.assert_array_equal(out.a, ds.a[expected_rows])
    assert len(remove_ids(ds, [])) == 10
    assert len(remove_ids(ds, 23)) == 9  # a scalar id
    with pytest.raises(PrivDebiasError, match=r"unknown sample ids \[99\]"):
        remove_ids(ds, [21, 99])


def test_next_free_id():
    assert next_free_id(_ds(4, start=3), _ds(2, start=50)) == 52
    assert next_free_id(_ds(4, start=0)) == 4
    empty = subset(_ds(3), np.zeros(3, bool))
    assert next_free_id(empty) == 0
    assert next_free_id() == 0
    # new ids start there and concatenate without clashes
    ds = _ds(5, start=7)
    fresh = _ds(3, start=next_free_id(ds))
    assert len(concat(ds, fresh)) == 8


# ------------------------------------------------------------------------------------------
# other_attribute
# ------------------------------------------------------------------------------------------


def test_other_attribute_binary_flips():
    a = np.array([0, 1, 1, 0, 1])
    np.testing.assert_array_equal(other_attribute(a, 2), 1 - a)
    np.testing.assert_array_equal(other_attribute(a, 2, jax.random.key(0)), 1 - a)


def test_other_attribute_multivalued():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 2000)
    key = jax.random.key(11)
    b = other_attribute(a, 5, key)
    assert b.dtype == np.int32
    assert np.all(b != a) and b.min() >= 0 and b.max() < 5
    np.testing.assert_array_equal(b, other_attribute(a, 5, key))  # deterministic per key
    assert not np.array_equal(b, other_attribute(a, 5, jax.random.key(12)))
    # the shift (b − a) mod K is uniform on {1, .., K−1}
    shifts = collections.Counter(((b - a) % 5).tolist())
    assert set(shifts) == {1, 2, 3, 4}
    for s in range(1, 5):
        assert abs(shifts[s] / 2000 - 0.25) < 0.05
    # no key: the deterministic cyclic shift (a + 1) mod K
    np.testing.assert_array_equal(other_attribute(a, 5), (a + 1) % 5)


def test_other_attribute_bad_input():
    with pytest.raises(PrivDebiasError, match="at least 2"):
        other_attribute([0, 0], 1)
    with pytest.raises(PrivDebiasError, match="out of range"):
        other_attribute([0, 3], 3)


def test_make_dataset_rejects_non_integer_ids():
    with pytest.raises(PrivDebiasError):
        make_dataset(np.zeros((2, 2)), [0, 1], [0, 1], idx=[0.5, 1.5])
