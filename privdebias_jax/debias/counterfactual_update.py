r"""The counterfactual update shared by the influence-based debiasing methods.

Three methods live on this engine, each in its own module and each a single function:

* :func:`privdebias_jax.debias.fmd.fmd`: FMD (Chen et al. 2023), the paper's identify → rank →
  one damped Newton step that replaces samples by their counterfactuals.
* :func:`privdebias_jax.debias.head_retrain.head_retrain`: the selected parameters retrained
  (damped Newton to convergence) on the training set with K samples replaced by their
  counterfactuals.
* :func:`privdebias_jax.debias.proximal_finetune.proximal_finetune`: Newton-CG on the external
  pairs ``D_ex ∪ cf(D_ex)`` with a proximal term, no training data.

The steps, on the parameter subset ``S`` (the last layer by default):

1. **Identify**: counterfactual bias ``B(θ) = mean_i |p(ŷ_i | x_i, a_i) − p(ŷ_i | x_i, ā_i)|``
   over the external pairs; nothing changes when ``B ≤ δ``.
2. **Evaluate** (``mode="train"``): ``I(z) = −∇_θ B(θ)ᵀ (H + λI)⁻¹ ∇_θ ℓ(z, θ)`` for every
   training sample (``H`` the Hessian of the mean training loss on ``S``); the top-K largest are
   the harmful samples (see :mod:`privdebias_jax.influence.influence` for the sign convention).
3. **Remove**: ``Δθ = (1/n) (H + λI)⁻¹ Σ_k (∇ℓ(z_k) − ∇ℓ(z̄_k))`` (``mode="train"``), or the same
   built from the external pairs alone with ``H`` over ``D_ex`` and ``n = |D_ex|``
   (``mode="external"``). ``newton_iterations > 1`` instead minimises the modified objective
   by Newton-CG (training mode: ``L'(θ) + (λ/2)‖θ_S − θ̂_S‖²`` with ``L'`` the mean loss over
   ``(D \ top-K) ∪ cf(top-K)``, the proximal retraining that the damped step approximates;
   external mode: ``L_ex(θ) = (1/2n) Σ_k [ℓ(z_k) + ℓ(z̄_k)] + (μ/2)‖θ_S − θ̂_S‖²``).
4. **Guard**: every candidate ``θ + m·Δθ(λ)`` (step multipliers ``m`` and, for a damping grid,
   every ``λ``) is scored on ``D_ex`` alone: its bias, its accuracy on the pairs (originals and
   counterfactuals), and the fraction of the pair predictions that were right before the
   update and stay right (``kept``). A candidate qualifies when the pair accuracy drops by at
   most ``max_acc_drop`` and ``kept ≥ min_kept``, which rejects a collapse to near-random
   predictions even when the model scored near chance on ``D_ex`` before; the qualifying one
   with the lowest bias is taken, and ``m = 0`` (the model unchanged) always qualifies.

Test data are never looked at.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from privdebias_jax.data.dataset import Batch, Dataset, as_batch, concat, other_attribute, subset
from privdebias_jax.influence import (
    LAST_LAYER,
    InfluenceResult,
    influence_scores,
    make_problem,
    make_solver,
    newton_update,
    objective_gradient,
)
from privdebias_jax.influence.influence import NewtonUpdate
from privdebias_jax.influence.params import PathFilter, merge_params, split_params
from privdebias_jax.influence.solvers import Diagnostics
from privdebias_jax.metrics.fairness import _counterfactual_gaps, counterfactual_bias_from_logits
from privdebias_jax.train import TrainState, apply_model, make_loss_fn, predict
from privdebias_jax.types import PrivDebiasError, PRNGKey

MODES = ("external", "train")
REPLACEMENTS = ("others", "all")


class LinearHead(nn.Module):
    """The last layer alone, ``z = h W + b`` on precomputed features (named ``head`` like every model's)."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        return nn.Dense(self.num_classes, name="head")(x), x


def make_bias_objective(model: nn.Module) -> Callable[..., jax.Array]:
    """``f(params, pairs, model_state=None) -> B(θ)`` with ``pairs = (batch, counterfactual_batch)``.

    Differentiable in ``params`` (the prediction ``ŷ`` is held fixed under ``stop_gradient``):
    the objective whose influence FMD ranks samples by.
    """

    def bias(params: Any, pairs: tuple[Batch, Batch], model_state: Any = None) -> jax.Array:
        batch, batch_cf = pairs
        logits, _, _ = apply_model(model, params, model_state or {}, batch.x)
        logits_cf, _, _ = apply_model(model, params, model_state or {}, batch_cf.x)
        return counterfactual_bias_from_logits(logits, logits_cf, batch.mask)

    return bias


def counterfactual_bias_value(model: nn.Module, params: Any, model_state: Any, ds: Dataset, ds_cf: Dataset) -> float:
    """``B(θ)`` of a model on pairs ``(ds, ds_cf)`` (batched forward passes)."""
    logits, _ = predict(model, params, model_state, ds)
    logits_cf, _ = predict(model, params, model_state, ds_cf)
    return float(counterfactual_bias_from_logits(logits, logits_cf))


def identify_bias(
    model: nn.Module,
    state: TrainState,
    pairs: dict[str, tuple[Dataset, Dataset]],
    delta: float = 0.05,
) -> dict[str, dict[str, Any]]:
    """Step 1: ``B(θ)`` per attribute from its counterfactual pairs; ``biased = B > δ``.

    ``pairs`` maps an attribute name (``"colour"``, ``"sex"``, ``"race"``) to ``(ds, ds_cf)``.
    """
    if delta < 0:
        raise PrivDebiasError(f"delta must be ≥ 0, got {delta}")
    out = {}
    for name, (ds, ds_cf) in pairs.items():
        if len(ds) != len(ds_cf) or not np.array_equal(np.asarray(ds.idx), np.asarray(ds_cf.idx)):
            raise PrivDebiasError(f"attribute {name!r}: the counterfactual set does not pair with the originals")
        b = counterfactual_bias_value(model, state.params, state.model_state, ds, ds_cf)
        out[name] = {"bias": b, "biased": bool(b > delta), "delta": float(delta), "pairs": len(ds)}
    return out


def rank_harmful(
    model: nn.Module,
    state: TrainState,
    train: Dataset,
    external: Dataset,
    external_cf: Dataset,
    *,
    select: PathFilter = LAST_LAYER,
    damping: float = 0.01,
    solver: str = "exact",
    solver_options: dict | None = None,
    loss_fn: Callable[..., jax.Array] | None = None,
) -> InfluenceResult:
    """Step 2: ``I(z)`` on the bias for every training sample (``InfluenceResult.top_k`` gives the harmful)."""
    loss_fn = loss_fn or make_loss_fn(model)
    problem = make_problem(loss_fn, state.params, train, select=select, damping=damping, model=model,
                           model_state=state.model_state)
    return _bias_influence(problem, model, train, external, external_cf, make_solver(solver, **(solver_options or {})))


def _bias_influence(problem, model, train, external, external_cf, solver_obj, prepared=None) -> InfluenceResult:
    """``I(z) = −∇Bᵀ H⁻¹ ∇ℓ(z)`` for every sample of ``train`` (the bias on the external pairs)."""
    grad_b = objective_gradient(problem, make_bias_objective(model), (as_batch(external), as_batch(external_cf)))
    return influence_scores(problem, grad_b, train, solver_obj, prepared=prepared)


@dataclasses.dataclass
class DebiasResult:
    """What a debiasing method returns: the debiased state, a JSON-ready report and, where the
    training set was ranked, the influence scores.

    ``report`` holds ``method``, the bias and pair accuracy on ``D_ex`` before and after, the
    chosen ``step`` and ``damping``, ``kept_original`` (every candidate was rejected by the
    guard), the scored ``candidates``, ``solver_diagnostics`` and ``seconds``.
    """

    state: TrainState
    report: dict[str, Any]
    influence: InfluenceResult | None


@functools.lru_cache(maxsize=32)
def _default_loss(model: nn.Module) -> Callable[..., jax.Array]:
    """One loss function object per model, so compiled programs keyed on it are reused across calls."""
    return make_loss_fn(model)


def _replacement_values(a: Any, num_attributes: int, replacement: str, key: PRNGKey | None) -> np.ndarray:
    """The attribute values the counterfactuals take: another value (``"others"``, FMD's
    definition) or a uniform draw over all values (``"all"``, the sample keeps its own value with
    probability ``1/K``, so replaced data carries no attribute-label association)."""
    if replacement == "others" or key is None:
        return other_attribute(a, num_attributes, key)
    a = np.asarray(a)
    if num_attributes < 2:
        raise PrivDebiasError(f"a counterfactual needs at least 2 attribute values, got {num_attributes}")
    return np.asarray(jax.random.randint(key, a.shape, 0, num_attributes)).astype(np.int32)


def _pair_scores(work_model, params, ms, both_w: Dataset, correct_before: np.ndarray | None):
    """``(B, pair accuracy, kept)`` on the external pairs (originals then counterfactuals)."""
    logits, _ = predict(work_model, params, ms, both_w)
    n = len(both_w) // 2
    bias = float(counterfactual_bias_from_logits(logits[:n], logits[n:]))
    right = np.asarray(logits.argmax(-1) == np.asarray(both_w.y))
    kept = 1.0 if correct_before is None or not correct_before.any() else float(right[correct_before].mean())
    return bias, float(right.mean()), kept, right


def _proximal_minimise(loss_fn, work_state, data_w: Dataset, select, model, ms, mu: float, *, fast: bool,
                       iterations: int, cg_iterations: int, curvature: str):
    """Minimise ``mean ℓ over data_w + (μ/2)‖θ_S − θ̂_S‖²`` by Newton-CG (closed-form products for a
    cached-feature head); returns ``(NewtonUpdate, history)`` with the diagnostics of the outer
    iteration (converged when ``‖∇‖ < max(1e-5, 10⁻⁴‖∇₀‖)``)."""
    t0 = time.perf_counter()
    problem = make_problem(loss_fn, work_state.params, data_w, select=select, damping=mu, curvature=curvature,
                           model=model, model_state=ms)
    if fast:  # closed-form products of the linear softmax head on the cached features
        head = work_state.params["head"]
        kernel, bias, hist = _proximal_newton_head(
            head["kernel"], head["bias"], jnp.asarray(data_w.x), jnp.asarray(data_w.y), jnp.float32(mu),
            iterations=iterations, cg_iterations=cg_iterations,
        )
        sel = {"head/kernel": kernel, "head/bias": bias}
    else:
        sel, hist = _proximal_newton(
            loss_fn, problem.selected, problem.frozen, problem.batch, ms, jnp.float32(mu),
            iterations=iterations, cg_iterations=cg_iterations,
        )
    hist = jax.device_get(hist)
    steps_done = int(hist["steps_done"])
    history = [
        {"loss": float(hist["value"][i]), "grad_norm": float(hist["grad_norm"][i]), "step": float(hist["step"][i])}
        for i in range(steps_done + 1)
    ]
    delta_sel = jax.tree_util.tree_map(lambda a, b: a - b, sel, problem.selected)
    # converged: ‖∇‖ below 1e-5, or cut by 10⁴ from the start (float32 rarely goes further)
    g0, g_end = float(hist["grad_norm"][0]), float(hist["grad_norm"][steps_done])
    converged = bool(g_end < max(1e-5, 1e-4 * g0))
    diag = Diagnostics("proximal_newton_cg", steps_done, g_end,
                       time.perf_counter() - t0, converged,
                       {"cg_iterations": int(cg_iterations), "mu": float(mu),
                        **({} if converged else {"hit_cap": steps_done >= iterations})})
    update = NewtonUpdate(problem.with_selected(sel), delta_sel, diag, problem.num_params, time.perf_counter() - t0)
    return update, history, problem


def counterfactual_update(
    model: nn.Module,
    state: TrainState,
    external: Dataset,
    counterfactual: Callable[[Dataset, Any], Dataset],
    num_attributes: int,
    *,
    method: str = "counterfactual_update",
    mode: str = "external",
    train: Dataset | None = None,
    k: int = 100,
    select: PathFilter = LAST_LAYER,
    damping: float | Sequence[float] = 0.01,
    curvature: str = "hessian",
    solver: str = "exact",
    solver_options: dict | None = None,
    newton_iterations: int = 1,
    proximal: float = 0.01,
    cg_iterations: int = 30,
    step_sizes: Sequence[float] = (1.0,),
    max_acc_drop: float = 0.05,
    min_kept: float = 0.5,
    replacement: str = "others",
    delta: float = 0.0,
    key: PRNGKey | None = None,
    loss_fn: Callable[..., jax.Array] | None = None,
    feature_cache: bool = True,
) -> DebiasResult:
    r"""Identify → evaluate → remove → guard (module docstring), updating only the ``select`` subset.

    The named methods (:func:`~privdebias_jax.debias.fmd.fmd`,
    :func:`~privdebias_jax.debias.head_retrain.head_retrain`,
    :func:`~privdebias_jax.debias.proximal_finetune.proximal_finetune`) call this with their
    settings fixed; call it directly to explore combinations that are none of them.

    Args:
      model, state: the trained model.
      external: the external set ``D_ex`` (samples with ``y`` and ``a``; never the test set you
        report on).
      counterfactual: ``counterfactual(ds, a_new) -> Dataset`` (``DataSplits.counterfactual``).
      num_attributes: values of the protected attribute (≥ 2).
      method: the name written in the report.
      mode: ``"external"`` (update from ``D_ex`` pairs only) or ``"train"`` (rank the training
        set by influence on the bias, replace the top-``k`` by their counterfactuals).
      train: the training set (``mode="train"``).
      k: number of samples replaced (``mode="train"``), in ``[1, len(train)]``; ``k = len(train)``
        replaces every sample without ranking.
      select: parameter subset (regex on ``/``-joined paths; ``"^head/"`` = last layer).
      damping: ``λ > 0`` added to the curvature, or a sequence of values: one step per value,
        the guard choosing among all of them on ``D_ex``.
      curvature: ``"hessian"`` or ``"gauss_newton"`` (equal for a linear softmax head).
      solver, solver_options: inverse-HVP solver by name (``exact``, ``linear_head``, ``cg``, ...).
      newton_iterations: ``1`` is one Newton step; ``T > 1`` minimises the modified objective
        (module docstring) by up to ``T`` Newton-CG steps (Armijo backtracking, stopping at
        ``‖∇‖ < 1e-5``), jitted end to end; the proximal weight is ``λ`` in training mode and
        ``μ = proximal`` in external mode.
      proximal: ``μ > 0`` of the iterated external mode.
      cg_iterations: CG iterations per Newton step of the iterated modes.
      step_sizes: multipliers ``m`` of the step tried, besides ``m = 0`` (the model unchanged).
      max_acc_drop: largest drop of the pair accuracy on ``D_ex`` a candidate may cause.
      min_kept: smallest fraction of the pair predictions right before the update that must
        stay right (``0`` switches this check off).
      replacement: ``"others"`` (counterfactuals take another attribute value, FMD's
        definition) or ``"all"`` (a uniform draw over all values) for the replaced training
        samples; ``D_ex``'s pairs always take another value.
      delta: fairness threshold of step 1; with ``B ≤ δ`` the model is returned unchanged.
      key: draws the counterfactual attribute values (a fixed cyclic shift when None).
      loss_fn: the training loss (default: mean cross-entropy of the model).
      feature_cache: with ``select="^head/"`` and the default loss, compute the frozen
        backbone's features once and run every step on the linear head alone (exact: the
        backbone does not change).

    Returns:
      :class:`DebiasResult` with the new state (only the subset differs) and the report.

    Raises:
      PrivDebiasError: unknown mode or replacement, ``k`` out of range, a missing training set,
        a non-positive damping, an empty external set, a filter that matches no parameter,
        fewer than 2 attribute values, empty ``step_sizes``, out-of-range guard settings.
    """
    if mode not in MODES:
        raise PrivDebiasError(f"unknown mode {mode!r}; expected one of {MODES}")
    if replacement not in REPLACEMENTS:
        raise PrivDebiasError(f"unknown replacement {replacement!r}; expected one of {REPLACEMENTS}")
    if not delta >= 0:
        raise PrivDebiasError(f"delta must be ≥ 0, got {delta}")
    dampings = tuple(float(x) for x in (damping if isinstance(damping, (list, tuple)) else (damping,)))
    if not dampings or not all(np.isfinite(x) and x > 0 for x in dampings):
        raise PrivDebiasError(f"damping must be > 0 (one value or a non-empty list), got {damping}")
    if int(num_attributes) < 2:
        raise PrivDebiasError(
            f"counterfactuals need at least 2 attribute values, got num_attributes={num_attributes}")
    if len(external) == 0:
        raise PrivDebiasError("the external set is empty")
    if not step_sizes:
        raise PrivDebiasError("step_sizes is empty")
    if not (0.0 <= float(max_acc_drop) <= 1.0):
        raise PrivDebiasError(f"max_acc_drop must be in [0, 1], got {max_acc_drop}")
    if not (0.0 <= float(min_kept) <= 1.0):
        raise PrivDebiasError(f"min_kept must be in [0, 1], got {min_kept}")
    if int(newton_iterations) < 1:
        raise PrivDebiasError(f"newton_iterations must be ≥ 1, got {newton_iterations}")
    if mode == "external" and int(newton_iterations) > 1:
        if not (np.isfinite(proximal) and proximal > 0):
            raise PrivDebiasError(f"the iterated external mode needs proximal > 0, got {proximal}")
        if int(cg_iterations) < 1:
            raise PrivDebiasError(f"cg_iterations must be ≥ 1, got {cg_iterations}")
    if mode == "train":
        if train is None:
            raise PrivDebiasError("mode='train' needs the training set (or use mode='external')")
        if not 1 <= int(k) <= len(train):
            raise PrivDebiasError(f"K must be in [1, {len(train)}] (the training-set size), got {k}")
    split_params(state.params, select)  # a filter matching no parameter fails here, before any work
    keys = jax.random.split(key, 2) if key is not None else (None, None)
    t_all = time.perf_counter()
    # Work in feature space when only the last layer changes and the loss is the default one:
    # the backbone is frozen, so features are computed once and every product costs a matmul.
    fast = feature_cache and loss_fn is None and select == LAST_LAYER and "head" in state.params
    if fast:
        work_model = LinearHead(int(np.shape(state.params["head"]["kernel"])[1]))
        work_state = state.replace(params={"head": state.params["head"]}, model_state={})
        work_select: PathFilter = None

        def to_work(ds: Dataset) -> Dataset:
            _, feats = predict(model, state.params, state.model_state, ds)
            return Dataset(x=feats, y=ds.y, a=ds.a, idx=ds.idx)
    else:
        work_model, work_state, work_select = model, state, select

        def to_work(ds: Dataset) -> Dataset:
            return ds
    loss_fn = loss_fn or _default_loss(work_model)
    ms = work_state.model_state

    # 1. identify
    t0 = time.perf_counter()
    ext_cf_raw = counterfactual(external, other_attribute(external.a, num_attributes, keys[0]))
    # one forward pass over the pairs (originals, then counterfactuals)
    both_w = to_work(Dataset(x=np.concatenate([np.asarray(external.x), np.asarray(ext_cf_raw.x)]),
                             y=np.concatenate([np.asarray(external.y), np.asarray(ext_cf_raw.y)]),
                             a=np.concatenate([np.asarray(external.a), np.asarray(ext_cf_raw.a)]),
                             idx=np.arange(2 * len(external), dtype=np.int64)))
    n_ex = len(external)
    ext_w = Dataset(both_w.x[:n_ex], external.y, external.a, external.idx)
    ext_cf = Dataset(both_w.x[n_ex:], ext_cf_raw.y, ext_cf_raw.a, ext_cf_raw.idx)
    bias_before, acc_before, _, correct_before = _pair_scores(work_model, work_state.params, ms, both_w, None)
    t_identify = time.perf_counter() - t0
    report: dict[str, Any] = {
        "method": method,
        "mode": mode,
        "external_size": n_ex,
        "bias_external_before": bias_before,
        "acc_external_before": acc_before,
        "delta": float(delta),
        "biased": bool(bias_before > delta),
        "solver": solver,
        "curvature": curvature,
        "damping": dampings[0] if len(dampings) == 1 else list(dampings),
        "replacement": replacement,
        "select": select if isinstance(select, str) else repr(select),
        "feature_space": bool(fast),
        "uses_training_set": mode == "train",
        "newton_iterations": int(newton_iterations),
        "guard": {"max_acc_drop": float(max_acc_drop), "min_kept": float(min_kept)},
    }
    if not report["biased"]:
        report.update(updated=False, kept_original=True,
                      seconds={"identify": t_identify, "total": time.perf_counter() - t_all})
        return DebiasResult(state, report, None)

    # 2. evaluate and 3. remove: one update per damping value
    solver_obj = make_solver(solver, **(solver_options or {}))
    influence = None
    updates: list[tuple[float, Any]] = []
    t_eval = t_remove = 0.0
    train_w = to_work(train) if mode == "train" else None
    for lam in dampings:
        if mode == "train":
            t0 = time.perf_counter()
            problem = make_problem(loss_fn, work_state.params, train_w, select=work_select, damping=lam,
                                   curvature=curvature, model=work_model, model_state=ms)
            ranked = int(k) < len(train_w)
            prepared = solver_obj.prepare(problem) if ranked or int(newton_iterations) == 1 else None
            if ranked:
                influence = _bias_influence(problem, work_model, train_w, ext_w, ext_cf, solver_obj, prepared)
                rows = influence.top_k(k)
            else:  # every sample is replaced: no ranking needed
                rows = np.arange(len(train_w))
            t_eval += time.perf_counter() - t0
            t0 = time.perf_counter()
            harmful = subset(train_w, rows)
            harmful_raw = subset(train, rows)
            harmful_cf = to_work(counterfactual(
                harmful_raw, _replacement_values(harmful_raw.a, num_attributes, replacement, keys[1])))
            if int(newton_iterations) > 1:  # retrain the subset on the modified data, proximal weight λ
                update, report["newton_history"], problem = _proximal_minimise(
                    loss_fn, work_state, concat(drop_ids(train_w, harmful.idx), harmful_cf), work_select,
                    work_model, ms, lam, fast=fast, iterations=int(newton_iterations),
                    cg_iterations=int(cg_iterations), curvature=curvature)
            else:
                update = newton_update(problem, harmful, harmful_cf, solver=solver_obj, prepared=prepared)
            report["k"] = int(k)
            report["harmful_ids"] = np.asarray(harmful.idx).tolist()
            report["harmful_fraction_aligned"] = float(np.mean(np.asarray(harmful.y) == np.asarray(harmful.a)))
        elif int(newton_iterations) > 1:  # iterated external mode: one compiled proximal Newton-CG
            t0 = time.perf_counter()
            update, report["newton_history"], problem = _proximal_minimise(
                loss_fn, work_state, both_w, work_select, work_model, ms, float(proximal), fast=fast,
                iterations=int(newton_iterations), cg_iterations=int(cg_iterations), curvature=curvature)
            report["proximal"] = float(proximal)
        else:
            t0 = time.perf_counter()
            problem = make_problem(loss_fn, work_state.params, ext_w, select=work_select, damping=lam,
                                   curvature=curvature, model=work_model, model_state=ms)
            prepared = solver_obj.prepare(problem)
            t_eval += time.perf_counter() - t0
            t0 = time.perf_counter()
            update = newton_update(problem, ext_w, ext_cf, solver=solver_obj, prepared=prepared)
        t_remove += time.perf_counter() - t0
        updates.append((lam, update))

    # 4. guard: score every candidate on the external pairs
    t0 = time.perf_counter()
    multipliers = sorted({0.0, *(float(x) for x in step_sizes)})  # step 0 = keep the model
    candidates = []
    for lam, update in updates:
        finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(update.delta))
        if not finite:
            report.setdefault("non_finite_steps", []).append(
                {"damping": float(lam), "solver": update.diagnostics.solver})
        if fast:  # every candidate's logits on the cached features in one compiled call
            head, dhead = work_state.params["head"], merge_params(update.delta, {})["head"]
            biases, accs, kepts = jax.device_get(_head_candidates(
                head["kernel"], head["bias"], dhead["kernel"], dhead["bias"], jnp.asarray(multipliers, jnp.float32),
                jnp.asarray(both_w.x), jnp.asarray(both_w.y), jnp.asarray(correct_before)))
        for j, m in enumerate(multipliers):
            if m == 0.0 and candidates:
                continue
            if m == 0.0:  # the model as it was (never θ + 0·Δ, which is NaN where Δ is inf)
                candidates.append({"step": 0.0, "damping": float(lam), "bias_external": bias_before,
                                   "acc_external": acc_before, "kept": 1.0, "qualified": True,
                                   "params": work_state.params, "diagnostics": update.diagnostics})
                continue
            sel = jax.tree_util.tree_map(lambda p, d, m=m: p + m * d, problem.selected, update.delta)
            params = problem.with_selected(sel)
            if fast:
                b, acc, kept = float(biases[j]), float(accs[j]), float(kepts[j])
            else:
                b, acc, kept, _ = _pair_scores(work_model, params, ms, both_w, correct_before)
            ok = finite and np.isfinite(b) and acc >= acc_before - max_acc_drop and kept >= min_kept
            candidates.append({"step": float(m), "damping": float(lam), "bias_external": b, "acc_external": acc,
                               "kept": kept, "qualified": bool(ok), "params": params,
                               "diagnostics": update.diagnostics})
    best = min((c for c in candidates if c["qualified"]), key=lambda c: (c["bias_external"], c["step"]))
    new_params = best["params"]
    if fast:
        new_params = {**state.params, "head": new_params["head"]}
    jax.block_until_ready(new_params)
    t_guard = time.perf_counter() - t0
    new_state = state.replace(params=new_params)
    chosen_diag = best["diagnostics"] if best["step"] > 0 else updates[0][1].diagnostics
    report.update(
        updated=best["step"] > 0,
        step=best["step"],
        damping_chosen=best["damping"],
        kept_original=best["step"] == 0.0,
        bias_external_after=best["bias_external"],
        acc_external_after=best["acc_external"],
        kept_after=best["kept"],
        candidates=[{k2: v for k2, v in c.items() if k2 not in ("params", "diagnostics")} for c in candidates],
        num_params_updated=updates[0][1].num_params_updated,
        solver_diagnostics=chosen_diag.as_dict(),
        seconds={"identify": t_identify, "evaluate": t_eval, "remove": t_remove, "guard": t_guard,
                 "total": time.perf_counter() - t_all},
    )
    return DebiasResult(new_state, report, influence)


