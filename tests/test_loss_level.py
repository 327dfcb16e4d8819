"""Loss-level balancers: uniform, fixed, normalisations, GLS, uncertainty, DWA."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lossbalance
from lossbalance import (
    DWA,
    GLS,
    DynamicNormalization,
    FixedWeights,
    InitialLossNormalization,
    LossBalancer,
    LossBalanceWarning,
    UncertaintyWeighting,
    Uniform,
)
from lossbalance.methods._dwa import dwa_weights
from lossbalance.methods._gls import gls_loss

K = 3

FACTORIES: dict[str, Callable[[int], LossBalancer]] = {
    "uniform-sum": lambda k: Uniform(k),
    "uniform-mean": lambda k: Uniform(k, reduction="mean"),
    "fixed": lambda k: FixedWeights(k, [0.5 * (i + 1) for i in range(k)]),
    "initial-loss": lambda k: InitialLossNormalization(k, warmup_steps=2),
    # saved mid-warm-up by the round-trip test (4 steps)
    "initial-loss-long": lambda k: InitialLossNormalization(k, warmup_steps=6),
    "dynamic": lambda k: DynamicNormalization(k),
    "gls": lambda k: GLS(k),
    "gls-gamma": lambda k: GLS(k, gamma=1.5),
    "uncertainty": lambda k: UncertaintyWeighting(
        k, task_types=["regression", "classification", "regression"][:k]
    ),
    "dwa": lambda k: DWA(k, temperature=1.5),
    # saved mid-period by the round-trip test (4 steps)
    "dwa-period": lambda k: DWA(k, temperature=1.5, period=3),
}


def rtol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5


def random_losses(gen: torch.Generator, k: int, device, dtype) -> torch.Tensor:
    # Positive losses over four decades, so the weights are far from uniform.
    exponents = torch.empty(k, dtype=torch.float64).uniform_(-2.0, 2.0, generator=gen)
    return (10.0**exponents).to(device=device, dtype=dtype).requires_grad_()


def build(name: str, k: int, device) -> LossBalancer:
    balancer = FACTORIES[name](k).to(device)
    if isinstance(balancer, UncertaintyWeighting):
        with torch.no_grad():
            balancer.log_vars.copy_(torch.linspace(-1.0, 1.5, k))
    return balancer


# --- the contract shared by every loss-level method ---------------------------------


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_reported_weights_are_the_autograd_gradient(name, device, dtype):
    gen = torch.Generator().manual_seed(0)
    balancer = build(name, K, device)
    assert balancer.last_weights is None
    for _ in range(5):
        losses = random_losses(gen, K, device, dtype)
        combined = balancer(losses)
        assert combined.dim() == 0
        (grad,) = torch.autograd.grad(combined, losses)
        assert balancer.last_weights is not None
        assert not balancer.last_weights.requires_grad
        torch.testing.assert_close(balancer.last_weights, grad, rtol=rtol(dtype), atol=0.0)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trip_continues_bit_identically(name, device, dtype):
    gen = torch.Generator().manual_seed(1)
    balancer = build(name, K, device)
    params = list(balancer.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1) if params else None
    for _ in range(4):
        combined = balancer(random_losses(gen, K, device, dtype))
        if optimizer is not None:
            optimizer.zero_grad()
            combined.backward()
            optimizer.step()
    state = copy.deepcopy(balancer.state_dict())
    fresh = FACTORIES[name](K).to(device)
    fresh.load_state_dict(state)
    for _ in range(3):
        losses = random_losses(gen, K, device, dtype)
        expected = balancer(losses)
        got = fresh(losses)
        assert torch.equal(got, expected)
        assert torch.equal(fresh.last_weights, balancer.last_weights)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_wrong_number_of_losses_is_rejected(name, device, dtype):
    balancer = build(name, K, device)
    with pytest.raises(ValueError, match=r"built for 3 loss terms, got losses of shape \(2,\)"):
        balancer(torch.ones(2, device=device, dtype=dtype))
    with pytest.raises(ValueError, match=r"got losses of shape \(1, 3\)"):
        balancer(torch.ones(1, 3, device=device, dtype=dtype))


@pytest.mark.filterwarnings("ignore:.*nothing to balance:lossbalance.LossBalanceWarning")
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_one_term_is_finite(name, device, dtype):
    balancer = build(name, 1, device)
    gen = torch.Generator().manual_seed(2)
    for _ in range(4):
        losses = random_losses(gen, 1, device, dtype)
        combined = balancer(losses)
        (grad,) = torch.autograd.grad(combined, losses)
        assert torch.isfinite(combined)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize(
    ("name", "cls", "stateful"),
    [
        ("uniform", Uniform, False),
        ("fixed", FixedWeights, False),
        ("initial-loss", InitialLossNormalization, True),
        ("dynamic", DynamicNormalization, False),
        ("gls", GLS, False),
        ("uncertainty", UncertaintyWeighting, True),
        ("dwa", DWA, True),
    ],
)
def test_registry_entries(name, cls, stateful):
    info = lossbalance.get_method(name)
    assert info.name == name
    assert info.needs == "losses"
    assert info.stateful is stateful
    assert info.paper and info.summary
    kwargs = {"weights": [1.0, 2.0]} if name == "fixed" else {}
    balancer = lossbalance.create(name, 2, **kwargs)
    assert type(balancer) is cls
    assert balancer.kind == "loss"
    assert balancer.num_terms == 2


def test_public_names_are_exported():
    for name in (
        "DWA",
        "GLS",
        "DynamicNormalization",
        "FixedWeights",
        "InitialLossNormalization",
        "UncertaintyWeighting",
        "Uniform",
    ):
        assert name in lossbalance.__all__
        assert issubclass(getattr(lossbalance, name), LossBalancer)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: Uniform(2, reduction="max"), r"Invalid reduction: 'max' \(expected one of 'sum', 'mean'\)"),
        (lambda: FixedWeights(3, [1.0, 2.0]), r"Invalid weights: 2 values \(expected 3, one per loss term\)"),
        (lambda: FixedWeights(2, [1.0, -1.0]), r"Invalid weights\[1\]: -1.0 \(expected 0 <= weights\[1\] < inf\)"),
        (lambda: FixedWeights(2, [math.nan, 1.0]), r"Invalid weights\[0\]: nan"),
        (lambda: FixedWeights(2, torch.ones(2, 2)), r"Invalid weights: shape \(2, 2\)"),
        (lambda: InitialLossNormalization(2, warmup_steps=0), r"Invalid warmup_steps: 0 \(expected an integer >= 1\)"),
        (lambda: InitialLossNormalization(2, warmup_steps=1.5), r"Invalid warmup_steps: 1.5"),  # type: ignore[arg-type]
        (lambda: GLS(2, gamma=0.0), r"Invalid gamma: 0.0 \(expected gamma > 0\)"),
        (lambda: GLS(2, gamma=math.inf), r"Invalid gamma: inf \(expected 0 < gamma < inf\)"),
        (lambda: UncertaintyWeighting(2, task_types=["regression"]), r"Invalid task_types: 1 values \(expected 2"),
        (lambda: UncertaintyWeighting(2, task_types=["regression", "segmentation"]), r"Invalid task_types\[1\]: 'segmentation' \(expected one of 'regression', 'classification'\)"),
        (lambda: UncertaintyWeighting(2, task_types="ranking"), r"Invalid task_types: 'ranking'"),
        (lambda: DWA(2, temperature=-1), r"Invalid temperature: -1 \(expected temperature > 0\)"),
        (lambda: DWA(2, temperature=math.inf), r"Invalid temperature: inf"),
        (lambda: DWA(2, period=0), r"Invalid period: 0 \(expected an integer >= 1 or None\)"),
        (lambda: Uniform(0), r"Invalid num_terms: 0"),
    ],
)  # fmt: skip
def test_invalid_hyperparameters(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_fixed_weights_type_errors():
    with pytest.raises(TypeError, match=r"weights\[1\] must be a number, got str"):
        FixedWeights(2, [1.0, "2"])
    with pytest.raises(TypeError, match=r"weights must be a sequence of 2 numbers, got float"):
        FixedWeights(2, 1.0)
    with pytest.raises(TypeError, match=r"gamma must be a float or None, got str"):
        GLS(2, gamma="2")


# --- uniform and fixed ----------------------------------------------------------------


def test_uniform_sum_and_mean(device, dtype):
    losses = torch.tensor([1.0, 2.0, 6.0], device=device, dtype=dtype)
    assert Uniform(3)(losses).item() == 9.0
    mean = Uniform(3, reduction="mean")
    assert mean(losses).item() == 3.0
    torch.testing.assert_close(mean.last_weights, torch.full_like(losses, 1 / 3))


def test_fixed_weights_are_a_buffer_cast_to_the_losses(device, dtype):
    balancer = FixedWeights(3, torch.tensor([0.0, 0.25, 2.0])).to(device)
    assert "weights" in balancer.state_dict()
    assert balancer.weights.dtype == torch.float64
    losses = torch.tensor([5.0, 4.0, 1.5], device=device, dtype=dtype)
    combined = balancer(losses)
    assert combined.dtype == dtype
    assert combined.item() == 4.0
    assert balancer.last_weights.tolist() == [0.0, 0.25, 2.0]


# --- normalisations -------------------------------------------------------------------


@pytest.mark.parametrize("warmup_steps", [1, 3])
def test_initial_loss_prior_averages_the_warmup(warmup_steps, device, dtype):
    gen = torch.Generator().manual_seed(3)
    balancer = InitialLossNormalization(K, warmup_steps=warmup_steps).to(device)
    seen: list[torch.Tensor] = []
    for step in range(6):
        losses = random_losses(gen, K, device, dtype)
        if step < warmup_steps:
            seen.append(losses.detach().to(torch.float64))
        prior = torch.stack(seen).mean(dim=0)
        combined = balancer(losses)
        torch.testing.assert_close(balancer.prior, prior, rtol=1e-12, atol=0.0)
        expected = (losses.detach().to(torch.float64) / prior).sum()
        torch.testing.assert_close(
            combined.to(torch.float64), expected, rtol=10 * rtol(dtype), atol=0.0
        )
    assert int(balancer.num_calls) == warmup_steps


def test_initial_loss_zero_prior_warns_and_stays_finite(device, dtype):
    balancer = InitialLossNormalization(2).to(device)
    losses = torch.tensor([0.0, 2.0], device=device, dtype=dtype, requires_grad=True)
    with pytest.warns(LossBalanceWarning, match="divisor"):
        combined = balancer(losses)
    (grad,) = torch.autograd.grad(combined, losses)
    assert torch.isfinite(combined)
    assert torch.isfinite(grad).all()
    assert torch.isfinite(balancer.last_weights).all()


def test_dynamic_normalization_has_the_gradient_of_the_sum_of_logs(device, dtype):
    gen = torch.Generator().manual_seed(4)
    theta = torch.randn(5, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    theta.requires_grad_()
    scales = torch.tensor([1e-3, 1.0, 1e3], device=device, dtype=dtype)

    def losses_of(t: torch.Tensor) -> torch.Tensor:
        return scales * torch.stack([(t**2).sum() + 0.1, (t - 1).abs().sum(), t.exp().sum()])

    balancer = DynamicNormalization(K)
    combined = balancer(losses_of(theta))
    torch.testing.assert_close(combined.item(), float(K))
    (got,) = torch.autograd.grad(combined, theta)
    (expected,) = torch.autograd.grad(torch.log(losses_of(theta)).sum(), theta)
    torch.testing.assert_close(got, expected, rtol=100 * rtol(dtype), atol=0.0)


@pytest.mark.parametrize("cls", [DynamicNormalization, GLS])
def test_zero_and_negative_losses_warn_and_stay_finite(cls, device, dtype):
    balancer = cls(K)
    losses = torch.tensor([0.0, -1.0, 2.0], device=device, dtype=dtype, requires_grad=True)
    with pytest.warns(LossBalanceWarning):
        combined = balancer(losses)
    (grad,) = torch.autograd.grad(combined, losses)
    assert torch.isfinite(combined)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(balancer.last_weights, grad, rtol=rtol(dtype), atol=0.0)


# --- GLS ------------------------------------------------------------------------------


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    exponents=st.lists(st.floats(-8.0, 8.0), min_size=1, max_size=6),
    gamma=st.one_of(st.none(), st.floats(0.5, 8.0)),
)  # fmt: skip
def test_gls_matches_a_float64_reference_over_sixteen_decades(exponents, gamma, device, dtype):
    values = [10.0**e for e in exponents]
    k = len(values)
    g = float(k) if gamma is None else gamma
    log_reference = math.fsum(math.log(v) for v in values) / g
    # Only where the result and the weights (within 1e+-20 of it) are representable.
    assume(abs(log_reference) + 20.0 * math.log(10.0) < math.log(torch.finfo(dtype).max))
    reference = math.exp(log_reference)
    losses = torch.tensor(values, device=device, dtype=dtype, requires_grad=True)
    combined, weights = gls_loss(losses, gamma)
    (grad,) = torch.autograd.grad(combined, losses)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert math.isclose(combined.item(), reference, rel_tol=tol)
    torch.testing.assert_close(weights, grad, rtol=rtol(dtype), atol=0.0)
    expected = torch.tensor([reference / (g * v) for v in values], dtype=torch.float64)
    torch.testing.assert_close(weights.cpu().to(torch.float64), expected, rtol=tol, atol=0.0)


def test_gls_is_the_geometric_mean_and_scale_equivariant(device, dtype):
    gen = torch.Generator().manual_seed(5)
    losses = random_losses(gen, 4, device, dtype).detach()
    balancer = GLS(4)
    base = balancer(losses)
    # (prod c L_i)^(1/K) = c (prod L_i)^(1/K): scaling every term scales the result.
    torch.testing.assert_close(balancer(1e6 * losses), 1e6 * base, rtol=10 * rtol(dtype), atol=0.0)
    torch.testing.assert_close(balancer(losses[[2, 0, 3, 1]]), base, rtol=rtol(dtype), atol=0.0)
    identical = torch.full((4,), 0.7, device=device, dtype=dtype)
    torch.testing.assert_close(balancer(identical).item(), 0.7, rtol=rtol(dtype), atol=0.0)
    # The weights are the gradient, not 1 / L_i: the two differ by GLS / K.
    one_over = 1.0 / losses
    assert not torch.allclose(balancer.last_weights, one_over)


def test_gls_one_term_warns():
    with pytest.warns(LossBalanceWarning, match="nothing to balance"):
        GLS(1)


# --- uncertainty weighting ------------------------------------------------------------


def test_uncertainty_initial_weights_and_objective(device, dtype):
    balancer = UncertaintyWeighting(2, task_types=["regression", "classification"]).to(device)
    assert [n for n, _ in balancer.named_parameters()] == ["log_vars"]
    assert set(balancer.state_dict()) == {"log_vars"}
    with torch.no_grad():
        balancer.log_vars.copy_(torch.tensor([0.5, -0.25]))
    losses = torch.tensor([2.0, 3.0], device=device, dtype=dtype)
    s = torch.tensor([0.5, -0.25], dtype=torch.float64)
    expected = 0.5 * math.exp(-0.5) * 2.0 + 0.25 + math.exp(0.25) * 3.0 - 0.125
    assert math.isclose(balancer(losses).item(), expected, rel_tol=1e-6)
    torch.testing.assert_close(
        balancer.last_weights.cpu().to(torch.float64),
        torch.tensor([0.5, 1.0], dtype=torch.float64) * torch.exp(-s),
        rtol=1e-6,
        atol=0.0,
    )


def test_uncertainty_single_task_type_applies_to_every_term():
    assert UncertaintyWeighting(3, task_types="classification").task_types == ["classification"] * 3
    assert UncertaintyWeighting(2).task_types == ["regression"] * 2


def test_uncertainty_optimum_is_the_loss_for_regression_and_twice_it_for_classification():
    types = ["regression", "classification", "regression", "classification"]
    losses = torch.tensor([0.03, 0.03, 2.0, 50.0], dtype=torch.float64)
    optimum = torch.tensor([1.0, 2.0, 1.0, 2.0], dtype=torch.float64) * losses
    balancer = UncertaintyWeighting(4, task_types=types).double()
    optimizer = torch.optim.LBFGS(
        balancer.parameters(), lr=1.0, max_iter=200, tolerance_grad=1e-12,
        tolerance_change=1e-15, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        objective = balancer(losses)
        objective.backward()
        return objective

    optimizer.step(closure)
    torch.testing.assert_close(balancer.log_vars.detach().exp(), optimum, rtol=1e-6, atol=0.0)
    # At the optimum every term is weighted 1 / (2 L), whatever its type.
    torch.testing.assert_close(balancer.last_weights, 0.5 / losses, rtol=1e-6, atol=0.0)

    # Stationarity at the closed form: d/ds [c exp(-s) L + s / 2] = 0 at exp(s) = L / (2c).
    with torch.no_grad():
        balancer.log_vars.copy_(optimum.log())
    (grad,) = torch.autograd.grad(balancer(losses), balancer.log_vars)
    torch.testing.assert_close(grad, torch.zeros(4, dtype=torch.float64), rtol=0.0, atol=1e-12)
    # ... and the other form's optimum is not stationary here (the test can fail).
    with torch.no_grad():
        balancer.log_vars.copy_(losses.log())
    (grad,) = torch.autograd.grad(balancer(losses), balancer.log_vars)
    assert grad[1].abs() > 0.1 and grad[3].abs() > 0.1


def test_uncertainty_nonpositive_loss_warns(device, dtype):
    balancer = UncertaintyWeighting(2).to(device)
    with pytest.warns(LossBalanceWarning, match="no minimum"):
        combined = balancer(torch.tensor([0.0, 1.0], device=device, dtype=dtype))
    assert torch.isfinite(combined)


# --- DWA ------------------------------------------------------------------------------


def dwa_reference(
    sequence: list[list[float]], temperature: float, period: int
) -> list[list[float]]:
    """Plain-Python float64 DWA, written from the paper's formula."""
    k = len(sequence[0])
    means: list[list[float]] = []
    current: list[list[float]] = []
    out = []
    for losses in sequence:
        if len(means) < 2:
            out.append([1.0] * k)
        else:
            rates = [means[-1][i] / means[-2][i] for i in range(k)]
            exps = [math.exp(r / temperature) for r in rates]
            out.append([k * e / sum(exps) for e in exps])
        current.append(losses)
        if len(current) == period:
            means.append([math.fsum(row[i] for row in current) / period for i in range(k)])
            current = []
    return out


