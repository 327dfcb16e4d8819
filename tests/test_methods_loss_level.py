"""RLW, FAMO, STCH (loss level) and EnCodec's balancer (feature level), issue 17.

Oracles: TorchJD's ``RandomWeighting`` and LibMTL's ``RLW`` (the installed LibMTL 1.1.5 has
no FAMO, STCH or ExcessMTL; those are checked against plain float64 references of the
papers' and authors' algorithms written here, with ``torch.optim.Adam`` as the reference
of FAMO's logit optimiser).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import lossbalance
from lossbalance import LossBalanceWarning
from lossbalance._registry import create, get_method
from lossbalance.methods._encodec import EnCodecBalancer, encodec_weights
from lossbalance.methods._excess_mtl import ExcessMTL, excess_risks
from lossbalance.methods._famo import FAMO, famo_logit_grad
from lossbalance.methods._metabalance import MetaBalance
from lossbalance.methods._rlw import RandomLossWeighting, rlw_weights
from lossbalance.methods._stch import STCH, stch_loss

F64 = torch.float64


def positive_losses(gen: torch.Generator, k: int, dtype=F64) -> torch.Tensor:
    exponents = torch.empty(k, dtype=F64).uniform_(-2.0, 2.0, generator=gen)
    return (10.0**exponents).to(dtype).requires_grad_()


# --- the shared contract ------------------------------------------------------------


LOSS_LEVEL = {
    "rlw": lambda k: RandomLossWeighting(k, seed=3),
    "rlw-dirichlet": lambda k: RandomLossWeighting(k, "dirichlet", concentration=0.5, seed=3),
    "famo": lambda k: FAMO(k, delayed=True),
    "stch": lambda k: STCH(k, mu=0.5),
    # saved mid-warm-up by the round-trip test (4 steps)
    "stch-warmup": lambda k: STCH(k, mu=0.5, warmup_steps=6, estimate_steps=3),
    "stch-raw": lambda k: STCH(k, mu=0.2, preferences=[1.0, 2.0, 0.5][:k], log_losses=False),
}


@pytest.mark.parametrize("name", sorted(LOSS_LEVEL))
def test_reported_weights_are_the_autograd_gradient(name, dtype):
    gen = torch.Generator().manual_seed(0)
    balancer = LOSS_LEVEL[name](3)
    for _ in range(8):
        losses = positive_losses(gen, 3, dtype)
        combined = balancer(losses)
        (grad,) = torch.autograd.grad(combined, losses)
        torch.testing.assert_close(balancer.last_weights, grad, rtol=1e-5, atol=0)
        assert bool(torch.isfinite(combined))


@pytest.mark.parametrize("name", sorted(LOSS_LEVEL))
def test_state_dict_round_trip_continues_bit_identically(name, dtype):
    gen = torch.Generator().manual_seed(1)
    sequence = [positive_losses(gen, 3, dtype) for _ in range(8)]
    original = LOSS_LEVEL[name](3)
    for losses in sequence[:4]:
        original(losses)
    saved = copy.deepcopy(original.state_dict())
    resumed = LOSS_LEVEL[name](3)
    if isinstance(resumed, RandomLossWeighting):
        resumed.generator.manual_seed(12345)  # the state must come from the state_dict
    resumed.load_state_dict(saved)
    for losses in sequence[4:]:
        a, b = original(losses), resumed(losses)
        assert torch.equal(a, b)
        assert torch.equal(original.last_weights, resumed.last_weights)


@pytest.mark.parametrize("name", sorted(LOSS_LEVEL))
def test_wrong_number_of_losses_is_rejected(name):
    with pytest.raises(ValueError, match="built for 3 loss terms"):
        LOSS_LEVEL[name](3)(torch.ones(2, requires_grad=True))


@pytest.mark.parametrize("name", sorted(LOSS_LEVEL))
def test_one_term_is_finite_and_warns(name):
    with pytest.warns(LossBalanceWarning, match="num_terms=1 has nothing to balance"):
        balancer = LOSS_LEVEL[name](1)
    for value in (2.0, 0.5, 3.0):
        combined = balancer(torch.tensor([value], dtype=F64, requires_grad=True))
        assert bool(torch.isfinite(combined))
        assert bool(torch.isfinite(balancer.last_weights).all())


@pytest.mark.parametrize(
    ("name", "cls", "needs"),
    [
        ("rlw", RandomLossWeighting, "losses"),
        ("famo", FAMO, "losses"),
        ("stch", STCH, "losses"),
        ("encodec", EnCodecBalancer, "gramian"),
    ],
)
def test_registry_entries(name, cls, needs):
    info = get_method(name)
    assert info.factory is cls and info.needs == needs and info.stateful
    assert isinstance(create(name, 3), cls)
    assert name in lossbalance.available_methods()


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: RandomLossWeighting(2, "gauss"), r"Invalid distribution: 'gauss' \(expected one"),
        (lambda: RandomLossWeighting(2, std=0.0), r"Invalid std: 0.0 \(expected std > 0\)"),
        (lambda: RandomLossWeighting(2, std=math.inf), r"Invalid std: inf"),
        (lambda: RandomLossWeighting(2, concentration=-1), r"Invalid concentration: -1"),
        (
            lambda: RandomLossWeighting(2, seed=-1),
            r"Invalid seed: -1 \(expected None or an integer >= 0\)",
        ),
        (lambda: RandomLossWeighting(0), r"Invalid num_terms: 0"),
        (lambda: FAMO(2, lr=0.0), r"Invalid lr: 0.0 \(expected lr > 0\)"),
        (lambda: FAMO(2, gamma=-0.1), r"Invalid gamma: -0.1 \(expected gamma >= 0\)"),
        (lambda: FAMO(2, betas=(1.0, 0.9)), r"Invalid betas\[0\]: 1.0"),
        (lambda: FAMO(2, eps=0.0), r"Invalid eps: 0.0 \(expected eps > 0\)"),
        (lambda: FAMO(2, min_losses=[0.0]), r"Invalid min_losses: \[0.0\] \(expected a finite"),
        (lambda: STCH(2, mu=-1), r"Invalid mu: -1 \(expected mu > 0\)"),
        (lambda: STCH(2, mu=math.inf), r"Invalid mu: inf \(expected 0 < mu < inf\)"),
        (lambda: STCH(2, preferences=[1.0, 0.0]), r"Invalid preferences: \[1.0, 0.0\]"),
        (lambda: STCH(2, warmup_steps=-2), r"Invalid warmup_steps: -2"),
        (lambda: STCH(2, warmup_steps=3, estimate_steps=4), r"Invalid estimate_steps: 4"),
        (lambda: STCH(2, ideal=0.0, warmup_steps=3), r"Invalid ideal: given together"),
        (lambda: STCH(2, ideal=[0.0, 1.0, 2.0]), r"Invalid ideal: \[0.0, 1.0, 2.0\]"),
        (lambda: EnCodecBalancer(2, weights=[1.0, -1.0]), r"Invalid weights: \[1.0, -1.0\]"),
        (lambda: EnCodecBalancer(2, total_norm=0), r"Invalid total_norm: 0 \(expected"),
        (lambda: EnCodecBalancer(2, ema_decay=1.5), r"Invalid ema_decay: 1.5"),
        (lambda: EnCodecBalancer(2, eps=-1e-3), r"Invalid eps: -0.001 \(expected eps >= 0\)"),
    ],
)
def test_invalid_hyperparameters(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


# --- RLW ------------------------------------------------------------------------------


def test_rlw_matches_torchjd_random_weighting_on_the_same_seed():
    from torchjd.aggregation._random import RandomWeighting

    k = 5
    oracle = RandomWeighting()
    balancer = RandomLossWeighting(k, seed=7)
    torch.manual_seed(7)
    for _ in range(6):
        expected = oracle(torch.zeros(k, 3, dtype=F64))
        balancer(torch.ones(k, dtype=F64, requires_grad=True))
        torch.testing.assert_close(balancer.last_weights, expected, rtol=1e-12, atol=0)


def _load_libmtl_weighting(name: str) -> type:
    """A LibMTL weighting class, loaded from its file: the package ``__init__`` imports
    torchvision (absent), so the two modules needed are loaded on their own."""
    spec = importlib.util.find_spec("LibMTL")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("LibMTL is not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "weighting"
    saved = {key: sys.modules.get(key) for key in ("LibMTL", "LibMTL.weighting")}
    for key in saved:
        sys.modules[key] = types.ModuleType(key)
    try:
        modules = {}
        for mod in ("abstract_weighting", name):
            full = f"LibMTL.weighting.{mod}"
            mspec = importlib.util.spec_from_file_location(full, root / f"{mod}.py")
            assert mspec is not None and mspec.loader is not None
            module = importlib.util.module_from_spec(mspec)
            sys.modules[full] = module
            mspec.loader.exec_module(module)
            modules[mod] = module
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
        for mod in ("abstract_weighting", name):
            sys.modules.pop(f"LibMTL.weighting.{mod}", None)
    return getattr(modules[name], name)


def test_rlw_matches_libmtl_rlw_on_the_same_seed():
    rlw_cls = _load_libmtl_weighting("RLW")
    k = 4
    oracle = rlw_cls()
    oracle.task_num, oracle.device = k, torch.device("cpu")
    balancer = RandomLossWeighting(k, seed=11)
    torch.manual_seed(11)
    for _ in range(5):
        losses = torch.rand(k, generator=torch.Generator().manual_seed(0)).requires_grad_()
        expected = oracle.backward(losses, dist="Normal")
        balancer(torch.ones(k, requires_grad=True))
        torch.testing.assert_close(
            balancer.last_weights, torch.as_tensor(expected), rtol=1e-6, atol=0
        )


@pytest.mark.parametrize(
    ("distribution", "kwargs"),
    [
        ("normal", {}),
        ("normal", {"std": 3.0}),
        ("uniform", {}),
        ("dirichlet", {}),
        ("dirichlet", {"concentration": 0.4}),
        ("dirichlet", {"concentration": 3.0}),
    ],
)
def test_rlw_weights_are_on_the_simplex_with_mean_one_over_k(distribution, kwargs):
    k, n = 4, 20000
    gen = torch.Generator().manual_seed(5)
    draws = rlw_weights(k, gen, distribution, **kwargs, num_draws=n)
    assert bool((draws > 0).all())
    torch.testing.assert_close(draws.sum(1), torch.ones(n, dtype=F64), rtol=1e-12, atol=0)
    # the distributions are exchangeable: E[w_i] = 1/K for every term
    stderr = draws.std(0) / math.sqrt(n)
    assert bool(((draws.mean(0) - 1 / k).abs() < 5 * stderr).all())


@pytest.mark.parametrize("concentration", [0.4, 1.0, 3.0])
def test_rlw_dirichlet_matches_the_dirichlet_moments_and_quantiles(concentration):
    k, n = 3, 20000
    gen = torch.Generator().manual_seed(6)
    draws = rlw_weights(k, gen, "dirichlet", concentration=concentration, num_draws=n)
    a0 = k * concentration
    variance = (k - 1) / (k**2 * (a0 + 1))  # Var w_i of a symmetric Dirichlet
    torch.testing.assert_close(
        draws.var(0), torch.full((k,), variance, dtype=F64), rtol=0.05, atol=0
    )
    # against torch's own (independent) Dirichlet sampler: same marginal quantiles
    torch.manual_seed(0)
    reference = torch.distributions.Dirichlet(torch.full((k,), concentration, dtype=F64)).sample(
        (n,)
    )
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=F64)
    torch.testing.assert_close(
        torch.quantile(draws[:, 0], q), torch.quantile(reference[:, 0], q), rtol=0.05, atol=0.01
    )


def test_rlw_uses_only_its_own_generator():
    balancer = RandomLossWeighting(3, seed=0)
    state = torch.random.get_rng_state()
    balancer(torch.ones(3, requires_grad=True))
    assert torch.equal(torch.random.get_rng_state(), state)
    twin = RandomLossWeighting(3, seed=0)
    twin(torch.ones(3, requires_grad=True))
    assert torch.equal(balancer.last_weights, twin.last_weights)


def test_rlw_without_a_seed_is_reproducible_under_manual_seed():
    torch.manual_seed(4)
    a = RandomLossWeighting(3)
    torch.manual_seed(4)
    b = RandomLossWeighting(3)
    assert a.seed == b.seed
    assert torch.equal(a.sample(), b.sample())


# --- FAMO -----------------------------------------------------------------------------


class _FamoReference:
    """The authors' algorithm in float64 with ``torch.optim.Adam`` on the logits."""

    def __init__(self, k: int, lr: float, gamma: float, bounds: torch.Tensor) -> None:
        self.xi = torch.zeros(k, dtype=F64, requires_grad=True)
        self.opt = torch.optim.Adam([self.xi], lr=lr, weight_decay=gamma)
        self.bounds = bounds

    def loss(self, losses: torch.Tensor) -> torch.Tensor:
        self.prev = losses.detach()
        z = torch.softmax(self.xi.detach(), 0)
        d = losses - self.bounds
        return (torch.log(d) * z / (z / d.detach()).sum()).sum()

    def update(self, new: torch.Tensor) -> None:
        delta = torch.log(self.prev - self.bounds) - torch.log(new - self.bounds)
        (grad,) = torch.autograd.grad(torch.softmax(self.xi, 0), self.xi, grad_outputs=delta)
        self.opt.zero_grad()
        self.xi.grad = grad
        self.opt.step()


