"""Many models of one architecture trained together: one ``jit(vmap(...))`` program over a model axis.

Used by SISA (one lane per shard, :mod:`privdebias_jax.unlearn.sisa`) and by the privacy
attacks (shadow and LiRA reference models, :mod:`privdebias_jax.privacy`). Each *lane* has its
own state, its own rows (a data block ``(M, ...)`` with a mask of which rows it trains on)
and its own key; a lane's result depends only on those, never on the other lanes.

One call of :func:`run_stage` trains every lane for ``epochs`` epochs. An epoch shuffles the
lane's alive rows with :func:`epoch_order` and cuts them into ``⌈M / batch_size⌉`` fixed-size
batches (padding masked; ``batches=`` asks for fewer when every lane's alive rows fit). Two
layouts, chosen by measurement (``benchmarks/fit_loop.py``):

* ``scan``: the whole stage (every epoch, every batch) is one call (``lax.scan`` of scans).
* ``loop``: one call per batch; for models with convolutions, whose CPU kernels run many
  times slower inside ``lax.scan``.

With a mesh (several devices) the lane axis is split over it with ``jax.shard_map``.

**Lanes on one device** (``lane_batch``). Inside a device the lanes are computed
``lane_batch`` at a time: a ``jax.lax.map`` over chunks of ``lane_batch`` lanes, each chunk one
``vmap`` (``1``: no ``vmap``, the lanes one after the other; a last, smaller chunk is one more
``vmap``; ``None``: one ``vmap`` of every lane). The shuffle program is always one ``vmap``
(integer and key work only).
``"auto"`` (:func:`resolve_lane_batch`) is ``1`` on the CPU backend and ``None`` elsewhere.
On a CPU the optimizer update of a vmapped program streams every lane's parameters and Adam
moments at once, ``W×`` the working set of one model, which spills out of the caches: Adam on
8 stacked 3×100 MLPs took 473 µs per model against 209 µs for one model alone, and the
vmapped train step 1.17 ms per model against 0.78 ms (2 cores). Lanes in sequence keep one
model's working set in cache. With ``lane_batch=1`` a lane's result is bitwise the same for
every program width and every number of devices (a lane never shares an operation with
another), so SISA's exactness no longer hinges on always using the same width.

**CPU cores as devices.** On a CPU, :func:`use_cpu_devices` (before JAX starts its backend)
splits the host into ``n`` devices; with one per core, lanes then run on all cores at once, each
single-threaded, instead of one lane at a time with every operation split over the cores
(``benchmarks/shards_vmap.py`` measures both).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from privdebias_jax.data.dataset import Batch, Dataset
from privdebias_jax.train import StepMetrics, TrainState, create_train_state, make_train_step
from privdebias_jax.types import PrivDebiasError, PRNGKey

MODEL_AXIS = "models"
LAYOUTS = ("auto", "scan", "loop")


def epoch_order(key: PRNGKey, alive: jax.Array, total: int) -> tuple[jax.Array, jax.Array]:
    """A random order of the alive rows first (then the rest), padded (or cut) to ``total``; its
    mask.

    Each row draws ``u ~ U(0, 1)`` from ``key``; dead rows get ``u = 2``; rows sorted by ``u``.
    Removing a row changes only its own draw, so the others keep their relative order. A
    ``total`` below the number of rows drops dead rows from the end (the caller makes sure
    ``total`` covers every alive row).
    """
    n = alive.shape[0]
    u = jax.random.uniform(key, (n,))
    u = jnp.where(alive > 0, u, 2.0)
    order = jnp.argsort(u)
    mask = alive[order].astype(jnp.float32)
    if total < n:
        order, mask = order[:total], mask[:total]
    elif total > n:
        order = jnp.concatenate([order, jnp.zeros((total - n,), order.dtype)])
        mask = jnp.concatenate([mask, jnp.zeros((total - n,), mask.dtype)])
    return order, mask


def _make_lane_fns(
    model: nn.Module,
    tx: optax.GradientTransformation,
    batch_size: int,
    epochs: int,
    rows: int,
    batches: int | None = None,
):
    step = make_train_step(model, tx)
    nb = math.ceil(rows / batch_size) if batches is None else int(batches)
    total = nb * batch_size

    def gather(data: Batch, order: jax.Array, mask: jax.Array, b: jax.Array) -> Batch:
        sel = jax.lax.dynamic_slice(order, (b * batch_size,), (batch_size,))
        m = jax.lax.dynamic_slice(mask, (b * batch_size,), (batch_size,))
        return Batch(data.x[sel], data.y[sel], data.a[sel], data.idx[sel], m)

    def orders(data_mask: jax.Array, key: PRNGKey, e: jax.Array):
        ekey = jax.random.fold_in(key, e)
        order, mask = epoch_order(jax.random.fold_in(ekey, 0), data_mask, total)
        return order, mask, jax.random.fold_in(ekey, 1)

    def stage(state: TrainState, data: Batch, key: PRNGKey):
        def epoch_body(state, e):
            order, mask, step_key = orders(data.mask, key, e)

            def batch_body(state, b):
                return step(state, gather(data, order, mask, b), step_key)

            state, metrics = jax.lax.scan(batch_body, state, jnp.arange(nb))
            return state, StepMetrics(*(jnp.sum(m) for m in metrics))

        return jax.lax.scan(epoch_body, state, jnp.arange(epochs))

    def loop_step(state: TrainState, data: Batch, order, mask, step_key, b):
        return step(state, gather(data, order, mask, b), step_key)

    return stage, orders, loop_step, nb


def _lanes(fn, in_axes: tuple, lane_batch: int | None = None):
    """``fn`` over the lane axis (axis 0 of the mapped arguments), ``lane_batch`` lanes at a time.

    ``lane_batch=None`` (or ``≥`` the number of lanes): one ``vmap(fn, in_axes)``. Otherwise
    ``jax.lax.map`` over the lanes, each iteration a ``vmap`` of ``lane_batch`` lanes (``1``: no
    ``vmap`` at all, one lane after the other); a remainder of fewer lanes is one more ``vmap``.

    A single lane (known when the program is traced) is squeezed out and ``fn`` runs on its
    own, without ``vmap``: XLA's CPU code for a batch-of-one is slower (the whole SISA stage of
    the 3×100 MLP 1.17× slower, paired median of 7 runs on 2 cores).
    """
    vmapped = jax.vmap(fn, in_axes=in_axes)

    def one(*args):
        lane = _on_mapped(args, in_axes, lambda v: v[0])
        return jax.tree_util.tree_map(lambda v: v[None], fn(*lane))

    def call(*args):
        # every program's first argument is mapped (axis 0): it gives the number of lanes
        width = int(jax.tree_util.tree_leaves(args[0])[0].shape[0])
        if width == 1:
            return one(*args)
        if lane_batch is None or lane_batch >= width:
            return vmapped(*args)
        k = int(lane_batch)
        run = one if k == 1 else vmapped

        def chunk(start, size):
            return _on_mapped(
                args, in_axes, lambda v: jax.lax.dynamic_slice_in_dim(v, start, size, axis=0)
            )

        full = width // k
        out = jax.lax.map(lambda c: run(*chunk(c * k, k)), jnp.arange(full))
        out = jax.tree_util.tree_map(lambda v: v.reshape((full * k,) + v.shape[2:]), out)
        rest = width - full * k
        if rest:
            tail = vmapped(*chunk(full * k, rest)) if rest > 1 else one(*chunk(full * k, 1))
            out = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), out, tail)
        return out

    return call


def _on_mapped(args, in_axes, f):
    """``args`` with ``f`` applied to every leaf mapped by ``vmap``'s ``in_axes`` (entries 0,
    None or tuples / named tuples of them); unmapped arguments pass unchanged."""

    def walk(arg, ax):
        if ax is None:
            return arg
        if isinstance(ax, int):
            return jax.tree_util.tree_map(f, arg)
        parts = [walk(sub, a) for sub, a in zip(arg, ax, strict=True)]
        return type(ax)(*parts) if hasattr(ax, "_fields") else type(ax)(parts)

    return [walk(arg, ax) for arg, ax in zip(args, in_axes, strict=True)]


def _wrap(
    fn, mesh: jax.sharding.Mesh | None, donate: bool, in_axes: tuple, lane_batch: int | None = None
):
    """``jit`` of ``fn`` over the lanes (:func:`_lanes`), with the lane axis split over ``mesh``
    (unmapped args replicated)."""
    fn = _lanes(fn, in_axes, lane_batch)
    if mesh is not None:
        P = jax.sharding.PartitionSpec
        specs = jax.tree_util.tree_map(
            lambda ax: P() if ax is None else P(MODEL_AXIS), in_axes, is_leaf=lambda v: v is None
        )
        fn = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(MODEL_AXIS), check_vma=False)
    return jax.jit(fn, donate_argnums=0 if donate else ())


@functools.lru_cache(maxsize=64)
def stage_programs(
    model,
    tx,
    batch_size: int,
    epochs: int,
    rows: int,
    mesh,
    shared_data: bool = False,
    lane_batch: int | None = None,
    batches: int | None = None,
):
    """The compiled-on-first-use programs of a stage: ``(stage, orders, loop_step, num_batches)``.

    With ``shared_data`` every lane reads the same ``x, y, a, idx`` (not stacked; only the
    mask is per lane). ``lane_batch``: lanes computed together on a device (:func:`_lanes`;
    ``None`` = all). ``batches``: batches per epoch (default ``⌈rows / batch_size⌉``). Cached
    per arguments, so repeated calls (SISA forgetting) reuse the compiled code.
    """
    stage, orders, loop_step, nb = _make_lane_fns(model, tx, batch_size, epochs, rows, batches)
    data_axes = Batch(None, None, None, None, 0) if shared_data else 0
    return (
        _wrap(stage, mesh, True, (0, data_axes, 0), lane_batch),
        _wrap(orders, mesh, False, (0, 0, 0)),
        _wrap(loop_step, mesh, True, (0, data_axes, 0, 0, 0, 0), lane_batch),
        nb,
    )


@functools.lru_cache(maxsize=16)
def init_program(model, tx, input_shape: tuple[int, ...]):
    """``jit(key -> create_train_state(model, tx, key, input_shape))``, cached."""
    return jax.jit(lambda k: create_train_state(model, tx, k, input_shape))


def default_mesh(width: int) -> jax.sharding.Mesh | None:
    """A 1-D mesh over ``gcd(width, #devices)`` devices (``None`` on one device)."""
    devices = jax.devices()
    n = math.gcd(int(width), len(devices))
    if n <= 1:
        return None
    return jax.sharding.Mesh(np.asarray(devices[:n]), (MODEL_AXIS,))


def resolve_layout(
    model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...], layout: str
) -> str:
    """``auto`` → ``loop`` for models with convolution kernels, ``scan`` otherwise."""
    if layout not in LAYOUTS:
        raise PrivDebiasError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout != "auto":
        return layout
    template = jax.eval_shape(
        lambda k: create_train_state(model, tx, k, input_shape), jax.random.PRNGKey(0)
    )
    has_conv = any(len(leaf.shape) == 4 for leaf in jax.tree_util.tree_leaves(template.params))
    return "loop" if has_conv else "scan"


