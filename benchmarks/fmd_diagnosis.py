"""Why FMD's one-step debiasing does not reproduce retraining: a float64 diagnosis grid.

FMD (Chen et al. 2023, "Fast Model Debias with Machine Unlearning") replaces ``K`` harmful
training samples ``z_k`` by their counterfactuals ``z̄_k`` (same digit, another colour) with one
damped Newton step on the last layer(s) at the trained parameters ``θ̂``::

    g_K      = (1/n) Σ_k (∇ℓ(z_k; θ̂) − ∇ℓ(z̄_k; θ̂))
    Δ_one(λ) = (C + λI)⁻¹ g_K                                   C: a curvature at θ̂

The ``K`` samples are the largest influence scores (Koh & Liang 2017) on the counterfactual bias
``B`` of an external set ``D_ex`` of pairs::

    B(θ) = mean_i |p(ŷ_i | x_i) − p(ŷ_i | x̄_i)|                ŷ_i the prediction on x_i
    I(z) = −∇B(θ̂)ᵀ (H + λI)⁻¹ ∇ℓ(z; θ̂)                         top-K are replaced

The step is an influence-function estimate of the response of training on the modified set
``L'(θ) = L(θ) + (1/n) Σ_k (ℓ(z̄_k; θ) − ℓ(z_k; θ))``. Bae et al. 2022 ("If influence functions
are the answer, then what is the question?") show that the damped estimate approximates a
*proximal* response, not plain retraining. Each cell compares ``Δ_one`` with three retrainings of
the same parameters on the same modified data, solved in float64 by trust-region Newton
(exact Hessian-vector products) to ``‖∇‖ ≤ 1e-8``::

    proximal  argmin_θ L'(θ) + (λ/2)‖θ − θ̂‖²
    pbrf      argmin_θ L'(θ) − ∇L(θ̂)ᵀθ + (λ/2)‖θ − θ̂‖²
    plain     argmin_θ L'(θ) + (μ/2)‖θ‖²,  μ = 1e-6

``pbrf`` subtracts the residual training gradient, so ``θ̂`` is its minimiser when ``K = 0``. For a
linear softmax head the logits are linear in ``θ``, hence ``L(θ) − L(θ̂) − ∇L(θ̂)ᵀ(θ − θ̂) =
mean_i KL(p_i(θ̂) ‖ p_i(θ))``, the output-space Bregman divergence of Bae et al.'s PBRF: ``pbrf`` is
their PBRF exactly (for two layers, its parameter-space analogue). The first Newton iterate on it
from ``θ̂`` with the curvature frozen at ``H`` is ``Δ_one``; with the Hessian of ``L'`` at ``θ̂``
(curvature ``hessian_modified``) it is the exact first Newton iterate. ``plain`` is training from
``θ̂`` with a negligible weight decay: on linearly separable features ``L'`` alone has no finite
minimiser, and ``μ`` keeps one at a finite (large) norm; cells that stop at the iteration cap
say so (``converged``, ``grad_norm``).

Curvatures (``C``): ``hessian`` ``H = (1/n) Σ_i J_iᵀ(diag p_i − p_i p_iᵀ)J_i + (1/n) Σ_i Σ_c (p_ic −
y_ic)∇²z_ic``; ``ggn`` its first term (Gauss-Newton); ``empirical_fisher`` ``(1/n) Σ_i ∇ℓ_i ∇ℓ_iᵀ``;
``hessian_modified`` the Hessian of ``L'``. For a linear head ``∇²z = 0``, so Hessian = Gauss-Newton
= the true Fisher ``(1/n) Σ_i E_{y∼p_i}[∇ℓ∇ℓᵀ]`` (checked numerically once, ``verification``).

Grid: FMD's 3×100 MLP on Colored-MNIST (ρ = 0.99, 28×28) and the CPU ``small_cnn`` on
Biased-MNIST (14×14); the last layer (closed form on frozen float64 features) and, for the MLP,
the last two layers (``dense_2`` + ``head``, 11,110 parameters, dense Hessian and Gauss-Newton
assembled blockwise in float64); the default training length (saturated softmax) and 2 epochs;
``K ∈ {40, 100, 400}``, ``λ ∈ {1e-3, …, 10}``; counterfactual colours from the other colours
(FMD's definition) and, in one row, from all colours; three seeds (model initialisation and batch
order, ``D_ex``, counterfactual colours; the data set itself is fixed). What is cut for time is
listed under ``cuts`` in the JSON.

Per cell: cosine and relative norm of ``Δ_one`` against each retraining's change; the
counterfactual bias (unbiased test pairs), unbiased and biased test accuracy of ``θ̂``,
``θ̂ + Δ_one`` and the retrained parameters; the multiplier ``α* ∈ [0, 1]`` minimising
``‖αΔ_one − Δ_prox‖`` (projection) and the metrics at ``θ̂ + α*Δ_one``; the best cosine of a more
damped step ``Δ_one(λ')``, ``λ' ≥ λ``, on the same samples; and the saturation diagnostics (the
fraction of ``‖g_K‖²`` on Hessian eigen-directions with eigenvalue below ``λ``, and the growth of
the curvature along ``Δ_prox`` between ``θ̂`` and the proximal optimum).

    python benchmarks/fmd_diagnosis.py [--quick] [--out benchmarks/results/fmd_diagnosis.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
import scipy.optimize  # noqa: E402
from scipy.special import logsumexp, softmax  # noqa: E402

from benchmarks.common import machine_info, write_result  # noqa: E402

GTOL = 1e-8
PLAIN_RIDGE = 1e-6

# ----------------------------------------------------------------------------------------------
# Models on frozen float64 features. θ is flat; each layer is an augmented matrix [W; b]
# (input rows, then the bias row) raveled row-major.
# ----------------------------------------------------------------------------------------------


class LinearHead:
    """``z = a W + b``; ``θ = vec([W; b])`` with ``[W; b] ∈ R^{(F+1)×C}`` (row-major)."""

    def __init__(self, num_features: int, num_classes: int):
        self.f, self.c = int(num_features), int(num_classes)
        self.size = (self.f + 1) * self.c

    def _w(self, theta):
        return theta.reshape(self.f + 1, self.c)

    def forward(self, theta, A):
        """Logits and the cache the derivatives need (none for a linear map)."""
        W = self._w(theta)
        return A @ W[: self.f] + W[self.f], None

    def jvp(self, theta, aux, A, v):
        """``J v``: the logits' change along ``v``, shape (n, C)."""
        V = self._w(v)
        return A @ V[: self.f] + V[self.f]

    def vjp(self, theta, aux, A, dZ):
        """``Σ_i J_iᵀ dZ_i``: a flat parameter vector."""
        return np.vstack([A.T @ dZ, dZ.sum(0)]).ravel()

    def per_sample_vjp(self, theta, aux, A, dZ):
        """``J_iᵀ dZ_i`` for every sample, shape (n, P)."""
        At = np.hstack([A, np.ones((len(A), 1))])
        return (At[:, :, None] * dZ[:, None, :]).reshape(len(A), -1)

    def residual_hvp(self, theta, aux, A, E, v):
        """``Σ_i Σ_c E_ic ∇²z_ic v``: zero, the logits are linear in θ."""
        return np.zeros(self.size)

    def dense_ggn(self, theta, aux, A, S):
        """``Σ_i J_iᵀ S_i J_i`` for per-sample (C, C) matrices ``S`` (weights included)."""
        return head_gram(np.hstack([A, np.ones((len(A), 1))]), S)

    def add_dense_residual(self, M, theta, aux, A, E):
        """Add ``Σ_i Σ_c E_ic ∇²z_ic`` to ``M`` (nothing for a linear head)."""


