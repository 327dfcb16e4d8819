"""Gradient-level balancers (GradNorm, gradient normalisation, MGDA, PCGrad, IMTL) and IMTL-L.

Property tests on random gradient matrices of chosen rank and row scales (1e-8 .. 1e8):
KKT and simplex conditions, equal projections, scale invariance, weights that reproduce
the combined gradient, and plain for-loop references in float64. The K x K math is float64
whatever the input dtype, so most inputs are built in float64 on the test device.
"""

from __future__ import annotations

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
    IMTL,
    IMTLG,
    IMTLL,
    MGDA,
    GradNorm,
    GradNormalization,
    LossBalanceWarning,
    MGDAClosedForm,
    PCGrad,
)
from lossbalance.functional import (
    grad_normalization_weights,
    grad_normalization_weights_from_gramian,
    gradnorm_weights,
    gradnorm_weights_from_gramian,
    imtl_g_weights,
    imtl_g_weights_from_gramian,
    imtl_l_loss,
    mgda_closed_form_weights,
    mgda_closed_form_weights_from_gramian,
    mgda_weights,
    mgda_weights_from_gramian,
    pcgrad,
    pcgrad_weights,
    pcgrad_weights_from_gramian,
)
from lossbalance.methods._pcgrad import _orders, _pcgrad_coefficients

F64 = torch.float64
# Same switch as conftest.py: the K x K math is float64 whatever the device.
DEVICE = torch.device(os.environ.get("LOSSBALANCE_TEST_DEVICE", "cpu"))
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


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
    """Random gradient matrices: rank, shape, overall scale 1e-8..1e8 and row scales drawn."""
    k = draw(st.integers(min_k, max_k))
    p = draw(st.integers(k + 2, k + 8)) if full_rank else draw(st.integers(1, 10))
    rank = min(k, p) if full_rank else draw(st.integers(1, min(k, p)))
    spread = draw(st.sampled_from([0.0, 1.0, 3.0]))
    center = draw(st.sampled_from([-8.0, -2.0, 0.0, 3.0, 8.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return random_matrix(seed, k, p, rank, (center - spread, center + spread))


def ones_losses(k: int) -> torch.Tensor:
    return torch.ones(k, dtype=F64, device=DEVICE)


def gram(matrix: torch.Tensor) -> torch.Tensor:
    return lossbalance._base.gramian(matrix)


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / matrix.norm(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------
# Registry, constructors, shapes
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "needs", "stateful"),
    [
        ("grad-normalization", GradNormalization, "gramian", False),
        ("gradnorm", GradNorm, "gramian", True),
        ("mgda", MGDA, "gramian", False),
        ("mgda-closed-form", MGDAClosedForm, "gramian", False),
        ("pcgrad", PCGrad, "gramian", True),
        ("imtl-g", IMTLG, "gramian", False),
        ("imtl-l", IMTLL, "losses", True),
        ("imtl", IMTL, "gramian", True),
    ],
)
def test_registry_entries(name: str, cls: type, needs: str, stateful: bool) -> None:
    info = lossbalance.get_method(name)
    assert info.needs == needs
    assert info.stateful == stateful
    assert info.paper and info.summary
    balancer = lossbalance.create(name, 3)
    assert type(balancer) is cls
    assert balancer.num_terms == 3
    expected_kind = "loss" if needs == "losses" else "gradient"
    assert balancer.kind == expected_kind
    assert (len(list(balancer.parameters())) > 0) == (cls in (GradNorm, IMTLL, IMTL))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GradNorm(2, alpha=-1), r"Invalid alpha: -1 \(expected alpha >= 0\)"),
        (lambda: MGDA(2, solver="newton"), r"Invalid solver: 'newton' \(expected one of"),
        (lambda: MGDA(2, normalization="l1"), r"Invalid normalization: 'l1'"),
        (lambda: MGDA(2, tol=0.0), r"Invalid tol: 0.0 \(expected tol > 0\)"),
        (lambda: MGDA(2, max_iter=0), r"Invalid max_iter: 0 \(expected an integer >= 1\)"),
        (lambda: MGDAClosedForm(2, normalization="x"), r"Invalid normalization: 'x'"),
        (lambda: PCGrad(2, seed=-3), r"Invalid seed: -3 \(expected None or an integer >= 0\)"),
        (lambda: IMTLG(0), r"Invalid num_terms: 0"),
        (lambda: gradnorm_weights(torch.eye(2), alpha=-0.5), r"Invalid alpha: -0.5"),
    ],
)
def test_invalid_hyperparameters(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "cls", [GradNormalization, GradNorm, MGDA, MGDAClosedForm, PCGrad, IMTLG, IMTL]
)
def test_balancer_checks_gramian_shape(cls: type) -> None:
    balancer = cls(3)
    with pytest.raises(
        ValueError, match=r"built for 3 loss terms, got a gramian of shape \(2, 2\)"
    ):
        balancer.weights(torch.eye(2, dtype=F64), ones_losses(3))
    with pytest.raises(ValueError, match=r"expected a K x K gramian.*shape \(3, 2\)"):
        balancer.weights(torch.ones(3, 2, dtype=F64), ones_losses(3))
    with pytest.raises(ValueError, match=r"built for 3 loss terms, got losses of shape \(2,\)"):
        balancer.weights(torch.eye(3, dtype=F64), ones_losses(2))


