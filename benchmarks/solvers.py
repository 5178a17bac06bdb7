"""Inverse-HVP solvers on trained models: time, memory, accuracy against the exact solve.

Run from the repository root::

    python benchmarks/solvers.py            # full run, ~1 minute on 2 CPU cores
    python benchmarks/solvers.py --quick    # smoke run: 8×8 images, 200 digits, short solvers
    python benchmarks/solvers.py --out PATH # default benchmarks/results/solvers.json (+ solvers.png)

What is measured (every figure lands in the JSON; the plot lands next to it, ``<stem>.png``):

* Two curvature problems on models trained with the library's ``fit`` (Adam) on real
  Colored-MNIST (ρ = 0.99):

  - ``head``: FMD's MLP (3×100) at 14×14×3 trained 5 epochs on 2,000 digits; the last layer
    (``LAST_LAYER``, 1,010 parameters), Hessian of the mean training loss over those 2,000
    digits, damping 0.1;
  - ``gn_all``: a small MLP (one hidden layer of 16) at 8×8×3 trained 40 epochs on 1,000 digits;
    *all* its parameters (3,258), the Gauss-Newton matrix (``curvature="gauss_newton"``), damping
    0.01; small enough that the dense matrix fits.

* For every solver in :data:`~privdebias_jax.influence.SOLVERS` (``linear_head`` only where the
  subset is a linear head), with the library's default options, plus LiSSA with an oracle scale
  (1.5 × the largest eigenvalue of the damped matrix, read off the exact solve): ``prepare`` and
  ``solve`` seconds, peak memory, and for two objectives — the counterfactual bias on the biased
  test set (``mean_i ‖softmax(f(x_i)) − softmax(f(x̃_i))‖²``, ``x̃`` the recoloured digit) and
  the mean cross-entropy on the unbiased test set —: the iHVP's relative error against a
  float64 solve of the dense damped matrix, the Spearman rank correlation and top-5 % overlap
  of the influence scores ``I(z_i) = −∇fᵀ H⁻¹ ∇ℓ(z_i)`` over the training set against that
  reference, and the solver's own relative residual. Target: Spearman ≥ 0.9 for cg, arnoldi,
  kfac and ekfac.
* Passes per solver: a first run (``prepare``, then ``solve`` for each objective; the accuracy
  figures; one-time costs such as compiling eager ops included), a warm run (``prepare`` +
  one ``solve``; the headline seconds and the plot; skipped when the first run took more than
  ``warm_rerun_max_s``), and a memory run. The problem's HVP and per-example gradients are
  compiled before any solver runs; ``solve`` includes the one exact HVP the library spends on
  the residual; LiSSA compiles its scan in every ``prepare``'s first ``solve`` (its compiled
  cost is ``lissa_compiled_solve_s``, the first run's second solve).
* Memory, in the memory run (prepare + one solve): ``tracemalloc`` peak (host allocations of
  Python and NumPy; XLA's CPU buffers are not traced) and the peak resident set size above the
  start (``/proc/self/statm`` sampled every 2 ms by a thread; includes XLA buffers; memory the
  allocators already hold is reused and not counted; the first run's figure is also kept), plus
  the ``ru_maxrss`` growth (only grows past the process's earlier peak).
  ``jax.devices()[0].memory_stats()`` is used when the backend provides it (None on CPU).
* Check of K-FAC / EK-FAC on the ``head`` problem: the true Fisher (= the Hessian of a linear
  softmax head), ``A ⊗ G`` and the eigenvalue-corrected matrix are built densely in float64
  independently of the library, so the JSON separates the methods' approximation error from an
  implementation error (``kfac_ekfac_dense_check``).
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import threading
import time
import tracemalloc
from pathlib import Path

# The repository root, so that `benchmarks` and `privdebias_jax` import when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from benchmarks.common import RESULTS_DIR, machine_info, write_result  # noqa: E402
from privdebias_jax.data import colored_mnist, other_attribute  # noqa: E402
from privdebias_jax.influence import (  # noqa: E402
    LAST_LAYER,
    SOLVERS,
    influence_scores,
    make_problem,
    make_solver,
    objective_gradient,
    per_example_grads,
)
from privdebias_jax.models import count_params, create_model  # noqa: E402
from privdebias_jax.train import (  # noqa: E402
    apply_model,
    create_train_state,
    cross_entropy_loss,
    evaluate,
    fit,
    make_loss_fn,
    make_optimizer,
)

RHO = 0.99
TARGET_SPEARMAN = 0.9
TARGET_SOLVERS = ("cg", "arnoldi", "kfac", "ekfac")
OBJECTIVES = ("counterfactual_bias", "test_loss")

FULL = {
    "problems": {
        "head": {
            "model": "mlp",
            "hidden": (100, 100, 100),
            "image_size": 14,
            "train_size": 2000,
            "epochs": 5,
            "select": LAST_LAYER,
            "curvature": "hessian",
            "damping": 0.1,
        },
        "gn_all": {
            "model": "mlp",
            "hidden": (16,),
            "image_size": 8,
            "train_size": 1000,
            "epochs": 40,
            "select": None,
            "curvature": "gauss_newton",
            "damping": 0.01,
        },
    },
    "batch_size": 128,
    "learning_rate": 1e-3,
    "test_size": 500,
    "solver_options": {
        "exact": {"method": "eigh"},
        "linear_head": {},
        "cg": {"tol": 1e-6, "maxiter": 200},
        "lissa": {"scale": 10.0, "depth": 1000, "batch_size": 256, "key": 0},
        "arnoldi": {"num_iters": 100, "top_k": 50, "key": 0},
        "kfac": {"fisher": "true"},
        "ekfac": {"fisher": "true"},
    },
    "lissa_oracle_factor": 1.5,
    "warm_rerun_max_s": 15.0,
    "top_fraction": 0.05,
    "rss_interval_s": 0.002,
}
QUICK = {
    **FULL,
    "problems": {
        "head": {
            **FULL["problems"]["head"],
            "hidden": (32,),
            "image_size": 8,
            "train_size": 200,
            "epochs": 2,
        },
        "gn_all": {**FULL["problems"]["gn_all"], "hidden": (4,), "train_size": 200, "epochs": 2},
    },
    "test_size": 100,
    "warm_rerun_max_s": 0.0,  # no warm runs: the smoke run only checks that everything works
    "solver_options": {
        **FULL["solver_options"],
        "cg": {"tol": 1e-6, "maxiter": 50},
        "lissa": {"scale": 10.0, "depth": 50, "batch_size": 64, "key": 0},
        "arnoldi": {"num_iters": 20, "top_k": 10, "key": 0},
    },
}
# Test-suite smoke run (``--smoke``): QUICK with smaller problems (170 and 246 parameters).
SMOKE = {
    **QUICK,
    "problems": {
        "head": {**QUICK["problems"]["head"], "hidden": (16,), "train_size": 100},
        "gn_all": {**QUICK["problems"]["gn_all"], "image_size": 4, "train_size": 100},
    },
    "test_size": 50,
}


# ----------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryMonitor:
    """Peak memory of a block: tracemalloc peak, sampled RSS peak above the start, ru_maxrss growth."""

    def __init__(self, interval_s: float, trace: bool = True):
        self.interval_s = interval_s
        self.trace = trace
        self.has_proc = os.path.exists("/proc/self/statm")

    def __enter__(self):
        self.device = jax.devices()[0]
        stats = self.device.memory_stats()
        self.dev0 = stats.get("peak_bytes_in_use") if stats else None
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.rss0 = _rss_bytes() if self.has_proc else 0
        self.rss_peak = self.rss0
        self.stop = threading.Event()
        if self.has_proc:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        if self.trace:
            tracemalloc.start()
            tracemalloc.reset_peak()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.rss_peak = max(self.rss_peak, _rss_bytes())
            self.stop.wait(self.interval_s)

    def __exit__(self, *exc):
        traced_peak = None
        if self.trace:
            _, traced_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        self.stop.set()
        if self.has_proc:
            self.thread.join()
            self.rss_peak = max(self.rss_peak, _rss_bytes())
        stats = self.device.memory_stats()
        self.result = {
            "tracemalloc_peak_mb": traced_peak / 2**20 if traced_peak is not None else None,
            "rss_peak_delta_mb": (self.rss_peak - self.rss0) / 2**20 if self.has_proc else None,
            "ru_maxrss_delta_mb": (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss0
            )
            / 1024,
            "device_peak_bytes_in_use_mb": (
                (stats.get("peak_bytes_in_use", 0) - (self.dev0 or 0)) / 2**20 if stats else None
            ),
        }
        return False


# ------------------------------------------------------------------------------------ objectives


def make_objectives(model):
    """``counterfactual_bias(params, (x, x_cf))`` and ``test_loss(params, batch)``."""

    def counterfactual_bias(params, pair):
        x, x_cf = pair
        p = jax.nn.softmax(apply_model(model, params, {}, x)[0], -1)
        q = jax.nn.softmax(apply_model(model, params, {}, x_cf)[0], -1)
        return jnp.mean(jnp.sum((p - q) ** 2, axis=-1))

    def test_loss(params, batch):
        return cross_entropy_loss(apply_model(model, params, {}, batch.x)[0], batch)

    return {"counterfactual_bias": counterfactual_bias, "test_loss": test_loss}


def as_batch_arrays(ds):
    from privdebias_jax.data import as_batch

    return jax.tree_util.tree_map(jnp.asarray, as_batch(ds))


# -------------------------------------------------------------------------------------- setting up


@functools.lru_cache(maxsize=4)
def load_splits(image_size: int, train_size: int):
    """Colored-MNIST splits, cached (resizing the 5,000 digits takes seconds)."""
    return colored_mnist(RHO, key=0, image_size=image_size, train_size=train_size)


def train_problem(name: str, cfg: dict, settings: dict):
    """Train the model of one problem and build its CurvatureProblem, objectives and reference."""
    t0 = time.perf_counter()
    splits = load_splits(cfg["image_size"], cfg["train_size"])
    model = create_model(cfg["model"], splits.num_classes, hidden=cfg["hidden"])
    tx = make_optimizer("adam", settings["learning_rate"])
    state = create_train_state(model, tx, jax.random.PRNGKey(0), splits.input_shape)
    fitted = fit(
        model,
        tx,
        state,
        splits.train,
        epochs=cfg["epochs"],
        batch_size=settings["batch_size"],
        key=jax.random.PRNGKey(1),
        progress=False,
    )
    params = fitted.state.params
    train_s = time.perf_counter() - t0
    ev = {
        k: evaluate(model, params, {}, getattr(splits, k), 10, 10)["acc"]
        for k in ("test", "test_unbiased")
    }

    train = splits.train
    problem = make_problem(
        make_loss_fn(model),
        params,
        train,
        select=cfg["select"],
        damping=cfg["damping"],
        curvature=cfg["curvature"],
        model=model,
    )
    n_test = min(settings["test_size"], len(splits.test))
    test = jax.tree_util.tree_map(lambda a: np.asarray(a)[:n_test], splits.test)
    test_cf = splits.counterfactual(
        test, other_attribute(test.a, splits.num_attributes, jax.random.PRNGKey(2))
    )
    unb = jax.tree_util.tree_map(lambda a: np.asarray(a)[:n_test], splits.test_unbiased)
    objectives = make_objectives(model)
    obj_batches = {
        "counterfactual_bias": (jnp.asarray(test.x), jnp.asarray(test_cf.x)),
        "test_loss": as_batch_arrays(unb),
    }
    grads = {k: objective_gradient(problem, objectives[k], obj_batches[k]) for k in OBJECTIVES}
    values = {k: float(objectives[k](params, obj_batches[k])) for k in OBJECTIVES}

    # Compile the problem's products and per-example gradients before any solver is timed.
    v0 = grads["counterfactual_bias"]
    jax.block_until_ready(problem.matvec(v0))
    jax.block_until_ready(problem.undamped_matvec(v0))
    t1 = time.perf_counter()
    pe_grads = np.asarray(per_example_grads(problem, train), np.float64)  # (N, P)
    pe_s = time.perf_counter() - t1
    info = {
        "model": cfg["model"],
        "hidden": list(cfg["hidden"]),
        "image_size": cfg["image_size"],
        "input_shape": list(splits.input_shape),
        "train_examples": len(train),
        "epochs": cfg["epochs"],
        "num_params_model": count_params(params),
        "num_params_subset": problem.num_params,
        "select": cfg["select"],
        "curvature": cfg["curvature"],
        "damping": cfg["damping"],
        "train_s": train_s,
        "history": fitted.history,
        "accuracy": ev,
        "objective_values": values,
        "objective_test_examples": n_test,
        "per_example_grads_s": pe_s,
    }
    return problem, grads, pe_grads, info, train


def reference(problem, grads, pe_grads) -> tuple[dict, dict, dict, object]:
    """The exact solver's dense matrix, solved in float64: iHVPs, scores, eigenvalues, and the
    exact solver's prepared state."""
    ex = make_solver("exact", method="eigh")
    state = ex.prepare(problem)
    h = np.asarray(state["hessian"], np.float64)
    a = h + problem.damping * np.eye(h.shape[0])
    evals = np.linalg.eigvalsh(a)
    xs, scores = {}, {}
    for k, g in grads.items():
        xs[k] = np.linalg.solve(a, np.asarray(ravel_pytree(g)[0], np.float64))
        scores[k] = -pe_grads @ xs[k]
    spectrum = {
        "damped_min_eigenvalue": float(evals[0]),
        "damped_max_eigenvalue": float(evals[-1]),
        "condition_number": float(evals[-1] / evals[0]) if evals[0] > 0 else None,
        "undamped_negative_eigenvalues": int(np.sum(evals - problem.damping < -1e-6)),
        "eigenvalues_above_1": int(np.sum(evals > 1)),
        "eigenvalues_above_0.1": int(np.sum(evals > 0.1)),
    }
    return xs, scores, spectrum, state