@pytest.mark.parametrize(("temperature", "period"), [(2.0, 1), (0.5, 1), (2.0, 3)])
def test_dwa_follows_the_formula_on_a_hand_built_sequence(temperature, period, device, dtype):
    sequence = [
        [1.0, 2.0, 4.0],
        [0.9, 2.0, 3.0],
        [0.5, 1.9, 2.0],
        [0.5, 1.0, 1.8],
        [0.45, 0.9, 1.0],
        [0.44, 0.5, 0.9],
        [0.3, 0.45, 0.8],
        [0.25, 0.44, 0.6],
        [0.2, 0.4, 0.3],
        [0.19, 0.3, 0.25],
    ]
    expected = dwa_reference(sequence, temperature, period)
    balancer = DWA(3, temperature=temperature, period=period).to(device)
    for step, (losses, weights) in enumerate(zip(sequence, expected, strict=True)):
        x = torch.tensor(losses, device=device, dtype=dtype, requires_grad=True)
        combined = balancer(x)
        got = balancer.last_weights.cpu().to(torch.float64)
        want = torch.tensor(weights, dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=10 * rtol(dtype), atol=0.0)
        assert math.isclose(got.sum().item(), 3.0, rel_tol=1e-6)
        if step < 2 * period:
            assert got.tolist() == [1.0, 1.0, 1.0]
        else:
            assert not torch.allclose(got, torch.ones(3, dtype=torch.float64))
        assert math.isclose(
            combined.item(), sum(w * v for w, v in zip(weights, losses, strict=True)), rel_tol=1e-5
        )
    assert int(balancer.num_periods) == len(sequence) // period


