"""SISA plans: which sample id lives in which shard and which slice.

Bourtoule et al., "Machine Unlearning" (IEEE S&P 2021): the training set is cut into ``S``
disjoint *shards*, one model per shard, and every shard into ``R`` disjoint *slices*. A shard's
model is trained on slice 0, checkpointed, then on slices 0–1, checkpointed, ..., so deleting a
sample of slice ``r`` only retrains its shard from the checkpoint taken before slice ``r``.

A :class:`ShardPlan` stores the assignment as a fixed *slot* layout: every shard has ``R``
slices of ``c`` slots each (``c = ⌈N / (S·R)⌉``), a slot holds one sample id or is padding
(id ``-1``). All shards therefore have the same shape, and one compiled program trains any of
them (padding is masked out). Deleting a sample masks its slot; the layout never changes, so a
retrained shard sees its remaining samples in the same places as one trained from scratch.

Two strategies:

* ``uniform``: a random permutation of the ids dealt into the slots.
* ``weighted`` (SISA §VII, distribution-aware sharding): given each sample's expected deletion
  probability, the most likely deletions are packed together into as few shards as possible
  and, inside every shard, into its *last* slices, so a deletion retrains few shards from a
  late checkpoint (ties are broken at random).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import jax
import numpy as np

from privdebias_jax.types import PrivDebiasError, PRNGKey

PADDING_ID = -1


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """The slot layout of ``S`` shards × ``R`` slices × ``c`` slots.

    Attributes:
      slots: ``(S, R, c)`` int64 sample ids, ``-1`` for padding.
      strategy: how the plan was made (``uniform`` or ``weighted``).
    """

    slots: np.ndarray
    strategy: str = "uniform"

    @property
    def num_shards(self) -> int:
        return int(self.slots.shape[0])

    @property
    def num_slices(self) -> int:
        return int(self.slots.shape[1])

    @property
    def slice_capacity(self) -> int:
        return int(self.slots.shape[2])

    @property
    def shard_capacity(self) -> int:
        """Slots per shard, ``R · c`` (real samples plus padding)."""
        return self.num_slices * self.slice_capacity

    @property
    def ids(self) -> np.ndarray:
        """Every planned sample id, sorted."""
        flat = self.slots.reshape(-1)
        return np.sort(flat[flat != PADDING_ID])

    def locate(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(shard, slice)`` of each id.

        Raises:
          PrivDebiasError: for a negative id or one the plan does not contain.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if np.any(ids < 0):
            raise PrivDebiasError(
                f"sample ids must be non-negative; got {ids[ids < 0][:5].tolist()}"
            )
        flat = self.slots.reshape(-1)
        order = np.argsort(flat, kind="stable")
        pos = np.searchsorted(flat[order], ids)
        pos = np.minimum(pos, flat.size - 1)
        found = flat[order][pos] == ids
        if not np.all(found):
            unknown = ids[~found]
            raise PrivDebiasError(
                f"unknown sample id(s) {unknown[:10].tolist()}{' ...' if unknown.size > 10 else ''}: "
                f"not in this plan's training set ({self.ids.size} ids)"
            )
        slot = order[pos]
        per_shard = self.shard_capacity
        return slot // per_shard, (slot % per_shard) // self.slice_capacity

    def shard_sizes(self, deleted: Any = ()) -> np.ndarray:
        """Real samples per shard, not counting ``deleted`` ids."""
        alive = self.slots != PADDING_ID
        if len(np.asarray(deleted).reshape(-1)):
            alive &= ~np.isin(self.slots, np.asarray(deleted, np.int64))
        return alive.reshape(self.num_shards, -1).sum(1)

    def fingerprint(self) -> str:
        """A SHA-256 of the layout: a checkpoint directory belongs to exactly one plan."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.slots, dtype=np.int64).tobytes())
        h.update(json.dumps([self.strategy, list(self.slots.shape)]).encode())
        return h.hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "shape": list(self.slots.shape),
            "slots": self.slots.reshape(-1).tolist(),
        }

    def extend(
        self, new_ids: Any, key: PRNGKey | int = 0, shards: Any | None = None
    ) -> ShardPlan:
        """A plan with ``new_ids`` appended as new slices after the existing ones.

        The new ids are dealt at random (``key``) over ``shards`` (default: all), as evenly as
        possible, into ``k = ⌈n_new / (|shards| · c)⌉`` new slices of the same capacity ``c``.
        Existing slots never move, so every checkpoint of the existing stages stays valid, and a
        shard whose new slices hold only padding has nothing new to learn (SISA skips such stages:
        see :meth:`privdebias_jax.unlearn.SISAModel.add`). This is how synthetic samples join a
        trained SISA model: only the shards that receive samples retrain, and only the new stages.

        Raises:
          PrivDebiasError: no new ids, negative or duplicate ids, ids already in the plan, or
            ``shards`` out of range / duplicated.
        """
        if np.asarray(new_ids).size == 0:
            raise PrivDebiasError("extend needs at least one new sample id")
        new_ids = _checked_ids(new_ids)
        clash = new_ids[np.isin(new_ids, self.ids)]
        if clash.size:
            raise PrivDebiasError(
                f"id(s) {clash[:10].tolist()} are already in the plan; new samples need fresh ids"
            )
        s, c = self.num_shards, self.slice_capacity
        targets = np.arange(s) if shards is None else np.asarray(shards, np.int64).reshape(-1)
        if targets.size == 0 or np.any((targets < 0) | (targets >= s)) or np.unique(targets).size != targets.size:
            raise PrivDebiasError(
                f"shards must be distinct shard indices in [0, {s}), got {np.asarray(shards).tolist()}"
            )
        if isinstance(key, (int, np.integer)):
            key = jax.random.PRNGKey(int(key))
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        rng = np.random.default_rng(seed)
        order = new_ids[rng.permutation(new_ids.size)]
        k = math.ceil(new_ids.size / (targets.size * c))
        added = np.full((s, k * c), PADDING_ID, np.int64)
        # Deal round-robin over a random order of the target shards: sizes differ by at most one.
        shard_order = targets[rng.permutation(targets.size)]
        for j, shard in enumerate(shard_order):
            members = order[j :: targets.size]
            added[shard, : members.size] = members
        # Spread each shard's new samples over its k new slices evenly (balanced slices).
        for shard in targets:
            row = added[shard]
            m = int(np.sum(row != PADDING_ID))
            sizes = np.full(k, m // k) + (np.arange(k) < m % k)
            spread = np.full(k * c, PADDING_ID, np.int64)
            pos = 0
            for j in range(k):
                spread[j * c : j * c + sizes[j]] = row[pos : pos + sizes[j]]
                pos += sizes[j]
            added[shard] = spread
        slots = np.concatenate([self.slots, added.reshape(s, k, c)], axis=1)
        return ShardPlan(slots=slots, strategy=self.strategy)

    def slice_is_empty(self, shard: int, slice_: int) -> bool:
        """Whether slice ``slice_`` of ``shard`` holds only padding (possible after :meth:`extend`)."""
        return bool(np.all(self.slots[shard, slice_] == PADDING_ID))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardPlan:
        slots = np.asarray(data["slots"], np.int64).reshape(data["shape"])
        return cls(slots=slots, strategy=str(data["strategy"]))


def _checked_ids(ids: Any) -> np.ndarray:
    """``ids`` as a flat int64 array; raises unless they are unique non-negative integers."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise PrivDebiasError(f"sample ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if np.any(ids < 0):
        raise PrivDebiasError("sample ids must be non-negative")
    if np.unique(ids).size != ids.size:
        raise PrivDebiasError("sample ids must be unique")
    return ids


def make_plan(
    ids: Any,
    num_shards: int,
    num_slices: int,
    key: PRNGKey | int = 0,
    *,
    deletion_probs: Any | None = None,
) -> ShardPlan:
    """Assign sample ``ids`` to ``num_shards`` shards × ``num_slices`` slices.

    Without ``deletion_probs`` the assignment is a uniform random permutation (``key``); with
    them (one non-negative number per id) it is SISA's distribution-aware placement: ids sorted
    by decreasing deletion probability fill the shards one after the other, each shard filled
    from its last slice backwards, so likely deletions share few shards and late slices.

    Raises:
      PrivDebiasError: ``S`` or ``R`` below 1, ``S · R`` larger than the number of ids (a slice
        would be empty), duplicate or negative ids, or bad ``deletion_probs``.
    """
    ids = _checked_ids(ids)
    s, r = int(num_shards), int(num_slices)
    if s < 1 or r < 1:
        raise PrivDebiasError(
            f"num_shards and num_slices must be at least 1, got S={num_shards}, R={num_slices}"
        )
    n = ids.size
    if s * r > n:
        raise PrivDebiasError(
            f"S·R = {s}·{r} = {s * r} exceeds the {n} training samples: every slice needs at least one sample"
        )
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    c = math.ceil(n / (s * r))
    shard_cap = r * c
    # Balanced shard sizes: shard k gets base or base + 1 samples; slices inside a shard likewise.
    sizes = np.full(s, n // s) + (np.arange(s) < n % s)
    if deletion_probs is None:
        order = rng.permutation(n)
        strategy = "uniform"
    else:
        p = np.asarray(deletion_probs, np.float64).reshape(-1)
        if p.shape != (n,):
            raise PrivDebiasError(f"deletion_probs has {p.size} entries for {n} ids")
        if not np.all(np.isfinite(p)) or np.any(p < 0):
            raise PrivDebiasError("deletion_probs must be finite and non-negative")
        order = np.lexsort((rng.random(n), -p))  # most likely deletions first, ties at random
        strategy = "weighted"
    slots = np.full((s, shard_cap), PADDING_ID, np.int64)
    start = 0
    for k in range(s):
        members = ids[order[start : start + sizes[k]]]
        start += sizes[k]
        # Slice sizes inside the shard (balanced), then fill slots slice by slice.
        m = members.size
        slice_sizes = np.full(r, m // r) + (np.arange(r) < m % r)
        # weighted: the most likely deletions come first and go to the last slices
        slice_order = list(range(r - 1, -1, -1)) if strategy == "weighted" else list(range(r))
        pos = 0
        for j in slice_order:
            take = members[pos : pos + slice_sizes[j]]
            pos += slice_sizes[j]
            slots[k, j * c : j * c + take.size] = take
    return ShardPlan(slots=slots.reshape(s, r, c), strategy=strategy)


__all__ = ["PADDING_ID", "ShardPlan", "make_plan"]
