"""Debiasing methods.

After training, on a small parameter subset (one module and one function each, selected by name
with :func:`get_debias_method`):

* ``fmd``: FMD's one influence step (Chen et al. 2023), :mod:`privdebias_jax.debias.fmd`;
* ``head_retrain``: the subset retrained on counterfactual-replaced training data,
  :mod:`privdebias_jax.debias.head_retrain`;
* ``proximal_finetune``: Newton-CG on the external pairs with a proximal term,
  :mod:`privdebias_jax.debias.proximal_finetune`.

During training (Barbano et al. 2021's comparison: EnD, LearnedMixin, RUBi, ReBias), selected by
name in :mod:`privdebias_jax.debias.methods`.
"""

from privdebias_jax.debias.branch import BiasBranchNet, mixin_logits, rubi_logits
from privdebias_jax.debias.counterfactual_update import (
    MODES,
    REPLACEMENTS,
    DebiasResult,
    counterfactual_bias_value,
    counterfactual_update,
    drop_ids,
    identify_bias,
    make_bias_objective,
    rank_harmful,
    split_external,
    warnings_of,
)
from privdebias_jax.debias.end import (
    end_disentangle,
    end_entangle,
    make_end_regularizer,
    normalized_gram,
)
from privdebias_jax.debias.fmd import fmd
from privdebias_jax.debias.head_retrain import head_retrain
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
from privdebias_jax.debias.proximal_finetune import proximal_finetune
from privdebias_jax.debias.rebias import (
    hsic_unbiased,
    make_rebias_regularizer,
    rbf_hsic,
    rbf_kernel,
)
from privdebias_jax.debias.rubi import make_rubi_regularizer, rubi_loss
from privdebias_jax.types import PrivDebiasError

DEBIAS_METHODS = {"fmd": fmd, "head_retrain": head_retrain, "proximal_finetune": proximal_finetune}


def get_debias_method(name: str):
    """The post-training debiasing function called ``name`` (a key of :data:`DEBIAS_METHODS`).

    Raises:
      PrivDebiasError: for an unknown name (the message lists the known ones).
    """
    if name not in DEBIAS_METHODS:
        raise PrivDebiasError(f"unknown debiasing method {name!r}; available: {', '.join(DEBIAS_METHODS)}")
    return DEBIAS_METHODS[name]


__all__ = [
    "DEBIAS_METHODS",
    "get_debias_method",
    "MODES",
    "REPLACEMENTS",
    "DebiasResult",
    "counterfactual_update",
    "warnings_of",
    "fmd",
    "head_retrain",
    "proximal_finetune",
    "counterfactual_bias_value",
    "drop_ids",
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
