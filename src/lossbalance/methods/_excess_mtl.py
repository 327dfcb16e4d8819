"""ExcessMTL (He et al., ICML 2024): task weights from AdaGrad estimates of excess risks.

Not a function of the Gramian: the excess-risk estimate weighs every coordinate of g_i by
its own AdaGrad accumulator, so it needs the K x P per-term gradients themselves: a
:class:`~lossbalance.VectorBalancer` (see :meth:`ExcessMTL.weights_from_grads`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_positive, warn_once
from lossbalance.engine._graph import combine_stack
from lossbalance.methods._normalization import positive_floor
from lossbalance.methods._vector import VectorBalancer, flat_stack

#: added under the square root of the accumulated squares, as the authors' code
ADAGRAD_EPS = 1e-7


def excess_risks(grads: Tensor, sq_sum: Tensor, eps: float = ADAGRAD_EPS) -> Tensor:
    """``E_i = sum_j g_ij^2 / sqrt(S_ij + eps)``: ``g_i^T H_i^-1 g_i`` with AdaGrad's H.

    Args:
        grads: the K x P per-term gradients of the shared parameters (rows = terms).
        sq_sum: S, the K x P sums of their squares so far, this step's included.
        eps: added under the square root, >= 0.

    Returns:
        The K estimates (float64), each >= 0.
    """
    g = grads.to(torch.float64)
    return (g * g / torch.sqrt(sq_sum.to(torch.float64) + eps)).sum(dim=1)


def excess_mtl_update(weights: Tensor, ratios: Tensor, step_size: float) -> Tensor:
    """The exponentiated-gradient step ``w_i <- w_i exp(eta r_i) / sum_j w_j exp(eta r_j)``.

    Computed as ``softmax(log w + eta r)``, which saturates instead of overflowing.
    """
    return torch.softmax(torch.log(weights) + step_size * ratios, dim=0)


class ExcessMTL(VectorBalancer):
    r"""Robust MTL with excess risks: weights raised where a term's excess risk is large.

    He, Zhou, Zhao & Han, "Robust Multi-Task Learning with Excess Risks", ICML 2024
    (arXiv 2402.02009), Eqs. (6), (7), (9) and Algorithm 1. With g_i(t) the gradient of
    term i with respect to the shared parameters at step t::

        S_i(t)  = sum_{tau <= t} g_i(tau)^2                (AdaGrad accumulator, Eq. 7)
        E_i(t)  = g_i(t)^T diag(sqrt(S_i(t) + eps))^-1 g_i(t)    (excess risk, Eq. 6)
        r_i(t)  = E_i(t) / E_i(0)                          (scale processing, Sec. 3.2)
        w_i    <- w_i exp(eta r_i(t)) / sum_j w_j exp(eta r_j(t))   (Eq. 9)

    w starts uniform on the simplex, eta is ``step_size``, and E_i(0) is the mean of E_i
    over the first ``warmup_steps`` calls, during which w stays uniform. The model's
    loss is ``sum_i w_i L_i``: every parameter, heads included, gets its terms'
    gradients times w (``weights_heads``).

    **Why not a Gramian weighting.** E_i weighs each coordinate of g_i by its own
    accumulator sqrt(S_ij): it is not a function of the inner products <g_i, g_j> (two
    gradients of equal norm have different E_i), so ``weights(gramian, losses)`` cannot
    compute it. ``lossbalance.backward`` (modes ``"exact"``/``"batched"``, also under
    :class:`lossbalance.Accumulator` and ``torch.distributed``) hands :meth:`combine` the
    per-term gradients of the shared parameters, which calls :meth:`weights_from_grads`
    and returns :math:`\sum_i w_i g_i`; the heads get :math:`\sum_i w_i \partial L_i /
    \partial \theta`. :meth:`weights_from_grads` also serves a hand-written loop, with the
    stacks of ``lossbalance.term_grads``.

    State (buffers, float64): ``task_weights`` (w), ``sq_sum`` (S, K x P; sized at the
    first call), ``baseline`` (E(0), NaN until the warm-up ends), ``warmup_sum`` and
    ``num_steps``.

    Args:
        num_terms: K >= 1, the number of loss terms.
        step_size: eta > 0 (LibMTL's ``robust_step_size``; default 1.0, TorchJD's).
        warmup_steps: calls that estimate E(0), an integer >= 1 (default 1: the first
            call's estimate, as the authors' code; the paper's appendix C.1 collects three
            epochs).

    Example:
        >>> import torch, lossbalance
        >>> from lossbalance.methods._excess_mtl import ExcessMTL
        >>> w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
        >>> balancer = ExcessMTL(2, step_size=1.0)
        >>> for target in (0.0, 0.1):
        ...     losses = [(w - target).pow(2).sum(), (w + 1).abs().sum()]
        ...     (g,) = lossbalance.term_grads(losses, [w])
        ...     alpha = balancer.weights_from_grads(g, torch.stack(losses).detach())
        >>> round(float(alpha.sum()), 6)
        1.0

    Differences from the paper / the authors' code:
        - The authors' code and LibMTL start from w = 1 and renormalise to sum K; here
          w is on the simplex (as in the paper and TorchJD): K times smaller steps.
        - The authors divide by E_i(0) as it is; a zero E_i(0) (a term with no gradient
          during the warm-up) is clamped at a tiny floor, with a warning.
    """

    weights_heads = True

    task_weights: Tensor
    sq_sum: Tensor
    baseline: Tensor
    warmup_sum: Tensor
    num_steps: Tensor

    lazy_buffers: ClassVar[dict[str, int]] = {"sq_sum": 1}

    def __init__(self, num_terms: int, step_size: float = 1.0, warmup_steps: int = 1) -> None:
        super().__init__(num_terms)
        check_positive("step_size", step_size)
        if not math.isfinite(step_size):
            raise ValueError(f"Invalid step_size: {step_size} (expected 0 < step_size < inf)")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (expected an integer >= 1)")
        self.step_size = float(step_size)
        self.warmup_steps = warmup_steps
        f64 = torch.float64
        self.register_buffer("task_weights", torch.full((num_terms,), 1.0 / num_terms, dtype=f64))
        self.register_buffer("sq_sum", torch.zeros(num_terms, 0, dtype=f64))
        self.register_buffer("baseline", torch.full((num_terms,), math.nan, dtype=f64))
        self.register_buffer("warmup_sum", torch.zeros(num_terms, dtype=f64))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))
        if num_terms == 1:
            warn_once("excess-mtl-one-term", "ExcessMTL with num_terms=1 has nothing to balance")

    def combine(
        self,
        grads: list[Tensor],
        losses: Tensor,
        *,
        inputs: list[Tensor],
        features: bool,
    ) -> tuple[list[Tensor], Tensor]:
        """``(sum_i w_i g_i per tensor, w)`` with w from :meth:`weights_from_grads`."""
        self._check_terms(losses)
        w = self.weights_from_grads(grads, losses)
        return [combine_stack(w, g) for g in grads], w

    @torch.no_grad()
    def weights_from_grads(
        self, grads: Tensor | Sequence[Tensor | None], losses: Tensor | None = None
    ) -> Tensor:
        """Update the state with this step's per-term gradients and return w.

        Args:
            grads: the K x P matrix of per-term gradients of the shared parameters, or
                the per-parameter stacks ``(K, *p.shape)`` that ``lossbalance.term_grads``
                returns (``None`` entries, parameters no term reaches, are skipped). The
                layout must be the same at every call.
            losses: unused (the loss values do not enter the rule); accepted for
                symmetry with ``weights``.

        Returns:
            w, the K weights (on the simplex, float64) to apply to the losses.
        """
        del losses
        matrix = self._as_matrix(grads)
        self._sized("sq_sum", matrix.shape, matrix, "per-term gradients")
        if not bool(torch.isfinite(matrix).all()):
            warn_once(
                "excess-mtl-nonfinite",
                "ExcessMTL got non-finite per-term gradients; its state is left unchanged and "
                "the current weights are returned",
            )
            return self._record(self.task_weights.clone())
        self.sq_sum.addcmul_(matrix, matrix)
        risks = excess_risks(matrix, self.sq_sum)
        step = int(self.num_steps)
        self.num_steps.add_(1)
        if step < self.warmup_steps:
            self.warmup_sum.add_(risks)
            if step + 1 == self.warmup_steps:
                self._set_baseline()
            return self._record(self.task_weights.clone())
        ratios = risks / self.baseline
        self.task_weights.copy_(excess_mtl_update(self.task_weights, ratios, self.step_size))
        return self._record(self.task_weights.clone())

    def _set_baseline(self) -> None:
        mean = self.warmup_sum / self.warmup_steps
        floor = positive_floor(torch.float64)
        if bool((mean < floor).any()):
            warn_once(
                "excess-mtl-zero-baseline",
                "ExcessMTL: a term had no gradient during the warm-up (excess risk 0); its "
                f"baseline is clamped at {floor:.3g}, so its weight rises fast once it has one",
            )
        self.baseline.copy_(mean.clamp_min(floor))

    def _as_matrix(self, grads: Tensor | Sequence[Tensor | None]) -> Tensor:
        k = self.num_terms
        if isinstance(grads, Tensor):
            parts = [grads]
        else:
            parts = [g for g in grads if g is not None]
        if not parts or any(p.dim() < 1 or p.shape[0] != k for p in parts):
            shapes = [tuple(p.shape) for p in parts]
            raise ValueError(
                f"ExcessMTL expects per-term gradients with {k} rows (K x P, or stacks "
                f"(K, *p.shape)), got shapes {shapes}"
            )
        return flat_stack([p.detach() for p in parts], torch.float64, self.sq_sum.device)

    def extra_repr(self) -> str:
        return (
            f"num_terms={self.num_terms}, step_size={self.step_size}, "
            f"warmup_steps={self.warmup_steps}"
        )


register(
    MethodInfo(
        name="excess-mtl",
        factory=ExcessMTL,
        needs="grads",
        stateful=True,
        paper="He et al., ICML 2024",
        summary="exponentiated-gradient weights from AdaGrad estimates of excess risks",
    )
)
