"""One training epoch scanned under one jit vs a Python loop of jitted (donated) steps.

``fit`` uses the loop by default because XLA's CPU convolutions run much slower inside a
``lax.scan``; this benchmark measures the ratio for the MLP and the small CNN in one run.

    python benchmarks/fit_loop.py [--quick] [--out benchmarks/results/fit_loop.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import RESULTS_DIR, machine_info, median, write_result  # noqa: E402
from privdebias_jax.data import Batch, biased_mnist, stack_batches  # noqa: E402
from privdebias_jax.models import create_model  # noqa: E402
from privdebias_jax.train import create_train_state, make_epoch_fn, make_optimizer, make_train_step  # noqa: E402


def measure(model_name: str, image_size: int, train_size: int | None, repeats: int, batch_size: int) -> dict:
    splits = biased_mnist(0.99, key=0, image_size=image_size, train_size=train_size)
    model = create_model(model_name, 10)
    tx = make_optimizer("adam", 1e-3)
    state0 = create_train_state(model, tx, jax.random.key(0), splits.input_shape)
    step = make_train_step(model, tx)
    epoch = jax.jit(make_epoch_fn(step))
    single = jax.jit(step, donate_argnums=0)
    batches = Batch(*(jnp.asarray(v) for v in stack_batches(splits.train, batch_size, jax.random.key(1))))
    nb = int(batches.mask.shape[0])
    key = jax.random.key(2)

    def run_scan(state):
        state, _ = epoch(state, batches, key)
        return state

    def run_loop(state):
        for i in range(nb):
            state, _ = single(state, Batch(*(v[i] for v in batches)), key)
        return state

    times = {"scan": [], "loop": []}
    for name, fn in (("scan", run_scan), ("loop", run_loop)):
        state = jax.block_until_ready(fn(jax.tree_util.tree_map(jnp.copy, state0)))  # compile
        for _ in range(repeats):
            t0 = time.perf_counter()
            state = jax.block_until_ready(fn(state))
            times[name].append(time.perf_counter() - t0)
    n = len(splits.train)
    scan_s, loop_s = median(times["scan"]), median(times["loop"])
    return {
        "model": model_name, "image_size": image_size, "examples_per_epoch": n, "batches": nb,
        "seconds_scan": scan_s, "seconds_loop": loop_s, "raw": times,
        "examples_per_s_scan": n / scan_s, "examples_per_s_loop": n / loop_s,
        "loop_speedup_over_scan": scan_s / loop_s,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fit_loop.json")
    args = parser.parse_args(argv)
    repeats, train_size, batch = (1, 256, 64) if args.quick else (3, None, 256)
    configs = [("mlp", 8 if args.quick else 28), ("small_cnn", 8 if args.quick else 14)]
    if not args.quick:
        configs.append(("small_cnn", 28))
    entries = [measure(m, s, train_size, repeats, batch) for m, s in configs]
    for e in entries:
        print(f"{e['model']}@{e['image_size']}: scan {e['examples_per_s_scan']:,.0f} ex/s, loop "
              f"{e['examples_per_s_loop']:,.0f} ex/s, loop/scan speed {e['loop_speedup_over_scan']:.2f}x")
    payload = {"benchmark": "fit_loop", "command": "python benchmarks/fit_loop.py" + (" --quick" if args.quick else ""),
               "machine": machine_info(), "settings": {"batch_size": batch, "repeats": repeats, "optimizer": "adam 1e-3"},
               "entries": entries}
    write_result(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