def warnings_of(report: dict[str, Any]) -> list[str]:
    """One line for each thing a user must hear: a guard that rejected every step, a solver that
    stopped at its cap or did not converge, a model judged fair already (nothing was done)."""
    lines = []
    name = report.get("method", "debias")
    if not report.get("biased", True):
        lines.append(f"{name}: the bias on D_ex ({report['bias_external_before']:.4f}) is ≤ δ = "
                     f"{report['delta']}; the model is unchanged")
        return lines
    if report.get("kept_original"):
        rejected = [c for c in report.get("candidates", []) if c["step"] > 0]
        worst = min(rejected, key=lambda c: c["bias_external"]) if rejected else None
        detail = "" if worst is None else (
            f" (lowest-bias step: m={worst['step']}, λ={worst['damping']}: bias {worst['bias_external']:.3f}, "
            f"pair accuracy {worst['acc_external']:.3f} vs {report['acc_external_before']:.3f} before, "
            f"kept {worst['kept']:.3f})")
        lines.append(f"{name}: the guard rejected every step on D_ex{detail}; the model is unchanged")
    for bad in report.get("non_finite_steps", []):
        lines.append(f"{name}: the step at λ={bad['damping']} holds NaN or inf (solver {bad['solver']} diverged); "
                     "it was not taken")
    diag = report.get("solver_diagnostics") or {}
    if diag and not diag.get("converged", True):
        solver = diag.get("solver", report.get("solver"))
        res = diag.get("residual")
        res = f"{res:.3g}" if isinstance(res, (int, float)) else res
        flags = diag.get("flags") or {}
        tol = diag.get("residual_tol")
        if solver == "proximal_newton_cg" or tol is None:
            what = "gradient norm" if solver == "proximal_newton_cg" else "residual"
            lines.append(f"{name}: solver {solver} did not converge ({diag.get('iterations')} iterations, {what} {res})")
        elif not diag.get("iteration_converged", False):
            if flags.get("non_finite"):
                why = "returned NaN or inf"
            elif flags.get("diverged"):
                why = "diverged"
            elif flags.get("negative_curvature"):
                why = "stopped at a direction of negative curvature"
            else:
                why = "stopped at its iteration cap"
            lines.append(f"{name}: solver {solver} {why} ({diag.get('iterations')} iterations, residual {res} "
                         "against the true curvature)")
        else:
            lines.append(f"{name}: solver {solver}: residual {res} against the true curvature above tol {tol:.3g} "
                         f"({diag.get('iterations')} iterations; its own iteration converged)")
    return lines


