"""Per-term gradients by plain autograd: the bottom layer of the engine.

K ``torch.autograd.grad`` passes (one per term, each traversing only what its term
reaches) or one vectorised pass (``is_grads_batched=True``) with a sequential fallback; the
walk of the autograd graph that lists the leaves a loss reaches; and the helpers the
layers above share (dense-gradient check, combination of a stack, first line of an error).
Nothing here imports another engine module, so :mod:`lossbalance.engine._vjp` and
:mod:`lossbalance.engine._engine` can both build on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lossbalance._validation import warn_once

__all__ = ["check_dense", "combine_stack", "error_line", "per_term", "reachable_leaves"]


def reachable_leaves(roots: Sequence[Tensor], stop: Sequence[Tensor] = ()) -> list[Tensor]:
    """The leaf tensors requiring grad that ``roots`` reach, in a deterministic order.

    Walks ``grad_fn.next_functions``; ``AccumulateGrad`` nodes hold the leaf in
    ``.variable``. The walk does not go through the tensors in ``stop`` (nor list them);
    it stops at their own edge, so another output of the same operation (``torch.chunk``)
    is still followed.
    """
    stop_ids = {id(t) for t in stop}
    stop_edges = {(t.grad_fn, t.output_nr) for t in stop if t.grad_fn is not None}
    seen: set[object] = set()
    found: dict[int, Tensor] = {}
    todo: list[object] = []
    for t in roots:
        if t.grad_fn is not None:
            if (t.grad_fn, t.output_nr) not in stop_edges:
                todo.append(t.grad_fn)
        elif t.requires_grad and id(t) not in stop_ids:
            found.setdefault(id(t), t)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if isinstance(leaf, Tensor):
            if id(leaf) not in stop_ids:
                found.setdefault(id(leaf), leaf)
            continue
        for edge in reversed(node.next_functions):  # type: ignore[attr-defined]
            if edge[0] is not None and edge not in stop_edges:
                todo.append(edge[0])
    return list(found.values())


def error_line(err: BaseException) -> str:
    """``"Type: first line"`` of an exception, for a fallback warning.

    torch's messages can carry the C++ stack after the first line (``Exception raised from
    ... (most recent call first):`` and one ``frame #`` line per frame); a warning that
    the engine recovered needs the cause, not the frames.
    """
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def check_dense(g: Tensor, index: int) -> None:
    if g.is_sparse:
        raise TypeError(
            f"parameter {index} received a sparse gradient; per-term balancing needs dense "
            "gradients (use sparse=False in nn.Embedding)"
        )


def per_term(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    num_stacked: int,
    *,
    batched: bool,
    retain_graph: bool,
    sum_weights: Tensor | None = None,
    out: Sequence[Tensor | None] | None = None,
) -> list[Tensor | None]:
    """Per-term gradients: ``(K, *p.shape)`` stacks for ``params[:num_stacked]``; for the
    rest (task-specific parameters) ``sum_i c_i dL_i/dp`` with ``c = sum_weights`` (ones by
    default), accumulated without keeping K copies. ``out``: stacks the sequential path
    may write into (see :func:`term_grads`)."""
    if batched:
        try:
            return _batched(losses, params, num_stacked, sum_weights)
        except RuntimeError as err:
            if isinstance(err, torch.OutOfMemoryError):
                raise
            # Some operations have no vmap rule; the sequential path is always exact. It
            # runs first so that an error unrelated to batching (e.g. a freed graph)
            # surfaces as itself, without a misleading warning.
            grads = _sequential(losses, params, num_stacked, retain_graph, sum_weights, out)
            warn_once(
                "engine-batched-fallback",
                f"batched per-term gradients failed ({error_line(err)}); "
                "fell back to K sequential backward passes",
            )
            return grads
    return _sequential(losses, params, num_stacked, retain_graph, sum_weights, out)


def _sequential(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    num_stacked: int,
    retain_graph: bool,
    sum_weights: Tensor | None = None,
    reuse: Sequence[Tensor | None] | None = None,
) -> list[Tensor | None]:
    # Each term is differentiated on its own (not through a stacked vector), so that pass i
    # traverses only the part of the graph that L_i depends on: zero gradients are not
    # pushed through the other terms' heads.
    k = len(losses)
    out: list[Tensor | None] = [None] * len(params)
    if not params:
        return out
    coef = None if sum_weights is None else sum_weights.detach().cpu().tolist()
    # stacks are allocated uninitialised (a zero fill is a full extra pass over K x |p|);
    # only the rows of terms that do not reach a parameter are zeroed afterwards
    written: list[list[bool]] = [[False] * k for _ in range(num_stacked)]
    for i, loss in enumerate(losses):
        if not loss.requires_grad:
            continue
        grads = torch.autograd.grad(
            loss, params, retain_graph=retain_graph or i < k - 1, allow_unused=True
        )
        for j, g in enumerate(grads):
            if g is None:
                continue
            check_dense(g, j)
            buf = out[j]
            if j < num_stacked:
                if buf is None:
                    buf = _stack_for(g, k, reuse[j] if reuse is not None else None)
                    out[j] = buf
                buf[i].copy_(g)
                written[j][i] = True
            elif buf is None:
                out[j] = g.clone() if coef is None else g * coef[i]
            elif coef is None:
                buf.add_(g)
            else:
                buf.add_(g, alpha=coef[i])
    for j in range(num_stacked):
        buf = out[j]
        if buf is not None:
            for i in range(k):
                if not written[j][i]:
                    buf[i].zero_()
    return out


def _stack_for(g: Tensor, k: int, given: Tensor | None) -> Tensor:
    """A ``(k, *g.shape)`` stack for ``g``'s per-term gradients: ``given`` if it fits."""
    if (
        given is not None
        and given.shape == (k, *g.shape)
        and given.dtype == g.dtype
        and given.device == g.device
        and given.is_contiguous()
        and not given.requires_grad
    ):
        return given
    return g.new_empty((k, *g.shape))


def _batched(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    num_stacked: int,
    sum_weights: Tensor | None = None,
) -> list[Tensor | None]:
    if not params:
        return []
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    # The graph is retained so that the sequential fallback can still run if a batching
    # rule is missing midway; it is freed with the caller's references to the losses.
    grads = torch.autograd.grad(
        stacked,
        list(params),
        grad_outputs=eye,
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )
    out: list[Tensor | None] = []
    for j, g in enumerate(grads):
        if g is not None:
            check_dense(g, j)
            if j >= num_stacked:
                g = g.sum(0) if sum_weights is None else combine_stack(sum_weights, g)
            else:
                # under vmap the rows keep the parameter's layout (channels_last, a
                # transposed view): the stacks are made contiguous like the sequential ones
                g = g.contiguous()
        out.append(g)
    return out


def combine_stack(alpha: Tensor, stack: Tensor) -> Tensor:
    """``sum_i alpha_i stack[i]`` in the stack's dtype (a fresh contiguous tensor)."""
    a = alpha.to(dtype=stack.dtype, device=stack.device)
    return (a @ stack.reshape(stack.shape[0], -1)).view(stack.shape[1:])
