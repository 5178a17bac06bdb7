"""Throughput of the jitted train step (Adam) on real Biased-MNIST, and of the scanned epoch.

Run from the repository root::

    python benchmarks/train_step.py            # full run, a few minutes on 2 CPU cores
    python benchmarks/train_step.py --quick    # smoke run: batch 32, a few steps, one repeat
    python benchmarks/train_step.py --out PATH # default benchmarks/results/train_step.json

What is measured (every figure lands in the JSON):

* For each configuration — ``mlp`` (FMD 3×100) at 28×28×3, ``small_cnn`` (the CPU default)
  at 28×28 and 14×14, ``simple_conv`` (Bahng et al. 7×7, 16-32-64-128, BN) at 28×28 — the
  library's :func:`~privdebias_jax.train.make_train_step` with ``make_optimizer("adam")``,
  jitted both as ``jax.jit(step, donate_argnums=0)`` ("donate") and ``jax.jit(step)``
  ("no_donate"). The step is compiled ahead of time (``.lower(...).compile()``, timed as the
  compile time) and called with the state, the batch and the key as arguments; batches are
  device-resident and cycled. After one untimed warm-up step, ``steps`` steps are timed per
  repeat; the variants' repeats are interleaved, and the median repeat gives ms/step and
  examples/s.
* ``make_epoch_fn`` (``jax.lax.scan`` over stacked batches, one jit call per epoch) against a
  Python loop of the same jitted step, for the MLP; both donate the state.
* If ``torch`` is importable: the same MLP and small CNN in PyTorch (same widths, kernel and
  strides, Adam, same batch, CPU, default threads), timed interleaved with the JAX variants;
  the ratio is JAX examples/s (best variant) over PyTorch examples/s.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

# The repository root, so that `benchmarks` and `privdebias_jax` import when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    machine_info,
    median,
    package_version,
    time_interleaved,
    write_result,
)
from privdebias_jax.data import Batch, biased_mnist, stack_batches  # noqa: E402
from privdebias_jax.models import MODEL_DEFAULTS, count_params, create_model  # noqa: E402
from privdebias_jax.train import create_train_state, make_epoch_fn, make_optimizer, make_train_step  # noqa: E402

# Donating the state can leave a few buffers unused (e.g. the int step counter): harmless here.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")

LEARNING_RATE = 1e-3
RHO = 0.99
TORCH_MODELS = ("mlp", "small_cnn")

# (model, image size, timed steps per repeat). simple_conv at 28×28 runs ~56 examples/s on
# 2 CPU cores (~4.6 s per step of 256): a couple of steps per repeat is all it can afford.
FULL = {
    "batch_size": 256,
    "repeats": 7,
    "warmup_steps": 1,
    "settle_s": 0.1,
    "configs": [
        ("mlp", 28, 200),
        ("small_cnn", 28, 20),
        ("small_cnn", 14, 60),
        ("simple_conv", 28, 2),
    ],
    "slow_repeats": {"simple_conv": 3},
    "epoch_model": ("mlp", 28),
    "epochs_per_repeat": 10,
    "epoch_repeats": 7,
    "train_size": None,
}
# Smoke test: tiny and fast. simple_conv runs at 14×14 (its 28×28 step is the slow one).
QUICK = {
    "batch_size": 32,
    "repeats": 1,
    "warmup_steps": 1,
    "settle_s": 0.0,
    "configs": [("mlp", 28, 3), ("small_cnn", 28, 3), ("small_cnn", 14, 3), ("simple_conv", 14, 1)],
    "slow_repeats": {},
    "epoch_model": ("mlp", 28),
    "epochs_per_repeat": 1,
    "epoch_repeats": 1,
    "train_size": 320,
}
# Test-suite smoke run (``--smoke``): QUICK at 8×8, one configuration per model, fewer rows.
SMOKE = {
    **QUICK,
    "configs": [("mlp", 8, 3), ("small_cnn", 8, 3), ("simple_conv", 8, 1)],
    "epoch_model": ("mlp", 8),
    "train_size": 128,
}


def config_name(model: str, image_size: int) -> str:
    return f"{model}@{image_size}"


def stats(times_s: list[float], steps: int, batch_size: int) -> dict:
    """Median repeat → ms/step and examples/s (plus the raw repeat times).

    The fastest repeat is kept too (``examples_per_s_fastest_repeat``): when other processes
    take the cores for part of a run, it is the better estimate of the uncontended speed
    (PyTorch's OpenMP convolutions slow down by 10-50× under contention, XLA's far less).
    """
    med = median(times_s)
    return {
        "times_s": [round(t, 6) for t in times_s],
        "median_s": med,
        "min_s": min(times_s),
        "ms_per_step": 1e3 * med / steps,
        "examples_per_s": batch_size * steps / med,
        "examples_per_s_fastest_repeat": batch_size * steps / min(times_s),
    }


# ----------------------------------------------------------------------------------------- data


class Data:
    """Real Biased-MNIST training batches at one image size, device-resident."""

    def __init__(self, image_size: int, batch_size: int, train_size: int | None):
        t0 = time.perf_counter()
        splits = biased_mnist(RHO, key=0, image_size=image_size, train_size=train_size)
        self.load_s = time.perf_counter() - t0
        self.input_shape = tuple(splits.input_shape)
        self.num_classes = splits.num_classes
        self.train_examples = len(splits.train)
        stacked = stack_batches(
            splits.train, batch_size, jax.random.PRNGKey(1), drop_remainder=True
        )
        self.stacked_np = stacked
        self.stacked = Batch(*(jnp.asarray(v) for v in stacked))  # (num_batches, batch, ...)
        self.batches = [
            Batch(*(jnp.asarray(v[i]) for v in stacked)) for i in range(stacked.mask.shape[0])
        ]
        jax.block_until_ready((self.stacked, self.batches))


# ------------------------------------------------------------------------------------------ JAX


def initial_states(model, tx, input_shape, count: int) -> list:
    """``count`` independent copies of ``create_train_state(model, tx, PRNGKey(0), input_shape)``.

    The initialisation runs under one jit (eager ``model.init`` compiles op by op, which
    dominates a short run); the copies have their own buffers, since donation invalidates
    the buffers a step is given.
    """
    state = jax.jit(lambda k: create_train_state(model, tx, k, input_shape))(jax.random.PRNGKey(0))
    host = jax.tree_util.tree_map(np.asarray, state)
    return [state] + [jax.tree_util.tree_map(jnp.asarray, host) for _ in range(count - 1)]


class StepRunner:
    """Calls a compiled step on cycled batches, carrying the (possibly donated) state."""

    def __init__(self, compiled, state, batches, key):
        self.compiled, self.state, self.batches, self.key, self.i = compiled, state, batches, key, 0

    def run(self, steps: int):
        state = self.state
        for _ in range(steps):
            state, _ = self.compiled(state, self.batches[self.i % len(self.batches)], self.key)
            self.i += 1
        self.state = state
        return state


def build_jax_variants(model, tx, data: Data):
    """``{"donate": (runner, lower_s, compile_s), "no_donate": ...}``, each from a fresh state."""
    step = make_train_step(model, tx)
    key = jax.random.PRNGKey(0)
    out = {}
    states = initial_states(model, tx, data.input_shape, 2)  # one per variant
    for (name, jitted), state in zip(
        (("donate", jax.jit(step, donate_argnums=0)), ("no_donate", jax.jit(step))),
        states,
        strict=True,
    ):
        t0 = time.perf_counter()
        lowered = jitted.lower(state, data.batches[0], key)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        out[name] = (StepRunner(compiled, state, data.batches, key), t1 - t0, t2 - t1)
    return out, count_params(state.params)


# ---------------------------------------------------------------------------------------- torch


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def build_torch_model(name: str, input_shape: tuple[int, ...], num_classes: int):
    """The PyTorch twin of the library's ``mlp`` / ``small_cnn`` (widths from MODEL_DEFAULTS)."""
    import torch.nn as tnn

    opts = MODEL_DEFAULTS[name][1]
    if name == "mlp":
        layers, width = [tnn.Flatten()], int(np.prod(input_shape))
        for h in opts["hidden"]:
            layers += [tnn.Linear(width, h), tnn.ReLU()]
            width = h
        return tnn.Sequential(*layers, tnn.Linear(width, num_classes))
    if name == "small_cnn":
        assert opts["norm"] == "none"
        k = opts["kernel_size"]
        layers, cin = [], input_shape[-1]
        for width, stride in zip(opts["widths"], opts["strides"], strict=True):
            # padding k//2 gives Flax's "SAME" output sizes for odd k (Flax pads asymmetrically
            # when the stride is 2; the FLOPs are the same).
            layers += [
                tnn.Conv2d(cin, width, k, stride=stride, padding=k // 2, bias=True),
                tnn.ReLU(),
            ]
            cin = width
        return tnn.Sequential(
            *layers, tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, num_classes)
        )
    raise ValueError(f"no PyTorch twin for {name!r}")