def auto_program_width(
    model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...], num_shards: int
) -> int:
    """Shard lanes per program when none is asked for: ``1`` for a model with convolution kernels
    on the CPU backend, else ``num_shards`` (every shard in one vmapped program).

    ``vmap`` over models turns each convolution into a grouped convolution, which XLA's CPU
    backend runs slowly: the SISA stages of the 14×14 small CNN (4 shards, batch 256) trained at
    2,786 examples/s vmapped against 4,757 one shard at a time (``benchmarks/shards_vmap.py
    --model small_cnn --image-size 14 --shards 4 --batch-size 256 --epochs 8 --train-size 4000
    --repeats 3``, 2 CPU cores).
    On accelerators the vmapped program is the layout that scales.
    """
    if int(num_shards) < 1:
        raise PrivDebiasError(f"num_shards must be at least 1, got {num_shards}")
    if jax.default_backend() == "cpu" and resolve_layout(model, tx, input_shape, "auto") == "loop":
        return 1
    return int(num_shards)


def resolve_lane_batch(lane_batch: int | str | None) -> int | None:
    """Lanes computed together on one device (:func:`_lanes`): ``"auto"`` → ``1`` on the CPU
    backend (lanes in sequence; see the module docstring), ``None`` (one ``vmap`` of every
    lane) on accelerators; an integer ``≥ 1`` or ``None`` is returned as given.

    Raises:
      PrivDebiasError: anything else (``0``, a negative number, an unknown string).
    """
    if lane_batch is None:
        return None
    if isinstance(lane_batch, str):
        if lane_batch != "auto":
            raise PrivDebiasError(
                f"lane_batch must be 'auto', None or a positive integer, got {lane_batch!r}"
            )
        return 1 if jax.default_backend() == "cpu" else None
    if isinstance(lane_batch, bool) or not isinstance(lane_batch, (int, np.integer)):
        raise PrivDebiasError(
            f"lane_batch must be 'auto', None or a positive integer, got {lane_batch!r}"
        )
    if int(lane_batch) < 1:
        raise PrivDebiasError(f"lane_batch must be at least 1, got {lane_batch}")
    return int(lane_batch)


