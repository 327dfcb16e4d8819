"""UPGrad and DualProj: projections onto the dual cone of the per-term gradients.

Both need the projection of a combination ``J^T u`` of the gradients onto the dual cone
``{x : J x >= 0}`` (the directions that increase no term to first order). In weight
space (Quinton & Rey 2024, Proposition 1) that projection is ``J^T v`` with

    v = argmin_v  v^T G v   subject to  v >= u,        G = J J^T,

a non-negative least-squares problem in ``x = v - u`` on the factor ``R`` of ``G``
(``R^T R = G``): ``min_{x >= 0} ||R x + R u||``. It is solved here by the Lawson-Hanson
active-set method, which ends at the exact optimum of its active set (to rounding) in
finitely many steps.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from lossbalance._base import GradientBalancer, gramian
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import warn_once
from lossbalance.methods._blas import single_blas_thread
from lossbalance.methods._mgda import (
    _EPS,
    _TINY,
    Array,
    check_gramian,
    check_matrix,
    gramian_to_numpy,
    to_weights,
    warn_degenerate,
)

__all__ = [
    "DualProj",
    "UPGrad",
    "dualproj_weights",
    "dualproj_weights_from_gramian",
    "upgrad_weights",
    "upgrad_weights_from_gramian",
]

_PAPER = "Quinton & Rey, 2024 (arXiv 2406.16232)"


def gramian_factor(m: Array) -> Array:
    """``R`` with ``R^T R = m`` for a symmetric PSD ``m`` (from its eigendecomposition)."""
    eigvals, eigvecs = np.linalg.eigh(m)
    return np.sqrt(np.maximum(eigvals, 0.0))[:, None] * eigvecs.T


def dual_cone_projection(r: Array, u: Array, max_iter: int | None = None) -> tuple[Array, bool]:
    """``v = argmin ||R v||`` subject to ``v >= u``, and whether the solver converged.

    Lawson & Hanson (1974), NNLS, on ``min_{x >= 0} ||R x - b||`` with ``b = -R u``: a
    variable enters the passive set while the negative gradient ``-(G v)_j`` is positive
    (to a tolerance relative to ``||v||_1``, for ``max diag G = 1``); each inner loop
    solves the least-squares problem on the passive set (least-norm where it is
    singular) and steps back to feasibility. A variable whose least-squares value is not
    positive right after entering is not admitted again in that outer step, the usual
    guard against cycling through rounding.
    """
    k = u.shape[0]
    b = -(r @ u)
    x = np.zeros(k)
    passive = np.zeros(k, dtype=bool)
    limit = 3 * k + 10 if max_iter is None else max_iter
    for _ in range(limit):
        grad = r.T @ (b - r @ x)  # = -G (u + x)
        tol = 64.0 * k * _EPS * (1.0 + float(np.abs(u + x).sum()))
        blocked = np.zeros(k, dtype=bool)
        while True:
            candidates = ~passive & ~blocked & (grad > tol)
            if not candidates.any():
                return u + x, True
            j = int(np.argmax(np.where(candidates, grad, -np.inf)))
            trial = passive.copy()
            trial[j] = True
            z = np.zeros(k)
            z[trial] = np.linalg.lstsq(r[:, trial], b, rcond=None)[0]
            if z[j] > 0.0:
                break
            blocked[j] = True
        passive = trial
        for _ in range(k + 1):
            if (z[passive] > 0.0).all():
                x = z
                break
            negative = passive & (z <= 0.0)
            step = float(np.min(x[negative] / (x[negative] - z[negative])))
            x = x + step * (z - x)
            passive &= x > _TINY
            x[~passive] = 0.0
            z = np.zeros(k)
            if passive.any():
                z[passive] = np.linalg.lstsq(r[:, passive], b, rcond=None)[0]
        np.maximum(x, 0.0, out=x)
    return u + x, False


def _prepare(gram: Tensor, method: str) -> tuple[Array, Array] | None:
    """The normalised Gramian and its factor, or ``None`` when every gradient is zero."""
    m = gramian_to_numpy(gram)
    diag = np.diag(m).copy()
    warn_degenerate(method, diag)
    top = float(diag.max())
    if top <= _TINY:
        return None
    # Projections are invariant to the overall scale of G; max diag 1 fixes the tolerances.
    m = m / top
    return m, gramian_factor(m)


def _warn_max_iter(method: str, converged: bool) -> None:
    if not converged:
        warn_once(
            f"{method}:max-iter",
            f"{method}: the active-set solver reached its iteration limit (rounding-level "
            "cycling); the weights are approximate",
            stacklevel=5,
        )


@single_blas_thread
def _upgrad(gram: Tensor) -> Tensor:
    k = gram.shape[0]
    prepared = _prepare(gram, "upgrad")
    if prepared is None:
        return to_weights(np.full(k, 1.0 / k), gram)
    _, r = prepared
    alpha = np.zeros(k)
    converged = True
    for i in range(k):
        e = np.zeros(k)
        e[i] = 1.0 / k
        v, ok = dual_cone_projection(r, e)
        alpha += v
        converged &= ok
    _warn_max_iter("upgrad", converged)
    return to_weights(alpha, gram)


@single_blas_thread
def _dualproj(gram: Tensor) -> Tensor:
    k = gram.shape[0]
    prepared = _prepare(gram, "dualproj")
    u = np.full(k, 1.0 / k)
    if prepared is None:
        return to_weights(u, gram)
    v, converged = dual_cone_projection(prepared[1], u)
    _warn_max_iter("dualproj", converged)
    return to_weights(v, gram)


def upgrad_weights_from_gramian(gram: Tensor) -> Tensor:
    """UPGrad weights from the K x K Gramian ``J J^T``; see :func:`upgrad_weights`."""
    check_gramian(gram)
    return _upgrad(gram)


def upgrad_weights(matrix: Tensor) -> Tensor:
    r"""UPGrad weights: the mean of each gradient projected onto the dual cone of all.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv
    2406.16232): the UPGrad aggregator, its projection (Eq. 3) computed in the dual form
    of Proposition 1. With ``matrix`` = J (rows g_i),
    ``G = J J^T`` and :math:`\pi_J` the projection onto the dual cone
    :math:`\{x : J x \ge 0\}`,

    .. math::
        d = \frac1K \sum_i \pi_J(g_i) = J^T \alpha, \qquad
        \alpha = \frac1K \sum_i v_i, \quad
        v_i = \arg\min_{v \ge e_i} v^T G v,

    so ``J d >= 0``: no term increases to first order (the paper's "non-conflicting"
    property), and a term that conflicts with no other keeps its full gradient. Each
    v_i is a small non-negative least-squares problem solved exactly by an active-set
    method (see :func:`dual_cone_projection`). The weights do not depend on the overall
    scale of J (G is divided by its largest diagonal entry first).

    Args:
        matrix: K x P per-term gradients, rows are terms.

    Returns:
        alpha, shape ``(K,)``, float64, every entry >= 1/K.

    Zero gradients warn once (their projection is zero); K = 1 gives alpha = [1]. Where G
    is singular (duplicate or dependent gradients) alpha is the least-norm solution of
    each active set and the aggregated gradient ``alpha @ matrix`` is unique (no
    warning, as for MGDA).

    Example:
        >>> import torch
        >>> from lossbalance.functional import upgrad_weights
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> upgrad_weights(J)
        tensor([1.0000, 0.7500], dtype=torch.float64)
        >>> J @ (upgrad_weights(J).float() @ J)  # no term increases
        tensor([0.2500, 0.5000])

    Differences from TorchJD (the authors' library): it solves each QP with quadprog on
    ``G / trace(G) + 1e-4 I`` (the ridge keeps quadprog's Cholesky factorisation
    defined) and returns zeros when ``trace(G) < 1e-4``; we solve the unregularised
    problem, so the result is the exact projection at every scale.
    """
    check_matrix(matrix)
    return upgrad_weights_from_gramian(gramian(matrix))


def dualproj_weights_from_gramian(gram: Tensor) -> Tensor:
    """DualProj weights from the K x K Gramian ``J J^T``; see :func:`dualproj_weights`."""
    check_gramian(gram)
    return _dualproj(gram)


def dualproj_weights(matrix: Tensor) -> Tensor:
    r"""DualProj weights: the mean gradient projected onto the dual cone of the gradients.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (arXiv
    2406.16232), the DualProj aggregator (after Lopez-Paz & Ranzato, "Gradient Episodic
    Memory for Continual Learning", NeurIPS 2017, Eq. 11). With ``matrix`` = J,
    ``G = J J^T``:

    .. math::
        d = \pi_J\Big(\frac1K \sum_i g_i\Big) = J^T \alpha, \qquad
        \alpha = \arg\min_{v \ge \mathbf 1 / K} v^T G v,

    so ``J d >= 0``, and d is the mean when the mean conflicts with no term. Solved as
    in :func:`upgrad_weights`; same degenerate cases.

    Args:
        matrix: K x P per-term gradients, rows are terms.

    Returns:
        alpha, shape ``(K,)``, float64, every entry >= 1/K.

    Example:
        >>> import torch
        >>> from lossbalance.functional import dualproj_weights
        >>> dualproj_weights(torch.tensor([[1.0, 0.0], [-2.0, 1.0]]))
        tensor([1.0000, 0.5000], dtype=torch.float64)

    Differences from TorchJD: as for :func:`upgrad_weights` (no ridge, no zero output
    for small Gramians).
    """
    check_matrix(matrix)
    return dualproj_weights_from_gramian(gramian(matrix))


class UPGrad(GradientBalancer):
    r"""UPGrad: the mean of the gradients each projected onto the dual cone of all of them.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024; the math is
    in :func:`upgrad_weights`. Stateless.

    Args:
        num_terms: K >= 1.

    Example:
        >>> import torch
        >>> from lossbalance import UPGrad
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> UPGrad(2).weights(J @ J.T, torch.ones(2))
        tensor([1.0000, 0.7500], dtype=torch.float64)

    Differences from the paper: the paper's (and TorchJD's) optional preference vector
    (weights of the mean other than 1/K) is not offered; every term weighs 1/K. Each
    head receives its own term's gradient (the engine; only the shared parameters are
    aggregated).
    """

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        return self._record(_upgrad(gramian))


class DualProj(GradientBalancer):
    r"""DualProj: the mean gradient projected onto the dual cone of the gradients.

    Quinton & Rey, 2024 (after Lopez-Paz & Ranzato, NeurIPS 2017, Eq. 11); the math is in
    :func:`dualproj_weights`. Stateless.

    Args:
        num_terms: K >= 1.

    Example:
        >>> import torch
        >>> from lossbalance import DualProj
        >>> J = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
        >>> DualProj(2).weights(J @ J.T, torch.ones(2))
        tensor([1.0000, 0.5000], dtype=torch.float64)

    Differences from the paper: no preference vector (the mean weighs every term 1/K).
    """

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        return self._record(_dualproj(gramian))


register(
    MethodInfo(
        name="upgrad",
        factory=UPGrad,
        needs="gramian",
        stateful=False,
        paper=_PAPER,
        summary="UPGrad: mean of the gradients each projected onto the dual cone of all",
    )
)
register(
    MethodInfo(
        name="dualproj",
        factory=DualProj,
        needs="gramian",
        stateful=False,
        paper=_PAPER,
        summary="DualProj: the mean gradient projected onto the dual cone of the gradients",
    )
)
