"""Cost of a Hessian-vector product relative to a gradient, on the library's models.

Run from the repository root::

    python benchmarks/hvp_cost.py                       # full run, ~5 minutes on 2 CPU cores
    python benchmarks/hvp_cost.py --quick               # smoke run: batch 32, 1 repeat, ~20 s
    python benchmarks/hvp_cost.py --out PATH            # default benchmarks/results/hvp_cost.json
    python benchmarks/hvp_cost.py --batch-size 4096 --image-size 28   # scale up (GPU)
    python benchmarks/hvp_cost.py --scale 16            # batch 256 × 16

What is measured (every figure lands in the JSON):

* Configurations: ``mlp`` (FMD 3×100) on real Colored-MNIST 28×28×3, ``small_cnn`` (the CPU
  default, 4 strided 3×3 convs, no norm) on real Biased-MNIST at 14×14 and 28×28; batch 256
  real training images, parameters from ``init`` (key 0).
* Two parameter subsets per configuration: ``all`` (every parameter) and ``head`` (the last
  layer, :data:`~privdebias_jax.influence.LAST_LAYER`; the backbone frozen and passed as an
  argument, so XLA cannot constant-fold it).
* Jitted functions of ``(selected, frozen, batch[, v])``, all ahead-of-time compiled
  (``jax.jit(fn).lower(...).compile()``; the compile time is recorded): the loss (forward),
  the gradient ``jax.grad``, the library's :func:`~privdebias_jax.influence.hvp`
  (forward-over-reverse), reverse-over-forward (``grad`` of a ``jvp``) for comparison, the
  library's Gauss-Newton product :func:`~privdebias_jax.influence.gnvp`, the library's
  :func:`~privdebias_jax.influence.linearize_hvp` (``linearize``: the cost of fixing the point)
  and one product of that linearization (``hvp_linearized``: the tangent pass alone, what the
  solvers pay per product at a fixed point), and the library's
  :class:`~privdebias_jax.influence.CurvatureProblem` ``matvec`` (Hessian, which reuses one
  linearization per problem, and Gauss-Newton), the entry point the solvers use.
* The CNNs twice (``--conv``, default ``auto xla``): with the library's default convolution
  (``auto``: im2col on the CPU, :mod:`privdebias_jax.models.conv`) and with XLA's own
  (``small_cnn[xla]@14``), so the JSON shows what the convolution choice does to the gradient
  and to the ratios.
* Timing: every function of a configuration is called ``calls`` times per repeat (``calls``
  chosen so a gradient repeat takes ≥ ``target_repeat_s``), ``jax.block_until_ready`` at the
  end; repeats of all the functions are interleaved (so load on the shared machine hits them
  alike); the figure is the median repeat divided by ``calls``. Ratios are to the gradient of
  the same subset. Target: HVP ≤ 2× a gradient (``meets_target`` for the one-off ``hvp``,
  ``meets_target_linearized`` for the solvers' product).
* Arithmetic (``xla_flops``, ``hvp_over_grad_flops``): the FLOPs of every compiled program
  by XLA's cost analysis. A forward-over-reverse product of a hidden layer needs ~8 matrix
  products against the gradient's 3 (the primal weight gradient is dead code), so with the
  gradient at matmul speed the one-off HVP cannot cost fewer gradients than this ratio
  (2.50 for the small CNN at 14×14, 1.62 for the MLP, whose first layer has no input gradient).
* Sanity checks: the symmetry ``uᵀ(Hv) = vᵀ(Hu)`` of the HVP and the Gauss-Newton product,
  and the agreement of the library's ``matvec`` (damping 0) with the raw HVP.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

# The repository root, so that `benchmarks` and `privdebias_jax` import when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from benchmarks.common import RESULTS_DIR, machine_info, median, time_interleaved, write_result  # noqa: E402
from privdebias_jax.data import Batch, biased_mnist, colored_mnist  # noqa: E402
from privdebias_jax.influence import (  # noqa: E402
    LAST_LAYER,
    gnvp,
    hvp,
    linearize_hvp,
    make_problem,
    merge_params,
    split_params,
)
from privdebias_jax.models import MODEL_DEFAULTS, count_params, create_model  # noqa: E402
from privdebias_jax.train import apply_model, cross_entropy_loss, make_loss_fn  # noqa: E402

RHO = 0.99
TARGET_HVP_OVER_GRAD = 2.0
SUBSETS = {"all": None, "head": LAST_LAYER}
#: (model, dataset, image size): the FMD MLP on Colored-MNIST, the small CNN on Biased-MNIST.
CONFIGS = [
    ("mlp", "colored-mnist", 28),
    ("small_cnn", "biased-mnist", 14),
    ("small_cnn", "biased-mnist", 28),
]
#: Convolution implementations timed for the CNNs (privdebias_jax.models.conv): the default
#: ``auto`` (im2col on the CPU) and XLA's own convolution, side by side in one run.
CONVS = ("auto", "xla")

#: Functions beyond these are skipped with --quick (they only repeat a compile of the same maths).
QUICK_FUNCTIONS = ("forward", "grad", "hvp", "gnvp", "linearize", "hvp_linearized", "library_matvec_hessian")
FULL = {
    "batch_size": 256,
    "repeats": 7,
    "target_repeat_s": 0.15,
    "image_size": None,
    "functions": None,
}
# 28×28 needs no resize of the 5,000 digits (the resize costs more than the timing at batch 32).
QUICK = {
    "batch_size": 32,
    "repeats": 1,
    "target_repeat_s": 0.0,
    "image_size": 28,
    "functions": QUICK_FUNCTIONS,
}


def config_name(model: str, image_size: int, conv: str = "auto") -> str:
    return f"{model}@{image_size}" if conv == "auto" else f"{model}[{conv}]@{image_size}"


# ----------------------------------------------------------------------------------------- data


def real_batch(dataset: str, image_size: int, batch_size: int) -> tuple[Batch, int]:
    """``batch_size`` real training images (rows repeated if the split is smaller), mask of ones."""
    loader = colored_mnist if dataset == "colored-mnist" else biased_mnist
    splits = loader(RHO, key=0, image_size=image_size)
    ds = splits.train
    rows = np.arange(batch_size) % len(ds)
    batch = Batch(
        x=jnp.asarray(np.asarray(ds.x)[rows], jnp.float32),
        y=jnp.asarray(np.asarray(ds.y)[rows]),
        a=jnp.asarray(np.asarray(ds.a)[rows]),
        idx=jnp.asarray(np.asarray(ds.idx)[rows]),
        mask=jnp.ones(batch_size, jnp.float32),
    )
    return jax.block_until_ready(batch), splits.num_classes


def init_params(model, input_shape: tuple[int, ...], seed: int = 0):
    """Parameters from ``model.init`` under one jit (eager init compiles op by op)."""
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, *input_shape), jnp.float32)))(
        jax.random.PRNGKey(seed)
    )
    return variables["params"]


def random_like(tree, seed: int):
    """A standard-normal tree shaped like ``tree`` (float32)."""
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.normal(jax.random.PRNGKey(seed), flat.shape, jnp.float32))


# ------------------------------------------------------------------------------------ functions


def make_functions(model) -> dict:
    """The jittable functions of ``(selected, frozen, batch[, v])`` that are timed."""
    loss_fn = make_loss_fn(model)

    def f(selected, frozen, batch):
        return loss_fn(merge_params(selected, frozen), batch)

    def output_fn(selected, frozen, batch):
        logits, _, _ = apply_model(model, merge_params(selected, frozen), {}, batch.x)
        return logits

    def output_loss(z, frozen, batch):
        return cross_entropy_loss(z, batch)

    def rev_over_fwd(selected, frozen, batch, v):
        return jax.grad(lambda p: jax.jvp(lambda q: f(q, frozen, batch), (p,), (v,))[1])(selected)

    return {
        "forward": (f, False),
        "grad": (jax.grad(f), False),
        "hvp": (lambda s, fr, b, v: hvp(f, s, v, fr, b), True),
        "hvp_rev_over_fwd": (rev_over_fwd, True),
        "gnvp": (lambda s, fr, b, v: gnvp(output_fn, output_loss, s, v, fr, b), True),
        # The linear map v ↦ Hv, linearized once at (selected, batch): returns a Partial.
        "linearize": (lambda s, fr, b: linearize_hvp(f, s, fr, b)[1], False),
    }


def compile_aot(fn, args) -> tuple[object, float]:
    """``jax.jit(fn).lower(*args).compile()`` and its wall time (lower + compile)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def hlo_op_counts(compiled) -> dict:
    """Convolutions and dots in a compiled XLA program (the work that dominates on CPU)."""
    import re

    text = compiled.as_text()
    return {
        "convolution": len(re.findall(r"\bconvolution\(", text)),
        "dot": len(re.findall(r"\bdot\(", text)),
    }