MATRIX_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "grad_normalization": grad_normalization_weights,
    "gradnorm": gradnorm_weights,
    "mgda": mgda_weights,
    "mgda_exact": lambda g: mgda_weights(g, "exact"),
    "mgda_closed_form": mgda_closed_form_weights,
    "pcgrad": pcgrad_weights,
    "imtl_g": imtl_g_weights,
}
GRAMIAN_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "grad_normalization": grad_normalization_weights_from_gramian,
    "gradnorm": gradnorm_weights_from_gramian,
    "mgda": mgda_weights_from_gramian,
    "mgda_exact": lambda m: mgda_weights_from_gramian(m, "exact"),
    "mgda_closed_form": mgda_closed_form_weights_from_gramian,
    "pcgrad": pcgrad_weights_from_gramian,
    "imtl_g": imtl_g_weights_from_gramian,
}


@pytest.mark.parametrize("name", sorted(MATRIX_FUNCTIONS))
def test_functions_check_matrix_shape(name: str) -> None:
    with pytest.raises(ValueError, match=r"expected a K x P gradient matrix.*shape \(3,\)"):
        MATRIX_FUNCTIONS[name](torch.ones(3))
    with pytest.raises(ValueError, match=r"shape \(0, 4\)"):
        MATRIX_FUNCTIONS[name](torch.ones(0, 4))


@pytest.mark.parametrize("name", sorted(GRAMIAN_FUNCTIONS))
def test_functions_check_gramian_shape(name: str) -> None:
    with pytest.raises(ValueError, match=r"expected a K x K gramian.*shape \(2, 3\)"):
        GRAMIAN_FUNCTIONS[name](torch.ones(2, 3, dtype=F64))


@pytest.mark.parametrize("name", sorted(GRAMIAN_FUNCTIONS))
def test_matrix_and_gramian_forms_agree(name: str) -> None:
    matrix = random_matrix(0, 4, 7, log10_scale=(-1, 1))
    if name == "pcgrad":
        a = pcgrad_weights(matrix, torch.Generator().manual_seed(5))
        b = pcgrad_weights_from_gramian(gram(matrix), torch.Generator().manual_seed(5))
    else:
        a, b = MATRIX_FUNCTIONS[name](matrix), GRAMIAN_FUNCTIONS[name](gram(matrix))
    assert a.dtype == F64 and a.shape == (4,) and a.device == matrix.device
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)


