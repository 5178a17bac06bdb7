"""Debiasing methods. FMD (influence-function unlearning) lives in :mod:`privdebias_jax.debias.fmd`."""

from privdebias_jax.debias.fmd import (
    MODES,
    FMDResult,
    counterfactual_bias_value,
    drop_ids,
    fmd_debias,
    identify_bias,
    make_bias_objective,
    rank_harmful,
    split_external,
)

__all__ = [
    "MODES",
    "FMDResult",
    "counterfactual_bias_value",
    "drop_ids",
    "fmd_debias",
    "identify_bias",
    "make_bias_objective",
    "rank_harmful",
    "split_external",
]
