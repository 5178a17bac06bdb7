"""The deletion ledger: every forget request, persisted atomically before any model changes.

A request moves ``pending → done``. :meth:`Ledger.add` records new ids as ``pending`` (ids
already in the ledger are ignored: repeated requests are idempotent) and writes the file
*before* any shard is retrained; :meth:`Ledger.mark_done` writes it again once every affected
shard's checkpoints are saved. A crash in between leaves the ids ``pending``: the next
operation retrains their shards again from the checkpoint before the earliest affected slice
(which the interrupted run never overwrote), so no request is lost and the final state equals
an uninterrupted run's.

Writes are atomic: a temporary file in the same folder, flushed and fsynced, then
``os.replace``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from privdebias_jax.types import PrivDebiasError


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Ledger:
    """Deletion requests of one SISA model, stored in ``path`` (JSON).

    Each entry: ``{"id": int, "status": "pending"|"done", "request": k}`` where ``k`` numbers
    the forget call that first asked for the id.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.entries: dict[int, dict[str, Any]] = {}
        self.requests = 0
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise PrivDebiasError(f"ledger {self.path} is not valid JSON: {err}") from err
            if not isinstance(data, dict):
                raise PrivDebiasError(
                    f"ledger {self.path} is not a ledger (expected a JSON object)"
                )
            if data.get("plan_fingerprint") != fingerprint:
                raise PrivDebiasError(
                    f"ledger {self.path} belongs to another plan (fingerprint mismatch)"
                )
            self.requests = int(data.get("requests", 0))
            self.entries = {int(e["id"]): dict(e) for e in data.get("entries", [])}

    def _write(self) -> None:
        atomic_write_json(
            self.path,
            {
                "plan_fingerprint": self.fingerprint,
                "requests": self.requests,
                "entries": [self.entries[k] for k in sorted(self.entries)],
            },
        )

    @property
    def forgotten(self) -> np.ndarray:
        """Every id in the ledger (done or pending): none of them may influence a shard."""
        return np.asarray(sorted(self.entries), np.int64)

    @property
    def pending(self) -> np.ndarray:
        return np.asarray(
            sorted(k for k, e in self.entries.items() if e["status"] == "pending"), np.int64
        )

    def add(self, ids: Any) -> np.ndarray:
        """Record ``ids`` as pending (atomically); return those that were not in the ledger."""
        ids = np.unique(np.asarray(ids, np.int64).reshape(-1))
        new = ids[~np.isin(ids, self.forgotten)]
        if new.size:
            self.requests += 1
            for i in new.tolist():
                self.entries[int(i)] = {"id": int(i), "status": "pending", "request": self.requests}
            self._write()
        return new

    def mark_done(self) -> None:
        """Mark every pending id as done (atomically)."""
        changed = False
        for e in self.entries.values():
            if e["status"] == "pending":
                e["status"] = "done"
                changed = True
        if changed:
            self._write()


__all__ = ["Ledger", "atomic_write_json"]
