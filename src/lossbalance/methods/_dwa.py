"""Dynamic weight average (Liu, Johns & Davison, CVPR 2019): weights from loss descent rates."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lossbalance._base import LossBalancer
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_positive, warn_once
from lossbalance.methods._normalization import positive_floor


def dwa_weights(
    last: Tensor, before_last: Tensor, temperature: float = 2.0, *, warn_key: str = "dwa"
) -> Tensor:
    """``K softmax(r / T)`` with descent rates ``r = last / before_last``.

    Args:
        last: the K mean losses of the last period, Lbar(t-1).
        before_last: the K mean losses of the period before, Lbar(t-2).
        temperature: T > 0; larger is closer to uniform.
        warn_key: the prefix of the once-only warning keys (a balancer passes its own, so
            that each instance warns for itself).

    Returns:
        K weights, positive and summing to K. A mean loss at or below
        :func:`~lossbalance.methods._normalization.positive_floor` in ``before_last`` is clamped
        there, and non-finite rates (non-finite losses) give weights 1; both warn once.
    """
    k = last.shape[0]
    floor = positive_floor(before_last.dtype)
    if bool((before_last < floor).any()):
        warn_once(
            f"{warn_key}:nonpositive",
            f"DWA got a mean loss <= {floor:.3g} (zero or negative); it is clamped there as "
            "the divisor of the descent rate",
        )
    rates = last / before_last.clamp_min(floor)
    if not bool(torch.isfinite(rates).all()):
        warn_once(
            f"{warn_key}:nonfinite",
            "DWA got non-finite mean losses; the weights of this step fall back to 1",
        )
        return torch.ones_like(rates)
    return k * torch.softmax(rates / temperature, dim=0)


class DWA(LossBalancer):
    """Dynamic weight average: weight each loss by how slowly it has been decreasing.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
    (arXiv 1803.10704), the dynamic weight average::

        r_k(t-1) = Lbar_k(t-1) / Lbar_k(t-2)
        w_k(t)   = K exp(r_k(t-1) / T) / sum_j exp(r_j(t-1) / T)
        L(t)     = sum_k w_k(t) L_k(t)

    with K = ``num_terms``, T = ``temperature`` and Lbar_k(t) the mean of the detached
    losses L_k over period t; w = 1 in the first two periods. A period is ``period``
    calls of ``forward``; :meth:`advance` closes the current one early (call it at the
    end of each epoch, with ``period=None``, for the paper's per-epoch schedule).

    State (buffers, float64 means): ``history`` (2 x K; row 0 is Lbar(t-1), row 1
    Lbar(t-2)), ``num_periods`` (periods closed so far), ``period_sum`` and
    ``period_count`` (the running sum and count of the current period).

    Args:
        num_terms: K >= 1, the number of loss terms.
        temperature: T > 0 (default 2.0, the paper's value).
        period: calls per period, an integer >= 1 (default 1: per step), or ``None``
            for periods closed only by :meth:`advance`.

    Example:
        >>> import torch
        >>> from lossbalance import DWA
        >>> balancer = DWA(2, temperature=2.0)
        >>> for step_losses in ([1.0, 1.0], [0.5, 1.0]):  # w = 1 for two periods
        ...     _ = balancer(torch.tensor(step_losses, requires_grad=True))
        >>> _ = balancer(torch.tensor([0.4, 0.9], requires_grad=True))
        >>> balancer.last_weights  # 2 softmax([0.5, 1.0] / 2)
        tensor([0.8756, 1.1244])

    Differences from the paper / the authors' code:
        - The paper's period is a training epoch; here it is ``period`` calls (or until
          :meth:`advance`), since balancers know nothing of epochs.
        - The softmax is the numerically stable one; a zero mean loss is clamped as a
          divisor, and non-finite means give weights 1, with a warning.
    """

    history: Tensor
    num_periods: Tensor
    period_sum: Tensor
    period_count: Tensor

    def __init__(self, num_terms: int, temperature: float = 2.0, period: int | None = 1) -> None:
        super().__init__(num_terms)
        check_positive("temperature", temperature)
        if not math.isfinite(temperature):
            raise ValueError(f"Invalid temperature: {temperature} (expected 0 < temperature < inf)")
        if period is not None and (
            isinstance(period, bool) or not isinstance(period, int) or period < 1
        ):
            raise ValueError(f"Invalid period: {period!r} (expected an integer >= 1 or None)")
        self.temperature = float(temperature)
        self.period = period
        self.register_buffer("history", torch.zeros(2, num_terms, dtype=torch.float64))
        self.register_buffer("num_periods", torch.zeros((), dtype=torch.int64))
        self.register_buffer("period_sum", torch.zeros(num_terms, dtype=torch.float64))
        self.register_buffer("period_count", torch.zeros((), dtype=torch.int64))
        if num_terms == 1:
            warn_once("dwa-one-term", "DWA with num_terms=1 has nothing to balance: w = 1")

    def forward(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        if int(self.num_periods) >= 2:
            weights = dwa_weights(
                self.history[0],
                self.history[1],
                self.temperature,
                warn_key=self._warning_key("dwa"),
            )
            weights = weights.to(losses)
        else:
            weights = torch.ones_like(losses).detach()
        combined = (weights * losses).sum()
        self.period_sum.add_(losses.detach().to(self.period_sum))
        self.period_count.add_(1)
        if self.period is not None and int(self.period_count) >= self.period:
            self.advance()
        self._record(weights)
        return combined

    def advance(self) -> None:
        """Close the current period now; a no-op if it has no calls yet."""
        count = int(self.period_count)
        if count == 0:
            return
        self.history[1].copy_(self.history[0])
        self.history[0].copy_(self.period_sum / count)
        self.num_periods.add_(1)
        self.period_sum.zero_()
        self.period_count.zero_()

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, temperature={self.temperature}, period={self.period}"


register(
    MethodInfo(
        name="dwa",
        factory=DWA,
        needs="losses",
        stateful=True,
        paper="Liu, Johns & Davison, CVPR 2019",
        summary="dynamic weight average: softmax of the loss descent rates",
    )
)
