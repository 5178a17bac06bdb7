"""A per-channel PCA latent space for the CPU denoiser (the "small denoiser in a PCA latent").

Every colour channel of every training image is treated as one grey image of ``H·W`` pixels;
one spatial basis ``V`` (the top ``k`` principal directions of all those grey images, from an
SVD) and one mean image ``μ`` are shared by all channels. An image ``x`` ``(H, W, C)`` in
``[−1, 1]`` is encoded channel by channel and whitened,

    z_{c, j} = ((x_c − μ) · v_j) / s_j,        x̂_c = μ + Σ_j s_j z_{c, j} v_j,

with ``s_j`` the standard deviation of component ``j`` over the training channels, giving a
latent of ``C·k`` numbers of unit scale. Sharing the basis across channels keeps the code
symmetric in colour: a digit shape seen only in red is encoded by the same spatial
components in green, so a (class, colour) cell the data never shows is still representable,
which a PCA over whole RGB images (whose components tie shapes to the colours they were seen
in) would not guarantee. Decoding is linear, so gradients of classifiers on decoded images
flow back into the latent (KL guidance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from privdebias_jax.types import PrivDebiasError


class PCACodec(struct.PyTreeNode):
    """``mean`` ``(H·W,)``, ``basis`` ``(H·W, k)`` orthonormal columns, ``scale`` ``(k,)``,
    ``image_shape`` ``(H, W, C)`` and ``clip``: the largest ``|z|`` seen in training × 1.2
    (the sampler clips x̂₀ to ``[−clip, clip]``)."""

    mean: jax.Array
    basis: jax.Array
    scale: jax.Array
    image_shape: tuple[int, int, int] = struct.field(pytree_node=False)
    clip: float = struct.field(pytree_node=False)

    @property
    def latent_dim(self) -> int:
        """``C · k``."""
        return int(self.image_shape[2] * self.basis.shape[1])


def fit_pca_codec(x: np.ndarray, components: int) -> PCACodec:
    """Fit the shared per-channel PCA on images ``x`` ``(N, H, W, C)`` (diffusion scale).

    Raises:
      PrivDebiasError: ``x`` not 4-D, or ``components`` outside ``[1, H·W]``.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 4:
        raise PrivDebiasError(f"the PCA latent needs images (N, H, W, C), got shape {x.shape}")
    n, h, w, c = x.shape
    if not 1 <= int(components) <= h * w:
        raise PrivDebiasError(f"latent_dim must be in [1, {h * w}] for {h}×{w} images, got {components}")
    rows = x.transpose(0, 3, 1, 2).reshape(n * c, h * w)
    mean = rows.mean(axis=0)
    _, sv, vt = np.linalg.svd(rows - mean, full_matrices=False)
    basis = vt[: int(components)].T
    scale = sv[: int(components)] / np.sqrt(rows.shape[0])
    scale = np.maximum(scale, 1e-6)
    z = ((rows - mean) @ basis) / scale
    return PCACodec(mean=jnp.asarray(mean, jnp.float32), basis=jnp.asarray(basis, jnp.float32),
                    scale=jnp.asarray(scale, jnp.float32), image_shape=(h, w, c), clip=float(1.2 * np.abs(z).max()))


def encode(codec: PCACodec, x: jax.Array) -> jax.Array:
    """Images ``(B, H, W, C)`` → latents ``(B, C·k)``."""
    b = x.shape[0]
    h, w, c = codec.image_shape
    rows = jnp.transpose(x, (0, 3, 1, 2)).reshape(b, c, h * w)
    z = ((rows - codec.mean) @ codec.basis) / codec.scale
    return z.reshape(b, -1)


def decode(codec: PCACodec, z: jax.Array) -> jax.Array:
    """Latents ``(B, C·k)`` → images ``(B, H, W, C)`` (linear; differentiable)."""
    b = z.shape[0]
    h, w, c = codec.image_shape
    k = codec.basis.shape[1]
    rows = (z.reshape(b, c, k) * codec.scale) @ codec.basis.T + codec.mean
    return jnp.transpose(rows.reshape(b, c, h, w), (0, 2, 3, 1))


__all__ = ["PCACodec", "fit_pca_codec", "encode", "decode"]
