"""Gradient normalisation and GradNorm: balancing by the per-term gradient magnitudes."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from lossbalance._base import GradientBalancer, gramian
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_nonneg, warn_once
from lossbalance.methods._blas import single_blas_thread
from lossbalance.methods._mgda import (
    check_gramian,
    check_losses,
    check_matrix,
    gramian_to_numpy,
    to_weights,
    warn_degenerate,
)

__all__ = [
    "GradNorm",
    "GradNormalization",
    "grad_normalization_weights",
    "grad_normalization_weights_from_gramian",
    "gradnorm_weights",
    "gradnorm_weights_from_gramian",
]


# ----------------------------------------------------------------------------------------
# Gradient normalisation
# ----------------------------------------------------------------------------------------


@single_blas_thread
def _grad_normalization(gram: Tensor, method: str) -> Tensor:
    m = gramian_to_numpy(gram)
    diag = np.diag(m).copy()
    zero = warn_degenerate(method, diag)
    alpha = np.zeros(m.shape[0])
    alpha[~zero] = 1.0 / np.sqrt(diag[~zero])
    return to_weights(alpha, gram)


def grad_normalization_weights_from_gramian(gram: Tensor) -> Tensor:
    """Gradient-normalisation weights from the K x K Gramian; see
    :func:`grad_normalization_weights`."""
    check_gramian(gram)
    return _grad_normalization(gram, "grad-normalization")


def grad_normalization_weights(matrix: Tensor) -> Tensor:
    r"""Unit-norm gradients: ``alpha_i = 1 / ||g_i||``, so the update is sum_i g_i/||g_i||.

    The ``"l2"`` gradient normaliser of Sener & Koltun's MGDA code (NeurIPS 2018), used
    alone as a baseline: every term contributes a step of the same length. With g_i the
    rows of ``matrix``,

    .. math::
        \alpha_i = 1 / \|g_i\|, \qquad \sum_i \alpha_i g_i = \sum_i g_i / \|g_i\|.

    A zero gradient gets alpha_i = 0 (its direction is undefined) and warns once.

    Args:
        matrix: K x P per-term gradients, rows are terms.

    Returns:
        alpha, shape ``(K,)``, float64.

    Example:
        >>> import torch
        >>> from lossbalance.functional import grad_normalization_weights
        >>> grad_normalization_weights(torch.tensor([[3.0, 4.0], [0.0, 0.5]]))
        tensor([0.2000, 2.0000], dtype=torch.float64)
    """
    check_matrix(matrix)
    return grad_normalization_weights_from_gramian(gramian(matrix))


class GradNormalization(GradientBalancer):
    r"""Unit-norm gradients: the shared parameters receive ``sum_i g_i / ||g_i||``.

    The ``"l2"`` normaliser of Sener & Koltun's MGDA code (NeurIPS 2018) as a method of its
    own; the math is in :func:`grad_normalization_weights`. Stateless.

    Args:
        num_terms: K >= 1.

    Example:
        >>> import torch
        >>> from lossbalance import GradNormalization
        >>> G = torch.tensor([[3.0, 4.0], [0.0, 0.5]], dtype=torch.float64)
        >>> GradNormalization(2).weights(G @ G.T, torch.ones(2))
        tensor([0.2000, 2.0000], dtype=torch.float64)
    """

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        return self._record(_grad_normalization(gramian, "grad-normalization"))


# ----------------------------------------------------------------------------------------
# GradNorm
# ----------------------------------------------------------------------------------------


def _inverse_training_rates(
    losses: Tensor | None,
    initial_losses: Tensor | None,
    k: int,
    method: str,
    key: str | None = None,
) -> Tensor:
    """r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0)), float64 on the CPU.

    ``key`` prefixes the once-only warning keys (``method`` by default); a balancer passes
    its own, since bad losses are a condition of that balancer's terms.
    """
    key = method if key is None else key
    if losses is None:
        return torch.ones(k, dtype=torch.float64)
    ratio = losses.clone()
    if initial_losses is not None:
        valid = torch.isfinite(initial_losses) & (initial_losses > 0)
        if not bool(valid.all()):
            warn_once(
                f"{key}:initial-loss",
                f"{method}: initial loss(es) of term(s) "
                f"{torch.nonzero(~valid).flatten().tolist()} are zero, negative or not "
                "finite; their training rate is taken as 1",
                stacklevel=4,
            )
        ratio = torch.where(valid, losses / torch.where(valid, initial_losses, 1.0), 1.0)
    mean = ratio.mean()
    if not bool(torch.isfinite(mean) & (mean > 0)):
        warn_once(
            f"{key}:training-rate",
            f"{method}: the mean loss ratio is {float(mean)}, so the inverse training rates "
            "are undefined; using equal rates",
            stacklevel=4,
        )
        return torch.ones(k, dtype=torch.float64)
    return ratio / mean


@single_blas_thread
def gradnorm_weights_from_gramian(
    gram: Tensor,
    losses: Tensor | None = None,
    initial_losses: Tensor | None = None,
    alpha: float = 1.5,
) -> Tensor:
    """GradNorm's fixed point from the K x K Gramian; see :func:`gradnorm_weights`."""
    check_gramian(gram)
    check_nonneg("alpha", alpha)
    k = gram.shape[0]
    rates = _inverse_training_rates(
        check_losses(losses, k),
        check_losses(initial_losses, k, "initial_losses"),
        k,
        "gradnorm",
    )
    diag = np.diag(gramian_to_numpy(gram)).copy()
    zero = warn_degenerate("gradnorm", diag)
    w = np.zeros(k)
    if zero.all():
        return to_weights(np.ones(k), gram)
    live = ~zero
    w[live] = rates.numpy()[live] ** alpha / np.sqrt(diag[live])
    return to_weights(w * (k / w.sum()), gram)


