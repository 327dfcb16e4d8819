"""MetaBalance (He et al., WWW 2022): auxiliary gradients scaled to the target's, per layer.

Not a Gramian weighting: the coefficients differ from one parameter tensor to the next, so
the shared parameters do not receive one combination ``sum_i alpha_i g_i``. It needs the
per-term gradients of every shared tensor, as MTAdam does: a
:class:`~lossbalance.VectorBalancer`, whose ``combine`` returns one combination per tensor.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_beta, warn_once
from lossbalance.engine._graph import combine_stack
from lossbalance.methods._vector import VectorBalancer


def metabalance_coefficients(
    norms: Tensor, ema: Tensor, relax_factor: float = 0.7, beta: float = 0.9
) -> tuple[Tensor, Tensor]:
    """The per-(term, tensor) coefficients of MetaBalance and the updated norm averages.

    ``m_ip <- beta m_ip + (1 - beta) ||g_ip||`` and
    ``c_ip = r m_0p / m_ip + (1 - r)`` (term 0 is the target: ``c_0p = 1``); where
    ``m_ip = 0`` (term i has had no gradient in tensor p) ``c_ip = 1``.

    Args:
        norms: the K x T norms ``||g_ip||`` of this step (term i, tensor p).
        ema: m, the K x T moving averages before this step.
        relax_factor: r in [0, 1].
        beta: the moving average's decay in [0, 1).

    Returns:
        ``(coefficients, new_ema)``, both K x T float64.
    """
    m = ema.to(torch.float64) * beta + (1.0 - beta) * norms.to(torch.float64)
    ratio = torch.where(m > 0, m[:1] / torch.where(m > 0, m, torch.ones_like(m)), 1.0)
    coefficients = relax_factor * ratio + (1.0 - relax_factor)
    coefficients = torch.where(m > 0, coefficients, torch.ones_like(coefficients))
    coefficients[0] = 1.0
    return coefficients, m


class MetaBalance(VectorBalancer):
    """MetaBalance: each auxiliary gradient pulled toward the target's magnitude, per layer.

    He, Feng, Cheng, Zhang, Zhao, Xu & Lu, "MetaBalance: Improving Multi-Task
    Recommendations via Adapting Gradient Magnitudes of Auxiliary Tasks", WWW 2022
    (arXiv 2203.06801), Algorithm 1. Term 0 is the target, terms 1..K-1 auxiliary; for
    every shared parameter tensor p, with g_ip = dL_i/dp::

        m_ip  <- beta m_ip + (1 - beta) ||g_ip||
        g_ip  <- r (m_0p / m_ip) g_ip + (1 - r) g_ip         (i >= 1)
        p.grad += sum_i g_ip

    r is ``relax_factor`` (r = 1: every auxiliary gradient gets the target's average
    magnitude in each layer; r = 0: the plain sum). Parameters outside ``shared``
    (heads) receive the plain sum of their terms' gradients.

    **Why a VectorBalancer.** The coefficients c_ip differ per tensor, so the shared
    parameters do not receive one combination ``sum_i alpha_i g_i`` of the per-term
    gradients, and the norms per tensor are not in the Gramian of the whole model.
    ``lossbalance.backward(losses, balancer, shared)`` (modes ``"exact"``/``"batched"``,
    also under :class:`lossbalance.Accumulator` and ``torch.distributed``) hands
    :meth:`combine` the per-term stacks of every shared tensor; follow it with any
    optimizer's ``step()`` (the paper uses Adam).

    State (buffers, float64): ``norm_avg`` (m, K x T; sized at the first call, T = the
    number of shared tensors that require grad, in the order given).
    ``last_coefficients``: the K x T coefficients of the last call; ``last_weights``:
    their mean over the tensors.

    Args:
        num_terms: K >= 1 (term 0 is the target).
        relax_factor: r, 0 <= r <= 1 (default 0.7, the authors' default).
        beta: the moving average's decay, 0 <= beta < 1 (default 0.9, the authors').

    Example:
        >>> import torch, lossbalance
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> balancer = lossbalance.MetaBalance(2, relax_factor=1.0, beta=0.0)
        >>> _ = lossbalance.backward([w.pow(2).sum(), 100 * w.sum()], balancer, [w])
        >>> w.grad  # 2w + 100 (1, 1) rescaled to the norm of 2w, sqrt(20)
        tensor([5.1623, 7.1623])

    Differences from the paper / the authors' code:
        - The authors' code adapts every tensor in the optimizer, heads included (an
          auxiliary head, which the target does not reach, gets ``1 - r`` times its
          gradient); here only the ``shared`` tensors are balanced, as in the paper.
        - The authors' code runs K backward passes writing ``.grad``; here the engine
          computes the stacks (any of its modes, same numbers).
        - r = 1 is allowed (the authors' check stops at r < 1).
        - Only the paper's "adapt both" strategy (larger and smaller auxiliary
          magnitudes alike) is implemented, as in the authors' code.
    """

    norm_avg: Tensor

    lazy_buffers: ClassVar[dict[str, int]] = {"norm_avg": 1}

    def __init__(self, num_terms: int, relax_factor: float = 0.7, beta: float = 0.9) -> None:
        super().__init__(num_terms)
        if not 0.0 <= relax_factor <= 1.0 or not math.isfinite(relax_factor):
            raise ValueError(
                f"Invalid relax_factor: {relax_factor} (expected 0 <= relax_factor <= 1)"
            )
        check_beta("beta", beta)
        self.relax_factor = float(relax_factor)
        self.beta = float(beta)
        self.last_coefficients: Tensor | None = None
        self.register_buffer("norm_avg", torch.zeros(num_terms, 0, dtype=torch.float64))
        if num_terms == 1:
            warn_once(
                "metabalance-one-term",
                "MetaBalance with num_terms=1 has nothing to balance: the target's gradient",
            )

    def combine(
        self,
        grads: list[Tensor],
        losses: Tensor,
        *,
        inputs: list[Tensor],
        features: bool,
    ) -> tuple[list[Tensor], Tensor]:
        """``(sum_i c_ip g_ip per tensor p, mean_p c_ip)``; updates m."""
        self._check_terms(losses)
        k = self.num_terms
        device = self.norm_avg.device
        norms = torch.stack(
            [g.detach().reshape(k, -1).to(device, torch.float64).norm(dim=1) for g in grads], 1
        )
        self._sized("norm_avg", norms.shape, norms, "per-tensor norms")
        coefficients, ema = metabalance_coefficients(
            norms, self.norm_avg, self.relax_factor, self.beta
        )
        self.norm_avg.copy_(ema)
        self.last_coefficients = coefficients.clone()
        out = [combine_stack(coefficients[:, j], g) for j, g in enumerate(grads)]
        return out, self._record(coefficients.mean(1))

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, relax_factor={self.relax_factor}, beta={self.beta}"


register(
    MethodInfo(
        name="metabalance",
        factory=MetaBalance,
        needs="grads",
        stateful=True,
        paper="He et al., WWW 2022",
        summary="auxiliary gradients scaled per layer toward the target term's magnitude",
    )
)
