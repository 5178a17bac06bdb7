"""Debiasing methods as plug-ins of the shared training loop, selected by name.

| name            | what trains                          | data term                     | regulariser                                  | needs bias label |
|-----------------|--------------------------------------|-------------------------------|----------------------------------------------|------------------|
| ``vanilla``     | the model                            | CE(f)                         | none                                         | no               |
| ``end``         | the model                            | CE(f)                         | α R⊥ + β R∥ on the bottleneck (EnD)          | yes              |
| ``learned_mixin``| model + 1×1 bias net + gate         | CE(log p_f + s(x) log p_g)    | CE(g)                                        | no               |
| ``rubi``        | model + 1×1 bias net                 | CE(f ⊙ σ(g))                  | CE(g)                                        | no               |
| ``rebias``      | model + 1×1 bias net                 | CE(f)                         | CE(g) + α HSIC(f, sg g) − β HSIC(sg f, g)     | no               |

Papers: EnD (Tartaglione et al., CVPR 2021) in :mod:`~privdebias_jax.debias.end`, LearnedMixin
(Clark et al., EMNLP 2019) in :mod:`~privdebias_jax.debias.learned_mixin`, RUBi (Cadene et al.,
NeurIPS 2019) in :mod:`~privdebias_jax.debias.rubi`, ReBias (Bahng et al., ICML 2020) in
:mod:`~privdebias_jax.debias.rebias`; the study that compares them as privacy defences is seed
paper 001 (Barbano et al. 2021). The bias-only branch is Bahng et al.'s 1×1-kernel network
(:mod:`~privdebias_jax.debias.branch` says why). ``alpha`` / ``beta`` are EnD's weights (default
0.1 / 0.1) or ReBias's λ_f / λ_g (default 1 / 1); the other methods take neither.

:func:`setup_method` returns the module to train and the ``(loss, regularizer)`` pair for
:func:`privdebias_jax.train.fit`; :func:`main_train_state` turns the trained state into a
state of the main network alone (what is saved, evaluated, probed and attacked).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from privdebias_jax.data.dataset import Dataset
from privdebias_jax.debias.branch import BiasBranchNet
from privdebias_jax.debias.end import (
    DEFAULT_ALPHA,
    DEFAULT_BETA,
    check_weight,
    make_end_regularizer,
)
from privdebias_jax.debias.learned_mixin import make_learned_mixin_regularizer
from privdebias_jax.debias.rebias import (
    DEFAULT_LAMBDA_BIAS,
    DEFAULT_LAMBDA_MAIN,
    make_rebias_regularizer,
)
from privdebias_jax.debias.rubi import make_rubi_regularizer
from privdebias_jax.models import ConvNet
from privdebias_jax.train import DataLoss, Regularizer, TrainState, cross_entropy_loss
from privdebias_jax.types import PrivDebiasError

#: The methods, by name.
METHODS = ("vanilla", "end", "learned_mixin", "rubi", "rebias")
#: Methods that read the bias label (``Dataset.a``) during training.
NEEDS_BIAS_LABEL = ("end",)
#: Default ``(alpha, beta)`` of the methods that take them.
WEIGHT_DEFAULTS = {"end": (DEFAULT_ALPHA, DEFAULT_BETA), "rebias": (DEFAULT_LAMBDA_MAIN, DEFAULT_LAMBDA_BIAS)}


class MethodSetup(NamedTuple):
    """What :func:`privdebias_jax.train.fit` needs to train with a method.

    Attributes:
      name: the method.
      model: the module to train (``main`` itself, or a :class:`BiasBranchNet` around it).
      main: the network being debiased (what is evaluated and saved).
      loss: the data term ``loss(logits, batch)``.
      regularizer: ``regularizer(params, batch, logits, features)`` or ``None``.
      settings: the resolved hyperparameters (JSON-ready).
    """

    name: str
    model: nn.Module
    main: nn.Module
    loss: DataLoss
    regularizer: Regularizer | None
    settings: dict[str, Any]


def check_method(name: str) -> str:
    """``name`` if it is a known method; raises :class:`PrivDebiasError` naming the known ones."""
    if not isinstance(name, str) or name not in METHODS:
        raise PrivDebiasError(f"unknown debiasing method {name!r}; known methods: {', '.join(METHODS)}")
    return name


def default_bias_network(
    main: nn.Module, num_classes: int, input_shape: tuple[int, ...], preset: str = "cpu"
) -> nn.Module:
    """Bahng et al.'s bias-only network: a ConvNet with 1×1 kernels (receptive field 1 pixel).

    Widths 16-32-64-128 (Bahng et al.'s SimpleConvNet), no normalisation; strides 1-2-2-2 on the
    CPU preset (a 1×1 kernel with stride keeps the 1-pixel receptive field), 1-1-1-1 on ``paper``.
    A ConvNet main network lends its widths and strides.

    Raises:
      PrivDebiasError: if the inputs are not images ``(H, W, C)`` (no 1×1 convolution applies).
    """
    if len(tuple(input_shape)) != 3:
        raise PrivDebiasError(
            f"the default bias branch (Bahng et al.'s 1×1-kernel ConvNet) needs images (H, W, C), "
            f"got inputs of shape {tuple(input_shape)}; pass bias_model"
        )
    widths, strides = (16, 32, 64, 128), ((1, 2, 2, 2) if preset == "cpu" else (1, 1, 1, 1))
    if isinstance(main, ConvNet):
        widths, strides = tuple(main.widths), tuple(main.strides)
        if preset != "cpu":
            strides = (1,) * len(widths)
    return ConvNet(num_classes=int(num_classes), widths=widths, kernel_size=1, strides=strides, norm="none")


def _check_bias_label(name: str, num_attributes: int, train_set: Dataset | None) -> None:
    if int(num_attributes) < 2:
        raise PrivDebiasError(
            f"method {name!r} needs a bias label with at least 2 values, but the dataset has "
            f"num_attributes = {num_attributes} (no bias label)"
        )
    if train_set is not None:
        a = None if train_set.a is None else np.asarray(train_set.a)
        if a is None or a.ndim != 1 or a.shape[0] != len(train_set):
            raise PrivDebiasError(
                f"method {name!r} needs a bias label per training sample (`a`), got "
                f"{None if a is None else a.shape}"
            )
        if a.size and (a.min() < 0 or a.max() >= int(num_attributes)):
            raise PrivDebiasError(
                f"method {name!r}: bias labels out of range [0, {num_attributes}): min {a.min()}, max {a.max()}"
            )


def setup_method(
    name: str,
    main: nn.Module,
    num_classes: int,
    num_attributes: int,
    input_shape: tuple[int, ...],
    *,
    train_set: Dataset | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    bias_model: nn.Module | None = None,
    preset: str = "cpu",
    end_center: bool = True,
) -> MethodSetup:
    """The module, data term and regulariser that train ``main`` with method ``name``.

    Args:
      name: one of :data:`METHODS`.
      main: the network to debias (a model of :mod:`privdebias_jax.models`).
      num_classes, num_attributes: of the dataset (``num_attributes`` < 2 means no bias label).
      input_shape: one sample's shape (the default bias branch needs images).
      train_set: if given, its bias labels are checked for methods that need them.
      alpha, beta: EnD's (α, β) or ReBias's (λ_f, λ_g); ``None`` = the paper's default.
      bias_model: replaces the default bias-only network (:func:`default_bias_network`).
      preset: ``cpu`` or ``paper`` (the default bias branch's strides).

    Raises:
      PrivDebiasError: an unknown method; α or β negative, NaN or infinite, or given to a method
        that takes none; a method that needs a bias label on data without one.
    """
    name = check_method(name)
    if name not in WEIGHT_DEFAULTS and (alpha is not None or beta is not None):
        raise PrivDebiasError(f"method {name!r} takes no alpha/beta (only end and rebias do)")
    if alpha is not None:
        check_weight(alpha, "alpha")
    if beta is not None:
        check_weight(beta, "beta")
    if name in NEEDS_BIAS_LABEL:
        _check_bias_label(name, num_attributes, train_set)
    if name in ("vanilla", "end"):
        if name == "vanilla":
            return MethodSetup(name, main, main, cross_entropy_loss, None, {})
        a, b = WEIGHT_DEFAULTS["end"]
        a = a if alpha is None else float(alpha)
        b = b if beta is None else float(beta)
        reg = make_end_regularizer(int(num_attributes), a, b, center=end_center)
        return MethodSetup(name, main, main, cross_entropy_loss, reg, {"alpha": a, "beta": b, "center": end_center})
    bias = bias_model if bias_model is not None else default_bias_network(main, num_classes, input_shape, preset)
    combine = name if name in ("rubi", "learned_mixin") else "none"
    model = BiasBranchNet(main=main, bias=bias, combine=combine)
    settings: dict[str, Any] = {"bias_branch": "1x1-kernel ConvNet (Bahng et al.)" if bias_model is None else "custom"}
    if name == "rubi":
        reg = make_rubi_regularizer(model)
    elif name == "learned_mixin":
        reg = make_learned_mixin_regularizer(model)
    else:
        a, b = WEIGHT_DEFAULTS["rebias"]
        a = a if alpha is None else float(alpha)
        b = b if beta is None else float(beta)
        reg = make_rebias_regularizer(model, a, b)
        settings.update(alpha=a, beta=b)
    return MethodSetup(name, model, main, cross_entropy_loss, reg, settings)


def main_train_state(setup: MethodSetup, state: TrainState, tx) -> TrainState:
    """The trained state of the main network alone (a fresh optimiser state over its parameters).

    For ``vanilla`` and ``end`` this is ``state`` itself.
    """
    if setup.model is setup.main:
        return state
    params = state.params["main"]
    model_state = {k: v["main"] for k, v in state.model_state.items() if "main" in v}
    return TrainState(step=state.step, params=params, model_state=model_state, opt_state=tx.init(params))


def method_from_config(config: Any) -> tuple[str, float | None, float | None]:
    """``(method, alpha, beta)`` from a config's optional ``method`` / ``alpha`` / ``beta`` fields."""
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    name = get("method", None) or "vanilla"
    alpha, beta = get("alpha", None), get("beta", None)
    return check_method(str(name)), alpha, beta


def bias_branch_parameters(setup: MethodSetup, state: TrainState) -> int:
    """Number of parameters outside the main network (bias branch and gate); 0 without a branch."""
    if setup.model is setup.main:
        return 0
    extra = {k: v for k, v in state.params.items() if k != "main"}
    return int(sum(x.size for x in jax.tree_util.tree_leaves(extra)))


__all__ = [
    "METHODS",
    "NEEDS_BIAS_LABEL",
    "WEIGHT_DEFAULTS",
    "MethodSetup",
    "check_method",
    "default_bias_network",
    "setup_method",
    "main_train_state",
    "method_from_config",
    "bias_branch_parameters",
]
