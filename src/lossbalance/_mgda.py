"""MGDA: the min-norm point of the convex hull of the per-term gradients.

Also holds the small K x K helpers shared by the gradient-level methods (Gramian checks,
degenerate-input warnings, the affine min-norm direction used by closed-form MGDA and
IMTL-G). The K x K math runs in float64 NumPy on the CPU: K is small, and the iterative
solvers would otherwise pay one device round trip per iteration.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from lossbalance._base import GradientBalancer, gramian
from lossbalance._blas import single_blas_thread
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_choice, check_positive, warn_once

__all__ = [
    "MGDA",
    "MGDAClosedForm",
    "mgda_closed_form_weights",
    "mgda_closed_form_weights_from_gramian",
    "mgda_weights",
    "mgda_weights_from_gramian",
]

Array = NDArray[np.float64]

SOLVERS = ("frank-wolfe", "exact")
NORMALIZATIONS = ("none", "l2", "loss", "loss+")

# A Gramian diagonal entry at or below this is a zero gradient: any positive norm can be
# normalised in float64, so only exact zeros (terms that do not reach the shared
# parameters) are degenerate.
_TINY = float(np.finfo(np.float64).tiny)
_CORRECTIVE_EVERY = 20
# The exact solver stops at machine-level optimality, whatever the tolerance asked of
# Frank-Wolfe.
_EXACT_TOL = 1e-12


# ----------------------------------------------------------------------------------------
# Shared helpers of the gradient-level methods
# ----------------------------------------------------------------------------------------


def check_gramian(gram: Tensor, num_terms: int | None = None, owner: str = "") -> None:
    """Raise unless ``gram`` is a K x K tensor (K == ``num_terms`` when given)."""
    if not isinstance(gram, Tensor):
        raise TypeError(f"gramian must be a Tensor, got {type(gram).__name__}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"expected a K x K gramian with K >= 1, got shape {tuple(gram.shape)}")
    if num_terms is not None and gram.shape[0] != num_terms:
        raise ValueError(
            f"{owner} was built for {num_terms} loss terms, "
            f"got a gramian of shape {tuple(gram.shape)}"
        )


def check_matrix(matrix: Tensor) -> None:
    """Raise unless ``matrix`` is a K x P tensor of per-term gradients with K >= 1."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"the gradient matrix must be a Tensor, got {type(matrix).__name__}")
    if matrix.dim() != 2 or matrix.shape[0] == 0:
        raise ValueError(
            f"expected a K x P gradient matrix (rows = terms) with K >= 1, "
            f"got shape {tuple(matrix.shape)}"
        )


def check_losses(losses: Tensor | None, num_terms: int, name: str = "losses") -> Tensor | None:
    """Return ``losses`` as a detached float64 CPU tensor of shape (K,), or ``None``."""
    if losses is None:
        return None
    if not isinstance(losses, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(losses).__name__}")
    if losses.dim() != 1 or losses.shape[0] != num_terms:
        raise ValueError(
            f"expected {name} of shape ({num_terms},) for {num_terms} terms, "
            f"got shape {tuple(losses.shape)}"
        )
    return losses.detach().to("cpu", torch.float64)


def gramian_to_numpy(gram: Tensor) -> Array:
    """The Gramian as a symmetric positive semidefinite float64 NumPy array.

    Non-finite entries raise ``ValueError``. It is symmetrised against rounding; one that
    is clearly indefinite (a Gramian built
    with large rounding errors, or not a Gramian at all) is replaced by its nearest
    positive semidefinite matrix, with a warning, so that no method divides by a negative
    squared norm.
    """
    m = gram.detach().to("cpu", torch.float64).numpy()
    m = 0.5 * (m + m.T)
    if not np.isfinite(m).all():
        raise ValueError(
            f"the Gramian has non-finite entries (shape {tuple(gram.shape)}): a loss or a "
            "gradient is NaN or infinite"
        )
    eigvals, eigvecs = np.linalg.eigh(m)
    if eigvals.size and eigvals[0] < -1e-10 * max(abs(eigvals[-1]), abs(eigvals[0])):
        warn_once(
            "gramian:indefinite",
            f"the Gramian is not positive semidefinite (eigenvalues {eigvals[0]:.3g} .. "
            f"{eigvals[-1]:.3g}); using its nearest positive semidefinite matrix",
            stacklevel=5,
        )
        m = (eigvecs * np.maximum(eigvals, 0.0)) @ eigvecs.T
        m = 0.5 * (m + m.T)
    return m


