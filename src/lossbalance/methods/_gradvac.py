"""GradVac: gradient vaccine, pairwise cosine similarities raised toward running targets."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from lossbalance._base import Seeded, gramian
from lossbalance._registry import MethodInfo, register
from lossbalance.engine._graph import combine_stack
from lossbalance.methods._blas import single_blas_thread
from lossbalance.methods._mgda import (
    Array,
    check_gramian,
    check_matrix,
    gramian_to_numpy,
    to_weights,
    warn_degenerate,
)
from lossbalance.methods._pcgrad import _orders
from lossbalance.methods._vector import VectorBalancer

__all__ = ["GradVac", "gradvac_weights", "gradvac_weights_from_gramian"]


def _coefficients(
    m: Array, targets: Array, beta: float, orders: list[Array]
) -> tuple[Array, Array]:
    """C with g_i' = C_i G, and the updated targets; ``targets`` is not modified."""
    k = m.shape[0]
    coeffs = np.eye(k)
    phi_hat = targets.copy()
    norms = np.sqrt(np.maximum(np.diag(m), 0.0))
    for i in range(k):
        row = coeffs[i]
        for j in orders[i]:
            dots = row @ m  # g_i' . g_l for every l
            norm_i = math.sqrt(max(float(dots @ row), 0.0))
            if norm_i == 0.0 or norms[j] == 0.0:
                continue  # no direction: no cosine, no correction, the target stays
            phi = min(max(float(dots[j]) / (norm_i * norms[j]), -1.0), 1.0)
            target = float(targets[i, j])
            root_target = math.sqrt(max(1.0 - target * target, 0.0))
            if phi < target and root_target > 0.0:
                root_phi = math.sqrt(max(1.0 - phi * phi, 0.0))
                w = norm_i * (target * root_phi - phi * root_target) / (norms[j] * root_target)
                row[j] += w
            phi_hat[i, j] = (1.0 - beta) * target + beta * phi
    return coeffs, phi_hat


@single_blas_thread
def _gradvac(
    gram: Tensor, targets: Tensor, beta: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    m = gramian_to_numpy(gram)
    warn_degenerate("gradvac", np.diag(m).copy())
    phi = targets.detach().to("cpu", torch.float64).numpy()
    coeffs, phi_hat = _coefficients(m, phi, beta, _orders(m.shape[0], generator))
    return to_weights(coeffs.sum(axis=0), gram), torch.from_numpy(phi_hat)


def _check_targets(targets: Tensor, k: int) -> None:
    if not isinstance(targets, Tensor) or tuple(targets.shape) != (k, k):
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"expected targets of shape ({k}, {k}), got {shape}")


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0 or not math.isfinite(beta):
        raise ValueError(f"Invalid beta: {beta} (expected 0 <= beta <= 1)")


