"""MoDo: MGDA weights by projected gradient steps on a double-sampled Gramian."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lossbalance._base import GradientBalancer
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_nonneg, check_positive
from lossbalance.methods._mgda import check_gramian
from lossbalance.methods._vector import project_simplex

__all__ = ["MoDo", "modo_step"]


def modo_step(lam: Tensor, cross: Tensor, gamma: float, rho: float) -> Tensor:
    r"""One MoDo update of lambda: :math:`\Pi_\Delta(\lambda - \gamma (A\lambda + \rho\lambda))`.

    Chen, Fernando, Ying, Chen, "Three-Way Trade-Off in Multi-Objective Learning:
    Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023, Algorithm 1 (Eq.
    2.9a). :math:`A = J_1 J_2^T` from two independent mini-batches (``cross``,
    :func:`lossbalance.cross_gramian`), an unbiased estimate of the Gramian, so this is a
    stochastic projected gradient step on :math:`\tfrac12 \|J^T\lambda\|^2 +
    \tfrac\rho2 \|\lambda\|^2` over the simplex (MGDA's problem for rho = 0).

    Example:
        >>> import torch
        >>> from lossbalance.methods._modo import modo_step
        >>> modo_step(torch.full((2,), 0.5), torch.diag(torch.tensor([1.0, 3.0])), 0.1, 0.0)
        tensor([0.5500, 0.4500])
    """
    if cross.dim() != 2 or cross.shape != (lam.shape[0], lam.shape[0]):
        raise ValueError(
            f"modo_step: expected a {lam.shape[0]} x {lam.shape[0]} matrix, got "
            f"{tuple(cross.shape)}"
        )
    a = cross.to(lam)
    return project_simplex(lam - gamma * (a @ lam + rho * lam))


class MoDo(GradientBalancer):
    r"""MoDo: multi-objective gradient with double sampling.

    Chen et al., "Three-Way Trade-Off in Multi-Objective Learning", NeurIPS 2023 (JMLR
    2024), Algorithm 1; the math is in :func:`modo_step`. Per step::

        A = lossbalance.cross_gramian(losses_1, losses_2, shared)  # 2K backward passes
        balancer.update(A)                                         # lambda_{t+1}
        lossbalance.backward(losses_3, balancer, shared=shared)    # d = J_3^T lambda_{t+1}

    The third batch gives the direction (the paper's Eq. 2.9b; LibMTL and the authors'
    ``three_grads``); passing ``(losses_1 + losses_2) / 2`` there instead is the paper's
    two-batch variant. Without :meth:`update`, :meth:`weights` updates lambda with the
    Gramian of the batch it gets (single sampling: the biased, deterministic counterpart,
    which ``update(G)`` followed by ``weights`` equals). Extra cost of double sampling:
    the forward passes of the extra batches and 2K backward passes (or K + 1 for the
    two-batch variant when batch 3 is the mean).

    State (``state_dict``): ``lam`` (float64, uniform at the start) and ``pending``
    (an update not yet used by ``weights``).

    Args:
        num_terms: K >= 1.
        gamma: the step of lambda, > 0 (default 1e-3, LibMTL's).
        rho: the l2 regularisation rho >= 0 (default 0.1, LibMTL's).

    Example:
        >>> import torch
        >>> from lossbalance.methods._modo import MoDo
        >>> balancer = MoDo(2, gamma=0.1, rho=0.0)
        >>> balancer.weights(torch.diag(torch.tensor([1.0, 3.0])), torch.ones(2))
        tensor([0.5500, 0.4500], dtype=torch.float64)
    """

    lam: Tensor
    pending: Tensor

    def __init__(self, num_terms: int, gamma: float = 1e-3, rho: float = 0.1) -> None:
        super().__init__(num_terms)
        check_positive("gamma", gamma)
        check_nonneg("rho", rho)
        for name, value in (("gamma", gamma), ("rho", rho)):
            if not math.isfinite(value):
                raise ValueError(f"Invalid {name}: {value} (expected a finite number)")
        self.gamma = float(gamma)
        self.rho = float(rho)
        self.register_buffer("lam", torch.full((num_terms,), 1.0 / num_terms, dtype=torch.float64))
        self.register_buffer("pending", torch.zeros((), dtype=torch.bool))

    def update(self, cross: Tensor) -> Tensor:
        """Update lambda with ``A = J_1 J_2^T`` (:func:`lossbalance.cross_gramian`); the
        next :meth:`weights` call returns it instead of updating again. Returns lambda."""
        check_gramian(cross, self.num_terms, type(self).__name__)
        if not bool(torch.isfinite(cross).all()):
            raise ValueError("MoDo.update: the cross Gramian is not finite")
        self.lam.copy_(modo_step(self.lam.double(), cross.detach().double(), self.gamma, self.rho))
        self.pending.fill_(True)
        return self.lam.detach().clone()

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        if not bool(self.pending):
            self.update(gramian)
        self.pending.fill_(False)
        return self._record(self.lam.detach().to(gramian.device, torch.float64).clone())

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, gamma={self.gamma}, rho={self.rho}"


register(
    MethodInfo(
        name="modo",
        factory=MoDo,
        needs="gramian",
        stateful=True,
        paper="Chen et al., NeurIPS 2023",
        summary="MoDo: MGDA weights by projected steps on a double-sampled Gramian",
    )
)
