"""Numerics and silent mistakes of the balancers (issue 15).

MGDA's min-norm point for terms of very different norms, checked against a brute force
over supports polished in high precision; IMTL-G on linearly dependent gradients; the
loss normalisations on negative losses and the per-balancer warnings; features that
duplicate or contain one another; balancer parameters left out of the optimizer; and
``lossbalance.backward`` after a manual ``loss.backward()``.
"""

from __future__ import annotations

import itertools
import os
import warnings

import mpmath
import numpy as np
import pytest
import torch

import lossbalance
from lossbalance import MGDA, LossBalanceWarning
from lossbalance.functional import mgda_weights

F64 = torch.float64
DEVICE = torch.device(os.environ.get("LOSSBALANCE_TEST_DEVICE", "cpu"))


def spread_jacobian(
    seed: int, k: int, p: int, log10_norms: tuple[float, float], rank: int | None = None
) -> np.ndarray:
    """K x P float64 rows of the given rank with norms log-uniform in 10^log10_norms."""
    rng = np.random.default_rng(seed)
    r = min(k, p) if rank is None else rank
    g = rng.standard_normal((k, r)) @ rng.standard_normal((r, p))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return g * (10.0 ** rng.uniform(*log10_norms, size=k))[:, None]


# ----------------------------------------------------------------------------------------
# MGDA: the min-norm point whatever the norms
# ----------------------------------------------------------------------------------------


def _min_norm_support(g: np.ndarray) -> list[int]:
    """The support of the min-norm point of conv(rows of g), by trying every support.

    The affine minimiser of each affinely independent support comes from a least-squares
    solve in gradient space (not the Gramian); a support is feasible when its weights are
    nonnegative up to a rounding that is measured, like the answer, in gradient norms.
    """
    k = g.shape[0]
    norms = np.linalg.norm(g, axis=1)
    best, best_support = np.inf, [int(np.argmin(norms))]
    for size in range(2, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            anchor = idx[int(np.argmin(norms[idx]))]
            others = [i for i in idx if i != anchor]
            edges = (g[others] - g[anchor]).T
            if np.linalg.matrix_rank(edges) < len(others):
                continue
            coef = np.linalg.lstsq(edges, -g[anchor], rcond=None)[0]
            point = g[anchor] + edges @ coef
            slack = 1e-13 * np.linalg.norm(point)
            if (coef * norms[others] < -slack).any() or (1 - coef.sum()) * norms[anchor] < -slack:
                continue
            if np.linalg.norm(point) < best:
                best, best_support = float(np.linalg.norm(point)), idx
    return best_support if best < norms.min() else [int(np.argmin(norms))]


def _polished_min_norm_point(g: np.ndarray, support: list[int]) -> np.ndarray:
    """The affine minimiser of ``support`` from its KKT system in 60-digit arithmetic."""
    with mpmath.workdps(60):
        rows = [mpmath.matrix(g[i].tolist()) for i in support]
        s = len(support)
        system = mpmath.zeros(s + 1, s + 1)
        for i, j in itertools.product(range(s), repeat=2):
            system[i, j] = sum(a * b for a, b in zip(rows[i], rows[j], strict=True))
        for i in range(s):
            system[i, s] = system[s, i] = 1
        rhs = mpmath.zeros(s + 1, 1)
        rhs[s] = 1
        weights = mpmath.lu_solve(system, rhs)
        point = sum((weights[i] * rows[i] for i in range(s)), mpmath.zeros(g.shape[1], 1))
        return np.array([float(x) for x in point])


def _scale_free_kkt(g: np.ndarray, alpha: np.ndarray) -> tuple[float, float, float]:
    """``(min_i v_i, max over the support of |v_i|, ||x||)`` in 60-digit arithmetic, for
    x = alpha @ g and v_i = <g_i - x, x> / (||g_i|| ||x||)."""
    with mpmath.workdps(60):
        rows = [mpmath.matrix(row.tolist()) for row in g]
        x = sum(
            (mpmath.mpf(float(a)) * row for a, row in zip(alpha, rows, strict=True)),
            mpmath.zeros(g.shape[1], 1),
        )
        xx = sum(v * v for v in x)
        norm = mpmath.sqrt(xx)
        v = np.array(
            [
                float(
                    (sum(a * b for a, b in zip(row, x, strict=True)) - xx)
                    / (mpmath.norm(row) * norm)
                )
                for row in rows
            ]
        )
    return float(v.min()), float(np.abs(v[alpha > 0]).max()), float(norm)


CASES = [
    (k, spread, rank, seed)
    for k in (2, 3, 10)
    for spread in ((-2.0, 2.0), (-8.0, 8.0))
    for rank in (None, "deficient")
    for seed in range(3)
]


@pytest.mark.parametrize(("k", "spread", "rank", "seed"), CASES)
def test_mgda_default_is_the_min_norm_point_for_any_norms(
    k: int, spread: tuple[float, float], rank: str | None, seed: int
) -> None:
    # The old default (Frank-Wolfe stopping at 1e-6 of the largest squared norm) was
    # 6-19% off here for K = 10 norms spanning 1e-2..1e2.
    p, r = (20, None) if rank is None else (5, max(1, min(k - 1, 4)))
    g = spread_jacobian(seed, k, p, spread, r)
    reference = _polished_min_norm_point(g, _min_norm_support(g))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossBalanceWarning)  # no max-iter warning
        alpha = mgda_weights(torch.from_numpy(g).to(DEVICE)).cpu().numpy()
    assert (alpha >= 0).all() and abs(alpha.sum() - 1.0) <= 1e-12
    point = alpha @ g
    shortest = float(np.linalg.norm(g, axis=1).min())
    if np.linalg.norm(reference) <= 1e-12 * shortest:
        # the origin lies in the hull: x is zero to rounding
        assert np.linalg.norm(point) <= 1e-12 * shortest
    else:
        distance = np.linalg.norm(point - reference) / np.linalg.norm(reference)
        assert distance <= 1e-6, distance
        v_min, v_support, _ = _scale_free_kkt(g, alpha)
        assert v_min >= -1e-9 and v_support <= 1e-9, (v_min, v_support)