def gradnorm_weights(
    matrix: Tensor,
    losses: Tensor | None = None,
    initial_losses: Tensor | None = None,
    alpha: float = 1.5,
) -> Tensor:
    r"""The GradNorm fixed point: weighted gradient norms in the ratio of r_i^alpha.

    Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive
    Loss Balancing in Deep Multitask Networks", ICML 2018, Sec. 3.2. GradNorm's target for
    the weighted norm ``w_i ||g_i||`` is ``mean_j(w_j ||g_j||) r_i^alpha`` with the inverse
    training rates ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))``; its weight updates
    move ``w`` towards the point where the weighted norms have the target's ratios, here
    in closed form and normalised like GradNorm's weights:

    .. math::
        w_i = K \frac{r_i^{\alpha} / \|g_i\|}{\sum_j r_j^{\alpha} / \|g_j\|}.

    There the L1 loss of :class:`GradNorm` is exactly 0 when ``sum_i r_i^alpha = K``
    (``alpha`` in {0, 1}, or equal rates); otherwise every term is off its target by the
    same factor, which the renormalisation ``sum w = K`` absorbs.

    Args:
        matrix: K x P per-term gradients, rows are terms (in the paper, the gradients of
            the last shared layer).
        losses: the current losses L_i, shape ``(K,)``; ``None`` (default) means equal
            training rates, i.e. equal weighted norms.
        initial_losses: L_i(0), shape ``(K,)``; ``None`` (default) takes ``losses`` as
            already relative (``L_i(0) = 1``).
        alpha: the asymmetry, >= 0 (default 1.5). ``alpha = 0`` asks for equal weighted
            norms ``w_i ||g_i||`` whatever the losses.

    Returns:
        w, shape ``(K,)``, float64, summing to K. A zero gradient gets weight 0 (and warns
        once); nothing can equalise its norm.

    Example:
        >>> import torch
        >>> from lossbalance.functional import gradnorm_weights
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
        >>> gradnorm_weights(G, alpha=0.0)
        tensor([1.5000, 0.5000], dtype=torch.float64)
    """
    check_matrix(matrix)
    return gradnorm_weights_from_gramian(gramian(matrix), losses, initial_losses, alpha)


