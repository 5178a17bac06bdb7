"""FMD on Colored-MNIST (Chen et al. 2023, Table 1 setting): the 3×100 MLP, ρ = 0.99, last layer.

Command (from the repository root):

    privdebias debias --config experiments/fmd_colored_mnist.py --out results/fmd_colored_mnist

Variants: ``--newton-iterations 1 --k 400`` is the paper's single Newton step replacing the
400 most harmful samples; ``--mode external`` uses only the external set; ``--model small_cnn``
the CPU CNN.

Expected on 2 CPU cores: ~20 s of training, a few seconds of debiasing; unbiased accuracy
≈ 0.29 → ≈ 0.81, counterfactual bias ≈ 0.77 → ≈ 0.23 (1,010 parameters updated, |D_ex| = 200).
"""

from privdebias_jax.config import get_fmd_config


def get_config():
    c = get_fmd_config("colored-mnist")
    c.rho = 0.99
    return c
