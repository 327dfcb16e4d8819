"""Loss normalisations: by the initial losses, or by the current (detached) losses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lossbalance._base import LossBalancer
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import warn_once


def positive_floor(dtype: torch.dtype) -> float:
    """The smallest divisor the loss-level methods divide by, for losses of ``dtype``.

    It is the square root of the smallest normal number (about 1e-19 in float32, 1e-154
    in float64): its reciprocal is about the square root of the largest finite number, so
    a loss divided by it stays finite.
    """
    return float(torch.finfo(dtype).tiny) ** 0.5


def normalized_loss(
    losses: Tensor, scales: Tensor, *, warn_key: str = "normalization"
) -> tuple[Tensor, Tensor]:
    """``sum_i L_i / |c_i|`` for constant scales ``c`` (not differentiated).

    The divisor is the magnitude of the scale: a negative scale (a negative loss) keeps a
    positive weight, so that term is still minimised; it warns once. The papers divide by
    a positive loss, and dividing by the signed value would make gradient descent
    maximise that term. A magnitude at or below :func:`positive_floor` (a zero loss) is
    raised to it, with a one-time warning, so the result stays finite.

    Args:
        losses: 1-D tensor of the K losses.
        scales: 1-D tensor of K divisors; cast to the dtype and device of ``losses``.
        warn_key: the prefix of the once-only warning keys (balancers pass their own, so
            that each balancer instance warns for itself).

    Returns:
        ``(combined, weights)`` with ``weights = 1 / |c|`` = d combined / d L_i.
    """
    floor = positive_floor(losses.dtype)
    c = scales.detach().to(losses)
    # one host read per call in the healthy case: a negative divisor is below the floor too
    if bool((c < floor).any()):
        negative = c < 0
        if bool(negative.any()):
            warn_once(
                f"{warn_key}:negative",
                f"loss normalisation got a negative divisor for term(s) "
                f"{torch.nonzero(negative).flatten().tolist()} (a negative loss); dividing by "
                "its absolute value, so that the term keeps a positive weight and is still "
                "minimised (the method assumes positive losses)",
            )
            c = c.abs()
        if bool((c < floor).any()):
            warn_once(
                f"{warn_key}:zero",
                f"loss normalisation got a divisor of magnitude <= {floor:.3g} (a zero loss); "
                "it is clamped there, so that term's weight is very large",
            )
            c = c.clamp_min(floor)
    return (losses / c).sum(), torch.reciprocal(c)


def dynamic_normalization(
    losses: Tensor, *, warn_key: str = "normalization"
) -> tuple[Tensor, Tensor]:
    """``sum_i L_i / stopgrad(|L_i|)``: value K, gradient that of ``sum_i log L_i``.

    For positive losses; a negative loss is divided by its magnitude (see
    :func:`normalized_loss`), so its weight stays positive.

    Returns:
        ``(combined, weights)`` with ``weights = 1 / |L|`` = d combined / d L_i.
    """
    return normalized_loss(losses, losses.detach(), warn_key=warn_key)


class InitialLossNormalization(LossBalancer):
    """Each loss divided by its initial value: ``L = sum_i L_i / L_i(0)``.

    A common baseline: the loss ratio L_i(t) / L_i(0) of the GradNorm paper (Chen et al.,
    ICML 2018), used directly as the objective.

    Update rule, for call t = 0, 1, ... with N = ``warmup_steps``::

        P_i(t) = (1 / (t+1)) sum_{s <= t} stopgrad(L_i(s))   for t < N  (running mean)
        P_i(t) = P_i(N-1)                                     for t >= N (frozen prior)
        L(t)   = sum_i L_i(t) / P_i(t),      w_i = 1 / P_i(t)

    The prior P is the float64 buffer ``prior``; ``num_calls`` counts the calls up to N.

    Args:
        num_terms: K >= 1, the number of loss terms.
        warmup_steps: N >= 1 (default 1): the number of first calls whose losses are
            averaged into the prior. With N = 1 the prior is the first loss.
        prior: given values instead of measured ones (the MTL slides' "use the initial
            value as the weight ... or roughly estimate it"): a sequence of K positive
            finite numbers, ``None`` entries measured as above; or ``"log-classes"``, the
            initial loss of a uniform K-class prediction, P_i = log C_i, with
            ``num_classes`` (C_i >= 2; ``None`` entries measured). Default ``None``: all
            measured.
        num_classes: the class counts C_i for ``prior="log-classes"``.

    A negative prior (a negative loss during the warm-up) divides by its magnitude
    ``|P_i|`` instead, so the term keeps a positive weight, with a one-time warning per
    balancer. A prior of magnitude at or below about 1e-19 (float32; 1e-154 in float64),
    e.g. a loss that is zero at the start, is clamped there with a one-time warning.

    Example:
        >>> import torch
        >>> from lossbalance import InitialLossNormalization
        >>> balancer = InitialLossNormalization(2, warmup_steps=2)
        >>> balancer(torch.tensor([2.0, 10.0], requires_grad=True)).item()
        2.0
        >>> balancer(torch.tensor([6.0, 30.0], requires_grad=True)).item()  # prior [4, 20]
        3.0
        >>> balancer.prior
        tensor([ 4., 20.], dtype=torch.float64)
        >>> balancer(torch.tensor([2.0, 10.0], requires_grad=True)).item()  # prior frozen
        1.0

    Differences from GradNorm's loss ratio:
        - GradNorm takes L_i(0) from the first step only (``warmup_steps=1``); a longer
          warm-up averages the first N mini-batch losses, which are noisy.
        - The ratio assumes positive losses. Dividing by a negative prior would flip the
          sign of that term's gradient (and clamping it at the floor gave a weight of
          about 1e19 that destroyed the model in one step), so we divide by ``|P_i|``.
    """

    prior: Tensor
    num_calls: Tensor
    _measured: Tensor

    def __init__(
        self,
        num_terms: int,
        warmup_steps: int = 1,
        prior: str | Sequence[float | None] | None = None,
        num_classes: Sequence[int | None] | None = None,
    ) -> None:
        super().__init__(num_terms)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (expected an integer >= 1)")
        self.warmup_steps = warmup_steps
        given = _given_prior(num_terms, prior, num_classes)
        self.given_prior = given
        self.register_buffer("prior", torch.tensor([v or 0.0 for v in given], dtype=torch.float64))
        self.register_buffer("num_calls", torch.zeros((), dtype=torch.int64))
        # which entries are given: derived from the arguments, so not saved
        self.register_buffer(
            "_measured", torch.tensor([v is None for v in given]), persistent=False
        )

    def forward(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        n = int(self.num_calls)
        if n < self.warmup_steps:
            current = losses.detach().to(self.prior)
            step = torch.where(self._measured, (current - self.prior) / (n + 1), 0.0)
            self.prior.add_(step)
            self.num_calls.add_(1)
        combined, weights = normalized_loss(
            losses, self.prior, warn_key=self._warning_key("initial-loss")
        )
        self._record(weights)
        return combined

    def extra_repr(self) -> str:
        text = f"num_terms={self.num_terms}, warmup_steps={self.warmup_steps}"
        if any(v is not None for v in self.given_prior):
            text += f", prior={list(self.given_prior)}"
        return text


def _given_prior(
    num_terms: int,
    prior: str | Sequence[float | None] | None,
    num_classes: Sequence[int | None] | None,
) -> list[float | None]:
    """The given prior values (``None``: measured) of :class:`InitialLossNormalization`."""
    if prior is None:
        if num_classes is not None:
            raise ValueError("num_classes is used with prior='log-classes' only")
        return [None] * num_terms
    if isinstance(prior, str):
        if prior != "log-classes":
            raise ValueError(f"Invalid prior: {prior!r} (expected 'log-classes' or K values)")
        if num_classes is None or len(num_classes) != num_terms:
            raise ValueError(
                f"prior='log-classes' needs num_classes with one class count per term "
                f"({num_terms}), got {num_classes!r}"
            )
        values: list[float | None] = []
        for c in num_classes:
            if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 2):
                raise ValueError(f"Invalid num_classes entry: {c!r} (expected an integer >= 2)")
            values.append(None if c is None else math.log(c))
        return values
    if num_classes is not None:
        raise ValueError("num_classes is used with prior='log-classes' only")
    values = list(prior)
    if len(values) != num_terms:
        raise ValueError(f"Invalid prior: {values!r} (expected {num_terms} values)")
    for v in values:
        if v is not None and not (isinstance(v, (int, float)) and 0 < v < math.inf):
            raise ValueError(f"Invalid prior entry: {v!r} (expected a finite number > 0)")
    return [None if v is None else float(v) for v in values]


class DynamicNormalization(LossBalancer):
    """Each loss divided by its own detached value: ``L = sum_i L_i / stopgrad(L_i)``.

    The combined value is always K, and its gradient is that of ``sum_i log L_i``: each
    term is weighted by ``1 / L_i`` at every step, so every term contributes the same
    relative decrease. This is the gradient direction of the geometric loss strategy
    (:class:`~lossbalance.GLS`) up to the positive factor ``GLS / K``.

    Update rule (no state)::

        L = sum_i L_i / stopgrad(|L_i|),      w_i = 1 / |L_i|

    For positive losses this is the rule above; a negative loss is divided by its
    magnitude, so its weight stays positive and the term is still minimised (one warning
    per balancer). A loss of magnitude at or below about 1e-19 (float32; 1e-154 in
    float64) is clamped there as a divisor, with a one-time warning.

    Args:
        num_terms: K >= 1, the number of loss terms.

    Example:
        >>> import torch
        >>> from lossbalance import DynamicNormalization
        >>> balancer = DynamicNormalization(2)
        >>> losses = torch.tensor([0.5, 4.0], requires_grad=True)
        >>> balancer(losses).item()
        2.0
        >>> balancer.last_weights
        tensor([2.0000, 0.2500])
    """

    def forward(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        combined, weights = dynamic_normalization(losses, warn_key=self._warning_key("dynamic"))
        self._record(weights)
        return combined


register(
    MethodInfo(
        name="initial-loss",
        factory=InitialLossNormalization,
        needs="losses",
        stateful=True,
        paper="baseline; L_i(t) / L_i(0) as in Chen et al., ICML 2018 (GradNorm)",
        summary="each loss divided by its (warm-up averaged, or given: log C) initial value",
    )
)
register(
    MethodInfo(
        name="dynamic",
        factory=DynamicNormalization,
        needs="losses",
        stateful=False,
        paper="baseline (gradient of sum_i log L_i)",
        summary="each loss divided by its detached current value (weights 1 / L_i)",
    )
)
