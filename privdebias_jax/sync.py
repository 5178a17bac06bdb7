"""The augmentation/unlearning sync loop of Pan et al. 2024 ("Privacy-Preserving Debiasing using Data
Augmentation and Machine Unlearning", arXiv 2404.13194), as a functional loop over rounds.

A SISA ensemble (:mod:`privdebias_jax.unlearn`) is trained on the original data. Every round

1. **measures** the ensemble: KL/MI bias of its current training data, counterfactual bias,
   biased/unbiased accuracy, DP/EO, and membership inference on the originals it still holds;
2. **augments**: the planner (:func:`privdebias_jax.augment.plan_augmentation`) turns the
   data's KL/MI bias into a number of samples per (class, attribute) cell, the guided diffusion
   model generates them (:func:`privdebias_jax.augment.generate`);
3. **adds** them to the shards (:meth:`~privdebias_jax.unlearn.SISAModel.add`: new slices, only
   the shards that receive samples retrain, only the new stages);
4. **forgets** a share of the originals step-wise within the deletion capacity
   (:meth:`~privdebias_jax.unlearn.SISAModel.forget_stepwise`, exact): the originals most exposed
   to membership inference (lowest loss under the current ensemble, the M-Loss score) or random
   ones; the forget rate (default 10% of the originals) is spread evenly over the rounds;
5. **measures** again and stops when the data's bias is ≤ δ and the strongest attack is at
   chance (balanced accuracy ≤ 0.5 + margin), or after the last round.

The state (round, synthetic sample files, forget lists, metrics history) is written atomically
to ``state.json`` after every round, and every step inside a round is idempotent (synthetic
samples and forget lists are saved before they are applied; SISA's ledger and ``meta.json``
complete an interrupted add/forget on reopening), so an interrupted run resumes where it stopped
and reaches the same state.

:func:`naive_combination` is the paper's foil: augment once, then unlearn once, no sync.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from privdebias_jax.data.dataset import (
    Dataset,
    DataSplits,
    concat,
    next_free_id,
    remove_ids,
    subset,
)
from privdebias_jax.metrics import fairness
from privdebias_jax.pipeline import evaluate_model
from privdebias_jax.train import TrainState, predict
from privdebias_jax.types import PrivDebiasError, PRNGKey
from privdebias_jax.unlearn.ledger import atomic_write_json
from privdebias_jax.unlearn.sisa import SISAModel

FORGET_STRATEGIES = ("exposed", "random")
#: Threshold attacks measured every round (no reference models: cheap enough for a loop).
ROUND_ATTACKS = ("loss", "entropy", "m_loss", "m_mean", "m_moments")
#: The paper's augmentation-aware attacks (Yu et al. 2021) and their threshold cousins.
BALANCED_ACCURACY_ATTACKS = ROUND_ATTACKS


def check_sync_options(sync: ml_collections.ConfigDict) -> None:
    """Validate the ``sync`` section of a config.

    Raises:
      PrivDebiasError: ``rounds < 1``, ``shards < 1``, ``slices < 1``, a forget rate outside
        (0, 1), an unknown forget strategy, a negative capacity, δ or margin, ``attack_size < 4``,
        ``added_epochs`` that is not a non-negative integer, ``program_width`` outside
        ``[0, shards]``, ``lira`` that is not a bool.
    """
    if int(sync.rounds) < 1:
        raise PrivDebiasError(f"rounds must be at least 1, got {sync.rounds}")
    if int(sync.shards) < 1 or int(sync.slices) < 1:
        raise PrivDebiasError(
            f"shards and slices must be at least 1, got shards={sync.shards}, slices={sync.slices}"
        )
    rate = float(sync.forget_rate)
    if not (np.isfinite(rate) and 0.0 < rate < 1.0):
        raise PrivDebiasError(f"forget rate must be in (0, 1), got {sync.forget_rate}")
    if sync.forget_strategy not in FORGET_STRATEGIES:
        raise PrivDebiasError(
            f"unknown forget strategy {sync.forget_strategy!r}; expected one of {FORGET_STRATEGIES}"
        )
    for name in ("capacity", "delta", "chance_margin", "max_new_per_round"):
        v = float(sync[name])
        if not np.isfinite(v) or v < 0:
            raise PrivDebiasError(f"{name} must be a non-negative number, got {sync[name]}")
    if int(sync.attack_size) < 4:
        raise PrivDebiasError(f"attack_size must be at least 4, got {sync.attack_size}")
    added = sync.get("added_epochs", 0)
    if int(added) != added or int(added) < 0:
        raise PrivDebiasError(f"added_epochs must be a non-negative integer, got {added}")
    width = sync.get("program_width", 0)
    if int(width) != width or not 0 <= int(width) <= int(sync.shards):
        raise PrivDebiasError(
            f"program_width must be an integer in [0, shards = {sync.shards}] (0 = auto), got {width}"
        )
    if not isinstance(sync.get("lira", True), (bool, np.bool_)):
        raise PrivDebiasError(f"lira must be true or false, got {sync.get('lira')!r}")


# ------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------


def data_bias(ds: Dataset, num_classes: int, num_attributes: int) -> dict[str, float]:
    """KL/MI bias of a dataset: ``Σ_y p(y) KL(D(a|y) ‖ P(a)) = I(a; y)`` (nats), the fraction of
    bias-aligned samples (``a = y``) and the size."""
    y, a = np.asarray(ds.y), np.asarray(ds.a)
    return {
        "kl_bias": float(fairness.kl_bias(y, a, num_classes, num_attributes)),
        "mi_bias": float(fairness.mutual_information_bias(y, a, num_classes, num_attributes)),
        "fraction_aligned": float(np.mean(y == a)) if num_classes == num_attributes else None,
        "size": int(len(ds)),
    }


def _as_state(target: tuple[Any, Any, Any]) -> TrainState:
    _, params, model_state = target
    return TrainState(step=np.zeros((), np.int32), params=params, model_state=model_state, opt_state=None)


def measure(
    target: tuple[Any, Any, Any],
    splits: DataSplits,
    train_now: Dataset,
    originals_in: Dataset,
    forgotten: Dataset | None,
    *,
    key: PRNGKey,
    forgotten_nonmembers: Dataset | None = None,
    attack_size: int,
    attacks: tuple[str, ...] = ROUND_ATTACKS,
    num_resamples: int = 100,
    reference: Any | None = None,
) -> dict[str, Any]:
    """Every figure of one model (single or ensemble ``(module, params, model_state)``).

    * model: :func:`privdebias_jax.pipeline.evaluate_model` on ``splits`` with the training set
      replaced by ``train_now`` (accuracies, counterfactual bias, DP/EO, data KL/MI bias);
    * ``membership``: the threshold attacks (LOSS, entropy, M-Loss, M-Mean, M-Moments; Yu et al.
      2021, Yeom et al. 2018, Song & Mittal 2021) on ``attack_size`` originals still trained on
      vs as many non-members from the biased test set (same distribution);
    * ``membership_forgotten``: the same attacks on forgotten originals vs non-members (after
      exact unlearning they are non-members: chance is the goal). Forgotten originals chosen by
      exposure are the *easiest* samples, so they are compared with ``forgotten_nonmembers``:
      held-out samples picked by the same rule from the biased test set (see
      :func:`matched_nonmembers`); otherwise the attack would detect easiness, not membership;
    * ``private_class_accuracy``: the linear attribute probe on the bottleneck features over the
      unbiased test set (Barbano et al. 2021's attack; chance = 1 / #attributes), when there is one.
    * with ``reference`` (:class:`~privdebias_jax.privacy.attacks.ReferenceModels`, e.g.
      :func:`shard_references`), offline LiRA (Carlini et al. 2022) joins both attack sets:
      ``Λ = log Φ((φ − μ_out) / σ_out)`` on the target's scaled logit ``φ``, from the reference
      models that did not train on the sample.
    """
    from privdebias_jax.privacy.attacks import attack_suite, sample_members

    if reference is not None and "lira_offline" not in attacks:
        attacks = (*tuple(attacks), "lira_offline")

    module = target[0]
    t0 = time.perf_counter()
    ev = evaluate_model(
        module, _as_state(target), dataclasses.replace(splits, train=train_now), jax.random.fold_in(key, 0)
    )
    out: dict[str, Any] = {k: v for k, v in ev.items() if k != "splits"}
    out.update({f"data_{k}": v for k, v in data_bias(train_now, splits.num_classes, splits.num_attributes).items()})

    def suite(members: Dataset, sub: int, pool: Dataset) -> dict[str, Any]:
        m, n = sample_members(members, pool, attack_size, jax.random.fold_in(key, sub))
        res = attack_suite(
            target, m, n, key=jax.random.fold_in(key, sub + 1), attacks=attacks,
            num_resamples=num_resamples, slices=False, reference=reference,
        )
        rows = {}
        for name, rep in res["attacks"].items():
            rows[name] = {
                "balanced_accuracy": rep["balanced_accuracy"]["value"],
                "balanced_accuracy_ci": [rep["balanced_accuracy"]["ci_low"], rep["balanced_accuracy"]["ci_high"]],
                "auc": rep["auc"]["value"],
                "tpr@1%fpr": rep["tpr@1%fpr"]["value"],
            }
        strongest = max(rows, key=lambda k: rows[k]["balanced_accuracy"])
        return {
            "attacks": rows,
            "strongest": strongest,
            "strongest_balanced_accuracy": rows[strongest]["balanced_accuracy"],
            "strongest_balanced_accuracy_ci": rows[strongest]["balanced_accuracy_ci"],
            "n_members": len(m),
            "roc": {k: [np.asarray(s).tolist(), np.asarray(lab).tolist()] for k, (s, lab) in res["scores"].items()},
        }

    if splits.test_unbiased is not None:
        from privdebias_jax.privacy.probe import attribute_probe

        probe = attribute_probe(
            module, target[1], target[2], splits.test_unbiased, splits.num_attributes,
            key=jax.random.fold_in(key, 30),
        )
        out["private_class_accuracy"] = probe["accuracy"]
        out["private_class_chance"] = probe.get("chance")
    out["membership"] = suite(originals_in, 10, splits.test)
    if forgotten is not None and len(forgotten) >= 2:
        pool = forgotten_nonmembers if forgotten_nonmembers is not None else splits.test
        out["membership_forgotten"] = suite(forgotten, 20, pool)
    out["measure_seconds"] = time.perf_counter() - t0
    return out


def shard_references(sisa: SISAModel, pool: Dataset) -> Any:
    """The shards of a trained SISA model as LiRA reference models over ``pool``.

    Few models (``S``), so LiRA uses one global variance (``global_variance=True``).
    Shard ``r`` trained on the ids of its slots, so ``member[r, i] = 1`` exactly when
    ``pool.idx[i]`` is one of them (pending or forgotten ids included: the shards were trained on
    them unless retrained). Every sample outside a shard is an OUT sample for it, which is what
    offline LiRA needs: with ``S`` shards a training sample has ``S − 1`` OUT models, a held-out
    one ``S``. The shards trained on ``1/S`` of the data, so their OUT distribution is shifted from a
    model trained on all of it; with one global variance that shift moves every score alike, and
    the score ranks samples by ``φ − μ_out`` (a per-sample difficulty calibration, Carlini et al.
    2022 §IV-C).

    Raises:
      PrivDebiasError: an untrained SISA model, or an empty pool.
    """
    from privdebias_jax.privacy.attacks import ReferenceModels

    if len(pool) == 0:
        raise PrivDebiasError("the reference pool is empty")
    slots = np.asarray(sisa.plan.slots)
    ids = np.asarray(pool.idx)
    member = np.stack([np.isin(ids, slots[r][slots[r] >= 0]) for r in range(slots.shape[0])]).astype(np.int8)
    return ReferenceModels(
        model=sisa.model, states=sisa.stacked_state(), pool=pool, member=member, seconds=0.0, global_variance=True
    )


def exposure_scores(target: tuple[Any, Any, Any], ds: Dataset) -> np.ndarray:
    """Membership exposure of each sample: the negative cross-entropy under ``target`` (the LOSS /
    M-Loss score; higher = more likely flagged as a member)."""
    from privdebias_jax.privacy.membership import loss_score

    logits, _ = predict(*target, ds)
    return loss_score(logits, np.asarray(ds.y))


def choose_forget_ids(
    target: tuple[Any, Any, Any], candidates: Dataset, count: int, strategy: str, key: PRNGKey
) -> np.ndarray:
    """``count`` ids of ``candidates`` to forget: the most exposed (highest LOSS score, ties at
    random) or uniformly random ones."""
    count = int(min(count, len(candidates)))
    if count <= 0:
        return np.zeros(0, np.int64)
    ids = np.asarray(candidates.idx, np.int64)
    tie = np.asarray(jax.random.uniform(key, (len(ids),)))
    if strategy == "exposed":
        score = exposure_scores(target, candidates)
        order = np.lexsort((tie, -score))
    elif strategy == "random":
        order = np.argsort(tie)
    else:
        raise PrivDebiasError(f"unknown forget strategy {strategy!r}; expected one of {FORGET_STRATEGIES}")
    return np.sort(ids[order[:count]])


def matched_nonmembers(
    target: tuple[Any, Any, Any], pool: Dataset, fraction: float, strategy: str, key: PRNGKey
) -> np.ndarray:
    """Held-out ids picked by the forget rule: the top ``fraction`` of ``pool`` by exposure under
    the same model (``exposed``), or the whole pool (``random``: a random subset of the training
    data has the pool's distribution already).

    The audit of a forgotten set compares it with these: both sets are then selected the same way
    from the same distribution, and only membership differs (before unlearning)."""
    if strategy == "random":
        return np.sort(np.asarray(pool.idx, np.int64))
    count = max(2, int(round(float(fraction) * len(pool))))
    return choose_forget_ids(target, pool, count, strategy, key)


# ------------------------------------------------------------------------------------------
# state
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SyncState:
    """The loop's explicit state (``state.json``); the arrays live in files beside it.

    Attributes:
      round: rounds completed.
      synthetic: file names (``synthetic_<r>.npz``) of the samples added so far, in order.
      forgotten: ids forgotten in each completed round.
      history: the metrics after round 0 (the ensemble on the originals) and every round.
      stopped: why the loop stopped (``None`` while running).
      seconds: wall seconds per stage, summed over rounds.
    """

    round: int = 0
    synthetic: list[str] = dataclasses.field(default_factory=list)
    forgotten: list[list[int]] = dataclasses.field(default_factory=list)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stopped: str | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SyncState:
        return cls(**data)


def save_dataset(path: Path, ds: Dataset) -> None:
    """Write a dataset to ``path`` (npz) atomically."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=np.asarray(ds.x), y=np.asarray(ds.y), a=np.asarray(ds.a), idx=np.asarray(ds.idx))
    tmp.replace(path)


def load_dataset_file(path: Path) -> Dataset:
    """Read a dataset written by :func:`save_dataset`."""
    if not path.exists():
        raise PrivDebiasError(f"missing file {path}: the run folder is incomplete")
    with np.load(path) as f:
        return Dataset(f["x"], f["y"], f["a"], f["idx"])


def _add_seconds(state: SyncState, stage: str, seconds: float) -> None:
    state.seconds[stage] = state.seconds.get(stage, 0.0) + float(seconds)


@dataclasses.dataclass
class SyncContext:
    """What every round needs and never changes: data, models, settings."""

    splits: DataSplits
    augmenter: Any
    make_sisa: Callable[[Path, Dataset], SISAModel]
    open_sisa: Callable[[Path, Dataset], SISAModel]
    sync: ml_collections.ConfigDict
    aggregate: str = "mean_softmax"
    #: LiRA's reference models (``None``: no LiRA), built on first use: see :func:`make_context`.
    references: Callable[[], Any] | None = None


def _current(ctx: SyncContext, directory: Path, upto: int) -> tuple[SISAModel, Dataset]:
    """The SISA model and its data (originals + every synthetic file of rounds ≤ ``upto`` that
    exists: an interrupted round may have saved and added its samples already)."""
    files = [directory / f"synthetic_{r}.npz" for r in range(1, upto + 1)]
    synthetic = [load_dataset_file(f) for f in files if f.exists()]
    data = concat(ctx.splits.train, *synthetic) if synthetic else ctx.splits.train
    return ctx.open_sisa(directory / "sisa", data), data


def _next_id(splits: DataSplits, data: Dataset) -> int:
    """A sample id above every id of the training data and the evaluation splits."""
    evaluation = [splits.test] + ([splits.test_unbiased] if splits.test_unbiased is not None else [])
    return next_free_id(data, *evaluation)


def _alive(sisa: SISAModel, data: Dataset) -> Dataset:
    gone = sisa.forgotten
    return remove_ids(data, gone) if gone.size else data


def _forgotten_originals(sisa: SISAModel, originals: Dataset) -> Dataset | None:
    gone = sisa.forgotten
    if not gone.size:
        return None
    return subset(originals, np.flatnonzero(np.isin(np.asarray(originals.idx), gone)))


def _read_forget_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = json.loads(path.read_text())
    return np.asarray(data["forget"], np.int64), np.asarray(data["matched"], np.int64)


def _matched_ids(directory: Path, skip: Path | None = None) -> np.ndarray:
    """The matched held-out ids of every forget file in ``directory`` but ``skip`` (sorted, unique)."""
    ids = [_read_forget_file(f)[1] for f in sorted(directory.glob("forget*.json")) if f != skip]
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def _matched_pool(ctx: SyncContext, directory: Path) -> Dataset | None:
    """The matched non-members of every forget file in ``directory`` (``None`` if none)."""
    ids = _matched_ids(directory)
    if ids.size < 2:
        return None
    test = ctx.splits.test
    return subset(test, np.flatnonzero(np.isin(np.asarray(test.idx), ids)))


def _measure(
    ctx: SyncContext, sisa: SISAModel, data: Dataset, key: PRNGKey, directory: Path | None = None,
    target: tuple[Any, Any, Any] | None = None,
) -> dict[str, Any]:
    """:func:`measure` of ``target`` (default: ``sisa``'s ensemble) against ``sisa``'s data state."""
    originals = ctx.splits.train
    alive = _alive(sisa, data)
    in_orig = remove_ids(originals, sisa.forgotten) if sisa.forgotten.size else originals
    return measure(
        sisa.ensemble(ctx.aggregate) if target is None else target,
        ctx.splits,
        alive,
        in_orig,
        _forgotten_originals(sisa, originals),
        key=key,
        attack_size=int(ctx.sync.attack_size),
        forgotten_nonmembers=None if directory is None else _matched_pool(ctx, directory),
        reference=None if ctx.references is None else ctx.references(),
    )


def _choose(
    ctx: SyncContext, sisa: SISAModel, candidates: Dataset, count: int, key: PRNGKey, path: Path
) -> np.ndarray:
    """Pick (or reload) the originals to forget and their matched held-out set; saved first.

    The matched set mirrors the choice: ``candidates`` are the originals not forgotten in earlier
    rounds, so the held-out pool is the test set without the samples matched in earlier rounds
    (the other ``forget*.json`` files beside ``path``), and the same fraction of it is picked."""
    if path.exists():
        return _read_forget_file(path)[0]
    target = sisa.ensemble(ctx.aggregate)
    strategy = str(ctx.sync.forget_strategy)
    ids = choose_forget_ids(target, candidates, count, strategy, jax.random.fold_in(key, 0))
    fraction = ids.size / max(len(candidates), 1)
    earlier = _matched_ids(path.parent, skip=path)
    pool = ctx.splits.test
    if earlier.size and strategy != "random":
        pool = remove_ids(pool, earlier)
    matched = matched_nonmembers(target, pool, fraction, strategy, jax.random.fold_in(key, 1))
    atomic_write_json(path, {"forget": ids.tolist(), "matched": matched.tolist()})
    return ids


def _stop_reason(ctx: SyncContext, m: dict[str, Any]) -> str | None:
    bias_ok = m["data_kl_bias"] <= float(ctx.sync.delta)
    chance = 0.5 + float(ctx.sync.chance_margin)
    mia_ok = m["membership"]["strongest_balanced_accuracy"] <= chance
    if bias_ok and mia_ok:
        return f"bias {m['data_kl_bias']:.3f} ≤ δ = {ctx.sync.delta} and strongest attack ≤ {chance:.2f}"
    return None


def forget_budget(num_originals: int, forget_rate: float, rounds: int) -> list[int]:
    """Originals to forget in each round: ``round(rate · N)`` in total, spread evenly."""
    total = int(round(float(forget_rate) * num_originals))
    base, extra = divmod(total, int(rounds))
    return [base + (1 if r < extra else 0) for r in range(int(rounds))]


def _added_epochs(ctx: SyncContext) -> int | None:
    """Epochs of each stage that :meth:`SISAModel.add` appends (``sync.added_epochs``; 0 → the
    last stage's, SISA's default)."""
    e = int(ctx.sync.get("added_epochs", 0))
    return e or None


def sync_round(
    ctx: SyncContext, directory: Path, state: SyncState, key: PRNGKey, *, progress: bool = False
) -> SyncState:
    """One round: augment → add to the shards → forget step-wise → measure. Returns the new state
    (also written to ``state.json``). Idempotent: re-running an interrupted round finishes it."""
    from privdebias_jax.augment import generate, plan_augmentation

    r = state.round + 1
    rkey = jax.random.fold_in(key, r)
    sisa, data = _current(ctx, directory, r)
    splits = ctx.splits
    # 1. augment the under-represented cells
    t = time.perf_counter()
    syn_name = f"synthetic_{r}.npz"
    syn_path = directory / syn_name
    if syn_path.exists():
        synthetic = load_dataset_file(syn_path)
        data = remove_ids(data, synthetic.idx)  # _current included it; it is re-added below
    else:
        alive = _alive(sisa, data)
        max_new = int(ctx.sync.max_new_per_round) or None
        counts = plan_augmentation(
            alive, splits.num_classes, splits.num_attributes,
            target_bias=float(ctx.sync.delta), max_new=max_new,
        )
        start = _next_id(splits, data)
        if int(np.sum(counts)) > 0:
            synthetic = generate(ctx.augmenter, counts, key=jax.random.fold_in(rkey, 1), start_id=start)
        else:
            synthetic = Dataset(np.asarray(data.x)[:0], np.asarray(data.y)[:0], np.asarray(data.a)[:0], np.asarray(data.idx)[:0])
        save_dataset(syn_path, synthetic)
    _add_seconds(state, "augment", time.perf_counter() - t)
    # 2. choose the originals to forget on the model the round starts from (the one measured at
    # the end of the last round), then 3. add the synthetic samples and forget the first step of
    # originals in one retraining (each shard retrains once, from the earliest stage either
    # touches; bitwise equal to adding then forgetting), then the remaining steps
    t = time.perf_counter()
    budget = forget_budget(len(splits.train), float(ctx.sync.forget_rate), int(ctx.sync.rounds))
    count = budget[r - 1] if r - 1 < len(budget) else 0
    candidates = remove_ids(splits.train, sisa.forgotten) if sisa.forgotten.size else splits.train
    ids = _choose(ctx, sisa, candidates, count, jax.random.fold_in(rkey, 3), directory / f"forget_{r}.json")
    capacity = int(ctx.sync.capacity) or max(int(ids.size), 1)
    _add_seconds(state, "choose_forget", time.perf_counter() - t)
    t = time.perf_counter()
    if len(synthetic) and not np.all(np.isin(np.asarray(synthetic.idx), sisa.plan.ids)):
        sisa.add(
            synthetic, key=jax.random.fold_in(rkey, 2), epochs=_added_epochs(ctx), forget=ids[:capacity],
            progress=progress,
        )
    if len(synthetic):
        data = concat(data, synthetic)
    if ids.size:
        sisa.forget_stepwise(ids, capacity)  # ids forgotten above are skipped
    _add_seconds(state, "add_and_forget", time.perf_counter() - t)
    # 4. measure
    t = time.perf_counter()
    m = _measure(ctx, sisa, data, jax.random.fold_in(rkey, 4), directory)
    m["round"] = r
    m["added"] = int(len(synthetic))
    m["forgotten_now"] = int(ids.size)
    _add_seconds(state, "measure", time.perf_counter() - t)
    new = dataclasses.replace(
        state,
        round=r,
        synthetic=state.synthetic + ([syn_name] if syn_name not in state.synthetic else []),
        forgotten=state.forgotten + [ids.tolist()],
        history=state.history + [m],
    )
    new.stopped = _stop_reason(ctx, m)
    if new.stopped is None and r >= int(ctx.sync.rounds):
        new.stopped = f"after {r} round(s) (the limit)"
    atomic_write_json(directory / "state.json", new.to_json())
    return new


def run_sync(
    ctx: SyncContext, directory: str | Path, key: PRNGKey, *, progress: bool = False,
    say: Callable[[str], None] = print,
) -> SyncState:
    """Run (or resume) the loop in ``directory`` until it stops; returns the final state.

    Round 0 trains the SISA ensemble on the originals (``make_sisa``) and measures it; each later
    round is :func:`sync_round`. ``state.json`` is rewritten after every round.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "state.json"
    if path.exists():
        try:
            state = SyncState.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as err:
            raise PrivDebiasError(f"{path} is not a sync state: {err}") from err
        say(f"  resuming the sync loop after round {state.round}")
    else:
        t = time.perf_counter()
        state = SyncState()
        sisa = ctx.make_sisa(directory / "sisa", ctx.splits.train)
        _add_seconds(state, "train_shards", time.perf_counter() - t)
        t = time.perf_counter()
        m0 = _measure(ctx, sisa, ctx.splits.train, jax.random.fold_in(key, 0))
        m0["round"], m0["added"], m0["forgotten_now"] = 0, 0, 0
        state.history = [m0]
        _add_seconds(state, "measure", time.perf_counter() - t)
        atomic_write_json(path, state.to_json())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(ctx.sync.rounds), initial=state.round, desc="sync rounds", unit="round")
    while state.stopped is None and state.round < int(ctx.sync.rounds):
        state = sync_round(ctx, directory, state, key, progress=False)
        last = state.history[-1]
        say(
            f"  round {state.round}: +{last['added']} synthetic, -{last['forgotten_now']} originals; "
            f"data KL bias {last['data_kl_bias']:.3f}, counterfactual bias "
            f"{last.get('counterfactual_bias', float('nan')):.3f}, unbiased acc "
            f"{last.get('acc_unbiased', float('nan')):.3f}, strongest MIA "
            f"{last['membership']['strongest_balanced_accuracy']:.3f}"
        )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if state.stopped is None:
        state.stopped = f"after {state.round} round(s) (the limit)"
        atomic_write_json(path, state.to_json())
    return state


def naive_combination(
    ctx: SyncContext, directory: str | Path, vanilla_sisa_dir: str | Path, key: PRNGKey,
    *, total_new: int | None = None,
) -> dict[str, Any]:
    """The baseline without sync: augment once (the planner on the original data, at most
    ``total_new`` samples: the sync loop's whole budget), add once, forget the whole forget-rate
    share at once, measure. Starts from a copy of the vanilla SISA directory, so the three columns
    share their initial training."""
    from privdebias_jax.augment import generate, plan_augmentation

    directory = Path(directory)
    result_path = directory / "naive.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    splits = ctx.splits
    seconds: dict[str, float] = {}
    if not (directory / "sisa").exists():
        shutil.copytree(vanilla_sisa_dir, directory / "sisa")
    syn_path = directory / "synthetic.npz"
    t = time.perf_counter()
    if syn_path.exists():
        synthetic = load_dataset_file(syn_path)
    else:
        counts = plan_augmentation(
            splits.train, splits.num_classes, splits.num_attributes,
            target_bias=float(ctx.sync.delta), max_new=total_new,
        )
        start = _next_id(splits, splits.train)
        synthetic = generate(ctx.augmenter, counts, key=jax.random.fold_in(key, 1), start_id=start)
        save_dataset(syn_path, synthetic)
    seconds["augment"] = time.perf_counter() - t
    data = concat(splits.train, synthetic) if len(synthetic) else splits.train
    sisa = ctx.open_sisa(directory / "sisa", data)
    t = time.perf_counter()
    count = int(round(float(ctx.sync.forget_rate) * len(splits.train)))
    ids = _choose(ctx, sisa, splits.train, count, jax.random.fold_in(key, 3), directory / "forget.json")
    seconds["choose_forget"] = time.perf_counter() - t
    t = time.perf_counter()
    if len(synthetic) and not np.all(np.isin(np.asarray(synthetic.idx), sisa.plan.ids)):
        sisa.add(synthetic, key=jax.random.fold_in(key, 2), epochs=_added_epochs(ctx), forget=ids)
    sisa.forget(ids)  # no-op when the add above forgot them; completes an interrupted run
    seconds["add_and_forget"] = time.perf_counter() - t
    t = time.perf_counter()
    m = _measure(ctx, sisa, data, jax.random.fold_in(key, 4), directory)
    seconds["measure"] = time.perf_counter() - t
    m["added"], m["forgotten_now"] = int(len(synthetic)), int(ids.size)
    out = {"metrics": m, "seconds": seconds}
    atomic_write_json(result_path, out)
    return out


def fmd_pass(
    ctx: SyncContext,
    directory: str | Path,
    state: SyncState,
    external: Dataset,
    key: PRNGKey,
    *,
    proximal: float = 0.01,
    newton_iterations: int = 10,
    cg_iterations: int = 30,
    step_sizes: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.5, 1.0),
    max_acc_drop: float = 0.05,
    min_kept: float = 0.5,
) -> dict[str, Any]:
    """The optional debiasing pass on the loop's result: ``proximal_finetune`` on every shard.

    Every shard's last layer is fine-tuned by
    :func:`privdebias_jax.debias.proximal_finetune.proximal_finetune` (Newton-CG on
    ``(1/2n) Σ_k [ℓ(z_k) + ℓ(z̄_k)] + (μ/2)‖θ − θ⁰‖²`` over the external set ``D_ex`` and its
    counterfactuals, the converged form of FMD's external-set update), and the ensemble of the debiased shards is measured like a round. Only
    ``D_ex`` (held-out samples, never training data) enters the update, so nothing forgotten
    comes back; the SISA store is left as it is (a later deletion retrains its shards exactly,
    and the pass is re-run on the result). Returns ``{"metrics", "seconds", "shards",
    "num_params_updated", "model"}`` (``model``: the debiased ensemble's ``(module, params,
    model_state)``).

    Raises:
      PrivDebiasError: an empty external set, ``proximal ≤ 0`` (see ``proximal_finetune``).
    """
    from privdebias_jax.debias.proximal_finetune import proximal_finetune
    from privdebias_jax.unlearn.ensemble import ensemble_from_states

    directory = Path(directory)
    sisa, data = _current(ctx, directory, state.round)
    t0 = time.perf_counter()
    states, shards = [], []
    for s in range(sisa.plan.num_shards):
        r = proximal_finetune(
            sisa.model, sisa.shard_state(s), external, ctx.splits.counterfactual, ctx.splits.num_attributes,
            proximal=float(proximal), iterations=max(2, int(newton_iterations)), cg_iterations=int(cg_iterations),
            step_sizes=tuple(step_sizes), max_acc_drop=float(max_acc_drop), min_kept=float(min_kept),
            key=jax.random.fold_in(key, s),
        )
        states.append(r.state)
        shards.append({k: r.report.get(k) for k in ("bias_external_before", "bias_external_after",
                                                     "acc_external_before", "acc_external_after", "step",
                                                     "num_params_updated")})
    seconds = time.perf_counter() - t0
    target = ensemble_from_states(sisa.model, states, ctx.aggregate)
    metrics = _measure(ctx, sisa, data, jax.random.fold_in(key, 10**6), directory, target=target)
    return {"metrics": metrics, "seconds": seconds, "shards": shards, "model": target,
            "num_params_updated": int(sum(int(r["num_params_updated"] or 0) for r in shards))}


def total_synthetic(state: SyncState) -> int:
    """Synthetic samples added over all rounds."""
    return int(sum(h.get("added", 0) for h in state.history))


# ------------------------------------------------------------------------------------------
# the job: vanilla SISA, the sync loop, the naive baseline, figures
# ------------------------------------------------------------------------------------------


def get_sync_options(quick: bool = False) -> ml_collections.ConfigDict:
    """Defaults of the loop (the ``sync`` section of the main job's config).

    ``rounds`` (N), ``shards`` (S) × ``slices`` (R) of the SISA ensemble, ``program_width``
    (shard lanes per compiled program; 0 = :func:`~privdebias_jax.multi.auto_program_width`:
    one lane for a CNN on the CPU, where vmapped convolutions are slow, else S), ``forget_rate`` (share of the originals forgotten over the whole loop; the paper's
    10%), ``forget_strategy`` (``exposed``: lowest-loss originals first; ``random``),
    ``capacity`` (deletions per step; 0 = a round's share in one step), ``delta`` (target KL/MI
    bias of the training data, nats), ``chance_margin`` (an attack counts as at chance when its
    balanced accuracy ≤ 0.5 + margin), ``max_new_per_round`` (cap on synthetic samples per round;
    0 = none), ``attack_size`` (members and non-members per attack), ``aggregate``
    (``mean_softmax`` / ``vote``), ``naive`` (also run the augment-once-then-unlearn baseline),
    ``fmd_pass`` (debias the loop's result with FMD's external mode, :func:`fmd_pass`),
    ``added_epochs`` (epochs of each stage that adding synthetic samples appends to a shard;
    0 = the last stage's, SISA's default. Every added stage trains over the shard's cumulative
    data, so after a few rounds it is most of the retraining cost; but fewer epochs leave the
    bias learned in the first stages in place: 4 instead of 8 gave unbiased accuracy 0.30
    instead of 0.64 on the main job), ``lira`` (add offline LiRA to every membership measurement,
    the vanilla SISA shards as reference models: :func:`shard_references`).
    """
    c = ml_collections.ConfigDict()
    c.rounds = 3
    c.shards = 4
    c.slices = 2
    c.program_width = 0
    c.forget_rate = 0.1
    c.forget_strategy = "exposed"
    c.capacity = 0
    c.delta = 0.3
    c.chance_margin = 0.05
    c.max_new_per_round = 2000
    c.attack_size = 400
    c.aggregate = "mean_softmax"
    c.naive = True
    c.fmd_pass = True
    c.added_epochs = 0
    c.lira = True
    if quick:
        c.rounds = 1
        c.shards = 2
        c.max_new_per_round = 200
        c.attack_size = 40
    return c


_BUILT: dict[str, tuple[Any, Any]] = {}


def make_context(
    config: ml_collections.ConfigDict,
    splits: DataSplits,
    augmenter: Any,
    out: Path,
    key: PRNGKey,
    *,
    progress: bool = False,
) -> SyncContext:
    """The loop's context: SISA settings from ``config`` (model, optimiser, batch size, epochs via
    :func:`~privdebias_jax.unlearn.sisa_epochs`) and ``config.sync``. The vanilla SISA model is
    trained once in ``out/sisa_vanilla``; the loop and the naive baseline start from copies."""
    from privdebias_jax.multi import auto_program_width
    from privdebias_jax.pipeline import spec_from_config
    from privdebias_jax.unlearn import make_plan, sisa_epochs, train_shards

    sync = config.sync
    check_sync_options(sync)
    spec = spec_from_config(config, splits)
    # One (model, tx) pair per spec: SISA's compiled stage programs are cached per pair, so a
    # resumed or repeated loop in the same process reuses them instead of recompiling.
    built = _BUILT.get(repr(spec))
    if built is None:
        built = _BUILT[repr(spec)] = spec.build()
    model, tx = built
    vanilla_dir = Path(out) / "sisa_vanilla"

    def train_vanilla(train_set: Dataset) -> SISAModel:
        width = int(sync.program_width) or auto_program_width(
            model, tx, tuple(np.shape(train_set.x)[1:]), int(sync.shards)
        )
        plan = make_plan(
            train_set.idx, int(sync.shards), int(sync.slices), key=jax.random.fold_in(key, 2)
        )
        sisa, _ = train_shards(
            model, tx, train_set, plan, vanilla_dir,
            key=jax.random.fold_in(key, 3),
            epochs_per_slice=sisa_epochs(int(config.epochs), int(sync.slices)),
            batch_size=int(config.batch_size),
            program_width=width,
            progress=progress,
        )
        return sisa

    def open_sisa(directory: Path, data: Dataset) -> SISAModel:
        return SISAModel.open(directory, model, tx, data)

    def make_sisa(directory: Path, train_set: Dataset) -> SISAModel:
        if not (vanilla_dir / "meta.json").exists() or directory == vanilla_dir:
            train_vanilla(train_set)
        if directory != vanilla_dir:
            if directory.exists():
                shutil.rmtree(directory)
            shutil.copytree(vanilla_dir, directory)
        return open_sisa(directory, train_set)

    cache: dict[str, Any] = {}

    def references() -> Any:
        # the vanilla shards (trained on the originals, never forgetting) over train ∪ test
        if "lira" not in cache:
            if not (vanilla_dir / "meta.json").exists():
                train_vanilla(splits.train)
            cache["lira"] = shard_references(open_sisa(vanilla_dir, splits.train), concat(splits.train, splits.test))
        return cache["lira"]

    return SyncContext(
        splits, augmenter, make_sisa, open_sisa, sync, str(sync.aggregate),
        # one shard: no sample has an OUT reference model, so no LiRA
        references=references if bool(sync.get("lira", True)) and int(sync.shards) >= 2 else None,
    )


def plot_rounds(state: SyncState, path: Path, naive: dict[str, Any] | None = None) -> Path:
    """Bias (data KL/MI, counterfactual) and attack success (strongest attack on members and on
    forgotten originals) per round; the naive baseline as dashed lines."""
    from privdebias_jax.report import _pyplot, save_figure

    plt = _pyplot()
    rounds = [h["round"] for h in state.history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(rounds, [h["data_kl_bias"] for h in state.history], "o-", label="data KL/MI bias (nats)")
    ax1.plot(rounds, [h.get("counterfactual_bias") for h in state.history], "s-", label="counterfactual bias")
    ax1.plot(rounds, [h.get("acc_unbiased") for h in state.history], "^-", label="unbiased accuracy")
    ax2.plot(rounds, [h["membership"]["strongest_balanced_accuracy"] for h in state.history], "o-",
             label="strongest MIA, members")
    forg = [(h["round"], h["membership_forgotten"]["strongest_balanced_accuracy"])
            for h in state.history if "membership_forgotten" in h]
    if forg:
        ax2.plot(*zip(*forg, strict=True), "s-", label="strongest MIA, forgotten originals")
    ax2.axhline(0.5, color="grey", lw=0.8, ls=":")
    if naive is not None:
        m = naive["metrics"]
        ax1.axhline(m["data_kl_bias"], color="C0", ls="--", lw=0.8, label="naive: data bias")
        ax1.axhline(m.get("counterfactual_bias", np.nan), color="C1", ls="--", lw=0.8, label="naive: cf bias")
        ax2.axhline(m["membership"]["strongest_balanced_accuracy"], color="C0", ls="--", lw=0.8,
                    label="naive: MIA members")
    ax1.set_xlabel("round")
    ax2.set_xlabel("round")
    ax1.set_title("bias and accuracy per round")
    ax2.set_title("membership inference (balanced accuracy)")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    return save_figure(fig, path, dpi=110)


def roc_figure(columns: dict[str, dict[str, Any]], path: Path, attack: str = "loss") -> Path:
    """ROC curves (log-log) of ``attack`` on members for each column's model."""
    from privdebias_jax.privacy.metrics import plot_roc, roc_curve

    curves = {}
    for name, m in columns.items():
        roc = m.get("membership", {}).get("roc", {})
        if attack in roc:
            fpr, tpr, _ = roc_curve(np.asarray(roc[attack][0]), np.asarray(roc[attack][1]))
            curves[f"{name} ({attack})"] = (fpr, tpr)
    return plot_roc(curves, path, title=f"membership inference ({attack}) on members")


__all__ = [
    "FORGET_STRATEGIES",
    "ROUND_ATTACKS",
    "SyncContext",
    "SyncState",
    "check_sync_options",
    "choose_forget_ids",
    "data_bias",
    "exposure_scores",
    "forget_budget",
    "get_sync_options",
    "make_context",
    "plot_rounds",
    "roc_figure",
    "load_dataset_file",
    "matched_nonmembers",
    "measure",
    "naive_combination",
    "run_sync",
    "save_dataset",
    "shard_references",
    "sync_round",
    "total_synthetic",
]

