"""A small ResNet (He et al. 2016, CIFAR variant) returning ``(logits, features)``.

Stem conv 3×3, then stages of basic residual blocks (two 3×3 convs, identity or 1×1
projection shortcut), global average pooling, a linear ``head``. ``stage_sizes=(1, 1, 1)`` with
widths ``(16, 32, 64)`` is ResNet-8; ``(3, 3, 3)`` is ResNet-20.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from privdebias_jax.models.cnn import apply_norm
from privdebias_jax.models.conv import conv_kwargs


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection."""

    width: int
    stride: int
    norm: str
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        bias = self.norm == "none"

        def normed(h: jax.Array, name: str) -> jax.Array:
            return apply_norm(self.norm, name, h, train, mask)

        c3 = conv_kwargs(self.conv, (3, 3))
        h = nn.Conv(self.width, (3, 3), (self.stride, self.stride), padding="SAME", use_bias=bias, name="conv1", **c3)(x)
        h = nn.relu(normed(h, "norm1"))
        h = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=bias, name="conv2", **c3)(h)
        h = normed(h, "norm2")
        if x.shape[-1] != self.width or self.stride != 1:
            x = nn.Conv(self.width, (1, 1), (self.stride, self.stride), use_bias=bias, name="proj",
                        **conv_kwargs(self.conv, (1, 1)))(x)
            x = normed(x, "norm_proj")
        return nn.relu(h + x)


class ResNet(nn.Module):
    """Small CIFAR-style ResNet.

    Attributes:
      num_classes: output logits.
      stage_sizes: residual blocks per stage.
      widths: channels per stage (the first block of stages after the first has stride 2).
      norm: ``batch``, ``group``, ``layer`` or ``none``.
      conv: convolution implementation, ``auto``, ``xla``, ``im2col`` or ``hybrid``
        (:mod:`privdebias_jax.models.conv`; ``auto`` is im2col-based on the CPU).
    """

    num_classes: int
    stage_sizes: Sequence[int] = (1, 1, 1)
    widths: Sequence[int] = (16, 32, 64)
    norm: str = "group"
    conv: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        h = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=self.norm == "none", name="stem",
                    **conv_kwargs(self.conv, (3, 3)))(x)
        h = nn.relu(apply_norm(self.norm, "stem_norm", h, train, mask))
        for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=False)):
            for b in range(blocks):
                stride = 2 if (s > 0 and b == 0) else 1
                h = BasicBlock(width, stride, self.norm, self.conv, name=f"stage{s}_block{b}")(h, train, mask)
        features = jnp.mean(h, axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="head")(features)
        return logits, features