@functools.partial(jax.jit, static_argnames=("loss_fn", "iterations", "cg_iterations"))
def _proximal_newton(loss_fn, selected0, frozen, batch, model_state, mu, *, iterations: int, cg_iterations: int):
    """Minimise ``F(s) = loss_fn(s ∪ frozen, batch) + (μ/2)‖s − s⁰‖²`` over the subset ``s``.

    Newton-CG (``cg_iterations`` CG steps on ``∇²F d = ∇F``, Hessian-vector products by
    forward-over-reverse), Armijo backtracking (halving from 1 down to 2⁻²⁰), at most
    ``iterations`` steps, stopping once ``‖∇F‖ < 1e-5``. ``F`` is ``μ``-strongly convex when the
    loss is convex in ``s`` (the last layer under cross-entropy), so the iterates converge to
    its unique minimiser. Returns the subset and a history (value, gradient norm, step).
    """
    leaves = jax.tree_util.tree_leaves

    def f(s):
        prox = sum(jnp.sum((x - y) ** 2) for x, y in zip(leaves(s), leaves(selected0), strict=True))
        params = merge_params(s, frozen)
        value = loss_fn(params, batch) if model_state is None else loss_fn(params, batch, model_state)
        return value + 0.5 * mu * prox

    grad = jax.grad(f)
    return _newton_cg(f, grad, lambda s: (lambda v: jax.jvp(grad, (s,), (v,))[1]), selected0,
                      iterations=iterations, cg_iterations=cg_iterations)


