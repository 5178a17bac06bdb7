"""FMD: Fast Model Debias with machine unlearning (Chen et al., NeurIPS 2023), as published.

Identify the bias on an external set of counterfactual pairs, rank the training samples by
their influence on it, and remove it with **one** damped Newton step on a small parameter
subset (the last layer by default):

    B(θ) = mean_i |p(ŷ_i | x_i, a_i) − p(ŷ_i | x_i, ā_i)|
    I(z) = −∇_θ B(θ)ᵀ (H + λI)⁻¹ ∇_θ ℓ(z, θ)                       (rank; top-K are harmful)
    θ'   = θ + (1/n) (H + λI)⁻¹ Σ_k (∇ℓ(z_k, θ) − ∇ℓ(z̄_k, θ))       (replace z_k by z̄_k)

``variant="train"`` builds the step from the top-K training samples (``H`` the Hessian of the
mean training loss); ``variant="external"``, the one the paper leads with, builds it from the
external pairs alone (``H`` over ``D_ex``, ``n = |D_ex|``).

What this implementation adds to the paper, and why (figures in ``docs/influence.md``):

* **A guard that judges predictions.** Every candidate ``θ + m·Δθ(λ)`` is scored on ``D_ex``
  alone; it is taken only when the pair accuracy (originals and counterfactuals) drops by at
  most ``max_acc_drop`` and at least ``min_kept`` of the pair predictions that were right stay
  right. This rejects a collapse to near-random predictions, which lowers ``B`` too.
* **Damping and step length chosen on D_ex.** ``damping`` may be a grid and ``step_sizes`` a
  set of multipliers; the qualifying candidate with the lowest external bias is taken. On a
  model trained to a saturated softmax the Hessian is nearly zero along the directions the
  counterfactual gradients push, so the undamped step is many times longer than the
  retraining it stands for and collapses the model; the guard falls back to a short step or
  to the model unchanged, and says so (``report["kept_original"]``).

For the converged counterparts see :func:`privdebias_jax.debias.head_retrain.head_retrain` and
:func:`privdebias_jax.debias.proximal_finetune.proximal_finetune`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from privdebias_jax.data.dataset import Dataset
from privdebias_jax.debias.counterfactual_update import (
    DebiasResult,
    counterfactual_bias_value,
    counterfactual_update,
    drop_ids,
    identify_bias,
    make_bias_objective,
    rank_harmful,
    split_external,
)
from privdebias_jax.influence import LAST_LAYER
from privdebias_jax.influence.params import PathFilter
from privdebias_jax.train import TrainState
from privdebias_jax.types import PrivDebiasError, PRNGKey

VARIANTS = ("external", "train")
DEFAULT_DAMPING = (0.01, 0.1, 1.0)
DEFAULT_STEP_SIZES = (0.0625, 0.125, 0.25, 0.5, 1.0)


def fmd(
    model: nn.Module,
    state: TrainState,
    external: Dataset,
    counterfactual: Callable[[Dataset, Any], Dataset],
    num_attributes: int,
    *,
    variant: str = "external",
    train: Dataset | None = None,
    k: int = 100,
    select: PathFilter = LAST_LAYER,
    damping: float | Sequence[float] = DEFAULT_DAMPING,
    curvature: str = "hessian",
    solver: str = "exact",
    solver_options: dict | None = None,
    step_sizes: Sequence[float] = DEFAULT_STEP_SIZES,
    max_acc_drop: float = 0.05,
    min_kept: float = 0.5,
    delta: float = 0.0,
    key: PRNGKey | None = None,
    loss_fn: Callable[[Any, Any], jax.Array] | None = None,
    feature_cache: bool = True,
) -> DebiasResult:
    """FMD's one-step counterfactual update (module docstring), guarded on ``D_ex``.

    Args:
      model, state: the trained model (any Flax module; ``select`` names the updated subset).
      external: the external set ``D_ex`` with ``y`` and ``a`` (never the test set reported on).
      counterfactual: ``counterfactual(ds, a_new) -> Dataset``: the same samples with the
        attribute set to ``a_new`` (``DataSplits.counterfactual``).
      num_attributes: number of attribute values (≥ 2; ``ā`` is another value).
      variant: ``"external"`` (the step from ``D_ex``'s pairs) or ``"train"`` (the top-``k``
        training samples by influence on ``B``, replaced by their counterfactuals).
      train: the training set (``variant="train"``).
      k: samples replaced (``variant="train"``), in ``[1, len(train)]``.
      select: parameter subset, a regex on ``/``-joined paths (``"^head/"``: the last layer).
      damping: ``λ > 0``, or a grid of values (one step each; the guard picks).
      curvature: ``"hessian"`` or ``"gauss_newton"``.
      solver, solver_options: inverse-HVP solver by name
        (:func:`privdebias_jax.influence.make_solver`).
      step_sizes: multipliers of the step tried besides ``0``.
      max_acc_drop, min_kept: the guard (module docstring).
      delta: fairness threshold; with ``B ≤ δ`` on ``D_ex`` nothing changes.
      key: draws the counterfactual attribute values (typed or legacy key; a cyclic shift when None).
      loss_fn: the training loss ``loss_fn(params, batch)`` (default: the model's mean cross-entropy).
      feature_cache: run last-layer steps on cached backbone features (exact).

    Returns:
      :class:`~privdebias_jax.debias.counterfactual_update.DebiasResult`; ``report["method"]``
      is ``"fmd"``, ``report["kept_original"]`` says that the guard rejected every step.

    Raises:
      PrivDebiasError: unknown variant, ``k`` out of range, a missing training set, a
        non-positive damping, an empty ``D_ex``, a filter matching no parameter, fewer than 2
        attribute values.
    """
    if variant not in VARIANTS:
        raise PrivDebiasError(f"unknown FMD variant {variant!r}; expected one of {VARIANTS}")
    return counterfactual_update(
        model, state, external, counterfactual, num_attributes, method="fmd", mode=variant, train=train,
        k=k, select=select, damping=damping, curvature=curvature, solver=solver, solver_options=solver_options,
        newton_iterations=1, step_sizes=step_sizes, max_acc_drop=max_acc_drop, min_kept=min_kept,
        replacement="others", delta=delta, key=key, loss_fn=loss_fn, feature_cache=feature_cache,
    )


__all__ = [
    "VARIANTS",
    "DEFAULT_DAMPING",
    "DEFAULT_STEP_SIZES",
    "fmd",
    "identify_bias",
    "rank_harmful",
    "make_bias_objective",
    "counterfactual_bias_value",
    "split_external",
    "drop_ids",
]
