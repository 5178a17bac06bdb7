"""Seed paper 001's study (Barbano et al. 2021, "Bridging the gap between debiasing and privacy"):
which debiasing methods also hide the private attribute.

For every ρ, seed and method: train on Biased-MNIST (colour = private attribute = bias),
measure biased and unbiased test accuracy, and attack the bottleneck with the linear probe of
:func:`privdebias_jax.privacy.attribute_probe` on the unbiased test set ("private class
accuracy", chance 1/10). Helpers here summarise seeds (mean, t-interval), fit the Gaussian of
the first principal component per private group (the paper's Fig. 8) and draw Figs. 4, 5, 8.
The driver is ``experiments/debias_privacy_study.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from privdebias_jax.report import _pyplot, save_figure
from privdebias_jax.types import PrivDebiasError

#: Published anchors of seed paper 001 (Biased-MNIST, 60,000 images, Bahng et al.'s 7×7 net).
#: Unbiased accuracy (fractions) per method and ρ.
ANCHOR_UNBIASED = {
    "vanilla": {0.999: 0.104, 0.997: 0.334, 0.995: 0.721, 0.99: 0.891},
    "rubi": {0.999: 0.137, 0.997: 0.430, 0.995: 0.904, 0.99: 0.936},
    "rebias": {0.999: 0.227, 0.997: 0.642, 0.995: 0.760, 0.99: 0.881},
    "end": {0.999: 0.523, 0.997: 0.837, 0.995: 0.939, 0.99: 0.960},
}
#: Private class accuracy of the linear probe on colour (fractions; chance 0.1).
ANCHOR_PRIVATE = {
    "vanilla": {0.99: 0.237, 0.995: 0.445, 0.997: 0.889, 0.999: 0.996},
    "end": {0.99: 0.146, 0.995: 0.135, 0.997: 0.187, 0.999: 0.139},
}


def seed_summary(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, sample standard deviation and the Student-t interval of the mean over seeds.

    ``mean ± t_{(1+level)/2, n−1} · s / √n``; with one value the interval is ``None``.

    Raises:
      PrivDebiasError: for no values, non-finite values or ``level`` outside (0, 1).
    """
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        raise PrivDebiasError("seed_summary: no values")
    if not np.all(np.isfinite(v)):
        raise PrivDebiasError("seed_summary: values hold NaN or inf")
    if not 0.0 < float(level) < 1.0:
        raise PrivDebiasError(f"level must be in (0, 1), got {level}")
    mean = float(v.mean())
    out: dict[str, Any] = {"mean": mean, "n": int(v.size), "std": None, "ci_low": None, "ci_high": None}
    if v.size > 1:
        from scipy import stats

        s = float(v.std(ddof=1))
        half = float(stats.t.ppf(0.5 + level / 2.0, v.size - 1)) * s / np.sqrt(v.size)
        out.update(std=s, ci_low=mean - half, ci_high=mean + half)
    return out


def principal_component_fits(features: Any, groups: Any) -> dict[str, Any]:
    """Project features on their first principal component and fit a Gaussian per group (Fig. 8).

    ``u`` is the top right-singular vector of the centred features ``H − mean(H)`` (sign fixed so
    the largest-magnitude entry is positive); the projection ``z_i = (h_i − mean) · u`` is
    divided by its standard deviation over all samples. For each group ``g`` the fit is the
    maximum-likelihood ``N(μ_g, σ_g²)`` of ``{z_i : group_i = g}``. ``separation`` is the
    between-group variance of the ``μ_g`` over the mean within-group variance (0 = the groups
    overlap on the component).

    Raises:
      PrivDebiasError: for features that are not 2-D / finite, or groups of the wrong length.
    """
    h = np.asarray(features, np.float64)
    if h.ndim != 2 or not np.all(np.isfinite(h)):
        raise PrivDebiasError(f"features must be a finite 2-D array, got shape {h.shape}")
    g = np.asarray(groups)
    if g.shape != (h.shape[0],):
        raise PrivDebiasError(f"groups must have shape ({h.shape[0]},), got {g.shape}")
    centred = h - h.mean(axis=0)
    _, svals, vt = np.linalg.svd(centred, full_matrices=False)
    u = vt[0]
    u = u * np.sign(u[np.argmax(np.abs(u))] or 1.0)
    z = centred @ u
    scale = z.std()
    z = z / scale if scale > 0 else z
    fits = {}
    for value in np.unique(g):
        zg = z[g == value]
        fits[int(value)] = {"mean": float(zg.mean()), "std": float(zg.std()), "n": int(zg.size)}
    means = np.array([f["mean"] for f in fits.values()])
    within = np.mean([f["std"] ** 2 for f in fits.values()])
    total_var = float(np.sum(svals**2))
    return {
        "fits": fits,
        "explained_variance": float(svals[0] ** 2 / total_var) if total_var > 0 else 0.0,
        "separation": float(means.var() / within) if within > 0 else float("inf"),
        "projection": z,
    }


