"""Aligned-MTL: align the per-term gradients to an orthogonal system of equal norms."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from lossbalance._base import GradientBalancer, gramian
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_choice, warn_once
from lossbalance.methods._blas import single_blas_thread
from lossbalance.methods._mgda import (
    _EPS,
    check_gramian,
    check_matrix,
    gramian_to_numpy,
    to_weights,
    warn_degenerate,
)

__all__ = ["AlignedMTL", "aligned_mtl_weights", "aligned_mtl_weights_from_gramian"]

SCALE_MODES = ("min", "median", "rmse")


@single_blas_thread
def _aligned_mtl(gram: Tensor, scale_mode: str, method: str) -> Tensor:
    m = gramian_to_numpy(gram)
    k = m.shape[0]
    warn_degenerate(method, np.diag(m).copy())
    eigvals, eigvecs = np.linalg.eigh(m)
    top = float(eigvals.max(initial=0.0))
    # The authors' rank rule: eigenvalues above K eps max(lambda) count.
    keep = eigvals > top * k * _EPS
    rank = int(keep.sum())
    if rank == 0:
        # Every gradient is zero: any weights give the same (zero) gradient.
        return to_weights(np.ones(k), gram)
    if rank < k:
        warn_once(
            f"{method}:rank-deficient",
            f"{method}: the gradients span {rank} < {k} dimensions (duplicate, dependent or "
            "zero gradients); the alignment acts on their span only",
            stacklevel=4,
        )
    lam, vecs = eigvals[keep], eigvecs[:, keep]
    if scale_mode == "min":
        scale = float(lam.min())
    elif scale_mode == "median":
        scale = float(np.median(lam))
    else:
        scale = float(lam.mean())
    # B = sqrt(scale) V L^{-1/2} V^T; alpha = B 1.
    alpha = np.sqrt(scale) * (vecs @ ((vecs.T @ np.ones(k)) / np.sqrt(lam)))
    return to_weights(alpha, gram)


def aligned_mtl_weights_from_gramian(gram: Tensor, scale_mode: str = "min") -> Tensor:
    """Aligned-MTL weights from the K x K Gramian; see :func:`aligned_mtl_weights`."""
    check_gramian(gram)
    check_choice("scale_mode", scale_mode, SCALE_MODES)
    return _aligned_mtl(gram, scale_mode, "aligned-mtl")


def aligned_mtl_weights(matrix: Tensor, scale_mode: str = "min") -> Tensor:
    r"""Aligned-MTL weights: the sum of the gradients after the condition-number-1 alignment.

    Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment for
    Multi-Task Learning", CVPR 2023, Algorithm 1. With ``matrix`` = J (rows
    g_i) and the eigendecomposition ``G = J J^T = V \Lambda V^T`` (its r positive
    eigenvalues), the aligned gradients are the rows of ``B J`` with

    .. math::
        B = \sqrt{\lambda_s}\, V \Lambda^{-1/2} V^T, \qquad
        (B J)(B J)^T = \lambda_s V V^T,

    an orthogonal system of equal norms :math:`\sqrt{\lambda_s}` (condition number 1;
    for that norm, the nearest such system to J in Frobenius norm, an orthogonal
    Procrustes problem), and the update is their sum
    ``d = 1^T B J``, so ``alpha = B 1``. ``scale_mode`` picks :math:`\lambda_s`:
    ``"min"`` (default, the paper: the smallest singular value squared), ``"median"`` or
    ``"rmse"`` (the mean eigenvalue), the options of the authors' code. The weights do
    not depend on the overall scale of J.

    Args:
        matrix: K x P per-term gradients, rows are terms.
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``.

    Returns:
        alpha, shape ``(K,)``, float64.

    Eigenvalues up to ``K eps max(lambda)`` count as zero (the authors' rule); when the
    rank r is below K (duplicate, dependent or zero gradients) the alignment acts on the
    span and warns once. K = 1 gives alpha = [1].

    Example:
        >>> import torch
        >>> from lossbalance.functional import aligned_mtl_weights
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> aligned_mtl_weights(J)
        tensor([1.0000, 0.5000], dtype=torch.float64)

    Differences from TorchJD: its ``AlignedMTL`` combines the aligned gradients with
    weights 1/K (a mean); the authors' code and the paper's Algorithm 1 sum them, as we
    do (a factor K).
    """
    check_matrix(matrix)
    return aligned_mtl_weights_from_gramian(gramian(matrix), scale_mode)


class AlignedMTL(GradientBalancer):
    r"""Aligned-MTL: sum of the gradients aligned to an orthogonal system of equal norms.

    Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR
    2023, Algorithm 1; the math is in :func:`aligned_mtl_weights`. Stateless.

    Args:
        num_terms: K >= 1.
        scale_mode: ``"min"`` (default, the paper), ``"median"`` or ``"rmse"``.

    Example:
        >>> import torch
        >>> from lossbalance import AlignedMTL
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> AlignedMTL(2).weights(J @ J.T, torch.ones(2))
        tensor([1.0000, 0.5000], dtype=torch.float64)

    Differences from the paper: the paper also offers aligning the gradients of the
    shared features (Aligned-MTL-UB); that is the engine's feature mode.
    """

    def __init__(self, num_terms: int, scale_mode: str = "min") -> None:
        super().__init__(num_terms)
        check_choice("scale_mode", scale_mode, SCALE_MODES)
        self.scale_mode = scale_mode

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        return self._record(_aligned_mtl(gramian, self.scale_mode, "aligned-mtl"))

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, scale_mode={self.scale_mode!r}"


register(
    MethodInfo(
        name="aligned-mtl",
        factory=AlignedMTL,
        needs="gramian",
        stateful=False,
        paper="Senushkin et al., CVPR 2023",
        summary="Aligned-MTL: sum of the gradients aligned to an orthogonal equal-norm system",
    )
)
