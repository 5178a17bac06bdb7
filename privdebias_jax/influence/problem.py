"""The curvature problem every inverse-HVP solver answers.

``make_problem(loss_fn, params, batch, select=..., damping=...)`` fixes the objective
``L(θ) = loss_fn(θ, batch)`` (the library's ``loss_fn(params, batch)`` contract, a mean over
the batch), the parameter subset ``S`` it is differentiated in, and the damping ``λ``:

    H_λ = ∇²_{θ_S} L(θ) + λ I        (curvature="hessian")
    H_λ = J_Sᵀ ∇²_z ℓ J_S + λ I       (curvature="gauss_newton", needs the model)
    H_λ = (1/n) Σ_i g_i g_iᵀ + λ I     (curvature="empirical_fisher", g_i = ∇_{θ_S} ℓ(z_i))

For the softmax cross-entropy the Gauss-Newton matrix equals the true Fisher
``E_{x, y∼p_θ(y|x)}[∇ℓ ∇ℓᵀ]`` (Martens 2020, "New insights and perspectives on the natural
gradient method", §9.2); the empirical Fisher uses the training labels instead of labels drawn
from the model (Kunstner et al. 2019 discuss where the two differ).

Its products (:meth:`CurvatureProblem.matvec`) and per-example gradients
(:func:`per_example_grads`) are jitted with the data and the frozen parameters as arguments.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from privdebias_jax.data.dataset import Batch, Dataset, as_batch
from privdebias_jax.influence.hvp import gnvp, hvp, linearize_hvp
from privdebias_jax.influence.params import PathFilter, merge_params, split_params
from privdebias_jax.train import apply_model, cross_entropy_loss
from privdebias_jax.types import ModelState, Params, PrivDebiasError

Tree = Any
CURVATURES = ("hessian", "gauss_newton", "empirical_fisher")


def _restricted_loss(loss_fn, selected, frozen, batch, model_state):
    params = merge_params(selected, frozen)
    if model_state is None:
        return loss_fn(params, batch)
    return loss_fn(params, batch, model_state)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _damped_hvp(loss_fn, curvature_fn, damping, selected, frozen, batch, model_state, v):
    if curvature_fn is None:
        hv = hvp(lambda s, fr, b, ms: _restricted_loss(loss_fn, s, fr, b, ms), selected, v, frozen, batch, model_state)
    else:
        hv = curvature_fn(selected, frozen, batch, model_state, v)
    return jax.tree_util.tree_map(lambda h, x: h + damping * x, hv, v)


@functools.partial(jax.jit, static_argnums=0)
def _linearized_hvp(loss_fn, selected, frozen, batch, model_state):
    """``v ↦ ∇²_S L v`` at the problem's point and batch, as a jit-compatible ``Partial``."""
    return linearize_hvp(lambda s: _restricted_loss(loss_fn, s, frozen, batch, model_state), selected)[1]


@jax.jit
def _apply_damped(linear_map, damping, v):
    return jax.tree_util.tree_map(lambda h, x: h + damping * x, linear_map(v), v)


@functools.partial(jax.jit, static_argnums=0)
def _loss_grad(loss_fn, selected, frozen, batch, model_state):
    return jax.grad(lambda s: _restricted_loss(loss_fn, s, frozen, batch, model_state))(selected)


@functools.partial(jax.jit, static_argnums=0)
def _loss_value(loss_fn, selected, frozen, batch, model_state):
    return _restricted_loss(loss_fn, selected, frozen, batch, model_state)