class TorchRunner:
    """Adam train steps of a PyTorch model on the same batches (NCHW for convolutions)."""

    def __init__(self, name: str, data: Data):
        import torch

        torch.manual_seed(0)
        self.torch = torch
        self.model = build_torch_model(name, data.input_shape, data.num_classes)
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE)
        xs = data.stacked_np.x
        if name != "mlp":
            xs = np.ascontiguousarray(np.transpose(xs, (0, 1, 4, 2, 3)))  # NHWC → NCHW
        self.batches = [
            (
                torch.from_numpy(np.ascontiguousarray(xs[i], np.float32)),
                torch.from_numpy(data.stacked_np.y[i].astype(np.int64)),
            )
            for i in range(xs.shape[0])
        ]
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.i = 0

    def run(self, steps: int):
        F = self.torch.nn.functional
        for _ in range(steps):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.opt.step()
        return None


# ------------------------------------------------------------------------------------ benchmark


def bench_config(
    model_name, image_size, steps, data: Data, settings, use_torch: bool
) -> tuple[dict, dict | None]:
    bs = settings["batch_size"]
    repeats = settings["slow_repeats"].get(model_name, settings["repeats"])
    warm = settings["warmup_steps"]
    model = create_model(model_name, data.num_classes)
    tx = make_optimizer("adam", LEARNING_RATE)
    variants, n_params = build_jax_variants(model, tx, data)

    fns = {name: (lambda r=runner: r.run(steps)) for name, (runner, _, _) in variants.items()}
    trunner = None
    if use_torch and model_name in TORCH_MODELS:
        trunner = TorchRunner(model_name, data)
        fns["torch"] = lambda: trunner.run(steps)
    # Untimed warm-up steps (the compile already happened ahead of time; the first call still
    # allocates), then the interleaved timed repeats.
    for runner, _, _ in variants.values():
        jax.block_until_ready(runner.run(warm))
    if trunner is not None:
        trunner.run(max(warm, 3))
    times = time_interleaved(fns, repeats=repeats, warmup=0, settle_s=settings["settle_s"])

    jax_stats = {name: stats(times[name], steps, bs) for name in variants}
    best = max(jax_stats, key=lambda n: jax_stats[n]["examples_per_s"])
    entry = {
        "model": model_name,
        "model_options": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in MODEL_DEFAULTS[model_name][1].items()
        },
        "image_size": image_size,
        "input_shape": list(data.input_shape),
        "num_params": n_params,
        "batch_size": bs,
        "steps_per_repeat": steps,
        "repeats": repeats,
        "warmup_steps": warm,
        "lower_s": {name: lo for name, (_, lo, _) in variants.items()},
        "compile_s": {name: co for name, (_, _, co) in variants.items()},
        "variants": jax_stats,
        "best_variant": best,
        "donate_over_no_donate": jax_stats["donate"]["examples_per_s"]
        / jax_stats["no_donate"]["examples_per_s"],
        "examples_per_s": jax_stats[best]["examples_per_s"],
        "ms_per_step": jax_stats[best]["ms_per_step"],
        "compile_s_best": variants[best][2],
    }
    torch_entry = None
    if trunner is not None:
        torch_entry = {
            **stats(times["torch"], steps, bs),
            "num_params": trunner.num_params,
            "same_param_count": trunner.num_params == n_params,
            "jax_over_torch": entry["examples_per_s"] / (bs * steps / median(times["torch"])),
        }
    return entry, torch_entry


