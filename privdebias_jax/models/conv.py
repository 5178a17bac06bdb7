"""Convolutions as patches × matrix (im2col), a faster drop-in for XLA's CPU convolutions.

XLA's CPU backend runs a convolution's backward pass (the input and kernel gradients) and the
grouped convolutions that ``vmap`` over models produces slowly: on 2 cores the small CNN's
gradient at 14×14 costs 5–6 forward passes. Written as ``k_h·k_w`` shifted (strided) slices of
the padded input, concatenated on the channel axis and multiplied by the kernel reshaped to
``(k_h·k_w·C_in, C_out)``, every convolution, its transpose and its tangent become plain matrix
products and slices, which XLA's CPU matmuls run well (``benchmarks/hvp_cost.py`` and
``benchmarks/train_step.py`` carry the figures). The result is the same convolution: equal to
``lax.conv_general_dilated`` up to float32 summation order (tests check ≤ 1e-5 relative).

Used through flax's ``nn.Conv(..., conv_general_dilated=im2col_conv)``, so the parameters
(``kernel`` in HWIO, ``bias``) are exactly those of ``nn.Conv``: checkpoints, path filters and
influence subsets do not change with the implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from privdebias_jax.types import PrivDebiasError

#: ``auto``: im2col on the CPU backend for kernels of at most :data:`AUTO_MAX_KERNEL_AREA`
#: taps, XLA's own convolution elsewhere; ``xla``: always ``lax.conv_general_dilated``;
#: ``im2col``: always :func:`im2col_conv`.
CONV_IMPLS = ("auto", "xla", "im2col")
#: Largest ``k_h·k_w`` that ``auto`` writes as im2col: the patch tensor is ``k_h·k_w`` times the
#: input, so 7×7 kernels (49×) are left to XLA.
AUTO_MAX_KERNEL_AREA = 9
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
    dilated = any(d != 1 for d in (lhs_dilation or ())) or any(d != 1 for d in (rhs_dilation or ()))
    if dilated or feature_group_count != 1 or not _is_nhwc(lhs.ndim, dimension_numbers):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    kh, kw, cin, cout = rhs.shape
    if lhs.shape[-1] != cin:
        raise PrivDebiasError(f"im2col_conv: input has {lhs.shape[-1]} channels, kernel expects {cin}")
    sh, sw = (int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
    else:
        pads = [tuple(int(v) for v in p) for p in padding]
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


def conv_function(impl: str, kernel_size: Sequence[int]) -> Callable[..., jax.Array] | None:
    """The ``conv_general_dilated`` to give ``nn.Conv`` for implementation ``impl`` (one of
    :data:`CONV_IMPLS`); ``None`` means flax's default (``lax.conv_general_dilated``).

    ``auto`` is resolved when the model is traced, from ``jax.default_backend()``: im2col on
    ``cpu`` for kernels of at most :data:`AUTO_MAX_KERNEL_AREA` taps, XLA's convolution on
    GPU/TPU (whose convolution libraries are fast) and for larger kernels.
    """
    if impl not in CONV_IMPLS:
        raise PrivDebiasError(f"unknown convolution implementation {impl!r}; expected one of {', '.join(CONV_IMPLS)}")
    if impl == "xla":
        return None
    if impl == "im2col":
        return im2col_conv
    area = 1
    for k in kernel_size:
        area *= int(k)
    if jax.default_backend() == "cpu" and area <= AUTO_MAX_KERNEL_AREA:
        return im2col_conv
    return None


def conv_kwargs(impl: str, kernel_size: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments for ``nn.Conv`` selecting implementation ``impl`` (see :func:`conv_function`)."""
    fn = conv_function(impl, kernel_size)
    return {} if fn is None else {"conv_general_dilated": fn}


__all__ = ["AUTO_MAX_KERNEL_AREA", "CONV_IMPLS", "conv_function", "conv_kwargs", "im2col_conv"]