@pytest.mark.parametrize(("gamma", "bounds"), [(0.0, 0.0), (0.01, 0.0), (1e-3, [0.1, 0.0, 0.3])])
def test_famo_matches_the_authors_algorithm_with_torch_adam(gamma, bounds):
    k = 3
    balancer = FAMO(k, lr=0.05, gamma=gamma, min_losses=bounds)
    reference = _FamoReference(k, 0.05, gamma, torch.as_tensor(bounds, dtype=F64).expand(k))
    gen = torch.Generator().manual_seed(2)
    current = 1.0 + positive_losses(gen, k).detach()
    for _ in range(12):
        losses = current.clone().requires_grad_()
        combined = balancer(losses)
        (grad,) = torch.autograd.grad(combined, losses)
        ref_losses = current.clone().requires_grad_()
        (ref_grad,) = torch.autograd.grad(reference.loss(ref_losses), ref_losses)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad.sum(), torch.tensor(1.0, dtype=F64))
        current = current * torch.empty(k, dtype=F64).uniform_(0.7, 1.05, generator=gen)
        balancer.update(current)
        reference.update(current)
        torch.testing.assert_close(balancer.logits, reference.xi.detach(), rtol=1e-12, atol=1e-15)


def test_famo_logit_gradient_vanishes_exactly_at_equal_decrease_rates():
    gen = torch.Generator().manual_seed(3)
    xi = torch.randn(5, dtype=F64, generator=gen)
    assert float(famo_logit_grad(xi, torch.full((5,), 0.37, dtype=F64)).abs().max()) < 1e-16
    delta = torch.randn(5, dtype=F64, generator=gen)
    grad = famo_logit_grad(xi, delta)
    assert abs(float(grad.sum())) < 1e-15  # moves along the simplex only
    # a descent direction of z . delta: the term that decreased least gains weight
    assert float(grad[delta.argmin()]) < 0 < float(grad[delta.argmax()])


