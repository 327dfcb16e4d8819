"""ConFIG: the direction with equal cosines to every gradient, with a projected length."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from lossbalance._base import GradientBalancer, gramian
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import warn_once
from lossbalance.methods._blas import single_blas_thread
from lossbalance.methods._mgda import (
    _EPS,
    check_gramian,
    check_matrix,
    gramian_to_numpy,
    to_weights,
    warn_degenerate,
)

__all__ = ["ConFIG", "config_weights", "config_weights_from_gramian"]


@single_blas_thread
def _config(gram: Tensor, method: str) -> Tensor:
    m = gramian_to_numpy(gram)
    k = m.shape[0]
    diag = np.diag(m).copy()
    zero = warn_degenerate(method, diag)
    alpha = np.zeros(k)
    live = np.flatnonzero(~zero)
    if live.size == 0:
        return to_weights(alpha, gram)
    norms = np.sqrt(diag[live])
    cosines = m[np.ix_(live, live)] / np.outer(norms, norms)
    # g_c = U^+ 1 = U^T C^+ 1 with C the cosine matrix; eigenvalues below the rounding
    # level of an eigendecomposition of C (about K eps) count as zero.
    eigvals, eigvecs = np.linalg.eigh(cosines)
    keep = eigvals > 100.0 * live.size * _EPS * float(eigvals.max())
    coords = eigvecs[:, keep].T @ np.ones(live.size)
    beta = eigvecs[:, keep] @ (coords / eigvals[keep])
    fitted = cosines @ beta
    norm_sq = float(beta @ fitted)
    if norm_sq <= 0.0 or not np.isfinite(norm_sq):
        warn_once(
            f"{method}:no-direction",
            f"{method}: the unit gradients sum to zero in every least-squares sense (e.g. "
            "two opposite gradients): no direction has a positive equal cosine, so the "
            "update is zero",
            stacklevel=4,
        )
        return to_weights(alpha, gram)
    if np.abs(fitted - 1.0).max() > 1e-8:
        warn_once(
            f"{method}:inconsistent",
            f"{method}: the unit gradients are linearly dependent and no direction has "
            "equal cosines with all of them; using the least-squares direction U^+ 1",
            stacklevel=4,
        )
    gamma = beta / norms  # g_c = sum_i gamma_i g_i
    g_gamma = m[np.ix_(live, live)] @ gamma  # g_i . g_c
    length = float(g_gamma.sum()) / norm_sq  # (sum_i g_i . g_u) / ||g_c||
    alpha[live] = length * gamma
    return to_weights(alpha, gram)


def config_weights_from_gramian(gram: Tensor) -> Tensor:
    """ConFIG weights from the K x K Gramian ``J J^T``; see :func:`config_weights`."""
    check_gramian(gram)
    return _config(gram, "config")


def config_weights(matrix: Tensor) -> Tensor:
    r"""ConFIG weights: equal cosines to every gradient, length their summed projections.

    Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", 2024. With ``matrix`` = J (rows g_i),
    U the matrix of unit rows u_i = g_i / ||g_i|| and :math:`\mathcal U[x] = x / \|x\|`,

    .. math::
        g_u = \mathcal U\big[U^{+} \mathbf 1\big], \qquad
        d = \Big(\sum_i g_i^T g_u\Big)\, g_u,

    so d has the same cosine with every g_i (positive: no conflict) wherever the u_i
    are linearly independent, and its length is the sum of the projections of the g_i
    on it. In Gramian form, with the cosine matrix ``C = U U^T``, ``beta = C^+ 1``,
    ``g_c = U^+ 1 = sum_i (beta_i / ||g_i||) g_i`` and ``||g_c||^2 = beta^T C beta``.
    The direction ignores the gradient norms, the length scales with them.

    Args:
        matrix: K x P per-term gradients, rows are terms.

    Returns:
        alpha, shape ``(K,)``, float64.

    Degenerate cases warn once and stay finite: a zero gradient gets alpha_i = 0 (it has
    no direction); dependent unit gradients with no equal-cosine direction get the
    least-squares direction ``U^+ 1`` (the paper's pseudo-inverse); when that is zero
    (e.g. two opposite gradients) the update is zero. K = 1 gives alpha = [1].

    Example:
        >>> import torch
        >>> from lossbalance.functional import config_weights
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
        >>> config_weights(J)
        tensor([2.0000, 0.6667], dtype=torch.float64)
        >>> config_weights(J).float() @ J  # equal cosines, length (1 + 3) / sqrt(2)
        tensor([2., 2.])

    Differences from the paper: the paper's momentum variant (M-ConFIG, which keeps a
    running average of each gradient and updates one per step) needs per-term gradient
    state in parameter space and is not offered.
    """
    check_matrix(matrix)
    return config_weights_from_gramian(gramian(matrix))


class ConFIG(GradientBalancer):
    r"""ConFIG: conflict-free update with equal cosines to every per-term gradient.

    Liu, Chu, Thuerey, 2024; the math is in :func:`config_weights`.
    Stateless.

    Args:
        num_terms: K >= 1.

    Example:
        >>> import torch
        >>> from lossbalance import ConFIG
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> ConFIG(2).weights(J @ J.T, torch.ones(2))
        tensor([2.0000, 0.6667], dtype=torch.float64)
    """

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        return self._record(_config(gramian, "config"))


register(
    MethodInfo(
        name="config",
        factory=ConFIG,
        needs="gramian",
        stateful=False,
        paper="Liu, Chu & Thuerey, 2024",
        summary="ConFIG: equal cosines to every gradient, length the summed projections",
    )
)
