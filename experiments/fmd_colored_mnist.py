"""FMD on Colored-MNIST (Chen et al. 2023, Table 1 setting): the 3×100 MLP, ρ = 0.99, last layer.

Command (from the repository root):

    privdebias debias --config experiments/fmd_colored_mnist.py --out results/fmd_colored_mnist

Methods (``--method``): ``proximal_finetune`` (the default: Newton-CG on the external set and
its counterfactuals), ``fmd`` (the paper's single influence step; ``--variant train --k 400``
ranks and replaces the 400 most harmful training samples), ``head_retrain`` (the last layer
retrained on counterfactual-replaced training data). ``--model small_cnn`` takes the CPU CNN.

Expected on 2 CPU cores (seed 0, |D_ex| = 200, 1,010 parameters updated): ~7 s of training and
~5 s of debiasing. Vanilla: counterfactual bias 0.77, unbiased accuracy 0.30, biased 0.985.
``proximal_finetune``: 0.28 / 0.68 / 0.86; ``head_retrain``: 0.20 / 0.79 / 0.74
(``--replacement all``: 0.20 / 0.79 / 0.90); ``fmd``: 0.70 / 0.29 / 0.88 (the guard keeps only a
short step: see ``docs/influence.md``).
"""

from privdebias_jax.config import get_fmd_config


def get_config():
    c = get_fmd_config("colored-mnist")
    c.rho = 0.99
    return c
