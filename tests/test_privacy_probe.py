"""Tests of the feature-leakage audits: the attribute probe (privdebias_jax.privacy.probe) and
the reconstruction attack (privdebias_jax.privacy.reconstruction)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from privdebias_jax.data import load_dataset, make_dataset
from privdebias_jax.data.dataset import Dataset
from privdebias_jax.models import init_model
from privdebias_jax.privacy import probe as P
from privdebias_jax.privacy import reconstruction as R
from privdebias_jax.train import predict
from privdebias_jax.types import PrivDebiasError


def _planted(seed: int, n: int, k: int, dim: int = 12, signal: float = 1.0):
    """Features ``h = [onehot(a) · signal, noise] @ A + b`` (a random invertible mix)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, k, n)
    base = np.concatenate([signal * np.eye(k)[a], rng.normal(size=(n, dim - k))], axis=1)
    mix = rng.normal(size=(dim, dim)) + 3 * np.eye(dim)
    return (base @ mix + rng.normal(size=dim)).astype(np.float32), a.astype(np.int32)


# ------------------------------------------------------------------------------------------
# the probe against sklearn
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_probe_matches_sklearn_logistic_regression(method):
    rng = np.random.default_rng(0)
    n, f, k = 500, 16, 4
    h = (rng.normal(size=(n, f)) * rng.uniform(0.5, 3, f) + rng.normal(size=f)).astype(np.float32)
    a = np.argmax(h @ rng.normal(size=(f, k)) * 0.4 + rng.gumbel(size=(n, k)), axis=1)
    h_te = (rng.normal(size=(300, f)) * rng.uniform(0.5, 3, f)).astype(np.float32)
    l2 = 1e-3
    steps = 500 if method == "lbfgs" else 1500
    probe = P.train_probe(h, a, k, key=jax.random.key(0), l2=l2, method=method, steps=steps)
    mean, std = h.mean(0), h.std(0)
    sk = LogisticRegression(C=1.0 / (n * l2), max_iter=5000, tol=1e-8).fit((h - mean) / std, a)
    for x, y in ((h, a), (h_te, None)):
        ours = P.probe_predict(probe, x)
        ref = sk.predict((x - mean) / std)
        assert np.mean(ours == ref) >= 0.98
        if y is not None:
            assert abs(P.probe_accuracy(probe, x, y) - sk.score((x - mean) / std, y)) <= 0.02
    # same optimum: sklearn's multinomial coefficients are centred over classes, as ours are
    np.testing.assert_allclose(probe.weights, sk.coef_.T, atol=2e-3)
    assert probe.grad_norm < 1e-3


def test_probe_recovers_planted_attribute():
    h, a = _planted(1, 600, 4, dim=16)  # padded shape of the sklearn test: one compilation
    out = P.probe_features(h, a, 4, key=jax.random.key(1))
    json.dumps(out)
    assert out["accuracy"] >= 0.97
    assert out["ci_low"] > out["chance"]
    assert out["n_train"] + out["n_test"] == 600 and out["n_test"] == 180
    assert out["chance_uniform"] == pytest.approx(0.25)
    assert out["degenerate"] is False


@pytest.mark.parametrize("seed", [2, 3])
def test_probe_stays_at_chance_on_independent_features(seed):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(600, 12)).astype(np.float32)
    a = rng.choice(4, size=600, p=[0.45, 0.3, 0.15, 0.1])  # skewed: chance = majority frequency
    out = P.probe_features(h, a, 4, key=jax.random.key(seed))
    assert out["ci_low"] <= out["chance"] <= out["ci_high"]
    assert out["accuracy"] < out["chance"] + 0.08


def test_probe_degenerate_attribute():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(40, 12))  # same padded shape as test_probe_bad_input: one compilation
    out = P.probe_features(h, np.full(40, 2), 3, key=jax.random.key(0))
    assert out["degenerate"] is True
    assert out["accuracy"] == 1.0 and out["chance"] == 1.0


def test_attribute_probe_reads_model_features(colored8, tiny_mlp):
    ds = colored8.test_unbiased
    params, state = init_model(tiny_mlp, jax.random.key(0), colored8.input_shape)
    key = jax.random.key(5)
    out = P.attribute_probe(tiny_mlp, params, state, ds, colored8.num_attributes, key=key)
    _, feats = predict(tiny_mlp, params, state, ds)
    assert out == P.probe_features(feats, ds.a, colored8.num_attributes, key=key)
    # even random ReLU features of coloured digits expose the colour linearly
    assert out["accuracy"] > out["chance"] + 0.3
    assert out["feature_dim"] == 16 and out["n_train"] + out["n_test"] == len(ds)