@pytest.mark.filterwarnings("ignore::lossbalance.LossBalanceWarning")
@pytest.mark.parametrize("name", sorted(MATRIX_FUNCTIONS))
def test_input_dtype_gives_float64_weights(name: str, dtype: torch.dtype) -> None:
    matrix = random_matrix(1, 3, 5).to(dtype)
    alpha = MATRIX_FUNCTIONS[name](matrix)
    assert alpha.dtype == F64
    assert alpha.device == matrix.device
    assert torch.isfinite(alpha).all()
    expected = MATRIX_FUNCTIONS[name](matrix.to(F64))
    torch.testing.assert_close(alpha, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Degenerate inputs: finite, never NaN, warn once where the method's numerics degenerate
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


# (function, case) pairs where the input is NOT degenerate for the method: no warning.
_NOT_DEGENERATE = {
    (fn, case)
    for fn in ("grad_normalization", "gradnorm", "mgda", "mgda_exact", "pcgrad")
    for case in ("duplicate", "rank-deficient", "parallel")
}


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
    else:
        with pytest.warns(LossBalanceWarning):
            alpha = fn(matrix)
    assert alpha.shape == (matrix.shape[0],)
    assert torch.isfinite(alpha).all(), alpha
    if case == "single":
        expected = 1.0 / matrix.norm() if name == "grad_normalization" else 1.0
        torch.testing.assert_close(alpha, torch.full_like(alpha, float(expected)))


@pytest.mark.parametrize(
    "cls", [GradNormalization, GradNorm, MGDA, MGDAClosedForm, PCGrad, IMTLG, IMTL]
)
@pytest.mark.parametrize("case", ["zero-row", "all-zero", "single"])
def test_balancers_on_degenerate_gramians(cls: type, case: str) -> None:
    matrix = _degenerate(case)
    k = matrix.shape[0]
    balancer = cls(k)
    with pytest.warns(LossBalanceWarning):
        alpha = balancer.weights(gram(matrix), ones_losses(k))
    assert torch.isfinite(alpha).all()
    assert balancer.last_weights is not None
    torch.testing.assert_close(balancer.last_weights, alpha)


@pytest.mark.parametrize("name", sorted(GRAMIAN_FUNCTIONS))
def test_indefinite_gramian_is_projected_with_a_warning(name: str) -> None:
    m = gram(random_matrix(21, 3, 5))
    m[0, 0] = -float(m[0, 0])  # not a Gramian: a negative squared norm
    with pytest.warns(LossBalanceWarning) as record:
        alpha = GRAMIAN_FUNCTIONS[name](m)
    assert any("not positive semidefinite" in str(w.message) for w in record)
    assert torch.isfinite(alpha).all()


@pytest.mark.parametrize("name", sorted(GRAMIAN_FUNCTIONS))
def test_non_finite_gramian_raises(name: str) -> None:
    m = gram(random_matrix(22, 3, 5))
    m[1, 2] = m[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        GRAMIAN_FUNCTIONS[name](m)


def test_warnings_are_emitted_once() -> None:
    matrix = _degenerate("duplicate")
    with pytest.warns(LossBalanceWarning):
        imtl_g_weights(matrix)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossBalanceWarning)
        imtl_g_weights(matrix)


# ----------------------------------------------------------------------------------------
# Gradient normalisation
# ----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::lossbalance.LossBalanceWarning")  # K = 1
@SETTINGS
@given(matrices())
def test_grad_normalization_reproduces_sum_of_unit_gradients(matrix: torch.Tensor) -> None:
    alpha = grad_normalization_weights(matrix)
    expected = sum(row / row.norm() for row in matrix)
    assert isinstance(expected, torch.Tensor)
    k = matrix.shape[0]
    torch.testing.assert_close(alpha @ matrix, expected, rtol=1e-10, atol=1e-10 * k)
    # Scale-free: every term contributes a unit step.
    scaled = matrix * torch.logspace(-4, 4, matrix.shape[0], dtype=F64, device=DEVICE)[:, None]
    torch.testing.assert_close(
        grad_normalization_weights(scaled) @ scaled, expected, rtol=1e-9, atol=1e-9
    )


# ----------------------------------------------------------------------------------------
# GradNorm
# ----------------------------------------------------------------------------------------


@SETTINGS
@given(matrices(min_k=2), st.sampled_from([0.0, 0.5, 1.5, 3.0]), st.integers(0, 2**31))
def test_gradnorm_fixed_point_ratios(matrix: torch.Tensor, alpha: float, seed: int) -> None:
    k = matrix.shape[0]
    rng = np.random.default_rng(seed)
    losses = torch.from_numpy(rng.uniform(0.1, 2.0, k))
    initial = torch.from_numpy(rng.uniform(0.5, 3.0, k))
    w = gradnorm_weights(matrix, losses, initial, alpha=alpha)
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(float(k), dtype=F64, device=DEVICE))
    ratio = losses / initial
    rates = (ratio / ratio.mean()).to(DEVICE)
    weighted_norms = w * matrix.norm(dim=1)
    target_shape = weighted_norms / rates**alpha
    torch.testing.assert_close(target_shape, target_shape.mean().expand(k), rtol=1e-10, atol=0.0)


@SETTINGS
@given(matrices(min_k=2))
def test_gradnorm_alpha_zero_equalises_weighted_norms(matrix: torch.Tensor) -> None:
    k = matrix.shape[0]
    w = gradnorm_weights(matrix, alpha=0.0)
    w_with_losses = gradnorm_weights(
        matrix, torch.rand(k, dtype=F64), torch.rand(k, dtype=F64) + 0.1, alpha=0.0
    )
    torch.testing.assert_close(w, w_with_losses)
    weighted = w * matrix.norm(dim=1)
    torch.testing.assert_close(weighted, weighted.mean().expand(k), rtol=1e-10, atol=0.0)