# ------------------------------------------------------------------------------------ benchmark


def solver_list(problem_name: str, settings: dict, spectrum: dict) -> list[tuple[str, str, dict]]:
    """``[(label, solver name, options)]`` for a problem."""
    out = []
    for name in SOLVERS:
        if name == "linear_head" and problem_name != "head":
            continue
        out.append((name, name, dict(settings["solver_options"].get(name, {}))))
        if name == "lissa":
            opts = dict(settings["solver_options"]["lissa"])
            opts["scale"] = float(
                settings["lissa_oracle_factor"] * spectrum["damped_max_eigenvalue"]
            )
            out.append(("lissa_oracle_scale", "lissa", opts))
    return out


def top_overlap(a: np.ndarray, b: np.ndarray, frac: float) -> float:
    k = max(1, int(round(frac * len(a))))
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def _solve_pass(solver, problem, grads, objectives) -> tuple[float, dict, dict]:
    """``prepare`` then ``solve`` for each objective: (prepare s, {objective: solve s}, {objective: (x, diag)})."""
    t0 = time.perf_counter()
    state = solver.prepare(problem)
    prepare_s = time.perf_counter() - t0
    solve_s, outs = {}, {}
    for obj in objectives:
        t1 = time.perf_counter()
        x, diag = solver.solve(state, grads[obj])
        jax.block_until_ready(x)
        solve_s[obj] = time.perf_counter() - t1
        outs[obj] = (x, diag)
    return prepare_s, solve_s, outs


