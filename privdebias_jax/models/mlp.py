"""Multilayer perceptrons returning ``(logits, features)``.

* FMD's Colored-MNIST classifier (Chen et al. 2023, public code): 3 hidden layers of 100 ReLU
  units on the flattened image: ``MLP(hidden=(100, 100, 100))``.
* A tabular MLP for Adult: ``MLP(hidden=(64, 32))``.

``features`` is the last hidden layer (the bottleneck the privacy probe reads); the final
linear layer is named ``head`` so a path filter on ``"head"`` selects the last layer (the
parameter subset FMD updates).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """``x → flatten → [Dense → ReLU] × len(hidden) → head``.

    Attributes:
      num_classes: output logits.
      hidden: widths of the hidden layers (at least one).
      dropout: dropout rate after each hidden layer (needs a ``dropout`` rng when training).
    """

    num_classes: int
    hidden: Sequence[int] = (100, 100, 100)
    dropout: float = 0.0

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        del mask  # no batch statistics
        h = jnp.reshape(x, (x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(width, name=f"dense_{i}")(h))
            if self.dropout > 0:
                h = nn.Dropout(self.dropout, deterministic=not train)(h)
        logits = nn.Dense(self.num_classes, name="head")(h)
        return logits, h