def test_dwa_slowest_decreasing_term_gets_the_largest_weight():
    weights = dwa_weights(
        torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64),
        torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
        temperature=2.0,
    )
    assert weights.argsort().tolist() == [0, 1, 2]
    assert math.isclose(weights.sum().item(), 3.0, rel_tol=1e-12)


def test_dwa_advance_closes_periods_and_ignores_empty_ones(device, dtype):
    balancer = DWA(2, period=None).to(device)

    def step(values: list[float]) -> None:
        balancer(torch.tensor(values, device=device, dtype=dtype))

    step([4.0, 1.0])
    step([2.0, 3.0])  # first "epoch" mean: [3, 2]
    balancer.advance()
    balancer.advance()  # empty period: no-op
    assert int(balancer.num_periods) == 1
    step([3.0, 1.0])  # second "epoch" mean: [3, 1]
    assert balancer.last_weights.tolist() == [1.0, 1.0]
    balancer.advance()
    step([1.0, 1.0])
    # rates [1, 0.5], T = 2: w = 2 softmax([0.5, 0.25])
    e = [math.exp(0.5), math.exp(0.25)]
    want = torch.tensor([2 * e[0] / sum(e), 2 * e[1] / sum(e)], dtype=torch.float64)
    torch.testing.assert_close(
        balancer.last_weights.cpu().to(torch.float64), want, rtol=rtol(dtype), atol=0.0
    )
    torch.testing.assert_close(
        balancer.history.cpu(), torch.tensor([[3.0, 1.0], [3.0, 2.0]], dtype=torch.float64)
    )


def test_dwa_zero_and_nonfinite_means_warn_and_stay_finite(device, dtype):
    balancer = DWA(2).to(device)
    balancer(torch.tensor([0.0, 1.0], device=device, dtype=dtype))
    balancer(torch.tensor([1.0, 1.0], device=device, dtype=dtype))
    with pytest.warns(LossBalanceWarning, match="clamped"):
        balancer(torch.tensor([1.0, 1.0], device=device, dtype=dtype))
    assert torch.isfinite(balancer.last_weights).all()
    assert math.isclose(balancer.last_weights.sum().item(), 2.0, rel_tol=1e-6)

    balancer = DWA(2).to(device)
    balancer(torch.tensor([math.nan, 1.0], device=device, dtype=dtype))
    balancer(torch.tensor([1.0, 1.0], device=device, dtype=dtype))
    with pytest.warns(LossBalanceWarning, match="non-finite"):
        balancer(torch.tensor([1.0, 1.0], device=device, dtype=dtype))
    assert balancer.last_weights.tolist() == [1.0, 1.0]


def test_dwa_one_term_warns():
    with pytest.warns(LossBalanceWarning, match="nothing to balance"):
        DWA(1)
