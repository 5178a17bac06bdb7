"""A synthetic, exactly invertible bias attribute for datasets that have none (CIFAR-10).

CIFAR-10 has no protected attribute, so the sync loop (which augments under-represented
(class, attribute) cells) and FMD (which needs counterfactuals ``(x, a)`` / ``(x, ā)``) have
nothing to work on. Following Biased-MNIST (Bahng et al. 2020), where the background colour
agrees with the digit with probability ρ, every image gets a **colour tint** from the ten
:data:`~privdebias_jax.data.mnist.PALETTE` colours, and the tint agrees with the class with
probability ρ:

* ``a = y`` with probability ρ, otherwise one of the other colours uniformly
  (:func:`~privdebias_jax.data.mnist.sample_attributes`), so ``P(a = y) = ρ`` and ρ = 0.1
  (ten colours) makes the tint independent of the class (the unbiased test set);
* ``x_a = (1 − s) · x + s · c_a`` with ``c_a = PALETTE[a]`` and tint strength ``s`` (default
  0.5): a convex combination, so ``x_a`` stays in ``[0, 1]``.

The counterfactual is exact: ``x_b = x_a + s · (c_b − c_a)`` equals ``(1 − s) · x + s · c_b``
(the same image tinted with colour ``b``) without knowing ``x``; :func:`retint` applies it
(clipped to ``[0, 1]``, which only trims float rounding for tinted images and keeps a generated
sample that is not exactly tinted in range).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from privdebias_jax.data.dataset import Dataset, DataSplits, make_dataset, subset
from privdebias_jax.data.mnist import PALETTE, sample_attributes
from privdebias_jax.types import PrivDebiasError, PRNGKey

#: Default tint strength ``s``: half image, half colour.
TINT_STRENGTH = 0.5


def _check_strength(strength: float) -> float:
    s = float(strength)
    if not (0.0 < s < 1.0):
        raise PrivDebiasError(f"tint strength must be in (0, 1), got {strength}")
    return s


def tint(x: Any, a: Any, strength: float = TINT_STRENGTH, palette: np.ndarray = PALETTE) -> np.ndarray:
    """Tint RGB images ``(N, H, W, 3)`` in ``[0, 1]``: ``(1 − s) · x + s · palette[a]``."""
    s = _check_strength(strength)
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise PrivDebiasError(f"tint expects RGB images (N, H, W, 3), got shape {x.shape}")
    c = np.asarray(palette, np.float32)[np.asarray(a)][:, None, None, :]
    return (np.float32(1.0 - s) * x + np.float32(s) * c).astype(np.float32)


def retint(ds: Dataset, a_new: Any, strength: float = TINT_STRENGTH, palette: np.ndarray = PALETTE) -> Dataset:
    """The counterfactual of tinted images: the same images tinted ``a_new`` (same ``y``, ``idx``).

    ``x + s · (c_{a_new} − c_a)``, clipped to ``[0, 1]``.

    Raises:
      PrivDebiasError: ``a_new`` of the wrong shape or holding unknown colour ids.
    """
    s = _check_strength(strength)
    a_new = np.asarray(a_new)
    if a_new.shape != np.shape(ds.a):
        raise PrivDebiasError(f"a_new has shape {a_new.shape}, expected {np.shape(ds.a)}")
    if a_new.size and (a_new.min() < 0 or a_new.max() >= len(palette)):
        raise PrivDebiasError(f"a_new holds colour ids outside [0, {len(palette)})")
    pal = np.asarray(palette, np.float32)
    shift = np.float32(s) * (pal[a_new] - pal[np.asarray(ds.a)])[:, None, None, :]
    x = np.clip(np.asarray(ds.x, np.float32) + shift, 0.0, 1.0)
    return Dataset(x=x, y=ds.y, a=a_new.astype(np.int32), idx=ds.idx)


def tinted_splits(
    splits: DataSplits,
    rho: float,
    key: PRNGKey | int,
    *,
    strength: float = TINT_STRENGTH,
    rho_unbiased: float = 0.1,
    unbiased_fraction: float = 0.5,
) -> DataSplits:
    """Give a dataset without attribute (``num_attributes = 1``) the tint attribute.

    The training set is tinted with ``P(a = y) = rho``. The test set is split at random into
    disjoint parts: ``1 − unbiased_fraction`` of it becomes the biased test set (tinted like
    training, ``rho``) and ``unbiased_fraction`` the unbiased test set (``rho_unbiased``; 0.1 =
    independent of the class for ten classes). Ids are kept. ``counterfactual`` is
    :func:`retint`.

    Raises:
      PrivDebiasError: ρ outside ``[0, 1]``, more classes than palette colours, non-RGB images,
        a test set too small to split.
    """
    if splits.num_classes > len(PALETTE):
        raise PrivDebiasError(f"tinted_splits: {splits.num_classes} classes but only {len(PALETTE)} tint colours")
    if not 0.0 < float(unbiased_fraction) < 1.0:
        raise PrivDebiasError(f"unbiased_fraction must be in (0, 1), got {unbiased_fraction}")
    s = _check_strength(strength)
    key = jax.random.key(key) if isinstance(key, (int, np.integer)) else key
    k_split, k_train, k_test, k_unb = jax.random.split(key, 4)
    n_test = len(splits.test)
    n_unb = int(round(float(unbiased_fraction) * n_test))
    if not 0 < n_unb < n_test:
        raise PrivDebiasError(f"tinted_splits: a test set of {n_test} samples cannot be split into biased and unbiased parts")
    order = np.asarray(jax.random.permutation(k_split, n_test))
    k = splits.num_classes

    def build(ds: Dataset, kk: PRNGKey, r: float, part: str) -> Dataset:
        a = sample_attributes(kk, np.asarray(ds.y), r, num_values=k)
        return make_dataset(tint(ds.x, a, s), ds.y, a, idx=ds.idx, num_classes=k, num_attributes=k,
                            name=f"{splits.name}-tint/{part}")

    biased_rows, unbiased_rows = np.sort(order[n_unb:]), np.sort(order[:n_unb])
    return dataclasses.replace(
        splits,
        name=f"{splits.name}-tint",
        train=build(splits.train, k_train, rho, "train"),
        test=build(subset(splits.test, biased_rows), k_test, rho, "test"),
        test_unbiased=build(subset(splits.test, unbiased_rows), k_unb, rho_unbiased, "test_unbiased"),
        num_attributes=k,
        counterfactual=functools.partial(retint, strength=s),
        info={
            **splits.info,
            "attribute": "tint",
            "rho": float(rho),
            "rho_unbiased": float(rho_unbiased),
            "tint_strength": s,
            "attribute_values": [f"tint {i}" for i in range(k)],
        },
    )


__all__ = ["TINT_STRENGTH", "tint", "retint", "tinted_splits"]
