"""Geometric loss strategy (GLS): the geometric mean of the losses."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lossbalance._base import LossBalancer
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_positive, warn_once
from lossbalance.methods._normalization import positive_floor


def gls_loss(
    losses: Tensor, gamma: float | None = None, *, warn_key: str = "gls"
) -> tuple[Tensor, Tensor]:
    """``(prod_i L_i)^(1/gamma)``, computed in log space, and its gradient.

    A loss at or below :func:`~lossbalance.methods._normalization.positive_floor` (zero or
    negative) is raised to it, with a one-time warning: the result stays finite and that
    term gets zero gradient (the clamp passes no gradient below the floor).

    Args:
        losses: 1-D tensor of the K losses.
        gamma: the root, > 0; ``None`` (default) means K, the plain geometric mean.
        warn_key: the prefix of the once-only warning key (a balancer passes its own, so
            that each instance warns for itself).

    Returns:
        ``(combined, weights)`` with ``weights_i`` = d combined / d L_i
        = combined / (gamma L_i).
    """
    g = float(losses.shape[0]) if gamma is None else float(gamma)
    floor = positive_floor(losses.dtype)
    detached = losses.detach()
    above = detached >= floor
    if not bool(above.all()):
        warn_once(
            f"{warn_key}:nonpositive",
            f"GLS got a loss <= {floor:.3g} (zero or negative); it is clamped there, "
            "so that term gets no gradient and the product is tiny",
        )
    clamped = losses.clamp_min(floor)
    log_losses = torch.log(clamped)
    combined = torch.exp(log_losses.sum() / g)
    # The same operations, in the same order, as autograd's backward through exp, the
    # division by gamma and log: the weights match the gradient to the last bit.
    weights = (combined.detach() / g) / clamped.detach()
    weights = torch.where(above, weights, torch.zeros_like(weights))
    return combined, weights


class GLS(LossBalancer):
    """Geometric loss strategy: the geometric mean of the losses.

    Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
    Strategy for Multi-Task Learning", CVPR Workshops 2019 (arXiv 1904.08492), the
    geometric loss strategy::

        L = (prod_{i=1..K} L_i)^(1/gamma) = exp((1/gamma) sum_i log L_i)

    with gamma = ``gamma`` (K = ``num_terms`` by default). The gradient weights are
    ``w_i = d L / d L_i = L / (gamma L_i)``: each term is weighted by the inverse of its
    own loss, so terms of very different scales contribute equal relative decreases.

    Args:
        num_terms: K >= 1, the number of loss terms.
        gamma: the root, a float > 0; default ``None`` means K.

    Example:
        >>> import torch
        >>> from lossbalance import GLS
        >>> balancer = GLS(2)
        >>> losses = torch.tensor([4.0, 9.0], requires_grad=True)
        >>> round(balancer(losses).item(), 4)
        6.0
        >>> balancer.last_weights  # 6 / (2 * 4), 6 / (2 * 9)
        tensor([0.7500, 0.3333])

    Differences from the paper:
        - The product is computed in log space, which neither overflows nor underflows
          for K losses of very different scales.
        - ``gamma`` generalises the paper's K-th root; ``gamma=None`` is the paper.
        - A zero or negative loss (where the paper's product is 0 or undefined) is
          clamped at about 1e-19 (float32; 1e-154 in float64) with a warning.
        - ``last_weights`` are the true gradient ``L / (gamma L_i)``, not ``1 / L_i``
          (the two differ by the factor ``L / gamma`` common to all terms).
    """

    def __init__(self, num_terms: int, gamma: float | None = None) -> None:
        super().__init__(num_terms)
        if gamma is not None:
            if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
                raise TypeError(f"gamma must be a float or None, got {type(gamma).__name__}")
            check_positive("gamma", gamma)
            if not math.isfinite(gamma):
                raise ValueError(f"Invalid gamma: {gamma} (expected 0 < gamma < inf)")
        self.gamma = gamma
        if num_terms == 1:
            warn_once(
                "gls-one-term",
                "GLS with num_terms=1 has nothing to balance: it returns L^(1/gamma)",
            )

    def forward(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        combined, weights = gls_loss(losses, self.gamma, warn_key=self._warning_key("gls"))
        self._record(weights)
        return combined

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, gamma={self.gamma}"


register(
    MethodInfo(
        name="gls",
        factory=GLS,
        needs="losses",
        stateful=False,
        paper="Chennupati et al., CVPR Workshops 2019 (MultiNet++)",
        summary="geometric mean of the losses (weights proportional to 1 / L_i)",
    )
)