@pytest.mark.parametrize("spread", [(-2.0, 2.0), (-8.0, 8.0)])
@pytest.mark.parametrize(("p", "rank"), [(60, None), (20, None), (60, 10)])
def test_mgda_default_satisfies_kkt_for_forty_terms(
    spread: tuple[float, float], p: int, rank: int | None
) -> None:
    for seed in range(2):
        g = spread_jacobian(seed, 40, p, spread, rank)
        alpha = mgda_weights(torch.from_numpy(g).to(DEVICE)).cpu().numpy()
        point = alpha @ g
        shortest = float(np.linalg.norm(g, axis=1).min())
        if np.linalg.norm(point) <= 1e-12 * shortest:
            # alpha is on the simplex, so a zero x proves the origin lies in the hull
            continue
        v_min, v_support, _ = _scale_free_kkt(g, alpha)
        assert v_min >= -1e-9 and v_support <= 1e-9, (seed, v_min, v_support)


def test_mgda_frank_wolfe_tolerance_is_relative_to_the_answer() -> None:
    g = spread_jacobian(0, 10, 20, (-2.0, 2.0))
    alpha = mgda_weights(torch.from_numpy(g), "frank-wolfe", tol=1e-8, max_iter=100_000)
    v_min, v_support, _ = _scale_free_kkt(g, alpha.numpy())
    assert v_min >= -1e-7 and v_support <= 1e-7
    exact = mgda_weights(torch.from_numpy(g), "exact").numpy() @ g
    distance = np.linalg.norm(alpha.numpy() @ g - exact) / np.linalg.norm(exact)
    assert distance <= 1e-6


