"""The im2col convolution against XLA's own ``lax.conv_general_dilated`` (the reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from privdebias_jax.models import create_model, init_model
from privdebias_jax.models.conv import (
    AUTO_MAX_PATCH_ELEMENTS,
    auto_conv,
    conv_function,
    conv_kwargs,
    hybrid_conv,
    im2col_conv,
    patch_elements,
)
from privdebias_jax.types import PrivDebiasError

DN = ("NHWC", "HWIO", "NHWC")


def _reference(x, k, strides, padding):
    dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
    return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn,
                                    precision=lax.Precision.HIGHEST)


def _ours(x, k, strides, padding):
    dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
    return im2col_conv(x, k, strides, padding, dimension_numbers=dn, precision=lax.Precision.HIGHEST)


def _hybrid(x, k, strides, padding):
    dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
    return hybrid_conv(x, k, strides, padding, dimension_numbers=dn, precision=lax.Precision.HIGHEST)


CASES = [
    ((2, 9, 9, 3), (3, 3, 3, 5), (1, 1), "SAME"),
    ((3, 7, 8, 2), (3, 3, 2, 4), (2, 2), "SAME"),
    ((2, 10, 11, 3), (5, 3, 3, 2), (2, 1), "VALID"),
    ((2, 8, 8, 3), (1, 1, 3, 7), (2, 2), "SAME"),
    ((1, 9, 9, 2), (2, 2, 2, 3), (3, 3), ((1, 0), (2, 1))),
]


@pytest.mark.parametrize("xs,ks,strides,padding", CASES)
def test_im2col_matches_xla_forward_gradients_and_hvp(xs, ks, strides, padding):
    kx, kk, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, xs, jnp.float32)
    k = jax.random.normal(kk, ks, jnp.float32)
    out_shape = jax.eval_shape(lambda: _reference(x, k, strides, padding)).shape
    c = jax.random.normal(kc, out_shape, jnp.float32)
    v = jax.random.normal(jax.random.key(3), ks, jnp.float32)

    @jax.jit
    def everything(x, k, v):
        # The output, reverse mode (input and kernel gradients) through a nonlinear scalar, and
        # forward-over-reverse in the kernel (the influence engine's HVP), for both convolutions.
        res = []
        for conv in (_ours, _hybrid, _reference):
            def scalar(x, k, conv=conv):
                return jnp.sum(jnp.tanh(conv(x, k, strides, padding)) * c)
            hv = jax.jvp(jax.grad(lambda kk, scalar=scalar: scalar(x, kk)), (k,), (v,))[1]
            res.append((conv(x, k, strides, padding), *jax.grad(scalar, argnums=(0, 1))(x, k), hv))
        return res

    *outs, ref = everything(x, k, v)
    for ours in outs:  # im2col, then the hybrid (XLA's value, im2col's derivatives)
        assert ours[0].shape == ref[0].shape
        np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(ours[1:3], ref[1:3], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ours[3], ref[3], rtol=1e-3, atol=1e-3)


def test_im2col_under_vmap_over_models_matches_xla():
    # vmap over stacked kernels (SISA shards, shadow models) and inputs.
    x = jax.random.normal(jax.random.key(1), (4, 2, 10, 10, 3))
    k = jax.random.normal(jax.random.key(2), (4, 3, 3, 3, 8))
    ref = jax.jit(jax.vmap(lambda a, b: _reference(a, b, (2, 2), "SAME")))(x, k)
    out = jax.jit(jax.vmap(lambda a, b: _ours(a, b, (2, 2), "SAME")))(x, k)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_layouts_fall_back_to_xla():
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 4))
    k = jax.random.normal(jax.random.key(2), (3, 3, 2, 6))  # feature groups of 2 channels
    dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
    grouped = im2col_conv(x, k, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2)
    np.testing.assert_allclose(
        grouped, lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=2),
        rtol=1e-6)
    k2 = jax.random.normal(jax.random.key(3), (3, 3, 4, 5))
    dilated = im2col_conv(x, k2, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn)
    np.testing.assert_allclose(
        dilated, lax.conv_general_dilated(x, k2, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=dn),
        rtol=1e-6)


@pytest.mark.parametrize("name", ["small_cnn"])
def test_models_give_the_same_outputs_and_gradients_with_either_convolution(name):
    x = jax.random.uniform(jax.random.key(4), (3, 10, 10, 3))
    y = jnp.array([0, 3, 9])
    models = {c: create_model(name, 10, conv=c) for c in ("xla", "im2col")}
    params, state = init_model(models["xla"], jax.random.key(0), (10, 10, 3))
    # The same parameter tree (names, shapes): checkpoints do not depend on the choice.
    shapes = jax.eval_shape(lambda: models["im2col"].init(jax.random.key(0), x[:1]))["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    assert [a.shape for a in jax.tree.leaves(shapes)] == [a.shape for a in jax.tree.leaves(params)]

    def loss(model):
        def f(p):
            logits, _ = model.apply({"params": p, **state}, x)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
        return f

    l_x, g_x = jax.jit(jax.value_and_grad(loss(models["xla"])))(params)
    l_i, g_i = jax.jit(jax.value_and_grad(loss(models["im2col"])))(params)
    np.testing.assert_allclose(l_i, l_x, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_i), jax.tree.leaves(g_x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_auto_resolution_and_bad_input():
    assert conv_function("xla", (3, 3)) is None
    assert conv_function("im2col", (7, 7)) is im2col_conv
    on_cpu = jax.default_backend() == "cpu"
    assert (conv_function("auto", (3, 3)) is auto_conv) == on_cpu
    assert conv_function("hybrid", (3, 3)) is hybrid_conv
    # auto_conv: im2col while the patch tensor is small, the hybrid (a custom_jvp) above.
    k = jnp.zeros((3, 3, 16, 32))
    small, large = (8, 14, 14, 16), (64, 28, 28, 16)
    assert patch_elements(small, k.shape, (2, 2)) == 8 * 7 * 7 * 9 * 16 <= AUTO_MAX_PATCH_ELEMENTS
    assert patch_elements(large, k.shape, (1, 1)) > AUTO_MAX_PATCH_ELEMENTS

    def traced(shape, s):
        x = jnp.zeros(shape)
        dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
        return str(jax.make_jaxpr(lambda a: auto_conv(a, k, (s, s), "SAME", dimension_numbers=dn))(x))

    assert "custom_jvp_call" not in traced(small, 2) and "dot_general" in traced(small, 2)
    assert "custom_jvp_call" in traced(large, 1)
    assert conv_function("auto", (7, 7)) is None  # 49 taps: the patch tensor would be 49× the input
    assert conv_kwargs("xla", (3, 3)) == {}
    with pytest.raises(PrivDebiasError, match="unknown convolution implementation 'fft'"):
        conv_function("fft", (3, 3))
    with pytest.raises(PrivDebiasError, match="unknown convolution implementation 'fft'"):
        create_model("small_cnn", 10, conv="fft")
    x = jnp.zeros((1, 2, 2, 3))
    k = jnp.zeros((3, 3, 3, 4))
    dn = lax.conv_dimension_numbers(x.shape, k.shape, DN)
    with pytest.raises(PrivDebiasError, match="does not fit"):
        im2col_conv(x, k, (1, 1), "VALID", dimension_numbers=dn)
    with pytest.raises(PrivDebiasError, match="channels"):
        im2col_conv(jnp.zeros((1, 5, 5, 2)), k, (1, 1), "SAME", dimension_numbers=dn)