def to_weights(alpha: Array, like: Tensor) -> Tensor:
    """A float64 tensor on ``like``'s device."""
    return torch.from_numpy(np.ascontiguousarray(alpha, dtype=np.float64)).to(like.device)


def warn_degenerate(method: str, diag: Array) -> NDArray[np.bool_]:
    """Warn once for K = 1 and for zero gradients; return the mask of zero rows."""
    if diag.shape[0] == 1:
        warn_once(
            f"{method}:single-term",
            f"{method}: only one loss term, so there is nothing to balance",
            stacklevel=4,
        )
    zero = diag <= _TINY
    if zero.any():
        warn_once(
            f"{method}:zero-gradient",
            f"{method}: loss term(s) {np.flatnonzero(zero).tolist()} have a zero gradient on "
            "the shared parameters (do they reach them?); they are handled as documented",
            stacklevel=4,
        )
    return zero


def affine_direction(m: Array) -> tuple[Array, bool]:
    """A vector ``b`` with ``1^T b > 0`` minimising ``b^T m b`` on ``1^T b = const``.

    For a nonsingular ``m`` this is ``m^{-1} 1``. For a singular one it is the minimiser of
    least Euclidean norm: ``m^+ 1`` when ``1`` lies in the range of ``m`` (duplicated rows
    are then weighted equally), else the projection of ``1`` onto the null space (the affine
    hull contains the origin, so the minimum is 0). Returns ``(b, singular)``; the scale of
    ``b`` is unspecified.
    """
    k = m.shape[0]
    eigvals, eigvecs = np.linalg.eigh(m)
    top = float(eigvals.max(initial=0.0))
    ones = np.ones(k)
    if top <= _TINY:
        return ones, True
    keep = eigvals > 100.0 * k * np.finfo(np.float64).eps * top
    coords = eigvecs.T @ ones
    if keep.all():
        return eigvecs @ (coords / eigvals), False
    null_part = eigvecs[:, ~keep] @ coords[~keep]
    if float(null_part @ ones) > 1e-10 * k:
        return null_part, True
    return eigvecs[:, keep] @ (coords[keep] / eigvals[keep]), True


# ----------------------------------------------------------------------------------------
# Solvers of min a^T M a on the simplex (M normalised to max diagonal 1)
# ----------------------------------------------------------------------------------------


def _kkt_gaps(m_alpha: Array, alpha: Array) -> tuple[float, int, float, int]:
    value = float(alpha @ m_alpha)
    toward = int(np.argmin(m_alpha))
    support = alpha > 0.0
    away = int(np.argmax(np.where(support, m_alpha, -np.inf)))
    return value - float(m_alpha[toward]), toward, float(m_alpha[away]) - value, away


def _frank_wolfe(m: Array, tol: float, max_iter: int) -> tuple[Array, bool]:
    # Away steps (Lacoste-Julien & Jaggi 2015) make Frank-Wolfe converge linearly on this
    # problem, but the rate depends on the geometry and can be very slow when the points
    # are nearly affinely dependent. Once the iterates sit on the optimal face, the
    # minimiser of the affine hull of the support is the answer, so every few iterations
    # that minimiser is tried and kept when it is feasible (a fully corrective step).
    k = m.shape[0]
    alpha = np.full(k, 1.0 / k)
    m_alpha = m @ alpha
    for it in range(max_iter):
        gap_fw, toward, gap_away, away = _kkt_gaps(m_alpha, alpha)
        if max(gap_fw, gap_away) <= tol:
            return alpha, True
        if it % _CORRECTIVE_EVERY == _CORRECTIVE_EVERY - 1:
            support, lam = _corrective(m, np.flatnonzero(alpha > 0.0).tolist(), alpha[alpha > 0.0])
            alpha = np.zeros(k)
            alpha[support] = lam
            m_alpha = m @ alpha
            gap_fw, toward, gap_away, away = _kkt_gaps(m_alpha, alpha)
            if max(gap_fw, gap_away) <= tol:
                return alpha, True
        if gap_fw >= gap_away:
            direction = -alpha
            direction[toward] += 1.0
            m_direction = m[:, toward] - m_alpha
            max_step = 1.0
        else:
            direction = alpha.copy()
            direction[away] -= 1.0
            m_direction = m_alpha - m[:, away]
            max_step = alpha[away] / (1.0 - alpha[away])
        curvature = float(direction @ m_direction)
        slope = float(m_alpha @ direction)
        if curvature > 0.0:
            step = min(max(-slope / curvature, 0.0), max_step)
        else:
            step = max_step if slope < 0.0 else 0.0
        alpha = alpha + step * direction
        if step == max_step and gap_fw < gap_away:
            alpha[away] = 0.0  # a drop step removes the away vertex exactly
        np.maximum(alpha, 0.0, out=alpha)
        alpha /= alpha.sum()
        # The incremental update drifts by rounding; refresh it now and then.
        m_alpha = m @ alpha if it % 50 == 49 else m_alpha + step * m_direction
    return alpha, False