def test_mgda_feature_mode_matches_the_min_norm_point_on_a_ten_term_model() -> None:
    torch.manual_seed(0)
    k = 10
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 8, dtype=F64), torch.nn.Tanh())
    heads = torch.nn.ModuleList(torch.nn.Linear(8, 1, dtype=F64) for _ in range(k))
    x = torch.randn(16, 6, dtype=F64)
    z = trunk(x)
    scales = 10.0 ** torch.linspace(-2, 2, k, dtype=F64)
    losses = [s * heads[i](z).pow(2).mean() for i, s in enumerate(scales)]
    jacobian = torch.stack(
        [torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses]
    ).numpy()
    reference = _polished_min_norm_point(jacobian, _min_norm_support(jacobian))
    alpha = lossbalance.backward(losses, MGDA(k), shared=trunk, features=z).numpy()
    distance = np.linalg.norm(alpha @ jacobian - reference) / np.linalg.norm(reference)
    assert distance <= 1e-6, distance


# ----------------------------------------------------------------------------------------
# Loss normalisations on negative losses; warnings per balancer instance
# ----------------------------------------------------------------------------------------


def test_initial_loss_normalization_divides_by_the_magnitude_of_a_negative_prior() -> None:
    balancer = lossbalance.InitialLossNormalization(2)
    losses = torch.tensor([-2.0, 4.0], dtype=F64, requires_grad=True)
    with pytest.warns(LossBalanceWarning, match="negative divisor for term\\(s\\) \\[0\\]"):
        combined = balancer(losses)
    (grad,) = torch.autograd.grad(combined, losses)
    # the old clamp at the floor gave the negative term a weight of about 1e154
    torch.testing.assert_close(grad, torch.tensor([0.5, 0.25], dtype=F64))
    torch.testing.assert_close(balancer.last_weights, grad)
    torch.testing.assert_close(combined, torch.tensor(0.0, dtype=F64))
    # later steps keep the prior's magnitude: the negative term is still minimised
    later = torch.tensor([-3.0, 2.0], dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(balancer(later), later)
    torch.testing.assert_close(grad, torch.tensor([0.5, 0.25], dtype=F64))


def test_dynamic_normalization_divides_by_the_magnitude_of_a_negative_loss() -> None:
    balancer = lossbalance.DynamicNormalization(3)
    losses = torch.tensor([-0.5, 4.0, 2.0], dtype=F64, requires_grad=True)
    with pytest.warns(LossBalanceWarning, match="absolute value"):
        combined = balancer(losses)
    (grad,) = torch.autograd.grad(combined, losses)
    torch.testing.assert_close(grad, torch.tensor([2.0, 0.25, 0.5], dtype=F64))
    torch.testing.assert_close(combined, torch.tensor(1.0, dtype=F64))  # -1 + 1 + 1


def test_a_model_survives_a_negative_loss_under_dynamic_normalization() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2, dtype=F64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    balancer = lossbalance.DynamicNormalization(2)
    x = torch.randn(8, 3, dtype=F64)
    out = model(x)
    # a negative log-likelihood-like term and a positive one
    losses = [out[:, 0].mean() - 10.0, out[:, 1].pow(2).mean()]
    with pytest.warns(LossBalanceWarning, match="negative"):
        lossbalance.backward(losses, balancer)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    step = max(
        float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before, strict=True)
    )
    assert step < 1.0  # the old weight ~1e154 moved the parameters by ~1e153


def _negative_history_dwa() -> lossbalance.DWA:
    balancer = lossbalance.DWA(2, period=1)
    for losses in ([-1.0, 1.0], [1.0, 1.0]):
        balancer(torch.tensor(losses, dtype=F64, requires_grad=True))
    return balancer


PER_INSTANCE = {
    "initial-loss": (
        lambda: lossbalance.InitialLossNormalization(2),
        [-1.0, 2.0],
        "negative divisor",
    ),
    "dynamic-negative": (lambda: lossbalance.DynamicNormalization(2), [-1.0, 2.0], "negative"),
    "dynamic-zero": (lambda: lossbalance.DynamicNormalization(2), [0.0, 2.0], "clamped"),
    "gls": (lambda: lossbalance.GLS(2), [-1.0, 2.0], "GLS got a loss"),
    "dwa": (_negative_history_dwa, [1.0, 1.0], "DWA got a mean loss"),
    "uncertainty": (lambda: lossbalance.UncertaintyWeighting(2), [-1.0, 2.0], "loss <= 0"),
    "imtl-l": (lambda: lossbalance.IMTLL(2), [-1.0, 2.0], "loss is <= 0"),
}


