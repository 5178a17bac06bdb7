"""The shard ensemble as one Flax module, so metrics, FMD and attacks take it unchanged.

SISA predicts by aggregating its shard models (Bourtoule et al. 2021). :class:`ShardEnsemble`
wraps ``S`` copies of a member module whose parameters are stacked on a leading axis
(``params = {"members": stacked}``) and returns ``(logits, features)`` like every model of the
library:

* ``aggregate="mean_softmax"``: ``p̄ = (1/S) Σ_s softmax(z_s)``; logits ``log p̄`` (so
  ``softmax(logits) = p̄`` and the cross-entropy of the ensemble is ``−log p̄_y``).
* ``aggregate="vote"``: majority vote; ``v_c`` = members whose arg-max is ``c``; logits
  ``log((v + p̄) / (S + 1))``: the arg-max is the majority class, ties broken by ``p̄``.

``features`` are the members' bottlenecks side by side, ``(B, S·F)``.
Evaluation only: ``train=True`` raises (train the shards with :func:`train_shards`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from privdebias_jax.types import ModelState, Params, PrivDebiasError

AGGREGATES = ("mean_softmax", "vote")


def aggregate_logits(member_logits: jax.Array, aggregate: str = "mean_softmax") -> jax.Array:
    """Combine member logits ``(S, B, C)`` into ensemble logits ``(B, C)`` (formulas above)."""
    if aggregate not in AGGREGATES:
        raise PrivDebiasError(f"unknown aggregate {aggregate!r}; expected one of {AGGREGATES}")
    probs = jax.nn.softmax(member_logits, axis=-1)
    mean = jnp.mean(probs, axis=0)
    if aggregate == "mean_softmax":
        return jnp.log(jnp.maximum(mean, jnp.finfo(mean.dtype).tiny))
    s, c = member_logits.shape[0], member_logits.shape[-1]
    votes = jnp.sum(jax.nn.one_hot(jnp.argmax(member_logits, -1), c, dtype=mean.dtype), axis=0)
    return jnp.log(jnp.maximum((votes + mean) / (s + 1.0), jnp.finfo(mean.dtype).tiny))


class ShardEnsemble(nn.Module):
    """``S`` members of one architecture (``member``) with stacked parameters.

    Attributes:
      member_def: ``(module class, ((field, value), ...))``: the shard architecture (see
        :func:`member_definition`), kept as data so Flax does not adopt it as a submodule.
      num_members: ``S``.
      aggregate: ``mean_softmax`` or ``vote``.
    """

    member_def: tuple
    num_members: int
    aggregate: str = "mean_softmax"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
        if train:
            raise PrivDebiasError(
                "ShardEnsemble is evaluation-only; train the shards with train_shards()"
            )
        cls, fields = self.member_def
        member = cls(**dict(fields), parent=None)

        def init_members(rng):
            keys = jax.random.split(rng, self.num_members)
            return jax.vmap(lambda k: member.init({"params": k}, x, train=False)["params"])(keys)

        params = self.param("members", init_members)
        collections = {}
        if self.is_initializing():
            shapes = jax.eval_shape(
                lambda k: member.init({"params": k}, x, train=False), jax.random.PRNGKey(0)
            )
            for name in shapes:
                if name != "params":
                    collections[name] = self.variable(
                        name,
                        "members",
                        lambda s=shapes[name]: jax.tree_util.tree_map(
                            lambda v: jnp.zeros((self.num_members, *v.shape), v.dtype), s
                        ),
                    ).value
        else:
            for name in self.variables:
                if name != "params":
                    collections[name] = self.variables[name]["members"]

        def one(p, cols):
            return member.apply({"params": p, **cols}, x, train=False, mask=mask)

        logits, feats = jax.vmap(one)(params, collections)
        out = aggregate_logits(logits, self.aggregate)
        feats = jnp.moveaxis(feats, 0, 1).reshape(feats.shape[1], -1)
        return out, feats


def member_definition(module: nn.Module) -> tuple:
    """``(class, ((field, value), ...))`` of an unbound module (sequence fields as tuples)."""
    fields = []
    for f in dataclasses.fields(module):
        if f.init and f.name not in ("parent", "name"):
            value = getattr(module, f.name)
            fields.append((f.name, tuple(value) if isinstance(value, list) else value))
    return type(module), tuple(fields)


def ensemble_from_states(member: nn.Module, states: Sequence[Any], aggregate: str = "mean_softmax"):
    """``(ShardEnsemble, params, model_state)`` from the shards' ``TrainState`` s.

    ``params = {"members": stacked params}``; ``model_state = {collection: {"members": stacked}}``.
    """
    if not states:
        raise PrivDebiasError("an ensemble needs at least one member")
    if aggregate not in AGGREGATES:
        raise PrivDebiasError(f"unknown aggregate {aggregate!r}; expected one of {AGGREGATES}")

    def stack(trees):
        return jax.tree_util.tree_map(
            lambda *v: jnp.asarray(np.stack([np.asarray(t) for t in v])), *trees
        )

    params: Params = {"members": stack([s.params for s in states])}
    model_state: ModelState = {}
    if states[0].model_state:
        for name in states[0].model_state:
            model_state[name] = {"members": stack([s.model_state[name] for s in states])}
    module = ShardEnsemble(
        member_def=member_definition(member), num_members=len(states), aggregate=aggregate
    )
    return module, params, model_state


__all__ = [
    "AGGREGATES",
    "ShardEnsemble",
    "aggregate_logits",
    "ensemble_from_states",
    "member_definition",
]
