"""``lossbalance.backward``: balance K loss terms and write ``.grad``, for any optimizer.

Three ways through one call: the local path (the per-term gradients of this process), the
distributed paths (per-term quantities averaged over ranks before balancing) and, shared
with :class:`lossbalance.Accumulator`, the deferred path that balances per-term gradients
summed over micro-batches. Every path raises ``_Skip`` for a non-finite step; ``backward``
turns it into the documented NaN weights (and, under a GradScaler, NaN ``.grad``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lossbalance._base import Balancer, GradientBalancer
from lossbalance._validation import as_loss_list, check_choice, warn_once
from lossbalance.engine._distributed import (
    all_reduce_mean,
    check_layout,
    layout_of,
    resolve_group,
    world_size,
)
from lossbalance.engine._engine import (
    GRAMIAN_MODES,
    _add_gramian,
    _warn_unreached,
    as_features,
    collect_terms,
    exact_or_gramian_terms,
    feature_terms,
    resolve_mode,
)
from lossbalance.engine._graph import combine_stack, per_term, reachable_leaves

__all__ = ["backward"]


# per-term backward passes: a compiled caller graph-breaks here and runs this eagerly
@torch.compiler.disable
def backward(
    losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor,
    balancer: Balancer,
    shared: nn.Module | Iterable[Tensor] | None = None,
    *,
    features: Tensor | Sequence[Tensor] | None = None,
    mode: str = "auto",
    retain_graph: bool = False,
    process_group: Any = "auto",
    grad_scaler: torch.amp.GradScaler | None = None,
) -> Tensor:
    r"""Balance K loss terms with ``balancer`` and accumulate the result into ``.grad``.

    The drop-in replacement of ``sum(losses).backward()``: call it, then ``optimizer.step()``
    (with ``balancer.parameters()`` in the optimizer when the balancer has any).

    **Loss-level balancer** (uncertainty, GLS, DWA, IMTL-L, normalisations): one backward
    of ``combined = balancer(stack(losses))``; every leaf gets
    :math:`\partial\,\mathrm{combined}/\partial\theta = \sum_i w_i\, \partial L_i/\partial\theta`.

    **Gradient-level balancer** (MGDA, PCGrad, IMTL-G, GradNorm, hybrid IMTL): with
    :math:`\tilde L = \mathrm{balancer.transform}(L)` and
    :math:`g_i = \partial \tilde L_i/\partial\theta_{sh}`,

    .. math::
        \alpha = \mathrm{balancer.weights}(\mathcal{G}, \tilde L), \quad
        \mathcal{G}_{ij} = \langle g_i, g_j\rangle, \quad
        \theta_{sh}.\mathrm{grad} \mathrel{+}= \sum_i \alpha_i g_i, \quad
        \theta_{t}.\mathrm{grad} \mathrel{+}= \partial \textstyle\sum_i \tilde L_i / \partial\theta_t

    where :math:`\theta_{sh}` are the ``shared`` parameters and :math:`\theta_t` every
    other leaf the losses reach (each head gets its own term's gradient; the balancer's own
    parameters, such as hybrid IMTL's scales, get theirs). In ``"feature"`` mode
    :math:`g_i = \partial \tilde L_i/\partial z` flattened over batch and features, and
    the trunk receives :math:`J_z^T \sum_i \alpha_i\, \partial \tilde L_i/\partial z`.

    Args:
        losses: K scalar tensors that require grad: a list, tuple, mapping (its values, in
            order) or 1-D tensor.
        balancer: a :class:`~lossbalance.Balancer` instance, built once (e.g. with
            ``lossbalance.create(name, num_terms)``) and reused every step so its state
            persists; ``balancer.num_terms`` must be K.
        shared: the shared parameters (an ``nn.Module`` or an iterable of leaf tensors;
            those that do not require grad are skipped). Required by gradient-level
            balancers, ignored by loss-level ones.
        features: z, the last shared representation (the trunk's output, the heads'
            input; batch first), or a sequence of them. Used by ``mode="feature"``.
        mode: how a gradient-level balancer's Gramian is built (ignored for loss-level):

            - ``"exact"``: K ``autograd.grad`` passes; holds K gradient copies of the
              shared parameters (K P numbers).
            - ``"batched"``: the same in one vectorised pass (``is_grads_batched``); faster
              for small models, falls back to ``"exact"`` (warned once) where an operation
              has no batching rule.
            - ``"gramian"``: the Gramian built layer by layer from each layer's input and
              the K output gradients (:mod:`lossbalance.engine._autogram`), never the K
              gradients of the shared parameters (memory O(P + K x the largest
              activation)), then one pass of the weighted sum; parameters outside the
              recognised layers go through exact per-term gradients. Exact mode's result
              within float64 rounding.
            - ``"feature"``: gradients of ``features``; K passes through the heads only
              and one through the trunk, so its cost hardly grows with K.
            - ``"auto"`` (default): ``"feature"`` if ``features`` is given; else
              ``"gramian"`` where it can run (one process, a balancer that needs only
              the Gramian), measured 0.35-0.6x exact mode's time on an MLP and
              0.83-0.96x on the MNIST CNN (``benchmarks/RESULTS.md``); else ``"exact"``
              (a balancer that needs the per-term gradients, ``torch.distributed``).
        retain_graph: keep the graph after the last backward pass.
        process_group: under ``torch.distributed``, the ranks' per-term quantities are
            averaged before the balancer runs, so that every rank computes the same weights
            and writes the same ``.grad``, equal to one process on the concatenated batch
            (see Distributed). ``"auto"`` (default) uses the default group when one is
            initialised with more than one rank; ``None`` never communicates; or a
            ``ProcessGroup``.
        grad_scaler: a ``torch.amp.GradScaler`` (see Mixed precision). The losses are
            scaled by it for the backward passes, the Gramian is unscaled before the
            balancer sees it, and ``.grad`` receives the *scaled* balanced gradients, like
            ``scaler.scale(loss).backward()``: follow with ``scaler.step(optimizer)`` and
            ``scaler.update()``.

    Returns:
        The weights applied, shape ``(K,)``, detached: for a loss-level balancer
        :math:`w_i = \partial\,\mathrm{combined}/\partial L_i`, for a gradient-level one
        :math:`\alpha`. ``balancer.last_weights`` holds the same values. All NaN if the step
        was skipped (see Notes).

    Example:
        >>> import torch, lossbalance
        >>> _ = torch.manual_seed(0)
        >>> trunk = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
        >>> heads = torch.nn.ModuleList([torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)])
        >>> balancer = lossbalance.create("imtl-g", 2)  # built once, reused every step
        >>> params = [*trunk.parameters(), *heads.parameters(), *balancer.parameters()]
        >>> optimizer = torch.optim.SGD(params, lr=0.1)
        >>> z = trunk(torch.randn(8, 3))
        >>> losses = [heads[0](z).pow(2).mean(), heads[1](z).abs().mean()]
        >>> weights = lossbalance.backward(losses, balancer, shared=trunk, features=z)
        >>> weights.shape
        torch.Size([2])
        >>> optimizer.step()
        >>> # a loss-level balancer needs no shared parameters
        >>> z = trunk(torch.randn(8, 3))
        >>> losses = [heads[0](z).pow(2).mean(), heads[1](z).abs().mean()]
        >>> lossbalance.backward(losses, lossbalance.Uniform(2))
        tensor([1., 1.])

    Notes:
        - Gradients are accumulated like autograd does (``.grad`` is created if ``None``,
          added to otherwise), but written by this function: autograd's accumulation
          hooks (e.g. ``DistributedDataParallel``'s all-reduce) do not fire; the averaging
          over ranks is done here instead (see Distributed).
        - Non-finite values: if a loss (after ``transform``) is not finite, nothing is
          computed further, the balancer is not called (its state is unchanged) and no
          ``.grad`` is written. If the Gramian or a per-term gradient is not finite, the
          balancer's ``weights`` is not called and nothing is written. If the weights or the
          final gradients are not finite, nothing is written (the balancer's state was
          already updated). In every case a :class:`~lossbalance.LossBalanceWarning` is
          emitted once and the returned weights are all NaN, so callers can tell (e.g.
          ``if weights.isnan().any(): skip optimizer.step()``). With ``grad_scaler``, the
          ``.grad`` of every leaf the call would have written is set to NaN instead, as an
          overflowing ``scaler.scale(loss).backward()`` would, so that
          ``scaler.step(optimizer)`` skips the step and ``scaler.update()`` lowers the scale.
        - Gradient accumulation: calling this once per micro-batch balances each
          micro-batch on its own; :class:`lossbalance.Accumulator` balances the per-term
          gradients summed over the micro-batches instead, as one large batch would.
          Several calls in one step add up silently. A ``.grad`` that no earlier call
          wrote (``loss.backward()`` before this call) warns once, since the balanced
          gradient is then added to the plain one; so does a balancer whose own
          parameters did not change between two calls while the model's did and whose
          ``.grad`` is nonzero (they are missing from the optimizer). Both checks look at
          one leaf (the first a walk from the losses meets): cheap, not exhaustive.
        - Task-specific parameters receive their own term's gradient, unweighted, as in
          the papers (MGDA sec. 3.3, IMTL sec. 3); MGDA's authors' code also scaled the
          heads by alpha. A balancer whose paper weights the heads too sets
          ``weights_heads = True`` (GradNorm, whose loss is :math:`\sum_i w_i L_i`): its
          heads get :math:`\sum_j (T^T\alpha)_j\, \partial L_j/\partial\theta`.
        - A ``transform`` enters through its K x K Jacobian T (K small passes over the
          transform's ops only): the Gramian given to ``weights`` is :math:`T G T^T` with G
          that of the raw terms, and the shared parameters get
          :math:`\sum_j (T^T\alpha)_j\, \partial L_j/\partial\theta`. The per-term passes
          differentiate the raw terms one at a time, so pass i only runs through what
          :math:`L_i` depends on (its head and the trunk), never through the other heads.
        - In ``"feature"`` mode, shared parameters that the losses reach without going
          through z (weights tied between trunk and heads) get :math:`\sum_i \alpha_i` of
          their per-term gradients there too, but do not enter the Gramian; the features
          themselves get no ``.grad``.

    Distributed:
        With a process group of R > 1 ranks, each holding a shard of the batch, the
        result is that of one process on the loss :math:`L_i = \frac1R \sum_r L_i^{(r)}`
        (the concatenated batch, for mean-reduced losses on equal shards: DDP's convention).
        The averaged loss values go to the balancer, so stateful balancers (initial-loss,
        DWA, GradNorm's L(0)) hold the same state on every rank, and a NaN on one rank
        makes every rank skip. Collectives per call:

        - ``"exact"`` / ``"batched"``: **one** all-reduce of the loss values, the K per-term
          gradient stacks of the shared parameters and the other leaves' gradients (per-term
          stacks when the balancer has a ``transform`` or ``weights_heads``, whose
          coefficients depend on the averaged losses; else their sums).
        - ``"gramian"``: falls back to ``"exact"`` (warned once). The Gramian of the
          averaged gradients has cross-rank terms :math:`\langle g_i^{(r)}, g_j^{(s)}\rangle`
          that the ranks' local double-backward Gramians do not contain; getting them
          without K gradient copies would take 2K sequential collectives.
        - ``"feature"``: **two**. The features of different samples live on different ranks,
          so the Gramian of the whole batch is a sum of local Gramians,
          :math:`\mathcal G = \frac1{R^2} \sum_r \mathcal G^{(r)}` (the local z-gradients of
          :math:`L_i^{(r)}` are R times those of :math:`L_i`); the first all-reduce carries
          it with the loss values (K + K^2 numbers). The trunk's gradient
          :math:`J_z^T \sum_i \alpha_i\, \partial L_i/\partial z` needs alpha and each rank's own
          activations, so it is averaged by a second all-reduce (P numbers, as DDP would
          send). One collective would need K per-term trunk gradients (K passes through
          the trunk and K times the traffic): the second collective is the cheaper way.
        - Loss level: **two**: the K loss values first (the weights of a nonlinear
          ``combined`` depend on them), then the gradients of one weighted backward.

        The model may be wrapped in ``DistributedDataParallel`` or not (its hooks do not
        fire either way). Random balancers (PCGrad) must be seeded alike on every rank
        (``seed=`` or the same ``torch.manual_seed`` before building them).

        Every rank must pass K terms and reach the same leaves: a rank can only write the
        leaves its losses reach. Shared parameters unused on some ranks are fine (they
        travel as zeros with a flag; one that no rank reached gets no ``.grad``). A head
        whose task has no samples in a rank's shard must stay in that rank's graph: run it
        on the empty selection (``head(z[mask])``, with the loss summed over the samples
        and divided by the shard size; a mean over no samples is NaN and skips the step
        on every rank). It then gets zero gradients there, and the average over ranks is
        one process on the concatenated batch. Before its first collective, every call
        compares the ranks' layouts (K, the number and sizes of the shared parameters and
        of the other leaves, the path taken) in one all-gather of 8 integers (on the CPU
        for gloo; on an NCCL-only group it synchronises with the device): ranks that
        differ raise the same ``RuntimeError`` on every rank, naming what differs,
        instead of aborting in gloo or hanging. Counts and sizes are compared, not
        identities: ranks reaching different leaves of identical sizes are not detected.

    Mixed precision:
        Under ``torch.autocast`` the per-term gradients come out of low-precision
        backward passes; with ``grad_scaler`` the K losses are multiplied by the scale
        :math:`s` first, so they do not underflow. Weights are not scale invariant for
        every method (MGDA's min-norm weights are, GradNorm's norms are not), so the
        balancer always sees the unscaled Gramian :math:`\mathcal G / s^2` and the
        unscaled losses. Gradients that the balancer writes into its own parameters
        (GradNorm's task weights) and those of a ``transform`` are multiplied by
        :math:`s` too, so ``scaler.step`` unscales every ``.grad`` alike.
    """
    check_balancer(balancer)
    check_choice("mode", mode, GRAMIAN_MODES)
    scaler = check_scaler(grad_scaler)
    group = resolve_group(process_group)
    # the caller may be under no_grad (e.g. inside an optimizer's step); the graph of the
    # losses was built before, but reshaping or transforming them needs grad mode
    with torch.enable_grad():
        items = as_loss_list(losses)
    check_num_terms(balancer, len(items))
    check_grads_before(balancer, items)
    params: list[Tensor] = []
    try:
        if balancer.kind == "loss":
            if group is None:
                return _loss_level(items, balancer, retain_graph, scaler)
            return _loss_level_distributed(items, balancer, retain_graph, scaler, group)
        params = shared_params(shared, balancer)
        gramian_ok = group is None and not _needs_grads(balancer)
        mode = vector_mode(
            balancer, resolve_mode(mode, features, gramian=gramian_ok), group is not None
        )
        zs = as_features(features) if mode == "feature" else []
        if group is None:
            return _gradient_level(items, balancer, params, zs, mode, retain_graph, scaler)
        if mode == "feature":
            return _features_distributed(items, balancer, params, zs, retain_graph, scaler, group)
        sums = TermSums(balancer, params, deferred_mode(mode, "torch.distributed"))
        sums.add(items, zs, retain_graph, scaler)
        return sums.finish(group, scaler)
    except _Skip as skip:
        return skip.resolve(
            items[0], len(items), scaler, lambda: _written_leaves(items, balancer, params)
        )


def check_balancer(balancer: object) -> None:
    if isinstance(balancer, str):
        raise TypeError(
            f"balancer must be a Balancer instance, got the string {balancer!r}: build it once "
            f"with lossbalance.create({balancer!r}, num_terms) and pass that object every step, "
            "so that its state (running statistics, learnable weights) persists"
        )
    if not isinstance(balancer, Balancer):
        raise TypeError(
            f"balancer must be a lossbalance Balancer instance, got {type(balancer).__name__}"
        )


def check_num_terms(balancer: Balancer, k: int) -> None:
    if k != balancer.num_terms:
        raise ValueError(
            f"{type(balancer).__name__} was built for {balancer.num_terms} loss terms, got {k}"
        )


# --------------------------------------------------------------------------- misuse checks

# Per probe leaf (by id): the leaf, its .grad and the grad's version as the last call of
# ``backward`` found them. Our own write adds to that grad in place (version + 1) or, from
# None, creates it; anything else (autograd's accumulation into it, a new grad object) was
# written by someone else since.
_seen_grads: dict[int, tuple[weakref.ref[Tensor], weakref.ref[Tensor] | None, int]] = {}
# Per balancer with parameters: a probe leaf, a slice of its values, its parameters' values.
_own_state: weakref.WeakKeyDictionary[Balancer, tuple[weakref.ref[Tensor], Tensor, list[Tensor]]]
_own_state = weakref.WeakKeyDictionary()
_PROBE_VALUES = 64
# warn_once, check_grads_before, backward, the torch.compiler.disable wrapper, the caller
_CALLER = 5


def check_grads_before(balancer: Balancer, items: Sequence[Tensor]) -> None:
    """Warn once for two silent mistakes, from one leaf that the call will write.

    - A ``.grad`` that the previous ``backward`` call did not leave there (the user ran
      ``loss.backward()`` first, so this call adds the balanced gradient to the plain
      one). Several ``backward`` calls in one step (accumulating on purpose) stay silent.
    - The balancer's own parameters unchanged since the previous call while the model's
      changed, with a nonzero ``.grad``: they are not in the optimizer (hybrid IMTL's
      scales then stay fixed, which makes it IMTL-G).

    Only a balancer's first ``_CHECKED_CALLS`` calls are checked (each check reads the
    device once or twice).
    """
    # Both are set-up mistakes, visible from a balancer's first calls: checking only those
    # keeps the host reads (and the probe copies) off every later step.
    calls = _checked_calls.get(balancer, 0)
    if calls >= _CHECKED_CALLS:
        return
    _checked_calls[balancer] = calls + 1
    own = [p for p in balancer.parameters() if p.requires_grad]
    probe = _first_leaf(items, {id(p) for p in own})
    if probe is None:
        return
    if _foreign_grad(probe):
        warn_once(
            balancer._warning_key("backward-foreign-grad"),
            "lossbalance.backward: the parameters already hold a .grad that no earlier "
            "lossbalance.backward call wrote (was loss.backward() called first?); the "
            "balanced gradient is added to it, as autograd accumulates. Call "
            "optimizer.zero_grad() before the step's first backward (several "
            "lossbalance.backward calls in one step accumulate silently)",
            stacklevel=_CALLER,
        )
    if own and _own_params_stuck(balancer, own, probe):
        names = [n for n, p in balancer.named_parameters() if p.requires_grad]
        warn_once(
            balancer._warning_key("backward-own-params-stuck"),
            f"lossbalance.backward: the parameters of {type(balancer).__name__} "
            f"({', '.join(names)}) did not change since the previous call while the model's "
            "did, and their .grad keeps growing: they are not in the optimizer. Pass "
            "balancer.parameters() to it too (without them the learned weights stay at "
            "their initial values; hybrid IMTL becomes IMTL-G)",
            stacklevel=_CALLER,
        )


#: calls per balancer that check_grads_before looks at
_CHECKED_CALLS = 4
_checked_calls: weakref.WeakKeyDictionary[Balancer, int] = weakref.WeakKeyDictionary()


def _first_leaf(items: Sequence[Tensor], skip: set[int]) -> Tensor | None:
    """The first leaf requiring grad that a depth-first walk from the losses meets."""
    seen: set[object] = set()
    todo = [t.grad_fn for t in reversed(items) if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if isinstance(leaf, Tensor):
            if id(leaf) not in skip:
                return leaf
            continue
        todo += [e[0] for e in reversed(node.next_functions) if e[0] is not None]  # type: ignore[attr-defined]
    return None


def _foreign_grad(p: Tensor) -> bool:
    grad = p.grad
    key = id(p)
    record = _seen_grads.get(key)
    if record is not None and record[0]() is not p:
        record = None  # another tensor at a reused address
    _seen_grads[key] = (
        weakref.ref(p, lambda _: _seen_grads.pop(key, None)),
        None if grad is None else weakref.ref(grad),
        0 if grad is None else grad._version,
    )
    if grad is None or grad.is_sparse:
        return False
    if record is not None:
        _, old, version = record
        if old is None:
            return False  # created by the previous call (or it skipped and someone else)
        if old() is grad and grad._version - version in (0, 1):
            return False  # the previous call added to it (or skipped the step)
    return bool(grad.any())  # zero_grad(set_to_none=False) leaves zeros: not a mistake


def _own_params_stuck(balancer: Balancer, own: Sequence[Tensor], probe: Tensor) -> bool:
    with torch.no_grad():
        values = probe.detach().reshape(-1)[:_PROBE_VALUES].clone()
        mine = [p.detach().clone() for p in own]
    previous = _own_state.get(balancer)
    _own_state[balancer] = (weakref.ref(probe), values, mine)
    if previous is None or previous[0]() is not probe:
        return False
    _, old_values, old_mine = previous
    if torch.equal(old_values, values):
        return False  # the model did not step either (accumulation, a skipped step)
    if not all(torch.equal(a, b) for a, b in zip(old_mine, mine, strict=True)):
        return False
    return any(p.grad is not None and bool(p.grad.any()) for p in own)


def check_scaler(grad_scaler: object) -> torch.amp.GradScaler | None:
    """The scaler if it is enabled, ``None`` for no scaler or a disabled one."""
    if grad_scaler is None:
        return None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
        )
    return grad_scaler if grad_scaler.is_enabled() else None


def deferred_mode(mode: str, why: str, stacklevel: int = 4) -> str:
    """The collecting mode for summed or averaged per-term gradients: no ``"gramian"``."""
    if mode == "gramian":
        warn_once(
            "backward-gramian-deferred",
            f"mode='gramian' cannot be used with {why}: the Gramian of summed or averaged "
            "gradients has cross terms that separate double-backward Gramians do not "
            "contain; fell back to mode='exact' (K gradient copies)",
            stacklevel=stacklevel,
        )
        return "exact"
    return mode


# --------------------------------------------------------------------------- skipping


class _Skip(Exception):
    """A non-finite step: raised anywhere below ``backward``, resolved there."""

    def __init__(self, key: str, what: str) -> None:
        super().__init__(what)
        self.key = key
        self.what = what

    def resolve(
        self,
        like: Tensor,
        k: int,
        scaler: torch.amp.GradScaler | None,
        leaves: Callable[[], list[Tensor]],
        stacklevel: int = 4,
    ) -> Tensor:
        """Warn once, poison ``leaves()`` under a GradScaler, return K NaN weights."""
        if scaler is None:
            done = "skipped this step (no .grad written)"
        else:
            done = (
                "skipped this step (.grad set to NaN, so that scaler.step skips the optimizer "
                "step and scaler.update lowers the scale)"
            )
            _poison(leaves())
        warn_once(
            f"backward-nonfinite-{self.key}",
            f"lossbalance.backward: {self.what}; {done} and returned NaN weights",
            stacklevel=stacklevel,  # warn_once, resolve, backward (or Accumulator), caller
        )
        return torch.full((k,), float("nan"), dtype=like.dtype, device=like.device)


def _written_leaves(
    items: Sequence[Tensor], balancer: Balancer, params: Sequence[Tensor]
) -> list[Tensor]:
    """Every leaf a call of ``backward`` writes: shared, reached by the losses, own."""
    ids = {id(p) for p in params}
    leaves = list(params)
    leaves += [p for p in reachable_leaves(list(items)) if id(p) not in ids]
    return leaves + [p for p in balancer.parameters() if p.requires_grad]


@torch.no_grad()
def _poison(leaves: Sequence[Tensor]) -> None:
    seen: set[int] = set()
    for p in leaves:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.grad is None or p.grad.is_sparse:
            p.grad = torch.full_like(p, float("nan"), requires_grad=False)
        else:
            p.grad.fill_(float("nan"))


def _check_finite(key: str, what: str, tensors: Sequence[Tensor]) -> None:
    if not _all_finite(tensors):
        raise _Skip(key, what)


# --------------------------------------------------------------------------- scaling


def _scale_of(scaler: torch.amp.GradScaler | None) -> Tensor | None:
    """The current loss scale as a float64 scalar tensor (no host sync)."""
    if scaler is None:
        return None
    scale = scaler._scale  # set by scaler.scale(); what MTAdam.step reads too
    assert scale is not None
    return scale.double()


def _scaled(items: Sequence[Tensor], scaler: torch.amp.GradScaler | None) -> list[Tensor]:
    if scaler is None:
        return list(items)
    with torch.enable_grad():
        return [scaler.scale(loss) for loss in items]


def _unscale_gramian(gram: Tensor, scale: Tensor | None) -> Tensor:
    if scale is None:
        return gram
    return gram / scale.to(gram.device).square()


def _times(g: Tensor, scale: Tensor | None) -> Tensor:
    return g if scale is None else g * scale.to(g.device, g.dtype)


@contextmanager
def _own_grads_scaled(balancer: Balancer, scale: Tensor | None) -> Iterator[None]:
    """Multiply by the loss scale what ``balancer.weights`` writes into its own ``.grad``.

    GradNorm trains its task weights inside ``weights()`` from the unscaled Gramian; under
    a GradScaler every ``.grad`` must be scaled alike, since ``scaler.step`` unscales all.
    """
    if scale is None:
        yield
        return
    own = [p for p in balancer.parameters() if p.requires_grad]
    saved = [p.grad for p in own]
    for p in own:
        p.grad = None
    try:
        yield
    finally:
        with torch.no_grad():
            for p, old in zip(own, saved, strict=True):
                new = p.grad
                if new is None:
                    p.grad = old
                    continue
                new = _times(new, scale)
                p.grad = new if old is None else old.add_(new)


# --------------------------------------------------------------------------- loss level


def _loss_level(
    items: list[Tensor],
    balancer: Balancer,
    retain_graph: bool,
    scaler: torch.amp.GradScaler | None,
) -> Tensor:
    with torch.enable_grad():
        stacked = torch.stack(items)
        _check_finite("losses", "a loss is not finite", [stacked])
        previous = balancer.last_weights
        combined = _combined(balancer, stacked)
        weights = balancer.last_weights
        if weights is None or weights is previous:
            # the balancer did not record its weights: d combined / d L_i by autograd
            (weights,) = torch.autograd.grad(combined, stacked, retain_graph=True)
            balancer.last_weights = weights.detach().clone()
        leaves = reachable_leaves([combined])
        if scaler is not None:
            combined = scaler.scale(combined)
        grads = (
            torch.autograd.grad(combined, leaves, retain_graph=retain_graph, allow_unused=True)
            if leaves
            else ()
        )
    writes = [(p, g) for p, g in zip(leaves, grads, strict=True) if g is not None]
    _check_finite("grads", "a gradient is not finite", [g for _, g in writes])
    _accumulate(writes)
    return weights.detach().clone()


def _combined(balancer: Balancer, losses: Tensor) -> Tensor:
    combined = balancer(losses)
    if not isinstance(combined, Tensor) or combined.numel() != 1:
        raise RuntimeError(
            f"{type(balancer).__name__}(losses) must return a scalar tensor, got "
            f"{type(combined).__name__}"
            + (f" of shape {tuple(combined.shape)}" if isinstance(combined, Tensor) else "")
        )
    return combined.reshape(())


def _loss_weights(
    balancer: Balancer, losses: Tensor, scale: Tensor | None
) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    """Run a loss-level balancer on loss values (averaged or summed, no graph).

    Returns ``w = d combined / d L`` (what the model's gradients are weighted by), the
    weights to report (``last_weights``) and the balancer's own gradients (times the loss
    scale), all from ``combined = balancer(L)`` on a fresh leaf ``L``.
    """
    leaf = losses.detach().clone().requires_grad_()
    with torch.enable_grad():
        previous = balancer.last_weights
        combined = _combined(balancer, leaf)
        own = reachable_leaves([combined], stop=[leaf])
        grads = torch.autograd.grad(combined, [leaf, *own], allow_unused=True)
    w = torch.zeros_like(leaf) if grads[0] is None else grads[0].detach()
    if balancer.last_weights is None or balancer.last_weights is previous:
        balancer.last_weights = w.clone()
    own_writes = [
        (p, _times(g, scale)) for p, g in zip(own, grads[1:], strict=True) if g is not None
    ]
    return w, balancer.last_weights.detach().clone(), own_writes


def _loss_level_distributed(
    items: list[Tensor],
    balancer: Balancer,
    retain_graph: bool,
    scaler: torch.amp.GradScaler | None,
    group: Any,
) -> Tensor:
    # Two collectives: the weights of a nonlinear combination depend on the averaged loss
    # values, and the gradients of the one weighted backward on each rank's own data. One
    # collective would need the K per-term gradients of every parameter instead.
    with torch.enable_grad():
        stacked = torch.stack(items)
    leaves = reachable_leaves(items)
    count, elements, order = layout_of(leaves)
    check_layout(
        "lossbalance.backward",
        2,
        [
            ("has {} loss terms", len(items)),
            ("reaches {} leaves", count, _UNREACHED),
            ("reaches {} leaf elements", elements, _UNREACHED),
            ("orders its leaves' sizes differently (checksum {})", order),
        ],
        group,
        stacked.device,
    )
    (losses,) = all_reduce_mean([stacked.detach()], group)
    _check_finite("losses", "a loss is not finite (on some rank)", [losses])
    scale = _scale_of(_touch(scaler, stacked))
    w, weights, own_writes = _loss_weights(balancer, losses, scale)
    with torch.enable_grad():
        upstream = _times(w.to(stacked), scale)
        grads = torch.autograd.grad(
            stacked, leaves, grad_outputs=upstream, retain_graph=retain_graph, allow_unused=True
        )
    writes = _average_writes(leaves, list(grads), group)
    _check_finite("grads", "a gradient is not finite (on some rank)", [g for _, g in writes])
    _check_finite("grads", "a gradient is not finite", [g for _, g in own_writes])
    _accumulate(writes + own_writes)
    return weights


def _touch(scaler: torch.amp.GradScaler | None, like: Tensor) -> torch.amp.GradScaler | None:
    """Make sure the scaler's scale tensor exists (it is created lazily by ``scale()``)."""
    if scaler is not None and scaler._scale is None:
        scaler.scale(like.detach())
    return scaler


# Why a rank can reach fewer leaves, and the way out: a rank can write only the leaves it
# holds, and it holds only those its losses reach.
_UNREACHED = (
    "a parameter that the losses reach on some ranks only, such as the head of a task "
    "with no samples in a rank's shard, must stay in the graph on every rank: run the head "
    "on the empty selection there (head(z[mask]) with a sum over the samples divided by "
    "the shard size), which gives it zero gradients"
)


def _layout_entries(
    k: int, shared: Sequence[Tensor], others: Sequence[Tensor]
) -> list[tuple[str, int] | tuple[str, int, str]]:
    """The layout signature of a gradient-level path, for :func:`check_layout`."""
    count, elements, _ = layout_of(others)
    return [
        ("has {} loss terms", k),
        ("has {} shared parameters", len(shared)),
        ("has {} shared elements", sum(p.numel() for p in shared)),
        ("reaches {} leaves outside `shared`", count, _UNREACHED),
        ("reaches {} leaf elements outside `shared`", elements, _UNREACHED),
        ("orders its leaves' sizes differently (checksum {})", layout_of([*shared, *others])[2]),
    ]


def _average_writes(
    leaves: Sequence[Tensor], grads: Sequence[Tensor | None], group: Any
) -> list[tuple[Tensor, Tensor]]:
    """Average one gradient per leaf over the ranks; unreached leaves travel as zeros, with
    a flag, so every rank sends the same layout and a leaf reached on no rank gets nothing."""
    reached = [g is not None for g in grads]
    flags = torch.tensor(reached, dtype=torch.float32, device=leaves[0].device) if leaves else None
    if flags is None:
        return []
    dense = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True)]
    out = all_reduce_mean([flags, *dense], group)
    hit = out[0].tolist()
    return [(p, g) for p, g, h in zip(leaves, out[1:], hit, strict=True) if h > 0]