def plot_private_accuracy_polar(
    summary: dict[str, dict[float, float]], path: str | os.PathLike, chance: float = 0.1, title: str | None = None
) -> Path:
    """Fig. 4: private class accuracy per ρ (angle) per method (one closed curve each).

    ``summary[method][rho] = accuracy``; closer to the centre = less leakage.
    """
    plt = _pyplot()
    rhos = sorted({r for per in summary.values() for r in per})
    angles = np.linspace(0, 2 * np.pi, len(rhos), endpoint=False)
    fig = plt.figure(figsize=(5.2, 5.2))
    ax = fig.add_subplot(111, projection="polar")
    for method, per in summary.items():
        vals = [per.get(r, np.nan) for r in rhos]
        ax.plot(np.append(angles, angles[0]), np.append(vals, vals[0]), marker="o", label=method)
    ax.plot(np.linspace(0, 2 * np.pi, 100), np.full(100, chance), "k:", lw=1, label="chance")
    ax.set_xticks(angles)
    ax.set_xticklabels([f"ρ={r}" for r in rhos])
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=8)
    ax.set_title(title or "private class accuracy (linear probe on colour)", fontsize=9)
    return save_figure(fig, path)


def plot_private_vs_target(
    points: dict[str, dict[float, tuple[float, float]]], path: str | os.PathLike, chance: float = 0.1
) -> Path:
    """Fig. 5: private class accuracy (x) vs unbiased target accuracy (y); larger marker = larger ρ.

    ``points[method][rho] = (private_accuracy, target_accuracy)``. Top-left is best.
    """
    plt = _pyplot()
    rhos = sorted({r for per in points.values() for r in per})
    sizes = {r: 20 + 40 * i for i, r in enumerate(rhos)}
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for method, per in points.items():
        rs = sorted(per)
        xs = [per[r][0] for r in rs]
        ys = [per[r][1] for r in rs]
        ax.scatter(xs, ys, s=[sizes[r] for r in rs], label=method, alpha=0.75)
    ax.axvline(chance, color="k", ls=":", lw=1)
    ax.set_xlabel("private class accuracy (lower = more private)")
    ax.set_ylabel("unbiased target accuracy")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("private vs target accuracy (marker size grows with ρ)", fontsize=9)
    return save_figure(fig, path)


def plot_component_fits(panels: dict[str, dict[str, Any]], path: str | os.PathLike) -> Path:
    """Fig. 8: the Gaussian fit of the first principal component per private group, one panel
    per model (``panels[name] = principal_component_fits(...)``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False)
    grid = np.linspace(-4, 4, 400)
    for ax, (name, res) in zip(axes[0], panels.items(), strict=False):
        for value, f in res["fits"].items():
            s = max(f["std"], 1e-3)
            pdf = np.exp(-0.5 * ((grid - f["mean"]) / s) ** 2) / (s * np.sqrt(2 * np.pi))
            ax.plot(grid, pdf, lw=1.2, label=f"a={value}: N({f['mean']:.2f}, {f['std']:.2f})")
        ax.set_title(f"{name}: PC1 per private group (separation {res['separation']:.2f})", fontsize=9)
        ax.set_xlabel("first principal component (standardised)")
        ax.legend(fontsize=6)
    return save_figure(fig, path)


__all__ = [
    "ANCHOR_UNBIASED",
    "ANCHOR_PRIVATE",
    "seed_summary",
    "principal_component_fits",
    "plot_private_accuracy_polar",
    "plot_private_vs_target",
    "plot_component_fits",
]