@pytest.mark.parametrize("name", list(PER_INSTANCE))
def test_loss_conditions_warn_once_per_balancer_instance(name: str) -> None:
    build, values, match = PER_INSTANCE[name]
    first, second = build(), build()
    for balancer in (first, second):
        with pytest.warns(LossBalanceWarning, match=match):
            balancer(torch.tensor(values, dtype=F64, requires_grad=True))
    # and once per instance only
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossBalanceWarning)
        first(torch.tensor(values, dtype=F64, requires_grad=True))


def test_hybrid_imtl_nonpositive_loss_warns_per_instance() -> None:
    for balancer in (lossbalance.IMTL(2), lossbalance.IMTL(2)):
        with pytest.warns(LossBalanceWarning, match="loss is <= 0"):
            balancer.transform(torch.tensor([-1.0, 2.0], dtype=F64))


# ----------------------------------------------------------------------------------------
# IMTL-G on linearly dependent gradients
# ----------------------------------------------------------------------------------------


def _dependent_gradients() -> torch.Tensor:
    rng = np.random.default_rng(3)
    g = torch.from_numpy(rng.standard_normal((2, 6)))
    g = g * torch.tensor([[0.5], [3.0]], dtype=F64)
    return torch.stack([g[0], g[1], g[0] + g[1]])


def test_imtl_g_dependent_gradients_warn_that_the_update_is_zero() -> None:
    g = _dependent_gradients()
    with pytest.warns(LossBalanceWarning, match="shared update is zero"):
        alpha = lossbalance.functional.imtl_g_weights(g)
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=F64))
    assert float((alpha @ g).norm()) <= 1e-12 * float(g.norm())  # the paper's answer


def test_imtl_g_least_squares_fallback() -> None:
    g = _dependent_gradients()
    with pytest.warns(LossBalanceWarning, match="least-squares direction"):
        alpha = lossbalance.functional.imtl_g_weights(g, fallback="least-squares")
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=F64))
    # beta = C^+ 1 in the unit gradients, alpha_i = beta_i / ||g_i|| normalised to sum 1
    norms = g.norm(dim=1)
    cos = (g @ g.T) / torch.outer(norms, norms)
    beta = torch.linalg.pinv(cos) @ torch.ones(3, dtype=F64)
    expected = (beta / norms) / (beta / norms).sum()
    torch.testing.assert_close(alpha, expected)
    assert float((alpha @ g).norm()) > 0.1 * float(norms.min())


def test_imtl_g_min_norm_fallback_descends_every_term() -> None:
    g = _dependent_gradients()
    with pytest.warns(LossBalanceWarning, match="min-norm direction"):
        alpha = lossbalance.functional.imtl_g_weights(g, fallback="min-norm")
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=F64))
    unit = g / g.norm(dim=1, keepdim=True)
    direction = mgda_weights(unit) @ unit
    combined = alpha @ g
    # the same direction as the min-norm point of the unit gradients
    cosine = combined @ direction / (combined.norm() * direction.norm())
    torch.testing.assert_close(cosine, torch.tensor(1.0, dtype=F64))
    assert (unit @ combined > 0).all()


