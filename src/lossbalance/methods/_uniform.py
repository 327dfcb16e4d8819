"""Constant weightings: the uniform sum (or mean) and user-given fixed weights."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lossbalance._base import LossBalancer
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_choice

REDUCTIONS = ("sum", "mean")


def uniform_loss(losses: Tensor, reduction: str = "sum") -> tuple[Tensor, Tensor]:
    """Sum (or mean) of the K losses and its gradient with respect to them.

    Args:
        losses: 1-D tensor of the K losses.
        reduction: ``"sum"`` (weights 1) or ``"mean"`` (weights 1/K).

    Returns:
        ``(combined, weights)`` with ``weights`` = d combined / d L_i.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    k = losses.shape[0]
    if reduction == "sum":
        return losses.sum(), torch.ones_like(losses).detach()
    return losses.mean(), torch.full_like(losses, 1.0 / k).detach()


def weighted_sum(losses: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``sum_i w_i L_i`` with constant weights ``w``, and ``w`` itself (the gradient).

    Args:
        losses: 1-D tensor of the K losses.
        weights: 1-D tensor of K constant weights (cast to the dtype and device of
            ``losses``; not differentiated).

    Returns:
        ``(combined, weights)`` with ``weights`` = d combined / d L_i.
    """
    w = weights.detach().to(losses)
    return (w * losses).sum(), w


class Uniform(LossBalancer):
    """Equal weights: the plain sum (or mean) of the losses, the baseline of every study.

    Update rule (no state)::

        L = sum_i L_i            (reduction="sum",  w_i = 1)
        L = (1/K) sum_i L_i      (reduction="mean", w_i = 1/K)

    with K = ``num_terms``.

    Args:
        num_terms: K >= 1, the number of loss terms.
        reduction: ``"sum"`` (default) or ``"mean"``.

    Example:
        >>> import torch
        >>> from lossbalance import Uniform
        >>> balancer = Uniform(2, reduction="mean")
        >>> losses = torch.tensor([1.0, 3.0], requires_grad=True)
        >>> balancer(losses).item()
        2.0
        >>> balancer.last_weights
        tensor([0.5000, 0.5000])
    """

    def __init__(self, num_terms: int, reduction: str = "sum") -> None:
        super().__init__(num_terms)
        check_choice("reduction", reduction, REDUCTIONS)
        self.reduction = reduction

    def forward(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        combined, weights = uniform_loss(losses, self.reduction)
        self._record(weights)
        return combined

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, reduction={self.reduction!r}"


class FixedWeights(LossBalancer):
    """Hand-set constant weights: ``L = sum_i w_i L_i``.

    Update rule (no state)::

        L = sum_i w_i L_i,    w = ``weights``

    The weights are kept in the float64 buffer ``weights`` (so ``state_dict()`` carries
    them) and cast to the dtype of the losses at each call.

    Args:
        num_terms: K >= 1, the number of loss terms.
        weights: K finite non-negative numbers (a sequence or a 1-D tensor), one per term.

    Example:
        >>> import torch
        >>> from lossbalance import FixedWeights
        >>> balancer = FixedWeights(2, weights=[1.0, 0.1])
        >>> losses = torch.tensor([2.0, 30.0], requires_grad=True)
        >>> balancer(losses).item()
        5.0
        >>> balancer.last_weights
        tensor([1.0000, 0.1000])
    """

    weights: Tensor

    def __init__(self, num_terms: int, weights: Sequence[float] | Tensor) -> None:
        super().__init__(num_terms)
        self.register_buffer("weights", _check_weights(weights, num_terms))

    def forward(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        combined, weights = weighted_sum(losses, self.weights)
        self._record(weights)
        return combined

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, weights={self.weights.tolist()}"


def _check_weights(weights: Sequence[float] | Tensor, num_terms: int) -> Tensor:
    if isinstance(weights, Tensor):
        if weights.dim() != 1:
            raise ValueError(
                f"Invalid weights: shape {tuple(weights.shape)} (expected a 1-D sequence of "
                f"{num_terms} numbers)"
            )
        values = [float(v) for v in weights.detach().cpu().tolist()]
    elif isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Iterable):
        raise TypeError(
            f"weights must be a sequence of {num_terms} numbers, got {type(weights).__name__}"
        )
    else:
        values = []
        for i, v in enumerate(weights):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"weights[{i}] must be a number, got {type(v).__name__}")
            values.append(float(v))
    if len(values) != num_terms:
        raise ValueError(
            f"Invalid weights: {len(values)} values (expected {num_terms}, one per loss term)"
        )
    for i, v in enumerate(values):
        if not (math.isfinite(v) and v >= 0.0):
            raise ValueError(f"Invalid weights[{i}]: {v} (expected 0 <= weights[{i}] < inf)")
    return torch.tensor(values, dtype=torch.float64)


register(
    MethodInfo(
        name="uniform",
        factory=Uniform,
        needs="losses",
        stateful=False,
        paper="baseline (equal weights)",
        summary="sum (or mean) of the losses",
    )
)
register(
    MethodInfo(
        name="fixed",
        factory=FixedWeights,
        needs="losses",
        stateful=False,
        paper="baseline (hand-tuned weights)",
        summary="constant user-given weights: sum_i w_i L_i",
    )
)
