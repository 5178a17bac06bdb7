"""SISA training and exact forgetting: all shards as one program over a shard axis, checkpoints per slice.

Bourtoule et al., "Machine Unlearning" (IEEE S&P 2021); the distributed step-wise unlearning
of "Privacy-Preserving Debiasing using Data Augmentation and Machine Unlearning" (2024).

**Training.** Shard ``s`` is trained in ``R`` *stages*: stage ``t`` trains on its slices
``0..t`` for ``e_t`` epochs (SISA's incremental training; :func:`sisa_epochs` gives
Bourtoule et al.'s ``e_t = ⌈2E/(R+1)⌉``, which makes a shard's total work that of ``E`` epochs
on its data), starting from the state after stage ``t−1``; the state after every stage is
checkpointed (orbax), and so is the initial state (checkpoint 0). All shards of a stage run in
one jitted program over a stacked shard axis (``vmap``-ed or one after the other, see *Lanes
per device*): the whole stage (every epoch's shuffle and every batch) is one call
(``layout="scan"``), or one call per batch for convolutional models (``layout="loop"``: XLA's
CPU convolutions are many times slower inside ``lax.scan``). With several devices the shard axis is split over a ``Mesh`` with
``jax.shard_map``.

**Program width.** A program trains exactly ``W`` shard lanes (``program_width``, default
``S``); a group with fewer shards is padded with dummy lanes. Every shard is therefore always
trained by the *same* compiled program, which is what makes forgetting bitwise exact on CPU
(XLA's results depend on the vmapped width). Smaller ``W`` makes a deletion cheaper (it
retrains ``W`` lanes, not ``S``); larger ``W`` trains faster on accelerators.

**Lanes per device.** ``lane_batch`` (:func:`privdebias_jax.multi.resolve_lane_batch`) is how
many lanes a device computes together: ``"auto"`` is ``1`` on a CPU (lanes in sequence inside
the program: a lane's working set stays in cache, and its result is the same bit for bit at
every width and on any number of devices) and one ``vmap`` of all lanes on accelerators. The
resolved value is part of the directory's configuration; ``"auto"`` on an existing directory
takes the value it was trained with (one ``vmap``, ``None``, for directories written before the
setting existed), so such directories resume and forget exactly as before. With the CPU split
into one device per core (``privdebias --cpu-devices N``,
:func:`privdebias_jax.multi.use_cpu_devices`) the lanes of a program run on all cores at once.

**Forgetting.** :meth:`SISAModel.forget` records the ids in the :class:`Ledger` (atomically,
before anything else), restores each affected shard from the checkpoint before its earliest
affected slice, retrains the remaining stages without the forgotten samples (affected shards
together, ``W`` per program), overwrites their later checkpoints and marks the request done.
Checkpoints (:mod:`~privdebias_jax.unlearn.store`: one flat vector per dtype, ~3× cheaper in
orbax than a tree of small leaves) are written on a background thread while the next stage
trains, and all of them are on disk before the request is marked done. The initial state
(checkpoint 0) depends only on the key and is never rewritten.
Unaffected shards are neither recomputed nor rewritten. Every shard's randomness depends
only on ``(key, shard, stage, epoch)`` and on which of its samples are alive, so a forgotten
shard equals, bit for bit, the shard trained from scratch without those ids.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from privdebias_jax import checkpoint as ckpt
from privdebias_jax.data.dataset import Batch, Dataset, concat, subset
from privdebias_jax.multi import (
    LAYOUTS,
    default_mesh,
    init_program,
    resolve_lane_batch,
    run_stage,
    tree_index,
    tree_stack,
)
from privdebias_jax.train import TrainState, create_train_state
from privdebias_jax.types import PrivDebiasError, PRNGKey
from privdebias_jax.unlearn.ledger import Ledger, atomic_write_json
from privdebias_jax.unlearn.plan import PADDING_ID, ShardPlan
from privdebias_jax.unlearn.store import ShardStore


def sisa_epochs(total_epochs: int, num_slices: int) -> tuple[int, ...]:
    """Bourtoule et al.'s per-stage epochs ``e_t = ⌈2E / (R + 1)⌉`` for every stage ``t``.

    Stage ``t`` sees ``(t+1)/R`` of the shard, so the shard's total work is
    ``Σ_t e_t (t+1)/R ≈ E`` epochs over its data, the same as training it on everything at once.
    """
    if int(total_epochs) < 1 or int(num_slices) < 1:
        raise PrivDebiasError(
            f"total_epochs and num_slices must be at least 1, got {total_epochs}, {num_slices}"
        )
    return (max(1, math.ceil(2 * int(total_epochs) / (int(num_slices) + 1))),) * int(num_slices)


@dataclasses.dataclass(frozen=True)
class SISAConfig:
    """Training settings of a SISA model (part of its checkpoint directory's identity).

    Attributes:
      epochs_per_slice: epochs of stage ``t`` (one entry per slice), see :func:`sisa_epochs`.
      batch_size: batch size inside a shard.
      program_width: shard lanes per compiled program ``W`` (``None`` → ``S``).
      layout: ``scan`` (a stage is one call), ``loop`` (one call per batch) or ``auto`` (``loop``
        for models with convolution kernels, ``scan`` otherwise; measured in
        ``benchmarks/fit_loop.py``).
      lane_batch: lanes a device computes together (``"auto"``, ``None`` = all in one ``vmap``,
        or a positive integer); :class:`SISAModel` stores it resolved.
    """

    epochs_per_slice: tuple[int, ...]
    batch_size: int = 64
    program_width: int | None = None
    layout: str = "auto"
    lane_batch: int | str | None = "auto"

    def to_json(self) -> dict[str, Any]:
        out = {
            "epochs_per_slice": list(self.epochs_per_slice),
            "batch_size": self.batch_size,
            "program_width": self.program_width,
            "layout": self.layout,
        }
        # absent = one vmap of every lane, as directories written before the setting existed
        if self.lane_batch is not None:
            out["lane_batch"] = self.lane_batch
        return out


def _stored_config(directory: Path) -> dict[str, Any] | None:
    """The ``config`` of ``directory/meta.json``, or ``None`` if there is none readable (a bad
    file is reported later by the fingerprint check)."""
    try:
        config = json.loads((directory / "meta.json").read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return config if isinstance(config, dict) else None


@dataclasses.dataclass
class RetrainCost:
    """What one (re)training pass computed.

    Attributes:
      seconds: wall time, of which ``restore_seconds`` went to restoring checkpoints (or
        initialising shards that start at stage 0) and ``save_seconds`` to saving them: queueing
        the writes and waiting at the end for those not yet on disk.
      write_seconds: time the background writer spent writing checkpoints (mostly overlapped
        with training, so not part of ``seconds``).
      saves / restores: checkpoints written / read.
      shards: the shards retrained, with the stage each started from (``{shard: stage}``).
      programs: calls of a width-``W`` stage program (``layout="loop"``: per stage, not per batch).
      lane_stages: shard-stages computed (including dummy lanes that pad a program to ``W``).
      sample_epochs: ``Σ`` alive samples × epochs over the real lanes' stages.
    """

    seconds: float = 0.0
    restore_seconds: float = 0.0
    save_seconds: float = 0.0
    write_seconds: float = 0.0
    saves: int = 0
    restores: int = 0
    shards: dict[int, int] = dataclasses.field(default_factory=dict)
    programs: int = 0
    lane_stages: int = 0
    sample_epochs: int = 0

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shards"] = {str(k): v for k, v in self.shards.items()}
        return d


@dataclasses.dataclass
class ForgetReport:
    """The outcome of one :meth:`SISAModel.forget` call.

    Attributes:
      requested: the ids asked for (deduplicated).
      new: those not already in the ledger.
      recovered: pending ids of an interrupted earlier request, completed by this call.
      cost: the retraining it took.
    """

    requested: list[int]
    new: list[int]
    recovered: list[int]
    cost: RetrainCost

    def to_json(self) -> dict[str, Any]:
        return {
            "requested": len(self.requested),
            "new": len(self.new),
            "recovered": len(self.recovered),
            **self.cost.to_json(),
        }


def _key_data(key: PRNGKey | int) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
        key = jax.random.PRNGKey(int(key))
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key, np.uint32)


class SISAModel:
    """``S`` shard models trained SISA-style, with a ledger and per-slice checkpoints.

    Create with :func:`train_shards` (or :meth:`open` on an existing directory); then
    :meth:`forget`, :meth:`forget_stepwise`, :meth:`ensemble`. Layout of ``directory``::

        meta.json            plan, config, key, fingerprint
        ledger.json          deletion requests (see :class:`~privdebias_jax.unlearn.Ledger`)
        shards/<s>/<t>/      orbax checkpoint of shard s after t stages (t = 0: initial state),
                             see :mod:`privdebias_jax.unlearn.store`
    """

    def __init__(
        self,
        model: nn.Module,
        tx: optax.GradientTransformation,
        train_set: Dataset,
        plan: ShardPlan,
        config: SISAConfig,
        directory: str | os.PathLike,
        key: PRNGKey | int,
        mesh: jax.sharding.Mesh | None | str = "auto",
    ):
        self.model, self.tx, self.plan, self.config = model, tx, plan, config
        self.directory = Path(directory).expanduser().resolve()
        self.key = _key_data(key)
        s, r = plan.num_shards, plan.num_slices
        if len(config.epochs_per_slice) != r:
            raise PrivDebiasError(
                f"epochs_per_slice has {len(config.epochs_per_slice)} entries for {r} slices"
            )
        if any(int(e) < 1 for e in config.epochs_per_slice):
            raise PrivDebiasError(f"epochs_per_slice must be ≥ 1, got {config.epochs_per_slice}")
        if int(config.batch_size) < 1:
            raise PrivDebiasError(f"batch_size must be positive, got {config.batch_size}")
        if config.layout not in LAYOUTS:
            raise PrivDebiasError(f"unknown layout {config.layout!r}; expected one of {LAYOUTS}")
        if config.lane_batch == "auto":
            # "auto" in an existing directory: what it was trained with (absent: one vmap)
            stored = _stored_config(self.directory)
            if stored is not None:
                config = dataclasses.replace(config, lane_batch=stored.get("lane_batch"))
        config = dataclasses.replace(config, lane_batch=resolve_lane_batch(config.lane_batch))
        self.config = config
        self.width = s if config.program_width is None else int(config.program_width)
        if not 1 <= self.width <= s:
            raise PrivDebiasError(
                f"program_width must be in [1, {s}] (the number of shards), got {config.program_width}"
            )
        self.mesh = default_mesh(self.width) if isinstance(mesh, str) else mesh
        self.train_set = train_set
        self._build_slot_data(train_set)
        self.input_shape = tuple(np.shape(train_set.x)[1:])
        self.layout = config.layout
        if self.layout == "auto":
            template = jax.eval_shape(
                lambda k: create_train_state(model, tx, k, self.input_shape), jax.random.PRNGKey(0)
            )
            has_conv = any(
                len(leaf.shape) == 4 for leaf in jax.tree_util.tree_leaves(template.params)
            )
            self.layout = "loop" if has_conv else "scan"
        self._template = jax.eval_shape(
            lambda k: create_train_state(model, tx, k, self.input_shape), jax.random.PRNGKey(0)
        )
        self.fingerprint = self._fingerprint()
        self.lineage = self.fingerprint
        self._check_directory()
        self.ledger = Ledger(self.directory / "ledger.json", self.lineage)
        self.store = ShardStore(self.directory / "shards", self._template)
        self.states: list[TrainState | None] = [None] * s

    # ------------------------------------------------------------------ layout and identity
    def _build_slot_data(self, train_set: Dataset) -> None:
        ids = np.asarray(train_set.idx, np.int64)
        order = np.argsort(ids, kind="stable")
        flat = self.plan.slots.reshape(self.plan.num_shards, -1)
        real = flat != PADDING_ID
        pos = np.searchsorted(ids[order], np.where(real, flat, 0))
        pos = np.minimum(pos, ids.size - 1)
        ok = ids[order][pos] == flat
        if not np.all(ok[real]):
            missing = flat[real & ~ok]
            raise PrivDebiasError(
                f"train_set lacks {missing.size} id(s) of the plan, e.g. {missing[:5].tolist()}"
            )
        rows = np.where(real, order[pos], 0)
        self._rows = rows  # (S, R·c) row of train_set per slot (0 for padding)
        self._real = real
        self._data = Batch(
            x=np.asarray(train_set.x)[rows],
            y=np.asarray(train_set.y, np.int32)[rows],
            a=np.asarray(train_set.a, np.int32)[rows],
            idx=np.where(real, flat, PADDING_ID),
            mask=real.astype(np.float32),
        )

    def _fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256(self.plan.fingerprint().encode())
        h.update(json.dumps(self.config.to_json(), sort_keys=True).encode())
        h.update(self.key.tobytes())
        h.update(repr(self.model).encode())
        return h.hexdigest()

    def _meta(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "lineage": self.lineage,
            "plan": self.plan.to_json(),
            "config": self.config.to_json(),
            "key": self.key.tolist(),
            "model": repr(self.model),
        }

    def _check_directory(self) -> None:
        meta = self.directory / "meta.json"
        if meta.exists():
            try:
                data = json.loads(meta.read_text())
                found = data.get("fingerprint")
            except (json.JSONDecodeError, AttributeError) as err:
                raise PrivDebiasError(f"{meta} is not valid JSON of a SISA directory: {err}") from err
            # The ledger belongs to the directory's lineage: the plan it was created with, kept
            # through :meth:`add` (which extends the plan and changes the fingerprint).
            self.lineage = str(data.get("lineage", found))
            if found != self.fingerprint:
                raise PrivDebiasError(
                    f"checkpoint directory {self.directory} belongs to another SISA plan or configuration "
                    "(fingerprint mismatch); use a fresh directory"
                )
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta, self._meta())

    # ------------------------------------------------------------------ keys, data, checkpoints
    def _shard_keys(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        skey = jax.random.fold_in(jnp.asarray(self.key), shard)
        init_key, train_key = jax.random.split(skey)
        return np.asarray(init_key), np.asarray(train_key)

    def _alive(self, shard: int, stage: int) -> np.ndarray:
        cap = (stage + 1) * self.plan.slice_capacity
        alive = self._real[shard, :cap].copy()
        forgotten = self.ledger.forgotten
        if forgotten.size:
            alive &= ~np.isin(self._data.idx[shard, :cap], forgotten)
        return alive

    def _shard_dir(self, shard: int) -> Path:
        return self.store.shard_dir(shard)

    def _save(self, shard: int, stage_done: int, state: Any) -> None:
        """Queue the checkpoint of ``shard`` after ``stage_done`` stages (written in the
        background; :meth:`_retrain` waits for every write before it returns)."""
        self.store.save(shard, stage_done, state)

    def _restore(self, shard: int, stage_done: int) -> TrainState:
        return self.store.restore(shard, stage_done)

    def _init_state(self, shard: int) -> TrainState:
        init_key, _ = self._shard_keys(shard)
        state = init_program(self.model, self.tx, self.input_shape)(jnp.asarray(init_key))
        return jax.tree_util.tree_map(np.asarray, state)

    # ------------------------------------------------------------------ the (re)training loop
    def _retrain(
        self, start: dict[int, int], progress: bool = False, desc: str = "sisa"
    ) -> RetrainCost:
        """Train every shard in ``start`` from the checkpoint before stage ``start[s]`` to the end.

        Checkpoints are written in the background while the next stage trains; this returns
        only once all of them are on disk (the caller then marks the requests done). On an
        error the writes already queued are waited for, then the error is raised.
        """
        t_all = time.perf_counter()
        cost = RetrainCost(shards=dict(sorted(start.items())))
        if not start:
            return cost
        write_before = self.store.write_seconds
        try:
            current = self._retrain_stages(start, cost, progress, desc)
            t0 = time.perf_counter()
            self.store.wait()
            cost.save_seconds += time.perf_counter() - t0
        except BaseException:
            self.store.drain()
            raise
        for s, state in current.items():
            self.states[s] = state
        cost.write_seconds = self.store.write_seconds - write_before
        cost.seconds = time.perf_counter() - t_all
        return cost

    def _save_timed(self, shard: int, stage_done: int, state: Any, cost: RetrainCost) -> None:
        t0 = time.perf_counter()
        self._save(shard, stage_done, state)
        cost.saves += 1
        cost.save_seconds += time.perf_counter() - t0

    def _retrain_stages(
        self, start: dict[int, int], cost: RetrainCost, progress: bool, desc: str
    ) -> dict[int, Any]:
        current: dict[int, Any] = {}
        r_total = self.plan.num_slices
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=r_total - min(start.values()), desc=desc, unit="stage", leave=False)
        for t in range(min(start.values()), r_total):
            lanes = sorted(s for s, r0 in start.items() if r0 <= t)
            for s in lanes:
                if s not in current:
                    t0 = time.perf_counter()
                    if t == 0:
                        # the initial state depends only on the key: checkpoint 0 is written
                        # once, never rewritten
                        state = self._init_state(s)
                        if not self.store.exists(s, 0):
                            self._save_timed(s, 0, state, cost)
                    else:
                        state = self._restore(s, t)
                        cost.restores += 1
                    current[s] = state
                    cost.restore_seconds += time.perf_counter() - t0
            # A slice that holds only padding (a shard that received no samples in
            # :meth:`add`) adds no stage: the state carries over unchanged.
            skipped = [s for s in lanes if self.plan.slice_is_empty(s, t)]
            for s in skipped:
                self._save_timed(s, t + 1, current[s], cost)
            lanes = [s for s in lanes if s not in skipped]
            for g in range(0, len(lanes), self.width):
                group = lanes[g : g + self.width]
                outs = self._run_stage(t, group, [current[s] for s in group], cost)
                for i, s in enumerate(group):
                    current[s] = tree_index(outs, i)
                    self._save_timed(s, t + 1, current[s], cost)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return current

    def _run_stage(self, t: int, group: list[int], states: list[Any], cost: RetrainCost) -> Any:
        cap = (t + 1) * self.plan.slice_capacity
        epochs = int(self.config.epochs_per_slice[t])
        pad = self.width - len(group)
        lanes = group + [group[-1]] * pad  # dummy lanes repeat the last shard, all masked out
        alive = [self._alive(s, t) for s in group] + [np.zeros(cap, bool)] * pad
        data = Batch(
            x=np.stack([self._data.x[s, :cap] for s in lanes]),
            y=np.stack([self._data.y[s, :cap] for s in lanes]),
            a=np.stack([self._data.a[s, :cap] for s in lanes]),
            idx=np.stack([self._data.idx[s, :cap] for s in lanes]),
            mask=np.stack(alive).astype(np.float32),
        )
        keys = np.stack(
            [np.asarray(jax.random.fold_in(jnp.asarray(self._shard_keys(s)[1]), t)) for s in lanes]
        )
        stacked = tree_stack(states + [states[-1]] * pad)
        out = run_stage(
            self.model,
            self.tx,
            stacked,
            data,
            keys,
            epochs=epochs,
            batch_size=int(self.config.batch_size),
            layout=self.layout,
            mesh=self.mesh,
            lane_batch=self.config.lane_batch,
        )
        cost.programs += 1
        cost.lane_stages += self.width
        cost.sample_epochs += int(sum(a.sum() for a in alive)) * epochs
        return out

    # ------------------------------------------------------------------ public operations
    def train(self, progress: bool = False, resume: bool = True) -> RetrainCost:
        """Train every shard (resuming each from its newest checkpoint when ``resume``)."""
        start = {}
        for s in range(self.plan.num_shards):
            done = ckpt.latest_step(self._shard_dir(s)) if resume else None
            start[s] = 0 if done is None else int(done)
        start = self._with_pending(start)
        todo = {s: r for s, r in start.items() if r < self.plan.num_slices}
        cost = self._retrain(todo, progress=progress, desc="sisa train")
        self.ledger.mark_done()
        for s in range(self.plan.num_shards):
            if self.states[s] is None:
                self.states[s] = jax.tree_util.tree_map(
                    np.asarray, self._restore(s, self.plan.num_slices)
                )
        return cost

    def _with_pending(self, start: dict[int, int]) -> dict[int, int]:
        pending = self.ledger.pending
        if pending.size:
            shards, slices = self.plan.locate(pending)
            for s, r in zip(shards.tolist(), slices.tolist(), strict=True):
                start[s] = min(start.get(s, self.plan.num_slices), r)
        return start

    def _check_not_emptied(self, ids: np.ndarray) -> None:
        gone = np.union1d(self.ledger.forgotten, ids)
        sizes = self.plan.shard_sizes(gone)
        if np.any(sizes == 0):
            empty = np.flatnonzero(sizes == 0).tolist()
            raise PrivDebiasError(
                f"forgetting these ids would leave shard(s) {empty} with no samples; nothing was changed"
            )

    def forget(self, ids: Iterable[int] | np.ndarray) -> ForgetReport:
        """Forget ``ids`` exactly: retrain their shards from the checkpoint before their slices.

        Ids already forgotten are ignored (idempotent); pending ids of an interrupted earlier
        call are completed too.

        Raises:
          PrivDebiasError: for negative or unknown ids, or a deletion that would empty a shard
            (checked before the ledger or any checkpoint changes).
        """
        ids = np.unique(
            np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64).reshape(-1)
        )
        if ids.size:
            self.plan.locate(ids)  # raises for negative / unknown ids
            self._check_not_emptied(ids)
        recovered = self.ledger.pending
        new = self.ledger.add(ids)
        start = self._with_pending({})
        cost = self._retrain(start)
        self.ledger.mark_done()
        return ForgetReport(ids.tolist(), new.tolist(), recovered.tolist(), cost)

    def recover(self) -> ForgetReport:
        """Complete the requests an interrupted :meth:`forget` left pending (no-op otherwise)."""
        return self.forget([])

    def forget_stepwise(self, ids: Iterable[int] | np.ndarray, capacity: int) -> list[ForgetReport]:
        """Apply a stream of deletion requests in steps of at most ``capacity`` new ids each.

        Ids are taken in the given order (already forgotten ones skipped); every step is one
        :meth:`forget` call and its cost is in the returned report.

        Raises:
          PrivDebiasError: for ``capacity < 1`` and everything :meth:`forget` rejects (all ids
            are validated before the first step).
        """
        if int(capacity) < 1:
            raise PrivDebiasError(f"deletion capacity must be at least 1, got {capacity}")
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64).reshape(
            -1
        )
        if ids.size:
            self.plan.locate(ids)
            self._check_not_emptied(np.unique(ids))
        _, first = np.unique(ids, return_index=True)
        ordered = ids[np.sort(first)]
        ordered = ordered[~np.isin(ordered, self.ledger.forgotten)]
        reports = []
        for start in range(0, ordered.size, int(capacity)):
            reports.append(self.forget(ordered[start : start + int(capacity)]))
        return reports

    def add(
        self,
        new_set: Dataset,
        *,
        key: PRNGKey | int = 0,
        shards: Sequence[int] | None = None,
        epochs: int | None = None,
        progress: bool = False,
        forget: Iterable[int] | np.ndarray | None = None,
    ) -> RetrainCost:
        """Add new samples (e.g. synthetic ones) as new slices; retrain only the shards that got any.

        ``forget`` (optional) names ids to forget *in the same retraining*: each shard retrains
        once, from the earliest stage that a forgotten id or a new sample touches, instead of
        once for the new stages and again from the forgotten ids' stages. The result is
        bitwise the same as ``add`` followed by :meth:`forget` (SISA is deterministic given the
        plan, the ledger and the key), at the cost of the second retraining alone: the new
        stages of a shard are then trained once, not twice.

        The plan is extended by :meth:`ShardPlan.extend` (``new_set``'s ids dealt at random over
        ``shards``, default all, into ``k`` new slices of the same capacity); every new stage
        trains ``epochs`` epochs (default: the last stage's). Shards whose new slices are empty
        skip the new stages (their parameters do not change), so after ``add`` every shard equals,
        bitwise on CPU, the shard trained from scratch on the extended plan. ``meta.json`` is
        rewritten atomically *before* training, so an interrupted ``add`` is completed by
        :meth:`open` with the combined data (old training set + ``new_set``). Pending deletion
        requests are completed first. Later :meth:`forget` calls may name the new ids too.

        Raises:
          PrivDebiasError: an empty ``new_set``, samples of another shape, ids that are negative,
            duplicated or already in the plan (or the ledger), bad ``shards`` or ``epochs < 1``,
            ``forget`` ids that are unknown or would empty a shard (all checked before anything
            changes).
        """
        n_new = len(new_set)
        if n_new == 0:
            raise PrivDebiasError("add needs at least one new sample")
        if tuple(np.shape(new_set.x)[1:]) != self.input_shape:
            raise PrivDebiasError(
                f"new samples have shape {tuple(np.shape(new_set.x)[1:])}, the shards were trained "
                f"on {self.input_shape}"
            )
        e = int(self.config.epochs_per_slice[-1]) if epochs is None else int(epochs)
        if e < 1:
            raise PrivDebiasError(f"epochs must be at least 1, got {epochs}")
        new_ids = np.asarray(new_set.idx, np.int64)
        if np.any(np.isin(new_ids, self.ledger.forgotten)):
            raise PrivDebiasError("new samples reuse ids that were forgotten; give them fresh ids")
        plan = self.plan.extend(new_ids, key, shards)
        drop = np.zeros(0, np.int64)
        if forget is not None:
            drop = np.unique(
                np.asarray(list(forget) if not isinstance(forget, np.ndarray) else forget, np.int64).reshape(-1)
            )
        if drop.size:
            plan.locate(drop)  # raises for negative / unknown ids (new ids included)
            gone = np.union1d(self.ledger.forgotten, drop)
            if np.any(plan.shard_sizes(gone) == 0):
                empty = np.flatnonzero(plan.shard_sizes(gone) == 0).tolist()
                raise PrivDebiasError(
                    f"forgetting these ids would leave shard(s) {empty} with no samples; nothing was changed"
                )
        elif self.ledger.pending.size:
            self.recover()
        k = plan.num_slices - self.plan.num_slices
        config = dataclasses.replace(
            self.config, epochs_per_slice=tuple(self.config.epochs_per_slice) + (e,) * k
        )
        # ``train_set`` may already hold the new rows (a model opened with the combined data)
        keep = np.flatnonzero(~np.isin(np.asarray(self.train_set.idx), new_ids))
        combined = concat(subset(self.train_set, keep), new_set)
        self.plan, self.config, self.train_set = plan, config, combined
        self._build_slot_data(combined)
        self.fingerprint = self._fingerprint()
        atomic_write_json(self.directory / "meta.json", self._meta())
        if drop.size:
            # pending requests: train() retrains each shard from the earliest of its new stages
            # and its forgotten ids' stages (slots never move, so old locations stay valid)
            self.ledger.add(drop)
        return self.train(progress=progress, resume=True)

    def shard_state(self, shard: int) -> TrainState:
        """The current (final-stage) state of one shard."""
        if not 0 <= int(shard) < self.plan.num_shards:
            raise PrivDebiasError(f"shard {shard} out of range [0, {self.plan.num_shards})")
        if self.states[shard] is None:
            raise PrivDebiasError("the shards are not trained yet; call train()")
        return self.states[shard]

    def stacked_state(self) -> TrainState:
        """Every shard's state stacked on a leading shard axis."""
        return tree_stack([self.shard_state(s) for s in range(self.plan.num_shards)])

    def ensemble(self, aggregate: str = "mean_softmax"):
        """``(module, params, model_state)`` of the shard ensemble: use them wherever a single
        model's are used (:func:`privdebias_jax.train.predict`, ``evaluate``, attacks).
        See :class:`privdebias_jax.unlearn.ShardEnsemble`."""
        from privdebias_jax.unlearn.ensemble import ensemble_from_states

        return ensemble_from_states(
            self.model, [self.shard_state(s) for s in range(self.plan.num_shards)], aggregate
        )

    @property
    def forgotten(self) -> np.ndarray:
        return self.ledger.forgotten

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        model: nn.Module,
        tx: optax.GradientTransformation,
        train_set: Dataset,
        mesh: jax.sharding.Mesh | None | str = "auto",
        recover: bool = True,
    ) -> SISAModel:
        """Reopen a trained SISA directory (plan, config and key from ``meta.json``).

        With ``recover`` pending requests of an interrupted :meth:`forget` are completed and
        missing stages trained.

        Raises:
          PrivDebiasError: no ``meta.json``, a model/config that does not match it, or a
            ``train_set`` without the plan's ids.
        """
        meta_path = Path(directory).expanduser().resolve() / "meta.json"
        if not meta_path.exists():
            raise PrivDebiasError(f"{directory} is not a SISA directory (no meta.json)")
        try:
            meta = json.loads(meta_path.read_text())
            c = meta["config"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise PrivDebiasError(
                f"{meta_path} is not valid JSON of a SISA directory: {err}"
            ) from err
        config = SISAConfig(
            tuple(c["epochs_per_slice"]),
            int(c["batch_size"]),
            c["program_width"],
            c["layout"],
            c.get("lane_batch"),  # absent: written before the setting, one vmap of all lanes
        )
        plan = ShardPlan.from_json(meta["plan"])
        key = np.asarray(meta["key"], np.uint32)
        self = cls(model, tx, train_set, plan, config, directory, key, mesh=mesh)
        if recover:
            self.train(resume=True)
        return self


def train_shards(
    model: nn.Module,
    tx: optax.GradientTransformation,
    train_set: Dataset,
    plan: ShardPlan,
    directory: str | os.PathLike,
    *,
    key: PRNGKey | int,
    epochs_per_slice: int | Sequence[int] = 1,
    batch_size: int = 64,
    program_width: int | None = None,
    layout: str = "auto",
    mesh: jax.sharding.Mesh | None | str = "auto",
    lane_batch: int | str | None = "auto",
    resume: bool = True,
    progress: bool = False,
) -> tuple[SISAModel, RetrainCost]:
    """Train the ``S`` shard models of ``plan`` on ``train_set``, slice by slice, all at once.

    Every stage ``t`` (slices ``0..t``, ``epochs_per_slice[t]`` epochs) of all shards runs as
    ``⌈S/W⌉`` calls of one program over the stacked shard axis; each shard is checkpointed after
    every stage in ``directory``. ``mesh="auto"`` lays the shard axis over ``gcd(W, #devices)``
    devices; each device computes ``lane_batch`` lanes at a time (``"auto"``: one on a CPU, all
    in one ``vmap`` on accelerators; see :class:`SISAConfig`).
    With ``resume`` an existing directory of the same plan continues where it stopped.

    Returns:
      ``(sisa, cost)``: the :class:`SISAModel` and the :class:`RetrainCost` of training.

    Raises:
      PrivDebiasError: bad settings, ids missing from ``train_set``, or a ``directory`` that
        belongs to another plan/configuration.
    """
    r = plan.num_slices
    epochs = (
        (int(epochs_per_slice),) * r
        if isinstance(epochs_per_slice, (int, np.integer))
        else tuple(int(e) for e in epochs_per_slice)
    )
    config = SISAConfig(epochs, int(batch_size), program_width, layout, lane_batch)
    sisa = SISAModel(model, tx, train_set, plan, config, directory, key, mesh=mesh)
    cost = sisa.train(progress=progress, resume=resume)
    return sisa, cost


__all__ = [
    "ForgetReport",
    "RetrainCost",
    "SISAConfig",
    "SISAModel",
    "sisa_epochs",
    "train_shards",
]
