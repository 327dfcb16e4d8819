"""IMTL: impartial multi-task learning (gradient balance IMTL-G, loss balance IMTL-L, hybrid)."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from lossbalance._base import GradientBalancer, LossBalancer, gramian
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_choice, warn_once
from lossbalance.methods._blas import single_blas_thread
from lossbalance.methods._mgda import (
    _wolfe,
    affine_direction,
    check_gramian,
    check_matrix,
    gramian_to_numpy,
    to_weights,
    warn_degenerate,
)

__all__ = [
    "IMTL",
    "IMTLG",
    "IMTLL",
    "imtl_g_weights",
    "imtl_g_weights_from_gramian",
    "imtl_l_loss",
]

_PAPER = "Liu et al., ICLR 2021"

FALLBACKS = ("none", "least-squares", "min-norm")
# The equal-projection direction sum_i beta_i u_i counts as zero when its norm is below
# this fraction of sum_i |beta_i| (the norm it would have without cancellation).
_ZERO_DIRECTION = 1e-6


def _direction_size(cosines: NDArray[np.float64], beta: NDArray[np.float64]) -> float:
    """``||sum_i beta_i u_i|| / sum_i |beta_i|``: 0 when the terms cancel exactly."""
    total = float(np.abs(beta).sum())
    if total == 0.0:
        return 0.0
    return float(np.sqrt(max(float(beta @ cosines @ beta), 0.0))) / total


def _fallback_direction(cosines: NDArray[np.float64], fallback: str) -> NDArray[np.float64]:
    if fallback == "least-squares":
        # C^+ 1: the projections C beta closest to a common value (1) in least squares
        solution = np.linalg.lstsq(cosines, np.ones(cosines.shape[0]), rcond=None)[0]
        return np.asarray(solution, dtype=np.float64)
    # the min-norm point of the hull of the unit gradients (MGDA on them, exact solver)
    return _wolfe(cosines, 0.0, 10_000)[0]


@single_blas_thread
def _imtl_g(gram: Tensor, method: str, fallback: str = "none") -> tuple[Tensor, bool]:
    """IMTL-G weights and whether their common projection is negative (sum(alpha) = 1
    with ``sum_j beta_j / ||g_j|| < 0``)."""
    m = gramian_to_numpy(gram)
    k = m.shape[0]
    diag = np.diag(m).copy()
    zero = warn_degenerate(method, diag)
    alpha = np.zeros(k)
    live = np.flatnonzero(~zero)
    if live.size == 0:
        # Every gradient is zero: any weights give the same (zero) gradient.
        return to_weights(np.full(k, 1.0 / k), gram), False
    norms = np.sqrt(diag[live])
    cosines = m[np.ix_(live, live)] / np.outer(norms, norms)
    # g = sum_i beta_i u_i has equal projections onto every u_j iff C beta is constant.
    beta, singular = affine_direction(cosines)
    size = _direction_size(cosines, beta)
    if size <= _ZERO_DIRECTION and fallback != "none":
        beta = _fallback_direction(cosines, fallback)
        warn_once(
            f"{method}:fallback-{fallback}",
            f"{method}: the unit gradients are linearly dependent and the only direction "
            "with equal projections on all of them is zero (e.g. [g1, g2, g1 + g2]); "
            f"using the {fallback} direction instead (fallback={fallback!r})",
            stacklevel=4,
        )
        size = _direction_size(cosines, beta)
        if size <= _ZERO_DIRECTION:
            warn_once(
                f"{method}:zero-update",
                f"{method}: the {fallback} fallback direction is zero too (the unit "
                "gradients' hull contains the origin): the shared parameters get no update "
                "from this step",
                stacklevel=4,
            )
    elif size <= _ZERO_DIRECTION:
        warn_once(
            f"{method}:zero-update",
            f"{method}: the unit gradients are linearly dependent (e.g. [g1, g2, g1 + g2]) "
            "and the only direction with equal projections on all of them is zero: the "
            f"shared update is zero to rounding (its norm is {size:.1e} of the sum of its "
            "terms' norms), as the paper's equations give; fallback='least-squares' or "
            "'min-norm' gives a nonzero direction",
            stacklevel=4,
        )
    elif singular:
        warn_once(
            f"{method}:singular",
            f"{method}: the unit gradients are linearly dependent (duplicate or parallel "
            "gradients, or more terms than dimensions); using the least-norm solution, "
            "which shares the weight of duplicates equally",
            stacklevel=4,
        )
    raw = beta / norms
    total = float(raw.sum())
    if abs(total) <= 1e-12 * float(np.abs(raw).sum()):
        warn_once(
            f"{method}:no-normalization",
            f"{method}: the equal-projection direction has weights summing to 0, so "
            "sum(alpha) = 1 has no solution; normalising by sum(|alpha|) instead",
            stacklevel=4,
        )
        total = float(np.abs(raw).sum())
    negative = total < 0.0
    if negative:
        warn_once(
            f"{method}:negative-projection",
            f"{method}: with sum(alpha) = 1 the combined gradient has the same negative "
            "projection on every unit gradient, so a descent step increases every term "
            "to first order (as the paper's formula prescribes)",
            stacklevel=4,
        )
    alpha[live] = raw / total
    return to_weights(alpha, gram), negative


def imtl_g_weights_from_gramian(gram: Tensor, *, fallback: str = "none") -> Tensor:
    """IMTL-G weights from the K x K Gramian ``G G^T``; see :func:`imtl_g_weights`."""
    check_gramian(gram)
    check_choice("fallback", fallback, FALLBACKS)
    return _imtl_g(gram, "imtl-g", fallback)[0]


def imtl_g_weights(matrix: Tensor, *, fallback: str = "none") -> Tensor:
    r"""IMTL-G weights: the combined gradient has equal projections on every unit gradient.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.1 (gradient
    balance).
    With g_i the rows of ``matrix`` (G), u_i = g_i / ||g_i||, D the rows g_1 - g_t and U
    the rows u_1 - u_t (t = 2..K):

    .. math::
        \alpha_{2:K} = g_1 U^T (D U^T)^{-1}, \qquad \alpha_1 = 1 - \sum_{t \ge 2} \alpha_t,

    so that g = sum_i alpha_i g_i satisfies g . u_i = g . u_j for all i, j, and the
    direction of g is unchanged when any g_i is rescaled (the paper's Theorem 2).

    We solve the equivalent symmetric system: with C_ij = u_i . u_j (the cosine matrix),
    g = sum_i beta_i u_i has equal projections iff C beta is constant, so
    beta = C^{-1} 1 and alpha_i = (beta_i / ||g_i||) / sum_j (beta_j / ||g_j||). This is
    the paper's alpha wherever D U^T is invertible, is scale-free by construction, and
    extends to the degenerate cases, which warn once and stay finite: a zero gradient gets
    alpha_i = 0 and the others are balanced among themselves; duplicate or parallel
    gradients (singular C) get the least-norm solution, shared equally between
    duplicates; K = 1 gives alpha = [1]. When ``sum_j beta_j / ||g_j||`` is negative
    (nearly dependent unit gradients with different norms), the paper's normalisation
    makes the common projection negative, so a step along -g increases every term; we
    keep the paper's alpha and warn once.

    The paper's degenerate case: when the unit gradients are linearly dependent and their
    affine hull contains the origin (more terms than the dimension they span, e.g.
    ``[g1, g2, g1 + g2]``: ``D U^T`` is singular), the only g with equal projections is
    g = 0 (every projection is 0), and the least-norm solution gives weights whose
    combined gradient is zero to rounding (such as [1, 1, -1]): the shared parameters get
    no update. That stays the default (the paper's equations) and warns once saying so;
    ``fallback`` chooses a nonzero direction instead, only in that case (when
    ``||sum_i beta_i u_i||`` is below 1e-6 of ``sum_i |beta_i|``):

    - ``"least-squares"``: ``beta = C^+ 1``, the combination whose projections
      ``C beta`` are closest to a common value in least squares (no longer equal; this is
      the paper's solution whenever an exact one exists, so only the degenerate case
      changes);
    - ``"min-norm"``: beta = the min-norm point of the convex hull of the unit gradients
      (MGDA with ``normalization="l2"``, exact solver), whose projection on every u_i is
      at least ``||g||^2 > 0`` unless the origin lies in that hull.

    Either way alpha is then normalised to sum 1 as above, and the choice warns once.

    Args:
        matrix: K x P per-term gradients, rows are terms.
        fallback: ``"none"`` (default, the paper), ``"least-squares"`` or ``"min-norm"``:
            the direction used when the equal-projection direction is zero (see above).

    Returns:
        alpha, shape ``(K,)``, float64, summing to 1.

    Example:
        >>> import torch
        >>> from lossbalance.functional import imtl_g_weights
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
        >>> alpha = imtl_g_weights(G)
        >>> alpha
        tensor([0.8000, 0.2000], dtype=torch.float64)
        >>> alpha.float() @ G  # equal projections on (1, 0) and (0, 1)
        tensor([0.8000, 0.8000])
    """
    check_matrix(matrix)
    return imtl_g_weights_from_gramian(gramian(matrix), fallback=fallback)


def imtl_l_loss(losses: Tensor, s: Tensor) -> Tensor:
    r"""The IMTL-L scaled loss ``sum_i (e^{s_i} L_i - s_i)``.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.2, Eq. (6)
    (with base e).
    Minimising over s gives ``e^{s_i} L_i = 1``: every scaled loss is driven to the same
    value. Needs ``L_i > 0`` (for ``L_i <= 0`` the minimum over s_i does not exist).

    Args:
        losses: the K losses, shape ``(K,)`` (differentiable).
        s: the K log-scales, shape ``(K,)`` (differentiable).

    Returns:
        The scalar ``sum_i (exp(s_i) * L_i - s_i)``.

    Example:
        >>> import torch
        >>> from lossbalance.functional import imtl_l_loss
        >>> imtl_l_loss(torch.tensor([2.0, 0.5]), torch.zeros(2))
        tensor(2.5000)
    """
    return _scaled_losses(losses, s).sum()


def _scaled_losses(losses: Tensor, s: Tensor) -> Tensor:
    if losses.dim() != 1 or s.shape != losses.shape:
        raise ValueError(
            f"expected losses and s of the same shape (K,), "
            f"got {tuple(losses.shape)} and {tuple(s.shape)}"
        )
    return torch.exp(s) * losses - s


def _warn_nonpositive(losses: Tensor, method: str, key: str) -> None:
    if bool((losses.detach() <= 0).any()):
        warn_once(
            key,
            f"{method}: a loss is <= 0, where e^s L - s has no minimum in s "
            "(the scale grows without bound); IMTL-L needs positive losses",
            stacklevel=4,
        )


class IMTLG(GradientBalancer):
    r"""IMTL-G: gradient weights giving equal projections on every unit task gradient.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.1; the math
    is in :func:`imtl_g_weights`. Stateless.

    Args:
        num_terms: K >= 1.
        fallback: ``"none"`` (default, the paper: a zero shared update when the unit
            gradients are dependent with the origin in their affine hull, warned once),
            ``"least-squares"`` or ``"min-norm"``; see :func:`imtl_g_weights`.

    Example:
        >>> import torch
        >>> from lossbalance import IMTLG
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> IMTLG(2).weights(G @ G.T, torch.ones(2))
        tensor([0.8000, 0.2000], dtype=torch.float64)

    Differences from the paper: the paper differentiates with respect to the shared
    features z rather than the shared parameters to save time; that is the engine's
    feature mode (the Gramian of the feature gradients). ``fallback`` is ours: the paper
    does not treat linearly dependent gradients, where its equations give a zero update.

    Attributes:
        negative_projection_steps: how many calls of :meth:`weights` since construction
            met the case where the paper's ``sum(alpha) = 1`` makes the common projection
            negative (a step then increases every term to first order; see
            :func:`imtl_g_weights`). A diagnostic, not optimisation state: it is not in
            ``state_dict`` and only the first occurrence in a process warns.
    """

    def __init__(self, num_terms: int, fallback: str = "none") -> None:
        super().__init__(num_terms)
        check_choice("fallback", fallback, FALLBACKS)
        self.fallback = fallback
        self.negative_projection_steps = 0

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        alpha, negative = _imtl_g(gramian, "imtl-g", self.fallback)
        self.negative_projection_steps += int(negative)
        return self._record(alpha)

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, fallback={self.fallback!r}"


class IMTLL(LossBalancer):
    r"""IMTL-L: learnable log-scales s with the scaled loss ``e^{s_i} L_i - s_i``.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Sec. 3.2, Eq. (6)
    (with base e):

    .. math::
        L = \sum_i \left(e^{s_i} L_i - s_i\right), \qquad
        \partial L / \partial s_i = 0 \iff e^{s_i} L_i = 1,

    so minimising over ``s`` (``self.log_scales``, init 0, trained by the user's optimizer
    together with the model) scales every loss to 1. ``last_weights`` are ``e^{s}``.

    Args:
        num_terms: K >= 1.

    Example:
        >>> import torch
        >>> from lossbalance import IMTLL
        >>> balancer = IMTLL(2)
        >>> balancer(torch.tensor([2.0, 0.5]))
        tensor(2.5000, grad_fn=<SumBackward0>)
        >>> balancer.last_weights
        tensor([1., 1.])

    Losses must be positive; a loss <= 0 warns once (its s_i would grow without bound).
    """

    def __init__(self, num_terms: int) -> None:
        super().__init__(num_terms)
        self.log_scales = nn.Parameter(torch.zeros(num_terms))

    def forward(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        _warn_nonpositive(losses, "imtl-l", self._warning_key("imtl-l:nonpositive-loss"))
        s = self.log_scales
        self._record(torch.exp(s.detach()))
        return _scaled_losses(losses, s.to(losses.dtype)).sum()


class IMTL(GradientBalancer):
    r"""Hybrid IMTL: IMTL-L scales the losses, IMTL-G balances their gradients.

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021, Algorithm 1.
    ``transform(losses)`` returns the scaled losses ``e^{s_i} L_i - s_i`` (differentiable
    in ``s = self.log_scales`` and in the model); ``weights(gramian, losses)`` applies
    IMTL-G (:func:`imtl_g_weights`) to the Gramian of their gradients. The engine then
    writes ``sum_i alpha_i grad(e^{s_i} L_i)`` into the shared parameters, and the
    gradient of ``sum_i (e^{s_i} L_i - s_i)`` into the task-specific parameters and s.
    Pass ``balancer.parameters()`` to the optimizer: without them s stays 0 and this is
    IMTL-G (``lossbalance.backward`` warns once when s does not change between two calls
    while the model does and its ``.grad`` keeps growing).

    Args:
        num_terms: K >= 1.
        fallback: as for :class:`IMTLG` (default ``"none"``, the paper).

    Example:
        >>> import torch
        >>> from lossbalance import IMTL
        >>> balancer = IMTL(2)
        >>> balancer.transform(torch.tensor([2.0, 0.5]))
        tensor([2.0000, 0.5000], grad_fn=<SubBackward0>)
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> balancer.weights(G @ G.T, torch.tensor([2.0, 0.5]))
        tensor([0.8000, 0.2000], dtype=torch.float64)

    Differences from the paper: as for :class:`IMTLG`, the paper uses the gradients with
    respect to the shared features (the engine's feature mode).

    Attributes:
        negative_projection_steps: as :attr:`IMTLG.negative_projection_steps` (not in
            ``state_dict``, which holds ``log_scales``).
    """

    def __init__(self, num_terms: int, fallback: str = "none") -> None:
        super().__init__(num_terms)
        check_choice("fallback", fallback, FALLBACKS)
        self.fallback = fallback
        self.log_scales = nn.Parameter(torch.zeros(num_terms))
        self.negative_projection_steps = 0

    def transform(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        _warn_nonpositive(losses, "imtl", self._warning_key("imtl:nonpositive-loss"))
        return _scaled_losses(losses, self.log_scales.to(losses.dtype))

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        alpha, negative = _imtl_g(gramian, "imtl", self.fallback)
        self.negative_projection_steps += int(negative)
        return self._record(alpha)

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, fallback={self.fallback!r}"


register(
    MethodInfo(
        name="imtl-g",
        factory=IMTLG,
        needs="gramian",
        stateful=False,
        paper=_PAPER,
        summary="IMTL-G: equal projections of the update on every unit task gradient",
    )
)
register(
    MethodInfo(
        name="imtl-l",
        factory=IMTLL,
        needs="losses",
        stateful=True,
        paper=_PAPER,
        summary="IMTL-L: learnable log-scales s with scaled losses e^s L - s",
    )
)
register(
    MethodInfo(
        name="imtl",
        factory=IMTL,
        needs="gramian",
        stateful=True,
        paper=_PAPER,
        summary="hybrid IMTL: IMTL-L scaled losses balanced by IMTL-G",
    )
)