def _affine_minimizer(m: Array) -> Array:
    k = m.shape[0]
    system = np.zeros((k + 1, k + 1))
    system[:k, :k] = m
    system[:k, k] = 1.0
    system[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    solution = np.linalg.lstsq(system, rhs, rcond=None)[0]
    return solution[:k]


def _corrective(m: Array, support: list[int], lam: Array) -> tuple[list[int], Array]:
    """Minimise over the hull of ``support`` starting from weights ``lam`` (sum 1).

    Wolfe's minor cycle: jump to the minimiser of the affine hull if it lies in the convex
    hull, else walk toward it until a weight reaches 0, drop that vertex and repeat. The
    objective never increases.
    """
    for _ in range(len(support)):
        mu = _affine_minimizer(m[np.ix_(support, support)])
        if (mu > 1e-14).all():
            return support, mu / mu.sum()
        blocking = mu <= 1e-14
        ratios = lam[blocking] / np.maximum(lam[blocking] - mu[blocking], _TINY)
        theta = float(np.clip(ratios.min(), 0.0, 1.0))
        lam = (1.0 - theta) * lam + theta * mu
        keep = lam > 1e-14
        if keep.all():
            keep[int(np.argmin(lam))] = False
        support = [s for s, kept in zip(support, keep, strict=True) if kept]
        lam = lam[keep] / lam[keep].sum()
    return support, lam


def _wolfe(m: Array, tol: float, max_iter: int) -> tuple[Array, bool]:
    # Wolfe's (1976) min-norm-point algorithm in Gramian form: an active-set method that
    # solves the KKT system exactly on each support ("corral") and ends in finitely many
    # steps.
    k = m.shape[0]
    support = [int(np.argmin(np.diag(m)))]
    lam = np.ones(1)
    for _ in range(max_iter):
        m_alpha = m[:, support] @ lam
        value = float(lam @ m_alpha[support])
        entering = int(np.argmin(m_alpha))
        if value - float(m_alpha[entering]) <= tol or entering in support:
            break
        support, lam = _corrective(m, [*support, entering], np.append(lam, 0.0))
        if float(lam @ m[np.ix_(support, support)] @ lam) >= value - 1e-16:
            # No progress beyond rounding (max diag(m) is 1): optimal to machine precision,
            # e.g. an affinely dependent corral around the origin.
            break
    else:
        alpha = np.zeros(k)
        alpha[support] = lam
        return alpha, False
    alpha = np.zeros(k)
    alpha[support] = np.maximum(lam, 0.0)
    return alpha / alpha.sum(), True


def _normalizers(diag: Array, losses: Tensor | None, normalization: str, method: str) -> Array:
    k = diag.shape[0]
    if normalization == "none":
        return np.ones(k)
    if normalization in ("loss", "loss+") and losses is None:
        raise ValueError(f"normalization={normalization!r} needs the losses, got None")
    norms = np.sqrt(np.maximum(diag, 0.0))
    if normalization == "l2":
        scale = norms
    else:
        assert losses is not None
        scale = losses.numpy().copy()
        if normalization == "loss+":
            scale = scale * norms
    bad = ~(np.isfinite(scale) & (scale > _TINY))
    if bad.any():
        warn_once(
            f"{method}:normalizer",
            f"{method}: the {normalization!r} normaliser of term(s) "
            f"{np.flatnonzero(bad).tolist()} is zero, negative or not finite; using 1 there",
            stacklevel=4,
        )
        scale = np.where(bad, 1.0, scale)
    return scale


@single_blas_thread
def _solve_mgda(
    gram: Tensor,
    losses: Tensor | None,
    *,
    solver: str,
    normalization: str,
    tol: float,
    max_iter: int,
    method: str,
) -> Tensor:
    m = gramian_to_numpy(gram)
    k = m.shape[0]
    diag = np.diag(m).copy()
    warn_degenerate(method, diag)
    if k == 1:
        return to_weights(np.ones(1), gram)
    scale = _normalizers(diag, losses, normalization, method)
    m = m / np.outer(scale, scale)
    top = float(np.diag(m).max())
    if top <= _TINY:
        # Every gradient is zero: any convex combination is optimal.
        return to_weights(np.full(k, 1.0 / k) / scale, gram)
    m = m / top
    if solver == "closed-form":
        direction, singular = affine_direction(m)
        if singular:
            warn_once(
                f"{method}:singular",
                f"{method}: the Gramian is singular (duplicate or linearly dependent "
                "gradients); using the least-norm minimiser",
                stacklevel=4,
            )
        sol = direction / direction.sum()
    else:
        if solver == "frank-wolfe":
            sol, converged = _frank_wolfe(m, tol, max_iter)
        else:
            sol, converged = _wolfe(m, _EXACT_TOL, max_iter)
        if not converged:
            target = f"tol={tol}" if solver == "frank-wolfe" else "optimality"
            warn_once(
                f"{method}:max-iter",
                f"{method}: the {solver} solver stopped at max_iter={max_iter} before "
                f"reaching {target}; the weights are approximate",
                stacklevel=4,
            )
    return to_weights(sol / scale, gram)


def _check_solver_args(solver: str, normalization: str, tol: float, max_iter: int) -> None:
    check_choice("solver", solver, SOLVERS)
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_positive("tol", tol)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"Invalid max_iter: {max_iter!r} (expected an integer >= 1)")


