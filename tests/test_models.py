"""Tests of privdebias_jax.models against NumPy forward passes written out by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from privdebias_jax.models import (
    MLP,
    MODEL_DEFAULTS,
    ConvNet,
    ResNet,
    count_params,
    create_model,
    init_model,
)
from privdebias_jax.train import apply_model
from privdebias_jax.types import PrivDebiasError

#: feature (bottleneck) width of every registry model, as documented in models/__init__.py
DOCUMENTED_FEATURES = {
    "mlp": 100,
    "tabular_mlp": 32,
    "simple_conv": 128,
    "small_cnn": 128,
    "resnet": 64,
}
IMAGE = (8, 8, 3)


def _np(v):
    return np.asarray(v, np.float64)


def _relu(v):
    return np.maximum(v, 0.0)


def conv2d_same(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """NumPy 'SAME' convolution (TensorFlow/XLA padding rule), NHWC × HWIO, loops over taps."""
    n, h, w, _ = x.shape
    kh, kw, _, cout = kernel.shape
    out_h, out_w = -(-h // stride), -(-w // stride)
    pad_h = max((out_h - 1) * stride + kh - h, 0)
    pad_w = max((out_w - 1) * stride + kw - w, 0)
    xp = np.pad(
        x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    )
    out = np.zeros((n, out_h, out_w, cout))
    for di in range(kh):
        for dj in range(kw):
            patch = xp[:, di : di + stride * out_h : stride, dj : dj + stride * out_w : stride, :]
            out += patch @ kernel[di, dj]
    return out


def _images(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *IMAGE)).astype(np.float32)


# ------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    # the ResNet takes ~30 s to compile on 2 CPU cores: it runs in the full suite only
    [pytest.param(n, marks=pytest.mark.slow) if n == "resnet" else n for n in sorted(MODEL_DEFAULTS)],
)
def test_registry_models_logits_features_and_head(name):
    assert set(MODEL_DEFAULTS) == set(DOCUMENTED_FEATURES)
    model = create_model(name, 7)
    shape = (5,) if name == "tabular_mlp" else IMAGE
    x = np.random.default_rng(1).random((3, *shape)).astype(np.float32)
    params, state = init_model(model, jax.random.key(0), shape)
    logits, feats, new_state = apply_model(model, params, state, jnp.asarray(x))
    assert logits.shape == (3, 7)
    assert feats.shape == (3, DOCUMENTED_FEATURES[name])
    assert new_state is state  # evaluation mode does not touch the model state
    # every model ends with a linear layer called `head` on the features
    head = params["head"]
    np.testing.assert_allclose(
        _np(logits), _np(feats) @ _np(head["kernel"]) + _np(head["bias"]), rtol=1e-5, atol=1e-5
    )
    assert np.all(np.isfinite(np.asarray(logits)))
    # a different init key gives different parameters
    params2, _ = init_model(model, jax.random.key(1), shape)
    assert not np.allclose(params["head"]["kernel"], params2["head"]["kernel"])


def test_registry_classes_and_defaults():
    assert isinstance(create_model("mlp", 10), MLP) and create_model("mlp", 10).hidden == (
        100,
        100,
        100,
    )
    assert isinstance(create_model("simple_conv", 10), ConvNet)
    assert create_model("simple_conv", 10).kernel_size == 7
    assert create_model("small_cnn", 10).strides == (1, 2, 2, 2)
    assert isinstance(create_model("resnet", 10), ResNet)
    # overrides win; lists become tuples (hashable modules for static jit arguments)
    m = create_model("mlp", 3, hidden=[8, 4])
    assert m.hidden == (8, 4) and m.num_classes == 3
    hash(m)


def test_create_model_errors():
    with pytest.raises(PrivDebiasError, match=r"unknown model 'vgg'.*mlp"):
        create_model("vgg", 10)
    with pytest.raises(PrivDebiasError, match=r"no option\(s\) \['depth'\]"):
        create_model("mlp", 10, depth=3)
    with pytest.raises(PrivDebiasError, match="num_classes"):
        create_model("mlp", 0)


def test_create_model_rejects_inconsistent_conv_options_early():
    with pytest.raises(PrivDebiasError):
        create_model("small_cnn", 10, widths=(4, 8))  # default strides have 4 entries


# ------------------------------------------------------------------------------------------
# MLP against a NumPy forward pass
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [(16,), (12, 6)])
def test_mlp_matches_numpy_forward_pass(hidden):
    model = create_model("mlp", 10, hidden=hidden)
    params, state = init_model(model, jax.random.key(3), IMAGE)
    assert state == {}
    x = _images(6)
    logits, feats = model.apply({"params": params}, jnp.asarray(x))
    h = _np(x).reshape(6, -1)
    for i in range(len(hidden)):
        layer = params[f"dense_{i}"]
        h = _relu(h @ _np(layer["kernel"]) + _np(layer["bias"]))
    ref_logits = h @ _np(params["head"]["kernel"]) + _np(params["head"]["bias"])
    np.testing.assert_allclose(_np(feats), h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_np(logits), ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [(16,), (100, 100, 100), (64, 32)])
def test_mlp_param_count_formula(hidden):
    d = int(np.prod(IMAGE))
    widths = [d, *hidden, 10]
    expected = sum(i * o + o for i, o in zip(widths[:-1], widths[1:], strict=True))
    params, _ = init_model(create_model("mlp", 10, hidden=hidden), jax.random.key(0), IMAGE)
    assert count_params(params) == expected
    shapes = {k: v["kernel"].shape for k, v in params.items()}
    assert shapes["head"] == (hidden[-1], 10)


def test_mlp_dropout_masks_and_rescales_features():
    rate = 0.5
    model = create_model("mlp", 10, hidden=(64,), dropout=rate)
    params, _ = init_model(model, jax.random.key(0), IMAGE)
    x = jnp.asarray(_images(4))
    _, f_eval, _ = apply_model(model, params, {}, x, train=False)
    _, f_a, _ = apply_model(model, params, {}, x, train=True, key=jax.random.key(1))
    _, f_b, _ = apply_model(model, params, {}, x, train=True, key=jax.random.key(1))
    _, f_c, _ = apply_model(model, params, {}, x, train=True, key=jax.random.key(2))
    f_eval, f_a = _np(f_eval), _np(f_a)
    kept = f_a != 0
    # inverted dropout: kept units are scaled by 1 / (1 − rate), the rest are zero
    np.testing.assert_allclose(f_a[kept], f_eval[kept] / (1 - rate), rtol=1e-5)
    live = f_eval > 0
    assert 0.3 < kept[live].mean() < 0.7
    np.testing.assert_array_equal(f_a, _np(f_b))  # same key → same mask
    assert not np.array_equal(f_a, _np(f_c))


# ------------------------------------------------------------------------------------------
# ConvNet against NumPy convolutions
# ------------------------------------------------------------------------------------------


def test_small_cnn_matches_numpy_forward_pass():
    model = create_model("small_cnn", 10, widths=(4, 8), strides=(1, 2))
    params, state = init_model(model, jax.random.key(2), IMAGE)
    assert state == {}
    x = _images(3)
    logits, feats, _ = apply_model(model, params, state, jnp.asarray(x))
    h = _np(x)
    for i, stride in enumerate((1, 2)):
        conv = params[f"conv_{i}"]
        h = _relu(conv2d_same(h, _np(conv["kernel"]), stride) + _np(conv["bias"]))
    assert h.shape == (3, 4, 4, 8)
    ref_feats = h.mean(axis=(1, 2))
    np.testing.assert_allclose(_np(feats), ref_feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        _np(logits),
        ref_feats @ _np(params["head"]["kernel"]) + _np(params["head"]["bias"]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_batch_norm_stats_update_in_train_mode():
    model = create_model("simple_conv", 10, widths=(4, 8), strides=(1, 2), kernel_size=3)
    params, state = init_model(model, jax.random.key(0), IMAGE)
    assert set(state) == {"batch_stats"}
    stats = state["batch_stats"]
    np.testing.assert_array_equal(stats["norm_0"]["mean"], np.zeros(4))
    np.testing.assert_array_equal(stats["norm_0"]["var"], np.ones(4))
    assert "bias" not in params["conv_0"]  # conv bias is redundant before batch norm
    x = _images(6, seed=4)
    _, _, new_state = apply_model(model, params, state, jnp.asarray(x), train=True)
    new = new_state["batch_stats"]
    for layer in ("norm_0", "norm_1"):
        assert not np.allclose(new[layer]["mean"], stats[layer]["mean"])
    # first layer: running stats = 0.9 · old + 0.1 · batch statistics of the conv output
    pre = conv2d_same(_np(x), _np(params["conv_0"]["kernel"]), 1)
    np.testing.assert_allclose(
        _np(new["norm_0"]["mean"]), 0.1 * pre.mean(axis=(0, 1, 2)), atol=1e-6
    )
    np.testing.assert_allclose(
        _np(new["norm_0"]["var"]), 0.9 + 0.1 * pre.var(axis=(0, 1, 2)), rtol=1e-5
    )
    # evaluation mode leaves the state untouched and normalises with the running statistics
    lg1, _, same = apply_model(model, params, new_state, jnp.asarray(x), train=False)
    assert same is new_state
    lg2, _, _ = apply_model(model, params, state, jnp.asarray(x), train=False)
    assert not np.allclose(lg1, lg2)
