"""PCGrad: project each gradient onto the normal planes of the gradients it conflicts with."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lossbalance._base import GradientBalancer, Seeded, gramian
from lossbalance._registry import MethodInfo, register
from lossbalance.methods._blas import single_blas_thread
from lossbalance.methods._mgda import (
    Array,
    check_gramian,
    check_matrix,
    gramian_to_numpy,
    to_weights,
    warn_degenerate,
)

__all__ = ["PCGrad", "pcgrad", "pcgrad_weights", "pcgrad_weights_from_gramian"]


def _orders(k: int, generator: torch.Generator | None) -> list[Array]:
    # One fresh random order of the other terms per term, as in the paper's Algorithm 1.
    others = np.arange(k)
    orders = []
    for i in range(k):
        perm = torch.randperm(k - 1, generator=generator).numpy()
        orders.append(np.delete(others, i)[perm])
    return orders


def _pcgrad_coefficients(m: Array, orders: list[Array]) -> Array:
    """C with g_i' = C_i G: every inner product g_i' . g_j is (C m)_ij."""
    k = m.shape[0]
    coeffs = np.eye(k)
    diag = np.diag(m)
    for i in range(k):
        row = coeffs[i]
        for j in orders[i]:
            dot = float(row @ m[:, j])
            if dot < 0.0 and diag[j] > 0.0:
                row[j] -= dot / diag[j]
    return coeffs


def pcgrad_weights_from_gramian(gram: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad weights from the K x K Gramian ``G G^T``; see :func:`pcgrad_weights`."""
    check_gramian(gram)
    return _pcgrad(gram, generator, "pcgrad")


@single_blas_thread
def _pcgrad(gram: Tensor, generator: torch.Generator | None, method: str) -> Tensor:
    m = gramian_to_numpy(gram)
    warn_degenerate(method, np.diag(m).copy())
    return to_weights(_pcgrad_coefficients(m, _orders(m.shape[0], generator)).sum(axis=0), gram)


def pcgrad_weights(matrix: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""PCGrad as weights: ``pcgrad_weights(G) @ G`` is the PCGrad gradient.

    Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning",
    NeurIPS 2020, Algorithm 1. For each term i, starting from g_i' = g_i, and for each
    other term j in a random order,

    .. math::
        \text{if } g_i' \cdot g_j < 0: \quad
        g_i' \leftarrow g_i' - \frac{g_i' \cdot g_j}{\|g_j\|^2} g_j,

    with g_j the original gradients and g_i' updated cumulatively; the result is
    ``sum_i g_i'``. Every g_i' is a combination ``C_i G`` of the rows of ``matrix`` (G),
    so the projections are computed from the Gramian alone and the weights are
    ``alpha = C^T 1``.

    Args:
        matrix: K x P per-term gradients, rows are terms.
        generator: the ``torch.Generator`` (CPU) that draws the orders; ``None`` uses the
            global generator.

    Returns:
        alpha, shape ``(K,)``, float64.

    Zero gradients are never projected onto (they cannot conflict) and warn once; K = 1
    gives alpha = [1] and warns once.

    Example:
        >>> import torch
        >>> from lossbalance.functional import pcgrad_weights
        >>> G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> pcgrad_weights(G)
        tensor([2.0000, 1.5000], dtype=torch.float64)
    """
    check_matrix(matrix)
    return pcgrad_weights_from_gramian(gramian(matrix), generator)


def pcgrad(matrix: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""The PCGrad combined gradient ``sum_i g_i'``, shape ``(P,)``, in ``matrix``'s dtype.

    Yu et al., NeurIPS 2020, Algorithm 1; see :func:`pcgrad_weights` for the update rule
    and arguments.

    Example:
        >>> import torch
        >>> from lossbalance.functional import pcgrad
        >>> pcgrad(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
        tensor([0.5000, 1.5000])
    """
    alpha = pcgrad_weights(matrix, generator)
    return (alpha.to(matrix.device) @ matrix.to(torch.float64)).to(matrix.dtype)


class PCGrad(Seeded, GradientBalancer):
    r"""PCGrad: gradient surgery on conflicting per-term gradients.

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1; the
    math is in :func:`pcgrad_weights`. The random orders come from a private CPU
    ``torch.Generator`` whose state is part of ``state_dict()``, so a resumed run draws
    the same orders as an uninterrupted one.

    Args:
        num_terms: K >= 1.
        seed: seed of the generator, an integer >= 0; ``None`` (default) draws one from
            the global torch generator, so ``torch.manual_seed`` makes runs repeatable.

    Example:
        >>> import torch
        >>> from lossbalance import PCGrad
        >>> G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> PCGrad(2, seed=0).weights(G @ G.T, torch.ones(2))
        tensor([2.0000, 1.5000], dtype=torch.float64)

    Differences from the authors' code: their TensorFlow code shuffled the terms once per
    step and let j run over all of them (j = i included, a no-op at first); we follow
    Algorithm 1 (j != i, an order per i). Like the paper, only the shared parameters are
    surgically combined; each head gets its own term's gradient.
    """

    def __init__(self, num_terms: int, seed: int | None = None) -> None:
        super().__init__(num_terms)
        self._seed_generator(seed)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        return self._record(_pcgrad(gramian, self.generator, "pcgrad"))

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, seed={self.seed}"


register(
    MethodInfo(
        name="pcgrad",
        factory=PCGrad,
        needs="gramian",
        stateful=True,
        paper="Yu et al., NeurIPS 2020",
        summary="gradient surgery: project conflicting gradients onto each other's normal plane",
    )
)