def test_gradnorm_class_gradient_matches_hand_computation() -> None:
    balancer = GradNorm(3, alpha=1.0)
    with torch.no_grad():
        balancer.task_weights.copy_(torch.tensor([2.0, 2.0, 5.0]))
    matrix = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    initial = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    balancer.weights(gram(matrix), initial)  # records L(0), renormalises to sum 3
    torch.testing.assert_close(balancer.initial_losses, initial)
    w = balancer.task_weights.detach().double().clone()
    torch.testing.assert_close(w, torch.tensor([2.0, 2.0, 5.0], dtype=F64) * 3 / 9)

    balancer.task_weights.grad = None
    losses = torch.tensor([0.5, 2.0, 2.0], dtype=F64)
    alpha = balancer.weights(gram(matrix), losses)
    torch.testing.assert_close(alpha, w)  # already normalised: unchanged
    norms = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    ratio = losses / initial
    target = (w * norms).mean() * ratio / ratio.mean()
    expected = torch.sign(w * norms - target) * norms
    torch.testing.assert_close(balancer.task_weights.grad.double(), expected)
    torch.testing.assert_close(
        balancer.last_grad_loss, (w * norms - target).abs().sum(), rtol=1e-6, atol=1e-6
    )
    assert int(balancer.num_steps) == 2
    # the returned weights do not alias the parameter
    with torch.no_grad():
        balancer.task_weights.mul_(2.0)
    torch.testing.assert_close(alpha, w)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_gradnorm_grad_loss_vanishes_at_the_fixed_point(alpha: float) -> None:
    matrix = random_matrix(3, 3, 6, log10_scale=(-2, 2))
    initial = torch.tensor([1.0, 2.0, 3.0], dtype=F64, device=matrix.device)
    losses = torch.tensor([0.9, 1.0, 2.4], dtype=F64, device=matrix.device)
    balancer = GradNorm(3, alpha=alpha).to(matrix.device)
    balancer.weights(gram(matrix), initial)
    with torch.no_grad():
        balancer.task_weights.copy_(gradnorm_weights(matrix, losses, initial, alpha=alpha))
    balancer.weights(gram(matrix), losses)
    assert balancer.last_grad_loss is not None
    scale = float((balancer.task_weights.detach().double() * matrix.norm(dim=1)).sum())
    assert float(balancer.last_grad_loss) <= 1e-6 * scale


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.5])
def test_gradnorm_sgd_moves_towards_the_fixed_point(alpha: float) -> None:
    matrix = torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=F64))
    initial = torch.ones(3, dtype=F64)
    losses = torch.tensor([0.5, 0.8, 0.9], dtype=F64)
    fixed_point = gradnorm_weights(matrix, losses, initial, alpha=alpha)
    balancer = GradNorm(3, alpha=alpha)
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.02)

    def distance() -> float:
        w = balancer.task_weights.detach().double()
        return float((w * 3 / w.sum() - fixed_point).norm())

    start = distance()
    for step in range(60):
        optimizer.zero_grad()
        balancer.weights(gram(matrix), initial if step == 0 else losses)
        optimizer.step()
    assert distance() < 0.3 * start


def test_gradnorm_state_dict_round_trip() -> None:
    matrix = random_matrix(4, 3, 5)
    a = GradNorm(3)
    optimizer = torch.optim.SGD(a.parameters(), lr=0.01)
    for losses in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.0, 2.0])):
        optimizer.zero_grad()
        a.weights(gram(matrix), losses)
        optimizer.step()
    b = GradNorm(3)
    b.load_state_dict(a.state_dict())
    assert int(b.num_steps) == 2
    losses = torch.tensor([0.4, 0.9, 1.0])
    optimizer.zero_grad()
    torch.testing.assert_close(a.weights(gram(matrix), losses), b.weights(gram(matrix), losses))
    torch.testing.assert_close(a.task_weights.grad, b.task_weights.grad)


def test_gradnorm_resets_collapsed_weights_with_a_warning() -> None:
    balancer = GradNorm(2)
    with torch.no_grad():
        balancer.task_weights.fill_(-1.0)
    with pytest.warns(LossBalanceWarning, match="resetting them to 1"):
        alpha = balancer.weights(torch.eye(2, dtype=F64), ones_losses(2))
    torch.testing.assert_close(alpha, torch.ones(2, dtype=F64))


# ----------------------------------------------------------------------------------------
# MGDA
# ----------------------------------------------------------------------------------------


def _assert_kkt(m: torch.Tensor, alpha: torch.Tensor, tol: float) -> None:
    """KKT of min a^T M a on the simplex, to tol relative to max diag(M)."""
    scale = float(m.diagonal().max())
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=F64, device=alpha.device))
    m_alpha = m @ alpha
    value = alpha @ m_alpha
    slack = tol * scale * (1 + 1e-6) + 1e-14 * scale
    assert (m_alpha >= value - slack).all(), (m_alpha - value) / scale
    support = alpha > 0
    assert ((m_alpha[support] - value).abs() <= slack).all(), (m_alpha - value) / scale


def _brute_force_min_norm(m: np.ndarray) -> float:
    """min a^T M a on the simplex by enumerating supports and solving each KKT system."""
    k = m.shape[0]
    best = math.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            system = np.zeros((size + 1, size + 1))
            system[:size, :size] = m[np.ix_(idx, idx)]
            system[:size, size] = 1.0
            system[size, :size] = 1.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            a = np.linalg.lstsq(system, rhs, rcond=None)[0][:size]
            if (a >= -1e-12).all():
                a = np.maximum(a, 0.0) / np.maximum(a, 0.0).sum()
                best = min(best, float(a @ m[np.ix_(idx, idx)] @ a))
    return best


