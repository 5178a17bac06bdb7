"""The same Hessian-vector product in JAX and in PyTorch, same network, weights, batch and CPU.

Run from the repository root::

    python benchmarks/torch_reference.py            # full run, ~9 minutes on 2 idle CPU cores
    python benchmarks/torch_reference.py --quick    # smoke run: batch 32, 1 repeat, no XLA-flag probes
    python benchmarks/torch_reference.py --out PATH # default benchmarks/results/torch_reference.json

What is measured (every figure lands in the JSON):

* Configurations: ``mlp`` (FMD 3×100) on real Colored-MNIST 28×28×3 and ``small_cnn`` (4 strided
  3×3 convs, no norm) on real Biased-MNIST at 14×14 and 28×28; batch 256; all parameters.
* JAX: the library's :func:`~privdebias_jax.influence.hvp` (``jax.jvp(jax.grad(f))``,
  forward-over-reverse) of ``make_loss_fn(model)``, AOT-compiled with the parameters, the vector
  and the batch as arguments; and ``jax.grad`` of the same loss. The model is the library's
  default, so on the CPU its convolutions are im2col (:mod:`privdebias_jax.models.conv`).
* At a fixed point (what CG, Arnoldi and Hessian columns pay per product): JAX's linearized
  HVP (``jax_linearized_apply``, :func:`~privdebias_jax.influence.linearize_hvp`) against
  PyTorch's double backward through a retained graph (``torch_graph_reuse``:
  ``autograd.grad(loss, create_graph=True)`` once, ``autograd.grad(g, params, v,
  retain_graph=True)`` per vector); ``jax_linearized_over_torch_graph_reuse`` in the summary.
* PyTorch: a functional twin (same widths; Flax's ``"SAME"`` padding reproduced exactly, i.e.
  asymmetric ``F.pad`` where a stride-2 layer needs it; NCHW; weights copied from the JAX model),
  HVP by ``torch.func.jvp(torch.func.grad(loss), ...)`` (forward-over-reverse), gradient by
  ``torch.func.grad`` and by eager ``torch.autograd.grad``. ``torch.set_num_threads(os.cpu_count())``.
* Sanity check: the two HVPs (and gradients) agree, ``‖H_jax v − H_torch v‖ / ‖H_jax v‖ < 1e-3``.
* Timing: per function, ``calls`` calls per repeat (``calls`` chosen so a repeat takes about
  ``target_repeat_s``), ``jax.block_until_ready`` at the end, an untimed sleep of ``settle_s``
  before each repeat (PyTorch's OpenMP workers go idle), all functions' repeats interleaved;
  median repeat / calls. Ratio = JAX HVP time / PyTorch HVP time. Targets: ≤ 1/3 (JAX ≥ 3×
  faster) on the MLP, ≤ 1 on the small CNN.
* Investigation (small CNN): in-process variants timed in the same interleaved rounds (NCHW
  layout in JAX, convolution as im2col + matmul, reverse-over-forward, donated vector, one
  ``jax.linearize`` reused for several vectors, ``vmap`` over a block of vectors, matmul
  precision, PyTorch with 1 thread and with channels-last), and XLA flags (which must be set
  before JAX starts) measured in subprocesses, each timing JAX against PyTorch in its own
  process; findings under ``"investigation"``.

If ``torch`` is not importable, the JSON says ``"torch": "not installed"`` and the script exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
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

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    machine_info,
    median,
    package_version,
    time_interleaved,
    write_result,
)
from benchmarks.hvp_cost import init_params, random_like, real_batch  # noqa: E402
from privdebias_jax.influence import hvp, merge_params, split_params  # noqa: E402
from privdebias_jax.models import MODEL_DEFAULTS, count_params, create_model  # noqa: E402
from privdebias_jax.train import make_loss_fn  # noqa: E402

REL_ERR_LIMIT = 1e-3
TARGET_RATIO = {"mlp": 1.0 / 3.0, "small_cnn": 1.0}
CONFIGS = [
    ("mlp", "colored-mnist", 28),
    ("small_cnn", "biased-mnist", 14),
    ("small_cnn", "biased-mnist", 28),
]
#: XLA flag sets tried in subprocesses ("" = the control run, same subprocess set-up, no flags).
XLA_FLAG_PROBES = [
    ("control (no flags)", ""),
    ("thunk runtime off", "--xla_cpu_use_thunk_runtime=false"),
    ("single-threaded Eigen", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"),
    ("XNNPACK", "--xla_cpu_use_xnnpack=true"),
    (
        "XNN graph fusion greedy",
        "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    ),
    ("oneDNN", "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true"),
    ("fast math", "--xla_cpu_enable_fast_math=true"),
    ("control again (drift)", ""),
]

FULL = {
    "batch_size": 256,
    "repeats": 5,
    "target_repeat_s": 0.2,
    "settle_s": 0.05,
    "configs": CONFIGS,
    "variants": "all",
    "probe_configs": ["small_cnn@28"],
    "probe_repeats": 3,
    "linearize_k": 4,
    "vmap_k": 4,
    "conv_repeats": 5,
}
QUICK = {
    "batch_size": 32,
    "repeats": 1,
    "target_repeat_s": 0.0,
    "settle_s": 0.0,
    "configs": [("mlp", "colored-mnist", 28), ("small_cnn", "biased-mnist", 28)],
    "variants": ("jax_nchw", "torch_threads_1", "jax_linearize_reuse", "torch_graph_reuse"),
    "probe_configs": [],
    "probe_repeats": 1,
    "linearize_k": 2,
    "vmap_k": 2,
    "conv_repeats": 1,
}


def config_name(model: str, image_size: int) -> str:
    return f"{model}@{image_size}"


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def flat_rel_err(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` of two flat float64 vectors."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    """Flax/XLA ``"SAME"`` padding ``(low, high)`` of a side ``n`` for kernel ``k``, stride ``s``."""
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def conv_geometry(model_name: str, image_size: int) -> list[tuple[int, tuple[int, int]]]:
    """``[(stride, (pad_low, pad_high))]`` for each conv layer of ``small_cnn`` at ``image_size``."""
    opts = MODEL_DEFAULTS[model_name][1]
    k, n, out = opts["kernel_size"], image_size, []
    for s in opts["strides"]:
        out.append((s, same_pads(n, k, s)))
        n = -(-n // s)
    return out


# ------------------------------------------------------------------------------ weights layouts


def to_torch_layout(path: str, leaf: np.ndarray) -> np.ndarray:
    """Flax leaf → PyTorch layout: Dense kernel (in, out) → (out, in); Conv HWIO → OIHW."""
    leaf = np.array(
        leaf, np.float32
    )  # a writable copy (torch.from_numpy warns on read-only arrays)
    if path.endswith("/kernel") and leaf.ndim == 2:
        return np.ascontiguousarray(leaf.T)
    if path.endswith("/kernel") and leaf.ndim == 4:
        return np.ascontiguousarray(np.transpose(leaf, (3, 2, 0, 1)))
    return leaf


def from_torch_layout(path: str, leaf: np.ndarray) -> np.ndarray:
    leaf = np.asarray(leaf, np.float32)
    if path.endswith("/kernel") and leaf.ndim == 2:
        return leaf.T
    if path.endswith("/kernel") and leaf.ndim == 4:
        return np.transpose(leaf, (2, 3, 1, 0))
    return leaf


def flat_in_flax_order(flat_params: dict, tree_torch: dict) -> np.ndarray:
    """A PyTorch-layout dict (torch tensors) raveled in ``ravel_pytree`` order of the Flax subset."""
    back = {
        k: jnp.asarray(from_torch_layout(k, tree_torch[k].detach().numpy())) for k in flat_params
    }
    return np.asarray(ravel_pytree(back)[0])


# ---------------------------------------------------------------------------------------- torch


class TorchTwin:
    """The functional PyTorch twin of ``mlp`` / ``small_cnn`` with weights copied from JAX."""

    def __init__(self, model_name: str, image_size: int, flat_params: dict, flat_v: dict, batch):
        import torch
        import torch.nn.functional as F  # noqa: N812

        self.torch, self.F = torch, F
        self.model_name = model_name
        self.geometry = conv_geometry(model_name, image_size) if model_name != "mlp" else None
        self.num_hidden = len(MODEL_DEFAULTS[model_name][1].get("hidden", ()))
        self.params = {
            k: torch.from_numpy(to_torch_layout(k, np.asarray(v))) for k, v in flat_params.items()
        }
        self.v = {k: torch.from_numpy(to_torch_layout(k, np.asarray(w))) for k, w in flat_v.items()}
        x = np.array(batch.x, np.float32)
        if model_name == "mlp":
            x = x.reshape(x.shape[0], -1)  # Flax flattens NHWC rows: same order
        else:
            x = np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))  # NHWC → NCHW
        self.x = torch.from_numpy(x)
        self.y = torch.from_numpy(np.array(batch.y, np.int64))
        self.grad_fn = torch.func.grad(self.loss)

    def forward(self, p, x):
        F = self.F
        if self.model_name == "mlp":
            h = x
            for i in range(self.num_hidden):
                h = F.relu(F.linear(h, p[f"dense_{i}/kernel"], p[f"dense_{i}/bias"]))
            return F.linear(h, p["head/kernel"], p["head/bias"])
        h = x
        for i, (s, (lo, hi)) in enumerate(self.geometry):
            w, b = p[f"conv_{i}/kernel"], p[f"conv_{i}/bias"]
            if lo == hi:
                h = F.conv2d(h, w, b, stride=s, padding=lo)
            else:  # Flax pads asymmetrically (more at the end) when the stride does not divide
                h = F.conv2d(F.pad(h, (lo, hi, lo, hi)), w, b, stride=s)
            h = F.relu(h)
        return F.linear(h.mean(dim=(2, 3)), p["head/kernel"], p["head/bias"])

    def loss(self, p, x=None, y=None):
        x = self.x if x is None else x
        y = self.y if y is None else y
        return self.F.cross_entropy(self.forward(p, x), y)

    def grad(self):
        return self.grad_fn(self.params)

    def hvp(self, params=None, v=None, x=None):
        params = self.params if params is None else params
        v = self.v if v is None else v
        g = (lambda p: self.grad_fn(p)) if x is None else (lambda p: torch_grad_at(self, p, x))
        return self.torch.func.jvp(g, (params,), (v,))[1]

    def eager_grad(self):
        torch = self.torch
        leaves = {k: t.detach().requires_grad_(True) for k, t in self.params.items()}
        loss = self.loss(leaves)
        return torch.autograd.grad(loss, list(leaves.values()))


def torch_grad_at(twin: TorchTwin, p, x):
    return twin.torch.func.grad(lambda q: twin.loss(q, x))(p)


# ------------------------------------------------------------------------------ JAX alternatives


def jax_functional_cnn(model_name: str, image_size: int, layout: str):
    """A pure-JAX twin of ``small_cnn`` on Flax-layout parameters: ``layout`` ``"nchw"`` (input and
    convolutions in NCHW/OIHW, weights transposed inside) or ``"im2col"`` (NHWC patches + matmul).
    Returns ``loss(flat_params, x, y)`` where ``x`` is NHWC (transposed inside for NCHW)."""
    geometry = conv_geometry(model_name, image_size)
    k = MODEL_DEFAULTS[model_name][1]["kernel_size"]

    def conv(h, w, b, s, pads):
        if layout == "nchw":
            w_oihw = jnp.transpose(w, (3, 2, 0, 1))
            out = jax.lax.conv_general_dilated(
                h, w_oihw, (s, s), [pads, pads], dimension_numbers=("NCHW", "OIHW", "NCHW")
            )
            return out + b[None, :, None, None]
        patches = jax.lax.conv_general_dilated_patches(
            h, (k, k), (s, s), [pads, pads], dimension_numbers=("NHWC", "HWIO", "NHWC")
        )  # (B, H', W', C·k·k), channel-major
        w_mat = jnp.transpose(w, (2, 0, 1, 3)).reshape(-1, w.shape[-1])  # (C·k·k, O)
        return patches @ w_mat + b

    def loss(p, x, y):
        h = jnp.transpose(x, (0, 3, 1, 2)) if layout == "nchw" else x
        for i, (s, pads) in enumerate(geometry):
            h = jax.nn.relu(conv(h, p[f"conv_{i}/kernel"], p[f"conv_{i}/bias"], s, pads))
        feats = jnp.mean(h, axis=(2, 3) if layout == "nchw" else (1, 2))
        logits = feats @ p["head/kernel"] + p["head/bias"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return loss


def hlo_convolutions(compiled) -> dict:
    """Number of convolutions in a compiled XLA program and their ``dim_labels`` (layouts)."""
    import re

    text = compiled.as_text()
    labels = re.findall(r"convolution\(.*?dim_labels=([^,}\s]+)", text)
    return {"count": len(labels), "dim_labels": sorted(set(labels))}


def aot(fn, *args, donate_argnums=()):
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    return compiled, time.perf_counter() - t0


# ------------------------------------------------------------------------------------ benchmark


def calibrated(fns: dict, target_s: float) -> dict:
    """Wrap each zero-argument function in a loop of ``calls`` calls (``calls`` from one timed call)."""
    out, calls = {}, {}
    for name, fn in fns.items():
        jax.block_until_ready(fn())  # warm (first calls allocate)
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        one = time.perf_counter() - t0
        n = max(1, math.ceil(target_s / max(one, 1e-9))) if target_s > 0 else 1
        calls[name] = n

        def run(fn=fn, n=n):
            r = None
            for _ in range(n):
                r = fn()
            return r

        out[name] = run
    return out, calls


def build_jax(model_name, batch, num_classes):
    model = create_model(model_name, num_classes)
    params = init_params(model, tuple(batch.x.shape[1:]))
    flat, _ = split_params(params, None)  # flat dict path → array: the parameter pytree used below
    loss_fn = make_loss_fn(model)

    def f(p, b):
        return loss_fn(merge_params(p, {}), b)

    v = random_like(flat, 1)
    return model, flat, v, f


def bench_config(model_name, dataset, image_size, settings, investigate: bool) -> dict:
    import torch

    batch, num_classes = real_batch(dataset, image_size, settings["batch_size"])
    model, flat, v, f = build_jax(model_name, batch, num_classes)

    jax_hvp = lambda p, vv, b: hvp(f, p, vv, b)  # noqa: E731
    c_hvp, compile_hvp = aot(jax_hvp, flat, v, batch)
    c_grad, compile_grad = aot(jax.grad(f), flat, batch)
    twin = TorchTwin(model_name, image_size, flat, v, batch)

    # Sanity: same numbers (HVP and gradient) in both frameworks.
    hv_jax = np.asarray(ravel_pytree(c_hvp(flat, v, batch))[0])
    g_jax = np.asarray(ravel_pytree(c_grad(flat, batch))[0])
    hv_torch = flat_in_flax_order(flat, twin.hvp())
    g_torch = flat_in_flax_order(flat, twin.grad())
    loss_jax, loss_torch = float(f(flat, batch)), float(twin.loss(twin.params))
    check = {
        "hvp_rel_err": flat_rel_err(hv_torch, hv_jax),
        "grad_rel_err": flat_rel_err(g_torch, g_jax),
        "loss_abs_diff": abs(loss_jax - loss_torch),
        "limit": REL_ERR_LIMIT,
    }
    check["passed"] = bool(
        check["hvp_rel_err"] < REL_ERR_LIMIT and check["grad_rel_err"] < REL_ERR_LIMIT
    )

    fns = {
        "jax_hvp": lambda: c_hvp(flat, v, batch),
        "jax_grad": lambda: c_grad(flat, batch),
        "torch_hvp": twin.hvp,
        "torch_grad": twin.grad,
        "torch_grad_eager": twin.eager_grad,
    }
    variants_info: dict[str, dict] = {}
    hlo, breakdown = None, None
    if not investigate:  # the MLP: only the PyTorch 1-thread yardstick
        add_variants(
            fns,
            variants_info,
            model_name,
            image_size,
            flat,
            v,
            batch,
            f,
            hv_jax,
            twin,
            {**settings, "variants": ("torch_threads_1", "jax_linearize_reuse", "torch_graph_reuse")},
        )
    else:
        breakdown = (
            conv_layer_breakdown(model_name, image_size, flat, batch, settings)
            if model_name != "mlp"
            else None
        )
        add_variants(
            fns, variants_info, model_name, image_size, flat, v, batch, f, hv_jax, twin, settings
        )
        hlo = {"grad": hlo_convolutions(c_grad), "hvp": hlo_convolutions(c_hvp)}
        nchw = jax_functional_cnn(model_name, image_size, "nchw")
        hlo["hvp_nchw_twin"] = hlo_convolutions(
            aot(lambda p, vv, xx, yy: hvp(nchw, p, vv, xx, yy), flat, v, batch.x, batch.y)[0]
        )

    wrapped, calls = calibrated(fns, settings["target_repeat_s"])
    times = time_interleaved(
        wrapped, repeats=settings["repeats"], warmup=0, settle_s=settings["settle_s"]
    )
    ms = {name: 1e3 * median(t) / calls[name] for name, t in times.items()}
    for name, info in variants_info.items():
        per_vector = info.get("vectors_per_call", 1)
        info["ms_per_hvp"] = ms[name] / per_vector
        info["over_jax_hvp"] = (
            info["ms_per_hvp"] / ms["jax_hvp"] if name.startswith("jax") else None
        )
        info["over_torch_hvp"] = info["ms_per_hvp"] / ms["torch_hvp"]
    ratio = ms["jax_hvp"] / ms["torch_hvp"]
    best_torch = min(ms["torch_hvp"], ms.get("torch_threads_1", float("inf")))
    entry = {
        "model": model_name,
        "dataset": dataset,
        "image_size": image_size,
        "input_shape": list(batch.x.shape[1:]),
        "num_params": count_params(flat),
        "torch_num_params": int(sum(t.numel() for t in twin.params.values())),
        "batch_size": settings["batch_size"],
        "calls_per_repeat": calls,
        "times_s": {k: [round(x, 6) for x in t] for k, t in times.items()},
        "ms": ms,
        "compile_s": {"jax_hvp": compile_hvp, "jax_grad": compile_grad},
        "check": check,
        "jax_hvp_over_grad": ms["jax_hvp"] / ms["jax_grad"],
        "torch_hvp_over_grad": ms["torch_hvp"] / ms["torch_grad"],
        "torch_hvp_over_eager_grad": ms["torch_hvp"] / ms["torch_grad_eager"],
        "jax_over_torch_hvp": ratio,
        "jax_over_torch_grad": ms["jax_grad"] / ms["torch_grad"],
        "torch_over_jax_hvp": 1.0 / ratio,
        "target_jax_over_torch": TARGET_RATIO[model_name],
        "meets_target": ratio <= TARGET_RATIO[model_name],
        "torch_best_hvp_ms": best_torch,
        "jax_over_best_torch_hvp": ms["jax_hvp"] / best_torch,
        "meets_target_vs_best_torch": ms["jax_hvp"] / best_torch <= TARGET_RATIO[model_name],
        "variants": variants_info,
        # At a fixed point (what iterative solvers pay per product): JAX's linearized HVP
        # against PyTorch's double-backward through a retained graph.
        "jax_linearized_over_torch_graph_reuse": (
            ms["jax_linearized_apply"] / ms["torch_graph_reuse"]
            if "jax_linearized_apply" in ms and "torch_graph_reuse" in ms else None
        ),
        "jax_linearized_over_grad": (
            ms["jax_linearized_apply"] / ms["jax_grad"] if "jax_linearized_apply" in ms else None
        ),
        "hlo_convolutions": hlo,
        "conv_layer_breakdown": breakdown,
        "cores_used": {
            "jax_hvp": cores_used(fns["jax_hvp"], calls["jax_hvp"]),
            "torch_hvp": cores_used(fns["torch_hvp"], calls["torch_hvp"]),
            "note": "process CPU seconds (user + system, all threads) per wall second; spinning OpenMP "
            "workers count as used",
        },
        "torch_threads": torch.get_num_threads(),
    }
    return entry


def add_variants(
    fns, info, model_name, image_size, flat, v, batch, f, hv_ref, twin, settings
) -> None:
    """In-process alternatives to the baseline JAX HVP (and two PyTorch settings), added to ``fns``."""
    import torch

    wanted = settings["variants"]

    def want(name):
        return wanted == "all" or name in wanted

    def check(name, out, what, per_vector=1, compile_s=None, note=None):
        got = np.asarray(ravel_pytree(out)[0]) if not isinstance(out, np.ndarray) else out
        info[name] = {
            "what": what,
            "rel_err_vs_baseline": flat_rel_err(got, hv_ref),
            "vectors_per_call": per_vector,
        }
        if compile_s is not None:
            info[name]["compile_s"] = compile_s
        if note:
            info[name]["note"] = note

    x, y = batch.x, batch.y
    if model_name != "mlp":
        for layout, what in (
            (
                "nchw",
                "pure-JAX twin with NCHW input and OIHW convolutions (lax.conv_general_dilated)",
            ),
            (
                "im2col",
                "pure-JAX twin, each convolution as conv_general_dilated_patches + matmul (NHWC)",
            ),
        ):
            name = f"jax_{layout}"
            if not want(name):
                continue
            loss = jax_functional_cnn(model_name, image_size, layout)
            c, cs = aot(lambda p, vv, xx, yy, loss=loss: hvp(loss, p, vv, xx, yy), flat, v, x, y)
            cg, _ = aot(jax.grad(loss), flat, x, y)
            fns[name] = lambda c=c: c(flat, v, x, y)
            fns[name + "_grad"] = lambda cg=cg: cg(flat, x, y)
            check(name, c(flat, v, x, y), what, compile_s=cs)
    if want("jax_rev_over_fwd"):
        rof = lambda p, vv, b: jax.grad(lambda q: jax.jvp(lambda r: f(r, b), (q,), (vv,))[1])(p)  # noqa: E731
        c, cs = aot(rof, flat, v, batch)
        fns["jax_rev_over_fwd"] = lambda c=c: c(flat, v, batch)
        check(
            "jax_rev_over_fwd",
            c(flat, v, batch),
            "reverse-over-forward: jax.grad of jax.jvp(f)",
            compile_s=cs,
        )
    if want("jax_donate_v"):
        c, cs = aot(lambda p, vv, b: hvp(f, p, vv, b), flat, v, batch, donate_argnums=(1,))
        host_v = jax.tree_util.tree_map(np.asarray, v)

        def donated(
            c=c,
        ):  # a fresh device copy of v per call (donation consumes it); the copy is timed too
            return c(flat, jax.tree_util.tree_map(jnp.asarray, host_v), batch)

        fns["jax_donate_v"] = donated
        check(
            "jax_donate_v",
            donated(),
            "jax.jit(hvp, donate_argnums=v) (includes a host→device copy of v per call)",
            compile_s=cs,
        )
    if want("jax_linearize_reuse"):
        k = settings["linearize_k"]
        vs = [jax.tree_util.tree_map(lambda a, i=i: a * (i + 1), v) for i in range(k)]
        lin, cs = aot(lambda p, b: jax.linearize(lambda q: jax.grad(f)(q, b), p)[1], flat, batch)
        f_jvp = lin(
            flat, batch
        )  # a Partial holding the residuals: a pytree, so it can be a jit argument
        apply, cs2 = aot(lambda fj, w: fj(w), f_jvp, v)

        def lin_reuse(lin=lin, apply=apply, vs=vs):
            fj = lin(flat, batch)
            return [apply(fj, w) for w in vs]

        fns["jax_linearize_reuse"] = lin_reuse
        check(
            "jax_linearize_reuse",
            apply(f_jvp, v),
            f"jitted jax.linearize(grad f) once (residuals returned as a "
            f"Partial), then a jitted apply of the linear map to {k} vectors (time per vector)",
            per_vector=k,
            compile_s=cs + cs2,
        )
        fns["jax_linearized_apply"] = lambda apply=apply, f_jvp=f_jvp: apply(f_jvp, v)
        check(
            "jax_linearized_apply",
            apply(f_jvp, v),
            "the marginal cost of one more vector: the jitted apply of "
            "an already linearized grad f (residuals precomputed)",
        )
    if want("torch_graph_reuse"):
        # PyTorch's counterpart of a linearized HVP: the gradient's graph built once
        # (create_graph=True), then one double-backward per vector through the retained graph.
        leaves = {k2: t.detach().requires_grad_(True) for k2, t in twin.params.items()}
        grads = torch.autograd.grad(twin.loss(leaves), list(leaves.values()), create_graph=True)
        v_list = [twin.v[k2] for k2 in leaves]

        def graph_reuse(grads=grads, leaves=leaves, v_list=v_list):
            return torch.autograd.grad(grads, list(leaves.values()), v_list, retain_graph=True)

        fns["torch_graph_reuse"] = graph_reuse
        check(
            "torch_graph_reuse",
            flat_in_flax_order(flat, {k2: t.detach() for k2, t in zip(leaves, graph_reuse(), strict=True)}),
            "PyTorch: torch.autograd.grad(loss, create_graph=True) once, then "
            "torch.autograd.grad(g, params, v, retain_graph=True) per vector (reverse-over-reverse "
            "through the retained graph): the marginal cost of one more vector",
        )
    if want("jax_vmap_vectors"):
        k = settings["vmap_k"]
        vs = jax.tree_util.tree_map(lambda a: jnp.stack([a * (i + 1) for i in range(k)]), v)
        c, cs = aot(lambda p, vv, b: jax.vmap(lambda w: hvp(f, p, w, b))(vv), flat, vs, batch)
        fns["jax_vmap_vectors"] = lambda c=c, vs=vs: c(flat, vs, batch)
        first = jax.tree_util.tree_map(lambda a: a[0], c(flat, vs, batch))
        check(
            "jax_vmap_vectors",
            first,
            f"jax.vmap of the HVP over a block of {k} vectors (time per vector)",
            per_vector=k,
            compile_s=cs,
        )
    for prec in ("highest", "bfloat16"):
        name = f"jax_precision_{prec}"
        if not want(name):
            continue
        with jax.default_matmul_precision(prec):
            c, cs = aot(lambda p, vv, b: hvp(f, p, vv, b), flat, v, batch)
        fns[name] = lambda c=c: c(flat, v, batch)
        check(
            name,
            c(flat, v, batch),
            f"traced under jax.default_matmul_precision({prec!r})",
            compile_s=cs,
        )
    if want("torch_threads_1"):
        n = torch.get_num_threads()

        def one_thread():
            torch.set_num_threads(1)
            try:
                return twin.hvp()
            finally:
                torch.set_num_threads(n)

        fns["torch_threads_1"] = one_thread
        check(
            "torch_threads_1",
            flat_in_flax_order(flat, one_thread()),
            "PyTorch HVP with torch.set_num_threads(1)",
        )
    if want("torch_channels_last") and model_name != "mlp":
        cl = torch.channels_last
        p_cl = {
            k: (t.contiguous(memory_format=cl) if t.ndim == 4 else t)
            for k, t in twin.params.items()
        }
        v_cl = {
            k: (t.contiguous(memory_format=cl) if t.ndim == 4 else t) for k, t in twin.v.items()
        }
        x_cl = twin.x.contiguous(memory_format=cl)
        fn = lambda: twin.hvp(p_cl, v_cl, x_cl)  # noqa: E731
        fns["torch_channels_last"] = fn
        check(
            "torch_channels_last",
            flat_in_flax_order(flat, fn()),
            "PyTorch HVP, input and conv weights channels_last",
        )


def cores_used(fn, calls: int) -> float:
    """CPU seconds (all threads of this process, user + system) per wall second over ``calls`` calls."""
    import resource

    jax.block_until_ready(fn())
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn())
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return cpu / max(t1 - t0, 1e-9)


def conv_layer_breakdown(
    model_name: str, image_size: int, flat: dict, batch, settings: dict
) -> list[dict]:
    """Each convolution of the network alone, JAX (XLA) vs PyTorch: forward, input gradient and
    weight gradient, on the layer's real input shape (inputs pre-padded, "VALID" convolutions on
    both sides, so both compute exactly the same thing); timed interleaved like the rest."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    rows, h = [], jnp.asarray(batch.x)
    for i, (s, (lo, hi)) in enumerate(conv_geometry(model_name, image_size)):
        w, b = flat[f"conv_{i}/kernel"], flat[f"conv_{i}/bias"]
        hp = jnp.pad(h, ((0, 0), (lo, hi), (lo, hi), (0, 0)))

        def conv(x, k, s=s):
            return jax.lax.conv_general_dilated(
                x, k, (s, s), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        out = conv(hp, w)
        ct = jax.random.normal(jax.random.PRNGKey(i), out.shape, jnp.float32)
        j_fwd = aot(conv, hp, w)[0]
        j_dx = aot(
            lambda x, k, c, conv=conv: jax.vjp(lambda xx: conv(xx, k), x)[1](c)[0], hp, w, ct
        )[0]
        j_dw = aot(
            lambda x, k, c, conv=conv: jax.vjp(lambda kk: conv(x, kk), k)[1](c)[0], hp, w, ct
        )[0]
        x_t = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(hp), (0, 3, 1, 2))))
        w_t = torch.from_numpy(to_torch_layout("k/kernel", np.asarray(w)))
        c_t = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(ct), (0, 3, 1, 2))))
        fns = {
            "jax_forward": lambda f=j_fwd, x=hp, k=w: f(x, k),
            "jax_input_grad": lambda f=j_dx, x=hp, k=w, c=ct: f(x, k, c),
            "jax_weight_grad": lambda f=j_dw, x=hp, k=w, c=ct: f(x, k, c),
            "torch_forward": lambda x=x_t, k=w_t, s=s: F.conv2d(x, k, stride=s),
            "torch_input_grad": lambda x=x_t, k=w_t, c=c_t, s=s: torch.nn.grad.conv2d_input(
                x.shape, k, c, stride=s
            ),
            "torch_weight_grad": lambda x=x_t, k=w_t, c=c_t, s=s: torch.nn.grad.conv2d_weight(
                x, k.shape, c, stride=s
            ),
        }
        wrapped, calls = calibrated(fns, settings["target_repeat_s"] / 4)
        times = time_interleaved(
            wrapped, repeats=settings["conv_repeats"], warmup=0, settle_s=settings["settle_s"] / 5
        )
        ms = {k: 1e3 * median(t) / calls[k] for k, t in times.items()}
        rows.append(
            {
                "layer": f"conv_{i}",
                "input_nhwc_padded": list(hp.shape),
                "kernel_hwio": list(w.shape),
                "stride": s,
                "output_nhwc": list(out.shape),
                "ms": ms,
                "jax_over_torch": {
                    op: ms[f"jax_{op}"] / ms[f"torch_{op}"]
                    for op in ("forward", "input_grad", "weight_grad")
                },
                "input_grad_used_by_the_network": i > 0,
            }
        )
        h = jax.nn.relu(out + b)
    return rows


