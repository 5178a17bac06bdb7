"""Shadow / reference models of membership inference, trained together with *teams*.

LiRA (Carlini et al. 2022) and the shadow-model attack (Shokri et al. 2017) need ``R`` models of
the target's architecture, each trained on a random half of a pool, so that every pool sample is
IN for half of them. Three ways to train them (``layout``), measured in
``benchmarks/shadow_models.py``:

* ``teams`` (this module): the pool is dealt (balanced, at random) into ``T`` *teams*; team ``t``
  is trained on by a fixed set ``M_t`` of ``R/2`` models: teams ``0..T/2−1`` draw a random half
  of the models each, team ``t + T/2`` takes the complement of team ``t``. So every sample is IN
  for exactly ``R/2`` models, and every model trains on exactly the rows of ``T/2`` teams (half
  the pool). One training step takes a batch of one team's rows, gathers the ``R/2`` states of
  ``M_t`` and applies ``vmap(train_step)`` to them with the batch *shared* (unbatched): the first
  layer of all ``R/2`` models is then a single wide matrix product ``x · [W_1 … W_{R/2}]``, which
  a CPU runs far more efficiently than ``R/2`` narrow ones (or a batched product over stacked
  per-model batches), and no row is computed for a model that does not train on it. The updated
  states are scattered back. Models outside ``M_t`` are untouched by that step, so model ``r``'s
  trajectory is exactly plain training on its own rows, batch by batch, in the schedule's order.
* ``lanes``: :func:`privdebias_jax.multi.train_models`, one lane per model, each with its own
  batches of its own rows (per-sample random halves, :func:`~privdebias_jax.privacy.attacks.half_memberships`).
* ``loop``: one model after the other, :func:`privdebias_jax.train.fit` on its rows (the
  reference).

**Epochs and batches of the teams layout.** Teams have ``⌊N/T⌋`` or ``⌈N/T⌉`` rows, padded to
``P = nb·b`` with ``nb = ⌈⌈N/T⌉ / batch_size⌉`` batches of ``b = ⌈⌈N/T⌉ / nb⌉`` rows per team and
epoch (so a team is split evenly, never into one full and one tiny batch). Epoch ``e`` with key
``k_e = fold_in(fold_in(key, R), e)``: each team's rows are shuffled with ``fold_in(k_e, 0)`` (padding last),
the ``T·nb`` (team, batch) steps are put in a random order drawn with ``fold_in(k_e, 1)``, and
steps use the dropout key ``fold_in(k_e, 2)`` (folded with each model's step count by
:func:`~privdebias_jax.train.make_train_step`). Model ``r`` starts from
``fold_in(fold_in(key, r), 0)``, as in :func:`privdebias_jax.multi.train_models`. With
``T ≈ N / batch_size`` (the default) each team is one batch per epoch, so every model takes
``T/2`` steps of about ``batch_size`` rows per epoch, as when training alone on its half.

Differences from per-sample random halves: samples of one team share their IN set (the
memberships are correlated across samples, still uniform per sample: each sample is IN for a
random half of the models), and a model's batches are always drawn within one team (the batch
composition changes every epoch only inside teams). LiRA and the shadow attack fit per-sample
statistics, which this does not bias.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from privdebias_jax.data.dataset import Batch, Dataset, stack_batches, subset
from privdebias_jax.multi import init_program, resolve_layout, tree_stack
from privdebias_jax.train import TrainState, make_epoch_fn, make_train_step
from privdebias_jax.types import PrivDebiasError, PRNGKey

SHADOW_LAYOUTS = ("auto", "teams", "lanes", "loop")


class TeamDesign(NamedTuple):
    """Which models train on which pool rows (see the module docstring).

    Attributes:
      teams: ``(T, R/2)`` sorted model indices of each team; row ``t + T/2`` is the complement of
        row ``t``.
      team_of: ``(N,)`` the team of each pool row.
      member: ``(R, N)`` float32, 1 where model ``r`` trains on row ``i`` (``r ∈ teams[team_of[i]]``).
    """

    teams: np.ndarray
    team_of: np.ndarray
    member: np.ndarray


def default_num_teams(num_samples: int, batch_size: int) -> int:
    """``T = max(2, 2·round(N / (2·batch_size)))``: teams of about one batch each."""
    if int(num_samples) < 2 or int(batch_size) < 1:
        raise PrivDebiasError(
            f"need at least 2 samples and a positive batch size, got {num_samples}, {batch_size}"
        )
    return max(2, 2 * int(round(int(num_samples) / (2 * int(batch_size)))))


def team_design(num_models: int, num_samples: int, key: PRNGKey, num_teams: int) -> TeamDesign:
    """Random balanced teams: ``T/2`` random halves of the ``R`` models and their complements;
    rows dealt to teams by a random permutation of ``i mod T`` (team sizes differ by at most 1).
    Team ``t < T/2`` is the first ``R/2`` entries of a permutation drawn with
    ``fold_in(key, t)``; rows use ``fold_in(key, T)``.

    Raises:
      PrivDebiasError: ``R`` odd or < 2, ``T`` odd or < 2, or more teams than samples.
    """
    r, n, t = int(num_models), int(num_samples), int(num_teams)
    if r < 2 or r % 2:
        raise PrivDebiasError(
            f"the number of shadow/reference models must be even and ≥ 2, got {num_models}"
        )
    if t < 2 or t % 2:
        raise PrivDebiasError(f"the number of teams must be even and ≥ 2, got {num_teams}")
    if t > n:
        raise PrivDebiasError(f"{t} teams need at least {t} pool samples, got {n}")
    half = []
    for j in range(t // 2):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, j), r))
        half.append(np.sort(perm[: r // 2]))
    comp = [np.setdiff1d(np.arange(r), h) for h in half]
    teams = np.stack(half + comp).astype(np.int32)
    team_of = (np.asarray(jax.random.permutation(jax.random.fold_in(key, t), n)) % t).astype(
        np.int32
    )
    member = np.zeros((r, n), np.float32)
    for j in range(t):
        member[np.ix_(teams[j], np.flatnonzero(team_of == j))] = 1.0
    return TeamDesign(teams, team_of, member)


@dataclasses.dataclass(frozen=True)
class TeamLayout:
    """Padded per-team row lists: ``rows (T, P)`` pool rows (0 for padding), ``valid (T, P)``,
    ``num_batches`` per team and epoch, ``batch`` rows per step (``P = num_batches·batch``)."""

    rows: np.ndarray
    valid: np.ndarray
    num_batches: int
    batch: int


def team_layout(design: TeamDesign, batch_size: int) -> TeamLayout:
    """The padded row lists of :func:`team_design`'s teams for ``batch_size`` (module docstring)."""
    if int(batch_size) < 1:
        raise PrivDebiasError(f"batch_size must be positive, got {batch_size}")
    t = design.teams.shape[0]
    sizes = np.bincount(design.team_of, minlength=t)
    largest = int(sizes.max())
    nb = math.ceil(largest / int(batch_size))
    b = math.ceil(largest / nb)
    rows = np.zeros((t, nb * b), np.int32)
    valid = np.zeros((t, nb * b), np.float32)
    for j in range(t):
        r = np.flatnonzero(design.team_of == j)
        rows[j, : r.size] = r
        valid[j, : r.size] = 1.0
    return TeamLayout(rows, valid, nb, b)


