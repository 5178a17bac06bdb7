"""The dataset contract: a NamedTuple of arrays ``(x, y, a, idx)``.

* ``x``   features, ``(N, H, W, C)`` float32 images in ``[0, 1]`` or ``(N, D)`` float32 tabular rows;
* ``y``   target label, ``(N,)`` int32 in ``[0, num_classes)``;
* ``a``   protected / private attribute, ``(N,)`` int32 in ``[0, num_attributes)``;
* ``idx`` stable sample id, ``(N,)`` int64, unique within a dataset and never reused: unlearning
  names what it forgets by these ids, counterfactuals keep the id of their original.

A ``Dataset`` is a pytree (NamedTuple), so it passes through ``jax.tree`` functions and
``jit``; the loaders return NumPy arrays (host memory), and batches are moved to the device
by the caller (:func:`stack_batches` returns arrays ready for ``jax.lax.scan``).

A ``Batch`` adds ``mask`` (float32, 1 for a real sample, 0 for padding) so every batch of an
epoch has the same shape and a jitted step compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from privdebias_jax.types import PrivDebiasError, PRNGKey


class Dataset(NamedTuple):
    """Samples with target ``y``, protected attribute ``a`` and stable ids ``idx``."""

    x: Any
    y: Any
    a: Any
    idx: Any

    def __len__(self) -> int:  # type: ignore[override]
        return int(np.shape(self.y)[0])

    @property
    def size(self) -> int:
        """Number of samples."""
        return int(np.shape(self.y)[0])


class Batch(NamedTuple):
    """A fixed-shape batch: the dataset fields plus ``mask`` (1 = real sample, 0 = padding)."""

    x: Any
    y: Any
    a: Any
    idx: Any
    mask: Any


@dataclasses.dataclass(frozen=True)
class DataSplits:
    """What a dataset loader returns: the splits plus the metadata models and metrics need.

    Attributes:
      name: dataset name (``colored-mnist``, ``biased-mnist``, ``adult``, ...).
      train: the training set.
      test: the test set drawn like the training set (for the MNIST variants: the *biased*
        test set, same ρ as training).
      test_unbiased: a test set where the attribute is independent of the target (ρ = 0.1 for
        10 colours), or ``None`` when the dataset has none (Adult, CIFAR-10, CelebA).
      num_classes: number of target classes.
      num_attributes: number of values of the protected attribute.
      counterfactual: ``counterfactual(ds, a_new) -> Dataset``: the same samples with the
        attribute set to ``a_new`` (recoloured digits, flipped ``sex`` column); same ``idx``.
      info: free-form settings used to build the data (ρ, resolution, seed, feature names).
    """

    name: str
    train: Dataset
    test: Dataset
    test_unbiased: Dataset | None
    num_classes: int
    num_attributes: int
    counterfactual: Callable[[Dataset, Any], Dataset] | None = None
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample's features."""
        return tuple(np.shape(self.train.x)[1:])


def validate_dataset(
    ds: Dataset,
    num_classes: int | None = None,
    num_attributes: int | None = None,
    name: str = "dataset",
) -> Dataset:
    """Check the contract and return ``ds`` unchanged.

    Raises:
      PrivDebiasError: if the field lengths disagree, ``x`` holds NaN or inf, labels or
        attributes are out of range or not integers, or ids repeat.
    """
    n = int(np.shape(ds.x)[0]) if np.ndim(ds.x) else -1
    lengths = {f: int(np.shape(v)[0]) if np.ndim(v) else -1 for f, v in zip(ds._fields, ds, strict=False)}
    if len(set(lengths.values())) != 1:
        raise PrivDebiasError(f"{name}: field lengths disagree: {lengths}")
    for field in ("y", "a", "idx"):
        v = np.asarray(getattr(ds, field))
        if v.ndim != 1:
            raise PrivDebiasError(f"{name}: `{field}` must be 1-D, got shape {v.shape}")
        if not np.issubdtype(v.dtype, np.integer):
            raise PrivDebiasError(f"{name}: `{field}` must hold integers, got dtype {v.dtype}")
    x = np.asarray(ds.x)
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x).reshape(n, -1).all(axis=1)))
        raise PrivDebiasError(f"{name}: `x` holds NaN or inf values in {bad} of {n} samples")
    y, a, idx = np.asarray(ds.y), np.asarray(ds.a), np.asarray(ds.idx)
    if n and num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise PrivDebiasError(
            f"{name}: labels `y` out of range [0, {num_classes}): min {y.min()}, max {y.max()}"
        )
    if n and num_attributes is not None and (a.min() < 0 or a.max() >= num_attributes):
        raise PrivDebiasError(
            f"{name}: attributes `a` out of range [0, {num_attributes}): min {a.min()}, max {a.max()}"
        )
    if len(np.unique(idx)) != n:
        raise PrivDebiasError(f"{name}: sample ids `idx` are not unique")
    return ds


def make_dataset(x: Any, y: Any, a: Any, idx: Any | None = None, **checks: Any) -> Dataset:
    """Build a validated :class:`Dataset` with canonical dtypes.

    ``x`` becomes float32, ``y`` and ``a`` int32, ``idx`` int64 (``arange(N)`` when omitted).
    Keyword ``checks`` are passed to :func:`validate_dataset` (``num_classes``,
    ``num_attributes``, ``name``).
    """
    x = np.asarray(x)
    y = np.asarray(y)
    a = np.asarray(a)
    if idx is not None:
        idx = np.asarray(idx)
    for field, v in (("y", y), ("a", a), ("idx", idx if idx is not None else np.zeros(0, np.int64))):
        if np.issubdtype(v.dtype, np.floating):
            if not np.all(np.isfinite(v)) or not np.all(v == np.round(v)):
                raise PrivDebiasError(f"`{field}` must hold integer labels, got non-integer values")
    if idx is None:
        idx = np.arange(len(y), dtype=np.int64)
    ds = Dataset(
        x=x.astype(np.float32, copy=False),
        y=y.astype(np.int32, copy=False) if y.ndim == 1 else y,
        a=a.astype(np.int32, copy=False) if a.ndim == 1 else a,
        idx=np.asarray(idx).astype(np.int64, copy=False),
    )
    return validate_dataset(ds, **checks)