def bench_epoch(data: Data, settings) -> dict:
    """``make_epoch_fn`` (one jit call per epoch) vs a Python loop of the jitted step, MLP."""
    model_name, image_size = settings["epoch_model"]
    bs = settings["batch_size"]
    model = create_model(model_name, data.num_classes)
    tx = make_optimizer("adam", LEARNING_RATE)
    step = make_train_step(model, tx)
    key = jax.random.PRNGKey(0)
    nb = len(data.batches)
    epochs = settings["epochs_per_repeat"]

    s_scan, s_loop = initial_states(model, tx, data.input_shape, 2)
    t0 = time.perf_counter()
    scan_c = (
        jax.jit(make_epoch_fn(step), donate_argnums=0).lower(s_scan, data.stacked, key).compile()
    )
    scan_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    step_c = jax.jit(step, donate_argnums=0).lower(s_loop, data.batches[0], key).compile()
    loop_compile = time.perf_counter() - t0

    box = {"scan": s_scan, "loop": s_loop}

    def run_scan():
        s = box["scan"]
        for _ in range(epochs):
            s, _ = scan_c(s, data.stacked, key)
        box["scan"] = s
        return s

    def run_loop():
        s = box["loop"]
        for _ in range(epochs):
            for b in data.batches:
                s, _ = step_c(s, b, key)
        box["loop"] = s
        return s

    times = time_interleaved(
        {"scan": run_scan, "loop": run_loop}, repeats=settings["epoch_repeats"], warmup=1
    )
    steps = epochs * nb
    scan, loop = stats(times["scan"], steps, bs), stats(times["loop"], steps, bs)
    return {
        "model": model_name,
        "image_size": image_size,
        "batch_size": bs,
        "batches_per_epoch": nb,
        "epochs_per_repeat": epochs,
        "repeats": settings["epoch_repeats"],
        "jit": "donate_argnums=0 for both",
        "compile_s": {"scan": scan_compile, "loop": loop_compile},
        "scan": scan,
        "loop": loop,
        "scan_over_loop": scan["examples_per_s"] / loop["examples_per_s"],
    }


