"""Denoisers ε_θ(x_t, t, y, a) conditioned on the class ``y`` and the attribute ``a``.

Every denoiser is a Flax module called as ``module.apply({"params": p}, x_t, t, y, a)`` with
``x_t`` ``(B, H, W, C)`` in the diffusion scale ``[-1, 1]``, integer timesteps ``t`` ``(B,)``
and integer labels ``y``, ``a`` ``(B,)``; it returns the predicted noise, shaped like ``x_t``.
The value ``num_classes`` for ``y`` (``num_attributes`` for ``a``) is the *null token*: the
condition is dropped (classifier-free guidance, Ho & Salimans 2021).

**How the condition enters, and why.** The class and the attribute get *separate* learned
embeddings, ``e_y[y]`` and ``e_a[a]``, each with its own null token, and the model sees both
(their sum in the FiLM denoisers; two cross-attention tokens in the UNet). Training drops
each one independently, so one network learns ε(x | y, a), ε(x | y), ε(x | a) and ε(x). On a
dataset at ρ = 0.99 most (y, a) cells hold 0–1 images: a single embedding per *cell* would
leave the rare cells untrained, whereas separate embeddings compose, the digit shape coming
from ``e_y`` and the colour from ``e_a``, and the sampler can add the KL-gradient guidance
of the attribute and class classifiers on top (:mod:`privdebias_jax.augment.sampler`).

* ``mlp``: :class:`MLPDenoiser`, a residual MLP on the flattened image whose blocks are
  modulated by FiLM (scale and shift from the time + condition embedding; Perez et al. 2018).
  On 14×14 RGB (588 inputs) it is the CPU default: dense layers run much faster than XLA CPU
  convolutions.
* ``factored``: :class:`FactoredDenoiser`, two such MLPs on the shape and the colour parts of
  the colour latent, the shape conditioned on ``y`` only and the colour on ``a`` only (the CPU
  default for the embedded colour data).
* ``conv``: :class:`ConvDenoiser`, a small convolutional UNet with FiLM-modulated residual
  blocks and group norm.
* ``unet``: :class:`UNetDenoiser`, diffusers' ``FlaxUNet2DConditionModel`` (Rombach et al.
  2022) with the embeddings as its cross-attention context: the full-size model for GPU/TPU.

:func:`create_denoiser` builds one from an :class:`~privdebias_jax.augment.config.AugmentConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from privdebias_jax.augment.config import AugmentConfig
from privdebias_jax.types import PrivDebiasError


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; Ho et al. 2020), ``(B, dim)``.

    ``emb = [cos(t · f_k), sin(t · f_k)]`` with ``f_k = max_period^(−k / (dim/2))``.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ConditionEmbedding(nn.Module):
    """Time embedding (sinusoidal → MLP) and the learned class / attribute embeddings.

    Returns ``(time_emb, class_emb, attr_emb)``, each ``(B, dim)``; the tables have
    ``num_classes + 1`` and ``num_attributes + 1`` rows (the last row is the null token).
    """

    num_classes: int
    num_attributes: int
    dim: int

    @nn.compact
    def __call__(self, t: jax.Array, y: jax.Array, a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        temb = timestep_embedding(t, self.dim)
        temb = nn.Dense(self.dim, name="time_1")(temb)
        temb = nn.Dense(self.dim, name="time_2")(nn.silu(temb))
        ey = nn.Embed(self.num_classes + 1, self.dim, name="class_embed")(y)
        ea = nn.Embed(self.num_attributes + 1, self.dim, name="attr_embed")(a)
        return temb, ey, ea


class MLPDenoiser(nn.Module):
    """Residual MLP on the flattened image with FiLM conditioning (the CPU default).

    ``h = W_in x``; each block: ``h += W_2 silu(W_1 (LN(h) · (1 + s) + b))`` with
    ``(s, b) = Dense(silu(e_t + e_y + e_a))``; output ``W_out silu(LN(h))`` reshaped to the image.
    """

    num_classes: int
    num_attributes: int
    width: int = 1024
    depth: int = 4
    embed_dim: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, a: jax.Array, train: bool = False) -> jax.Array:
        del train
        temb, ey, ea = ConditionEmbedding(self.num_classes, self.num_attributes, self.embed_dim, name="cond")(t, y, a)
        c = nn.silu(temb + ey + ea)
        shape = x.shape
        h = nn.Dense(self.width, name="dense_in")(x.reshape(shape[0], -1))
        for i in range(self.depth):
            film = nn.Dense(2 * self.width, name=f"film_{i}", kernel_init=nn.initializers.zeros)(c)
            scale, shift = jnp.split(film, 2, axis=-1)
            z = nn.LayerNorm(name=f"norm_{i}")(h) * (1.0 + scale) + shift
            z = nn.Dense(self.width, name=f"dense_{i}_a")(nn.silu(z))
            z = nn.Dense(self.width, name=f"dense_{i}_b")(nn.silu(z))
            h = h + z
        h = nn.silu(nn.LayerNorm(name="norm_out")(h))
        out = nn.Dense(math.prod(shape[1:]), name="dense_out", kernel_init=nn.initializers.zeros)(h)
        return out.reshape(shape)


class FactoredDenoiser(nn.Module):
    """Two FiLM MLP denoisers on the two parts of a shape/colour latent (the CPU default).

    On ``z = [z_g, z_c]`` (:class:`~privdebias_jax.augment.latent.ColourCodec`: ``split``
    shape coordinates, then the colour) it predicts

        ε_θ(z_t, t, y, a) = [ ε_g(z_{g,t}, t, y),  ε_c(z_{c,t}, t, a) ]

    with two :class:`MLPDenoiser` s: the shape network never sees the attribute and the colour
    network never sees the class. This is the generative model ``p(x | y, a) = p(g | y) p(c | a)``
    of data whose colour is painted on independently of the shape (Colored- and Biased-MNIST
    are made that way), so a rare (y, a) cell is generated from the shape model of class ``y``,
    trained on every image of ``y``, and the colour model of ``a``, trained on every image of
    ``a``: no cell needs training samples of its own. Each half keeps its null token, so
    classifier-free guidance and the KL guidance work unchanged. The colour network is small
    (``colour_width``, 2 blocks).
    """

    num_classes: int
    num_attributes: int
    split: int
    width: int = 512
    depth: int = 3
    embed_dim: int = 128
    colour_width: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, a: jax.Array, train: bool = False) -> jax.Array:
        del train
        if x.ndim != 2 or not 0 < self.split < x.shape[1]:
            raise PrivDebiasError(
                f"FactoredDenoiser needs flat latents (B, D) with 0 < split={self.split} < D, got shape {x.shape}"
            )
        null_a = jnp.full_like(a, self.num_attributes)
        null_y = jnp.full_like(y, self.num_classes)
        shape_net = MLPDenoiser(self.num_classes, self.num_attributes, self.width, self.depth, self.embed_dim,
                                name="shape")
        colour_net = MLPDenoiser(self.num_classes, self.num_attributes, self.colour_width, 2, self.embed_dim,
                                 name="colour")
        eps_g = shape_net(x[:, : self.split], t, y, null_a)
        eps_c = colour_net(x[:, self.split :], t, null_y, a)
        return jnp.concatenate([eps_g, eps_c], axis=1)


class _FiLMResBlock(nn.Module):
    channels: int

    @nn.compact
    def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
        skip = h if h.shape[-1] == self.channels else nn.Conv(self.channels, (1, 1), name="skip")(h)
        z = nn.GroupNorm(num_groups=min(8, h.shape[-1]), name="norm_1")(h)
        z = nn.Conv(self.channels, (3, 3), name="conv_1")(nn.silu(z))
        film = nn.Dense(2 * self.channels, name="film", kernel_init=nn.initializers.zeros)(c)
        scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
        z = nn.GroupNorm(num_groups=min(8, self.channels), name="norm_2")(z) * (1.0 + scale) + shift
        z = nn.Conv(self.channels, (3, 3), name="conv_2")(nn.silu(z))
        return skip + z


class ConvDenoiser(nn.Module):
    """A small convolutional UNet: ``depth`` resolution levels (channels ``width · 2^k``),
    one FiLM residual block per level on the way down and up, skip connections."""

    num_classes: int
    num_attributes: int
    width: int = 32
    depth: int = 2
    embed_dim: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, a: jax.Array, train: bool = False) -> jax.Array:
        del train
        temb, ey, ea = ConditionEmbedding(self.num_classes, self.num_attributes, self.embed_dim, name="cond")(t, y, a)
        c = nn.silu(temb + ey + ea)
        h = nn.Conv(self.width, (3, 3), name="conv_in")(x)
        skips = []
        for k in range(self.depth):
            h = _FiLMResBlock(self.width * 2**k, name=f"down_{k}")(h, c)
            skips.append(h)
            if k < self.depth - 1:
                h = nn.Conv(self.width * 2 ** (k + 1), (3, 3), strides=(2, 2), name=f"downsample_{k}")(h)
        for k in reversed(range(self.depth)):
            if k < self.depth - 1:
                b, hh, ww, ch = h.shape
                h = jax.image.resize(h, (b, hh * 2, ww * 2, ch), "nearest")
            h = jnp.concatenate([h, skips[k]], axis=-1)
            h = _FiLMResBlock(self.width * 2**k, name=f"up_{k}")(h, c)
        h = nn.silu(nn.GroupNorm(num_groups=min(8, self.width), name="norm_out")(h))
        return nn.Conv(x.shape[-1], (3, 3), name="conv_out", kernel_init=nn.initializers.zeros)(h)


class UNetDenoiser(nn.Module):
    """diffusers ``FlaxUNet2DConditionModel`` conditioned on two cross-attention tokens ``[e_y, e_a]``.

    With ``attention=False`` the blocks are plain ``DownBlock2D`` / ``UpBlock2D`` (no mid
    block) and the condition is added to the input as a learned per-channel bias map instead.
    """

    num_classes: int
    num_attributes: int
    image_size: int
    channels: int = 3
    block_out_channels: Sequence[int] = (32, 64)
    layers_per_block: int = 1
    attention: bool = True
    embed_dim: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, a: jax.Array, train: bool = False) -> jax.Array:
        from diffusers import FlaxUNet2DConditionModel
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        n = len(self.block_out_channels)
        if self.attention:  # attention only below full resolution (the full-resolution one dominates the cost)
            down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
            up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
            mid = "UNetMidBlock2DCrossAttn"
        else:
            down, up, mid = ("DownBlock2D",) * n, ("UpBlock2D",) * n, None
        ey = nn.Embed(self.num_classes + 1, self.embed_dim, name="class_embed")(y)
        ea = nn.Embed(self.num_attributes + 1, self.embed_dim, name="attr_embed")(a)
        context = jnp.stack([ey, ea], axis=1)  # (B, 2, embed_dim)
        if not self.attention:
            bias = nn.Dense(self.channels, name="cond_bias")(nn.silu(ey + ea))
            x = x + bias[:, None, None, :]
        unet = FlaxUNet2DConditionModel(
            sample_size=self.image_size,
            in_channels=self.channels,
            out_channels=self.channels,
            down_block_types=down,
            up_block_types=up,
            mid_block_type=mid,
            block_out_channels=tuple(int(c) for c in self.block_out_channels),
            layers_per_block=self.layers_per_block,
            attention_head_dim=8,
            cross_attention_dim=self.embed_dim,
            name="unet",
        )
        out = unet(jnp.transpose(x, (0, 3, 1, 2)), jnp.asarray(t, jnp.int32), context, train=train).sample
        return jnp.transpose(out, (0, 2, 3, 1))


def create_denoiser(config: AugmentConfig, num_classes: int, num_attributes: int, channels: int) -> nn.Module:
    """The denoiser named by ``config.denoiser`` (``mlp``, ``conv`` or ``unet``).

    Raises:
      PrivDebiasError: unknown denoiser name or non-positive sizes.
    """
    if num_classes < 1 or num_attributes < 1 or channels < 1:
        raise PrivDebiasError(
            f"need positive num_classes, num_attributes and channels, got {num_classes}, {num_attributes}, {channels}"
        )
    if config.denoiser == "mlp":
        return MLPDenoiser(num_classes, num_attributes, config.width, config.depth, config.embed_dim)
    if config.denoiser == "factored":
        return FactoredDenoiser(num_classes, num_attributes, config.latent_dim, config.width, config.depth,
                                config.embed_dim, max(32, config.width // 4))
    if config.denoiser == "conv":
        return ConvDenoiser(num_classes, num_attributes, config.width, config.depth, config.embed_dim)
    if config.denoiser == "unet":
        return UNetDenoiser(
            num_classes, num_attributes, config.image_size, channels, tuple(config.unet_channels),
            config.unet_layers_per_block, config.unet_attention, config.embed_dim,
        )
    raise PrivDebiasError(f"unknown denoiser {config.denoiser!r}; expected mlp, factored, conv or unet")


__all__ = [
    "timestep_embedding",
    "ConditionEmbedding",
    "MLPDenoiser",
    "FactoredDenoiser",
    "ConvDenoiser",
    "UNetDenoiser",
    "create_denoiser",
]
