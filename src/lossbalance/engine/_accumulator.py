"""``lossbalance.Accumulator``: gradient accumulation for the balancers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lossbalance._base import Balancer
from lossbalance._validation import as_loss_list, check_choice
from lossbalance.engine._backward import (
    TermSums,
    _Skip,
    check_balancer,
    check_num_terms,
    check_scaler,
    deferred_mode,
    shared_params,
    vector_mode,
)
from lossbalance.engine._distributed import resolve_group
from lossbalance.engine._engine import GRAMIAN_MODES, as_features, resolve_mode

__all__ = ["Accumulator"]


class Accumulator:
    r"""Balanced gradient accumulation: per-term gradients summed over micro-batches.

    :func:`lossbalance.backward` balances the gradients of one batch. With gradient
    accumulation the batch arrives in M micro-batches, and a gradient-level balancer must
    see the per-term gradients of the whole batch, not of each micro-batch (its weights
    are a nonlinear function of them). :meth:`accumulate` runs the per-term backward
    passes of one micro-batch and adds the results up; :meth:`backward` balances the sums
    once and writes ``.grad``, exactly as ``lossbalance.backward`` on the whole batch:

    .. math::
        g_i = \sum_{m=1}^{M} \partial L_i^{(m)} / \partial\theta_{sh}, \quad
        L_i = \sum_m L_i^{(m)}, \quad
        \alpha = \mathrm{balancer.weights}(\mathcal G(g), \mathrm{transform}(L))

    As for :meth:`lossbalance.MTAdam.accumulate`, divide mean-reduced losses by M so
    that their sum is the mean over the whole batch.

    What is kept between calls (the autograd graphs are freed after each micro-batch):

    - ``"exact"`` / ``"batched"``: the K per-term gradients of the shared parameters
      (K P numbers), and the other leaves' gradients (per-term when the balancer has a
      ``transform`` or weighs the heads (hybrid IMTL, GradNorm), since their
      coefficients depend on the summed losses).
    - ``"feature"``: the Gramian of the features' gradients (the micro-batches' samples
      are disjoint, so the whole batch's Gramian is the sum of theirs) and, because alpha
      is not known before the last micro-batch, the trunk parameters' per-term gradients
      :math:`J_z^T \partial L_i^{(m)}/\partial z`: K passes through the trunk per
      micro-batch instead of one.
    - ``"gramian"``: not possible (the Gramian of a sum has cross terms between
      micro-batches); falls back to ``"exact"`` with a once-only warning.
    - Loss-level balancers: the per-term gradients of every leaf (K passes per
      micro-batch), since the weights of ``balancer(L)`` depend on the summed losses.

    Under ``torch.distributed`` (see :func:`lossbalance.backward`), :meth:`backward`
    averages everything over the ranks in **one** all-reduce, in every mode.

    Args:
        balancer: a :class:`~lossbalance.Balancer`, built once and reused.
        shared: the shared parameters (gradient-level balancers), as for ``backward``.
        mode: ``"auto"`` (``"feature"`` if the first :meth:`accumulate` gets ``features``,
            else ``"exact"``), ``"exact"``, ``"batched"``, ``"feature"`` or ``"gramian"``
            (falls back to ``"exact"``). Ignored by loss-level balancers.
        process_group: ``"auto"``, ``None`` or a ``ProcessGroup``, as for ``backward``;
            resolved when :meth:`backward` runs.
        grad_scaler: a ``torch.amp.GradScaler``: every micro-batch's losses are scaled by
            it and ``.grad`` receives the scaled result (follow with
            ``scaler.step(optimizer)`` and ``scaler.update()``; do not update the scaler
            between micro-batches).

    Example:
        >>> import torch, lossbalance
        >>> _ = torch.manual_seed(0)
        >>> trunk = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
        >>> heads = torch.nn.ModuleList([torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)])
        >>> opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1)
        >>> acc = lossbalance.Accumulator(lossbalance.MGDA(2), shared=trunk)
        >>> x = torch.randn(16, 3)
        >>> for chunk in x.chunk(4):  # 4 micro-batches of one batch of 16
        ...     z = trunk(chunk)
        ...     losses = [heads[0](z).pow(2).mean(), heads[1](z).abs().mean()]
        ...     acc.accumulate([loss / 4 for loss in losses])
        >>> weights = acc.backward()  # balances the whole batch once, writes .grad
        >>> opt.step()
        >>> weights.shape, acc.num_micro_batches
        (torch.Size([2]), 0)
    """

    def __init__(
        self,
        balancer: Balancer,
        shared: nn.Module | Iterable[Tensor] | None = None,
        *,
        mode: str = "auto",
        process_group: Any = "auto",
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        check_balancer(balancer)
        check_choice("mode", mode, GRAMIAN_MODES)
        if isinstance(process_group, str) and process_group != "auto":
            raise ValueError(
                f"Invalid process_group: {process_group!r} (expected 'auto', None or a "
                "torch.distributed ProcessGroup)"
            )
        self.balancer = balancer
        self.mode = mode
        self.process_group = process_group
        self.grad_scaler = grad_scaler
        self._scaler = check_scaler(grad_scaler)
        self._params = [] if balancer.kind == "loss" else shared_params(shared, balancer)
        self._sums: TermSums | None = None
        self._k: int | None = None

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches accumulated since the last :meth:`backward` (or :meth:`reset`)."""
        return 0 if self._sums is None else self._sums.count

    @torch.compiler.disable
    def accumulate(
        self,
        losses: Sequence[Tensor] | Mapping[str, Tensor] | Tensor,
        *,
        features: Tensor | Sequence[Tensor] | None = None,
        retain_graph: bool = False,
    ) -> None:
        """Run the per-term backward passes of one micro-batch and add up the results.

        Args:
            losses: the K loss terms of this micro-batch (divided by the number of
                micro-batches for mean-reduced losses).
            features: z, for ``mode="feature"`` (or ``"auto"``), as for ``backward``.
            retain_graph: keep this micro-batch's graph.
        """
        with torch.enable_grad():
            items = as_loss_list(losses)
        check_num_terms(self.balancer, len(items))
        if self._sums is None:
            self._sums = TermSums(self.balancer, self._params, self._resolve_mode(features))
        sums = self._sums
        if sums.mode == "feature" and features is None:
            raise ValueError(
                "mode='feature' needs features=z in every accumulate(...) call (the first "
                "micro-batch had them)"
            )
        zs = as_features(features) if sums.mode == "feature" else []
        sums.add(items, zs, retain_graph, self._scaler)

    @torch.compiler.disable
    def backward(self) -> Tensor:
        """Balance the accumulated per-term gradients once and write ``.grad``.

        Returns:
            The weights, shape ``(K,)``, as :func:`lossbalance.backward` returns them (all
            NaN for a skipped, non-finite step). The accumulator is empty afterwards.
        """
        sums = self._sums
        if sums is None:
            raise RuntimeError(
                "Accumulator.backward() needs at least one accumulate(losses) call first"
            )
        self._sums = None
        try:
            return sums.finish(
                resolve_group(self.process_group), self._scaler, "Accumulator.backward"
            )
        except _Skip as skip:
            assert sums.loss_like is not None
            return skip.resolve(
                sums.loss_like,
                self.balancer.num_terms,
                self._scaler,
                lambda: [
                    *sums.leaves(),
                    *(p for p in self.balancer.parameters() if p.requires_grad),
                ],
            )

    def reset(self) -> None:
        """Drop what was accumulated (e.g. after an error in a micro-batch)."""
        self._sums = None

    def _resolve_mode(self, features: object) -> str:
        if self.balancer.kind == "loss":
            return "batched" if self.mode == "batched" else "exact"
        # a balancer that needs the per-term gradients (VectorBalancer) combines their sums
        # over the micro-batches: exact or batched stacks only
        mode = vector_mode(self.balancer, resolve_mode(self.mode, features), True, stacklevel=6)
        return deferred_mode(mode, "gradient accumulation", stacklevel=5)

    def __repr__(self) -> str:
        return (
            f"Accumulator({type(self.balancer).__name__}, mode={self.mode!r}, "
            f"micro_batches={self.num_micro_batches})"
        )
