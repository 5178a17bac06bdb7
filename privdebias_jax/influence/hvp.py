"""Curvature products on parameter subsets: Hessian-, Gauss-Newton- and dense Hessians.

Everything here takes the data and the frozen parameters as *arguments* (never closed
over), so a jitted product does not constant-fold the backbone (XLA folds closed-over arrays
into the program: slow compiles and misleading timings).

* :func:`hvp`: ``H v = ∂/∂ε ∇f(θ + ε v)`` by forward-over-reverse (``jax.jvp`` of
  ``jax.grad``), 1.6–2.1× a gradient here; reverse-over-reverse costs 6–11× on CNNs.
* :func:`linearize_hvp`: the gradient and the linear map ``v ↦ H v`` by ``jax.linearize`` of
  ``jax.grad``: the forward and backward pass at ``θ`` run once, and each product afterwards
  costs only the tangent pass. Solvers that apply ``H`` many times at the same point and batch
  (CG, Arnoldi, column-by-column Hessians) use it through
  :meth:`~privdebias_jax.influence.CurvatureProblem.matvec`.
* :func:`gnvp`: the Gauss-Newton product ``G v = Jᵀ H_z J v`` (Schraudolph 2002; Martens 2010)
  with ``J`` the Jacobian of the outputs ``z`` (logits) and ``H_z`` the Hessian of the loss in
  the outputs: positive semi-definite for convex output losses (cross-entropy), unlike ``H``.
* :func:`dense_hessian`: the full Hessian of a (small) subset as a matrix, built by ``jax.hessian``
  (forward-over-reverse) of the raveled subset; :func:`matrix_from_products` builds any
  matrix-free product into a matrix column by column, the twin used to validate every solver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

Tree = Any


def hvp(f: Callable[..., jax.Array], params: Tree, v: Tree, *args: Any) -> Tree:
    """Hessian-vector product ``∇²f(params, *args) · v`` (forward-over-reverse).

    ``f(params, *args) -> scalar``; ``v`` has the structure of ``params``; ``args`` (the batch,
    frozen parameters, model state) are differentiated through by neither pass.
    """
    grad_f = lambda p: jax.grad(f)(p, *args)  # noqa: E731
    return jax.jvp(grad_f, (params,), (v,))[1]


def linearize_hvp(f: Callable[..., jax.Array], params: Tree, *args: Any) -> tuple[Tree, Callable[[Tree], Tree]]:
    """``(∇f(params, *args), v ↦ ∇²f(params, *args) · v)`` by ``jax.linearize(jax.grad(f))``.

    The returned map is a ``jax.tree_util.Partial`` holding the residuals of the gradient's
    forward and backward pass, so it can be returned from and passed into jitted functions;
    applying it runs only the tangent (forward-over-reverse) part of :func:`hvp`: a product
    costs about what the gradient costs instead of about twice (``benchmarks/hvp_cost.py``,
    ``hvp_linearized``). Its memory is the residuals: the activations of one forward and one
    backward pass over ``args``'s batch.
    """
    grad_f = lambda p: jax.grad(f)(p, *args)  # noqa: E731
    return jax.linearize(grad_f, params)


def gnvp(
    output_fn: Callable[..., jax.Array],
    output_loss: Callable[..., jax.Array],
    params: Tree,
    v: Tree,
    *args: Any,
) -> Tree:
    """Gauss-Newton-vector product ``Jᵀ ∇²_z ℓ(z) J v`` with ``z = output_fn(params, *args)``.

    ``output_loss(z, *args) -> scalar`` (e.g. the mean cross-entropy of logits ``z``); the
    same ``args`` go to both functions.
    """
    fwd = lambda p: output_fn(p, *args)  # noqa: E731
    z, jv = jax.jvp(fwd, (params,), (v,))
    hz = jax.jvp(jax.grad(lambda zz: output_loss(zz, *args)), (z,), (jv,))[1]
    _, vjp = jax.vjp(fwd, params)
    return vjp(hz)[0]


def dense_hessian(f: Callable[..., jax.Array], params: Tree, *args: Any) -> jax.Array:
    """The Hessian of ``f`` w.r.t. ``params`` as a ``(P, P)`` matrix in ``ravel_pytree`` order."""
    flat, unravel = ravel_pytree(params)
    g = lambda x: f(unravel(x), *args)  # noqa: E731
    return jax.hessian(g)(flat)


def matrix_from_products(product: Callable[[Tree], Tree], params: Tree, chunk: int = 256) -> jax.Array:
    """The matrix of a linear map on pytrees, column by column: ``M[:, j] = product(e_j)``.

    ``product`` maps a tree shaped like ``params`` to another; columns are computed with
    ``jax.vmap`` in chunks of ``chunk`` basis vectors to bound memory.
    """
    flat, unravel = ravel_pytree(params)
    p = flat.shape[0]
    col = lambda e: ravel_pytree(product(unravel(e)))[0]  # noqa: E731
    cols = []
    for start in range(0, p, chunk):
        basis = jnp.eye(p, dtype=flat.dtype)[start : start + chunk]
        cols.append(jax.vmap(col)(basis))
    return jnp.concatenate(cols, axis=0).T


__all__ = ["hvp", "gnvp", "dense_hessian", "matrix_from_products"]
