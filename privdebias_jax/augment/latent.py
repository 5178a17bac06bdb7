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

import functools
from typing import Any

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


def _whitened_pca(rows: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, basis, scale, z)``: the top ``components`` principal directions of ``rows``
    ``(n, d)`` (an SVD), each component's standard deviation (≥ 1e-6) and the whitened scores."""
    mean = rows.mean(axis=0)
    _, sv, vt = np.linalg.svd(rows - mean, full_matrices=False)
    basis = vt[:components].T
    scale = np.maximum(sv[:components] / np.sqrt(rows.shape[0]), 1e-6)
    return mean, basis, scale, ((rows - mean) @ basis) / scale


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
    mean, basis, scale, z = _whitened_pca(rows, int(components))
    return PCACodec(mean=jnp.asarray(mean, jnp.float32), basis=jnp.asarray(basis, jnp.float32),
                    scale=jnp.asarray(scale, jnp.float32), image_shape=(h, w, c), clip=float(1.2 * np.abs(z).max()))


def encode(codec: PCACodec | ColourCodec, x: jax.Array) -> jax.Array:
    """Images ``(B, H, W, C)`` → latents ``(B, latent_dim)`` (either codec)."""
    if isinstance(codec, ColourCodec):
        return _encode_colour(codec, x)
    b = x.shape[0]
    h, w, c = codec.image_shape
    rows = jnp.transpose(x, (0, 3, 1, 2)).reshape(b, c, h * w)
    z = ((rows - codec.mean) @ codec.basis) / codec.scale
    return z.reshape(b, -1)


def decode(codec: PCACodec | ColourCodec, z: jax.Array) -> jax.Array:
    """Latents ``(B, latent_dim)`` → images ``(B, H, W, C)`` in ``[−1, 1]`` (differentiable; either codec)."""
    if isinstance(codec, ColourCodec):
        return _decode_colour(codec, z)
    b = z.shape[0]
    h, w, c = codec.image_shape
    k = codec.basis.shape[1]
    rows = (z.reshape(b, c, k) * codec.scale) @ codec.basis.T + codec.mean
    return jnp.transpose(rows.reshape(b, c, h, w), (0, 2, 3, 1))




# ---------------------------------------------------------------------------- colour latent
COLOUR_MODES = ("foreground", "background")


class ColourCodec(struct.PyTreeNode):
    """A latent that factors an image into a grey *shape* and one RGB *colour*.

    Images made of one grey shape ``g ∈ [0, 1]^{H×W}`` and one colour ``c ∈ [0, 1]³`` (the
    embedded Colored-MNIST, ``x = g · c``, and Biased-MNIST, ``x = g + (1 − g) · c``; see
    :mod:`privdebias_jax.data.mnist`) are encoded as ``z = [z_g, z_c]``:

        z_g = ((2g − 1 − μ) · V) / s        (the whitened PCA of the shape, ``k`` numbers)
        z_c = (c − m) / σ                    (the standardised colour, 3 numbers)

    with the shape read back from the image (``g = max_ch x`` for strokes, ``min_ch x`` for
    backgrounds: exact when the colour's largest channel is 1 and its smallest 0) and the colour
    by least squares over the pixels (``c = Σ x g / Σ g²``; ``c = Σ (x − g)(1 − g) / Σ (1 − g)²``).
    Decoding composes them again, with the shape and the colour clipped to ``[0, 1]`` so that
    every latent decodes to a valid image (differentiable almost everywhere).

    Shape and colour live in separate coordinates, so a denoiser can generate them from
    separate conditions (:class:`~privdebias_jax.augment.denoiser.FactoredDenoiser`: the shape
    from the class, the colour from the attribute) and compose a (class, colour) cell that the
    data almost never shows from a shape and a colour each seen hundreds of times.

    ``mode`` is ``foreground`` or ``background``; ``clip`` the largest ``|z|`` seen × 1.2.
    """

    mean: jax.Array
    basis: jax.Array
    scale: jax.Array
    colour_mean: jax.Array
    colour_scale: jax.Array
    image_shape: tuple[int, int, int] = struct.field(pytree_node=False)
    mode: str = struct.field(pytree_node=False)
    clip: float = struct.field(pytree_node=False)

    @property
    def latent_dim(self) -> int:
        """``k + 3``."""
        return int(self.basis.shape[1] + 3)

    @property
    def shape_dim(self) -> int:
        """``k``: the first ``k`` latent coordinates are the shape, the last 3 the colour."""
        return int(self.basis.shape[1])


