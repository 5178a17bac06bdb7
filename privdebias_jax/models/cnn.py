"""Convolutional networks returning ``(logits, features)``.

``ConvNet`` is the Biased-MNIST ``SimpleConvNet`` of Bahng et al. (ICML 2020, "Learning
De-biased Representations with Biased Representations"): 4 conv layers, kernel 7, widths
16-32-64-128, batch norm, ReLU, global average pooling, a linear head. Kernel, widths,
strides and normalisation are configurable: the CPU default (``small_cnn``) uses kernel 3 and
strides 1, 2, 2, 2 without batch norm, much faster on a CPU. ``features`` is
the pooled vector before the head (the bottleneck).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from privdebias_jax.models.conv import conv_kwargs

NORMS = ("batch", "group", "layer", "none")


def apply_norm(kind: str, name: str, h: jax.Array, train: bool, mask: jax.Array | None) -> jax.Array:
    """Apply a normalisation layer to ``h`` ``(B, H, W, C)``; padding rows (``mask = 0``) are
    left out of batch-norm statistics."""
    layer = norm_layer(kind, name, train)
    if layer is None:
        return h
    if kind == "batch":
        bn_mask = None if mask is None else jnp.broadcast_to(mask.reshape((-1,) + (1,) * (h.ndim - 1)) > 0, h.shape)
        return layer(h, mask=bn_mask)
    return layer(h)


def norm_layer(kind: str, name: str, train: bool) -> nn.Module | None:
    """``batch`` (running statistics in the ``batch_stats`` collection), ``group``, ``layer`` or ``none``."""
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    if kind == "group":
        return nn.GroupNorm(num_groups=None, group_size=8, name=name)
    if kind == "layer":
        return nn.LayerNorm(name=name)
    if kind == "none":
        return None
    raise ValueError(f"unknown norm {kind!r}; expected batch, group, layer or none")


class ConvNet(nn.Module):
    """``[Conv(k×k, stride) → norm → ReLU] × len(widths) → global average pool → head``.

    Attributes:
      num_classes: output logits.
      widths: channels per conv layer.
      kernel_size: square kernel side (7 in Bahng et al.).
      strides: stride per conv layer (same length as ``widths``).
      norm: ``batch``, ``group``, ``layer`` or ``none``.
      conv: convolution implementation, ``auto`` (on the CPU for kernels up to 3×3: im2col,
        or XLA's forward with im2col derivatives for large patch tensors; XLA's convolution
        elsewhere), ``xla``, ``im2col`` or ``hybrid`` (:mod:`privdebias_jax.models.conv`); the
        parameters are the same for all.
    """

    num_classes: int
    widths: Sequence[int] = (16, 32, 64, 128)
    kernel_size: int = 7
    strides: Sequence[int] = (1, 1, 1, 1)
    norm: str = "batch"
    conv: str = "auto"

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        if len(self.strides) != len(self.widths):
            raise ValueError(f"strides {tuple(self.strides)} and widths {tuple(self.widths)} differ in length")
        ksize = (self.kernel_size, self.kernel_size)
        conv = conv_kwargs(self.conv, ksize)
        h = x
        for i, (width, stride) in enumerate(zip(self.widths, self.strides, strict=False)):
            h = nn.Conv(width, ksize, strides=(stride, stride), padding="SAME",
                        use_bias=self.norm == "none", name=f"conv_{i}", **conv)(h)
            h = nn.relu(apply_norm(self.norm, f"norm_{i}", h, train, mask))
        features = jnp.mean(h, axis=(1, 2))
        logits = nn.Dense(self.num_classes, name="head")(features)
        return logits, features
