"""Shared small fixtures: tiny Colored/Biased-MNIST splits and tiny models.

Everything here is session-scoped and small (8×8 images, 400 training digits) so the data,
model, training and checkpoint tests together stay within a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest

from privdebias_jax.data import biased_mnist, colored_mnist, make_dataset
from privdebias_jax.models import create_model

IMAGE_SIZE = 8
TRAIN_SIZE = 400
INPUT_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)


@pytest.fixture(scope="session")
def biased8():
    """Biased-MNIST (background colour), ρ = 0.99, 8×8, 400 training digits."""
    return biased_mnist(rho=0.99, key=0, image_size=IMAGE_SIZE, train_size=TRAIN_SIZE)


@pytest.fixture(scope="session")
def colored8():
    """Colored-MNIST (stroke colour), ρ = 0.99, 8×8, 400 training digits."""
    return colored_mnist(rho=0.99, key=0, image_size=IMAGE_SIZE, train_size=TRAIN_SIZE)


@pytest.fixture(scope="session")
def colour_task():
    """Biased-MNIST with ρ = 1: the background colour determines the label exactly."""
    return biased_mnist(rho=1.0, key=3, image_size=IMAGE_SIZE, train_size=TRAIN_SIZE)


@pytest.fixture(scope="session")
def tiny_mlp():
    return create_model("mlp", 10, hidden=(16,))


@pytest.fixture(scope="session")
def tiny_cnn():
    return create_model("small_cnn", 10, widths=(4, 8), strides=(1, 2))


@pytest.fixture(scope="session")
def small_tabular():
    """A small random tabular dataset (N = 37, D = 5, 3 classes, binary attribute)."""
    rng = np.random.default_rng(0)
    n = 37
    return make_dataset(
        rng.normal(size=(n, 5)),
        rng.integers(0, 3, n),
        rng.integers(0, 2, n),
        idx=np.arange(100, 100 + n),
        num_classes=3,
        num_attributes=2,
    )
