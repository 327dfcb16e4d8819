"""MoCo: tracked per-term gradients y_i and simplex weights lambda on their Gramian."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_nonneg, check_positive
from lossbalance.methods._vector import VectorBalancer, flat_stack, project_simplex, split_flat

__all__ = ["MoCo", "moco_step"]


def moco_step(
    y: Tensor, lam: Tensor, grads: Tensor, beta_t: float, gamma_t: float, rho: float
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One MoCo step on the K x P per-term gradients.

    Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023, Algorithm 1:

    .. math::
        y_i \leftarrow y_i - \beta_t (y_i - g_i), \qquad
        \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma_t (Y Y^T + \rho I)\lambda\big),
        \qquad d = Y^T \lambda

    with Y the K x P matrix of the y_i (``y``), :math:`\Pi_\Delta` the Euclidean
    projection onto the simplex and d the update direction of the shared parameters.

    Args:
        y: the tracked gradients, K x P.
        lam: lambda, (K,) on the simplex.
        grads: this step's stochastic gradients g_i, K x P.
        beta_t, gamma_t: this step's sizes (in (0, 1] and > 0).
        rho: the regularisation rho >= 0.

    Returns:
        ``(direction, new_y, new_lambda)``; lambda and the Gramian in float64.

    Example:
        >>> import torch
        >>> from lossbalance.methods._moco import moco_step
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> d, y, lam = moco_step(torch.zeros(2, 2), torch.full((2,), 0.5), g, 1.0, 0.1, 0.0)
        >>> lam
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    if y.shape != grads.shape or grads.dim() != 2 or lam.shape != (grads.shape[0],):
        raise ValueError(
            f"moco_step: y {tuple(y.shape)}, grads {tuple(grads.shape)} and lambda "
            f"{tuple(lam.shape)} must be K x P, K x P and (K,)"
        )
    new_y = y - beta_t * (y - grads)
    yy = new_y.double()
    gram = yy @ yy.T
    lam64 = lam.double()
    new_lam = project_simplex(lam64 - gamma_t * (gram @ lam64 + rho * lam64))
    return new_lam.to(new_y) @ new_y, new_y, new_lam


class MoCo(VectorBalancer):
    r"""MoCo: MGDA on tracked gradients, with stochastic-gradient bias corrected.

    Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning: A Provably
    Convergent Approach", ICLR 2023, Algorithm 1; the math is in :func:`moco_step`. The
    step sizes decay as :math:`\beta_t = \beta / t^{\sigma_\beta}`,
    :math:`\gamma_t = \gamma / t^{\sigma_\gamma}` at step t (LibMTL's schedule). The
    shared parameters receive :math:`d = \sum_i \lambda_i y_i`, not a combination of this
    step's gradients: it needs the per-term gradients (modes ``"exact"``/``"batched"``).

    State (``state_dict``): ``y`` (K x P, P = the shared elements in the order of
    ``shared``, sized at the first call, in the gradients' dtype), ``lam`` (float64,
    uniform at the start) and ``step``.

    Args:
        num_terms: K >= 1.
        beta: :math:`\beta` in (0, 1] (default 0.5), beta_sigma: >= 0 (default 0.5).
        gamma: :math:`\gamma > 0` (default 0.1), gamma_sigma: >= 0 (default 0.5).
        rho: the regularisation of lambda's update, >= 0 (default 0).
        (The defaults are LibMTL's.)

    ``last_weights`` is lambda, the weights of the tracked gradients y_i.

    Example:
        >>> import torch
        >>> from lossbalance.methods._moco import MoCo
        >>> balancer = MoCo(2)
        >>> stacks = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])]
        >>> (d,), lam = balancer.combine(stacks, torch.ones(2), inputs=[torch.zeros(2)],
        ...                             features=False)
        >>> d  # y = 0.5 g at step 1, lambda moved toward the smaller gradient
        tensor([0.2594, 0.4812])

    Differences from the paper / LibMTL: the paper's projection of y_i onto a ball of
    radius L_i (a bound on the gradients, unknown in practice) is left out, as in LibMTL.
    LibMTL replaces the projection onto the simplex by a softmax and feeds the update with
    :math:`g_i / \|g_i\| \cdot L_i` (the authors' shared code); we follow Algorithm 1.
    """

    y: Tensor
    lam: Tensor
    step: Tensor

    lazy_buffers: ClassVar[dict[str, int]] = {"y": 1}

    def __init__(
        self,
        num_terms: int,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
    ) -> None:
        super().__init__(num_terms)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"Invalid beta: {beta} (expected 0 < beta <= 1)")
        check_positive("gamma", gamma)
        for name, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            check_nonneg(name, value)
        for name, value in (
            ("gamma", gamma),
            ("beta_sigma", beta_sigma),
            ("gamma_sigma", gamma_sigma),
            ("rho", rho),
        ):
            if not math.isfinite(value):
                raise ValueError(f"Invalid {name}: {value} (expected a finite number)")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.gamma = float(gamma)
        self.gamma_sigma = float(gamma_sigma)
        self.rho = float(rho)
        self.register_buffer("y", torch.zeros(num_terms, 0))
        self.register_buffer("lam", torch.full((num_terms,), 1.0 / num_terms, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def combine(
        self,
        grads: list[Tensor],
        losses: Tensor,
        *,
        inputs: list[Tensor],
        features: bool,
    ) -> tuple[list[Tensor], Tensor]:
        self._check_terms(losses)
        matrix = flat_stack(grads, grads[0].dtype, grads[0].device)
        self._sized("y", matrix.shape, matrix, "per-term gradients")
        self.step += 1
        t = float(self.step)
        beta_t = self.beta / t**self.beta_sigma
        gamma_t = self.gamma / t**self.gamma_sigma
        direction, y, lam = moco_step(
            self.y.to(matrix), self.lam, matrix, beta_t, gamma_t, self.rho
        )
        self.y.copy_(y)
        self.lam.copy_(lam)
        return split_flat(direction, inputs), self._record(lam.clone())

    def extra_repr(self) -> str:
        return (
            f"num_terms={self.num_terms}, beta={self.beta}, beta_sigma={self.beta_sigma}, "
            f"gamma={self.gamma}, gamma_sigma={self.gamma_sigma}, rho={self.rho}"
        )


register(
    MethodInfo(
        name="moco",
        factory=MoCo,
        needs="grads",
        stateful=True,
        paper="Fernando et al., ICLR 2023",
        summary="MoCo: MGDA weights on tracked (bias-corrected) per-term gradients",
    )
)
