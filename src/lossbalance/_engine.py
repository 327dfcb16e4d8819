"""Per-term gradients: the one engine every method uses.

``term_grads`` returns, for each parameter, the stacked per-term gradients of shape
``(K, *param.shape)`` (``None`` where no term reaches the parameter). Terms that do not
reach a parameter that another term reaches contribute zeros there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lossbalance._validation import check_choice

GRAD_MODES = ("auto", "sequential", "batched")


def term_grads(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    mode: str = "auto",
    retain_graph: bool = False,
) -> list[Tensor | None]:
    """Stacked per-term gradients of ``losses`` with respect to ``params``.

    Args:
        losses: K scalar tensors.
        params: the tensors to differentiate with respect to.
        mode: ``"sequential"`` runs K ``torch.autograd.grad`` calls; ``"batched"`` runs one
            vectorised call (``is_grads_batched=True``) and falls back to sequential when an
            operation has no batching rule; ``"auto"`` picks sequential.
        retain_graph: keep the graph after the last backward.

    Returns:
        One entry per parameter: a ``(K, *p.shape)`` tensor, or ``None`` if no loss
        reaches ``p``.
    """
    check_choice("mode", mode, GRAD_MODES)
    params = list(params)
    if mode == "batched":
        try:
            return _batched(losses, params, retain_graph)
        except RuntimeError:
            # Some operations have no vmap rule; the sequential path is always exact.
            pass
    return _sequential(losses, params, retain_graph)


def _check_dense(g: Tensor, index: int) -> None:
    if g.is_sparse:
        raise TypeError(
            f"parameter {index} received a sparse gradient; per-term balancing needs dense "
            "gradients (use sparse=False in nn.Embedding)"
        )


def _sequential(losses: Sequence[Tensor], params: list[Tensor], retain_graph: bool) -> list[Tensor | None]:
    k = len(losses)
    out: list[Tensor | None] = [None] * len(params)
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(
            loss, params, retain_graph=retain_graph or i < k - 1, allow_unused=True
        )
        for j, g in enumerate(grads):
            if g is None:
                continue
            _check_dense(g, j)
            buf = out[j]
            if buf is None:
                buf = g.new_zeros((k, *g.shape))
                out[j] = buf
            buf[i].copy_(g)
    return out


def _batched(losses: Sequence[Tensor], params: list[Tensor], _retain_graph: bool) -> list[Tensor | None]:
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    # The graph is retained so that the sequential fallback can still run if a batching
    # rule is missing midway; it is freed with the caller's references to the losses.
    grads = torch.autograd.grad(
        stacked,
        params,
        grad_outputs=eye,
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )
    for j, g in enumerate(grads):
        if g is not None:
            _check_dense(g, j)
    return list(grads)
