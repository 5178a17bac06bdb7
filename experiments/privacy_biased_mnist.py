"""Every privacy attack on a vanilla and a deliberately overfit Biased-MNIST model.

Trains two models on the embedded Biased-MNIST (the CPU defaults of
``privdebias_jax.config.get_config("biased-mnist")``: small strided CNN, 14×14, ρ = 0.99):

* ``vanilla``: the default training run (all 4,000 training images, 12 epochs, weight decay 1e-4);
* ``overfit``: the same network on a small subset (``--overfit-size``, default 500 images) for
  many epochs (``--overfit-epochs``, default 60) with batch 64 and no weight decay, so it
  memorises its training set.

and attacks each one with the whole suite of :mod:`privdebias_jax.privacy`:

* membership inference on ``--members`` training images (members) against as many images of the
  biased test set (non-members, same distribution): Yu et al.'s M-Loss / M-Mean / M-Moments
  (``k = 10`` shifted copies), LOSS, confidence, entropy, modified entropy, the shadow-model
  attack and LiRA online / offline with ``--reference-models`` reference models trained together
  (:func:`privdebias_jax.privacy.attacks.train_reference_models`, auto layout: one by one for
  the CNN, lanes for an MLP) on random halves
  of a pool (vanilla: the whole training set plus the test set, so each reference model trains on
  as many images as the target; overfit: its training subset plus the non-members) with the
  target's recipe. Each attack: AUC, TPR at 0.1% and 1% FPR, balanced accuracy at the threshold
  chosen on a calibration half, all with bootstrap CIs, and slices by colour and by digit;
* attribute inference (seed 001's private class accuracy): a linear probe on the frozen
  bottleneck features predicting the colour on the unbiased test set, with its Wilson CI;
* reconstruction (seed 001, Fig. 6): an MLP decoder from features back to images, its error
  and how well the colour can be read from the reconstructions, with a PNG grid.

Writes ``OUT/results.json`` (every figure, the wall time of the full attack suite per model and
its parts), ``OUT/roc_<model>.png`` (log-log ROC curves) and ``OUT/reconstruction_<model>.png``.

Command (from the repository root):

    python experiments/privacy_biased_mnist.py --out results/privacy_biased_mnist
    python experiments/privacy_biased_mnist.py --quick --out /tmp/privacy_quick   # smoke test

Target: the full attack suite of one model (reference models + every attack + probe +
reconstruction) within 5 minutes on 2 CPU cores (``suite_seconds`` in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from privdebias_jax.config import get_config  # noqa: E402
from privdebias_jax.data import DataSplits, concat, subset  # noqa: E402
from privdebias_jax.pipeline import load_splits, train_and_evaluate  # noqa: E402
from privdebias_jax.privacy import attacks as atk  # noqa: E402
from privdebias_jax.privacy.metrics import plot_roc, roc_curve  # noqa: E402
from privdebias_jax.privacy.probe import attribute_probe  # noqa: E402
from privdebias_jax.privacy.reconstruction import (  # noqa: E402
    reconstruction_attack,
    save_reconstruction_grid,
)
from privdebias_jax.report import write_json  # noqa: E402

SUITE_TARGET_SECONDS = 300.0


def summarise(attacks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{attack: {metric: value}}``: the point estimates of :func:`attack_suite`'s reports."""
    out = {}
    for name, rep in attacks.items():
        out[name] = {
            k: (v["value"] if isinstance(v, dict) and "value" in v else v)
            for k, v in rep.items()
            if not k.startswith("by_") and not isinstance(v, list)
        }
    return out


