"""Influence quality judged against retraining: LDS, leave-one-out and group removal for every
inverse-HVP solver and curvature of the library.

Run from the repository root::

    python benchmarks/influence_quality.py                 # CPU scale (see below)
    python benchmarks/influence_quality.py --quick         # smoke run: tiny sizes, 10 subsets
    python benchmarks/influence_quality.py --scale large   # accelerator sizes (28×28 MLP, 256k parameters)
    python benchmarks/influence_quality.py --out PATH      # default benchmarks/results/influence_quality.json (+ .png)

What is measured (every figure lands in the JSON; the plot lands next to it):

* Models: FMD's MLP (3×100; Chen et al. 2023) on Colored-MNIST (ρ = 0.99) and the CPU small CNN
  on Biased-MNIST (ρ = 0.99), trained with the library's ``fit`` (Adam) on ``n`` training digits.
* Problems:

  - ``digits_logreg``: the calibration problem, softmax regression on scikit-learn's 8×8 digits
    (1,297 training digits; convex);
  - ``mlp_head``: the MLP's last layer on its frozen features (convex with damping λ);
  - ``mlp_two_layers``: its last two layers (``dense_2`` and ``head``) on the frozen output of
    ``dense_1``;
  - ``mlp_all``: all its parameters (iterative and factored solvers only);
  - ``cnn_head``: the CNN's last layer on its frozen features.

  For the three partial problems the layers are refitted in float64 to the minimum of
  ``L(θ) + (λ/2)‖θ‖²`` (from the trained values) before influence is computed, so the curvature
  ``H + λI`` is that objective's and retraining is exact: every retraining is a float64 Newton-CG
  from that minimum to ``‖∇‖ ≤ 1e-8`` (the nearest minimum for the non-convex two layers).
  ``mlp_all`` retrains with the training recipe itself (Adam, same initialisation, same batch
  order; a removed sample weighs 0); its retraining noise is measured by a second initialisation
  (``noise_ceiling``: the same scores with the second run's losses as the prediction).
* Influence: :func:`privdebias_jax.influence.evaluation.influence_matrix`, the public API, for each
  solver × curvature (Hessian; Gauss-Newton, which equals the true Fisher for softmax
  cross-entropy; empirical Fisher; K-FAC/EK-FAC with the true or the empirical Fisher), one solve
  per test example on ``T`` unbiased test digits.
* Scores: LDS (Park et al. 2023) at α = 0.5, 0.9 and 0.99 over ``m`` subsets; leave-one-out
  Pearson over random single removals; group removal Pearson over the top 1 % by the reference
  solver's influence on each test example and over random 1 % groups; seconds (prepare, the
  ``T`` solves, total); the largest residual ``‖H_λ x − v‖/‖v‖`` and how many solves converged.
  The subsets and groups are saved in the JSON so any run can be re-scored.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from benchmarks.common import RESULTS_DIR, machine_info, write_result  # noqa: E402
from privdebias_jax.data import Dataset, biased_mnist, colored_mnist, subset  # noqa: E402
from privdebias_jax.influence import make_problem  # noqa: E402
from privdebias_jax.influence.evaluation import (  # noqa: E402
    draw_subsets,
    influence_matrix,
    linear_datamodeling_score,
    predicted_losses,
    removal_correlation,
    removal_masks,
)
from privdebias_jax.models import create_model  # noqa: E402
from privdebias_jax.train import apply_model, create_train_state, fit, make_loss_fn, make_optimizer  # noqa: E402
from privdebias_jax.types import PrivDebiasError  # noqa: E402

FRACTIONS = (0.5, 0.9, 0.99)
SCALES: dict[str, dict[str, Any]] = {
    "quick": {"image_size": 8, "train_size": 120, "test_size": 12, "subsets": 10, "loo": 6, "groups": 6,
              "epochs": 3, "hidden": (16, 16, 16), "cnn_widths": (4, 8), "cnn_strides": (1, 2),
              "cg_maxiter": {"head": 50, "two_layers": 30, "all": 5}, "lissa_depth": 20, "arnoldi": 10},
    "cpu": {"image_size": 14, "train_size": 500, "test_size": 100, "subsets": 50, "loo": 50, "groups": 50,
            "epochs": 10, "hidden": (100, 100, 100), "cnn_widths": (16, 32, 64, 128), "cnn_strides": (1, 2, 2, 2),
            "cg_maxiter": {"head": 200, "two_layers": 200, "all": 30}, "lissa_depth": 300, "arnoldi": 100},
    "large": {"image_size": 28, "train_size": 4000, "test_size": 200, "subsets": 100, "loo": 100, "groups": 100,
              "epochs": 10, "hidden": (100, 100, 100), "cnn_widths": (16, 32, 64, 128), "cnn_strides": (1, 2, 2, 2),
              "cg_maxiter": {"head": 300, "two_layers": 300, "all": 100}, "lissa_depth": 1000, "arnoldi": 200},
}
DAMPING = 0.01
BATCH = 64
LR = 1e-3
EXACT_MAX_PARAMS = 12_000


# ----------------------------------------------------------------------------------------- models


class Tail(nn.Module):
    """The last layers of the MLP on frozen inputs, named as in the MLP (``dense_k``, ``head``),
    with the library's model contract (``(logits, features)``)."""

    num_classes: int
    hidden_names: tuple[str, ...] = ()
    hidden_widths: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
        del train, mask
        h = x
        for name, width in zip(self.hidden_names, self.hidden_widths, strict=True):
            h = nn.relu(nn.Dense(width, name=name)(h))
        return nn.Dense(self.num_classes, name="head")(h), h


