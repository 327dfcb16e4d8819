"""FSDP2 (``fully_shard``) helpers: sharded parameters as DTensors, their local shards.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor`` sharded on
dim 0 (``Shard(0)``); the forward pass all-gathers it into a separate unsharded tensor, so
the sharded parameter itself is never in the autograd graph: ``torch.autograd.grad`` with
respect to it returns nothing. Its gradient arrives only through FSDP's own hooks, which
reduce-scatter (and average over the ranks) the unsharded gradient into the sharded
``.grad`` at the end of a ``backward()``.

So per-term gradients of sharded parameters come from one ``backward()`` per term
(:func:`per_term_backward`): each pass lets FSDP reduce-scatter that term's gradient, whose
local shard is then moved into a per-term stack. Why this and not "the unsharded local
gradients of all terms, reduced once": the bandwidth is the same (a reduce-scatter of
:math:`I|\\theta|` elements in all, half an all-reduce's), but a pass per term never holds
more than one unsharded gradient (:math:`|\\theta|`) per rank, where stacking the
unsharded local gradients first holds :math:`I|\\theta|` per rank, the memory FSDP is used
to avoid; it also needs no FSDP internals. What it costs is :math:`I` reduce-scatters per
step instead of one (latency, not volume), and each pass all-gathers the parameters of the
modules it reaches again when they are resharded after the forward pass
(``reshard_after_forward=True``, FSDP's default), as one ordinary backward does.

Parameters left out of ``fully_shard`` (plain tensors) get their local gradients from the
same passes; the caller averages them over the ranks as under DDP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "backward_discarding",
    "is_sharded",
    "like_param",
    "local",
    "per_term_backward",
    "shard_like",
    "sharded_zeros",
]


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a ``fully_shard`` parameter or its state)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (the tensor itself, so writes reach it), else ``t``."""
    return t._local_tensor if is_sharded(t) else t  # type: ignore[attr-defined]


def sharded_zeros(p: Tensor, prefix: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zeros of shape ``(*prefix, *p.shape)``, sharded like ``p`` when it is a ``DTensor``.

    The optimizer state of a sharded parameter is a ``DTensor`` on the same mesh, its shard
    dims shifted by ``len(prefix)`` (a per-term stack ``(I, *p.shape)`` is ``Shard(1)``
    for a ``Shard(0)`` parameter), so that each rank holds the state of its own shard and
    ``torch.distributed.checkpoint`` saves and reshards it like a parameter.
    """
    if not is_sharded(p):
        return torch.zeros((*prefix, *p.shape), dtype=dtype, device=p.device)
    mine = local(p)
    zeros = torch.zeros((*prefix, *mine.shape), dtype=dtype, device=mine.device)
    placements = [
        Shard(pl.dim + len(prefix)) if isinstance(pl, Shard) else pl
        for pl in p.placements  # type: ignore[attr-defined]
    ]
    shape = (*prefix, *p.shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        zeros,
        p.device_mesh,  # type: ignore[attr-defined]
        placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=stride,
    )


def per_term_backward(
    losses: Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool = False
) -> list[Tensor | None]:
    """Per-term gradients of ``params`` from one ``backward()`` per loss.

    Returns, per parameter, a ``(I, *local shape)`` stack (the local shard of a sharded
    parameter, averaged over the ranks by FSDP's reduce-scatter; the local, not yet averaged
    gradient of a plain one), zeros where a term does not reach it, or ``None`` where no
    term does. The ``.grad`` of ``params`` is restored afterwards; other leaves the losses
    reach accumulate the sum of the terms' gradients, as ``sum(losses).backward()`` would
    leave them. A leaf whose ``.grad`` FSDP consumed in the pass (its unsharded
    parameters, which the walk of a graph finds) gets ``None``.
    """
    saved = [p.grad for p in params]
    stacks: list[Tensor | None] = [None] * len(params)
    num = len(losses)
    try:
        for p in params:
            p.grad = None
        for i, loss in enumerate(losses):
            with torch.enable_grad():
                torch.autograd.backward(loss, retain_graph=retain_graph or i < num - 1)
            for j, p in enumerate(params):
                g = p.grad
                if g is None:
                    continue
                p.grad = None
                g = local(g)
                if stacks[j] is None:
                    stacks[j] = g.new_zeros((num, *g.shape))
                stacks[j][i].copy_(g)  # type: ignore[index]
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return stacks


def shard_like(value: Tensor, template: Tensor) -> Tensor:
    """``value`` (whole, or a ``DTensor`` in any layout) as a copy sharded like ``template``
    (a ``DTensor`` from :func:`sharded_zeros`), in ``template``'s dtype."""
    if tuple(value.shape) != tuple(template.shape):
        raise ValueError(f"shape {tuple(value.shape)} (expected {tuple(template.shape)})")
    if is_sharded(value):
        value = value.redistribute(template.device_mesh, template.placements)  # type: ignore[attr-defined]
        local(template).copy_(local(value))
        return template
    from torch.distributed.tensor import distribute_tensor

    whole = value.detach().to(local(template).device, template.dtype)
    local(template).copy_(
        local(distribute_tensor(whole, template.device_mesh, template.placements))  # type: ignore[attr-defined]
    )
    return template


def like_param(p: Tensor, t: Tensor) -> Tensor:
    """The local tensor ``t`` (the local shape of ``p``) as a ``DTensor`` sharded like ``p``."""
    return DTensor.from_local(
        t,
        p.device_mesh,  # type: ignore[attr-defined]
        p.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=p.shape,
        stride=p.stride(),
    )


def backward_discarding(loss: Tensor, params: Sequence[Tensor], *, retain_graph: bool) -> None:
    """``loss.backward()`` for the leaves FSDP owns, leaving the ``.grad`` of ``params`` as
    it was (what the pass writes there is dropped)."""
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            torch.autograd.backward(loss, retain_graph=retain_graph)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
