"""Tests of privdebias_jax.metrics against independent references (fairlearn, sklearn, scipy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from fairlearn.metrics import demographic_parity_difference as fl_dp
from fairlearn.metrics import equalized_odds_difference as fl_eo
from sklearn.metrics import accuracy_score, mutual_info_score

from privdebias_jax import metrics as M
from privdebias_jax.types import PrivDebiasError


def _random_data(seed: int, n: int, num_classes: int, num_attributes: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    a = rng.integers(0, num_attributes, n)
    # predictions correlated with y and a, so the gaps are not all tiny
    noise = rng.integers(0, num_classes, n)
    keep = rng.random(n) < 0.5 + 0.15 * a
    pred = np.where(keep, y, noise)
    return y.astype(np.int32), a.astype(np.int32), pred.astype(np.int32)


# ------------------------------------------------------------------------------------------
# DP / EO against fairlearn
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_attributes", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_binary_dp_eo_match_fairlearn(seed, num_attributes):
    y, a, pred = _random_data(seed, 400, 2, num_attributes)
    dp = M.demographic_parity_difference(y, a, pred, 2, num_attributes)
    eo = M.equalized_odds_difference(y, a, pred, 2, num_attributes)
    assert float(dp) == pytest.approx(fl_dp(y, pred, sensitive_features=a), abs=1e-6)
    assert float(eo) == pytest.approx(fl_eo(y, pred, sensitive_features=a), abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_dp_eo_match_one_vs_rest_fairlearn(seed):
    num_classes, num_attributes = 4, 3
    y, a, pred = _random_data(seed, 600, num_classes, num_attributes)
    ref_dp = max(
        fl_dp((y == c).astype(int), (pred == c).astype(int), sensitive_features=a)
        for c in range(num_classes)
    )
    ref_eo = max(
        fl_eo((y == c).astype(int), (pred == c).astype(int), sensitive_features=a)
        for c in range(num_classes)
    )
    dp = M.demographic_parity_difference(y, a, pred, num_classes, num_attributes)
    eo = M.equalized_odds_difference(y, a, pred, num_classes, num_attributes)
    assert float(dp) == pytest.approx(ref_dp, abs=1e-6)
    assert float(eo) == pytest.approx(ref_eo, abs=1e-6)


def test_tiny_hand_computed_table():
    # (y, a, ŷ) samples, 3 classes, 2 groups:
    #   group 0: (0,0,0) (1,0,1) (2,0,1) (0,0,2)                 n = 4, correct 2
    #   group 1: (0,1,0) (1,1,1) (2,1,2) (1,1,0) (2,1,2) (0,1,1) n = 6, correct 4
    # accuracy 6/10; group accuracies [1/2, 2/3]; worst 1/2.
    # DP: P(ŷ=c|a=0) = [1/4, 2/4, 1/4], P(ŷ=c|a=1) = [2/6, 2/6, 2/6]
    #     gaps [1/12, 1/6, 1/12] -> DP = 1/6.
    # EO, one-vs-rest per class c (TPR_a = P(ŷ=c|y=c,a), FPR_a = P(ŷ=c|y≠c,a)):
    #   c=0: TPR [1/2, 1/2], FPR [0/2, 1/4] -> max(0, 1/4)   = 1/4
    #   c=1: TPR [1/1, 1/2], FPR [1/3, 1/4] -> max(1/2, 1/12) = 1/2
    #   c=2: TPR [0/1, 2/2], FPR [1/3, 0/4] -> max(1, 1/3)   = 1
    #   EO = 1.
    rows = [(0, 0, 0), (1, 0, 1), (2, 0, 1), (0, 0, 2),
            (0, 1, 0), (1, 1, 1), (2, 1, 2), (1, 1, 0), (2, 1, 2), (0, 1, 1)]  # fmt: skip
    y, a, pred = np.array(rows).T
    C = M.confusion_counts(y, a, pred, 3, 2)
    assert float(C.sum()) == 10
    assert float(M.accuracy_from_counts(C)) == pytest.approx(0.6)
    np.testing.assert_allclose(M.group_accuracy_from_counts(C), [1 / 2, 2 / 3], atol=1e-6)
    assert float(M.worst_group_accuracy_from_counts(C)) == pytest.approx(0.5)
    assert float(M.demographic_parity_difference_from_counts(C)) == pytest.approx(1 / 6, abs=1e-6)
    assert float(M.equalized_odds_difference_from_counts(C)) == pytest.approx(1.0, abs=1e-6)
    # class accuracies: y=0: 2/4 correct, y=1: 2/3, y=2: 2/3
    np.testing.assert_allclose(M.class_accuracy_from_counts(C), [2 / 4, 2 / 3, 2 / 3], atol=1e-6)
    # cells (y, a): (0,0) 1/2, (0,1) 1/2, (1,0) 1, (1,1) 1/2, (2,0) 0, (2,1) 1
    np.testing.assert_allclose(
        M.cell_accuracy_from_counts(C), [[0.5, 0.5], [1.0, 0.5], [0.0, 1.0]], atol=1e-6
    )
    report = M.fairness_report(y, a, pred, 3, 2)
    assert report["acc"] == pytest.approx(0.6)
    assert report["dp_diff"] == pytest.approx(1 / 6, abs=1e-6)
    assert report["eo_diff"] == pytest.approx(1.0)
    assert report["group_count"] == [4.0, 6.0]
    assert "acc_aligned" not in report
    assert all(isinstance(v, float) for v in report["group_acc"])


def test_aligned_conflicting_hand_computed():
    # a == y (aligned): (0,0,ŷ0) ok, (1,1,ŷ1) ok, (1,1,ŷ0) wrong -> 2/3
    # a != y (conflicting): (0,1,ŷ1) wrong, (1,0,ŷ1) ok          -> 1/2
    y = np.array([0, 0, 1, 1, 1])
    a = np.array([0, 1, 1, 1, 0])
    pred = np.array([0, 1, 1, 0, 1])
    C = M.confusion_counts(y, a, pred, 2, 2)
    aligned, conflicting = M.aligned_conflicting_accuracy_from_counts(C)
    assert float(aligned) == pytest.approx(2 / 3)
    assert float(conflicting) == pytest.approx(1 / 2)
    report = M.fairness_report(y, a, pred, 2, 2)
    assert report["acc_aligned"] == pytest.approx(2 / 3)
    assert report["acc_conflicting"] == pytest.approx(1 / 2)
    assert (report["n_aligned"], report["n_conflicting"]) == (3.0, 2.0)


def test_empty_groups_are_ignored_not_nan():
    # attribute value 2 never occurs; group 1 has no positives (y = 1)
    y = np.array([0, 1, 0, 1, 0, 0])
    a = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1, 1, 0])
    C = M.confusion_counts(y, a, pred, 2, 3)
    # selection rates: group0 3/4, group1 1/2 (group 2 empty) -> 1/4
    assert float(M.demographic_parity_difference_from_counts(C)) == pytest.approx(0.25)
    # TPR only over group 0 (gap 0); FPR: group0 1/2, group1 1/2 -> 0
    assert float(M.equalized_odds_difference_from_counts(C)) == pytest.approx(0.0)
    ga = M.group_accuracy_from_counts(C)
    assert np.all(np.isfinite(ga)) and float(ga[2]) == 0.0
    assert float(M.worst_group_accuracy_from_counts(C)) == pytest.approx(0.5)
    assert np.isnan(np.asarray(M.cell_accuracy_from_counts(C))[0, 2])
    # one non-empty group only: differences are 0
    C1 = M.confusion_counts(y, np.zeros_like(a), pred, 2, 3)
    assert float(M.demographic_parity_difference_from_counts(C1)) == 0.0
    assert float(M.equalized_odds_difference_from_counts(C1)) == 0.0


# ------------------------------------------------------------------------------------------
# Accuracy and the additivity of the counts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_and_group_accuracy_match_sklearn(seed):
    y, a, pred = _random_data(seed, 300, 5, 3)
    rng = np.random.default_rng(seed + 100)
    mask = rng.random(300) < 0.7
    assert float(M.accuracy(y, pred)) == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert float(M.accuracy(y, pred, mask=mask.astype(np.float32))) == pytest.approx(
        accuracy_score(y[mask], pred[mask]), abs=1e-6
    )
    C = M.confusion_counts(y, a, pred, 5, 3, mask=mask.astype(np.float32))
    assert float(M.accuracy_from_counts(C)) == pytest.approx(
        accuracy_score(y[mask], pred[mask]), abs=1e-6
    )
    ga = M.group_accuracy(y, a, pred, 5, 3)
    for g in range(3):
        sel = a == g
        assert float(ga[g]) == pytest.approx(accuracy_score(y[sel], pred[sel]), abs=1e-6)
    ca = M.class_accuracy_from_counts(M.confusion_counts(y, a, pred, 5, 3))
    for c in range(5):
        sel = y == c
        assert float(ca[c]) == pytest.approx(accuracy_score(y[sel], pred[sel]), abs=1e-6)
    # scores instead of labels: argmax is taken
    scores = np.eye(5, dtype=np.float32)[pred] + 0.01 * rng.random((300, 5)).astype(np.float32)
    assert float(M.accuracy(y, scores)) == pytest.approx(accuracy_score(y, pred), abs=1e-6)


def test_confusion_counts_matches_numpy_reference_with_weights():
    rng = np.random.default_rng(7)
    y, a, pred = _random_data(7, 200, 3, 4)
    w = rng.random(200).astype(np.float32)
    ref = np.zeros((3, 4, 3))
    np.add.at(ref, (y, a, pred), w)
    np.testing.assert_allclose(M.confusion_counts(y, a, pred, 3, 4, mask=w), ref, rtol=1e-5)
    C = M.confusion_counts(y, a, pred, 3, 4)
    assert C.shape == (3, 4, 3) and C.dtype == jnp.float32


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_sums_with_padding_equal_whole_set(seed):
    num_classes, num_attributes, n, bs = 4, 3, 257, 32
    y, a, pred = _random_data(seed, n, num_classes, num_attributes)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    cuts = np.sort(rng.choice(np.arange(1, n), size=6, replace=False))
    total = jnp.zeros((num_classes, num_attributes, num_classes))
    count_fn = jax.jit(M.confusion_counts, static_argnums=(3, 4))
    for part in np.split(perm, cuts):
        for start in range(0, len(part), bs):
            idx = part[start : start + bs]
            pad = bs - len(idx)
            # padding rows carry real-looking (in range) labels: only the mask removes them
            yb = np.concatenate([y[idx], rng.integers(0, num_classes, pad)]).astype(np.int32)
            ab = np.concatenate([a[idx], rng.integers(0, num_attributes, pad)]).astype(np.int32)
            pb = np.concatenate([pred[idx], rng.integers(0, num_classes, pad)]).astype(np.int32)
            mb = np.concatenate([np.ones(len(idx)), np.zeros(pad)]).astype(np.float32)
            total = total + count_fn(yb, ab, pb, num_classes, num_attributes, mb)
    whole = M.confusion_counts(y, a, pred, num_classes, num_attributes)
    np.testing.assert_array_equal(np.asarray(total), np.asarray(whole))
    assert float(M.demographic_parity_difference_from_counts(total)) == pytest.approx(
        float(M.demographic_parity_difference(y, a, pred, num_classes, num_attributes))
    )
    assert float(M.equalized_odds_difference_from_counts(total)) == pytest.approx(
        float(M.equalized_odds_difference(y, a, pred, num_classes, num_attributes))
    )


def test_jit_and_eager_agree():
    y, a, pred = _random_data(3, 500, 3, 3)
    mask = (np.arange(500) % 7 != 0).astype(np.float32)
    eager = M.confusion_counts(y, a, pred, 3, 3, mask)
    jitted = jax.jit(M.confusion_counts, static_argnums=(3, 4))(
        jnp.asarray(y), jnp.asarray(a), jnp.asarray(pred), 3, 3, jnp.asarray(mask)
    )
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    for fn in (
        M.accuracy_from_counts,
        M.worst_group_accuracy_from_counts,
        M.demographic_parity_difference_from_counts,
        M.equalized_odds_difference_from_counts,
    ):
        assert float(jax.jit(fn)(eager)) == pytest.approx(float(fn(eager)), abs=1e-7)
    al, co = jax.jit(M.aligned_conflicting_accuracy_from_counts)(eager)
    al2, co2 = M.aligned_conflicting_accuracy_from_counts(eager)
    assert float(al) == pytest.approx(float(al2)) and float(co) == pytest.approx(float(co2))


def test_jit_drops_out_of_range_rows():
    # under jit the value check cannot raise: documented behaviour is to drop the row
    y = jnp.array([0, 1, 5])
    a = jnp.array([0, 1, 1])
    pred = jnp.array([0, 1, 1])
    C = jax.jit(M.confusion_counts, static_argnums=(3, 4))(y, a, pred, 2, 2)
    assert float(C.sum()) == 2.0


# ------------------------------------------------------------------------------------------
# FMD counterfactual bias
# ------------------------------------------------------------------------------------------

PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25]], np.float32)
PROBS_CF = np.array([[0.4, 0.5, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]], np.float32)


def test_counterfactual_bias_hand_table():
    # ŷ from the originals = [0, 2, 1] (the counterfactual argmax of row 0 is 1: not used)
    # per pair: |0.7-0.4| = 0.3, |0.6-0.6| = 0, |0.5-0.3| = 0.2 -> mean 0.5/3 = 1/6
    per = M.counterfactual_bias_per_sample(PROBS, PROBS_CF)
    np.testing.assert_allclose(per, [0.3, 0.0, 0.2], atol=1e-6)
    assert float(M.counterfactual_bias(PROBS, PROBS_CF)) == pytest.approx(1 / 6, abs=1e-6)
    # masked: only pairs 0 and 2 -> 0.25
    mask = np.array([1.0, 0.0, 1.0], np.float32)
    assert float(M.counterfactual_bias(PROBS, PROBS_CF, mask)) == pytest.approx(0.25, abs=1e-6)
    # from logits: log-probabilities are logits of the same softmax
    b = M.counterfactual_bias_from_logits(np.log(PROBS), np.log(PROBS_CF))
    assert float(b) == pytest.approx(1 / 6, abs=1e-6)
    # an identical counterfactual has no bias
    assert float(M.counterfactual_bias(PROBS, PROBS)) == 0.0


def _np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_cf_bias(z, zc, mask):
    p, q = _np_softmax(z), _np_softmax(zc)
    k = p.argmax(axis=-1)
    r = np.arange(len(k))
    return np.sum(mask * np.abs(p[r, k] - q[r, k])) / np.sum(mask)


def test_counterfactual_bias_gradient_hand_derived_and_finite_differences():
    rng = np.random.default_rng(0)
    n, k = 6, 4
    z = rng.normal(size=(n, k)).astype(np.float32) * 2
    zc = rng.normal(size=(n, k)).astype(np.float32) * 2
    mask = np.array([1, 1, 0, 1, 1, 1], np.float32)
    gz, gzc = jax.grad(M.counterfactual_bias_from_logits, argnums=(0, 1))(z, zc, mask)

    # hand-derived: ∂p_k/∂z = p_k (e_k − p); s = sign(p_k − q_k); weights m_i / Σm
    p, q = _np_softmax(z.astype(np.float64)), _np_softmax(zc.astype(np.float64))
    kk = p.argmax(axis=-1)
    r = np.arange(n)
    s = np.sign(p[r, kk] - q[r, kk])
    e = np.eye(k)[kk]
    wgt = (mask / mask.sum())[:, None]
    hand_z = wgt * s[:, None] * p[r, kk][:, None] * (e - p)
    hand_zc = -wgt * s[:, None] * q[r, kk][:, None] * (e - q)
    np.testing.assert_allclose(gz, hand_z, atol=1e-6)
    np.testing.assert_allclose(gzc, hand_zc, atol=1e-6)

    # central finite differences of an independent float64 NumPy implementation
    h = 1e-6
    z64, zc64 = z.astype(np.float64), zc.astype(np.float64)
    fd = np.zeros_like(z64)
    for i in range(n):
        for j in range(k):
            dz = np.zeros_like(z64)
            dz[i, j] = h
            fd[i, j] = (_np_cf_bias(z64 + dz, zc64, mask) - _np_cf_bias(z64 - dz, zc64, mask)) / (
                2 * h
            )
    np.testing.assert_allclose(gz, fd, atol=1e-5)


def test_counterfactual_bias_gradient_through_linear_head():
    # ∇θ B(θ) for a linear softmax head, the use in FMD; checked by finite differences
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 5))
    x_cf = x.copy()
    x_cf[:, 0] = -x_cf[:, 0]  # "flip the attribute" feature
    w = rng.normal(size=(5, 3))

    def bias(w):
        return M.counterfactual_bias_from_logits(x @ w, x_cf @ w)

    g = np.asarray(jax.grad(bias)(jnp.asarray(w, jnp.float32)))
    h = 1e-6
    fd = np.zeros_like(w)
    ones = np.ones(8)
    for i in range(5):
        for j in range(3):
            dw = np.zeros_like(w)
            dw[i, j] = h
            fd[i, j] = (
                _np_cf_bias(x @ (w + dw), x_cf @ (w + dw), ones)
                - _np_cf_bias(x @ (w - dw), x_cf @ (w - dw), ones)
            ) / (2 * h)
    np.testing.assert_allclose(g, fd, atol=2e-5)


# ------------------------------------------------------------------------------------------
# KL / mutual-information bias (seed 000)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mutual_information_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 500)
    a = np.where(rng.random(500) < 0.6, y % 3, rng.integers(0, 3, 500))
    mi = M.mutual_information_bias(y, a, 4, 3)
    assert float(mi) == pytest.approx(mutual_info_score(y, a), abs=1e-5)
    assert float(M.kl_bias(y, a, 4, 3)) == pytest.approx(float(mi), abs=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_per_class_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    num_classes, num_attributes = 3, 4
    y = rng.integers(0, num_classes, 400)
    a = np.where(rng.random(400) < 0.5, y, rng.integers(0, num_attributes, 400))
    p_y, p_a_given_y, p_a = M.attribute_distribution(y, a, num_classes, num_attributes)
    counts = np.zeros((num_classes, num_attributes))
    np.add.at(counts, (y, a), 1)
    np.testing.assert_allclose(p_y, counts.sum(1) / 400, atol=1e-6)
    np.testing.assert_allclose(p_a, counts.sum(0) / 400, atol=1e-6)
    np.testing.assert_allclose(p_a_given_y, counts / counts.sum(1, keepdims=True), atol=1e-6)
    ref_p = counts / counts.sum(1, keepdims=True)
    ref_marg = counts.sum(0) / 400
    kl = M.kl_bias_per_class(y, a, num_classes, num_attributes)
    for c in range(num_classes):
        assert float(kl[c]) == pytest.approx(scipy.stats.entropy(ref_p[c], ref_marg), abs=1e-5)
    uniform = np.full(num_attributes, 1 / num_attributes)
    kl_u = M.kl_bias_per_class(y, a, num_classes, num_attributes, prior=uniform)
    for c in range(num_classes):
        assert float(kl_u[c]) == pytest.approx(scipy.stats.entropy(ref_p[c], uniform), abs=1e-5)
    ref_total = sum(
        counts[c].sum() / 400 * scipy.stats.entropy(ref_p[c], uniform) for c in range(3)
    )
    assert float(M.kl_bias(y, a, num_classes, num_attributes, prior=uniform)) == pytest.approx(
        ref_total, abs=1e-5
    )
    assert float(M.kl_bias_from_counts(counts, prior=uniform)) == pytest.approx(ref_total, abs=1e-5)


def test_balanced_dataset_has_zero_bias_and_empty_class_has_zero_weight():
    y = np.repeat(np.arange(3), 8)
    a = np.tile(np.arange(4), 6)
    assert float(M.mutual_information_bias(y, a, 3, 4)) == pytest.approx(0.0, abs=1e-7)
    assert float(M.kl_bias(y, a, 3, 4, prior=np.full(4, 0.25))) == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(M.kl_bias_per_class(y, a, 3, 4), 0.0, atol=1e-7)
    # class 3 has no samples: weight 0, per-class KL 0, no NaN
    kl = M.kl_bias_per_class(y, a, 4, 4)
    assert np.all(np.isfinite(kl)) and float(kl[3]) == 0.0
    assert float(M.kl_bias(y, a, 4, 4)) == pytest.approx(0.0, abs=1e-7)
    p_y, p_a_given_y, _ = M.attribute_distribution(y, a, 4, 4)
    assert float(p_y[3]) == 0.0 and np.all(np.asarray(p_a_given_y[3]) == 0)


def _np_kl_bias(counts, prior):
    p_y = counts.sum(1) / counts.sum()
    p = counts / counts.sum(1, keepdims=True)
    return sum(p_y[c] * scipy.stats.entropy(p[c], prior) for c in range(len(counts)))


def test_kl_bias_from_counts_is_differentiable():
    rng = np.random.default_rng(0)
    counts = rng.uniform(0.5, 5.0, size=(3, 4))  # fractional counts, as a planner uses
    prior = np.array([0.1, 0.2, 0.3, 0.4])
    g = np.asarray(jax.grad(M.kl_bias_from_counts)(jnp.asarray(counts, jnp.float32), prior))
    h = 1e-6
    fd = np.zeros_like(counts)
    for i in range(3):
        for j in range(4):
            d = np.zeros_like(counts)
            d[i, j] = h
            fd[i, j] = (_np_kl_bias(counts + d, prior) - _np_kl_bias(counts - d, prior)) / (2 * h)
    np.testing.assert_allclose(g, fd, atol=1e-4, rtol=1e-3)
    # zero cells and an empty class keep the gradient finite
    counts0 = np.array([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    g0 = jax.grad(M.kl_bias_from_counts)(jnp.asarray(counts0, jnp.float32))
    assert np.all(np.isfinite(np.asarray(g0)))
    g0u = jax.grad(M.kl_bias_from_counts)(jnp.asarray(counts0, jnp.float32), np.full(3, 1 / 3))
    assert np.all(np.isfinite(np.asarray(g0u)))


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_bad_input_raises():
    y = np.array([0, 1, 1, 0])
    a = np.array([0, 1, 0, 1])
    pred = np.array([0, 1, 0, 0])
    with pytest.raises(PrivDebiasError, match="length"):
        M.confusion_counts(y, a[:3], pred, 2, 2)
    with pytest.raises(PrivDebiasError, match="length"):
        M.confusion_counts(y, a, pred[:3], 2, 2)
    with pytest.raises(PrivDebiasError, match="length"):
        M.accuracy(y, pred[:2])
    with pytest.raises(PrivDebiasError, match="out of range"):
        M.confusion_counts(np.array([0, 1, 2, 0]), a, pred, 2, 2)
    with pytest.raises(PrivDebiasError, match="out of range"):
        M.demographic_parity_difference(y, np.array([0, 3, 0, 1]), pred, 2, 2)
    with pytest.raises(PrivDebiasError, match="out of range"):
        M.equalized_odds_difference(y, a, np.array([0, -1, 0, 0]), 2, 2)
    with pytest.raises(PrivDebiasError, match="integer"):
        M.confusion_counts(y.astype(np.float32), a, pred, 2, 2)
    with pytest.raises(PrivDebiasError, match="mask"):
        M.confusion_counts(y, a, pred, 2, 2, mask=np.array([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(PrivDebiasError, match="empty"):
        M.demographic_parity_difference(y[:0], a[:0], pred[:0], 2, 2)
    with pytest.raises(PrivDebiasError, match="empty"):
        M.accuracy(y[:0], pred[:0])
    with pytest.raises(PrivDebiasError, match="empty"):
        M.accuracy_from_counts(np.zeros((2, 2, 2)))
    with pytest.raises(PrivDebiasError, match="shape"):
        M.accuracy_from_counts(np.ones((2, 2, 3)))
    with pytest.raises(PrivDebiasError, match="num_attributes == num_classes"):
        M.aligned_conflicting_accuracy_from_counts(M.confusion_counts(y, a, pred, 2, 3))
    # probabilities
    bad = PROBS.copy()
    bad[1, 2] = np.nan
    with pytest.raises(PrivDebiasError, match="NaN"):
        M.counterfactual_bias(bad, PROBS_CF)
    with pytest.raises(PrivDebiasError, match="NaN"):
        M.counterfactual_bias_per_sample(PROBS, bad)
    with pytest.raises(PrivDebiasError, match="NaN"):
        M.counterfactual_bias_from_logits(bad, PROBS_CF)
    with pytest.raises(PrivDebiasError, match="shapes differ"):
        M.counterfactual_bias(PROBS, PROBS_CF[:2])
    with pytest.raises(PrivDebiasError, match="sum to 1"):
        M.counterfactual_bias(PROBS * 0.5, PROBS_CF)
    with pytest.raises(PrivDebiasError, match="empty"):
        M.counterfactual_bias(PROBS[:0], PROBS_CF[:0])
    # priors
    with pytest.raises(PrivDebiasError, match="sum to 1"):
        M.kl_bias(y, a, 2, 2, prior=np.array([0.5, 0.6]))
    with pytest.raises(PrivDebiasError, match="non-negative"):
        M.kl_bias_per_class(y, a, 2, 2, prior=np.array([1.5, -0.5]))
    with pytest.raises(PrivDebiasError, match="shape"):
        M.kl_bias_from_counts(np.ones((2, 2)), prior=np.array([1.0]))
    with pytest.raises(PrivDebiasError, match="negative"):
        M.kl_bias_from_counts(np.array([[1.0, -1.0], [1.0, 1.0]]))
    with pytest.raises(PrivDebiasError, match="out of range"):
        M.mutual_information_bias(y, np.array([0, 1, 2, 0]), 2, 2)


def test_public_api_is_exported():
    for name in M.__all__:
        assert callable(getattr(M, name)), name