def team_epoch_plan(
    key: PRNGKey, epoch: Any, rows: jax.Array, valid: jax.Array, num_batches: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Epoch ``epoch``'s shuffled team rows ``(T, P)``, their mask, the step order ``(T·nb,)``
    (step ``s`` is batch ``order[s] mod nb`` of team ``order[s] // nb``) and the dropout key."""
    ekey = jax.random.fold_in(key, epoch)
    u = jax.random.uniform(jax.random.fold_in(ekey, 0), rows.shape)
    u = jnp.where(valid > 0, u, 2.0)
    perm = jnp.argsort(u, axis=1)
    order = jax.random.permutation(jax.random.fold_in(ekey, 1), rows.shape[0] * int(num_batches))
    return (
        jnp.take_along_axis(rows, perm, 1),
        jnp.take_along_axis(valid, perm, 1),
        order,
        jax.random.fold_in(ekey, 2),
    )


def _team_batch(data: Batch, rows, valid, order, s, num_batches: int, batch: int):
    team = order[s] // num_batches
    b = order[s] % num_batches
    sel = jax.lax.dynamic_slice(rows[team], (b * batch,), (batch,))
    m = jax.lax.dynamic_slice(valid[team], (b * batch,), (batch,))
    return team, Batch(data.x[sel], data.y[sel], data.a[sel], data.idx[sel], m)


@functools.lru_cache(maxsize=32)
def team_programs(
    model: nn.Module, tx: optax.GradientTransformation, num_batches: int, batch: int, epochs: int
):
    """Jitted ``(plan, step, stage)``: ``plan(key, e, rows, valid)`` is :func:`team_epoch_plan`;
    ``step(states, data, rows, valid, order, teams, s, step_key)`` runs step ``s`` of an epoch
    (gather → shared-batch ``vmap`` step → scatter, states donated); ``stage(states, data, rows,
    valid, teams, key)`` runs every epoch and step in one call (``lax.scan``)."""
    train_step = make_train_step(model, tx)
    shared = jax.vmap(train_step, in_axes=(0, Batch(None, None, None, None, None), None))

    def step(states, data, rows, valid, order, teams, s, step_key):
        team, batch_ = _team_batch(data, rows, valid, order, s, num_batches, batch)
        ids = teams[team]
        sub = jax.tree_util.tree_map(lambda v: v[ids], states)
        sub, _ = shared(sub, batch_, step_key)
        return jax.tree_util.tree_map(lambda v, w: v.at[ids].set(w), states, sub)

    def plan(key, e, rows, valid):
        return team_epoch_plan(key, e, rows, valid, num_batches)

    def stage(states, data, rows, valid, teams, key):
        def epoch_body(states, e):
            r, v, order, step_key = plan(key, e, rows, valid)

            def body(states, s):
                return step(states, data, r, v, order, teams, s, step_key), None

            states, _ = jax.lax.scan(body, states, jnp.arange(order.shape[0]))
            return states, None

        states, _ = jax.lax.scan(epoch_body, states, jnp.arange(int(epochs)))
        return states

    return jax.jit(plan), jax.jit(step, donate_argnums=0), jax.jit(stage, donate_argnums=0)


def initial_states(
    model: nn.Module,
    tx: optax.GradientTransformation,
    input_shape: tuple[int, ...],
    num_models: int,
    key: PRNGKey,
) -> TrainState:
    """Stacked (NumPy) initial states, model ``r`` from ``fold_in(fold_in(key, r), 0)``."""
    init = init_program(model, tx, tuple(input_shape))
    return tree_stack(
        [
            jax.device_get(init(jax.random.fold_in(jax.random.fold_in(key, r), 0)))
            for r in range(int(num_models))
        ]
    )


def train_team_models(
    model: nn.Module,
    tx: optax.GradientTransformation,
    pool: Dataset,
    design: TeamDesign,
    key: PRNGKey,
    *,
    epochs: int,
    batch_size: int,
    inner: str = "auto",
) -> TrainState:
    """Train the ``R`` models of ``design`` on ``pool`` with the teams layout (module docstring).

    ``inner``: ``scan`` (all epochs and steps in one call), ``loop`` (one call per step: for
    models with convolutions, whose CPU kernels are slow inside ``lax.scan``), ``auto`` (``loop``
    when the model has convolution kernels). Returns the ``R`` final states stacked (NumPy).

    Raises:
      PrivDebiasError: a design that does not match ``pool``, bad epochs / batch size / inner.
    """
    n = len(pool)
    if design.team_of.shape != (n,) or design.member.shape[1] != n:
        raise PrivDebiasError(
            f"the team design covers {design.team_of.shape[0]} rows, the pool has {n}"
        )
    if int(epochs) < 1:
        raise PrivDebiasError(f"epochs must be positive, got {epochs}")
    lay = team_layout(design, batch_size)
    input_shape = tuple(np.shape(pool.x)[1:])
    inner = resolve_layout(model, tx, input_shape, inner)
    plan, step, stage = team_programs(model, tx, lay.num_batches, lay.batch, int(epochs))
    r = design.member.shape[0]
    states = jax.tree_util.tree_map(jnp.asarray, initial_states(model, tx, input_shape, r, key))
    data = Batch(
        jnp.asarray(pool.x),
        jnp.asarray(np.asarray(pool.y, np.int32)),
        jnp.asarray(np.asarray(pool.a, np.int32)),
        jnp.asarray(np.asarray(pool.idx)),
        None,
    )
    rows, valid, teams = jnp.asarray(lay.rows), jnp.asarray(lay.valid), jnp.asarray(design.teams)
    train_key = jax.random.fold_in(key, r)
    if inner == "scan":
        states = stage(states, data, rows, valid, teams, train_key)
    else:
        for e in range(int(epochs)):
            rr, vv, order, step_key = plan(train_key, e, rows, valid)
            for s in range(int(order.shape[0])):
                states = step(states, data, rr, vv, order, teams, s, step_key)
    return jax.device_get(states)


@functools.lru_cache(maxsize=32)
def single_programs(model: nn.Module, tx: optax.GradientTransformation):
    """Jitted ``(step, epoch)`` of one model, compiled once and reused for every model of a loop:
    ``step(state, batch, key)`` (state donated) and ``epoch(state, stacked_batches, key)``
    (:func:`~privdebias_jax.train.make_epoch_fn`, state donated)."""
    train_step = make_train_step(model, tx)
    return jax.jit(train_step, donate_argnums=0), jax.jit(
        make_epoch_fn(train_step), donate_argnums=0
    )


def train_models_one_by_one(
    model: nn.Module,
    tx: optax.GradientTransformation,
    pool: Dataset,
    member: Any,
    key: PRNGKey,
    *,
    epochs: int,
    batch_size: int,
    inner: str = "auto",
) -> TrainState:
    """The reference layout: model ``r`` (initialised as in :func:`initial_states`) trained alone
    on the pool rows where ``member[r] = 1``, one model after the other, like
    :func:`~privdebias_jax.train.fit` (epoch ``e`` shuffled into batches with
    ``fold_in(fold_in(k_r, e), 0)``, dropout key ``fold_in(fold_in(k_r, e), 1)``,
    ``k_r = fold_in(fold_in(key, r), 1)``) but with the jitted programs compiled once for all
    models. ``inner``: ``loop`` (one call per batch), ``scan`` (one call per epoch) or ``auto``
    (``loop`` for models with convolution kernels). Returns the stacked states (NumPy).

    Raises:
      PrivDebiasError: ``member`` not ``(R, len(pool))``, a model without rows, bad settings.
    """
    member = np.asarray(member)
    if member.ndim != 2 or member.shape[1] != len(pool):
        raise PrivDebiasError(f"member must have shape (R, {len(pool)}), got {member.shape}")
    if int(epochs) < 1 or int(batch_size) < 1:
        raise PrivDebiasError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    input_shape = tuple(np.shape(pool.x)[1:])
    inner = resolve_layout(model, tx, input_shape, inner)
    init = init_program(model, tx, input_shape)
    step, epoch_fn = single_programs(model, tx)
    outs = []
    for r in range(member.shape[0]):
        rows = np.flatnonzero(member[r] > 0)
        if rows.size == 0:
            raise PrivDebiasError(f"model {r} has no training rows")
        own = subset(pool, rows)
        state = init(jax.random.fold_in(jax.random.fold_in(key, r), 0))
        k_r = jax.random.fold_in(jax.random.fold_in(key, r), 1)
        for e in range(int(epochs)):
            ekey = jax.random.fold_in(k_r, e)
            batches = stack_batches(own, int(batch_size), jax.random.fold_in(ekey, 0))
            batches = Batch(*(jnp.asarray(v) for v in batches))
            step_key = jax.random.fold_in(ekey, 1)
            if inner == "scan":
                state, _ = epoch_fn(state, batches, step_key)
            else:
                for i in range(int(batches.mask.shape[0])):
                    state, _ = step(state, Batch(*(v[i] for v in batches)), step_key)
        outs.append(jax.device_get(state))
    return tree_stack(outs)


__all__ = [
    "SHADOW_LAYOUTS",
    "TeamDesign",
    "TeamLayout",
    "default_num_teams",
    "initial_states",
    "team_design",
    "team_epoch_plan",
    "team_layout",
    "single_programs",
    "team_programs",
    "train_models_one_by_one",
    "train_team_models",
]
