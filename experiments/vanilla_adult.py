"""Vanilla Adult income classifier (FMD's tabular setting), protected attribute ``sex``.

Command (from the repository root, with the real UCI files beside the repository):

    privdebias train --config experiments/vanilla_adult.py --data-dir ../shared/data/adult --out results/vanilla_adult

Expected on 2 CPU cores: ~10 s; test accuracy ≈ 0.85.
"""

from privdebias_jax.config import get_config as _base


def get_config():
    return _base("adult", "cpu")