def print_table(result: dict) -> None:
    torch_res = result["torch"] if isinstance(result["torch"], dict) else None
    head = f"{'config':<16}{'params':>9}{'compile s':>10}{'donate ex/s':>13}{'no-don ex/s':>13}{'best':>10}{'ms/step':>9}{'torch ex/s':>12}{'JAX/torch':>10}"
    print(
        f"\nTrain step, Adam, batch {result['settings']['batch_size']}, real Biased-MNIST "
        f"({result['machine']['jax_backend']}, {result['machine']['cpu_count_usable']} cores)"
    )
    print(head)
    print("-" * len(head))
    for name, e in result["models"].items():
        t = torch_res["results"].get(name) if torch_res else None
        print(
            f"{name:<16}{e['num_params']:>9,}{e['compile_s_best']:>10.2f}"
            f"{e['variants']['donate']['examples_per_s']:>13,.0f}{e['variants']['no_donate']['examples_per_s']:>13,.0f}"
            f"{e['best_variant']:>10}{e['ms_per_step']:>9.2f}"
            + (
                f"{t['examples_per_s']:>12,.0f}{t['jax_over_torch']:>10.2f}"
                if t
                else f"{'-':>12}{'-':>10}"
            )
        )
    ep = result["epoch_scan_vs_loop"]
    print(
        f"\nEpoch ({ep['model']}@{ep['image_size']}, {ep['batches_per_epoch']} batches): "
        f"scan {ep['scan']['examples_per_s']:,.0f} ex/s, Python loop {ep['loop']['examples_per_s']:,.0f} ex/s, "
        f"scan/loop = {ep['scan_over_loop']:.2f}"
    )
    if torch_res is None:
        print("torch: not installed")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny smoke run (batch 32, a few steps, one repeat)"
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "train_step.json", help="JSON result path"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="--quick at 8×8, one size per model (the test suite's run)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    args = parser.parse_args(argv)
    args.quick = args.quick or args.smoke
    settings = dict(SMOKE if args.smoke else QUICK if args.quick else FULL)
    t_start = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    use_torch = not args.no_torch and torch_available()
    if use_torch:
        import torch

        torch_info: dict | str = {
            "version": torch.__version__,
            "num_threads": torch.get_num_threads(),
            "results": {},
        }
    else:
        torch_info = "skipped (--no-torch)" if args.no_torch else "not installed"

    sizes = sorted({s for _, s, _ in settings["configs"]} | {settings["epoch_model"][1]})
    data = {s: Data(s, settings["batch_size"], settings["train_size"]) for s in sizes}

    models = {}
    for model_name, size, steps in settings["configs"]:
        name = config_name(model_name, size)
        print(f"[train_step] {name}: {steps} steps x repeats ...", file=sys.stderr, flush=True)
        entry, tentry = bench_config(model_name, size, steps, data[size], settings, use_torch)
        models[name] = entry
        if tentry is not None:
            torch_info["results"][name] = tentry  # type: ignore[index]
    print("[train_step] epoch scan vs loop ...", file=sys.stderr, flush=True)
    epoch = bench_epoch(data[settings["epoch_model"][1]], settings)

    donate_wins = [n for n, e in models.items() if e["best_variant"] == "donate"]
    ratios = [e["donate_over_no_donate"] for e in models.values()]
    result = {
        "benchmark": "train_step",
        "command": " ".join([Path(sys.executable).name, *sys.argv])
        if argv is None
        else "main(" + repr(argv) + ")",
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            "smoke": args.smoke,
            "batch_size": settings["batch_size"],
            "optimizer": f"make_optimizer('adam', learning_rate={LEARNING_RATE})",
            "repeats": settings["repeats"],
            "repeats_overrides": settings["slow_repeats"],
            "warmup_steps": settings["warmup_steps"],
            "torch_warmup_steps": max(settings["warmup_steps"], 3),
            "settle_s": settings["settle_s"],
            "configs": [
                {"model": m, "image_size": s, "steps_per_repeat": n}
                for m, s, n in settings["configs"]
            ],
            "image_sizes": sizes,
            "data": {
                "dataset": f"biased_mnist({RHO}, key=0, image_size=...), train split",
                "train_size": settings["train_size"],
                "train_examples": {s: d.train_examples for s, d in data.items()},
                "load_s": {s: d.load_s for s, d in data.items()},
                "batching": "stack_batches(train, batch_size, PRNGKey(1), drop_remainder=True), device-resident, cycled",
            },
            "timing": "AOT-compiled jax.jit(step[, donate_argnums=0]).lower(state, batch, key).compile(); "
            "state/batch/key passed as arguments; 1 warm-up step untimed; repeats of `steps` steps, "
            "variants (and PyTorch) interleaved, an untimed sleep of settle_s before each repeat, "
            "jax.block_until_ready at the end of each repeat; median repeat",
        },
        "models": models,
        "epoch_scan_vs_loop": epoch,
        "torch": torch_info,
        "summary": {
            "donate_faster_in": donate_wins,
            "donate_over_no_donate_geomean": math.exp(
                sum(math.log(r) for r in ratios) / len(ratios)
            ),
            "examples_per_s": {n: e["examples_per_s"] for n, e in models.items()},
            "jax_over_torch": (
                {n: t["jax_over_torch"] for n, t in torch_info["results"].items()}
                if isinstance(torch_info, dict)
                else None
            ),
            "torch_version": package_version("torch"),
        },
        "total_s": time.perf_counter() - t_start,
        "load_average_at_start": load_start,
    }
    path = write_result(args.out, result)
    print_table(result)
    print(f"\nwrote {path} ({result['total_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