def xla_flops(compiled) -> float | None:
    """Floating-point operations of a compiled program by XLA's own cost analysis (``None``
    where the backend gives none): the arithmetic a product needs, independent of speed."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None else None


def rel_diff(a, b) -> float:
    fa, fb = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.linalg.norm(fa - fb) / jnp.maximum(jnp.linalg.norm(fb), 1e-30))


def symmetry_error(product, u, v) -> float:
    """``|uᵀ(Pv) − vᵀ(Pu)| / (‖u‖‖Pv‖)`` for a symmetric linear map ``P``."""
    fu, fv = ravel_pytree(u)[0], ravel_pytree(v)[0]
    pv, pu = ravel_pytree(product(v))[0], ravel_pytree(product(u))[0]
    return float(
        jnp.abs(fu @ pv - fv @ pu) / jnp.maximum(jnp.linalg.norm(fu) * jnp.linalg.norm(pv), 1e-30)
    )


# ------------------------------------------------------------------------------------ benchmark


def bench_subset(model, params, batch, subset: str, settings: dict) -> dict:
    select = SUBSETS[subset]
    selected, frozen = split_params(params, select)
    v = random_like(selected, 1)
    u = random_like(selected, 2)
    keep = settings["functions"]
    fns = {k: f for k, f in make_functions(model).items() if keep is None or k in keep}

    compiled, compile_s = {}, {}
    for name, (fn, takes_v) in fns.items():
        args = (selected, frozen, batch, v) if takes_v else (selected, frozen, batch)
        compiled[name], compile_s[name] = compile_aot(fn, args)
    linear_map = None
    if "linearize" in compiled and (keep is None or "hvp_linearized" in keep):
        # One product of an existing linearization (what CG, Arnoldi and Hessian columns pay per
        # product once the point is fixed): the tangent pass only.
        linear_map = compiled["linearize"](selected, frozen, batch)
        apply_fn, compile_s["hvp_linearized"] = compile_aot(lambda m, w: m(w), (linear_map, v))

    # The library's entry point: CurvatureProblem.matvec (jitted inside, data as arguments).
    problems = {
        "library_matvec_hessian": make_problem(make_loss_fn(model), params, batch, select=select),
        "library_matvec_gauss_newton": make_problem(
            make_loss_fn(model), params, batch, select=select, curvature="gauss_newton", model=model
        ),
    }
    problems = {k: p for k, p in problems.items() if keep is None or k in keep}
    for name, problem in problems.items():
        t0 = time.perf_counter()
        jax.block_until_ready(problem.matvec(v))  # first call traces and compiles
        compile_s[name] = time.perf_counter() - t0

    calls_of = {
        name: (
            lambda c=c, takes_v=fns[name][1]: (
                c(selected, frozen, batch, v) if takes_v else c(selected, frozen, batch)
            )
        )
        for name, c in compiled.items()
    }
    calls_of.update({name: (lambda p=p: p.matvec(v)) for name, p in problems.items()})
    if linear_map is not None:
        calls_of["hvp_linearized"] = lambda: apply_fn(linear_map, v)

    # Calls per repeat: enough that one repeat of the gradient takes target_repeat_s.
    g_one = min(time_fn_once(calls_of["grad"]) for _ in range(3))
    calls = max(1, math.ceil(settings["target_repeat_s"] / max(g_one, 1e-9)))

    def looped(fn):
        def run():
            out = None
            for _ in range(calls):
                out = fn()
            return out

        return run

    times = time_interleaved(
        {name: looped(fn) for name, fn in calls_of.items()}, repeats=settings["repeats"], warmup=1
    )
    ms = {name: 1e3 * median(t) / calls for name, t in times.items()}
    grad_ms = ms["grad"]

    flops = {k: xla_flops(c) for k, c in compiled.items()}
    hv = compiled["hvp"](selected, frozen, batch, v)
    checks = {
        "hvp_symmetry_rel_err": symmetry_error(
            lambda w: compiled["hvp"](selected, frozen, batch, w), u, v
        ),
        "gnvp_symmetry_rel_err": symmetry_error(
            lambda w: compiled["gnvp"](selected, frozen, batch, w), u, v
        ),
        "library_matvec_vs_hvp_rel_diff": rel_diff(
            problems["library_matvec_hessian"].matvec(v), hv
        ),
    }
    if linear_map is not None:
        checks["hvp_linearized_vs_hvp_rel_diff"] = rel_diff(apply_fn(linear_map, v), hv)
    if "hvp_rev_over_fwd" in compiled:
        checks["rev_over_fwd_vs_hvp_rel_diff"] = rel_diff(
            compiled["hvp_rev_over_fwd"](selected, frozen, batch, v), hv
        )
    if "library_matvec_gauss_newton" in problems:
        checks["library_gn_matvec_vs_gnvp_rel_diff"] = rel_diff(
            problems["library_matvec_gauss_newton"].matvec(v),
            compiled["gnvp"](selected, frozen, batch, v),
        )
    return {
        "subset": subset,
        "select": select,
        "num_params": count_params(selected),
        "num_frozen_params": count_params(frozen) if frozen else 0,
        "calls_per_repeat": calls,
        "repeats": settings["repeats"],
        "times_s": {name: [round(x, 6) for x in t] for name, t in times.items()},
        "ms": ms,
        "over_grad": {name: m / grad_ms for name, m in ms.items()},
        "hvp_over_forward": ms["hvp"] / ms["forward"],
        "hvp_over_grad": ms["hvp"] / grad_ms,
        "gnvp_over_grad": ms["gnvp"] / grad_ms,
        "target_hvp_over_grad": TARGET_HVP_OVER_GRAD,
        "meets_target": ms["hvp"] / grad_ms <= TARGET_HVP_OVER_GRAD,
        # The solvers' product (CurvatureProblem.matvec reuses one linearization per problem).
        "hvp_linearized_over_grad": ms["hvp_linearized"] / grad_ms if "hvp_linearized" in ms else None,
        "linearize_over_grad": ms["linearize"] / grad_ms if "linearize" in ms else None,
        "meets_target_linearized": (ms["hvp_linearized"] / grad_ms <= TARGET_HVP_OVER_GRAD)
        if "hvp_linearized" in ms else None,
        "compile_s": compile_s,
        # The arithmetic floor: a one-off HVP cannot cost fewer gradients than this unless its
        # operations run faster than the gradient's.
        "xla_flops": flops,
        "hvp_over_grad_flops": (flops["hvp"] / flops["grad"]) if flops.get("hvp") and flops.get("grad") else None,
        "hlo_op_counts": {
            k: hlo_op_counts(compiled[k]) for k in ("grad", "hvp", "gnvp") if k in compiled
        },
        "checks": checks,
    }


def time_fn_once(fn) -> float:
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def print_table(result: dict) -> None:
    s = result["settings"]
    print(
        f"\nHVP cost vs gradient, batch {s['batch_size']}, real data "
        f"({result['machine']['jax_backend']}, {result['machine']['cpu_count_usable']} cores); "
        f"ms per call (median) and ratio to the gradient"
    )
    head = (
        f"{'config':<16}{'subset':<7}{'params':>9}{'fwd ms':>9}{'grad ms':>9}{'hvp ms':>9}{'gnvp ms':>9}"
        f"{'hvp/g':>7}{'lin/g':>7}{'gn/g':>7}{'rof/g':>7}{'lib/g':>7}{'fwd/g':>7}{'F h/g':>7}{'≤2×':>5}"
    )
    print(head)
    print("-" * len(head))
    for name, entry in result["configs"].items():
        for subset, e in entry["subsets"].items():
            o = {
                k: e["over_grad"].get(k, float("nan"))
                for k in ("hvp", "hvp_linearized", "gnvp", "hvp_rev_over_fwd", "library_matvec_hessian", "forward")
            }
            print(
                f"{name:<16}{subset:<7}{e['num_params']:>9,}{e['ms']['forward']:>9.2f}{e['ms']['grad']:>9.2f}"
                f"{e['ms']['hvp']:>9.2f}{e['ms']['gnvp']:>9.2f}{o['hvp']:>7.2f}{o['hvp_linearized']:>7.2f}{o['gnvp']:>7.2f}"
                f"{o['hvp_rev_over_fwd']:>7.2f}{o['library_matvec_hessian']:>7.2f}{o['forward']:>7.2f}"
                f"{e['hvp_over_grad_flops'] or float('nan'):>7.2f}{'yes' if e['meets_target'] else 'NO':>5}"
            )
    print("(lin = one product of a linearized HVP; rof = reverse-over-forward HVP; lib = CurvatureProblem.matvec, "
          "Hessian, which reuses one linearization; F h/g = HVP / gradient FLOPs by XLA's cost analysis)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run (8×8 images, batch 32, 1 repeat)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "hvp_cost.json", help="JSON result path"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="batch size (default 256; 32 with --quick)"
    )
    parser.add_argument(
        "--scale", type=int, default=1, help="multiply the batch size by this factor (GPU runs)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="one image side for every configuration (default 28, 14, 28; 8 with --quick)",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted({m for m, _, _ in CONFIGS}),
        default=None,
        help="restrict to these models",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (default 7; 1 with --quick)"
    )
    parser.add_argument(
        "--conv", nargs="+", choices=("auto", "xla", "im2col"), default=None,
        help="convolution implementations to time for the CNNs (default: auto xla; auto with --quick)",
    )
    args = parser.parse_args(argv)
    if args.conv is None:
        args.conv = ["auto"] if args.quick else list(CONVS)
    settings = dict(QUICK if args.quick else FULL)
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    settings["batch_size"] *= max(1, args.scale)
    if args.image_size is not None:
        settings["image_size"] = args.image_size
    if args.repeats is not None:
        settings["repeats"] = args.repeats
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    configs = []
    for model_name, dataset, size in CONFIGS:
        size = settings["image_size"] or size
        if args.models and model_name not in args.models:
            continue
        for conv in (args.conv if "conv" in MODEL_DEFAULTS[model_name][0].__dataclass_fields__ else ("auto",)):
            if (model_name, dataset, size, conv) not in configs:
                configs.append((model_name, dataset, size, conv))

    results = {}
    for model_name, dataset, size, conv in configs:
        name = config_name(model_name, size, conv)
        print(f"[hvp_cost] {name} on {dataset} ...", file=sys.stderr, flush=True)
        batch, num_classes = real_batch(dataset, size, settings["batch_size"])
        model = create_model(model_name, num_classes, **({} if conv == "auto" else {"conv": conv}))
        params = init_params(model, tuple(batch.x.shape[1:]))
        results[name] = {
            "model": model_name,
            "model_options": {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in MODEL_DEFAULTS[model_name][1].items()
            },
            "conv": conv,
            "dataset": dataset,
            "image_size": size,
            "input_shape": list(batch.x.shape[1:]),
            "num_params": count_params(params),
            "subsets": {s: bench_subset(model, params, batch, s, settings) for s in SUBSETS},
        }
        results[name]["load_average_at_end"] = list(os.getloadavg())

    rows = {f"{n}/{s}": e for n, c in results.items() for s, e in c["subsets"].items()}
    result = {
        "benchmark": "hvp_cost",
        "command": " ".join([Path(sys.executable).name, *sys.argv])
        if argv is None
        else "main(" + repr(argv) + ")",
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            **settings,
            "scale": args.scale,
            "configs": [{"model": m, "dataset": d, "image_size": s, "conv": c} for m, d, s, c in configs],
            "data": f"first batch_size rows of the training split of colored_mnist / biased_mnist({RHO}, key=0, image_size)",
            "params": "model.init(PRNGKey(0)) (untrained; the cost does not depend on the values)",
            "vectors": "v, u standard normal (PRNGKey(1), PRNGKey(2)), shaped like the subset",
            "timing": "AOT-compiled jax.jit(fn).lower(selected, frozen, batch[, v]).compile(); everything passed "
            "as arguments; `calls_per_repeat` calls per repeat then jax.block_until_ready; functions' repeats "
            "interleaved after 1 untimed warm-up repeat; median repeat / calls",
            "functions": {
                "forward": "loss_fn(merge_params(selected, frozen), batch)",
                "grad": "jax.grad of it w.r.t. selected",
                "hvp": "privdebias_jax.influence.hvp: jax.jvp(jax.grad(f)) (forward-over-reverse)",
                "hvp_rev_over_fwd": "jax.grad of jax.jvp(f) (reverse-over-forward), for comparison",
                "gnvp": "privdebias_jax.influence.gnvp (Gauss-Newton Jᵀ H_z J v)",
                "linearize": "privdebias_jax.influence.linearize_hvp: jax.linearize(jax.grad(f)) at (selected, "
                "batch), returning the linear map (a Partial holding the residuals)",
                "hvp_linearized": "one product of an existing linearization, jit(lambda m, w: m(w)): the tangent "
                "pass only; what CG, Arnoldi and Hessian columns pay per product",
                "library_matvec_hessian": "make_problem(..., select).matvec(v) (damping 0; reuses one "
                "linearization per problem)",
                "library_matvec_gauss_newton": "make_problem(..., curvature='gauss_newton').matvec(v)",
            },
            "target": f"hvp / grad ≤ {TARGET_HVP_OVER_GRAD} on every model",
        },
        "configs": results,
        "summary": {
            "hvp_over_grad": {k: e["hvp_over_grad"] for k, e in rows.items()},
            "gnvp_over_grad": {k: e["gnvp_over_grad"] for k, e in rows.items()},
            "hvp_over_forward": {k: e["hvp_over_forward"] for k, e in rows.items()},
            "meets_target": {k: e["meets_target"] for k, e in rows.items()},
            "all_meet_target": all(e["meets_target"] for e in rows.values()),
            "missed_target": [k for k, e in rows.items() if not e["meets_target"]],
            "hvp_linearized_over_grad": {k: e["hvp_linearized_over_grad"] for k, e in rows.items()},
            "linearize_over_grad": {k: e["linearize_over_grad"] for k, e in rows.items()},
            "meets_target_linearized": {k: e["meets_target_linearized"] for k, e in rows.items()},
            "all_meet_target_linearized": all(bool(e["meets_target_linearized"]) for e in rows.values()),
            "grad_ms": {k: e["ms"]["grad"] for k, e in rows.items()},
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