def _famo_rates(balancer, steps: int) -> torch.Tensor:
    # L_i = exp(-k_i theta_i): the log-loss decrease of term i is lr w_i L_i k_i^2
    k = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    theta = torch.zeros(3, dtype=F64, requires_grad=True)
    optimizer = torch.optim.SGD([theta], lr=0.01)
    rates = torch.zeros(3, dtype=F64)
    for _ in range(steps):
        losses = torch.exp(-k * theta)
        optimizer.zero_grad()
        lossbalance.backward(list(losses.unbind()), balancer)
        optimizer.step()
        with torch.no_grad():
            new = torch.exp(-k * theta)
        rates = torch.log(losses.detach()) - torch.log(new)
        if isinstance(balancer, FAMO):
            balancer.update(new)
    return rates


def test_famo_equalises_the_log_loss_decrease_rates_through_backward():
    rates = _famo_rates(FAMO(3, lr=0.05, gamma=0.0), 300)
    # the same weighting with logits frozen at 0: rates in the ratio of k^2
    baseline = _famo_rates(FAMO(3, lr=1e-300, gamma=0.0), 300)
    assert float(baseline.max() / baseline.min()) > 15.0
    assert float(rates.max() / rates.min()) < 1.05


def test_famo_is_invariant_to_the_scale_of_a_term():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(16, 3, dtype=F64)
    model = model.to(F64)
    scales = torch.tensor([1.0, 1e6], dtype=F64)

    def run(scale: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        net = copy.deepcopy(model)
        famo = FAMO(2, lr=0.1)
        directions = []
        for _ in range(4):
            out = net(x)
            losses = [scale[0] * out[:, 0].pow(2).mean(), scale[1] * (out[:, 1] - 1).pow(2).mean()]
            net.zero_grad()
            lossbalance.backward(losses, famo)
            grad = torch.cat([p.grad.flatten() for p in net.parameters()])
            directions.append(grad / grad.norm())
            with torch.no_grad():
                for p in net.parameters():
                    p.sub_(0.05 * p.grad / p.grad.norm())  # a step of fixed length
                out = net(x)
                famo.update(
                    torch.stack(
                        [
                            scale[0] * out[:, 0].pow(2).mean(),
                            scale[1] * (out[:, 1] - 1).pow(2).mean(),
                        ]
                    )
                )
        return directions, famo.logits.clone()

    plain, plain_logits = run(torch.ones(2, dtype=F64))
    scaled, scaled_logits = run(scales)
    for a, b in zip(plain, scaled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(plain_logits, scaled_logits, rtol=1e-9, atol=1e-12)


def test_famo_delayed_updates_with_the_next_losses():
    gen = torch.Generator().manual_seed(4)
    sequence = [positive_losses(gen, 3) for _ in range(5)]
    delayed, explicit = FAMO(3, delayed=True), FAMO(3)
    for i, losses in enumerate(sequence):
        delayed(losses)
        if i > 0:
            explicit.update(losses.detach())
        explicit(losses)
        torch.testing.assert_close(delayed.logits, explicit.logits, rtol=0, atol=0)


def test_famo_update_needs_a_forward_and_a_second_forward_warns():
    famo = FAMO(2)
    with pytest.raises(RuntimeError, match=r"needs the losses of a forward\(\)"):
        famo.update(torch.ones(2))
    famo(torch.ones(2, requires_grad=True))
    with pytest.warns(LossBalanceWarning, match="without FAMO.update"):
        famo(torch.ones(2, requires_grad=True))
    famo.update([torch.tensor(1.0), torch.tensor(0.5)])  # a sequence of scalars too
    assert float(famo.logits[0]) > float(famo.logits[1])
    with pytest.raises(RuntimeError, match="needs the losses"):
        famo.update(torch.ones(2))  # one update per forward


def test_famo_zero_negative_and_nonfinite_losses_warn_and_stay_finite():
    famo = FAMO(2)
    with pytest.warns(LossBalanceWarning, match="at or below its lower bound"):
        combined = famo(torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True))
    assert bool(torch.isfinite(combined)) and bool(torch.isfinite(famo.last_weights).all())
    famo.update(torch.tensor([-1.0, 0.5], dtype=F64))
    assert bool(torch.isfinite(famo.logits).all())
    famo(torch.ones(2, dtype=F64, requires_grad=True))
    before = famo.logits.clone()
    with pytest.warns(LossBalanceWarning, match="non-finite losses"):
        famo.update(torch.tensor([math.nan, 1.0], dtype=F64))
    assert torch.equal(famo.logits, before)


# --- STCH -----------------------------------------------------------------------------


@pytest.mark.parametrize("log_losses", [True, False])
def test_stch_is_within_mu_log_k_of_the_tchebycheff_max(log_losses):
    gen = torch.Generator().manual_seed(7)
    k = 4
    preferences = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=F64)
    ideal = torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=F64)
    for mu in (10.0, 1.0, 0.1, 1e-3, 1e-6):
        stch = STCH(k, mu=mu, preferences=preferences, ideal=ideal, log_losses=log_losses)
        losses = positive_losses(gen, k)
        f = torch.log(losses) if log_losses else losses
        tch = float((preferences * (f - ideal)).max().detach())
        value = float(stch(losses).detach())
        assert tch - 1e-12 <= value <= tch + mu * math.log(k) + 1e-12
        # the weights (in f) concentrate on the argmax as mu -> 0
        w_f = stch.last_weights * (losses.detach() if log_losses else 1.0)
        if mu <= 1e-3:
            top = int((preferences * (f - ideal)).argmax())
            torch.testing.assert_close(
                w_f,
                preferences * torch.nn.functional.one_hot(torch.tensor(top), k),
                rtol=0,
                atol=1e-12,
            )