@SETTINGS
@given(matrices(max_k=7), st.sampled_from(["frank-wolfe", "exact"]))
def test_mgda_simplex_and_kkt(matrix: torch.Tensor, solver: str) -> None:
    tol = 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossBalanceWarning)  # K = 1
        alpha = mgda_weights(matrix, solver, tol=tol, max_iter=100_000)
    _assert_kkt(gram(matrix), alpha, tol)


@SETTINGS
@given(matrices(min_k=2, max_k=6))
def test_mgda_solvers_agree_with_brute_force(matrix: torch.Tensor) -> None:
    m = gram(matrix)
    scale = float(m.diagonal().max())
    tol = 1e-7
    fw = mgda_weights(matrix, "frank-wolfe", tol=tol, max_iter=100_000)
    exact = mgda_weights(matrix, "exact", tol=tol)
    best = _brute_force_min_norm((m / scale).cpu().numpy()) * scale
    value_exact = float(exact @ m @ exact)
    value_fw = float(fw @ m @ fw)
    assert value_exact <= best + 1e-12 * scale
    # Frank-Wolfe gap <= tol bounds f - f* by 2 tol, and ||x - x*||^2 <= f(x) - f* for
    # the min-norm point x* of a convex set.
    assert value_fw - best <= 2 * tol * scale * (1 + 1e-6)
    distance_sq = float(((fw - exact) @ matrix).pow(2).sum())
    assert distance_sq <= 2 * tol * scale * (1 + 1e-6) + 1e-12 * scale


@pytest.mark.parametrize("solver", ["frank-wolfe", "exact"])
@pytest.mark.parametrize("factor", [1e-8, 1e8])
def test_mgda_scale_invariance(solver: str, factor: float) -> None:
    matrix = random_matrix(11, 4, 9, log10_scale=(-1, 1))
    torch.testing.assert_close(
        mgda_weights(matrix * factor, solver, tol=1e-10),
        mgda_weights(matrix, solver, tol=1e-10),
        rtol=1e-6,
        atol=1e-6,
    )


def test_mgda_permutation_equivariance() -> None:
    matrix = random_matrix(12, 5, 8, log10_scale=(-1, 1))
    perm = torch.tensor([3, 0, 4, 1, 2], device=DEVICE)
    for solver in ("frank-wolfe", "exact"):
        alpha = mgda_weights(matrix, solver, tol=1e-10)
        torch.testing.assert_close(
            mgda_weights(matrix[perm], solver, tol=1e-10), alpha[perm], rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
@pytest.mark.parametrize("solver", ["frank-wolfe", "exact", "closed-form"])
def test_mgda_normalization_is_folded_into_alpha(normalization: str, solver: str) -> None:
    matrix = random_matrix(13, 4, 6, log10_scale=(-3, 3))
    losses = torch.tensor([0.5, 2.0, 10.0, 0.01], dtype=F64, device=DEVICE)
    norms = matrix.norm(dim=1)
    n = {"none": torch.ones_like(norms), "l2": norms, "loss": losses, "loss+": losses * norms}[
        normalization
    ]
    normalised = matrix / n[:, None]
    if solver == "closed-form":
        alpha = MGDAClosedForm(4, normalization).weights(gram(matrix), losses)
        beta = mgda_closed_form_weights(normalised)
    else:
        alpha = MGDA(4, solver, normalization, tol=1e-10).weights(gram(matrix), losses)
        beta = mgda_weights(normalised, "exact", tol=1e-12)
    # alpha on the original gradients writes the min-norm point of the normalised ones
    torch.testing.assert_close(
        alpha @ matrix, beta @ normalised, rtol=1e-5, atol=1e-5 * float(normalised.norm())
    )
    torch.testing.assert_close(alpha * n, beta, rtol=1e-5, atol=1e-5)


def test_mgda_loss_normalization_needs_losses() -> None:
    with pytest.raises(ValueError, match="needs the losses"):
        mgda_weights(torch.eye(2), normalization="loss")


def test_mgda_max_iter_warns() -> None:
    matrix = random_matrix(14, 6, 3, log10_scale=(-2, 2))
    with pytest.warns(LossBalanceWarning, match="max_iter=2"):
        alpha = mgda_weights(matrix, tol=1e-12, max_iter=2)
    assert torch.isfinite(alpha).all()


def test_mgda_zero_gradient_gives_zero_update() -> None:
    matrix = _degenerate("zero-row")
    with pytest.warns(LossBalanceWarning):
        alpha = mgda_weights(matrix, "exact")
    assert float((alpha @ matrix).norm()) <= 1e-12 * float(matrix.norm())


def test_mgda_conflicting_pair_is_pareto_stationary() -> None:
    g = random_matrix(15, 1, 5)[0]
    matrix = torch.stack([g, -3.0 * g])
    for solver in ("frank-wolfe", "exact"):
        alpha = mgda_weights(matrix, solver, tol=1e-12)
        torch.testing.assert_close(alpha, torch.tensor([0.75, 0.25], dtype=F64, device=DEVICE))


@SETTINGS
@given(matrices(min_k=2, max_k=6, full_rank=True))
def test_mgda_closed_form_stationarity(matrix: torch.Tensor) -> None:
    m = gram(matrix)
    alpha = mgda_closed_form_weights(matrix)
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=F64, device=DEVICE))
    m_alpha = m @ alpha
    tol = 1e-8 * float(m.diagonal().max()) * float(alpha.abs().sum())
    assert float((m_alpha - m_alpha.mean()).abs().max()) <= tol


