"""Influence scores for a whole training set, JAX (this library) against PyTorch on the same CPU.

Run from the repository root::

    python benchmarks/influence_throughput.py            # full run: N = 4000 training samples
    python benchmarks/influence_throughput.py --quick    # smoke run: N = 64, 2 CG iterations, 1 repeat
    python benchmarks/influence_throughput.py --out PATH # default benchmarks/results/influence_throughput.json

What is measured: the time to score every one of ``N`` training samples on one objective with
influence functions (Koh & Liang 2017), ``I(z_i) = −∇ℓ(z_i)ᵀ H_λ⁻¹ ∇f``, with the same model,
weights, data and algorithm on both sides, in three stages:

1. ``solve``: the gradient ``∇f`` of the objective ``f`` (the mean test loss) and one inverse-HVP
   ``s = H_λ⁻¹ ∇f`` by conjugate gradient with a fixed number of iterations (``cg_iters`` HVPs,
   tolerance too small to stop early), ``H`` the Hessian of the mean training loss over the
   ``N`` samples, all parameters, damping ``λ`` (1 by default: the Hessian of the briefly trained
   networks is indefinite, and with a small ``λ`` CG meets negative curvature and stops early,
   so the two sides would not do the same work; ``work_identical`` records that both ran every
   iteration);
2. ``per_example_grads``: ``∇ℓ(z_i)`` for all ``N`` samples, ``vmap`` of ``grad`` over chunks of
   ``chunk_size``;
3. ``scores``: ``−g_i · s`` for every chunk (the chunks are streamed: the ``(N, P)`` matrix of
   the MLP would not fit in memory). On the JAX side stages 2 and 3 are one program per chunk
   (:func:`~privdebias_jax.influence.per_example_products`), timed together as stage 2.

* JAX, the library's public path: ``make_problem(make_loss_fn(model), params, train)`` (Hessian
  curvature, every parameter), ``problem.gradient(test)``, ``make_solver("cg", tol=1e-30,
  maxiter=cg_iters)`` ``prepare``/``solve`` (its solve linearizes the gradient once and runs one
  tangent pass per iteration, then checks the residual with one more product), and
  ``per_example_products``; a fresh problem per call, so nothing is cached between repeats.
  The library's one-call ``influence_scores`` is timed once as well (``jax_influence_scores_one_call``).
* PyTorch: the functional twin of :mod:`benchmarks.torch_reference` (weights copied from JAX),
  ``torch.func.grad`` for ``∇f``, a hand-written CG with the same recurrences whose HVP is
  ``torch.func.jvp(torch.func.grad(loss))`` (``torch``), per-example gradients by
  ``torch.func.vmap(torch.func.grad(loss))`` over the same chunks, scores as per-layer dot
  products. The solve is also timed with PyTorch's double backward through one retained graph
  (``torch_graph_reuse``: ``autograd.grad(create_graph=True)`` once, one backward per HVP), the
  PyTorch analogue of the library's linearization reuse. ``torch.set_num_threads(os.cpu_count())``.
* Problems: ``mlp`` (FMD 3×100) on Colored-MNIST 28×28×3 (``N`` = 4000) and ``small_cnn`` (4 strided
  3×3 convs) on Biased-MNIST 14×14 (``N`` = 2000); the first ``N`` training and ``n_test`` test samples of the embedded
  splits (ρ = 0.99, key 0); parameters from ``init`` (key 0) after ``train_epochs`` of Adam on
  the whole training split (``--quick``: on the scored samples).
* Timing: one untimed warm-up (JAX: a whole call, reported as ``first_call_s``, the compile
  estimate as ``first_call_s − total``; PyTorch: one product of each kind and one chunk), then
  ``repeats`` rounds, each calling every side once after an untimed sleep of ``settle_s``; stage
  times are the medians over rounds, ``total`` the median of the rounds' sums.
* Chunk size (``chunk_sweep``): stages 2 and 3 on the first ``sweep_rows`` samples at each of
  ``sweep_chunks``, both sides at the same size, interleaved; the per-example stage's cost on
  both sides depends on it (the MLP's per-example gradients are ``chunk × 235 200`` floats for
  the first layer alone). The sweep also times ``jax_flat`` (the library's
  ``iterate_per_example_grads``: flat ``(chunk, P)`` gradients, then the products) and
  ``jax_fused``, this script's own one-program variant written outside the library, as a
  cross-check of ``per_example_products``.
* Ratio ``torch_total / jax_total``; target ≥ 2 on the MLP (the CNN figure is reported as
  measured). ``over_best_torch``: against the faster of PyTorch's two solves.
* Agreement of the JAX and PyTorch results (``agreement``): relative error ``‖a − b‖ / ‖b‖`` and
  Spearman rank correlation of the scores, relative error of ``s`` and of ``∇f``; limit 1e-3.
  The first ``scores_head`` scores of each side are stored for the smoke test.

If ``torch`` is not importable, the JSON says ``"torch": "not installed"``, holds the JAX timings
alone, and the script exits 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# The repository root, so that `benchmarks` and `privdebias_jax` import when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from benchmarks.common import REPO_ROOT, RESULTS_DIR, machine_info, median, write_result  # noqa: E402
from benchmarks.torch_reference import config_name, torch_available  # noqa: E402
from privdebias_jax.data import Batch, Dataset, biased_mnist, colored_mnist  # noqa: E402
from privdebias_jax.data.dataset import as_batch  # noqa: E402
from privdebias_jax.influence import (  # noqa: E402
    influence_scores,
    iterate_per_example_grads,
    make_problem,
    make_solver,
    merge_params,
    per_example_products,
    split_params,
)
from privdebias_jax.models import count_params, create_model  # noqa: E402
from privdebias_jax.train import make_loss_fn  # noqa: E402

RHO = 0.99
AGREEMENT_LIMIT = 1e-3
TARGET_TORCH_OVER_JAX = {"mlp": 2.0}
PROBLEMS = [("mlp", "colored-mnist", 28), ("small_cnn", "biased-mnist", 14)]
STAGES = ("solve", "per_example_grads", "scores")
#: CG's tolerance: positive (the solver requires it) and too small to be reached in float32,
#: so both sides run exactly ``cg_iters`` iterations.
CG_TOL = 1e-30

FULL = {
    # N per model: the CNN's 20 products over 4000 samples take PyTorch over a minute per solve
    # on 2 cores, so its N is halved to keep the full run within about 10 minutes.
    "n_train": {"mlp": 4000, "small_cnn": 2000},
    "n_test": 1000,
    # Both sides at the same chunk size; on idle cores 32 is faster than 256 for both (chunk_sweep
    # has 16, 32 and 256). PyTorch's small-chunk times swing several-fold when other processes
    # load the cores: run it on an idle machine (the load average is in the JSON).
    "chunk_size": 32,
    "cg_iters": 20,
    # λ = 1: the Hessian at this point is indefinite, and at λ = 0.01 (and 0.1, 0.3) CG meets a
    # direction of negative curvature within 5 to 10 iterations and stops; with λ = 1 both sides
    # run all ``cg_iters`` iterations (``work_identical`` in the JSON checks it). λ does not
    # change the cost of an iteration.
    "damping": 1.0,
    "repeats": 3,
    "settle_s": 0.5,
    "train_epochs": 1,
    "train_batch": 128,
    # "split": train on the whole embedded training split (the parameters do not depend on N);
    # "scored": on the N scored samples.
    "train_on": "split",
    "learning_rate": 1e-3,
    "scores_head": 16,
    "sweep_chunks": [16, 32, 256],
    "sweep_rows": 1024,
}
QUICK = {
    **FULL,
    "n_train": {"mlp": 64, "small_cnn": 64},
    "n_test": 64,
    "chunk_size": 32,
    "cg_iters": 2,
    "repeats": 1,
    "settle_s": 0.0,
    "train_epochs": 20,
    "train_batch": 32,
    "train_on": "scored",
    "sweep_chunks": [16],
    "sweep_rows": 64,
}


def git_commit() -> dict:
    """The checked-out commit and whether tracked files differ from it (``None`` outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except Exception:  # no git, not a checkout
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": dirty}


def rel_err(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` in float64."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def spearman(a, b) -> float:
    """Spearman's rank correlation (ties broken by position; the scores are continuous)."""
    ra = np.argsort(np.argsort(np.asarray(a, np.float64), kind="stable"), kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(np.asarray(b, np.float64), kind="stable"), kind="stable").astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1]) if len(ra) > 1 else 1.0


# ---------------------------------------------------------------------------------------- set-up


def n_train_for(settings: dict, model_name: str) -> int:
    """``settings["n_train"]``: one number, or one per model."""
    n = settings["n_train"]
    return int(n[model_name]) if isinstance(n, dict) else int(n)


def head_rows(ds: Dataset, n: int) -> Dataset:
    """The first ``n`` samples (NumPy arrays)."""
    return Dataset(*(np.asarray(v)[:n] for v in ds))


def train_briefly(model, params, ds: Dataset, settings: dict):
    """``train_epochs`` epochs of Adam on ``ds`` (fixed-size shuffled batches, seed 0)."""
    loss_fn = make_loss_fn(model)
    tx = optax.adam(settings["learning_rate"])
    bs = min(settings["train_batch"], len(ds))

    @jax.jit
    def step(p, o, b):
        g = jax.grad(loss_fn)(p, b)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    opt = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(settings["train_epochs"]):
        order = rng.permutation(len(ds))
        for start in range(0, len(ds) - bs + 1, bs):
            rows = order[start:start + bs]
            b = Batch(*(jnp.asarray(np.asarray(v)[rows]) for v in ds), mask=jnp.ones(bs, jnp.float32))
            params, opt = step(params, opt, b)
    return jax.block_until_ready(params)


def setup(model_name: str, dataset: str, image_size: int, settings: dict) -> dict:
    """Model, trained parameters (full tree and the flat ``path → array`` dict) and the data."""
    loader = colored_mnist if dataset == "colored-mnist" else biased_mnist
    splits = loader(RHO, key=0, image_size=image_size)
    train = head_rows(splits.train, n_train_for(settings, model_name))
    test = head_rows(splits.test, settings["n_test"])
    model = create_model(model_name, splits.num_classes)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, *train.x.shape[1:]), jnp.float32)))(
        jax.random.PRNGKey(0))["params"]
    params = train_briefly(model, params, splits.train if settings["train_on"] == "split" else train, settings)
    flat, _ = split_params(params, None)
    to_batch = lambda ds: jax.block_until_ready(Batch(*(jnp.asarray(v) for v in as_batch(ds))))  # noqa: E731
    return {
        "model": model,
        "loss_fn": make_loss_fn(model),
        "params": params,
        "flat": flat,
        "train": train,
        "test": test,
        "train_batch": to_batch(train),
        "test_batch": to_batch(test),
    }


# ------------------------------------------------------------------------------------------- JAX


def jax_stream(problem, data: Dataset, s: jax.Array, chunk_size: int) -> tuple[float, float, np.ndarray]:
    """Stages 2 and 3 by the library's :func:`~privdebias_jax.influence.per_example_products`
    (per-example gradients and their products with ``s`` in one program per chunk), all seconds
    counted as stage 2; returns the seconds of each stage and the scores."""
    t0 = time.perf_counter()
    scores = -per_example_products(problem, data, s, chunk_size)
    return time.perf_counter() - t0, 0.0, scores


def jax_flat_stream(problem, data: Dataset, s: jax.Array, chunk_size: int) -> tuple[float, float, np.ndarray]:
    """Stages 2 and 3 through ``iterate_per_example_grads`` (flat ``(chunk, P)`` gradients, then
    ``−g s``): the library's other per-example path, timed in the chunk sweep."""
    scores = np.zeros(len(data), np.float64)
    t_grads = t_scores = 0.0
    chunks = iterate_per_example_grads(problem, data, chunk_size)
    while True:
        t1 = time.perf_counter()
        try:
            rows, g = next(chunks)
        except StopIteration:
            break
        jax.block_until_ready(g)
        t2 = time.perf_counter()
        scores[rows] = -np.asarray(g @ s, np.float64)
        t3 = time.perf_counter()
        t_grads += t2 - t1
        t_scores += t3 - t2
    return t_grads, t_scores, scores


def jax_pipeline(ctx: dict, settings: dict) -> dict:
    """The three stages through the library's public API; seconds per stage and the results."""
    t0 = time.perf_counter()
    problem = make_problem(ctx["loss_fn"], ctx["params"], ctx["train_batch"], damping=settings["damping"])
    grad_f = problem.gradient(ctx["test_batch"])
    solver = make_solver("cg", tol=CG_TOL, maxiter=settings["cg_iters"])
    ihvp, diag = solver.solve(solver.prepare(problem), grad_f)
    s = jax.block_until_ready(problem.ravel(ihvp))
    t_solve = time.perf_counter() - t0

    t_grads, t_scores, scores = jax_stream(problem, ctx["train"], s, settings["chunk_size"])
    return {
        "seconds": {"solve": t_solve, "per_example_grads": t_grads, "scores": t_scores},
        "scores": scores,
        "s": np.asarray(s),
        "grad_f": np.asarray(problem.ravel(grad_f)),
        "diagnostics": diag.as_dict(),
    }


def jax_one_call(ctx: dict, settings: dict) -> dict:
    """The library's one-call path: ``influence_scores`` (solve, then streamed scores)."""
    t0 = time.perf_counter()
    problem = make_problem(ctx["loss_fn"], ctx["params"], ctx["train_batch"], damping=settings["damping"])
    result = influence_scores(problem, problem.gradient(ctx["test_batch"]), ctx["train"], solver="cg",
                              solver_options={"tol": CG_TOL, "maxiter": settings["cg_iters"]},
                              chunk_size=settings["chunk_size"])
    return {"seconds": {"total": time.perf_counter() - t0}, "scores": result.scores}


# --------------------------------------------------------------------------------------- PyTorch


class TorchInfluence:
    """The same three stages in PyTorch on the functional twin of ``benchmarks.torch_reference``."""

    def __init__(self, model_name: str, image_size: int, ctx: dict):
        import torch

        from benchmarks.torch_reference import TorchTwin

        self.torch = torch
        zeros = {k: np.zeros_like(np.asarray(v)) for k, v in ctx["flat"].items()}
        self.twin = TorchTwin(model_name, image_size, ctx["flat"], zeros, ctx["train_batch"])
        test_twin = TorchTwin(model_name, image_size, ctx["flat"], zeros, ctx["test_batch"])
        self.x, self.y = self.twin.x, self.twin.y
        self.x_test, self.y_test = test_twin.x, test_twin.y
        self.params = self.twin.params
        self.keys = list(self.params)
        self.shapes = [self.params[k].shape for k in self.keys]
        self.sizes = [self.params[k].numel() for k in self.keys]
        self.loss = self.twin.loss
        self.grad_fn = torch.func.grad(self.loss)
        self.per_example = torch.func.vmap(
            torch.func.grad(lambda p, x, y: self.loss(p, x[None], y[None])), in_dims=(None, 0, 0))

    def flatten(self, tree: dict):
        return self.torch.cat([tree[k].reshape(-1) for k in self.keys])

    def unflatten(self, flat) -> dict:
        parts = self.torch.split(flat, self.sizes)
        return {k: t.view(shape) for k, t, shape in zip(self.keys, parts, self.shapes, strict=True)}

    def hvp_func(self):
        """``v ↦ H v`` by ``torch.func.jvp(torch.func.grad(loss))`` (forward-over-reverse)."""
        torch = self.torch
        grad_train = lambda p: self.grad_fn(p, self.x, self.y)  # noqa: E731

        def mv(v):
            return self.flatten(torch.func.jvp(grad_train, (self.params,), (self.unflatten(v),))[1])

        return mv

    def hvp_graph_reuse(self):
        """``v ↦ H v`` by double backward through one retained graph of the training gradient."""
        torch = self.torch
        leaves = {k: t.detach().requires_grad_(True) for k, t in self.params.items()}
        inputs = [leaves[k] for k in self.keys]
        g = torch.autograd.grad(self.loss(leaves, self.x, self.y), inputs, create_graph=True)

        def mv(v):
            vs = [t.view(shape) for t, shape in zip(torch.split(v, self.sizes), self.shapes, strict=True)]
            return self.flatten(dict(zip(self.keys, torch.autograd.grad(g, inputs, vs, retain_graph=True),
                                         strict=True)))

        return mv

    def cg(self, mv, b, iters: int, damping: float):
        """CG on ``(H + λI) x = b`` from ``x₀ = 0`` with the library's recurrences; stops early only
        at a direction of non-positive curvature. Returns ``(x, iterations, negative_curvature)``."""
        torch = self.torch
        x = torch.zeros_like(b)
        r, p = b.clone(), b.clone()
        rz = r @ r
        for it in range(iters):
            ap = mv(p) + damping * p
            pap = p @ ap
            if not bool(torch.isfinite(pap)) or float(pap) <= 0:
                return x, it, True
            alpha = rz / pap
            x = x + alpha * p
            r = r - alpha * ap
            rz_new = r @ r
            p = r + (rz_new / torch.where(rz == 0, torch.ones_like(rz), rz)) * p
            rz = rz_new
        return x, iters, False

    def solve(self, settings: dict, graph_reuse: bool) -> dict:
        t0 = time.perf_counter()
        grad_f = self.flatten(self.grad_fn(self.params, self.x_test, self.y_test))
        mv = self.hvp_graph_reuse() if graph_reuse else self.hvp_func()
        s, iters, negative = self.cg(mv, grad_f, settings["cg_iters"], settings["damping"])
        return {"seconds": {"solve": time.perf_counter() - t0}, "s": s, "grad_f": grad_f, "iterations": iters,
                "negative_curvature": negative}

    def pipeline(self, settings: dict) -> dict:
        out = self.solve(settings, graph_reuse=False)
        t_grads, t_scores, scores = self.stream(out["s"], self.x.shape[0], settings["chunk_size"])
        out["seconds"].update({"per_example_grads": t_grads, "scores": t_scores})
        out["scores"] = scores
        return out

    def stream(self, s, n: int, chunk_size: int) -> tuple[float, float, np.ndarray]:
        """Stages 2 and 3 on the first ``n`` training samples: per-example gradients by
        ``vmap(grad)`` chunk by chunk, each chunk's scores as per-layer dot products with ``s``."""
        torch = self.torch
        s_tree = {k: t.reshape(-1) for k, t in self.unflatten(s).items()}
        scores = np.zeros(n, np.float64)
        t_grads = t_scores = 0.0
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                stop = min(start + chunk_size, n)
                t1 = time.perf_counter()
                g = self.per_example(self.params, self.x[start:stop], self.y[start:stop])
                t2 = time.perf_counter()
                dots = sum(g[k].reshape(g[k].shape[0], -1) @ s_tree[k] for k in self.keys)
                scores[start:stop] = -dots.numpy().astype(np.float64)
                t_scores += time.perf_counter() - t2
                t_grads += t2 - t1
        return t_grads, t_scores, scores

    def warm_up(self, chunk_size: int) -> None:
        """One product of each kind and one chunk of per-example gradients (PyTorch compiles
        nothing; this starts its thread pool and allocator)."""
        b = self.flatten(self.params)
        self.hvp_func()(b)
        self.hvp_graph_reuse()(b)
        self.stream(b, min(chunk_size, self.x.shape[0]), chunk_size)

    def unflatten_flax(self, flat_flax: np.ndarray, ctx: dict) -> dict:
        """A vector in the JAX problem's ``ravel_pytree`` order as a PyTorch-layout dict."""
        from benchmarks.torch_reference import to_torch_layout

        tree = ravel_pytree(ctx["flat"])[1](jnp.asarray(flat_flax))
        return {k: self.torch.from_numpy(to_torch_layout(k, np.asarray(tree[k]))) for k in self.keys}

    def to_flax_order(self, flat, ctx: dict) -> np.ndarray:
        from benchmarks.torch_reference import flat_in_flax_order

        return flat_in_flax_order(ctx["flat"], self.unflatten(flat))


# ------------------------------------------------------------------------------------- benchmark


def timed(fn):
    """``fn()`` with its wall seconds added as ``seconds["call"]``."""
    t0 = time.perf_counter()
    out = fn()
    out["seconds"]["call"] = time.perf_counter() - t0
    return out


def fused_scores_fn(ctx: dict):
    """The investigation's variant of stages 2 and 3 (not the library's path): one jitted
    ``vmap(grad)`` of the same restricted loss whose per-example gradients stay a tree and meet
    ``s`` in per-leaf dot products inside the same program (no flat ``(chunk, P)`` copy, no eager
    masking or slicing)."""
    loss_fn = ctx["loss_fn"]

    @jax.jit
    def scores(selected, frozen, chunk, s_tree):
        def one(ex):
            b1 = Batch(*(v[None] for v in ex))
            return jax.grad(lambda q: loss_fn(merge_params(q, frozen), b1))(selected)

        g = jax.vmap(one)(chunk)
        return -sum(jnp.tensordot(g[k], s_tree[k], axes=g[k].ndim - 1) for k in g)

    return scores


def fused_stream(fused, problem, data: Dataset, s_tree: dict, chunk_size: int) -> tuple[float, float, np.ndarray]:
    """Stages 2 and 3 by :func:`fused_scores_fn` over fixed-size chunks (the last one padded by
    wrapping around and cut), all seconds counted as stage 2."""
    n = len(data)
    out = np.zeros(n, np.float64)
    t0 = time.perf_counter()
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        rows = np.arange(start, start + chunk_size) % n
        chunk = Batch(*(jnp.asarray(np.asarray(v)[rows]) for v in data), mask=jnp.ones(chunk_size, jnp.float32))
        out[start:stop] = np.asarray(fused(problem.selected, problem.frozen, chunk, s_tree), np.float64)[: stop - start]
    return time.perf_counter() - t0, 0.0, out


def chunk_sweep(ctx: dict, th: TorchInfluence | None, s_jax: np.ndarray, settings: dict) -> list[dict]:
    """Stages 2 and 3 on the first ``sweep_rows`` samples at each of ``sweep_chunks`` chunk sizes,
    both sides at the same size, interleaved (JAX warmed up, i.e. compiled, per size first)."""
    n = min(settings["sweep_rows"], len(ctx["train"]))
    data = head_rows(ctx["train"], n)
    problem = make_problem(ctx["loss_fn"], ctx["params"], ctx["train_batch"], damping=settings["damping"])
    s = jnp.asarray(s_jax)
    s_torch = None if th is None else th.flatten(th.unflatten_flax(s_jax, ctx))
    fused = fused_scores_fn(ctx)
    s_tree = problem.unravel(s)
    out = []
    for cs in settings["sweep_chunks"]:
        fns = {"jax": lambda cs=cs: jax_stream(problem, data, s, cs),
               "jax_flat": lambda cs=cs: jax_flat_stream(problem, data, s, cs),
               "jax_fused": lambda cs=cs: fused_stream(fused, problem, data, s_tree, cs)}
        if th is not None:
            fns["torch"] = lambda cs=cs: th.stream(s_torch, n, cs)
        for fn in fns.values():
            fn()
        runs: dict[str, list] = {k: [] for k in fns}
        for _ in range(settings["repeats"]):
            for name, fn in fns.items():
                if settings["settle_s"] > 0:
                    time.sleep(settings["settle_s"])
                runs[name].append(fn()[:2])
        row = {"chunk_size": cs, "rows": n}
        for name, r in runs.items():
            row[name] = {"per_example_grads": median([g for g, _ in r]), "scores": median([t for _, t in r]),
                         "total": median([g + t for g, t in r])}
        row["jax_fused_scores_rel_err"] = rel_err(fns["jax_fused"]()[2], fns["jax"]()[2])
        if th is not None:
            row["torch_over_jax"] = row["torch"]["total"] / row["jax"]["total"]
            row["torch_over_jax_fused"] = row["torch"]["total"] / row["jax_fused"]["total"]
        out.append(row)
    return out


def hvp_agreement(ctx: dict, th: TorchInfluence, settings: dict) -> float:
    """``‖H g − H_torch g‖ / ‖H g‖`` for one undamped product at ``g = ∇f`` (the raw operator,
    before CG's rounding accumulates over its iterations)."""
    problem = make_problem(ctx["loss_fn"], ctx["params"], ctx["train_batch"], damping=settings["damping"])
    g = problem.gradient(ctx["test_batch"])
    hg = np.asarray(problem.ravel(problem.undamped_matvec(g)))
    g_torch = th.flatten(th.unflatten_flax(np.asarray(problem.ravel(g)), ctx))
    return rel_err(th.to_flax_order(th.hvp_func()(g_torch), ctx), hg)


def bench_problem(model_name: str, dataset: str, image_size: int, settings: dict, with_torch: bool) -> dict:
    t_setup = time.perf_counter()
    ctx = setup(model_name, dataset, image_size, settings)
    setup_s = time.perf_counter() - t_setup
    fns = {"jax": lambda: jax_pipeline(ctx, settings)}
    th = None
    if with_torch:
        th = TorchInfluence(model_name, image_size, ctx)
        fns["torch"] = lambda: th.pipeline(settings)
        fns["torch_graph_reuse"] = lambda: th.solve(settings, graph_reuse=True)

    last = {"jax": timed(fns["jax"])}  # warm-up: JAX compiles
    first_jax = last["jax"]["seconds"]["call"]
    if th is not None:
        th.warm_up(settings["chunk_size"])
    runs: dict[str, list[dict]] = {name: [] for name in fns}
    for _ in range(settings["repeats"]):
        for name, fn in fns.items():
            if settings["settle_s"] > 0:
                time.sleep(settings["settle_s"])
            last[name] = timed(fn)
            runs[name].append(last[name]["seconds"])

    def summary(name: str) -> dict:
        stages = [k for k in runs[name][0] if k != "call"]
        out = {k: median([r[k] for r in runs[name]]) for k in stages}
        if len(stages) > 1:
            out["total"] = median([sum(r[k] for k in stages) for r in runs[name]])
        out["call"] = median([r["call"] for r in runs[name]])
        return out

    jax_res = last["jax"]
    times = {name: summary(name) for name in fns}
    times["jax"]["first_call_s"] = first_jax
    times["jax"]["compile_s_estimate"] = max(first_jax - times["jax"]["total"], 0.0)
    # The library's one-call path, once (its programs are those the staged path compiled).
    one_call = timed(lambda: jax_one_call(ctx, settings))
    times["jax_influence_scores_one_call"] = one_call["seconds"]["call"]
    sweep = chunk_sweep(ctx, th, jax_res["s"], settings)
    entry = {
        "model": model_name,
        "dataset": dataset,
        "image_size": image_size,
        "input_shape": list(ctx["train"].x.shape[1:]),
        "num_params": count_params(ctx["flat"]),
        "n_train": len(ctx["train"]),
        "n_test": len(ctx["test"]),
        "setup_s": setup_s,
        "seconds": times,
        "per_repeat_seconds": {k: [{s: round(x, 6) for s, x in r.items()} for r in v] for k, v in runs.items()},
        "jax_cg": {
            "iterations": jax_res["diagnostics"]["iterations"],
            "residual": jax_res["diagnostics"]["residual"],
            "flags": jax_res["diagnostics"]["flags"],
        },
        "jax_influence_scores_rel_err": rel_err(one_call["scores"], jax_res["scores"]),
        "chunk_sweep": sweep,
        "scores_head": {"jax": jax_res["scores"][: settings["scores_head"]]},
    }
    entry["jax_stage_share"] = {k: times["jax"][k] / times["jax"]["total"] for k in STAGES}
    if th is None:
        return entry
    tr, tgr = last["torch"], last["torch_graph_reuse"]
    torch_total = times["torch"]["total"]
    best_torch = torch_total - times["torch"]["solve"] + min(times["torch"]["solve"],
                                                             times["torch_graph_reuse"]["solve"])
    entry["scores_head"]["torch"] = tr["scores"][: settings["scores_head"]]
    entry["torch_cg"] = {"iterations": tr["iterations"], "negative_curvature": tr["negative_curvature"],
                         "graph_reuse_iterations": tgr["iterations"]}
    entry["work_identical"] = bool(
        jax_res["diagnostics"]["iterations"] == tr["iterations"] == tgr["iterations"] == settings["cg_iters"])
    if not entry["work_identical"]:
        print(f"[influence_throughput] WARNING {model_name}: CG stopped early (JAX "
              f"{jax_res['diagnostics']['iterations']}, PyTorch {tr['iterations']} of {settings['cg_iters']} "
              "iterations): the solve timings do not compare the same work; raise --damping", file=sys.stderr)
    entry["torch_stage_share"] = {k: times["torch"][k] / torch_total for k in STAGES}
    entry["torch_over_jax"] = {
        "solve": times["torch"]["solve"] / times["jax"]["solve"],
        # JAX runs stages 2 and 3 as one program (its "scores" stage is 0): compare them together
        "per_example_grads_and_scores": (times["torch"]["per_example_grads"] + times["torch"]["scores"])
        / (times["jax"]["per_example_grads"] + times["jax"]["scores"]),
        "total": torch_total / times["jax"]["total"],
        "total_over_best_torch": best_torch / times["jax"]["total"],
        "torch_graph_reuse_solve_over_jax_solve": times["torch_graph_reuse"]["solve"] / times["jax"]["solve"],
    }
    if sweep:
        best = {side: min(sweep, key=lambda r, side=side: r[side]["total"]) for side in ("jax", "torch", "jax_fused")}
        entry["chunk_sweep_best"] = {
            **{side: {"chunk_size": r["chunk_size"], "total": r[side]["total"]} for side, r in best.items()},
            "torch_over_jax": best["torch"]["torch"]["total"] / best["jax"]["jax"]["total"],
            "torch_over_jax_fused": best["torch"]["torch"]["total"] / best["jax_fused"]["jax_fused"]["total"],
        }
    target = TARGET_TORCH_OVER_JAX.get(model_name)
    entry["target_torch_over_jax"] = target
    entry["meets_target"] = None if target is None else bool(entry["torch_over_jax"]["total"] >= target)
    s_torch = th.to_flax_order(tr["s"], ctx)
    s_reuse = th.to_flax_order(tgr["s"], ctx)
    agreement = {
        "scores_rel_err": rel_err(jax_res["scores"], tr["scores"]),
        "scores_spearman": spearman(jax_res["scores"], tr["scores"]),
        "scores_max_abs_diff": float(np.max(np.abs(jax_res["scores"] - tr["scores"]))),
        "ihvp_rel_err": rel_err(jax_res["s"], s_torch),
        "ihvp_rel_err_torch_graph_reuse": rel_err(s_reuse, s_torch),
        "grad_f_rel_err": rel_err(jax_res["grad_f"], th.to_flax_order(tr["grad_f"], ctx)),
        "hvp_rel_err": hvp_agreement(ctx, th, settings),
        "limit": AGREEMENT_LIMIT,
    }
    agreement["passed"] = bool(agreement["scores_rel_err"] < AGREEMENT_LIMIT
                               and agreement["ihvp_rel_err"] < AGREEMENT_LIMIT
                               and agreement["scores_spearman"] > 1 - AGREEMENT_LIMIT)
    entry["agreement"] = agreement
    return entry


def print_table(result: dict) -> None:
    print(f"\nInfluence scores of every training sample, JAX vs PyTorch, same weights "
          f"({result['machine']['jax_backend']}, {result['machine']['cpu_count_usable']} cores); seconds")
    head = (f"{'problem':<14}{'N':>6}{'side':>8}{'solve':>9}{'grads':>9}{'scores':>9}{'total':>9}"
            f"{'compile':>9}")
    print(head)
    print("-" * len(head))
    for name, e in result["problems"].items():
        t = e["seconds"]
        for side in ("jax", "torch"):
            if side not in t:
                continue
            c = t[side]
            comp = f"{c['compile_s_estimate']:>9.2f}" if "compile_s_estimate" in c else f"{'':>9}"
            print(f"{name:<14}{e['n_train']:>6}{side:>8}{c['solve']:>9.3f}{c['per_example_grads']:>9.3f}"
                  f"{c['scores']:>9.3f}{c['total']:>9.3f}{comp}")
        if "torch_over_jax" in e:
            r, a = e["torch_over_jax"], e["agreement"]
            print(f"{'':<14}torch/jax total {r['total']:.2f} (vs best torch solve {r['total_over_best_torch']:.2f}; "
                  f"stages solve {r['solve']:.2f}, grads + scores {r['per_example_grads_and_scores']:.2f}); "
                  f"scores rel err {a['scores_rel_err']:.1e}, Spearman {a['scores_spearman']:.6f}")
        for row in e.get("chunk_sweep", []):
            line = f"{'':<14}stages 2+3 on {row['rows']} rows, chunk {row['chunk_size']}: " + ", ".join(
                f"{side} {row[side]['total']:.3f} s" for side in ("jax", "jax_flat", "jax_fused", "torch") if side in row)
            print(line)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (N = 64, 2 CG iterations, 1 repeat)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "influence_throughput.json",
                        help="JSON result path")
    parser.add_argument("--n-train", type=int, default=None,
                        help="training samples scored, every model (default 4000 for the MLP, 2000 for the CNN)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; 1 with --quick)")
    parser.add_argument("--damping", type=float, default=None, help="λ added to the Hessian (default 1)")
    parser.add_argument("--problems", nargs="+", default=None, choices=[m for m, _, _ in PROBLEMS],
                        help="models to run (default both)")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.n_train is not None:
        settings["n_train"] = args.n_train
    if args.repeats is not None:
        settings["repeats"] = args.repeats
    if args.damping is not None:
        settings["damping"] = args.damping
    problems = [p for p in PROBLEMS if args.problems is None or p[0] in args.problems]
    t_start = time.perf_counter()
    with_torch = torch_available()
    base = {
        "benchmark": "influence_throughput",
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else "main(" + repr(argv) + ")",
        "git": git_commit(),
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            **settings,
            "cg_tol": CG_TOL,
            "problems": [{"model": m, "dataset": d, "image_size": s} for m, d, s in problems],
            "data": f"first n_train training / n_test test samples of colored_mnist or biased_mnist(rho={RHO}, "
                    "key=0, image_size)",
            "params": "model.init(PRNGKey(0)), then train_epochs of Adam(learning_rate), batches of train_batch "
                      "(shuffle seed 0), on the whole training split (train_on 'split') or the N scored samples "
                      "('scored'); copied to PyTorch (Dense kernel transposed, Conv HWIO → OIHW)",
            "objective": "f = mean cross-entropy over the n_test test samples",
            "curvature": "Hessian of the mean training loss over the n_train samples, all parameters, + damping·I",
            "timing": "one untimed warm-up call per side, then repeats rounds of every side (settle_s sleep "
                      "before each call); stage medians over rounds, total = median of the rounds' sums",
            "target": "torch total / jax total ≥ 2 on the MLP",
        },
    }
    if with_torch:
        import torch

        torch.set_num_threads(os.cpu_count())
        torch.manual_seed(0)
        base["torch"] = {"version": torch.__version__, "num_threads": torch.get_num_threads(),
                         "interop_threads": torch.get_num_interop_threads()}
    else:
        base["torch"] = "not installed"

    results = {}
    for model_name, dataset, size in problems:
        name = config_name(model_name, size)
        print(f"[influence_throughput] {name} ...", file=sys.stderr, flush=True)
        load0 = os.getloadavg()
        results[name] = bench_problem(model_name, dataset, size, settings, with_torch)
        results[name]["load_average_before_after"] = [list(load0), list(os.getloadavg())]
    result = {**base, "problems": results}
    if with_torch:
        result["summary"] = {
            "torch_over_jax_total": {n: e["torch_over_jax"]["total"] for n, e in results.items()},
            "torch_over_jax_total_vs_best_torch": {n: e["torch_over_jax"]["total_over_best_torch"]
                                                   for n, e in results.items()},
            "meets_target": {n: e["meets_target"] for n, e in results.items()},
            "scores_rel_err": {n: e["agreement"]["scores_rel_err"] for n, e in results.items()},
            "scores_spearman": {n: e["agreement"]["scores_spearman"] for n, e in results.items()},
            "agreement_passed": all(e["agreement"]["passed"] for e in results.values()),
        }
    result["total_s"] = time.perf_counter() - t_start
    result["machine"] = machine_info()  # the load average at the end
    path = write_result(args.out, result)
    if with_torch:
        print_table(result)
    else:
        print("torch: not installed; JAX timings only")
    print(f"\nwrote {path} ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