def subset(ds: Dataset, rows: Any) -> Dataset:
    """The samples at positions ``rows`` (an index array or boolean mask), ids kept."""
    rows = np.asarray(rows)
    return Dataset(*(np.asarray(v)[rows] for v in ds))


def concat(*datasets: Dataset) -> Dataset:
    """Concatenate datasets; raises if the result would repeat a sample id."""
    out = Dataset(*(np.concatenate([np.asarray(getattr(d, f)) for d in datasets]) for f in Dataset._fields))
    if len(np.unique(out.idx)) != len(out.idx):
        raise PrivDebiasError("concat: the datasets share sample ids; give new samples fresh ids")
    return out


def remove_ids(ds: Dataset, ids: Any) -> Dataset:
    """The dataset without the samples whose ``idx`` is in ``ids`` (unknown ids raise)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    present = np.isin(ids, np.asarray(ds.idx))
    if not present.all():
        raise PrivDebiasError(f"remove_ids: unknown sample ids {ids[~present][:10].tolist()}")
    return subset(ds, ~np.isin(np.asarray(ds.idx), ids))


def next_free_id(*datasets: Dataset) -> int:
    """The smallest id larger than every id in ``datasets``: where new (synthetic) samples start."""
    return int(max((int(np.max(d.idx)) for d in datasets if len(d)), default=-1)) + 1


def other_attribute(a: Any, num_attributes: int, key: PRNGKey | None = None) -> np.ndarray:
    """A different attribute value for every sample, for counterfactual pairs (FMD).

    Binary attributes are flipped (``1 − a``). With more values, each sample gets
    ``(a + s) mod K`` with ``s`` uniform in ``[1, K)`` drawn from ``key`` (or ``s = 1`` when
    ``key`` is None, a deterministic cyclic shift).

    Raises:
      PrivDebiasError: if ``num_attributes < 2`` or ``a`` is out of range.
    """
    a = np.asarray(a)
    if num_attributes < 2:
        raise PrivDebiasError(f"a counterfactual needs at least 2 attribute values, got {num_attributes}")
    if a.size and (a.min() < 0 or a.max() >= num_attributes):
        raise PrivDebiasError(f"attribute values out of range [0, {num_attributes})")
    if key is None or num_attributes == 2:
        shift = np.ones_like(a)
    else:
        shift = np.asarray(jax.random.randint(key, a.shape, 1, num_attributes))
    return ((a + shift) % num_attributes).astype(np.int32)


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    """How many batches an epoch of ``n`` samples has."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


def stack_batches(
    ds: Dataset,
    batch_size: int,
    key: PRNGKey | None = None,
    drop_remainder: bool = False,
) -> Batch:
    """One epoch as stacked fixed-shape batches, ready for ``jax.lax.scan``.

    Rows are permuted with ``jax.random.permutation(key, N)`` when ``key`` is given (in order
    otherwise), split into ``ceil(N / batch_size)`` batches, and the last one is padded with
    copies of row 0 whose ``mask`` is 0. Every field gets a leading axis of length
    ``num_batches``: ``x`` has shape ``(num_batches, batch_size, *x.shape[1:])``.

    Raises:
      PrivDebiasError: for a non-positive batch size or an empty dataset.
    """
    if batch_size <= 0:
        raise PrivDebiasError(f"batch_size must be positive, got {batch_size}")
    n = len(ds)
    if n == 0:
        raise PrivDebiasError("cannot batch an empty dataset")
    order = np.arange(n) if key is None else np.asarray(jax.random.permutation(key, n))
    nb = num_batches(n, batch_size, drop_remainder)
    if nb == 0:
        raise PrivDebiasError(f"drop_remainder with batch_size {batch_size} > dataset size {n}")
    total = nb * batch_size
    mask = np.zeros(total, np.float32)
    take = order[:total]
    mask[: len(take)] = 1.0
    rows = np.concatenate([take, np.full(total - len(take), order[0])])

    def pack(v: Any) -> np.ndarray:
        v = np.asarray(v)[rows]
        return v.reshape((nb, batch_size) + v.shape[1:])

    return Batch(*(pack(v) for v in ds), mask=mask.reshape(nb, batch_size))


def iterate_batches(
    ds: Dataset,
    batch_size: int,
    key: PRNGKey | None = None,
    drop_remainder: bool = False,
) -> Iterator[Batch]:
    """Yield the batches of :func:`stack_batches` one at a time (same shapes, same padding)."""
    stacked = stack_batches(ds, batch_size, key, drop_remainder)
    for i in range(stacked.mask.shape[0]):
        yield Batch(*(v[i] for v in stacked))


def as_batch(ds: Dataset) -> Batch:
    """The whole dataset as one unpadded batch (``mask`` all ones)."""
    return Batch(*ds, mask=np.ones(len(ds), np.float32))


__all__ = [
    "Dataset",
    "Batch",
    "DataSplits",
    "validate_dataset",
    "make_dataset",
    "subset",
    "concat",
    "remove_ids",
    "next_free_id",
    "other_attribute",
    "num_batches",
    "stack_batches",
    "iterate_batches",
    "as_batch",
]