# ----------------------------------------------------------------------------------------
# Public functions and classes
# ----------------------------------------------------------------------------------------


def mgda_weights_from_gramian(
    gram: Tensor,
    solver: str = "frank-wolfe",
    *,
    normalization: str = "none",
    losses: Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 10_000,
) -> Tensor:
    """MGDA weights from the K x K Gramian ``M = G G^T``; see :func:`mgda_weights`."""
    check_gramian(gram)
    _check_solver_args(solver, normalization, tol, max_iter)
    return _solve_mgda(
        gram,
        check_losses(losses, gram.shape[0]),
        solver=solver,
        normalization=normalization,
        tol=tol,
        max_iter=max_iter,
        method="mgda",
    )


def mgda_weights(
    matrix: Tensor,
    solver: str = "frank-wolfe",
    *,
    normalization: str = "none",
    losses: Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 10_000,
) -> Tensor:
    r"""MGDA weights: the min-norm point of the convex hull of the per-term gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    Eq. (3) solved by Algorithm 2 (Frank-Wolfe). With ``M = G G^T`` (``matrix`` = G, rows
    g_i) and normalisers n_i,

    .. math::
        \beta = \arg\min_{\beta \in \Delta^{K-1}} \beta^T \tilde M \beta, \quad
        \tilde M_{ij} = M_{ij} / (n_i n_j), \qquad \alpha_i = \beta_i / n_i,

    so ``alpha @ matrix`` is the min-norm point of conv{g_i / n_i}, the common descent
    direction (zero at a Pareto-stationary point). n_i is 1 (``"none"``), ``||g_i||``
    (``"l2"``), ``L_i`` (``"loss"``) or ``L_i ||g_i||`` (``"loss+"``), the options of the
    authors' code. ``M~`` is divided by its largest diagonal entry before solving, so
    the solution does not depend on the overall scale of the gradients (1e-8 .. 1e8).

    Args:
        matrix: K x P per-term gradients, rows are terms.
        solver: ``"frank-wolfe"`` (default): the paper's Frank-Wolfe with exact line
            search, with away steps and, every 20 iterations, a fully corrective step
            (the minimiser over the hull of the current support), which ends the slow
            tail of plain Frank-Wolfe; it typically stops within a hundred iterations.
            ``"exact"``: Wolfe's (1976) active-set min-norm-point algorithm, which solves
            the KKT system on each support and stops at the optimum to machine precision
            (``tol`` is not used).
        normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"``.
        losses: the K losses, needed by ``"loss"`` and ``"loss+"``.
        tol: Frank-Wolfe's optimality tolerance > 0 (default 1e-6), relative to
            ``max_i M~_ii``: it stops when ``(M~ b)_i >= b^T M~ b - tol`` for all i and
            ``(M~ b)_i <= b^T M~ b + tol`` on the support (the KKT conditions), which
            bounds ``b^T M~ b`` to within ``2 tol`` of the minimum.
        max_iter: iteration cap >= 1 (default 10000); hitting it warns once.

    Returns:
        alpha, shape ``(K,)``, float64: the coefficients on the original g_i (on the
        simplex when ``normalization="none"``).

    A zero gradient puts the origin in the hull, so MGDA returns the weights of a zero
    combined gradient (and warns). Duplicate or dependent gradients are not degenerate for
    MGDA: the combined gradient is unique even where alpha is not.

    Example:
        >>> import torch
        >>> from lossbalance.functional import mgda_weights
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> mgda_weights(G)
        tensor([0.5000, 0.5000], dtype=torch.float64)
        >>> mgda_weights(torch.tensor([[3.0, 0.0], [1.0, 1.0]]), solver="exact")
        tensor([0., 1.], dtype=torch.float64)

    Differences from the authors' code: it ran a fixed 250 plain Frank-Wolfe iterations;
    we iterate to the tolerance above (away and fully corrective steps change the path,
    not the solution). With a normaliser their code applied the solution
    beta to the raw losses; we fold 1/n_i into alpha, so the shared parameters receive
    the min-norm point of the normalised gradients (``alpha @ matrix`` is exactly that).
    """
    check_matrix(matrix)
    return mgda_weights_from_gramian(
        gramian(matrix),
        solver,
        normalization=normalization,
        losses=losses,
        tol=tol,
        max_iter=max_iter,
    )