def parse_lane_batch(text: str | int | None) -> int | str | None:
    """The text form of ``lane_batch`` (CLI, configs): ``"auto"`` → ``"auto"``, ``"all"`` (or
    ``None``) → ``None`` (one ``vmap`` of every lane), a positive integer (or its digits) → that
    integer; the result goes to :func:`resolve_lane_batch`.

    Raises:
      PrivDebiasError: anything else.
    """
    if text is None or text == "all":
        return None
    if text == "auto":
        return "auto"
    value = 0
    if isinstance(text, (int, np.integer)) and not isinstance(text, (bool, np.bool_)):
        value = int(text)
    elif isinstance(text, str) and text.isdigit():
        value = int(text)
    if value < 1:
        raise PrivDebiasError(
            f"lane_batch must be 'auto', 'all' or a positive integer, got {text!r}"
        )
    return value


def use_cpu_devices(count: int) -> int:
    """Split the host CPU into ``count`` JAX devices (``jax_num_cpu_devices``); returns the count.

    Must run before JAX starts its backend (before the first computation or device query),
    like ``XLA_FLAGS=--xla_force_host_platform_device_count=N``. With one device per core,
    programs over a lane axis (:func:`run_stage`, :func:`train_models`, SISA) lay their lanes
    over the cores through the mesh of :func:`default_mesh`. If the backend is already up
    with exactly ``count`` CPU devices this is a no-op.

    Raises:
      PrivDebiasError: ``count < 1``, or the backend already started with another number of
        devices.
    """
    count = int(count)
    if count < 1:
        raise PrivDebiasError(f"cpu device count must be at least 1, got {count}")
    from jax._src import xla_bridge  # the public API has no "is the backend up?" query

    if xla_bridge.backends_are_initialized():
        have = len(jax.devices("cpu"))
        if have != count:
            raise PrivDebiasError(
                f"JAX's CPU backend already started with {have} device(s); set the CPU device "
                f"count ({count}) before the first JAX computation, or set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={count}"
            )
        return count
    jax.config.update("jax_num_cpu_devices", count)
    return count


