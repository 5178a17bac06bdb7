"""The membership-inference suite: every attack of :mod:`~privdebias_jax.privacy.membership` on
one target, with calibrated thresholds and metrics with confidence intervals.

The attacker knows a *calibration* part of the members and non-members (``calibration_fraction``
of each, drawn with ``key``): thresholds (balanced accuracy) and the M-Moments MLP are fitted
there, and every metric is reported on the rest. LiRA and the shadow attack use ``R``
reference models trained together (:func:`privdebias_jax.multi.train_models`, one vmapped
program) on random halves of the pool ``members ∪ non-members``: every sample is IN for exactly
half of them (Carlini et al. 2022).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from privdebias_jax.data.dataset import Dataset, concat, subset
from privdebias_jax.multi import resolve_layout, train_models
from privdebias_jax.privacy import membership as mi
from privdebias_jax.privacy import shadow
from privdebias_jax.privacy.metrics import attack_report, sliced_reports
from privdebias_jax.train import TrainState, predict
from privdebias_jax.types import PrivDebiasError, PRNGKey

THRESHOLD_ATTACKS = (
    "loss",
    "confidence",
    "entropy",
    "modified_entropy",
    "m_loss",
    "m_mean",
    "m_moments",
)
REFERENCE_ATTACKS = ("lira_online", "lira_offline", "shadow")
ALL_ATTACKS = THRESHOLD_ATTACKS + REFERENCE_ATTACKS


@dataclasses.dataclass
class ReferenceModels:
    """``R`` models trained on random halves of a pool: ``states`` stacked, ``member[r, i]`` = 1
    when model ``r`` trained on pool sample ``i`` (pool order = ``pool.idx``)."""

    model: nn.Module
    states: TrainState
    pool: Dataset
    member: np.ndarray
    seconds: float
    #: LiRA with one variance over all samples (Carlini et al. 2022, for few reference models:
    #: a per-sample variance from 3–4 models is near 0 and saturates the scores).
    global_variance: bool = False


def check_member_sets(members: Dataset, nonmembers: Dataset) -> None:
    """Raise :class:`PrivDebiasError` for an empty set or overlapping ids."""
    if len(members) == 0 or len(nonmembers) == 0:
        raise PrivDebiasError(
            f"membership inference needs members and non-members; got {len(members)} and {len(nonmembers)}"
        )
    overlap = np.intersect1d(np.asarray(members.idx), np.asarray(nonmembers.idx))
    if overlap.size:
        raise PrivDebiasError(
            f"member and non-member sets overlap on {overlap.size} id(s), e.g. {overlap[:5].tolist()}"
        )


def half_memberships(num_models: int, num_samples: int, key: PRNGKey) -> np.ndarray:
    """``(R, N)`` 0/1: for every sample, a random half of the ``R`` models (``R`` even) include it."""
    if int(num_models) < 2 or int(num_models) % 2:
        raise PrivDebiasError(
            f"the number of reference models must be even and ≥ 2, got {num_models}"
        )
    u = np.asarray(jax.random.uniform(key, (num_models, num_samples)))
    ranks = np.argsort(np.argsort(u, axis=0), axis=0)
    return (ranks < num_models // 2).astype(np.float32)


def train_reference_models(
    model: nn.Module,
    tx: optax.GradientTransformation,
    pool: Dataset,
    num_models: int,
    *,
    key: PRNGKey,
    epochs: int,
    batch_size: int,
    width: int | None = None,
    layout: str = "auto",
    num_teams: int | None = None,
) -> ReferenceModels:
    """Train ``num_models`` reference/shadow models together, each on a random half of ``pool``
    (every sample IN for exactly half of them).

    ``layout`` (see :mod:`privdebias_jax.privacy.shadow`, measured in
    ``benchmarks/shadow_models.py``): ``teams`` (shared-batch steps over the models of a team;
    ``num_teams`` teams, default :func:`~privdebias_jax.privacy.shadow.default_num_teams`),
    ``lanes`` (:func:`privdebias_jax.multi.train_models`, per-sample halves from
    :func:`half_memberships`, ``width`` lanes per program), ``loop`` (one model after the other,
    per-sample halves) or ``auto`` (``lanes`` for convolution-free models, ``loop`` for models with
    convolution kernels). Measured at 8 models of the 3×100 MLP on 2 CPU cores
    (``benchmarks/shadow_models.py --models mlp --num-models 8``): lanes 121,569 examples/s,
    teams 105,432, the one-by-one per-batch loop 65,459 and the one-by-one scanned loop 114,876
    on one device; with the CPU split into 2 devices (``--cpu-devices 2``) lanes run 216,291
    (3.2× the per-batch loop, 1.9× the scanned loop). For the small CNN teams ran 0.75× the
    per-batch loop. The design is drawn from ``fold_in(key, 0)``, the models from
    ``fold_in(key, 1)``.

    Raises:
      PrivDebiasError: an odd number of models, an unknown layout, bad epochs / batch size.
    """
    if layout not in shadow.SHADOW_LAYOUTS:
        raise PrivDebiasError(f"unknown layout {layout!r}; expected one of {shadow.SHADOW_LAYOUTS}")
    if int(epochs) < 1 or int(batch_size) < 1:
        raise PrivDebiasError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    if layout == "auto":
        conv = resolve_layout(model, tx, tuple(np.shape(pool.x)[1:]), "auto") == "loop"
        layout = "loop" if conv else "lanes"
    t0 = time.perf_counter()
    if layout == "teams":
        teams = num_teams or shadow.default_num_teams(len(pool), batch_size)
        design = shadow.team_design(num_models, len(pool), jax.random.fold_in(key, 0), teams)
        member = design.member
        states = shadow.train_team_models(
            model,
            tx,
            pool,
            design,
            jax.random.fold_in(key, 1),
            epochs=epochs,
            batch_size=batch_size,
        )
    else:
        member = half_memberships(num_models, len(pool), jax.random.fold_in(key, 0))
        if layout == "lanes":
            states = train_models(
                model,
                tx,
                pool,
                member,
                jax.random.fold_in(key, 1),
                epochs=epochs,
                batch_size=batch_size,
                width=width,
            )
        else:
            states = shadow.train_models_one_by_one(
                model,
                tx,
                pool,
                member,
                jax.random.fold_in(key, 1),
                epochs=epochs,
                batch_size=batch_size,
            )
    return ReferenceModels(model, states, pool, member, time.perf_counter() - t0)


def stacked_logits(model: nn.Module, states: TrainState, data: Dataset | Any) -> np.ndarray:
    """Logits ``(R, N, C)`` of every stacked model on ``data``."""
    n = jax.tree_util.tree_leaves(states.params)[0].shape[0]
    out = []
    for r in range(n):
        p = jax.tree_util.tree_map(lambda v, r=r: v[r], states.params)
        s = jax.tree_util.tree_map(lambda v, r=r: v[r], states.model_state)
        out.append(predict(model, p, s, data)[0])
    return np.stack(out)


def _pool_positions(pool: Dataset, ds: Dataset) -> np.ndarray:
    ids = np.asarray(pool.idx)
    order = np.argsort(ids)
    pos = np.searchsorted(ids[order], np.asarray(ds.idx))
    pos = np.minimum(pos, ids.size - 1)
    if not np.all(ids[order][pos] == np.asarray(ds.idx)):
        raise PrivDebiasError("the reference models' pool must contain every member and non-member")
    return order[pos]


def membership_scores(
    target: tuple[Any, Any, Any],
    members: Dataset,
    nonmembers: Dataset,
    *,
    key: PRNGKey,
    attacks: Sequence[str] = THRESHOLD_ATTACKS,
    calibration_fraction: float = 0.5,
    k: int = 10,
    max_shift: int = 2,
    reference: ReferenceModels | None = None,
) -> dict[str, Any]:
    """Scores of every requested attack on ``members ∪ nonmembers`` (labels 1 / 0).

    Returns ``{"labels", "calibration" (bool mask), "a", "y", "scores": {attack: (N,)}}``.

    Raises:
      PrivDebiasError: overlapping/empty sets, unknown attacks, a fraction outside (0, 1),
        reference attacks without ``reference`` models.
    """
    check_member_sets(members, nonmembers)
    unknown = sorted(set(attacks) - set(ALL_ATTACKS))
    if unknown:
        raise PrivDebiasError(f"unknown attack(s) {unknown}; known: {ALL_ATTACKS}")
    if not 0.0 < float(calibration_fraction) < 1.0:
        raise PrivDebiasError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    if any(a in REFERENCE_ATTACKS for a in attacks) and reference is None:
        raise PrivDebiasError(
            "LiRA and the shadow attack need reference models (train_reference_models)"
        )
    data = concat(members, nonmembers)
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))]).astype(np.int64)
    cal = np.zeros(len(labels), bool)
    for value, sub in ((1, 0), (0, 1)):
        rows = np.flatnonzero(labels == value)
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, sub), rows.size))
        cal[rows[perm[: max(1, int(round(calibration_fraction * rows.size)))]]] = True
    module, params, model_state = target
    logits, _ = predict(module, params, model_state, data)
    y = np.asarray(data.y)
    scores: dict[str, np.ndarray] = {}
    for name in ("loss", "confidence", "entropy", "modified_entropy"):
        if name in attacks:
            scores[name] = mi.SCORES[name](logits, y)
    if any(a in attacks for a in ("m_loss", "m_mean", "m_moments")):
        losses = mi.augmented_losses(
            target, data, key=jax.random.fold_in(key, 2), k=k, max_shift=max_shift
        )
        if "m_loss" in attacks:
            scores["m_loss"] = -losses[:, 1]
        if "m_mean" in attacks:
            scores["m_mean"] = -losses.mean(1)
        if "m_moments" in attacks:
            feats = np.log(mi.loss_moments(losses))
            clf = mi.train_attack_classifier(
                feats[cal], labels[cal], key=jax.random.fold_in(key, 3)
            )
            scores["m_moments"] = clf(feats)
    if reference is not None and any(a in REFERENCE_ATTACKS for a in attacks):
        pos = _pool_positions(reference.pool, data)
        ref_logits = stacked_logits(reference.model, reference.states, data)
        if "lira_online" in attacks or "lira_offline" in attacks:
            phi = mi.scaled_logit(logits, y)
            ref_phi = np.stack([mi.scaled_logit(lg, y) for lg in ref_logits])
            inn = reference.member[:, pos]
            if "lira_online" in attacks:
                scores["lira_online"] = mi.lira_scores(
                    phi, ref_phi, inn, online=True, global_variance=reference.global_variance
                )
            if "lira_offline" in attacks:
                scores["lira_offline"] = mi.lira_scores(
                    phi, ref_phi, inn, online=False, global_variance=reference.global_variance
                )
        if "shadow" in attacks:
            feats = np.concatenate([mi.shadow_features(lg, y) for lg in ref_logits])
            lab = reference.member[:, pos].reshape(-1).astype(np.int64)
            rng = np.random.default_rng(
                int(jax.random.randint(jax.random.fold_in(key, 4), (), 0, 2**31 - 1))
            )
            take = rng.permutation(lab.size)[:20000]
            clf = mi.train_attack_classifier(feats[take], lab[take], key=jax.random.fold_in(key, 5))
            scores["shadow"] = clf(mi.shadow_features(logits, y))
    return {"labels": labels, "calibration": cal, "a": np.asarray(data.a), "y": y, "scores": scores}


def attack_suite(
    target: tuple[Any, Any, Any],
    members: Dataset,
    nonmembers: Dataset,
    *,
    key: PRNGKey,
    attacks: Sequence[str] = THRESHOLD_ATTACKS,
    reference: ReferenceModels | None = None,
    calibration_fraction: float = 0.5,
    k: int = 10,
    num_resamples: int = 200,
    slices: bool = True,
) -> dict[str, Any]:
    """Every requested attack's report (AUC, TPR at 0.1% / 1% FPR, balanced accuracy with the
    threshold chosen on the calibration split, bootstrap CIs), on the evaluation split; with
    ``slices`` also per protected attribute and per class. ``roc`` holds the scores needed to plot
    the ROC curves (``privdebias_jax.privacy.metrics.plot_roc``)."""
    t0 = time.perf_counter()
    s = membership_scores(
        target,
        members,
        nonmembers,
        key=key,
        attacks=attacks,
        reference=reference,
        calibration_fraction=calibration_fraction,
        k=k,
    )
    cal, ev, labels = s["calibration"], ~s["calibration"], s["labels"]
    seed = int(jax.random.randint(jax.random.fold_in(key, 9), (), 0, 2**31 - 1))
    out: dict[str, Any] = {
        "attacks": {},
        "n_members_eval": int(labels[ev].sum()),
        "n_nonmembers_eval": int((1 - labels[ev]).sum()),
    }
    for name, sc in s["scores"].items():
        rep = attack_report(
            sc[ev],
            labels[ev],
            seed=seed,
            calibration=(sc[cal], labels[cal]),
            num_resamples=num_resamples,
        )
        if slices:
            for field, groups in (("by_attribute", s["a"][ev]), ("by_class", s["y"][ev])):
                rep[field] = sliced_reports(
                    sc[ev],
                    labels[ev],
                    groups,
                    seed=seed,
                    num_resamples=num_resamples,
                    skip_single_class=True,
                )
        out["attacks"][name] = rep
    out["scores"] = {name: (sc[ev], labels[ev]) for name, sc in s["scores"].items()}
    out["seconds"] = time.perf_counter() - t0
    return out


def unlearning_audit(
    models: dict[str, tuple[Any, Any, Any]],
    forget_set: Dataset,
    nonmembers: Dataset,
    *,
    key: PRNGKey,
    attacks: Sequence[str] = ("loss", "m_mean"),
    num_resamples: int = 200,
) -> dict[str, Any]:
    """Attack the forget set (as "members") against ``nonmembers`` on each named model: e.g.
    ``{"before": ..., "after_sisa": ..., "retrained": ...}``. After exact unlearning the forget
    set is indistinguishable from non-members, as for the retrained model (AUC ≈ 0.5)."""
    return {
        name: attack_suite(
            target,
            forget_set,
            nonmembers,
            key=key,
            attacks=attacks,
            num_resamples=num_resamples,
            slices=False,
        )["attacks"]
        for name, target in models.items()
    }


def sample_members(
    train: Dataset, holdout: Dataset, size: int, key: PRNGKey
) -> tuple[Dataset, Dataset]:
    """``size`` random training samples and ``size`` random held-out samples (balanced sets)."""
    size = min(int(size), len(train), len(holdout))
    if size < 2:
        raise PrivDebiasError("need at least 2 members and 2 non-members")
    m = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), len(train)))[:size]
    n = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), len(holdout)))[:size]
    return subset(train, np.sort(m)), subset(holdout, np.sort(n))


__all__ = [
    "ALL_ATTACKS",
    "REFERENCE_ATTACKS",
    "THRESHOLD_ATTACKS",
    "ReferenceModels",
    "attack_suite",
    "check_member_sets",
    "half_memberships",
    "membership_scores",
    "sample_members",
    "stacked_logits",
    "train_reference_models",
    "unlearning_audit",
]
