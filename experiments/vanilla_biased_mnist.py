"""Vanilla Biased-MNIST classifier (Bahng et al. 2020 setting) on the embedded digits.

Command (from the repository root):

    privdebias train --config experiments/vanilla_biased_mnist.py --out results/vanilla_biased_mnist

Override ρ with ``--rho 0.997``; the paper-size model with ``--model simple_conv --image-size 28``
(~56 examples/s on 2 CPU cores: use a GPU/TPU).

Expected on 2 CPU cores: ~1 minute; biased-test accuracy ≈ 0.99, unbiased accuracy ≈ 0.10
at ρ = 0.99 (the model learns the colour shortcut: 4,000 training images leave only ~40
bias-conflicting samples, against 600 in the paper's 60,000).
"""

from privdebias_jax.config import get_config as _base


def get_config():
    c = _base("biased-mnist", "cpu")
    c.rho = 0.99
    return c
