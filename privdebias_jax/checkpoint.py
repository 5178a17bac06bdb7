"""Checkpoints with orbax-checkpoint: any pytree (a ``TrainState``: params, optimiser state,
model state, step), saved under ``directory/<step>/`` and restored with the optimiser-state
types intact (restore uses an abstract target built from a template).

Paths are made absolute (orbax requires it). Saving a step that exists raises unless
``overwrite=True``; restoring from a directory with no checkpoint raises a
:class:`PrivDebiasError` that names the directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from privdebias_jax.types import PrivDebiasError


def _manager(directory: str | os.PathLike, max_to_keep: int | None = None, create: bool = True):
    import orbax.checkpoint as ocp

    path = Path(directory).expanduser().resolve()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    return ocp.CheckpointManager(path, options=options)


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The steps saved in ``directory`` (empty when it does not exist or holds none)."""
    path = Path(directory).expanduser().resolve()
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest saved step, or ``None`` if there is none."""
    steps = checkpoint_steps(directory)
    return steps[-1] if steps else None


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    tree: Any,
    *,
    max_to_keep: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Save ``tree`` as checkpoint ``step`` in ``directory`` and wait until it is on disk.

    Returns the checkpoint's folder. Raises :class:`PrivDebiasError` if the step exists and
    ``overwrite`` is False.
    """
    import orbax.checkpoint as ocp

    step = int(step)
    if step < 0:
        raise PrivDebiasError(f"checkpoint step must be non-negative, got {step}")
    if step in checkpoint_steps(directory):
        if not overwrite:
            raise PrivDebiasError(f"checkpoint step {step} already exists in {directory}; pass overwrite=True")
        import shutil

        shutil.rmtree(Path(directory).expanduser().resolve() / str(step))
    tree = jax.tree_util.tree_map(np.asarray, tree)
    mngr = _manager(directory, max_to_keep)
    saved = mngr.save(step, args=ocp.args.StandardSave(tree), force=True)
    mngr.wait_until_finished()
    mngr.close()
    if not saved:
        raise PrivDebiasError(f"orbax did not write checkpoint step {step} in {directory}")
    return Path(directory).expanduser().resolve() / str(step)


def clear_checkpoints(directory: str | os.PathLike) -> list[int]:
    """Delete every saved step in ``directory`` (a fresh run reusing its folder); returns them."""
    import shutil

    steps = checkpoint_steps(directory)
    root = Path(directory).expanduser().resolve()
    for step in steps:
        shutil.rmtree(root / str(step))
    return steps


def restore_checkpoint(directory: str | os.PathLike, target: Any, step: int | None = None) -> Any:
    """Restore checkpoint ``step`` (the newest when None) into the structure of ``target``.

    ``target`` is a pytree of the same structure (concrete arrays or ``ShapeDtypeStruct``);
    the restored arrays are returned as ``jax.Array`` in that structure.

    Raises:
      PrivDebiasError: if ``directory`` holds no checkpoint, or not the requested step.
    """
    import orbax.checkpoint as ocp

    steps = checkpoint_steps(directory)
    if not steps:
        raise PrivDebiasError(f"no checkpoint found in {Path(directory).expanduser().resolve()}")
    if step is None:
        step = steps[-1]
    if int(step) not in steps:
        raise PrivDebiasError(f"checkpoint step {step} not in {directory}; available: {steps}")
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    mngr = _manager(directory, create=False)
    try:
        restored = mngr.restore(int(step), args=ocp.args.StandardRestore(abstract))
    except Exception as err:  # orbax raises several types for a mismatched tree
        raise PrivDebiasError(f"checkpoint {step} in {directory} does not match the target structure: {err}") from err
    finally:
        mngr.close()
    return restored


__all__ = ["clear_checkpoints", "checkpoint_steps", "latest_step", "save_checkpoint", "restore_checkpoint"]