# --------------------------------------------------------------------------- gradient level


def _gradient_level(
    items: list[Tensor],
    balancer: Balancer,
    params: list[Tensor],
    features: list[Tensor],
    mode: str,
    retain_graph: bool,
    scaler: torch.amp.GradScaler | None,
) -> Tensor:
    if _needs_grads(balancer):
        return _vector_level(items, balancer, params, features, mode, retain_graph, scaler)
    with torch.enable_grad():
        stacked = torch.stack(items)
        _check_finite("losses", "a loss is not finite", [stacked])
        losses_t = _transform(balancer, stacked)
        _check_finite("transformed", "a transformed loss is not finite", [losses_t])
        shared_ids = {id(p) for p in params}
        # The per-term passes differentiate the raw terms one by one, so that pass i only
        # traverses what L_i depends on; a transform (hybrid IMTL) enters through its K x K
        # Jacobian T = d transform(L) / dL: g~_i = sum_j T_ij g_j, Gramian T G T^T, shared
        # gradient sum_j (T^T alpha)_j g_j, heads sum_j (T^T 1)_j g_j.
        jac, own, own_grads = _transform_jacobian(stacked, losses_t, shared_ids)
        col_sums = None if jac is None else jac.sum(0)
        done = shared_ids | {id(p) for p in own}
        # GradNorm weights the heads too (its loss is sum_i w_i L_i): their gradient waits
        # for alpha, in one pass over the heads after the balancer has run
        weigh_heads = bool(getattr(balancer, "weights_heads", False))
        heads = [p for p in reachable_leaves(items) if id(p) not in done] if weigh_heads else []
        step_retain = retain_graph or weigh_heads
        # under a GradScaler every backward pass runs on the scaled losses
        scaled = _scaled(items, scaler)
        scale = _scale_of(scaler)
        if mode == "feature":
            step = feature_terms(
                scaled,
                features,
                params,
                retain_graph=step_retain,
                exclude=[*own, *heads],
                extra_weights=col_sums,
            )
        else:
            extra = [] if weigh_heads else [p for p in reachable_leaves(items) if id(p) not in done]
            step = exact_or_gramian_terms(
                scaled, params, extra, mode=mode, retain_graph=step_retain, extra_weights=col_sums
            )
        gramian = _unscale_gramian(step.gramian, scale)
        if jac is not None:
            t = jac.to(gramian)
            gramian = t @ gramian @ t.T
        fixed = step.fixed + [(p, _times(g, scale)) for p, g in zip(own, own_grads, strict=True)]
        checks = [gramian, *(g for _, g in fixed)] + ([] if jac is None else [jac])
        _check_finite("gramian", "a per-term gradient (or their Gramian) is not finite", checks)
        alpha = _call_weights(balancer, gramian, losses_t.detach(), scale)
        beta = alpha if jac is None else jac.to(alpha).T @ alpha
        writes = fixed + step.finish(beta)
        if heads:
            head_grads = torch.autograd.grad(
                (beta.to(stacked) * torch.stack(scaled)).sum(),
                heads,
                retain_graph=retain_graph,
                allow_unused=True,
            )
            writes += [(p, g) for p, g in zip(heads, head_grads, strict=True) if g is not None]
    _check_finite("grads", "a combined gradient is not finite", [g for _, g in writes])
    _accumulate(writes)
    return alpha.clone()