# --------------------------------------------------------------------------------- XLA flag probes


def probe(config: str, settings: dict) -> dict:
    """In a subprocess with XLA_FLAGS set: JAX HVP and PyTorch HVP of one config, interleaved."""
    import torch

    torch.set_num_threads(os.cpu_count())
    model_name, size = config.split("@")
    dataset = dict((m, d) for m, d, _ in CONFIGS)[model_name]
    batch, num_classes = real_batch(dataset, int(size), settings["batch_size"])
    _, flat, v, f = build_jax(model_name, batch, num_classes)
    c, cs = aot(lambda p, vv, b: hvp(f, p, vv, b), flat, v, batch)
    twin = TorchTwin(model_name, int(size), flat, v, batch)
    hv_jax = np.asarray(ravel_pytree(c(flat, v, batch))[0])
    err = flat_rel_err(hv_jax, flat_in_flax_order(flat, twin.hvp()))
    wrapped, calls = calibrated(
        {"jax_hvp": lambda: c(flat, v, batch), "torch_hvp": twin.hvp}, settings["target_repeat_s"]
    )
    times = time_interleaved(
        wrapped, repeats=settings["probe_repeats"], warmup=0, settle_s=settings["settle_s"]
    )
    ms = {k: 1e3 * median(t) / calls[k] for k, t in times.items()}
    return {
        "ms": ms,
        "jax_over_torch_hvp": ms["jax_hvp"] / ms["torch_hvp"],
        "compile_s": cs,
        "jax_hvp_cores_used": cores_used(lambda: c(flat, v, batch), calls["jax_hvp"]),
        "hvp_rel_err_vs_torch": err,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def run_probes(settings: dict, quick: bool) -> list[dict]:
    out = []
    for config in settings["probe_configs"]:
        for label, flags in XLA_FLAG_PROBES:
            print(f"[torch_reference] probe {config}: {label} ...", file=sys.stderr, flush=True)
            env = dict(os.environ, XLA_FLAGS=flags)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", config]
            if quick:
                cmd.append("--quick")
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
                rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
            except subprocess.TimeoutExpired as err:
                rc, stdout, stderr = -1, err.stdout or "", f"timed out after {err.timeout} s"
            entry = {
                "config": config,
                "label": label,
                "xla_flags": flags,
                "returncode": rc,
                "wall_s": time.perf_counter() - t0,
            }
            lines = [ln for ln in (stdout or "").splitlines() if ln.startswith("PROBE_RESULT ")]
            if rc == 0 and lines:
                entry.update(json.loads(lines[-1][len("PROBE_RESULT ") :]))
            else:
                entry["error"] = (stderr or "")[-2000:]
            warnings = [
                ln.strip()
                for ln in (stderr or "").splitlines()
                if "no longer supported" in ln or "nknown flag" in ln
            ]
            if warnings:
                entry["xla_warnings"] = warnings[:5]
            out.append(entry)
    return out


# ------------------------------------------------------------------------------------- findings


def summarize_investigation(configs: dict, probes: list[dict]) -> dict:
    """The investigation record: what was tried, the numbers, and findings in words."""
    tried, findings = [], []
    for name, e in configs.items():
        if e["model"] == "mlp":
            continue
        base, th = e["ms"]["jax_hvp"], e["ms"]["torch_hvp"]
        findings.append(
            f"{name}: JAX HVP {base:.1f} ms vs PyTorch {th:.1f} ms (JAX/PyTorch {base / th:.2f}); "
            f"gradients {e['ms']['jax_grad']:.1f} vs {e['ms']['torch_grad']:.1f} ms "
            f"(JAX/PyTorch {e['jax_over_torch_grad']:.2f}); HVP/gradient JAX {e['jax_hvp_over_grad']:.2f}, "
            f"PyTorch {e['torch_hvp_over_grad']:.2f}"
        )
        for vname, vi in e["variants"].items():
            if vname.endswith("_grad"):
                continue
            rel = vi["over_jax_hvp"] if vi["over_jax_hvp"] is not None else vi["ms_per_hvp"] / th
            ref = (
                "the baseline JAX HVP"
                if vi["over_jax_hvp"] is not None
                else "the default PyTorch HVP"
            )
            tried.append(
                {
                    "config": name,
                    "variant": vname,
                    "what": vi["what"],
                    "ms_per_hvp": vi["ms_per_hvp"],
                    "over_reference": rel,
                    "reference": ref,
                    "over_torch_hvp": vi["over_torch_hvp"],
                    "rel_err_vs_baseline": vi["rel_err_vs_baseline"],
                }
            )
        best = min(
            (t for t in tried if t["config"] == name and t["variant"].startswith("jax")),
            key=lambda t: t["ms_per_hvp"],
            default=None,
        )
        if best is not None:
            findings.append(
                f"{name}: fastest JAX variant {best['variant']} at {best['ms_per_hvp']:.1f} ms per HVP "
                f"({best['over_reference']:.2f}× the baseline JAX HVP, {best['over_torch_hvp']:.2f}× PyTorch)"
            )
        bd = e.get("conv_layer_breakdown")
        if bd:
            tot = {
                fw: {
                    op: sum(
                        r["ms"][f"{fw}_{op}"]
                        for r in bd
                        if op != "input_grad" or r["input_grad_used_by_the_network"]
                    )
                    for op in ("forward", "input_grad", "weight_grad")
                }
                for fw in ("jax", "torch")
            }
            worst = max(bd, key=lambda r: r["jax_over_torch"]["weight_grad"])
            findings.append(
                f"{name}: the network's convolutions alone, JAX/PyTorch: forward "
                f"{tot['jax']['forward'] / tot['torch']['forward']:.2f}, input gradients "
                f"{tot['jax']['input_grad'] / max(tot['torch']['input_grad'], 1e-9):.2f}, weight gradients "
                f"{tot['jax']['weight_grad'] / tot['torch']['weight_grad']:.2f} (summed ms: JAX "
                + ", ".join(f"{op} {v:.1f}" for op, v in tot["jax"].items())
                + "; PyTorch "
                + ", ".join(f"{op} {v:.1f}" for op, v in tot["torch"].items())
                + f"); worst weight gradient {worst['layer']} ({worst['jax_over_torch']['weight_grad']:.2f}×)"
            )
        cu = e.get("cores_used")
        if cu:
            findings.append(
                f"{name}: cores used during the HVP: JAX {cu['jax_hvp']:.2f}, PyTorch {cu['torch_hvp']:.2f}"
            )
        hlo = e.get("hlo_convolutions")
        if hlo:
            findings.append(
                f"{name}: the compiled gradient holds {hlo['grad']['count']} convolutions, the compiled HVP "
                f"{hlo['hvp']['count']} ({hlo['hvp']['count'] / max(hlo['grad']['count'], 1):.2f}×): forward-over-"
                f"reverse repeats every convolution of the backward pass for the tangent, so on a "
                f"convolution-bound CPU the HVP costs ≈ that multiple of a gradient; XLA lays every convolution "
                f"out as {hlo['hvp']['dim_labels']} (NHWC) whatever the program's layout: the NCHW twin compiles to "
                f"{hlo['hvp_nchw_twin']['dim_labels']}"
            )
        for layout in ("nchw", "im2col"):
            vi, gi = e["variants"].get(f"jax_{layout}"), e["ms"].get(f"jax_{layout}_grad")
            if vi and gi:
                findings.append(
                    f"{name}: {layout} twin HVP/gradient {vi['ms_per_hvp'] / gi:.2f} "
                    f"(gradient {gi:.1f} ms = {gi / e['ms']['jax_grad']:.2f}× the Flax model's)"
                )
    for name, e in configs.items():
        t1 = e["variants"].get("torch_threads_1")
        if t1:
            findings.append(
                f"{name}: PyTorch with 1 thread takes {t1['over_torch_hvp']:.2f}× its time with "
                f"{e['torch_threads']} threads (above 1: the second thread helps; below 1: its OpenMP threads were "
                "oversubscribed by other load on this shared machine, so the JAX/PyTorch ratio moves with the load)"
            )
    by_config: dict[str, dict] = {}
    for p in probes:
        by_config.setdefault(p["config"], {})[p["label"]] = p
    for config, entries in by_config.items():
        controls = [p for label, p in entries.items() if label.startswith("control") and "ms" in p]
        if not controls:
            continue
        c_ratio = float(np.mean([p["jax_over_torch_hvp"] for p in controls]))
        c_jax = float(np.mean([p["ms"]["jax_hvp"] for p in controls]))
        findings.append(
            f"{config}: subprocess controls (no flags, first and last): JAX/PyTorch "
            + ", ".join(f"{p['jax_over_torch_hvp']:.2f}" for p in controls)
            + ", JAX HVP "
            + ", ".join(f"{p['ms']['jax_hvp']:.1f}" for p in controls)
            + " ms (their spread is the noise floor)"
        )
        for label, p in entries.items():
            if label.startswith("control"):
                continue
            if "ms" not in p:
                findings.append(
                    f"{config}: XLA_FLAGS='{p['xla_flags']}' failed (rc {p['returncode']})"
                )
                continue
            findings.append(
                f"{config}: XLA_FLAGS='{p['xla_flags']}' ({label}): JAX HVP {p['ms']['jax_hvp']:.1f} ms "
                f"({p['ms']['jax_hvp'] / c_jax:.2f}× the controls' mean), JAX/PyTorch {p['jax_over_torch_hvp']:.2f} "
                f"({p['jax_over_torch_hvp'] / c_ratio:.2f}× the controls')"
                + (
                    "; XLA warns: " + p["xla_warnings"][0].split("] ")[-1]
                    if p.get("xla_warnings")
                    else ""
                )
            )
    return {"variants_tried": tried, "xla_flag_probes": probes, "findings": findings}


def print_table(result: dict) -> None:
    print(
        f"\nHVP, JAX vs PyTorch, batch {result['settings']['batch_size']}, same weights "
        f"({result['machine']['jax_backend']}, {result['machine']['cpu_count_usable']} cores, "
        f"torch threads {result['torch']['num_threads']})"
    )
    head = (
        f"{'config':<16}{'params':>9}{'jax hvp':>10}{'torch hvp':>11}{'jax/torch':>10}{'target':>8}{'met':>5}"
        f"{'vs best':>8}{'jax grad':>10}{'torch grad':>11}{'jax h/g':>9}{'torch h/g':>10}{'rel err':>10}"
    )
    print(head)
    print("-" * len(head))
    for name, e in result["configs"].items():
        m = e["ms"]
        print(
            f"{name:<16}{e['num_params']:>9,}{m['jax_hvp']:>10.2f}{m['torch_hvp']:>11.2f}{e['jax_over_torch_hvp']:>10.2f}"
            f"{e['target_jax_over_torch']:>8.2f}{'yes' if e['meets_target'] else 'NO':>5}{e['jax_over_best_torch_hvp']:>8.2f}{m['jax_grad']:>10.2f}"
            f"{m['torch_grad']:>11.2f}{e['jax_hvp_over_grad']:>9.2f}{e['torch_hvp_over_grad']:>10.2f}"
            f"{e['check']['hvp_rel_err']:>10.1e}"
        )
    inv = result["investigation"]
    if inv["variants_tried"]:
        print("\nInvestigation (ms per HVP; ratio to the reference named)")
        for t in inv["variants_tried"]:
            print(
                f"  {t['config']:<14}{t['variant']:<26}{t['ms_per_hvp']:>9.2f} ms  {t['over_reference']:>5.2f}× ref  "
                f"{t['over_torch_hvp']:>5.2f}× torch  (rel err {t['rel_err_vs_baseline']:.1e})"
            )
    for line in inv["findings"]:
        print("  - " + line)
    print("(vs best: JAX HVP time / the faster of PyTorch with 2 threads and with 1 thread)")


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (batch 32, 1 repeat, no flag probes)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "torch_reference.json", help="JSON result path"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="batch size (default 256; 32 with --quick)"
    )
    parser.add_argument(
        "--no-probes", action="store_true", help="skip the XLA-flag subprocess probes"
    )
    parser.add_argument(
        "--probe", default=None, help=argparse.SUPPRESS
    )  # internal: one probe, JSON to stdout
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    if args.probe:
        print("PROBE_RESULT " + json.dumps(probe(args.probe, settings)), flush=True)
        return None
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    base = {
        "benchmark": "torch_reference",
        "command": " ".join([Path(sys.executable).name, *sys.argv])
        if argv is None
        else "main(" + repr(argv) + ")",
        "machine": machine_info(),
    }
    if not torch_available():
        result = {
            **base,
            "torch": "not installed",
            "settings": {"quick": args.quick},
            "configs": {},
            "total_s": time.perf_counter() - t_start,
        }
        path = write_result(args.out, result)
        print(f"torch: not installed; wrote {path}")
        return result
    import torch

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)

    configs = {}
    for model_name, dataset, size in settings["configs"]:
        name = config_name(model_name, size)
        print(f"[torch_reference] {name} ...", file=sys.stderr, flush=True)
        load0 = os.getloadavg()
        configs[name] = bench_config(
            model_name, dataset, size, settings, investigate=model_name != "mlp"
        )
        configs[name]["load_average_before_after"] = [list(load0), list(os.getloadavg())]
    probes = [] if args.no_probes else run_probes(settings, args.quick)
    investigation = summarize_investigation(configs, probes)

    result = {
        **base,
        "settings": {
            "quick": args.quick,
            **{k: v for k, v in settings.items() if k != "configs"},
            "configs": [
                {"model": m, "dataset": d, "image_size": s} for m, d, s in settings["configs"]
            ],
            "data": "first batch_size rows of the training split of colored_mnist / biased_mnist(0.99, key=0, image_size)",
            "params": "model.init(PRNGKey(0)) in JAX, copied to PyTorch (Dense kernel transposed, Conv HWIO → OIHW)",
            "vector": "v standard normal (PRNGKey(1)), copied the same way",
            "jax_hvp": "privdebias_jax.influence.hvp(f, params, v, batch) = jax.jvp(jax.grad(f)); "
            "jax.jit(...).lower(params, v, batch).compile(), all arguments",
            "torch_hvp": "torch.func.jvp(torch.func.grad(loss), (params,), (v,))[1], functional twin, NCHW, "
            "exact Flax SAME padding",
            "timing": "per function `calls` calls per repeat, block_until_ready, settle_s sleep before each "
            "repeat, functions interleaved, median repeat / calls (variants with k vectors per call: / k)",
            "targets": {"mlp": "jax/torch ≤ 1/3 (JAX ≥ 3× faster)", "small_cnn": "jax/torch ≤ 1"},
            "probes": [{"label": lb, "xla_flags": fl} for lb, fl in XLA_FLAG_PROBES]
            if settings["probe_configs"]
            else [],
        },
        "torch": {
            "version": torch.__version__,
            "num_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
        },
        "configs": configs,
        "investigation": investigation,
        "summary": {
            "jax_over_torch_hvp": {n: e["jax_over_torch_hvp"] for n, e in configs.items()},
            "jax_over_best_torch_hvp": {
                n: e["jax_over_best_torch_hvp"] for n, e in configs.items()
            },
            "meets_target_vs_best_torch": {
                n: e["meets_target_vs_best_torch"] for n, e in configs.items()
            },
            "torch_over_jax_hvp": {n: e["torch_over_jax_hvp"] for n, e in configs.items()},
            "meets_target": {n: e["meets_target"] for n, e in configs.items()},
            "jax_linearized_over_torch_graph_reuse": {
                n: e["jax_linearized_over_torch_graph_reuse"] for n, e in configs.items()
            },
            "jax_linearized_over_grad": {n: e["jax_linearized_over_grad"] for n, e in configs.items()},
            "hvp_rel_err": {n: e["check"]["hvp_rel_err"] for n, e in configs.items()},
            "checks_passed": all(e["check"]["passed"] for e in configs.values()),
            "torch_version": package_version("torch"),
            "platform_md_reference": {"mlp": 0.22, "small_cnn": 1.06},
        },
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
        "total_s": time.perf_counter() - t_start,
    }
    path = write_result(args.out, result)
    print_table(result)
    print(f"\nwrote {path} ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
