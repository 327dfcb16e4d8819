"""CAGrad: conflict-averse gradient descent, the best worst-case update near the mean."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from lossbalance._base import GradientBalancer, gramian
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_choice, check_nonneg, warn_once
from lossbalance.methods._blas import single_blas_thread
from lossbalance.methods._mgda import (
    _EXACT_TOL,
    _TINY,
    Array,
    _wolfe,
    check_gramian,
    check_matrix,
    gramian_to_numpy,
    to_weights,
    warn_degenerate,
)

__all__ = ["CAGrad", "cagrad_weights", "cagrad_weights_from_gramian"]

RESCALES = ("none", "1+c^2", "1+c")
_BISECTIONS = 200
_WOLFE_ITER = 10_000


def _shifted_min_norm(m: Array, b: Array, g0_sq: float, t: float) -> Array:
    """Simplex weights of the min-norm point of conv{g_i + t g0} (Wolfe, exact)."""
    k = m.shape[0]
    ones = np.ones(k)
    shifted = m + t * (np.outer(b, ones) + np.outer(ones, b)) + t * t * g0_sq
    shifted = 0.5 * (shifted + shifted.T)
    top = float(np.diag(shifted).max())
    if top <= _TINY:
        return np.full(k, 1.0 / k)
    w, _ = _wolfe(shifted / top, _EXACT_TOL, _WOLFE_ITER)
    return w


def _polish(m: Array, b: Array, rho: float, w: Array, s_hint: float) -> Array | None:
    """The exact v = w / t on the support of ``w``, or ``None`` if it is not optimal there.

    On the support S the optimality conditions are linear in (v_S, mu) for a given
    s = sum(v): ``m_SS v_S - mu 1 = -b_S``, ``1^T v_S = s``, so (v, mu) = p + s q, and the
    radius condition ``v^T m v = rho^2`` is a quadratic in s.
    """
    k = m.shape[0]
    support = np.flatnonzero(w > 0.0)
    n = support.size
    system = np.zeros((n + 1, n + 1))
    system[:n, :n] = m[np.ix_(support, support)]
    system[:n, n] = -1.0
    system[n, :n] = 1.0
    rhs = np.zeros((n + 1, 2))
    rhs[:n, 0] = -b[support]
    rhs[n, 1] = 1.0
    sol = np.linalg.lstsq(system, rhs, rcond=None)[0]
    p, q = sol[:n, 0], sol[:n, 1]
    m_ss = m[np.ix_(support, support)]
    qa, qb, qc = float(q @ m_ss @ q), float(p @ m_ss @ q), float(p @ m_ss @ p) - rho * rho
    if qa <= 0.0:
        return None
    disc = qb * qb - qa * qc
    if disc < 0.0:
        return None
    roots = [(-qb + sign * math.sqrt(disc)) / qa for sign in (1.0, -1.0)]
    roots = [r for r in roots if r > 0.0]
    if not roots:
        return None
    s = min(roots, key=lambda r: abs(r - s_hint))
    v = np.zeros(k)
    v[support] = p + s * q
    mu = float(sol[n, 0] + s * sol[n, 1])
    scale = max(1.0, float(np.abs(v).sum()))
    tol = 1e-10 * scale
    if (v[support] < -tol).any():
        return None
    gains = m @ v + b  # (J d)_i with d = g0 + J^T v
    if (gains < mu - tol).any():
        return None
    return np.maximum(v, 0.0)


@single_blas_thread
def _cagrad(gram: Tensor, c: float, rescale: str, method: str) -> Tensor:
    m = gramian_to_numpy(gram)
    k = m.shape[0]
    warn_degenerate(method, np.diag(m).copy())
    u = np.full(k, 1.0 / k)
    divisor = {"none": 1.0, "1+c^2": 1.0 + c * c, "1+c": 1.0 + c}[rescale]
    top = float(np.diag(m).max())
    if top <= _TINY:
        return to_weights(u / divisor, gram)
    m = m / top
    b = m @ u  # (J g0)_i
    g0_sq = float(u @ b)
    if c == 0.0 or g0_sq <= 1e-30:
        if c > 0.0:
            warn_once(
                f"{method}:zero-mean",
                f"{method}: the mean gradient is zero, so the ball around it is a point "
                "and the update is zero",
                stacklevel=4,
            )
        return to_weights(u / divisor, gram)
    rho = c * math.sqrt(g0_sq)

    def excess(t: float) -> tuple[float, Array]:
        w = _shifted_min_norm(m, b, g0_sq, t)
        return math.sqrt(max(float(w @ m @ w), 0.0)) - rho * t, w

    # ||g_w|| <= 1 (max diag 1), so t = 2 / rho has a negative excess; the excess changes
    # sign once (the dual is convex in the radius parameter).
    t_hi = 2.0 / rho
    t_lo = t_hi
    for _ in range(60):
        t_lo *= 0.5
        value, w_lo = excess(t_lo)
        if value > 0.0:
            break
    else:
        warn_once(
            f"{method}:stationary",
            f"{method}: the dual minimiser has g_w = 0 (the origin is in the convex hull of "
            "the gradients and no update in the ball gains on every term); using the mean "
            "gradient",
            stacklevel=4,
        )
        return to_weights(u / divisor, gram)
    w = w_lo
    t = t_lo
    previous: np.ndarray | None = None
    for _ in range(_BISECTIONS):
        t = math.sqrt(t_lo * t_hi)
        value, w = excess(t)
        support = w > 0.0
        if previous is not None and np.array_equal(support, previous):
            v = _polish(m, b, rho, w, 1.0 / t)
            if v is not None:
                return to_weights((u + v) / divisor, gram)
        previous = support
        if value > 0.0:
            t_lo = t
        else:
            t_hi = t
        if t_hi / t_lo - 1.0 <= 1e-15:
            break
    warn_once(
        f"{method}:approximate",
        f"{method}: the dual's support could not be confirmed exactly (nearly degenerate "
        "gradients); using the bisection's solution",
        stacklevel=4,
    )
    norm = math.sqrt(max(float(w @ m @ w), _TINY))
    return to_weights((u + (rho / norm) * w) / divisor, gram)


def _check_args(c: float, rescale: str) -> None:
    check_nonneg("c", c)
    if not math.isfinite(c):
        raise ValueError(f"Invalid c: {c} (expected a finite c >= 0)")
    check_choice("rescale", rescale, RESCALES)


def cagrad_weights_from_gramian(gram: Tensor, c: float = 0.4, *, rescale: str = "none") -> Tensor:
    """CAGrad weights from the K x K Gramian ``J J^T``; see :func:`cagrad_weights`."""
    check_gramian(gram)
    _check_args(c, rescale)
    return _cagrad(gram, float(c), rescale, "cagrad")


def cagrad_weights(matrix: Tensor, c: float = 0.4, *, rescale: str = "none") -> Tensor:
    r"""CAGrad weights: the update in a ball around the mean gradient that best helps the
    worst-off term.

    Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task
    Learning", NeurIPS 2021, Algorithm 1. With ``matrix`` = J (rows g_i),
    ``G = J J^T``, the mean :math:`g_0 = \frac1K \sum_i g_i` and
    :math:`\rho = c \|g_0\|`:

    .. math::
        d = \arg\max_{\|d - g_0\| \le \rho} \min_i g_i^T d
          = g_0 + \frac{\rho}{\|g_w\|} g_w, \qquad
        w = \arg\min_{w \in \Delta} g_w^T g_0 + \rho \|g_w\|, \quad g_w = J^T w,

    so ``alpha = 1/K + (rho / ||g_w||) w``. c = 0 is the mean gradient; large c tends to
    MGDA's direction. At the optimum the worst-case gain :math:`\min_i g_i^T d` equals the
    dual value and is attained on the support of w.

    The dual is solved exactly, not approximately: for t > 0 the minimiser over the
    simplex of :math:`\|g_w + t g_0\|^2` (the min-norm point of conv{g_i + t g_0},
    Wolfe's exact algorithm) is the dual minimiser when :math:`\|g_w\| = \rho t`; t is
    bracketed by bisection (that excess changes sign once) until the support is stable,
    then the optimality conditions on the support, linear in ``v = w / t`` up to one
    quadratic equation, are solved in closed form and checked. The weights do not depend
    on the overall scale of J.

    Args:
        matrix: K x P per-term gradients, rows are terms.
        c: radius of the ball relative to ``||g_0||``, c >= 0 (default 0.4; LibMTL's
            default is 0.5).
        rescale: ``"none"`` (default, the paper's update), ``"1+c^2"`` (divide d by
            1 + c^2: ``rescale=1`` of the authors' code, LibMTL's default) or ``"1+c"``
            (``rescale=2``).

    Returns:
        alpha, shape ``(K,)``, float64.

    Degenerate cases warn once and stay finite: a zero mean gradient gives d = 0; when
    the dual minimiser has g_w = 0 (the origin in the convex hull of the gradients,
    where d is not determined by w) d is the mean gradient. K = 1 gives alpha = 1 + c.

    Example:
        >>> import torch
        >>> from lossbalance.functional import cagrad_weights
        >>> J = torch.tensor([[1.0, 0.0], [-0.5, 1.0]])
        >>> alpha = cagrad_weights(J, c=0.4)
        >>> gains = J @ (alpha.float() @ J)  # the worst-off term gains most
        >>> bool(gains.min() >= (J.mean(0) @ J.T).min())
        True

    Differences from the authors' code: it minimised the dual with
    ``scipy.optimize.minimize`` from w = 1/K (SLSQP, to its default tolerance; LibMTL
    does the same) and added 1e-8 to norms; we solve it to rounding.
    """
    check_matrix(matrix)
    return cagrad_weights_from_gramian(gramian(matrix), c, rescale=rescale)


class CAGrad(GradientBalancer):
    r"""CAGrad: the update near the mean gradient that maximises the worst term's gain.

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
    Algorithm 1; the math is in :func:`cagrad_weights`. Stateless.

    Args:
        num_terms: K >= 1.
        c: ball radius relative to the mean gradient's norm, c >= 0 (default 0.4).
        rescale: ``"none"`` (default, the paper), ``"1+c^2"`` (the authors' code) or
            ``"1+c"``.

    Example:
        >>> import torch
        >>> from lossbalance import CAGrad
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> CAGrad(2, c=0.5).weights(J @ J.T, torch.ones(2))
        tensor([0.7500, 0.7500], dtype=torch.float64)
    """

    def __init__(self, num_terms: int, c: float = 0.4, rescale: str = "none") -> None:
        super().__init__(num_terms)
        _check_args(c, rescale)
        self.c = float(c)
        self.rescale = rescale

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        return self._record(_cagrad(gramian, self.c, self.rescale, "cagrad"))

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, c={self.c}, rescale={self.rescale!r}"


register(
    MethodInfo(
        name="cagrad",
        factory=CAGrad,
        needs="gramian",
        stateful=False,
        paper="Liu et al., NeurIPS 2021",
        summary="CAGrad: best worst-term gain in a ball of radius c ||g0|| around the mean",
    )
)
