"""Gramian weightings of issue 17: UPGrad, DualProj, CAGrad, Nash-MTL, Aligned-MTL, ConFIG,
FairGrad.

Property tests on random gradient matrices of chosen rank and scale: each paper's claims
(no conflict, equal cosines, the fixed point G w = w^{-1/a}, CAGrad's strong duality and
worst-case optimality, the aligned system's singular values), scale and permutation
behaviour, brute-force references in float64, degenerate inputs, and every method through
``lossbalance.backward`` in the three Gramian modes.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lossbalance
from lossbalance import (
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    FairGrad,
    LossBalanceWarning,
    NashMTL,
    UPGrad,
)
from lossbalance.functional import (
    aligned_mtl_weights,
    aligned_mtl_weights_from_gramian,
    cagrad_weights,
    cagrad_weights_from_gramian,
    config_weights,
    config_weights_from_gramian,
    dualproj_weights,
    dualproj_weights_from_gramian,
    fairgrad_weights,
    fairgrad_weights_from_gramian,
    nash_mtl_weights,
    nash_mtl_weights_from_gramian,
    upgrad_weights,
    upgrad_weights_from_gramian,
)
from lossbalance.methods._upgrad import dual_cone_projection, gramian_factor

F64 = torch.float64
DEVICE = torch.device(os.environ.get("LOSSBALANCE_TEST_DEVICE", "cpu"))
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def random_matrix(
    seed: int,
    k: int,
    p: int,
    rank: int | None = None,
    log10_scale: tuple[float, float] = (0.0, 0.0),
) -> torch.Tensor:
    """K x P float64 matrix of the given rank, each row scaled by 10^U(log10_scale)."""
    rng = np.random.default_rng(seed)
    r = min(k, p) if rank is None else rank
    m = rng.standard_normal((k, r)) @ rng.standard_normal((r, p))
    m *= 10.0 ** rng.uniform(*log10_scale, size=(k, 1))
    return torch.from_numpy(m).to(DEVICE)


@st.composite
def matrices(
    draw: st.DrawFn, min_k: int = 1, max_k: int = 6, full_rank: bool = False
) -> torch.Tensor:
    """Random gradient matrices: shape, rank, overall scale 1e-8..1e8 and row spread drawn."""
    k = draw(st.integers(min_k, max_k))
    p = draw(st.integers(k + 1, k + 6)) if full_rank else draw(st.integers(1, 8))
    rank = min(k, p) if full_rank else draw(st.integers(1, min(k, p)))
    spread = draw(st.sampled_from([0.0, 0.5, 1.0]))
    center = draw(st.sampled_from([-8.0, -2.0, 0.0, 3.0, 8.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return random_matrix(seed, k, p, rank, (center - spread, center + spread))


def gram(matrix: torch.Tensor) -> torch.Tensor:
    return lossbalance._base.gramian(matrix)


def ones(k: int) -> torch.Tensor:
    return torch.ones(k, dtype=F64, device=DEVICE)


def quiet(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossBalanceWarning)
        return fn()


MATRIX_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "upgrad": upgrad_weights,
    "dualproj": dualproj_weights,
    "cagrad": cagrad_weights,
    "nash_mtl": nash_mtl_weights,
    "aligned_mtl": aligned_mtl_weights,
    "config": config_weights,
    "fairgrad": fairgrad_weights,
}
GRAMIAN_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "upgrad": upgrad_weights_from_gramian,
    "dualproj": dualproj_weights_from_gramian,
    "cagrad": cagrad_weights_from_gramian,
    "nash_mtl": nash_mtl_weights_from_gramian,
    "aligned_mtl": aligned_mtl_weights_from_gramian,
    "config": config_weights_from_gramian,
    "fairgrad": fairgrad_weights_from_gramian,
}
CLASSES = [UPGrad, DualProj, CAGrad, NashMTL, AlignedMTL, ConFIG, FairGrad]


# ----------------------------------------------------------------------------------------
# Registry, constructors, shapes
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "stateful"),
    [
        ("upgrad", UPGrad, False),
        ("dualproj", DualProj, False),
        ("cagrad", CAGrad, False),
        ("nash-mtl", NashMTL, True),
        ("aligned-mtl", AlignedMTL, False),
        ("config", ConFIG, False),
        ("fairgrad", FairGrad, False),
    ],
)
def test_registry_entries(name: str, cls: type, stateful: bool) -> None:
    info = lossbalance.get_method(name)
    assert info.needs == "gramian"
    assert info.stateful == stateful
    assert info.paper and info.summary
    balancer = lossbalance.create(name, 3)
    assert type(balancer) is cls
    assert balancer.num_terms == 3 and balancer.kind == "gradient"
    assert list(balancer.parameters()) == []
    assert (len(balancer.state_dict()) > 0) == stateful


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: CAGrad(2, c=-0.1), r"Invalid c: -0.1 \(expected c >= 0\)"),
        (lambda: CAGrad(2, c=math.inf), r"Invalid c: inf \(expected a finite c >= 0\)"),
        (lambda: CAGrad(2, rescale="2"), r"Invalid rescale: '2' \(expected one of"),
        (lambda: NashMTL(2, update_weights_every=0), r"Invalid update_weights_every: 0"),
        (lambda: NashMTL(2, update_weights_every=1.5), r"Invalid update_weights_every: 1.5"),
        (lambda: NashMTL(2, max_norm=-1.0), r"Invalid max_norm: -1.0 \(expected max_norm >= 0\)"),
        (lambda: AlignedMTL(2, scale_mode="max"), r"Invalid scale_mode: 'max' \(expected one of"),
        (lambda: FairGrad(2, alpha=0.0), r"Invalid alpha: 0.0 \(expected alpha > 0\)"),
        (lambda: FairGrad(2, alpha=math.inf), r"Invalid alpha: inf \(expected a finite"),
        (lambda: FairGrad(2, max_norm=-2.0), r"Invalid max_norm: -2.0"),
        (lambda: UPGrad(0), r"Invalid num_terms: 0"),
        (lambda: cagrad_weights(torch.eye(2), c=-1.0), r"Invalid c: -1.0"),
        (lambda: fairgrad_weights(torch.eye(2), alpha=-1.0), r"Invalid alpha: -1.0"),
    ],
)
def test_invalid_hyperparameters(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("cls", CLASSES)
def test_balancer_checks_gramian_shape(cls: type) -> None:
    balancer = cls(3)
    with pytest.raises(
        ValueError, match=r"built for 3 loss terms, got a gramian of shape \(2, 2\)"
    ):
        balancer.weights(torch.eye(2, dtype=F64), ones(3))
    with pytest.raises(ValueError, match=r"expected a K x K gramian.*shape \(3, 2\)"):
        balancer.weights(torch.ones(3, 2, dtype=F64), ones(3))
    with pytest.raises(ValueError, match=r"built for 3 loss terms, got losses of shape \(2,\)"):
        balancer.weights(torch.eye(3, dtype=F64), ones(2))


@pytest.mark.parametrize("name", sorted(MATRIX_FUNCTIONS))
def test_functions_check_shapes(name: str) -> None:
    with pytest.raises(ValueError, match=r"expected a K x P gradient matrix.*shape \(3,\)"):
        MATRIX_FUNCTIONS[name](torch.ones(3))
    with pytest.raises(ValueError, match=r"expected a K x K gramian.*shape \(2, 3\)"):
        GRAMIAN_FUNCTIONS[name](torch.ones(2, 3, dtype=F64))


@pytest.mark.parametrize("name", sorted(MATRIX_FUNCTIONS))
def test_matrix_and_gramian_forms_agree_and_classes_match(name: str) -> None:
    matrix = random_matrix(0, 4, 7, log10_scale=(-1, 1))
    a, b = MATRIX_FUNCTIONS[name](matrix), GRAMIAN_FUNCTIONS[name](gram(matrix))
    assert a.dtype == F64 and a.shape == (4,) and a.device == matrix.device
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)
    cls = {c.__name__.lower(): c for c in CLASSES}[name.replace("_", "")]
    balancer = cls(4)
    torch.testing.assert_close(balancer.weights(gram(matrix), ones(4)), a, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(balancer.last_weights, a)


@pytest.mark.parametrize("name", sorted(MATRIX_FUNCTIONS))
def test_non_finite_gramian_raises_and_indefinite_warns(name: str) -> None:
    m = gram(random_matrix(22, 3, 5))
    bad = m.clone()
    bad[1, 2] = bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        GRAMIAN_FUNCTIONS[name](bad)
    m[0, 0] = -float(m[0, 0])
    with pytest.warns(LossBalanceWarning, match="not positive semidefinite"):
        alpha = GRAMIAN_FUNCTIONS[name](m)
    assert torch.isfinite(alpha).all()


# ----------------------------------------------------------------------------------------
# Degenerate inputs
# ----------------------------------------------------------------------------------------


def _degenerate(case: str) -> torch.Tensor:
    m = random_matrix(7, 4, 6)
    if case == "zero-row":
        m[2] = 0.0
    elif case == "all-zero":
        m = torch.zeros(3, 5, dtype=F64, device=DEVICE)
    elif case == "duplicate":
        m[3] = m[1]
    elif case == "single":
        m = m[:1]
    elif case == "rank-deficient":
        m = random_matrix(8, 4, 2)
    elif case == "parallel":
        m[3] = 1e6 * m[0]
    return m


# Cases that are not degenerate for the method (its result is well defined): no warning.
_NOT_DEGENERATE = {
    *((fn, case) for fn in ("upgrad", "dualproj") for case in ("duplicate", "rank-deficient")),
    *((fn, case) for fn in ("upgrad", "dualproj", "cagrad", "config") for case in ("parallel",)),
    ("cagrad", "duplicate"),
    ("config", "duplicate"),
    ("nash_mtl", "duplicate"),
    ("fairgrad", "duplicate"),
}
# Cases where the method's own numerics degenerate: a warning is required.
_MUST_WARN = {"zero-row", "all-zero", "single"}


@pytest.mark.parametrize(
    "case", ["zero-row", "all-zero", "duplicate", "single", "rank-deficient", "parallel"]
)
@pytest.mark.parametrize("name", sorted(MATRIX_FUNCTIONS))
def test_degenerate_inputs_are_finite_and_warn(name: str, case: str) -> None:
    matrix = _degenerate(case)
    fn = MATRIX_FUNCTIONS[name]
    if (name, case) in _NOT_DEGENERATE:
        with warnings.catch_warnings():
            warnings.simplefilter("error", LossBalanceWarning)
            alpha = fn(matrix)
    elif case in _MUST_WARN or name == "aligned_mtl":
        with pytest.warns(LossBalanceWarning):
            alpha = fn(matrix)
    else:
        alpha = quiet(lambda: fn(matrix))
    assert alpha.shape == (matrix.shape[0],)
    assert torch.isfinite(alpha).all(), alpha


def test_single_term_weights() -> None:
    g = torch.tensor([[3.0, 4.0]], dtype=F64, device=DEVICE)  # ||g|| = 5
    expected = {
        "upgrad": 1.0,
        "dualproj": 1.0,
        "cagrad": 1.4,  # d = (1 + c) g
        "nash_mtl": 1 / 5,  # alpha ||g||^2 = 1 / alpha
        "aligned_mtl": 1.0,
        "config": 1.0,
        "fairgrad": 5.0 ** (-4 / 3),  # ||g||^2 w = w^{-1/2}
    }
    for name, value in expected.items():
        alpha = quiet(lambda name=name: MATRIX_FUNCTIONS[name](g))
        torch.testing.assert_close(alpha, torch.tensor([value], dtype=F64, device=DEVICE))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("case", ["zero-row", "all-zero", "single"])
def test_balancers_on_degenerate_gramians(cls: type, case: str) -> None:
    matrix = _degenerate(case)
    balancer = cls(matrix.shape[0])
    with pytest.warns(LossBalanceWarning):
        alpha = balancer.weights(gram(matrix), ones(matrix.shape[0]))
    assert torch.isfinite(alpha).all()
    torch.testing.assert_close(balancer.last_weights, alpha)


# ----------------------------------------------------------------------------------------
# Shared invariances
# ----------------------------------------------------------------------------------------

# Methods whose weights do not change when every gradient is multiplied by the same factor.
SCALE_FREE = ["upgrad", "dualproj", "cagrad", "aligned_mtl"]


@pytest.mark.parametrize("name", SCALE_FREE)
@pytest.mark.parametrize("factor", [1e-15, 1e-6, 1e6, 1e15])
def test_scale_invariance(name: str, factor: float) -> None:
    matrix = random_matrix(3, 4, 6, log10_scale=(-1, 1))
    a = MATRIX_FUNCTIONS[name](matrix)
    b = MATRIX_FUNCTIONS[name](matrix * factor)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("factor", [1e-15, 1e-6, 1e6, 1e15])
def test_config_length_scales_and_direction_is_row_scale_free(factor: float) -> None:
    matrix = random_matrix(4, 4, 6)
    d = config_weights(matrix) @ matrix
    torch.testing.assert_close(config_weights(matrix * factor) @ (matrix * factor), d * factor)
    rows = torch.tensor([1e-3, 1.0, 7.0, 1e4], dtype=F64, device=DEVICE)[:, None]
    scaled = matrix * rows
    d_scaled = config_weights(scaled) @ scaled
    cos = float(d @ d_scaled / (d.norm() * d_scaled.norm()))
    assert cos == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", sorted(MATRIX_FUNCTIONS))
def test_permutation_equivariance(name: str) -> None:
    matrix = random_matrix(4, 5, 8, log10_scale=(-1, 1))
    perm = torch.tensor([3, 0, 4, 1, 2], device=DEVICE)
    a = MATRIX_FUNCTIONS[name](matrix)
    b = MATRIX_FUNCTIONS[name](matrix[perm])
    torch.testing.assert_close(b, a[perm], rtol=1e-9, atol=1e-12 * float(a.abs().max()))


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "cagrad", "config"])
def test_identical_terms_give_the_mean_direction(name: str) -> None:
    g = random_matrix(5, 1, 6)
    matrix = g.repeat(3, 1)
    d = MATRIX_FUNCTIONS[name](matrix) @ matrix
    cos = float(d @ g[0] / (d.norm() * g[0].norm()))
    assert cos == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------------------
# UPGrad and DualProj
# ----------------------------------------------------------------------------------------


def brute_force_projection(m: np.ndarray, u: np.ndarray) -> np.ndarray:
    """argmin v^T m v subject to v >= u, over every set of free coordinates (K <= 6)."""
    k = u.shape[0]
    r = gramian_factor(m)
    best, best_value = u, float(u @ m @ u)
    for size in range(1, k + 1):
        for free in itertools.combinations(range(k), size):
            idx = list(free)
            x = np.zeros(k)
            x[idx] = np.linalg.lstsq(r[:, idx], -(r @ u), rcond=None)[0]
            if (x < -1e-12).any():
                continue
            v = u + np.maximum(x, 0.0)
            value = float(v @ m @ v)
            if value < best_value:
                best, best_value = v, value
    return best


@SETTINGS
@given(matrices(max_k=5))
def test_upgrad_and_dualproj_match_brute_force(matrix: torch.Tensor) -> None:
    k = matrix.shape[0]
    m = gram(matrix).cpu().numpy()
    scale = float(np.diag(m).max())
    if scale == 0.0:
        return
    m = m / scale
    jm = matrix.cpu().numpy() / math.sqrt(scale)
    expected_up = sum(brute_force_projection(m, np.eye(k)[i] / k) for i in range(k))
    expected_dp = brute_force_projection(m, np.full(k, 1.0 / k))
    for fn, expected in ((upgrad_weights, expected_up), (dualproj_weights, expected_dp)):
        alpha = quiet(lambda fn=fn: fn(matrix)).cpu().numpy()
        d, d_ref = alpha @ jm, expected @ jm
        # rows have norm <= 1 here: an exact zero comes back at rounding level
        assert np.linalg.norm(d - d_ref) <= 1e-9 * max(np.linalg.norm(d_ref), 1e-6), fn


@SETTINGS
@given(matrices())
def test_dual_cone_projection_kkt(matrix: torch.Tensor) -> None:
    k = matrix.shape[0]
    m = gram(matrix).cpu().numpy()
    scale = float(np.diag(m).max())
    if scale == 0.0:
        return
    m = m / scale
    rng = np.random.default_rng(k)
    u = rng.uniform(-1.0, 1.0, k)
    v, converged = dual_cone_projection(gramian_factor(m), u)
    assert converged
    tol = 1e-11 * (1.0 + np.abs(v).sum())
    gains = m @ v
    assert (v >= u - 1e-15).all()  # primal feasibility
    assert (gains >= -tol).all()  # dual feasibility: J^T v is in the dual cone
    assert np.abs((v - u) * gains).max() <= tol  # complementarity


@SETTINGS
@given(matrices())
def test_upgrad_and_dualproj_do_not_conflict(matrix: torch.Tensor) -> None:
    for fn in (upgrad_weights, dualproj_weights):
        alpha = quiet(lambda fn=fn: fn(matrix))
        assert (alpha >= 1.0 / matrix.shape[0] - 1e-15).all()
        d = alpha @ matrix
        gains = matrix @ d
        norms = matrix.norm(dim=1)
        # rounding of d is relative to the sum of the magnitudes it is computed from
        tol = 1e-12 * norms * float(alpha.abs() @ norms)
        assert (gains >= -tol).all(), (fn, gains)


def test_upgrad_without_conflict_is_the_mean() -> None:
    matrix = random_matrix(9, 4, 6).abs()  # non-negative entries: no pair conflicts
    torch.testing.assert_close(upgrad_weights(matrix), torch.full((4,), 0.25, dtype=F64))
    torch.testing.assert_close(dualproj_weights(matrix), torch.full((4,), 0.25, dtype=F64))


def test_upgrad_projects_each_conflicting_gradient() -> None:
    # g1 = (1, 0) conflicts with g2 = (-1, 1): pi(g1) = (1/2, 1/2), pi(g2) = (0, 1).
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    d = upgrad_weights(matrix) @ matrix
    torch.testing.assert_close(d, torch.tensor([0.25, 0.75], dtype=F64))


# ----------------------------------------------------------------------------------------
# CAGrad
# ----------------------------------------------------------------------------------------


def _cagrad_parts(matrix: torch.Tensor, c: float) -> tuple[np.ndarray, ...]:
    jm = matrix.cpu().numpy()
    alpha = quiet(lambda: cagrad_weights(matrix, c)).cpu().numpy()
    g0 = jm.mean(0)
    return jm, alpha, g0, alpha @ jm


@SETTINGS
@given(matrices(min_k=2, full_rank=True), st.sampled_from([0.1, 0.4, 1.0, 5.0]))
def test_cagrad_strong_duality_and_radius(matrix: torch.Tensor, c: float) -> None:
    jm, alpha, g0, d = _cagrad_parts(matrix, c)
    k = jm.shape[0]
    rho = c * np.linalg.norm(g0)
    w = alpha - 1.0 / k
    assert (w >= -1e-12 * np.abs(alpha).max()).all()
    w = np.maximum(w, 0.0) / np.maximum(w, 0.0).sum()
    g_w = w @ jm
    dual = float(g_w @ g0 + rho * np.linalg.norm(g_w))
    primal = float((jm @ d).min())
    scale = float(np.linalg.norm(jm, axis=1).max() * np.linalg.norm(d))
    assert primal == pytest.approx(dual, abs=1e-9 * scale)
    assert np.linalg.norm(d - g0) == pytest.approx(rho, rel=1e-9)
    # The worst case is attained on the support of w.
    on_support = jm[w > 1e-9] @ d
    assert np.abs(on_support - primal).max() <= 1e-8 * scale


@pytest.mark.parametrize("seed", range(6))
def test_cagrad_is_optimal_against_random_candidates(seed: int) -> None:
    matrix = random_matrix(seed, 3 + seed % 3, 5, log10_scale=(-1, 1))
    jm, _, g0, d = _cagrad_parts(matrix, 0.4)
    k = jm.shape[0]
    rho = 0.4 * np.linalg.norm(g0)
    rng = np.random.default_rng(seed)
    best = float((jm @ d).min())
    # Primal: no point of the ball around g0 gains more on the worst term.
    dirs = rng.standard_normal((4000, jm.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    radii = rho * rng.uniform(0.0, 1.0, (4000, 1)) ** (1 / jm.shape[1])
    candidates = g0 + radii * dirs
    assert (candidates @ jm.T).min(axis=1).max() <= best + 1e-12 * abs(best)
    # Dual: no point of the simplex has a lower dual value (weak duality is tight).
    ws = rng.dirichlet(np.ones(k) * 0.5, 4000)
    g_ws = ws @ jm
    values = g_ws @ g0 + rho * np.linalg.norm(g_ws, axis=1)
    assert values.min() >= best - 1e-12 * abs(best)


def test_cagrad_reductions_and_rescale() -> None:
    matrix = random_matrix(11, 3, 5)
    torch.testing.assert_close(cagrad_weights(matrix, 0.0), torch.full((3,), 1 / 3, dtype=F64))
    base = cagrad_weights(matrix, 0.5)
    torch.testing.assert_close(cagrad_weights(matrix, 0.5, rescale="1+c^2"), base / 1.25)
    torch.testing.assert_close(cagrad_weights(matrix, 0.5, rescale="1+c"), base / 1.5)
    # Orthogonal gradients of equal norm: d = (1 + c) g0 by symmetry.
    torch.testing.assert_close(
        cagrad_weights(torch.eye(3, dtype=F64), 0.5), torch.full((3,), 0.5, dtype=F64)
    )


def test_cagrad_large_c_follows_the_min_norm_direction() -> None:
    matrix = random_matrix(12, 3, 5)
    d = cagrad_weights(matrix, 1e4) @ matrix
    d_mgda = lossbalance.functional.mgda_weights(matrix, "exact") @ matrix
    cos = float(d @ d_mgda / (d.norm() * d_mgda.norm()))
    assert cos > 1 - 1e-6


# ----------------------------------------------------------------------------------------
# Nash-MTL and FairGrad
# ----------------------------------------------------------------------------------------


@SETTINGS
@given(matrices(full_rank=True))
def test_nash_mtl_fixed_point(matrix: torch.Tensor) -> None:
    alpha = quiet(lambda: nash_mtl_weights(matrix))
    m = gram(matrix)
    k = matrix.shape[0]
    assert (alpha > 0).all()
    # KKT of the bargaining problem: G alpha = 1 / alpha.
    torch.testing.assert_close(alpha * (m @ alpha), ones(k), rtol=1e-9, atol=1e-9)
    d = alpha @ matrix
    torch.testing.assert_close(d @ d, torch.tensor(float(k), dtype=F64, device=DEVICE))


@SETTINGS
@given(matrices(full_rank=True), st.sampled_from([0.5, 1.0, 2.0, 5.0]))
def test_fairgrad_fixed_point(matrix: torch.Tensor, a: float) -> None:
    w = quiet(lambda: fairgrad_weights(matrix, a))
    m = gram(matrix)
    assert (w > 0).all()
    torch.testing.assert_close((m @ w) * w ** (1 / a), ones(matrix.shape[0]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("factor", [1e-12, 1e-4, 1e4, 1e12])
@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_fairgrad_scaling_law(factor: float, a: float) -> None:
    matrix = random_matrix(13, 3, 5, log10_scale=(-1, 1))
    w = fairgrad_weights(matrix, a)
    s = factor**2  # G scales by s
    torch.testing.assert_close(fairgrad_weights(matrix * factor, a), w * s ** (-a / (a + 1)))


def test_fairgrad_alpha_one_is_nash_mtl() -> None:
    matrix = random_matrix(14, 4, 6, log10_scale=(-2, 2))
    torch.testing.assert_close(fairgrad_weights(matrix, 1.0), nash_mtl_weights(matrix))


@pytest.mark.parametrize("seed", [15, 16, 17])
def test_fairgrad_large_alpha_tends_to_max_min_fairness(seed: int) -> None:
    # alpha -> infinity is max-min fairness, whose direction is MGDA's min-norm point.
    matrix = random_matrix(seed, 3, 5)
    d_mgda = lossbalance.functional.mgda_weights(matrix, "exact") @ matrix
    cosines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossBalanceWarning)
        for a in (3.0, 10.0, 100.0):
            d = fairgrad_weights(matrix, a) @ matrix
            cosines.append(float(d @ d_mgda / (d.norm() * d_mgda.norm())))
    assert cosines == sorted(cosines) and cosines[-1] > 1 - 1e-4, cosines


def test_fairgrad_unrepresentable_weights_warn() -> None:
    # With a = 1000 a term whose gain is twice the others' needs w_i = 2^-1000 < 1e-300.
    matrix = random_matrix(16, 3, 5)
    with pytest.warns(LossBalanceWarning, match="approximate"):
        w = fairgrad_weights(matrix, 1000.0)
    assert torch.isfinite(w).all() and (w >= 0).all()


@pytest.mark.parametrize("fn", [nash_mtl_weights, fairgrad_weights])
def test_max_norm_clips_the_update(fn: Callable[..., torch.Tensor]) -> None:
    matrix = random_matrix(16, 3, 5)
    free = fn(matrix)
    norm = float((free @ matrix).norm())
    clipped = fn(matrix, max_norm=0.5 * norm)
    torch.testing.assert_close(clipped, free * 0.5)
    torch.testing.assert_close(fn(matrix, max_norm=2 * norm), free)


def test_nash_mtl_and_fairgrad_without_fixed_point_warn_and_stay_finite() -> None:
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=F64)
    for fn in (nash_mtl_weights, fairgrad_weights):
        with pytest.warns(LossBalanceWarning, match="rounding|no positive solution"):
            alpha = fn(opposite)
        assert torch.isfinite(alpha).all()


def test_nash_mtl_update_every_and_state_dict_round_trip() -> None:
    grams = [gram(random_matrix(20 + i, 3, 5)) for i in range(6)]
    balancer = NashMTL(3, update_weights_every=3)
    out = [balancer.weights(g, ones(3)) for g in grams[:2]]
    torch.testing.assert_close(out[0], nash_mtl_weights_from_gramian(grams[0]))
    torch.testing.assert_close(out[1], out[0])  # reused between updates
    state = copy.deepcopy(balancer.state_dict())
    assert set(state) == {"alpha", "step"} and int(state["step"]) == 2
    resumed = NashMTL(3, update_weights_every=3)
    resumed.load_state_dict(state)
    a = [balancer.weights(g, ones(3)) for g in grams[2:]]
    b = [resumed.weights(g, ones(3)) for g in grams[2:]]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    torch.testing.assert_close(a[0], out[0])  # step 2: still the step-0 weights
    torch.testing.assert_close(a[1], nash_mtl_weights_from_gramian(grams[3]))  # step 3
    assert int(balancer.step) == int(resumed.step) == 6


def test_nash_mtl_class_clips_with_the_current_gramian() -> None:
    g0, g1 = gram(random_matrix(30, 2, 4)), gram(10.0 * random_matrix(31, 2, 4))
    balancer = NashMTL(2, update_weights_every=2, max_norm=1.0)
    first = balancer.weights(g0, ones(2))
    second = balancer.weights(g1, ones(2))
    assert float(first @ g0 @ first) <= 1.0 + 1e-12
    assert float(second @ g1 @ second) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------
# Aligned-MTL and ConFIG
# ----------------------------------------------------------------------------------------


@SETTINGS
@given(matrices(full_rank=True), st.sampled_from(["min", "median", "rmse"]))
def test_aligned_mtl_matches_svd_reference(matrix: torch.Tensor, scale_mode: str) -> None:
    # J = U S V^T; the aligned system is sqrt(lambda_s) U V^T, its rows orthogonal and of
    # equal norm, and d is their sum.
    u, s, vt = np.linalg.svd(matrix.cpu().numpy(), full_matrices=False)
    lam = s**2
    scale = {"min": lam.min(), "median": np.median(lam), "rmse": lam.mean()}[scale_mode]
    aligned = math.sqrt(scale) * u @ vt
    np.testing.assert_allclose(aligned @ aligned.T, scale * np.eye(len(s)), atol=1e-9 * scale)
    d_ref = aligned.sum(0)
    d = (aligned_mtl_weights(matrix, scale_mode) @ matrix).cpu().numpy()
    np.testing.assert_allclose(d, d_ref, rtol=0, atol=1e-9 * np.abs(d_ref).max())


def test_aligned_mtl_rank_deficient_acts_on_the_span() -> None:
    matrix = random_matrix(32, 4, 6, rank=2)
    with pytest.warns(LossBalanceWarning, match="span 2 < 4"):
        alpha = aligned_mtl_weights(matrix)
    u, s, vt = np.linalg.svd(matrix.numpy(), full_matrices=False)
    aligned = s[1] * u[:, :2] @ vt[:2]
    np.testing.assert_allclose((alpha @ matrix).numpy(), aligned.sum(0), atol=1e-9)


@SETTINGS
@given(matrices(full_rank=True))
def test_config_equal_cosines_and_length(matrix: torch.Tensor) -> None:
    alpha = quiet(lambda: config_weights(matrix))
    d = alpha @ matrix
    cosines = matrix @ d / (matrix.norm(dim=1) * d.norm())
    assert (cosines > 0).all()
    torch.testing.assert_close(cosines, cosines.mean().expand_as(cosines), rtol=1e-9, atol=0.0)
    unit = d / d.norm()
    torch.testing.assert_close(d.norm(), (matrix @ unit).sum(), rtol=1e-9, atol=0.0)


@SETTINGS
@given(matrices())
def test_config_matches_pinv_reference(matrix: torch.Tensor) -> None:
    norms = matrix.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        return
    units = matrix / norms
    # Same rank cutoff as the implementation: eigenvalues of U U^T below 100 K eps max.
    cutoff = math.sqrt(100.0 * matrix.shape[0] * torch.finfo(F64).eps)
    direction = torch.linalg.pinv(units, rtol=cutoff) @ ones(matrix.shape[0])
    if direction.norm() <= 1e-6:
        return
    unit = direction / direction.norm()
    d_ref = (matrix @ unit).sum() * unit
    d = quiet(lambda: config_weights(matrix)) @ matrix
    torch.testing.assert_close(d, d_ref, rtol=1e-7, atol=1e-9 * float(d_ref.norm()))


def test_config_opposite_gradients_give_zero_with_a_warning() -> None:
    with pytest.warns(LossBalanceWarning, match="sum to zero"):
        alpha = config_weights(torch.tensor([[1.0, 2.0], [-2.0, -4.0]], dtype=F64))
    assert torch.equal(alpha, torch.zeros(2, dtype=F64))


# ----------------------------------------------------------------------------------------
# Through the engine
# ----------------------------------------------------------------------------------------


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list]:
        z = self.trunk(x)
        outs = [head(z).squeeze(1) for head in self.heads]
        losses = [
            (outs[0] - y).pow(2).mean(),
            (outs[1] + y).abs().mean(),
            torch.nn.functional.softplus(outs[2] * y).mean(),
        ]
        return z, losses


@pytest.mark.parametrize(
    "name", ["upgrad", "dualproj", "cagrad", "nash-mtl", "aligned-mtl", "config", "fairgrad"]
)
def test_methods_through_backward(name: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 4, dtype=F64), torch.randn(16, dtype=F64)
    results = {}
    for mode in ("exact", "gramian", "feature"):
        torch.manual_seed(1)
        model = _Model().to(F64)
        balancer = lossbalance.create(name, 3)
        z, losses = model(x, y)
        trunk = list(model.trunk.parameters())
        if mode == "feature":
            per_term = [torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses]
        else:
            per_term = [
                torch.cat(
                    [g.flatten() for g in torch.autograd.grad(loss, trunk, retain_graph=True)]
                )
                for loss in losses
            ]
        jac = torch.stack([g.flatten() for g in per_term])
        expected_alpha = GRAMIAN_FUNCTIONS[name.replace("-", "_")](gram(jac))
        heads = [
            torch.autograd.grad(loss, list(h.parameters()), retain_graph=True)
            for loss, h in zip(losses, model.heads, strict=True)
        ]
        alpha = lossbalance.backward(
            losses, balancer, model.trunk, features=z if mode == "feature" else None, mode=mode
        )
        torch.testing.assert_close(alpha, expected_alpha, rtol=1e-9, atol=1e-12)
        if mode == "feature":
            combined = sum(a * g for a, g in zip(alpha, per_term, strict=True))
            ref = torch.autograd.grad(model.trunk(x), trunk, combined)
        else:
            shapes = [p.numel() for p in trunk]
            ref = (alpha @ jac).split(shapes)
        for p, g in zip(trunk, ref, strict=True):
            torch.testing.assert_close(p.grad.flatten(), g.flatten(), rtol=1e-9, atol=1e-12)
        for head, grads in zip(model.heads, heads, strict=True):
            for p, g in zip(head.parameters(), grads, strict=True):
                torch.testing.assert_close(p.grad, g)  # each head gets its own gradient
        results[mode] = alpha
    torch.testing.assert_close(results["exact"], results["gramian"], rtol=1e-9, atol=1e-12)


def test_fair_fixed_point_converges_on_ill_conditioned_gramians() -> None:
    # Regression: Armijo on F alone stalled where F no longer resolves progress (residual
    # 1e-11 .. 1e-9 on cond(G) ~ 1e2 .. 1e9) and the solver warned "approximate".
    from lossbalance.methods._fairgrad import fair_fixed_point

    rng = np.random.default_rng(0)
    for trial in range(60):
        k, p = int(rng.integers(2, 7)), int(rng.integers(7, 12))
        jm = rng.standard_normal((k, p)) * 10 ** rng.uniform(-2, 2, (k, 1))
        if trial % 3 == 0:
            jm[-1] = 0.5 * (jm[0] + jm[1]) + 1e-6 * rng.standard_normal(p)
        m = jm @ jm.T
        m /= np.diag(m).max()
        for a in (0.5, 1.0, 2.0):
            w, converged = fair_fixed_point(m, a)
            assert converged, (trial, a)
            scale = np.abs(m) @ w + w ** (-1 / a)
            assert (np.abs(m @ w - w ** (-1 / a)) <= 1e-13 * scale).all()
