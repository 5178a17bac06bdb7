"""Tests of privdebias_jax.privacy.metrics against sklearn, scipy and brute force."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from privdebias_jax.privacy import metrics as M
from privdebias_jax.types import PrivDebiasError


def _scores(seed: int, n: int = 400, ties: bool = True, shift: float = 0.7):
    """Random attack scores, members shifted up; rounded to one decimal when ``ties``."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(np.int64)
    scores = rng.normal(size=n) + shift * labels
    if ties:
        scores = np.round(scores, 1)
    return scores, labels


def _brute_rates(scores, labels, t):
    pred = scores >= t
    return np.mean(pred[labels == 0]), np.mean(pred[labels == 1])


# ------------------------------------------------------------------------------------------
# ROC / AUC
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_curve_matches_sklearn(seed, ties):
    s, y = _scores(seed, ties=ties)
    fpr, tpr, thr = M.roc_curve(s, y)
    fpr_sk, tpr_sk, thr_sk = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, fpr_sk, atol=1e-12)
    np.testing.assert_allclose(tpr, tpr_sk, atol=1e-12)
    np.testing.assert_array_equal(thr, thr_sk)
    # sklearn's default (collinear points dropped) is a subset of our points
    f2, t2, th2 = sk_roc_curve(y, s)
    pos = np.searchsorted(-thr, -th2)
    np.testing.assert_allclose(fpr[pos], f2, atol=1e-12)
    np.testing.assert_allclose(tpr[pos], t2, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_sklearn_with_ties(seed):
    s, y = _scores(seed, ties=True)
    assert M.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    s_int = np.round(s).astype(np.int32)  # heavy ties, integer dtype
    assert M.roc_auc(s_int, y) == pytest.approx(roc_auc_score(y, s_int), abs=1e-12)


def test_roc_auc_extremes():
    y = np.array([1, 1, 0, 0, 0])
    assert M.roc_auc([5.0, 4, 3, 2, 1], y) == 1.0
    assert M.roc_auc([1.0, 2, 3, 4, 5], y) == 0.0
    assert M.roc_auc(np.zeros(5), y) == 0.5  # all tied: chance
    assert M.roc_auc([1.0, 0.0], [True, False]) == 1.0  # boolean labels


def test_scores_and_labels():
    s, y = M.scores_and_labels([3.0, 2.0], [1.0, 0.0, -1.0])
    np.testing.assert_array_equal(s, [3, 2, 1, 0, -1])
    np.testing.assert_array_equal(y, [1, 1, 0, 0, 0])
    assert M.roc_auc(s, y) == 1.0


# ------------------------------------------------------------------------------------------
# TPR at FPR, balanced accuracy, thresholds
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.001, 0.01, 0.05, 0.1, 0.37])
@pytest.mark.parametrize("seed", [0, 3])
def test_tpr_at_fpr_brute_force(seed, target):
    s, y = _scores(seed, n=600, ties=True)
    best = 0.0
    for t in np.r_[np.inf, np.unique(s)]:
        fpr, tpr = _brute_rates(s, y, t)
        if fpr <= target:
            best = max(best, tpr)
    assert M.tpr_at_fpr(s, y, target) == pytest.approx(best, abs=1e-12)
    fpr_sk, tpr_sk, _ = sk_roc_curve(y, s)
    assert M.tpr_at_fpr(s, y, target) == pytest.approx(tpr_sk[fpr_sk <= target].max(), abs=1e-12)


