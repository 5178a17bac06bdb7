"""Membership-inference metrics: ROC, AUC, TPR at low FPR, balanced accuracy, bootstrap CIs.

Conventions (Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P
2022):

* an attack gives every sample a real **score**, higher = "more likely a training member";
* ``labels`` are 1 for members and 0 for non-members (``P`` members, ``N`` non-members);
* a threshold rule predicts "member" when ``score ≥ t``; sweeping ``t`` over the distinct
  scores gives the ROC step function ``(FPR(t), TPR(t)) = (FP(t)/N, TP(t)/P)``.

Carlini et al. argue that an attack should be judged by its TPR at a *low* FPR (0.1%, 1%) on a
log-log ROC, not by AUC or accuracy alone; AUC and the balanced accuracy of a threshold
attack (Yu et al., "How Does Data Augmentation Affect Privacy in Machine Learning?", AAAI
2021, who pick the threshold on a calibration split) are reported beside it. Every number
comes with a stratified bootstrap percentile interval (members and non-members resampled
separately, so each resample keeps ``P`` and ``N``).

Inputs are either ``(scores, labels)`` or two score arrays, turned into the former by
:func:`scores_and_labels`. Bad input (empty member or non-member set, NaN / inf scores,
lengths that disagree, labels outside ``{0, 1}``, an FPR target outside ``(0, 1)``) raises
:class:`~privdebias_jax.types.PrivDebiasError`. Everything is NumPy float64 on the host; the
only randomness is the bootstrap's, drawn from an explicit key or seed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from statistics import NormalDist
from typing import Any

import jax
import numpy as np

from privdebias_jax.types import PrivDebiasError, PRNGKey

#: ``metric_fn(scores, labels) -> float``: what :func:`bootstrap_ci` resamples.
MetricFn = Callable[[np.ndarray, np.ndarray], float]

#: The low false-positive rates :func:`attack_report` reads the ROC at (0.1% and 1%).
REPORT_FPRS: tuple[tuple[str, float], ...] = (("tpr@0.1%fpr", 1e-3), ("tpr@1%fpr", 1e-2))


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _as_scores(scores: Any, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 1:
        raise PrivDebiasError(f"`{name}` must be a 1-D array, got shape {s.shape}")
    if s.dtype == bool or not (
        np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)
    ):
        raise PrivDebiasError(f"`{name}` must hold real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        raise PrivDebiasError(f"`{name}` holds {int(bad.sum())} NaN or inf value(s) of {s.size}")
    return s


def check_scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(scores, labels)`` and return them as float64 scores and int64 0/1 labels.

    Raises:
      PrivDebiasError: if either is not 1-D, the lengths differ, a score is NaN / inf, a
        label is not 0 or 1, or there are no members (label 1) or no non-members (label 0).
    """
    s = _as_scores(scores)
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise PrivDebiasError(f"`labels` must be a 1-D array, got shape {lab.shape}")
    if lab.shape[0] != s.shape[0]:
        raise PrivDebiasError(
            f"`scores` and `labels` lengths differ: {s.shape[0]} vs {lab.shape[0]}"
        )
    if lab.size and not (np.issubdtype(lab.dtype, np.number) or lab.dtype == bool):
        raise PrivDebiasError(f"`labels` must be 0/1 numbers, got dtype {lab.dtype}")
    ok = (lab == 0) | (lab == 1)
    if not np.all(ok):
        raise PrivDebiasError(
            f"`labels` must be 1 (member) or 0 (non-member); found {np.unique(lab[~ok])[:5].tolist()}"
        )
    lab = lab.astype(np.int64)
    p, n = int(lab.sum()), int(lab.size - lab.sum())
    if p == 0 or n == 0:
        raise PrivDebiasError(
            f"membership metrics need members and non-members; got {p} member(s) and {n} non-member(s)"
        )
    return s, lab


