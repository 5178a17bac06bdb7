"""Bias-guided diffusion augmentation on Biased-MNIST and Colored-MNIST at ρ = 0.99 (seed 000).

For each dataset: train the augmenter (conditional denoiser + real-data classifiers) on the
4,000 training images, plan the samples each (class, colour) cell needs to cut the dataset's
mutual-information bias I(τ; y) by 80 %, generate them with classifier-free + KL guidance,
label them with the independent judges (class and colour accuracy per cell, rare cells
included), and train the dataset's CPU classifier on the original and on the augmented data
to compare unbiased test accuracy (ρ = 0.1 test set).

Command (from the repository root):

    python experiments/augment_mnist.py [--quick] [--out results/augment_mnist]
    privdebias augment --dataset biased-mnist --out results/augment_biased   # one dataset

Writes ``OUT/results.json`` and ``OUT/<dataset>_samples.png`` (one sample per cell).
Measured on 2 idle CPU cores with the CPU default (factored denoiser in the shape/colour
latent, routed KL guidance): 5.3 minutes for both datasets, denoiser training 64–79 s of it.
Seed 0: MI 2.236 → 0.446 nats (−80 %) with 4,432 synthetic samples; every one of the 90 cells
recognised ≥ 90 % as its class and its colour by the judges (lowest 0.96 / 1.00 on
Biased-MNIST, 1.00 / 0.92 on Colored-MNIST); unbiased accuracy 0.099 → 0.635 (Biased-MNIST,
small CNN) and 0.318 → 0.814 (Colored-MNIST, 3×100 MLP). ``--seed 1``: every cell too (lowest
1.00 / 1.00 and 0.98 / 0.94).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from privdebias_jax.augment import AugmentConfig  # noqa: E402
from privdebias_jax.augment.driver import DATASETS, augment_and_evaluate, summary_line  # noqa: E402
from privdebias_jax.report import write_json  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", type=Path, default=Path("results/augment_mnist"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    results: dict[str, Any] = {"experiment": "augment_mnist", "quick": args.quick,
                               "command": "python experiments/augment_mnist.py" + (" --quick" if args.quick else ""),
                               "load_average_start": list(__import__("os").getloadavg()), "datasets": {}}
    for name in datasets:
        r = augment_and_evaluate(name, args.out, quick=args.quick, seed=args.seed, progress=args.progress)
        results["datasets"][name] = r
        print(summary_line(r), flush=True)
    results["load_average_end"] = list(__import__("os").getloadavg())
    path = write_json(args.out / "results.json", results)
    print(f"wrote {path}")
    return results


def augment_config() -> AugmentConfig:
    """The experiment's augmenter configuration (the CPU default, 14×14)."""
    return AugmentConfig.cpu_default(image_size=14)


if __name__ == "__main__":
    main()