@pytest.mark.parametrize("fallback", ["least-squares", "min-norm"])
def test_imtl_g_fallback_leaves_regular_gradients_alone(fallback: str) -> None:
    rng = np.random.default_rng(4)
    g = torch.from_numpy(rng.standard_normal((3, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossBalanceWarning)
        torch.testing.assert_close(
            lossbalance.functional.imtl_g_weights(g, fallback=fallback),
            lossbalance.functional.imtl_g_weights(g),
        )


@pytest.mark.parametrize("cls", [lossbalance.IMTLG, lossbalance.IMTL])
def test_imtl_fallback_option_is_validated_and_shown(cls: type) -> None:
    with pytest.raises(
        ValueError,
        match=r"Invalid fallback: 'zero' \(expected one of 'none', 'least-squares', 'min-norm'\)",
    ):
        cls(3, fallback="zero")
    balancer = cls(3, fallback="min-norm")
    assert "fallback='min-norm'" in repr(balancer)
    assert "fallback='none'" in repr(cls(3))
    g = _dependent_gradients()
    with pytest.warns(LossBalanceWarning, match="min-norm direction"):
        alpha = balancer.weights(g @ g.T, torch.ones(3, dtype=F64))
    assert float((alpha @ g).norm()) > 0.1 * float(g.norm(dim=1).min())
    with pytest.raises(ValueError, match="Invalid fallback"):
        lossbalance.functional.imtl_g_weights_from_gramian(g @ g.T, fallback="bogus")


# ----------------------------------------------------------------------------------------
# Features that repeat or contain one another
# ----------------------------------------------------------------------------------------


def _feature_model(k: int = 2) -> tuple[torch.nn.Module, torch.nn.ModuleList, torch.Tensor]:
    torch.manual_seed(1)
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 6, dtype=F64), torch.nn.Tanh())
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1, dtype=F64) for _ in range(k))
    return trunk, heads, torch.randn(10, 4, dtype=F64)


def _trunk_grads_with(features_of, balancer_cls, accumulate: bool = False):
    trunk, heads, x = _feature_model()
    z = trunk(x)
    losses = [heads[0](z).pow(2).mean(), (heads[1](z) - 1).abs().mean()]
    balancer = balancer_cls(2)
    if accumulate:
        acc = lossbalance.Accumulator(balancer, shared=trunk)
        acc.accumulate(losses, features=features_of(z))
        alpha = acc.backward()
    else:
        alpha = lossbalance.backward(losses, balancer, shared=trunk, features=features_of(z))
    return alpha, [p.grad.clone() for p in trunk.parameters()]


@pytest.mark.parametrize("balancer_cls", [lossbalance.IMTLG, MGDA, lossbalance.PCGrad])
@pytest.mark.parametrize("accumulate", [False, True])
def test_duplicate_features_count_once(balancer_cls: type, accumulate: bool) -> None:
    alpha, grads = _trunk_grads_with(lambda z: z, balancer_cls, accumulate)
    alpha2, grads2 = _trunk_grads_with(lambda z: [z, z], balancer_cls, accumulate)
    torch.testing.assert_close(alpha2, alpha)
    for g, g2 in zip(grads, grads2, strict=True):
        torch.testing.assert_close(g2, g)  # was twice g


@pytest.mark.parametrize("accumulate", [False, True])
def test_nested_features_raise_and_write_nothing(accumulate: bool) -> None:
    trunk, heads, x = _feature_model()
    pre = trunk[0](x)
    z = trunk[1](pre)
    losses = [heads[0](z).pow(2).mean(), heads[1](pre).abs().mean()]
    match = r"features\[1\] lies on the autograd path of features\[0\]"
    with pytest.raises(ValueError, match=match):
        if accumulate:
            acc = lossbalance.Accumulator(lossbalance.IMTLG(2), shared=trunk)
            acc.accumulate(losses, features=[z, pre])
        else:
            lossbalance.backward(losses, lossbalance.IMTLG(2), shared=trunk, features=[z, pre])
    assert all(p.grad is None for p in [*trunk.parameters(), *heads.parameters()])
    for features, inner, outer in (([pre, z], 0, 1), ([z, z, z.view(-1)], 0, 2)):
        match = rf"features\[{inner}\] lies on the autograd path of features\[{outer}\]"
        with pytest.raises(ValueError, match=match):
            lossbalance.backward(losses, lossbalance.IMTLG(2), shared=trunk, features=features)


def test_outputs_of_one_operation_are_not_nested() -> None:
    trunk, heads, x = _feature_model()
    z = trunk(x)
    left, right = z.chunk(2, dim=1)
    heads = torch.nn.ModuleList(torch.nn.Linear(3, 1, dtype=F64) for _ in range(2))
    losses = [heads[0](left).pow(2).mean(), heads[1](right).pow(2).mean()]
    alpha = lossbalance.backward(losses, lossbalance.IMTLG(2), shared=trunk, features=[left, right])
    assert torch.isfinite(alpha).all()