def test_stch_large_mu_tends_to_the_preference_weighted_mean():
    losses = torch.tensor([0.3, 2.0, 5.0], dtype=F64, requires_grad=True)
    stch = STCH(3, mu=1e8, preferences=[1.0, 2.0, 3.0], log_losses=False)
    stch(losses)
    torch.testing.assert_close(
        stch.last_weights, torch.tensor([1.0, 2.0, 3.0], dtype=F64) / 3, rtol=1e-6, atol=0
    )


def test_stch_warmup_estimates_the_ideal_point_as_the_authors_code():
    # the authors' multi-task STCH: sum of log-losses during the warm-up, then
    # mu logsumexp(log(L / nadir) / mu) with the nadir the mean loss of the last
    # warm-up "epoch" (here the last 3 of 5 warm-up steps); their factor K is left out
    gen = torch.Generator().manual_seed(8)
    mu, k = 0.3, 3
    stch = STCH(k, mu=mu, warmup_steps=5, estimate_steps=3)
    sequence = [positive_losses(gen, k) for _ in range(9)]
    for i, losses in enumerate(sequence[:5]):
        value = stch(losses)
        torch.testing.assert_close(value, torch.log(losses).sum())
        torch.testing.assert_close(stch.last_weights, 1.0 / losses.detach())
        assert bool(torch.isnan(stch.ideal).all()) == (i < 4)
    nadir = torch.stack([s.detach() for s in sequence[2:5]]).mean(0)
    torch.testing.assert_close(stch.ideal, torch.log(nadir), rtol=1e-14, atol=0)
    for losses in sequence[5:]:
        expected = mu * torch.logsumexp(torch.log(losses / nadir) / mu, 0)
        torch.testing.assert_close(stch(losses), expected, rtol=1e-12, atol=0)


def test_stch_function_weights_are_its_gradient():
    gen = torch.Generator().manual_seed(9)
    f = torch.randn(5, dtype=F64, generator=gen, requires_grad=True)
    ideal, lam = torch.randn(5, dtype=F64, generator=gen), torch.rand(5, dtype=F64, generator=gen)
    value, weights = stch_loss(f, ideal, lam + 0.1, 0.2)
    (grad,) = torch.autograd.grad(value, f)
    torch.testing.assert_close(weights, grad, rtol=1e-12, atol=0)


