"""FAMO (Liu et al., NeurIPS 2023): learned logits that equalise the log-loss decrease rates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lossbalance._base import LossBalancer
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import (
    check_beta,
    check_nonneg,
    check_positive,
    stack_losses,
    warn_once,
)
from lossbalance.methods._normalization import positive_floor


def famo_loss(
    losses: Tensor, logits: Tensor, min_losses: Tensor, *, warn_key: str = "famo-nonpositive"
) -> tuple[Tensor, Tensor]:
    """FAMO's combined loss ``sum_i z_i log(L_i - b_i) / c``, ``c = sum_j z_j / (L_j - b_j)``.

    Args:
        losses: 1-D tensor of the K losses (differentiable).
        logits: xi, the K logits; ``z = softmax(xi)`` (not differentiated here).
        min_losses: b, the K lower bounds of the losses (0 for non-negative losses).

    Returns:
        ``(combined, weights)`` with ``weights = z_i / ((L_i - b_i) c)`` = d combined / d L_i
        (positive, summing to 1; detached). ``L_i - b_i`` at or below
        :func:`~lossbalance.methods._normalization.positive_floor` is clamped there, with a warning.
    """
    floor = positive_floor(losses.dtype)
    d = losses - min_losses.to(losses)
    if bool((d.detach() < floor).any()):
        warn_once(
            warn_key,
            f"FAMO got a loss at or below its lower bound (L - b <= {floor:.3g}); it is clamped "
            "there before the log, so that term gets almost all the weight",
        )
        d = d.clamp_min(floor)
    z = torch.softmax(logits.detach().to(losses), dim=0)
    c = (z / d.detach()).sum()
    combined = (z * torch.log(d)).sum() / c
    return combined, (z / (d.detach() * c)).detach()


def famo_logit_grad(logits: Tensor, delta: Tensor) -> Tensor:
    """The FAMO logit gradient ``J_softmax(xi)^T delta = z * (delta - <z, delta>)``.

    ``delta_i = log(L_i(t) - b_i) - log(L_i(t+1) - b_i)`` is the decrease of the log-losses
    over the model step; following -gradient raises the logits of the terms that decreased
    least.
    """
    z = torch.softmax(logits, dim=0)
    return z * (delta - (z * delta).sum())


class FAMO(LossBalancer):
    """Fast adaptive multitask optimisation: weights that balance the log-loss decrease.

    Liu, Liu, Ye, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS
    2023 (arXiv 2306.03792), Algorithm 1. With logits xi (K numbers), ``z = softmax(xi)``
    and lower bounds b (``min_losses``, default 0)::

        model step:  d = sum_i c z_i grad log(L_i - b_i),   c = 1 / sum_j z_j / (L_j - b_j)
                     i.e. L(t) = sum_i w_i L_i with w_i = c z_i / (L_i - b_i), sum_i w_i = 1
        logit step:  delta_i = log(L_i(t) - b_i) - log(L_i(t+1) - b_i)
                     xi <- Adam(xi, grad = J_softmax(xi)^T delta, lr, weight_decay=gamma)

    ``forward(losses)`` returns the combined loss (its gradient is d above) and keeps the
    detached losses; after the model's ``optimizer.step()``, :meth:`update` takes the
    new losses and steps the logits. The update's gradient is that of
    ``z . (log L(t) - log L(t+1))``: the logits move toward the terms whose log-loss
    decreased least, and at its fixed point (gamma = 0) every log-loss decreases at the
    same rate. A term's scale cancels in the log-losses, and changes only the common
    factor c of the model's gradient, not its direction.

    The logits' optimiser is Adam with coupled weight decay (``torch.optim.Adam``'s
    update, computed here on buffers so that its moments are in ``state_dict()``): lr,
    betas and eps as ``torch.optim.Adam``; ``gamma`` is its ``weight_decay``.

    **Cost.** The exact update needs ``L(t+1)`` on the same batch after the model step:
    one more forward pass per step (no backward), as in the authors' example::

        combined = famo(losses)              # or lossbalance.backward(losses, famo)
        combined.backward(); optimizer.step()
        with torch.no_grad():
            famo.update(compute_losses(model, batch))

    With ``delayed=True`` nothing extra is computed: each ``forward`` first updates the
    logits with its own losses, i.e. ``L(t+1)`` is measured on the next batch (the
    authors' code allows this; the rates then include the batch-to-batch noise).
    Under ``torch.distributed``, ``lossbalance.backward`` gives ``forward`` the losses
    averaged over the ranks; pass :meth:`update` the averaged new losses too, so that
    every rank keeps the same logits.

    Args:
        num_terms: K >= 1, the number of loss terms.
        lr: the logits' learning rate beta, > 0 (default 0.025, the authors' code and
            LibMTL).
        gamma: the logits' weight decay, >= 0 (default 0.01, the authors' example
            ``famo.py``; LibMTL defaults to 1e-3).
        betas: Adam's betas for the logits (default (0.9, 0.999)).
        eps: Adam's eps, > 0 (default 1e-8).
        min_losses: b, the K lower bounds of the losses (default 0), a float for all
            terms or K values.
        delayed: update the logits at each ``forward`` with that step's losses instead of
            by :meth:`update` (default False).

    State (buffers, float64): ``logits``, ``prev_losses`` (the losses of the last
    ``forward``, NaN when consumed), ``exp_avg``, ``exp_avg_sq`` and ``step`` (Adam's).
    ``min_losses`` is a buffer too.

    Example:
        >>> import torch
        >>> from lossbalance.methods._famo import FAMO
        >>> famo = FAMO(2)
        >>> combined = famo(torch.tensor([1.0, 4.0], requires_grad=True))
        >>> famo.last_weights  # z = (1/2, 1/2): w proportional to 1 / L
        tensor([0.8000, 0.2000])
        >>> famo.update(torch.tensor([0.5, 3.9]))  # term 0 decreased faster
        >>> bool(famo.logits[1] > famo.logits[0])
        True

    Differences from the paper / the authors' code:
        - The authors add 1e-8 to ``L - b``; here ``L - b`` is clamped at a tiny positive
          floor (with a warning) so that a loss at its bound stays finite without biasing
          every other loss.
        - The authors' example clips the model's gradient norm at 1 after the backward;
          that belongs to the training loop (``torch.nn.utils.clip_grad_norm_``), not here.
        - The paper writes the logit step as plain gradient descent with decay gamma; the
          authors' code (and LibMTL) use Adam, as here.
    """

    logits: Tensor
    prev_losses: Tensor
    min_losses: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor

    def __init__(
        self,
        num_terms: int,
        lr: float = 0.025,
        gamma: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        min_losses: float | list[float] | tuple[float, ...] | Tensor = 0.0,
        *,
        delayed: bool = False,
    ) -> None:
        super().__init__(num_terms)
        check_positive("lr", lr)
        check_nonneg("gamma", gamma)
        check_positive("eps", eps)
        check_beta("betas[0]", betas[0])
        check_beta("betas[1]", betas[1])
        for name, value in (("lr", lr), ("gamma", gamma), ("eps", eps)):
            if not math.isfinite(value):
                raise ValueError(f"Invalid {name}: {value} (expected a finite value)")
        bounds = torch.as_tensor(min_losses, dtype=torch.float64).detach().clone()
        if bounds.dim() == 0:
            bounds = bounds.expand(num_terms).clone()
        if tuple(bounds.shape) != (num_terms,) or not bool(torch.isfinite(bounds).all()):
            raise ValueError(
                f"Invalid min_losses: {min_losses!r} (expected a finite float or {num_terms} "
                "finite values)"
            )
        self.lr = float(lr)
        self.gamma = float(gamma)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.delayed = bool(delayed)
        f64 = torch.float64
        self.register_buffer("logits", torch.zeros(num_terms, dtype=f64))
        self.register_buffer("min_losses", bounds)
        self.register_buffer("prev_losses", torch.full((num_terms,), math.nan, dtype=f64))
        self.register_buffer("exp_avg", torch.zeros(num_terms, dtype=f64))
        self.register_buffer("exp_avg_sq", torch.zeros(num_terms, dtype=f64))
        self.register_buffer("step", torch.zeros((), dtype=f64))
        if num_terms == 1:
            warn_once("famo-one-term", "FAMO with num_terms=1 has nothing to balance: w = 1")

    def forward(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        pending = bool(torch.isfinite(self.prev_losses).all())
        if self.delayed and pending:
            self.update(losses.detach())
        elif pending:
            warn_once(
                self._warning_key("famo-no-update"),
                "FAMO.forward was called again without FAMO.update(new_losses) in between: "
                "the logits were not updated for the previous step (or pass delayed=True)",
            )
        combined, weights = famo_loss(
            losses, self.logits, self.min_losses, warn_key=self._warning_key("famo-nonpositive")
        )
        self.prev_losses.copy_(losses.detach().to(self.prev_losses))
        self._record(weights)
        return combined

    @torch.no_grad()
    def update(self, losses: Tensor | Sequence[Tensor]) -> None:
        """Step the logits with the losses ``L(t+1)`` measured after the model's step.

        Args:
            losses: the K losses recomputed after ``optimizer.step()`` (on the same
                batch for the exact rule), a 1-D tensor or a sequence of scalars;
                detached inside.

        Raises:
            RuntimeError: if no ``forward`` came before this call (nothing to compare).
        """
        losses = (
            losses.detach()
            if isinstance(losses, Tensor)
            else stack_losses(losses, require_grad=False)
        )
        self._check_terms(losses)
        if not bool(torch.isfinite(self.prev_losses).all()):
            raise RuntimeError(
                "FAMO.update(losses) needs the losses of a forward() before the model's step; "
                "call balancer(losses) (or lossbalance.backward) first, once per update"
            )
        floor = positive_floor(torch.float64)
        new = losses.to(self.prev_losses)
        if not bool(torch.isfinite(new).all()):
            warn_once(
                self._warning_key("famo-nonfinite"),
                "FAMO.update got non-finite losses; the logits are left unchanged this step",
            )
            self.prev_losses.fill_(math.nan)
            return
        if bool(((new - self.min_losses) < floor).any()):
            warn_once(
                self._warning_key("famo-nonpositive"),
                f"FAMO got a loss at or below its lower bound (L - b <= {floor:.3g}); it is "
                "clamped there before the log",
            )
        before = torch.log((self.prev_losses - self.min_losses).clamp_min(floor))
        after = torch.log((new - self.min_losses).clamp_min(floor))
        grad = famo_logit_grad(self.logits, before - after)
        self._adam(grad)
        self.prev_losses.fill_(math.nan)

    def _adam(self, grad: Tensor) -> None:
        # torch.optim.Adam (single-tensor, amsgrad off, coupled weight decay), in float64
        beta1, beta2 = self.betas
        if self.gamma != 0.0:
            grad = grad.add(self.logits, alpha=self.gamma)
        self.step.add_(1)
        step = float(self.step)
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1**step
        bias2_sqrt = math.sqrt(1 - beta2**step)
        denom = (self.exp_avg_sq.sqrt() / bias2_sqrt).add_(self.eps)
        self.logits.addcdiv_(self.exp_avg, denom, value=-self.lr / bias1)

    @property
    def task_weights(self) -> Tensor:
        """``z = softmax(xi)``, the current task weights before the 1 / (L - b) factor."""
        return torch.softmax(self.logits, dim=0)

    def extra_repr(self) -> str:
        return (
            f"num_terms={self.num_terms}, lr={self.lr}, gamma={self.gamma}, delayed={self.delayed}"
        )


register(
    MethodInfo(
        name="famo",
        factory=FAMO,
        needs="losses",
        stateful=True,
        paper="Liu et al., NeurIPS 2023",
        summary="learned logits balancing the log-loss decrease rates (update() after step)",
    )
)