def test_tpr_at_fpr_exact_boundary():
    # 100 non-members: FPR 1% allows exactly one false positive, 0.5% none
    y = np.r_[np.ones(10), np.zeros(100)].astype(int)
    s = np.r_[np.arange(10) + 100.5, 200.0, np.arange(99)]  # one non-member above all members
    assert M.tpr_at_fpr(s, y, 0.01) == 1.0
    assert M.tpr_at_fpr(s, y, 0.005) == 0.0
    assert M.tpr_at_fpr(s, y, 0.03) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_balanced_accuracy_matches_sklearn(seed):
    s, y = _scores(seed, ties=True)
    for t in [
        -np.inf,
        np.inf,
        s[0],
        s[7],
        0.0,
        0.35,
        np.median(s),
    ]:  # thresholds on tied scores too
        ref = balanced_accuracy_score(y, (s >= t).astype(int))
        assert M.balanced_accuracy(s, y, t) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_best_threshold_maximises_balanced_accuracy(seed):
    s, y = _scores(seed, ties=True)
    t = M.best_threshold(s, y)
    brute = max(balanced_accuracy_score(y, (s >= u).astype(int)) for u in np.unique(s))
    assert M.balanced_accuracy(s, y, t) == pytest.approx(brute, abs=1e-12)
    # the midpoint classifies exactly like the chosen score: no score lies in [t, next score above)
    above = s[s >= t].min()
    assert not np.any((s > t) & (s < above))


def test_threshold_attack_accuracy_uses_calibration_threshold():
    s_cal, y_cal = _scores(10, ties=True)
    s_te, y_te = _scores(11, ties=True)
    t = M.best_threshold(s_cal, y_cal)
    ref = balanced_accuracy_score(y_te, (s_te >= t).astype(int))
    assert M.threshold_attack_accuracy(s_cal, y_cal, s_te, y_te) == pytest.approx(ref, abs=1e-12)


def test_perfect_and_useless_attacks():
    y = np.r_[np.ones(50), np.zeros(50)].astype(int)
    s = np.r_[np.linspace(2, 3, 50), np.linspace(0, 1, 50)]
    assert M.tpr_at_fpr(s, y, 0.001) == 1.0
    assert M.balanced_accuracy(s, y, M.best_threshold(s, y)) == 1.0
    flat = np.ones(100)
    assert M.tpr_at_fpr(flat, y, 0.5) == 0.0
    assert M.balanced_accuracy(flat, y, M.best_threshold(flat, y)) == 0.5


# ------------------------------------------------------------------------------------------
# intervals
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (57, 200), (999, 1000)])
def test_wilson_interval_matches_scipy(k, n):
    ref = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = M.wilson_interval(k, n, 0.95)
    assert lo == pytest.approx(ref.low, abs=1e-9)
    assert hi == pytest.approx(ref.high, abs=1e-9)


def test_bootstrap_ci_contains_point_and_narrows():
    widths = []
    for n in (200, 4000):
        s, y = _scores(5, n=n, ties=False)
        point, lo, hi = M.bootstrap_ci(M.roc_auc, s, y, 0, num_resamples=300)
        assert point == pytest.approx(roc_auc_score(y, s))
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[1] < 0.5 * widths[0]  # ~ 1/sqrt(n): 20x the data, ~4.5x narrower


def test_bootstrap_ci_is_stratified_and_reproducible():
    s, y = _scores(6, n=300)
    # every resample keeps P members and N non-members, so the member fraction never varies
    frac = float(np.mean(y))
    assert M.bootstrap_ci(lambda _s, lab: float(np.mean(lab)), s, y, 1, num_resamples=50) == (
        frac,
        frac,
        frac,
    )
    a = M.bootstrap_ci(M.roc_auc, s, y, 7, num_resamples=100)
    assert a == M.bootstrap_ci(M.roc_auc, s, y, 7, num_resamples=100)
    assert a != M.bootstrap_ci(M.roc_auc, s, y, 8, num_resamples=100)
    k = M.bootstrap_ci(M.roc_auc, s, y, jax.random.key(3), num_resamples=100)
    assert k == M.bootstrap_ci(M.roc_auc, s, y, jax.random.key(3), num_resamples=100)
    assert k == M.bootstrap_ci(M.roc_auc, s, y, jax.random.PRNGKey(3), num_resamples=100)
    # a wider level gives a wider interval from the same resamples
    narrow = M.bootstrap_ci(M.roc_auc, s, y, 7, num_resamples=100, level=0.5)
    assert a[1] <= narrow[1] <= narrow[2] <= a[2]


