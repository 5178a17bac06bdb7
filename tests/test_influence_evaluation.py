"""Influence against retraining (privdebias_jax.influence.evaluation), checked against
independent references: scikit-learn's logistic regression retrained from scratch on sklearn's
digits (float64 L-BFGS), scipy's Spearman/Pearson, a hand-computed prediction table, and the
empirical Fisher built densely from per-example gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from privdebias_jax.data import Dataset
from privdebias_jax.influence import make_problem, per_example_grads
from privdebias_jax.influence.evaluation import (
    draw_subsets,
    evaluate_lds,
    evaluate_removals,
    influence_matrix,
    linear_datamodeling_score,
    predicted_losses,
    removal_correlation,
    removal_masks,
)
from privdebias_jax.influence.solvers import dense_curvature
from privdebias_jax.train import cross_entropy_loss
from privdebias_jax.types import PrivDebiasError

# ------------------------------------------------------------------------------------------
# pure functions against hand-computed values and scipy
# ------------------------------------------------------------------------------------------


def test_predicted_losses_hand_table():
    scores = np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0], [2.0, 2.0]])  # (n=4, T=2)
    keep = np.array([[True, False, True, True], [False, False, True, True]])
    base = np.array([0.5, 1.0])
    # row 0 removes z=1: base − scores[1]/4; row 1 removes z=0,1: base − (scores[0]+scores[1])/4
    want = np.array([[0.5 - 3.0 / 4, 1.0 - 0.5 / 4], [0.5 - 4.0 / 4, 1.0 - (-1.5) / 4]])
    np.testing.assert_allclose(predicted_losses(base, scores, keep), want)


def test_lds_and_removal_correlation_match_scipy():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(30, 5))
    act = pred + rng.normal(scale=0.7, size=(30, 5))
    mean, per = linear_datamodeling_score(pred, act)
    ref = [spearmanr(pred[:, t], act[:, t])[0] for t in range(5)]
    np.testing.assert_allclose(per, ref, rtol=1e-10)
    assert mean == pytest.approx(np.mean(ref), rel=1e-10)
    mean, per = removal_correlation(pred, act)
    ref = [pearsonr(pred[:, t], act[:, t])[0] for t in range(5)]
    np.testing.assert_allclose(per, ref, rtol=1e-10)
    # a constant column is NaN and left out of the mean
    act[:, 2] = 1.0
    mean, per = linear_datamodeling_score(pred, act)
    assert np.isnan(per[2]) and mean == pytest.approx(np.nanmean(np.delete(per, 2)))


def test_draw_subsets_typed_and_legacy_keys_agree():
    a = draw_subsets(jax.random.key(7), 50, 0.5, 12)
    b = draw_subsets(jax.random.PRNGKey(7), 50, 0.5, 12)
    c = draw_subsets(7, 50, 0.5, 12)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert a.shape == (12, 50) and set(a.sum(1)) == {25}
    assert len({r.tobytes() for r in a}) == 12  # distinct subsets


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_bad_fraction_is_one_clear_line(fraction):
    with pytest.raises(PrivDebiasError, match=r"fraction must lie in \(0, 1\)"):
        draw_subsets(0, 100, fraction, 50)


def test_too_few_subsets_and_bad_groups_refused():
    with pytest.raises(PrivDebiasError, match="at least 10 subsets"):
        draw_subsets(0, 100, 0.5, 9)
    with pytest.raises(PrivDebiasError, match="keeps 0"):
        draw_subsets(0, 3, 0.1, 10)
    with pytest.raises(PrivDebiasError, match="outside"):
        removal_masks(5, [np.array([5])])
    with pytest.raises(PrivDebiasError, match="empty"):
        removal_masks(5, [np.array([], np.int64)])


# ------------------------------------------------------------------------------------------
# softmax regression on sklearn digits: the library's influence against sklearn retraining
# ------------------------------------------------------------------------------------------

L2 = 1e-2  # mean cross-entropy + (L2/2)‖W‖² (bias unpenalised), sklearn's C = 1/(L2·n)


def _digits(n_train: int, n_test: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    tr, te = order[:n_train], order[n_train : n_train + n_test]
    return x[tr], y[tr], x[te], y[te]


def _fit_sklearn(x, y):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0 / (L2 * len(y)), tol=1e-12, max_iter=20000)
    clf.fit(x, y)
    return clf


def _test_losses(clf, x, y) -> np.ndarray:
    logp = clf.predict_log_proba(x)
    return -logp[np.arange(len(y)), y]


def _loss_fn(params, batch):
    logits = batch.x @ params["head"]["kernel"] + params["head"]["bias"]
    return cross_entropy_loss(logits, batch) + 0.5 * L2 * jnp.sum(params["head"]["kernel"] ** 2)


def _data_loss(params, batch):
    return cross_entropy_loss(batch.x @ params["head"]["kernel"] + params["head"]["bias"], batch)


def _as_dataset(x, y) -> Dataset:
    n = len(y)
    return Dataset(x.astype(np.float32), y.astype(np.int32), np.zeros(n, np.int32), np.arange(n))


@pytest.fixture(scope="module")
def digits_problem():
    xtr, ytr, xte, yte = _digits(300, 20)
    clf = _fit_sklearn(xtr, ytr)
    params = {"head": {"kernel": jnp.asarray(clf.coef_.T, jnp.float32),
                       "bias": jnp.asarray(clf.intercept_, jnp.float32)}}
    train, test = _as_dataset(xtr, ytr), _as_dataset(xte, yte)
    # softmax logits are shift-invariant in the bias: a tiny damping fixes that null direction only
    problem = make_problem(_loss_fn, params, train, damping=1e-6)
    infl = influence_matrix(problem, train, test, solver="exact", test_loss_fn=_data_loss)

    def retrain(keep):
        return np.stack([_test_losses(_fit_sklearn(xtr[k], ytr[k]), xte, yte) for k in keep])

    return infl, _test_losses(clf, xte, yte), retrain, problem, train


def test_exact_influence_lds_against_sklearn_retraining(digits_problem):
    infl, base, retrain, _, _ = digits_problem
    assert infl.scores.shape == (300, 20) and infl.all_converged and infl.max_residual < 1e-3
    res = evaluate_lds(infl.scores, base, retrain, jax.random.key(0), fraction=0.9, num_subsets=12)
    # first-order influence of a strongly convex problem: close to the retrained ranking
    assert res.score >= 0.85, res.per_test
    assert res.rescore(infl.scores) == pytest.approx(res.score)
    # random scores carry no information: the LDS collapses
    noise = np.random.default_rng(1).normal(size=infl.scores.shape)
    assert abs(res.rescore(noise)) < 0.4


def test_leave_one_out_against_sklearn_retraining(digits_problem):
    infl, base, retrain, _, _ = digits_problem
    removed = list(np.argsort(-np.abs(infl.scores[:, 0]))[:12])  # the most influential on test 0
    out = evaluate_removals(infl.scores, base, retrain, [np.array([i]) for i in removed])
    r0 = pearsonr(out["predicted_change"][:, 0], out["actual_change"][:, 0])[0]
    assert r0 >= 0.9, (out["predicted_change"][:, 0], out["actual_change"][:, 0])
    assert out["pearson"] >= 0.8


def test_empty_test_set_refused(digits_problem):
    _, _, _, problem, train = digits_problem
    empty = Dataset(*(np.asarray(v)[:0] for v in train))
    with pytest.raises(PrivDebiasError, match="test set has no samples"):
        influence_matrix(problem, train, empty, solver="exact")


def test_empirical_fisher_is_mean_outer_product_of_per_example_grads(digits_problem):
    _, _, _, _, train = digits_problem
    small = Dataset(*(np.asarray(v)[:40] for v in train))
    params = {"head": {"kernel": jnp.asarray(np.random.default_rng(2).normal(scale=0.1, size=(64, 10)), jnp.float32),
                       "bias": jnp.zeros(10, jnp.float32)}}
    problem = make_problem(_data_loss, params, small, curvature="empirical_fisher", damping=0.0)
    g = np.asarray(per_example_grads(problem, small), np.float64)
    want = g.T @ g / len(g)
    got = np.asarray(dense_curvature(problem), np.float64)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_exact_too_large_is_refused_before_allocating(digits_problem):
    from privdebias_jax.influence.solvers import check_dense_fits

    assert check_dense_fits(1000, available=10**9) == 3 * 4 * 1000**2
    with pytest.raises(PrivDebiasError, match=r"256,000 × 256,000 curvature needs about 732.4 GiB"):
        check_dense_fits(256_000, available=24 * 2**30)
    # a problem of 256k parameters: refused by the exact solver's prepare, before any product
    _, _, _, _, train = digits_problem
    big = {"head": {"kernel": jnp.zeros((64, 4000), jnp.float32), "bias": jnp.zeros(4000, jnp.float32)}}
    problem = make_problem(_data_loss, big, train)
    with pytest.raises(PrivDebiasError, match="exact: a dense 260,000 × 260,000 curvature"):
        influence_matrix(problem, train, train, solver="exact")


def test_unknown_solver_and_curvature_names(digits_problem):
    _, _, _, problem, train = digits_problem
    with pytest.raises(PrivDebiasError, match="unknown inverse-HVP solver 'newton'"):
        influence_matrix(problem, train, train, solver="newton")
    with pytest.raises(PrivDebiasError, match="unknown curvature 'fisher'"):
        make_problem(_data_loss, problem.params, train, curvature="fisher")


def test_per_example_products_equal_flat_gradients_times_vectors(digits_problem):
    from privdebias_jax.data import as_batch
    from privdebias_jax.influence import per_example_products

    _, _, _, problem, train = digits_problem
    small = Dataset(*(np.asarray(v)[:37] for v in train))  # 37 rows in chunks of 16: the last one padded
    g = np.asarray(per_example_grads(problem, small), np.float64)
    vecs = np.random.default_rng(3).normal(size=(problem.num_params, 4)).astype(np.float32)
    got = per_example_products(problem, small, jnp.asarray(vecs), chunk_size=16)
    np.testing.assert_allclose(got, g @ vecs, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(per_example_products(problem, small, jnp.asarray(vecs[:, 0]), chunk_size=16),
                               g @ vecs[:, 0], rtol=1e-4, atol=1e-5)
    masked = as_batch(small)._replace(mask=np.r_[np.ones(30), np.zeros(7)].astype(np.float32))
    np.testing.assert_allclose(per_example_products(problem, masked, jnp.asarray(vecs))[30:], 0.0)
    with pytest.raises(PrivDebiasError, match=r"expected \(650, T\)"):
        per_example_products(problem, small, jnp.ones((3, 2)))