def head_gram(At, S):
    """``G[(k,c),(k',c')] = Σ_i At_ik At_ik' S_i[c,c']`` as a ((F+1)C)² matrix."""
    n, f1 = At.shape
    c = S.shape[1]
    G = np.empty((f1, c, f1, c))
    for a in range(c):
        for b in range(a, c):
            blk = (At * S[:, a, b][:, None]).T @ At
            G[:, a, :, b] = blk
            G[:, b, :, a] = blk.T
    return G.reshape(f1 * c, f1 * c)


class TwoLayer:
    """``z = relu(h U + u) W + b`` on frozen inputs ``h``; ``θ = [vec([U; u]), vec([W; b])]``.

    ``[U; u] ∈ R^{(F+1)×D}``, ``[W; b] ∈ R^{(D+1)×C}``. The ReLU's second derivative is zero almost
    everywhere, so ``∇²z_c`` only couples ``U`` with ``W``:
    ``∂²z_ic / ∂[U;u]_{kj} ∂W_{jc} = 1[a_ij > 0] h̃_ik``.
    """

    def __init__(self, num_features: int, hidden: int, num_classes: int):
        self.f, self.d, self.c = int(num_features), int(hidden), int(num_classes)
        self.p1 = (self.f + 1) * self.d
        self.size = self.p1 + (self.d + 1) * self.c

    def split(self, theta):
        """The two augmented matrices ``[U; u]`` and ``[W; b]`` (views)."""
        return theta[: self.p1].reshape(self.f + 1, self.d), theta[self.p1 :].reshape(self.d + 1, self.c)

    def forward(self, theta, A):
        U, W = self.split(theta)
        a = A @ U[: self.f] + U[self.f]
        m = (a > 0).astype(A.dtype)
        r = a * m
        return r @ W[: self.d] + W[self.d], (r, m)

    def jvp(self, theta, aux, A, v):
        r, m = aux
        _, W = self.split(theta)
        Vu, Vw = self.split(v)
        rr = m * (A @ Vu[: self.f] + Vu[self.f])
        return rr @ W[: self.d] + r @ Vw[: self.d] + Vw[self.d]

    def vjp(self, theta, aux, A, dZ):
        r, m = aux
        _, W = self.split(theta)
        gw = np.vstack([r.T @ dZ, dZ.sum(0)])
        da = m * (dZ @ W[: self.d].T)
        gu = np.vstack([A.T @ da, da.sum(0)])
        return np.concatenate([gu.ravel(), gw.ravel()])

    def per_sample_vjp(self, theta, aux, A, dZ):
        r, m = aux
        _, W = self.split(theta)
        n = len(A)
        da = m * (dZ @ W[: self.d].T)
        At = np.hstack([A, np.ones((n, 1))])
        rt = np.hstack([r, np.ones((n, 1))])
        gu = (At[:, :, None] * da[:, None, :]).reshape(n, -1)
        gw = (rt[:, :, None] * dZ[:, None, :]).reshape(n, -1)
        return np.hstack([gu, gw])

    def residual_hvp(self, theta, aux, A, E, v):
        r, m = aux
        Vu, Vw = self.split(v)
        rr = m * (A @ Vu[: self.f] + Vu[self.f])
        gw = np.vstack([rr.T @ E, np.zeros(self.c)])
        da = m * (E @ Vw[: self.d].T)
        gu = np.vstack([A.T @ da, da.sum(0)])
        return np.concatenate([gu.ravel(), gw.ravel()])

    def dense_ggn(self, theta, aux, A, S):
        """``Σ_i J_iᵀ S_i J_i`` assembled blockwise (float64, about 1 GB at 11k parameters)."""
        r, m = aux
        _, W = self.split(theta)
        n, f1, d, c, p1 = len(A), self.f + 1, self.d, self.c, self.p1
        At = np.hstack([A, np.ones((n, 1))])
        rt = np.hstack([r, np.ones((n, 1))])
        Wd = W[: self.d]
        M = np.empty((self.size, self.size))
        # (W, W): the head's Gram on r̃
        M[p1:, p1:] = head_gram(rt, S)
        # (U, U): Σ_i h̃_ik h̃_ik' Q_i[j,j'],  Q_i = m_i m_iᵀ ⊙ (W S_i Wᵀ)
        WS = np.einsum("jc,icd->ijd", Wd, S)  # (n, D, C)
        Q = np.einsum("ijd,ld->ijl", WS, Wd)
        Q *= m[:, :, None]
        Q *= m[:, None, :]
        AA = (At[:, :, None] * At[:, None, :]).reshape(n, f1 * f1)
        G = (AA.T @ Q.reshape(n, d * d)).reshape(f1, f1, d, d)
        del Q, AA
        uu = M[:p1, :p1]
        uu4 = uu.reshape(f1, d, f1, d)
        assert np.shares_memory(uu4, M)
        uu4[...] = G.transpose(0, 2, 1, 3)
        del G
        # (U, W): Σ_i h̃_ik m_ij (W S_i)[j,c'] r̃_ij'
        X = m[:, :, None] * WS  # (n, D, C)
        uw = M[:p1, p1:]
        uw4 = uw.reshape(f1, d, d + 1, c)
        assert np.shares_memory(uw4, M)
        for j in range(d):
            right = (X[:, j, None, :] * rt[:, :, None]).reshape(n, (d + 1) * c)
            uw4[:, j] = (At.T @ right).reshape(f1, d + 1, c)
        M[p1:, :p1] = M[:p1, p1:].T
        return M

    def add_dense_residual(self, M, theta, aux, A, E):
        """Add ``Σ_i Σ_c E_ic ∇²z_ic``: the (U, W) block ``δ_{jj'} Σ_i E_ic m_ij h̃_ik``."""
        _, m = aux
        n, f1, d, c, p1 = len(A), self.f + 1, self.d, self.c, self.p1
        At = np.hstack([A, np.ones((n, 1))])
        R = np.einsum("ik,ij,ic->kjc", At, m, E)  # (F+1, D, C)
        uw4 = M[:p1, p1:].reshape(f1, d, d + 1, c)
        wu4 = M[p1:, :p1].reshape(d + 1, c, f1, d)
        assert np.shares_memory(uw4, M) and np.shares_memory(wu4, M)
        for j in range(d):
            uw4[:, j, j, :] += R[:, j, :]
            wu4[j, :, :, j] += R[:, j, :].T


