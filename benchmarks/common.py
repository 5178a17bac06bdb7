"""Helpers shared by the benchmarks: machine description, timing and JSON results.

Timing rules: data and parameters go to jitted functions as
*arguments* (closed-over arrays are constant-folded by XLA), every timed call ends with
``jax.block_until_ready``, warm-up calls (compilation) are never timed, and the figure
reported is the median of several repeats: the machine is shared and noisy, so trust
ratios more than absolute times.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch")


def package_version(name: str) -> str:
    """Installed version of a distribution, or ``"not installed"`` (never imports it)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, library versions and the JAX backend and devices (no hostname)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    devices = jax.devices()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": usable,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "versions": {name: package_version(name) for name in _PACKAGES},
        "jax_backend": jax.default_backend(),
        "jax_device_count": len(devices),
        "jax_device_kinds": sorted({d.device_kind for d in devices}),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # Other processes compete for the cores: a load average well above the core count
        # at the end of a run means its figures are suspect.
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def git_commit() -> str | None:
    """The repository's ``HEAD`` commit (with ``+dirty`` when tracked files differ), or None outside git."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO_ROOT, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _jsonable(obj: Any) -> Any:
    """Convert NumPy / JAX scalars and arrays, tuples and paths into JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy / jax values
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and obj != obj:  # NaN is not valid JSON
        return None
    return obj


def write_result(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON at ``path`` (parents created).

    Adds ``timestamp_utc`` (ISO 8601), ``machine`` (:func:`machine_info`) and ``commit``
    (:func:`git_commit`) unless the payload already has them. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = dict(payload)
    out.setdefault(
        "timestamp_utc", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    out.setdefault("machine", machine_info())
    out.setdefault("commit", git_commit())
    path.write_text(json.dumps(_jsonable(out), indent=2) + "\n")
    return path


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds taken by each of ``repeats`` calls ``fn(*args)``, after ``warmup`` untimed calls.

    Each call's result is passed to ``jax.block_until_ready`` inside the timed region, so
    asynchronous dispatch is accounted for. ``fn`` may carry its own state (for instance a
    train state whose buffers a donating step consumes); the arguments are reused as given.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(max(int(warmup), 0)):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    settle_s: float = 0.0,
) -> dict[str, list[float]]:
    """Like :func:`time_fn` for several zero-argument functions, their repeats interleaved.

    Round ``r`` times every function once, so slow phases of a noisy machine hit all of
    them alike and their ratio stays fair. ``settle_s`` seconds of untimed sleep precede each
    timed call, so worker threads left spinning by the previous call (OpenMP in PyTorch)
    go idle first and do not steal cores from the next one.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for fn in fns.values():
        for _ in range(max(int(warmup), 0)):
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(int(repeats)):
        for name, fn in fns.items():
            if settle_s > 0:
                time.sleep(settle_s)
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    if len(values) == 0:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(values))


__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "package_version",
    "machine_info",
    "write_result",
    "time_fn",
    "time_interleaved",
    "median",
]