def test_stch_zero_and_negative_losses_warn_and_stay_finite():
    stch = STCH(2)
    with pytest.warns(LossBalanceWarning, match="zero or negative"):
        value = stch(torch.tensor([0.0, -1.0], dtype=F64, requires_grad=True))
    assert bool(torch.isfinite(value)) and bool(torch.isfinite(stch.last_weights).all())
    warm = STCH(2, warmup_steps=1)
    with pytest.warns(LossBalanceWarning, match="warm-up mean loss is <="):
        warm(torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True))
    assert bool(torch.isfinite(warm.ideal).all())


def test_stch_through_backward_writes_the_weighted_gradient():
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2).to(F64)
    x = torch.randn(8, 3, dtype=F64)
    stch = STCH(2, mu=0.1)
    out = model(x)
    losses = [out[:, 0].pow(2).mean(), (out[:, 1] - 2).pow(2).mean()]
    expected_w = stch(torch.stack([loss.detach() for loss in losses]).requires_grad_())
    del expected_w
    w = stch.last_weights.clone()
    grads = [
        torch.autograd.grad(loss, list(model.parameters()), retain_graph=True) for loss in losses
    ]
    weights = lossbalance.backward(losses, STCH(2, mu=0.1))
    torch.testing.assert_close(weights, w)
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(p.grad, w[0] * grads[0][i] + w[1] * grads[1][i])


def test_rlw_through_backward_writes_the_weighted_gradient():
    torch.manual_seed(2)
    model = torch.nn.Linear(3, 3).to(F64)
    out = model(torch.randn(8, 3, dtype=F64))
    losses = [out[:, i].pow(2).mean() for i in range(3)]
    grads = [torch.autograd.grad(loss, model.weight, retain_graph=True)[0] for loss in losses]
    w = RandomLossWeighting(3, seed=5).sample()
    weights = lossbalance.backward(losses, RandomLossWeighting(3, seed=5))
    torch.testing.assert_close(weights, w)
    torch.testing.assert_close(model.weight.grad, sum(wi * g for wi, g in zip(w, grads)))


# --- EnCodec --------------------------------------------------------------------------


def _encodec_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))
    return model.to(F64), torch.randn(10, 4, dtype=F64), torch.randn(10, 5, dtype=F64)


def _encodec_losses(y, target, scale=(1.0, 1.0, 1.0)):
    return [
        scale[0] * (y - target).pow(2).mean(),
        scale[1] * (y - target).abs().mean(),
        scale[2] * torch.nn.functional.softplus(-y).mean(),
    ]


def test_encodec_output_gradient_shares_equal_the_weights():
    model, x, target = _encodec_problem()
    ratios = torch.tensor([2.0, 1.0, 1.0], dtype=F64)
    balancer = EnCodecBalancer(3, weights=ratios, total_norm=3.0, ema_decay=0.0, eps=0.0)
    y = model(x)
    losses = _encodec_losses(y, target)
    g = [torch.autograd.grad(loss, y, retain_graph=True)[0] for loss in losses]
    alpha = lossbalance.backward(losses, balancer, shared=model, features=y)
    # each term's rescaled output gradient has norm r_i total_norm
    shares = torch.stack([a * gi.norm() for a, gi in zip(alpha, g)])
    torch.testing.assert_close(shares, 3.0 * ratios / ratios.sum(), rtol=1e-12, atol=0)
    # and the model got the one output gradient sum_i alpha_i g_i backpropagated once
    out_grad = sum(a * gi for a, gi in zip(alpha, g))
    expected = torch.autograd.grad(model(x), list(model.parameters()), grad_outputs=out_grad)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-15)


def test_encodec_moving_average_is_the_authors_bias_corrected_one():
    gen = torch.Generator().manual_seed(3)
    beta = 0.9
    balancer = EnCodecBalancer(2, weights=[1.0, 3.0], ema_decay=beta)
    total, fix = torch.zeros(2, dtype=F64), 0.0
    for _ in range(6):
        m = torch.randn(2, 7, dtype=F64, generator=gen) * torch.tensor([[1.0], [50.0]], dtype=F64)
        alpha = balancer.weights(m @ m.T, torch.ones(2, dtype=F64))
        total, fix = beta * total + m.norm(dim=1), beta * fix + 1.0
        expected = torch.tensor([0.25, 0.75], dtype=F64) / (1e-12 + total / fix)
        torch.testing.assert_close(alpha, expected, rtol=1e-12, atol=0)
    mean = EnCodecBalancer(1, ema_decay=1.0)
    for norm in (1.0, 2.0, 6.0):
        alpha = mean.weights(torch.tensor([[norm**2]], dtype=F64), torch.ones(1, dtype=F64))
    torch.testing.assert_close(alpha, torch.tensor([1 / (1e-12 + 3.0)], dtype=F64))