def run_solver(label, name, opts, problem, grads, pe_grads, ref_x, ref_scores, settings) -> dict:
    """Three passes: first run (timed, RSS sampled; accuracy), a warm timed run, a tracemalloc run."""
    solver = make_solver(name, **opts)
    entry: dict = {"solver": name, "options": opts}
    try:
        with MemoryMonitor(settings["rss_interval_s"], trace=False) as mon:
            prepare_s, solve_s, outs = _solve_pass(solver, problem, grads, OBJECTIVES)
    except Exception as err:  # a solver that refuses the problem (e.g. linear_head) is recorded
        return {**entry, "error": f"{type(err).__name__}: {err}"}
    first = prepare_s + solve_s[OBJECTIVES[0]]
    entry["first_run"] = {
        "prepare_s": prepare_s,
        "solve_s": solve_s,
        "prepare_plus_solve_s": first,
        "rss_peak_delta_mb": mon.result["rss_peak_delta_mb"],
    }
    entry["objectives"] = {}
    for obj, (x, diag) in outs.items():
        xf = np.asarray(ravel_pytree(x)[0], np.float64)
        if obj == OBJECTIVES[0]:
            entry["_x"] = xf
        scores = -pe_grads @ xf
        finite = bool(np.all(np.isfinite(scores)))
        rho = float(spearmanr(scores, ref_scores[obj]).statistic) if finite else float("nan")
        flags = {k: v for k, v in diag.flags.items() if k != "eigenvalues"}
        if "eigenvalues" in diag.flags:
            ev = diag.flags["eigenvalues"]
            flags["eigenvalues_kept"] = len(ev)
            flags["eigenvalue_range"] = [float(min(ev)), float(max(ev))] if ev else None
        entry["objectives"][obj] = {
            "rel_err": float(np.linalg.norm(xf - ref_x[obj]) / np.linalg.norm(ref_x[obj])),
            "spearman": rho,
            "top_overlap": top_overlap(scores, ref_scores[obj], settings["top_fraction"])
            if finite
            else float("nan"),
            "residual": diag.residual,
            "iterations": diag.iterations,
            "converged": diag.converged,
            "iteration_converged": diag.iteration_converged,
            "residual_tol": diag.residual_tol,
            "library_seconds": diag.seconds,
            "flags": flags,
        }
    del outs
    # Warm run: one-time costs (eager-op compiles) paid; skipped when the first run was slow
    # (then dominated by work that a second run repeats, and the run time is bounded).
    if first <= settings["warm_rerun_max_s"]:
        w_prep, w_solve, _ = _solve_pass(solver, problem, grads, OBJECTIVES[:1])
        entry["warm_run"] = {
            "prepare_s": w_prep,
            "solve_s": w_solve[OBJECTIVES[0]],
            "prepare_plus_solve_s": w_prep + w_solve[OBJECTIVES[0]],
        }
        entry["prepare_s"], entry["solve_s"] = w_prep, w_solve[OBJECTIVES[0]]
        entry["timing_from"] = "warm_run"
    else:
        entry["warm_run"] = None
        entry["prepare_s"], entry["solve_s"] = prepare_s, solve_s[OBJECTIVES[0]]
        entry["timing_from"] = (
            f"first_run (took > warm_rerun_max_s = {settings['warm_rerun_max_s']} s)"
        )
    entry["prepare_plus_solve_s"] = entry["prepare_s"] + entry["solve_s"]
    # Memory: an untimed pass of prepare + one solve under tracemalloc.
    with MemoryMonitor(settings["rss_interval_s"], trace=True) as mon:
        _solve_pass(solver, problem, grads, OBJECTIVES[:1])
    entry["memory"] = {
        **mon.result,
        "rss_peak_delta_mb_first_run": entry["first_run"]["rss_peak_delta_mb"],
    }
    return entry


