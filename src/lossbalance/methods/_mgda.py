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
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_choice, check_positive, warn_once
from lossbalance.methods._blas import single_blas_thread

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
_EPS = float(np.finfo(np.float64).eps)
_CORRECTIVE_EVERY = 20
# The exact solver stops at machine-level optimality, whatever the tolerance asked of
# Frank-Wolfe.
_EXACT_TOL = 0.0


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
#
# Both solvers work in the coordinates b_i = n_i a_i of the unit gradients u_i = g_i / n_i
# (n_i = ||g_i||, C = the cosine matrix): x = sum_i a_i g_i = sum_i b_i u_i. Every
# quantity they compare is then of order one whatever the norms, so terms whose norms
# differ by 1e16 are solved as accurately as terms of equal norms. The KKT conditions of
# the min-norm point x* are <g_i - x*, x*> >= 0 for every i, with equality on the
# support; they are tested in the scale-free form
#
#     v_i = <u_i, x> / ||x|| - ||x|| / n_i = <g_i - x, x> / (n_i ||x||)
#
# (the cosine between x and g_i - x, up to the factor ||g_i - x|| / n_i <= 2). Moving x
# toward a vertex with v_i = -tol moves it by about tol ||x||: the test is relative to
# the answer, where one relative to the largest squared norm lets a term 100 times
# shorter than the longest move x by 10%.


class _Scaled:
    """The cosine matrix of the nonzero gradients and their norms (max norm 1)."""

    def __init__(self, m: Array) -> None:
        self.norms = np.sqrt(np.maximum(np.diag(m), 0.0))
        self.cos = m / np.outer(self.norms, self.norms)
        np.fill_diagonal(self.cos, 1.0)
        # 1 / n_i scaled to max 1: the constraint sum_i a_i = 1 in b coordinates
        self.inv = self.norms.min() / self.norms

    def violations(self, support: list[int], b: Array) -> tuple[Array, float]:
        """``(v, rounding)`` for x = sum_{i in support} b_i u_i: the scale-free KKT
        residuals and the rounding error they carry (x is a sum of terms up to ``|b|_1``,
        so ``<u_i, x>`` is known to about ``eps |b|_1``). An x at rounding level (the
        origin lies in the hull) has residuals 0: it is optimal."""
        cb = self.cos[:, support] @ b
        value = float(b @ cb[support])
        norm = float(np.sqrt(max(value, 0.0)))
        total = float(np.abs(b).sum())
        if norm <= 64.0 * _EPS * total:
            return np.zeros_like(cb), 0.0
        return cb / norm - norm / self.norms, 16.0 * _EPS * (total / norm + 1.0)

    def coords(self, support: list[int], lam: Array) -> Array:
        """The b coordinates of the simplex weights ``lam`` on ``support``."""
        return lam * self.norms[support]

    def affine_minimizer(self, support: list[int]) -> Array:
        """Simplex-normalised weights a (sum 1) of the min-norm point of the affine hull.

        The KKT system of min b^T C b subject to sum_i b_i / n_i = const, bordered with
        the scaled 1 / n_i: every entry is at most 1, and the system is nonsingular when
        the support is affinely independent (Wolfe's corrals are).
        """
        size = len(support)
        system = np.zeros((size + 1, size + 1))
        system[:size, :size] = self.cos[np.ix_(support, support)]
        system[:size, size] = self.inv[support]
        system[size, :size] = self.inv[support]
        rhs = np.zeros(size + 1)
        rhs[size] = 1.0
        b = np.linalg.lstsq(system, rhs, rcond=None)[0][:size]
        a = b * self.inv[support]
        total = float(a.sum())
        return a / total if total != 0.0 else np.full(size, 1.0 / size)


def _corrective(scaled: _Scaled, support: list[int], lam: Array) -> tuple[list[int], Array]:
    """Minimise over the hull of ``support`` starting from weights ``lam`` (sum 1).

    Wolfe's minor cycle: jump to the minimiser of the affine hull if it lies in the convex
    hull, else walk toward it until a weight reaches 0, drop that vertex and repeat. The
    objective never increases. A weight is dropped only when it is not positive: weights
    of very different magnitudes (a gradient 1e8 times longer than another gets a weight
    1e-16 times smaller) are all legitimate.
    """
    for _ in range(len(support)):
        mu = scaled.affine_minimizer(support)
        if (mu > 0.0).all():
            return support, mu
        blocking = mu <= 0.0
        ratios = lam[blocking] / np.maximum(lam[blocking] - mu[blocking], _TINY)
        theta = float(np.clip(ratios.min(), 0.0, 1.0))
        lam = (1.0 - theta) * lam + theta * mu
        keep = lam > 0.0
        if keep.all():
            keep[int(np.argmin(lam))] = False
        support = [s for s, kept in zip(support, keep, strict=True) if kept]
        lam = lam[keep] / lam[keep].sum()
    return support, lam