@dataclasses.dataclass(frozen=True, eq=False)
class CurvatureProblem:
    """``H_λ`` of ``loss_fn`` on a parameter subset, over a fixed batch.

    Attributes:
      loss_fn: ``loss_fn(params, batch[, model_state]) -> scalar``, a mean over the batch.
      params: the full parameter tree.
      batch: the data ``H`` is averaged over (a :class:`Batch`, mask honoured by ``loss_fn``).
      selected, frozen: the subset ``S`` (flat dict path → array) and the rest.
      damping: ``λ ≥ 0`` added to the diagonal.
      curvature: ``hessian``, ``gauss_newton`` (= the true Fisher for softmax cross-entropy) or
        ``empirical_fisher``.
      model, model_state: the Flax module (needed for ``gauss_newton``, the closed-form head
        solver and the true-Fisher K-FAC) and its batch statistics.
      reuse_linearization: for ``hessian``, the first :meth:`matvec` linearizes the gradient
        at the problem's point (:func:`~privdebias_jax.influence.linearize_hvp`) and every
        product reuses it (the problem is immutable): each product then costs only the
        tangent pass. ``False`` recomputes the full forward-over-reverse product each time
        (no residuals kept in memory).
    """

    loss_fn: Callable[..., jax.Array]
    params: Params
    batch: Batch
    selected: dict[str, Any]
    frozen: dict[str, Any]
    damping: float
    curvature: str
    model: nn.Module | None
    model_state: ModelState | None
    select: PathFilter
    reuse_linearization: bool = True

    @property
    def num_params(self) -> int:
        """Size of the subset ``S``."""
        return int(sum(np.size(v) for v in self.selected.values()))

    @property
    def num_examples(self) -> float:
        """``Σ mask`` of the batch (the ``n`` of ``H = (1/n) Σ ∇²ℓ_i``)."""
        return float(np.sum(np.asarray(self.batch.mask)))

    def _curvature_fn(self):
        if self.curvature == "hessian":
            return None
        if self.curvature == "empirical_fisher":
            return _empirical_fisher_product(self.loss_fn)
        return _gn_product(self.model)

    @functools.cached_property
    def linear_hvp(self) -> Callable[[Tree], Tree]:
        """``v ↦ ∇²_S L v`` linearized once at the problem's point and batch (a ``Partial``;
        see :func:`~privdebias_jax.influence.linearize_hvp`), computed on first use."""
        return _linearized_hvp(self.loss_fn, self.selected, self.frozen, self.batch, self.model_state)

    def _product(self, damping: float, v: Tree) -> Tree:
        d = jnp.asarray(damping, jnp.float32)
        if self.curvature == "hessian" and self.reuse_linearization:
            return _apply_damped(self.linear_hvp, d, v)
        return _damped_hvp(self.loss_fn, self._curvature_fn(), d, self.selected, self.frozen, self.batch,
                           self.model_state, v)

    def matvec(self, v: Tree) -> Tree:
        """``H_λ v`` for ``v`` shaped like ``selected``."""
        return self._product(self.damping, v)

    def undamped_matvec(self, v: Tree) -> Tree:
        """``(H_λ − λI) v``."""
        return self._product(0.0, v)

    def gradient(self, batch: Batch | Dataset | None = None) -> dict[str, Any]:
        """``∇_{θ_S} loss_fn(θ, batch)`` (the problem's own batch when None)."""
        b = self.batch if batch is None else (as_batch(batch) if isinstance(batch, Dataset) else batch)
        return _loss_grad(self.loss_fn, self.selected, self.frozen, b, self.model_state)

    def value(self, selected: dict[str, Any] | None = None) -> float:
        """``loss_fn`` on the problem's batch with the subset set to ``selected`` (default: its own)."""
        sel = self.selected if selected is None else selected
        return float(_loss_value(self.loss_fn, sel, self.frozen, self.batch, self.model_state))

    def ravel(self, tree: Tree) -> jax.Array:
        """Flatten a subset-shaped tree in ``ravel_pytree`` order."""
        return ravel_pytree(tree)[0]

    def unravel(self, flat: jax.Array) -> Tree:
        """The inverse of :meth:`ravel`."""
        return ravel_pytree(self.selected)[1](flat)

    def with_selected(self, selected: dict[str, Any]) -> Params:
        """The full parameter tree with ``selected`` in place of the subset."""
        return merge_params(selected, self.frozen)


@functools.lru_cache(maxsize=32)
def _gn_product(model: nn.Module):
    def output_fn(selected, frozen, batch, model_state):
        logits, _, _ = apply_model(model, merge_params(selected, frozen), model_state or {}, batch.x)
        return logits

    def output_loss(z, frozen, batch, model_state):
        return cross_entropy_loss(z, batch)

    def product(selected, frozen, batch, model_state, v):
        return gnvp(output_fn, output_loss, selected, v, frozen, batch, model_state)

    return product


@functools.lru_cache(maxsize=32)
def _empirical_fisher_product(loss_fn: Callable[..., jax.Array]):
    """``v ↦ (1/Σm) Σ_i m_i g_i (g_iᵀ v)`` with ``g_i`` the gradient of ``loss_fn`` on example ``i``
    alone: one forward-mode pass for every ``g_iᵀ v`` and one reverse pass for the weighted sum."""

    def product(selected, frozen, batch, model_state, v):
        weight = batch.mask.astype(jnp.float32) / jnp.maximum(jnp.sum(batch.mask.astype(jnp.float32)), 1.0)

        def per_example_losses(s):
            def one(ex):
                b1 = Batch(*(a[None] for a in ex))
                return _restricted_loss(loss_fn, s, frozen, b1._replace(mask=jnp.ones_like(b1.mask)), model_state)

            return jax.vmap(one)(batch)

        _, g_dot_v = jax.jvp(per_example_losses, (selected,), (v,))
        _, pullback = jax.vjp(per_example_losses, selected)
        return pullback((weight * g_dot_v).astype(g_dot_v.dtype))[0]

    return product


