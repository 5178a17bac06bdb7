"""FMD: Fast Model Debias with machine unlearning (Chen et al., NeurIPS 2023).

Three steps on a trained model, touching only a small parameter subset (the last layer by
default):

1. **Identify** (:func:`identify_bias`): counterfactual bias per attribute,
   ``B(θ) = mean_i |p(ŷ_i | x_i, a_i) − p(ŷ_i | x_i, ā_i)|`` over an external set of pairs;
   the attribute is biased when ``B > δ``.
2. **Evaluate** (:func:`rank_harmful`): influence of every training sample on the bias,
   ``I(z) = −∇_θ B(θ)ᵀ H⁻¹ ∇_θ ℓ(z, θ)`` (``H`` the Hessian of the mean training loss on the
   subset, damped); the top-K largest ``I(z)`` are the harmful samples (removing them lowers
   ``B`` the most; see :mod:`privdebias_jax.influence.influence` for the sign convention).
3. **Remove** (:func:`fmd_debias`): one Newton step that replaces each harmful sample by its
   counterfactual, ``θ' = θ + (1/n) H⁻¹ Σ_k (∇ℓ(z_k) − ∇ℓ(z̄_k))`` (``mode="train"``), or, when
   the training data is unavailable (``mode="external"``), the same update built from the
   external pairs alone with ``H`` over the external set and ``n = |D_ex|``. Iterated
   (``newton_iterations > 1``), the external mode minimises
   ``L_ex(θ) = (1/2n) Σ_k [ℓ(z_k, θ) + ℓ(z̄_k, θ)] + (μ/2)‖θ_S − θ_S⁰‖²`` by damped Newton-CG in
   one compiled program: every external digit seen in two colours, the proximal term standing
   in for the curvature of the training data that is not available. It needs one forward pass
   over ``2|D_ex|`` samples and nothing of the training set, which is what makes it fast.

A step multiplier may be chosen from a grid on the **external set only** (lowest bias whose
external accuracy drops by at most ``max_acc_drop``); test data are never looked at.
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
from privdebias_jax.influence.params import PathFilter, merge_params
from privdebias_jax.influence.solvers import Diagnostics
from privdebias_jax.metrics.fairness import _counterfactual_gaps, counterfactual_bias_from_logits
from privdebias_jax.train import TrainState, apply_model, make_loss_fn, predict
from privdebias_jax.types import PrivDebiasError, PRNGKey

MODES = ("external", "train")


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
class FMDResult:
    """What :func:`fmd_debias` returns: the debiased state and a JSON-ready report."""

    state: TrainState
    report: dict[str, Any]
    influence: InfluenceResult | None


@functools.lru_cache(maxsize=32)
def _default_loss(model: nn.Module) -> Callable[..., jax.Array]:
    """One loss function object per model, so compiled programs keyed on it are reused across calls."""
    return make_loss_fn(model)


def _bias_and_accuracy(model: nn.Module, params: Any, model_state: Any, pairs: Dataset) -> tuple[float, float]:
    """``(B(θ), accuracy on the originals)`` from one forward pass over ``pairs`` = originals
    followed by their counterfactuals (same order)."""
    logits, _ = predict(model, params, model_state, pairs)
    n = len(pairs) // 2
    bias = float(counterfactual_bias_from_logits(logits[:n], logits[n:]))
    return bias, float(np.mean(logits[:n].argmax(-1) == np.asarray(pairs.y[:n])))


def fmd_debias(
    model: nn.Module,
    state: TrainState,
    external: Dataset,
    counterfactual: Callable[[Dataset, Any], Dataset],
    num_attributes: int,
    *,
    mode: str = "external",
    train: Dataset | None = None,
    k: int = 100,
    select: PathFilter = LAST_LAYER,
    damping: float = 0.01,
    solver: str = "exact",
    solver_options: dict | None = None,
    newton_iterations: int = 1,
    proximal: float = 0.01,
    cg_iterations: int = 30,
    step_sizes: Sequence[float] = (1.0,),
    max_acc_drop: float = 0.02,
    delta: float = 0.0,
    key: PRNGKey | None = None,
    loss_fn: Callable[..., jax.Array] | None = None,
    feature_cache: bool = True,
) -> FMDResult:
    r"""Debias ``state`` by FMD's identify → evaluate → remove, updating only the ``select`` subset.

    Args:
      model, state: the trained model.
      external: the external set ``D_ex`` (samples with ``y`` and ``a``; never the test set you
        report on).
      counterfactual: ``counterfactual(ds, a_new) -> Dataset`` (``DataSplits.counterfactual``).
      num_attributes: values of the protected attribute (``ā`` is drawn among the others).
      mode: ``"external"`` (update from ``D_ex`` pairs only) or ``"train"`` (rank the training
        set by influence on the bias, replace the top-``k`` by their counterfactuals).
      train: the training set (``mode="train"``).
      k: number of harmful samples replaced (``mode="train"``), in ``[1, len(train)]``.
      select: parameter subset (regex on ``/``-joined paths; ``"^head/"`` = last layer).
      damping: ``λ > 0`` added to the Hessian.
      solver, solver_options: inverse-HVP solver by name (``exact``, ``linear_head``, ``cg``, ...).
      newton_iterations: ``1`` is FMD's single Newton step. ``T > 1`` (``mode="train"``)
        continues with ``T − 1`` damped Newton steps on the modified objective
        ``L'(θ) = mean ℓ over (D \ top-K) ∪ counterfactuals(top-K)`` (the Hessian and gradient
        re-evaluated at each iterate, Armijo line search, Levenberg-Marquardt damping), which
        converges to retraining the subset on the modified data: beyond the paper, useful
        when one step is too short. ``T > 1`` with ``mode="external"`` runs up to ``T``
        Newton-CG steps (Armijo backtracking, stopping at ``‖∇L_ex‖ < 1e-5``) on
        ``L_ex(θ) = (1/2n) Σ_k [ℓ(z_k) + ℓ(z̄_k)] + (μ/2)‖θ_S − θ_S⁰‖²``, jitted end to end.
      proximal: ``μ > 0`` of the iterated external mode (the weight keeping ``θ_S`` near the
        trained model; larger = a smaller change).
      cg_iterations: conjugate-gradient iterations per Newton step of the iterated external mode.
      step_sizes: multipliers ``m`` of the Newton step tried, besides ``m = 0`` (the model as it
        was); the one with the lowest external bias among those whose external accuracy drops
        by at most ``max_acc_drop`` is kept, so a step that wrecks accuracy is never taken
        (``report["kept_original"]`` says when no step qualified).
      delta: fairness threshold of step 1; with ``B ≤ δ`` the model is returned unchanged.
      key: draws the counterfactual attribute values (a fixed cyclic shift when None).
      loss_fn: the training loss (default: mean cross-entropy of the model).
      feature_cache: with ``select="^head/"`` and the default loss, compute the frozen
        backbone's features once and run every step on the linear head alone (exact: the
        backbone does not change); otherwise every product runs through the whole model.
        There the iterated external mode runs its Newton-CG in closed form on the head
        (:func:`_proximal_newton_head`, the same steps as the generic program) and scores
        every step candidate in one compiled call.

    Returns:
      :class:`FMDResult` with the new state (only the subset differs) and a report: bias and
      external accuracy before/after, the chosen step, seconds per step, parameters updated.

    Raises:
      PrivDebiasError: unknown mode, ``k`` out of range, missing training set, non-positive
        damping, an empty external set, empty ``step_sizes``.
    """
    if mode not in MODES:
        raise PrivDebiasError(f"unknown FMD mode {mode!r}; expected one of {MODES}")
    if not delta >= 0:
        raise PrivDebiasError(f"delta must be ≥ 0, got {delta}")
    if not damping > 0:
        raise PrivDebiasError(f"FMD needs damping > 0, got {damping}")
    if len(external) == 0:
        raise PrivDebiasError("the external set is empty")
    if not step_sizes:
        raise PrivDebiasError("step_sizes is empty")
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
    bias_before, acc_before = _bias_and_accuracy(work_model, work_state.params, work_state.model_state, both_w)
    identified = {"bias": bias_before, "biased": bool(bias_before > delta), "delta": float(delta), "pairs": n_ex}
    t_identify = time.perf_counter() - t0
    report: dict[str, Any] = {
        "mode": mode,
        "external_size": len(external),
        "bias_external_before": identified["bias"],
        "acc_external_before": acc_before,
        "delta": float(delta),
        "biased": identified["biased"],
        "solver": solver,
        "damping": float(damping),
        "select": select if isinstance(select, str) else repr(select),
        "feature_space": bool(fast),
        "uses_training_set": mode == "train",
    }
    if not identified["biased"]:
        report.update(updated=False, seconds={"identify": t_identify, "total": time.perf_counter() - t_all})
        return FMDResult(state, report, None)

    # 2. evaluate and 3. remove
    solver_obj = make_solver(solver, **(solver_options or {}))
    influence = None
    ms = work_state.model_state
    if mode == "train":
        t0 = time.perf_counter()
        train_w = to_work(train)
        problem = make_problem(loss_fn, work_state.params, train_w, select=work_select, damping=damping,
                               model=work_model, model_state=ms)
        prepared = solver_obj.prepare(problem)
        if int(k) < len(train_w):
            influence = _bias_influence(problem, work_model, train_w, ext_w, ext_cf, solver_obj, prepared)
            rows = influence.top_k(k)
        else:  # every sample is replaced: no ranking needed
            rows = np.arange(len(train_w))
        t_eval = time.perf_counter() - t0
        t0 = time.perf_counter()
        harmful = subset(train_w, rows)
        harmful_raw = subset(train, rows)
        harmful_cf = to_work(counterfactual(harmful_raw, other_attribute(harmful_raw.a, num_attributes, keys[1])))
        update = newton_update(problem, harmful, harmful_cf, solver=solver_obj, prepared=prepared)
        if int(newton_iterations) > 1:
            update, history = _continue_newton(
                problem, update, concat(drop_ids(train_w, harmful.idx), harmful_cf), solver_obj,
                int(newton_iterations) - 1, loss_fn, work_model, ms,
            )
            report["newton_history"] = history
        report["newton_iterations"] = int(newton_iterations)
        report["k"] = int(k)
        report["harmful_ids"] = np.asarray(harmful.idx).tolist()
        report["harmful_fraction_aligned"] = float(np.mean(np.asarray(harmful.y) == np.asarray(harmful.a)))
    elif int(newton_iterations) > 1:  # iterated external mode: one compiled proximal Newton-CG
        t_eval = 0.0
        t0 = time.perf_counter()
        problem = make_problem(loss_fn, work_state.params, both_w, select=work_select, damping=damping,
                               model=work_model, model_state=ms)
        if fast:  # closed-form products of the linear softmax head on the cached features
            head = work_state.params["head"]
            kernel, bias, hist = _proximal_newton_head(
                head["kernel"], head["bias"], jnp.asarray(both_w.x), jnp.asarray(both_w.y), jnp.float32(proximal),
                iterations=int(newton_iterations), cg_iterations=int(cg_iterations),
            )
            sel = {"head/kernel": kernel, "head/bias": bias}
        else:
            sel, hist = _proximal_newton(
                loss_fn, problem.selected, problem.frozen, problem.batch, ms, jnp.float32(proximal),
                iterations=int(newton_iterations), cg_iterations=int(cg_iterations),
            )
        hist = jax.device_get(hist)
        steps_done = int(hist["steps_done"])
        report["newton_history"] = [
            {"loss": float(hist["value"][i]), "grad_norm": float(hist["grad_norm"][i]), "step": float(hist["step"][i])}
            for i in range(steps_done + 1)
        ]
        report["newton_iterations"] = int(newton_iterations)
        report["proximal"] = float(proximal)
        delta_sel = jax.tree_util.tree_map(lambda a, b: a - b, sel, problem.selected)
        diag = Diagnostics("proximal_newton_cg", steps_done, float(hist["grad_norm"][steps_done]),
                           time.perf_counter() - t0, bool(hist["grad_norm"][steps_done] < 1e-5),
                           {"cg_iterations": int(cg_iterations)})
        update = NewtonUpdate(problem.with_selected(sel), delta_sel, diag, problem.num_params,
                              time.perf_counter() - t0)
    else:
        t0 = time.perf_counter()
        problem = make_problem(loss_fn, work_state.params, ext_w, select=work_select, damping=damping,
                               model=work_model, model_state=ms)
        prepared = solver_obj.prepare(problem)
        t_eval = time.perf_counter() - t0
        t0 = time.perf_counter()
        update = newton_update(problem, ext_w, ext_cf, solver=solver_obj, prepared=prepared)
    # choose the step on the external set
    multipliers = sorted({0.0, *(float(x) for x in step_sizes)})  # step 0 = keep the model
    if fast:  # every candidate's logits on the cached features in one compiled call
        head, dhead = work_state.params["head"], merge_params(update.delta, {})["head"]
        biases, accs = jax.device_get(_head_candidates(
            head["kernel"], head["bias"], dhead["kernel"], dhead["bias"], jnp.asarray(multipliers, jnp.float32),
            jnp.asarray(both_w.x), jnp.asarray(both_w.y)))
        scores = [(float(b), float(acc)) for b, acc in zip(biases, accs, strict=True)]
    candidates = []
    for j, m in enumerate(multipliers):
        sel = jax.tree_util.tree_map(lambda p, d, m=m: p + m * d, problem.selected, update.delta)
        params = problem.with_selected(sel)
        b, acc = scores[j] if fast else _bias_and_accuracy(work_model, params, ms, both_w)
        candidates.append({"step": float(m), "bias_external": b, "acc_external": acc, "params": params})
    ok = [c for c in candidates if c["acc_external"] >= acc_before - max_acc_drop]  # never empty: step 0
    best = min(ok, key=lambda c: (c["bias_external"], c["step"]))
    new_params = best["params"]
    if fast:
        new_params = {**state.params, "head": new_params["head"]}
    jax.block_until_ready(new_params)
    t_remove = time.perf_counter() - t0
    new_state = state.replace(params=new_params)
    report.update(
        updated=True,
        step=best["step"],
        kept_original=best["step"] == 0.0,
        bias_external_after=best["bias_external"],
        acc_external_after=best["acc_external"],
        candidates=[{k2: v for k2, v in c.items() if k2 != "params"} for c in candidates],
        num_params_updated=update.num_params_updated,
        solver_diagnostics=update.diagnostics.as_dict(),
        seconds={"identify": t_identify, "evaluate": t_eval, "remove": t_remove,
                 "total": time.perf_counter() - t_all},
    )
    return FMDResult(new_state, report, influence)


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
def _head_candidates(kernel, bias, dkernel, dbias, multipliers, features, labels):
    """``(B, accuracy)`` of the heads ``(W + m·ΔW, b + m·Δb)`` for every multiplier ``m``, on the
    cached features of the external pairs (originals, then counterfactuals): the same numbers
    :func:`_bias_and_accuracy` gives, one compiled call for all candidates."""
    n = features.shape[0] // 2

    def score(m):
        logits = features @ (kernel + m * dkernel) + (bias + m * dbias)
        gaps = _counterfactual_gaps(logits[:n], logits[n:])
        return gaps.mean(), jnp.mean(jnp.argmax(logits[:n], axis=-1) == labels[:n])

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


def _continue_newton(problem, update, modified: Dataset, solver_obj, steps: int, loss_fn, model, model_state):
    """Damped Newton on the modified objective ``L'`` (the mean loss over ``modified``), with
    Armijo backtracking so every accepted step lowers ``L'`` and Levenberg-Marquardt damping:
    ``λ`` shrinks 4× after a full step and doubles after a shortened one (never below
    ``1e-6``), so the iteration becomes plain Newton near the optimum. Stops early once
    ``‖∇L'‖ < 1e-5`` or no step lowers ``L'``.

    The first direction is FMD's step (``update.delta``); the next ``steps`` directions are
    ``−(H' + λ_t I)⁻¹ ∇L'(θ)`` at the current iterate. Returns the update with the total
    displacement and the history of ``(L', ‖∇L'‖, accepted step, λ_t)``.
    """
    tmap = jax.tree_util.tree_map
    base = make_problem(loss_fn, problem.params, modified, select=problem.select, damping=problem.damping,
                        model=model, model_state=model_state)
    delta = tmap(jnp.zeros_like, problem.selected)
    history = []
    direction = update.delta
    diag = update.diagnostics
    lam = float(problem.damping)
    for it in range(steps + 1):
        sel = tmap(lambda p, d: p + d, problem.selected, delta)
        prob_t = dataclasses.replace(base, selected=sel, params=problem.with_selected(sel), damping=lam)
        grad = prob_t.gradient()
        value = prob_t.value()
        if it > 0:
            x, diag = solver_obj.solve(solver_obj.prepare(prob_t), grad)
            direction = tmap(lambda xx: -xx, x)
        slope = float(prob_t.ravel(grad) @ prob_t.ravel(direction))
        t, accepted = 1.0, 0.0
        while t >= 2.0**-20:
            trial = tmap(lambda p, d, t=t: p + t * d, sel, direction)
            if prob_t.value(trial) <= value + 1e-4 * t * min(slope, 0.0):
                accepted = t
                break
            t *= 0.5
        gnorm = float(jnp.linalg.norm(prob_t.ravel(grad)))
        history.append({"loss": value, "grad_norm": gnorm, "step": accepted, "damping": lam})
        if accepted == 0.0 or (it > 0 and gnorm < 1e-5):  # no descent left, or stationary
            break
        delta = tmap(lambda d, dd, a=accepted: d + a * dd, delta, direction)
        if it > 0:
            lam = max(lam / 4.0, 1e-6) if accepted == 1.0 else lam * 2.0
    return dataclasses.replace(update, delta=delta, diagnostics=diag), history


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
    "FMDResult",
    "make_bias_objective",
    "counterfactual_bias_value",
    "identify_bias",
    "rank_harmful",
    "fmd_debias",
    "split_external",
    "drop_ids",
]