def test_mgda_closed_form_singular_cases() -> None:
    g = random_matrix(16, 2, 5)
    duplicate = torch.stack([g[0], g[1], g[1]])
    with pytest.warns(LossBalanceWarning, match="singular"):
        alpha = mgda_closed_form_weights(duplicate)
    # duplicates share their weight equally; the combined gradient is the 2-term answer
    torch.testing.assert_close(alpha[1], alpha[2])
    two = mgda_closed_form_weights(g)
    torch.testing.assert_close(alpha @ duplicate, two @ g)
    # an affine hull through the origin gives a zero combined gradient
    through_origin = torch.stack([g[0], g[1], -(g[0] + g[1])])
    alpha = mgda_closed_form_weights(through_origin)
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=F64, device=DEVICE))
    assert float((alpha @ through_origin).norm()) <= 1e-10 * float(g.norm())


# ----------------------------------------------------------------------------------------
# PCGrad
# ----------------------------------------------------------------------------------------


def _pcgrad_reference(matrix: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Algorithm 1 on the rows themselves, with the orders drawn as the implementation does."""
    k = matrix.shape[0]
    rows = matrix.to(F64)
    projected = []
    for i in range(k):
        others = [j for j in range(k) if j != i]
        perm = torch.randperm(k - 1, generator=generator).tolist()
        g = rows[i].clone()
        for j in (others[p] for p in perm):
            dot = g @ rows[j]
            if dot < 0:
                g = g - dot / (rows[j] @ rows[j]) * rows[j]
        projected.append(g)
    return torch.stack(projected).sum(dim=0)


@SETTINGS
@given(matrices(max_k=6), st.integers(0, 2**31))
def test_pcgrad_matches_reference_loop(matrix: torch.Tensor, seed: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossBalanceWarning)  # K = 1
        combined = pcgrad(matrix, torch.Generator().manual_seed(seed))
        alpha = pcgrad_weights(matrix, torch.Generator().manual_seed(seed))
    expected = _pcgrad_reference(matrix, torch.Generator().manual_seed(seed))
    atol = 1e-10 * float(matrix.norm(dim=1).max())
    torch.testing.assert_close(combined, expected, rtol=1e-9, atol=atol)
    torch.testing.assert_close(alpha @ matrix, expected, rtol=1e-9, atol=atol)


@SETTINGS
@given(st.integers(0, 2**31), st.sampled_from([-8.0, 0.0, 8.0]))
def test_pcgrad_conflicting_pair_has_no_conflict_left(seed: int, log_scale: float) -> None:
    matrix = random_matrix(seed, 2, 6, log10_scale=(log_scale - 2, log_scale + 2))
    if float(matrix[0] @ matrix[1]) > 0:
        matrix[1] = -matrix[1]
    m = gram(matrix)
    coeffs = torch.from_numpy(_pcgrad_coefficients(m.cpu().numpy(), _orders(2, None)))
    projected = coeffs.to(DEVICE) @ matrix
    n0, n1 = matrix.norm(dim=1)
    tol = 1e-12 * float(n0 * n1)
    assert float(projected[0] @ matrix[1]) >= -tol
    assert float(projected[1] @ matrix[0]) >= -tol
    # the paper's two-task formula
    dot = matrix[0] @ matrix[1]
    expected = matrix.sum(0) - dot * (matrix[1] / n1**2 + matrix[0] / n0**2)
    torch.testing.assert_close(pcgrad(matrix), expected, rtol=1e-9, atol=1e-9 * float(n0 + n1))


def test_pcgrad_without_conflicts_is_the_sum() -> None:
    matrix = random_matrix(17, 4, 6).abs()  # nonnegative rows: no conflict
    torch.testing.assert_close(pcgrad_weights(matrix), torch.ones(4, dtype=F64, device=DEVICE))


def _conflicting(seed: int) -> torch.Tensor:
    # Five gradients in 3-D, many conflicting pairs, so the order of projections matters.
    return random_matrix(seed, 5, 3)


def test_pcgrad_order_matters_for_this_input() -> None:
    matrix = _conflicting(18)
    results = {
        tuple(pcgrad_weights(matrix, torch.Generator().manual_seed(s)).tolist()) for s in range(20)
    }
    assert len(results) > 1


def test_pcgrad_same_seed_same_result() -> None:
    m = gram(_conflicting(18))
    a, b = PCGrad(5, seed=42), PCGrad(5, seed=42)
    for _ in range(5):
        torch.testing.assert_close(
            a.weights(m, ones_losses(5)), b.weights(m, ones_losses(5)), rtol=0, atol=0
        )
    torch.manual_seed(3)
    c = PCGrad(5)
    torch.manual_seed(3)
    d = PCGrad(5)
    assert c.seed == d.seed
    torch.testing.assert_close(
        c.weights(m, ones_losses(5)), d.weights(m, ones_losses(5)), rtol=0, atol=0
    )


def test_pcgrad_state_dict_round_trip_continues_the_order() -> None:
    m = gram(_conflicting(18))
    losses = ones_losses(5)
    original = PCGrad(5, seed=7)
    for _ in range(3):
        original.weights(m, losses)
    state = original.state_dict()
    continued = [original.weights(m, losses) for _ in range(10)]

    resumed = PCGrad(5, seed=1234)
    resumed.load_state_dict(state)
    assert resumed.seed == 7
    replay = [resumed.weights(m, losses) for _ in range(10)]
    for x, y in zip(continued, replay, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # The test can fail: the unrestored generator draws a different sequence.
    other = PCGrad(5, seed=1234)
    other_seq = [other.weights(m, losses) for _ in range(10)]
    assert any(not torch.equal(x, y) for x, y in zip(continued, other_seq, strict=True))


# ----------------------------------------------------------------------------------------
# IMTL-G, IMTL-L, hybrid IMTL
# ----------------------------------------------------------------------------------------


def _imtl_g_paper(matrix: torch.Tensor) -> torch.Tensor:
    """The paper's closed form, literally: alpha_{2:K} = g_1 U^T (D U^T)^{-1}."""
    u = unit_rows(matrix)
    d = matrix[:1] - matrix[1:]
    u_diff = u[:1] - u[1:]
    rest = matrix[0] @ u_diff.T @ torch.linalg.inv(d @ u_diff.T)
    return torch.cat([(1 - rest.sum()).reshape(1), rest])


@SETTINGS
@given(matrices(min_k=2, max_k=6, full_rank=True))
def test_imtl_g_matches_the_paper_formula(matrix: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossBalanceWarning)  # negative common projection
        alpha = imtl_g_weights(matrix)
    expected = _imtl_g_paper(matrix)
    torch.testing.assert_close(alpha, expected, rtol=1e-7, atol=1e-7 * float(expected.abs().max()))


@SETTINGS
@given(matrices(min_k=1, max_k=7, full_rank=True))
def test_imtl_g_equal_projections_and_unit_sum(matrix: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossBalanceWarning)
        alpha = imtl_g_weights(matrix)
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=F64, device=DEVICE))
    g = alpha @ matrix
    projections = unit_rows(matrix) @ g
    spread = float((projections - projections.mean()).abs().max())
    assert spread <= 1e-9 * float(g.norm()), projections


