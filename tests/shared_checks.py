"""Checks shared by several test files (imported as ``shared_checks``: pytest puts ``tests/`` on
``sys.path``)."""

from __future__ import annotations

import json
import subprocess

import jax
import numpy as np


def assert_state_bitwise_equal(a, b, what=""):
    """Two pytrees have the same structure and bit-identical leaves (dtype and shape included)."""
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, f"{what}: tree structures differ"
    for (path, x), (_, y) in zip(fa, fb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), f"{name} differs (max |Δ| = {np.max(np.abs(x - y))})"


def child_result(proc: subprocess.Popen, timeout: float) -> tuple[dict, str]:
    """Wait for a child Python process that prints one ``RESULT <json>`` line; ``(result, stderr)``.

    The child is killed on timeout; a non-zero exit or not exactly one result line fails."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-4000:]
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, stdout[-2000:]
    return json.loads(lines[0][len("RESULT ") :]), stderr
