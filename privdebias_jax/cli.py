"""The ``privdebias`` command line.

Subcommands (later capabilities add their own with :func:`build_parser`):

* ``privdebias train --dataset {colored-mnist,biased-mnist,adult} --out DIR`` trains a vanilla
  model and writes ``DIR/results.json`` and the saved model ``DIR/model``.
* ``privdebias unlearn [--dataset D] [--shards S --slices R] [--forget-file F | --forget-fraction p]
  [--capacity K] [--baselines retrain,newton,...] --out DIR``: SISA training, exact forgetting
  and baselines (see :mod:`privdebias_jax.unlearn.driver`).
* ``privdebias attack --from DIR --out DIR2``: every membership-inference attack on a saved
  model (see :mod:`privdebias_jax.privacy.driver`).
* ``privdebias run [--quick] [--out DIR]`` is the main job on the embedded data
  (see :mod:`privdebias_jax.run`).

Bad input (unknown dataset, ρ outside [0, 1], missing Adult files, ...) ends with a one-line
``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from privdebias_jax.types import PrivDebiasError

TRAIN_DATASETS = ("colored-mnist", "biased-mnist", "adult")


def _rho(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rho must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"rho must be in [0, 1], got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _lane_batch(text: str) -> str:
    from privdebias_jax.multi import parse_lane_batch

    try:
        parse_lane_batch(text)
    except PrivDebiasError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def add_training_options(p: argparse.ArgumentParser, dataset_required: bool = True) -> None:
    """Options shared by every command that trains a model (they override ``get_config``)."""
    p.add_argument(
        "--dataset",
        choices=TRAIN_DATASETS,
        help="dataset (required unless --config names one)"
        if dataset_required
        else "default biased-mnist",
    )
    p.add_argument(
        "--config",
        help="an experiment file (experiments/*.py) whose get_config() gives the defaults",
    )
    p.add_argument(
        "--preset",
        choices=("cpu", "paper"),
        default="cpu",
        help="cpu: small fast defaults; paper: the papers' model sizes (GPU/TPU)",
    )
    p.add_argument("--rho", type=_rho, help="P(colour = digit) for the MNIST variants, in [0, 1]")
    p.add_argument("--epochs", type=_positive_int, help="training epochs (≥ 1)")
    p.add_argument(
        "--model", help="model registry name (mlp, tabular_mlp, small_cnn, simple_conv, resnet)"
    )
    p.add_argument("--image-size", type=_positive_int, help="side of the MNIST images (28 native)")
    p.add_argument("--train-size", type=_positive_int, help="cap on the number of training images")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--data-dir", help="directory with adult.data and adult.test (Adult only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace):
    """``get_config(dataset, preset)`` with the command-line overrides applied."""
    from privdebias_jax.config import get_config, load_config_file

    if args.config:
        config = load_config_file(args.config)
        if args.dataset and args.dataset != config.dataset:
            config.dataset = args.dataset
    elif args.dataset or not getattr(args, "dataset_required", True):
        config = get_config(args.dataset or "biased-mnist", args.preset)
    else:
        raise PrivDebiasError("--dataset is required (or --config with an experiment file)")
    overrides = {
        "rho": args.rho,
        "epochs": args.epochs,
        "model": args.model,
        "image_size": args.image_size,
        "train_size": args.train_size,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "data_dir": args.data_dir,
    }
    for field, value in overrides.items():
        if value is not None:
            config[field] = value
    return config


def _cmd_train(args: argparse.Namespace) -> int:
    from privdebias_jax.debias.methods import check_method
    from privdebias_jax.pipeline import train_and_evaluate
    from privdebias_jax.report import write_json

    config = config_from_args(args)
    config.method = check_method(args.method)
    config.alpha, config.beta, config.preset = args.alpha, args.beta, args.preset
    out = Path(args.out)
    trained = train_and_evaluate(config, out, progress=not args.no_progress, resume=args.resume)
    path = write_json(out / "results.json", trained.results)
    keys = (
        "acc_biased",
        "acc_unbiased",
        "acc",
        "counterfactual_bias",
        "kl_bias",
        "dp_diff",
        "eo_diff",
        "train_seconds",
    )
    summary = {k: round(trained.results[k], 4) for k in keys if trained.results.get(k) is not None}
    print(json.dumps(summary))
    print(f"wrote {path}")
    return 0


def _cmd_debias(args: argparse.Namespace) -> int:
    import ml_collections

    from privdebias_jax.config import get_fmd_config
    from privdebias_jax.debias import get_debias_method
    from privdebias_jax.pipeline import TrainedModel, debias_and_evaluate, load_model, load_splits

    if args.method is not None:
        get_debias_method(args.method)  # an unknown name fails before any work
    trained = None
    if args.from_dir:
        src = Path(args.from_dir)
        if (src / "model.json").is_file() and not (src / "results.json").is_file():
            src = src.parent  # a saved model folder (train's or run's DIR/model)
        results_file = src / "results.json"
        if not results_file.is_file() or not (src / "model" / "model.json").is_file():
            raise PrivDebiasError(
                f"--from {Path(args.from_dir)}: expected a `privdebias train --out DIR` folder "
                "(DIR/results.json and DIR/model) or its model folder"
            )
        saved_results = json.loads(results_file.read_text())
        if "config" not in saved_results:
            raise PrivDebiasError(f"--from {src}: results.json holds no training config")
        saved = ml_collections.ConfigDict(saved_results["config"])
        config = get_fmd_config(saved.dataset, args.preset)
        for field in saved:
            if field != "fmd":
                config[field] = saved[field]
        model, state, spec = load_model(src / "model")
        trained = TrainedModel(model, state, spec, load_splits(config), {})
    elif args.config or args.dataset:
        base = config_from_args(args)
        config = get_fmd_config(base.dataset, args.preset)
        for field in base:
            config[field] = base[field]
    else:
        raise PrivDebiasError("--dataset, --config or --from is required")
    damping = args.damping
    if damping is not None and any(not (d > 0) for d in damping):
        raise PrivDebiasError(f"--damping must be > 0, got {damping}")
    overrides = {
        "method": args.method,
        "variant": args.variant,
        "k": args.k,
        "iterations": args.iterations,
        "proximal": args.proximal,
        "solver": args.solver,
        "select": args.select,
        "replacement": args.replacement,
        "external_size": args.external_size,
    }
    for field, value in overrides.items():
        if value is not None:
            config.fmd[field] = value
    if damping is not None:
        config.fmd.damping = float(damping[0])
        config.fmd.fmd_damping = tuple(float(d) for d in damping)
    out = Path(args.out)
    results = debias_and_evaluate(config, out, trained=trained, progress=not args.no_progress)
    for line in results.get("warnings", []):
        print(f"warning: {line}")
    summary = {
        "method": results["method"],
        "before": {k: round(v, 4) for k, v in results["before"].items()},
        "after": {k: round(v, 4) for k, v in results["after"].items()},
        "debias_seconds": round(results["debias_seconds"], 3),
        "num_params_updated": results["num_params_updated"],
        "external_size": results["external_size"],
    }
    print(json.dumps(summary))
    print(f"wrote {out / 'results.json'}")
    return 0


def _cmd_unlearn(args: argparse.Namespace) -> int:
    from privdebias_jax.unlearn.driver import get_unlearn_config, read_ids, unlearn_and_evaluate

    if not args.dataset and not args.config:
        args.dataset = "colored-mnist"
    base = config_from_args(args)
    config = get_unlearn_config(base.dataset, args.preset)
    for field in base:
        config[field] = base[field]
    overrides = {
        "shards": args.shards,
        "slices": args.slices,
        "program_width": args.program_width,
        "lane_batch": args.lane_batch,
        "forget_fraction": args.forget_fraction,
        "forget_seed": args.forget_seed,
        "capacity": args.capacity,
        "aggregate": args.aggregate,
        "baselines": args.baselines,
    }
    for field, value in overrides.items():
        if value is not None:
            config.unlearn[field] = value
    ids = read_ids(args.forget_file) if args.forget_file else None
    out = Path(args.out)
    results = unlearn_and_evaluate(config, out, forget_ids=ids, progress=not args.no_progress)
    summary = {
        "sisa_before": {k: round(v, 4) for k, v in results["sisa_before"].items()},
        "sisa_after": {k: round(v, 4) for k, v in results["sisa_after"].items()},
        "forgotten": results["forget"]["ids"],
        "forget_seconds": round(results["forget"]["seconds"], 3),
        "baseline_seconds": {k: round(v["seconds"], 3) for k, v in results["baselines"].items()},
    }
    print(json.dumps(summary))
    print(f"wrote {out / 'results.json'}")
    return 0


def _cmd_attack(args: argparse.Namespace) -> int:
    from privdebias_jax.privacy.attacks import ALL_ATTACKS
    from privdebias_jax.privacy.driver import attack_and_report

    attacks = (
        tuple(a.strip() for a in args.attacks.split(",") if a.strip())
        if args.attacks
        else ALL_ATTACKS
    )
    unknown = sorted(set(attacks) - set(ALL_ATTACKS))
    if unknown:
        raise PrivDebiasError(f"unknown attack(s) {unknown}; known: {', '.join(ALL_ATTACKS)}")
    results = attack_and_report(
        args.from_dir,
        args.out,
        attacks=attacks,
        members=args.members,
        reference_models=args.reference_models,
        reference_epochs=args.reference_epochs,
        seed=args.seed,
    )
    summary = {
        name: {
            k: round(rep[k]["value"], 4)
            for k in ("auc", "balanced_accuracy", "tpr@1%fpr")
            if k in rep
        }
        for name, rep in results["attacks"].items()
    }
    print(json.dumps(summary))
    print(f"wrote {Path(args.out) / 'results.json'} and roc.png")
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {value}")
    return value


def _cmd_run(args: argparse.Namespace) -> int:
    from privdebias_jax.run import run_main_job
    from privdebias_jax.sync import get_sync_options

    config = config_from_args(args)
    config.sync = get_sync_options(args.quick)
    for field in (
        "rounds", "shards", "slices", "forget_rate", "forget_strategy", "capacity", "delta", "added_epochs",
        "program_width",
    ):
        value = getattr(args, field)
        if value is not None:
            config.sync[field] = value
    if args.no_naive:
        config.sync.naive = False
    if args.no_fmd_pass:
        config.sync.fmd_pass = False
    if args.no_lira:
        config.sync.lira = False
    run_main_job(
        config, Path(args.out), quick=args.quick, progress=not args.no_progress, resume=args.resume
    )
    return 0


def _cmd_augment(args: argparse.Namespace) -> int:
    import dataclasses

    from privdebias_jax.augment import AugmentConfig
    from privdebias_jax.augment.driver import augment_and_evaluate, summary_line
    from privdebias_jax.report import write_json

    base = AugmentConfig.tiny() if args.quick else AugmentConfig.cpu_default(image_size=args.image_size)
    latent = args.latent
    if latent is None and args.denoiser in ("conv", "unet"):
        latent = "none"  # the image denoisers work in pixel space
    overrides = {
        "denoiser": args.denoiser,
        "latent": latent,
        "epochs": args.epochs,
        "sample_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "kl_scale": args.kl_scale,
        "guidance_space": args.guidance_space,
        "class_weight": args.class_weight,
    }
    config = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None}).validate()
    out = Path(args.out)
    results = augment_and_evaluate(
        args.dataset,
        out,
        quick=args.quick,
        seed=args.seed,
        config=config,
        rho=args.rho,
        image_size=config.image_size,
        target_fraction=args.target_fraction,
        max_new=args.max_new,
        eta=args.eta,
        checkpoint_dir=out / "checkpoints",
        progress=not args.no_progress,
    )
    print(summary_line(results))
    path = write_json(out / "results.json", results)
    print(f"wrote {path} and {results['grid_png']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``privdebias`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="privdebias",
        description="Fair and private models in JAX: measure bias and leakage, debias, unlearn, audit.",
    )
    parser.add_argument(
        "--cpu-devices",
        type=_positive_int,
        help="split the CPU into N JAX devices (one per core: shard and shadow-model lanes then "
        "train on all cores at once); default: JAX's (one)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train a model (vanilla or a debiasing method) and write DIR/results.json"
    )
    add_training_options(p)
    p.add_argument(
        "--method",
        default="vanilla",
        help="vanilla, end, learned_mixin, rubi or rebias (privdebias_jax.debias.methods)",
    )
    p.add_argument("--alpha", type=float, help="EnD's α (default 0.1) or ReBias's λ_f (default 1)")
    p.add_argument("--beta", type=float, help="EnD's β (default 0.1) or ReBias's λ_g (default 1)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from DIR/train_ckpt")
    p.set_defaults(func=_cmd_train, dataset_required=True)

    p = sub.add_parser(
        "debias",
        help="debias a trained model's last layer (proximal_finetune, fmd, head_retrain) and write DIR/results.json",
    )
    p.add_argument(
        "--method",
        help="proximal_finetune (default: Newton-CG on D_ex and its counterfactuals), fmd (the "
        "paper's single influence step) or head_retrain (the last layer retrained on "
        "counterfactual-replaced training data)",
    )
    add_training_options(p, dataset_required=False)
    p.add_argument(
        "--from",
        dest="from_dir",
        help="a `privdebias train --out` directory or a saved model folder (DIR/model) to debias "
        "(else train first)",
    )
    p.add_argument(
        "--variant",
        choices=("external", "train"),
        help="fmd: the step from the external set only, or from the training set ranked by influence",
    )
    p.add_argument(
        "--k", type=_non_negative_int, help="fmd --variant train / head_retrain: samples replaced (0 = all)"
    )
    p.add_argument(
        "--iterations", type=_positive_int, help="head_retrain / proximal_finetune: Newton steps (≥ 2)"
    )
    p.add_argument(
        "--damping", type=float, nargs="+",
        help="λ > 0 added to the Hessian (fmd: one or several values, chosen on D_ex by the guard)",
    )
    p.add_argument(
        "--proximal", type=float, help="proximal_finetune: μ > 0 (keeps the head near the model)"
    )
    p.add_argument(
        "--replacement", choices=("others", "all"),
        help="head_retrain: counterfactual attribute drawn among the other values or among all",
    )
    p.add_argument(
        "--solver", help="inverse-HVP solver: exact, linear_head, cg, pcg, lissa, arnoldi, kfac, ekfac"
    )
    p.add_argument(
        "--select", help="parameter subset to update (regex on paths; '^head/' = last layer)"
    )
    p.add_argument("--external-size", type=_positive_int, help="size of the external set D_ex")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_debias, dataset_required=False)

    p = sub.add_parser(
        "unlearn", help="SISA: train shards, forget ids exactly, compare with baselines"
    )
    add_training_options(p, dataset_required=False)
    p.add_argument("--shards", type=_positive_int, help="number of shards S (default 8)")
    p.add_argument("--slices", type=_positive_int, help="slices per shard R (default 4)")
    p.add_argument(
        "--program-width",
        type=_non_negative_int,
        help="shard lanes per vmapped program W (0 = S); a deletion retrains W lanes",
    )
    p.add_argument(
        "--lane-batch",
        type=_lane_batch,
        help="lanes a device computes together: auto (default; 1 on a CPU), all (one vmap) "
        "or a positive integer",
    )
    p.add_argument(
        "--forget-file", help="file of sample ids to forget (whitespace/comma separated)"
    )
    p.add_argument(
        "--forget-fraction", type=_fraction, help="else forget this random fraction (default 0.01)"
    )
    p.add_argument("--forget-seed", type=int, help="seed of the random forget set")
    p.add_argument(
        "--capacity", type=_non_negative_int, help="step-wise: deletions per step (0 = one step)"
    )
    p.add_argument("--aggregate", choices=("mean_softmax", "vote"), help="ensemble aggregation")
    p.add_argument(
        "--baselines", help="comma list of retrain,newton,finetune,gradient_ascent ('' = none)"
    )
    p.add_argument(
        "--out", default="results/unlearn", help="output directory (SISA checkpoints in DIR/sisa)"
    )
    p.set_defaults(func=_cmd_unlearn, dataset_required=False)

    p = sub.add_parser(
        "attack", help="membership-inference attacks on a saved model (privdebias train --out DIR)"
    )
    p.add_argument(
        "--from", dest="from_dir", required=True, help="a `privdebias train --out` directory"
    )
    p.add_argument(
        "--attacks",
        help="comma list (default all): loss, confidence, entropy, modified_entropy, "
        "m_loss, m_mean, m_moments, lira_online, lira_offline, shadow",
    )
    p.add_argument(
        "--members", type=_positive_int, default=500, help="members and non-members sampled (each)"
    )
    p.add_argument(
        "--reference-models",
        type=_positive_int,
        default=8,
        help="LiRA/shadow reference models (even)",
    )
    p.add_argument(
        "--reference-epochs",
        type=_positive_int,
        help="epochs of each reference model (default: the model's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_attack)

    p = sub.add_parser(
        "run", help="the main job on the embedded data: results.json, report.md, figures"
    )
    add_training_options(p, dataset_required=False)
    p.add_argument("--out", default="results/run", help="output directory (default results/run)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    p.add_argument("--resume", action="store_true", help="continue the run already in --out")
    p.add_argument("--rounds", type=int, help="sync-loop rounds (default 3)")
    p.add_argument("--shards", type=int, help="SISA shards S (default 4)")
    p.add_argument("--slices", type=int, help="SISA slices R per shard (default 2)")
    p.add_argument(
        "--program-width", type=_non_negative_int,
        help="SISA shard lanes per compiled program (default 0 = auto: 1 for a CNN on the CPU, else S)",
    )
    p.add_argument("--forget-rate", type=float, help="share of the originals to forget, in (0, 1) (default 0.1)")
    p.add_argument("--forget-strategy", choices=("exposed", "random"), help="which originals to forget")
    p.add_argument("--capacity", type=int, help="deletions per step (default: a round's share in one step)")
    p.add_argument("--delta", type=float, help="target KL/MI bias of the data, nats")
    p.add_argument(
        "--added-epochs", type=_non_negative_int,
        help="epochs of each SISA stage that synthetic samples append (default 0 = the last stage's)",
    )
    p.add_argument("--no-naive", action="store_true", help="skip the naive-combination baseline")
    p.add_argument(
        "--no-fmd-pass", action="store_true", help="skip the FMD pass on the loop's result (sync+FMD column)"
    )
    p.add_argument(
        "--no-lira", action="store_true",
        help="leave offline LiRA (the vanilla SISA shards as reference models) out of the membership attacks",
    )
    p.set_defaults(func=_cmd_run, dataset_required=False)

    p = sub.add_parser(
        "augment",
        help="bias-guided diffusion augmentation: bias before/after, sample quality, unbiased accuracy",
    )
    p.add_argument("--dataset", choices=("biased-mnist", "colored-mnist"), default="biased-mnist")
    p.add_argument("--rho", type=_rho, default=0.99, help="P(colour = digit), in [0, 1]")
    p.add_argument("--image-size", type=_positive_int, default=14, help="image side (default 14)")
    p.add_argument("--denoiser", choices=("factored", "mlp", "conv", "unet"),
                   help="denoiser (default factored: shape from the class, colour from the attribute)")
    p.add_argument("--latent", choices=("colour", "pca", "none"),
                   help="denoiser space (default colour: shape PCA + RGB colour; none for conv/unet)")
    p.add_argument("--epochs", type=_non_negative_int, help="denoiser training epochs")
    p.add_argument("--steps", type=_positive_int, help="DDIM sampling steps")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance weight w >= 0")
    p.add_argument("--kl-scale", type=float, help="KL-gradient guidance step s >= 0 (0 = off)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta >= 0 (0 = deterministic)")
    p.add_argument("--guidance-space", choices=("auto", "image", "latent", "routed"),
                   help="where the KL-guidance step is taken (default auto: routed for the colour latent, "
                        "i.e. the class term moves the shape and the attribute term the colour)")
    p.add_argument("--class-weight", type=float, help="weight of the class term in the guidance loss (>= 0)")
    p.add_argument(
        "--target-fraction",
        type=float,
        default=0.2,
        help="target mutual-information bias as a fraction of the current one (default 0.2)",
    )
    p.add_argument("--max-new", type=_non_negative_int, help="cap on the number of synthetic samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output directory (checkpoints in DIR/checkpoints)")
    p.set_defaults(func=_cmd_augment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``privdebias`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.cpu_devices is not None:
            from privdebias_jax.multi import use_cpu_devices

            use_cpu_devices(args.cpu_devices)
        return int(args.func(args) or 0)
    except PrivDebiasError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