# ----------------------------------------------------------------------------------------
# Balancer parameters left out of the optimizer; backward after loss.backward()
# ----------------------------------------------------------------------------------------


def _train(balancer, *, with_balancer_params: bool, steps: int = 3, features: bool = True):
    torch.manual_seed(2)
    trunk = torch.nn.Sequential(torch.nn.Linear(4, 6, dtype=F64), torch.nn.Tanh())
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1, dtype=F64) for _ in range(2))
    params = [*trunk.parameters(), *heads.parameters()]
    if with_balancer_params:
        params += list(balancer.parameters())
    optimizer = torch.optim.SGD(params, lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        z = trunk(torch.randn(8, 4, dtype=F64))
        losses = [heads[0](z).pow(2).mean() + 0.1, (heads[1](z) - 1).pow(2).mean()]
        kwargs = {"shared": trunk, "features": z} if balancer.kind == "gradient" else {}
        lossbalance.backward(losses, balancer, **kwargs)
        optimizer.step()


@pytest.mark.parametrize(
    "build", [lambda: lossbalance.IMTL(2), lambda: lossbalance.UncertaintyWeighting(2)]
)
def test_balancer_parameters_missing_from_the_optimizer_warn(build) -> None:
    with pytest.warns(LossBalanceWarning, match=r"not in the optimizer.*balancer\.parameters"):
        _train(build(), with_balancer_params=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossBalanceWarning)
        _train(build(), with_balancer_params=True)


def test_imtl_scales_missing_from_the_optimizer_warn_with_a_fused_optimizer() -> None:
    # fused Adam does not bump the parameters' version counters: values are compared
    torch.manual_seed(2)
    balancer = lossbalance.IMTL(2)
    trunk = torch.nn.Linear(4, 6, dtype=F64)
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1, dtype=F64) for _ in range(2))
    optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], fused=True)
    with pytest.warns(LossBalanceWarning, match="not in the optimizer"):
        for _ in range(2):
            optimizer.zero_grad()
            z = trunk(torch.randn(8, 4, dtype=F64))
            losses = [heads[0](z).pow(2).mean() + 0.1, heads[1](z).pow(2).mean() + 0.1]
            lossbalance.backward(losses, balancer, shared=trunk, features=z)
            optimizer.step()


def _step_losses(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    out = model(torch.randn(8, 3, dtype=F64))
    return [out[:, 0].pow(2).mean(), out[:, 1].abs().mean()]


@pytest.mark.parametrize("make", [lambda: lossbalance.Uniform(2), lambda: MGDA(2)])
def test_backward_after_a_manual_backward_warns(make) -> None:
    model = torch.nn.Linear(3, 2, dtype=F64)
    balancer = make()
    kwargs = {"shared": model} if balancer.kind == "gradient" else {}
    losses = _step_losses(model, 0)
    sum(losses).backward(retain_graph=True)
    with pytest.warns(LossBalanceWarning, match=r"loss\.backward\(\) called first") as record:
        lossbalance.backward(losses, balancer, **kwargs)
    assert record[0].filename == __file__  # points at the caller
    # and in a later step, after zero_grad, the same mistake is seen again by a new balancer
    model.zero_grad()
    losses = _step_losses(model, 1)
    sum(losses).backward(retain_graph=True)
    with pytest.warns(LossBalanceWarning, match="no earlier lossbalance.backward"):
        lossbalance.backward(losses, make(), **kwargs)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("make", [lambda: lossbalance.Uniform(2), lambda: MGDA(2)])
def test_accumulating_lossbalance_backward_calls_stay_silent(make, set_to_none: bool) -> None:
    model = torch.nn.Linear(3, 2, dtype=F64)
    balancer = make()
    kwargs = {"shared": model} if balancer.kind == "gradient" else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossBalanceWarning)
        for step in range(3):
            optimizer.zero_grad(set_to_none=set_to_none)
            for micro in range(3):  # three micro-batches accumulate on purpose
                lossbalance.backward(_step_losses(model, 10 * step + micro), balancer, **kwargs)
            optimizer.step()


