"""MTAdam with gradient accumulation, AMP (GradScaler, bf16 autocast) and DDP (gloo)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lossbalance import LossBalanceWarning, MTAdam

HERE = Path(__file__).resolve().parent


def model_and_data(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 4, generator=gen, dtype=dtype) for _ in range(6)]
    return model, data


def terms(out, x):
    return [(out[:, 0] - x[:, 0]).pow(2).mean(), 50 * (out[:, 1] - x[:, 1]).abs().mean()]


def test_accumulation_equals_one_large_batch():
    model, data = model_and_data()
    twin = copy.deepcopy(model)
    o1 = MTAdam(model.parameters(), lr=1e-2)
    o2 = MTAdam(twin.parameters(), lr=1e-2)
    for x in data:
        o1.step(terms(model(x), x))
        for chunk in x.chunk(4):
            o2.accumulate([t / 4 for t in terms(twin(chunk), chunk)])
        o2.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-13)


def test_accumulated_nan_microbatch_skips_the_step():
    model, data = model_and_data()
    opt = MTAdam(model.parameters(), lr=1e-2)
    x = data[0]
    opt.accumulate(terms(model(x), x))
    bad = terms(model(x), x)
    bad[0] = bad[0] * float("inf")
    opt.accumulate(bad)
    before = [p.clone() for p in model.parameters()]
    with pytest.warns(LossBalanceWarning):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_grad_scaler_unscales_exactly():
    # power-of-two scales are exact, so the scaled run equals the unscaled one bit for bit
    model, data = model_and_data(torch.float32)
    twin = copy.deepcopy(model)
    o1 = MTAdam(model.parameters(), lr=1e-2)
    o2 = MTAdam(twin.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x in data:
        o1.step(terms(model(x), x))
        o2.step(terms(twin(x), x), grad_scaler=scaler)
        scaler.update()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_grad_scaler_skips_overflow_and_backs_off():
    model, data = model_and_data(torch.float32)
    opt = MTAdam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x = data[0]
    opt.step(terms(model(x), x), grad_scaler=scaler)
    scaler.update()
    before = [p.clone() for p in model.parameters()]
    bad = terms(model(x), x)
    bad[1] = bad[1] * float("inf")
    with pytest.warns(LossBalanceWarning):
        opt.step(bad, grad_scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_bf16_autocast_trains():
    model, data = model_and_data(torch.float32)
    opt = MTAdam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        for x in data:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = terms(out.float(), x)
            first = first if first is not None else sum(float(v.detach()) for v in loss)
            opt.step(loss)
    last = sum(float(v.detach()) for v in terms(model(data[0]), data[0]))
    assert last < first


@pytest.mark.parametrize("scenario", ["plain", "ddp", "ddp-nan"])
def test_two_process_gloo_matches_single_process(tmp_path, scenario):
    run = subprocess.run(
        [sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path), scenario],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    for rank in (0, 1):
        params = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for p, q in zip(params, single):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