def test_probe_bad_input():
    h, a = _planted(0, 50, 3)
    key = jax.random.key(0)
    with pytest.raises(PrivDebiasError, match="out of range"):
        P.probe_features(h, a, 2, key=key)  # a has values 0..2
    with pytest.raises(PrivDebiasError, match="out of range"):
        P.train_probe(h, a - 1, 3, key=key)
    bad = h.copy()
    bad[3, 1] = np.nan
    with pytest.raises(PrivDebiasError, match="NaN"):
        P.probe_features(bad, a, 3, key=key)
    with pytest.raises(PrivDebiasError, match="too few"):
        P.probe_features(h[:5], a[:5], 3, key=key)
    with pytest.raises(PrivDebiasError, match="one value per sample"):
        P.probe_features(h, a[:10], 3, key=key)
    with pytest.raises(PrivDebiasError, match="at least 2"):
        P.train_probe(h, np.zeros(50, int), 1, key=key)
    with pytest.raises(PrivDebiasError, match="test_fraction"):
        P.probe_features(h, a, 3, key=key, test_fraction=1.0)
    with pytest.raises(PrivDebiasError, match="optimiser"):
        P.train_probe(h, a, 3, key=key, method="sgd")
    with pytest.raises(PrivDebiasError, match="2-D"):
        P.train_probe(h[:, 0], a, 3, key=key)
    with pytest.raises(PrivDebiasError, match="no attribute"):
        P.attribute_probe(None, None, {}, Dataset(h, a, None, np.arange(50)), 3, key=key)
    probe = P.train_probe(h, a, 3, key=key, steps=5)
    with pytest.raises(PrivDebiasError, match="trained on 12 features"):
        P.probe_predict(probe, h[:, :4])


# ------------------------------------------------------------------------------------------
# reconstruction
# ------------------------------------------------------------------------------------------


def test_decoder_inverts_linear_features_and_not_noise():
    rng = np.random.default_rng(0)
    n, side = 800, 4
    x = rng.uniform(size=(n, side, side, 1)).astype(np.float32)
    mix = rng.normal(size=(side * side, side * side))
    noise = rng.normal(size=(n, side * side))
    variance = float(x[600:].var(axis=0).mean())
    mse = {}
    for name, feats in (("linear", x.reshape(n, -1) @ mix), ("noise", noise)):
        fit = R.train_decoder(
            feats[:600], x[:600], key=jax.random.key(1), epochs=40, learning_rate=3e-3
        )
        assert fit.history.shape == (40,) and fit.history[-1] < fit.history[0]
        rec = R.reconstruct(fit.decoder, fit.params, feats[600:])
        assert rec.shape == (200, side, side, 1)
        mse[name] = float(np.mean((rec - x[600:]) ** 2))
    assert mse["linear"] < 0.15 * variance
    assert 0.9 * variance < mse["noise"] < 1.4 * variance


@pytest.mark.parametrize("name", ["colored-mnist", "biased-mnist"])
def test_colour_reader_on_mnist_variants(name):
    splits = load_dataset(name, train_size=200)
    for ds in (splits.train, splits.test_unbiased):
        assert np.mean(R.read_palette_colour(ds.x) == ds.a) >= 0.99
    with pytest.raises(PrivDebiasError, match="RGB"):
        R.read_palette_colour(splits.train.x[..., :1])


def test_reconstruction_attack_and_grid(colored8, tiny_mlp, tmp_path):
    params, state = init_model(tiny_mlp, jax.random.key(0), colored8.input_shape)
    out = R.reconstruction_attack(
        tiny_mlp,
        params,
        state,
        colored8.test_unbiased,
        key=jax.random.key(2),
        epochs=40,
        num_examples=5,
    )
    ex = out.pop("examples")
    json.dumps(out)
    assert out["mse"] < out["mse_mean_image"]
    assert out["reader_accuracy_on_originals"] >= 0.99
    assert out["attribute_readability"] > out["chance"] + 0.3
    assert out["chance_uniform"] == pytest.approx(0.1)
    assert ex["originals"].shape == ex["reconstructions"].shape == (5, 8, 8, 3)
    path = R.save_reconstruction_grid(
        ex["originals"], ex["reconstructions"], tmp_path / "g" / "grid.png"
    )
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(PrivDebiasError, match="differ in shape"):
        R.save_reconstruction_grid(ex["originals"], ex["reconstructions"][:3], tmp_path / "bad.png")


def test_reconstruction_bad_input(small_tabular):
    key = jax.random.key(0)
    x = np.zeros((20, 4, 4, 1), np.float32)
    h = np.ones((20, 3), np.float32)
    with pytest.raises(PrivDebiasError, match="lengths differ"):
        R.train_decoder(h[:10], x, key=key)
    bad = h.copy()
    bad[0, 0] = np.inf
    with pytest.raises(PrivDebiasError, match="NaN or inf"):
        R.train_decoder(bad, x, key=key)
    with pytest.raises(PrivDebiasError, match="epochs"):
        R.train_decoder(h, x, key=key, epochs=0)
    with pytest.raises(PrivDebiasError, match="RGB"):  # tabular data: no default colour reader
        R.reconstruction_attack(None, None, {}, small_tabular, key=key)
    tiny = make_dataset(np.zeros((5, 2, 2, 3)), np.zeros(5), np.zeros(5))
    with pytest.raises(PrivDebiasError, match="too few"):
        R.reconstruction_attack(None, None, {}, tiny, key=key)