@functools.partial(jax.jit, static_argnames=("iterations", "cg_iterations"))
def _proximal_newton_head(kernel0, bias0, features, labels, mu, *, iterations: int, cg_iterations: int):
    """:func:`_proximal_newton` for a linear softmax head on fixed features, in closed form.

    ``F(W, b) = (1/n) Σ_i CE(h_i W + b, y_i) + (μ/2)(‖W − W⁰‖² + ‖b − b⁰‖²)``; with
    ``P = softmax(Z)`` over the classes, the gradient is ``(Rᵀ H, Σ_i R_i)`` for
    ``R = (P − onehot(y))/n`` and the Hessian-vector product of ``(V, v)`` is
    ``(Rᵀ H + μV, Σ_i R_i + μv)`` for ``U = HV + v``, ``R = (P ⊙ U − P ⊙ (P ⊙ U)1)/n`` (the
    softmax Jacobian). Everything is kept class-major (``Wᵀ`` is ``C × F``, ``Zᵀ`` is ``C × n``):
    XLA's CPU matrix products with the small class dimension as rows run several times faster
    than with it as columns, which is most of the cost of the CG iterations. Same iterations,
    stopping rule and line search as the generic program; returns ``(W, b, history)``.
    """
    h = features.astype(jnp.float32)
    h_t = h.T  # F × n
    onehot_t = jax.nn.one_hot(labels, kernel0.shape[1], dtype=jnp.float32).T  # C × n
    n = h.shape[0]
    x0 = (kernel0.T, bias0)

    def logits_t(x):
        return x[0] @ h_t + x[1][:, None]

    def f(x):
        z = logits_t(x)
        ce = jnp.sum(jax.nn.logsumexp(z, axis=0) - jnp.sum(onehot_t * z, axis=0)) / n
        return ce + 0.5 * mu * (jnp.sum((x[0] - x0[0]) ** 2) + jnp.sum((x[1] - x0[1]) ** 2))

    def grad(x):
        r = (jax.nn.softmax(logits_t(x), axis=0) - onehot_t) / n
        return (r @ h + mu * (x[0] - x0[0]), r.sum(1) + mu * (x[1] - x0[1]))

    def hvp_at(x):
        p = jax.nn.softmax(logits_t(x), axis=0)

        def hvp(v):
            pu = p * (v[0] @ h_t + v[1][:, None])
            r = (pu - p * pu.sum(0, keepdims=True)) / n
            return (r @ h + mu * v[0], r.sum(1) + mu * v[1])

        return hvp

    (w_t, b), hist = _newton_cg(f, grad, hvp_at, x0, iterations=iterations, cg_iterations=cg_iterations)
    return w_t.T, b, hist


