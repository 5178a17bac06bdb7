"""CIFAR-10 and CelebA through ``tensorflow_datasets.data_source`` (no TensorFlow needed).

``tfds.data_source(name, split=..., data_dir=...)`` gives random access to a dataset that was
prepared on disk beforehand in the ``array_record`` format, e.g.::

    tfds build cifar10 --file_format=array_record --data_dir=DATA_DIR
    tfds build celeb_a --file_format=array_record --data_dir=DATA_DIR

These loaders never download (``download=False`` by default): a dataset that is not prepared
raises :class:`~privdebias_jax.types.PrivDebiasError` naming ``data_dir``.

Records are read one at a time with ``source[i]`` for ``i < min(len(source), max_examples)``
(under ``tfds.testing.mock_data`` only ``source[i]`` and iteration work, not slices or lists of
indices), decoded, scaled to ``[0, 1]`` and, when ``image_size`` differs from the stored
resolution, resized with ``jax.image.resize`` (bilinear with antialiasing), in chunks so
memory holds at most one chunk of full-resolution images.

Ids: training samples get ``idx = 0..n_train-1`` in source order, test samples
``n_train..n_train+n_test-1``, so no id is shared across splits.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from privdebias_jax.data.dataset import DataSplits, make_dataset
from privdebias_jax.types import PrivDebiasError

#: The 10 CIFAR-10 classes, in label order.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

#: The 40 binary CelebA attributes (keys of the ``attributes`` feature of ``celeb_a``).
CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)

#: Images decoded and resized per chunk.
_CHUNK = 512


def _open_source(
    name: str, split: str, data_dir: str | os.PathLike[str] | None, download: bool
) -> Any:
    """``tfds.data_source(name, split=split)``, with setup failures as :class:`PrivDebiasError`."""
    import tensorflow_datasets as tfds  # heavy import: only when a loader runs

    where = (
        str(data_dir)
        if data_dir is not None
        else "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    )
    try:
        return tfds.data_source(
            name,
            split=split,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=download,
        )
    # tfds raises NotImplementedError (not prepared / TFRecord format), AssertionError,
    # OSError, ValueError (DatasetNotFoundError) ... depending on what is missing.
    except Exception as e:
        raise PrivDebiasError(
            f"TFDS dataset {name!r} (split {split!r}) could not be opened from {where}: "
            f"{type(e).__name__}: {str(e).strip()[:400]}. The data must be downloaded and "
            f"prepared beforehand in the array_record format, e.g. `tfds build {name} "
            f"--file_format=array_record --data_dir=DATA_DIR`, then pass data_dir=DATA_DIR "
            f"(data_dir was {data_dir!r})."
        ) from e


def _check_max(value: int | None, what: str) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
        raise PrivDebiasError(f"{what} must be a positive int or None, got {value!r}")


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise PrivDebiasError(f"image_size must be a positive int, got {image_size!r}")


@functools.lru_cache(maxsize=16)
def _resizer(out_hw: tuple[int, int]) -> Callable[[jax.Array], jax.Array]:
    def resize(images: jax.Array) -> jax.Array:
        n, _, _, c = images.shape
        out = jax.image.resize(images, (n, *out_hw, c), method="linear", antialias=True)
        return jnp.clip(out, 0.0, 1.0)

    return jax.jit(resize)


def resize_images(images: Any, image_size: int) -> np.ndarray:
    """Scale uint8 images ``(N, H, W, C)`` to float32 in ``[0, 1]`` and resize them.

    ``x = image / 255``; when ``(H, W) != (image_size, image_size)`` the result is resized
    with ``jax.image.resize(..., method="linear", antialias=True)`` and clipped to ``[0, 1]``.

    Returns:
      NumPy float32 array of shape ``(N, image_size, image_size, C)``.
    """
    x = np.asarray(images, dtype=np.float32) / np.float32(255.0)
    if x.ndim != 4:
        raise PrivDebiasError(f"resize_images expects (N, H, W, C) images, got shape {x.shape}")
    if x.shape[1:3] == (image_size, image_size):
        return x
    return np.asarray(_resizer((int(image_size), int(image_size)))(jnp.asarray(x)))


def _read_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike[str] | None,
    max_examples: int | None,
    image_size: int,
    fields: Callable[[dict[str, Any]], tuple[int, int]],
    download: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Any]]:
    """Read ``min(len, max_examples)`` records one by one; return ``x, y, a`` and raw ids."""
    source = _open_source(name, split, data_dir, download)
    try:
        n = len(source)
    except Exception as e:
        raise PrivDebiasError(
            f"TFDS dataset {name!r} split {split!r}: cannot read its size: {e}"
        ) from e
    if max_examples is not None:
        n = min(n, int(max_examples))
    if n == 0:
        raise PrivDebiasError(f"TFDS dataset {name!r} split {split!r} holds no examples")
    xs: list[np.ndarray] = []
    ys = np.empty(n, np.int32)
    as_ = np.empty(n, np.int32)
    ids: list[Any] = []
    chunk: list[np.ndarray] = []
    for i in range(n):
        try:
            record = source[i]
        except Exception as e:
            raise PrivDebiasError(
                f"TFDS dataset {name!r} split {split!r}: reading record {i} failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        chunk.append(np.asarray(record["image"], dtype=np.uint8))
        ys[i], as_[i] = fields(record)
        raw_id = record.get("id")
        ids.append(raw_id.decode() if isinstance(raw_id, bytes) else raw_id)
        if len(chunk) == _CHUNK or i == n - 1:
            xs.append(resize_images(np.stack(chunk), image_size))
            chunk = []
    return np.concatenate(xs, axis=0), ys, as_, ids


def _splits(
    name: str,
    train: tuple[Any, Any, Any],
    test: tuple[Any, Any, Any],
    num_classes: int,
    num_attributes: int,
    info: dict,
) -> DataSplits:
    """Validated train/test datasets (ids: train ``0..n−1``, test continuing) without counterfactuals."""
    n_tr = len(train[1])
    checks = {"num_classes": num_classes, "num_attributes": num_attributes}
    return DataSplits(
        name=name,
        train=make_dataset(*train, np.arange(n_tr), name=f"{name}/train", **checks),
        test=make_dataset(*test, np.arange(n_tr, n_tr + len(test[1])), name=f"{name}/test", **checks),
        test_unbiased=None,
        num_classes=num_classes,
        num_attributes=num_attributes,
        counterfactual=None,
        info=info,
    )


def load_cifar10(
    split_train: str = "train",
    split_test: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    max_examples: int | None = None,
    attribute: str = "none",
    *,
    image_size: int = 32,
    download: bool = False,
    max_test: int | None = None,
    rho: float = 0.99,
    tint_strength: float = 0.5,
    key: Any = 0,
) -> DataSplits:
    """CIFAR-10 from ``tfds.data_source("cifar10")`` as :class:`DataSplits`.

    CIFAR-10 has no protected attribute. With ``attribute="none"`` (default) ``a = 0`` for every
    sample and ``num_attributes = 1``; there is no counterfactual and no unbiased test set.
    With ``attribute="tint"`` the images get the synthetic colour-tint attribute of
    :func:`privdebias_jax.data.tint.tinted_splits` (ten colours, ``P(a = y) = rho`` in training
    and the biased test set, half of the test images form an unbiased test set with ρ = 0.1,
    exact counterfactuals by re-tinting); the name becomes ``"cifar10-tint"``.

    Args:
      split_train, split_test: TFDS split names (e.g. ``"train[:10%]"`` outside mock data).
      data_dir: TFDS data directory holding the prepared ``cifar10`` (array_record format).
      max_examples: read at most this many records of each split (all when ``None``).
      attribute: ``"none"`` or ``"tint"``.
      image_size: output side length; images are resized when it differs from 32.
      download: let TFDS download and prepare the data when missing (needs network).
      max_test: cap of the test split when it should differ from ``max_examples``.
      rho, tint_strength, key: the tint attribute's ``P(a = y)``, strength and key (or integer
        seed); used only with ``attribute="tint"``.

    Returns:
      ``DataSplits(name="cifar10")``: ``x`` ``(N, image_size, image_size, 3)`` float32 in
      ``[0, 1]``, ``y`` the label in ``[0, 10)``, ``a`` zeros, ``idx`` train ``0..n-1`` then
      test; ``info`` holds ``classes``, ``image_size``, ``splits``, ``data_dir`` and the TFDS
      record ids (``tfds_ids``).

    Raises:
      PrivDebiasError: for an attribute other than ``"none"``, bad sizes, or a dataset not
        prepared under ``data_dir``.
    """
    if attribute not in ("none", "tint"):
        raise PrivDebiasError(
            "load_cifar10: CIFAR-10 has no protected attribute; attribute must be 'none' or the "
            f"synthetic 'tint', got {attribute!r}"
        )
    _check_max(max_examples, "max_examples")
    _check_max(max_test, "max_test")
    _check_image_size(image_size)

    def fields(record: dict[str, Any]) -> tuple[int, int]:
        return int(record["label"]), 0

    x_tr, y_tr, a_tr, id_tr = _read_split(
        "cifar10", split_train, data_dir, max_examples, image_size, fields, download
    )
    x_te, y_te, a_te, id_te = _read_split(
        "cifar10", split_test, data_dir, max_examples if max_test is None else max_test, image_size,
        fields, download,
    )
    splits = _splits(
        "cifar10",
        (x_tr, y_tr, a_tr),
        (x_te, y_te, a_te),
        num_classes=len(CIFAR10_CLASSES),
        num_attributes=1,
        info={
            "classes": list(CIFAR10_CLASSES),
            "attribute": "none",
            "image_size": int(image_size),
            "splits": {"train": split_train, "test": split_test},
            "data_dir": None if data_dir is None else str(data_dir),
            "tfds_ids": {"train": id_tr, "test": id_te},
        },
    )
    if attribute == "tint":
        from privdebias_jax.data.tint import tinted_splits

        splits = tinted_splits(splits, rho, key, strength=tint_strength)
    return splits


def _check_celeba_name(value: str, role: str) -> None:
    if value not in CELEBA_ATTRIBUTES:
        raise PrivDebiasError(
            f"load_celeba: unknown {role} attribute {value!r}; valid CelebA attributes are "
            f"{', '.join(CELEBA_ATTRIBUTES)}"
        )


def load_celeba(
    target: str = "Blond_Hair",
    attribute: str = "Male",
    image_size: int = 64,
    data_dir: str | os.PathLike[str] | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    *,
    split_train: str = "train",
    split_test: str = "test",
    download: bool = False,
) -> DataSplits:
    """CelebA from ``tfds.data_source("celeb_a")`` as :class:`DataSplits`.

    ``y = int(attributes[target])``, ``a = int(attributes[attribute])`` (both binary, e.g.
    blond hair vs. gender). The 218×178 images are resized to a square ``image_size`` (the
    aspect ratio is not kept). There is no counterfactual (``counterfactual=None``: a face
    cannot be re-rendered with the other attribute value) and no unbiased test set.

    Memory: ``N * image_size**2 * 3 * 4`` bytes per split (the full training split at 64×64 is
    about 8 GB); use ``max_train`` / ``max_test`` to cap it.

    Args:
      target: CelebA attribute used as the label (one of :data:`CELEBA_ATTRIBUTES`).
      attribute: CelebA attribute used as the protected attribute.
      image_size: output side length.
      data_dir: TFDS data directory holding the prepared ``celeb_a`` (array_record format).
      max_train, max_test: read at most this many records of each split.
      split_train, split_test: TFDS split names (``celeb_a`` also has ``"validation"``).
      download: let TFDS download and prepare the data when missing (needs network; CelebA's
        download is often refused by its host: prefer preparing it by hand).

    Returns:
      ``DataSplits(name="celeba", num_classes=2, num_attributes=2)``: ``x``
      ``(N, image_size, image_size, 3)`` float32 in ``[0, 1]``, ``idx`` train ``0..n-1`` then
      test; ``info`` holds ``target``, ``attribute``, ``image_size``, ``splits``, ``data_dir``.

    Raises:
      PrivDebiasError: for an unknown target or attribute name (listing the valid ones), equal
        target and attribute, bad sizes, or a dataset not prepared under ``data_dir``.
    """
    _check_celeba_name(target, "target")
    _check_celeba_name(attribute, "protected")
    if target == attribute:
        raise PrivDebiasError(f"load_celeba: target and attribute are both {target!r}")
    _check_max(max_train, "max_train")
    _check_max(max_test, "max_test")
    _check_image_size(image_size)

    def fields(record: dict[str, Any]) -> tuple[int, int]:
        attrs = record["attributes"]
        return int(bool(attrs[target])), int(bool(attrs[attribute]))

    x_tr, y_tr, a_tr, _ = _read_split(
        "celeb_a", split_train, data_dir, max_train, image_size, fields, download
    )
    x_te, y_te, a_te, _ = _read_split(
        "celeb_a", split_test, data_dir, max_test, image_size, fields, download
    )
    return _splits(
        "celeba",
        (x_tr, y_tr, a_tr),
        (x_te, y_te, a_te),
        num_classes=2,
        num_attributes=2,
        info={
            "target": target,
            "attribute": attribute,
            "attribute_values": [f"not {attribute}", attribute],
            "image_size": int(image_size),
            "splits": {"train": split_train, "test": split_test},
            "data_dir": None if data_dir is None else str(data_dir),
        },
    )


__all__ = [
    "CIFAR10_CLASSES",
    "CELEBA_ATTRIBUTES",
    "resize_images",
    "load_cifar10",
    "load_celeba",
]
