"""``torch.distributed`` helpers: which process group to average over, one flat all-reduce.

Balancing under data parallelism needs the per-term quantities (gradients, Gramians, loss
values) of the whole batch, which is split over the ranks. DDP's own gradient hooks do not
help: they average ``.grad`` after one ``backward()`` of one loss, while a balancer needs
the K per-term gradients before they are combined (and ``lossbalance.backward`` writes
``.grad`` itself, so those hooks never fire). These helpers average a list of tensors
across ranks in a single collective, so every rank then computes identical weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["all_reduce_mean", "resolve_group", "world_size"]


def resolve_group(process_group: Any) -> Any | None:
    """The process group to average over, or ``None`` when there is nothing to average.

    Args:
        process_group: ``"auto"`` (the default group when ``torch.distributed`` is
            initialised with more than one rank), ``None`` (never average) or a
            ``torch.distributed.ProcessGroup``.

    Returns:
        ``None`` for a single process (``"auto"`` with no initialised group, or a group of
        one rank), else the group (``torch.distributed.group.WORLD`` for ``"auto"``).
    """
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(
                f"Invalid process_group: {process_group!r} (expected 'auto', None or a "
                "torch.distributed ProcessGroup)"
            )
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return None
        group = torch.distributed.group.WORLD
    else:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError(
                "process_group was given but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group(...) first, or pass process_group=None"
            )
        group = process_group
    if torch.distributed.get_world_size(group) <= 1:
        return None
    return group


def world_size(group: Any) -> int:
    """Number of ranks in ``group`` (1 for ``None``)."""
    return 1 if group is None else torch.distributed.get_world_size(group)


def all_reduce_mean(tensors: Sequence[Tensor], group: Any) -> list[Tensor]:
    """Average ``tensors`` over the ranks of ``group`` in one ``all_reduce``.

    The tensors are flattened into one buffer on the first tensor's device, in float64 if
    any of them is float64 and float32 otherwise (half-precision gradients are summed in
    float32, where a sum over ranks cannot overflow), reduced with ``SUM`` (gloo has no
    ``AVG``) and divided by the world size. A NaN or Inf on any rank reaches every rank,
    so decisions taken on the results (skip a non-finite step) agree everywhere.

    Every rank must pass tensors of the same shapes in the same order.

    Args:
        tensors: floating-point tensors (any shapes).
        group: a process group from :func:`resolve_group` (not ``None``).

    Returns:
        The averages, with the shapes, dtypes and devices of ``tensors`` (views of the
        reduced buffer where no conversion was needed).
    """
    if not tensors:
        return []
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"all_reduce_mean takes floating-point tensors, got {t.dtype}")
    home = tensors[0].device
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.detach().reshape(-1).to(home, dtype) for t in tensors])
    torch.distributed.all_reduce(flat, group=group)
    flat.div_(world_size(group))
    out = []
    offset = 0
    for t in tensors:
        n = t.numel()
        out.append(flat[offset : offset + n].view(t.shape).to(t.device, t.dtype))
        offset += n
    return out