def tail_forward(params: dict, names: tuple[str, ...], x: jax.Array) -> jax.Array:
    """The tail's logits written in plain ``jnp`` (float64 when the inputs are), independent of Flax."""
    h = x
    for name in names:
        h = jax.nn.relu(h @ params[name]["kernel"] + params[name]["bias"])
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def per_example_ce(logits: jax.Array, y: jax.Array) -> jax.Array:
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, None], 1)[:, 0]


# ------------------------------------------------------------------------------ float64 retraining


def _newton_cg_fit(names, x, y, lam, theta0, weights, tol, max_newton, cg_max, lbfgs_iters):
    """Minimise ``Σ_i w_i ℓ_i(θ)/Σ_i w_i + (λ/2)‖θ‖²`` from ``theta0`` for each row of ``weights``
    (vmapped), by Newton-CG with an Armijo backtracking line search; float64 under x64."""
    flat0, unravel = ravel_pytree(theta0)

    def objective(theta, w):
        ce = per_example_ce(tail_forward(unravel(theta), names, x), y)
        return jnp.sum(w * ce) / jnp.sum(w) + 0.5 * lam * theta @ theta

    grad = jax.grad(objective)

    def fit_one(w):
        def hvp(theta, v):
            return jax.jvp(lambda t: grad(t, w), (theta,), (v,))[1]

        def cg(theta, b, rtol):
            def cond(c):
                it, _, r, _, rr, stop = c
                return (it < cg_max) & ~stop & (jnp.sqrt(rr) > rtol * jnp.linalg.norm(b))

            def body(c):
                it, d, r, p, rr, _ = c
                hp = hvp(theta, p)
                php = p @ hp
                neg = php <= 0
                alpha = rr / jnp.where(neg, 1.0, php)
                d_new = jnp.where(neg, jnp.where(it == 0, b, d), d + alpha * p)
                r_new = r - alpha * hp
                rr_new = r_new @ r_new
                p_new = r_new + (rr_new / rr) * p
                return it + 1, d_new, jnp.where(neg, r, r_new), jnp.where(neg, p, p_new), jnp.where(neg, rr, rr_new), neg

            start = (0, jnp.zeros_like(b), b, b, b @ b, False)
            return jax.lax.while_loop(cond, body, start)[1]

        def newton_cond(c):
            it, _, gnorm = c
            return (it < max_newton) & (gnorm > tol)

        def newton_body(c):
            it, theta, _ = c
            g = grad(theta, w)
            gn = jnp.linalg.norm(g)
            d = cg(theta, -g, jnp.minimum(0.1, jnp.sqrt(gn)))
            f0, slope = objective(theta, w), g @ d

            def ls_cond(s):
                t, k = s
                return (objective(theta + t * d, w) > f0 + 1e-4 * t * slope) & (k < 40)

            t, _ = jax.lax.while_loop(ls_cond, lambda s: (0.5 * s[0], s[1] + 1), (1.0, 0))
            theta = theta + t * d
            return it + 1, theta, jnp.linalg.norm(grad(theta, w))

        # L-BFGS (optax, zoom line search) first: far from a minimum the Hessian of the non-convex
        # tail is indefinite and Newton-CG crawls; Newton-CG then converges quadratically.
        opt = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(lambda t: objective(t, w))

        def lb_cond(c):
            k, _, _, gn = c
            return (k < lbfgs_iters) & (gn > 1e-6)

        def lb_body(c):
            k, theta, state, _ = c
            value, g = value_and_grad(theta, state=state)
            upd, state = opt.update(g, state, theta, value=value, grad=g, value_fn=lambda t: objective(t, w))
            theta = optax.apply_updates(theta, upd)
            return k + 1, theta, state, jnp.linalg.norm(grad(theta, w))

        _, start, _, _ = jax.lax.while_loop(lb_cond, lb_body, (0, flat0, opt.init(flat0),
                                                                 jnp.linalg.norm(grad(flat0, w))))
        it, theta, gnorm = jax.lax.while_loop(newton_cond, newton_body, (0, start, jnp.linalg.norm(grad(start, w))))
        return theta, gnorm, it

    return jax.vmap(fit_one)(weights)