def gradvac_weights_from_gramian(
    gram: Tensor,
    targets: Tensor,
    beta: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """GradVac weights and new targets from the K x K Gramian; see :func:`gradvac_weights`."""
    check_gramian(gram)
    _check_targets(targets, gram.shape[0])
    _check_beta(beta)
    return _gradvac(gram, targets, beta, generator)


def gradvac_weights(
    matrix: Tensor,
    targets: Tensor,
    beta: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""GradVac as weights: ``alpha @ matrix`` is the GradVac gradient.

    Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 1 (Eq. 2-3).
    For each term i, from g_i' = g_i, and each other term j in a random order, with
    :math:`\phi_{ij} = \cos(g_i', g_j)` and the target :math:`\hat\phi_{ij}`:

    .. math::
        \text{if } \phi_{ij} < \hat\phi_{ij}: \quad
        g_i' \leftarrow g_i' + \frac{\|g_i'\| \big(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2}
        - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\big)}{\|g_j\| \sqrt{1-\hat\phi_{ij}^2}}\, g_j,
        \qquad
        \hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta\phi_{ij}

    after which :math:`\cos(g_i', g_j) = \hat\phi_{ij}` (the old target). The result is
    :math:`\sum_i g_i'`; every g_i' is a combination of the rows of ``matrix``, so the
    cosines come from the Gramian alone and the weights are ``alpha = C^T 1``.

    Args:
        matrix: K x P per-term gradients, rows are terms.
        targets: :math:`\hat\phi`, K x K (the diagonal is unused); zeros at the start.
        beta: the targets' EMA rate, 0 <= beta <= 1 (default 0.5, LibMTL's).
        generator: a CPU ``torch.Generator`` for the orders (``None``: the global one).

    Returns:
        ``(alpha, new_targets)``, float64. Pairs with a zero gradient are skipped (no
        cosine) and keep their target; a target of +-1 corrects nothing.

    Example:
        >>> import torch
        >>> from lossbalance.methods._gradvac import gradvac_weights
        >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> alpha, targets = gradvac_weights(J, torch.zeros(2, 2))
        >>> alpha  # with zero targets GradVac is PCGrad
        tensor([2.0000, 1.5000], dtype=torch.float64)
    """
    check_matrix(matrix)
    return gradvac_weights_from_gramian(gramian(matrix), targets, beta, generator)


class GradVac(Seeded, VectorBalancer):
    r"""GradVac: each pairwise cosine similarity raised to a running target when below it.

    Wang et al., "Gradient Vaccine", ICLR 2021, Algorithm 1; the math is in
    :func:`gradvac_weights`. State (``state_dict``): the targets :math:`\hat\phi`
    (buffer ``targets``, ``(T, K, K)``: T = 1 over the whole model, else one per shared
    tensor, sized at the first call) and the generator that draws the orders.

    Args:
        num_terms: K >= 1.
        beta: the targets' EMA rate in [0, 1] (default 0.5, LibMTL's; the paper tunes it).
        per_layer: one GradVac per shared parameter tensor (the paper's per-layer
            variant; needs the per-term gradients, mode ``"exact"``/``"batched"``);
            default ``False``: over the whole model, from the Gramian (every mode).
        seed: the orders' generator seed, as for :class:`~lossbalance.PCGrad`.

    With per_layer the coefficients differ per tensor; ``last_weights`` is their mean
    over the tensors and ``last_coefficients`` the ``(T, K)`` table.

    Example:
        >>> import torch
        >>> from lossbalance.methods._gradvac import GradVac
        >>> G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> GradVac(2, seed=0).weights(G @ G.T, torch.ones(2))
        tensor([2.0000, 1.5000], dtype=torch.float64)

    Differences from LibMTL: there the target is updated only when a correction is made
    (indentation), so targets that start at 0 can only go down; we update it for every
    pair, as Algorithm 1 and TorchJD do. Pairs with a zero gradient are skipped here
    (LibMTL divides by zero, TorchJD adds eps to the denominators).
    """

    targets: Tensor

    lazy_buffers: ClassVar[dict[str, int]] = {"targets": 0}

    def __init__(
        self,
        num_terms: int,
        beta: float = 0.5,
        *,
        per_layer: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(num_terms)
        _check_beta(beta)
        if not isinstance(per_layer, bool):
            raise ValueError(f"Invalid per_layer: {per_layer!r} (expected a bool)")
        self.beta = float(beta)
        self.per_layer = per_layer
        self.needs_grads = per_layer
        self._seed_generator(seed)
        self.last_coefficients: Tensor | None = None
        size = 0 if per_layer else 1
        self.register_buffer(
            "targets", torch.zeros(size, num_terms, num_terms, dtype=torch.float64)
        )

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        if self.per_layer:
            return super().weights(gramian, losses)
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        alpha, phi = _gradvac(gramian, self.targets[0], self.beta, self.generator)
        self.targets[0].copy_(phi)
        return self._record(alpha)

    def combine(
        self,
        grads: list[Tensor],
        losses: Tensor,
        *,
        inputs: list[Tensor],
        features: bool,
    ) -> tuple[list[Tensor], Tensor]:
        self._check_terms(losses)
        k = self.num_terms
        self._sized(
            "targets", (len(grads), k, k), self.targets, "one target table per shared tensor"
        )
        out, table, new = [], [], []
        for t, g in enumerate(grads):
            flat = g.reshape(k, -1)
            alpha, phi = _gradvac(gramian(flat), self.targets[t], self.beta, self.generator)
            new.append(phi)
            table.append(alpha)
            out.append(combine_stack(alpha, g))
        self.targets.copy_(torch.stack(new))
        self.last_coefficients = torch.stack(table)
        return out, self._record(self.last_coefficients.mean(0))

    def extra_repr(self) -> str:
        return (
            f"num_terms={self.num_terms}, beta={self.beta}, per_layer={self.per_layer}, "
            f"seed={self.seed}"
        )


register(
    MethodInfo(
        name="gradvac",
        factory=GradVac,
        needs="gramian",
        stateful=True,
        paper="Wang et al., ICLR 2021",
        summary="gradient vaccine: pairwise cosines raised toward their running targets",
    )
)