def _transform(balancer: Balancer, stacked: Tensor) -> Tensor:
    k = stacked.shape[0]
    losses_t = balancer.transform(stacked)  # type: ignore[operator]
    if not isinstance(losses_t, Tensor) or tuple(losses_t.shape) != (k,):
        raise RuntimeError(
            f"{type(balancer).__name__}.transform must return a tensor of shape ({k},), got "
            + (
                repr(tuple(losses_t.shape))
                if isinstance(losses_t, Tensor)
                else type(losses_t).__name__
            )
        )
    return losses_t


def _has_transform(balancer: Balancer) -> bool:
    method = getattr(type(balancer), "transform", GradientBalancer.transform)
    return method is not GradientBalancer.transform


def _call_weights(
    balancer: Balancer, gramian: Tensor, losses_t: Tensor, scale: Tensor | None
) -> Tensor:
    """``balancer.weights(gramian, losses_t)``, validated; records ``last_weights``."""
    if _needs_grads(balancer):
        raise RuntimeError(
            f"{type(balancer).__name__} needs the per-term gradients, not their Gramian, "
            "which is all this path holds (feature mode under torch.distributed, or "
            "sharded (fully_shard) shared parameters): use mode='exact' or 'batched'"
        )
    k = balancer.num_terms
    previous = balancer.last_weights
    with _own_grads_scaled(balancer, scale):
        alpha = balancer.weights(gramian, losses_t)  # type: ignore[operator]
    if not isinstance(alpha, Tensor) or alpha.numel() != k:
        raise RuntimeError(
            f"{type(balancer).__name__}.weights must return a tensor of {k} weights, got "
            + (repr(tuple(alpha.shape)) if isinstance(alpha, Tensor) else type(alpha).__name__)
        )
    alpha = alpha.detach().reshape(k)
    _check_finite("weights", f"{type(balancer).__name__} returned non-finite weights", [alpha])
    if balancer.last_weights is None or balancer.last_weights is previous:
        balancer.last_weights = alpha.clone()
    return alpha