def test_encodec_is_invariant_to_the_scale_of_a_term():
    def run(scale):
        model, x, target = _encodec_problem(1)
        # eps = 0: the default 1e-12 added to a norm of 1e-4 breaks the invariance at 1e-8
        balancer = EnCodecBalancer(3, ema_decay=0.8, eps=0.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            optimizer.zero_grad()
            y = model(x)
            lossbalance.backward(
                _encodec_losses(y, target, scale), balancer, shared=model, features=y
            )
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run((1.0, 1.0, 1.0)), run((1e-4, 1.0, 1e5)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_encodec_function_and_degenerate_inputs():
    alpha = encodec_weights(torch.tensor([2.0, 0.5], dtype=F64), torch.tensor([1.0, 1.0]), 4.0, 0.0)
    torch.testing.assert_close(alpha, torch.tensor([1.0, 4.0], dtype=F64))
    balancer = EnCodecBalancer(2, eps=0.0)
    gram = torch.tensor([[0.0, 0.0], [0.0, 4.0]], dtype=F64)
    with pytest.warns(LossBalanceWarning, match="output gradient has been zero"):
        alpha = balancer.weights(gram, torch.ones(2, dtype=F64))
    torch.testing.assert_close(alpha, torch.tensor([0.0, 0.25], dtype=F64))
    # K = 1: the gradient is rescaled to total_norm
    one = EnCodecBalancer(1, total_norm=2.0, ema_decay=0.0, eps=0.0)
    torch.testing.assert_close(
        one.weights(torch.tensor([[16.0]], dtype=F64), torch.ones(1, dtype=F64)),
        torch.tensor([0.5], dtype=F64),
    )


def test_encodec_state_dict_round_trip_continues_bit_identically():
    gen = torch.Generator().manual_seed(4)
    grams = []
    for _ in range(6):
        m = torch.randn(3, 5, dtype=F64, generator=gen)
        grams.append(m @ m.T)
    original = EnCodecBalancer(3, weights=[1.0, 2.0, 3.0], ema_decay=0.7)
    for g in grams[:3]:
        original.weights(g, torch.ones(3, dtype=F64))
    resumed = EnCodecBalancer(3, weights=[1.0, 2.0, 3.0], ema_decay=0.7)
    resumed.load_state_dict(copy.deepcopy(original.state_dict()))
    for g in grams[3:]:
        a = original.weights(g, torch.ones(3, dtype=F64))
        b = resumed.weights(g, torch.ones(3, dtype=F64))
        assert torch.equal(a, b)


# --- ExcessMTL ------------------------------------------------------------------------


def test_excess_mtl_matches_torchjd_excess_mtl_weighting():
    from torchjd.aggregation._excess_mtl import ExcessMTLWeighting

    gen = torch.Generator().manual_seed(10)
    for warmup in (1, 3):
        oracle = ExcessMTLWeighting(robust_step_size=0.5, n_warmup_steps=warmup)
        balancer = ExcessMTL(3, step_size=0.5, warmup_steps=warmup)
        scale = torch.tensor([[1.0], [3.0], [0.3]], dtype=F64)
        for _ in range(10):
            m = torch.randn(3, 20, dtype=F64, generator=gen) * scale
            expected = oracle(m)
            alpha = balancer.weights_from_grads(m)
            # TorchJD adds 1e-7 to the baseline E(0) (of order 10 here)
            torch.testing.assert_close(alpha, expected, rtol=1e-6, atol=0)


def test_excess_mtl_is_not_a_function_of_the_gramian():
    # M and M Q (Q orthogonal) have the same Gramian but different AdaGrad accumulators;
    # at the first call E_i = sum_j |g_ij| (up to eps), the L1 norm, which Q changes
    gen = torch.Generator().manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64, generator=gen))
    m = torch.randn(2, 6, dtype=F64, generator=gen)
    torch.testing.assert_close(m @ m.T, (m @ q) @ (m @ q).T)
    torch.testing.assert_close(excess_risks(m, m * m, eps=0.0), m.abs().sum(1))
    a, b = ExcessMTL(2), ExcessMTL(2)
    for _ in range(4):
        m = torch.randn(2, 6, dtype=F64, generator=gen)
        wa, wb = a.weights_from_grads(m), b.weights_from_grads(m @ q)
    assert float((wa - wb).abs().max()) > 1e-2


def test_excess_mtl_weights_are_on_the_simplex_and_scale_invariant():
    gen = torch.Generator().manual_seed(12)
    plain, scaled = ExcessMTL(3, warmup_steps=2), ExcessMTL(3, warmup_steps=2)
    # scales >= 1: the eps = 1e-7 under AdaGrad's square root breaks the invariance for
    # gradients of order sqrt(eps)
    s = torch.tensor([[1.0], [1e3], [10.0]], dtype=F64)
    for step in range(8):
        m = torch.randn(3, 10, dtype=F64, generator=gen)
        m[2] *= 1 + step  # term 2's gradients grow: its excess risk ratio rises
        wa, wb = plain.weights_from_grads(m), scaled.weights_from_grads(m * s)
        torch.testing.assert_close(wa.sum(), torch.tensor(1.0, dtype=F64))
        assert bool((wa > 0).all())
        if step < 2:
            torch.testing.assert_close(wa, torch.full((3,), 1 / 3, dtype=F64))
        torch.testing.assert_close(wa, wb, rtol=1e-5, atol=0)
    assert int(wa.argmax()) == 2


def test_excess_mtl_on_a_model_with_term_grads_and_through_backward():
    torch.manual_seed(3)
    trunk = torch.nn.Linear(3, 4).to(F64)
    heads = [torch.nn.Linear(4, 1).to(F64) for _ in range(2)]
    balancer = ExcessMTL(2)
    for _ in range(3):
        z = trunk(torch.randn(8, 3, dtype=F64))
        losses = [heads[0](z).pow(2).mean(), (heads[1](z) - 1).abs().mean()]
        stacks = lossbalance.term_grads(losses, list(trunk.parameters()), retain_graph=True)
        flat = torch.cat([g.reshape(2, -1) for g in stacks], 1)
        reference = ExcessMTL(2)
        reference.load_state_dict(balancer.state_dict())
        alpha = balancer.weights_from_grads(stacks)  # the stacks as term_grads gives them
        torch.testing.assert_close(alpha, reference.weights_from_grads(flat), rtol=0, atol=0)
    # through lossbalance.backward: w from the same stacks, sum_i w_i g_i in the trunk and,
    # its loss being sum_i w_i L_i, w_i times each head's gradient
    for mode in ("exact", "batched"):
        z = trunk(torch.randn(8, 3, dtype=F64))
        losses = [heads[0](z).pow(2).mean(), (heads[1](z) - 1).abs().mean()]
        stacks = lossbalance.term_grads(losses, list(trunk.parameters()), retain_graph=True)
        head_grads = [
            torch.autograd.grad(t, list(h.parameters()), retain_graph=True)
            for t, h in zip(losses, heads, strict=True)
        ]
        reference = ExcessMTL(2)
        reference.load_state_dict(balancer.state_dict())
        expected = reference.weights_from_grads(stacks)
        for p in [*trunk.parameters(), *(q for h in heads for q in h.parameters())]:
            p.grad = None
        w = lossbalance.backward(losses, balancer, shared=trunk, mode=mode)
        torch.testing.assert_close(w, expected, rtol=0, atol=0)
        assert not torch.allclose(w, torch.full_like(w, 0.5))  # past the warm-up
        for p, g in zip(trunk.parameters(), stacks, strict=True):
            torch.testing.assert_close(p.grad, torch.tensordot(w.to(g), g, dims=1))
        for i, (h, grads) in enumerate(zip(heads, head_grads, strict=True)):
            for p, g in zip(h.parameters(), grads, strict=True):
                torch.testing.assert_close(p.grad, w[i].to(g) * g)


