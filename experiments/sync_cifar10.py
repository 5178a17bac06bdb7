"""The sync loop of seed 000 (augment ↔ unlearn) on CIFAR-10 with a synthetic colour-tint bias.

The main job of ``privdebias run`` (:func:`privdebias_jax.run.run_main_job`: data → vanilla model →
FMD → bias-guided diffusion augmenter → SISA + sync rounds → naive baseline → FMD pass → attacks
→ ``report.md`` / ``results.json`` / figures) on CIFAR-10 read through TFDS. Nothing is
downloaded at run time: prepare the data once where the network allows, then point
``--data-dir`` at it::

    tfds build cifar10 --file_format=array_record --data_dir DIR

    # the full run (GPU-sized: ResNet, diffusers UNet of AugmentConfig.paper() at 32×32)
    python experiments/sync_cifar10.py --data-dir DIR --out results/sync_cifar10

    # the smoke run (tiny sizes, CPU, a minute): what tests/test_sync_tfds_smoke.py runs on mock data
    python experiments/sync_cifar10.py --data-dir DIR --out results/sync_cifar10_quick --quick

Options: ``--rho``, ``--train-size``, ``--rounds``, ``--shards``, ``--delta``, ``--no-progress``, ``--resume``
(continue an interrupted run in ``--out``).

**The protected attribute.** CIFAR-10 has none, and the loop needs one twice: (class, attribute)
cells to augment, and counterfactuals ``splits.counterfactual(ds, a_new)`` for FMD's bias
``B(θ)``, the loop's FMD pass and the augmenter's decorrelated classifiers. As in Biased-MNIST
(Bahng et al. 2020), where the background colour agrees with the digit with probability ρ, every
image is tinted with one of ten colours, ``x_a = (1 − s)·x + s·c_a`` (``s`` = 0.5), and the tint
agrees with the class with probability ρ (0.99 by default;
:mod:`privdebias_jax.data.tint`, ``load_cifar10(attribute="tint")``). Half of the test images
(disjoint from the other half) form the unbiased test set (ρ = 0.1: tint independent of the
class). Counterfactuals are exact: ``x_a + s·(c_b − c_a) = (1 − s)·x + s·c_b`` re-tints an image
without knowing the original. The dataset is reported as ``cifar10-tint``.

**What differs from the embedded Biased-MNIST run.** The images are natural photographs, so the
shortcut (the tint) is far easier than the class: expect a low unbiased accuracy for the vanilla
model at ρ = 0.99 and a generator that must learn 10×10 cells of natural images. The full run
uses a ResNet (``resnet``, 2-2-2 blocks, widths 32-64-128) instead of the CPU ``small_cnn`` and
the diffusers UNet of :meth:`AugmentConfig.paper` at 32×32 (pixel space, cross-attention at the
lower resolutions) instead of the CPU PCA-latent MLP denoiser; the SISA ensemble has 5 shards ×
4 slices, 3 rounds of up to 5,000 synthetic images, 1,000 members per attack.

**Expected cost on one GPU (an estimate, not measured: no GPU and no CIFAR-10 on the machine this
was written on).** Diffusion training dominates: 200 epochs × 50,000 images = 10⁷ UNet training
samples; at a few thousand samples/s for a UNet of this size (64-128-128 channels, 2 layers per
block) on an A100/H100-class GPU that is about 1 h. Sampling: ≤ 15,000 images × 100 DDIM steps
with KL guidance (a classifier gradient per step) ≈ 5–10 min. The ResNet (vanilla: 30 epochs ×
50,000; SISA: the same work split over shards plus the retraining of the shards that receive
synthetic samples or lose originals) ≈ 5–15 min; attacks, FMD and the report a few minutes. In
all **about 1–1.5 h on one A100/H100**, and ~8 GB of host memory for the images and their
copies. Check the estimate with ``--train-size 5000`` first (the diffusion and SISA costs scale
linearly with it). The smoke run takes well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import ml_collections

from privdebias_jax.augment import AugmentConfig
from privdebias_jax.config import get_fmd_config
from privdebias_jax.sync import get_sync_options


def get_config() -> ml_collections.ConfigDict:
    """The full (GPU-sized) configuration of the loop on tinted CIFAR-10."""
    c = ml_collections.ConfigDict()
    c.dataset = "cifar10"
    c.attribute = "tint"
    c.rho = 0.99
    c.tint_strength = 0.5
    c.image_size = 32
    c.train_size = ml_collections.FieldReference(None, field_type=int)  # all 50,000
    c.test_size = ml_collections.FieldReference(None, field_type=int)  # all 10,000
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.model = "resnet"
    c.model_options = ml_collections.ConfigDict({"stage_sizes": (2, 2, 2), "widths": (32, 64, 128)})
    c.optimizer, c.learning_rate, c.weight_decay = "adam", 1e-3, 1e-4
    c.batch_size, c.epochs, c.seed = 256, 30, 0
    c.fmd = get_fmd_config("biased-mnist").fmd
    c.fmd.external_size = 1000
    c.sync = get_sync_options()
    c.sync.shards, c.sync.slices = 5, 4
    c.sync.max_new_per_round = 5000
    c.sync.attack_size = 1000
    c.augment = ml_collections.ConfigDict(AugmentConfig.paper(image_size=32).to_dict())
    return c


def quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Smoke-test sizes (CPU, mock data): 8×8 images, 160 training images, an MLP, 1 epoch, one
    round on 2 shards × 1 slice, a tiny augmenter; the main job's ``quick`` mode on top."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.image_size = 8
    c.train_size, c.test_size = 160, 160
    c.model = "mlp"
    c.model_options = ml_collections.ConfigDict({"hidden": (32,)})
    c.batch_size, c.epochs = 64, 1
    c.fmd.iterations, c.fmd.cg_iterations, c.fmd.external_size = 2, 5, 24
    c.fmd.step_sizes = (0.5, 1.0)
    c.sync = get_sync_options(quick=True)
    c.sync.fmd_pass = bool(config.sync.fmd_pass)
    c.sync.slices, c.sync.max_new_per_round, c.sync.attack_size = 1, 40, 16
    c.augment = ml_collections.ConfigDict(dataclasses.asdict(AugmentConfig.tiny(
        epochs=1, sample_steps=2, width=32, latent_dim=4, classifier_batch_size=64, sample_batch=64,
    )))
    return c


def parse(argv, description: str, default_out: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", default=None, help="TFDS data directory holding the prepared dataset")
    p.add_argument("--out", default=default_out, help="results folder")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (CPU, a minute)")
    p.add_argument("--resume", action="store_true", help="continue the run already in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rho", type=float)
    p.add_argument("--train-size", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--shards", type=int)
    p.add_argument("--delta", type=float, help="target KL/MI bias of the loop (nats)")
    return p.parse_args(argv)


def configure(config: ml_collections.ConfigDict, args: argparse.Namespace) -> ml_collections.ConfigDict:
    """Apply ``--quick`` and the command-line overrides to ``config``."""
    c = quick(config) if args.quick else ml_collections.ConfigDict(config.to_dict())
    c.data_dir = args.data_dir
    if args.rho is not None and "rho" in c:
        c.rho = args.rho
    if args.train_size is not None:
        c.train_size = args.train_size
    for field in ("rounds", "shards", "delta"):
        if getattr(args, field) is not None:
            c.sync[field] = getattr(args, field)
    return c


def run_experiment(config: ml_collections.ConfigDict, argv, description: str, default_out: str) -> dict:
    """Parse the shared command line, apply it to ``config`` and run the main job (both TFDS loops)."""
    from privdebias_jax.run import run_main_job

    args = parse(argv, description, default_out)
    config = configure(config, args)
    results = run_main_job(config, Path(args.out), quick=args.quick, progress=not args.no_progress,
                           resume=args.resume)
    print(json.dumps({"out": str(args.out), "dataset": results["dataset"], "targets": results["targets"]},
                     default=str))
    return results


def main(argv=None) -> dict:
    return run_experiment(get_config(), argv, __doc__.splitlines()[0], "results/sync_cifar10")


if __name__ == "__main__":
    main()