# ----------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------


def softmax_jacobian_apply(p, u):
    """``(diag p_i − p_i p_iᵀ) u_i`` for every row."""
    return p * u - p * np.sum(p * u, axis=1, keepdims=True)


def softmax_jacobians(p, w):
    """``w_i (diag p_i − p_i p_iᵀ)``, shape (n, C, C)."""
    S = -p[:, :, None] * p[:, None, :]
    idx = np.arange(p.shape[1])
    S[:, idx, idx] += p
    return S * w[:, None, None]


class Objective:
    """``f(θ) = Σ_i w_i ℓ(z_i; θ) + (λ/2)‖θ − θ_a‖² + (μ/2)‖θ‖² − cᵀθ`` (ℓ: softmax cross-entropy).

    ``w`` defaults to ``1/n``. Gradients, exact Hessian-vector products (``kind="hessian"``) and
    Gauss-Newton products (``kind="ggn"``) come from the model's Jacobian products; the last
    forward pass is cached, so a trust-region solver's repeated products at one point are cheap.
    """

    def __init__(self, model, A, y, w=None, lam=0.0, anchor=None, ridge=0.0, linear=None):
        self.model, self.A, self.y = model, np.asarray(A, np.float64), np.asarray(y)
        n = len(self.y)
        self.w = np.full(n, 1.0 / n) if w is None else np.asarray(w, np.float64)
        self.lam, self.ridge = float(lam), float(ridge)
        self.anchor = None if anchor is None else np.asarray(anchor, np.float64)
        self.linear = None if linear is None else np.asarray(linear, np.float64)
        self._key = None
        self.hessp_calls = 0

    def _state(self, theta):
        if self._key is None or not np.array_equal(self._key, theta):
            Z, aux = self.model.forward(theta, self.A)
            lse = logsumexp(Z, axis=1)
            p = np.exp(Z - lse[:, None])
            E = p.copy()
            E[np.arange(len(self.y)), self.y] -= 1.0
            E *= self.w[:, None]
            self._key = np.array(theta, copy=True)
            self._cache = (Z, aux, lse, p, E)
        return self._cache

    def _extra(self, theta):
        f, g = 0.0, np.zeros_like(theta)
        if self.lam:
            dlt = theta - self.anchor
            f += 0.5 * self.lam * dlt @ dlt
            g += self.lam * dlt
        if self.ridge:
            f += 0.5 * self.ridge * theta @ theta
            g += self.ridge * theta
        if self.linear is not None:
            f -= self.linear @ theta
            g -= self.linear
        return f, g

    def loss(self, theta):
        """``Σ_i w_i ℓ(z_i; θ)`` alone."""
        Z, _, lse, _, _ = self._state(theta)
        return float(self.w @ (lse - Z[np.arange(len(self.y)), self.y]))

    def value_and_grad(self, theta):
        Z, aux, lse, _, E = self._state(theta)
        f0 = float(self.w @ (lse - Z[np.arange(len(self.y)), self.y]))
        fe, ge = self._extra(theta)
        return f0 + fe, self.model.vjp(theta, aux, self.A, E) + ge

    def grad(self, theta):
        return self.value_and_grad(theta)[1]

    def hessp(self, theta, v, kind="hessian"):
        _, aux, _, p, E = self._state(theta)
        self.hessp_calls += 1
        u = self.model.jvp(theta, aux, self.A, v)
        out = self.model.vjp(theta, aux, self.A, softmax_jacobian_apply(p, u) * self.w[:, None])
        if kind == "hessian":
            out = out + self.model.residual_hvp(theta, aux, self.A, E, v)
        return out + (self.lam + self.ridge) * v

    def dense(self, theta, kind="hessian", include_extra=True):
        """The dense curvature of the loss part (``hessian`` / ``ggn`` / ``empirical_fisher``)."""
        _, aux, _, p, E = self._state(theta)
        if kind == "empirical_fisher":
            G = self.model.per_sample_vjp(theta, aux, self.A, E / self.w[:, None])
            M = (G * self.w[:, None]).T @ G
        else:
            M = self.model.dense_ggn(theta, aux, self.A, softmax_jacobians(p, self.w))
            if kind == "hessian":
                self.model.add_dense_residual(M, theta, aux, self.A, E)
        if include_extra and (self.lam or self.ridge):
            M[np.diag_indices_from(M)] += self.lam + self.ridge
        return M


