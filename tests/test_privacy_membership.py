"""Membership-inference scores against hand computations, LiRA against a direct Gaussian fit,
and the whole suite on a memorising model (AUC ≈ 1) and on unseen data (AUC ≈ 0.5)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.stats import norm

from privdebias_jax.data import Dataset, load_dataset, subset
from privdebias_jax.models import create_model
from privdebias_jax.privacy import membership as mi
from privdebias_jax.privacy.attacks import (
    attack_suite,
    check_member_sets,
    half_memberships,
    train_reference_models,
)
from privdebias_jax.train import create_train_state, fit, make_optimizer
from privdebias_jax.types import PrivDebiasError

RNG = np.random.default_rng(0)
Z = RNG.normal(size=(6, 4)) * 2
Y = np.array([0, 1, 2, 3, 0, 1])
P = np.exp(Z) / np.exp(Z).sum(1, keepdims=True)
PY = P[np.arange(6), Y]


def test_scores_match_hand_formulas():
    np.testing.assert_allclose(mi.loss_score(Z, Y), np.log(PY))
    np.testing.assert_allclose(mi.confidence_score(Z, Y), PY)
    np.testing.assert_allclose(mi.entropy_score(Z), np.sum(P * np.log(P), 1))
    mentr = [
        -(1 - P[i, Y[i]]) * np.log(P[i, Y[i]])
        - sum(P[i, j] * np.log(1 - P[i, j]) for j in range(4) if j != Y[i])
        for i in range(6)
    ]
    np.testing.assert_allclose(mi.modified_entropy_score(Z, Y), -np.asarray(mentr))
    np.testing.assert_allclose(mi.scaled_logit(Z, Y), np.log(PY / (1 - PY)), rtol=1e-10)


def test_scaled_logit_is_stable_for_confident_outputs():
    z = np.array([[60.0, 0.0, 0.0]])
    assert np.isfinite(mi.scaled_logit(z, [0])[0])
    np.testing.assert_allclose(mi.scaled_logit(z, [0]), 60.0 - np.log(2.0))


def test_loss_moments_match_definition():
    losses = RNG.random((4, 7)) + 0.05
    expected = np.array([[np.mean(row**p) ** (1 / p) for p in range(1, 21)] for row in losses])
    np.testing.assert_allclose(mi.loss_moments(losses), expected, rtol=1e-9)


def test_augment_shifts_images_and_keeps_mass_inside():
    x = np.zeros((3, 7, 7, 1), np.float32)
    x[:, 3, 3] = 1.0
    out = mi.augment(x, jax.random.PRNGKey(1), max_shift=2)
    assert np.all(out.sum((1, 2, 3)) == 1.0)
    pos = [np.argwhere(o[..., 0])[0] for o in out]
    assert all(np.abs(p - 3).max() <= 2 for p in pos)


def test_lira_matches_direct_gaussian_fit():
    ref = RNG.normal(size=(8, 5))
    inn = half_memberships(8, 5, jax.random.PRNGKey(0))
    assert np.all(inn.sum(0) == 4)
    phi = RNG.normal(size=5)
    online = mi.lira_scores(phi, ref, inn, online=True)
    offline = mi.lira_scores(phi, ref, inn, online=False)
    for i in range(5):
        a, b = ref[inn[:, i] == 1, i], ref[inn[:, i] == 0, i]
        expected = norm.logpdf(phi[i], a.mean(), a.std(ddof=1) + 1e-6) - norm.logpdf(
            phi[i], b.mean(), b.std(ddof=1) + 1e-6
        )
        np.testing.assert_allclose(online[i], expected, rtol=1e-6)
        np.testing.assert_allclose(
            offline[i], norm.logcdf((phi[i] - b.mean()) / (b.std(ddof=1) + 1e-6)), rtol=1e-6
        )


def test_bad_inputs_raise():
    with pytest.raises(PrivDebiasError, match="NaN"):
        mi.loss_score(np.array([[np.nan, 0.0]]), [0])
    with pytest.raises(PrivDebiasError, match="labels"):
        mi.loss_score(Z, np.full(6, 9))
    with pytest.raises(PrivDebiasError, match="even"):
        half_memberships(3, 5, jax.random.PRNGKey(0))
    with pytest.raises(PrivDebiasError, match="OUT"):
        mi.lira_scores(np.zeros(2), np.zeros((2, 2)), np.ones((2, 2)))
    ds = load_dataset("colored-mnist", train_size=100).train
    with pytest.raises(PrivDebiasError, match="overlap"):
        check_member_sets(subset(ds, np.arange(10)), subset(ds, np.arange(5, 20)))
    with pytest.raises(PrivDebiasError, match="non-members"):
        check_member_sets(subset(ds, np.arange(10)), subset(ds, np.arange(0)))


@pytest.fixture(scope="module")
def memorising_setup():
    """A wide MLP trained long on 60 random-label samples memorises them."""
    splits = load_dataset("colored-mnist", train_size=400)
    train = subset(splits.train, np.arange(60))
    rng = np.random.default_rng(0)
    y_random = rng.integers(0, 10, len(train)).astype(np.int32)  # random labels: pure memorisation
    train = Dataset(train.x, y_random, train.a, train.idx)
    non = subset(splits.test, np.arange(60))
    non = Dataset(non.x, rng.integers(0, 10, len(non)).astype(np.int32), non.a, non.idx)
    model = create_model("mlp", 10, hidden=(256,))
    tx = make_optimizer("adam", 3e-3)
    state = create_train_state(model, tx, jax.random.PRNGKey(0), train.x.shape[1:])
    state = fit(
        model,
        tx,
        state,
        train,
        epochs=150,
        batch_size=30,
        key=jax.random.PRNGKey(1),
        progress=False,
    ).state
    return model, tx, state, train, non, splits


def test_memorised_training_set_gives_auc_near_one(memorising_setup):
    model, tx, state, train, non, _ = memorising_setup
    ref = train_reference_models(
        model,
        tx,
        _concat(train, non),
        4,
        key=jax.random.PRNGKey(3),
        epochs=60,
        batch_size=30,
        layout="lanes",  # per-sample halves; teams are checked against plain training in test_privacy_shadow.py
    )
    suite = attack_suite(
        (model, state.params, state.model_state),
        train,
        non,
        key=jax.random.PRNGKey(2),
        attacks=("loss", "m_mean", "m_moments", "lira_online", "lira_offline", "shadow"),
        reference=ref,
        k=4,
        num_resamples=100,
        slices=False,
    )
    assert suite["attacks"]["loss"]["auc"]["value"] > 0.95
    for name in ("lira_online", "lira_offline"):  # 4 reference models only
        assert suite["attacks"][name]["auc"]["value"] > 0.9, (name, suite["attacks"][name]["auc"])
    # shifted copies blur what a pixel MLP memorised, so the augmentation attacks score lower
    assert suite["attacks"]["m_mean"]["auc"]["value"] > 0.8
    assert suite["attacks"]["m_moments"]["auc"]["value"] > 0.8
    assert suite["attacks"]["shadow"]["auc"]["value"] > 0.8


def test_unseen_sets_give_auc_at_chance(memorising_setup):
    model, _, state, _, _, splits = memorising_setup
    a = subset(splits.test, np.arange(100, 200))
    b = subset(splits.train, np.arange(200, 300))  # never trained on: the model saw only rows 0..59
    suite = attack_suite(
        (model, state.params, state.model_state),
        b,
        a,
        key=jax.random.PRNGKey(4),
        attacks=("loss", "entropy"),
        num_resamples=300,
        slices=False,
    )
    for rep in suite["attacks"].values():
        assert rep["auc"]["ci_low"] <= 0.5 <= rep["auc"]["ci_high"], rep["auc"]


def _concat(a, b):
    from privdebias_jax.data import concat

    return concat(a, b)
