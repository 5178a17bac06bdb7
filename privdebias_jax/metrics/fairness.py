"""Fairness and bias metrics: accuracy by group, DP, EO, FMD counterfactual bias, KL / MI bias.

Everything here is a pure function of arrays (NumPy or JAX) and returns JAX arrays, except
:func:`fairness_report`, which returns Python floats.

**Accumulate, then divide.** Group metrics are computed from one sufficient statistic, the
count tensor ``C[y, a, ŷ]`` (true class × attribute value × predicted class) built by
:func:`confusion_counts`. An evaluator sums these tensors over batches and calls a
``*_from_counts`` function once at the end, so the result over a split into batches (with
padding rows masked out) equals the result on the whole set: averages are never averaged.

**Empty groups.** A rate that needs a group with no samples is never reported as NaN (the one
documented exception is :func:`cell_accuracy_from_counts`):

* max−min differences (demographic parity, equalized odds, worst-group accuracy) ignore groups
  with zero count; with fewer than two non-empty groups the difference is ``0``;
* per-group / per-class accuracies of an empty group or class are ``0`` (safe division): read
  them together with the counts (``C.sum((0, 2))`` for groups), as :func:`fairness_report` does;
* the KL bias gives classes with no samples weight ``0`` (and per-class KL ``0``).

**Validation.** Bad input raises :class:`~privdebias_jax.types.PrivDebiasError`: shapes or
lengths that disagree, labels out of range, non-integer labels, NaN / inf / negative values,
empty input (no samples, or total weight zero where a rate is needed), a prior that is not a
distribution. Shape checks always run; checks on *values* run only on concrete arrays, so
the functions still trace under ``jax.jit``. Under ``jit``, rows of :func:`confusion_counts`
with an out-of-range label are dropped (they cannot raise), and rates of an all-zero count
tensor are ``0``.

Counts are float32 (exact for integer counts below 2**24 per cell); they are float64 when the
input is float64 and ``jax_enable_x64`` is on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from privdebias_jax.types import Array, PrivDebiasError

# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as a NumPy array, or ``None`` when it is a tracer (inside ``jit`` / ``grad``)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _float_dtype(x: Any) -> Any:
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def _as_float(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(_float_dtype(x))


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PrivDebiasError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


def _check_labels(v: Any, n: int, size: int, name: str) -> jax.Array:
    """Check a 1-D integer label vector of length ``n`` with values in ``[0, size)``."""
    if np.ndim(v) != 1:
        raise PrivDebiasError(f"`{name}` must be 1-D, got shape {np.shape(v)}")
    if int(np.shape(v)[0]) != n:
        raise PrivDebiasError(
            f"length of `{name}` ({np.shape(v)[0]}) differs from the others ({n})"
        )
    arr = _concrete(v)
    dtype = jnp.asarray(v).dtype if arr is None else arr.dtype
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)):
        raise PrivDebiasError(f"`{name}` must hold integer labels, got dtype {dtype}")
    if arr is not None and arr.size and (arr.min() < 0 or arr.max() >= size):
        raise PrivDebiasError(
            f"`{name}` out of range [0, {size}): min {arr.min()}, max {arr.max()}"
        )
    return jnp.asarray(v).astype(jnp.int32)


def _check_scores(v: Any, n: int, width: int | None, name: str) -> None:
    """Check an ``(n, width)`` float score / probability / logit matrix for NaN and shape."""
    if np.ndim(v) != 2:
        raise PrivDebiasError(f"`{name}` must be 2-D (samples, classes), got shape {np.shape(v)}")
    if int(np.shape(v)[0]) != n:
        raise PrivDebiasError(
            f"length of `{name}` ({np.shape(v)[0]}) differs from the others ({n})"
        )
    if width is not None and int(np.shape(v)[1]) != width:
        raise PrivDebiasError(f"`{name}` must have {width} columns, got shape {np.shape(v)}")
    arr = _concrete(v)
    if arr is not None and not np.all(np.isfinite(arr)):
        raise PrivDebiasError(f"`{name}` holds NaN or inf values")


def _predictions(pred: Any, n: int, num_classes: int | None, name: str = "pred") -> jax.Array:
    """Predicted labels: ``pred`` itself when 1-D, ``argmax`` over the last axis when 2-D."""
    if np.ndim(pred) == 2:
        _check_scores(pred, n, num_classes, name)
        return jnp.argmax(jnp.asarray(pred), axis=-1).astype(jnp.int32)
    size = num_classes if num_classes is not None else np.iinfo(np.int32).max
    return _check_labels(pred, n, size, name)


def _check_mask(mask: Any, n: int) -> jax.Array:
    """A float weight per sample (1 = real, 0 = padding); ``None`` means all ones."""
    if mask is None:
        return jnp.ones((n,), jnp.float32)
    if np.ndim(mask) != 1 or int(np.shape(mask)[0]) != n:
        raise PrivDebiasError(f"`mask` must have shape ({n},), got {np.shape(mask)}")
    arr = _concrete(mask)
    if arr is not None:
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise PrivDebiasError("`mask` must hold finite, non-negative weights")
    return _as_float(mask)


def _check_counts(C: Any, ndim: int, name: str = "counts") -> jax.Array:
    """Check a count tensor (shape, finiteness, sign, non-empty) and return it as floats."""
    if np.ndim(C) != ndim:
        raise PrivDebiasError(f"`{name}` must be {ndim}-D, got shape {np.shape(C)}")
    if ndim == 3 and np.shape(C)[0] != np.shape(C)[2]:
        raise PrivDebiasError(
            f"`{name}` must have shape (num_classes, num_attributes, num_classes), got {np.shape(C)}"
        )
    if 0 in np.shape(C):
        raise PrivDebiasError(f"`{name}` is empty (shape {np.shape(C)})")
    arr = _concrete(C)
    if arr is not None:
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise PrivDebiasError(f"`{name}` holds NaN or inf values")
        if np.any(arr < 0):
            raise PrivDebiasError(f"`{name}` holds negative counts")
        if arr.sum() <= 0:
            raise PrivDebiasError(f"`{name}` is empty: total count is 0")
    return _as_float(C)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den > 0``, else ``0`` (gradient-safe)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def _range_over(values: jax.Array, valid: jax.Array, axis: int = -1) -> jax.Array:
    """``max − min`` of ``values`` along ``axis`` over entries where ``valid``; 0 if none."""
    hi = jnp.max(jnp.where(valid, values, -jnp.inf), axis=axis)
    lo = jnp.min(jnp.where(valid, values, jnp.inf), axis=axis)
    return jnp.where(jnp.any(valid, axis=axis), hi - lo, 0)


# --------------------------------------------------------------------------------------------
# The sufficient statistic
# --------------------------------------------------------------------------------------------


def confusion_counts(
    y: Array,
    a: Array,
    pred: Array,
    num_classes: int,
    num_attributes: int,
    mask: Array | None = None,
) -> jax.Array:
    """Count tensor ``C[y, a, ŷ] = Σ_i m_i · 1[y_i = y, a_i = a, ŷ_i = ŷ]``.

    Args:
      y: ``(N,)`` integer true classes in ``[0, num_classes)``.
      a: ``(N,)`` integer attribute values in ``[0, num_attributes)``.
      pred: ``(N,)`` integer predicted classes, or ``(N, num_classes)`` scores / logits /
        probabilities (the argmax is taken).
      num_classes, num_attributes: static sizes (Python ints; mark them static under ``jit``).
      mask: optional ``(N,)`` non-negative weights (1 = real sample, 0 = padding row).

    Returns:
      ``(num_classes, num_attributes, num_classes)`` float32 counts. Built with one
      ``segment_sum`` (no Python loop over samples), so it jits; sums over batches equal the
      counts of the whole set. ``N = 0`` or an all-zero mask gives a zero tensor (a fully
      padded batch is legal); the ``*_from_counts`` functions reject a zero total.

    Raises:
      PrivDebiasError: lengths disagree, labels are out of range or not integers, scores
        hold NaN, the mask is negative or non-finite. Under ``jit`` value checks cannot
        run: rows with an out-of-range label are then dropped.
    """
    num_classes = _check_positive_int(num_classes, "num_classes")
    num_attributes = _check_positive_int(num_attributes, "num_attributes")
    if np.ndim(y) != 1:
        raise PrivDebiasError(f"`y` must be 1-D, got shape {np.shape(y)}")
    n = int(np.shape(y)[0])
    y = _check_labels(y, n, num_classes, "y")
    a = _check_labels(a, n, num_attributes, "a")
    p = _predictions(pred, n, num_classes)
    w = _check_mask(mask, n)
    valid = (
        (y >= 0)
        & (y < num_classes)
        & (a >= 0)
        & (a < num_attributes)
        & (p >= 0)
        & (p < num_classes)
    )
    flat = (y * num_attributes + a) * num_classes + p
    flat = jnp.where(valid, flat, 0)
    w = jnp.where(valid, w, 0)
    size = num_classes * num_attributes * num_classes
    counts = jax.ops.segment_sum(w, flat, num_segments=size)
    return counts.reshape(num_classes, num_attributes, num_classes)


# --------------------------------------------------------------------------------------------
# Accuracies from counts
# --------------------------------------------------------------------------------------------


def accuracy_from_counts(C: Array) -> jax.Array:
    """Overall accuracy ``Σ_{y,a} C[y,a,y] / Σ C``.

    Raises:
      PrivDebiasError: ``C`` is not a valid count tensor or its total is 0.
    """
    C = _check_counts(C, 3)
    correct = jnp.trace(C, axis1=0, axis2=2).sum()
    return _safe_div(correct, C.sum())


def group_accuracy_from_counts(C: Array) -> jax.Array:
    """Accuracy per attribute value, ``(num_attributes,)``: ``Σ_y C[y,a,y] / Σ_{y,ŷ} C[y,a,ŷ]``.

    A group with no samples gets ``0`` (read it with the group counts ``C.sum((0, 2))``).
    """
    C = _check_counts(C, 3)
    correct = jnp.trace(C, axis1=0, axis2=2)  # (A,)
    return _safe_div(correct, C.sum(axis=(0, 2)))


def worst_group_accuracy_from_counts(C: Array) -> jax.Array:
    """Minimum of :func:`group_accuracy_from_counts` over the groups that have samples."""
    C = _check_counts(C, 3)
    acc = group_accuracy_from_counts(C)
    valid = C.sum(axis=(0, 2)) > 0
    return jnp.where(jnp.any(valid), jnp.min(jnp.where(valid, acc, jnp.inf)), 0)


def class_accuracy_from_counts(C: Array) -> jax.Array:
    """Accuracy (recall) per true class, ``(num_classes,)``: ``Σ_a C[y,a,y] / Σ_{a,ŷ} C[y,a,ŷ]``.

    A class with no samples gets ``0``.
    """
    C = _check_counts(C, 3)
    correct = jnp.diagonal(C.sum(axis=1))  # (C,)
    return _safe_div(correct, C.sum(axis=(1, 2)))


def cell_accuracy_from_counts(C: Array) -> jax.Array:
    """Accuracy per (class, attribute) cell, ``(num_classes, num_attributes)``.

    ``acc[y, a] = C[y,a,y] / Σ_ŷ C[y,a,ŷ]``. **NaN where a cell has no samples** (the only
    function of this module that returns NaN: an empty cell is common, e.g. in Colored MNIST,
    and 0 would read as a real accuracy).
    """
    C = _check_counts(C, 3)
    correct = jnp.diagonal(C, axis1=0, axis2=2).T  # (C, A): C[y, a, y]
    return correct / C.sum(axis=2)


def aligned_conflicting_accuracy_from_counts(C: Array) -> tuple[jax.Array, jax.Array]:
    """Accuracy on bias-aligned samples (``a == y``) and on bias-conflicting ones (``a != y``).

    Needs ``num_attributes == num_classes`` (the attribute is a "class colour", as in
    Colored / Biased MNIST). An empty subset (e.g. no conflicting samples at ρ = 1) gets 0.

    Returns:
      ``(aligned, conflicting)`` scalars.

    Raises:
      PrivDebiasError: ``num_attributes != num_classes``, or invalid counts.
    """
    C = _check_counts(C, 3)
    k, num_attr = C.shape[0], C.shape[1]
    if num_attr != k:
        raise PrivDebiasError(
            f"aligned/conflicting accuracy needs num_attributes == num_classes, got {num_attr} != {k}"
        )
    eye = jnp.eye(k, dtype=C.dtype)
    correct = jnp.diagonal(C, axis1=0, axis2=2).T  # (y, a): C[y, a, y]
    n_cell = C.sum(axis=2)  # (y, a)
    aligned = _safe_div((correct * eye).sum(), (n_cell * eye).sum())
    conflicting = _safe_div((correct * (1 - eye)).sum(), (n_cell * (1 - eye)).sum())
    return aligned, conflicting


# --------------------------------------------------------------------------------------------
# Group fairness from counts
# --------------------------------------------------------------------------------------------


def demographic_parity_difference_from_counts(C: Array) -> jax.Array:
    """Demographic parity difference.

    Binary (``num_classes == 2``): ``max_a P(ŷ=1 | a) − min_a P(ŷ=1 | a)``, equal to
    ``fairlearn.metrics.demographic_parity_difference``.
    Multi-class (one-vs-rest): ``max_c [max_a P(ŷ=c | a) − min_a P(ŷ=c | a)]``; for two
    classes the ``c = 0`` and ``c = 1`` terms are equal, so it reduces to the binary value.

    Groups with no samples are ignored; with fewer than two non-empty groups the value is 0.
    """
    C = _check_counts(C, 3)
    per_group_pred = C.sum(axis=0)  # (A, ŷ)
    n_a = per_group_pred.sum(axis=1)  # (A,)
    rate = _safe_div(per_group_pred, n_a[:, None])  # P(ŷ=c | a), (A, C)
    diff = _range_over(rate, (n_a > 0)[:, None], axis=0)  # (C,)
    return jnp.max(diff)


def equalized_odds_difference_from_counts(C: Array) -> jax.Array:
    """Equalized odds difference (worst case of the TPR and FPR gaps).

    Binary: ``max(max_a TPR_a − min_a TPR_a, max_a FPR_a − min_a FPR_a)`` with
    ``TPR_a = P(ŷ=1 | y=1, a)`` and ``FPR_a = P(ŷ=1 | y=0, a)``: equal to
    ``fairlearn.metrics.equalized_odds_difference`` (``agg='worst_case'``).
    Multi-class: ``max_c`` of the binary value for the one-vs-rest problem "y == c" vs
    "ŷ == c" (for two classes both terms are equal, so it reduces to the binary value).

    A group is ignored in the TPR gap of class ``c`` when it has no samples with ``y = c``,
    and in the FPR gap when it has none with ``y ≠ c``. (fairlearn instead scores such a
    group's rate as 0, so the two differ only when a group lacks positives or negatives.)
    """
    C = _check_counts(C, 3)
    n_ya = C.sum(axis=2)  # (y, a)
    # positives of class c in group a: y == c
    tp = jnp.diagonal(C, axis1=0, axis2=2).T  # (c, a): C[c, a, c]
    pos = n_ya  # (c, a)
    # negatives of class c in group a: y != c; false positives predict c
    pred_c = C.sum(axis=0).T  # (c, a): Σ_y C[y, a, c]
    fp = pred_c - tp
    neg = n_ya.sum(axis=0)[None, :] - pos  # (c, a)
    tpr_gap = _range_over(_safe_div(tp, pos), pos > 0, axis=1)
    fpr_gap = _range_over(_safe_div(fp, neg), neg > 0, axis=1)
    return jnp.max(jnp.maximum(tpr_gap, fpr_gap))


# --------------------------------------------------------------------------------------------
# Convenience: arrays in, metric out
# --------------------------------------------------------------------------------------------


def accuracy(y: Array, pred: Array, mask: Array | None = None) -> jax.Array:
    """Accuracy ``Σ_i m_i 1[ŷ_i = y_i] / Σ_i m_i`` (same as
    ``accuracy_from_counts(confusion_counts(...))``, without needing ``num_classes``).

    ``pred`` may be ``(N,)`` labels or ``(N, K)`` scores (argmax taken).

    Raises:
      PrivDebiasError: lengths disagree, negative labels, NaN scores, no samples or zero
        total weight.
    """
    if np.ndim(y) != 1:
        raise PrivDebiasError(f"`y` must be 1-D, got shape {np.shape(y)}")
    n = int(np.shape(y)[0])
    if n == 0:
        raise PrivDebiasError("accuracy of an empty input")
    big = int(np.iinfo(np.int32).max)
    yy = _check_labels(y, n, big, "y")
    p = _predictions(pred, n, None)
    w = _check_mask(mask, n)
    wc = _concrete(w)
    if wc is not None and wc.sum() <= 0:
        raise PrivDebiasError("accuracy: total mask weight is 0 (no samples)")
    return _safe_div(jnp.sum(w * (yy == p)), jnp.sum(w))


def group_accuracy(
    y: Array,
    a: Array,
    pred: Array,
    num_classes: int,
    num_attributes: int,
    mask: Array | None = None,
) -> jax.Array:
    """Accuracy per attribute value, ``(num_attributes,)`` (empty groups get 0)."""
    return group_accuracy_from_counts(
        confusion_counts(y, a, pred, num_classes, num_attributes, mask)
    )


def demographic_parity_difference(
    y: Array,
    a: Array,
    pred: Array,
    num_classes: int,
    num_attributes: int,
    mask: Array | None = None,
) -> jax.Array:
    """:func:`demographic_parity_difference_from_counts` of :func:`confusion_counts`."""
    return demographic_parity_difference_from_counts(
        confusion_counts(y, a, pred, num_classes, num_attributes, mask)
    )


def equalized_odds_difference(
    y: Array,
    a: Array,
    pred: Array,
    num_classes: int,
    num_attributes: int,
    mask: Array | None = None,
) -> jax.Array:
    """:func:`equalized_odds_difference_from_counts` of :func:`confusion_counts`."""
    return equalized_odds_difference_from_counts(
        confusion_counts(y, a, pred, num_classes, num_attributes, mask)
    )


def fairness_report_from_counts(C: Array) -> dict[str, Any]:
    """Every group metric of a count tensor, as Python numbers (JSON-ready).

    Keys: ``n`` (total weight), ``acc``, ``group_acc`` (list; 0 for an empty group),
    ``group_count`` (list), ``worst_group_acc`` (over non-empty groups), ``dp_diff``,
    ``eo_diff``; and when ``num_attributes == num_classes`` also ``acc_aligned``,
    ``acc_conflicting`` (0 for an empty subset), ``n_aligned``, ``n_conflicting``.
    """
    C = _check_counts(C, 3)
    group_count = C.sum(axis=(0, 2))
    report: dict[str, Any] = {
        "n": float(C.sum()),
        "acc": float(accuracy_from_counts(C)),
        "group_acc": [float(v) for v in group_accuracy_from_counts(C)],
        "group_count": [float(v) for v in group_count],
        "worst_group_acc": float(worst_group_accuracy_from_counts(C)),
        "dp_diff": float(demographic_parity_difference_from_counts(C)),
        "eo_diff": float(equalized_odds_difference_from_counts(C)),
    }
    if C.shape[0] == C.shape[1]:
        aligned, conflicting = aligned_conflicting_accuracy_from_counts(C)
        n_cell = C.sum(axis=2)
        n_aligned = jnp.trace(n_cell)
        report.update(
            acc_aligned=float(aligned),
            acc_conflicting=float(conflicting),
            n_aligned=float(n_aligned),
            n_conflicting=float(n_cell.sum() - n_aligned),
        )
    return report


def fairness_report(
    y: Array,
    a: Array,
    pred: Array,
    num_classes: int,
    num_attributes: int,
    mask: Array | None = None,
) -> dict[str, Any]:
    """:func:`fairness_report_from_counts` of :func:`confusion_counts` (Python floats)."""
    return fairness_report_from_counts(
        confusion_counts(y, a, pred, num_classes, num_attributes, mask)
    )


# --------------------------------------------------------------------------------------------
# FMD counterfactual bias (Chen et al., NeurIPS 2023)
# --------------------------------------------------------------------------------------------


def _check_probs(probs: Any, probs_cf: Any) -> int:
    if np.ndim(probs) != 2:
        raise PrivDebiasError(
            f"`probs` must be 2-D (samples, classes), got shape {np.shape(probs)}"
        )
    if np.shape(probs) != np.shape(probs_cf):
        raise PrivDebiasError(
            f"`probs` and `probs_cf` shapes differ: {np.shape(probs)} vs {np.shape(probs_cf)}"
        )
    n = int(np.shape(probs)[0])
    if n == 0 or int(np.shape(probs)[1]) == 0:
        raise PrivDebiasError("counterfactual bias of an empty input")
    for name, v in (("probs", probs), ("probs_cf", probs_cf)):
        arr = _concrete(v)
        if arr is None:
            continue
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise PrivDebiasError(f"`{name}` holds NaN or inf values")
        if np.any(arr < -1e-6) or np.any(arr > 1 + 1e-6):
            raise PrivDebiasError(f"`{name}` must hold probabilities in [0, 1] (logits given?)")
        if not np.allclose(arr.sum(axis=1), 1.0, atol=1e-3):
            raise PrivDebiasError(f"rows of `{name}` must sum to 1 (logits given?)")
    return n


def counterfactual_bias_per_sample(probs: Array, probs_cf: Array) -> jax.Array:
    """FMD bias of each counterfactual pair, ``(N,)``.

    ``B(c_i) = |p(ŷ_i | x_i, a_i) − p(ŷ_i | x_i, ā_i)|`` with ``ŷ_i = argmax probs_i``, the
    model's prediction on the original (Chen et al., "Fast Model Debias with Machine
    Unlearning", NeurIPS 2023, Eq. 1).

    Args:
      probs: ``(N, K)`` class probabilities on the original inputs.
      probs_cf: ``(N, K)`` class probabilities on the counterfactuals (attribute flipped).

    Raises:
      PrivDebiasError: shapes differ, empty input, NaN / inf, values outside ``[0, 1]``,
        rows that do not sum to 1 (checked on concrete arrays only).
    """
    _check_probs(probs, probs_cf)
    probs, probs_cf = _as_float(probs), _as_float(probs_cf)
    yhat = jnp.argmax(jax.lax.stop_gradient(probs), axis=-1)
    p = jnp.take_along_axis(probs, yhat[:, None], axis=-1)[:, 0]
    q = jnp.take_along_axis(probs_cf, yhat[:, None], axis=-1)[:, 0]
    return jnp.abs(p - q)


def _masked_mean(values: jax.Array, mask: Array | None) -> jax.Array:
    n = values.shape[0]
    w = _check_mask(mask, n)
    wc = _concrete(w)
    if wc is not None and wc.sum() <= 0:
        raise PrivDebiasError("total mask weight is 0 (no samples)")
    return _safe_div(jnp.sum(w * values), jnp.sum(w))


def counterfactual_bias(probs: Array, probs_cf: Array, mask: Array | None = None) -> jax.Array:
    """FMD model bias ``B(θ) = Σ_i m_i B(c_i) / Σ_i m_i`` (the mean over pairs when unmasked).

    See :func:`counterfactual_bias_per_sample`. The model is fair when ``B(θ) ≤ δ``.
    """
    return _masked_mean(counterfactual_bias_per_sample(probs, probs_cf), mask)


def counterfactual_bias_from_logits(
    logits: Array, logits_cf: Array, mask: Array | None = None
) -> jax.Array:
    """:func:`counterfactual_bias` of ``softmax(logits)``, differentiable w.r.t. the logits.

    ``ŷ_i = argmax logits_i`` is chosen under ``stop_gradient``, so ``jax.grad`` of this
    (composed with a model) gives ``∇θ B(θ)`` for FMD's influence ``−∇θBᵀ H⁻¹ ∇θL``.
    With ``s_i = sign(p_i − q_i)``, ``p = softmax(z)``, ``q = softmax(z')``, ``k = ŷ_i``:
    ``∂B/∂z_i = (m_i/Σm) s_i p_ik (e_k − p_i)`` and ``∂B/∂z'_i = −(m_i/Σm) s_i q_ik (e_k − q_i)``
    (at a tie ``p_ik = q_ik`` JAX takes ``s_i = 1``).

    Raises:
      PrivDebiasError: shapes differ, empty input, NaN / inf logits.
    """
    if np.ndim(logits) != 2:
        raise PrivDebiasError(
            f"`logits` must be 2-D (samples, classes), got shape {np.shape(logits)}"
        )
    if np.shape(logits) != np.shape(logits_cf):
        raise PrivDebiasError(
            f"`logits` and `logits_cf` shapes differ: {np.shape(logits)} vs {np.shape(logits_cf)}"
        )
    n = int(np.shape(logits)[0])
    if n == 0 or int(np.shape(logits)[1]) == 0:
        raise PrivDebiasError("counterfactual bias of an empty input")
    _check_scores(logits, n, None, "logits")
    _check_scores(logits_cf, n, None, "logits_cf")
    logits, logits_cf = _as_float(logits), _as_float(logits_cf)
    if mask is None:  # one compiled program instead of a dozen eager operations
        return _counterfactual_gaps(logits, logits_cf).mean()
    return _masked_mean(_counterfactual_gaps(logits, logits_cf), mask)


@jax.jit
def _counterfactual_gaps(logits: jax.Array, logits_cf: jax.Array) -> jax.Array:
    """``|p_i(ŷ_i) − q_i(ŷ_i)|`` per pair, ``ŷ_i = argmax logits_i`` (under ``stop_gradient``)."""
    yhat = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    p = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), yhat[:, None], axis=-1)[:, 0]
    q = jnp.take_along_axis(jax.nn.softmax(logits_cf, axis=-1), yhat[:, None], axis=-1)[:, 0]
    return jnp.abs(p - q)


# --------------------------------------------------------------------------------------------
# Seed-000 dataset bias: KL(D(τ | y) ‖ P(τ)) and the mutual information I(τ; y)
# --------------------------------------------------------------------------------------------


def attribute_counts(
    y: Array, a: Array, num_classes: int, num_attributes: int, mask: Array | None = None
) -> jax.Array:
    """Class × attribute count table ``N[y, a] = Σ_i m_i 1[y_i = y, a_i = a]``, ``(C, A)``."""
    num_classes = _check_positive_int(num_classes, "num_classes")
    num_attributes = _check_positive_int(num_attributes, "num_attributes")
    if np.ndim(y) != 1:
        raise PrivDebiasError(f"`y` must be 1-D, got shape {np.shape(y)}")
    n = int(np.shape(y)[0])
    y = _check_labels(y, n, num_classes, "y")
    a = _check_labels(a, n, num_attributes, "a")
    w = _check_mask(mask, n)
    valid = (y >= 0) & (y < num_classes) & (a >= 0) & (a < num_attributes)
    flat = jnp.where(valid, y * num_attributes + a, 0)
    counts = jax.ops.segment_sum(
        jnp.where(valid, w, 0), flat, num_segments=num_classes * num_attributes
    )
    return counts.reshape(num_classes, num_attributes)


def _distribution_from_counts(counts: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    n_y = counts.sum(axis=1)
    total = n_y.sum()
    p_y = _safe_div(n_y, total)
    p_a_given_y = _safe_div(counts, n_y[:, None])
    p_a = _safe_div(counts.sum(axis=0), total)
    return p_y, p_a_given_y, p_a


def attribute_distribution(
    y: Array, a: Array, num_classes: int, num_attributes: int, mask: Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Empirical ``p(y)`` ``(C,)``, ``D(τ | y)`` ``(C, A)`` and ``P(τ)`` ``(A,)`` from counts.

    The row of ``D(τ | y)`` of a class with no samples is all zeros (that class has weight
    ``p(y) = 0`` everywhere it is used).

    Raises:
      PrivDebiasError: lengths disagree, labels out of range, no samples.
    """
    counts = attribute_counts(y, a, num_classes, num_attributes, mask)
    _check_counts(counts, 2)
    return _distribution_from_counts(counts)


def _check_prior(prior: Any, num_attributes: int) -> jax.Array:
    if np.shape(prior) != (num_attributes,):
        raise PrivDebiasError(f"`prior` must have shape ({num_attributes},), got {np.shape(prior)}")
    arr = _concrete(prior)
    if arr is not None:
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise PrivDebiasError("`prior` must hold finite, non-negative probabilities")
        if abs(arr.sum() - 1.0) > 1e-5:
            raise PrivDebiasError(f"`prior` must sum to 1, sums to {arr.sum():.6g}")
    return _as_float(prior)


def _kl_rows(p: jax.Array, q: jax.Array, eps: float) -> jax.Array:
    """``Σ_a p_a log((p_a + eps) / (q_a + eps))`` per row: KL(p ‖ q) with finite gradients.

    Entries with ``p_a = 0`` contribute 0; ``eps`` keeps the value and its gradient finite
    where ``p_a = 0`` or ``q_a = 0`` (a prior with a zero where ``p_a > 0`` gives
    ``≈ p_a · log(p_a / eps)`` instead of ``+inf``). The error against the exact KL is
    ``O(eps)`` per term.
    """
    return jnp.sum(p * (jnp.log(p + eps) - jnp.log(q + eps)), axis=-1)


def kl_bias_per_class_from_counts(
    counts: Array, prior: Array | None = None, eps: float = 1e-12
) -> jax.Array:
    """Per-class partial bias ``KL(D(τ | y) ‖ P(τ))`` of a ``(C, A)`` count table, ``(C,)``.

    ``P(τ)`` is the attribute's marginal in the table when ``prior`` is ``None``, otherwise
    the given distribution (e.g. uniform: the target of augmentation). Classes with no
    samples get 0. Counts may be fractional; differentiable in JAX w.r.t. ``counts``.
    """
    counts = _check_counts(counts, 2)
    p_y, p_a_given_y, p_a = _distribution_from_counts(counts)
    q = p_a if prior is None else _check_prior(prior, counts.shape[1])
    kl = _kl_rows(p_a_given_y, q[None, :], eps)
    return jnp.where(p_y > 0, kl, 0)


def kl_bias_from_counts(counts: Array, prior: Array | None = None, eps: float = 1e-12) -> jax.Array:
    """Dataset bias ``Σ_y p(y) KL(D(τ | y) ‖ P(τ))`` of a ``(C, A)`` count table (scalar, nats).

    With ``prior=None`` (``P(τ)`` = the marginal) this is the mutual information ``I(τ; y)``;
    with a given prior it is the ``p(y)``-weighted partial bias of Pan et al. 2024
    ("Privacy-Preserving Debiasing using Data Augmentation and Machine Unlearning",
    arXiv 2404.13194: ``∂B/∂τ = KL(D(τ) ‖ P(τ))``). Counts may be fractional (the
    augmentation planner passes planned counts); differentiable in JAX w.r.t. ``counts``.

    Raises:
      PrivDebiasError: not a 2-D table, negative / NaN counts, zero total, bad prior.
    """
    counts = _check_counts(counts, 2)
    p_y, _, _ = _distribution_from_counts(counts)
    return jnp.sum(p_y * kl_bias_per_class_from_counts(counts, prior, eps))


def kl_bias_per_class(
    y: Array,
    a: Array,
    num_classes: int,
    num_attributes: int,
    prior: Array | None = None,
    eps: float = 1e-12,
    mask: Array | None = None,
) -> jax.Array:
    """``KL(D(τ | y) ‖ P(τ))`` for each class ``y``, ``(num_classes,)`` in nats.

    ``P(τ)`` is the attribute's marginal in the data when ``prior`` is ``None``, else the
    given distribution (validated: non-negative, sums to 1). Classes with no samples get 0.
    """
    counts = attribute_counts(y, a, num_classes, num_attributes, mask)
    return kl_bias_per_class_from_counts(counts, prior, eps)


def kl_bias(
    y: Array,
    a: Array,
    num_classes: int,
    num_attributes: int,
    prior: Array | None = None,
    eps: float = 1e-12,
    mask: Array | None = None,
) -> jax.Array:
    """``Σ_y p(y) KL(D(τ | y) ‖ P(τ))`` (scalar, nats); ``I(τ; y)`` when ``prior`` is ``None``."""
    counts = attribute_counts(y, a, num_classes, num_attributes, mask)
    return kl_bias_from_counts(counts, prior, eps)


def mutual_information_bias(
    y: Array, a: Array, num_classes: int, num_attributes: int, mask: Array | None = None
) -> jax.Array:
    """Mutual information ``I(τ; y)`` in nats (= :func:`kl_bias` with the data's marginal).

    Equals ``sklearn.metrics.mutual_info_score(y, a)``; 0 iff attribute and class are
    independent in the data (a perfectly balanced dataset).
    """
    return kl_bias(y, a, num_classes, num_attributes, prior=None, mask=mask)


__all__ = [
    "confusion_counts",
    "accuracy_from_counts",
    "group_accuracy_from_counts",
    "worst_group_accuracy_from_counts",
    "class_accuracy_from_counts",
    "cell_accuracy_from_counts",
    "aligned_conflicting_accuracy_from_counts",
    "demographic_parity_difference_from_counts",
    "equalized_odds_difference_from_counts",
    "accuracy",
    "group_accuracy",
    "demographic_parity_difference",
    "equalized_odds_difference",
    "fairness_report",
    "fairness_report_from_counts",
    "counterfactual_bias",
    "counterfactual_bias_per_sample",
    "counterfactual_bias_from_logits",
    "attribute_counts",
    "attribute_distribution",
    "kl_bias_per_class",
    "kl_bias",
    "kl_bias_per_class_from_counts",
    "kl_bias_from_counts",
    "mutual_information_bias",
]
