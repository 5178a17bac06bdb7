"""Convolutions as patches × matrix (im2col), a faster drop-in for XLA's CPU convolutions.

XLA's CPU backend runs a convolution's backward pass (the input and kernel gradients) and the
grouped convolutions that ``vmap`` over models produces slowly: on 2 cores the small CNN's
gradient at 14×14 costs 5–6 forward passes. Written as ``k_h·k_w`` shifted (strided) slices of
the padded input, concatenated on the channel axis and multiplied by the kernel reshaped to
``(k_h·k_w·C_in, C_out)``, every convolution, its transpose and its tangent become plain matrix
products and slices, which XLA's CPU matmuls run well (``benchmarks/hvp_cost.py`` and
``benchmarks/train_step.py`` carry the figures). The result is the same convolution: equal to
``lax.conv_general_dilated`` up to float32 summation order (tests check ≤ 1e-5 relative).
Once the patch tensor is large (28×28 images at batch 256) im2col's forward pass is slower than
XLA's direct convolution, so :func:`hybrid_conv` keeps XLA's convolution for the value and
im2col for every derivative (a ``jax.custom_jvp``), and the default :func:`auto_conv` picks per
layer from the traced shapes.

Used through flax's ``nn.Conv(..., conv_general_dilated=im2col_conv)``, so the parameters
(``kernel`` in HWIO, ``bias``) are exactly those of ``nn.Conv``: checkpoints, path filters and
influence subsets do not change with the implementation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from privdebias_jax.types import PrivDebiasError

#: ``auto``: on the CPU backend, for kernels of at most :data:`AUTO_MAX_KERNEL_AREA` taps,
#: :func:`auto_conv` (im2col, or :func:`hybrid_conv` for large patch tensors), XLA's own
#: convolution elsewhere; ``xla``: always ``lax.conv_general_dilated``; ``im2col``: always
#: :func:`im2col_conv`; ``hybrid``: always :func:`hybrid_conv`.
CONV_IMPLS = ("auto", "xla", "im2col", "hybrid")
#: Largest ``k_h·k_w`` that ``auto`` writes as im2col: the patch tensor is ``k_h·k_w`` times the
#: input, so 7×7 kernels (49×) are left to XLA.
AUTO_MAX_KERNEL_AREA = 9
#: Largest im2col patch tensor (elements) that ``auto`` computes with im2col in the forward
#: pass; above it ``auto`` uses :func:`hybrid_conv`. 2²¹ float32 = 8 MiB: the small CNN at
#: 14×14 with batch 256 stays below in every layer, at 28×28 its two first layers go above.
AUTO_MAX_PATCH_ELEMENTS = 2**21
_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(lhs_ndim: int, dimension_numbers: Any) -> bool:
    if dimension_numbers is None:
        return False
    if lhs_ndim != 4:
        return False
    expected = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == tuple(expected)
    return tuple(dimension_numbers) == _NHWC


def _conv_args_supported(lhs, dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count) -> bool:
    """NHWC/HWIO, no dilation, one feature group: what im2col handles (else XLA's convolution)."""
    dilated = any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
    return not dilated and feature_group_count == 1 and _is_nhwc(lhs.ndim, dimension_numbers)


def im2col_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """2-D convolution ``y[b, i, j, o] = Σ_{p, q, c} x_pad[b, s_h·i + p, s_w·j + q, c] · K[p, q, c, o]``
    computed as im2col: ``y = P · reshape(K, (k_h·k_w·C_in, C_out))`` with ``P`` the
    ``k_h·k_w`` strided slices of the padded input concatenated on the channel axis.

    Same signature as ``jax.lax.conv_general_dilated`` (what flax's ``nn.Conv`` calls); handles
    NHWC inputs with HWIO kernels, any strides and padding (``"SAME"``, ``"VALID"`` or explicit
    pairs). Anything else (dilation, feature groups, other layouts) is passed on to
    ``lax.conv_general_dilated`` unchanged, so the function is always a correct convolution.
    """
    if not _conv_args_supported(lhs, dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    return _im2col(lhs, rhs, tuple(int(v) for v in window_strides), _explicit_pads(lhs, rhs, window_strides, padding),
                   precision, preferred_element_type)


def _explicit_pads(lhs, rhs, window_strides, padding) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], tuple(int(v) for v in window_strides), padding)
    else:
        pads = padding
    return tuple((int(lo), int(hi)) for lo, hi in pads)


