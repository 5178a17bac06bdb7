"""Shadow / reference models for membership inference: N models trained together vs one by one.

LiRA and the shadow attack train ``N`` models of the target's architecture, each on a random half
of a pool (Biased-MNIST, the embedded default: training + test images, 14×14). This benchmark
trains the same ``N`` models (same initial states, epochs, batch size) in each layout of
:func:`privdebias_jax.privacy.attacks.train_reference_models` and reports examples/s
(real examples: Σ over models of their rows × epochs):

* ``teams``: :func:`privdebias_jax.privacy.shadow.train_team_models` — each step takes a batch of
  one team's rows and updates the ``N/2`` models of that team with one shared-batch
  ``vmap`` (gathered, updated, scattered back); the whole run is one ``lax.scan`` call for the
  MLP, one call per step for the CNN (XLA's CPU convolutions are slow inside ``lax.scan``);
* ``lanes``: :func:`privdebias_jax.multi.train_models` — one lane per model, each with its own
  batches of its own rows (what SISA uses), one call for the MLP, one per batch for the CNN; on
  a CPU the lanes of a device run one after the other (``lane_batch="auto"``) and, with the CPU
  split into several devices (``--cpu-devices``, default: one per core), the models are spread
  over them (the auto layout of ``train_reference_models`` for models without convolutions);
* ``loop_per_batch``: one model after the other, one jitted (donated) step call per batch,
  compiled once for all models — the "one-by-one" reference of the target;
* ``loop_scan``: one model after the other, one scanned call per epoch (MLP only: the strongest
  classic layout for it; for the CNN it is ~10× slower and skipped).

Every layout computes the same kind of thing (N models, each trained on half the pool with the
same recipe); the memberships differ between layouts (teams: the team design; others: random
per-sample halves), each model's number of examples is reported. Repeats are interleaved
(round ``r`` times every variant once) after an untimed warm-up (compilation); figures are
medians. Target: the auto layout for the MLP (``lanes``) ≥ 1.5× ``loop_per_batch`` at N = 8;
its ratio to ``loop_scan`` (the strongest one-by-one layout) is reported beside it, and so is
the small CNN, as measured. The one-by-one loops run on device 0 of the same process, their
operations split over all cores as usual.

``--suite`` also runs the full attack suite of ``experiments/privacy_biased_mnist.py`` on the
vanilla Biased-MNIST model (reference models, every membership attack, probe, reconstruction)
and records its wall time (target: ≤ 5 minutes on 2 cores).

    python benchmarks/shadow_models.py [--quick] [--suite] [--out benchmarks/results/shadow_models.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS_DIR,
    machine_info,
    median,
    time_interleaved,
    write_result,
)
from privdebias_jax.data import concat, load_dataset, subset  # noqa: E402
from privdebias_jax.models import create_model  # noqa: E402
from privdebias_jax.multi import train_models, use_cpu_devices  # noqa: E402
from privdebias_jax.privacy import shadow as sh  # noqa: E402
from privdebias_jax.privacy.attacks import half_memberships  # noqa: E402
from privdebias_jax.train import make_optimizer  # noqa: E402
from privdebias_jax.types import PrivDebiasError  # noqa: E402

TARGET_RATIO = 1.5
TARGET_MODELS = 8
SUITE_TARGET_SECONDS = 300.0


def variants(
    model, tx, pool, num_models: int, *, epochs: int, batch_size: int, conv: bool, seed: int
):
    """Zero-argument functions, one per layout, and the examples each trains per call."""
    key = jax.random.PRNGKey(seed)
    design = sh.team_design(
        num_models,
        len(pool),
        jax.random.fold_in(key, 0),
        sh.default_num_teams(len(pool), batch_size),
    )
    halves = half_memberships(num_models, len(pool), jax.random.fold_in(key, 0))
    mk = jax.random.fold_in(key, 1)
    fns = {
        "teams": (
            lambda: sh.train_team_models(
                model, tx, pool, design, mk, epochs=epochs, batch_size=batch_size
            ),
            float(design.member.sum()) * epochs,
        ),
        "lanes": (
            lambda: train_models(model, tx, pool, halves, mk, epochs=epochs, batch_size=batch_size),
            float(halves.sum()) * epochs,
        ),
        "loop_per_batch": (
            lambda: sh.train_models_one_by_one(
                model, tx, pool, halves, mk, epochs=epochs, batch_size=batch_size, inner="loop"
            ),
            float(halves.sum()) * epochs,
        ),
    }
    if not conv:
        fns["loop_scan"] = (
            lambda: sh.train_models_one_by_one(
                model, tx, pool, halves, mk, epochs=epochs, batch_size=batch_size, inner="scan"
            ),
            float(halves.sum()) * epochs,
        )
    return fns


def measure(args, name: str, num_models: int) -> dict:
    splits = load_dataset("biased-mnist", image_size=args.image_size, key=args.seed)
    pool = concat(splits.train, splits.test)
    size = args.pool_size if name == "mlp" else args.cnn_pool_size
    if size is not None:
        pool = subset(pool, np.arange(min(int(size), len(pool))))
    model = create_model(name, splits.num_classes)
    tx = make_optimizer("adam", 1e-3)
    conv = name != "mlp"
    epochs = args.epochs if not conv else args.cnn_epochs
    fns = variants(
        model,
        tx,
        pool,
        num_models,
        epochs=epochs,
        batch_size=args.batch_size,
        conv=conv,
        seed=args.seed,
    )
    fns = {k: v for k, v in fns.items() if k in args.variants}
    times = time_interleaved({k: v[0] for k, v in fns.items()}, repeats=args.repeats, warmup=1)
    out = {
        "num_models": num_models,
        "pool_size": len(pool),
        "epochs": epochs,
        "batch_size": args.batch_size,
        "num_teams": sh.default_num_teams(len(pool), args.batch_size),
        "variants": {},
    }
    for k, ts in times.items():
        sec = median(ts)
        out["variants"][k] = {
            "seconds": sec,
            "raw_seconds": ts,
            "examples": fns[k][1],
            "examples_per_s": fns[k][1] / sec,
        }
    v = out["variants"]
    out["ratios"] = {
        f"teams/{other}": v["teams"]["examples_per_s"] / v[other]["examples_per_s"]
        for other in v
        if other != "teams"
    }
    if "lanes" in v:
        for other in ("loop_per_batch", "loop_scan"):
            if other in v:
                out["ratios"][f"lanes/{other}"] = (
                    v["lanes"]["examples_per_s"] / v[other]["examples_per_s"]
                )
    return out


def run_suite(quick: bool) -> dict:
    """The full attack suite on the vanilla Biased-MNIST model (``experiments/privacy_biased_mnist.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    import privacy_biased_mnist as exp

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--models", "vanilla", "--out", tmp] + (["--quick"] if quick else [])
        t0 = time.perf_counter()
        res = exp.main(argv)
        total = time.perf_counter() - t0
    row = res["models"]["vanilla"]
    return {
        "command": "python experiments/privacy_biased_mnist.py " + " ".join(argv[:2]),
        "suite_seconds": row["suite_seconds"],
        "suite_seconds_parts": row["suite_seconds_parts"],
        "train_seconds": row["train_seconds"],
        "total_seconds_with_training": total,
        "reference_models": row["reference_models"],
        "reference_pool_size": row["reference_pool_size"],
        "target_seconds": SUITE_TARGET_SECONDS,
        "met": bool(row["suite_seconds"] <= SUITE_TARGET_SECONDS),
    }


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp", "small_cnn"])
    p.add_argument("--num-models", type=int, nargs="+", default=[8, 16])
    p.add_argument("--image-size", type=int, default=14)
    p.add_argument("--pool-size", type=int, default=None, help="MLP pool cap (default: all 5,000)")
    p.add_argument("--cnn-pool-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cnn-epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["teams", "lanes", "loop_per_batch", "loop_scan"],
        help="layouts to time (teams and loop_per_batch are always needed for the ratio)",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        default=None,
        help="split the CPU into this many JAX devices before anything runs (default: the "
        "number of cores, at most 8, unless JAX already runs in this process); lanes then "
        "spreads its models over them, the one-by-one loops run on device 0 as usual",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suite", action="store_true", help="also time the full attack suite")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.variants = sorted(set(args.variants) | {"teams", "loop_per_batch"})
    if args.quick:
        args.models, args.num_models, args.image_size = ["mlp"], [4], 8
        args.pool_size, args.epochs, args.repeats, args.batch_size = 128, 1, 1, 32
        args.variants = ["teams", "lanes", "loop_per_batch"]
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.cpu_devices is not None:
        use_cpu_devices(args.cpu_devices)
    else:
        try:
            use_cpu_devices(min(os.cpu_count() or 1, 8))
        except PrivDebiasError:
            pass  # called inside a process where JAX already runs: keep its devices
    entries: dict[str, dict] = {}
    for name in args.models:
        entries[name] = {}
        for n in args.num_models:
            e = measure(args, name, n)
            entries[name][str(n)] = e
            print(
                f"{name} N={n}: "
                + ", ".join(f"{k} {v['examples_per_s']:,.0f}" for k, v in e["variants"].items())
                + " ex/s | "
                + ", ".join(f"{k} {r:.2f}x" for k, r in e["ratios"].items())
            )
    target = entries.get("mlp", {}).get(str(TARGET_MODELS))
    # the auto layout of train_reference_models for the MLP (lanes), teams if lanes was not timed
    primary = "lanes" if "lanes" in args.variants else "teams"
    ratio = None if target is None else target["ratios"][f"{primary}/loop_per_batch"]
    payload = {
        "benchmark": "shadow_models",
        "command": ("python benchmarks/shadow_models.py " + " ".join(argv)).strip(),
        "machine": machine_info(),
        "settings": {
            "quick": args.quick,
            "dataset": "biased-mnist (train + test pool)",
            "image_size": args.image_size,
            "models": args.models,
            "num_models": args.num_models,
            "batch_size": args.batch_size,
            "epochs_mlp": args.epochs,
            "epochs_cnn": args.cnn_epochs,
            "optimizer": "adam 1e-3",
            "repeats": args.repeats,
            "cpu_devices": jax.device_count(),
            "timing": "median of interleaved repeats after one untimed warm-up (compile) per variant; "
            "each call includes initial states, host<->device transfers and the result's device_get",
        },
        "results": entries,
        "target": {
            "description": f"{primary} (the MLP's auto layout) >= {TARGET_RATIO}x loop_per_batch "
            f"at N = {TARGET_MODELS} (mlp)",
            "layout": primary,
            "ratio": ratio,
            "ratio_vs_loop_scan": None
            if target is None
            else target["ratios"].get(f"{primary}/loop_scan"),
            "teams_over_loop_per_batch": None
            if target is None
            else target["ratios"].get("teams/loop_per_batch"),
            "met": None if ratio is None or args.quick else bool(ratio >= TARGET_RATIO),
        },
    }
    if args.suite:
        payload["attack_suite"] = run_suite(args.quick)
        print(
            f"attack suite on the vanilla model: {payload['attack_suite']['suite_seconds']:.1f}s "
            f"(target {SUITE_TARGET_SECONDS:.0f}s)"
        )
    out = args.out or RESULTS_DIR / "shadow_models.json"
    write_result(out, payload)
    print(
        f"target ({payload['target']['description']}): {payload['target']['met']} "
        f"(ratio {ratio}); wrote {out}"
    )
    return payload


if __name__ == "__main__":
    main()
