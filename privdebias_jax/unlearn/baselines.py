"""Unlearning baselines with one interface: ``method(...) -> UnlearnResult``.

Each takes a model trained on ``train_set`` (or, for retraining, only its settings) and the
ids to forget, and returns the new :class:`~privdebias_jax.train.TrainState` and its cost:

* :func:`retrain`: the gold standard, training from scratch on ``D \\ F`` (what SISA is
  exact with respect to, shard by shard).
* :func:`newton_removal`: one Newton step on the retained objective (Koh & Liang 2017; Guo et
  al. 2020), with the influence engine: at an optimum of the full mean loss,
  ``Σ_{z∈D} ∇ℓ(z) = 0``, so one Newton step on ``L_{D∖F}`` is
  ``θ' = θ + (1/|D∖F|) H_{D∖F,λ}⁻¹ Σ_{z∈F} ∇ℓ(z, θ)``, restricted to a parameter subset
  (default the last layer, as FMD does).
* :func:`finetune`: continue training on the retained data ``D \\ F`` for a few epochs
  ("catastrophic forgetting" baseline).
* :func:`gradient_ascent`: ascend the loss on ``F`` for a few epochs.

Only :func:`retrain` (and SISA) forget exactly; the others are approximations whose distance
to the retrained model ``benchmarks/unlearn_speed.py`` reports.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from privdebias_jax.data.dataset import Batch, Dataset, subset
from privdebias_jax.influence import LAST_LAYER, make_problem, newton_update
from privdebias_jax.train import (
    TrainState,
    create_train_state,
    cross_entropy_loss,
    fit,
    make_loss_fn,
)
from privdebias_jax.types import PrivDebiasError, PRNGKey

METHODS = ("retrain", "newton", "finetune", "gradient_ascent")


@dataclasses.dataclass
class UnlearnResult:
    """A baseline's outcome: the new state, its wall time and method-specific details."""

    method: str
    state: TrainState
    seconds: float
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def split_forget(train_set: Dataset, ids: Any) -> tuple[Dataset, Dataset]:
    """``(retained, forget)`` subsets of ``train_set`` for the sample ``ids``.

    Raises:
      PrivDebiasError: for negative ids, ids not in ``train_set``, an empty request, or a
        request that would leave no training data.
    """
    ids = np.unique(np.asarray(ids, np.int64).reshape(-1))
    if ids.size == 0:
        raise PrivDebiasError("no ids to forget")
    if np.any(ids < 0):
        raise PrivDebiasError(f"sample ids must be non-negative; got {ids[ids < 0][:5].tolist()}")
    all_ids = np.asarray(train_set.idx, np.int64)
    unknown = ids[~np.isin(ids, all_ids)]
    if unknown.size:
        raise PrivDebiasError(
            f"unknown sample id(s) {unknown[:10].tolist()}: not in the training set"
        )
    drop = np.isin(all_ids, ids)
    if drop.all():
        raise PrivDebiasError("forgetting every training sample leaves nothing to train on")
    return subset(train_set, np.flatnonzero(~drop)), subset(train_set, np.flatnonzero(drop))


def retrain(
    model: nn.Module,
    tx: optax.GradientTransformation,
    train_set: Dataset,
    forget_ids: Any,
    *,
    key: PRNGKey,
    epochs: int,
    batch_size: int,
    progress: bool = False,
) -> UnlearnResult:
    """Train from scratch (initialised from ``fold_in(key, 0)``, shuffled with ``fold_in(key, 1)``) on ``D \\ F``."""
    retained, _ = split_forget(train_set, forget_ids)
    t0 = time.perf_counter()
    state = create_train_state(
        model, tx, jax.random.fold_in(key, 0), tuple(np.shape(train_set.x)[1:])
    )
    result = fit(
        model,
        tx,
        state,
        retained,
        epochs=epochs,
        batch_size=batch_size,
        key=jax.random.fold_in(key, 1),
        progress=progress,
    )
    jax.block_until_ready(result.state.params)
    return UnlearnResult(
        "retrain", result.state, time.perf_counter() - t0, {"retained": len(retained)}
    )


