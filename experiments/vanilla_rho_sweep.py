"""The vanilla row of Bahng et al. / Barbano et al. on the embedded data: unbiased accuracy
collapses as ρ grows. Trains the CPU-default vanilla model on Biased-MNIST for each ρ and on
Colored-MNIST, and writes one JSON.

Command (from the repository root):

    python experiments/vanilla_rho_sweep.py --out results/vanilla_rho_sweep.json [--rhos 0.99 0.997] [--seeds 0 1]

Expected on 2 CPU cores: ~1 minute per (ρ, seed) for Biased-MNIST, seconds for Colored-MNIST.
Published anchors (unbiased accuracy %, Bahng et al. 60,000 images, ρ = .999/.997/.995/.990):
vanilla 10.4 / 33.4 / 72.1 / 89.1.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from privdebias_jax.config import get_config
from privdebias_jax.pipeline import train_and_evaluate
from privdebias_jax.report import write_json

ANCHOR_UNBIASED = {0.999: 0.104, 0.997: 0.334, 0.995: 0.721, 0.99: 0.891}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/vanilla_rho_sweep.json")
    p.add_argument("--rhos", type=float, nargs="+", default=[0.99, 0.995, 0.997, 0.999])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--datasets", nargs="+", default=["biased-mnist", "colored-mnist"])
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    args = p.parse_args(argv)
    rows = []
    for dataset in args.datasets:
        for rho in args.rhos:
            for seed in args.seeds:
                c = get_config(dataset)
                c.rho, c.seed = rho, seed
                for field in ("epochs", "train_size", "image_size"):
                    if getattr(args, field) is not None:
                        c[field] = getattr(args, field)
                t = time.perf_counter()
                r = train_and_evaluate(c, progress=False).results
                row = {k: r.get(k) for k in ("dataset", "rho", "model", "acc_biased", "acc_unbiased",
                                             "acc_conflicting", "counterfactual_bias", "dp_diff", "eo_diff",
                                             "train_seconds")}
                row.update(seed=seed, seconds=time.perf_counter() - t, anchor_unbiased=ANCHOR_UNBIASED.get(rho))
                rows.append(row)
                print(f"{dataset} rho={rho} seed={seed}: biased {row['acc_biased']:.3f} "
                      f"unbiased {row['acc_unbiased']:.3f} ({row['train_seconds']:.1f}s)")
    summary = {}
    for dataset in args.datasets:
        for rho in args.rhos:
            acc = [r["acc_unbiased"] for r in rows if r["dataset"] == dataset and r["rho"] == rho]
            summary[f"{dataset}@{rho}"] = {"acc_unbiased_mean": float(np.mean(acc)),
                                           "acc_unbiased_std": float(np.std(acc)), "n": len(acc)}
    payload = {"rows": rows, "summary": summary, "settings": vars(args)}
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
