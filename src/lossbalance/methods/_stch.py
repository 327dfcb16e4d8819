"""Smooth Tchebycheff scalarisation (Lin et al., ICML 2024): a smoothed max of the losses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lossbalance._base import LossBalancer
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_positive, warn_once
from lossbalance.methods._normalization import positive_floor


def stch_loss(
    objectives: Tensor, ideal: Tensor, preferences: Tensor, mu: float
) -> tuple[Tensor, Tensor]:
    """``mu log sum_i exp(lambda_i (f_i - z_i) / mu)``, the smooth Tchebycheff value.

    It lies in ``[max_i lambda_i (f_i - z_i), max_i lambda_i (f_i - z_i) + mu log K]``, so
    it tends to the Tchebycheff scalarisation as mu -> 0 (and to the mean of the
    lambda_i (f_i - z_i) plus mu log K as mu -> inf).

    Args:
        objectives: f, 1-D tensor of the K objectives (differentiable).
        ideal: z*, the K ideal (reference) values, not differentiated.
        preferences: lambda, the K positive preference weights.
        mu: the smoothing parameter, > 0.

    Returns:
        ``(value, weights)`` with ``weights = lambda_i softmax(lambda (f - z) / mu)_i`` =
        d value / d f_i (detached).
    """
    lam = preferences.to(objectives)
    scaled = lam * (objectives - ideal.detach().to(objectives)) / mu
    value = mu * torch.logsumexp(scaled, dim=0)
    return value, (lam * torch.softmax(scaled.detach(), dim=0)).detach()


class STCH(LossBalancer):
    """Smooth Tchebycheff scalarisation of the losses, with an ideal point from a warm-up.

    Lin, Zhang, Chen, Zhang & Zhang, "Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization", ICML 2024 (arXiv 2402.19078), the smooth Tchebycheff
    scalarisation of Sec. 3::

        g_mu(theta | lambda) = mu log sum_i exp(lambda_i (f_i(theta) - z*_i) / mu)

    which approaches the Tchebycheff scalarisation ``max_i lambda_i (f_i - z*_i)`` as
    mu -> 0 (``0 <= g_mu - max <= mu log K``). The gradient is
    ``sum_i w_i grad f_i`` with ``w_i = lambda_i softmax(lambda (f - z*) / mu)_i``: the
    terms farthest above their ideal value get nearly all the weight.

    The objectives f are the log-losses ``log L_i`` (``log_losses=True``, the authors'
    multi-task code) or the losses themselves. The ideal point z* (in the units of f) is
    given as ``ideal``, or estimated by a warm-up of ``warmup_steps`` calls during which
    the combined loss is ``sum_i lambda_i f_i``; z* is then the mean of f over the last
    ``estimate_steps`` warm-up calls (all of them by default), taken in loss space
    (``log`` of the mean loss when ``log_losses``). With neither, z* = 0.

    State (buffers, float64): ``ideal`` (NaN until known), ``num_steps`` (calls so far),
    ``estimate_sum`` and ``estimate_count`` (the warm-up average being built).

    Args:
        num_terms: K >= 1, the number of loss terms.
        mu: the smoothing parameter, > 0 (default 1.0).
        preferences: lambda, K positive weights or one float for all (default 1).
        ideal: z*, a float for all terms or K values, in the units of f; ``None``
            (default) estimates it during the warm-up (or uses 0 without one).
        warmup_steps: calls of the warm-up, an integer >= 0 (default 0).
        estimate_steps: how many final warm-up calls z* averages, an integer >= 1 and
            <= ``warmup_steps``; ``None`` (default) averages them all.
        log_losses: use f = log L (default True) or f = L.

    Example:
        >>> import torch
        >>> from lossbalance.methods._stch import STCH
        >>> stch = STCH(2, mu=0.01, log_losses=False)
        >>> value = stch(torch.tensor([1.0, 3.0], requires_grad=True))
        >>> round(value.item(), 4), stch.last_weights.tolist()  # about max(L) = 3
        (3.0, [0.0, 1.0])

    Differences from the paper / the authors' code:
        - The authors' multi-task code warms up for whole epochs and averages the
          losses of the last warm-up epoch; balancers know nothing of epochs, so the
          warm-up is ``warmup_steps`` calls and ``estimate_steps`` chooses the averaged
          tail (``estimate_steps = steps per epoch`` reproduces theirs).
        - LibMTL's version multiplies the value by K; here it is not, so the
          weights sum to about ``sum_i lambda_i softmax_i`` (1 for lambda = 1), not K:
          use K times the learning rate for the same step.
        - The authors add 1e-20 inside the log; here a loss at or below a tiny positive
          floor is clamped there (with a warning).
    """

    ideal: Tensor
    preferences: Tensor
    num_steps: Tensor
    estimate_sum: Tensor
    estimate_count: Tensor

    def __init__(
        self,
        num_terms: int,
        mu: float = 1.0,
        preferences: float | Sequence[float] | Tensor = 1.0,
        ideal: float | Sequence[float] | Tensor | None = None,
        *,
        warmup_steps: int = 0,
        estimate_steps: int | None = None,
        log_losses: bool = True,
    ) -> None:
        super().__init__(num_terms)
        check_positive("mu", mu)
        if not math.isfinite(mu):
            raise ValueError(f"Invalid mu: {mu} (expected 0 < mu < inf)")
        lam = _per_term("preferences", preferences, num_terms)
        if not bool((lam > 0).all()):
            raise ValueError(f"Invalid preferences: {preferences!r} (expected values > 0)")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (expected an integer >= 0)")
        if estimate_steps is not None and (
            isinstance(estimate_steps, bool)
            or not isinstance(estimate_steps, int)
            or not 1 <= estimate_steps <= warmup_steps
        ):
            raise ValueError(
                f"Invalid estimate_steps: {estimate_steps!r} (expected None or an integer with "
                f"1 <= estimate_steps <= warmup_steps = {warmup_steps})"
            )
        if ideal is not None and warmup_steps > 0:
            raise ValueError(
                "Invalid ideal: given together with warmup_steps > 0 (the warm-up estimates "
                "the ideal point; pass one or the other)"
            )
        self.mu = float(mu)
        self.warmup_steps = warmup_steps
        self.estimate_steps = warmup_steps if estimate_steps is None else estimate_steps
        self.log_losses = bool(log_losses)
        f64 = torch.float64
        if ideal is not None:
            z = _per_term("ideal", ideal, num_terms)
        elif warmup_steps == 0:
            z = torch.zeros(num_terms, dtype=f64)
        else:
            z = torch.full((num_terms,), math.nan, dtype=f64)
        self.register_buffer("preferences", lam)
        self.register_buffer("ideal", z)
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("estimate_sum", torch.zeros(num_terms, dtype=f64))
        self.register_buffer("estimate_count", torch.zeros((), dtype=torch.int64))
        if num_terms == 1:
            warn_once("stch-one-term", "STCH with num_terms=1 has nothing to balance")

    def objectives(self, losses: Tensor) -> Tensor:
        """f: ``log L`` (losses at or below a tiny floor clamped there, warned) or ``L``."""
        if not self.log_losses:
            return losses
        floor = positive_floor(losses.dtype)
        if bool((losses.detach() < floor).any()):
            warn_once(
                self._warning_key("stch-nonpositive"),
                f"STCH got a loss <= {floor:.3g} (zero or negative) with log_losses=True; it is "
                "clamped there before the log",
            )
            losses = losses.clamp_min(floor)
        return torch.log(losses)

    def forward(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        f = self.objectives(losses)
        # d f_i / d L_i: 1 / L_i for the log-losses (at the clamped value), else 1
        if self.log_losses:
            df = torch.reciprocal(losses.detach().clamp_min(positive_floor(losses.dtype)))
        else:
            df = torch.ones_like(losses).detach()
        step = int(self.num_steps)
        self.num_steps.add_(1)
        if step < self.warmup_steps:
            if step >= self.warmup_steps - self.estimate_steps:
                self.estimate_sum.add_(losses.detach().to(self.estimate_sum))
                self.estimate_count.add_(1)
            if step + 1 == self.warmup_steps:
                self._set_ideal()
            lam = self.preferences.to(f)
            self._record(lam * df)
            return (lam * f).sum()
        value, w_f = stch_loss(f, self.ideal, self.preferences, self.mu)
        self._record(w_f * df)
        return value

    def _set_ideal(self) -> None:
        mean = self.estimate_sum / int(self.estimate_count)
        if self.log_losses:
            floor = positive_floor(torch.float64)
            if bool((mean < floor).any()):
                warn_once(
                    self._warning_key("stch-nonpositive-ideal"),
                    f"STCH's warm-up mean loss is <= {floor:.3g}; it is clamped there before "
                    "the log of the ideal point",
                )
            mean = torch.log(mean.clamp_min(floor))
        if not bool(torch.isfinite(mean).all()):
            warn_once(
                self._warning_key("stch-nonfinite-ideal"),
                "STCH's warm-up mean loss is not finite; the ideal point falls back to 0",
            )
            mean = torch.where(torch.isfinite(mean), mean, torch.zeros_like(mean))
        self.ideal.copy_(mean)

    def extra_repr(self) -> str:
        return (
            f"num_terms={self.num_terms}, mu={self.mu}, warmup_steps={self.warmup_steps}, "
            f"log_losses={self.log_losses}"
        )


def _per_term(name: str, value: float | Sequence[float] | Tensor, num_terms: int) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if t.dim() == 0:
        t = t.expand(num_terms).clone()
    if tuple(t.shape) != (num_terms,) or not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"Invalid {name}: {value!r} (expected a finite float or {num_terms} finite values)"
        )
    return t


register(
    MethodInfo(
        name="stch",
        factory=STCH,
        needs="losses",
        stateful=True,
        paper="Lin et al., ICML 2024",
        summary="smooth Tchebycheff: mu logsumexp of the (log-)losses over an ideal point",
    )
)
