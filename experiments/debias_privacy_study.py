"""Seed paper 001's study on the embedded data: which debiasing methods also hide the private
colour (Barbano et al. 2021, Biased-MNIST; Figs. 4, 5, 6, 8).

For ρ ∈ {0.99, 0.995, 0.997, 0.999}, each seed and each method (vanilla, EnD, LearnedMixin, RUBi,
ReBias): train the CPU-default model (``small_cnn``, 14×14 images, 4,000 training digits, 12
epochs, Adam 1e-3, weight decay 1e-4, batch 256), measure biased / unbiased test accuracy and the
private class accuracy of a linear probe on the bottleneck (unbiased test set, 70/30 split,
Wilson interval; chance 0.1). Seeds are summarised by mean and Student-t interval. At one ρ
(``--figure-rho``, default 0.997) the first seed's vanilla and EnD models also get the Gaussian
fit of the first principal component per colour (Fig. 8) and the reconstruction attack (Fig. 6).

Command (from the repository root):

    python experiments/debias_privacy_study.py --out results/debias_privacy_study \
        [--rhos 0.99 0.995 0.997 0.999] [--methods vanilla end learned_mixin rubi rebias] \
        [--seeds 0 1 2] [--quick]

Writes ``DIR/results.json`` (every run, seed summaries, anchors beside ours, seconds),
``DIR/report.md`` and ``fig4_private_polar.png``, ``fig5_private_vs_target.png``,
``fig8_pc1_gaussians.png``, ``fig6_reconstruction_{vanilla,end}.png``.
Expected on 2 shared CPU cores: ~40 s per (ρ, seed, method), ~15 min per seed for the full grid.
EnD runs with α = β = 1 and batch-centred features (see ``privdebias_jax/debias/end.py``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

from privdebias_jax.config import get_config as base_config
from privdebias_jax.debias.methods import METHODS, check_method
from privdebias_jax.debias.study import (
    ANCHOR_PRIVATE,
    ANCHOR_UNBIASED,
    plot_component_fits,
    plot_private_accuracy_polar,
    plot_private_vs_target,
    principal_component_fits,
    seed_summary,
)
from privdebias_jax.pipeline import load_splits, train_and_evaluate
from privdebias_jax.privacy import attribute_probe, reconstruction_attack, save_reconstruction_grid
from privdebias_jax.report import markdown_table, write_json
from privdebias_jax.train import predict
from privdebias_jax.types import PrivDebiasError

RHOS = (0.99, 0.995, 0.997, 0.999)
#: EnD's weights in this study (measured on the embedded data; the paper's defaults are 0.1 / 0.1).
END_ALPHA, END_BETA = 1.0, 1.0


def get_config():
    """The study's training config: the CPU default for Biased-MNIST with EnD's study weights."""
    c = base_config("biased-mnist")
    c.method = "end"
    c.alpha, c.beta = END_ALPHA, END_BETA
    return c


def _train_config(rho: float, seed: int, method: str, args) -> object:
    c = base_config("biased-mnist")
    c.rho, c.seed, c.method = float(rho), int(seed), method
    if method == "end":
        c.alpha, c.beta = float(args.end_alpha), float(args.end_beta)
    for field in ("epochs", "train_size", "image_size", "model"):
        if getattr(args, field) is not None:
            c[field] = getattr(args, field)
    return c


def run_study(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [check_method(m) for m in args.methods]
    for r in args.rhos:
        if not 0.0 <= r <= 1.0:
            raise PrivDebiasError(f"rho must be in [0, 1], got {r}")
    fig_rho = args.figure_rho if args.figure_rho in args.rhos else args.rhos[len(args.rhos) // 2]
    rows, keep = [], {}
    t_all = time.perf_counter()
    for rho in args.rhos:
        for seed in args.seeds:
            base = _train_config(rho, seed, "vanilla", args)
            splits = load_splits(base)
            for method in methods:
                c = _train_config(rho, seed, method, args)
                t = time.perf_counter()
                trained = train_and_evaluate(c, splits=splits, progress=False)
                probe = attribute_probe(
                    trained.model, trained.state.params, trained.state.model_state, splits.test_unbiased,
                    splits.num_attributes, key=jax.random.fold_in(jax.random.key(int(seed)), 11),
                )
                r = trained.results
                row = {
                    "rho": rho, "seed": seed, "method": method,
                    "acc_biased": r["acc_biased"], "acc_unbiased": r["acc_unbiased"],
                    "acc_conflicting": r.get("acc_conflicting"),
                    "private_accuracy": probe["accuracy"], "private_ci_low": probe["ci_low"],
                    "private_ci_high": probe["ci_high"], "private_chance": probe["chance"],
                    "probe_n_test": probe["n_test"], "method_settings": r["method_settings"],
                    "train_seconds": r["train_seconds"], "seconds": time.perf_counter() - t,
                    "anchor_unbiased": ANCHOR_UNBIASED.get(method, {}).get(rho),
                    "anchor_private": ANCHOR_PRIVATE.get(method, {}).get(rho),
                }
                rows.append(row)
                print(f"rho={rho} seed={seed} {method:>13}: biased {row['acc_biased']:.3f} unbiased "
                      f"{row['acc_unbiased']:.3f} private {row['private_accuracy']:.3f} "
                      f"({row['seconds']:.1f}s)", flush=True)
                if rho == fig_rho and seed == args.seeds[0] and method in ("vanilla", "end"):
                    keep[method] = (trained, splits)
    sweep_seconds = time.perf_counter() - t_all
    summary = {}
    for rho in args.rhos:
        for method in methods:
            sel = [x for x in rows if x["rho"] == rho and x["method"] == method]
            summary[f"{method}@{rho}"] = {
                "method": method, "rho": rho,
                **{k: seed_summary([x[k] for x in sel]) for k in ("acc_unbiased", "acc_biased", "private_accuracy")},
                "anchor_unbiased": ANCHOR_UNBIASED.get(method, {}).get(rho),
                "anchor_private": ANCHOR_PRIVATE.get(method, {}).get(rho),
            }
    figures = {}
    polar = {m: {rho: summary[f"{m}@{rho}"]["private_accuracy"]["mean"] for rho in args.rhos} for m in methods}
    figures["fig4"] = plot_private_accuracy_polar(polar, out / "fig4_private_polar.png").name
    pts = {m: {rho: (summary[f"{m}@{rho}"]["private_accuracy"]["mean"], summary[f"{m}@{rho}"]["acc_unbiased"]["mean"])
               for rho in args.rhos} for m in methods}
    figures["fig5"] = plot_private_vs_target(pts, out / "fig5_private_vs_target.png").name
    pca, recon = {}, {}
    for method, (trained, splits) in keep.items():
        ds = splits.test_unbiased
        _, feats = predict(trained.model, trained.state.params, trained.state.model_state, ds)
        pca[method] = principal_component_fits(feats, ds.a)
        rec = reconstruction_attack(
            trained.model, trained.state.params, trained.state.model_state, ds,
            key=jax.random.key(13), epochs=args.recon_epochs, num_examples=8,
        )
        ex = rec.pop("examples")
        figures[f"fig6_{method}"] = save_reconstruction_grid(
            ex["originals"], ex["reconstructions"], out / f"fig6_reconstruction_{method}.png",
            title=f"{method}: decoder from the bottleneck (rho={fig_rho})",
        ).name
        recon[method] = rec
    if pca:
        figures["fig8"] = plot_component_fits(pca, out / "fig8_pc1_gaussians.png").name
    payload = {
        "experiment": "debias_privacy_study",
        "settings": {k: v for k, v in vars(args).items()},
        "figure_rho": fig_rho,
        "rows": rows,
        "summary": summary,
        "pc1_fits": {m: {k: v for k, v in p.items() if k != "projection"} for m, p in pca.items()},
        "reconstruction": recon,
        "sweep_seconds": sweep_seconds,
        "figures": figures,
        "devices": [str(d) for d in jax.devices()],
    }
    write_json(out / "results.json", payload)
    (out / "report.md").write_text(render_report(payload))
    print(f"wrote {out / 'results.json'} ({sweep_seconds:.0f} s for the sweep)")
    return payload


def _fmt_ci(s: dict) -> str:
    if s["ci_low"] is None:
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def render_report(payload: dict) -> str:
    """A Markdown table: ours (mean [95% t-interval] over seeds) beside the published anchors."""
    rows = []
    for s in payload["summary"].values():
        rows.append([
            s["method"], s["rho"], _fmt_ci(s["acc_unbiased"]), s["anchor_unbiased"], _fmt_ci(s["acc_biased"]),
            _fmt_ci(s["private_accuracy"]), s["anchor_private"],
        ])
    header = ["method", "ρ", "unbiased acc (ours)", "unbiased (paper)", "biased acc (ours)",
              "private class acc (ours)", "private (paper)"]
    return (f"# Debiasing as a privacy defence (seed 001) on the embedded Biased-MNIST\n\n"
            f"Sweep seconds: {payload['sweep_seconds']:.0f}. Chance for the private class: 0.1.\n\n"
            + markdown_table(rows, header) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/debias_privacy_study")
    p.add_argument("--rhos", type=float, nargs="+", default=list(RHOS))
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--figure-rho", type=float, default=0.997)
    p.add_argument("--end-alpha", type=float, default=END_ALPHA)
    p.add_argument("--end-beta", type=float, default=END_BETA)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--model", default=None, help="model registry name (default small_cnn)")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--recon-epochs", type=int, default=60)
    p.add_argument("--quick", action="store_true", help="tiny sizes (8×8, 300 digits, 1 epoch): a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train_size, args.image_size, args.recon_epochs = 1, 300, 8, 2
    return run_study(args)


if __name__ == "__main__":
    main()