def test_excess_mtl_state_dict_round_trip_continues_bit_identically():
    gen = torch.Generator().manual_seed(13)
    grads = [torch.randn(3, 7, dtype=F64, generator=gen) for _ in range(7)]
    original = ExcessMTL(3, step_size=0.3, warmup_steps=2)
    for m in grads[:3]:
        original.weights_from_grads(m)
    resumed = ExcessMTL(3, step_size=0.3, warmup_steps=2)
    resumed.load_state_dict(copy.deepcopy(original.state_dict()))
    for m in grads[3:]:
        assert torch.equal(original.weights_from_grads(m), resumed.weights_from_grads(m))


def test_excess_mtl_degenerate_inputs():
    with pytest.raises(ValueError, match=r"Invalid step_size: 0 \(expected step_size > 0\)"):
        ExcessMTL(2, step_size=0)
    with pytest.raises(ValueError, match=r"Invalid warmup_steps: 0 \(expected an integer >= 1\)"):
        ExcessMTL(2, warmup_steps=0)
    balancer = ExcessMTL(2)
    zero_first = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=F64)
    with pytest.warns(LossBalanceWarning, match="had no gradient during the warm-up"):
        balancer.weights_from_grads(zero_first)
    alpha = balancer.weights_from_grads(torch.ones(2, 2, dtype=F64))
    assert bool(torch.isfinite(alpha).all()) and float(alpha[0]) > 0.99
    before = balancer.task_weights.clone()
    with pytest.warns(LossBalanceWarning, match="non-finite per-term gradients"):
        again = balancer.weights_from_grads(torch.full((2, 2), math.nan, dtype=F64))
    assert torch.equal(again, before)
    with pytest.raises(ValueError, match=r"expected \(2, 2\) as at its previous calls"):
        balancer.weights_from_grads(torch.ones(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="expects per-term gradients with 2 rows"):
        balancer.weights_from_grads(torch.ones(3, 2, dtype=F64))
    with pytest.warns(LossBalanceWarning, match="num_terms=1 has nothing to balance"):
        one = ExcessMTL(1)
    for _ in range(3):
        assert torch.equal(one.weights_from_grads(torch.ones(1, 4)), torch.ones(1, dtype=F64))


# --- MetaBalance ----------------------------------------------------------------------


def _metabalance_problem(seed: int = 0):
    torch.manual_seed(seed)
    trunk = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in range(3)])
    return trunk.to(F64), heads.to(F64), torch.randn(12, 3, dtype=F64)


def _metabalance_losses(trunk, heads, x, scale=(1.0, 1.0, 1.0)):
    z = trunk(x)
    return [
        scale[0] * heads[0](z).pow(2).mean(),
        scale[1] * (heads[1](z) - 1).abs().mean(),
        scale[2] * torch.nn.functional.softplus(heads[2](z)).mean(),
    ]


class _MetaBalanceReference:
    """The authors' algorithm: one backward per term, per-tensor norm averages from 0."""

    def __init__(self, params, k, relax, beta):
        self.params, self.relax, self.beta = list(params), relax, beta
        self.m = [[0.0] * len(self.params) for _ in range(k)]

    def backward(self, losses, heads):
        total = [torch.zeros_like(p) for p in self.params]
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, self.params, retain_graph=True)
            for j, g in enumerate(grads):
                self.m[i][j] = self.beta * self.m[i][j] + (1 - self.beta) * float(g.norm())
                c = 1.0 if i == 0 else self.relax * self.m[0][j] / self.m[i][j] + 1 - self.relax
                total[j] += c * g
        for p, g in zip(self.params, total, strict=True):
            p.grad = g
        head_params = [p for h in heads for p in h.parameters()]
        for p, g in zip(head_params, torch.autograd.grad(sum(losses), head_params), strict=True):
            p.grad = g


@pytest.mark.parametrize(("relax", "beta"), [(0.7, 0.9), (1.0, 0.0), (0.3, 0.5)])
def test_metabalance_matches_the_authors_algorithm(relax, beta):
    trunk, heads, x = _metabalance_problem()
    twin, twin_heads = copy.deepcopy(trunk), copy.deepcopy(heads)
    balancer = MetaBalance(3, relax_factor=relax, beta=beta)
    reference = _MetaBalanceReference(twin.parameters(), 3, relax, beta)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    ref_opt = torch.optim.SGD([*twin.parameters(), *twin_heads.parameters()], lr=0.05)
    for _ in range(4):
        opt.zero_grad()
        lossbalance.backward(_metabalance_losses(trunk, heads, x), balancer, trunk)
        ref_opt.zero_grad()
        reference.backward(_metabalance_losses(twin, twin_heads, x), twin_heads)
        for p, q in zip(
            [*trunk.parameters(), *heads.parameters()],
            [*twin.parameters(), *twin_heads.parameters()],
            strict=True,
        ):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15)
        opt.step()
        ref_opt.step()


