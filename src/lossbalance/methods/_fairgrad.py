"""FairGrad: alpha-fair allocation of the update among the terms, ``G w = w^{-1/a}``.

Also holds the Newton solver of ``G w = w^{-1/a}`` shared with Nash-MTL (a = 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lossbalance._base import GradientBalancer, gramian
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_nonneg, check_positive, warn_once
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

__all__ = ["FairGrad", "fairgrad_weights", "fairgrad_weights_from_gramian"]

# A residual this small where no Newton step improves is rounding, not a failure.
_ROUNDING_TOL = 1e-10
# Iterates this large (with max diag G = 1) mean the fixed point does not exist.
_DIVERGED = 1e14
_MAX_ITER = 200
# (|G| w)_i / (G w)_i above this: the fixed point is determined by rounding only.
_CANCELLATION = 1e8


def _objective(m: Array, w: Array, a: float) -> float:
    # F(w) = 1/2 w^T G w - sum_i h(w_i), h'(w) = w^{-1/a}: strictly convex for w > 0, its
    # gradient G w - w^{-1/a} vanishes exactly at the fixed point.
    if a == 1.0:
        barrier = float(np.log(w).sum())
    else:
        p = 1.0 - 1.0 / a
        barrier = float((w**p).sum()) / p
    return 0.5 * float(w @ m @ w) - barrier


def _residual(m: Array, w: Array, a: float) -> float:
    # |(G w)_i - w_i^{-1/a}| relative to what rounding leaves of (G w)_i: the sum of the
    # magnitudes it is computed from.
    power = w ** (-1.0 / a)
    return float((np.abs(m @ w - power) / (np.abs(m) @ w + power)).max())


def fair_fixed_point(m: Array, a: float) -> tuple[Array, bool]:
    """Solve ``m w = w^{-1/a}``, ``w > 0``, for ``max diag m = 1`` with no zero rows.

    Damped Newton on the strictly convex ``F(w) = w^T m w / 2 - sum_i h(w_i)`` with
    ``h'(w) = w^{-1/a}``: Hessian ``m + diag(w^{-1/a-1} / a)`` (positive definite),
    steps kept inside ``w > 0`` (fraction to the boundary 0.99). A step that halves the
    residual is taken whole (the quadratic phase, where F no longer resolves progress);
    otherwise Armijo backtracking on F. It stops when every ``(m w)_i`` equals
    ``w_i^{-1/a}`` to rounding (relative to ``(|m| w)_i``). Returns ``(w, converged)``;
    not converged means the iterates diverge (no fixed point: the origin is in the convex
    hull of the gradients) or no step improves before rounding level.
    """
    k = m.shape[0]
    tol = 8.0 * k * _EPS
    # Exact for a diagonal m: m_ii w_i = w_i^{-1/a}.
    w = np.diag(m) ** (-a / (a + 1.0))
    residual = _residual(m, w, a)
    for _ in range(_MAX_ITER):
        if residual <= tol:
            return w, True
        if not np.isfinite(w).all() or float(w.max()) > _DIVERGED:
            return w, False
        power = w ** (-1.0 / a)
        grad = m @ w - power
        # For large a a weight can fall to the bottom of the float64 range (the term's
        # gain exceeds the others'); its curvature is then capped rather than infinite.
        with np.errstate(over="ignore"):
            curvature = np.minimum(power / (a * w), 1e300)
        hess = m + np.diag(curvature)
        try:
            step = np.linalg.solve(hess, -grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hess, -grad, rcond=None)[0]
        shrink = step < 0.0
        t = 1.0
        if shrink.any():
            t = min(1.0, 0.99 * float(np.min(-w[shrink] / step[shrink])))
        trial = np.maximum(w + t * step, _TINY)
        trial_residual = _residual(m, trial, a)
        if trial_residual > 0.5 * residual:
            slope = float(grad @ step)
            value = _objective(m, w, a)
            for _ in range(60):
                if _objective(m, trial, a) <= value + 1e-4 * t * slope:
                    break
                t *= 0.5
                trial = np.maximum(w + t * step, _TINY)
            else:
                return w, residual <= _ROUNDING_TOL
            trial_residual = _residual(m, trial, a)
        w, residual = trial, trial_residual
    return w, residual <= tol


def clip_weights(alpha: Array, gram: Tensor, max_norm: float) -> Array:
    """Scale ``alpha`` so that ``||alpha @ J|| = sqrt(alpha^T G alpha) <= max_norm`` (0: off).

    The Gramian is copied to the host only when clipping is on."""
    if max_norm <= 0.0:
        return alpha
    m = gram.detach().to("cpu", torch.float64).numpy()
    norm = math.sqrt(max(float(alpha @ (0.5 * (m + m.T)) @ alpha), 0.0))
    return alpha * (max_norm / norm) if norm > max_norm else alpha


@single_blas_thread
def solve_fair(gram: Tensor, a: float, method: str) -> Array:
    """Weights with ``G w = w^{-1/a}`` on the non-zero gradients (raw scale), 0 elsewhere."""
    m = gramian_to_numpy(gram)
    k = m.shape[0]
    diag = np.diag(m).copy()
    zero = warn_degenerate(method, diag)
    w = np.zeros(k)
    live = np.flatnonzero(~zero)
    if live.size == 0:
        return w
    top = float(diag.max())
    sub = m[np.ix_(live, live)] / top
    sol, converged = fair_fixed_point(sub, a)
    if not np.isfinite(sol).all() or float(sol.max()) > _DIVERGED:
        warn_once(
            f"{method}:no-fixed-point",
            f"{method}: G w = w^(-1/a) has no positive solution (the origin is in the "
            "convex hull of the gradients: a Pareto-stationary point); the update is zero",
            stacklevel=4,
        )
        return w
    # At a fixed point (G w)_i = w_i^{-1/a} > 0; when it is a tiny remainder of much
    # larger terms the origin is nearly in the hull and w is set by rounding.
    cancellation = float(((np.abs(sub) @ sol) / (sol ** (-1.0 / a))).max())
    if not converged or cancellation > _CANCELLATION:
        warn_once(
            f"{method}:ill-posed",
            f"{method}: G w = w^(-1/a) is solved only to rounding (the origin is nearly in "
            "the convex hull of the gradients, or the Gramian is ill-conditioned); the "
            "weights are large and approximate",
            stacklevel=4,
        )
    # G = top * sub, and w = top^{-a/(a+1)} w_sub solves G w = w^{-1/a}.
    w[live] = sol * top ** (-a / (a + 1.0))
    return w


def _check_alpha(alpha: float) -> None:
    check_positive("alpha", alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"Invalid alpha: {alpha} (expected a finite alpha > 0)")


def fairgrad_weights_from_gramian(
    gram: Tensor, alpha: float = 2.0, *, max_norm: float = 0.0
) -> Tensor:
    """FairGrad weights from the K x K Gramian ``J J^T``; see :func:`fairgrad_weights`."""
    check_gramian(gram)
    _check_alpha(alpha)
    check_nonneg("max_norm", max_norm)
    w = solve_fair(gram, float(alpha), "fairgrad")
    return to_weights(clip_weights(w, gram, max_norm), gram)


def fairgrad_weights(matrix: Tensor, alpha: float = 2.0, *, max_norm: float = 0.0) -> Tensor:
    r"""FairGrad weights: the alpha-fair update, ``G w = w^{-1/alpha}``.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Eq. (4) and
    Algorithm 1. The update d = J^T w maximises the alpha-fair utility
    :math:`\sum_i (g_i^T d)^{1-\alpha} / (1-\alpha)` (:math:`\sum_i \log g_i^T d` for
    alpha = 1) over a ball; with ``matrix`` = J (rows g_i) and ``G = J J^T`` its weights
    solve

    .. math::
        G w = w^{-1/\alpha}, \quad w > 0,

    so every term improves, :math:`g_i^T d = w_i^{-1/\alpha} > 0`. alpha = 1 is
    proportional fairness (Nash-MTL's bargaining solution), alpha -> infinity tends to
    max-min fairness. We solve it as the minimiser of the strictly convex
    :math:`\tfrac12 w^T G w - \sum_i h(w_i)`, :math:`h'(w) = w^{-1/\alpha}`, by damped
    Newton to machine precision (see :func:`fair_fixed_point`); G is divided by its
    largest diagonal entry first and the solution rescaled (w scales as
    :math:`s^{-\alpha/(\alpha+1)}` when G is multiplied by s).

    Args:
        matrix: K x P per-term gradients, rows are terms.
        alpha: the fairness parameter > 0 (default 2, the value in the authors' QM9 run
            script).
        max_norm: if > 0, alpha is scaled down so that ``||w @ J|| <= max_norm`` (the
            gradient clipping of the authors' code); 0 (default) disables it.

    Returns:
        w, shape ``(K,)``, float64, positive on the non-zero gradients.

    Degenerate cases warn once and stay finite: a zero gradient gets w_i = 0 (it cannot
    improve); when the origin is in the convex hull of the gradients (a Pareto-stationary
    point, e.g. two opposite gradients) there is no solution and the weights are zero;
    when it is nearly in the hull the weights are large and set by rounding (warned).
    For large alpha (hundreds) the weight of a term whose gain exceeds the others' is
    :math:`\text{gain}^{-\alpha}`, which can fall below the float64 range: the solve then
    warns that the weights are approximate. K = 1 gives
    :math:`w = \|g\|^{-2\alpha/(\alpha+1)}`.

    Example:
        >>> import torch
        >>> from lossbalance.functional import fairgrad_weights
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> w = fairgrad_weights(J, alpha=1.0)  # (G w)_i = 1 / w_i
        >>> w
        tensor([1.0000, 0.5000], dtype=torch.float64)

    Differences from the authors' code: it solves the fixed point with
    ``scipy.optimize.least_squares`` from w = 1/K (to its default tolerances) and clips
    the gradient norm at 1; we solve to rounding and clip only when ``max_norm`` is set.
    """
    check_matrix(matrix)
    return fairgrad_weights_from_gramian(gramian(matrix), alpha, max_norm=max_norm)


class FairGrad(GradientBalancer):
    r"""FairGrad: the alpha-fair update, weights solving ``G w = w^{-1/alpha}``.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Algorithm 1;
    the math is in :func:`fairgrad_weights`. Stateless.

    Args:
        num_terms: K >= 1.
        alpha: fairness parameter > 0 (default 2).
        max_norm: clip ``||sum_i w_i g_i||`` at this value if > 0 (default 0: off).

    Example:
        >>> import torch
        >>> from lossbalance import FairGrad
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> FairGrad(2, alpha=1.0).weights(J @ J.T, torch.ones(2))
        tensor([1.0000, 0.5000], dtype=torch.float64)
    """

    def __init__(self, num_terms: int, alpha: float = 2.0, max_norm: float = 0.0) -> None:
        super().__init__(num_terms)
        _check_alpha(alpha)
        check_nonneg("max_norm", max_norm)
        self.alpha = float(alpha)
        self.max_norm = float(max_norm)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        return self._record(
            fairgrad_weights_from_gramian(gramian, self.alpha, max_norm=self.max_norm)
        )

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, alpha={self.alpha}, max_norm={self.max_norm}"


register(
    MethodInfo(
        name="fairgrad",
        factory=FairGrad,
        needs="gramian",
        stateful=False,
        paper="Ban & Ji, ICML 2024",
        summary="FairGrad: alpha-fair update, weights solving G w = w^(-1/alpha)",
    )
)
