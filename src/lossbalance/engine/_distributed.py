"""``torch.distributed`` helpers: which process group to average over, one flat all-reduce.

Balancing under data parallelism needs the per-term quantities (gradients, Gramians, loss
values) of the whole batch, which is split over the ranks. DDP's own gradient hooks do not
help: they average ``.grad`` after one ``backward()`` of one loss, while a balancer needs
the K per-term gradients before they are combined (and ``lossbalance.backward`` writes
``.grad`` itself, so those hooks never fire). These helpers average a list of tensors
across ranks in a single collective, so every rank then computes identical weights.

That collective needs every rank to send the same layout (the same tensors in the same
order); ranks that disagree would abort in gloo or hang. :func:`check_layout` compares a
few integers describing the layout first, in one small all-gather, and raises the same
error on every rank when they differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "all_reduce_mean",
    "all_reduce_mean_and_sum",
    "check_layout",
    "layout_of",
    "resolve_group",
    "world_size",
]

# Entries of a layout signature, padded to a fixed length so that ranks on different paths
# still send equal-sized tensors; the first entry names the path (``PATHS``).
LAYOUT_SIZE = 8
PATHS = {
    1: "MTAdam.step",
    2: "loss-level",
    3: "feature-mode",
    4: "deferred (exact, batched or Accumulator)",
}


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

    Every rank must pass tensors of the same shapes in the same order: where that depends
    on the rank's data, call :func:`check_layout` first.

    Args:
        tensors: floating-point tensors (any shapes).
        group: a process group from :func:`resolve_group` (not ``None``).

    Returns:
        The averages, with the shapes, dtypes and devices of ``tensors`` (views of the
        reduced buffer where no conversion was needed).
    """
    return all_reduce_mean_and_sum(tensors, (), group)[0]


def all_reduce_mean_and_sum(
    means: Sequence[Tensor], sums: Sequence[Tensor], group: Any
) -> tuple[list[Tensor], list[Tensor]]:
    """Average ``means`` and sum ``sums`` over the ranks of ``group`` in one ``all_reduce``.

    As :func:`all_reduce_mean` (one flat buffer, float64 if any tensor is float64), with
    ``sums`` in the same buffer but not divided by the world size: for quantities that are
    partial on each rank, such as the squared norms of the local shards of a sharded
    parameter (FSDP), whose sum over the ranks is the squared norm of the whole tensor.
    """
    tensors = [*means, *sums]
    if not tensors:
        return [], []
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"all_reduce_mean takes floating-point tensors, got {t.dtype}")
    home = tensors[0].device
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.detach().reshape(-1).to(home, dtype) for t in tensors])
    torch.distributed.all_reduce(flat, group=group)
    split = sum(t.numel() for t in means)
    flat[:split].div_(world_size(group))
    out = []
    offset = 0
    for t in tensors:
        n = t.numel()
        out.append(flat[offset : offset + n].view(t.shape).to(t.device, t.dtype))
        offset += n
    return out[: len(means)], out[len(means) :]


def layout_of(tensors: Sequence[Tensor]) -> tuple[int, int, int]:
    r"""``(count, elements, order)`` of a list of tensors, for :func:`check_layout`.

    ``order`` is :math:`\sum_j (j + 1)\,n_j \bmod 2^{61}` over the tensors' sizes
    :math:`n_j`: equal counts and totals with the sizes in another order still differ.
    """
    sizes = [t.numel() for t in tensors]
    order = sum((j + 1) * n for j, n in enumerate(sizes)) % (1 << 61)
    return len(sizes), sum(sizes), order


def check_layout(
    where: str,
    path: int,
    entries: Sequence[tuple[str, int] | tuple[str, int, str]],
    group: Any,
    device: Any,
) -> None:
    """Raise the same ``RuntimeError`` on every rank of ``group`` if their layouts differ.

    Called on every rank right before a collective whose sizes depend on the rank's own
    data (the number of loss terms, the leaves the losses reach), which would otherwise
    abort in gloo (``EnforceNotMet``, SIGABRT) or hang. Every rank gathers every rank's
    signature, so every rank raises the same error, naming the first entry that differs
    and the first rank that differs from rank 0; the group stays usable.

    Cost: one ``all_gather`` of ``LAYOUT_SIZE`` int64 numbers per rank. They travel on the
    CPU when the group's backend takes CPU tensors (gloo, MPI, or a mixed
    ``"cpu:gloo,cuda:nccl"`` group), so reading them waits for no accelerator; on a group
    that takes device tensors only (NCCL) they travel on ``device``, and reading them
    synchronises with it.

    The signature holds counts and sizes, not identities: ranks that reach different
    tensors of the same sizes in the same order are not told apart.

    Args:
        where: who checks, for the message (``"lossbalance.backward"``).
        path: the code path this rank takes (a key of ``PATHS``); ranks on different paths
            would run different collectives.
        entries: up to ``LAYOUT_SIZE - 1`` ``(text, value)`` or ``(text, value, hint)``;
            ``text`` is a format string with ``{}`` for the value (``"has {} loss
            terms"``), ``hint`` says how to fix a difference there.
        group: a process group from :func:`resolve_group` (not ``None``).
        device: where the tensors of the coming collective live.
    """
    if len(entries) >= LAYOUT_SIZE:
        raise ValueError(f"a layout has at most {LAYOUT_SIZE - 1} entries, got {len(entries)}")
    values = [path, *(entry[1] for entry in entries)]
    values += [0] * (LAYOUT_SIZE - len(values))
    backend = str(torch.distributed.get_backend(group))
    home = "cpu" if ("gloo" in backend or "mpi" in backend) else device
    mine = torch.tensor(values, dtype=torch.int64).to(home)
    table = [torch.empty_like(mine) for _ in range(world_size(group))]
    torch.distributed.all_gather(table, mine, group=group)
    rows = torch.stack(table).tolist()
    first = next((r for r, row in enumerate(rows) if row != rows[0]), None)
    if first is None:
        return
    row, ref = rows[first], rows[0]
    hint = ""
    if row[0] != ref[0]:
        what = (
            f"rank {first} takes the {PATHS.get(row[0], 'another')} path, "
            f"rank 0 the {PATHS.get(ref[0], 'another')} path"
        )
    else:
        j = next(j for j in range(1, LAYOUT_SIZE) if row[j] != ref[j])
        entry = entries[j - 1]
        what = f"rank {first} {entry[0].format(row[j])}, rank 0 {entry[0].format(ref[j])}"
        hint = f"; {entry[2]}" if len(entry) > 2 else ""  # type: ignore[misc]
    raise RuntimeError(
        f"{where} under torch.distributed: the ranks disagree: {what} (expected the same "
        "on every rank: every rank must pass the same loss terms, reach the same "
        f"parameters and take the same path, so that their collectives match{hint})"
    )
