"""``lossbalance.backward``: balance K loss terms and write ``.grad``, for any optimizer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lossbalance._base import Balancer
from lossbalance._engine import (
    GRAMIAN_MODES,
    as_features,
    exact_or_gramian_terms,
    feature_terms,
    reachable_leaves,
    resolve_mode,
)
from lossbalance._validation import as_loss_list, check_choice, warn_once

__all__ = ["backward"]


def backward(
    losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor,
    balancer: Balancer,
    shared: nn.Module | Iterable[Tensor] | None = None,
    *,
    features: Tensor | Sequence[Tensor] | None = None,
    mode: str = "auto",
    retain_graph: bool = False,
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
            - ``"gramian"``: double backward, one gradient copy at a time (O(P) memory),
              K create-graph passes + K double-backward passes + one final pass, about
              3K backward passes in all; falls back to ``"exact"`` (warned once) where an
              operation has no double backward.
            - ``"feature"``: gradients of ``features``; K passes through the heads only
              and one through the trunk, so its cost hardly grows with K.
            - ``"auto"`` (default): ``"feature"`` if ``features`` is given, else
              ``"exact"``.
        retain_graph: keep the graph after the last backward pass.

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
          hooks (e.g. ``DistributedDataParallel``'s all-reduce) do not fire.
        - Non-finite values: if a loss (after ``transform``) is not finite, nothing is
          computed further, the balancer is not called (its state is unchanged) and no
          ``.grad`` is written. If the Gramian or a per-term gradient is not finite, the
          balancer's ``weights`` is not called and nothing is written. If the weights or the
          final gradients are not finite, nothing is written (the balancer's state was
          already updated). In every case a :class:`~lossbalance.LossBalanceWarning` is
          emitted once and the returned weights are all NaN, so callers can tell (e.g.
          ``if weights.isnan().any(): skip optimizer.step()``).
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
    """
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
    check_choice("mode", mode, GRAMIAN_MODES)
    # the caller may be under no_grad (e.g. inside an optimizer's step); the graph of the
    # losses was built before, but reshaping or transforming them needs grad mode
    with torch.enable_grad():
        items = as_loss_list(losses)
    k = len(items)
    if k != balancer.num_terms:
        raise ValueError(
            f"{type(balancer).__name__} was built for {balancer.num_terms} loss terms, got {k}"
        )
    if balancer.kind == "loss":
        return _loss_level(items, balancer, retain_graph)
    params = _shared_params(shared, balancer)
    mode = resolve_mode(mode, features)
    zs = as_features(features) if mode == "feature" else []
    return _gradient_level(items, balancer, params, zs, mode, retain_graph)


def _loss_level(items: list[Tensor], balancer: Balancer, retain_graph: bool) -> Tensor:
    with torch.enable_grad():
        stacked = torch.stack(items)
        if not _all_finite([stacked]):
            return _skip("losses", "a loss is not finite", stacked)
        previous = balancer.last_weights
        combined = balancer(stacked)
        if not isinstance(combined, Tensor) or combined.numel() != 1:
            raise RuntimeError(
                f"{type(balancer).__name__}(losses) must return a scalar tensor, got "
                f"{type(combined).__name__}"
                + (f" of shape {tuple(combined.shape)}" if isinstance(combined, Tensor) else "")
            )
        combined = combined.reshape(())
        weights = balancer.last_weights
        if weights is None or weights is previous:
            # the balancer did not record its weights: d combined / d L_i by autograd
            (weights,) = torch.autograd.grad(combined, stacked, retain_graph=True)
            balancer.last_weights = weights.detach().clone()
        leaves = reachable_leaves([combined])
        grads = (
            torch.autograd.grad(combined, leaves, retain_graph=retain_graph, allow_unused=True)
            if leaves
            else ()
        )
    writes = [(p, g) for p, g in zip(leaves, grads, strict=True) if g is not None]
    if not _all_finite([g for _, g in writes]):
        return _skip("grads", "a gradient is not finite", stacked)
    _accumulate(writes)
    return weights.detach().clone()


def _gradient_level(
    items: list[Tensor],
    balancer: Balancer,
    params: list[Tensor],
    features: list[Tensor],
    mode: str,
    retain_graph: bool,
) -> Tensor:
    k = len(items)
    with torch.enable_grad():
        stacked = torch.stack(items)
        if not _all_finite([stacked]):
            return _skip("losses", "a loss is not finite", stacked)
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
        if not _all_finite([losses_t]):
            return _skip("transformed", "a transformed loss is not finite", stacked)
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
        if mode == "feature":
            step = feature_terms(
                items,
                features,
                params,
                retain_graph=step_retain,
                exclude=[*own, *heads],
                extra_weights=col_sums,
            )
        else:
            extra = [] if weigh_heads else [p for p in reachable_leaves(items) if id(p) not in done]
            step = exact_or_gramian_terms(
                items, params, extra, mode=mode, retain_graph=step_retain, extra_weights=col_sums
            )
        gramian = step.gramian
        if jac is not None:
            t = jac.to(gramian)
            gramian = t @ gramian @ t.T
        fixed = step.fixed + list(zip(own, own_grads, strict=True))
        checks = [gramian, *(g for _, g in fixed)] + ([] if jac is None else [jac])
        if not _all_finite(checks):
            return _skip("gramian", "a per-term gradient (or their Gramian) is not finite", stacked)
        previous = balancer.last_weights
        alpha = balancer.weights(gramian, losses_t.detach())  # type: ignore[operator]
        if not isinstance(alpha, Tensor) or alpha.numel() != k:
            raise RuntimeError(
                f"{type(balancer).__name__}.weights must return a tensor of {k} weights, got "
                + (repr(tuple(alpha.shape)) if isinstance(alpha, Tensor) else type(alpha).__name__)
            )
        alpha = alpha.detach().reshape(k)
        if not _all_finite([alpha]):
            return _skip(
                "weights", f"{type(balancer).__name__} returned non-finite weights", stacked
            )
        if balancer.last_weights is None or balancer.last_weights is previous:
            balancer.last_weights = alpha.clone()
        beta = alpha if jac is None else jac.to(alpha).T @ alpha
        writes = fixed + step.finish(beta)
        if heads:
            head_grads = torch.autograd.grad(
                (beta.to(stacked) * stacked).sum(),
                heads,
                retain_graph=retain_graph,
                allow_unused=True,
            )
            writes += [(p, g) for p, g in zip(heads, head_grads, strict=True) if g is not None]
    if not _all_finite([g for _, g in writes]):
        return _skip("grads", "a combined gradient is not finite", stacked)
    _accumulate(writes)
    return alpha.clone()


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


def _shared_params(shared: nn.Module | Iterable[Tensor] | None, balancer: Balancer) -> list[Tensor]:
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


def _skip(key: str, what: str, like: Tensor) -> Tensor:
    warn_once(
        f"backward-nonfinite-{key}",
        f"lossbalance.backward: {what}; skipped this step (no .grad written) and returned "
        "NaN weights",
        stacklevel=5,  # warn_once, _skip, _loss_level or _gradient_level, backward, caller
    )
    return torch.full(like.shape, float("nan"), dtype=like.dtype, device=like.device)


@torch.no_grad()
def _accumulate(writes: Sequence[tuple[Tensor, Tensor]]) -> None:
    """``p.grad += g`` like autograd's AccumulateGrad: create ``.grad`` if ``None``."""
    stolen: set[int] = set()
    for p, g in writes:
        g = g.detach()
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