def scores_and_labels(member_scores: Any, nonmember_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``member_scores`` and ``nonmember_scores`` into ``(scores, labels)``.

    ``labels = [1] * len(member_scores) + [0] * len(nonmember_scores)``.

    Raises:
      PrivDebiasError: if either set is empty, not 1-D, or holds NaN / inf.
    """
    m = _as_scores(member_scores, "member_scores")
    nm = _as_scores(nonmember_scores, "nonmember_scores")
    if m.size == 0 or nm.size == 0:
        raise PrivDebiasError(
            f"membership metrics need members and non-members; got {m.size} member and {nm.size} non-member score(s)"
        )
    labels = np.concatenate([np.ones(m.size, np.int64), np.zeros(nm.size, np.int64)])
    return np.concatenate([m, nm]), labels


def _check_fpr_target(fpr_target: float) -> float:
    t = float(fpr_target)
    if not 0.0 < t < 1.0:  # also rejects NaN
        raise PrivDebiasError(f"fpr_target must be in (0, 1), got {fpr_target}")
    return t


def _check_level(level: float) -> float:
    lv = float(level)
    if not 0.0 < lv < 1.0:
        raise PrivDebiasError(f"confidence level must be in (0, 1), got {level}")
    return lv


# ------------------------------------------------------------------------------------------
# the ROC step function (unchecked core shared by every metric and the bootstrap)
# ------------------------------------------------------------------------------------------


def _roc_counts(s: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fps, tps, thresholds)`` at ``t = +inf`` and every distinct score, descending."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    l_sorted = lab[order]
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(l_sorted)[ends]
    fps = ends + 1 - tps
    return np.r_[0, fps], np.r_[0, tps], np.r_[np.inf, s_sorted[ends]]


def _auc(fps: np.ndarray, tps: np.ndarray) -> float:
    # trapezoids of the step function = Mann-Whitney U / (P N), ties counted 1/2
    return float(np.sum(np.diff(fps) * (tps[1:] + tps[:-1])) / (2.0 * fps[-1] * tps[-1]))


def _tpr_at(fps: np.ndarray, tps: np.ndarray, target: float) -> float:
    n, p = fps[-1], tps[-1]
    k = np.searchsorted(fps, target * n * (1.0 + 1e-12), side="right") - 1  # fps is non-decreasing
    return float(tps[k] / p)


def _best_index(fps: np.ndarray, tps: np.ndarray) -> int:
    # balanced accuracy 0.5 (TPR + 1 − FPR) is maximal where TPR − FPR is; finite thresholds only
    gain = tps[1:] / tps[-1] - fps[1:] / fps[-1]
    return int(np.argmax(gain)) + 1


def _balanced_accuracy(s: np.ndarray, lab: np.ndarray, threshold: float) -> float:
    pred = s >= threshold
    pos = lab == 1
    return 0.5 * (float(np.mean(pred[pos])) + float(np.mean(~pred[~pos])))


def _threshold_at(thresholds: np.ndarray, k: int) -> float:
    """A threshold that makes the same decisions as ``thresholds[k]`` on the data it came from,
    placed halfway to the next lower distinct score (so it generalises symmetrically)."""
    t = float(thresholds[k])
    if k + 1 < thresholds.size:
        mid = 0.5 * (t + float(thresholds[k + 1]))
        if float(thresholds[k + 1]) < mid <= t:
            return mid
    return t


# ------------------------------------------------------------------------------------------
# public metrics
# ------------------------------------------------------------------------------------------


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full ROC step function of the rule "member iff ``score ≥ t``".

    For the distinct scores ``t_1 > t_2 > … > t_m`` and ``t_0 = +inf``::

        FPR_k = #{i : y_i = 0, s_i ≥ t_k} / N,   TPR_k = #{i : y_i = 1, s_i ≥ t_k} / P.

    The same values as ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``
    (sklearn's default drops collinear points; its points are a subset of these). Carlini et
    al. (2022) plot this curve on log-log axes (:func:`plot_roc`).

    Returns:
      ``(fpr, tpr, thresholds)``: float64 arrays of length ``m + 1``, ``fpr`` and ``tpr``
      non-decreasing from 0 to 1, ``thresholds`` decreasing from ``+inf``.

    Raises:
      PrivDebiasError: see :func:`check_scores_labels`.
    """
    s, lab = check_scores_labels(scores, labels)
    fps, tps, thr = _roc_counts(s, lab)
    return fps / fps[-1], tps / tps[-1], thr


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve: ``P(s_member > s_nonmember) + ½ P(s_member = s_nonmember)``.

    The trapezoidal area of :func:`roc_curve` (equal to the Mann-Whitney ``U / (P N)``, ties
    counted one half); agrees with ``sklearn.metrics.roc_auc_score``. 0.5 is chance (Carlini et
    al. 2022 report it beside the TPR at low FPR).

    Raises:
      PrivDebiasError: see :func:`check_scores_labels`.
    """
    s, lab = check_scores_labels(scores, labels)
    fps, tps, _ = _roc_counts(s, lab)
    return _auc(fps, tps)


def tpr_at_fpr(scores: Any, labels: Any, fpr_target: float) -> float:
    """The largest TPR of a threshold rule whose FPR is at most ``fpr_target``.

    ``max {TPR_k : FPR_k ≤ fpr_target}`` over the vertices of the ROC step function
    (:func:`roc_curve`), read exactly, without interpolation: Carlini et al. (2022)'s "TPR at
    0.1% / 1% FPR". With ``N`` non-members only FPRs that are multiples of ``1/N`` exist, so a
    target below ``1/N`` allows no false positive at all.

    Raises:
      PrivDebiasError: if ``fpr_target`` is not in ``(0, 1)``; see :func:`check_scores_labels`.
    """
    target = _check_fpr_target(fpr_target)
    s, lab = check_scores_labels(scores, labels)
    fps, tps, _ = _roc_counts(s, lab)
    return _tpr_at(fps, tps, target)


def balanced_accuracy(scores: Any, labels: Any, threshold: float) -> float:
    """Balanced accuracy of the rule "member iff ``score ≥ threshold``": ``½ (TPR + TNR)``.

    ``TPR = #{members with s ≥ t} / P``, ``TNR = #{non-members with s < t} / N``; 0.5 is chance
    for any threshold. Equals ``sklearn.metrics.balanced_accuracy_score(labels, scores ≥ t)``
    (Yu et al., AAAI 2021, report the balanced accuracy of threshold attacks).

    Raises:
      PrivDebiasError: for a NaN threshold; see :func:`check_scores_labels`.
    """
    t = float(threshold)
    if math.isnan(t):
        raise PrivDebiasError("threshold is NaN")
    s, lab = check_scores_labels(scores, labels)
    return _balanced_accuracy(s, lab, t)


def best_threshold(scores: Any, labels: Any) -> float:
    """The threshold that maximises :func:`balanced_accuracy` on ``(scores, labels)``.

    ``argmax_k ½ (TPR_k + 1 − FPR_k)`` over the finite vertices of :func:`roc_curve` (the
    first, i.e. highest, threshold on ties), returned as the midpoint between the chosen score
    and the next lower distinct score, which classifies ``(scores, labels)`` identically. Meant
    for a *calibration* split (Yu et al., AAAI 2021): choosing the threshold on the evaluation
    data itself overstates the attack.

    Raises:
      PrivDebiasError: see :func:`check_scores_labels`.
    """
    s, lab = check_scores_labels(scores, labels)
    fps, tps, thr = _roc_counts(s, lab)
    return _threshold_at(thr, _best_index(fps, tps))


def threshold_attack_accuracy(
    cal_scores: Any, cal_labels: Any, test_scores: Any, test_labels: Any
) -> float:
    """Balanced accuracy on a test split of the threshold chosen on a calibration split.

    ``BA_test(t*)`` with ``t* = best_threshold(cal_scores, cal_labels)`` (the calibrated
    threshold attack of Yu et al., AAAI 2021).

    Raises:
      PrivDebiasError: for bad calibration or test input (see :func:`check_scores_labels`).
    """
    t = best_threshold(cal_scores, cal_labels)
    return balanced_accuracy(test_scores, test_labels, t)


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``p̂ = k / n``.

    ``(p̂ + z²/2n ± z √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n)`` with ``z = Φ⁻¹((1 + level)/2)``
    (Wilson 1927); unlike the normal interval it stays inside ``[0, 1]`` and is not empty at
    ``p̂ ∈ {0, 1}``.

    Raises:
      PrivDebiasError: if ``trials < 1``, ``successes`` is outside ``[0, trials]`` or ``level``
        is not in ``(0, 1)``.
    """
    lv = _check_level(level)
    k, n = int(successes), int(trials)
    if n < 1:
        raise PrivDebiasError(f"the Wilson interval needs at least one trial, got {trials}")
    if not 0 <= k <= n:
        raise PrivDebiasError(f"successes must be in [0, {n}], got {successes}")
    z = NormalDist().inv_cdf(0.5 + lv / 2.0)
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


# ------------------------------------------------------------------------------------------
# bootstrap
# ------------------------------------------------------------------------------------------


def _numpy_rng(key_or_seed: PRNGKey | int) -> np.random.Generator:
    """A NumPy generator seeded by an integer seed or by the bits of a JAX key.

    (NumPy rather than ``jax.random`` here: resample shapes change with every slice, and each
    new shape would cost a fresh XLA compilation.)
    """
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
        if int(key_or_seed) < 0:
            raise PrivDebiasError(f"a seed must be non-negative, got {key_or_seed}")
        return np.random.default_rng(int(key_or_seed))
    if isinstance(key_or_seed, jax.Array):
        if jax.dtypes.issubdtype(key_or_seed.dtype, jax.dtypes.prng_key):
            bits = np.asarray(jax.random.key_data(key_or_seed))
        else:
            bits = np.asarray(key_or_seed)
        if bits.dtype != np.uint32:
            raise PrivDebiasError(f"expected a JAX random key, got an array of dtype {bits.dtype}")
        return np.random.default_rng(bits.ravel().tolist())
    raise PrivDebiasError(
        f"expected a JAX random key or an integer seed, got {type(key_or_seed).__name__}"
    )


def _resample_rows(lab: np.ndarray, key_or_seed: PRNGKey | int, num_resamples: int) -> np.ndarray:
    """``(R, P + N)`` row indices: each row draws ``P`` members and ``N`` non-members with
    replacement (members first)."""
    if int(num_resamples) < 2:
        raise PrivDebiasError(f"num_resamples must be at least 2, got {num_resamples}")
    rng = _numpy_rng(key_or_seed)
    pos, neg = np.flatnonzero(lab == 1), np.flatnonzero(lab == 0)
    r = int(num_resamples)
    ip = rng.integers(0, pos.size, (r, pos.size))
    i_n = rng.integers(0, neg.size, (r, neg.size))
    return np.concatenate([pos[ip], neg[i_n]], axis=1)


def _percentile(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(np.asarray(values, np.float64), [0.5 - level / 2.0, 0.5 + level / 2.0])
    return float(lo), float(hi)


def bootstrap_ci(
    metric_fn: MetricFn,
    scores: Any,
    labels: Any,
    key_or_seed: PRNGKey | int,
    num_resamples: int = 1000,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Point estimate and stratified bootstrap percentile interval of ``metric_fn``.

    Each of the ``R = num_resamples`` resamples draws ``P`` members from the members and ``N``
    non-members from the non-members, with replacement (stratified, so both classes stay
    present and the class balance is fixed); the interval is the ``(1 − level)/2`` and
    ``(1 + level)/2`` empirical quantiles of ``metric_fn`` over the resamples (Efron &
    Tibshirani 1993, percentile method). Indices come from a NumPy generator seeded with the
    integer seed or the bits of the JAX key, so the result is reproducible.

    Returns:
      ``(point, low, high)`` with ``point = metric_fn(scores, labels)``. The percentile
      interval need not contain ``point`` for a skewed metric (e.g. TPR at very low FPR).

    Raises:
      PrivDebiasError: for ``num_resamples < 2``, ``level`` outside ``(0, 1)``, a bad key, or
        bad scores/labels (see :func:`check_scores_labels`).
    """
    lv = _check_level(level)
    s, lab = check_scores_labels(scores, labels)
    rows = _resample_rows(lab, key_or_seed, num_resamples)
    point = float(metric_fn(s, lab))
    values = np.array([float(metric_fn(s[r], lab[r])) for r in rows])
    lo, hi = _percentile(values, lv)
    return point, lo, hi


# ------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------


def _interval(point: float, values: np.ndarray, level: float) -> dict[str, float]:
    lo, hi = _percentile(values, level)
    return {"value": float(point), "ci_low": lo, "ci_high": hi}


def attack_report(
    scores: Any,
    labels: Any,
    *,
    seed: PRNGKey | int,
    calibration: tuple[Any, Any] | None = None,
    num_resamples: int = 1000,
    level: float = 0.95,
) -> dict[str, Any]:
    """Every membership-inference metric of one attack, each with a bootstrap interval.

    * ``auc``: :func:`roc_auc`;
    * ``tpr@0.1%fpr``, ``tpr@1%fpr``: :func:`tpr_at_fpr` (Carlini et al. 2022);
    * ``balanced_accuracy``: ``½ (TPR + TNR)`` of a threshold rule (Yu et al., AAAI 2021). With
      ``calibration = (cal_scores, cal_labels)`` the threshold is :func:`best_threshold` on the
      calibration split, fixed, and evaluated here (``threshold_source = "calibration"``).
      Without it, the threshold is the best one on these very scores
      (``threshold_source = "best_on_eval"``, an optimistic number), re-optimised inside each
      bootstrap resample.

    Each metric is ``{"value", "ci_low", "ci_high"}`` from the same ``num_resamples`` stratified
    resamples (:func:`bootstrap_ci`, indices from ``seed``). All numbers are Python floats or
    ints (JSON-ready). ``fpr_resolution = 1/N``: TPRs at FPR targets below it allow no false
    positive.

    Raises:
      PrivDebiasError: bad scores/labels or calibration data (see :func:`check_scores_labels`),
        ``num_resamples < 2`` or ``level`` outside ``(0, 1)``.
    """
    lv = _check_level(level)
    s, lab = check_scores_labels(scores, labels)
    threshold: float | None = None
    if calibration is not None:
        if not isinstance(calibration, (tuple, list)) or len(calibration) != 2:
            raise PrivDebiasError("calibration must be a pair (cal_scores, cal_labels)")
        try:
            threshold = best_threshold(*calibration)
        except PrivDebiasError as err:
            raise PrivDebiasError(f"calibration split: {err}") from err
    rows = _resample_rows(lab, seed, num_resamples)

    def metrics(si: np.ndarray, li: np.ndarray) -> list[float]:
        fps, tps, thr = _roc_counts(si, li)
        if threshold is None:
            k = _best_index(fps, tps)
            ba = 0.5 * (tps[k] / tps[-1] + 1.0 - fps[k] / fps[-1])
        else:
            ba = _balanced_accuracy(si, li, threshold)
        return [_auc(fps, tps), *(_tpr_at(fps, tps, f) for _, f in REPORT_FPRS), float(ba)]

    point = metrics(s, lab)
    boot = np.array([metrics(s[r], lab[r]) for r in rows])
    names = ["auc", *(n for n, _ in REPORT_FPRS), "balanced_accuracy"]
    out: dict[str, Any] = {
        "n_members": int(lab.sum()),
        "n_nonmembers": int(lab.size - lab.sum()),
        "fpr_resolution": 1.0 / float(lab.size - lab.sum()),
    }
    for j, name in enumerate(names):
        out[name] = _interval(point[j], boot[:, j], lv)
    if threshold is None:
        fps, tps, thr = _roc_counts(s, lab)
        threshold = _threshold_at(thr, _best_index(fps, tps))
        out["balanced_accuracy"]["threshold_source"] = "best_on_eval"
    else:
        out["balanced_accuracy"]["threshold_source"] = "calibration"
    out["balanced_accuracy"]["threshold"] = float(threshold)
    out["ci_level"] = lv
    out["num_resamples"] = int(num_resamples)
    return out


def _group_key(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    return value


def sliced_reports(
    scores: Any,
    labels: Any,
    groups: Any,
    *,
    seed: PRNGKey | int,
    calibration: tuple[Any, Any] | None = None,
    num_resamples: int = 1000,
    level: float = 0.95,
    skip_single_class: bool = False,
) -> dict[Any, dict[str, Any]]:
    """:func:`attack_report` on each slice ``{i : groups_i = g}`` (e.g. by protected attribute
    or by class), keyed by the group value ``g`` (a Python scalar), in sorted order.

    Every slice uses the same ``seed`` and, when given, the same global calibration threshold
    (the attacker's one rule, read per slice); without calibration each slice's balanced
    accuracy uses its own best threshold. So ``sliced_reports(...)[g]`` equals
    ``attack_report(scores[groups == g], labels[groups == g], seed=seed, ...)``.

    Raises:
      PrivDebiasError: if ``groups`` is not 1-D of the same length, or a slice lacks members or
        non-members (unless ``skip_single_class``, which reports such a slice as
        ``{"skipped": reason, "n_members", "n_nonmembers"}``).
    """
    s, lab = check_scores_labels(scores, labels)
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != s.shape[0]:
        raise PrivDebiasError(
            f"`groups` must be 1-D with one value per score ({s.shape[0]}), got shape {g.shape}"
        )
    out: dict[Any, dict[str, Any]] = {}
    for value in np.unique(g):
        rows = g == value
        p, n = int(lab[rows].sum()), int(rows.sum() - lab[rows].sum())
        if p == 0 or n == 0:
            if skip_single_class:
                out[_group_key(value)] = {
                    "skipped": "slice has no members" if p == 0 else "slice has no non-members",
                    "n_members": p,
                    "n_nonmembers": n,
                }
                continue
            raise PrivDebiasError(
                f"slice {_group_key(value)!r} has {p} member(s) and {n} non-member(s); "
                "each slice needs both (or pass skip_single_class=True)"
            )
        out[_group_key(value)] = attack_report(
            s[rows],
            lab[rows],
            seed=seed,
            calibration=calibration,
            num_resamples=num_resamples,
            level=level,
        )
    return out


# ------------------------------------------------------------------------------------------
# plot
# ------------------------------------------------------------------------------------------


def plot_roc(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    min_rate: float | None = None,
) -> Path:
    """ROC curves on log-log axes with the chance diagonal, saved as a PNG (matplotlib Agg).

    Carlini et al. (2022, Fig. 1) plot ``TPR`` against ``FPR`` on log scales so that the
    low-FPR regime, where an attack is dangerous, is visible. ``curves`` maps a legend name to
    ``(fpr, tpr)`` (e.g. from :func:`roc_curve`); the legend shows the trapezoidal AUC. Zero
    rates cannot be drawn on a log axis: values are clipped at ``min_rate`` (default: the
    smallest positive FPR of any curve divided by 2, at most ``1e-3``).

    Raises:
      PrivDebiasError: for no curves, or an ``(fpr, tpr)`` pair of different lengths, not 1-D,
        or outside ``[0, 1]``.
    """
    if not curves:
        raise PrivDebiasError("plot_roc: no curves given")
    checked = {}
    for name, pair in curves.items():
        if not isinstance(pair, (tuple, list)) or len(pair) < 2:
            raise PrivDebiasError(f"plot_roc: curve {name!r} must be a pair (fpr, tpr)")
        fpr, tpr = np.asarray(pair[0], np.float64), np.asarray(pair[1], np.float64)
        if fpr.ndim != 1 or fpr.shape != tpr.shape or fpr.size < 2:
            raise PrivDebiasError(
                f"plot_roc: curve {name!r} needs 1-D fpr and tpr of equal length ≥ 2"
            )
        if (
            not (np.all(np.isfinite(fpr)) and np.all(np.isfinite(tpr)))
            or fpr.min() < 0
            or fpr.max() > 1
            or tpr.min() < 0
            or tpr.max() > 1
        ):
            raise PrivDebiasError(f"plot_roc: curve {name!r} has rates outside [0, 1]")
        checked[str(name)] = (fpr, tpr)
    if min_rate is None:
        positive = [f[f > 0].min() for f, _ in checked.values() if np.any(f > 0)]
        min_rate = min(1e-3, min(positive) / 2.0) if positive else 1e-3
    lo = float(min_rate)
    if not 0.0 < lo < 1.0:
        raise PrivDebiasError(f"plot_roc: min_rate must be in (0, 1), got {min_rate}")
    from privdebias_jax.report import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([lo, 1.0], [lo, 1.0], linestyle="--", color="grey", linewidth=1, label="chance")
    for name, (fpr, tpr) in checked.items():
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)
        ax.plot(np.clip(fpr, lo, 1.0), np.clip(tpr, lo, 1.0), label=f"{name} (AUC {area:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.0)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


__all__ = [
    "MetricFn",
    "REPORT_FPRS",
    "check_scores_labels",
    "scores_and_labels",
    "roc_curve",
    "roc_auc",
    "tpr_at_fpr",
    "balanced_accuracy",
    "best_threshold",
    "threshold_attack_accuracy",
    "wilson_interval",
    "bootstrap_ci",
    "attack_report",
    "sliced_reports",
    "plot_roc",
]
