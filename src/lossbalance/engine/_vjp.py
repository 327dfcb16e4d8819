"""Exact per-term gradients computed several ways, and a timing-based chooser among them.

Every function here returns what :func:`lossbalance.term_grads` returns: one entry per
parameter, a contiguous ``(K, *p.shape)`` tensor whose row i is ``dL_i/dp`` (zeros where
term i does not reach ``p`` but another term does), or ``None`` where no term reaches
``p``. All of them are exact; they differ only in how the K vector-Jacobian products are
scheduled. The stacks are contiguous whatever the layout of ``p`` (``channels_last``, a
transposed or strided view): under ``vmap`` the rows keep that layout, and the vectorised
modes copy them into the default one, as the sequential mode writes them.

- ``"sequential"``: K ``torch.autograd.grad`` calls (the engine's own path, reused here).
  Pass i only traverses what L_i depends on. Peak memory: one gradient set at a time on
  top of the K stacked outputs.
- ``"batched"``: one ``torch.autograd.grad(..., is_grads_batched=True)`` call on the
  stacked losses with the identity as cotangents: the backward graph is run once under
  ``vmap``, so every backward kernel sees a K-times larger batch (fewer, larger kernels,
  but K activation gradients alive at once). Zero cotangents are pushed through every
  term's sub-graph.
- ``"two_stage"``: the per-term cotangents ``dL_i/dy`` of a shared output ``y`` (the
  logits, say) are computed first, by K cheap passes from the losses to ``y``; then ONE
  batched VJP runs from ``y`` through the network with those K cotangents. The loss part
  of the graph, which often has ops without batching rules or per-term structure (masks,
  ``index_add``), is never vmapped. ``y`` is named by the caller or found automatically
  (:func:`find_shared_output`: the last tensor that every path from the losses to the
  parameters goes through).
- ``torch.func`` (:func:`func_term_grads`): ``functional_call`` of the model, ``vjp`` of
  the vector of losses and ``vmap`` of the VJP function over the identity. Needs the model,
  its inputs and a loss function instead of a graph that was already built.

:func:`choose_mode` times the graph-based candidates on the caller's step (each once or a
few times, interleaved, on the same retained graph), checks that they agree, and caches
the fastest per (parameters, K, device, dtype); :func:`vjp_term_grads` runs a mode by name,
so a user can force one. No mode wins everywhere: on one CPU thread the sequential mode
was fastest for a small CNN and the vectorised ones for an MLP (``benchmarks/RESULTS.md``).
:func:`lossbalance.term_grads` with ``mode="auto"`` (MTAdam's default ``grad_mode``) uses
:func:`choose_mode` with a key of parameter shapes and K (see its docstring).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.func import functional_call, vjp, vmap

from lossbalance._validation import check_choice, warn_once
from lossbalance.engine._graph import error_line, per_term, reachable_leaves

__all__ = [
    "VJP_MODES",
    "Choice",
    "batched_term_grads",
    "cached_choice",
    "choose_mode",
    "clear_choices",
    "default_key",
    "find_shared_output",
    "func_term_grads",
    "sequential_term_grads",
    "two_stage_term_grads",
    "vjp_term_grads",
]

VJP_MODES = ("sequential", "batched", "two_stage")

Output = Tensor | GradientEdge


# --------------------------------------------------------------------------- variants


def sequential_term_grads(
    losses: Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool = False
) -> list[Tensor | None]:
    """K ``torch.autograd.grad`` calls: the engine's sequential mode.

    Args:
        losses: K scalar tensors.
        params: the tensors to differentiate with respect to.
        retain_graph: keep the graph after the last pass.

    Returns:
        Per parameter a ``(K, *p.shape)`` tensor, or ``None`` if no loss reaches it.
    """
    params = list(params)
    with torch.enable_grad():
        return per_term(list(losses), params, len(params), batched=False, retain_graph=retain_graph)


def batched_term_grads(
    losses: Sequence[Tensor], params: Sequence[Tensor], *, retain_graph: bool = False
) -> list[Tensor | None]:
    """One batched VJP: ``autograd.grad(stack(losses), params, eye(K), is_grads_batched=True)``.

    Unlike the engine's ``"batched"`` mode this never falls back to the sequential path: an
    operation without a batching rule raises, so a timing of this function is a timing of
    the batched path (:func:`choose_mode` drops a candidate that raises).

    Args:
        losses: K scalar tensors.
        params: the tensors to differentiate with respect to.
        retain_graph: keep the graph after the pass.

    Returns:
        Per parameter a ``(K, *p.shape)`` tensor, or ``None`` if no loss reaches it.

    Example:
        >>> import torch
        >>> from lossbalance.engine._vjp import batched_term_grads
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (g,) = batched_term_grads([w.sum(), (w * w).sum()], [w])
        >>> g
        tensor([[1., 1.],
                [2., 4.]])
    """
    params = list(params)
    items = _scalars(losses)
    with torch.enable_grad():
        stacked = torch.stack(items)
    if not params or not stacked.requires_grad:
        return [None] * len(params)
    eye = torch.eye(len(items), dtype=stacked.dtype, device=stacked.device)
    grads = torch.autograd.grad(
        stacked,
        params,
        grad_outputs=eye,
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=True,
    )
    return [_dense(g, j) for j, g in enumerate(grads)]


def two_stage_term_grads(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    outputs: Output | Sequence[Output] | None = None,
    *,
    stage1: str = "sequential",
    retain_graph: bool = False,
) -> list[Tensor | None]:
    r"""Per-term cotangents of a shared output first, then one batched VJP through the net.

    With :math:`y` the shared output(s),

    .. math::
        c_i = \partial L_i / \partial y \quad (i = 1..K), \qquad
        g_i = J_y(\theta)^T c_i \ \text{for all } i \text{ in one batched VJP.}

    Parameters that the losses reach without going through ``y`` (a head after the
    logits, a weight-decay term on a trunk weight) get their whole per-term gradients in
    stage 1 instead and are left out of stage 2, so nothing is counted twice.

    Args:
        losses: K scalar tensors.
        params: the tensors to differentiate with respect to.
        outputs: ``y``: a tensor (or ``GradientEdge``) that the losses were computed from,
            or a sequence of them. ``None`` finds it with :func:`find_shared_output`;
            where there is none, this is :func:`batched_term_grads`.
        stage1: ``"sequential"`` (K passes from the losses to ``y``) or ``"batched"``
            (one vectorised pass).
        retain_graph: keep the graph after stage 2 (stage 1 always keeps it).

    Returns:
        Per parameter a ``(K, *p.shape)`` tensor, or ``None`` if no loss reaches it.

    Example:
        >>> import torch
        >>> from lossbalance.engine._vjp import two_stage_term_grads
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Linear(3, 4)
        >>> y = net(torch.randn(5, 3))
        >>> losses = [y[:, 0].sum(), y.square().mean()]
        >>> grads = two_stage_term_grads(losses, list(net.parameters()), y)
        >>> [tuple(g.shape) for g in grads]
        [(2, 4, 3), (2, 4)]
    """
    check_choice("stage1", stage1, ("sequential", "batched"))
    params = list(params)
    items = _scalars(losses)
    if outputs is None:
        found = find_shared_output(items, params)
        if found is None:
            return batched_term_grads(items, params, retain_graph=retain_graph)
        outs: list[Output] = list(found)
    else:
        outs = _as_outputs(outputs)
    tensors = [y for y in outs if isinstance(y, Tensor)]
    # leaves reached around y: whole per-term gradients in stage 1 (pass i then also walks
    # the part of the trunk up to such a leaf, which is correct, only less cheap)
    around = {id(p) for p in reachable_leaves(items, stop=tensors)} if tensors else set()
    if any(isinstance(y, GradientEdge) for y in outs):
        around |= _leaves_around_edges(items, [y for y in outs if isinstance(y, GradientEdge)])
    bypass = [p for p in params if id(p) in around]
    trunk = [p for p in params if id(p) not in around]
    with torch.enable_grad():
        first = _stage1(items, [*outs, *bypass], stage1, trunk_needed=bool(trunk))
    cots = first[: len(outs)]
    position = {id(p): j for j, p in enumerate(params)}
    result: dict[int, Tensor | None] = {
        id(p): _dense(g, position[id(p)]) for p, g in zip(bypass, first[len(outs) :], strict=True)
    }
    reached = [(y, c) for y, c in zip(outs, cots, strict=True) if c is not None]
    if trunk and reached:
        ys: Any = [y for y, _ in reached]  # tensors and edges may be mixed
        grads = torch.autograd.grad(
            ys,
            trunk,
            grad_outputs=[c for _, c in reached],
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=True,
        )
        for p, g in zip(trunk, grads, strict=True):
            result[id(p)] = _dense(g, position[id(p)])
    return [result.get(id(p)) for p in params]


def func_term_grads(
    model: nn.Module,
    inputs: Any,
    loss_fn: Callable[[Any], Tensor | Sequence[Tensor]],
    params: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, list[Tensor | None]]:
    """Per-term gradients with ``torch.func``: ``vmap`` over ``vjp`` of a functional call.

    Runs the forward itself (``functional_call(model, (params, buffers), inputs)``), takes
    ``vjp`` of ``loss_fn(output)`` (the K losses) with respect to ``params``, and applies
    the VJP function to the K rows of the identity under ``vmap``.

    Args:
        model: the module; its buffers are used as they are (batch-norm statistics update
            in training mode as in a normal forward).
        inputs: the model's input, or a tuple of positional inputs.
        loss_fn: maps the model's output to the K losses (a ``(K,)`` tensor or a sequence of
            scalars).
        params: ``name -> tensor`` to differentiate with respect to; default: the model's
            named parameters that require grad.

    Returns:
        ``(losses, grads)``: the detached ``(K,)`` losses and, per entry of ``params`` in
        order, a ``(K, *p.shape)`` tensor. ``torch.func`` has no graph to tell which
        parameters a term reaches, so a parameter no term reaches gets zeros (where the
        graph-based variants give ``None``).

    Example:
        >>> import torch
        >>> from lossbalance.engine._vjp import func_term_grads
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Linear(3, 2)
        >>> losses, grads = func_term_grads(net, torch.randn(4, 3), lambda y: y.sum(0))
        >>> losses.shape, [tuple(g.shape) for g in grads]
        (torch.Size([2]), [(2, 2, 3), (2, 2)])
    """
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    primals = {n: params[n].detach() for n in names}
    buffers = dict(model.named_buffers())
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def compute(ps: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, (ps, buffers), args)
        value = loss_fn(out)
        vec = value if isinstance(value, Tensor) else torch.stack([v.reshape(()) for v in value])
        return vec.reshape(-1)

    with torch.enable_grad():
        values, vjp_fn = vjp(compute, primals)[:2]
    eye = torch.eye(values.shape[0], dtype=values.dtype, device=values.device)
    (grads,) = vmap(vjp_fn)(eye)
    return values.detach(), [grads[n].contiguous() for n in names]  # see _dense


def vjp_term_grads(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    mode: str = "sequential",
    *,
    outputs: Output | Sequence[Output] | None = None,
    retain_graph: bool = False,
) -> list[Tensor | None]:
    """Run one of the graph-based variants by name (``VJP_MODES``).

    Args:
        losses: K scalar tensors.
        params: the tensors to differentiate with respect to.
        mode: ``"sequential"``, ``"batched"`` or ``"two_stage"``.
        outputs: the shared output for ``"two_stage"`` (found automatically if ``None``).
        retain_graph: keep the graph after the last pass.

    Returns:
        Per parameter a ``(K, *p.shape)`` tensor, or ``None`` if no loss reaches it.
    """
    check_choice("mode", mode, VJP_MODES)
    if mode == "sequential":
        return sequential_term_grads(losses, params, retain_graph=retain_graph)
    if mode == "batched":
        return batched_term_grads(losses, params, retain_graph=retain_graph)
    return two_stage_term_grads(losses, params, outputs, retain_graph=retain_graph)


# --------------------------------------------------------------------------- chooser


@dataclass
class Choice:
    """What :func:`choose_mode` picked.

    Attributes:
        mode: the fastest exact mode for this key.
        grads: the per-term gradients of this step, computed by ``mode``.
        times: seconds per candidate (the minimum over repetitions), from the run that
            made the choice; a candidate that failed or disagreed is absent.
        cached: ``True`` when the choice came from the cache (nothing was timed).
        key: the cache key.
    """

    mode: str
    grads: list[Tensor | None]
    times: dict[str, float] = field(default_factory=dict)
    cached: bool = False
    key: Hashable = None


_CHOICES: dict[Hashable, tuple[str, dict[str, float]]] = {}


def clear_choices() -> None:
    """Forget every cached choice (after changing threads, batch size or model layout);
    the choices of ``term_grads(mode="auto")`` too."""
    _CHOICES.clear()


def cached_choice(key: Hashable) -> str | None:
    """The mode chosen earlier for ``key``, or ``None`` if nothing was chosen for it."""
    hit = _CHOICES.get(key)
    return None if hit is None else hit[0]


def default_key(params: Sequence[Tensor], num_terms: int) -> Hashable:
    """``(ids of params, K, device, dtype)``: the model is identified by its parameters.

    Every mode is exact, so a stale entry (a new model whose tensors reuse freed ids) can
    only cost speed, never change a result.
    """
    first = params[0] if params else None
    return (
        tuple(id(p) for p in params),
        num_terms,
        None if first is None else first.device,
        None if first is None else first.dtype,
    )


def choose_mode(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    outputs: Output | Sequence[Output] | None = None,
    candidates: Sequence[str] = VJP_MODES,
    repeats: int = 2,
    key: Hashable | None = None,
    check: bool = True,
    margin: float = 0.05,
    warn: bool = True,
) -> Choice:
    """Per-term gradients by the fastest exact mode, timed on this step and cached.

    On the first call for a key, each candidate runs ``repeats`` times, interleaved, on the
    same graph (kept with ``retain_graph=True``; it is freed with the caller's references to
    the losses), timed with a device synchronisation on CUDA; the minimum per candidate
    decides, with a preference for the first candidate (see ``margin``). A candidate that
    raises (no batching rule, out of memory) is dropped, as is one
    whose result differs from the first candidate's beyond rounding (``check``), with a
    once-only warning. Later calls with the same key run the cached mode once. With one
    term (K = 1) nothing is timed: ``"sequential"`` is a single backward pass.

    Memory: besides the run in progress, one result is alive: the reference while the
    first repetition checks the others against it, then the latest result of the fastest
    mode so far, which is the winner's own result at the end (no extra run, except with
    ``repeats=1`` and ``check``, or when that mode fails in a later repetition). The peak
    is the most demanding candidate's own peak plus one set of K gradients, whatever the
    number of candidates.

    Args:
        losses: K scalar tensors.
        params: the tensors to differentiate with respect to.
        outputs: the shared output for ``"two_stage"`` (found automatically if ``None``).
        candidates: modes to try, from ``VJP_MODES``; the first is the reference.
        repeats: timed runs per candidate (``>= 1``); the first run of all is not timed
            separately, so ``repeats=1`` includes warm-up effects.
        key: cache key; default ``(ids of params, K, device, dtype)`` (pass your own to
            include e.g. the batch size, which can move the crossover).
        check: compare every candidate with the reference on the first repetition.
        margin: another candidate must be faster than the first by this fraction to be
            chosen (default ``0.05``): the first (``"sequential"``) holds the least memory,
            and timings closer than that are noise.
        warn: warn (once) about a candidate that failed or disagreed (default ``True``;
            ``term_grads(mode="auto")`` drops them silently).

    Returns:
        A :class:`Choice` with the gradients of this step.

    Example:
        >>> import torch
        >>> from lossbalance.engine._vjp import choose_mode
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> choice = choose_mode([w.sum(), (w * w).sum()], [w], key="doc")
        >>> choice.mode in ("sequential", "batched", "two_stage"), choice.grads[0][1]
        (True, tensor([2., 4.]))
    """
    if repeats < 1:
        raise ValueError(f"Invalid repeats: {repeats} (expected repeats >= 1)")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"Invalid margin: {margin} (expected 0 <= margin < 1)")
    if not candidates:
        raise ValueError("candidates is empty: expected at least one of " + ", ".join(VJP_MODES))
    for c in candidates:
        check_choice("candidate", c, VJP_MODES)
    params = list(params)
    items = _scalars(losses)
    if key is None:
        key = default_key(params, len(items))
    hit = _CHOICES.get(key)
    if hit is not None:
        grads = vjp_term_grads(items, params, hit[0], outputs=outputs)
        return Choice(hit[0], grads, dict(hit[1]), cached=True, key=key)
    if len(items) == 1 and "sequential" in candidates:
        # one term: one backward pass, nothing to vectorise
        _CHOICES[key] = ("sequential", {})
        return Choice("sequential", sequential_term_grads(items, params), {}, key=key)

    sync = _synchronizer(params)
    alive = list(dict.fromkeys(candidates))
    first = alive[0]
    times: dict[str, float] = {}
    # Memory: besides the run in progress, one result is held (a run allocates its own
    # result, then the held one is replaced or the new one dropped): while the first
    # repetition checks the candidates, the reference; after that, the provisional
    # winner's latest result. The winner's last run is then always the held one (its time
    # is final once it ran in the last repetition and every later time can only fall), so
    # nothing is run again, except with ``repeats=1`` and ``check`` (the reference is held
    # to the end) or when the held mode fails later.
    held: tuple[str, list[Tensor | None]] | None = None
    reference: str | None = None
    for rep in range(repeats):
        checking = check and rep == 0
        for mode in list(alive):
            sync()
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    # vmap's slow-fallback notices are what the timing measures anyway
                    warnings.simplefilter("ignore", UserWarning)
                    grads = vjp_term_grads(items, params, mode, outputs=outputs, retain_graph=True)
                sync()
            except (RuntimeError, NotImplementedError) as err:
                alive.remove(mode)
                times.pop(mode, None)
                if held is not None and held[0] == mode:
                    held = None
                if warn:
                    warn_once(
                        f"vjp-choose-{mode}-failed",
                        f"per-term gradient mode {mode!r} failed ({error_line(err)}); it is "
                        "not a candidate for this model",
                    )
                continue
            elapsed = time.perf_counter() - start
            if checking:
                if held is None:
                    reference = mode
                    held = (mode, grads)
                elif not _agree(held[1], grads):
                    alive.remove(mode)
                    if warn:
                        warn_once(
                            f"vjp-choose-{mode}-mismatch",
                            f"per-term gradient mode {mode!r} disagrees with {reference!r} "
                            "on this model; it is not a candidate",
                        )
                    del grads
                    continue
            times[mode] = min(times.get(mode, float("inf")), elapsed)
            if not checking and _pick(times, first, margin) == mode:
                held = (mode, grads)
            del grads
    if not times:
        raise RuntimeError("every per-term gradient mode failed on this model")
    winner = _pick(times, first, margin)
    if held is not None and held[0] == winner:
        result = held[1]
    else:
        held = None  # freed before the winner runs again
        result = vjp_term_grads(items, params, winner, outputs=outputs, retain_graph=True)
    _CHOICES[key] = (winner, dict(times))
    return Choice(winner, result, times, cached=False, key=key)


def _pick(times: Mapping[str, float], first: str, margin: float) -> str:
    """The fastest mode, unless it is not faster than ``first`` by ``margin``."""
    winner = min(times, key=times.__getitem__)
    if first in times and winner != first and times[winner] > (1.0 - margin) * times[first]:
        winner = first  # not faster by the margin: keep the leaner first candidate
    return winner


# --------------------------------------------------------------------------- graph split


def find_shared_output(
    losses: Sequence[Tensor], params: Sequence[Tensor]
) -> list[GradientEdge] | None:
    """The deepest tensor that every path from ``losses`` to ``params`` goes through.

    Walks the autograd graph from the losses in topological order (Kahn), restricted to
    the nodes from which some parameter in ``params`` can be reached. Whenever every
    pending edge leads into one node (other than the losses' own nodes and the
    parameters' accumulators), the edges into that node form a cut that dominates every
    parameter. The last such cut is returned: for ``nll(log_softmax(fc2(...)))`` it is
    fc2's output, the logits.

    Args:
        losses: K scalar tensors.
        params: the parameters the gradients are taken for.

    Returns:
        The edges into the dominating node, as ``GradientEdge`` (one per input of that
        node that the losses reach; usable as ``outputs`` of :func:`two_stage_term_grads`),
        or ``None`` when there is no such node.
    """
    param_ids = {id(p) for p in params}
    roots = [(t.grad_fn, t.output_nr) for t in losses if t.grad_fn is not None]
    if not roots:
        return None
    # the forward graph, from the losses down: node -> [(next node, its output_nr)]
    children: dict[Any, list[tuple[Any, int]]] = {}
    todo = [node for node, _ in roots]
    while todo:
        node = todo.pop()
        if node in children:
            continue
        kids = [(n, nr) for n, nr in node.next_functions if n is not None]
        children[node] = kids
        todo.extend(n for n, _ in kids if n not in children)
    # useful: a parameter's accumulator is reachable from the node
    order = _postorder(children, [node for node, _ in roots])
    useful: set[Any] = set()
    for node in order:  # children before parents
        leaf = getattr(node, "variable", None)
        if (isinstance(leaf, Tensor) and id(leaf) in param_ids) or any(
            n in useful for n, _ in children[node]
        ):
            useful.add(node)
    if not useful:
        return None
    indeg: dict[Any, int] = {n: 0 for n in useful}
    for node in useful:
        for n, _ in children[node]:
            if n in useful:
                indeg[n] += 1
    root_nodes = {node for node, _ in roots}
    ready = [n for n in dict.fromkeys(node for node, _ in roots) if n in useful and indeg[n] == 0]
    pending: dict[Any, set[int]] = {}
    found: list[GradientEdge] | None = None
    while ready:
        node = ready.pop()
        pending.pop(node, None)
        for n, nr in children[node]:
            if n not in useful:
                continue
            pending.setdefault(n, set()).add(nr)
            indeg[n] -= 1
            if indeg[n] == 0:
                ready.append(n)
        # a cut: all the flow that is left enters one node (no loss node is still waiting)
        if len(pending) == 1 and set(ready) == set(pending):
            (target,) = pending
            is_leaf = isinstance(getattr(target, "variable", None), Tensor)
            if target not in root_nodes and not is_leaf:
                found = [GradientEdge(target, nr) for nr in sorted(pending[target])]
    return found


def _postorder(children: Mapping[Any, list[tuple[Any, int]]], roots: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    out: list[Any] = []
    for root in roots:
        if root in seen:
            continue
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:
            node, done = stack.pop()
            if done:
                out.append(node)
                continue
            if node in seen:
                continue
            seen.add(node)
            stack.append((node, True))
            stack.extend((n, False) for n, _ in children[node] if n not in seen)
    return out


# --------------------------------------------------------------------------- helpers


def _scalars(losses: Sequence[Tensor]) -> list[Tensor]:
    items = list(losses)
    if not items:
        raise ValueError("losses is empty: expected at least one loss term")
    out = []
    for i, loss in enumerate(items):
        if not isinstance(loss, Tensor):
            raise TypeError(f"losses[{i}] must be a Tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(
                f"losses[{i}] has shape {tuple(loss.shape)}: expected a scalar loss term"
            )
        with torch.enable_grad():
            out.append(loss.reshape(()))
    return out


def _as_outputs(outputs: Output | Sequence[Output]) -> list[Output]:
    outs = [outputs] if isinstance(outputs, (Tensor, GradientEdge)) else list(outputs)
    if not outs:
        raise ValueError("outputs is empty: expected the shared output y (e.g. the logits)")
    for i, y in enumerate(outs):
        if isinstance(y, Tensor) and not y.requires_grad:
            raise ValueError(
                f"outputs[{i}] (shape {tuple(y.shape)}) does not require grad: pass the "
                "network's output itself, not a detached copy"
            )
        if not isinstance(y, (Tensor, GradientEdge)):
            raise TypeError(f"outputs[{i}] must be a Tensor or GradientEdge, got {type(y)}")
    return outs


def _leaves_around_edges(losses: Sequence[Tensor], edges: Sequence[GradientEdge]) -> set[int]:
    """Ids of leaves the losses reach without going through any of ``edges``."""
    stop = {(e.node, e.output_nr) for e in edges}
    found: set[int] = set()
    seen: set[Any] = set()
    todo = [t.grad_fn for t in losses if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if isinstance(leaf, Tensor):
            found.add(id(leaf))
            continue
        for edge in node.next_functions:
            if edge[0] is not None and (edge[0], edge[1]) not in stop:
                todo.append(edge[0])
    return found


def _stage1(
    losses: list[Tensor], inputs: list[Any], how: str, *, trunk_needed: bool
) -> list[Tensor | None]:
    """Per-term gradients of the losses with respect to y (and the bypassing leaves)."""
    k = len(losses)
    if how == "batched":
        stacked = torch.stack(losses)
        if not stacked.requires_grad:
            return [None] * len(inputs)
        eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
        grads = torch.autograd.grad(
            stacked, inputs, eye, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        return list(grads)
    out: list[Tensor | None] = [None] * len(inputs)
    for i, loss in enumerate(losses):
        if not loss.requires_grad:
            continue
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        for j, g in enumerate(grads):
            if g is None:
                continue
            buf = out[j]
            if buf is None:
                buf = out[j] = g.new_zeros((k, *g.shape))
            buf[i].copy_(g)
    return out


def _dense(g: Tensor | None, index: int) -> Tensor | None:
    """A checked per-term stack in the default (contiguous) layout.

    Under ``vmap`` each row comes out in the layout of the parameter or of its gradient
    (``channels_last``, a transposed or strided view), so the stack is not contiguous;
    the sequential mode's stacks are, and consumers view them flat (``(K, -1)``).
    """
    if g is None:
        return None
    if g.is_sparse:
        raise TypeError(
            f"parameter {index} received a sparse gradient; per-term balancing needs dense "
            "gradients (use sparse=False in nn.Embedding)"
        )
    return g.contiguous()


def _agree(ref: list[Tensor | None], other: list[Tensor | None]) -> bool:
    if len(ref) != len(other):
        return False
    for a, b in zip(ref, other, strict=True):
        if a is None or b is None:
            if not (a is None and b is None):
                z = a if a is not None else b
                assert z is not None
                if bool(z.count_nonzero()):
                    return False
            continue
        if a.shape != b.shape:
            return False
        if not a.numel():
            continue  # a parameter with a zero-size dimension: nothing to compare
        # summation order differs between the modes: compare relative to the largest entry
        tol = {torch.float64: 1e-9, torch.float32: 1e-3}.get(a.dtype, 3e-2)
        low, high = torch.aminmax(a)
        scale = torch.maximum(low.abs(), high.abs()).clamp_min(torch.finfo(a.dtype).tiny)
        # one term's row at a time: the difference of a whole stack would be a third
        # gradient set alive next to the two being compared
        for row_a, row_b in zip(a, b, strict=True):
            if bool((row_a - row_b).abs_().amax() > tol * scale):
                return False
    return True


def _synchronizer(params: Sequence[Tensor]) -> Callable[[], None]:
    devices = {p.device for p in params if p.device.type == "cuda"}
    if not devices:
        return lambda: None

    def sync() -> None:
        for d in devices:
            torch.cuda.synchronize(d)

    return sync