@pytest.mark.parametrize("cls", [MGDA, lossbalance.MGDAClosedForm])
def test_mgda_loss_normaliser_warns_per_balancer_instance(cls: type) -> None:
    g = torch.eye(2, dtype=F64)
    losses = torch.tensor([-1.0, 2.0], dtype=F64)
    for balancer in (cls(2, normalization="loss"), cls(2, normalization="loss")):
        with pytest.warns(LossBalanceWarning, match="zero, negative or not finite"):
            balancer.weights(g @ g.T, losses)


def test_gradnorm_loss_conditions_warn_per_balancer_instance() -> None:
    g = torch.eye(2, dtype=F64)
    for balancer in (lossbalance.GradNorm(2), lossbalance.GradNorm(2)):
        with pytest.warns(LossBalanceWarning, match="initial loss"):
            balancer.weights(g @ g.T, torch.tensor([-1.0, 2.0], dtype=F64))
    for balancer in (lossbalance.GradNorm(2), lossbalance.GradNorm(2)):
        with torch.no_grad():
            balancer.task_weights.fill_(-1.0)
        with pytest.warns(LossBalanceWarning, match="resetting them to 1"):
            balancer.weights(g @ g.T, torch.ones(2, dtype=F64))


@pytest.mark.parametrize("name", ["famo", "stch"])
def test_log_loss_balancers_warn_per_instance(name):
    # a zero loss under FAMO's or STCH's log is clamped with a warning: a second balancer
    # in the process meets the same condition and must warn too
    losses = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    for _ in range(2):
        balancer = lossbalance.create(name, 2)
        with pytest.warns(lossbalance.LossBalanceWarning, match="clamped"):
            balancer(losses)


def test_initial_loss_normalization_with_a_given_prior():
    from lossbalance import InitialLossNormalization

    # the slides' estimate: a uniform K-class prediction starts at log K
    balancer = InitialLossNormalization(3, prior="log-classes", num_classes=[10, None, 4])
    losses = torch.tensor([2.0, 5.0, 1.0], dtype=torch.float64, requires_grad=True)
    balancer(losses)
    expected = torch.tensor([np.log(10), 5.0, np.log(4)], dtype=torch.float64)
    torch.testing.assert_close(balancer.prior, expected)  # only the None entry measured
    torch.testing.assert_close(balancer.last_weights, 1 / expected)
    balancer(torch.tensor([9.0, 9.0, 9.0], dtype=torch.float64, requires_grad=True))
    torch.testing.assert_close(balancer.prior, expected)  # frozen after the warm-up

    given = lossbalance.create("initial-loss", 2, prior=[0.5, 2.0])
    given(torch.tensor([3.0, 3.0], dtype=torch.float64, requires_grad=True))
    torch.testing.assert_close(given.last_weights, torch.tensor([2.0, 0.5], dtype=torch.float64))
    twin = lossbalance.create("initial-loss", 2, prior=[0.5, 2.0])
    twin.load_state_dict(given.state_dict())  # the mask is an argument, not state
    assert "prior=[0.5, 2.0]" in repr(given)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prior": [1.0]}, r"Invalid prior: \[1.0\] \(expected 2 values\)"),
        ({"prior": [1.0, -1.0]}, r"Invalid prior entry: -1.0 \(expected a finite number > 0\)"),
        ({"prior": [1.0, float("inf")]}, r"Invalid prior entry: inf"),
        ({"prior": "log"}, r"Invalid prior: 'log' \(expected 'log-classes' or K values\)"),
        ({"prior": "log-classes"}, r"needs num_classes with one class count per term \(2\)"),
        ({"prior": "log-classes", "num_classes": [1, 3]}, r"Invalid num_classes entry: 1"),
        ({"num_classes": [3, 3]}, r"num_classes is used with prior='log-classes' only"),
    ],
)
def test_initial_loss_prior_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lossbalance.InitialLossNormalization(2, **kwargs)