def minimize(obj: Objective, theta0, gtol=GTOL, maxiter=500) -> tuple[np.ndarray, dict]:
    """Trust-region Newton (``scipy.optimize.minimize(method="trust-krylov")``, exact Hessian
    products) from ``theta0``; returns the point and ``grad_norm``, ``converged``, ``iterations``."""
    t0 = time.perf_counter()
    calls0 = obj.hessp_calls
    res = scipy.optimize.minimize(
        obj.value_and_grad, np.array(theta0, np.float64), jac=True, hessp=obj.hessp,
        method="trust-krylov", options={"gtol": gtol, "maxiter": maxiter},
    )
    gn = float(np.linalg.norm(obj.grad(res.x)))
    return res.x, {
        "grad_norm": gn,
        "converged": bool(gn <= gtol),
        "iterations": int(res.nit),
        "hessian_products": int(obj.hessp_calls - calls0),
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------------------------
# Bias, metrics
# ----------------------------------------------------------------------------------------------


def pair_bias(model, theta, A, Acf):
    """``mean_i |p(ŷ_i | x_i) − p(ŷ_i | x̄_i)|`` with ``ŷ_i = argmax p(· | x_i)``."""
    Z, _ = model.forward(theta, A)
    Zc, _ = model.forward(theta, Acf)
    yh = Z.argmax(1)
    ar = np.arange(len(A))
    return float(np.mean(np.abs(softmax(Z, 1)[ar, yh] - softmax(Zc, 1)[ar, yh])))


def pair_bias_grad(model, theta, A, Acf):
    """``∇B(θ)`` (ŷ and the sign of each difference held at θ; ``∂p_ŷ/∂z = p_ŷ(e_ŷ − p)``)."""
    Z, aux = model.forward(theta, A)
    Zc, auxc = model.forward(theta, Acf)
    m = len(A)
    ar = np.arange(m)
    yh = Z.argmax(1)
    p, pc = softmax(Z, 1), softmax(Zc, 1)
    s = np.sign(p[ar, yh] - pc[ar, yh]) / m
    onehot = np.zeros_like(p)
    onehot[ar, yh] = 1.0
    dz = (p[ar, yh] * s)[:, None] * (onehot - p)
    dzc = (pc[ar, yh] * s)[:, None] * (onehot - pc)
    return model.vjp(theta, aux, A, dz) - model.vjp(theta, auxc, Acf, dzc)


def accuracy(model, theta, A, y):
    return float(np.mean(model.forward(theta, A)[0].argmax(1) == y))


def metrics(ctx, theta) -> dict:
    """Counterfactual bias (unbiased test pairs and D_ex), unbiased and biased test accuracy."""
    m = ctx["model"]
    return {
        "bias": pair_bias(m, theta, ctx["A_tu"], ctx["A_tu_cf"]),
        "acc_unbiased": accuracy(m, theta, ctx["A_tu"], ctx["y_tu"]),
        "acc_biased": accuracy(m, theta, ctx["A_tb"], ctx["y_tb"]),
        "bias_external": pair_bias(m, theta, ctx["A_ex"], ctx["A_ex_cf"]),
    }


def cosine(a, b) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def compare(step, ref) -> dict:
    """Cosine and ``‖step‖ / ‖ref‖``."""
    return {"cos": cosine(step, ref), "rel_norm": float(np.linalg.norm(step) / np.linalg.norm(ref))}


def best_multiplier(step, ref) -> float:
    """``argmin_{α ∈ [0,1]} ‖α step − ref‖`` (the projection, clipped)."""
    return float(np.clip(step @ ref / (step @ step), 0.0, 1.0))


# ----------------------------------------------------------------------------------------------
# Linear solves for every damping at once
# ----------------------------------------------------------------------------------------------


class EigSolver:
    """``(C + λI)⁻¹ V`` for any λ from one eigendecomposition (the last-layer sizes)."""

    def __init__(self, C):
        self.evals, self.evecs = np.linalg.eigh(C)

    def solve(self, lam, V):
        return self.evecs @ ((self.evecs.T @ V) / (self.evals + lam)[:, None] if V.ndim == 2
                             else (self.evecs.T @ V) / (self.evals + lam))


def factor_solve(C, lam, V):
    """``(C + λI)⁻¹ V`` by Cholesky, or a symmetric-indefinite LDLᵀ (LAPACK sysv) when
    ``C + λI`` is not positive definite. Returns the solution and whether it was definite."""
    M = C.copy()
    M[np.diag_indices_from(M)] += lam
    try:
        cf = scipy.linalg.cho_factor(M, overwrite_a=True, check_finite=False)
        return scipy.linalg.cho_solve(cf, V, check_finite=False), True
    except np.linalg.LinAlgError:
        M = C.copy()
        M[np.diag_indices_from(M)] += lam
        return scipy.linalg.solve(M, V, assume_a="sym", overwrite_a=True, check_finite=False), False