def _needs_grads(balancer: Balancer) -> bool:
    return balancer.kind == "gradient" and bool(getattr(balancer, "needs_grads", False))


def vector_mode(balancer: Balancer, mode: str, deferred: bool, stacklevel: int = 5) -> str:
    """The resolved ``mode`` for a balancer that needs the per-term gradients.

    ``"gramian"`` never holds them and a balancer without ``accepts_features`` has no use
    for the features' gradients: both fall back to ``"exact"`` (warned once), as other
    modes fall back where they cannot run. ``deferred`` (``torch.distributed`` or
    :class:`lossbalance.Accumulator`): feature mode raises for a balancer that accepts
    features (GradDrop), whose combined feature gradient of each rank's or micro-batch's
    features would need the masks of the whole batch before its trunk pass.
    """
    if not _needs_grads(balancer):
        return mode
    name = type(balancer).__name__
    if mode == "gramian":
        warn_once(
            "backward-vector-gramian",
            f"{name} needs the per-term gradients, which mode='gramian' never holds (it "
            "builds their Gramian by double backward); fell back to mode='exact'",
            stacklevel=stacklevel,
        )
        return "exact"
    if mode != "feature":
        return mode
    if not getattr(balancer, "accepts_features", False):
        warn_once(
            "backward-vector-features",
            f"{name} combines the per-term gradients of the shared parameters, not of "
            "features; fell back to mode='exact' (features=... is not used)",
            stacklevel=stacklevel,
        )
        return "exact"
    if deferred:
        raise NotImplementedError(
            f"{name} in mode='feature' under torch.distributed or lossbalance.Accumulator is "
            "not supported: its masks need the features' gradients of the whole batch "
            "before the trunk pass of each shard; use mode='exact' (masks per element of "
            "the shared parameters)"
        )
    return mode


