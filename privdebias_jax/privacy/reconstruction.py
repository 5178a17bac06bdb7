"""Reconstruction attack: decode a model's bottleneck features back into the input image.

The attack of seed paper 001 (Fig. 6): an adversary who sees the features ``h(x)`` of a
frozen model trains a decoder ``g`` on pairs ``(h(x), x)`` and reconstructs held-out inputs
``x̂ = g(h(x))``. If the reconstructions still show the private attribute (the colour of a
Colored- or Biased-MNIST digit), the representation leaks it even when the model's output
does not. Two numbers summarise the attack:

* ``mse = (1/(n D)) Σ_i ‖x̂_i − x_i‖²`` on held-out samples, beside ``mse_mean_image``, the
  error of the trivial decoder that outputs the mean training image (what a decoder reaches
  from features that carry no information, i.e. the average per-pixel variance);
* ``attribute_readability``: the accuracy of reading the attribute from the reconstructions,
  ``(1/n) Σ_i [colour(x̂_i) = a_i]``, beside ``chance`` (the frequency of the most common
  attribute value) and the reader's accuracy on the original images.

The decoder is a Flax MLP ``z → [Dense → ReLU]* → Dense(D) → sigmoid`` (linear output when the
images are not in ``[0, 1]``) on standardised features ``z = (h − μ_train) / σ_train``,
trained with Adam on the mean squared error: one jitted program that ``lax.scan``s over epochs
and, inside each, over shuffled fixed-shape batches (the last one padded and masked), all
randomness from an explicit key.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from privdebias_jax.data.dataset import Dataset
from privdebias_jax.data.mnist import PALETTE
from privdebias_jax.privacy.metrics import wilson_interval
from privdebias_jax.privacy.probe import split_rows
from privdebias_jax.report import save_image_grid
from privdebias_jax.train import predict
from privdebias_jax.types import ModelState, Params, PrivDebiasError, PRNGKey

#: ``colour_fn(images) -> attribute``: reads the private attribute of each image, ``(N,)`` ints.
ColourFn = Callable[[np.ndarray], np.ndarray]


class MLPDecoder(nn.Module):
    """``z → [Dense(w) → ReLU] for w in hidden → Dense(prod(image_shape)) → [sigmoid] → reshape``.

    Attributes:
      image_shape: shape of one output sample, e.g. ``(28, 28, 3)``.
      hidden: widths of the hidden layers (may be empty: a linear decoder).
      sigmoid_output: squash the output into ``(0, 1)`` (for images in ``[0, 1]``).
    """

    image_shape: tuple[int, ...]
    hidden: Sequence[int] = (256,)
    sigmoid_output: bool = True

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        h = z
        for i, width in enumerate(self.hidden):
            h = nn.relu(nn.Dense(int(width), name=f"dense_{i}")(h))
        out = nn.Dense(int(np.prod(self.image_shape)), name="out")(h)
        if self.sigmoid_output:
            out = nn.sigmoid(out)
        return out.reshape((z.shape[0], *self.image_shape))


class DecoderFit(NamedTuple):
    """What :func:`train_decoder` returns: the module, its parameters and the per-epoch mean
    training MSE. ``params = {"net": flax params, "feature_mean": μ, "feature_scale": σ}``."""

    decoder: MLPDecoder
    params: dict[str, Any]
    history: np.ndarray


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _check_array(x: Any, name: str, min_ndim: int = 2) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim < min_ndim:
        raise PrivDebiasError(
            f"`{name}` must have at least {min_ndim} dimensions (samples first), got shape {arr.shape}"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise PrivDebiasError(f"`{name}` must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    if bad.any():
        raise PrivDebiasError(
            f"`{name}` hold NaN or inf in {int(bad.sum())} of {arr.shape[0]} samples"
        )
    return arr


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("decoder", "tx", "epochs", "batch_size"))
def _train(
    decoder: MLPDecoder,
    tx: optax.GradientTransformation,
    params: Params,
    z: jax.Array,
    x: jax.Array,
    key: PRNGKey,
    epochs: int,
    batch_size: int,
):
    n = z.shape[0]
    nb = -(-n // batch_size)
    total = nb * batch_size
    mask = (jnp.arange(total) < n).astype(jnp.float32).reshape(nb, batch_size)

    def batch_loss(p, rows, m):
        pred = decoder.apply({"params": p}, z[rows])
        per_sample = jnp.mean((pred - x[rows]) ** 2, axis=tuple(range(1, pred.ndim)))
        return jnp.sum(per_sample * m) / jnp.maximum(jnp.sum(m), 1.0)

    def step(carry, batch):
        p, opt_state = carry
        rows, m = batch
        loss, grads = jax.value_and_grad(batch_loss)(p, rows, m)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss * jnp.sum(m)

    def epoch(carry, e):
        perm = jax.random.permutation(jax.random.fold_in(key, e), n)
        rows = jnp.concatenate([perm, perm[: total - n]]).reshape(nb, batch_size)
        carry, sums = jax.lax.scan(step, carry, (rows, mask))
        return carry, jnp.sum(sums) / n

    (params, _), history = jax.lax.scan(epoch, (params, tx.init(params)), jnp.arange(epochs))
    return params, history


def train_decoder(
    features: Any,
    images: Any,
    *,
    key: PRNGKey,
    hidden: Sequence[int] = (256,),
    epochs: int = 60,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    sigmoid_output: bool | None = None,
) -> DecoderFit:
    """Train an MLP decoder ``g`` from features to inputs by minimising the mean squared error.

    ``min_θ (1/n) Σ_i (1/D) ‖g_θ((h_i − μ)/σ) − x_i‖²`` with Adam (``learning_rate``, decoupled
    ``weight_decay`` via AdamW when positive), ``epochs`` passes over shuffled batches of
    ``batch_size`` (epoch ``e`` shuffles with ``fold_in(key_train, e)``; the last batch is padded
    and masked), everything in one jitted ``lax.scan``. ``μ, σ``: training mean and standard
    deviation of the features (``σ = 1`` for constant features). ``sigmoid_output`` defaults to
    true exactly when every target value lies in ``[0, 1]``. The reconstruction attack of seed
    paper 001 (Fig. 6).

    Raises:
      PrivDebiasError: ``features`` not 2-D or ``images`` without a sample axis, lengths that
        differ, NaN / inf values, fewer than 2 samples, non-positive ``epochs`` or
        ``batch_size``, a non-positive learning rate or a negative weight decay.
    """
    h = _check_array(features, "features")
    if h.ndim != 2:
        raise PrivDebiasError(f"`features` must be 2-D (samples × features), got shape {h.shape}")
    x = _check_array(images, "images")
    if x.shape[0] != h.shape[0]:
        raise PrivDebiasError(
            f"`features` and `images` lengths differ: {h.shape[0]} vs {x.shape[0]}"
        )
    n = h.shape[0]
    if n < 2:
        raise PrivDebiasError(f"the decoder needs at least 2 training samples, got {n}")
    if int(epochs) < 1 or int(batch_size) < 1:
        raise PrivDebiasError(
            f"epochs and batch_size must be positive, got {epochs} and {batch_size}"
        )
    if not float(learning_rate) > 0:
        raise PrivDebiasError(f"learning_rate must be positive, got {learning_rate}")
    if float(weight_decay) < 0:
        raise PrivDebiasError(f"weight_decay must be non-negative, got {weight_decay}")
    if any(int(w) < 1 for w in hidden):
        raise PrivDebiasError(f"hidden widths must be positive, got {tuple(hidden)}")
    if sigmoid_output is None:
        sigmoid_output = bool(x.min() >= 0.0 and x.max() <= 1.0)
    mean = h.mean(axis=0)
    scale = h.std(axis=0)
    scale = np.where(scale > 1e-8 * np.maximum(1.0, np.abs(mean)), scale, 1.0).astype(np.float32)
    z = (h - mean) / scale
    decoder = MLPDecoder(
        image_shape=tuple(int(d) for d in x.shape[1:]),
        hidden=tuple(int(w) for w in hidden),
        sigmoid_output=bool(sigmoid_output),
    )
    k_init, k_train = jax.random.split(key)
    net = decoder.init(k_init, jnp.zeros((1, h.shape[1]), jnp.float32))["params"]
    if float(weight_decay) > 0:
        tx = optax.adamw(float(learning_rate), weight_decay=float(weight_decay))
    else:
        tx = optax.adam(float(learning_rate))
    net, history = _train(
        decoder,
        tx,
        net,
        jnp.asarray(z),
        jnp.asarray(x),
        k_train,
        int(epochs),
        min(int(batch_size), n),
    )
    history = np.asarray(history)
    if not np.all(np.isfinite(history)):
        raise PrivDebiasError(
            "decoder training diverged (the loss became NaN or inf); lower the learning rate"
        )
    params = {"net": net, "feature_mean": jnp.asarray(mean), "feature_scale": jnp.asarray(scale)}
    return DecoderFit(decoder, params, history)


@functools.partial(jax.jit, static_argnames=("decoder",))
def _decode(decoder: MLPDecoder, params: dict[str, Any], h: jax.Array) -> jax.Array:
    z = (h - params["feature_mean"]) / params["feature_scale"]
    return decoder.apply({"params": params["net"]}, z)


def reconstruct(
    decoder: MLPDecoder, params: dict[str, Any], features: Any, batch_size: int = 1000
) -> np.ndarray:
    """``x̂ = g((h − μ)/σ)``: the decoder's reconstructions of ``features``, as NumPy.

    Fixed-shape batches of ``batch_size`` (the last padded), so it compiles once per size.

    Raises:
      PrivDebiasError: for features that are not 2-D, hold NaN / inf, or have a width the
        decoder was not trained on.
    """
    h = _check_array(features, "features")
    if h.ndim != 2:
        raise PrivDebiasError(f"`features` must be 2-D (samples × features), got shape {h.shape}")
    width = int(np.shape(params["feature_mean"])[0])
    if h.shape[1] != width:
        raise PrivDebiasError(f"the decoder was trained on {width} features, got {h.shape[1]}")
    n = h.shape[0]
    if n == 0:
        return np.zeros((0, *decoder.image_shape), np.float32)
    bs = min(int(batch_size), n)
    out = []
    for start in range(0, n, bs):
        chunk = h[start : start + bs]
        real = chunk.shape[0]
        if real < bs:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], bs - real, 0)])
        out.append(np.asarray(_decode(decoder, params, jnp.asarray(chunk)))[:real])
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------
# reading the colour
# ------------------------------------------------------------------------------------------


def read_palette_colour(
    images: Any, palette: Any = PALETTE, bright_fraction: float = 0.5
) -> np.ndarray:
    """The palette index of each RGB image's colour: the default ``colour_fn`` for
    Colored-MNIST (coloured strokes) and Biased-MNIST (coloured background).

    Per pixel, the chroma ``c = x − min_channel(x)`` removes the grey part (black and white
    pixels have ``c = 0``): a Colored-MNIST stroke ``g · p_a`` gives ``g · p_a``, a Biased-MNIST
    background ``g + (1 − g) p_a`` gives ``(1 − g) p_a`` (every palette colour has minimum
    channel 0). The *bright* pixels are those with ``max(c) ≥ bright_fraction · max over the
    image``; their mean chroma ``m`` is scaled to maximum channel 1 and matched to the nearest
    palette colour (Euclidean, palette rows scaled the same way). An image with no colour at all
    reads as palette index 0. Values are clipped to ``[0, 1]`` first (decoder outputs may
    overshoot).

    Raises:
      PrivDebiasError: for images that are not ``(N, H, W, 3)`` (or ``(N, D, 3)``), NaN values,
        a palette that is not ``(K, 3)`` or a ``bright_fraction`` outside ``[0, 1)``.
    """
    x = np.asarray(images, np.float32)
    if x.ndim < 3 or x.shape[-1] != 3:
        raise PrivDebiasError(
            f"reading a colour needs RGB images (N, H, W, 3), got shape {x.shape}"
        )
    if np.isnan(x).any():
        raise PrivDebiasError("images hold NaN values")
    pal = np.asarray(palette, np.float32)
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] < 1:
        raise PrivDebiasError(f"palette must be (K, 3), got shape {pal.shape}")
    if not 0.0 <= float(bright_fraction) < 1.0:
        raise PrivDebiasError(f"bright_fraction must be in [0, 1), got {bright_fraction}")
    x = np.clip(x, 0.0, 1.0).reshape(x.shape[0], -1, 3)
    chroma = x - x.min(axis=-1, keepdims=True)
    strength = chroma.max(axis=-1)  # (N, P)
    peak = strength.max(axis=1, keepdims=True)
    bright = (strength >= float(bright_fraction) * peak) & (peak > 0)
    weight = bright.astype(np.float32)
    mean = (chroma * weight[..., None]).sum(1) / np.maximum(weight.sum(1, keepdims=True), 1.0)
    mean = mean / np.maximum(mean.max(axis=-1, keepdims=True), 1e-12)
    pal_chroma = pal - pal.min(axis=-1, keepdims=True)
    pal_chroma = pal_chroma / np.maximum(pal_chroma.max(axis=-1, keepdims=True), 1e-12)
    dist = ((mean[:, None, :] - pal_chroma[None, :, :]) ** 2).sum(-1)
    return np.argmin(dist, axis=1).astype(np.int32)


# ------------------------------------------------------------------------------------------
# the attack
# ------------------------------------------------------------------------------------------


def reconstruction_attack(
    model: nn.Module,
    params: Params,
    model_state: ModelState,
    dataset: Dataset,
    *,
    key: PRNGKey,
    colour_fn: ColourFn | None = None,
    num_attributes: int | None = None,
    test_fraction: float = 0.3,
    hidden: Sequence[int] = (256,),
    epochs: int = 60,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    level: float = 0.95,
    num_examples: int = 0,
    feature_batch_size: int = 500,
) -> dict[str, Any]:
    """The reconstruction attack of seed paper 001 (Fig. 6) on a trained model.

    1. ``h = predict(model, params, model_state, dataset)[1]`` (bottleneck features);
    2. split the samples by ``key`` (``test_fraction`` held out), :func:`train_decoder` on the
       rest, reconstruct the held-out ones;
    3. report ``mse = mean((x̂ − x)²)`` over held-out samples and pixels, ``mse_mean_image``
       (the mean training image as the reconstruction: the no-information baseline) and
       ``attribute_readability = mean(colour_fn(x̂) = a)`` with its Wilson interval
       (``ci_low``, ``ci_high``), ``chance`` (frequency of the most common held-out attribute
       value), ``chance_uniform = 1/num_attributes`` and ``reader_accuracy_on_originals =
       mean(colour_fn(x) = a)`` (how well the reader works on clean images).

    ``colour_fn(images) -> (N,) attribute`` reads the private attribute; by default
    :func:`read_palette_colour` (Colored-/Biased-MNIST, ``num_attributes`` defaults to the
    palette size, 10). With ``num_examples > 0`` the result also holds ``examples =
    {"originals", "reconstructions"}`` (NumPy arrays of the first held-out samples, for
    :func:`save_reconstruction_grid`; drop them before writing JSON). Everything else is
    JSON-ready.

    Raises:
      PrivDebiasError: a dataset that is not a :class:`Dataset`, has fewer than 10 samples, has
        NaN features, or (without ``colour_fn``) is not RGB images; a ``colour_fn`` that returns
        the wrong shape; a bad ``test_fraction``.
    """
    if not isinstance(dataset, Dataset):
        raise PrivDebiasError(
            f"reconstruction_attack expects a Dataset, got {type(dataset).__name__}"
        )
    n = len(dataset)
    if n < 10:
        raise PrivDebiasError(
            f"too few samples for a reconstruction attack: {n} (need at least 10)"
        )
    x = _check_array(dataset.x, "dataset.x")
    a = np.asarray(dataset.a)
    if a.ndim != 1 or a.shape[0] != n:
        raise PrivDebiasError(
            f"dataset.a must be 1-D with one value per sample, got shape {a.shape}"
        )
    if colour_fn is None:
        if x.ndim < 3 or x.shape[-1] != 3:
            raise PrivDebiasError(
                f"the default colour reader needs RGB images (N, H, W, 3), got shape {x.shape}; pass colour_fn"
            )
        colour_fn = read_palette_colour
        if num_attributes is None:
            num_attributes = int(PALETTE.shape[0])
    k_split, k_train = jax.random.split(key)
    tr, te = split_rows(n, test_fraction, k_split)
    _, feats = predict(model, params, model_state, dataset, batch_size=feature_batch_size)
    feats = np.asarray(feats).reshape(n, -1)
    if not np.all(np.isfinite(feats)):
        raise PrivDebiasError("the model's features hold NaN or inf values")
    fitted = train_decoder(
        feats[tr],
        x[tr],
        key=k_train,
        hidden=hidden,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
    )
    recon = reconstruct(fitted.decoder, fitted.params, feats[te])
    x_te, a_te = x[te], a[te]

    def read(images: np.ndarray) -> np.ndarray:
        out = np.asarray(colour_fn(images)).reshape(-1)
        if out.shape[0] != images.shape[0]:
            raise PrivDebiasError(
                f"colour_fn returned {out.shape[0]} values for {images.shape[0]} images"
            )
        return out

    read_recon, read_orig = read(recon), read(x_te)
    correct = int(np.sum(read_recon == a_te))
    lo, hi = wilson_interval(correct, te.size, level)
    _, counts = np.unique(a_te, return_counts=True)
    result: dict[str, Any] = {
        "mse": float(np.mean((recon - x_te) ** 2)),
        "mse_mean_image": float(np.mean((x[tr].mean(axis=0) - x_te) ** 2)),
        "train_mse_final": float(fitted.history[-1]),
        "attribute_readability": correct / te.size,
        "ci_low": lo,
        "ci_high": hi,
        "ci_level": float(level),
        "chance": float(counts.max() / te.size),
        "chance_uniform": None if num_attributes is None else 1.0 / int(num_attributes),
        "reader_accuracy_on_originals": float(np.mean(read_orig == a_te)),
        "n_train": int(tr.size),
        "n_test": int(te.size),
        "feature_dim": int(feats.shape[1]),
    }
    if int(num_examples) > 0:
        k = min(int(num_examples), te.size)
        result["examples"] = {"originals": x_te[:k], "reconstructions": recon[:k]}
    return result


def save_reconstruction_grid(
    originals: Any,
    reconstructions: Any,
    path: str | os.PathLike,
    *,
    max_images: int = 8,
    title: str | None = None,
) -> Path:
    """A PNG with the originals (top row) over their reconstructions (bottom row).

    Uses :func:`privdebias_jax.report.save_image_grid` (matplotlib Agg); values are clipped to
    ``[0, 1]``; at most ``max_images`` columns.

    Raises:
      PrivDebiasError: if the two arrays differ in shape, are empty, or are not images
        ``(N, H, W)`` / ``(N, H, W, 1 or 3)``.
    """
    o = np.asarray(originals, np.float32)
    r = np.asarray(reconstructions, np.float32)
    if o.shape != r.shape:
        raise PrivDebiasError(
            f"originals and reconstructions differ in shape: {o.shape} vs {r.shape}"
        )
    if o.ndim not in (3, 4) or (o.ndim == 4 and o.shape[-1] not in (1, 3)):
        raise PrivDebiasError(f"expected images (N, H, W) or (N, H, W, 1|3), got shape {o.shape}")
    if o.shape[0] == 0 or int(max_images) < 1:
        raise PrivDebiasError("no images to draw")
    k = min(int(max_images), o.shape[0])
    grid = np.concatenate([o[:k], r[:k]])
    return save_image_grid(
        grid, path, rows=2, cols=k, row_labels=["original", "reconstruction"], title=title
    )


__all__ = [
    "ColourFn",
    "MLPDecoder",
    "DecoderFit",
    "train_decoder",
    "reconstruct",
    "read_palette_colour",
    "reconstruction_attack",
    "save_reconstruction_grid",
]