def _zero_row(m: Array) -> Array | None:
    """The weights of a zero gradient (the origin is then the min-norm point), if any."""
    diag = np.diag(m)
    if float(diag.min()) > _TINY:
        return None
    alpha = np.zeros(m.shape[0])
    alpha[int(np.argmin(diag))] = 1.0
    return alpha


def _frank_wolfe(m: Array, tol: float, max_iter: int) -> tuple[Array, bool]:
    # Away steps (Lacoste-Julien & Jaggi 2015) make Frank-Wolfe converge linearly on this
    # problem, but the rate depends on the geometry and can be very slow when the points
    # are nearly affinely dependent. Once the iterates sit on the optimal face, the
    # minimiser of the affine hull of the support is the answer, so every few iterations
    # that minimiser is tried and kept when it is feasible (a fully corrective step).
    k = m.shape[0]
    zero = _zero_row(m)
    if zero is not None:
        return zero, True
    scaled = _Scaled(m)
    alpha = np.full(k, 1.0 / k)
    m_alpha = m @ alpha
    for it in range(max_iter):
        if it % _CORRECTIVE_EVERY == _CORRECTIVE_EVERY - 1:
            support, lam = _corrective(
                scaled, np.flatnonzero(alpha > 0.0).tolist(), alpha[alpha > 0.0]
            )
            alpha = np.zeros(k)
            alpha[support] = lam
            m_alpha = m @ alpha
        elif it % 50 == 49:
            m_alpha = m @ alpha  # the incremental update drifts by rounding
        if _fw_converged(scaled, alpha, tol):
            return alpha, True
        value = float(alpha @ m_alpha)
        toward = int(np.argmin(m_alpha))
        away = int(np.argmax(np.where(alpha > 0.0, m_alpha, -np.inf)))
        if value - float(m_alpha[toward]) >= float(m_alpha[away]) - value:
            direction = -alpha
            direction[toward] += 1.0
            m_direction = m[:, toward] - m_alpha
            max_step = 1.0
            drop = False
        else:
            direction = alpha.copy()
            direction[away] -= 1.0
            m_direction = m_alpha - m[:, away]
            max_step = alpha[away] / (1.0 - alpha[away])
            drop = True
        curvature = float(direction @ m_direction)
        slope = float(m_alpha @ direction)
        if curvature > 0.0:
            step = min(max(-slope / curvature, 0.0), max_step)
        else:
            step = max_step if slope < 0.0 else 0.0
        alpha = alpha + step * direction
        if drop and step == max_step:
            alpha[away] = 0.0  # a drop step removes the away vertex exactly
        np.maximum(alpha, 0.0, out=alpha)
        alpha /= alpha.sum()
        m_alpha = m_alpha + step * m_direction
    return alpha, _fw_converged(scaled, alpha, tol)


def _fw_converged(scaled: _Scaled, alpha: Array, tol: float) -> bool:
    # The scale-free KKT test: v_i >= -tol everywhere and v_i <= tol on the support.
    support = np.flatnonzero(alpha > 0.0).tolist()
    v, rounding = scaled.violations(support, scaled.coords(support, alpha[support]))
    tol = max(tol, rounding)
    return bool(v.min() >= -tol and v[support].max() <= tol)


def _wolfe(m: Array, tol: float, max_iter: int) -> tuple[Array, bool]:
    # Wolfe's (1976) min-norm-point algorithm: an active-set method that solves the KKT
    # system exactly on each support ("corral") and ends in finitely many steps. The
    # entering vertex is the most violated one in the scale-free sense (any violated
    # vertex decreases the norm strictly, which is all the finiteness proof needs).
    k = m.shape[0]
    zero = _zero_row(m)
    if zero is not None:
        return zero, True
    scaled = _Scaled(m)
    support = [int(np.argmin(scaled.norms))]
    lam = np.ones(1)
    for _ in range(max_iter):
        v, rounding = scaled.violations(support, scaled.coords(support, lam))
        entering = int(np.argmin(v))
        if float(v[entering]) >= -max(tol, rounding) or entering in support:
            return _full(k, support, lam), True
        previous = sorted(support)
        support, lam = _corrective(scaled, [*support, entering], np.append(lam, 0.0))
        if sorted(support) == previous:
            # the entering vertex was dropped again: no progress beyond rounding
            return _full(k, support, lam), True
    return _full(k, support, lam), False


def _full(k: int, support: list[int], lam: Array) -> Array:
    alpha = np.zeros(k)
    alpha[support] = np.maximum(lam, 0.0)
    return alpha / alpha.sum()