class GradNorm(GradientBalancer):
    r"""GradNorm: learnable task weights trained to equalise the weighted gradient norms.

    Chen, Badrinarayanan, Lee, Rabinovich, ICML 2018, Sec. 3.2 and Algorithm 1. The task
    weights ``w = self.task_weights`` (an ``nn.Parameter``, init 1) are trained by the
    user's optimizer. Each call of ``weights(gramian, losses)``:

    1. renormalises ``w`` in place to ``sum_i w_i = K`` (the paper renormalises after each
       update; weights pushed below 0 are clamped to 0 first);
    2. records ``L_i(0) = losses`` on the first call (buffer ``initial_losses``);
    3. with ``G_W^{(i)} = w_i ||g_i||`` (norms from the Gramian's diagonal, detached),
       ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))`` and the constant target
       ``T_i = mean_j(G_W^{(j)}) r_i^alpha``, computes

       .. math:: L_{grad} = \sum_i |G_W^{(i)} - T_i|

       and backpropagates it into ``w.grad`` only (accumulating, like any backward);
    4. returns ``w`` (detached, float64) as the weights alpha.

    :func:`gradnorm_weights` gives the fixed point these updates move towards.

    Args:
        num_terms: K >= 1.
        alpha: the asymmetry, >= 0 (default 1.5; 0 asks for equal weighted norms).

    Attributes:
        last_grad_loss: L_grad of the last call (detached), for logging.

    Example:
        >>> import torch
        >>> from lossbalance import GradNorm
        >>> balancer = GradNorm(2, alpha=0.0)
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> balancer.weights(G @ G.T, torch.ones(2))
        tensor([1., 1.], dtype=torch.float64)
        >>> balancer.task_weights.grad  # d L_grad / d w = sign(w_i n_i - 2) n_i
        tensor([-1.,  3.])

    Differences from the paper: GradNorm uses the gradients of the last shared layer;
    here they are those of the shared parameters the engine is given (pass the last shared
    layer to match the paper). As in the paper the loss is sum_i w_i L_i, so the heads
    receive w_i times their term's gradient too (``weights_heads = True``; the other
    gradient-level methods leave the heads unweighted).
    """

    weights_heads = True
    initial_losses: Tensor
    num_steps: Tensor

    def __init__(self, num_terms: int, alpha: float = 1.5) -> None:
        super().__init__(num_terms)
        check_nonneg("alpha", alpha)
        self.alpha = float(alpha)
        self.task_weights = nn.Parameter(torch.ones(num_terms))
        self.register_buffer("initial_losses", torch.zeros(num_terms, dtype=torch.float64))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.last_grad_loss: Tensor | None = None

    @torch.no_grad()
    def _renormalize(self) -> None:
        w = self.task_weights
        w.clamp_(min=0.0)
        total = w.sum()
        if not bool(torch.isfinite(total) & (total > 0)):
            warn_once(
                self._warning_key("gradnorm:weights-reset"),
                f"gradnorm: the task weights sum to {float(total)}; resetting them to 1 "
                "(is the learning rate of the task weights too large?)",
                stacklevel=4,
            )
            w.fill_(1.0)
        else:
            w.mul_(self.num_terms / total)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        self._renormalize()
        current = losses.detach().to(self.initial_losses)
        if int(self.num_steps) == 0:
            self.initial_losses.copy_(current)
        self.num_steps += 1

        diag = gramian.detach().to(torch.float64).diagonal()
        warn_degenerate("gradnorm", diag.cpu().numpy())
        norms = diag.clamp(min=0.0).sqrt()
        rates = _inverse_training_rates(
            current.cpu(),
            self.initial_losses.cpu(),
            self.num_terms,
            "gradnorm",
            self._warning_key("gradnorm"),
        ).to(norms.device)
        w = self.task_weights
        with torch.enable_grad():
            weighted = w.to(norms.device, torch.float64) * norms
            target = weighted.detach().mean() * rates.pow(self.alpha)
            grad_loss = (weighted - target).abs().sum()
            if bool(torch.isfinite(grad_loss)):
                torch.autograd.backward(grad_loss, inputs=[w])
            else:
                warn_once(
                    self._warning_key("gradnorm:non-finite"),
                    "gradnorm: L_grad is not finite (non-finite losses or gradients); "
                    "the task weights get no gradient this step",
                    stacklevel=3,
                )
        self.last_grad_loss = grad_loss.detach()
        return self._record(w.detach().to(gramian.device, torch.float64).clone())

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, alpha={self.alpha}"


register(
    MethodInfo(
        name="grad-normalization",
        factory=GradNormalization,
        needs="gramian",
        stateful=False,
        paper="baseline ('l2' normaliser of Sener & Koltun's code, NeurIPS 2018)",
        summary="unit-norm per-term gradients: sum_i g_i / ||g_i||",
    )
)
register(
    MethodInfo(
        name="gradnorm",
        factory=GradNorm,
        needs="gramian",
        stateful=True,
        paper="Chen et al., ICML 2018",
        summary="learnable task weights trained so weighted gradient norms track training rates",
    )
)
