"""Per-term gradients and their Gramian: the one engine every method uses.

A gradient-level method needs, for K loss terms L_1..L_K and the shared parameters
theta (P numbers in all), the K x P Jacobian ``J`` whose row i is ``g_i = dL_i/dtheta``,
or only its K x K Gramian ``J J^T``. Three ways to get it:

- **exact** (``"exact"`` sequential, ``"batched"`` vectorised): K backward passes
  (``torch.autograd.grad`` per term, or one call with ``is_grads_batched=True``); holds the
  K gradient copies, K P numbers. The Gramian is accumulated per parameter tensor in
  float64, never as one concatenated K x P matrix.
- **feature** (``"feature"``): the gradients of the last shared representation ``z``
  (the trunk's output, the heads' input) instead of theta, flattened per sample to
  K x (B D), never summed over the batch (Liu et al. 2021, IMTL, sec. 3.1; Sener & Koltun
  2018, MGDA-UB). The K passes only traverse the heads; the trunk is traversed once.
- **Gramian-only** (``"gramian"``): column i of ``J J^T`` is ``J g_i``, a Jacobian-vector
  product of a vector-Jacobian product, computed by double backward. One gradient copy
  is alive at a time: memory O(P) instead of O(K P), for about three times the compute.

``term_grads`` returns the stacked per-term gradients themselves (the MTAdam optimizer
uses it); ``term_gramian`` returns the Gramian in any of the modes above;
``collect_terms`` returns the raw per-term quantities of one micro-batch, to be summed
over micro-batches or averaged over ranks before balancing (``lossbalance.Accumulator``,
``torch.distributed``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lossbalance._base import add_gramian
from lossbalance._validation import check_choice, warn_once
from lossbalance.engine import _autogram, _vjp
from lossbalance.engine._graph import (
    check_dense,
    combine_stack,
    error_line,
    per_term,
    reachable_leaves,
)

__all__ = ["GRAD_MODES", "GRAMIAN_MODES", "collect_terms", "term_grads", "term_gramian"]

GRAD_MODES = ("auto", "sequential", "batched", "two_stage")
GRAMIAN_MODES = ("auto", "exact", "batched", "gramian", "feature")

# mode="auto" of term_grads: timed runs per candidate on the first call for a key, and how
# much faster than sequential a vectorised mode must be to be chosen
AUTO_REPEATS = 2
AUTO_MARGIN = 0.05


def term_grads(
    losses: Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    mode: str = "auto",
    retain_graph: bool = False,
    out: Sequence[Tensor | None] | None = None,
) -> list[Tensor | None]:
    """Stacked per-term gradients of ``losses`` with respect to ``params``.

    Terms that do not reach a parameter that another term reaches contribute zeros there.

    Args:
        losses: K scalar tensors.
        params: the tensors to differentiate with respect to.
        mode: ``"sequential"`` runs K ``torch.autograd.grad`` calls; ``"batched"`` runs one
            vectorised call (``is_grads_batched=True``); ``"two_stage"`` runs K cheap passes
            from the losses to their shared output (the logits, found in the graph) and
            one vectorised call from there through the network
            (:func:`lossbalance.engine._vjp.two_stage_term_grads`). The vectorised modes fall back
            to sequential (with a once-only warning) when an operation has no batching
            rule. ``"auto"`` (default) chooses by timing, see below. Every mode is exact;
            they differ in rounding only.
        retain_graph: keep the graph after the last backward (the vectorised paths always
            keep it, so that the sequential fallback can run; it is freed with the
            caller's references to the losses).
        out: optional, one entry per parameter: a ``(K, *p.shape)`` tensor that the
            sequential mode writes the stack into (and returns) instead of allocating a
            new one, where its shape, dtype and device match; ``None`` entries and the
            vectorised modes allocate. Reusing stacks across steps saves the allocation
            (on the CPU large blocks come fresh from the kernel every time, page faults
            and all).

    ``mode="auto"``: with one term, sequential (one backward pass). Otherwise, on the first
    call for a key (the parameters' shapes, dtypes and devices, and K), sequential,
    two_stage and batched are each run ``AUTO_REPEATS`` (2) times on this call's graph
    (:func:`lossbalance.engine._vjp.choose_mode`) and a vectorised mode is chosen only if it is
    more than ``AUTO_MARGIN`` (5%) faster than sequential (the leanest in memory); that
    call returns the chosen mode's gradients, and later calls with the key run the cached
    mode once. That first call's peak memory is the most demanding mode's own plus one set
    of K gradients (one candidate's result is kept while another runs). The key holds
    shapes rather than tensor identities, so copies of one model (and seeded reruns in one
    process) use the same mode and give bit-identical results;
    another process may time differently and round differently. Nothing is timed, and
    sequential is used, under ``torch.use_deterministic_algorithms(True)`` and while a
    CUDA graph is being captured without a cached choice.
    ``lossbalance.engine._vjp.clear_choices()`` forgets the choices.

    Returns:
        One entry per parameter: a contiguous ``(K, *p.shape)`` tensor in every mode,
        whatever the layout of ``p`` (``channels_last``, a transposed or strided view), or
        ``None`` if no loss reaches ``p``.

    Example:
        >>> import torch, lossbalance
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (g,) = lossbalance.term_grads([w.sum(), (w * w).sum()], [w])
        >>> g
        tensor([[1., 1.],
                [2., 4.]])
    """
    check_choice("mode", mode, GRAD_MODES)
    params = list(params)
    losses = list(losses)
    if out is not None and len(out) != len(params):
        raise ValueError(f"term_grads: out has {len(out)} entries for {len(params)} parameters")
    # callers such as an optimizer's step() run under no_grad; the backward needs grad mode
    with torch.enable_grad():
        if mode == "auto":
            return _auto_term_grads(losses, params, retain_graph, out)
        if mode == "two_stage":
            return _two_stage(losses, params, retain_graph)
        return per_term(
            losses,
            params,
            len(params),
            batched=mode == "batched",
            retain_graph=retain_graph,
            out=out,
        )


def auto_key(params: Sequence[Tensor], num_terms: int) -> tuple[object, ...]:
    """The cache key of ``term_grads(mode="auto")``: shapes, dtypes, devices of the
    parameters and K (not their identities: copies of a model share the choice)."""
    return (
        "term_grads",
        tuple((tuple(p.shape), p.dtype, p.device) for p in params),
        num_terms,
    )


def _capturing(params: Sequence[Tensor]) -> bool:
    return (
        bool(params)
        and params[0].device.type == "cuda"
        and torch.cuda.is_current_stream_capturing()
    )


def _auto_term_grads(
    losses: list[Tensor],
    params: list[Tensor],
    retain_graph: bool,
    out: Sequence[Tensor | None] | None = None,
) -> list[Tensor | None]:
    if len(losses) <= 1 or not params or torch.are_deterministic_algorithms_enabled():
        return per_term(
            losses, params, len(params), batched=False, retain_graph=retain_graph, out=out
        )
    key = auto_key(params, len(losses))
    mode = _vjp.cached_choice(key)
    if mode is None:
        if _capturing(params):
            # timing synchronises the device, which a CUDA graph capture forbids
            mode = "sequential"
        else:
            try:
                choice = _vjp.choose_mode(
                    losses,
                    params,
                    repeats=AUTO_REPEATS,
                    margin=AUTO_MARGIN,
                    key=key,
                    warn=False,
                )
            except RuntimeError as err:
                if isinstance(err, torch.OutOfMemoryError):
                    raise
                # every candidate failed: the sequential path raises the actual error
                mode = "sequential"
            else:
                return choice.grads
    if mode == "two_stage":
        return _two_stage(losses, params, retain_graph)
    return per_term(
        losses, params, len(params), batched=mode == "batched", retain_graph=retain_graph, out=out
    )


def _two_stage(
    losses: list[Tensor], params: list[Tensor], retain_graph: bool
) -> list[Tensor | None]:
    try:
        # the graph is kept so that the sequential fallback can still run
        return _vjp.two_stage_term_grads(losses, params, retain_graph=True)
    except RuntimeError as err:
        if isinstance(err, torch.OutOfMemoryError):
            raise
        out = per_term(losses, params, len(params), batched=False, retain_graph=retain_graph)
        warn_once(
            "engine-two-stage-fallback",
            f"two-stage per-term gradients failed ({error_line(err)}); "
            "fell back to K sequential backward passes",
        )
        return out


def term_gramian(
    losses: Sequence[Tensor],
    params: Iterable[Tensor] | None = None,
    *,
    features: Tensor | Sequence[Tensor] | None = None,
    mode: str = "auto",
    retain_graph: bool = False,
) -> Tensor:
    r"""The K x K Gramian of the per-term gradients, in float64.

    .. math::
        \mathcal{G}_{ij} = \langle g_i, g_j \rangle, \qquad
        g_i = \partial L_i / \partial \theta \ \text{(or } \partial L_i / \partial z
        \text{ flattened over batch and features)}

    Args:
        losses: K scalar tensors (``losses[i]`` is L_i).
        params: the shared parameters theta (any iterable of tensors); needed by every mode
            but ``"feature"``.
        features: the shared representation z (a tensor with the batch first, or a
            sequence of them), needed by ``"feature"``.
        mode: ``"exact"`` (K ``autograd.grad`` calls), ``"batched"`` (one vectorised call),
            ``"gramian"`` (layer by layer from the layers' inputs and the K gradients of
            their outputs, :mod:`lossbalance.engine._autogram`; no K gradient copies of the
            recognised layers), ``"feature"`` (gradients of z); ``"auto"`` is
            ``"feature"`` when ``features`` is given, else ``"gramian"`` (as fast as
            ``"exact"`` or faster: 2x on an MLP, par on the MNIST CNN, K = 10, CPU).
        retain_graph: keep the graph after the last backward.

    Returns:
        A symmetric positive semi-definite ``(K, K)`` float64 tensor (on the CPU when the
        gradients live on an MPS device, which has no float64).

    Example:
        >>> import torch, lossbalance
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> lossbalance.term_gramian([w.sum(), (w * w).sum()], [w])
        tensor([[ 2.,  6.],
                [ 6., 20.]], dtype=torch.float64)

    Notes:
        ``"gramian"`` multiplies in the model's dtype and accumulates in float64, like the
        exact modes; parameters it does not recognise (see :mod:`lossbalance.engine._autogram`)
        get their K gradients formed, for that parameter only.
    """
    check_choice("mode", mode, GRAMIAN_MODES)
    # a Gramian query defers nothing (unlike accumulation or torch.distributed, which
    # need the gradients themselves): "auto" may take the cheaper engine
    mode = resolve_mode(mode, features, gramian=True)
    with torch.enable_grad():
        items = [loss.reshape(()) for loss in losses]
        if not items:
            raise ValueError("losses is empty: expected at least one loss term")
        if mode == "feature":
            step = feature_terms(
                items, as_features(features), [], retain_graph=retain_graph, with_extra=False
            )
        else:
            if params is None:
                raise ValueError(
                    f"term_gramian(mode={mode!r}) needs params (the shared parameters)"
                )
            step = exact_or_gramian_terms(
                items, list(params), [], mode=mode, retain_graph=retain_graph
            )
    return step.gramian


# --------------------------------------------------------------------------- helpers


def resolve_mode(mode: str, features: object, *, gramian: bool = False) -> str:
    """``"auto"`` -> ``"feature"`` when features are given, else ``"gramian"`` where the
    caller allows it (``gramian=True``: it needs the Gramian only, not gradients to sum over
    micro-batches or ranks, nor the per-term gradients themselves), else ``"exact"``.

    The Gramian engine is as fast as exact mode or faster and holds fewer gradients (issue
    18: 0.3-0.6x exact's time on an MLP, par on the MNIST CNN), so ``"auto"`` takes it
    wherever it can run.
    """
    if mode == "auto":
        if features is not None:
            return "feature"
        return "gramian" if gramian else "exact"
    if mode == "feature" and features is None:
        raise ValueError(
            "mode='feature' needs features=z, the last shared representation (the trunk's "
            "output that the heads take as input)"
        )
    return mode


def as_features(features: Tensor | Sequence[Tensor] | None) -> list[Tensor]:
    """Validate the shared representation(s) z: tensors that require grad.

    The same tensor passed twice is kept once (it would enter the Gramian and the trunk
    pass twice, doubling the trunk's gradient). A feature that lies on the autograd path of
    another (``[pre, tanh(pre)]``, ``[z, z.view(...)]``) raises ``ValueError``: the
    gradient of the inner one already contains what flows through the outer one.
    """
    if features is None:  # pragma: no cover - resolve_mode rejects it first
        raise ValueError("features is None")
    items = [features] if isinstance(features, Tensor) else list(features)
    if not items:
        raise ValueError("features is empty: expected the trunk's output tensor")
    for i, z in enumerate(items):
        if not isinstance(z, Tensor):
            raise TypeError(f"features[{i}] must be a Tensor, got {type(z).__name__}")
        if not z.requires_grad:
            raise ValueError(
                f"features[{i}] (shape {tuple(z.shape)}) does not require grad: pass the "
                "trunk's output itself, not a detached copy"
            )
    first: dict[int, int] = {}
    for i, z in enumerate(items):
        first.setdefault(id(z), i)
    index = list(first.values())
    if len(index) > 1:
        _check_not_nested([items[i] for i in index], index)
    return [items[i] for i in index]


def _check_not_nested(features: Sequence[Tensor], index: Sequence[int]) -> None:
    """Raise if one feature is reached by walking the graph down from another.

    One walk from all the features at once: each node carries the set (a bit mask) of
    features above it and is revisited only when that set grows, so the cost is one walk
    of the graph below the features (as ``reachable_leaves``) for the usual few features.
    """
    edges: dict[tuple[object, int], int] = {}
    leaves: dict[int, int] = {}
    masks: dict[object, int] = {}
    todo: list[tuple[object, int]] = []
    for n, z in enumerate(features):
        if z.grad_fn is None:
            leaves[id(z)] = n
        else:
            edges[(z.grad_fn, z.output_nr)] = n
            todo.append((z.grad_fn, 1 << n))
    while todo:
        node, mask = todo.pop()
        new = mask & ~masks.get(node, 0)
        if not new:
            continue
        masks[node] = masks.get(node, 0) | new
        leaf = getattr(node, "variable", None)
        if isinstance(leaf, Tensor):
            inner = leaves.get(id(leaf))
            if inner is not None and new & ~(1 << inner):
                _raise_nested(index, inner, new & ~(1 << inner))
            continue
        for edge in node.next_functions:  # type: ignore[attr-defined]
            if edge[0] is None:
                continue
            inner = edges.get(edge)
            if inner is not None and new & ~(1 << inner):
                _raise_nested(index, inner, new & ~(1 << inner))
            todo.append((edge[0], new))


def _raise_nested(index: Sequence[int], inner: int, outer_mask: int) -> None:
    outer = (outer_mask & -outer_mask).bit_length() - 1
    i, j = index[inner], index[outer]
    raise ValueError(
        f"features[{i}] lies on the autograd path of features[{j}] (features[{j}] is "
        f"computed from features[{i}]): the gradient of features[{i}] already contains "
        f"what flows through features[{j}], so the trunk would receive that part twice. "
        "Pass only representations that do not depend on one another (e.g. the outputs "
        "the heads take as input)"
    )


def _acc_device(t: Tensor) -> torch.device:
    # float64 is unavailable on MPS; a K x K accumulator on the CPU costs nothing
    return torch.device("cpu") if t.device.type == "mps" else t.device


def _add_gramian(gram: Tensor, g: Tensor) -> None:
    add_gramian(gram, g.reshape(g.shape[0], -1))


# --------------------------------------------------------------------------- steps


@dataclass
class TermStep:
    """The first half of a balanced backward: the Gramian, then the gradients to write.

    Attributes:
        gramian: the ``(K, K)`` float64 Gramian of the per-term gradients.
        fixed: ``(leaf, gradient)`` pairs that do not depend on the weights (task-specific
            leaves: ``sum_i c_i`` of their per-term gradients).
        finish: ``finish(beta)`` returns the ``(leaf, gradient)`` pairs of the shared
            parameters, ``sum_i beta_i g_i`` (may run one more backward pass).
    """

    gramian: Tensor
    fixed: list[tuple[Tensor, Tensor]]
    finish: Callable[[Tensor], list[tuple[Tensor, Tensor]]]


def exact_or_gramian_terms(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    extra: Sequence[Tensor],
    *,
    mode: str,
    retain_graph: bool,
    extra_weights: Tensor | None = None,
) -> TermStep:
    """Gramian of the per-term gradients of ``shared`` (exact, batched or Gramian-only).

    ``losses`` are the K scalar terms. ``extra`` (task-specific leaves) get
    ``sum_i c_i`` of their per-term gradients (``c = extra_weights``, ones by default),
    computed in the same backward passes.
    """
    if mode == "gramian":
        try:
            return _gramian_only(losses, shared, extra, retain_graph, extra_weights)
        except (RuntimeError, NotImplementedError) as err:
            if isinstance(err, torch.OutOfMemoryError):
                raise
            # exact first: an error unrelated to double backward surfaces as itself
            step = _exact(
                losses, shared, extra, False, retain_graph=retain_graph, extra_weights=extra_weights
            )
            warn_once(
                "engine-gramian-fallback",
                "mode='gramian' needs double backward, which this model does not support "
                f"({error_line(err)}); fell back to mode='exact' (K gradient copies)",
            )
            return step
    return _exact(
        losses,
        shared,
        extra,
        mode == "batched",
        retain_graph=retain_graph,
        extra_weights=extra_weights,
    )


def _exact(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    extra: Sequence[Tensor],
    batched: bool,
    *,
    retain_graph: bool,
    extra_weights: Tensor | None,
) -> TermStep:
    k = len(losses)
    n = len(shared)
    grads = per_term(
        losses,
        [*shared, *extra],
        n,
        batched=batched,
        retain_graph=retain_graph,
        sum_weights=extra_weights,
    )
    gram = torch.zeros(k, k, dtype=torch.float64, device=_acc_device(losses[0]))
    stacks = [(p, g) for p, g in zip(shared, grads[:n], strict=True) if g is not None]
    for _, g in stacks:
        _add_gramian(gram, g)
    fixed = [(p, g) for p, g in zip(extra, grads[n:], strict=True) if g is not None]

    def finish(beta: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(p, combine_stack(beta, g)) for p, g in stacks]

    return TermStep(gram, fixed, finish)


def _gramian_only(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    extra: Sequence[Tensor],
    retain_graph: bool,
    extra_weights: Tensor | None,
) -> TermStep:
    # the Gramian layer by layer from the saved inputs and the K output gradients
    # (lossbalance.engine._autogram); the shared parameters' gradient is one weighted backward

    stacked = torch.stack([loss.reshape(()) for loss in losses])
    result = _autogram.autogram(list(losses), list(shared), list(extra), extra_weights)
    fixed = [(p, g) for p, g in zip(extra, result.sums, strict=True) if g is not None]
    # convolutions, norms, biases and the fallback formed their K gradients anyway: their
    # combined gradient is a product; the backward only runs down to the other layers
    held = {id(p): g for p, g in result.held}
    rest = [p for p in shared if id(p) not in held]

    def finish(beta: Tensor) -> list[tuple[Tensor, Tensor]]:
        out = {id(p): combine_stack(beta, g).to(p.dtype) for p, g in result.held}
        if rest:
            b = beta.to(dtype=stacked.dtype, device=stacked.device)
            grads = torch.autograd.grad(
                stacked, rest, grad_outputs=b, retain_graph=retain_graph, allow_unused=True
            )
            out.update((id(p), g) for p, g in zip(rest, grads, strict=True) if g is not None)
        return [(p, out[id(p)]) for p in shared if id(p) in out]

    return TermStep(result.gramian, fixed, finish)


def feature_terms(
    losses: Sequence[Tensor],
    features: Sequence[Tensor],
    shared: Sequence[Tensor],
    *,
    retain_graph: bool,
    with_extra: bool = True,
    exclude: Sequence[Tensor] = (),
    extra_weights: Tensor | None = None,
) -> TermStep:
    """Gramian of the per-term gradients of the features z (flattened per sample).

    The K per-term passes stop at z, so they traverse the heads only (pass i only head
    i). Leaves the losses reach without going through z (the heads' parameters) are
    included in those passes: shared ones get ``sum_i beta_i`` of their per-term
    gradients, the others ``sum_i c_i`` (``c = extra_weights``, ones by default).
    ``finish(beta)`` then runs one backward through the trunk with ``sum_i beta_i dL_i/dz``
    for the shared leaves behind z (and, only if there are non-shared leaves behind z, one
    more with ``sum_i c_i dL_i/dz`` for those). Leaves in ``exclude`` get nothing.

    A leaf reached both through z and around it (a trunk weight that a head uses too)
    gets its whole per-term gradients in the K passes, which then also traverse the trunk
    up to that leaf: correct, but no longer cheap in K.
    """
    k = len(losses)
    shared_ids = {id(p) for p in shared}
    excluded = {id(p) for p in exclude}
    head = reachable_leaves(losses, stop=features) if with_extra else []
    head = [p for p in head if id(p) not in excluded]
    head_shared = [p for p in head if id(p) in shared_ids]
    head_extra = [p for p in head if id(p) not in shared_ids]
    if head_shared:
        _warn_bypassed(len(head_shared))
    nz, ns = len(features), len(head_shared)
    grads = per_term(
        losses,
        [*features, *head_shared, *head_extra],
        nz + ns,
        batched=False,
        retain_graph=True,  # the trunk pass below may share nodes with the head passes
        sum_weights=extra_weights,
    )
    z_grads = grads[:nz]
    gram = torch.zeros(k, k, dtype=torch.float64, device=_acc_device(losses[0]))
    for g in z_grads:
        if g is not None:
            _add_gramian(gram, g)
    if all(g is None for g in z_grads):
        _warn_unreached()
    fixed = [(p, g) for p, g in zip(head_extra, grads[nz + ns :], strict=True) if g is not None]
    head_stacks = [
        (p, g) for p, g in zip(head_shared, grads[nz : nz + ns], strict=True) if g is not None
    ]

    def finish(beta: Tensor) -> list[tuple[Tensor, Tensor]]:
        out = [(p, combine_stack(beta, g)) for p, g in head_stacks]
        reached = [(z, g) for z, g in zip(features, z_grads, strict=True) if g is not None]
        if not reached:
            return out
        zs = [z for z, _ in reached]
        # the features are activations, not parameters: they get no .grad. Leaves the
        # losses also reach around z already have their whole per-term gradients (autograd
        # does not stop at an input), so the trunk pass must not count them again
        done = {id(z) for z in features} | {id(p) for p in head} | excluded
        trunk = [p for p in reachable_leaves(zs) if id(p) not in done]
        trunk_shared = [p for p in trunk if id(p) in shared_ids]
        trunk_extra = [p for p in trunk if id(p) not in shared_ids] if with_extra else []
        if trunk_shared:
            grads = torch.autograd.grad(
                zs,
                trunk_shared,
                grad_outputs=[combine_stack(beta, g) for _, g in reached],
                retain_graph=retain_graph or bool(trunk_extra),
                allow_unused=True,
            )
            out += [(p, g) for p, g in zip(trunk_shared, grads, strict=True) if g is not None]
        if trunk_extra:
            c = torch.ones(k) if extra_weights is None else extra_weights
            grads = torch.autograd.grad(
                zs,
                trunk_extra,
                grad_outputs=[combine_stack(c, g) for _, g in reached],
                retain_graph=retain_graph,
                allow_unused=True,
            )
            out += [(p, g) for p, g in zip(trunk_extra, grads, strict=True) if g is not None]
        return out

    return TermStep(gram, fixed, finish)


def _warn_bypassed(count: int) -> None:
    warn_once(
        "engine-features-bypassed",
        f"{count} shared parameter(s) are reached by the losses without going "
        "through features=...: their per-term gradients are computed in full (the K "
        "passes then traverse the trunk up to them) and they do not enter the Gramian. "
        "Intended for weights tied between trunk and heads; otherwise pass as features "
        "every trunk output that the heads use",
        stacklevel=4,
    )


def _warn_unreached() -> None:
    warn_once(
        "engine-features-unreached",
        "no loss term reaches the features passed as features=...; the Gramian is zero "
        "(pass the trunk's output that the heads take as input)",
        stacklevel=4,
    )


# --------------------------------------------------------------------------- deferred


@dataclass
class TermGrads:
    """Per-term gradients of one micro-batch, kept for balancing later.

    Gradient accumulation and ``torch.distributed`` balance per-term quantities that are
    sums over micro-batches or averages over ranks, so the balancing cannot run on one
    micro-batch's gradients: :func:`collect_terms` returns them raw.

    Attributes:
        grads: one entry per leaf of ``[*shared, *others]``: the ``(K, *p.shape)`` per-term
            stack for shared leaves (and for the others with ``stack_others``), else
            ``sum_i dL_i/dp``; ``None`` where no term reaches the leaf.
        gram: in feature mode, the Gramian of the per-term gradients of the features
            (flattened per sample); ``None`` otherwise.
    """

    grads: list[Tensor | None]
    gram: Tensor | None


def collect_terms(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    *,
    mode: str,
    features: Sequence[Tensor] = (),
    stack_others: bool,
    retain_graph: bool,
) -> TermGrads:
    """Raw per-term gradients of ``losses``: stacks for ``shared``, stacks or sums for ``others``.

    Modes ``"exact"`` / ``"batched"``: K passes (or one vectorised pass) over the whole
    graph. Mode ``"feature"``: K passes through the heads give the per-term gradients of
    the features z (their Gramian, and the heads' parameters), then K vector-Jacobian
    products through the trunk give the trunk parameters' per-term gradients
    :math:`J_z^T\\, \\partial L_i / \\partial z`: the weights are not known yet, so the
    single weighted trunk pass of :func:`feature_terms` is not possible. The caller picks
    ``"exact"`` for ``"gramian"``, whose O(P) memory trick cannot be summed over
    micro-batches or ranks (the cross terms need the full gradients).
    """
    if mode not in ("exact", "batched", "feature"):
        raise ValueError(f"collect_terms: mode {mode!r} (expected 'exact', 'batched', 'feature')")
    n = len(shared)
    if mode != "feature":
        num_stacked = n + (len(others) if stack_others else 0)
        grads = per_term(
            losses,
            [*shared, *others],
            num_stacked,
            batched=mode == "batched",
            retain_graph=retain_graph,
        )
        return TermGrads(grads, None)
    return _collect_features(losses, features, shared, others, stack_others, retain_graph)


def _collect_features(
    losses: Sequence[Tensor],
    features: Sequence[Tensor],
    shared: Sequence[Tensor],
    others: Sequence[Tensor],
    stack_others: bool,
    retain_graph: bool,
) -> TermGrads:
    k = len(losses)
    n = len(shared)
    index = {id(p): j for j, p in enumerate([*shared, *others])}
    out: list[Tensor | None] = [None] * len(index)
    head = [p for p in reachable_leaves(losses, stop=features) if id(p) in index]
    head_shared = [p for p in head if index[id(p)] < n]
    head_others = [p for p in head if index[id(p)] >= n]
    if head_shared:
        _warn_bypassed(len(head_shared))
    nz = len(features)
    num_stacked = nz + len(head_shared) + (len(head_others) if stack_others else 0)
    grads = per_term(
        losses,
        [*features, *head_shared, *head_others],
        num_stacked,
        batched=False,
        retain_graph=True,  # the trunk passes below may share nodes with the head passes
    )
    for p, g in zip([*head_shared, *head_others], grads[nz:], strict=True):
        out[index[id(p)]] = g
    gram = torch.zeros(k, k, dtype=torch.float64, device=_acc_device(losses[0]))
    reached = [(z, g) for z, g in zip(features, grads[:nz], strict=True) if g is not None]
    for _, g in reached:
        _add_gramian(gram, g)
    if not reached:
        _warn_unreached()
        return TermGrads(out, gram)
    zs = [z for z, _ in reached]
    done = {id(z) for z in features} | {id(p) for p in head}
    trunk = [p for p in reachable_leaves(zs) if id(p) not in done and id(p) in index]
    stacks = [index[id(p)] < n or stack_others for p in trunk]
    bufs: list[Tensor | None] = [None] * len(trunk)
    for i in range(k if trunk else 0):
        row = torch.autograd.grad(
            zs,
            trunk,
            grad_outputs=[g[i] for _, g in reached],
            retain_graph=retain_graph or i < k - 1,
            allow_unused=True,
        )
        for j, g in enumerate(row):
            if g is None:
                continue
            check_dense(g, index[id(trunk[j])])
            buf = bufs[j]
            if stacks[j]:
                if buf is None:
                    buf = bufs[j] = g.new_zeros((k, *g.shape))
                buf[i].copy_(g)
            elif buf is None:
                bufs[j] = g.clone()
            else:
                buf.add_(g)
    for p, buf in zip(trunk, bufs, strict=True):
        out[index[id(p)]] = buf
    return TermGrads(out, gram)
