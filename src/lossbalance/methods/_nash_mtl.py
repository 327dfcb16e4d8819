"""Nash-MTL: the Nash bargaining solution among the terms, ``G alpha = 1 / alpha``."""

from __future__ import annotations

import torch
from torch import Tensor

from lossbalance._base import GradientBalancer, gramian
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_nonneg
from lossbalance.methods._fairgrad import clip_weights, solve_fair
from lossbalance.methods._mgda import check_gramian, check_matrix, to_weights

__all__ = ["NashMTL", "nash_mtl_weights", "nash_mtl_weights_from_gramian"]


def nash_mtl_weights_from_gramian(gram: Tensor, *, max_norm: float = 0.0) -> Tensor:
    """Nash-MTL weights from the K x K Gramian ``J J^T``; see :func:`nash_mtl_weights`."""
    check_gramian(gram)
    check_nonneg("max_norm", max_norm)
    alpha = solve_fair(gram, 1.0, "nash-mtl")
    return to_weights(clip_weights(alpha, gram, max_norm), gram)


def nash_mtl_weights(matrix: Tensor, *, max_norm: float = 0.0) -> Tensor:
    r"""Nash-MTL weights: the Nash bargaining solution, ``G alpha = 1 / alpha``.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as
    a Bargaining Game", ICML 2022, Algorithm 1. The update
    d = J^T alpha (``matrix`` = J, rows g_i, ``G = J J^T``) maximises
    :math:`\sum_i \log(g_i^T d)` over a ball; its weights solve

    .. math::
        G \alpha = 1 / \alpha, \quad \alpha > 0,

    so :math:`g_i^T d = 1/\alpha_i > 0` (every term improves) and
    :math:`\|d\|^2 = \alpha^T G \alpha = K`. The solution is unique: it is the minimiser
    of the strictly convex :math:`\tfrac12 \alpha^T G \alpha - \sum_i \log \alpha_i`,
    found by damped Newton to machine precision (FairGrad with alpha = 1, see
    :func:`lossbalance.functional.fairgrad_weights`). Multiplying G by s divides alpha by
    :math:`\sqrt s`.

    Args:
        matrix: K x P per-term gradients, rows are terms.
        max_norm: if > 0, alpha is scaled down so that ``||alpha @ J|| <= max_norm`` (the
            authors' gradient clipping, 1.0 in their code); 0 (default) disables it.

    Returns:
        alpha, shape ``(K,)``, float64.

    Degenerate cases warn once and stay finite: a zero gradient gets alpha_i = 0; when the
    origin is in the convex hull of the gradients (Pareto stationary) there is no
    solution and alpha = 0. K = 1 gives alpha = 1 / ||g||.

    Example:
        >>> import torch
        >>> from lossbalance.functional import nash_mtl_weights
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> nash_mtl_weights(J)
        tensor([1.0000, 0.5000], dtype=torch.float64)

    Differences from the paper / the authors' code: both approximate the solution by a
    sequence of convex problems (the concave part of their objective linearised, each
    problem solved with cvxpy/ECOS, at most 20 of them, stopping at
    ``||G alpha - 1/alpha|| < 1e-3``). The fixed point they approximate is the unique
    minimiser above, which Newton's method reaches to rounding in a few steps, so we
    solve that instead of running the sequence.
    """
    check_matrix(matrix)
    return nash_mtl_weights_from_gramian(gramian(matrix), max_norm=max_norm)


class NashMTL(GradientBalancer):
    r"""Nash-MTL: the Nash bargaining solution ``G alpha = 1 / alpha`` among the terms.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Algorithm 1; the
    math is in :func:`nash_mtl_weights`. The weights are recomputed every
    ``update_weights_every`` calls and reused in between (Algorithm 1's cheaper
    variant); state (``state_dict``): the last solved weights ``alpha`` and the call
    counter ``step``.

    Args:
        num_terms: K >= 1.
        update_weights_every: solve every this many calls, an integer >= 1 (default 1).
        max_norm: clip ``||sum_i alpha_i g_i||`` at this value if > 0, applied at every
            call to the current Gramian (default 0: off; the authors' code used 1.0).

    Example:
        >>> import torch
        >>> from lossbalance import NashMTL
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> NashMTL(2).weights(J @ J.T, torch.ones(2))
        tensor([1.0000, 0.5000], dtype=torch.float64)

    Differences from the authors' code: see :func:`nash_mtl_weights` (solved to rounding
    rather than by up to 20 convex subproblems). Their code also scaled the heads'
    gradients by alpha (the loss was ``sum_i alpha_i L_i``); as the paper, each head gets
    its own term's gradient here.
    """

    alpha: Tensor
    step: Tensor

    def __init__(
        self, num_terms: int, update_weights_every: int = 1, max_norm: float = 0.0
    ) -> None:
        super().__init__(num_terms)
        every = update_weights_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid update_weights_every: {every!r} (expected an integer >= 1)")
        check_nonneg("max_norm", max_norm)
        self.update_weights_every = every
        self.max_norm = float(max_norm)
        self.register_buffer("alpha", torch.ones(num_terms, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        if int(self.step) % self.update_weights_every == 0:
            solved = solve_fair(gramian, 1.0, "nash-mtl")
            self.alpha.copy_(torch.from_numpy(solved))
        else:
            # The buffer follows the module's dtype (``.to(dtype)``); solved weights are
            # used at full precision on the step that solves them.
            solved = self.alpha.detach().to("cpu", torch.float64).numpy().copy()
        self.step += 1
        alpha = clip_weights(solved, gramian, self.max_norm)
        return self._record(to_weights(alpha, gramian))

    def extra_repr(self) -> str:
        return (
            f"num_terms={self.num_terms}, update_weights_every={self.update_weights_every}, "
            f"max_norm={self.max_norm}"
        )


register(
    MethodInfo(
        name="nash-mtl",
        factory=NashMTL,
        needs="gramian",
        stateful=True,
        paper="Navon et al., ICML 2022",
        summary="Nash-MTL: Nash bargaining solution G alpha = 1 / alpha among the terms",
    )
)
