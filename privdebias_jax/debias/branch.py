"""A main network paired with a bias-only network, for LearnedMixin, RUBi and ReBias.

**Which bias branch, and why.** We follow Bahng et al. (ICML 2020, "Learning De-biased
Representations with Biased Representations"): the bias-only network ``g`` is the same
convolutional net as the main one but with **1×1 kernels**, so its receptive field is a single
pixel: it can see the colour and nothing of the digit's shape. Seed paper 001 (Barbano et al.
2021) ran LearnedMixin, RUBi and ReBias from Bahng et al.'s code with exactly this branch, and it
keeps these three methods usable where the bias label is unknown (the setting they were made
for): only EnD reads the bias label. On the CPU default the branch has strides 1-2-2-2 (the
main ``small_cnn``'s), which keeps the 1-pixel receptive field and costs ~10 % of the main
net; the ``paper`` preset uses stride 1 throughout as Bahng et al. The branch never has batch
norm (it is run from parameters alone inside the regularisers).

:class:`BiasBranchNet` holds ``main`` and ``bias`` (and, for LearnedMixin, the scalar gate
``mixin``). In evaluation mode it returns the main network's ``(logits, features)`` alone, so
prediction, metrics, the attribute probe and the reconstruction attack see only the debiased
network. In training mode it returns the logits each method trains on:

* ``rubi``:  ``f(x) ⊙ σ(g(x))`` (Cadene et al. 2019, as implemented by Bahng et al.);
* ``learned_mixin``: ``log softmax f(x) + s(x) · sg(log softmax g(x))`` with the learned gate
  ``s(x) = softplus(w · h(x) + b) ≥ 0`` on the main bottleneck ``h(x)`` (Clark et al. 2019);
* ``rebias`` (and anything else): ``f(x)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from privdebias_jax.types import Params

#: How the training-mode logits combine the main and the bias branch.
COMBINES = ("none", "rubi", "learned_mixin")


def rubi_logits(main_logits: jax.Array, bias_logits: jax.Array) -> jax.Array:
    """RUBi's masked logits ``f(x) ⊙ σ(g(x))`` (Cadene et al., NeurIPS 2019)."""
    return main_logits * jax.nn.sigmoid(bias_logits)


def mixin_logits(main_logits: jax.Array, bias_logits: jax.Array, gate: jax.Array) -> jax.Array:
    """LearnedMixin's ensemble ``log p_f + s(x) · sg(log p_g)`` with ``gate`` ``s(x)`` ``(B, 1)``.

    The bias model's log-probabilities are held fixed in the ensemble (Clark et al. 2019 train
    the bias-only model separately; here it learns from its own cross-entropy alone).
    """
    return jax.nn.log_softmax(main_logits) + gate * jax.lax.stop_gradient(jax.nn.log_softmax(bias_logits))


class BiasBranchNet(nn.Module):
    """``main`` (the network being debiased) and ``bias`` (a bias-only network) side by side.

    Attributes:
      main: any model of :mod:`privdebias_jax.models` (returns ``(logits, features)``).
      bias: the bias-only model (Bahng et al.'s 1×1-kernel ConvNet by default).
      combine: ``none``, ``rubi`` or ``learned_mixin``: what training-mode logits are.
    """

    main: nn.Module
    bias: nn.Module
    combine: str = "none"

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        logits, features = self.main(x, train=train, mask=mask)
        gate_layer = nn.Dense(1, name="mixin") if self.combine == "learned_mixin" else None
        if self.is_initializing() or (train and self.combine != "none"):
            bias_logits, _ = self.bias(x, train=train, mask=mask)
            if gate_layer is not None:
                gate = nn.softplus(gate_layer(features))
                if train:
                    return mixin_logits(logits, bias_logits, gate), features
            elif self.combine == "rubi" and train:
                return rubi_logits(logits, bias_logits), features
        return logits, features

    def bias_outputs(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The bias branch's ``(logits, features)`` (training mode; it has no batch norm)."""
        return self.bias(x, train=True, mask=None)


def bias_branch_outputs(model: BiasBranchNet, params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Run only the bias branch of ``model`` from the full parameter tree ``params``."""
    return model.apply({"params": params}, x, method=BiasBranchNet.bias_outputs)


def mixin_gate(params: Params, features: jax.Array) -> jax.Array:
    """LearnedMixin's gate ``s(x) = softplus(h(x) w + b)`` ``(B, 1)`` from the ``mixin`` parameters."""
    p = params["mixin"]
    return jax.nn.softplus(jnp.reshape(features, (features.shape[0], -1)) @ p["kernel"] + p["bias"])


__all__ = [
    "COMBINES",
    "BiasBranchNet",
    "rubi_logits",
    "mixin_logits",
    "bias_branch_outputs",
    "mixin_gate",
]