def _colour_given_shape(x01: Any, g: Any, mode: str, xp: Any = jnp) -> Any:
    """Least-squares colour ``(B, 3)`` of images ``x01`` in ``[0, 1]`` given their shape ``g``:
    ``Σ x g / Σ g²`` (strokes) or ``Σ (x − g)(1 − g) / Σ (1 − g)²`` (backgrounds)."""
    if mode == "foreground":
        num = xp.einsum("bhwc,bhw->bc", x01, g)
        den = xp.sum(g * g, axis=(1, 2))[:, None]
    else:
        w = 1.0 - g
        num = xp.einsum("bhwc,bhw->bc", x01 - g[..., None], w)
        den = xp.sum(w * w, axis=(1, 2))[:, None]
    return num / xp.maximum(den, 1e-6)


def _shape_and_colour(x01: Any, mode: str, xp: Any = jnp) -> tuple[Any, Any]:
    """Grey shape ``(B, H, W)`` (channel max for strokes, min for backgrounds) and least-squares
    colour ``(B, 3)`` of images in ``[0, 1]``."""
    g = xp.max(x01, axis=-1) if mode == "foreground" else xp.min(x01, axis=-1)
    return g, _colour_given_shape(x01, g, mode, xp)


def _compose(g: Any, colour: Any, mode: str) -> Any:
    """``g · c`` (foreground) or ``g + (1 − g) · c`` (background), images in ``[0, 1]``."""
    g = g[..., None]
    c = colour[:, None, None, :]
    return g * c if mode == "foreground" else g + (1.0 - g) * c


def colour_mode_error(x01: np.ndarray, mode: str) -> float:
    """Mean absolute error of re-composing images ``(N, H, W, 3)`` in ``[0, 1]`` from their
    shape and colour under ``mode`` (0 for data made exactly that way)."""
    g, c = _shape_and_colour(np.asarray(x01, np.float64), mode, np)
    return float(np.abs(_compose(g, c, mode) - x01).mean())


