"""Gradient accumulation (``lossbalance.Accumulator``) and AMP (``grad_scaler=``, autocast)
for the balancers, checked against one large batch and against unscaled training."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch
from torch import Tensor, nn

import lossbalance
import lossbalance.engine._accumulator as accumulator_module
from lossbalance import LossBalanceWarning
from lossbalance._validation import reset_warnings

BALANCERS = [
    name
    for name in lossbalance.available_methods()
    if lossbalance.get_method(name).needs != "optimizer"
]
KWARGS = {
    "fixed": {"weights": [1.0, 2.0, 0.5]},
    "pcgrad": {"seed": 3},
    "mgda": {"solver": "exact"},  # Frank-Wolfe's tol=1e-6 stopping point moves with rounding
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1), nn.Linear(8, 3)])

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


def data(step: int, dtype=torch.float64, batch: int = 12):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(batch, 4, generator=gen).to(dtype)
    y = torch.stack([x.sum(1), 3 * torch.sin(x[:, 0] * x[:, 1])], 1)
    c = (x[:, 2] > 0).long() + (x[:, 3] > 0.5).long()
    return x, y, c


def terms(outs: list[Tensor], y: Tensor, c: Tensor) -> list[Tensor]:
    return [
        (outs[0].squeeze(1) - y[:, 0]).pow(2).mean(),
        10.0 * (outs[1].squeeze(1) - y[:, 1]).abs().mean(),
        nn.functional.cross_entropy(outs[2], c),
    ]


def setup(name: str, dtype=torch.float64, adam: bool = False):
    torch.manual_seed(0)
    model = Net().to(dtype)
    balancer = lossbalance.create(name, 3, **KWARGS.get(name, {})).to(dtype)
    params = [*model.parameters(), *balancer.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2) if adam else torch.optim.SGD(params, lr=0.05)
    return model, balancer, opt


# GradDrop's feature mode cannot be accumulated: its masks come from the feature gradients
# of the whole batch, needed before each micro-batch's trunk pass (its Accumulator raises at
# the first accumulate, see test_graddrop_feature_mode_cannot_be_accumulated)
NO_FEATURES = {"graddrop"}


def modes(name: str) -> list[str]:
    if lossbalance.get_method(name).needs == "losses":
        return ["auto"]
    return ["exact", "batched"] + ([] if name in NO_FEATURES else ["feature"])


# --------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("name", BALANCERS)
def test_accumulation_equals_one_large_batch(name):
    for mode in modes(name):
        big, big_bal, big_opt = setup(name)
        acc_model, acc_bal, acc_opt = setup(name)
        acc = lossbalance.Accumulator(acc_bal, acc_model.trunk, mode=mode)
        for step in range(3):
            x, y, c = data(step)
            big_opt.zero_grad()
            z, outs = big(x)
            w_big = lossbalance.backward(
                terms(outs, y, c),
                big_bal,
                big.trunk,
                features=z if mode == "feature" else None,
                mode=mode,
            )
            big_opt.step()

            acc_opt.zero_grad()
            for chunk in range(3):  # micro-batches of 4
                part = slice(4 * chunk, 4 * chunk + 4)
                z, outs = acc_model(x[part])
                losses = [t / 3 for t in terms(outs, y[part], c[part])]
                acc.accumulate(losses, features=z if mode == "feature" else None)
            assert acc.num_micro_batches == 3
            w_acc = acc.backward()
            assert acc.num_micro_batches == 0
            torch.testing.assert_close(w_acc, w_big, rtol=1e-9, atol=1e-12, msg=(name, mode))
            for p, q in zip(acc_model.parameters(), big.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
            acc_opt.step()
        for p, q in zip(acc_model.parameters(), big.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=(name, mode))
        for (key, a), b in zip(acc_bal.state_dict().items(), big_bal.state_dict().values()):
            if isinstance(a, Tensor) and a.is_floating_point():
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=(name, mode, key))


def test_graddrop_feature_mode_cannot_be_accumulated():
    model, balancer, _ = setup("graddrop")
    acc = lossbalance.Accumulator(balancer, model.trunk)
    x, y, c = data(0)
    z, outs = model(x)
    with pytest.raises(NotImplementedError, match="GradDrop in mode='feature' under"):
        acc.accumulate(terms(outs, y, c), features=z)
    assert acc.num_micro_batches == 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["moco", "excess-mtl"])
def test_vector_balancer_in_gramian_or_feature_mode_falls_back_to_exact(name):
    # the per-term gradients they need exist in exact mode only: warned, same result
    for mode in ("gramian", "feature"):
        model, balancer, _ = setup(name)
        twin, twin_balancer, _ = setup(name)
        x, y, c = data(3)
        z, outs = model(x)
        reset_warnings()  # the fallback warns once per process
        with pytest.warns(LossBalanceWarning, match="fell back to mode='exact'"):
            w = lossbalance.backward(
                terms(outs, y, c), balancer, model.trunk, features=z, mode=mode
            )
        _, outs = twin(x)
        w_exact = lossbalance.backward(terms(outs, y, c), twin_balancer, twin.trunk, mode="exact")
        torch.testing.assert_close(w, w_exact, rtol=0, atol=0)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_accumulation_weights_differ_from_per_micro_batch_balancing():
    # the point of accumulating per-term gradients: IMTL-G's weights of the whole batch
    # are not the average of the micro-batches' weights
    model, balancer, _ = setup("imtl-g")
    x, y, c = data(0)
    acc = lossbalance.Accumulator(balancer, model.trunk)
    per_micro = []
    for chunk in range(3):
        part = slice(4 * chunk, 4 * chunk + 4)
        _, outs = model(x[part])
        losses = [t / 3 for t in terms(outs, y[part], c[part])]
        acc.accumulate(losses, retain_graph=True)
        per_micro.append(lossbalance.backward(losses, lossbalance.create("imtl-g", 3), model.trunk))
    whole = acc.backward()
    assert not torch.allclose(whole, torch.stack(per_micro).mean(0), rtol=1e-3)


def test_accumulation_gramian_mode_falls_back_to_exact():
    model, balancer, _ = setup("imtl-g")
    twin = copy.deepcopy(model)
    x, y, c = data(1)
    acc = lossbalance.Accumulator(balancer, model.trunk, mode="gramian")
    with pytest.warns(LossBalanceWarning, match="mode='gramian' cannot be used with gradient"):
        _, outs = model(x)
        acc.accumulate(terms(outs, y, c))
    acc.backward()
    _, outs = twin(x)
    lossbalance.backward(terms(outs, y, c), lossbalance.create("imtl-g", 3), twin.trunk)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["imtl", "uncertainty"])
def test_accumulated_nan_micro_batch_skips_the_step(name):
    model, balancer, _ = setup(name)
    before = copy.deepcopy(balancer.state_dict())
    acc = lossbalance.Accumulator(balancer, model.trunk)
    x, y, c = data(2)
    _, outs = model(x[:6])
    acc.accumulate(terms(outs, y[:6], c[:6]))
    _, outs = model(x[6:])
    bad = terms(outs, y[6:], c[6:])
    bad[2] = bad[2] * float("nan")
    acc.accumulate(bad)
    with pytest.warns(LossBalanceWarning, match="not finite.*NaN weights"):
        weights = acc.backward()
    assert weights.shape == (3,) and torch.isnan(weights).all()
    assert all(p.grad is None for p in [*model.parameters(), *balancer.parameters()])
    for key, value in before.items():
        assert torch.equal(balancer.state_dict()[key], value), key
    assert acc.num_micro_batches == 0


def test_accumulator_errors():
    model, balancer, _ = setup("imtl-g")
    with pytest.raises(RuntimeError, match=r"needs at least one accumulate\(losses\) call"):
        lossbalance.Accumulator(balancer, model.trunk).backward()
    with pytest.raises(ValueError, match=r"gradient-level balancer: pass shared=\.\.\."):
        lossbalance.Accumulator(balancer)
    with pytest.raises(TypeError, match=r"got the string 'mgda'"):
        lossbalance.Accumulator("mgda", model.trunk)
    with pytest.raises(ValueError, match=r"Invalid mode: 'fast'"):
        lossbalance.Accumulator(balancer, model.trunk, mode="fast")
    with pytest.raises(TypeError, match=r"grad_scaler must be a torch\.amp\.GradScaler, got float"):
        lossbalance.Accumulator(balancer, model.trunk, grad_scaler=2.0)
    acc = lossbalance.Accumulator(balancer, model.trunk)
    x, y, c = data(3)
    z, outs = model(x)
    with pytest.raises(ValueError, match="was built for 3 loss terms, got 2"):
        acc.accumulate(terms(outs, y, c)[:2])
    acc = lossbalance.Accumulator(balancer, model.trunk, mode="feature")
    acc.accumulate(terms(outs, y, c), features=z)
    _, outs = model(x)
    with pytest.raises(ValueError, match=r"needs features=z in every accumulate"):
        acc.accumulate(terms(outs, y, c))
    acc.reset()
    assert acc.num_micro_batches == 0
    assert "Accumulator(IMTLG" in repr(acc)


def test_accumulator_docstring_runs():
    result = doctest.testmod(accumulator_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# --------------------------------------------------------------------------- GradScaler


def scaled_run(name: str, mode: str, scaler_steps: int, accumulate: bool = False):
    """Train with and without a GradScaler; return both models' parameters."""
    results = []
    for use_scaler in (False, True):
        model, balancer, opt = setup(name, torch.float32, adam=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14) if use_scaler else None
        for step in range(scaler_steps):
            x, y, c = data(step, torch.float32)
            opt.zero_grad()
            features = None
            if accumulate:
                acc = lossbalance.Accumulator(balancer, model.trunk, mode=mode, grad_scaler=scaler)
                for part in (slice(0, 6), slice(6, 12)):
                    z, outs = model(x[part])
                    losses = [t / 2 for t in terms(outs, y[part], c[part])]
                    acc.accumulate(losses, features=z if mode == "feature" else None)
                acc.backward()
            else:
                z, outs = model(x)
                features = z if mode == "feature" else None
                lossbalance.backward(
                    terms(outs, y, c),
                    balancer,
                    model.trunk,
                    features=features,
                    mode=mode,
                    grad_scaler=scaler,
                )
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
        results.append([p.detach().clone() for p in [*model.parameters(), *balancer.parameters()]])
    return results


