"""Debiasing methods. FMD (influence-function unlearning) lives in :mod:`privdebias_jax.debias.fmd`;
the training-time methods of seed paper 001 (EnD, LearnedMixin, RUBi, ReBias), selected by name,
in :mod:`privdebias_jax.debias.methods`."""

from privdebias_jax.debias.branch import BiasBranchNet, mixin_logits, rubi_logits
from privdebias_jax.debias.end import (
    end_disentangle,
    end_entangle,
    make_end_regularizer,
    normalized_gram,
)
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
from privdebias_jax.debias.learned_mixin import learned_mixin_loss, make_learned_mixin_regularizer
from privdebias_jax.debias.methods import (
    METHODS,
    NEEDS_BIAS_LABEL,
    MethodSetup,
    check_method,
    default_bias_network,
    main_train_state,
    setup_method,
)
from privdebias_jax.debias.rebias import (
    hsic_unbiased,
    make_rebias_regularizer,
    rbf_hsic,
    rbf_kernel,
)
from privdebias_jax.debias.rubi import make_rubi_regularizer, rubi_loss

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
    "METHODS",
    "NEEDS_BIAS_LABEL",
    "MethodSetup",
    "check_method",
    "default_bias_network",
    "setup_method",
    "main_train_state",
    "BiasBranchNet",
    "rubi_logits",
    "mixin_logits",
    "normalized_gram",
    "end_disentangle",
    "end_entangle",
    "make_end_regularizer",
    "learned_mixin_loss",
    "make_learned_mixin_regularizer",
    "rubi_loss",
    "make_rubi_regularizer",
    "hsic_unbiased",
    "rbf_kernel",
    "rbf_hsic",
    "make_rebias_regularizer",
]
