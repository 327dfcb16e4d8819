"""MetaBalance (He et al., WWW 2022): auxiliary gradients scaled to the target's, per layer.

Not a Gramian weighting: the coefficients differ from one parameter tensor to the next, so
the shared parameters do not receive one combination ``sum_i alpha_i g_i``. It needs the
per-term gradients of every shared tensor (``lossbalance.term_grads``), as MTAdam does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lossbalance._engine import reachable_leaves, term_grads
from lossbalance._validation import as_loss_list, check_beta, warn_once


def metabalance_coefficients(
    norms: Tensor, ema: Tensor, relax_factor: float = 0.7, beta: float = 0.9
) -> tuple[Tensor, Tensor]:
    """The per-(term, tensor) coefficients of MetaBalance and the updated norm averages.

    ``m_ip <- beta m_ip + (1 - beta) ||g_ip||`` and
    ``c_ip = r m_0p / m_ip + (1 - r)`` (term 0 is the target: ``c_0p = 1``); where
    ``m_ip = 0`` (term i has had no gradient in tensor p) ``c_ip = 1``.

    Args:
        norms: the K x T norms ``||g_ip||`` of this step (term i, tensor p).
        ema: m, the K x T moving averages before this step.
        relax_factor: r in [0, 1].
        beta: the moving average's decay in [0, 1).

    Returns:
        ``(coefficients, new_ema)``, both K x T float64.
    """
    m = ema.to(torch.float64) * beta + (1.0 - beta) * norms.to(torch.float64)
    ratio = torch.where(m > 0, m[:1] / torch.where(m > 0, m, torch.ones_like(m)), 1.0)
    coefficients = relax_factor * ratio + (1.0 - relax_factor)
    coefficients = torch.where(m > 0, coefficients, torch.ones_like(coefficients))
    coefficients[0] = 1.0
    return coefficients, m


class MetaBalance(nn.Module):
    """MetaBalance: each auxiliary gradient pulled toward the target's magnitude, per layer.

    He, Feng, Cheng, Zhang, Zhao, Xu & Lu, "MetaBalance: Improving Multi-Task
    Recommendations via Adapting Gradient Magnitudes of Auxiliary Tasks", WWW 2022
    (arXiv 2203.06801), Algorithm 1. Term 0 is the target, terms 1..K-1 auxiliary; for
    every shared parameter tensor p, with g_ip = dL_i/dp::

        m_ip  <- beta m_ip + (1 - beta) ||g_ip||
        g_ip  <- r (m_0p / m_ip) g_ip + (1 - r) g_ip         (i >= 1)
        p.grad += sum_i g_ip

    r is ``relax_factor`` (r = 1: every auxiliary gradient gets the target's average
    magnitude in each layer; r = 0: the plain sum). Parameters outside ``shared``
    (heads) receive the plain sum of their terms' gradients.

    **Why not a GradientBalancer.** The coefficients c_ip differ per tensor, so the
    shared parameters do not receive one combination ``sum_i alpha_i g_i`` of the
    per-term gradients, and the norms per tensor (the Gramian's diagonal per layer) are
    not what the engine builds. :meth:`backward` takes the losses and the shared
    parameters, gets the per-term stacks from ``lossbalance.term_grads`` and writes
    ``.grad``; follow it with any optimizer's ``step()`` (the paper uses Adam).

    State (buffers, float64): ``norm_avg`` (m, K x T; sized at the first call, T = the
    number of shared tensors that require grad, in the order given).

    Args:
        num_terms: K >= 1 (term 0 is the target).
        relax_factor: r, 0 <= r <= 1 (default 0.7, the authors' default).
        beta: the moving average's decay, 0 <= beta < 1 (default 0.9, the authors').
        grad_mode: how ``term_grads`` computes the per-term gradients (default
            ``"auto"``).

    Example:
        >>> import torch
        >>> from lossbalance._metabalance import MetaBalance
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> balancer = MetaBalance(2, relax_factor=1.0, beta=0.0)
        >>> balancer.backward([w.pow(2).sum(), 100 * w.sum()], [w])
        >>> w.grad  # 2w + 100 (1, 1) rescaled to the norm of 2w, sqrt(20)
        tensor([5.1623, 7.1623])

    Differences from the paper / the authors' code:
        - The authors' code adapts every tensor in the optimizer, heads included (an
          auxiliary head, which the target does not reach, gets ``1 - r`` times its
          gradient); here only the ``shared`` tensors are balanced, as in the paper.
        - The authors' code runs K backward passes writing ``.grad``; here the engine's
          ``term_grads`` computes the stacks (any of its modes, same numbers).
        - r = 1 is allowed (the authors' check stops at r < 1).
        - Only the paper's "adapt both" strategy (larger and smaller auxiliary
          magnitudes alike) is implemented, as in the authors' code.
    """

    norm_avg: Tensor

    def __init__(
        self,
        num_terms: int,
        relax_factor: float = 0.7,
        beta: float = 0.9,
        *,
        grad_mode: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(num_terms, bool) or not isinstance(num_terms, int) or num_terms < 1:
            raise ValueError(f"Invalid num_terms: {num_terms!r} (expected an integer >= 1)")
        if not 0.0 <= relax_factor <= 1.0 or not math.isfinite(relax_factor):
            raise ValueError(
                f"Invalid relax_factor: {relax_factor} (expected 0 <= relax_factor <= 1)"
            )
        check_beta("beta", beta)
        self.num_terms = num_terms
        self.relax_factor = float(relax_factor)
        self.beta = float(beta)
        self.grad_mode = grad_mode
        self.last_coefficients: Tensor | None = None
        self.register_buffer("norm_avg", torch.zeros(num_terms, 0, dtype=torch.float64))
        if num_terms == 1:
            warn_once(
                "metabalance-one-term",
                "MetaBalance with num_terms=1 has nothing to balance: the target's gradient",
            )

    def backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        shared: nn.Module | Iterable[Tensor],
        *,
        retain_graph: bool = False,
    ) -> None:
        """Write the balanced gradients into ``.grad`` (accumulated, like autograd).

        Args:
            losses: the K scalar losses, the target first.
            shared: the shared parameters (a module or an iterable of leaf tensors).
            retain_graph: keep the graph after the last backward pass.

        ``last_coefficients`` holds the K x T coefficients applied. A non-finite loss or
        gradient writes nothing, leaves the state unchanged and warns once.
        """
        items = as_loss_list(losses)
        if len(items) != self.num_terms:
            raise ValueError(
                f"MetaBalance was built for {self.num_terms} loss terms, got {len(items)}"
            )
        params = [p for p in (shared.parameters() if isinstance(shared, nn.Module) else shared)]
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("MetaBalance.backward: no shared parameter requires grad")
        if not bool(torch.isfinite(torch.stack([t.detach() for t in items])).all()):
            warn_once(
                "metabalance-nonfinite", "MetaBalance: a loss is not finite; nothing is written"
            )
            return
        with torch.enable_grad():
            ids = {id(p) for p in params}
            heads = [p for p in reachable_leaves(items) if id(p) not in ids]
            stacks = term_grads(items, params, mode=self.grad_mode, retain_graph=True)
            head_grads = (
                torch.autograd.grad(
                    torch.stack(items).sum(), heads, retain_graph=retain_graph, allow_unused=True
                )
                if heads
                else ()
            )
        norms = torch.stack(
            [
                torch.zeros(self.num_terms, dtype=torch.float64, device=self.norm_avg.device)
                if s is None
                else s.detach()
                .reshape(self.num_terms, -1)
                .to(torch.float64)
                .norm(dim=1)
                .to(self.norm_avg.device)
                for s in stacks
            ],
            dim=1,
        )
        checks = [s for s in stacks if s is not None] + [g for g in head_grads if g is not None]
        if not bool(torch.isfinite(norms).all()) or not all(
            bool(torch.isfinite(g).all()) for g in checks
        ):
            warn_once(
                "metabalance-nonfinite",
                "MetaBalance: a per-term gradient is not finite; nothing is written",
            )
            return
        if self.norm_avg.numel() == 0:
            self.norm_avg = torch.zeros_like(norms)
        elif self.norm_avg.shape != norms.shape:
            raise ValueError(
                f"MetaBalance got {norms.shape[1]} shared tensors, expected "
                f"{self.norm_avg.shape[1]} as at its previous calls"
            )
        coefficients, ema = metabalance_coefficients(
            norms, self.norm_avg, self.relax_factor, self.beta
        )
        self.norm_avg.copy_(ema)
        self.last_coefficients = coefficients.clone()
        writes: list[tuple[Tensor, Tensor]] = []
        for j, (p, s) in enumerate(zip(params, stacks, strict=True)):
            if s is None:
                continue
            c = coefficients[:, j].to(device=s.device, dtype=s.dtype)
            writes.append((p, torch.tensordot(c, s, dims=1)))
        writes += [(p, g) for p, g in zip(heads, head_grads, strict=True) if g is not None]
        for p, g in writes:
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g.detach())

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # m is sized at the first call: take the saved size before loading
        saved = state_dict.get(prefix + "norm_avg")
        if isinstance(saved, Tensor) and saved.shape != self.norm_avg.shape:
            self.norm_avg = torch.zeros_like(saved, device=self.norm_avg.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, relax_factor={self.relax_factor}, beta={self.beta}"
