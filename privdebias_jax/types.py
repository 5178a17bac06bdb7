"""Shared type aliases and the error type of the library.

Every public function is typed with these names, so a reader knows what a
``Params`` or a ``Batch`` is without chasing definitions.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

#: A pytree of model parameters (the ``params`` collection of a Flax module).
Params = Any
#: A pytree of mutable model state (e.g. ``{"batch_stats": ...}``); ``{}`` when none.
ModelState = Any
#: An explicit random key (``jax.random.key`` or ``PRNGKey``); the library keeps no global RNG.
PRNGKey = jax.Array
#: A JAX or NumPy array.
Array = Any


class LossFn(Protocol):
    """``loss_fn(params, batch) -> scalar``: the contract for every objective.

    Influence functions, unlearning and debiasing all accept any pair of
    callables of this shape (a training loss and a scalar objective such as the
    counterfactual bias or the loss on a test point).
    """

    def __call__(self, params: Params, batch: Any) -> jax.Array: ...


class PrivDebiasError(ValueError):
    """Raised for bad input: names the offending value and what was expected."""


__all__ = ["Params", "ModelState", "PRNGKey", "Array", "LossFn", "PrivDebiasError"]