def mgda_closed_form_weights_from_gramian(
    gram: Tensor, *, normalization: str = "none", losses: Tensor | None = None
) -> Tensor:
    """Closed-form MGDA weights from the K x K Gramian; see :func:`mgda_closed_form_weights`."""
    check_gramian(gram)
    check_choice("normalization", normalization, NORMALIZATIONS)
    return _solve_mgda(
        gram,
        check_losses(losses, gram.shape[0]),
        solver="closed-form",
        normalization=normalization,
        tol=1.0,
        max_iter=1,
        method="mgda-closed-form",
    )


def mgda_closed_form_weights(
    matrix: Tensor, *, normalization: str = "none", losses: Tensor | None = None
) -> Tensor:
    r"""MGDA without the nonnegativity constraint, in closed form.

    The minimiser of ``alpha^T M alpha`` subject to ``sum(alpha) = 1`` only (Sener &
    Koltun, NeurIPS 2018, Eq. (3) without ``alpha >= 0``), with ``M = G G^T`` and
    ``matrix`` = G:

    .. math::
        \alpha = \frac{M^{+} \mathbf 1}{\mathbf 1^T M^{+} \mathbf 1},

    so ``(M alpha)_i`` is the same for every i (every g_i has the same inner product with
    the combined gradient). A singular M (duplicate or dependent gradients, a zero
    gradient) warns once and gives the minimiser of least Euclidean norm: the formula above
    with the pseudo-inverse when 1 lies in the range of M, else a null-space combination
    (the affine hull of the g_i contains the origin, so the minimum is a zero gradient).
    ``normalization`` and ``losses`` work as in :func:`mgda_weights`.

    Example:
        >>> import torch
        >>> from lossbalance.functional import mgda_closed_form_weights
        >>> mgda_closed_form_weights(torch.tensor([[3.0, 0.0], [1.0, 1.0]]))
        tensor([-0.2000,  1.2000], dtype=torch.float64)
    """
    check_matrix(matrix)
    return mgda_closed_form_weights_from_gramian(
        gramian(matrix), normalization=normalization, losses=losses
    )