def tree_stack(trees: Sequence[Any]) -> Any:
    """Stack pytrees of the same structure on a new leading axis (NumPy)."""
    return jax.tree_util.tree_map(lambda *v: np.stack([np.asarray(x) for x in v]), *trees)


def tree_index(tree: Any, i: int) -> Any:
    """Entry ``i`` of every leaf of a stacked pytree (NumPy)."""
    return jax.tree_util.tree_map(lambda v: np.asarray(v[i]), tree)


def put(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """Move a stacked pytree to the device(s), split on the leading axis over ``mesh``."""
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, tree)
    return jax.device_put(
        tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(MODEL_AXIS))
    )


def run_stage(
    model: nn.Module,
    tx: optax.GradientTransformation,
    states: Any,
    data: Batch,
    keys: Any,
    *,
    epochs: int,
    batch_size: int,
    layout: str,
    mesh: jax.sharding.Mesh | None = None,
    shared_data: bool = False,
    lane_batch: int | str | None = "auto",
    batches: int | None = None,
) -> Any:
    """Train stacked ``states`` (``W`` lanes) for ``epochs`` epochs; returns the new stacked states.

    ``data`` fields are stacked per lane, ``(W, M, ...)`` (with ``shared_data``: ``x, y, a, idx``
    are one unstacked ``(M, ...)`` block read by every lane); ``data.mask`` ``(W, M)`` marks the
    rows each lane trains on. ``keys`` ``(W, 2)``: lane ``w``'s epoch ``e`` shuffles with
    ``fold_in(fold_in(keys[w], e), 0)`` and steps with ``fold_in(fold_in(keys[w], e), 1)``.
    ``layout`` is ``scan`` or ``loop``; ``lane_batch`` is how many lanes a device computes
    together (:func:`resolve_lane_batch`; see the module docstring). ``batches``: batches per
    epoch, default ``⌈M / batch_size⌉``; fewer is allowed when every lane's alive rows fit
    (:func:`train_models` cuts the epoch to the largest lane's rows): a batch of padding only
    leaves a lane's state untouched, so dropping such trailing batches changes no result.

    Raises:
      PrivDebiasError: ``batches`` too few for some lane's alive rows.
    """
    if batches is not None:
        rows_alive = int(np.max(np.sum(np.asarray(data.mask) > 0, axis=1)))
        if int(batches) * int(batch_size) < rows_alive:
            raise PrivDebiasError(
                f"batches={batches} of {batch_size} rows cannot hold a lane's {rows_alive} rows"
            )
    lane_batch = resolve_lane_batch(lane_batch)
    rows = int(np.shape(data.mask)[1])
    width = int(np.shape(data.mask)[0])
    if shared_data:
        stacked, mask, keys = put((states, data.mask, keys), mesh)
        fields = jax.tree_util.tree_map(jnp.asarray, tuple(data[:4]))
        if mesh is not None:
            fields = jax.device_put(
                fields, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            )
        data = Batch(*fields, mask)
    else:
        stacked, data, keys = put((states, data, keys), mesh)
    stage_fn, orders_fn, step_fn, nb = stage_programs(
        model,
        tx,
        int(batch_size),
        int(epochs),
        rows,
        mesh,
        bool(shared_data),
        lane_batch,
        None if batches is None else int(batches),
    )
    if layout == "scan":
        stacked, _ = stage_fn(stacked, data, keys)
    elif layout == "loop":
        for e in range(int(epochs)):
            order, mask, step_keys = orders_fn(data.mask, keys, jnp.full((width,), e))
            for b in range(nb):
                stacked, _ = step_fn(stacked, data, order, mask, step_keys, jnp.full((width,), b))
    else:
        raise PrivDebiasError(f"run_stage needs layout 'scan' or 'loop', got {layout!r}")
    return jax.device_get(stacked)


