"""Flax linen models that return ``(logits, features)`` so the bottleneck is visible.

``create_model(name, num_classes, **overrides)`` builds one by name; every model's last
linear layer is called ``head``.

| name          | module   | defaults                                                      |
|---------------|----------|---------------------------------------------------------------|
| ``mlp``       | MLP      | hidden (100, 100, 100): FMD's Colored-MNIST network            |
| ``tabular_mlp``| MLP     | hidden (64, 32): Adult                                         |
| ``simple_conv``| ConvNet | Bahng et al.'s SimpleConvNet: kernel 7, 16-32-64-128, BN      |
| ``small_cnn`` | ConvNet  | CPU default: kernel 3, 16-32-64-128, strides 1-2-2-2, no norm |
| ``resnet``    | ResNet   | ResNet-8 (1, 1, 1) × (16, 32, 64), group norm                 |

Convolutional models take ``conv="auto"|"xla"|"im2col"`` (:mod:`privdebias_jax.models.conv`):
``auto`` writes kernels up to 3×3 as patches × matrix on the CPU backend, where XLA's own
convolution gradients are slow, and keeps XLA's convolution on GPU/TPU; the parameters are the
same whichever is used.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from privdebias_jax.models.cnn import NORMS, ConvNet
from privdebias_jax.models.conv import CONV_IMPLS, im2col_conv
from privdebias_jax.models.mlp import MLP
from privdebias_jax.models.resnet import ResNet
from privdebias_jax.types import ModelState, Params, PrivDebiasError, PRNGKey

MODEL_DEFAULTS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "mlp": (MLP, {"hidden": (100, 100, 100)}),
    "tabular_mlp": (MLP, {"hidden": (64, 32)}),
    "simple_conv": (ConvNet, {"widths": (16, 32, 64, 128), "kernel_size": 7, "strides": (1, 1, 1, 1), "norm": "batch"}),
    "small_cnn": (ConvNet, {"widths": (16, 32, 64, 128), "kernel_size": 3, "strides": (1, 2, 2, 2), "norm": "none"}),
    "resnet": (ResNet, {"stage_sizes": (1, 1, 1), "widths": (16, 32, 64), "norm": "group"}),
}


def create_model(name: str, num_classes: int, **overrides: Any) -> nn.Module:
    """Build a model by name with its defaults, overridden by keyword arguments.

    Raises:
      PrivDebiasError: for an unknown name, a bad field name or ``num_classes < 1``.
    """
    if name not in MODEL_DEFAULTS:
        raise PrivDebiasError(f"unknown model {name!r}; known models: {', '.join(MODEL_DEFAULTS)}")
    if int(num_classes) < 1:
        raise PrivDebiasError(f"num_classes must be positive, got {num_classes}")
    cls, defaults = MODEL_DEFAULTS[name]
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = set(overrides) - fields
    if unknown:
        raise PrivDebiasError(f"model {name!r} has no option(s) {sorted(unknown)}; options: {sorted(fields - {'num_classes'})}")
    kwargs = {**defaults, **overrides}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if "norm" in kwargs and kwargs["norm"] not in NORMS:
        raise PrivDebiasError(f"model {name!r}: unknown norm {kwargs['norm']!r}; expected one of {NORMS}")
    if "conv" in kwargs and kwargs["conv"] not in CONV_IMPLS:
        raise PrivDebiasError(f"model {name!r}: unknown convolution implementation {kwargs['conv']!r}; expected one of {CONV_IMPLS}")
    if cls is ConvNet and len(kwargs["strides"]) != len(kwargs["widths"]):
        raise PrivDebiasError(
            f"model {name!r}: strides {tuple(kwargs['strides'])} and widths {tuple(kwargs['widths'])} "
            "must have the same length"
        )
    if cls is ResNet and len(kwargs["stage_sizes"]) != len(kwargs["widths"]):
        raise PrivDebiasError(
            f"model {name!r}: stage_sizes {tuple(kwargs['stage_sizes'])} and widths {tuple(kwargs['widths'])} "
            "must have the same length"
        )
    return cls(num_classes=int(num_classes), **kwargs)


def init_model(model: nn.Module, key: PRNGKey, input_shape: tuple[int, ...]) -> tuple[Params, ModelState]:
    """Initialise ``model`` on a dummy batch of shape ``(1, *input_shape)``.

    Returns ``(params, model_state)`` where ``model_state`` holds the non-parameter
    collections (``batch_stats`` for batch norm), ``{}`` when there are none.
    """
    variables = model.init({"params": key, "dropout": key}, jnp.zeros((1, *input_shape), jnp.float32), train=False)
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def count_params(params: Params) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


__all__ = ["CONV_IMPLS", "im2col_conv", "MLP", "ConvNet", "ResNet", "MODEL_DEFAULTS", "create_model", "init_model", "count_params"]