def make_problem(
    loss_fn: Callable[..., jax.Array],
    params: Params,
    batch: Batch | Dataset,
    *,
    select: PathFilter = None,
    damping: float = 0.0,
    curvature: str = "hessian",
    model: nn.Module | None = None,
    model_state: ModelState | None = None,
    reuse_linearization: bool = True,
) -> CurvatureProblem:
    """Build a :class:`CurvatureProblem`.

    ``batch`` may be a :class:`Dataset` (taken whole, mask of ones). For
    ``curvature="gauss_newton"`` the model is required and the loss is taken to be the mean
    cross-entropy of its logits. ``curvature="empirical_fisher"`` needs only ``loss_fn``
    (each example's gradient is that of ``loss_fn`` on a batch holding only it). ``reuse_linearization`` (``hessian`` only): products reuse one
    linearization of the gradient at ``params`` (see :class:`CurvatureProblem`).

    Raises:
      PrivDebiasError: negative or non-finite damping, unknown curvature, a filter that
        matches nothing, ``gauss_newton`` without a model.
    """
    damping = float(damping)
    if not np.isfinite(damping) or damping < 0:
        raise PrivDebiasError(f"damping must be a finite number ≥ 0, got {damping}")
    if curvature not in CURVATURES:
        raise PrivDebiasError(f"unknown curvature {curvature!r}; expected one of {CURVATURES}")
    if curvature == "gauss_newton" and model is None:
        raise PrivDebiasError("curvature='gauss_newton' needs the model (pass model=...)")
    if isinstance(batch, Dataset):
        batch = as_batch(batch)
    batch = Batch(*(jnp.asarray(v) for v in batch))
    selected, frozen = split_params(params, select)
    return CurvatureProblem(
        loss_fn=loss_fn, params=params, batch=batch, selected=selected, frozen=frozen,
        damping=damping, curvature=curvature, model=model,
        model_state=model_state if model_state else None, select=select,
        reuse_linearization=bool(reuse_linearization),
    )


# --------------------------------------------------------------------------------------------
# Per-example gradients
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _per_example_flat_grads(loss_fn, selected, frozen, batch, model_state):
    def one(ex):
        b1 = Batch(*(v[None] for v in ex))
        g = jax.grad(lambda s: _restricted_loss(loss_fn, s, frozen, b1, model_state))(selected)
        return ravel_pytree(g)[0]

    return jax.vmap(one)(batch)


def _fixed_chunks(data: Dataset | Batch, chunk_size: int, what: str) -> Iterator[tuple[tuple[int, int], Batch]]:
    """``((start, stop), chunk)`` over ``data`` in chunks of one fixed size (at most ``len(data)``),
    the last one padded by wrapping around to the first rows, so a jitted function of a chunk
    compiles once; the caller keeps rows ``[: stop − start]``.

    Raises:
      PrivDebiasError: an empty ``data`` (``what`` names the computation).
    """
    b = as_batch(data) if isinstance(data, Dataset) else data
    n = int(np.shape(b.y)[0])
    if n == 0:
        raise PrivDebiasError(f"{what} of an empty set")
    cs = max(1, min(int(chunk_size), n))
    host = [np.asarray(v) for v in b]
    for start in range(0, n, cs):
        stop = min(start + cs, n)
        rows = np.arange(start, start + cs) % n if stop - start < cs else np.arange(start, stop)
        yield (start, stop), Batch(*(jnp.asarray(v[rows]) for v in host))


