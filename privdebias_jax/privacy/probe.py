"""Attribute inference: how much of the private attribute a linear probe reads from features.

The leakage test of seed paper 001 (after Barbano et al.'s "private class accuracy"): freeze a
trained model, take its bottleneck features ``h(x)`` (the last hidden layer, the ``features``
output of every model of :mod:`privdebias_jax.models`) and train a *linear* classifier to
predict the protected attribute ``a`` from them. High probe accuracy on held-out samples means
the representation still encodes the attribute; a debiased (or private) model should push it
down to chance, the accuracy of always guessing the most frequent value.

The probe is multinomial logistic regression on standardised features
``z = (h − μ_train) / σ_train``::

    p(a = k | z) = softmax(z W + b)_k,
    J(W, b) = (1/n) Σ_i −log p(a_i | z_i) + (λ/2) ‖W‖²_F,

minimised full-batch with L-BFGS (``optax.lbfgs`` with its zoom line search) until the
gradient norm falls below ``tol`` or with Adam for a fixed number of steps. ``λ = 1/(C n)``
gives the solution of ``sklearn.linear_model.LogisticRegression(C=C)`` (which penalises
``½‖W‖²`` against the *summed* loss and leaves the intercept free, as here).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from privdebias_jax.data.dataset import Dataset
from privdebias_jax.privacy.metrics import wilson_interval
from privdebias_jax.train import predict
from privdebias_jax.types import ModelState, Params, PrivDebiasError, PRNGKey

#: The smallest dataset :func:`probe_features` / :func:`attribute_probe` will split.
MIN_PROBE_SAMPLES = 10


class LinearProbe(NamedTuple):
    """A trained softmax probe: ``logits = ((h − mean) / scale) @ weights + bias``.

    ``loss`` is the final objective ``J``, ``grad_norm`` its gradient norm and ``steps`` the
    optimiser steps taken (diagnostics of convergence).
    """

    weights: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    num_attributes: int
    loss: float
    grad_norm: float
    steps: int


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def _check_features(features: Any, name: str = "features") -> np.ndarray:
    h = np.asarray(features)
    if h.ndim != 2:
        raise PrivDebiasError(
            f"`{name}` must be a 2-D array (samples × features), got shape {h.shape}"
        )
    if not (np.issubdtype(h.dtype, np.floating) or np.issubdtype(h.dtype, np.integer)):
        raise PrivDebiasError(f"`{name}` must hold real numbers, got dtype {h.dtype}")
    h = h.astype(np.float32)
    bad = ~np.isfinite(h).all(axis=1)
    if bad.any():
        raise PrivDebiasError(
            f"`{name}` hold NaN or inf in {int(bad.sum())} of {h.shape[0]} samples"
        )
    return h


def _check_attribute(a: Any, n: int, num_attributes: int, name: str = "a") -> np.ndarray:
    if a is None:
        raise PrivDebiasError("the data have no attribute `a` to probe for")
    a = np.asarray(a)
    if a.ndim != 1 or a.shape[0] != n:
        raise PrivDebiasError(
            f"`{name}` must be 1-D with one value per sample ({n}), got shape {a.shape}"
        )
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not (
            np.issubdtype(a.dtype, np.floating)
            and np.all(np.isfinite(a))
            and np.all(a == np.round(a))
        ):
            raise PrivDebiasError(
                f"`{name}` must hold integer attribute values, got dtype {a.dtype}"
            )
    if int(num_attributes) < 2:
        raise PrivDebiasError(f"num_attributes must be at least 2, got {num_attributes}")
    if a.size and (a.min() < 0 or a.max() >= int(num_attributes)):
        raise PrivDebiasError(
            f"attribute values out of range [0, {int(num_attributes)}): min {a.min()}, max {a.max()}"
        )
    return a.astype(np.int32)


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------


def _bucket(size: int, minimum: int) -> int:
    """The next power of two ≥ ``size`` (at least ``minimum``): padded shapes, so probes of
    similar sizes share one compiled program."""
    return max(int(minimum), 1 << max(0, int(size) - 1).bit_length())


def _objective(
    params: dict, z: jax.Array, a: jax.Array, wts: jax.Array, l2: jax.Array
) -> jax.Array:
    logits = z @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, a)
    return jnp.sum(ce * wts) / jnp.sum(wts) + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("max_steps",))
def _fit_lbfgs(
    params: dict,
    z: jax.Array,
    a: jax.Array,
    wts: jax.Array,
    l2: jax.Array,
    tol: jax.Array,
    max_steps: int,
):
    fun = functools.partial(_objective, z=z, a=a, wts=wts, l2=l2)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(p, updates), state

    def keep_going(carry):
        _, state = carry
        count = otu.tree_get(state, "count")
        gnorm = otu.tree_norm(otu.tree_get(state, "grad"))
        return (count == 0) | ((count < max_steps) & (gnorm >= tol))

    params, state = jax.lax.while_loop(keep_going, step, (params, opt.init(params)))
    value, grad = jax.value_and_grad(fun)(params)
    return params, value, otu.tree_norm(grad), otu.tree_get(state, "count")


@functools.partial(jax.jit, static_argnames=("max_steps",))
def _fit_adam(
    params: dict,
    z: jax.Array,
    a: jax.Array,
    wts: jax.Array,
    l2: jax.Array,
    lr: jax.Array,
    max_steps: int,
):
    fun = functools.partial(_objective, z=z, a=a, wts=wts, l2=l2)
    opt = optax.adam(lr)

    def step(carry, _):
        p, state = carry
        grad = jax.grad(fun)(p)
        updates, state = opt.update(grad, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=max_steps)
    value, grad = jax.value_and_grad(fun)(params)
    return params, value, otu.tree_norm(grad), jnp.asarray(max_steps)


def train_probe(
    features_train: Any,
    a_train: Any,
    num_attributes: int,
    *,
    key: PRNGKey,
    l2: float = 1e-4,
    method: str = "lbfgs",
    steps: int = 500,
    tol: float = 1e-5,
    learning_rate: float = 0.05,
) -> LinearProbe:
    """Fit the linear softmax probe ``p(a | h) = softmax(((h − μ)/σ) W + b)``.

    Minimises ``J(W, b) = (1/n) Σ_i CE(softmax(z_i W + b), a_i) + (l2/2) ‖W‖²_F`` (multinomial
    logistic regression, as the linear "private attribute" probe of Barbano et al. used in seed
    paper 001) on features standardised with the training mean ``μ`` and standard deviation
    ``σ`` (``σ = 1`` for constant features). ``method = "lbfgs"``: full-batch L-BFGS until
    ``‖∇J‖ < tol`` or ``steps`` iterations; ``"adam"``: ``steps`` full-batch Adam steps with
    ``learning_rate``. ``l2 = 1/(C n)`` matches ``sklearn.linear_model.LogisticRegression(C)``.
    ``key`` draws the (small, ``N(0, 0.01²)``) initial weights; the objective is convex, so the
    solution does not depend on it. Rows and feature columns are zero-padded to powers of two
    (rows with weight 0), so probes of similar sizes reuse one compiled program.

    Raises:
      PrivDebiasError: non-2-D or non-finite features, attributes of the wrong length or
        outside ``[0, num_attributes)``, ``num_attributes < 2``, fewer than 2 samples, a
        negative ``l2``, non-positive ``steps``, or an unknown ``method``.
    """
    h = _check_features(features_train, "features_train")
    a = _check_attribute(a_train, h.shape[0], num_attributes, "a_train")
    if h.shape[0] < 2:
        raise PrivDebiasError(f"the probe needs at least 2 training samples, got {h.shape[0]}")
    if not float(l2) >= 0.0:
        raise PrivDebiasError(f"l2 must be non-negative, got {l2}")
    if int(steps) < 1:
        raise PrivDebiasError(f"steps must be positive, got {steps}")
    if method not in ("lbfgs", "adam"):
        raise PrivDebiasError(f"unknown probe optimiser {method!r}; expected 'lbfgs' or 'adam'")
    k = int(num_attributes)
    mean = h.mean(axis=0)
    scale = h.std(axis=0)
    scale = np.where(scale > 1e-8 * np.maximum(1.0, np.abs(mean)), scale, 1.0).astype(np.float32)
    # pad rows (weight 0) and feature columns (z = 0, so their weights only meet the penalty,
    # stay ~0 and are dropped) to bucketed sizes: one compilation serves many probe sizes
    n, f = h.shape
    n_pad, f_pad = _bucket(n, 64), _bucket(f, 8)
    z = np.zeros((n_pad, f_pad), np.float32)
    z[:n, :f] = (h - mean) / scale
    a_pad = np.zeros(n_pad, np.int32)
    a_pad[:n] = a
    wts = (np.arange(n_pad) < n).astype(np.float32)
    params = {
        "w": 0.01 * jax.random.normal(key, (f_pad, k), jnp.float32),
        "b": jnp.zeros((k,), jnp.float32),
    }
    args = (
        params,
        jnp.asarray(z),
        jnp.asarray(a_pad),
        jnp.asarray(wts),
        jnp.asarray(float(l2), jnp.float32),
    )
    if method == "lbfgs":
        params, value, gnorm, count = _fit_lbfgs(
            *args, jnp.asarray(float(tol), jnp.float32), int(steps)
        )
    else:
        params, value, gnorm, count = _fit_adam(
            *args, jnp.asarray(float(learning_rate), jnp.float32), int(steps)
        )
    w, b = np.asarray(params["w"])[:f], np.asarray(params["b"])
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
        raise PrivDebiasError("probe training diverged (non-finite weights); try a larger l2")
    return LinearProbe(
        w, b, mean.astype(np.float32), scale, k, float(value), float(gnorm), int(count)
    )


def probe_logits(probe: LinearProbe, features: Any) -> np.ndarray:
    """``((h − μ) / σ) W + b``: the probe's logits ``(N, num_attributes)``.

    Raises:
      PrivDebiasError: for non-2-D or non-finite features or a feature width the probe was not
        trained on.
    """
    h = _check_features(features)
    if h.shape[1] != probe.weights.shape[0]:
        raise PrivDebiasError(
            f"the probe was trained on {probe.weights.shape[0]} features, got {h.shape[1]}"
        )
    return ((h - probe.mean) / probe.scale) @ probe.weights + probe.bias


def probe_predict(probe: LinearProbe, features: Any) -> np.ndarray:
    """``argmax_k p(a = k | h)``: the attribute the probe reads, ``(N,)`` int32."""
    return np.argmax(probe_logits(probe, features), axis=-1).astype(np.int32)


def probe_accuracy(probe: LinearProbe, features: Any, a: Any) -> float:
    """``(1/N) Σ_i [argmax_k p(a = k | h_i) = a_i]``: the probe's attribute accuracy.

    Raises:
      PrivDebiasError: for bad features, attributes of the wrong length or out of range, or no
        samples.
    """
    pred = probe_predict(probe, features)
    a = _check_attribute(a, pred.shape[0], probe.num_attributes)
    if a.size == 0:
        raise PrivDebiasError("probe_accuracy: no samples")
    return float(np.mean(pred == a))


# ------------------------------------------------------------------------------------------
# the audit
# ------------------------------------------------------------------------------------------


def split_rows(
    n: int, test_fraction: float, key: PRNGKey, min_train: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """A random split of ``range(n)`` into train and test rows (``round(test_fraction · n)`` test
    rows, at least one), drawn with ``jax.random.permutation(key, n)``; both sorted.

    Raises:
      PrivDebiasError: if ``test_fraction`` is not in ``(0, 1)`` or the train part would have
        fewer than ``min_train`` rows.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise PrivDebiasError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = max(1, int(round(float(test_fraction) * n)))
    if n - n_test < min_train:
        raise PrivDebiasError(
            f"too few samples ({n}) to keep {min_train} for training at test_fraction {test_fraction}"
        )
    perm = np.asarray(jax.random.permutation(key, n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def probe_features(
    features: Any,
    a: Any,
    num_attributes: int,
    *,
    key: PRNGKey,
    test_fraction: float = 0.3,
    level: float = 0.95,
    **train_options: Any,
) -> dict[str, Any]:
    """Split ``(features, a)`` by ``key``, train :func:`train_probe` on one part, test on the other.

    Returns JSON-ready numbers:

    * ``accuracy``: probe accuracy on the probe-test rows, with ``ci_low`` / ``ci_high`` its
      Wilson interval at ``level`` (:func:`~privdebias_jax.privacy.metrics.wilson_interval`);
    * ``chance``: ``max_k`` frequency of ``a = k`` among the probe-test rows (always guessing
      the most common value), ``chance_uniform = 1 / num_attributes``;
    * ``train_accuracy``, ``n_train``, ``n_test``, ``num_attributes``, ``feature_dim``;
    * ``degenerate``: true when the probe-train rows hold a single attribute value (nothing to
      learn; accuracy then equals the frequency of that value).

    ``train_options`` go to :func:`train_probe` (``l2``, ``method``, ``steps``, ...).

    Raises:
      PrivDebiasError: fewer than :data:`MIN_PROBE_SAMPLES` samples, NaN / inf features,
        attributes out of range for ``num_attributes`` or of the wrong length, a bad
        ``test_fraction`` or ``level``.
    """
    h = _check_features(features)
    a = _check_attribute(a, h.shape[0], num_attributes)
    n = h.shape[0]
    if n < MIN_PROBE_SAMPLES:
        raise PrivDebiasError(f"too few samples to probe: {n} (need at least {MIN_PROBE_SAMPLES})")
    k_split, k_train = jax.random.split(key)
    tr, te = split_rows(n, test_fraction, k_split)
    probe = train_probe(h[tr], a[tr], num_attributes, key=k_train, **train_options)
    pred = probe_predict(probe, h[te])
    correct = int(np.sum(pred == a[te]))
    lo, hi = wilson_interval(correct, te.size, level)
    counts = np.bincount(a[te], minlength=int(num_attributes))
    return {
        "accuracy": correct / te.size,
        "ci_low": lo,
        "ci_high": hi,
        "ci_level": float(level),
        "chance": float(counts.max() / te.size),
        "chance_uniform": 1.0 / int(num_attributes),
        "train_accuracy": float(np.mean(probe_predict(probe, h[tr]) == a[tr])),
        "n_train": int(tr.size),
        "n_test": int(te.size),
        "num_attributes": int(num_attributes),
        "feature_dim": int(h.shape[1]),
        "degenerate": bool(np.unique(a[tr]).size < 2),
        "probe_steps": probe.steps,
        "probe_grad_norm": probe.grad_norm,
    }


def attribute_probe(
    model: nn.Module,
    params: Params,
    model_state: ModelState,
    dataset: Dataset,
    num_attributes: int,
    *,
    key: PRNGKey,
    test_fraction: float = 0.3,
    level: float = 0.95,
    batch_size: int = 500,
    **train_options: Any,
) -> dict[str, Any]:
    """Attribute-inference audit of a trained model: how well a linear probe on its bottleneck
    features predicts the protected attribute ``dataset.a`` (seed paper 001, Barbano et al.).

    Features are ``predict(model, params, model_state, dataset)[1]`` (evaluation mode); the
    rest is :func:`probe_features` (random probe-train / probe-test split of ``dataset`` drawn
    with ``key``, ``test_fraction`` held out). Compare ``accuracy`` (and its interval) with
    ``chance``: a representation that does not encode the attribute stays at chance.

    Raises:
      PrivDebiasError: a dataset without a usable attribute ``a`` (missing, wrong length, out
        of range for ``num_attributes``), fewer than :data:`MIN_PROBE_SAMPLES` samples, or
        NaN / inf features.
    """
    if not isinstance(dataset, Dataset):
        raise PrivDebiasError(f"attribute_probe expects a Dataset, got {type(dataset).__name__}")
    n = len(dataset)
    a = _check_attribute(dataset.a, n, num_attributes, "dataset.a")
    if n < MIN_PROBE_SAMPLES:
        raise PrivDebiasError(f"too few samples to probe: {n} (need at least {MIN_PROBE_SAMPLES})")
    _, features = predict(model, params, model_state, dataset, batch_size=batch_size)
    features = np.asarray(features).reshape(n, -1)
    if not np.all(np.isfinite(features)):
        raise PrivDebiasError("the model's features hold NaN or inf values")
    return probe_features(
        features,
        a,
        num_attributes,
        key=key,
        test_fraction=test_fraction,
        level=level,
        **train_options,
    )


__all__ = [
    "MIN_PROBE_SAMPLES",
    "LinearProbe",
    "train_probe",
    "probe_logits",
    "probe_predict",
    "probe_accuracy",
    "split_rows",
    "probe_features",
    "attribute_probe",
]
