"""Gradient-level balancers that need the per-term gradient vectors, not only their Gramian.

A :class:`VectorBalancer` is a :class:`~lossbalance.GradientBalancer` whose update of the
shared parameters is not a combination ``sum_i alpha_i g_i`` of this step's gradients, or
whose coefficients differ from one parameter tensor to the next: MoCo (a running estimate
y_i of each gradient), GradDrop (a random mask per element), DB-MTL (running averages of
the gradients), GradVac per layer (one Gramian per tensor). ``lossbalance.backward`` hands
it the K per-term gradients of every shared tensor, as the engine's exact mode builds them,
and writes what :meth:`VectorBalancer.combine` returns.

Also here: :func:`cross_gramian` (``J_1 J_2^T`` of two independent mini-batches, for the
double-sampling methods MoDo and SDMGrad) and :func:`project_simplex`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lossbalance._base import GradientBalancer
from lossbalance._validation import as_loss_list
from lossbalance.engine._graph import per_term

__all__ = ["VectorBalancer", "cross_gramian", "flat_stack", "project_simplex", "split_flat"]


class VectorBalancer(GradientBalancer):
    r"""A gradient-level balancer that receives the per-term gradients themselves.

    ``combine(grads, losses, inputs=..., features=...)`` gets one ``(K, *t.shape)`` stack
    per tensor t of ``inputs`` (row i: :math:`\partial \tilde L_i / \partial t`, with
    :math:`\tilde L` = ``transform(losses)``) and returns the gradient to write into each
    tensor and the K weights to report (``last_weights``). ``inputs`` are the shared
    parameters, or in feature mode (``features=True``, only if :attr:`accepts_features`)
    the features z, whose combined gradient then goes once through the trunk.

    :attr:`needs_grads` may be an instance attribute: a balancer with a Gramian variant
    (GradVac over the whole model, DB-MTL with averaged norms) sets it to ``False`` there,
    and the engine then calls :meth:`weights` with the Gramian as for any
    :class:`~lossbalance.GradientBalancer`. With ``needs_grads`` set, ``mode="gramian"``
    (which never holds the per-term gradients) falls back to ``"exact"``, warned once, and
    so does ``mode="feature"`` for a balancer without :attr:`accepts_features`.
    :class:`lossbalance.Accumulator` sums the stacks over the micro-batches and
    ``torch.distributed`` averages them over the ranks (in the one all-reduce of the
    exact path); ``combine`` then runs once, on every rank, as on one large batch. So
    ``combine`` must be deterministic given its inputs and state (a random one draws from
    its own seeded generator, seeded alike on every rank). Feature mode of a balancer
    that accepts features (GradDrop) raises under both: the masks need the feature
    gradients of the whole batch before the trunk pass of each shard.

    State that follows the shared tensors (MoCo's y) is kept flat, ``(K, P)`` in the order
    of ``shared``, and sized at the first call.
    """

    needs_grads: bool = True
    #: whether ``combine`` also takes the gradients of features (``mode="feature"``)
    accepts_features: ClassVar[bool] = False
    #: buffers sized at the first call, by the dimension that follows the shared tensors
    #: (the others are fixed by K): see :meth:`_sized`
    lazy_buffers: ClassVar[dict[str, int]] = {}

    def _sized(self, name: str, shape: Sequence[int], like: Tensor, what: str) -> Tensor:
        """The lazily sized buffer ``name``: zeros of ``shape`` (``like``'s dtype and device)
        at the first call; a later call of another shape raises, naming ``what``."""
        buf: Tensor = getattr(self, name)
        shape = tuple(shape)
        if buf.shape[self.lazy_buffers[name]] == 0 and buf.shape != shape:
            buf = torch.zeros(shape, dtype=like.dtype, device=like.device)
            setattr(self, name, buf)
        elif buf.shape != shape:
            raise ValueError(
                f"{type(self).__name__} got {what} of shape {shape}, expected "
                f"{tuple(buf.shape)} as at its previous calls"
            )
        return buf

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # a lazily sized buffer takes the saved size before loading, but only in its lazy
        # dimension: a state of another K keeps the mismatch, which the load refuses
        for name, dim in self.lazy_buffers.items():
            saved, buf = state_dict.get(prefix + name), getattr(self, name)
            if (
                isinstance(saved, Tensor)
                and saved.dim() == buf.dim()
                and saved.shape != buf.shape
                and all(a == b for i, (a, b) in enumerate(zip(saved.shape, buf.shape)) if i != dim)
            ):
                setattr(self, name, torch.zeros_like(saved, device=buf.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def combine(
        self,
        grads: list[Tensor],
        losses: Tensor,
        *,
        inputs: list[Tensor],
        features: bool,
    ) -> tuple[list[Tensor], Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        raise RuntimeError(
            f"{type(self).__name__} needs the per-term gradients, not their Gramian: call "
            "lossbalance.backward (or lossbalance.Accumulator) with mode='exact' or "
            "'batched', or combine() with the per-term stacks"
        )


def flat_stack(grads: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``(K, P)`` matrix of per-term stacks ``(K, *t.shape)``, tensors side by side."""
    k = grads[0].shape[0]
    return torch.cat([g.reshape(k, -1).to(device=device, dtype=dtype) for g in grads], dim=1)


def split_flat(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """A ``(P,)`` vector cut back into tensors of the shapes, dtypes and devices of ``like``."""
    out, start = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[start : start + n].view(t.shape).to(device=t.device, dtype=t.dtype))
        start += n
    return out


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of a vector onto the probability simplex (sort-based, exact).

    Held, Wolfe & Crowder (1974); Duchi et al. (2008), Fig. 1: with u = sort(v) descending,
    rho = max{j : u_j - (sum_{r<=j} u_r - 1) / j > 0}, theta = (sum_{r<=rho} u_r - 1) / rho,
    the projection is max(v - theta, 0).
    """
    if v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"project_simplex expects a non-empty vector, got shape {tuple(v.shape)}")
    u = torch.sort(v, descending=True).values
    css = torch.cumsum(u, 0) - 1.0
    index = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    rho = int(torch.nonzero(u - css / index > 0).max())
    theta = css[rho] / (rho + 1)
    return torch.clamp(v - theta, min=0.0)


def cross_gramian(
    losses_1: Sequence[Tensor] | Tensor,
    losses_2: Sequence[Tensor] | Tensor,
    shared: nn.Module | Iterable[Tensor],
    *,
    retain_graph: bool = False,
) -> Tensor:
    r"""``A = J_1 J_2^T``: inner products of the per-term gradients of two mini-batches.

    :math:`A_{ij} = \langle \nabla_\theta L_i(\xi_1), \nabla_\theta L_j(\xi_2)\rangle` over
    the shared parameters, in float64. With independent batches it is an unbiased
    estimate of the true Gramian (a product of two independent unbiased estimates), which
    a single batch's Gramian is not; MoDo and SDMGrad update their weights with it
    (:meth:`lossbalance.MoDo.update`, :meth:`lossbalance.SDMGrad.update`). Cost: 2K
    backward passes (K per batch) and 2K gradient copies of the shared parameters; the
    forward passes of the two batches are the caller's. Not symmetric in general. One
    process: under ``torch.distributed`` each rank gets its own A (the A of the averaged
    gradients has cross-rank terms), so the ranks' MoDo/SDMGrad states would drift apart.

    Args:
        losses_1, losses_2: the K scalar losses of each batch (they may share a graph).
        shared: the shared parameters (a module or an iterable of tensors).
        retain_graph: keep the graphs after the passes (e.g. to backpropagate one batch
            again).
    """
    items_1 = as_loss_list(losses_1)
    items_2 = as_loss_list(losses_2)
    if len(items_1) != len(items_2):
        raise ValueError(
            f"cross_gramian: {len(items_1)} losses in the first batch, {len(items_2)} in the "
            "second (expected the same terms)"
        )
    params = list(shared.parameters()) if isinstance(shared, nn.Module) else list(shared)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("cross_gramian: shared contains no tensor that requires grad")
    k = len(items_1)
    with torch.enable_grad():
        # the two batches may share nodes (one forward of both): keep the graph for the second
        first = per_term(items_1, params, len(params), batched=False, retain_graph=True)
        second = per_term(items_2, params, len(params), batched=False, retain_graph=retain_graph)
    out = torch.zeros(k, k, dtype=torch.float64, device=items_1[0].device)
    for a, b in zip(first, second, strict=True):
        if a is None or b is None:
            continue
        out += a.reshape(k, -1).double() @ b.reshape(k, -1).double().T
    return out
