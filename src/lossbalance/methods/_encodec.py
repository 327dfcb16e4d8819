"""EnCodec's loss balancer (Défossez et al., 2022): output gradients rescaled to set shares."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lossbalance._base import GradientBalancer
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_beta, check_nonneg, check_positive, warn_once


def encodec_weights(
    norm_avg: Tensor, ratios: Tensor, total_norm: float = 1.0, eps: float = 1e-12
) -> Tensor:
    """``alpha_i = r_i total_norm / (eps + n_i)`` with ``r = ratios / sum(ratios)``.

    Args:
        norm_avg: n, the K averaged norms of the per-term output gradients.
        ratios: the K desired shares (positive; normalised to sum to 1 here).
        total_norm: the norm the summed gradient is given, > 0.
        eps: added to the norms, >= 0.

    Returns:
        The K coefficients of the per-term output gradients: each term's rescaled
        gradient ``alpha_i g_i`` has norm ``r_i total_norm n_i / (eps + n_i)``, about
        ``r_i total_norm`` when ``||g_i|| = n_i``.
    """
    r = ratios.to(norm_avg) / ratios.sum()
    return r * total_norm / (eps + norm_avg)


def encodec_weights_from_gramian(
    gramian: Tensor, ratios: Tensor, total_norm: float = 1.0, eps: float = 1e-12
) -> Tensor:
    """:func:`encodec_weights` with the current norms ``sqrt(diag(G))`` (no averaging)."""
    return encodec_weights(gramian.diagonal().clamp_min(0.0).sqrt(), ratios, total_norm, eps)


class EnCodecBalancer(GradientBalancer):
    """EnCodec's balancer: each term's output gradient gets a fixed share of a set norm.

    Défossez, Copet, Synnaeve & Adi, "High Fidelity Neural Audio Compression", 2022
    (arXiv 2210.13438), Sec. 3.4 (the loss balancer). With g_i = dL_i/dy the gradient of term i
    with respect to the model's output y, ``<||g_i||>`` its norm averaged by an
    exponential moving average of decay beta (``ema_decay``), and r_i = lambda_i /
    sum_j lambda_j the desired shares (``weights``)::

        y.grad = sum_i r_i total_norm g_i / (eps + <||g_i||>)

    and this one output gradient is backpropagated once through the model. Each term
    then supplies a share r_i of the output gradient's norm, whatever the scale of its
    loss: scaling L_i by s scales g_i and <||g_i||> by s.

    **How it fits the engine.** The coefficients depend on the per-term gradients only
    through their norms ``||g_i||^2 = G_ii``, the Gramian's diagonal, so this is a
    :class:`~lossbalance.GradientBalancer` for the engine's feature mode: pass the
    output as the features, the model as ``shared``::

        output = model(x)
        losses = [l1(output, x), l2(output, x), adversarial(output)]
        lossbalance.backward(losses, balancer, shared=model, features=output)

    The engine differentiates each term with respect to ``output`` only (K passes
    through the loss functions), and then the model once. Under ``torch.distributed``
    the Gramian of the whole batch is summed over ranks, so every rank uses the norm
    of the whole batch's output gradient (the authors average the ranks' norms).
    Without ``features`` the same rule rescales the per-term gradients of the shared
    parameters instead (a parameter-level variant, not EnCodec's).

    The moving average is the bias-corrected one of the authors' code: ``n_i = (sum_t
    beta^(T-t) ||g_i(t)||) / (sum_t beta^(T-t))``, the plain mean of the norms so far when
    beta = 1 and the current norm when beta = 0.

    State (buffers, float64): ``norm_sum`` (K) and ``norm_count``, the decayed sums.

    Args:
        num_terms: K >= 1, the number of loss terms.
        weights: lambda, K positive numbers (normalised to shares), or ``None``
            (default: equal shares).
        total_norm: the norm the output gradient is given, > 0 (default 1.0).
        ema_decay: beta, 0 <= beta <= 1 (default 0.999, the authors').
        eps: added to the averaged norm, >= 0 (default 1e-12, the authors').

    Example:
        >>> import torch, lossbalance
        >>> from lossbalance.methods._encodec import EnCodecBalancer
        >>> model = torch.nn.Linear(4, 4)
        >>> balancer = EnCodecBalancer(2, weights=[3.0, 1.0])
        >>> y = model(torch.randn(8, 4))
        >>> losses = [y.pow(2).mean(), 1000 * y.abs().mean()]
        >>> alpha = lossbalance.backward(losses, balancer, shared=model, features=y)
        >>> g = [torch.autograd.grad(loss, y, retain_graph=True)[0] for loss in losses]
        >>> [round(float(a * gi.norm()), 4) for a, gi in zip(alpha, g)]  # shares of 1
        [0.75, 0.25]

    Differences from the paper / the authors' code:
        - The authors' default takes the norm per batch item and averages it over the
          batch (``per_batch_item=True``); the engine's Gramian holds the norm of the
          whole batch's output gradient, which is what is used here (their
          ``per_batch_item=False``). For B items of similar norms the two differ by
          about sqrt(B): multiply ``total_norm`` by sqrt(B) for their scale.
        - Leaves between the output and the losses that ``shared`` does not list (a
          discriminator's parameters, say) get their unweighted gradients, as the heads
          do in feature mode; the authors backpropagate only the output gradient.
          Zero them, or compute those losses with the discriminator frozen.
        - The authors' ``rescale_grads=False`` (plain weighted sum) is
          :class:`~lossbalance.FixedWeights`.
    """

    ratios: Tensor
    norm_sum: Tensor
    norm_count: Tensor

    def __init__(
        self,
        num_terms: int,
        weights: Sequence[float] | Tensor | None = None,
        total_norm: float = 1.0,
        ema_decay: float = 0.999,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(num_terms)
        if weights is None:
            ratios = torch.ones(num_terms, dtype=torch.float64)
        else:
            ratios = torch.as_tensor(weights, dtype=torch.float64).detach().clone()
            if (
                tuple(ratios.shape) != (num_terms,)
                or not bool(torch.isfinite(ratios).all())
                or not bool((ratios > 0).all())
            ):
                raise ValueError(
                    f"Invalid weights: {weights!r} (expected {num_terms} finite values > 0)"
                )
        check_positive("total_norm", total_norm)
        if not math.isfinite(total_norm):
            raise ValueError(f"Invalid total_norm: {total_norm} (expected 0 < total_norm < inf)")
        if ema_decay != 1.0:
            check_beta("ema_decay", ema_decay)
        check_nonneg("eps", eps)
        if not math.isfinite(eps):
            raise ValueError(f"Invalid eps: {eps} (expected 0 <= eps < inf)")
        self.total_norm = float(total_norm)
        self.ema_decay = float(ema_decay)
        self.eps = float(eps)
        self.register_buffer("ratios", ratios)
        self.register_buffer("norm_sum", torch.zeros(num_terms, dtype=torch.float64))
        self.register_buffer("norm_count", torch.zeros((), dtype=torch.float64))

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        norms = gramian.detach().to(self.norm_sum).diagonal().clamp_min(0.0).sqrt()
        self.norm_sum.mul_(self.ema_decay).add_(norms)
        self.norm_count.mul_(self.ema_decay).add_(1.0)
        average = self.norm_sum / self.norm_count
        if bool((average == 0).any()) and self.eps == 0.0:
            warn_once(
                "encodec-zero-norm",
                "EnCodecBalancer: a term's output gradient has been zero so far and eps = 0; "
                "its coefficient is set to 0",
            )
            alpha = encodec_weights(average.clamp_min(1.0), self.ratios, self.total_norm)
            alpha = torch.where(average == 0, torch.zeros_like(alpha), alpha)
        else:
            alpha = encodec_weights(average, self.ratios, self.total_norm, self.eps)
        return self._record(alpha.to(gramian.dtype))

    def extra_repr(self) -> str:
        return (
            f"num_terms={self.num_terms}, total_norm={self.total_norm}, "
            f"ema_decay={self.ema_decay}, eps={self.eps}"
        )


register(
    MethodInfo(
        name="encodec",
        factory=EnCodecBalancer,
        needs="gramian",
        stateful=True,
        paper="Défossez et al., 2022",
        summary="EnCodec: output gradients rescaled to fixed shares of a total norm (EMA)",
    )
)