def attack_model(
    name: str,
    trained: Any,
    train_set: Any,
    splits: DataSplits,
    *,
    key: jax.Array,
    members: int,
    reference_models: int,
    reference_pool: str,
    epochs: int,
    batch_size: int,
    out: Path,
    k: int = 10,
    num_resamples: int = 200,
    probe_size: int | None = None,
    decoder_epochs: int = 60,
) -> dict[str, Any]:
    """The full attack suite on one trained model; returns its JSON-ready results."""
    model, state = trained.model, trained.state
    target = (model, state.params, state.model_state)
    _, tx = trained.spec.build()
    t_all = time.perf_counter()
    mem, non = atk.sample_members(train_set, splits.test, members, jax.random.fold_in(key, 0))
    pool = concat(train_set, splits.test) if reference_pool == "all" else concat(mem, non)
    reference = atk.train_reference_models(
        model,
        tx,
        pool,
        int(reference_models),
        key=jax.random.fold_in(key, 1),
        epochs=int(epochs),
        batch_size=int(batch_size),
    )
    t1 = time.perf_counter()
    suite = atk.attack_suite(
        target,
        mem,
        non,
        key=jax.random.fold_in(key, 2),
        attacks=atk.ALL_ATTACKS,
        reference=reference,
        k=k,
        num_resamples=num_resamples,
    )
    t2 = time.perf_counter()
    unbiased = splits.test_unbiased
    if probe_size is not None:
        unbiased = subset(unbiased, np.arange(min(int(probe_size), len(unbiased))))
    probe = attribute_probe(
        model,
        state.params,
        state.model_state,
        unbiased,
        splits.num_attributes,
        key=jax.random.fold_in(key, 3),
    )
    t3 = time.perf_counter()
    recon = reconstruction_attack(
        model,
        state.params,
        state.model_state,
        unbiased,
        key=jax.random.fold_in(key, 4),
        epochs=int(decoder_epochs),
        num_examples=8,
    )
    t4 = time.perf_counter()
    examples = recon.pop("examples")
    save_reconstruction_grid(
        examples["originals"],
        examples["reconstructions"],
        out / f"reconstruction_{name}.png",
        title=f"{name}: originals over reconstructions from bottleneck features",
    )
    curves = {n: roc_curve(sc, lab)[:2] for n, (sc, lab) in suite.pop("scores").items()}
    plot_roc(curves, out / f"roc_{name}.png", title=f"Biased-MNIST, {name} model")
    return {
        "members": len(mem),
        "nonmembers": len(non),
        "reference_models": int(reference_models),
        "reference_pool": reference_pool,
        "reference_pool_size": len(pool),
        "reference_epochs": int(epochs),
        "summary": summarise(suite["attacks"]),
        "membership": suite,
        "attribute_probe": probe,
        "reconstruction": recon,
        "suite_seconds": t4 - t_all,
        "suite_seconds_parts": {
            "reference_models": t1 - t_all,
            "membership_attacks": t2 - t1,
            "attribute_probe": t3 - t2,
            "reconstruction": t4 - t3,
        },
        "suite_within_target": bool(t4 - t_all <= SUITE_TARGET_SECONDS),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/privacy_biased_mnist"))
    p.add_argument("--rho", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--members", type=int, default=500)
    p.add_argument("--reference-models", type=int, default=8)
    p.add_argument("--overfit-size", type=int, default=500)
    p.add_argument("--overfit-epochs", type=int, default=60)
    p.add_argument("--num-resamples", type=int, default=200)
    p.add_argument("--models", nargs="+", default=["vanilla", "overfit"])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.members, args.reference_models = 20, 2
        args.overfit_size, args.overfit_epochs, args.num_resamples = 40, 2, 20
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = get_config("biased-mnist")
    base.rho, base.seed = float(args.rho), int(args.seed)
    if args.quick:
        base.image_size, base.train_size, base.epochs, base.model = 8, 120, 1, "mlp"
    splits = load_splits(base)
    if args.quick:
        splits = dataclasses.replace(
            splits,
            test=subset(splits.test, np.arange(60)),
            test_unbiased=subset(splits.test_unbiased, np.arange(60)),
        )
    key = jax.random.PRNGKey(int(args.seed))
    results: dict[str, Any] = {
        "experiment": "privacy_biased_mnist",
        "command": "python experiments/privacy_biased_mnist.py " + " ".join(argv or sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "models": {},
    }
    for i, name in enumerate(args.models):
        config = copy.deepcopy(base)
        model_splits = splits
        if name == "overfit":
            config.weight_decay, config.epochs, config.batch_size = (
                0.0,
                int(args.overfit_epochs),
                64,
            )
            model_splits = dataclasses.replace(
                splits, train=subset(splits.train, np.arange(int(args.overfit_size)))
            )
        elif name != "vanilla":
            raise SystemExit(f"unknown model {name!r}; expected vanilla or overfit")
        t0 = time.perf_counter()
        trained = train_and_evaluate(config, splits=model_splits, progress=False)
        train_seconds = time.perf_counter() - t0
        r = trained.results
        row = {
            "config": config.to_dict(),
            "train_size": len(model_splits.train),
            "train_seconds": train_seconds,
            "acc_train": r["acc_train"],
            "acc_biased": r["acc_biased"],
            "acc_unbiased": r["acc_unbiased"],
        }
        row.update(
            attack_model(
                name,
                trained,
                model_splits.train,
                model_splits,
                key=jax.random.fold_in(key, 10 + i),
                members=int(args.members),
                reference_models=int(args.reference_models),
                reference_pool="all" if name == "vanilla" else "members",
                epochs=int(config.epochs),
                batch_size=int(config.batch_size),
                out=out,
                num_resamples=int(args.num_resamples),
                decoder_epochs=2 if args.quick else 60,
            )
        )
        results["models"][name] = row
        s = row["summary"]
        print(
            f"{name}: train acc {row['acc_train']:.3f}, biased test {row['acc_biased']:.3f}, "
            f"unbiased {row['acc_unbiased']:.3f}; suite {row['suite_seconds']:.1f}s"
        )
        for attack, m in s.items():
            print(
                f"  {attack:17s} AUC {m['auc']:.3f}  TPR@0.1% {m['tpr@0.1%fpr']:.3f}  "
                f"TPR@1% {m['tpr@1%fpr']:.3f}  bal.acc {m['balanced_accuracy']:.3f}"
            )
        p, rc = row["attribute_probe"], row["reconstruction"]
        print(
            f"  probe (colour) {p['accuracy']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}] vs "
            f"chance {p['chance']:.3f}; reconstruction mse {rc['mse']:.4f} (mean image "
            f"{rc['mse_mean_image']:.4f}), colour readable {rc['attribute_readability']:.3f}"
        )
    write_json(out / "results.json", results)
    print(f"wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