@jax.jit
def _head_candidates(kernel, bias, dkernel, dbias, multipliers, features, labels, correct_before):
    """``(B, pair accuracy, kept)`` of the heads ``(W + m·ΔW, b + m·Δb)`` for every multiplier
    ``m``, on the cached features of the external pairs (originals, then counterfactuals): the
    same numbers :func:`_pair_scores` gives, one compiled call for all candidates."""
    n = features.shape[0] // 2
    was_right = correct_before.astype(jnp.float32)

    def score(m):
        logits = features @ (kernel + m * dkernel) + (bias + m * dbias)
        gaps = _counterfactual_gaps(logits[:n], logits[n:])
        right = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        kept = jnp.where(was_right.sum() > 0, jnp.sum(right * was_right) / jnp.maximum(was_right.sum(), 1.0), 1.0)
        return gaps.mean(), right.mean(), kept

    return jax.vmap(score)(multipliers)


def _newton_cg(f, grad, hvp_at, x0, *, iterations: int, cg_iterations: int):
    """Damped Newton-CG on a pytree: ``d`` from ``cg_iterations`` CG steps on ``∇²F(x) d = ∇F(x)``
    (``hvp_at(x)`` the product at ``x``), Armijo backtracking from 1 by halving down to 2⁻²⁰, at
    most ``iterations`` steps, stopping once ``‖∇F‖ < 1e-5``. Returns ``(x, history)``."""
    tmap = jax.tree_util.tree_map
    leaves = jax.tree_util.tree_leaves

    def vdot(a, b):
        return sum(jnp.vdot(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))

    hist0 = {"value": jnp.full((iterations + 1,), jnp.nan), "grad_norm": jnp.full((iterations + 1,), jnp.nan),
             "step": jnp.zeros((iterations + 1,))}

    def record(h, i, v, gn, t):
        return {"value": h["value"].at[i].set(v), "grad_norm": h["grad_norm"].at[i].set(gn),
                "step": h["step"].at[i].set(t)}

    def norm(g):
        return jnp.sqrt(vdot(g, g))

    def cond(carry):
        i, _, _, g, _ = carry
        return (i < iterations) & (norm(g) >= 1e-5)

    def body(carry):
        i, x, value, g, h = carry
        d, _ = jax.scipy.sparse.linalg.cg(hvp_at(x), g, maxiter=cg_iterations)
        slope = vdot(g, d)

        def shorten(t):
            return t * 0.5

        def too_long(t):
            return (f(tmap(lambda p, q: p - t * q, x, d)) > value - 1e-4 * t * jnp.maximum(slope, 0.0)) & (
                t > 2.0**-20)

        t = jax.lax.while_loop(too_long, shorten, jnp.float32(1.0))
        x = tmap(lambda p, q: p - t * q, x, d)
        value, g = f(x), grad(x)
        return i + 1, x, value, g, record(h, i + 1, value, norm(g), t)

    v0, g0 = f(x0), grad(x0)
    i, x, _, _, h = jax.lax.while_loop(cond, body, (0, x0, v0, g0, record(hist0, 0, v0, norm(g0), 0.0)))
    return x, {**h, "steps_done": i}