def refit64(names, x, y, lam, params, keep, tol=1e-8, chunk=64, max_newton=60, lbfgs_iters=300, cg_max=2000):
    """Float64 Newton-CG retraining of the tail for every row of ``keep`` (``(R, n)`` bool), from
    ``params``; returns (flat parameters ``(R, P)``, gradient norms, Newton iterations)."""
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)
        x64, y64 = jnp.asarray(np.asarray(x), jnp.float64), jnp.asarray(np.asarray(y))
        run = jax.jit(functools.partial(_newton_cg_fit, names, x64, y64, lam, p64, tol=tol, max_newton=max_newton, lbfgs_iters=lbfgs_iters,
                                        cg_max=cg_max))
        outs = [run(jnp.asarray(keep[s : s + chunk], jnp.float64)) for s in range(0, len(keep), chunk)]
        thetas = np.concatenate([np.asarray(o[0]) for o in outs])
        gnorms = np.concatenate([np.asarray(o[1]) for o in outs])
        iters = np.concatenate([np.asarray(o[2]) for o in outs])
    return thetas, gnorms, iters


def tail_losses64(names, params_template, thetas, x, y) -> np.ndarray:
    """Per-example losses ``(R, T)`` of each flat float64 parameter row on ``(x, y)``."""
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params_template)
        unravel = ravel_pytree(p64)[1]
        x64, y64 = jnp.asarray(np.asarray(x), jnp.float64), jnp.asarray(np.asarray(y))
        f = jax.jit(jax.vmap(lambda t: per_example_ce(tail_forward(unravel(t), names, x64), y64)))
        return np.asarray(f(jnp.asarray(thetas)), np.float64)


# ------------------------------------------------------------------------------- recipe retraining


def recipe_retrain(model, init_params, train: Dataset, test: Dataset, keep: np.ndarray, epochs: int, key,
                   chunk: int = 100) -> np.ndarray:
    """Train one model per row of ``keep`` with the recipe (Adam, ``epochs`` passes over the same
    shuffled batches; a removed sample weighs 0), vmapped over the rows; test losses ``(R, T)``."""
    tx = optax.adam(LR)
    n = len(train)
    steps_per_epoch = n // BATCH
    order = np.concatenate([np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))[: steps_per_epoch * BATCH]
                            for e in range(epochs)]).reshape(-1, BATCH)
    xtr, ytr = jnp.asarray(train.x), jnp.asarray(train.y)

    def loss(params, rows, w):
        logits = model.apply({"params": params}, xtr[rows])[0]
        ce = per_example_ce(logits, ytr[rows])
        return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0)

    def train_one(w_all):
        def step(carry, rows):
            params, opt = carry
            g = jax.grad(loss)(params, rows, w_all[rows])
            upd, opt = tx.update(g, opt, params)
            return (optax.apply_updates(params, upd), opt), None

        (params, _), _ = jax.lax.scan(step, (init_params, tx.init(init_params)), jnp.asarray(order))
        logits = model.apply({"params": params}, jnp.asarray(test.x))[0]
        return per_example_ce(logits, jnp.asarray(test.y))

    run = jax.jit(jax.vmap(train_one))
    return np.concatenate([np.asarray(run(jnp.asarray(keep[s : s + chunk], jnp.float32)))
                           for s in range(0, len(keep), chunk)]).astype(np.float64)


