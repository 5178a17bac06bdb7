"""Results as files a researcher can read: JSON, Markdown tables, PNG figures.

* :func:`write_json` turns NumPy / JAX scalars and arrays into plain JSON.
* :func:`markdown_table` formats rows of numbers.
* :func:`save_image_grid`, :func:`plot_cell_accuracy`, :func:`plot_history` draw with
  matplotlib's non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def to_jsonable(obj: Any) -> Any:
    """Recursively convert arrays and NumPy/JAX scalars to lists and Python numbers.

    Non-finite floats become ``None`` (JSON has no NaN).
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
        arr = np.asarray(obj)
        if arr.ndim == 0:
            return to_jsonable(arr.item())
        return [to_jsonable(v) for v in arr.tolist()]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating,)):
        return to_jsonable(float(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON (atomically: temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(payload), indent=2, sort_keys=False))
    os.replace(tmp, path)
    return path


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, ``None`` as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, (float, np.floating)):
        return "—" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str], digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Lay out ``fig``, write it to ``path`` (parent folders created), close it; return the path."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_image_grid(
    images: np.ndarray,
    path: str | os.PathLike,
    rows: int,
    cols: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Save ``rows × cols`` images ``(rows*cols, H, W[, C])`` in ``[0, 1]`` as one PNG."""
    plt = _pyplot()
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9 + 0.6, rows * 0.9 + 0.5), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            k = i * cols + j
            if k < len(images):
                img = images[k]
                ax.imshow(img if img.ndim == 3 and img.shape[-1] == 3 else np.squeeze(img), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row_labels is not None and j == 0:
                ax.set_ylabel(row_labels[i], fontsize=7)
            if col_labels is not None and i == 0:
                ax.set_title(col_labels[j], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_cell_accuracy(
    cell_acc: np.ndarray, path: str | os.PathLike, title: str, xlabel: str = "attribute", ylabel: str = "class"
) -> Path:
    """Heat map of accuracy per (class, attribute) cell; empty cells (NaN) left blank."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(np.asarray(cell_acc, np.float64), vmin=0, vmax=1, cmap="viridis")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    return save_figure(fig, path)


def plot_history(history: Sequence[dict[str, float]], path: str | os.PathLike, title: str) -> Path:
    """Training loss and accuracy per epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(epochs, [h["loss"] for h in history], label="train loss")
    ax.plot(epochs, [h["acc"] for h in history], label="train accuracy")
    ax.set_xlabel("epoch")
    ax.set_title(title, fontsize=9)
    ax.legend()
    return save_figure(fig, path)


__all__ = ["to_jsonable", "write_json", "fmt", "markdown_table", "save_figure", "save_image_grid", "plot_cell_accuracy", "plot_history"]