def fit_colour_codec(x: np.ndarray, components: int, mode: str = "auto", tolerance: float = 0.02) -> ColourCodec:
    """Fit the shape PCA and the colour standardisation on images ``x`` ``(N, H, W, 3)`` in the
    diffusion scale ``[−1, 1]``.

    ``mode="auto"`` picks the composition (``foreground``/``background``) that re-composes the
    images best.

    Raises:
      PrivDebiasError: ``x`` not ``(N, H, W, 3)``, ``components`` outside ``[1, H·W]``, an
        unknown mode, or images that are not one grey shape and one colour (re-composition
        error above ``tolerance`` in ``[0, 1]`` units: use ``latent="pca"`` for such data).
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise PrivDebiasError(f"the colour latent needs RGB images (N, H, W, 3), got shape {x.shape}")
    n, h, w, _ = x.shape
    if not 1 <= int(components) <= h * w:
        raise PrivDebiasError(f"latent_dim must be in [1, {h * w}] for {h}×{w} images, got {components}")
    if mode not in (*COLOUR_MODES, "auto"):
        raise PrivDebiasError(f"unknown colour mode {mode!r}; expected 'auto' or one of {COLOUR_MODES}")
    x01 = (x + 1.0) / 2.0
    errors = {m: colour_mode_error(x01, m) for m in COLOUR_MODES}
    if mode == "auto":
        mode = min(errors, key=errors.get)
    if errors[mode] > tolerance:
        raise PrivDebiasError(
            f"the colour latent needs images made of one grey shape and one colour; re-composing these "
            f"({mode}) leaves a mean error of {errors[mode]:.3g} > {tolerance}: use latent='pca' (denoiser='mlp')"
        )
    g, colour = _shape_and_colour(x01, mode, np)
    mean, basis, scale, zg = _whitened_pca((2.0 * g - 1.0).reshape(n, h * w), int(components))
    cm, cs = colour.mean(axis=0), np.maximum(colour.std(axis=0), 1e-3)
    z = np.concatenate([zg, (colour - cm) / cs], axis=1)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return ColourCodec(mean=f32(mean), basis=f32(basis), scale=f32(scale), colour_mean=f32(cm),
                       colour_scale=f32(cs), image_shape=(h, w, 3), mode=mode, clip=float(1.2 * np.abs(z).max()))


def _encode_colour(codec: ColourCodec, x: jax.Array) -> jax.Array:
    g, colour = _shape_and_colour((x + 1.0) / 2.0, codec.mode)
    return _latent_of(codec, g, colour)


def _latent_of(codec: ColourCodec, g: jax.Array, colour: jax.Array) -> jax.Array:
    b = g.shape[0]
    h, w, _ = codec.image_shape
    zg = (((2.0 * g - 1.0).reshape(b, h * w) - codec.mean) @ codec.basis) / codec.scale
    return jnp.concatenate([zg, (colour - codec.colour_mean) / codec.colour_scale], axis=1)


def project(codec: PCACodec | ColourCodec, z_ref: jax.Array, x: jax.Array) -> jax.Array:
    """The latent of images ``x`` ``(B, H, W, C)`` in ``[−1, 1]`` that are *near* the decoded
    ``z_ref`` (e.g. after a guidance step on the decoded image).

    PCA codec: :func:`encode` (the exact least-squares latent). Colour codec: the shape is
    fitted by least squares *given the colour of* ``z_ref`` (``g = Σ_ch x c / Σ c²`` for
    strokes, ``g = Σ_ch (x − c)(1 − c) / Σ (1 − c)²`` for backgrounds, clipped to ``[0, 1]``),
    then the colour given that shape. Reading the shape as ``max_ch x`` instead, as
    :func:`encode` does for clean images, turns a small change spread over the background into
    stroke pixels.
    """
    if not isinstance(codec, ColourCodec):
        return encode(codec, x)
    k = codec.shape_dim
    c0 = jnp.clip(z_ref[:, k:] * codec.colour_scale + codec.colour_mean, 0.0, 1.0)[:, None, None, :]
    x01 = (x + 1.0) / 2.0
    if codec.mode == "foreground":
        g = jnp.sum(x01 * c0, axis=-1) / jnp.maximum(jnp.sum(c0 * c0, axis=-1), 1e-6)
    else:
        g = jnp.sum((x01 - c0) * (1.0 - c0), axis=-1) / jnp.maximum(jnp.sum((1.0 - c0) ** 2, axis=-1), 1e-6)
    g = jnp.clip(g, 0.0, 1.0)
    return _latent_of(codec, g, _colour_given_shape(x01, g, codec.mode))


def project_routed(codec: ColourCodec, z_ref: jax.Array, x_shape: jax.Array, x_colour: jax.Array) -> jax.Array:
    """A latent whose shape comes from images ``x_shape`` and whose colour comes from images
    ``x_colour`` (both ``(B, H, W, 3)`` in ``[−1, 1]``, near ``decode(z_ref)``).

    The shape coordinates are those of :func:`project` ``(z_ref, x_shape)`` (least-squares shape
    given ``z_ref``'s colour); the colour is fitted to ``x_colour`` by least squares *given
    z_ref's shape* (``Σ x g / Σ g²`` for strokes), so a change of ``x_colour`` never reaches the
    shape. This is the projection of the routed guidance step (class term → shape, attribute
    term → colour), the guidance counterpart of ``p(x | y, a) = p(g | y) p(c | a)``.

    Raises:
      PrivDebiasError: a codec that is not a :class:`ColourCodec`.
    """
    if not isinstance(codec, ColourCodec):
        raise PrivDebiasError("routed guidance needs the shape/colour latent (latent='colour')")
    colour = _colour_given_shape((x_colour + 1.0) / 2.0, _decoded_shape(codec, z_ref), codec.mode)
    zc = (colour - codec.colour_mean) / codec.colour_scale
    return jnp.concatenate([project(codec, z_ref, x_shape)[:, : codec.shape_dim], zc], axis=1)


def _decoded_shape(codec: ColourCodec, z: jax.Array) -> jax.Array:
    """The grey shape ``(B, H, W)`` in ``[0, 1]`` of latents ``z`` (PCA decode, clipped)."""
    b = z.shape[0]
    h, w, _ = codec.image_shape
    k = codec.shape_dim
    g = (((z[:, :k] * codec.scale) @ codec.basis.T + codec.mean).reshape(b, h, w) + 1.0) / 2.0
    return jnp.clip(g, 0.0, 1.0)


def _decode_colour(codec: ColourCodec, z: jax.Array) -> jax.Array:
    colour = z[:, codec.shape_dim :] * codec.colour_scale + codec.colour_mean
    # shape and colour are projected on [0, 1] before composing: every latent decodes to a valid
    # image, whatever a guidance step did to it
    return 2.0 * _compose(_decoded_shape(codec, z), jnp.clip(colour, 0.0, 1.0), codec.mode) - 1.0


__all__ = ["PCACodec", "ColourCodec", "COLOUR_MODES", "fit_pca_codec", "fit_colour_codec", "colour_mode_error",
           "encode", "decode", "project", "project_routed"]