@pytest.mark.parametrize("name", BALANCERS)
def test_grad_scaler_is_exact_with_power_of_two_scales(name):
    # a power-of-two scale multiplies every per-term gradient exactly, so the scaled and
    # unscaled runs are bit-identical when the Gramian and weights are unscaled correctly
    # (a Gramian left scaled by s^2 changes GradNorm's, IMTL's, PCGrad's weights)
    for mode in modes(name):
        plain, scaled = scaled_run(name, mode, 4)
        for p, q in zip(plain, scaled, strict=True):
            assert torch.equal(p, q), (name, mode, (p - q).abs().max())


@pytest.mark.parametrize("name", ["imtl", "gradnorm", "dwa"])
def test_grad_scaler_with_accumulation_is_exact(name):
    for mode in modes(name)[::2]:
        plain, scaled = scaled_run(name, mode, 3, accumulate=True)
        for p, q in zip(plain, scaled, strict=True):
            assert torch.equal(p, q), (name, mode)


@pytest.mark.parametrize("name", ["mgda", "gradnorm", "uncertainty"])
@pytest.mark.parametrize("where", ["loss", "accumulated"])
def test_grad_scaler_skips_overflow_and_backs_off(name, where):
    model, balancer, opt = setup(name, torch.float32, adam=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    x, y, c = data(0, torch.float32)
    opt.zero_grad()
    _, outs = model(x)
    lossbalance.backward(terms(outs, y, c), balancer, model.trunk, grad_scaler=scaler)
    scaler.step(opt)
    scaler.update()
    params = [p.detach().clone() for p in [*model.parameters(), *balancer.parameters()]]
    state = copy.deepcopy(opt.state_dict())

    opt.zero_grad()
    _, outs = model(x)
    losses = terms(outs, y, c)
    losses[1] = losses[1] * float("inf")
    with pytest.warns(LossBalanceWarning, match=r"\.grad set to NaN, so that scaler\.step skips"):
        if where == "loss":
            weights = lossbalance.backward(losses, balancer, model.trunk, grad_scaler=scaler)
        else:
            acc = lossbalance.Accumulator(balancer, model.trunk, grad_scaler=scaler)
            acc.accumulate(losses)
            weights = acc.backward()
    assert torch.isnan(weights).all()
    assert all(torch.isnan(p.grad).all() for p in model.parameters())
    scaler.step(opt)  # sees the NaN gradients: skips opt.step()
    scaler.update()
    assert scaler.get_scale() == 2.0**13
    after = [p.detach() for p in [*model.parameters(), *balancer.parameters()]]
    assert all(torch.equal(p, q) for p, q in zip(params, after, strict=True))
    assert state["state"].keys() == opt.state_dict()["state"].keys()
    for key, value in state["state"].items():
        assert torch.equal(value["step"], opt.state_dict()["state"][key]["step"])


def test_grad_scaler_gramian_is_unscaled():
    # the balancer sees the same Gramian with and without a scaler
    seen = []

    class Spy(lossbalance.GradientBalancer):
        def weights(self, gramian, losses):
            seen.append((gramian.clone(), losses.clone()))
            return torch.ones(3, dtype=gramian.dtype)

    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**20)):
        model, _, _ = setup("uniform", torch.float32)
        x, y, c = data(5, torch.float32)
        z, outs = model(x)
        lossbalance.backward(terms(outs, y, c), Spy(3), model.trunk, features=z, grad_scaler=scaler)
    (g_plain, l_plain), (g_scaled, l_scaled) = seen
    assert torch.equal(g_plain, g_scaled) and torch.equal(l_plain, l_scaled)