def split_external(ds: Dataset, size: int, key: PRNGKey | int = 0) -> tuple[Dataset, Dataset]:
    """Draw an external set of ``size`` samples from ``ds``; returns ``(external, rest)`` (disjoint ids).

    Raises:
      PrivDebiasError: if ``size`` is not in ``[1, len(ds) − 1]``.
    """
    if not 1 <= int(size) < len(ds):
        raise PrivDebiasError(f"external-set size must be in [1, {len(ds) - 1}], got {size}")
    key = jax.random.key(key) if isinstance(key, int) else key
    order = np.asarray(jax.random.permutation(key, len(ds)))
    return subset(ds, np.sort(order[: int(size)])), subset(ds, np.sort(order[int(size) :]))


def drop_ids(ds: Dataset, ids: Any) -> Dataset:
    """``ds`` without the samples whose ids are in ``ids`` (ids not present are ignored)."""
    return subset(ds, ~np.isin(np.asarray(ds.idx), np.asarray(ids)))


__all__ = [
    "MODES",
    "REPLACEMENTS",
    "DebiasResult",
    "LinearHead",
    "make_bias_objective",
    "counterfactual_bias_value",
    "identify_bias",
    "rank_harmful",
    "counterfactual_update",
    "warnings_of",
    "split_external",
    "drop_ids",
]