# -------------------------------------------------------------------------------- solver grid


def solver_grid(problem_kind: str, num_params: int, cfg: dict, only: tuple[str, ...] = ()) -> list[tuple[str, str, str, dict]]:
    """``(label, solver, curvature, options)`` for one problem (the labels in ``only`` when given)."""
    grid = _full_grid(problem_kind, num_params, cfg)
    return [g for g in grid if g[0] in only] if only else grid


def _full_grid(problem_kind: str, num_params: int, cfg: dict) -> list[tuple[str, str, str, dict]]:
    cg_it = cfg["cg_maxiter"][problem_kind]
    grid: list[tuple[str, str, str, dict]] = []
    if num_params <= EXACT_MAX_PARAMS:
        grid.append(("exact/hessian", "exact", "hessian", {"method": "eigh", "allow_indefinite": True}))
        if problem_kind == "head":
            grid += [("exact/gauss_newton", "exact", "gauss_newton", {}),
                     ("exact/empirical_fisher", "exact", "empirical_fisher", {}),
                     ("linear_head/hessian", "linear_head", "hessian", {})]
    grid += [
        ("cg/hessian", "cg", "hessian", {"tol": 1e-6, "maxiter": cg_it}),
        ("cg/gauss_newton", "cg", "gauss_newton", {"tol": 1e-6, "maxiter": cg_it}),
        ("cg/empirical_fisher", "cg", "empirical_fisher", {"tol": 1e-6, "maxiter": cg_it}),
        ("pcg(ekfac)/gauss_newton", "pcg", "gauss_newton", {"preconditioner": "ekfac", "tol": 1e-6,
                                                              "maxiter": cg_it}),
        ("lissa/gauss_newton", "lissa", "gauss_newton", {"depth": cfg["lissa_depth"], "batch_size": 128}),
        ("arnoldi/hessian", "arnoldi", "hessian", {"num_iters": cfg["arnoldi"], "top_k": cfg["arnoldi"] // 2}),
        ("arnoldi/gauss_newton", "arnoldi", "gauss_newton", {"num_iters": cfg["arnoldi"], "top_k": cfg["arnoldi"] // 2}),
        ("kfac/true_fisher", "kfac", "gauss_newton", {"fisher": "true"}),
        ("kfac/empirical_fisher", "kfac", "gauss_newton", {"fisher": "empirical"}),
        ("ekfac/true_fisher", "ekfac", "gauss_newton", {"fisher": "true"}),
        ("ekfac/empirical_fisher", "ekfac", "gauss_newton", {"fisher": "empirical"}),
    ]
    return grid


# -------------------------------------------------------------------------------------- the run


def _top_groups(scores: np.ndarray, size: int, count: int) -> list[np.ndarray]:
    """For test example ``t < count``: the ``size`` training samples with the largest ``I(z, t)``."""
    return [np.argsort(-scores[:, t], kind="stable")[:size] for t in range(min(count, scores.shape[1]))]


def _influence(label, solver, curvature, options, problem_args, train, test) -> tuple[dict, np.ndarray | None]:
    """The influence matrix of one solver × curvature, timed, with its diagnostics."""
    problem = make_problem(**problem_args, curvature=curvature)
    t0 = time.perf_counter()
    try:
        infl = influence_matrix(problem, train, test, solver=solver, solver_options=options)
    except PrivDebiasError as err:
        return {"label": label, "solver": solver, "curvature": curvature, "error": str(err)}, None
    residuals = [d.residual for d in infl.diagnostics]
    return {"label": label, "solver": solver, "curvature": curvature, "options": options,
            "seconds": time.perf_counter() - t0, "prepare_s": infl.prepare_seconds, "solve_s": infl.solve_seconds,
            "max_residual": infl.max_residual, "median_residual": float(np.nanmedian(residuals)),
            "converged": int(sum(d.converged for d in infl.diagnostics)),
            "iteration_converged": int(sum(getattr(d, "iteration_converged", d.converged) for d in infl.diagnostics)),
            "solves": len(infl.diagnostics)}, infl.scores


def _score(row: dict, scores: np.ndarray, base: np.ndarray, plan: dict, actual: dict) -> dict:
    """LDS for the subset plans, Pearson of the changes for the removal plans."""
    for name, keep in plan.items():
        pred = predicted_losses(base, scores, keep)
        if name.startswith("lds_"):
            row[name] = linear_datamodeling_score(pred, actual[name])[0]
        else:
            row[name] = removal_correlation(pred - base[None], actual[name] - base[None])[0]
    return row


def run_problem(name: str, kind: str, cfg: dict, setup: dict, key, only: tuple[str, ...] = ()) -> dict:
    """All solvers on one problem; ``setup`` holds the problem arguments, data and retrainer."""
    train, test = setup["train"], setup["test"]
    n = len(train)
    base = setup["base_losses"]
    plan: dict[str, np.ndarray] = {}
    for j, frac in enumerate(FRACTIONS):
        plan[f"lds_{frac}"] = draw_subsets(jax.random.fold_in(key, j), n, frac, cfg["subsets"])
    rng = np.random.default_rng(int(jax.random.randint(jax.random.fold_in(key, 99), (), 0, 2**31 - 1)))
    plan["loo"] = removal_masks(n, [np.array([i]) for i in rng.choice(n, cfg["loo"], replace=False)])
    gsize = max(1, int(round(0.01 * n)))
    plan["group_random"] = removal_masks(n, [rng.choice(n, gsize, replace=False) for _ in range(cfg["groups"])])

    grid = solver_grid(kind, setup["num_params"], cfg, only)
    print(f"  {name}: {grid[0][0]} (reference)", flush=True)
    # the reference solver picks the top groups: the first in the grid (exact where it fits, else cg)
    ref_row, ref_scores = _influence(*grid[0], setup["problem_args"], train, test)
    if ref_scores is None:
        raise PrivDebiasError(f"{name}: the reference solver failed: {ref_row['error']}")
    plan["group_top"] = removal_masks(n, _top_groups(ref_scores, gsize, cfg["groups"]))

    t0 = time.perf_counter()
    keep_all = np.concatenate(list(plan.values()))
    losses = setup["retrain"](keep_all)
    actual, off = {}, 0
    for k, m in plan.items():
        actual[k] = losses[off : off + len(m)]
        off += len(m)
    retrain_s = time.perf_counter() - t0
    noise = None
    if "retrain_noise" in setup:
        noisy = setup["retrain_noise"](keep_all)
        noise, off = {}, 0
        for k, m in plan.items():
            other = noisy[off : off + len(m)]
            off += len(m)
            if k.startswith("lds_"):
                noise[k] = linear_datamodeling_score(other, actual[k])[0]
            else:
                noise[k] = removal_correlation(other - base[None], actual[k] - base[None])[0]

    rows = [_score(ref_row, ref_scores, base, plan, actual)]
    for entry in grid[1:]:
        print(f"  {name}: {entry[0]}", flush=True)
        row, scores = _influence(*entry, setup["problem_args"], train, test)
        rows.append(row if scores is None else _score(row, scores, base, plan, actual))
    return {
        "problem": name, "kind": kind, "num_params": setup["num_params"], "train_examples": n,
        "test_examples": len(test), "damping": setup["problem_args"]["damping"], "retraining": setup["retraining"],
        "retrain_s": retrain_s, "retrain_check": setup.get("check", {}), "noise_ceiling": noise,
        "group_size": gsize, "solvers": rows,
        "plan": {k: [np.flatnonzero(m_row if k.startswith("lds_") else ~m_row).tolist() for m_row in m]
                 for k, m in plan.items()},
        "plan_encoding": "lds_*: the kept indices of each subset; loo/group_*: the removed indices",
    }


def _train_model(model, splits_train, image_shape, epochs, key):
    tx = make_optimizer("adam", LR)
    state = create_train_state(model, tx, jax.random.fold_in(key, 0), image_shape)
    init = state.params
    fitted = fit(model, tx, state, splits_train, epochs=epochs, batch_size=BATCH, key=jax.random.fold_in(key, 1),
                 progress=False)
    return init, fitted.state.params


def tail_setup(model, params, train: Dataset, test: Dataset, names: tuple[str, ...], input_layer: str | None,
               num_classes: int, damping: float = DAMPING) -> dict:
    """Frozen inputs of the tail, its float64 minimum of ``L + (λ/2)‖θ‖²``, the library problem and
    the retrainer."""
    def inputs(ds):
        if model is None:  # the data are the inputs (a linear model)
            return np.asarray(ds.x, np.float32).reshape(len(ds), -1)
        if input_layer is None:  # the head's input: the model's features
            return np.asarray(apply_model(model, params, {}, jnp.asarray(ds.x))[1], np.float32)
        h = jnp.reshape(jnp.asarray(ds.x), (len(ds), -1))
        for k in range(int(input_layer.split("_")[1]) + 1):
            h = jax.nn.relu(h @ params[f"dense_{k}"]["kernel"] + params[f"dense_{k}"]["bias"])
        return np.asarray(h, np.float32)

    ftr, fte = inputs(train), inputs(test)
    tail_params = {k: params[k] for k in (*names, "head")}
    full = np.ones((1, len(train)), bool)
    # A head is smooth and strongly convex: Newton-CG reaches ‖∇‖ ≤ 1e-8 in a few steps. A tail with a
    # ReLU layer has its minimum on kinks (pre-activations at 0), where ‖∇‖ stalls: it gets an L-BFGS
    # budget, a short Newton polish, and its retraining noise is measured from a perturbed start.
    budget = ({"max_newton": 60, "lbfgs_iters": 0, "cg_max": 2000} if not names
              else {"max_newton": 5, "lbfgs_iters": 300, "cg_max": 50})
    theta, gnorm, _ = refit64(names, ftr, train.y, damping, tail_params, full,
                              **({**budget, "lbfgs_iters": 5000} if names else budget))
    unravel64 = ravel_pytree(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                                                     tail_params))[1]
    star = unravel64(theta[0])
    star32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), star)
    base = tail_losses64(names, star, theta, fte, test.y)[0]
    tail = Tail(num_classes, names, tuple(int(np.shape(params[k]["bias"])[0]) for k in names))
    trf = Dataset(ftr, np.asarray(train.y), np.asarray(train.a), np.asarray(train.idx))
    tef = Dataset(fte, np.asarray(test.y), np.asarray(test.a), np.asarray(test.idx))
    checks = {"base_gradient_norm": float(gnorm[0])}

    def retrain(keep, start=star, tag=""):
        thetas, gn, it = refit64(names, ftr, train.y, damping, start, keep, **budget)
        checks[f"max_gradient_norm{tag}"] = max(checks.get(f"max_gradient_norm{tag}", 0.0), float(gn.max()))
        checks[f"median_gradient_norm{tag}"] = float(np.median(gn))
        checks[f"max_newton_iterations{tag}"] = max(checks.get(f"max_newton_iterations{tag}", 0), int(it.max()))
        return tail_losses64(names, star, thetas, fte, test.y)

    extra = {}
    if names:
        rng = np.random.default_rng(5)
        perturbed = jax.tree_util.tree_map(lambda a: a + 1e-2 * np.std(a) * rng.standard_normal(np.shape(a)), star)
        extra["retrain_noise"] = lambda keep: retrain(keep, perturbed, "_perturbed_start")

    return {
        "train": trf, "test": tef, "base_losses": base, "retrain": retrain, "check": checks,
        "num_params": int(sum(np.size(v) for d in star.values() for v in d.values())),
        "problem_args": {"loss_fn": make_loss_fn(tail), "params": star32, "batch": trf, "damping": damping,
                         "model": tail},
        "retraining": ("float64 Newton-CG from the refitted minimum to ‖∇‖ ≤ 1e-8 (L + (λ/2)‖θ‖²)" if not names else
                       "float64 L-BFGS (300 steps) + Newton-CG (5 steps of ≤ 50 CG iterations) from the refitted point of L + (λ/2)‖θ‖²; "
                       "the ReLU minimum lies on kinks, so ‖∇‖ is reported and the noise is a perturbed start's"),
        **extra,
    }


def digits_calibration(n_test: int) -> tuple[Dataset, Dataset, dict]:
    """Softmax regression on scikit-learn's 8×8 digits (pixels / 16), the calibration problem:
    1,297 training and the first ``n_test`` of 500 held-out digits, zero-initialised head."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x = (x[order] / 16.0).astype(np.float32)
    y = y[order].astype(np.int32)
    ids = np.arange(len(y))
    ntr = len(y) - 500
    train = Dataset(x[:ntr], y[:ntr], np.zeros(ntr, np.int32), ids[:ntr])
    test = Dataset(x[ntr : ntr + n_test], y[ntr : ntr + n_test], np.zeros(n_test, np.int32), ids[ntr : ntr + n_test])
    params = {"head": {"kernel": jnp.zeros((64, 10), jnp.float32), "bias": jnp.zeros(10, jnp.float32)}}
    return train, test, params


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke sizes")
    ap.add_argument("--scale", choices=("cpu", "large"), default="cpu", help="problem sizes (large: accelerators)")
    ap.add_argument("--problems", nargs="*", default=["digits_logreg", "mlp_head", "mlp_two_layers", "mlp_all", "cnn_head"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=None,
                    help="override the scale's image side (28: the FMD MLP's 256k parameters in all layers)")
    ap.add_argument("--damping-sweep", nargs="*", type=float, default=None, metavar="λ",
                    help="instead of the solver grid: exact and cg on the head problems at each damping λ")
    ap.add_argument("--out", default=str(RESULTS_DIR / "influence_quality.json"))
    args = ap.parse_args(argv)
    scale = "quick" if args.quick else args.scale
    cfg = dict(SCALES[scale])
    if args.image_size is not None:
        if args.image_size < 4:
            ap.error(f"--image-size must be at least 4, got {args.image_size}")
        cfg["image_size"] = args.image_size
    unknown = set(args.problems) - {"digits_logreg", "mlp_head", "mlp_two_layers", "mlp_all", "cnn_head"}
    if unknown:
        ap.error(f"unknown problem(s) {sorted(unknown)}")
    t_start = time.perf_counter()
    key = jax.random.key(args.seed)
    out: dict[str, Any] = {"benchmark": "influence_quality", "command": " ".join(["python", *sys.argv]),
                           "machine": machine_info(), "scale": scale,
                           "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                           "damping": DAMPING, "fractions": list(FRACTIONS), "problems": []}

    def run_head(name, make_setup, pkey):
        """A head problem (``make_setup(λ)``) with the full grid, or exact and cg at each damping of the sweep."""
        for lam in args.damping_sweep or [DAMPING]:
            setup = make_setup(lam)
            only = ("exact/hessian", "cg/hessian") if args.damping_sweep else ()
            label = f"{name}@damping={lam:g}" if args.damping_sweep else name
            out["problems"].append(run_problem(label, "head", cfg, setup, pkey, only))
            write_result(args.out, out)

    if args.damping_sweep is not None:
        if not args.damping_sweep or min(args.damping_sweep) <= 0:
            ap.error("--damping-sweep needs one or more dampings > 0")
        args.problems = [p for p in args.problems if p.endswith("_head") or p == "digits_logreg"]
    if "digits_logreg" in args.problems:
        dtrain, dtest, dparams = digits_calibration(cfg["test_size"])
        if scale == "quick":
            dtrain = subset(dtrain, np.arange(cfg["train_size"]))
        run_head("digits_logreg", lambda lam: tail_setup(None, dparams, dtrain, dtest, (), None, 10, lam),
                 jax.random.fold_in(key, 9))
    need_mlp = any(p.startswith("mlp") for p in args.problems)
    if need_mlp:
        splits = colored_mnist(0.99, key=args.seed, image_size=cfg["image_size"], train_size=cfg["train_size"])
        test = subset(splits.test_unbiased, np.arange(min(cfg["test_size"], len(splits.test_unbiased))))
        mlp = create_model("mlp", splits.num_classes, hidden=cfg["hidden"])
        init, params = _train_model(mlp, splits.train, splits.input_shape, cfg["epochs"], jax.random.fold_in(key, 1))
        out["mlp"] = {"input_shape": list(splits.input_shape), "train_examples": len(splits.train),
                      "num_params": int(sum(np.size(v) for d in params.values() for v in d.values()))}
        names = tuple(f"dense_{i}" for i in range(len(cfg["hidden"])))
        if "mlp_head" in args.problems:
            run_head("mlp_head", lambda lam: tail_setup(mlp, params, splits.train, test, (), f"dense_{len(names) - 1}",
                                                        splits.num_classes, lam), jax.random.fold_in(key, 10))
        if "mlp_two_layers" in args.problems:
            setup = tail_setup(mlp, params, splits.train, test, (names[-1],), f"dense_{len(names) - 2}",
                               splits.num_classes)
            out["problems"].append(run_problem("mlp_two_layers", "two_layers", cfg, setup, jax.random.fold_in(key, 11)))
            write_result(args.out, out)
        if "mlp_all" in args.problems:
            base = per_example_ce(apply_model(mlp, params, {}, jnp.asarray(test.x))[0], jnp.asarray(test.y))
            order_key = jax.random.fold_in(key, 1)
            init2 = create_train_state(mlp, make_optimizer("adam", LR), jax.random.fold_in(key, 7),
                                       splits.input_shape).params
            setup = {
                "train": splits.train, "test": test, "base_losses": np.asarray(base, np.float64),
                "num_params": out["mlp"]["num_params"],
                "retrain": lambda keep: recipe_retrain(mlp, init, splits.train, test, keep, cfg["epochs"],
                                                       jax.random.fold_in(order_key, 2)),
                "retrain_noise": lambda keep: recipe_retrain(mlp, init2, splits.train, test, keep, cfg["epochs"],
                                                             jax.random.fold_in(order_key, 2)),
                "problem_args": {"loss_fn": make_loss_fn(mlp), "params": params, "batch": splits.train,
                                 "damping": DAMPING, "model": mlp},
                "retraining": "the recipe (Adam, same initialisation and batch order; removed samples weigh 0)",
            }
            out["problems"].append(run_problem("mlp_all", "all", cfg, setup, jax.random.fold_in(key, 12)))
            write_result(args.out, out)
    if "cnn_head" in args.problems:
        splits = biased_mnist(0.99, key=args.seed, image_size=cfg["image_size"] if scale != "quick" else 8,
                              train_size=cfg["train_size"])
        test = subset(splits.test_unbiased, np.arange(min(cfg["test_size"], len(splits.test_unbiased))))
        cnn = create_model("small_cnn", splits.num_classes, widths=cfg["cnn_widths"], strides=cfg["cnn_strides"])
        _, params = _train_model(cnn, splits.train, splits.input_shape, cfg["epochs"], jax.random.fold_in(key, 2))
        run_head("cnn_head", lambda lam: tail_setup(cnn, params, splits.train, test, (), None, splits.num_classes, lam),
                 jax.random.fold_in(key, 13))

    out["seconds"] = time.perf_counter() - t_start
    path = write_result(args.out, out)
    png = plot(out, path.with_suffix(".png"))
    print(table(out))
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return out


def table(result: dict) -> str:
    lines = []
    for prob in result["problems"]:
        lines.append(f"\n{prob['problem']} ({prob['num_params']} parameters, n={prob['train_examples']}, "
                     f"T={prob['test_examples']}; retraining: {prob['retraining']})")
        if prob.get("noise_ceiling"):
            lines.append("  retraining noise ceiling: " + ", ".join(f"{k} {v:.3f}" for k, v in prob["noise_ceiling"].items()))
        lines.append(f"  {'solver/curvature':28s} {'LDS .5':>7s} {'LDS .9':>7s} {'LDS .99':>7s} {'LOO':>6s} "
                     f"{'top1%':>6s} {'rnd1%':>6s} {'s':>7s} {'max res':>8s} {'conv':>5s}")
        for r in prob["solvers"]:
            if "error" in r:
                lines.append(f"  {r['label']:28s} error: {r['error']}")
                continue
            lines.append(f"  {r['label']:28s} {r['lds_0.5']:7.3f} {r['lds_0.9']:7.3f} {r['lds_0.99']:7.3f} "
                         f"{r['loo']:6.3f} {r['group_top']:6.3f} {r['group_random']:6.3f} {r['seconds']:7.1f} "
                         f"{r['max_residual']:8.2g} {r['converged']:>2d}/{r['solves']}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    probs = result["problems"]
    if not probs:
        return None
    fig, axes = plt.subplots(1, len(probs), figsize=(4.2 * len(probs), 4), squeeze=False)
    for ax, prob in zip(axes[0], probs, strict=True):
        for r in prob["solvers"]:
            if "error" in r:
                continue
            ax.scatter(r["seconds"], r["lds_0.5"], s=18)
            ax.annotate(r["label"], (r["seconds"], r["lds_0.5"]), fontsize=6)
        if prob.get("noise_ceiling"):
            ax.axhline(prob["noise_ceiling"]["lds_0.5"], ls="--", color="grey", lw=1)
            ax.annotate("retraining noise", (ax.get_xlim()[0], prob["noise_ceiling"]["lds_0.5"]), fontsize=6,
                        color="grey")
        ax.set_xscale("log")
        ax.set_xlabel("seconds (prepare + T solves + scores)")
        ax.set_ylabel("LDS at α = 0.5")
        ax.set_title(f"{prob['problem']} ({prob['num_params']} params)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
