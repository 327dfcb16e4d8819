"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): learned homoscedastic noise."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lossbalance._base import LossBalancer
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_choice, warn_once

TASK_TYPES = ("regression", "classification")
# 1 / (2 sigma^2) for a Gaussian likelihood, 1 / sigma^2 for a scaled softmax.
_FACTORS = {"regression": 0.5, "classification": 1.0}


def uncertainty_loss(
    losses: Tensor, log_vars: Tensor, factors: Tensor, *, warn_key: str = "uncertainty"
) -> tuple[Tensor, Tensor]:
    """``sum_i c_i exp(-s_i) L_i + s_i / 2``, differentiable in both ``losses`` and ``s``.

    Args:
        losses: 1-D tensor of the K losses.
        log_vars: the K log-variances ``s_i = log sigma_i^2`` (differentiable).
        factors: the K constants ``c_i``: 1/2 for a regression term, 1 for a
            classification term.
        warn_key: the prefix of the once-only warning key (a balancer passes its own, so
            that each instance warns for itself).

    Returns:
        ``(combined, weights)`` with ``weights = c exp(-s)`` = d combined / d L_i
        (detached).
    """
    if bool((losses.detach() <= 0).any()):
        warn_once(
            f"{warn_key}:nonpositive",
            "UncertaintyWeighting got a loss <= 0: its objective has no minimum in the "
            "log-variance of that term, which will drift to -inf",
        )
    s = log_vars.to(losses.dtype)
    weights = factors.to(losses) * torch.exp(-s)
    combined = (weights * losses).sum() + 0.5 * s.sum()
    return combined, weights.detach()


class UncertaintyWeighting(LossBalancer):
    """Learned task uncertainty: each loss weighted by the inverse of a learned variance.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for
    Scene Geometry and Semantics", CVPR 2018, Eqs. (7) and (10), with the log-variance
    ``s_i = log sigma_i^2`` as the learned quantity (the paper's practical form)::

        regression term:      1 / (2 sigma_i^2) L_i + log sigma_i = exp(-s_i) L_i / 2 + s_i / 2
        classification term:  1 / sigma_i^2 L_i + log sigma_i     = exp(-s_i) L_i + s_i / 2
        L = sum_i c_i exp(-s_i) L_i + s_i / 2,   w_i = c_i exp(-s_i)

    with c_i = 1/2 or 1 by ``task_types[i]`` and s the parameter ``log_vars`` (init 0,
    so the initial weights are c_i). Pass ``balancer.parameters()`` to the optimizer
    along with the model's. For a fixed L_i the objective is minimised at
    sigma_i^2 = L_i (regression) and sigma_i^2 = 2 L_i (classification).

    Args:
        num_terms: K >= 1, the number of loss terms.
        task_types: K strings, each ``"regression"`` or ``"classification"``, or one
            string for all terms; default ``None`` means all ``"regression"``.

    Example:
        >>> import torch
        >>> from lossbalance import UncertaintyWeighting
        >>> balancer = UncertaintyWeighting(2, task_types=["regression", "classification"])
        >>> losses = torch.tensor([2.0, 3.0], requires_grad=True)
        >>> balancer(losses).item()  # 0.5 * 2 + 1 * 3, with s = 0
        4.0
        >>> balancer.last_weights
        tensor([0.5000, 1.0000])
        >>> optimizer = torch.optim.SGD(balancer.parameters(), lr=0.1)

    Differences from the paper:
        - The classification form is the paper's approximate objective (Eq. 10), which
          assumes ``(1/sigma) sum exp(f / sigma^2) ~ (sum exp f)^(1/sigma^2)``.
        - Many implementations use ``exp(-s) L + s`` for every term: for a regression
          term that has the same optimum s = log L but doubles the weights and the
          gradient on s. Here the paper's factors are kept; at the optimum every term,
          regression or classification, is weighted ``1 / (2 L_i)``.
        - A loss <= 0 makes the objective unbounded below in s; it warns once.
    """

    factors: Tensor

    def __init__(self, num_terms: int, task_types: Sequence[str] | str | None = None) -> None:
        super().__init__(num_terms)
        self.task_types = _check_task_types(task_types, num_terms)
        self.log_vars = nn.Parameter(torch.zeros(num_terms))
        # Derived from a hyperparameter, so kept out of state_dict (persistent=False).
        self.register_buffer(
            "factors",
            torch.tensor([_FACTORS[t] for t in self.task_types]),
            persistent=False,
        )

    def forward(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        combined, weights = uncertainty_loss(
            losses, self.log_vars, self.factors, warn_key=self._warning_key("uncertainty")
        )
        self._record(weights)
        return combined

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, task_types={self.task_types}"


def _check_task_types(task_types: Sequence[str] | str | None, num_terms: int) -> list[str]:
    if task_types is None:
        return ["regression"] * num_terms
    if isinstance(task_types, str):
        check_choice("task_types", task_types, TASK_TYPES)
        return [task_types] * num_terms
    types = list(task_types)
    if len(types) != num_terms:
        raise ValueError(
            f"Invalid task_types: {len(types)} values (expected {num_terms}, one per loss term)"
        )
    for i, t in enumerate(types):
        check_choice(f"task_types[{i}]", t, TASK_TYPES)
    return types


register(
    MethodInfo(
        name="uncertainty",
        factory=UncertaintyWeighting,
        needs="losses",
        stateful=True,
        paper="Kendall, Gal & Cipolla, CVPR 2018",
        summary="learned log-variances: 1/(2 sigma^2) L + log sigma per term",
    )
)
