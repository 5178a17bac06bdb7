"""Vanilla Colored-MNIST classifier (FMD, Chen et al. 2023): the 3×100 MLP on coloured strokes.

Command (from the repository root):

    privdebias train --config experiments/vanilla_colored_mnist.py --out results/vanilla_colored_mnist

Expected on 2 CPU cores: a few seconds of training at 28×28.
"""

from privdebias_jax.config import get_config as _base


def get_config():
    c = _base("colored-mnist", "cpu")
    c.rho = 0.99
    return c
