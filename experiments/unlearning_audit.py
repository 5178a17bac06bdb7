"""Unlearning audit: attack the forget set before and after SISA forgetting, next to retraining.

Seed 000 forgets 10% of the training data and asks that membership inference on it fall to
chance. On the embedded Biased-MNIST (``--train-size`` images, 14×14, ρ = 0.99) this trains

* ``single_before``: one model on all of ``D`` (no weight decay, ``--epochs`` epochs, so it
  leaks membership);
* ``retrained``: the same recipe from scratch on ``D \\ F``
  (:func:`privdebias_jax.unlearn.baselines.retrain`), the gold standard of forgetting;
* ``sisa_before`` / ``sisa_after``: a SISA ensemble (``--shards`` × ``--slices``, Bourtoule et
  al. 2021; :func:`privdebias_jax.unlearn.train_shards`, ``⌈2E/(R+1)⌉`` epochs per stage) before
  and after :meth:`~privdebias_jax.unlearn.SISAModel.forget` of ``F``, attacked through the
  shared ``(module, params, model_state)`` interface of its shard ensemble (mean of the shards'
  softmax outputs);

with ``F`` a random ``--forget-fraction`` (10%) of ``D``. Each model is attacked by
:func:`privdebias_jax.privacy.attacks.unlearning_audit`: ``F`` as "members" against as many
biased-test images (non-members), LOSS, entropy, modified entropy, M-Loss, M-Mean, M-Moments;
AUC, TPR at low FPR and balanced accuracy with bootstrap CIs. Before forgetting the AUC is above
0.5; after exact forgetting (and for the retrained model) it should hold 0.5 inside its CI.

    python experiments/unlearning_audit.py --out results/unlearning_audit
    python experiments/unlearning_audit.py --quick --out /tmp/audit_quick   # smoke test
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from privdebias_jax.config import get_config  # noqa: E402
from privdebias_jax.data import subset  # noqa: E402
from privdebias_jax.pipeline import load_splits, spec_from_config  # noqa: E402
from privdebias_jax.privacy.attacks import unlearning_audit  # noqa: E402
from privdebias_jax.report import write_json  # noqa: E402
from privdebias_jax.train import create_train_state, fit  # noqa: E402
from privdebias_jax.unlearn import baselines as bl  # noqa: E402
from privdebias_jax.unlearn import make_plan, sisa_epochs, train_shards  # noqa: E402

AUDIT_ATTACKS = ("loss", "entropy", "modified_entropy", "m_loss", "m_mean", "m_moments")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/unlearning_audit"))
    p.add_argument("--model", default="mlp", help="mlp (default, fast on CPU) or small_cnn")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--slices", type=int, default=2)
    p.add_argument("--forget-fraction", type=float, default=0.1)
    p.add_argument("--num-resamples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attacks", nargs="+", default=list(AUDIT_ATTACKS))
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.epochs, args.shards, args.slices = 80, 2, 2, 2
        args.forget_fraction, args.num_resamples = 0.25, 20
        args.attacks = ["loss", "m_mean"]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = get_config("biased-mnist")
    config.model, config.train_size, config.epochs = args.model, args.train_size, args.epochs
    config.batch_size, config.weight_decay, config.seed = args.batch_size, 0.0, args.seed
    if args.quick:
        config.image_size = 8
    splits = load_splits(config)
    model, tx = spec_from_config(config, splits).build()
    key = jax.random.PRNGKey(int(args.seed))
    train = splits.train
    n_forget = max(2, int(round(float(args.forget_fraction) * len(train))))
    rng = np.random.default_rng(int(args.seed))
    forget_ids = np.sort(rng.choice(np.asarray(train.idx, np.int64), n_forget, replace=False))
    forget_set = subset(train, np.flatnonzero(np.isin(np.asarray(train.idx), forget_ids)))
    nonmembers = subset(splits.test, np.arange(min(n_forget, len(splits.test))))
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    state = create_train_state(model, tx, jax.random.fold_in(key, 0), splits.input_shape)
    single = fit(
        model,
        tx,
        state,
        train,
        epochs=int(args.epochs),
        batch_size=int(args.batch_size),
        key=jax.random.fold_in(key, 1),
        progress=False,
    ).state
    timings["single_train"] = time.perf_counter() - t0
    retrained = bl.retrain(
        model,
        tx,
        train,
        forget_ids,
        key=key,
        epochs=int(args.epochs),
        batch_size=int(args.batch_size),
    )
    timings["retrain"] = retrained.seconds
    plan = make_plan(train.idx, int(args.shards), int(args.slices), key=jax.random.fold_in(key, 2))
    epochs = sisa_epochs(int(args.epochs), int(args.slices))
    with tempfile.TemporaryDirectory() as tmp:
        sisa, cost = train_shards(
            model,
            tx,
            train,
            plan,
            Path(tmp) / "sisa",
            key=jax.random.fold_in(key, 3),
            epochs_per_slice=epochs,
            batch_size=int(args.batch_size),
        )
        timings["sisa_train"] = cost.seconds
        before = sisa.ensemble()
        report = sisa.forget(forget_ids)
        timings["sisa_forget"] = report.cost.seconds
        after = sisa.ensemble()
    models = {
        "single_before": (model, single.params, single.model_state),
        "retrained": (model, retrained.state.params, retrained.state.model_state),
        "sisa_before": before,
        "sisa_after": after,
    }
    t0 = time.perf_counter()
    audit = unlearning_audit(
        models,
        forget_set,
        nonmembers,
        key=jax.random.fold_in(key, 4),
        attacks=tuple(args.attacks),
        num_resamples=int(args.num_resamples),
    )
    timings["audit"] = time.perf_counter() - t0
    summary = {
        name: {
            attack: {
                "auc": rep["auc"]["value"],
                "auc_ci": [rep["auc"]["ci_low"], rep["auc"]["ci_high"]],
                "balanced_accuracy": rep["balanced_accuracy"]["value"],
                "chance_in_auc_ci": bool(rep["auc"]["ci_low"] <= 0.5 <= rep["auc"]["ci_high"]),
            }
            for attack, rep in attacks.items()
        }
        for name, attacks in audit.items()
    }
    results = {
        "experiment": "unlearning_audit",
        "command": "python experiments/unlearning_audit.py " + " ".join(argv or sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "dataset": "biased-mnist",
        "image_size": int(config.image_size),
        "forget_size": int(n_forget),
        "nonmember_size": len(nonmembers),
        "sisa": {
            "shards": int(args.shards),
            "slices": int(args.slices),
            "epochs_per_slice": list(epochs),
            "retrained_shards": sorted(int(s) for s in report.cost.shards),
        },
        "seconds": timings,
        "summary": summary,
        "audit": audit,
    }
    write_json(out / "results.json", results)
    for name, attacks in summary.items():
        print(
            f"{name:14s} "
            + "  ".join(
                f"{a} {m['auc']:.3f} [{m['auc_ci'][0]:.2f},{m['auc_ci'][1]:.2f}]"
                for a, m in attacks.items()
            )
        )
    print(f"wrote {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
