"""Seed paper 001's CelebA experiment (Barbano et al. 2021, Table 2): target ``Blond_Hair``,
private attribute ``Male``; vanilla vs EnD; target accuracy and the linear probe's private class
accuracy on the test set (chance 50%, binary attribute).

For users who have CelebA prepared for TFDS (``tfds build celeb_a --file_format=array_record
--data_dir DIR``; nothing is downloaded at run time):

    python experiments/celeba_privacy.py --data-dir DIR --out results/celeba_privacy \
        [--methods vanilla end] [--max-train 20000] [--max-test 5000] [--image-size 32]

Published (ResNet-18, full CelebA, 50 epochs): vanilla 70.25 / 59.20, EnD 91.21 / 50.00 (target /
private class accuracy, %). The CPU default here is the ``small_cnn`` at 32×32 on a capped
subset; the paper size is ``--model resnet --image-size 64`` on a GPU/TPU. Tested on
``tfds.testing.mock_data`` only (no CelebA on this machine).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import ml_collections

from privdebias_jax.data.tfds_sources import load_celeba
from privdebias_jax.debias.methods import check_method
from privdebias_jax.pipeline import train_and_evaluate
from privdebias_jax.privacy import attribute_probe
from privdebias_jax.report import write_json

ANCHOR = {"vanilla": {"target": 0.7025, "private": 0.5920}, "end": {"target": 0.9121, "private": 0.5000}}


def get_config() -> ml_collections.ConfigDict:
    """CelebA, target Blond_Hair, private Male: the CPU-sized training config (EnD α = β = 1)."""
    c = ml_collections.ConfigDict()
    c.dataset = "celeba"
    c.target, c.attribute = "Blond_Hair", "Male"
    c.image_size = 32
    c.max_train, c.max_test = 20000, 5000
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.model = "small_cnn"
    c.model_options = ml_collections.ConfigDict()
    c.optimizer, c.learning_rate, c.weight_decay = "adam", 1e-3, 1e-4
    c.batch_size, c.epochs, c.seed = 256, 10, 0
    c.method = "end"
    c.alpha, c.beta = 1.0, 1.0
    return c


def run(config: ml_collections.ConfigDict, methods, out: Path, progress: bool = True) -> dict:
    """Train each method on CelebA, probe its bottleneck for ``Male``; write ``out/results.json``."""
    splits = load_celeba(target=config.target, attribute=config.attribute, image_size=int(config.image_size),
                         data_dir=config.data_dir, max_train=int(config.max_train), max_test=int(config.max_test))
    rows = []
    for method in methods:
        c = ml_collections.ConfigDict(config.to_dict())
        c.method = check_method(method)
        if method != "end":
            c.alpha, c.beta = None, None
        t = time.perf_counter()
        trained = train_and_evaluate(c, splits=splits, progress=progress)
        probe = attribute_probe(trained.model, trained.state.params, trained.state.model_state, splits.test,
                                splits.num_attributes, key=jax.random.key(int(c.seed) + 11))
        rows.append({
            "method": method, "target_accuracy": trained.results["acc"],
            "private_accuracy": probe["accuracy"], "private_ci": [probe["ci_low"], probe["ci_high"]],
            "private_chance": probe["chance"], "seconds": time.perf_counter() - t,
            "anchor": ANCHOR.get(method),
        })
        print(f"{method}: target {rows[-1]['target_accuracy']:.3f} private {rows[-1]['private_accuracy']:.3f}")
    payload = {"experiment": "celeba_privacy", "config": config.to_dict(), "rows": rows,
               "train_size": len(splits.train), "test_size": len(splits.test)}
    write_json(out / "results.json", payload)
    return payload


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/celeba_privacy")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--methods", nargs="+", default=["vanilla", "end"])
    p.add_argument("--max-train", type=int)
    p.add_argument("--max-test", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--model")
    args = p.parse_args(argv)
    c = get_config()
    c.data_dir = args.data_dir
    for field in ("max_train", "max_test", "image_size", "epochs", "model"):
        if getattr(args, field) is not None:
            c[field] = getattr(args, field)
    return run(c, args.methods, Path(args.out), progress=False)


if __name__ == "__main__":
    main()