def _vector_finish(
    balancer: Balancer,
    losses: Tensor,
    leaves: list[Tensor],
    grads: list[Tensor | None],
    n: int,
    stack_others: bool,
    scale: Tensor | None,
) -> Tensor:
    """:meth:`TermSums.finish` for a balancer that needs the per-term gradients.

    ``grads[:n]`` are the shared parameters' per-term stacks, summed over micro-batches
    and averaged over the ranks (one all-reduce, in ``finish``), of the scaled losses;
    ``combine`` runs on them as on one large batch's, deterministically on every rank.
    The other leaves get ``sum_i c_i`` of their per-term gradients, with ``c = T^T 1``
    (or ``T^T alpha`` with ``weights_heads``), as :func:`_vector_level` gives them.
    """
    k = balancer.num_terms
    shared = leaves[:n]
    shared_ids = {id(p) for p in shared}
    leaf = losses.detach().clone().requires_grad_()
    with torch.enable_grad():
        losses_t = _transform(balancer, leaf)
        _check_finite("transformed", "a transformed loss is not finite", [losses_t])
        jac, own, own_grads = _transform_jacobian(leaf, losses_t, shared_ids)
    reached = [g is not None for g in grads[:n]]
    stacks = [
        torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) if g is None else g
        for p, g in zip(shared, grads[:n], strict=True)
    ]
    if scale is not None:
        stacks = [g / scale.to(g.device, g.dtype) for g in stacks]
    if jac is not None:
        stacks = [(jac.to(g) @ g.reshape(k, -1)).view(g.shape) for g in stacks]
    others = [(p, g) for p, g in zip(leaves[n:], grads[n:], strict=True) if g is not None]
    own_writes = [(p, _times(g, scale)) for p, g in zip(own, own_grads, strict=True)]
    checks = [*stacks, *(g for _, g in others), *(g for _, g in own_writes)]
    _check_finite(
        "gramian", "a per-term gradient is not finite", checks + ([] if jac is None else [jac])
    )
    combined, alpha = _call_combine(balancer, stacks, losses_t.detach(), shared, False)
    writes = [(p, _times(c, scale)) for p, c, r in zip(shared, combined, reached, strict=True) if r]
    beta = alpha if jac is None else jac.to(alpha).T @ alpha
    coef = (
        beta if getattr(balancer, "weights_heads", False) else None if jac is None else jac.sum(0)
    )
    for p, g in others:
        if stack_others:
            writes.append(
                (p, combine_stack(torch.ones(k, dtype=torch.float64) if coef is None else coef, g))
            )
        else:
            writes.append((p, g))
    writes += own_writes
    _check_finite("grads", "a combined gradient is not finite", [g for _, g in writes])
    _accumulate(writes)
    return alpha.clone()


def _vector_level(
    items: list[Tensor],
    balancer: Balancer,
    params: list[Tensor],
    features: list[Tensor],
    mode: str,
    retain_graph: bool,
    scaler: torch.amp.GradScaler | None,
) -> Tensor:
    """A balancer that needs the per-term gradients (``VectorBalancer.combine``).

    Exact / batched mode: the K per-term stacks of the shared parameters go to
    ``combine``, which returns their gradients. Feature mode (GradDrop): the stacks of the
    features' gradients, and the combined feature gradients go once through the trunk.
    A transform enters through its Jacobian T: the stacks are ``T S`` (rows g~_i), the
    other leaves get ``sum_j (T^T 1)_j`` of their per-term gradients.
    """
    mode = vector_mode(balancer, mode, deferred=False)
    use_features = mode == "feature"
    inputs = features if use_features else params
    k, n = len(items), len(inputs)
    with torch.enable_grad():
        stacked = torch.stack(items)
        _check_finite("losses", "a loss is not finite", [stacked])
        losses_t = _transform(balancer, stacked)
        _check_finite("transformed", "a transformed loss is not finite", [losses_t])
        shared_ids = {id(p) for p in params}
        jac, own, own_grads = _transform_jacobian(stacked, losses_t, shared_ids)
        col_sums = None if jac is None else jac.sum(0)
        done = shared_ids | {id(p) for p in own} | {id(t) for t in inputs}
        scaled = _scaled(items, scaler)
        scale = _scale_of(scaler)
        # in feature mode these are the leaves reached around z (the heads): whole passes
        stop = inputs if use_features else []
        extra = [p for p in reachable_leaves(scaled, stop=stop) if id(p) not in done]
        # ExcessMTL weighs the heads too (its loss is sum_i w_i L_i): their per-term stacks
        # wait for the weights
        weigh_heads = bool(getattr(balancer, "weights_heads", False))
        raw = per_term(
            scaled,
            [*inputs, *extra],
            n + len(extra) if weigh_heads else n,
            batched=mode == "batched",
            retain_graph=retain_graph or use_features,
            sum_weights=None if weigh_heads else col_sums,
        )
    reached = [g is not None for g in raw[:n]]
    stacks = [
        torch.zeros((k, *t.shape), dtype=t.dtype, device=t.device) if g is None else g
        for t, g in zip(inputs, raw[:n], strict=True)
    ]
    if scale is not None:
        stacks = [g / scale.to(g.device, g.dtype) for g in stacks]
    if jac is not None:
        stacks = [(jac.to(g) @ g.reshape(k, -1)).view(g.shape) for g in stacks]
    fixed = [(p, g) for p, g in zip(extra, raw[n:], strict=True) if g is not None]
    fixed += [(p, _times(g, scale)) for p, g in zip(own, own_grads, strict=True)]
    checks = [*stacks, *(g for _, g in fixed)] + ([] if jac is None else [jac])
    _check_finite("gramian", "a per-term gradient is not finite", checks)
    combined, alpha = _call_combine(balancer, stacks, losses_t.detach(), inputs, use_features)
    combined = [_times(c, scale) for c in combined]
    _check_finite("grads", "a combined gradient is not finite", combined)
    if weigh_heads:
        beta = alpha if jac is None else jac.to(alpha).T @ alpha
        fixed = [
            (p, combine_stack(beta, g))
            for p, g in zip(extra, raw[n:], strict=True)
            if g is not None
        ]
        fixed += [(p, _times(g, scale)) for p, g in zip(own, own_grads, strict=True)]
    if not use_features:
        writes = [(p, c) for p, c, r in zip(params, combined, reached, strict=True) if r]
    else:
        # trunk leaves: all but z, the leaves reached around z (whole per-term passes
        # already) and the transform's own
        skip = {id(t) for t in inputs} | {id(p) for p in [*extra, *own]}
        writes = _through_trunk(
            inputs, raw[:n], combined, reached, skip, shared_ids, col_sums, retain_graph
        )
    writes += fixed
    _check_finite("grads", "a combined gradient is not finite", [g for _, g in writes])
    _accumulate(writes)
    return alpha.clone()