def _im2col(lhs, rhs, strides, pads, precision=None, preferred_element_type=None) -> jax.Array:
    """The NHWC/HWIO im2col convolution with explicit ``pads``."""
    kh, kw, cin, cout = rhs.shape
    if lhs.shape[-1] != cin:
        raise PrivDebiasError(f"im2col_conv: input has {lhs.shape[-1]} channels, kernel expects {cin}")
    sh, sw = strides
    x = jnp.pad(lhs, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    n, hp, wp, _ = x.shape
    ho = (hp - kh) // sh + 1
    wo = (wp - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise PrivDebiasError(f"im2col_conv: a {kh}×{kw} kernel does not fit the padded {hp}×{wp} input")
    if kh == kw == 1 and sh == sw == 1:
        patches = x
    else:
        cols = [
            lax.slice(x, (0, p, q, 0), (n, p + sh * (ho - 1) + 1, q + sw * (wo - 1) + 1, cin), (1, sh, sw, 1))
            for p in range(kh) for q in range(kw)
        ]
        patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    # One 2-D matrix product (rows = every output position of every image): its transpose and
    # tangent stay plain matrix products, which XLA's CPU backend handles best.
    out = jnp.dot(patches.reshape(n * ho * wo, kh * kw * cin), rhs.reshape(kh * kw * cin, cout),
                  precision=precision, preferred_element_type=preferred_element_type)
    return out.reshape(n, ho, wo, cout)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _hybrid(lhs, rhs, strides, pads, precision):
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    return lax.conv_general_dilated(lhs, rhs, strides, pads, dimension_numbers=dn, precision=precision)


def _hybrid_jvp(strides, pads, precision, primals, tangents):
    # The convolution is bilinear: d(x ⋆ K) = dx ⋆ K + x ⋆ dK, each term written as im2col so
    # that its transpose (the backward pass) and every higher derivative are slices and matmuls.
    x, k = primals
    dx, dk = tangents
    y = _hybrid(x, k, strides, pads, precision)
    dy = jnp.zeros_like(y)
    if not isinstance(dx, SymbolicZero):
        dy = dy + _im2col(dx, k, strides, pads, precision)
    if not isinstance(dk, SymbolicZero):
        dy = dy + _im2col(x, dk, strides, pads, precision)
    return y, dy


_hybrid.defjvp(_hybrid_jvp, symbolic_zeros=True)


def hybrid_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """XLA's convolution for the value, im2col for every derivative (a ``jax.custom_jvp``).

    The value is ``lax.conv_general_dilated`` (XLA's direct CPU convolution is the faster
    forward pass once im2col's patch tensor no longer fits in cache); the tangent
    ``dx ⋆ K + x ⋆ dK`` is computed by im2col, so the gradient (its transpose),
    Hessian-vector and Gauss-Newton products run as matmuls and slices instead of XLA's slow
    CPU convolution gradients. Same signature as ``lax.conv_general_dilated``; unsupported
    layouts fall back to it entirely.
    """
    if preferred_element_type is not None or not _conv_args_supported(
            lhs, dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    if lhs.shape[-1] != rhs.shape[2]:
        raise PrivDebiasError(f"hybrid_conv: input has {lhs.shape[-1]} channels, kernel expects {rhs.shape[2]}")
    strides = tuple(int(v) for v in window_strides)
    return _hybrid(lhs, rhs, strides, _explicit_pads(lhs, rhs, strides, padding), precision)


def patch_elements(lhs_shape: Sequence[int], rhs_shape: Sequence[int], window_strides: Sequence[int]) -> int:
    """Elements of im2col's patch tensor under ``"SAME"`` padding (an upper bound for
    ``"VALID"``): ``N · ⌈H/s_h⌉ · ⌈W/s_w⌉ · k_h · k_w · C_in``."""
    n, h, w, cin = lhs_shape
    kh, kw = rhs_shape[:2]
    sh, sw = window_strides
    return int(n) * (-(-int(h) // int(sh))) * (-(-int(w) // int(sw))) * int(kh) * int(kw) * int(cin)


def auto_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    **kwargs: Any,
) -> jax.Array:
    """The CPU default, chosen per layer from the traced shapes: :func:`im2col_conv` while the
    patch tensor has at most :data:`AUTO_MAX_PATCH_ELEMENTS` elements (small images and
    batches: im2col is the fastest forward and backward pass and the cheapest HVP), otherwise
    :func:`hybrid_conv` (XLA's forward, im2col's derivatives)."""
    if patch_elements(lhs.shape, rhs.shape, window_strides) <= AUTO_MAX_PATCH_ELEMENTS:
        return im2col_conv(lhs, rhs, window_strides, padding, **kwargs)
    return hybrid_conv(lhs, rhs, window_strides, padding, **kwargs)


def conv_function(impl: str, kernel_size: Sequence[int]) -> Callable[..., jax.Array] | None:
    """The ``conv_general_dilated`` to give ``nn.Conv`` for implementation ``impl`` (one of
    :data:`CONV_IMPLS`); ``None`` means flax's default (``lax.conv_general_dilated``).

    ``auto`` is resolved when the model is traced, from ``jax.default_backend()``:
    :func:`auto_conv` on ``cpu`` for kernels of at most :data:`AUTO_MAX_KERNEL_AREA` taps (im2col
    per layer while its patch tensor is small, :func:`hybrid_conv` above), XLA's convolution
    on GPU/TPU (whose convolution libraries are fast) and for larger kernels.
    """
    if impl not in CONV_IMPLS:
        raise PrivDebiasError(f"unknown convolution implementation {impl!r}; expected one of {', '.join(CONV_IMPLS)}")
    if impl == "xla":
        return None
    if impl == "im2col":
        return im2col_conv
    if impl == "hybrid":
        return hybrid_conv
    area = 1
    for k in kernel_size:
        area *= int(k)
    if jax.default_backend() == "cpu" and area <= AUTO_MAX_KERNEL_AREA:
        return auto_conv
    return None


def conv_kwargs(impl: str, kernel_size: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments for ``nn.Conv`` selecting implementation ``impl`` (see :func:`conv_function`)."""
    fn = conv_function(impl, kernel_size)
    return {} if fn is None else {"conv_general_dilated": fn}


__all__ = [
    "AUTO_MAX_KERNEL_AREA",
    "AUTO_MAX_PATCH_ELEMENTS",
    "CONV_IMPLS",
    "auto_conv",
    "conv_function",
    "conv_kwargs",
    "hybrid_conv",
    "im2col_conv",
    "patch_elements",
]
