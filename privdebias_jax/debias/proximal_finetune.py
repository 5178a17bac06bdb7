"""Proximal fine-tuning on the external counterfactual pairs: the converged form of FMD's
external-set update, which never sees the training data.

Every external sample is seen with its own attribute and with another one, the label kept, and
the selected parameters (the last layer by default) minimise

    L_ex(θ_S) = (1/2n) Σ_{k=1..n} [ℓ(z_k, θ) + ℓ(z̄_k, θ)] + (μ/2) ‖θ_S − θ̂_S‖²

by Newton-CG (Hessian-vector products, Armijo backtracking), jitted end to end; the proximal
term stands in for the curvature of the training data that is not available (Bae et al. 2022's
proximal Bregman response uses the same term). For a softmax head on frozen features the
products are computed in closed form. FMD's one step on ``D_ex`` (Chen et al. 2023) is the
first-order version of this minimisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from privdebias_jax.data.dataset import Dataset
from privdebias_jax.debias.counterfactual_update import DebiasResult, counterfactual_update
from privdebias_jax.influence import LAST_LAYER
from privdebias_jax.influence.params import PathFilter
from privdebias_jax.train import TrainState
from privdebias_jax.types import PrivDebiasError, PRNGKey


def proximal_finetune(
    model: nn.Module,
    state: TrainState,
    external: Dataset,
    counterfactual: Callable[[Dataset, Any], Dataset],
    num_attributes: int,
    *,
    proximal: float = 0.01,
    iterations: int = 30,
    cg_iterations: int = 30,
    select: PathFilter = LAST_LAYER,
    step_sizes: Sequence[float] = (1.0,),
    max_acc_drop: float = 0.05,
    min_kept: float = 0.5,
    delta: float = 0.0,
    key: PRNGKey | None = None,
    loss_fn: Callable[[Any, Any], jax.Array] | None = None,
    feature_cache: bool = True,
) -> DebiasResult:
    """Minimise ``L_ex`` (module docstring) over the ``select`` subset, guarded on ``D_ex``.

    Args:
      model, state: the trained model.
      external: ``D_ex``.
      counterfactual, num_attributes: as in :func:`privdebias_jax.debias.fmd.fmd`.
      proximal: ``μ > 0`` (larger: a smaller change).
      iterations: at most this many Newton-CG steps (≥ 2), stopping once ``‖∇L_ex‖ < 1e-5``.
      cg_iterations: CG iterations per Newton step.
      select, step_sizes, max_acc_drop, min_kept, delta, key, loss_fn, feature_cache: as in
        :func:`privdebias_jax.debias.fmd.fmd`.

    Returns:
      :class:`~privdebias_jax.debias.counterfactual_update.DebiasResult` with
      ``report["method"] == "proximal_finetune"``; ``solver_diagnostics`` says whether the
      gradient norm reached ``1e-5`` or the iteration cap stopped it.

    Raises:
      PrivDebiasError: ``proximal ≤ 0``, ``iterations < 2``, ``cg_iterations < 1`` and the
        errors of :func:`privdebias_jax.debias.fmd.fmd`.
    """
    if not (np.isfinite(proximal) and proximal > 0):
        raise PrivDebiasError(f"proximal_finetune needs proximal > 0, got {proximal}")
    if int(iterations) < 2:
        raise PrivDebiasError(f"proximal_finetune needs iterations ≥ 2, got {iterations}")
    return counterfactual_update(
        model, state, external, counterfactual, num_attributes, method="proximal_finetune", mode="external",
        select=select, damping=float(proximal), newton_iterations=int(iterations), proximal=proximal,
        cg_iterations=cg_iterations, step_sizes=step_sizes, max_acc_drop=max_acc_drop, min_kept=min_kept,
        delta=delta, key=key, loss_fn=loss_fn, feature_cache=feature_cache,
    )


__all__ = ["proximal_finetune"]