def test_disabled_scaler_is_no_scaler():
    model, balancer, _ = setup("imtl-g", torch.float32)
    twin = copy.deepcopy(model)
    x, y, c = data(6, torch.float32)
    _, outs = model(x)
    lossbalance.backward(terms(outs, y, c), balancer, model.trunk)
    _, outs = twin(x)
    off = torch.amp.GradScaler("cpu", enabled=False)
    lossbalance.backward(
        terms(outs, y, c), lossbalance.create("imtl-g", 3), twin.trunk, grad_scaler=off
    )
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    with pytest.raises(TypeError, match=r"grad_scaler must be a torch\.amp\.GradScaler, got str"):
        lossbalance.backward(terms(outs, y, c), balancer, twin.trunk, grad_scaler="fp16")


# --------------------------------------------------------------------------- autocast


@pytest.mark.filterwarnings(
    "ignore:lossbalance.backward.*not finite:lossbalance.LossBalanceWarning"
)
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["imtl", "gradnorm", "uncertainty"])
def test_autocast_training_reduces_the_losses(name, amp_dtype):
    model, balancer, opt = setup(name, torch.float32, adam=True)
    scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype == torch.float16)
    x, y, c = data(7, torch.float32, batch=32)
    history, skipped = [], 0
    for _ in range(25):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=amp_dtype):
            z, outs = model(x)
        losses = terms([o.float() for o in outs], y, c)
        history.append(torch.stack(losses).detach())
        mode = "feature" if name != "uncertainty" else "auto"
        weights = lossbalance.backward(
            losses, balancer, model.trunk, features=z, mode=mode, grad_scaler=scaler
        )
        # float16's first steps overflow at the scaler's initial scale 2^16: they are
        # skipped, and the scaler backs off, as with a plain scaled backward
        skipped += int(torch.isnan(weights).all())
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        scaler.step(opt)
        scaler.update()
    first, last = history[0], torch.stack(history[-5:]).mean(0)
    assert last.sum() < 0.9 * first.sum(), (first, last)
    assert skipped <= (10 if amp_dtype == torch.float16 else 0)
    if amp_dtype == torch.float16:
        assert scaler.get_scale() == 2.0**16 / 2**skipped