def _normalizers(
    diag: Array, losses: Tensor | None, normalization: str, method: str, key: str
) -> Array:
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
            key,
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
    normalizer_key: str | None = None,
) -> Tensor:
    m = gramian_to_numpy(gram)
    k = m.shape[0]
    diag = np.diag(m).copy()
    warn_degenerate(method, diag)
    if k == 1:
        return to_weights(np.ones(1), gram)
    # a bad loss normaliser is a condition of one balancer's losses: its own warning key
    key = f"{method}:normalizer" if normalizer_key is None else normalizer_key
    scale = _normalizers(diag, losses, normalization, method, key)
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
    solver: str = "exact",
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
    solver: str = "exact",
    *,
    normalization: str = "none",
    losses: Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 10_000,
) -> Tensor:
    r"""MGDA weights: the min-norm point of the convex hull of the per-term gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    Eq. (3) (the paper solves it by Frank-Wolfe, Algorithm 2). With ``M = G G^T`` (``matrix`` = G, rows
    g_i) and normalisers n_i,

    .. math::
        \beta = \arg\min_{\beta \in \Delta^{K-1}} \beta^T \tilde M \beta, \quad
        \tilde M_{ij} = M_{ij} / (n_i n_j), \qquad \alpha_i = \beta_i / n_i,

    so ``alpha @ matrix`` is the min-norm point of conv{g_i / n_i}, the common descent
    direction (zero at a Pareto-stationary point). n_i is 1 (``"none"``), ``||g_i||``
    (``"l2"``), ``L_i`` (``"loss"``) or ``L_i ||g_i||`` (``"loss+"``), the options of the
    authors' code. Both solvers work with the unit gradients and their norms (the cosine
    matrix), so the solution neither depends on the overall scale of the gradients nor
    loses accuracy when their norms differ by many orders of magnitude (1e-8 .. 1e8).
    Optimality is tested by the scale-free KKT residuals of x = sum_i beta_i g~_i
    (g~_i = g_i / n_i),

    .. math::
        v_i = \frac{\langle \tilde g_i - x, x \rangle}{\|\tilde g_i\|\,\|x\|}
        \;\ge 0 \text{ for all } i, \qquad v_i = 0 \text{ where } \beta_i > 0,

    which bound the error of x relative to ``||x||`` (a residual measured against the
    largest squared norm, as in the paper's code, lets a term 100 times shorter than the
    longest move x by 10%).

    Args:
        matrix: K x P per-term gradients, rows are terms.
        solver: ``"exact"`` (default): Wolfe's (1976) active-set min-norm-point
            algorithm, which solves the KKT system on each support and stops at the
            optimum to rounding (the combined gradient within about 1e-13 of the min-norm
            point, relative to its norm, in our tests with norms spanning 1e-8 .. 1e8);
            ``tol`` is not used. It needs at most a few K small solves (about 10 ms for
            K = 40). ``"frank-wolfe"``: the paper's Frank-Wolfe with exact line search,
            with away steps and, every 20 iterations, a fully corrective step (the
            minimiser over the hull of the current support), which ends the slow tail of
            plain Frank-Wolfe; it stops at the tolerance below.
        normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"``.
        losses: the K losses, needed by ``"loss"`` and ``"loss+"``.
        tol: Frank-Wolfe's optimality tolerance > 0 (default 1e-6) on the residuals
            above: it stops when ``v_i >= -tol`` for all i and ``|v_i| <= tol`` on the
            support (or at rounding level, where that is larger), which also satisfies
            the absolute test ``|<g~_i - x, x>| <= tol max_j ||g~_j||^2``.
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

    Differences from the paper and the authors' code: the paper solves Eq. (3) by
    Frank-Wolfe and the code ran a fixed 250 plain Frank-Wolfe iterations; the default
    here is Wolfe's exact algorithm, the same minimiser to rounding (with
    ``solver="frank-wolfe"`` we iterate to the tolerance above; away and fully corrective
    steps change the path, not the solution). With a normaliser their code applied the solution
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
        solver: ``"exact"`` (default, Wolfe's min-norm-point algorithm) or
            ``"frank-wolfe"`` (the paper's algorithm); see :func:`mgda_weights`.
        normalization: ``"none"`` (default), ``"l2"``, ``"loss"`` or ``"loss+"`` (the
            gradient normalisers of the authors' code; folded into the weights).
        tol: Frank-Wolfe's optimality tolerance > 0 (default 1e-6) on the scale-free
            KKT residuals of :func:`mgda_weights`; not used by ``"exact"``.
        max_iter: solver iteration cap >= 1 (default 10000).

    Example:
        >>> import torch
        >>> from lossbalance import MGDA
        >>> G = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> MGDA(2).weights(G @ G.T, torch.ones(2))
        tensor([0.9000, 0.1000], dtype=torch.float64)

    Differences from the paper / the authors' code: the paper solves Eq. (3) by
    Frank-Wolfe and the code ran a fixed 250 iterations; we solve it exactly by default
    (Wolfe's algorithm; see :func:`mgda_weights`). The code also scaled the task-specific
    heads' gradients by alpha; we follow the paper for the heads: each head receives its own term's gradient
    (the engine does this; only the shared parameters get ``sum_i alpha_i g_i``).
    """

    def __init__(
        self,
        num_terms: int,
        solver: str = "exact",
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
            normalizer_key=self._warning_key("mgda:normalizer"),
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
            normalizer_key=self._warning_key("mgda-closed-form:normalizer"),
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