def _key_data(key: PRNGKey) -> jax.Array:
    """The raw ``uint32`` data of a key: a typed key (``jax.random.key``) is unwrapped, a legacy
    ``PRNGKey`` passes as it is (for the same seed both give the same data)."""
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def train_models(
    model: nn.Module,
    tx: optax.GradientTransformation,
    data: Dataset,
    masks: Any,
    key: PRNGKey,
    *,
    epochs: int,
    batch_size: int,
    layout: str = "auto",
    width: int | None = None,
    mesh: jax.sharding.Mesh | None | str = "auto",
    lane_batch: int | str | None = "auto",
) -> TrainState:
    """Train ``N`` models from scratch, model ``i`` on the rows of ``data`` where ``masks[i]`` is 1.

    Model ``i`` is initialised from ``fold_in(fold_in(key, i), 0)`` and trained with lane key
    ``fold_in(fold_in(key, i), 1)``; ``width`` lanes per program (default ``N``, the rest in
    further calls; ``lane_batch`` of them computed together on a device, see
    :func:`resolve_lane_batch`). An epoch is ``⌈max_i |rows_i| / batch_size⌉`` batches, each
    lane's alive rows first: the same result as ``⌈len(data) / batch_size⌉`` batches (the rest
    would be padding only, which leaves a state unchanged) at a fraction of the work. Returns
    the ``N`` states stacked on a leading axis (the shadow / reference models of membership
    inference).

    Raises:
      PrivDebiasError: ``masks`` not ``(N, len(data))`` of 0/1, a model with no rows, bad
        epochs / batch size / width.
    """
    masks = np.asarray(masks)
    n_rows = len(data)
    if masks.ndim != 2 or masks.shape[1] != n_rows:
        raise PrivDebiasError(f"masks must have shape (N, {n_rows}), got {masks.shape}")
    if not np.all((masks == 0) | (masks == 1)):
        raise PrivDebiasError("masks must hold only 0 and 1")
    if np.any(masks.sum(1) == 0):
        raise PrivDebiasError(
            f"model(s) {np.flatnonzero(masks.sum(1) == 0).tolist()} have no training rows"
        )
    if int(epochs) < 1 or int(batch_size) < 1:
        raise PrivDebiasError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    n = masks.shape[0]
    width = n if width is None else int(width)
    if not 1 <= width <= n:
        raise PrivDebiasError(f"width must be in [1, {n}], got {width}")
    input_shape = tuple(np.shape(data.x)[1:])
    layout = resolve_layout(model, tx, input_shape, layout)
    lane_batch = resolve_lane_batch(lane_batch)
    mesh = default_mesh(width) if isinstance(mesh, str) else mesh
    init = init_program(model, tx, input_shape)
    # an epoch of batches covering the largest model's rows: the alive rows come first, so the
    # batches after them are padding only (no-ops) and need not be computed
    batches = math.ceil(int(masks.sum(1).max()) / int(batch_size))
    lane_keys = [jax.random.fold_in(key, i) for i in range(n)]
    x, y, a, idx = (np.asarray(v) for v in data)
    outs = []
    for g in range(0, n, width):
        lanes = list(range(g, min(g + width, n)))
        pad = width - len(lanes)
        lanes_p = lanes + [lanes[-1]] * pad
        states = tree_stack(
            [jax.device_get(init(jax.random.fold_in(lane_keys[i], 0))) for i in lanes_p]
        )
        m = np.stack([masks[i] for i in lanes] + [np.zeros(n_rows)] * pad).astype(np.float32)
        block = Batch(x, y.astype(np.int32), a.astype(np.int32), idx, m)
        keys = np.stack([np.asarray(_key_data(jax.random.fold_in(lane_keys[i], 1))) for i in lanes_p])
        out = run_stage(
            model,
            tx,
            states,
            block,
            keys,
            epochs=epochs,
            batch_size=batch_size,
            layout=layout,
            mesh=mesh,
            shared_data=True,
            lane_batch=lane_batch,
            batches=batches,
        )
        outs.extend(tree_index(out, j) for j in range(len(lanes)))
    return tree_stack(outs)


__all__ = [
    "LAYOUTS",
    "MODEL_AXIS",
    "auto_program_width",
    "default_mesh",
    "epoch_order",
    "init_program",
    "parse_lane_batch",
    "put",
    "resolve_lane_batch",
    "resolve_layout",
    "run_stage",
    "stage_programs",
    "train_models",
    "tree_index",
    "tree_stack",
    "use_cpu_devices",
]