def test_autocast_per_term_gradients_match_autograd():
    # under bf16 autocast the written shared gradient is sum_i alpha_i g_i with g_i the
    # per-term gradients autograd computes through the same low-precision graph
    model, balancer, _ = setup("imtl-g", torch.float32)
    x, y, c = data(8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, outs = model(x)
    losses = terms([o.float() for o in outs], y, c)
    trunk = list(model.trunk.parameters())
    ref = [torch.autograd.grad(loss, trunk, retain_graph=True) for loss in losses]
    alpha = lossbalance.backward(losses, balancer, model.trunk, mode="exact")
    for j, p in enumerate(trunk):
        expected = sum(float(alpha[i]) * ref[i][j] for i in range(3))
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)


def test_autocast_default_mode_is_as_accurate_as_exact_mode():
    # mode="auto" takes the Gramian engine, which writes the gradient of sum_i alpha_i L_i
    # by one pass through the bf16 graph instead of summing K bf16 per-term gradients: the
    # roundings differ, the accuracy against the float32 gradient must not
    model, balancer, _ = setup("imtl-g", torch.float32)
    x, y, c = data(8, torch.float32)
    trunk = list(model.trunk.parameters())
    written = {}
    for mode in ("exact", "auto"):
        for p in model.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, outs = model(x)
        losses = terms([o.float() for o in outs], y, c)
        alpha = lossbalance.backward(losses, balancer, model.trunk, mode=mode)
        written[mode] = (alpha, [p.grad.clone() for p in trunk])
    torch.testing.assert_close(written["auto"][0], written["exact"][0], rtol=1e-6, atol=1e-9)
    _, outs = model(x)
    losses = terms(outs, y, c)
    ref = [torch.autograd.grad(loss, trunk, retain_graph=True) for loss in losses]
    alpha = written["exact"][0]
    truth = [sum(float(alpha[i]) * ref[i][j] for i in range(3)) for j in range(len(trunk))]

    def error(grads):
        num = sum(((g - e) ** 2).sum() for g, e in zip(grads, truth, strict=True))
        return float(num.sqrt() / sum((e**2).sum() for e in truth).sqrt())

    assert 0 < error(written["auto"][1]) < 1.5 * error(written["exact"][1]) < 0.05
