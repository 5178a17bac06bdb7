"""Datasets as NamedTuples of arrays ``(x, y, a, idx)``, loaders and batching.

``load_dataset(name, **options)`` is the single entry point the CLI and experiments use.
"""

from __future__ import annotations

from typing import Any

from privdebias_jax.data.dataset import (
    Batch,
    Dataset,
    DataSplits,
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
from privdebias_jax.data.mnist import (
    PALETTE,
    biased_mnist,
    colored_mnist,
    colorize,
    decolorize,
    load_digits,
    recolor,
)
from privdebias_jax.types import PrivDebiasError

DATASETS = ("colored-mnist", "biased-mnist", "adult", "cifar10", "celeba")


def load_dataset(name: str, **options: Any) -> DataSplits:
    """Load a dataset by name: one of :data:`DATASETS`.

    ``options`` go to the loader: ``colored_mnist`` / ``biased_mnist`` (``rho``, ``key``,
    ``image_size``, ``test_per_class``, ``train_size``), ``load_adult`` (``data_dir``,
    ``attribute``, ``download``), ``load_cifar10`` / ``load_celeba`` (tfds options).

    Raises:
      PrivDebiasError: for an unknown name (the message lists the known ones).
    """
    key = name.lower().replace("_", "-")
    if key == "colored-mnist":
        return colored_mnist(**options)
    if key == "biased-mnist":
        return biased_mnist(**options)
    if key == "adult":
        from privdebias_jax.data.adult import load_adult

        return load_adult(**options)
    if key in ("cifar10", "cifar-10"):
        from privdebias_jax.data.tfds_sources import load_cifar10

        return load_cifar10(**options)
    if key in ("celeba", "celeb-a"):
        from privdebias_jax.data.tfds_sources import load_celeba

        return load_celeba(**options)
    raise PrivDebiasError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


__all__ = [
    "DATASETS",
    "load_dataset",
    "Batch",
    "DataSplits",
    "Dataset",
    "as_batch",
    "concat",
    "iterate_batches",
    "make_dataset",
    "next_free_id",
    "num_batches",
    "other_attribute",
    "remove_ids",
    "stack_batches",
    "subset",
    "validate_dataset",
    "PALETTE",
    "biased_mnist",
    "colored_mnist",
    "colorize",
    "decolorize",
    "load_digits",
    "recolor",
]
