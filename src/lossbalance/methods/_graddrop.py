"""GradDrop: per element, keep the gradients of one sign, drawn by its sign purity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from lossbalance._base import Seeded
from lossbalance._registry import MethodInfo, register
from lossbalance.methods._vector import VectorBalancer

__all__ = ["GradDrop", "graddrop"]


def graddrop(
    grads: Tensor,
    uniform: Tensor,
    leak: Tensor | None = None,
    signs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""GradDrop's combined gradient of one tensor from its K per-term gradients.

    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a Sign: Optimizing
    Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020, Algorithm 1. With
    :math:`G_i` the per-term gradients (for a batch-separated activation A, ``grads`` of
    shape ``(K, B, ...)`` and ``signs`` = sign(A): :math:`G_i = \sum_b \mathrm{sign}(A_b)
    \circ \nabla_{A_b} L_i`), per element

    .. math::
        P = \tfrac12 \Big(1 + \frac{\sum_i G_i}{\sum_i |G_i|}\Big), \quad
        M_i = \mathbb 1[P > U]\,\mathbb 1[G_i > 0] + \mathbb 1[P < U]\,\mathbb 1[G_i < 0],
        \quad \text{result} = \sum_i (\ell_i + (1 - \ell_i) M_i)\, \nabla L_i

    with U uniform in [0, 1) per element (``uniform``, the shape of one G_i), the leak
    :math:`\ell_i` and f the identity. Where all signs agree (P in {0, 1}) every gradient
    is kept; an element where every G_i is 0 has P = 1/2.

    Args:
        grads: ``(K, *shape)`` per-term gradients.
        uniform: U, of the shape of G_i (``grads.shape[1:]``, or without the batch
            dimension when ``signs`` is given).
        leak: ``(K,)`` leaks in [0, 1] (``None``: 0).
        signs: sign(A) of shape ``grads.shape[1:]`` for a batch-separated activation.

    Returns:
        ``(combined, kept)``: the combined gradient and, per term, the fraction of
        :math:`\sum |\nabla L_i|` that the mask kept (1 where nothing was dropped).

    Example:
        >>> import torch
        >>> from lossbalance.methods._graddrop import graddrop
        >>> g = torch.tensor([[1.0, -2.0], [3.0, -1.0]])
        >>> graddrop(g, torch.rand(2))[0]  # the signs agree: the plain sum
        tensor([ 4., -3.])
    """
    k = grads.shape[0]
    g = grads if signs is None else (grads * signs.unsqueeze(0)).sum(1)
    total = g.sum(0)
    mass = g.abs().sum(0)
    purity = 0.5 * (1.0 + torch.where(mass > 0, total / torch.where(mass > 0, mass, 1.0), 0.0))
    mask = (purity > uniform) & (g > 0) | (purity < uniform) & (g < 0)
    if signs is not None:
        mask = mask.unsqueeze(1).expand_as(grads)
    keep = mask.to(grads.dtype)
    if leak is not None:
        ell = leak.to(grads).view(k, *([1] * (grads.dim() - 1)))
        keep = ell + (1.0 - ell) * keep
    combined = (keep * grads).sum(0)
    size = grads.abs().reshape(k, -1).sum(1)
    kept = (keep * grads).abs().reshape(k, -1).sum(1)
    fraction = torch.where(size > 0, kept / torch.where(size > 0, size, 1.0), 1.0)
    return combined, fraction


class GradDrop(Seeded, VectorBalancer):
    r"""GradDrop: gradient sign dropout at the shared features (or the shared parameters).

    Chen et al., "Just Pick a Sign", NeurIPS 2020, Algorithm 1; the math is in
    :func:`graddrop`. Its natural place is the last shared activation:
    ``lossbalance.backward(losses, balancer, shared=trunk, features=z)`` (mode
    ``"feature"``) takes the K per-term gradients of z, masks them per element with
    :math:`G_i = \sum_b \mathrm{sign}(z_b) \circ \nabla_{z_b} L_i` (U drawn per feature
    element, shared by the batch) and sends the result once through the trunk. In modes
    ``"exact"``/``"batched"`` the mask is drawn per element of each shared parameter
    tensor from the parameter gradients themselves (not batch-separated).

    State: the generator that draws U (in ``state_dict``).

    Args:
        num_terms: K >= 1.
        leak: :math:`\ell`, a float or K floats in [0, 1] (default 0: no leak); term i with
            leak 1 always passes.
        seed: the generator's seed, as for :class:`~lossbalance.PCGrad`.

    ``last_weights``: per term, the fraction of its gradient's L1 mass that was kept
    (all ones when no sign conflicts).

    Example:
        >>> import torch
        >>> from lossbalance.methods._graddrop import GradDrop
        >>> stacks = [torch.tensor([[1.0, -2.0], [3.0, -1.0]])]
        >>> (out,), kept = GradDrop(2, seed=0).combine(
        ...     stacks, torch.ones(2), inputs=[torch.zeros(2)], features=False)
        >>> out, kept
        (tensor([ 4., -3.]), tensor([1., 1.], dtype=torch.float64))

    Differences from the paper: f is the identity (the paper's choice in its
    experiments); a feature with several leading dimensions besides the batch is
    treated per element of ``z.shape[1:]``.
    """

    accepts_features: ClassVar[bool] = True

    def __init__(
        self, num_terms: int, leak: float | Sequence[float] = 0.0, *, seed: int | None = None
    ) -> None:
        super().__init__(num_terms)
        values = [leak] * num_terms if isinstance(leak, (int, float)) else list(leak)
        if len(values) != num_terms or not all(
            isinstance(v, (int, float)) and 0.0 <= v <= 1.0 and math.isfinite(v) for v in values
        ):
            raise ValueError(
                f"Invalid leak: {leak!r} (expected a float or {num_terms} floats in [0, 1])"
            )
        self.leak = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self._seed_generator(seed)

    def combine(
        self,
        grads: list[Tensor],
        losses: Tensor,
        *,
        inputs: list[Tensor],
        features: bool,
    ) -> tuple[list[Tensor], Tensor]:
        self._check_terms(losses)
        leak = None if bool((self.leak == 0).all()) else self.leak
        out = []
        size = torch.zeros(self.num_terms, dtype=torch.float64)
        kept = torch.zeros(self.num_terms, dtype=torch.float64)
        for g, t in zip(grads, inputs, strict=True):
            signs = torch.sign(t.detach()) if features and t.dim() >= 1 else None
            shape = g.shape[2:] if signs is not None else g.shape[1:]
            u = torch.rand(shape, generator=self.generator, dtype=g.dtype).to(g.device)
            combined, fraction = graddrop(g, u, leak, signs)
            out.append(combined)
            mass = g.detach().abs().reshape(self.num_terms, -1).sum(1).double().cpu()
            size += mass
            kept += fraction.double().cpu() * mass
        weights = torch.where(size > 0, kept / torch.where(size > 0, size, 1.0), 1.0)
        return out, self._record(weights)

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, leak={self.leak.tolist()}, seed={self.seed}"


register(
    MethodInfo(
        name="graddrop",
        factory=GradDrop,
        needs="grads",
        stateful=True,
        paper="Chen et al., NeurIPS 2020",
        summary="gradient sign dropout: per element, keep one sign drawn by its purity",
    )
)