def newton_removal(
    model: nn.Module,
    state: TrainState,
    train_set: Dataset,
    forget_ids: Any,
    *,
    select: Any = LAST_LAYER,
    damping: float = 1e-3,
    solver: str = "exact",
    solver_options: dict | None = None,
) -> UnlearnResult:
    """One Newton step that removes ``F`` (formula in the module docstring).

    ``select`` picks the updated parameters (a path regex; ``None`` = all, then use an
    iterative ``solver`` such as ``cg``); ``damping`` λ is added to the Hessian.
    """
    retained, forget = split_forget(train_set, forget_ids)
    t0 = time.perf_counter()
    loss_fn = make_loss_fn(model)
    problem = make_problem(
        loss_fn,
        state.params,
        retained,
        select=select,
        damping=damping,
        model=model,
        model_state=state.model_state,
    )
    update = newton_update(problem, remove=forget, solver=solver, solver_options=solver_options)
    new_state = state.replace(params=update.params)
    jax.block_until_ready(jax.tree_util.tree_leaves(new_state.params))
    info = {
        "num_params_updated": int(update.num_params_updated),
        "solver": solver,
        "damping": float(damping),
    }
    return UnlearnResult("newton", new_state, time.perf_counter() - t0, info)


def finetune(
    model: nn.Module,
    tx: optax.GradientTransformation,
    state: TrainState,
    train_set: Dataset,
    forget_ids: Any,
    *,
    key: PRNGKey,
    epochs: int = 1,
    batch_size: int = 64,
) -> UnlearnResult:
    """Continue training ``state`` (optimiser state included) on ``D \\ F`` for ``epochs`` epochs."""
    retained, _ = split_forget(train_set, forget_ids)
    t0 = time.perf_counter()
    result = fit(
        model, tx, state, retained, epochs=epochs, batch_size=batch_size, key=key, progress=False
    )
    jax.block_until_ready(result.state.params)
    return UnlearnResult(
        "finetune", result.state, time.perf_counter() - t0, {"epochs": int(epochs)}
    )


def _negated_cross_entropy(logits: jax.Array, batch: Batch) -> jax.Array:
    return -cross_entropy_loss(logits, batch)


def gradient_ascent(
    model: nn.Module,
    state: TrainState,
    train_set: Dataset,
    forget_ids: Any,
    *,
    key: PRNGKey,
    learning_rate: float = 1e-4,
    epochs: int = 1,
    batch_size: int = 64,
) -> UnlearnResult:
    """Ascend the mean cross-entropy of ``F`` with SGD (``learning_rate``) for ``epochs`` epochs."""
    if not learning_rate > 0:
        raise PrivDebiasError(f"learning_rate must be positive, got {learning_rate}")
    _, forget = split_forget(train_set, forget_ids)
    t0 = time.perf_counter()
    tx = optax.sgd(float(learning_rate))
    start = TrainState(
        step=state.step,
        params=state.params,
        model_state=state.model_state,
        opt_state=tx.init(state.params),
    )
    result = fit(
        model,
        tx,
        start,
        forget,
        epochs=epochs,
        batch_size=batch_size,
        key=key,
        loss=_negated_cross_entropy,
        progress=False,
    )
    new_state = state.replace(params=result.state.params, model_state=result.state.model_state)
    jax.block_until_ready(new_state.params)
    return UnlearnResult(
        "gradient_ascent", new_state, time.perf_counter() - t0, {"epochs": int(epochs)}
    )


def param_distance(a: Any, b: Any) -> float:
    """``‖a − b‖₂`` over every leaf of two parameter pytrees of the same structure."""
    sq = jax.tree_util.tree_map(
        lambda x, y: float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)),
        a,
        b,
    )
    return float(np.sqrt(sum(jax.tree_util.tree_leaves(sq))))


__all__ = [
    "METHODS",
    "UnlearnResult",
    "finetune",
    "gradient_ascent",
    "newton_removal",
    "param_distance",
    "retrain",
    "split_forget",
]