class MGDA(GradientBalancer):
    r"""MGDA: the min-norm point of the convex hull of the per-term gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    Eq. (3) and Algorithm 2; the math is in :func:`mgda_weights`. Stateless.

    Args:
        num_terms: K >= 1.
        solver: ``"frank-wolfe"`` (default) or ``"exact"``.
        normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"`` (the
            gradient normalisers of the authors' code; folded into the weights).
        tol: Frank-Wolfe's optimality tolerance > 0 (default 1e-6), relative to the
            largest squared (normalised) gradient norm.
        max_iter: solver iteration cap >= 1 (default 10000).

    Example:
        >>> import torch
        >>> from lossbalance import MGDA
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> MGDA(2).weights(G @ G.T, torch.ones(2))
        tensor([0.9000, 0.1000], dtype=torch.float64)

    Differences from the paper / the authors' code: the code ran a fixed 250 Frank-Wolfe
    iterations and also scaled the task-specific heads' gradients by alpha. We solve to
    ``tol`` and follow the paper for the heads: each head receives its own term's gradient
    (the engine does this; only the shared parameters get ``sum_i alpha_i g_i``).
    """

    def __init__(
        self,
        num_terms: int,
        solver: str = "frank-wolfe",
        normalization: str = "none",
        tol: float = 1e-6,
        max_iter: int = 10_000,
    ) -> None:
        super().__init__(num_terms)
        _check_solver_args(solver, normalization, tol, max_iter)
        self.solver = solver
        self.normalization = normalization
        self.tol = tol
        self.max_iter = max_iter

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        alpha = _solve_mgda(
            gramian,
            check_losses(losses, self.num_terms),
            solver=self.solver,
            normalization=self.normalization,
            tol=self.tol,
            max_iter=self.max_iter,
            method="mgda",
        )
        return self._record(alpha)

    def extra_repr(self) -> str:
        return (
            f"num_terms={self.num_terms}, solver={self.solver!r}, "
            f"normalization={self.normalization!r}, tol={self.tol}"
        )


class MGDAClosedForm(GradientBalancer):
    r"""MGDA without the nonnegativity constraint: ``alpha = M^+ 1 / (1^T M^+ 1)``.

    The equality-constrained relaxation of Sener & Koltun (NeurIPS 2018) Eq. (3); see
    :func:`mgda_closed_form_weights`. Weights may be negative. Stateless.

    Args:
        num_terms: K >= 1.
        normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"``, as in
            :class:`MGDA`.

    Example:
        >>> import torch
        >>> from lossbalance import MGDAClosedForm
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> MGDAClosedForm(2).weights(G @ G.T, torch.ones(2))
        tensor([0.9000, 0.1000], dtype=torch.float64)
    """

    def __init__(self, num_terms: int, normalization: str = "none") -> None:
        super().__init__(num_terms)
        check_choice("normalization", normalization, NORMALIZATIONS)
        self.normalization = normalization

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        check_gramian(gramian, self.num_terms, type(self).__name__)
        self._check_terms(losses)
        alpha = _solve_mgda(
            gramian,
            check_losses(losses, self.num_terms),
            solver="closed-form",
            normalization=self.normalization,
            tol=1.0,
            max_iter=1,
            method="mgda-closed-form",
        )
        return self._record(alpha)

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, normalization={self.normalization!r}"


register(
    MethodInfo(
        name="mgda",
        factory=MGDA,
        needs="gramian",
        stateful=False,
        paper="Sener & Koltun, NeurIPS 2018",
        summary="min-norm point of the convex hull of the gradients (Frank-Wolfe or exact)",
    )
)
register(
    MethodInfo(
        name="mgda-closed-form",
        factory=MGDAClosedForm,
        needs="gramian",
        stateful=False,
        paper="Sener & Koltun, NeurIPS 2018 (without alpha >= 0)",
        summary="min-norm point of the affine hull of the gradients, in closed form",
    )
)