# ------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------


def test_attack_report_values_and_json():
    s, y = _scores(2, n=500)
    rep = M.attack_report(s, y, seed=0, num_resamples=200)
    json.dumps(rep)  # JSON-ready
    assert rep["n_members"] == int(y.sum()) and rep["n_nonmembers"] == int((1 - y).sum())
    assert rep["auc"]["value"] == pytest.approx(roc_auc_score(y, s))
    assert rep["tpr@0.1%fpr"]["value"] == M.tpr_at_fpr(s, y, 0.001)
    assert rep["tpr@1%fpr"]["value"] == M.tpr_at_fpr(s, y, 0.01)
    ba = rep["balanced_accuracy"]
    assert ba["threshold_source"] == "best_on_eval"
    assert ba["value"] == pytest.approx(M.balanced_accuracy(s, y, M.best_threshold(s, y)))
    assert ba["threshold"] == M.best_threshold(s, y)
    for name in ("auc", "tpr@0.1%fpr", "tpr@1%fpr", "balanced_accuracy"):
        assert 0.0 <= rep[name]["ci_low"] <= rep[name]["ci_high"] <= 1.0
    assert rep["auc"]["ci_low"] <= rep["auc"]["value"] <= rep["auc"]["ci_high"]
    assert rep == M.attack_report(s, y, seed=0, num_resamples=200)  # deterministic given the seed


def test_attack_report_with_calibration():
    s_cal, y_cal = _scores(20, n=300)
    s, y = _scores(21, n=300)
    rep = M.attack_report(s, y, seed=1, calibration=(s_cal, y_cal), num_resamples=100)
    ba = rep["balanced_accuracy"]
    assert ba["threshold_source"] == "calibration"
    assert ba["threshold"] == M.best_threshold(s_cal, y_cal)
    assert ba["value"] == pytest.approx(M.threshold_attack_accuracy(s_cal, y_cal, s, y))
    assert ba["ci_low"] <= ba["ci_high"]
    with pytest.raises(PrivDebiasError, match="calibration"):
        M.attack_report(s, y, seed=1, calibration=(s_cal, np.zeros_like(y_cal)), num_resamples=10)
    with pytest.raises(PrivDebiasError, match="pair"):
        M.attack_report(s, y, seed=1, calibration=s_cal, num_resamples=10)


def test_sliced_reports_equal_reports_on_subsets():
    s, y = _scores(4, n=600)
    rng = np.random.default_rng(4)
    groups = rng.integers(0, 3, s.size).astype(np.int32)
    cal = _scores(5, n=200)
    for kwargs in ({}, {"calibration": cal}):
        sliced = M.sliced_reports(s, y, groups, seed=3, num_resamples=100, **kwargs)
        assert list(sliced) == [0, 1, 2] and all(type(k) is int for k in sliced)
        for g in range(3):
            rows = groups == g
            assert sliced[g] == M.attack_report(
                s[rows], y[rows], seed=3, num_resamples=100, **kwargs
            )
    json.dumps(M.sliced_reports(s, y, np.where(groups == 0, "f", "m"), seed=3, num_resamples=20))


def test_sliced_reports_single_class_slice():
    s = np.arange(8.0)
    y = np.array([1, 0, 1, 0, 1, 1, 1, 1])
    g = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # slice 1 has no non-members
    with pytest.raises(PrivDebiasError, match="slice 1"):
        M.sliced_reports(s, y, g, seed=0, num_resamples=10)
    out = M.sliced_reports(s, y, g, seed=0, num_resamples=10, skip_single_class=True)
    assert out[1] == {"skipped": "slice has no non-members", "n_members": 4, "n_nonmembers": 0}
    assert out[0]["n_members"] == 2
    with pytest.raises(PrivDebiasError, match="groups"):
        M.sliced_reports(s, y, g[:5], seed=0)


