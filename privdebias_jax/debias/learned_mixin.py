"""LearnedMixin (Clark, Yatskar & Zettlemoyer, EMNLP 2019: "Don't take the easy way out").

A product of experts of the main model and a bias-only model, with a learned, input-dependent
weight on the bias expert::

    log p̂(y | x) = log p_f(y | x) + s(x) · log p_g(y | x),    s(x) = softplus(w · h(x) + b) ≥ 0,
    L = CE(softmax(log p̂), y)  [+ CE(g(x), y) for the bias branch]

``h(x)`` is the main network's bottleneck. The bias log-probabilities are a constant in the
ensemble (Clark et al. train the bias-only model beforehand and freeze it; here the bias branch
trains at the same time on its own cross-entropy only, which is the same thing done in one
pass). Prediction uses ``p_f`` alone. The "+H" entropy penalty of Clark et al. is not used
(Bahng et al.'s Biased-MNIST baseline has it off). The bias branch is Bahng et al.'s 1×1-kernel
network (see :mod:`privdebias_jax.debias.branch`).

In the shared loop the ensemble's cross-entropy is the data term (the
:class:`~privdebias_jax.debias.branch.BiasBranchNet` returns the ensemble logits in training mode)
and :func:`make_learned_mixin_regularizer` adds the bias branch's ``CE(g(x), y)``.
"""

from __future__ import annotations

import jax

from privdebias_jax.data.dataset import Batch
from privdebias_jax.debias.branch import BiasBranchNet, bias_branch_outputs, mixin_logits
from privdebias_jax.debias.rubi import masked_cross_entropy
from privdebias_jax.types import Params


def learned_mixin_loss(
    main_logits: jax.Array, bias_logits: jax.Array, gate: jax.Array, y: jax.Array, mask: jax.Array
) -> jax.Array:
    """The whole objective ``CE(log p_f + s · log p_g, y) + CE(g, y)`` (``gate`` = ``s(x)``, ``(B, 1)``)."""
    return masked_cross_entropy(mixin_logits(main_logits, bias_logits, gate), y, mask) + masked_cross_entropy(
        bias_logits, y, mask
    )


def make_learned_mixin_regularizer(model: BiasBranchNet):
    """``regularizer(params, batch, logits, features) = CE(g(x), y)``: the bias branch's own loss."""

    def regularizer(params: Params, batch: Batch, logits: jax.Array, features: jax.Array) -> jax.Array:
        del logits, features
        bias_logits, _ = bias_branch_outputs(model, params, batch.x)
        return masked_cross_entropy(bias_logits, batch.y, batch.mask)

    return regularizer


__all__ = ["learned_mixin_loss", "make_learned_mixin_regularizer"]