def _through_trunk(
    zs: list[Tensor],
    raw: list[Tensor | None],
    combined: list[Tensor],
    reached: list[bool],
    done: set[int],
    shared_ids: set[int],
    col_sums: Tensor | None,
    retain_graph: bool,
) -> list[tuple[Tensor, Tensor]]:
    """The trunk's gradients from the combined feature gradients: shared leaves behind z
    get ``J_z^T combined``, other leaves behind z ``J_z^T sum_i c_i dL_i/dz``."""
    live = [i for i, r in enumerate(reached) if r]
    if not live:
        _warn_unreached()
        return []
    outs = [zs[i] for i in live]
    with torch.enable_grad():
        trunk = [p for p in reachable_leaves(outs) if id(p) not in done]
        trunk_shared = [p for p in trunk if id(p) in shared_ids]
        trunk_extra = [p for p in trunk if id(p) not in shared_ids]
        writes: list[tuple[Tensor, Tensor]] = []
        if trunk_shared:
            grads = torch.autograd.grad(
                outs,
                trunk_shared,
                grad_outputs=[combined[i] for i in live],
                retain_graph=retain_graph or bool(trunk_extra),
                allow_unused=True,
            )
            writes += [(p, g) for p, g in zip(trunk_shared, grads, strict=True) if g is not None]
        if trunk_extra:
            stacks = [g for g in raw if g is not None]
            c = torch.ones(stacks[0].shape[0]) if col_sums is None else col_sums
            sums = [combine_stack(c, g) for g in stacks]
            grads = torch.autograd.grad(
                outs, trunk_extra, grad_outputs=sums, retain_graph=retain_graph, allow_unused=True
            )
            writes += [(p, g) for p, g in zip(trunk_extra, grads, strict=True) if g is not None]
    return writes


def _call_combine(
    balancer: Balancer,
    stacks: list[Tensor],
    losses_t: Tensor,
    inputs: list[Tensor],
    features: bool,
) -> tuple[list[Tensor], Tensor]:
    """``balancer.combine(...)``, validated; records ``last_weights``."""
    name = type(balancer).__name__
    k = balancer.num_terms
    previous = balancer.last_weights
    out = balancer.combine(stacks, losses_t, inputs=inputs, features=features)  # type: ignore[attr-defined,operator]
    if not isinstance(out, tuple) or len(out) != 2:
        raise RuntimeError(f"{name}.combine must return (gradients, weights)")
    combined, alpha = out
    if len(combined) != len(inputs) or any(
        not isinstance(c, Tensor) or c.shape != t.shape
        for c, t in zip(combined, inputs, strict=True)
    ):
        raise RuntimeError(
            f"{name}.combine must return one gradient per input tensor, of its shape"
        )
    if not isinstance(alpha, Tensor) or alpha.numel() != k:
        raise RuntimeError(f"{name}.combine must return {k} weights")
    alpha = alpha.detach().reshape(k)
    _check_finite("weights", f"{name} returned non-finite weights", [alpha])
    if balancer.last_weights is None or balancer.last_weights is previous:
        balancer.last_weights = alpha.clone()
    return [c.detach() for c in combined], alpha


def _weigh(
    balancer: Balancer,
    losses: Tensor,
    raw_gramian: Tensor,
    shared_ids: set[int],
    scale: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None, list[tuple[Tensor, Tensor]]]:
    """A gradient-level balancer on loss values and the raw terms' (unscaled) Gramian.

    The transform runs on a fresh leaf holding the (averaged or summed) loss values, so
    its Jacobian T and the balancer's own gradients come from the same values on every
    rank. Returns alpha, beta = T^T alpha, the column sums T^T 1 (``None`` for the
    identity) and the balancer's own gradients (times the loss scale).
    """
    leaf = losses.detach().clone().requires_grad_()
    with torch.enable_grad():
        losses_t = _transform(balancer, leaf)
        _check_finite("transformed", "a transformed loss is not finite", [losses_t])
        jac, own, own_grads = _transform_jacobian(leaf, losses_t, shared_ids)
    gramian = raw_gramian
    if jac is not None:
        t = jac.to(gramian)
        gramian = t @ gramian @ t.T
    own_writes = [(p, _times(g, scale)) for p, g in zip(own, own_grads, strict=True)]
    checks = [gramian, *(g for _, g in own_writes)] + ([] if jac is None else [jac])
    _check_finite("gramian", "a per-term gradient (or their Gramian) is not finite", checks)
    alpha = _call_weights(balancer, gramian, losses_t.detach(), scale)
    if jac is None:
        return alpha, alpha, None, own_writes
    return alpha, jac.to(alpha).T @ alpha, jac.sum(0), own_writes


def _features_distributed(
    items: list[Tensor],
    balancer: Balancer,
    params: list[Tensor],
    features: list[Tensor],
    retain_graph: bool,
    scaler: torch.amp.GradScaler | None,
    group: Any,
) -> Tensor:
    from lossbalance.engine._fsdp import is_sharded

    if any(is_sharded(p) for p in params):
        return _features_sharded(items, balancer, params, features, retain_graph, scaler, group)
    shared_ids = {id(p) for p in params}
    weigh_heads = bool(getattr(balancer, "weights_heads", False))
    others = [p for p in reachable_leaves(items) if id(p) not in shared_ids]
    # Non-shared leaves get sum_i c_i of their per-term gradients with c = T^T 1 (or beta
    # for GradNorm), known only once the averaged losses are in: those leaves wait for one
    # pass after the balancer. Without a transform c = 1 and the head passes give them.
    late = others if _has_transform(balancer) or weigh_heads else []
    check_layout(
        "lossbalance.backward",
        3,
        _layout_entries(len(items), params, others),
        group,
        items[0].device,
    )
    scaled = _scaled(items, scaler)
    scale = _scale_of(scaler)
    with torch.enable_grad():
        step = feature_terms(
            scaled, features, params, retain_graph=retain_graph or bool(late), exclude=late
        )
        stacked = torch.stack([loss.detach() for loss in items])
    losses, gram = all_reduce_mean([stacked, step.gramian], group)
    # local z-gradients are those of R L_i (each rank's loss is a mean over its shard):
    # G = sum_r G_r / R^2 = mean_r G_r / R
    gram = _unscale_gramian(gram / world_size(group), scale)
    _check_finite("losses", "a loss is not finite (on some rank)", [losses])
    alpha, beta, col_sums, own_writes = _weigh(balancer, losses, gram, shared_ids, scale)
    with torch.enable_grad():
        writes = step.fixed + step.finish(beta)
        if late:
            coef = beta if weigh_heads else col_sums
            assert coef is not None
            late_grads = torch.autograd.grad(
                (coef.to(stacked) * torch.stack(scaled)).sum(),
                late,
                retain_graph=retain_graph,
                allow_unused=True,
            )
            writes += [(p, g) for p, g in zip(late, late_grads, strict=True) if g is not None]
    local = {id(p): g for p, g in writes}
    leaves = [*params, *others]
    averaged = _average_writes(leaves, [local.get(id(p)) for p in leaves], group)
    writes = averaged + own_writes
    _check_finite(
        "grads", "a combined gradient is not finite (on some rank)", [g for _, g in writes]
    )
    _accumulate(writes)
    return alpha.clone()


def _features_sharded(
    items: list[Tensor],
    balancer: Balancer,
    params: list[Tensor],
    features: list[Tensor],
    retain_graph: bool,
    scaler: torch.amp.GradScaler | None,
    group: Any,
) -> Tensor:
    r"""Feature mode on sharded (FSDP2) shared parameters: two collectives, as under DDP.

    The K per-term gradients of the features z (passes through the heads only) give the
    local Gramian; one all-reduce sums it with the loss values. Then a single
    ``backward()`` of :math:`\sum_i c_i L_i` (``c`` the heads' coefficients, ones unless
    the balancer has a transform or ``weights_heads``), with a hook on z that replaces
    z's gradient by :math:`\sum_i \beta_i\, \partial L_i / \partial z`, writes every
    FSDP-owned leaf through FSDP's reduce-scatter (averaged over the ranks): the trunk gets
    :math:`J_z^T \sum_i \beta_i\, \partial L_i/\partial z`, the heads their terms'
    gradients. The leaves left out of ``fully_shard`` get their gradients from the same
    pass, averaged by a second all-reduce."""
    from lossbalance.engine._fsdp import is_sharded

    shared_ids = {id(p) for p in params}
    others = [p for p in reachable_leaves(items, stop=features) if id(p) not in shared_ids]
    check_layout(
        "lossbalance.backward",
        3,
        _layout_entries(len(items), params, others),
        group,
        items[0].device,
    )
    scaled = _scaled(items, scaler)
    scale = _scale_of(scaler)
    k = len(items)
    zgrads: list[list[Tensor]] = []
    gram = torch.zeros(k, k, dtype=torch.float64, device=items[0].device)
    with torch.enable_grad():
        for loss in scaled:
            row = torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True)
            zgrads.append([torch.zeros_like(z) if g is None else g for z, g in zip(features, row)])
    for j in range(len(features)):
        _add_gramian(gram, torch.stack([zgrads[i][j] for i in range(k)]))
    stacked = torch.stack([loss.detach() for loss in items])
    losses, gram = all_reduce_mean([stacked, gram], group)
    # local z-gradients are those of R L_i (each rank's loss is a mean over its shard)
    gram = _unscale_gramian(gram / world_size(group), scale)
    _check_finite("losses", "a loss is not finite (on some rank)", [losses])
    alpha, beta, col_sums, own_writes = _weigh(balancer, losses, gram, shared_ids, scale)
    weigh_heads = bool(getattr(balancer, "weights_heads", False))
    coef = beta if weigh_heads else col_sums
    c = torch.ones(k, dtype=torch.float64) if coef is None else coef
    balanced = [
        combine_stack(beta, torch.stack([zgrads[i][j] for i in range(k)]))
        for j in range(len(features))
    ]
    _check_finite(
        "grads", "a combined gradient is not finite", [*balanced, *(g for _, g in own_writes)]
    )
    plain = [p for p in [*params, *others] if not is_sharded(p)]
    saved = [p.grad for p in plain]
    hooks = [z.register_hook(lambda _g, t=t: t) for z, t in zip(features, balanced)]
    try:
        for p in plain:
            p.grad = None
        total = (c.to(scaled[0]) * torch.stack([loss.reshape(()) for loss in scaled])).sum()
        with torch.enable_grad():
            torch.autograd.backward(total, retain_graph=retain_graph)
        fresh = [p.grad for p in plain]
    finally:
        for h in hooks:
            h.remove()
        for p, g in zip(plain, saved):
            p.grad = g
    # a leaf whose gradient FSDP consumed is one of its unsharded parameters
    mine = [(p, g) for p, g in zip(plain, fresh) if g is not None]
    averaged = _average_writes([p for p, _ in mine], [g for _, g in mine], group)
    _accumulate(averaged + own_writes)
    return alpha.clone()