def kfac_dense_check(problem, grads, solutions: dict) -> dict:
    """For a linear softmax head: build the true Fisher (= the Hessian), its K-FAC ``A ⊗ G`` and
    EK-FAC approximations densely in float64, independently of the library, and compare.

    Separates the approximation error of the method (``*_vs_fisher``) from an implementation
    error (``library_vs_independent``, expected ~1e-6).
    """
    params = problem.with_selected(problem.selected)
    logits, feats, _ = apply_model(
        problem.model, params, problem.model_state or {}, problem.batch.x
    )
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    feats = np.asarray(feats, np.float64)
    n, f = feats.shape
    c = probs.shape[1]
    abar = np.concatenate([feats, np.ones((n, 1))], 1)  # (n, f+1): [h, 1]
    g = probs[:, None, :] - np.eye(c)[None]  # (n, label c, C): ∂ℓ/∂z for label c
    w = probs / n  # the true Fisher weighs label c by p(c | x)
    fisher = np.zeros(((f + 1) * c, (f + 1) * c))
    for k in range(c):
        m = (abar[:, :, None] * g[:, k, None, :]).reshape(n, -1)  # vec(ā gᵀ), row-major (f+1, C)
        fisher += (m * w[:, k : k + 1]).T @ m
    a_mat = abar.T @ abar / n
    g_mat = np.einsum("ik,ikj,ikl->jl", w, g, g)
    qa, qg = np.linalg.eigh(a_mat)[1], np.linalg.eigh(g_mat)[1]
    kfac_mat = np.kron(a_mat, g_mat)
    lam = np.zeros((f + 1, c))
    for k in range(c):
        rot = np.einsum(
            "ji,njk,kl->nil", qa, abar[:, :, None] * g[:, k, None, :], qg, optimize=True
        )
        lam += np.einsum("n,nil->il", w[:, k], rot * rot)
    q = np.kron(qa, qg)
    ekfac_mat = (q * lam.reshape(-1)) @ q.T
    # the library's ravel order: head/bias (C) then head/kernel (f×C row-major) → row f, rows 0..f-1
    perm = np.concatenate([f * c + np.arange(c), np.arange(f * c)])
    dense_h = np.asarray(make_solver("exact").prepare(problem)["hessian"], np.float64)
    eye = problem.damping * np.eye(len(perm))
    v = np.zeros(len(perm))
    v[perm] = np.asarray(ravel_pytree(grads["counterfactual_bias"])[0], np.float64)
    x_f = np.linalg.solve(fisher + eye, v)
    out = {
        "fisher_vs_library_hessian_rel": float(
            np.linalg.norm(fisher[np.ix_(perm, perm)] - dense_h) / np.linalg.norm(dense_h)
        ),
    }
    for name, mat in (("kfac", kfac_mat), ("ekfac", ekfac_mat)):
        x_ind = np.linalg.solve(mat + eye, v)
        x_lib = np.zeros(len(perm))
        x_lib[perm] = solutions[name]
        out[name] = {
            "matrix_vs_fisher_rel_frobenius": float(
                np.linalg.norm(mat - fisher) / np.linalg.norm(fisher)
            ),
            "ihvp_vs_fisher_rel": float(np.linalg.norm(x_ind - x_f) / np.linalg.norm(x_f)),
            "library_vs_independent_rel": float(
                np.linalg.norm(x_lib - x_ind) / np.linalg.norm(x_ind)
            ),
        }
    return out