@SETTINGS
@given(matrices(min_k=2, max_k=6, full_rank=True), st.integers(0, 2**31))
def test_imtl_g_direction_is_scale_invariant(matrix: torch.Tensor, seed: int) -> None:
    factors = torch.from_numpy(10.0 ** np.random.default_rng(seed).uniform(-4, 4, matrix.shape[0]))
    scaled = matrix * factors.to(DEVICE)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossBalanceWarning)
        g = imtl_g_weights(matrix) @ matrix
        g_scaled = imtl_g_weights(scaled) @ scaled
    cosine = float(g @ g_scaled / (g.norm() * g_scaled.norm()))
    # Theorem 2: the same line. (The sign follows sum(alpha) = 1, which flips when the
    # common projection changes sign, a case that warns.)
    assert abs(cosine) >= 1 - 1e-9


@pytest.mark.parametrize("cls", [IMTLG, IMTL])
def test_imtl_counts_negative_projection_steps(cls: type) -> None:
    balancer = cls(3)
    rng = np.random.default_rng(0)
    expected = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossBalanceWarning)
        for _ in range(40):
            # rows of very different norms: a fair share of these give a negative projection
            matrix = torch.from_numpy(rng.normal(size=(3, 4)) * [[1.0], [5.0], [0.2]])
            gram = (matrix @ matrix.T).to(DEVICE)
            alpha = balancer.weights(gram, torch.ones(3, dtype=F64, device=DEVICE))
            projection = float((alpha @ gram)[0]) / float(gram[0, 0].sqrt())
            expected += projection < 0
    assert 0 < expected < 40
    assert balancer.negative_projection_steps == expected
    assert "negative_projection_steps" not in str(balancer.state_dict().keys())


