"""DB-MTL: log-transformed losses, averaged gradients rescaled to the largest norm."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_choice, check_nonneg, warn_once
from lossbalance.methods._mgda import check_gramian
from lossbalance.methods._vector import VectorBalancer, flat_stack, split_flat

__all__ = ["DBMTL", "db_mtl_step"]

EMAS = ("gradients", "norms")
# LibMTL's offset inside the logarithm, log(L + eps)
_LOG_EPS = 1e-8


def _max_norm_weights(norms: Tensor) -> Tensor:
    """``max_j n_j / n_i``, 0 for a zero norm (that term has no direction)."""
    top = norms.max()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, top / safe, torch.zeros_like(norms))


def db_mtl_step(average: Tensor, grads: Tensor, rate: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""One DB-MTL step on the K x P per-term gradients of the log losses.

    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang, Kwok, "Dual-Balancing for Multi-Task
    Learning", 2023 (arXiv 2308.12029), Sec. 3 (Algorithm 1):

    .. math::
        \hat g_i \leftarrow \beta_t \hat g_i + (1-\beta_t)\, \nabla \log L_i, \qquad
        d = \sum_i \frac{\max_j \|\hat g_j\|}{\|\hat g_i\|}\, \hat g_i

    so that every term contributes a direction of the largest averaged norm.

    Args:
        average: :math:`\hat g`, K x P (zeros at the start, as in LibMTL).
        grads: K x P gradients of :math:`\log L_i` (rows = terms).
        rate: :math:`\beta_t` in [0, 1].

    Returns:
        ``(direction, new_average, alpha)``: d (P,), :math:`\hat g` and the coefficients
        :math:`\alpha_i = \max_j\|\hat g_j\|/\|\hat g_i\|` (0 where :math:`\hat g_i = 0`).

    Example:
        >>> import torch
        >>> from lossbalance.methods._dbmtl import db_mtl_step
        >>> g = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
        >>> d, avg, alpha = db_mtl_step(torch.zeros(2, 2), g, 0.0)
        >>> d
        tensor([3., 3.])
    """
    if average.shape != grads.shape or grads.dim() != 2:
        raise ValueError(
            f"db_mtl_step: average {tuple(average.shape)} and grads {tuple(grads.shape)} must "
            "be the same K x P shape"
        )
    new = rate * average + (1.0 - rate) * grads
    alpha = _max_norm_weights(new.double().norm(dim=1))
    return alpha.to(new) @ new, new, alpha


class DBMTL(VectorBalancer):
    r"""DB-MTL: log losses, EMA gradients normalised to the largest norm.

    Lin et al., "Dual-Balancing for Multi-Task Learning", 2023; the math is in
    :func:`db_mtl_step`. ``transform(losses) = log(losses + 1e-8)`` (loss-scale
    balancing); the engine differentiates it (its Jacobian), so the heads get the
    gradient of :math:`\sum_i \log L_i` and the balanced gradients are those of the log
    losses. The EMA rate is :math:`\beta_t = \beta / t^{\sigma}` at step t.

    Args:
        num_terms: K >= 1.
        beta: :math:`\beta` in [0, 1] (default 0.9, LibMTL's).
        beta_sigma: :math:`\sigma >= 0` (default 0, LibMTL's: a constant rate).
        ema: ``"gradients"`` (default, the paper and LibMTL: :math:`\hat g_i` are
            running averages of the gradient vectors, a K x P state; modes
            ``"exact"``/``"batched"`` only) or ``"norms"`` (running averages of the norms
            :math:`\|\nabla\log L_i\|` only, and :math:`d = \sum_i
            (\max_j \hat n_j / \hat n_i)\, \nabla \log L_i`: a Gramian weighting, every
            mode, K numbers of state; not the paper's method).

    State (``state_dict``): ``step`` and ``average`` (``(K, P)`` for ``"gradients"``,
    sized at the first call, in the gradients' dtype; ``(K,)`` float64 for ``"norms"``).

    ``last_weights`` are the coefficients alpha of the averaged gradients (of this step's
    gradients for ``"norms"``).

    Example:
        >>> import torch
        >>> from lossbalance.methods._dbmtl import DBMTL
        >>> balancer = DBMTL(2, ema="norms", beta=0.0)
        >>> losses = torch.tensor([1.0, 1.0])
        >>> G = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> balancer.weights(G, balancer.transform(losses).detach())
        tensor([1., 2.], dtype=torch.float64)

    Differences from the paper / LibMTL: none in the ``"gradients"`` variant (the offset
    1e-8 inside the logarithm is LibMTL's). A loss <= 0 warns once; a negative one makes
    the transformed loss NaN, so ``lossbalance.backward`` skips the step.
    """

    average: Tensor
    step: Tensor

    lazy_buffers: ClassVar[dict[str, int]] = {"average": 1}

    def __init__(
        self,
        num_terms: int,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        *,
        ema: str = "gradients",
    ) -> None:
        super().__init__(num_terms)
        if not 0.0 <= beta <= 1.0 or not math.isfinite(beta):
            raise ValueError(f"Invalid beta: {beta} (expected 0 <= beta <= 1)")
        check_nonneg("beta_sigma", beta_sigma)
        if not math.isfinite(beta_sigma):
            raise ValueError(f"Invalid beta_sigma: {beta_sigma} (expected a finite number)")
        check_choice("ema", ema, EMAS)
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.ema = ema
        self.needs_grads = ema == "gradients"
        size = (num_terms, 0) if self.needs_grads else (num_terms,)
        self.register_buffer("average", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def transform(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        if bool((losses.detach() <= 0).any()):
            warn_once(
                self._warning_key("db-mtl:nonpositive-loss"),
                "DBMTL: a loss is <= 0; DB-MTL needs positive losses (log(L + 1e-8) of a "
                "negative loss is NaN and the step is skipped, a zero loss gets a huge "
                "gradient)",
            )
        return torch.log(losses + _LOG_EPS)

    def _rate(self) -> float:
        self.step += 1
        return self.beta / float(self.step) ** self.beta_sigma

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if self.needs_grads:
            return super().weights(gramian, losses)
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        rate = self._rate()
        norms = gramian.detach().diagonal().clamp_min(0).sqrt().to(self.average)
        self.average.mul_(rate).add_(norms, alpha=1.0 - rate)
        return self._record(_max_norm_weights(self.average).to(gramian))

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
        self._sized("average", matrix.shape, matrix, "per-term gradients")
        rate = self._rate()
        direction, new, alpha = db_mtl_step(self.average.to(matrix), matrix, rate)
        self.average.copy_(new)
        return split_flat(direction, inputs), self._record(alpha)

    def extra_repr(self) -> str:
        return (
            f"num_terms={self.num_terms}, beta={self.beta}, beta_sigma={self.beta_sigma}, "
            f"ema={self.ema!r}"
        )


register(
    MethodInfo(
        name="db-mtl",
        factory=DBMTL,
        needs="grads",
        stateful=True,
        paper="Lin et al., 2023 (arXiv 2308.12029)",
        summary="dual balancing: log losses, EMA gradients scaled to the largest norm",
    )
)