def check_library_scores(problem, grads, pe_grads, train, exact_state) -> float:
    """Max |difference| between ``influence_scores`` (exact) and ``−G s`` computed here (sanity)."""
    res = influence_scores(
        problem, grads["counterfactual_bias"], train, solver="exact", prepared=exact_state
    )
    mine = -pe_grads @ np.asarray(ravel_pytree(res.ihvp)[0], np.float64)
    return float(np.max(np.abs(res.scores - mine)) / max(np.max(np.abs(mine)), 1e-30))


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # pragma: no cover - matplotlib is a dependency
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = dict(
        zip(
            [
                "exact",
                "linear_head",
                "cg",
                "lissa",
                "lissa_oracle_scale",
                "arnoldi",
                "kfac",
                "ekfac",
            ],
            "osD^v*PX",
            strict=True,
        )
    )
    colors = {"head": "tab:blue", "gn_all": "tab:orange"}
    for pname, p in result["problems"].items():
        for label, e in p["solvers"].items():
            if "error" in e:
                continue
            o = e["objectives"]["counterfactual_bias"]
            t = e["prepare_plus_solve_s"]
            kw = dict(marker=markers.get(label, "o"), color=colors.get(pname, "k"), s=60)
            rho = (
                o["spearman"]
                if np.isfinite(o["spearman"] if o["spearman"] is not None else np.nan)
                else -1.0
            )
            axes[0].scatter(t, rho, **kw)
            axes[0].annotate(label, (t, rho), fontsize=7, xytext=(4, 3), textcoords="offset points")
            err = o["rel_err"] if o["rel_err"] is not None and np.isfinite(o["rel_err"]) else 1e3
            axes[1].scatter(t, max(err, 1e-8), **kw)
            axes[1].annotate(
                label, (t, max(err, 1e-8)), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("prepare + solve (s, log)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].axhline(TARGET_SPEARMAN, color="gray", ls="--", lw=1)
    axes[0].set_ylabel("Spearman of influence scores vs exact")
    axes[0].set_title("Influence ranking (counterfactual-bias objective)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("iHVP relative error vs float64 exact")
    axes[1].set_title("iHVP accuracy")
    from matplotlib.lines import Line2D

    def describe(n):
        p = result["problems"][n]
        return f"{n}: {p['num_params_subset']:,} params, {p['curvature']}, damping {p['damping']}"

    handles = [
        Line2D([], [], color=c, marker="o", ls="", label=describe(n))
        for n, c in colors.items()
        if n in result["problems"]
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)
    fig.suptitle(
        f"Inverse-HVP solvers ({result['machine']['jax_backend']}, "
        f"{result['machine']['cpu_count_usable']} cores)"
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(result: dict) -> None:
    print(
        "\nInverse-HVP solvers vs the float64 exact solve (influence on the counterfactual bias | test loss)"
    )
    head = (
        f"{'problem':<8}{'solver':<20}{'prep s':>8}{'solve s':>8}{'1st run':>8}{'rel err':>10}{'spearman':>9}"
        f"{'top5%':>7}{'residual':>10}{'iters':>6}{'|':>2}{'rel err':>10}{'spearman':>9}{'trace MB':>9}{'RSS MB':>8}"
    )
    print(head)
    print("-" * len(head))
    for pname, p in result["problems"].items():
        for label, e in p["solvers"].items():
            if "error" in e:
                print(f"{pname:<8}{label:<20}  {e['error'][:90]}")
                continue
            b, t = e["objectives"]["counterfactual_bias"], e["objectives"]["test_loss"]
            m = e["memory"]
            rss = m["rss_peak_delta_mb_first_run"]
            print(
                f"{pname:<8}{label:<20}{e['prepare_s']:>8.3f}{e['solve_s']:>8.3f}"
                f"{e['first_run']['prepare_plus_solve_s']:>8.2f}"
                f"{b['rel_err']:>10.2e}{b['spearman']:>9.4f}{b['top_overlap']:>7.2f}{b['residual']:>10.2e}"
                f"{b['iterations']:>6}{'|':>2}{t['rel_err']:>10.2e}{t['spearman']:>9.4f}"
                f"{m['tracemalloc_peak_mb']:>9.1f}{(rss if rss is not None else float('nan')):>8.1f}"
            )
    print(
        "(prep/solve s: warm run where taken; 1st run: prepare + solve of the first call, compiles included; "
        "trace MB: tracemalloc peak; RSS MB: sampled RSS peak above the start, first run)"
    )
    s = result["summary"]
    print(f"\nSpearman ≥ {TARGET_SPEARMAN} targets (cg, arnoldi, kfac, ekfac): {s['target_met']}")
    print(f"LiSSA (defaults) Spearman: {s['lissa_spearman']}")
    for pname, p in result["problems"].items():
        chk = p.get("kfac_ekfac_dense_check")
        if chk:
            print(
                f"{pname}: dense K-FAC/EK-FAC check (float64, independent of the library): "
                + "; ".join(
                    f"{k}: matrix vs Fisher {chk[k]['matrix_vs_fisher_rel_frobenius']:.2f}, iHVP vs exact "
                    f"{chk[k]['ihvp_vs_fisher_rel']:.2f}, library vs independent "
                    f"{chk[k]['library_vs_independent_rel']:.1e}"
                    for k in ("kfac", "ekfac")
                )
            )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (8×8 images, 300 digits, short solvers)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "solvers.json", help="JSON result path"
    )
    parser.add_argument(
        "--problems",
        nargs="+",
        choices=["head", "gn_all"],
        default=None,
        help="restrict the problems",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="--quick with smaller problems (the test suite's run)"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    args.quick = args.quick or args.smoke
    settings = SMOKE if args.smoke else QUICK if args.quick else FULL
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    problems = {}
    for pname, cfg in settings["problems"].items():
        if args.problems and pname not in args.problems:
            continue
        print(f"[solvers] {pname}: training and reference ...", file=sys.stderr, flush=True)
        problem, grads, pe_grads, info, train = train_problem(pname, cfg, settings)
        t0 = time.perf_counter()
        ref_x, ref_scores, spectrum, exact_state = reference(problem, grads, pe_grads)
        info["reference_s"] = time.perf_counter() - t0
        info["spectrum"] = spectrum
        info["library_influence_scores_rel_diff"] = check_library_scores(
            problem, grads, pe_grads, train, exact_state
        )
        del exact_state
        solvers = {}
        for label, name, opts in solver_list(pname, settings, spectrum):
            print(f"[solvers] {pname}: {label} ...", file=sys.stderr, flush=True)
            solvers[label] = run_solver(
                label, name, opts, problem, grads, pe_grads, ref_x, ref_scores, settings
            )
        if (
            set(problem.selected) == {"head/bias", "head/kernel"}
            and "_x" in solvers.get("kfac", {})
            and "_x" in solvers.get("ekfac", {})
        ):
            info["kfac_ekfac_dense_check"] = kfac_dense_check(
                problem, grads, {k: solvers[k]["_x"] for k in ("kfac", "ekfac")}
            )
        for e in solvers.values():
            e.pop("_x", None)
        lissa_e = solvers.get("lissa", {})
        if "first_run" in lissa_e:
            info["lissa_compiled_solve_s"] = lissa_e["first_run"]["solve_s"][OBJECTIVES[1]]
        problems[pname] = {**info, "solvers": solvers}

    def spearman_of(p, label, obj="counterfactual_bias"):
        e = p["solvers"].get(label)
        return None if e is None or "error" in e else e["objectives"][obj]["spearman"]

    target_met = {
        pname: {
            s: (
                spearman_of(p, s) is not None
                and spearman_of(p, s) >= TARGET_SPEARMAN
                and spearman_of(p, s, "test_loss") >= TARGET_SPEARMAN
            )
            for s in TARGET_SOLVERS
        }
        for pname, p in problems.items()
    }
    result = {
        "benchmark": "solvers",
        "command": " ".join([Path(sys.executable).name, *sys.argv])
        if argv is None
        else "main(" + repr(argv) + ")",
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            "smoke": args.smoke,
            **{k: v for k, v in settings.items() if k != "problems"},
            "problems": {
                k: {**v, "hidden": list(v["hidden"])}
                for k, v in settings["problems"].items()
                if not args.problems or k in args.problems
            },
            "data": f"colored_mnist({RHO}, key=0, image_size, train_size); objectives on the first test_size rows "
            "of the biased test split (counterfactual: recolor to other_attribute(a, 10, PRNGKey(2))) and of "
            "the unbiased test split",
            "training": "fit(model, make_optimizer('adam', learning_rate), create_train_state(PRNGKey(0)), train, "
            "epochs, batch_size, key=PRNGKey(1))",
            "reference": "the exact solver's dense (float32) undamped matrix + damping·I, solved with "
            "numpy.linalg.solve in float64; reference scores −G x_ref with G the per-example gradients",
            "objectives": {
                "counterfactual_bias": "mean_i ||softmax(f(x_i)) − softmax(f(x̃_i))||², biased test split",
                "test_loss": "mean cross-entropy, unbiased test split",
            },
            "lissa_oracle_scale": "lissa with scale = lissa_oracle_factor × the largest eigenvalue of the damped "
            "matrix (known only from the exact solve)",
            "timing": "perf_counter around solver.prepare(problem) and solver.solve(state, ∇f) (results blocked); "
            "problem products and per-example gradients compiled beforehand; one run per solver",
            "memory": "second untimed pass of prepare + one solve: tracemalloc peak (Python + NumPy host "
            "allocations only), sampled /proc/self/statm RSS peak minus RSS at the start (includes XLA CPU "
            "buffers; allocator-cached memory is reused and not counted), ru_maxrss growth; "
            "device memory_stats() when the backend has it (None on CPU)",
            "jax_memory_stats_available": jax.devices()[0].memory_stats() is not None,
        },
        "problems": problems,
        "summary": {
            "spearman_counterfactual_bias": {
                p: {s: spearman_of(v, s) for s in v["solvers"]} for p, v in problems.items()
            },
            "spearman_test_loss": {
                p: {s: spearman_of(v, s, "test_loss") for s in v["solvers"]}
                for p, v in problems.items()
            },
            "prepare_plus_solve_s": {
                p: {s: e.get("prepare_plus_solve_s") for s, e in v["solvers"].items()}
                for p, v in problems.items()
            },
            "target_spearman": TARGET_SPEARMAN,
            "target_met": target_met,
            "lissa_spearman": {
                p: {
                    "default": spearman_of(v, "lissa"),
                    "oracle_scale": spearman_of(v, "lissa_oracle_scale"),
                }
                for p, v in problems.items()
            },
            "kfac_ekfac_dense_check": {
                p: v.get("kfac_ekfac_dense_check") for p, v in problems.items()
            },
        },
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
    }
    result["total_s"] = time.perf_counter() - t_start
    path = write_result(args.out, result)
    png = None if args.no_plot else plot(result, Path(args.out).with_suffix(".png"))
    print_table(result)
    print(f"\nwrote {path}" + (f" and {png}" if png else "") + f" ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
