"""Reliability battery: MTAdam and every registered balancer against bad inputs and faults.

One parametrised place for what a training run throws at the library: non-finite losses,
zero, duplicate and opposite gradients, low-precision and double dtypes, memory formats,
tampered checkpoints and two ranks that disagree. The methods come from the registry, so
a newly registered method is tried here without being listed. The contract checked:

- a non-finite loss changes nothing (parameters, optimizer and balancer state) and is
  reported (NaN weights or a counted skip);
- degenerate gradients give finite weights and finite parameters;
- every dtype trains and a checkpoint resumes bit-identically;
- a channels_last model gives the contiguous model's gradients;
- a tampered checkpoint is refused with a ``ValueError`` (or, for a balancer's module
  state, torch's ``RuntimeError``) that names what is wrong, and leaves the state as it was;
- ranks that disagree fail on every rank with a clear message, within a timeout.

``conftest.py`` beside this file prints how many cases ran.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import lossbalance

HERE = Path(__file__).resolve().parent

METHODS = lossbalance.available_methods()
BALANCERS = [m for m in METHODS if lossbalance.get_method(m).needs != "optimizer"]
GRADIENT_LEVEL = [m for m in BALANCERS if lossbalance.get_method(m).needs != "losses"]
K = 3
KWARGS: dict[str, dict] = {"fixed": {"weights": [1.0, 2.0, 0.5]}}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(K)])

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z).squeeze(1) for head in self.heads]


def batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(16, 4, generator=gen)
    y = torch.stack([x.sum(1), torch.sin(3 * x[:, 0]), x[:, 1] * x[:, 2]], 1)
    return x.to(dtype), y.to(dtype)


def positive_terms(outs: list[Tensor], y: Tensor) -> list[Tensor]:
    scales = (1.0, 100.0, 0.01)
    return [s * (o - y[:, i]).pow(2).mean() for i, (o, s) in enumerate(zip(outs, scales))]


FAULTS = {
    # name -> terms built from the heads' outputs: each a list of K scalar losses
    "nan-loss": lambda outs, y: [*positive_terms(outs, y)[:2], outs[2].mean() * math.nan],
    "inf-loss": lambda outs, y: [
        positive_terms(outs, y)[0],
        outs[1].sum() * math.inf,
        outs[2].pow(2).mean(),
    ],
    "zero-gradient-term": lambda outs, y: [*positive_terms(outs, y)[:2], 0.0 * outs[2].sum() + 1.0],
    "duplicate-terms": lambda outs, y: (
        [positive_terms(outs, y)[0]] * 2 + [positive_terms(outs, y)[1]]
    ),
    "opposite-terms": lambda outs, y: [
        10.0 + outs[0].mean(),
        10.0 - outs[0].mean(),
        positive_terms(outs, y)[2],
    ],
    "tiny-and-huge-terms": lambda outs, y: [
        1e-12 * (outs[0] - y[:, 0]).pow(2).mean(),
        1e12 * (outs[1] - y[:, 1]).pow(2).mean(),
        (outs[2] - y[:, 2]).pow(2).mean(),
    ],
}
NON_FINITE = {"nan-loss", "inf-loss"}


def user_optimizer(params, dtype: torch.dtype) -> torch.optim.Optimizer:
    # torch.optim.Adam on pure float16 parameters divides by an eps that rounds to 0:
    # the balancers' half-precision cases pair them with SGD, which has no such limit
    if dtype == torch.float16:
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-2)


def build(name: str, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    model = Net().to(dtype)
    if name == "mtadam":
        return model, None, lossbalance.MTAdam(model.parameters(), lr=1e-2)
    balancer = lossbalance.create(name, K, **KWARGS.get(name, {})).to(dtype)
    return model, balancer, user_optimizer([*model.parameters(), *balancer.parameters()], dtype)


def train_step(name, model, balancer, opt, losses_of, step: int, dtype=torch.float64, mode="auto"):
    x, y = batch(step, dtype)
    z, outs = model(x)
    losses = losses_of(outs, y)
    if name == "mtadam":
        opt.step(losses)
        return None
    opt.zero_grad()
    needs_features = mode == "feature"
    weights = lossbalance.backward(
        losses, balancer, shared=model.trunk, features=z if needs_features else None, mode=mode
    )
    opt.step()
    return weights


def snapshot(model, balancer, opt) -> list[Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    if balancer is not None:
        tensors += [
            t.detach().clone() for t in balancer.state_dict().values() if isinstance(t, Tensor)
        ]
    for state in opt.state.values():
        tensors += [v.detach().clone() for v in state.values() if isinstance(v, Tensor)]
    return tensors


def assert_all_finite(model, balancer, opt) -> None:
    for t in snapshot(model, balancer, opt):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), "a parameter or state tensor is not finite"


def quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


# ------------------------------------------------------------------------------- faults


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("name", METHODS)
def test_fault(name: str, fault: str) -> None:
    model, balancer, opt = build(name)
    ctx = quiet()
    try:
        for step in range(2):  # healthy steps first: state exists, then the fault
            train_step(name, model, balancer, opt, positive_terms, step)
        before = snapshot(model, balancer, opt)
        skipped = opt.skipped_steps if name == "mtadam" else None
        weights = train_step(name, model, balancer, opt, FAULTS[fault], 2)
        if fault in NON_FINITE:
            after = snapshot(model, balancer, opt)
            assert len(after) == len(before)
            for a, b in zip(after, before, strict=True):
                assert torch.equal(a, b), f"{name}: a {fault} changed parameters or state"
            if name == "mtadam":
                assert opt.skipped_steps == skipped + 1
            else:
                assert weights is not None and torch.isnan(weights).all()
        else:
            if weights is not None:
                assert torch.isfinite(weights).all(), f"{name}: weights {weights} under {fault}"
            assert_all_finite(model, balancer, opt)
        for step in range(3, 5):  # and training goes on
            train_step(name, model, balancer, opt, positive_terms, step)
        assert_all_finite(model, balancer, opt)
    finally:
        ctx.__exit__(None, None, None)


# ------------------------------------------------------------------------------- dtypes

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("name", METHODS)
def test_dtype_trains_and_resumes_bit_identically(name: str, dtype: torch.dtype) -> None:
    ctx = quiet()
    try:
        model, balancer, opt = build(name, dtype)
        for step in range(2):
            train_step(name, model, balancer, opt, positive_terms, step, dtype)
        twin_model = copy.deepcopy(model)
        _, twin_balancer, twin_opt = build(name, dtype)
        if twin_balancer is not None:
            twin_balancer.load_state_dict(copy.deepcopy(balancer.state_dict()))
        twin_params = list(twin_model.parameters())
        if name == "mtadam":
            twin_opt = lossbalance.MTAdam(twin_params, lr=1e-2)
        else:
            twin_opt = user_optimizer([*twin_params, *twin_balancer.parameters()], dtype)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for step in range(2, 4):
            train_step(name, model, balancer, opt, positive_terms, step, dtype)
            train_step(name, twin_model, twin_balancer, twin_opt, positive_terms, step, dtype)
        for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
            assert p.dtype == dtype
            assert torch.equal(p, q), f"{name} in {dtype} did not resume bit-identically"
        assert_all_finite(model, balancer, opt)
    finally:
        ctx.__exit__(None, None, None)


# ------------------------------------------------------------------------ memory formats


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 3))
        self.heads = nn.ModuleList([nn.Linear(4 * 4 * 4, 1) for _ in range(K)])

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        flat = z.flatten(1)
        return z, [head(flat).squeeze(1) for head in self.heads]


def conv_step(name: str, channels_last: bool, grad_mode: str):
    torch.manual_seed(0)
    model = ConvNet().double()
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    y = torch.randn(5, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z, outs = model(x)
    losses = positive_terms(outs, y)
    if name == "mtadam":
        opt = lossbalance.MTAdam(model.parameters(), lr=1e-2, grad_mode=grad_mode)
        opt.step(losses)
        return list(model.parameters())
    balancer = lossbalance.create(name, K, **KWARGS.get(name, {})).double()
    lossbalance.backward(
        losses,
        balancer,
        shared=model.trunk,
        features=z if grad_mode == "feature" else None,
        mode=grad_mode,
    )
    return [p.grad for p in model.parameters()]


MEMORY_CASES = [("mtadam", m) for m in ("sequential", "batched", "two_stage", "auto")]
MEMORY_CASES += [(n, m) for n in GRADIENT_LEVEL for m in ("exact", "batched", "gramian", "feature")]
MEMORY_CASES += [(n, "auto") for n in BALANCERS if n not in GRADIENT_LEVEL]


@pytest.mark.parametrize(("name", "grad_mode"), MEMORY_CASES)
def test_channels_last_equals_contiguous(name: str, grad_mode: str) -> None:
    ctx = quiet()
    try:
        ref = conv_step(name, False, grad_mode)
        got = conv_step(name, True, grad_mode)
    finally:
        ctx.__exit__(None, None, None)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"{name} {grad_mode}")


# ------------------------------------------------------------------- tampered checkpoints


def trained_mtadam():
    model, _, opt = build("mtadam")
    ctx = quiet()
    try:
        for step in range(2):
            train_step("mtadam", model, None, opt, positive_terms, step)
    finally:
        ctx.__exit__(None, None, None)
    return model, opt


def _first_state(sd: dict) -> dict:
    return sd["state"][next(iter(sd["state"]))]


def _extra_term_row(sd):
    s = _first_state(sd)
    s["exp_avg_sq"] = torch.cat([s["exp_avg_sq"], s["exp_avg_sq"][:1]])


def _nan_state(sd):
    _first_state(sd)["exp_avg_sq"].fill_(math.nan)


def _negative_second_moment(sd):
    _first_state(sd)["exp_avg_sq"].fill_(-1.0)


def _missing_magnitude(sd):
    del _first_state(sd)["magnitude"]


def _wrong_shape(sd):
    s = _first_state(sd)
    s["exp_avg"] = s["exp_avg"].reshape(-1)[:-1].clone()


def _adam_state_dict(sd):
    model = Net().double()
    adam = torch.optim.Adam(model.parameters())
    x, y = batch(0)
    _, outs = model(x)
    sum(positive_terms(outs, y)).backward()
    adam.step()
    sd.clear()
    sd.update(adam.state_dict())


TAMPERS = {  # name -> (tampering, what the refusal must say)
    "extra-term-row": (_extra_term_row, r"parameter 0: exp_avg_sq has shape \(4, 8, 4\)"),
    "nan-state": (_nan_state, r"parameter 0: exp_avg_sq is not finite"),
    "negative-second-moment": (_negative_second_moment, r"exp_avg_sq has negative entries"),
    "missing-magnitude": (_missing_magnitude, r"missing 'magnitude'"),
    "wrong-shape": (_wrong_shape, r"parameter 0: exp_avg has shape \(31,\)"),
    "adam-state-dict": (_adam_state_dict, r"is this an MTAdam checkpoint"),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_mtadam_refuses_a_tampered_checkpoint(tamper: str) -> None:
    _, opt = trained_mtadam()
    sd = copy.deepcopy(opt.state_dict())
    tampering, message = TAMPERS[tamper]
    tampering(sd)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, state in before["state"].items():
        for name, value in state.items():
            got = after["state"][key][name]
            assert torch.equal(got, value) if isinstance(value, Tensor) else got == value


def test_mtadam_refuses_a_checkpoint_with_more_terms_than_its_term_weights() -> None:
    model, opt = trained_mtadam()  # three terms
    short = lossbalance.MTAdam(model.parameters(), lr=1e-2, term_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"term"):
        short.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert not short.state


STATEFUL = [m for m in BALANCERS if lossbalance.get_method(m).stateful]


@pytest.mark.parametrize("name", STATEFUL)
def test_balancer_refuses_a_state_of_the_wrong_size(name: str) -> None:
    model, balancer, opt = build(name)
    ctx = quiet()
    try:  # trained first, so that a partial load would show
        for step in range(2):
            train_step(name, model, balancer, opt, positive_terms, step)
    finally:
        ctx.__exit__(None, None, None)
    other = lossbalance.create(name, K + 1, **KWARGS.get(name, {})).double()
    if not any(t.numel() for t in other.state_dict().values() if isinstance(t, Tensor)):
        pytest.skip(f"{name} keeps no tensor state that depends on the number of terms")
    before = copy.deepcopy(balancer.state_dict())
    with pytest.raises((ValueError, RuntimeError), match=r"size|shape|terms"):
        balancer.load_state_dict(other.state_dict())
    for (key, a), b in zip(balancer.state_dict().items(), before.values(), strict=True):
        if isinstance(a, Tensor):  # NaN marks "not set yet" in some buffers
            torch.testing.assert_close(
                a, b, rtol=0, atol=0, equal_nan=True, msg=f"{name}: a refused load changed {key}"
            )


# --------------------------------------------------------------- ranks that disagree


DISAGREEMENTS = [
    "mtadam-terms",
    "balancer-terms",
    "balancer-unused-head",
    "mtadam-unused-head",
    "mtadam-empty-head",
    "balancer-empty-head",
]
# MTAdam averages the ranks' gradients of every parameter with "reached" flags, so a head
# that a rank's terms do not reach is fine; lossbalance.backward writes only the leaves a
# rank's graph reaches, so there every rank must reach the same leaves (a head with no
# samples on a rank stays in its graph on the empty selection) or all ranks raise.
MUST_RAISE = {"mtadam-terms": "terms", "balancer-terms": "terms", "balancer-unused-head": "rank"}


@pytest.fixture(scope="module")
def disagreement_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("disagree")
    run = subprocess.run(
        [sys.executable, str(HERE / "disagree_worker.py"), str(out), *DISAGREEMENTS],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return {case: torch.load(out / f"{case}.pt", weights_only=False) for case in DISAGREEMENTS}


@pytest.mark.parametrize("case", DISAGREEMENTS)
def test_ranks_that_disagree(disagreement_runs, case: str) -> None:
    result = disagreement_runs[case]
    if case in MUST_RAISE:
        errors = [result[rank]["error"] for rank in (0, 1)]
        for rank, error in enumerate(errors):  # every rank raises, naming what differs
            assert error is not None, f"rank {rank} did not raise"
            assert MUST_RAISE[case] in error and "rank 1" in error, error
        assert errors[0] == errors[1]
    else:  # the ranks train like one process on the whole batch
        for rank in (0, 1):
            assert result[rank]["error"] is None, result[rank]["error"]
        for a, b in zip(result[0]["params"], result[1]["params"], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(result[0]["params"], result["single"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
