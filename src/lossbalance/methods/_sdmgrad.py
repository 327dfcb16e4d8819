"""SDMGrad: direction-oriented MGDA weights, solved on a double-sampled Gramian."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lossbalance._base import GradientBalancer
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_beta, check_nonneg, check_positive
from lossbalance.methods._mgda import check_gramian
from lossbalance.methods._vector import project_simplex

__all__ = ["SDMGrad", "sdmgrad_step"]


def sdmgrad_step(
    w: Tensor,
    cross: Tensor,
    lamda: float,
    lr: float = 5.0,
    momentum: float = 0.5,
    n_iter: int = 20,
) -> tuple[Tensor, Tensor]:
    r"""SDMGrad's inner solve of w and the weights of the direction.

    Xiao, Ban, Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms", NeurIPS 2023, Algorithm 1. With :math:`A = J_1 J_2^T` from two
    independent batches (``cross``), normalised by :math:`s^2`,
    :math:`s = \operatorname{mean}_i \sqrt{\max(A_{ii}, 0)}` (Sec. 6.1), and
    :math:`\tilde w = \mathbf 1/K` (the average gradient as the preferred direction),
    ``n_iter`` steps of projected SGD with heavy-ball momentum (fresh at each call):

    .. math::
        v \leftarrow \mu v + A (w + \lambda \tilde w), \qquad
        w \leftarrow \Pi_\Delta(w - \eta v)

    minimise :math:`\tfrac12 \|J^T (w + \lambda\tilde w)\|^2` over the simplex; the
    direction is :math:`d = J_3^T (w + \lambda\tilde w) / (1 + \lambda)`.

    Returns:
        ``(w, weights)``: the new w and ``(w + lamda / K) / (1 + lamda)``.

    Example:
        >>> import torch
        >>> from lossbalance.methods._sdmgrad import sdmgrad_step
        >>> w, weights = sdmgrad_step(torch.full((2,), 0.5), torch.eye(2), 0.0, n_iter=1)
        >>> w
        tensor([0.5000, 0.5000])
    """
    k = w.shape[0]
    if cross.dim() != 2 or cross.shape != (k, k):
        raise ValueError(f"sdmgrad_step: expected a {k} x {k} matrix, got {tuple(cross.shape)}")
    a = cross.to(w)
    scale = a.diagonal().clamp_min(0).sqrt().mean()
    a = a / (scale.square() + 1e-8)
    pref = torch.full_like(w, 1.0 / k)
    velocity: Tensor | None = None
    for _ in range(n_iter):
        grad = a @ (w + lamda * pref)
        velocity = grad if velocity is None else momentum * velocity + grad
        w = project_simplex(w - lr * velocity)
    return w, (w + lamda * pref) / (1.0 + lamda)


class SDMGrad(GradientBalancer):
    r"""SDMGrad: stochastic direction-oriented multi-objective gradient descent.

    Xiao et al., NeurIPS 2023, Algorithm 1; the math is in :func:`sdmgrad_step`. The
    double-sampling API is MoDo's (:class:`lossbalance.MoDo`)::

        A = lossbalance.cross_gramian(losses_1, losses_2, shared)  # batches xi, xi'
        balancer.update(A)
        lossbalance.backward(losses_3, balancer, shared=shared)    # batch zeta

    and without :meth:`update`, :meth:`weights` solves with the Gramian of the batch it
    gets (single sampling, the deterministic counterpart). Extra cost: the forward passes
    of two more batches and 2K backward passes.

    State (``state_dict``): ``w`` (float64, uniform at the start; the inner solve starts
    from the previous step's w) and ``pending``.

    Args:
        num_terms: K >= 1.
        lamda: :math:`\lambda \ge 0`, the pull toward the average gradient (default 0.3,
            LibMTL's and the authors' experiments).
        lr: the inner step :math:`\eta > 0` (default 5, LibMTL's; TorchJD uses 10).
        momentum: :math:`\mu` in [0, 1) (default 0.5).
        n_iter: inner iterations, an integer >= 1 (default 20).

    ``last_weights`` are ``(w + lamda / K) / (1 + lamda)``.

    Example:
        >>> import torch
        >>> from lossbalance.methods._sdmgrad import SDMGrad
        >>> SDMGrad(2, lamda=0.0).weights(torch.eye(2, dtype=torch.float64), torch.ones(2))
        tensor([0.5000, 0.5000], dtype=torch.float64)

    Differences from the paper / the authors' code: only the uniform preference
    :math:`\tilde w` (the average gradient) is offered; the paper's variant with a
    sampled subset of objectives (SDMGrad-OS) is not implemented.
    """

    w: Tensor
    pending: Tensor

    def __init__(
        self,
        num_terms: int,
        lamda: float = 0.3,
        lr: float = 5.0,
        momentum: float = 0.5,
        n_iter: int = 20,
    ) -> None:
        super().__init__(num_terms)
        check_nonneg("lamda", lamda)
        check_positive("lr", lr)
        check_beta("momentum", momentum)
        for name, value in (("lamda", lamda), ("lr", lr)):
            if not math.isfinite(value):
                raise ValueError(f"Invalid {name}: {value} (expected a finite number)")
        if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"Invalid n_iter: {n_iter!r} (expected an integer >= 1)")
        self.lamda = float(lamda)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.n_iter = n_iter
        self.register_buffer("w", torch.full((num_terms,), 1.0 / num_terms, dtype=torch.float64))
        self.register_buffer("pending", torch.zeros((), dtype=torch.bool))

    def update(self, cross: Tensor) -> Tensor:
        """Solve with ``A = J_1 J_2^T`` (:func:`lossbalance.cross_gramian`); the next
        :meth:`weights` call returns the result instead of solving again. Returns the
        weights ``(w + lamda / K) / (1 + lamda)``."""
        check_gramian(cross, self.num_terms, type(self).__name__)
        if not bool(torch.isfinite(cross).all()):
            raise ValueError("SDMGrad.update: the cross Gramian is not finite")
        w, weights = sdmgrad_step(
            self.w.double(),
            cross.detach().double(),
            self.lamda,
            self.lr,
            self.momentum,
            self.n_iter,
        )
        self.w.copy_(w)
        self.pending.fill_(True)
        return weights

    def _current(self) -> Tensor:
        k = self.num_terms
        return (self.w.double() + self.lamda / k) / (1.0 + self.lamda)

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        if not bool(self.pending):
            self.update(gramian)
        self.pending.fill_(False)
        return self._record(self._current().to(gramian.device))

    def extra_repr(self) -> str:
        return (
            f"num_terms={self.num_terms}, lamda={self.lamda}, lr={self.lr}, "
            f"momentum={self.momentum}, n_iter={self.n_iter}"
        )


register(
    MethodInfo(
        name="sdmgrad",
        factory=SDMGrad,
        needs="gramian",
        stateful=True,
        paper="Xiao et al., NeurIPS 2023",
        summary="SDMGrad: direction-oriented MGDA weights on a double-sampled Gramian",
    )
)
