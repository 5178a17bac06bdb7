"""FMD on UCI Adult (Chen et al. 2023): tabular MLP, protected attribute ``sex``, last layer.

Command (from the repository root, with the real files beside the repository):

    privdebias debias --config experiments/fmd_adult.py --data-dir ../shared/data/adult --out results/fmd_adult

Expected on 2 CPU cores: ~10 s of training, seconds of debiasing; accuracy ≈ 0.85 kept,
counterfactual bias ≈ 0.055 → ≈ 0.02, DP difference ≈ 0.20 → ≈ 0.14 (66 parameters updated,
|D_ex| = 200 rows of the test file, removed from evaluation).
"""

from privdebias_jax.config import get_fmd_config


def get_config():
    c = get_fmd_config("adult")
    return c