def test_plot_roc_writes_png(tmp_path):
    s, y = _scores(0)
    fpr, tpr, _ = M.roc_curve(s, y)
    path = M.plot_roc(
        {"loss": (fpr, tpr), "chance": ([0, 1], [0, 1])}, tmp_path / "roc" / "roc.png", title="t"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PrivDebiasError):
        M.plot_roc({}, tmp_path / "x.png")
    with pytest.raises(PrivDebiasError):
        M.plot_roc({"bad": ([0, 1, 2], [0, 1])}, tmp_path / "x.png")


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------

_GOOD_S = np.array([0.1, 0.4, 0.35, 0.8])
_GOOD_Y = np.array([0, 0, 1, 1])


@pytest.mark.parametrize(
    "scores,labels,match",
    [
        (_GOOD_S, np.zeros(4), "no|0 member"),
        (_GOOD_S, np.ones(4), "0 non-member"),
        (np.zeros(0), np.zeros(0), "member"),
        (np.array([0.1, np.nan, 0.3, 0.4]), _GOOD_Y, "NaN or inf"),
        (np.array([0.1, np.inf, 0.3, 0.4]), _GOOD_Y, "NaN or inf"),
        (_GOOD_S, _GOOD_Y[:3], "lengths differ"),
        (_GOOD_S, np.array([0, 2, 1, 1]), r"1 \(member\) or 0"),
        (_GOOD_S, np.array([0, 0.5, 1, 1]), r"1 \(member\) or 0"),
        (_GOOD_S.reshape(2, 2), _GOOD_Y, "1-D"),
        (_GOOD_S, _GOOD_Y.reshape(2, 2), "1-D"),
        (np.array(["a", "b", "c", "d"]), _GOOD_Y, "real numbers"),
    ],
)
def test_bad_scores_and_labels_raise(scores, labels, match):
    for fn in (M.roc_curve, M.roc_auc, M.best_threshold, lambda s, y: M.tpr_at_fpr(s, y, 0.01)):
        with pytest.raises(PrivDebiasError, match=match):
            fn(scores, labels)
    with pytest.raises(PrivDebiasError, match=match):
        M.attack_report(scores, labels, seed=0, num_resamples=10)


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_fpr_target_outside_unit_interval_raises(target):
    with pytest.raises(PrivDebiasError, match="fpr_target"):
        M.tpr_at_fpr(_GOOD_S, _GOOD_Y, target)


def test_other_bad_arguments_raise():
    with pytest.raises(PrivDebiasError, match="members and non-members"):
        M.scores_and_labels([], [0.1, 0.2])
    with pytest.raises(PrivDebiasError, match="members and non-members"):
        M.scores_and_labels([0.3], [])
    with pytest.raises(PrivDebiasError, match="NaN"):
        M.scores_and_labels([0.3, np.nan], [0.1])
    with pytest.raises(PrivDebiasError, match="NaN"):
        M.balanced_accuracy(_GOOD_S, _GOOD_Y, float("nan"))
    with pytest.raises(PrivDebiasError, match="num_resamples"):
        M.bootstrap_ci(M.roc_auc, _GOOD_S, _GOOD_Y, 0, num_resamples=1)
    with pytest.raises(PrivDebiasError, match="level"):
        M.bootstrap_ci(M.roc_auc, _GOOD_S, _GOOD_Y, 0, level=1.0)
    with pytest.raises(PrivDebiasError, match="key or an integer seed"):
        M.bootstrap_ci(M.roc_auc, _GOOD_S, _GOOD_Y, "seed")
    with pytest.raises(PrivDebiasError, match="non-negative"):
        M.bootstrap_ci(M.roc_auc, _GOOD_S, _GOOD_Y, -1)
    with pytest.raises(PrivDebiasError, match="trial"):
        M.wilson_interval(0, 0)
    with pytest.raises(PrivDebiasError, match="successes"):
        M.wilson_interval(5, 4)