def iterate_per_example_grads(
    problem: CurvatureProblem,
    data: Dataset | Batch,
    chunk_size: int = 256,
    selected: dict[str, Any] | None = None,
) -> Iterator[tuple[slice, jax.Array]]:
    """Per-example gradients ``∇_{θ_S} ℓ(z_i)`` as ``(rows, (chunk, P) flat array)`` chunks.

    Each example's gradient is that of ``loss_fn`` on a batch holding only it (for the mean
    cross-entropy: the example's own loss). Chunks have a fixed size (the last one padded
    and cut), so the vmapped gradient compiles once; memory is ``chunk_size × P``.
    """
    sel = problem.selected if selected is None else selected
    for (start, stop), chunk in _fixed_chunks(data, chunk_size, "per-example gradients"):
        weight = chunk.mask
        chunk = chunk._replace(mask=jnp.ones_like(chunk.mask))
        g = _per_example_flat_grads(problem.loss_fn, sel, problem.frozen, chunk, problem.model_state)
        # padding rows (mask 0) contribute nothing: their gradients are zeroed
        yield slice(start, stop), (g * weight[:, None].astype(g.dtype))[: stop - start]


@functools.partial(jax.jit, static_argnums=0)
def _per_example_dots(loss_fn, selected, frozen, batch, model_state, vectors):
    """``(chunk, T)``: each example's gradient (a tree, never flattened) against the ``T`` columns
    of ``vectors`` (a tree shaped like ``selected`` with a trailing axis ``T``), weighted by the
    mask, in one program."""

    def one(ex):
        b1 = Batch(*(v[None] for v in ex))
        b1 = b1._replace(mask=jnp.ones_like(b1.mask))
        return jax.grad(lambda s: _restricted_loss(loss_fn, s, frozen, b1, model_state))(selected)

    single = all(vectors[k].shape[-1] == 1 for k in vectors)
    if single:
        # one vector: the product is taken inside the vmapped function as an elementwise product and a
        # sum, which XLA fuses with the gradient's last (outer-product) step, so no per-example
        # gradient of a dense layer is ever written out
        def one_dot(ex):
            g = one(ex)
            return sum(jnp.sum(g[k] * vectors[k][..., 0]) for k in g)[None]

        out = jax.vmap(one_dot)(batch)
    else:
        g = jax.vmap(one)(batch)
        out = sum(jnp.tensordot(g[k], vectors[k], axes=g[k].ndim - 1) for k in g)
    return out * batch.mask.astype(out.dtype)[:, None]


def per_example_products(
    problem: CurvatureProblem,
    data: Dataset | Batch,
    vectors: jax.Array,
    chunk_size: int = 32,
) -> np.ndarray:
    """``G V``: every example's gradient ``∇_{θ_S} ℓ(z_i)`` against the columns of ``vectors``
    (``(P, T)`` in ``ravel_pytree`` order, or ``(P,)``), as a float64 ``(N, T)`` (or ``(N,)``) array.

    The gradients stay trees and meet the vectors inside one jitted program per fixed-size chunk
    (no ``(chunk, P)`` copy): the path :func:`~privdebias_jax.influence.influence_scores` and
    :func:`~privdebias_jax.influence.evaluation.influence_matrix` use. With one vector the product
    is an elementwise product and sum inside the vmapped gradient, which XLA fuses; that form is
    fastest at small chunks (the default 32; ``benchmarks/influence_throughput.py`` sweeps the
    size). Padding rows (mask 0) give 0.

    Raises:
      PrivDebiasError: an empty ``data`` or ``vectors`` whose first axis is not ``P``.
    """
    mat = jnp.asarray(vectors)
    single = mat.ndim == 1
    mat = mat[:, None] if single else mat
    if mat.ndim != 2 or mat.shape[0] != problem.num_params:
        raise PrivDebiasError(f"vectors have shape {tuple(np.shape(vectors))}; expected ({problem.num_params}, T)")
    unravel = ravel_pytree(problem.selected)[1]
    tree = jax.vmap(unravel, in_axes=1, out_axes=-1)(mat)  # leaves shaped like selected, trailing T
    out = np.zeros((int(np.shape(data.y)[0]), mat.shape[1]), np.float64)
    for (start, stop), chunk in _fixed_chunks(data, chunk_size, "per-example products"):
        res = _per_example_dots(problem.loss_fn, problem.selected, problem.frozen, chunk, problem.model_state, tree)
        out[start:stop] = np.asarray(res, np.float64)[: stop - start]
    return out[:, 0] if single else out


def per_example_grads(problem: CurvatureProblem, data: Dataset | Batch, chunk_size: int = 256) -> jax.Array:
    """All per-example gradients as one ``(N, P)`` array (see :func:`iterate_per_example_grads`)."""
    return jnp.concatenate([g for _, g in iterate_per_example_grads(problem, data, chunk_size)])


__all__ = [
    "CURVATURES",
    "CurvatureProblem",
    "make_problem",
    "iterate_per_example_grads",
    "per_example_grads",
    "per_example_products",
]
