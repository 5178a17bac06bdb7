"""Head retraining on counterfactual-replaced training data: the converged form of FMD's
training-set update.

The training set with ``K`` samples (the top-K by influence on the bias, or every sample)
replaced by their counterfactuals, and the selected parameters (the last layer by default)
retrained on it from the trained model by Newton-CG (Armijo backtracking, jitted; closed-form
products for a softmax head on frozen features):

    min_θ_S  (1/n) [Σ_{z ∉ top-K} ℓ(z, θ) + Σ_{k ∈ top-K} ℓ(z̄_k, θ)] + (λ/2)‖θ_S − θ̂_S‖²

the proximal retraining that FMD's damped one-step update (Chen et al. 2023) approximates to
first order (Bae et al. 2022); ``λ`` is the same damping. Strongly convex for a softmax head on
frozen features, so the iterates converge to its unique minimiser. With ``replacement="others"`` every replaced sample takes
another attribute value (FMD's counterfactual), which makes fully replaced data anti-biased;
``"all"`` draws the value uniformly, so the replaced data carries no attribute-label association.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from privdebias_jax.data.dataset import Dataset
from privdebias_jax.debias.counterfactual_update import DebiasResult, counterfactual_update
from privdebias_jax.influence import LAST_LAYER
from privdebias_jax.influence.params import PathFilter
from privdebias_jax.train import TrainState
from privdebias_jax.types import PrivDebiasError, PRNGKey


def head_retrain(
    model: nn.Module,
    state: TrainState,
    train: Dataset,
    external: Dataset,
    counterfactual: Callable[[Dataset, Any], Dataset],
    num_attributes: int,
    *,
    k: int | None = None,
    replacement: str = "others",
    iterations: int = 30,
    cg_iterations: int = 30,
    select: PathFilter = LAST_LAYER,
    damping: float = 0.01,
    solver: str = "cg",
    solver_options: dict | None = None,
    step_sizes: Sequence[float] = (1.0,),
    max_acc_drop: float = 0.05,
    min_kept: float = 0.5,
    delta: float = 0.0,
    key: PRNGKey | None = None,
    loss_fn: Callable[[Any, Any], jax.Array] | None = None,
    feature_cache: bool = True,
) -> DebiasResult:
    """Retrain the ``select`` subset on the training set with ``k`` samples replaced by
    counterfactuals (module docstring); ``D_ex`` serves the ranking and the guard.

    Args:
      model, state: the trained model.
      train: the training set.
      external: ``D_ex`` (pairs for the bias, the ranking and the guard).
      counterfactual, num_attributes: as in :func:`privdebias_jax.debias.fmd.fmd`.
      k: samples replaced (``None``: every sample, no ranking), in ``[1, len(train)]``.
      replacement: ``"others"`` or ``"all"`` (module docstring).
      iterations: at most this many Newton-CG steps (≥ 2), stopping once ``‖∇‖ < 1e-5``.
      cg_iterations: CG iterations per Newton step.
      damping: ``λ > 0``, the proximal weight (and the damping of the influence ranking).
      solver, solver_options: the inverse-HVP solver of the influence ranking (``k < len(train)``).
      select, step_sizes, max_acc_drop, min_kept, delta, key, loss_fn, feature_cache: as in
        :func:`privdebias_jax.debias.fmd.fmd`.

    Returns:
      :class:`~privdebias_jax.debias.counterfactual_update.DebiasResult` with
      ``report["method"] == "head_retrain"``, the Newton history and, in ``solver_diagnostics``,
      whether the gradient norm reached ``1e-5``.

    Raises:
      PrivDebiasError: ``iterations < 2``, ``k`` out of range, an unknown replacement and the
        errors of :func:`privdebias_jax.debias.fmd.fmd`.
    """
    if int(iterations) < 2:
        raise PrivDebiasError(f"head_retrain needs iterations ≥ 2 (1 is FMD's single step), got {iterations}")
    return counterfactual_update(
        model, state, external, counterfactual, num_attributes, method="head_retrain", mode="train",
        train=train, k=len(train) if k is None else int(k), select=select, damping=damping, solver=solver,
        solver_options=solver_options, newton_iterations=int(iterations), cg_iterations=cg_iterations,
        step_sizes=step_sizes,
        max_acc_drop=max_acc_drop, min_kept=min_kept, replacement=replacement, delta=delta, key=key,
        loss_fn=loss_fn, feature_cache=feature_cache,
    )


__all__ = ["head_retrain"]
