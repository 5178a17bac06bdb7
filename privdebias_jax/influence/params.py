"""Parameter subsets: influence functions and FMD act on a chosen part of the model.

A subset is a flat ``dict`` from a ``/``-joined path (``"head/kernel"``, ``"dense_2/bias"``)
to an array: itself a pytree, so every solver works on it unchanged. :func:`split_params`
selects it with a path filter (a regular expression searched in the path, or a predicate),
:func:`merge_params` puts an updated subset back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from flax import traverse_util

from privdebias_jax.types import Params, PrivDebiasError

PathFilter = str | Callable[[str], bool] | None

#: The last linear layer of every model in :mod:`privdebias_jax.models`.
LAST_LAYER = r"^head/"


def param_paths(params: Params) -> list[str]:
    """All leaf paths of a parameter tree, ``/``-joined, in flattening order."""
    return list(traverse_util.flatten_dict(_unfreeze(params), sep="/").keys())


def _unfreeze(params: Params) -> dict:
    return params.unfreeze() if hasattr(params, "unfreeze") else dict(params)


def _predicate(select: PathFilter) -> Callable[[str], bool]:
    if select is None:
        return lambda path: True
    if isinstance(select, str):
        pattern = re.compile(select)
        return lambda path: pattern.search(path) is not None
    if callable(select):
        return select
    raise PrivDebiasError(f"a parameter filter is a regex string, a predicate or None; got {type(select).__name__}")


def split_params(params: Params, select: PathFilter = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(selected, frozen)``: flat dicts of the leaves whose path matches ``select`` and the rest.

    ``select`` is a regex searched in each ``/``-joined path (``"^head/"`` = the last layer),
    a predicate on the path, or ``None`` (every parameter).

    Raises:
      PrivDebiasError: if the filter matches no parameter (the message lists the paths).
    """
    flat = traverse_util.flatten_dict(_unfreeze(params), sep="/")
    keep = _predicate(select)
    selected = {k: v for k, v in flat.items() if keep(k)}
    if not selected:
        raise PrivDebiasError(f"parameter filter {select!r} matches no parameter; paths: {sorted(flat)}")
    frozen = {k: v for k, v in flat.items() if not keep(k)}
    return selected, frozen


def merge_params(selected: dict[str, Any], frozen: dict[str, Any]) -> Params:
    """The nested parameter tree with ``selected`` and ``frozen`` leaves together.

    Raises:
      PrivDebiasError: if a path appears in both.
    """
    both = set(selected) & set(frozen)
    if both:
        raise PrivDebiasError(f"paths both selected and frozen: {sorted(both)}")
    return traverse_util.unflatten_dict({**frozen, **selected}, sep="/")


def restrict(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Lift ``loss_fn(params, batch, *args)`` to ``f(selected, frozen, batch, *args)``.

    The frozen parameters are an argument, never closed over, so a jitted HVP does not
    constant-fold the backbone (XLA folds closed-over arrays into the program: slow compiles).
    """

    def restricted(selected: dict[str, Any], frozen: dict[str, Any], batch: Any, *args: Any) -> Any:
        return loss_fn(merge_params(selected, frozen), batch, *args)

    return restricted


__all__ = ["PathFilter", "LAST_LAYER", "param_paths", "split_params", "merge_params", "restrict"]