def test_metabalance_full_relaxation_gives_every_term_the_target_magnitude_per_layer():
    trunk, heads, x = _metabalance_problem(1)
    balancer = MetaBalance(3, relax_factor=1.0, beta=0.0)
    scale = (1.0, 1e4, 1e-3)
    losses = _metabalance_losses(trunk, heads, x, scale)
    stacks = lossbalance.term_grads(losses, list(trunk.parameters()), retain_graph=True)
    lossbalance.backward(losses, balancer, trunk)
    c = balancer.last_coefficients
    assert c is not None
    for j, s in enumerate(stacks):
        contributions = (c[:, j].reshape(3, *[1] * (s.dim() - 1)) * s).reshape(3, -1).norm(dim=1)
        torch.testing.assert_close(contributions, contributions[:1].expand(3), rtol=1e-12, atol=0)
    # so the written gradient does not depend on the auxiliary losses' scales
    grads = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad()
    lossbalance.backward(
        _metabalance_losses(trunk, heads, x), MetaBalance(3, relax_factor=1.0, beta=0.0), trunk
    )
    for g, p in zip(grads, trunk.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-14)


def test_metabalance_no_relaxation_is_the_plain_sum_and_one_term_is_the_target():
    trunk, heads, x = _metabalance_problem(2)
    losses = _metabalance_losses(trunk, heads, x)
    expected = torch.autograd.grad(sum(losses), list(trunk.parameters()), retain_graph=True)
    lossbalance.backward(losses, MetaBalance(3, relax_factor=0.0), trunk)
    for g, p in zip(expected, trunk.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)
    trunk.zero_grad()
    with pytest.warns(LossBalanceWarning, match="num_terms=1 has nothing to balance"):
        one = MetaBalance(1)
    losses = _metabalance_losses(trunk, heads, x)
    lossbalance.backward(losses[:1], one, trunk, retain_graph=True)
    expected = torch.autograd.grad(losses[0], list(trunk.parameters()))
    for g, p in zip(expected, trunk.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)


def test_metabalance_state_dict_round_trip_continues_bit_identically():
    trunk, heads, x = _metabalance_problem(3)
    original = MetaBalance(3)
    for _ in range(2):
        lossbalance.backward(_metabalance_losses(trunk, heads, x), original, trunk)
    resumed = MetaBalance(3)
    resumed.load_state_dict(copy.deepcopy(original.state_dict()))
    for _ in range(2):
        trunk.zero_grad()
        lossbalance.backward(_metabalance_losses(trunk, heads, x), original, trunk)
        a = [p.grad.clone() for p in trunk.parameters()]
        trunk.zero_grad()
        lossbalance.backward(_metabalance_losses(trunk, heads, x), resumed, trunk)
        assert all(torch.equal(g, p.grad) for g, p in zip(a, trunk.parameters(), strict=True))
        assert torch.equal(original.norm_avg, resumed.norm_avg)


def test_metabalance_bad_inputs_and_degenerate_gradients():
    with pytest.raises(ValueError, match=r"Invalid relax_factor: 1.5 \(expected 0 <= relax"):
        MetaBalance(2, relax_factor=1.5)
    with pytest.raises(ValueError, match=r"Invalid beta: 1.0 \(expected 0 <= beta < 1\)"):
        MetaBalance(2, beta=1.0)
    w = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    v = torch.tensor([3.0], dtype=F64, requires_grad=True)
    balancer = MetaBalance(2)
    with pytest.raises(ValueError, match="built for 2 loss terms, got 1"):
        lossbalance.backward([w.sum()], balancer, [w])
    # the auxiliary term does not reach w: coefficient 1 on its zero gradient, finite
    lossbalance.backward([w.pow(2).sum(), v.pow(2).sum() + 0 * w.sum()], balancer, [w, v])
    assert bool(torch.isfinite(balancer.last_coefficients).all())
    torch.testing.assert_close(w.grad, 2 * w.detach())
    w.grad = None
    with pytest.warns(LossBalanceWarning, match="a loss is not finite"):
        lossbalance.backward([w.sum() * math.inf, w.sum()], balancer, [w])
    assert w.grad is None
    with pytest.raises(
        ValueError, match=r"got per-tensor norms of shape \(2, 1\), expected \(2, 2\)"
    ):
        lossbalance.backward([w.sum(), w.sum()], balancer, [w])


def test_metabalance_refuses_a_state_of_another_number_of_terms():
    # m is sized lazily (K x 0 until the first call): a K+1 state, trained or not, must be
    # refused rather than resize m, and the refused load changes nothing
    trunk, heads, x = _metabalance_problem(4)
    balancer = MetaBalance(3)
    lossbalance.backward(_metabalance_losses(trunk, heads, x), balancer, trunk)
    before = balancer.norm_avg.clone()
    for other in (MetaBalance(4), MetaBalance(2)):
        with pytest.raises(RuntimeError, match="size mismatch"):
            balancer.load_state_dict(other.state_dict())
        assert torch.equal(balancer.norm_avg, before)


@pytest.mark.parametrize("name", ["rlw", "pcgrad", "graddrop", "gradvac"])
def test_seeded_balancers_restore_their_seed_and_draws(name):
    # one seeded-generator mechanism (_base.Seeded): a loaded balancer reports the saved
    # seed (RLW's own copy restored the draws but kept its constructor's seed)
    saved = lossbalance.create(name, 3, seed=7)
    loaded = lossbalance.create(name, 3, seed=8)
    loaded.load_state_dict(saved.state_dict())
    assert loaded.seed == 7 and "seed=7" in repr(loaded)
    assert torch.equal(loaded.generator.get_state(), saved.generator.get_state())
