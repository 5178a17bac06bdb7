"""RUBi: reducing unimodal biases (Cadene, Dancette, Ben-younes, Cord & Parikh, NeurIPS 2019).

During training the main network's logits are masked by the bias-only branch,
``f̃(x) = f(x) ⊙ σ(g(x))``, and the objective is::

    L = CE(f(x) ⊙ σ(g(x)), y) + CE(g(x), y)

Samples the bias branch already gets right are down-weighted for the main network; the bias
branch learns from its own cross-entropy (and from the masked loss, through the mask).
Prediction uses ``f(x)`` alone. This is the form Bahng et al. (ICML 2020) implement for
Biased-MNIST, with their 1×1-kernel bias network (see :mod:`privdebias_jax.debias.branch`):
Cadene et al.'s extra classifier on top of the question-only branch is dropped, because the
bias network already ends in logits. No hyperparameters. Seed paper 001 finds that RUBi
re-weights the colour information rather than removing it: the probe still reads it.

In the shared loop the masked cross-entropy is the data term (the
:class:`~privdebias_jax.debias.branch.BiasBranchNet` returns the masked logits in training mode)
and :func:`make_rubi_regularizer` adds ``CE(g(x), y)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from privdebias_jax.data.dataset import Batch
from privdebias_jax.debias.branch import BiasBranchNet, bias_branch_outputs, rubi_logits
from privdebias_jax.types import Params


def masked_cross_entropy(logits: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ_i m_i CE(logits_i, y_i) / max(Σ_i m_i, 1)``."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    m = mask.astype(ce.dtype)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def rubi_loss(main_logits: jax.Array, bias_logits: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """RUBi's whole objective ``CE(f ⊙ σ(g), y) + CE(g, y)`` over the real samples (for tests and users
    who write their own step)."""
    return masked_cross_entropy(rubi_logits(main_logits, bias_logits), y, mask) + masked_cross_entropy(
        bias_logits, y, mask
    )


def make_rubi_regularizer(model: BiasBranchNet):
    """``regularizer(params, batch, logits, features) = CE(g(x), y)``: the bias branch's own loss.

    ``model`` is the :class:`BiasBranchNet` being trained (with ``combine = "rubi"``).
    """

    def regularizer(params: Params, batch: Batch, logits: jax.Array, features: jax.Array) -> jax.Array:
        del logits, features
        bias_logits, _ = bias_branch_outputs(model, params, batch.x)
        return masked_cross_entropy(bias_logits, batch.y, batch.mask)

    return regularizer


__all__ = ["masked_cross_entropy", "rubi_loss", "make_rubi_regularizer"]