# --------------------------------------------------------------------------- deferred


class TermSums:
    """Per-term gradients and loss values summed over micro-batches, balanced once.

    The deferred path of :func:`backward` under ``torch.distributed`` (one micro-batch) and
    of :class:`lossbalance.Accumulator`. ``add`` runs the per-term passes of one
    micro-batch and sums their raw results; ``finish`` averages them over the ranks in
    one collective, balances and writes ``.grad``.

    Gradient level: the shared parameters' K per-term stacks (their Gramian, or in
    feature mode the features' Gramian, is formed at the end from the sums); the other
    leaves' stacks when the balancer has a transform or weighs the heads, else their sums.
    Loss level: the per-term stacks of every leaf, as the weights depend on the summed
    losses.
    """

    def __init__(self, balancer: Balancer, params: list[Tensor], mode: str) -> None:
        self.balancer = balancer
        self.loss_level = balancer.kind == "loss"
        self.shared = [] if self.loss_level else list(params)
        self.mode = "exact" if self.loss_level and mode == "feature" else mode
        self.stack_others = (
            self.loss_level
            or _has_transform(balancer)
            or bool(getattr(balancer, "weights_heads", False))
        )
        self.others: list[Tensor] = []
        self.grads: list[Tensor | None] = [None] * len(self.shared)
        self.owned: list[bool] = [False] * len(self.shared)
        self.gram: Tensor | None = None
        self.losses: Tensor | None = None
        self.loss_like: Tensor | None = None
        self.count = 0
        from lossbalance.engine._fsdp import is_sharded

        # FSDP2: shared parameters sharded by fully_shard (DTensors), see _add_sharded
        self.sharded = any(is_sharded(p) for p in self.shared)
        self.correct: list[Tensor] | None = None
        self.retain_graph = False

    def leaves(self) -> list[Tensor]:
        return [*self.shared, *self.others]

    def add(
        self,
        items: list[Tensor],
        features: list[Tensor],
        retain_graph: bool,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        if self.sharded:
            self._add_sharded(items, retain_graph, scaler)
            return
        known = {id(p) for p in self.leaves()}
        new = [p for p in reachable_leaves(items) if id(p) not in known]
        self.others += new
        self.grads += [None] * len(new)
        self.owned += [False] * len(new)
        scaled = _scaled(items, scaler)
        with torch.enable_grad():
            terms = collect_terms(
                scaled,
                self.shared,
                self.others,
                mode=self.mode,
                features=features,
                stack_others=self.stack_others,
                retain_graph=retain_graph,
            )
        for j, g in enumerate(terms.grads):
            if g is None:
                continue
            acc = self.grads[j]
            if acc is None:
                self.grads[j] = g
            elif self.owned[j]:
                acc.add_(g.to(acc.dtype))
            else:
                # autograd may hand out aliased or expanded gradients: sum out of place
                # once, into a buffer of our own, then in place
                self.grads[j] = acc + g.to(acc.dtype)
                self.owned[j] = True
        if terms.gram is not None:
            self.gram = terms.gram if self.gram is None else self.gram + terms.gram
        values = torch.stack([loss.detach().reshape(()) for loss in items]).double()
        self.losses = values if self.losses is None else self.losses + values.to(self.losses)
        self.loss_like = items[0].detach()
        self.count += 1

    def _add_sharded(
        self, items: list[Tensor], retain_graph: bool, scaler: torch.amp.GradScaler | None
    ) -> None:
        """The per-term passes on sharded (FSDP2) shared parameters: one ``backward()`` per
        term, which FSDP reduce-scatters (see ``lossbalance.engine._fsdp``).

        The shared parameters' stacks are their local shards, already averaged over the
        ranks. The leaves FSDP owns besides them (sharded heads) are written by FSDP
        itself: they receive the sum of the terms' gradients in these passes (and, for a
        balancer with a transform or ``weights_heads``, a correction pass in ``finish``
        once the coefficients are known). Leaves left out of ``fully_shard`` are stacked
        and averaged as under DDP.
        """
        from lossbalance.engine._fsdp import per_term_backward

        if self.mode == "feature":
            raise NotImplementedError(
                "lossbalance.backward(mode='feature') on sharded (fully_shard) shared "
                "parameters is not supported yet: use mode='exact'"
            )
        if self.count and self.stack_others:
            # FSDP writes the heads during each micro-batch's passes, with coefficients
            # that such a balancer knows only once all micro-batches are in
            raise NotImplementedError(
                "lossbalance.Accumulator on sharded (fully_shard) shared parameters with a "
                f"balancer that has a transform or weights_heads ({type(self.balancer).__name__}) "
                "is not supported yet: balance each micro-batch with lossbalance.backward"
            )
        known = {id(p) for p in self.shared}
        candidates = [p for p in reachable_leaves(items) if id(p) not in known]
        scaled = _scaled(items, scaler)
        self.retain_graph = retain_graph
        self.correct = scaled if self.stack_others else None
        stacks = per_term_backward(
            scaled, [*self.shared, *candidates], retain_graph=retain_graph or self.stack_others
        )
        n = len(self.shared)
        index = {id(p): j for j, p in enumerate(self.leaves())}
        for p, g in zip([*self.shared, *candidates], stacks, strict=True):
            if g is None:
                continue  # unreached, or an unsharded FSDP parameter (FSDP took its gradient)
            if index.get(id(p), n) >= n and not self.stack_others:
                g = g.sum(0)
            j = index.get(id(p))
            if j is None:
                index[id(p)] = len(self.grads)
                self.others.append(p)
                self.grads.append(g)
            else:
                prev = self.grads[j]
                self.grads[j] = g if prev is None else prev.add_(g.to(prev.dtype))
        # the stacks are fresh buffers of per_term_backward: summed in place above
        self.owned = [True] * len(self.grads)
        values = torch.stack([loss.detach().reshape(()) for loss in items]).double()
        self.losses = values if self.losses is None else self.losses + values.to(self.losses)
        self.loss_like = items[0].detach()
        self.count += 1

    def _finish_sharded(
        self, group: Any, scaler: torch.amp.GradScaler | None, where: str
    ) -> Tensor:
        """``finish`` on sharded shared parameters: the Gramian of the whole gradients is
        the sum over the ranks of the Gramians of their shards (of FSDP's averaged
        gradients), summed in the one all-reduce that averages the loss values and the
        plain leaves' stacks."""
        from lossbalance.engine._distributed import all_reduce_mean_and_sum
        from lossbalance.engine._fsdp import backward_discarding, is_sharded, like_param

        assert self.losses is not None and self.loss_like is not None
        k = self.balancer.num_terms
        leaves = self.leaves()
        n = len(self.shared)
        sharded = [is_sharded(p) for p in leaves]
        grads = list(self.grads)
        losses = self.losses
        gram = torch.zeros(k, k, dtype=torch.float64, device=losses.device)
        for g, s in zip(grads[:n], sharded[:n], strict=True):
            if s and g is not None:
                _add_gramian(gram, g)
        if group is not None:
            entries = _layout_entries(k, self.shared, self.others)
            check_layout(where, 4, entries, group, losses.device)
            plain = [j for j, s in enumerate(sharded) if not s]
            dense: list[Tensor] = []
            for j in plain:
                g = grads[j]
                dense.append(
                    torch.zeros(self._shape(j, leaves[j], k), dtype=leaves[j].dtype)
                    if g is None
                    else g
                )
            flags = torch.tensor([grads[j] is not None for j in plain], dtype=torch.float64)
            (losses, hits, *averaged), (gram,) = all_reduce_mean_and_sum(
                [losses, flags.to(losses.device), *dense], [gram], group
            )
            for j, h, g in zip(plain, hits.tolist(), averaged, strict=True):
                grads[j] = g if h > 0 else None
        for g, s in zip(grads[:n], sharded[:n], strict=True):
            if not s and g is not None:
                _add_gramian(gram, g)
        like = self.loss_like
        losses = losses.to(like.device, like.dtype)
        _check_finite("losses", "a loss is not finite", [losses])
        scale = _scale_of(scaler)
        gram = _unscale_gramian(gram, scale)
        # the local shards are not checked: ranks would disagree; their Gramian carries a
        # non-finite entry of any shard to every rank
        plain_grads: list[Tensor] = [
            g for g, s in zip(grads, sharded, strict=True) if g is not None and not s
        ]
        _check_finite(
            "gramian", "a per-term gradient (or their Gramian) is not finite", [gram, *plain_grads]
        )
        shared_ids = {id(p) for p in self.shared}
        alpha, beta, col_sums, own_writes = _weigh(self.balancer, losses, gram, shared_ids, scale)
        weigh_heads = bool(getattr(self.balancer, "weights_heads", False))
        coef = beta if weigh_heads else col_sums
        ones = torch.ones(k, dtype=torch.float64)
        writes = []
        for j, (p, g) in enumerate(zip(leaves, grads, strict=True)):
            if g is None:
                continue
            if j < n:
                combined = combine_stack(beta, g)
                writes.append((p, like_param(p, combined) if sharded[j] else combined))
            elif self.stack_others:
                writes.append((p, combine_stack(ones if coef is None else coef, g)))
            else:
                writes.append((p, g))
        writes += own_writes
        _check_finite(
            "grads",
            "a combined gradient is not finite",
            [g for (p, g) in writes if id(p) not in shared_ids or not is_sharded(p)],
        )
        if self.correct is not None and coef is not None:
            # FSDP's heads received sum_i dL_i/dtheta in the per-term passes; they need
            # sum_i c_i dL_i/dtheta: one more pass of sum_i (c_i - 1) L_i, whose share in
            # the leaves written here is dropped
            delta = (coef - 1.0).to(self.correct[0])
            backward_discarding(
                (delta * torch.stack([loss.reshape(()) for loss in self.correct])).sum(),
                leaves,
                retain_graph=self.retain_graph,
            )
        self.correct = None
        _accumulate(writes)
        return alpha.clone()

    def finish(
        self,
        group: Any,
        scaler: torch.amp.GradScaler | None,
        where: str = "lossbalance.backward",
    ) -> Tensor:
        """Average over ``group`` (one all-reduce), balance, write ``.grad``; weights.

        Under ``torch.distributed`` the all-reduce is preceded by :func:`check_layout` (one
        all-gather of 8 integers), so that ranks with other terms or leaves raise the same
        error (naming ``where``) instead of aborting in gloo."""
        if self.sharded:
            return self._finish_sharded(group, scaler, where)
        assert self.losses is not None and self.loss_like is not None
        k = self.balancer.num_terms
        leaves = self.leaves()
        n = len(self.shared)
        grads = list(self.grads)
        gram = self.gram
        losses = self.losses
        if group is not None:
            entries = _layout_entries(k, self.shared, self.others)
            gramian = ("sums the features' Gramian: {} (1 in feature mode)", int(gram is not None))
            entries.insert(3, gramian)
            check_layout(where, 4, entries, group, losses.device)
            dense = [
                torch.zeros(self._shape(j, p, k), dtype=p.dtype, device=p.device)
                if g is None
                else g
                for j, (p, g) in enumerate(zip(leaves, grads, strict=True))
            ]
            flags = torch.tensor([g is not None for g in grads], dtype=torch.float64)
            head = [losses, flags.to(losses.device)] + ([] if gram is None else [gram])
            out = all_reduce_mean([*head, *dense], group)
            losses = out[0]
            hit = out[1].tolist()
            if gram is not None:
                # local feature gradients are R times those of the averaged loss
                gram = out[2] / world_size(group)
            grads = [g if h > 0 else None for g, h in zip(out[len(head) :], hit, strict=True)]
        like = self.loss_like
        losses = losses.to(like.device, like.dtype)
        present = [g for g in grads if g is not None]
        _check_finite("losses", "a loss is not finite", [losses])
        scale = _scale_of(scaler)
        if self.loss_level:
            _check_finite("grads", "a per-term gradient is not finite", present)
            w, weights, own_writes = _loss_weights(self.balancer, losses, scale)
            writes = [
                (p, combine_stack(w, g))
                for p, g in zip(leaves, grads, strict=True)
                if g is not None
            ]
            writes += own_writes
            _check_finite("grads", "a gradient is not finite", [g for _, g in writes])
            _accumulate(writes)
            return weights
        if _needs_grads(self.balancer):
            return _vector_finish(self.balancer, losses, leaves, grads, n, self.stack_others, scale)
        if gram is None:
            gram = torch.zeros(k, k, dtype=torch.float64, device=losses.device)
            for g in grads[:n]:
                if g is not None:
                    _add_gramian(gram, g)
        gram = _unscale_gramian(gram, scale)
        _check_finite(
            "gramian", "a per-term gradient (or their Gramian) is not finite", [gram, *present]
        )
        shared_ids = {id(p) for p in self.shared}
        alpha, beta, col_sums, own_writes = _weigh(self.balancer, losses, gram, shared_ids, scale)
        weigh_heads = bool(getattr(self.balancer, "weights_heads", False))
        coef = beta if weigh_heads else col_sums
        writes = []
        for j, (p, g) in enumerate(zip(leaves, grads, strict=True)):
            if g is None:
                continue
            if j < n:
                writes.append((p, combine_stack(beta, g)))
            elif self.stack_others:
                c = torch.ones(k, dtype=torch.float64) if coef is None else coef
                writes.append((p, combine_stack(c, g)))
            else:
                writes.append((p, g))
        writes += own_writes
        _check_finite("grads", "a combined gradient is not finite", [g for _, g in writes])
        _accumulate(writes)
        return alpha.clone()

    def _shape(self, j: int, p: Tensor, k: int) -> tuple[int, ...]:
        stacked = j < len(self.shared) or self.stack_others
        return (k, *p.shape) if stacked else tuple(p.shape)


def _transform_jacobian(
    stacked: Tensor, losses_t: Tensor, shared_ids: set[int]
) -> tuple[Tensor | None, list[Tensor], list[Tensor]]:
    """``T = d losses_t / d stacked`` (``None`` for the identity), the balancer's own leaves
    behind the transform and their gradients of ``losses_t.sum()``."""
    if losses_t is stacked:
        return None, [], []
    if not losses_t.requires_grad:
        raise RuntimeError("the balancer's transform returned losses that do not require grad")
    k = stacked.shape[0]
    # these passes stop at ``stacked``: they only traverse the transform's few K-sized ops
    rows = []
    for i in range(k):
        (row,) = torch.autograd.grad(losses_t[i], stacked, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(stacked) if row is None else row)
    jac = torch.stack(rows).detach()
    own = [p for p in reachable_leaves([losses_t], stop=[stacked]) if id(p) not in shared_ids]
    grads = (
        torch.autograd.grad(losses_t.sum(), own, retain_graph=True, allow_unused=True)
        if own
        else ()
    )
    kept = [(p, g) for p, g in zip(own, grads, strict=True) if g is not None]
    return jac, [p for p, _ in kept], [g for _, g in kept]


def shared_params(shared: nn.Module | Iterable[Tensor] | None, balancer: Balancer) -> list[Tensor]:
    if shared is None:
        raise ValueError(
            f"{type(balancer).__name__} is a gradient-level balancer: pass shared=... (an "
            "nn.Module or an iterable of the shared parameters, e.g. model.trunk), whose "
            "per-term gradients it balances"
        )
    if isinstance(shared, nn.Module):
        candidates: list[object] = list(shared.parameters())
    elif isinstance(shared, Tensor):
        candidates = [shared]
    else:
        try:
            candidates = list(shared)
        except TypeError:
            raise TypeError(
                "shared must be an nn.Module or an iterable of tensors, got "
                f"{type(shared).__name__}"
            ) from None
    params: dict[int, Tensor] = {}
    for i, p in enumerate(candidates):
        if not isinstance(p, Tensor):
            raise TypeError(f"shared[{i}] must be a Tensor, got {type(p).__name__}")
        if not p.requires_grad:
            continue  # frozen parameters get no gradient, as with autograd
        if not p.is_leaf:
            raise ValueError(
                f"shared[{i}] (shape {tuple(p.shape)}) is not a leaf tensor: shared takes "
                "parameters; pass an intermediate activation as features=... instead"
            )
        params.setdefault(id(p), p)
    if not params:
        raise ValueError("shared contains no tensor that requires grad")
    return list(params.values())


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """One host sync per device: are all entries of all tensors finite?"""
    # min and max propagate NaN and +-inf, and aminmax is several times faster than a
    # full isfinite(t).all() on the CPU
    extremes: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        values = t._values() if t.is_sparse else t
        if values.numel() == 0:
            continue
        extremes.setdefault(values.device, []).extend(torch.aminmax(values.detach()))
    return all(bool(torch.isfinite(torch.stack(e)).all()) for e in extremes.values())


@torch.no_grad()
def _accumulate(writes: Sequence[tuple[Tensor, Tensor]]) -> None:
    """``p.grad += g`` like autograd's AccumulateGrad: create ``.grad`` if ``None``."""
    from lossbalance.engine._fsdp import is_sharded, local

    stolen: set[int] = set()
    for p, g in writes:
        g = g.detach()
        if is_sharded(p):
            # a sharded parameter's gradient, a DTensor sharded like it (FSDP2)
            if p.grad is None:
                p.grad = g
            else:
                local(p.grad).add_(local(g).to(p.grad.dtype))
            continue
        if p.grad is None:
            if g.is_sparse:
                p.grad = g.clone()
                continue
            storage = g.untyped_storage()
            key = storage.data_ptr()
            # take g itself only if it owns its whole storage, is not already some other
            # parameter's .grad, and has the parameter's layout; else copy into that layout
            if (
                key in stolen
                or storage.nbytes() != g.numel() * g.element_size()
                or g.stride() != p.stride()
            ):
                p.grad = torch.empty_like(p, requires_grad=False).copy_(g)
            else:
                p.grad = g
                stolen.add(key)
        elif p.grad.is_sparse:
            p.grad = g + p.grad
        else:
            p.grad.add_(g)
