"""Forgetting 1, 10 and 100 training samples: Newton removal per inverse-HVP solver vs SISA vs
fine-tuning vs full retraining, on FMD's Colored-MNIST setting.

Setting: Colored-MNIST at ρ = 0.99, 28×28, FMD's 3×100 MLP (``get_config("colored-mnist")``:
Adam 1e-3, batch 256), ``train_size`` training digits, ``epochs`` epochs.

**The trained model.** The network is trained with Adam (initialised from ``fold_in(k, 0)``,
shuffled with ``fold_in(k, 1)``, ``k = fold_in(key(seed), 0)``: the keys of
:func:`privdebias_jax.unlearn.baselines.retrain`), then its last layer ``θ = (W, b)`` is
trained to convergence with the backbone frozen, in float64, on

    J_D(θ) = (1/n) Σ_{z∈D} ℓ(z, θ) + (λ/2) ‖θ − θ_A‖²,

``θ_A`` the Adam head: influence functions and the Newton removal step assume that the
parameters minimise the training objective (Koh & Liang 2017, §2), which Adam after a few
epochs does not reach. The proximal term is there because where the penultimate features of
the training digits are linearly separable, ``(1/n) Σ ℓ`` alone has no minimiser (the JSON's
``original_model.head_fit.train_accuracy`` = 1 shows a separating head exists).
``θ̂ = argmin J_D`` (gradient norm ≤ :data:`ORIGINAL_GTOL`) is the original head.

**Methods**, each on a forget set ``F`` (``k`` uniformly random training ids, ``m = n − k``):

* ``full_retrain`` (the reference): the same recipe from scratch on ``D ∖ F``
  (:func:`~privdebias_jax.unlearn.baselines.retrain` with the original's key, then the
  last-layer convergence on ``(1/m) Σ_{D∖F} ℓ + (λ/2)‖θ − θ_A'‖²``, ``θ_A'`` its own Adam head).
* ``newton_<solver>``: one Newton step on the last layer (Koh & Liang 2017, removal as
  up-weighting by ``ε = −1/n``):
  ``θ' = θ̂ + (1/m) (H_{D∖F} + (n/m) λ I)⁻¹ Σ_{z∈F} ∇ℓ(z, θ̂)``, with
  :func:`~privdebias_jax.influence.newton_update` and
  :func:`~privdebias_jax.influence.make_solver`. ``H_{D∖F}`` is the Hessian of the mean loss
  over ``D ∖ F``; the damping ``(n/m) λ`` makes ``(m/n)(H_{D∖F} + (n/m) λ I)`` the Hessian of
  ``J_{D∖F}(θ) = J_D(θ) − (1/n) Σ_{z∈F} ℓ(z, θ)``, so the step is the exact Newton step on the
  retained objective from ``θ̂`` (where ``∇J_D(θ̂) = 0``).
* ``last_layer_exact``: ``θ* = argmin J_{D∖F}`` in float64 with the backbone frozen (gradient
  norm ≤ ``min(1e-8, 1e-7 ‖∇J_{D∖F}(θ̂)‖)``): what the Newton step approximates.
* ``finetune``: :func:`~privdebias_jax.unlearn.baselines.finetune`, ``finetune_epochs`` more
  Adam epochs of the original model on ``D ∖ F``.
* ``sisa``: :meth:`~privdebias_jax.unlearn.SISAModel.forget` on ``S`` shards × ``R`` slices
  (Bourtoule et al. 2021) trained once on ``D`` (same optimiser and batch size,
  ``sisa_epochs(E, R)`` epochs per stage), predictions of the shard ensemble (mean softmax);
  every draw forgets from a fresh copy of the trained directory (the copy is not timed).
* ``original`` and ``sisa_before``: no forgetting (context rows).

**Figures** per method and ``k`` (``draws`` draws of ``F``, keys in ``settings.keys``):

* ``seconds``: wall time (median over draws; warm: every program was compiled by one
  throw-away draw of the same ``k`` first, whose times are ``cold_seconds``).
* ``agreement_*``: the fraction of samples whose predicted class equals full retraining's, on
  the test set (ρ = 0.99, as in training), the unbiased test set (ρ = 0.1) and ``F`` itself.
* ``distance``: ``‖θ_method − θ_ref‖ / ‖θ̂ − θ_ref‖`` (1 = no unlearning, 0 = the reference) to
  the reference that retrains the same parameters: ``θ_ref = θ*`` on the last layer for the
  Newton methods (``θ_method = θ̂ + Δ``: the update ``Δ`` each method returns added to the
  float64 ``θ̂``, so the float32 rounding of the stored head, ``original_model.
  head_float32_rounding``, does not enter the distance; compare it with
  ``reference_head_displacement``, which is small for one-sample removals), and full
  retraining on every parameter for fine-tuning.
* ``membership``, for the largest ``k`` only: the forgotten samples (members) against ``k``
  random test samples (non-members), attacked with every threshold attack of
  :func:`~privdebias_jax.privacy.attacks.attack_suite` (LOSS, confidence, entropy, modified
  entropy, M-Loss, M-Mean, M-Moments; thresholds fitted on a calibration half, metrics on the
  other half); the strongest attack is the maximum balanced accuracy (and, separately, AUC)
  over attacks, reported as mean and spread over draws.
* ``solvers``: every solve's :class:`~privdebias_jax.influence.Diagnostics` (``converged``,
  ``iteration_converged``, residual ``‖H_λ x − v‖/‖v‖``, iterations, flags) and the update's
  relative error against the ``exact`` solver's. ``kfac``, ``ekfac`` and ``arnoldi`` are
  approximate inverses: their own iteration always ends (``iteration_converged``), and
  ``converged`` also needs the residual ≤ ``residual_tol``, so ``not_converged`` lists them
  wherever the approximation is off by more than that.

    python benchmarks/influence_unlearning.py [--quick] [--out benchmarks/results/influence_unlearning.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from benchmarks.common import RESULTS_DIR, machine_info, median, write_result  # noqa: E402
from privdebias_jax import pipeline  # noqa: E402
from privdebias_jax.config import get_config  # noqa: E402
from privdebias_jax.data.dataset import Dataset, DataSplits, subset  # noqa: E402
from privdebias_jax.influence import make_problem, make_solver, newton_update  # noqa: E402
from privdebias_jax.privacy.attacks import attack_suite  # noqa: E402
from privdebias_jax.train import TrainState, create_train_state, fit, make_loss_fn, predict  # noqa: E402
from privdebias_jax.unlearn import SISAModel, baselines, make_plan, sisa_epochs, train_shards  # noqa: E402

SOLVERS = ("exact", "cg", "lissa", "arnoldi", "kfac", "ekfac")
QUICK_SOLVERS = ("exact", "cg")
SELECT = r"^head/"
HEAD = "head"
#: λ of the proximal term and of the Newton damping (on the full-data scale, see the docstring).
DAMPING = 1e-3
#: Gradient norm the original head reaches (float64; stops earlier only at the rounding floor).
ORIGINAL_GTOL = 1e-14
#: Reference tolerance: ``‖∇J_{D∖F}‖ ≤ min(REFERENCE_GTOL, REFERENCE_RTOL · ‖∇J_{D∖F}(θ̂)‖)``.
REFERENCE_GTOL = 1e-8
REFERENCE_RTOL = 1e-7
ATTACKS = ("loss", "confidence", "entropy", "modified_entropy", "m_loss", "m_mean", "m_moments")


# ------------------------------------------------------------------------------------------
# The last layer in float64
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HeadObjective:
    """``J(θ) = (1/N) Σ_i CE(h_i W + b, y_i) + (λ/2) ‖θ − θ_A‖²`` in float64.

    ``θ = [vec(W), b]`` (``W`` is ``F × C`` row-major, as Flax stores ``head/kernel``);
    ``features`` are the penultimate activations ``h_i`` (rows of the retained samples);
    ``normaliser`` is ``N``.
    """

    features: np.ndarray
    labels: np.ndarray
    normaliser: float
    damping: float
    anchor: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, np.float64)
        self.labels = np.asarray(self.labels, np.int64)
        self.anchor = np.asarray(self.anchor, np.float64)
        self._onehot = np.eye(self.num_classes)[self.labels]

    def split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(W, b)`` of ``θ = [vec(W), b]``."""
        f, c = self.features.shape[1], self.num_classes
        return theta[: f * c].reshape(f, c), theta[f * c :]

    def _probs(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w, b = self.split(theta)
        z = self.features @ w + b
        z = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        return z, np.exp(z - lse[:, None])

    def value_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """``J(θ)`` and ``∇J(θ) = [Hᵀ(P − Y), 1ᵀ(P − Y)] / N + λ (θ − θ_A)``."""
        z, p = self._probs(theta)
        rows = np.arange(z.shape[0])
        nll = np.log(np.exp(z).sum(axis=1)) - z[rows, self.labels]
        d = theta - self.anchor
        value = float(nll.sum() / self.normaliser + 0.5 * self.damping * (d @ d))
        g = p - self._onehot
        grad = np.concatenate([(self.features.T @ g).ravel(), g.sum(axis=0)]) / self.normaliser
        return value, grad + self.damping * d

    def hessian_operator(self, theta: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """``v ↦ ∇²J(θ) v = [Hᵀ R, 1ᵀ R] / N + λ v`` with ``R = P ⊙ Z_v − P (P ⊙ Z_v) 1``,
        ``Z_v = H V + c`` for ``v = [vec(V), c]`` (``P`` computed once for ``θ``)."""
        _, p = self._probs(theta)

        def product(v: np.ndarray) -> np.ndarray:
            vw, vb = self.split(v)
            pz = p * (self.features @ vw + vb)
            r = pz - p * pz.sum(axis=1, keepdims=True)
            hv = np.concatenate([(self.features.T @ r).ravel(), r.sum(axis=0)]) / self.normaliser
            return hv + self.damping * v

        return product


def _conjugate_gradient(
    product: Callable[[np.ndarray], np.ndarray], b: np.ndarray, rtol: float, maxiter: int
) -> np.ndarray:
    """``x ≈ A⁻¹ b`` for symmetric positive definite ``A`` (``‖Ax − b‖ ≤ rtol ‖b‖``)."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = r @ r
    stop = (rtol * np.linalg.norm(b)) ** 2
    for _ in range(maxiter):
        if rr <= stop:
            break
        ap = product(p)
        alpha = rr / (p @ ap)
        x += alpha * p
        r -= alpha * ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def fit_head(
    objective: HeadObjective, start: np.ndarray, gtol: float, max_iter: int = 100
) -> tuple[np.ndarray, dict[str, Any]]:
    """Minimise ``objective`` from ``start`` by Newton's method (float64).

    Each step solves ``∇²J p = −∇J`` by conjugate gradient to the relative residual
    ``max(1e-12, min(0.1, ‖∇J‖))`` (the forcing term of an inexact Newton method that
    converges quadratically) and backtracks from ``t = 1`` until the Armijo condition
    ``J(θ + tp) ≤ J(θ) + 10⁻⁴ t ∇Jᵀp`` holds or the gradient norm halves (near the optimum
    the change of ``J`` falls below float64 resolution, the gradient's does not). Stops at
    ``‖∇J‖ ≤ gtol``, or when three steps in a row lower neither ``J`` nor the smallest
    gradient norm so far (the float64 rounding floor). Returns ``θ`` and ``{"grad_norm",
    "gtol", "converged", "iterations", "seconds"}``.
    """
    t0 = time.perf_counter()
    theta = np.asarray(start, np.float64).copy()
    value, grad = objective.value_and_grad(theta)
    best = float(np.linalg.norm(grad))
    stalls, iterations = 0, 0
    while iterations < max_iter and stalls < 3:
        gnorm = float(np.linalg.norm(grad))
        if gnorm <= gtol:
            break
        rtol = max(1e-12, min(0.1, gnorm))
        step = _conjugate_gradient(objective.hessian_operator(theta), -grad, rtol, 10 * theta.size)
        slope = float(grad @ step)
        t = 1.0
        for _ in range(60):
            cand = theta + t * step
            v_new, g_new = objective.value_and_grad(cand)
            if v_new <= value + 1e-4 * t * slope or np.linalg.norm(g_new) <= 0.5 * gnorm:
                break
            t *= 0.5
        else:
            break  # no step length makes progress: the rounding floor
        iterations += 1
        new_norm = float(np.linalg.norm(g_new))
        progress = v_new < value or new_norm < best
        theta, value, grad = cand, v_new, g_new
        stalls = 0 if progress else stalls + 1
        best = min(best, new_norm)
    gnorm = float(np.linalg.norm(grad))
    info = {
        "grad_norm": gnorm,
        "gtol": float(gtol),
        "converged": bool(gnorm <= gtol),
        "iterations": int(iterations),
        "seconds": time.perf_counter() - t0,
    }
    return theta, info


def head_vector(params: Any) -> np.ndarray:
    """``[vec(W), b]`` of the ``head`` layer in float64."""
    head = params[HEAD]
    return np.concatenate(
        [np.asarray(head["kernel"], np.float64).ravel(), np.asarray(head["bias"], np.float64)]
    )


def with_head(params: Any, theta: np.ndarray) -> Any:
    """``params`` with the head set to ``θ`` (stored as float32)."""
    kernel = params[HEAD]["kernel"]
    f, c = np.shape(kernel)
    new_head = {
        "kernel": jnp.asarray(theta[: f * c].reshape(f, c), kernel.dtype),
        "bias": jnp.asarray(theta[f * c :], params[HEAD]["bias"].dtype),
    }
    return {**params, HEAD: new_head}


def converge_head(
    model: nn.Module,
    state: TrainState,
    train_set: Dataset,
    num_classes: int,
    damping: float,
    gtol: float,
) -> tuple[TrainState, np.ndarray, np.ndarray, dict[str, Any]]:
    """Train the last layer of ``state`` to ``argmin (1/|S|) Σ_S ℓ + (λ/2)‖θ − θ_A‖²`` (float64,
    backbone frozen, ``θ_A`` the current head). Returns the new state, the float64 head, the
    penultimate features of ``train_set`` and the fit's info."""
    t0 = time.perf_counter()
    _, feats = predict(model, state.params, state.model_state, train_set)
    feats = np.asarray(feats, np.float64)
    anchor = head_vector(state.params)
    obj = HeadObjective(
        feats, np.asarray(train_set.y), len(train_set), damping, anchor, num_classes
    )
    theta, info = fit_head(obj, anchor, gtol)
    info["start_grad_norm"] = float(np.linalg.norm(obj.value_and_grad(anchor)[1]))
    info["moved"] = float(np.linalg.norm(theta - anchor))
    w, b = obj.split(theta)
    info["train_accuracy"] = float(np.mean(np.argmax(feats @ w + b, axis=1) == obj.labels))
    info["seconds_with_features"] = time.perf_counter() - t0
    return state.replace(params=with_head(state.params, theta)), theta, feats, info


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def _tree_vector(params: Any) -> np.ndarray:
    return np.concatenate(
        [np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(params)]
    )


def _stats(values: Sequence[float]) -> dict[str, Any]:
    v = [float(x) for x in values]
    return {
        "median": median(v),
        "mean": float(np.mean(v)),
        "std": float(np.std(v)),
        "min": min(v),
        "max": max(v),
        "all": v,
    }


def _predictions(target: tuple[Any, Any, Any], data: dict[str, Dataset]) -> dict[str, np.ndarray]:
    module, params, model_state = target
    out = {}
    for name, ds in data.items():
        logits, _ = predict(module, params, model_state, ds)
        out[name] = np.asarray(jnp.argmax(logits, axis=-1))
    return out


def _draw_key(root: jax.Array, k: int, draw: int) -> jax.Array:
    """Key of draw ``draw`` of size ``k`` (``draw = -1``: the warm-up draw)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, 2), k), draw + 1)


def _draw_ids(key: jax.Array, pool: np.ndarray, k: int) -> np.ndarray:
    perm = np.asarray(jax.random.permutation(key, pool.size))
    return np.sort(pool[perm[:k]])


@dataclasses.dataclass
class _Bench:
    """Everything trained once: data, the original model, its head, the SISA shards."""

    splits: DataSplits
    model: nn.Module
    tx: optax.GradientTransformation
    loss_fn: Callable[..., Any]
    root: jax.Array
    model_key: jax.Array
    epochs: int
    batch_size: int
    finetune_epochs: int
    damping: float
    original: TrainState
    theta_hat: np.ndarray
    theta_adam: np.ndarray
    features: np.ndarray
    solver_options: dict[str, dict[str, Any]]
    sisa_dir: Path
    workdir: Path
    _copies: int = 0

    @property
    def train(self) -> Dataset:
        return self.splits.train

    def retrain(self, ids: np.ndarray, key: jax.Array) -> tuple[TrainState, dict[str, float]]:
        """Full retraining on ``D ∖ F``: Adam from scratch, then the last-layer convergence."""
        res = baselines.retrain(
            self.model,
            self.tx,
            self.train,
            ids,
            key=key,
            epochs=self.epochs,
            batch_size=self.batch_size,
        )
        retained, _ = baselines.split_forget(self.train, ids)
        state, _, _, info = converge_head(
            self.model,
            res.state,
            retained,
            self.splits.num_classes,
            self.damping,
            ORIGINAL_GTOL,
        )
        return state, {
            "seconds": res.seconds + info["seconds_with_features"],
            "seconds_adam": res.seconds,
            "seconds_head": info["seconds_with_features"],
            "head_grad_norm": info["grad_norm"],
        }

    def sisa_copy(self) -> SISAModel:
        self._copies += 1
        dst = self.workdir / f"sisa_copy{self._copies}"
        shutil.copytree(self.sisa_dir, dst)
        return SISAModel.open(dst, self.model, self.tx, self.train)


def _newton(
    b: _Bench, solver: str, retained: Dataset, forget: Dataset
) -> tuple[Any, np.ndarray, dict[str, Any], float]:
    """One Newton removal with ``solver``: (params, Δ of the head, diagnostics, seconds)."""
    n, m = len(b.train), len(retained)
    t0 = time.perf_counter()
    problem = make_problem(
        b.loss_fn,
        b.original.params,
        retained,
        select=SELECT,
        damping=b.damping * n / m,
        model=b.model,
        model_state=b.original.model_state,
    )
    upd = newton_update(problem, forget, solver=make_solver(solver, **b.solver_options[solver]))
    jax.block_until_ready(upd.params)
    seconds = time.perf_counter() - t0
    dvec = np.concatenate(
        [
            np.asarray(upd.delta[f"{HEAD}/kernel"], np.float64).ravel(),
            np.asarray(upd.delta[f"{HEAD}/bias"], np.float64),
        ]
    )
    diag = upd.diagnostics.as_dict()
    diag["flags"] = {
        key: value
        for key, value in diag["flags"].items()
        if key not in ("eigenvalues", "dense_layers", "diagonal_leaves")
    }
    return upd.params, dvec, diag, seconds


def _run_draw(
    b: _Bench,
    k: int,
    draw: int,
    solvers: Sequence[str],
    *,
    attack: bool,
    seed_noise: bool,
) -> dict[str, Any]:
    """Every method on one forget set; figures against full retraining and the references."""
    key = _draw_key(b.root, k, draw)
    train_ids = np.asarray(b.train.idx, np.int64)
    ids = _draw_ids(jax.random.fold_in(key, 0), train_ids, k)
    retained, forget = baselines.split_forget(b.train, ids)
    keep = ~np.isin(train_ids, ids)
    n, m = len(b.train), len(retained)
    eval_sets = {"test": b.splits.test, "test_unbiased": b.splits.test_unbiased, "forget": forget}
    targets: dict[str, tuple[Any, Any, Any]] = {}
    seconds: dict[str, float] = {}
    extra: dict[str, dict[str, Any]] = {}

    # full retraining (the reference)
    ref_state, ref_info = b.retrain(ids, b.model_key)
    targets["full_retrain"] = (b.model, ref_state.params, ref_state.model_state)
    seconds["full_retrain"] = ref_info["seconds"]
    extra["full_retrain"] = ref_info
    targets["original"] = (b.model, b.original.params, b.original.model_state)

    # the exact last-layer removal (float64, backbone frozen)
    obj = HeadObjective(
        b.features[keep],
        np.asarray(b.train.y)[keep],
        n,
        b.damping,
        b.theta_adam,
        b.splits.num_classes,
    )
    g0 = float(np.linalg.norm(obj.value_and_grad(b.theta_hat)[1]))
    gtol = min(REFERENCE_GTOL, REFERENCE_RTOL * g0)
    theta_ref, ref_fit = fit_head(obj, b.theta_hat, gtol)
    ref_fit["start_grad_norm"] = g0
    base = float(np.linalg.norm(b.theta_hat - theta_ref))
    targets["last_layer_exact"] = (
        b.model,
        with_head(b.original.params, theta_ref),
        b.original.model_state,
    )
    seconds["last_layer_exact"] = ref_fit["seconds"]
    extra["last_layer_exact"] = {"fit": ref_fit, "distance": 0.0}

    # Newton removal, one per solver
    deltas = {}
    for solver in solvers:
        params, dvec, diag, secs = _newton(b, solver, retained, forget)
        name = f"newton_{solver}"
        targets[name] = (b.model, params, b.original.model_state)
        seconds[name] = secs
        deltas[solver] = dvec
        dist = float(np.linalg.norm(b.theta_hat + dvec - theta_ref))
        extra[name] = {"diagnostics": diag, "distance": dist / base if base > 0 else None}
    if "exact" in deltas:
        ex = deltas["exact"]
        for solver, dvec in deltas.items():
            err = float(np.linalg.norm(dvec - ex) / max(np.linalg.norm(ex), 1e-300))
            extra[f"newton_{solver}"]["error_vs_exact_solver"] = err

    # fine-tuning on D ∖ F
    ft = baselines.finetune(
        b.model,
        b.tx,
        b.original,
        b.train,
        ids,
        key=jax.random.fold_in(b.root, 4),
        epochs=b.finetune_epochs,
        batch_size=b.batch_size,
    )
    targets["finetune"] = (b.model, ft.state.params, ft.state.model_state)
    seconds["finetune"] = ft.seconds
    ref_vec = _tree_vector(ref_state.params)
    orig_dist = float(np.linalg.norm(_tree_vector(b.original.params) - ref_vec))
    extra["finetune"] = {
        "distance": float(np.linalg.norm(_tree_vector(ft.state.params) - ref_vec)) / orig_dist,
        "distance_scope": "all parameters, to full retraining",
    }

    # SISA
    sisa = b.sisa_copy()
    targets["sisa_before"] = sisa.ensemble()
    t0 = time.perf_counter()
    report = sisa.forget(ids)
    seconds["sisa"] = time.perf_counter() - t0
    _, slices = sisa.plan.locate(ids)
    targets["sisa"] = sisa.ensemble()
    extra["sisa"] = {
        "shards_retrained": len(report.cost.shards),
        "earliest_slice": int(slices.min()),
        "checkpoint_io_seconds": report.cost.save_seconds + report.cost.restore_seconds,
    }

    preds = {name: _predictions(t, eval_sets) for name, t in targets.items()}
    ref_preds = preds["full_retrain"]
    labels = {name: np.asarray(ds.y) for name, ds in eval_sets.items()}
    methods: dict[str, dict[str, Any]] = {}
    for name, p in preds.items():
        row: dict[str, Any] = {"seconds": seconds.get(name)}
        for split in eval_sets:
            row[f"agreement_{split}"] = float(np.mean(p[split] == ref_preds[split]))
            row[f"accuracy_{split}"] = float(np.mean(p[split] == labels[split]))
        row.update(extra.get(name, {}))
        methods[name] = row
    methods["original"]["distance"] = 1.0
    shutil.rmtree(sisa.directory, ignore_errors=True)

    out: dict[str, Any] = {
        "ids": ids.tolist() if k <= 10 else None,
        "retained": m,
        "reference_head_displacement": base,
        "methods": methods,
    }

    if seed_noise:
        same, _ = b.retrain(ids, b.model_key)
        other, _ = b.retrain(ids, jax.random.fold_in(b.root, 1))
        noise = {}
        for name, st in (("same_key", same), ("other_key", other)):
            p = _predictions((b.model, st.params, st.model_state), eval_sets)
            noise[name] = {
                **{f"agreement_{s}": float(np.mean(p[s] == ref_preds[s])) for s in eval_sets},
                "distance_to_full_retrain": float(
                    np.linalg.norm(_tree_vector(st.params) - ref_vec)
                ),
            }
        noise["original_distance_to_full_retrain"] = orig_dist
        out["retrain_repeat"] = noise

    if attack:
        test_ids = np.asarray(b.splits.test.idx, np.int64)
        non_ids = _draw_ids(jax.random.fold_in(key, 1), test_ids, k)
        nonmembers = subset(b.splits.test, np.flatnonzero(np.isin(test_ids, non_ids)))
        att = {}
        for name, target in targets.items():
            suite = attack_suite(
                target,
                forget,
                nonmembers,
                key=jax.random.fold_in(key, 2),
                attacks=ATTACKS,
                num_resamples=200,
                slices=False,
            )["attacks"]
            ba = {a: r["balanced_accuracy"]["value"] for a, r in suite.items()}
            auc = {a: r["auc"]["value"] for a, r in suite.items()}
            best_ba = max(ba, key=ba.get)
            best_auc = max(auc, key=auc.get)
            att[name] = {
                "balanced_accuracy": ba,
                "auc": auc,
                "strongest_balanced_accuracy": ba[best_ba],
                "strongest_balanced_accuracy_attack": best_ba,
                "strongest_auc": auc[best_auc],
                "strongest_auc_attack": best_auc,
            }
        out["membership"] = att
    return out


def _summarise(draws: list[dict[str, Any]], cold: dict[str, Any]) -> dict[str, Any]:
    methods = list(draws[0]["methods"])
    retrain_median = median([d["methods"]["full_retrain"]["seconds"] for d in draws])
    out: dict[str, Any] = {}
    for name in methods:
        rows = [d["methods"][name] for d in draws]
        row: dict[str, Any] = {}
        if rows[0]["seconds"] is not None:
            row["seconds"] = _stats([r["seconds"] for r in rows])
            row["cold_seconds"] = cold.get(name)
            row["speedup_vs_full_retrain"] = retrain_median / row["seconds"]["median"]
        for field in (
            "agreement_test",
            "agreement_test_unbiased",
            "agreement_forget",
            "accuracy_test",
            "accuracy_test_unbiased",
            "accuracy_forget",
        ):
            row[field] = _stats([r[field] for r in rows])
        if rows[0].get("distance") is not None:
            row["distance"] = _stats([r["distance"] for r in rows])
        if "diagnostics" in rows[0]:
            diags = [r["diagnostics"] for r in rows]
            row["solver"] = {
                "converged_all_draws": all(dg["converged"] for dg in diags),
                "not_converged_draws": int(sum(not dg["converged"] for dg in diags)),
                "iteration_converged_all_draws": all(dg.get("iteration_converged", dg["converged"]) for dg in diags),
                "residual": _stats([dg["residual"] for dg in diags]),
                "iterations": _stats([dg["iterations"] for dg in diags]),
                "flags": [dg["flags"] for dg in diags],
            }
            if "error_vs_exact_solver" in rows[0]:
                row["error_vs_exact_solver"] = _stats([r["error_vs_exact_solver"] for r in rows])
        if "fit" in rows[0]:
            row["reference_fit"] = {
                "converged_all_draws": all(r["fit"]["converged"] for r in rows),
                "grad_norm": _stats([r["fit"]["grad_norm"] for r in rows]),
                "gtol": _stats([r["fit"]["gtol"] for r in rows]),
            }
        out[name] = row
    summary: dict[str, Any] = {
        "methods": out,
        "reference_head_displacement": _stats([d["reference_head_displacement"] for d in draws]),
    }
    if "membership" in draws[0]:
        mem = {}
        for name in draws[0]["membership"]:
            rows = [d["membership"][name] for d in draws]
            mem[name] = {
                "strongest_balanced_accuracy": _stats(
                    [r["strongest_balanced_accuracy"] for r in rows]
                ),
                "strongest_auc": _stats([r["strongest_auc"] for r in rows]),
                "strongest_attacks": [r["strongest_balanced_accuracy_attack"] for r in rows],
            }
        summary["membership"] = mem
    return summary


def run_unlearning(
    *,
    sizes: Sequence[int] = (1, 10, 100),
    draws: int = 5,
    seed: int = 0,
    train_size: int | None = None,
    epochs: int | None = None,
    solvers: Sequence[str] = SOLVERS,
    quick: bool = False,
    damping: float = DAMPING,
    finetune_epochs: int | None = None,
    shards: int | None = None,
    slices: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Forget ``k ∈ sizes`` random training samples ``draws`` times with every method (see the
    module docstring) and return the figures as a JSON-ready dict.

    Defaults: 4,000 training digits, 10 epochs, 2 fine-tuning epochs, SISA with 4 shards × 2
    slices. ``quick`` sets tiny sizes for a smoke test (400 digits, 3 epochs, 1 fine-tuning
    epoch, 1 draw, ``k ∈ {1, 10}``, the ``exact`` and ``cg`` solvers, 2 × 2 SISA) where the
    arguments are left at their defaults. The membership attack runs on the largest ``k``
    only (when it is at least 4: a calibration and an evaluation half of ≥ 2 each). NumPy's
    BLAS runs single-threaded meanwhile (``threadpoolctl``): on a shared 2-core machine
    OpenBLAS's second thread made the float64 head fits many times slower whenever the other
    core was busy. JAX's computations are unaffected.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _run_unlearning(
            sizes=sizes,
            draws=draws,
            seed=seed,
            train_size=train_size,
            epochs=epochs,
            solvers=solvers,
            quick=quick,
            damping=damping,
            finetune_epochs=finetune_epochs,
            shards=shards,
            slices=slices,
            progress=progress,
        )


def _run_unlearning(
    *,
    sizes: Sequence[int],
    draws: int,
    seed: int,
    train_size: int | None,
    epochs: int | None,
    solvers: Sequence[str],
    quick: bool,
    damping: float,
    finetune_epochs: int | None,
    shards: int | None,
    slices: int | None,
    progress: bool,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if quick:
        sizes = (1, 10) if tuple(sizes) == (1, 10, 100) else tuple(sizes)
        draws = 1 if draws == 5 else draws
        solvers = QUICK_SOLVERS if tuple(solvers) == SOLVERS else tuple(solvers)
    train_size = train_size if train_size is not None else (400 if quick else 4000)
    epochs = epochs if epochs is not None else (3 if quick else 10)
    finetune_epochs = finetune_epochs if finetune_epochs is not None else (1 if quick else 2)
    shards = shards if shards is not None else (2 if quick else 4)
    slices = slices if slices is not None else 2
    sizes = tuple(int(k) for k in sizes)
    solvers = tuple(solvers)
    attack_size = max(sizes) if max(sizes) >= 4 else None

    def log(msg: str) -> None:
        if progress:
            print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    config = get_config("colored-mnist")
    config.seed = int(seed)
    config.train_size = int(train_size)
    config.epochs = int(epochs)
    splits = pipeline.load_splits(config)
    model, tx = pipeline.spec_from_config(config, splits).build()
    batch_size = int(config.batch_size)
    root = jax.random.key(int(seed))
    model_key = jax.random.fold_in(root, 0)

    # the original model: Adam with baselines.retrain's keys, then the converged last layer
    t0 = time.perf_counter()
    state = create_train_state(
        model, tx, jax.random.fold_in(model_key, 0), tuple(splits.input_shape)
    )
    fitted = fit(
        model,
        tx,
        state,
        splits.train,
        epochs=int(epochs),
        batch_size=batch_size,
        key=jax.random.fold_in(model_key, 1),
        progress=False,
    )
    jax.block_until_ready(fitted.state.params)
    adam_seconds = time.perf_counter() - t0
    theta_adam = head_vector(fitted.state.params)
    original, theta_hat, features, head_info = converge_head(
        model, fitted.state, splits.train, splits.num_classes, damping, ORIGINAL_GTOL
    )
    float32_rounding = float(np.linalg.norm(head_vector(original.params) - theta_hat))
    log(
        f"original model: Adam {adam_seconds:.1f}s (cold), head fit {head_info['seconds']:.2f}s, "
        f"‖∇J_D(θ̂)‖ = {head_info['grad_norm']:.1e}"
    )

    loss_fn = make_loss_fn(model)
    solver_options: dict[str, dict[str, Any]] = {name: {} for name in solvers}
    lissa_note = None
    if "lissa" in solvers:
        # LiSSA converges only for scale > λ_max(H_λ): estimate λ_max by power iteration
        problem = make_problem(
            loss_fn,
            original.params,
            splits.train,
            select=SELECT,
            damping=damping,
            model=model,
            model_state=original.model_state,
        )
        v = problem.ravel(
            jax.tree_util.tree_map(
                lambda x: jax.random.normal(jax.random.fold_in(root, 6), x.shape, x.dtype),
                problem.selected,
            )
        )
        lam_max = 0.0
        for _ in range(50):
            v = v / jnp.linalg.norm(v)
            hv = problem.ravel(problem.matvec(problem.unravel(v)))
            lam_max = float(v @ hv)
            v = hv
        solver_options["lissa"] = {"scale": 2.0 * lam_max}
        lissa_note = (
            f"scale = 2 × {lam_max:.4g}, the largest eigenvalue of the original model's damped "
            "head Hessian on the full training data (50 power iterations in this run); "
            "other options: make_solver defaults"
        )

    workdir = Path(tempfile.mkdtemp(prefix="influence_unlearning_"))
    try:
        plan = make_plan(splits.train.idx, shards, slices, int(seed))
        per_stage = sisa_epochs(int(epochs), slices)
        sisa, sisa_cost = train_shards(
            model,
            tx,
            splits.train,
            plan,
            workdir / "sisa",
            key=jax.random.fold_in(root, 5),
            epochs_per_slice=per_stage,
            batch_size=batch_size,
            program_width=1,
        )
        del sisa
        log(f"SISA {shards}×{slices}: trained in {sisa_cost.seconds:.1f}s (cold)")
        b = _Bench(
            splits=splits,
            model=model,
            tx=tx,
            loss_fn=loss_fn,
            root=root,
            model_key=model_key,
            epochs=int(epochs),
            batch_size=batch_size,
            finetune_epochs=int(finetune_epochs),
            damping=float(damping),
            original=original,
            theta_hat=theta_hat,
            theta_adam=theta_adam,
            features=features,
            solver_options=solver_options,
            sisa_dir=workdir / "sisa",
            workdir=workdir,
        )
        original_preds = _predictions(
            (model, original.params, original.model_state),
            {"test": splits.test, "test_unbiased": splits.test_unbiased},
        )
        per_size: dict[str, Any] = {}
        for k in sizes:
            warm = _run_draw(b, k, -1, solvers, attack=False, seed_noise=False)
            cold = {name: row["seconds"] for name, row in warm["methods"].items()}
            log(f"k={k}: warm-up draw done")
            rows = []
            for d in range(int(draws)):
                row = _run_draw(b, k, d, solvers, attack=(k == attack_size), seed_noise=(d == 0))
                rows.append(row)
                ms = row["methods"]
                log(
                    f"k={k} draw {d}: retrain {ms['full_retrain']['seconds']:.2f}s, "
                    + ", ".join(
                        f"{name} {ms[name]['seconds']:.2f}s"
                        + (
                            f" (dist {ms[name]['distance']:.3g})"
                            if ms[name].get("distance") is not None
                            else ""
                        )
                        for name in ms
                        if ms[name]["seconds"] is not None and name != "full_retrain"
                    )
                )
            per_size[str(k)] = {"draws": rows, "summary": _summarise(rows, cold)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    not_converged = [
        {
            "solver": name[len("newton_") :],
            "k": int(k),
            "draw": d,
            "residual": row["methods"][name]["diagnostics"]["residual"],
            "flags": row["methods"][name]["diagnostics"]["flags"],
        }
        for k, entry in per_size.items()
        for d, row in enumerate(entry["draws"])
        for name in row["methods"]
        if name.startswith("newton_") and not row["methods"][name]["diagnostics"]["converged"]
    ]
    # medians of seconds and distances, means of agreements (fractions pooled over draws)
    headline_fields = (
        "seconds",
        "speedup_vs_full_retrain",
        "agreement_test",
        "agreement_test_unbiased",
        "agreement_forget",
        "distance",
    )
    headline: dict[str, dict[str, dict[str, Any]]] = {}
    for k, entry in per_size.items():
        headline[k] = {}
        for name, row in entry["summary"]["methods"].items():
            h: dict[str, Any] = {}
            for field in headline_fields:
                if field not in row:
                    continue
                value = row[field]
                if isinstance(value, dict):
                    value = value["median"] if field in ("seconds", "distance") else value["mean"]
                h[field] = value
            if "solver" in row:
                h["solver_converged_all_draws"] = row["solver"]["converged_all_draws"]
            headline[k][name] = h
    for k, entry in per_size.items():
        for name, mem in entry["summary"].get("membership", {}).items():
            headline[k][name]["attack_balanced_accuracy_mean"] = mem["strongest_balanced_accuracy"][
                "mean"
            ]
            headline[k][name]["attack_balanced_accuracy_std"] = mem["strongest_balanced_accuracy"][
                "std"
            ]
            headline[k][name]["attack_auc_mean"] = mem["strongest_auc"]["mean"]
    result = {
        "benchmark": "influence_unlearning",
        "settings": {
            "quick": bool(quick),
            "dataset": "colored-mnist",
            "rho": float(config.rho),
            "image_size": int(config.image_size),
            "train_size": len(splits.train),
            "test_size": len(splits.test),
            "test_unbiased_size": len(splits.test_unbiased),
            "model": str(config.model),
            "optimizer": f"{config.optimizer} {config.learning_rate}",
            "batch_size": batch_size,
            "epochs": int(epochs),
            "finetune_epochs": int(finetune_epochs),
            "sizes": list(sizes),
            "draws": int(draws),
            "seed": int(seed),
            "solvers": list(solvers),
            "solver_options": solver_options,
            "lissa_scale": lissa_note,
            "select": SELECT,
            "damping": float(damping),
            "damping_note": (
                "λ is the proximal/L2 weight of J_D(θ) = (1/n) Σ_D ℓ + (λ/2)‖θ − θ_A‖² (θ_A: the "
                "Adam head); the features of the training digits are linearly separable, so the "
                "unregularised last-layer optimum does not exist. The reference of forget set F "
                "minimises J_{D∖F} = J_D − (1/n) Σ_F ℓ, and the Newton step solves with the "
                "retained problem's mean-loss Hessian damped by λ n/m (m = n − |F|), its exact "
                "Hessian up to the factor m/n"
            ),
            "original_gtol": ORIGINAL_GTOL,
            "reference_gtol": f"min({REFERENCE_GTOL}, {REFERENCE_RTOL} × ‖∇J_(D∖F)(θ̂)‖)",
            "sisa": {
                "shards": int(shards),
                "slices": int(slices),
                "epochs_per_slice": list(per_stage),
                "program_width": 1,
                "aggregate": "mean_softmax",
            },
            "attack": {
                "size": attack_size,
                "members": "the forgotten samples",
                "nonmembers": "as many random samples of the test set (rho as in training)",
                "attacks": list(ATTACKS),
                "calibration_fraction": 0.5,
                "strongest": "max over attacks of balanced accuracy (threshold from the "
                "calibration half) and, separately, of AUC, on the evaluation half",
                "chance_level": "the maximum over several noisy estimates lies above 0.5 even "
                "without any membership signal: full_retrain, which never trained on the "
                "forgotten samples, measures that floor",
            },
            "keys": {
                "root": f"jax.random.key({int(seed)})",
                "original_and_full_retrain": "fold_in(root, 0) (baselines.retrain: init "
                "fold_in(., 0), shuffle fold_in(., 1))",
                "retrain_other_key": "fold_in(root, 1)",
                "forget_ids": "permutation(fold_in(fold_in(fold_in(fold_in(root, 2), k), "
                "draw + 1), 0)) of the training ids, first k; draw -1 = warm-up",
                "nonmembers": "same with fold_in(., 1) over the test ids",
                "attack": "fold_in(draw key, 2)",
                "finetune": "fold_in(root, 4)",
                "sisa": f"plan key {int(seed)}, training key fold_in(root, 5)",
                "data": "pipeline.load_splits (fold_in(key(seed), 1))",
            },
            "timing": (
                "wall time of each method's call (block_until_ready); medians over draws after "
                "one warm-up draw per k (cold_seconds); full_retrain = Adam + the last-layer "
                "fit; last_layer_exact = the float64 fit given the cached penultimate features "
                "of the training set; sisa = SISAModel.forget on a fresh copy (checkpoint I/O "
                "included, copy and reopen not timed)"
            ),
            "distance": (
                "‖θ_method − θ_ref‖ / ‖θ̂ − θ_ref‖: last layer vs last_layer_exact for the Newton "
                "methods (θ_method = float64 θ̂ + the returned Δ), all parameters vs full_retrain "
                "for finetune; 1 = no unlearning"
            ),
        },
        "original_model": {
            "adam_seconds_cold": adam_seconds,
            "head_fit": head_info,
            "head_float32_rounding": float32_rounding,
            "accuracy_test": float(np.mean(original_preds["test"] == np.asarray(splits.test.y))),
            "accuracy_test_unbiased": float(
                np.mean(original_preds["test_unbiased"] == np.asarray(splits.test_unbiased.y))
            ),
        },
        "sisa_training_seconds_cold": sisa_cost.seconds,
        "load_average_1_5_15_at_start": load_start,
        "numpy_blas_threads": 1,
        "headline": headline,
        "not_converged": not_converged,
        "sizes": per_size,
        "total_seconds": time.perf_counter() - t_start,
    }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: run :func:`run_unlearning` and write its JSON (machine, settings, command)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "influence_unlearning.json")
    args = p.parse_args(argv)
    result = run_unlearning(
        sizes=tuple(args.sizes),
        draws=args.draws,
        seed=args.seed,
        train_size=args.train_size,
        epochs=args.epochs,
        solvers=tuple(args.solvers),
        quick=args.quick,
    )
    payload = {
        **result,
        "machine": machine_info(),
        "command": ("python benchmarks/influence_unlearning.py " + " ".join(argv)).strip(),
    }
    write_result(args.out, payload)
    print(f"wrote {args.out}")
    return payload


__all__ = ["HeadObjective", "converge_head", "fit_head", "main", "run_unlearning"]


if __name__ == "__main__":
    main()