def test_imtl_g_degenerate_rows() -> None:
    g = random_matrix(19, 3, 6, log10_scale=(-2, 2))
    # a zero row gets 0 and the others are balanced among themselves
    with_zero = torch.cat([g[:2], torch.zeros(1, 6, dtype=F64, device=DEVICE), g[2:]])
    with pytest.warns(LossBalanceWarning, match="zero gradient"):
        alpha = imtl_g_weights(with_zero)
    assert float(alpha[2]) == 0.0
    torch.testing.assert_close(alpha[[0, 1, 3]], imtl_g_weights(g))
    # a duplicated row shares its weight; the combined gradient is unchanged
    duplicate = torch.cat([g, g[1:2]])
    with pytest.warns(LossBalanceWarning, match="linearly dependent"):
        alpha = imtl_g_weights(duplicate)
    torch.testing.assert_close(alpha[1], alpha[3])
    torch.testing.assert_close(alpha @ duplicate, imtl_g_weights(g) @ g)


def test_imtl_l_optimum_scales_every_loss_to_one() -> None:
    losses = torch.tensor([0.01, 0.5, 3.0, 200.0], dtype=F64)
    s_star = (-losses.log()).requires_grad_()
    (grad,) = torch.autograd.grad(imtl_l_loss(losses, s_star), s_star)
    torch.testing.assert_close(grad, torch.zeros(4, dtype=F64), rtol=0, atol=1e-12)

    balancer = IMTLL(4).double()
    optimizer = torch.optim.Adam(balancer.parameters(), lr=0.05, betas=(0.9, 0.9))
    for _ in range(500):
        optimizer.zero_grad()
        balancer(losses).backward()
        optimizer.step()
    balancer(losses)
    assert balancer.last_weights is not None
    torch.testing.assert_close(
        balancer.last_weights * losses, torch.ones(4, dtype=F64), rtol=1e-3, atol=1e-3
    )


def test_imtl_l_forward_and_weights() -> None:
    balancer = IMTLL(2)
    with torch.no_grad():
        balancer.log_scales.copy_(torch.tensor([0.5, -1.0]))
    losses = torch.tensor([2.0, 3.0], requires_grad=True)
    combined = balancer(losses)
    s = torch.tensor([0.5, -1.0])
    torch.testing.assert_close(combined, (s.exp() * losses - s).sum())
    (d_losses,) = torch.autograd.grad(combined, losses)
    assert balancer.last_weights is not None
    torch.testing.assert_close(balancer.last_weights, d_losses)
    with pytest.warns(LossBalanceWarning, match="<= 0"):
        balancer(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match=r"built for 2 loss terms"):
        balancer(torch.ones(3))


def test_hybrid_imtl_transform_and_weights() -> None:
    balancer = IMTL(3).double()
    with torch.no_grad():
        balancer.log_scales.copy_(torch.tensor([0.3, -2.0, 1.0], dtype=F64))
    losses = torch.tensor([0.5, 4.0, 1.5], dtype=F64)
    scaled = balancer.transform(losses)
    s = balancer.log_scales.detach()
    torch.testing.assert_close(scaled, s.exp() * losses - s)
    (grad_s,) = torch.autograd.grad(scaled.sum(), balancer.log_scales)
    torch.testing.assert_close(grad_s, s.exp() * losses - 1)  # IMTL-L's gradient

    matrix = random_matrix(20, 3, 6, log10_scale=(-3, 3))
    scaled_grads = s.exp()[:, None].to(DEVICE) * matrix
    alpha = balancer.weights(gram(scaled_grads), scaled.detach())
    torch.testing.assert_close(alpha, imtl_g_weights(scaled_grads))
    # IMTL-G on the scaled gradients keeps the direction of IMTL-G on the raw ones
    g_raw = imtl_g_weights(matrix) @ matrix
    g_hybrid = alpha @ scaled_grads
    cosine = float(g_raw @ g_hybrid / (g_raw.norm() * g_hybrid.norm()))
    assert abs(cosine) >= 1 - 1e-9


def test_hybrid_imtl_with_the_engine() -> None:
    torch.manual_seed(0)
    trunk, head1, head2 = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    x = torch.randn(8, 3)
    z = trunk(x)
    losses = [head1(z).pow(2).mean(), head2(z).abs().mean()]
    balancer = IMTL(2)
    alpha = lossbalance.backward(losses, balancer, shared=trunk)
    values = torch.stack([loss.detach() for loss in losses])
    assert balancer.log_scales.grad is not None
    torch.testing.assert_close(balancer.log_scales.grad, values - 1)  # s = 0: e^s L - 1
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=F64))
