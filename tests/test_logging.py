"""``lossbalance.TermLogger``: CSV rows, TensorBoard scalars, MTAdam magnitudes."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

import lossbalance
from lossbalance._logging import mtadam_term_stats


def read(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def balanced_steps(logger, steps=5, method="imtl-g"):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
    balancer = lossbalance.create(method, 2)
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1)
    logged = []
    for step in range(steps):
        x = torch.randn(8, 3)
        z = trunk(x)
        losses = {"mse": heads[0](z).pow(2).mean(), "l1": 5 * heads[1](z).abs().mean()}
        opt.zero_grad()
        weights = lossbalance.backward(losses, balancer, shared=trunk, features=z)
        opt.step()
        if logger.log(losses, balancer=balancer):
            logged.append((step, [float(v.detach()) for v in losses.values()], weights.tolist()))
    return logged


def test_csv_rows_every_n_steps(tmp_path):
    path = tmp_path / "runs" / "terms.csv"
    with lossbalance.TermLogger(every=2, csv=path) as logger:
        logged = balanced_steps(logger)
    rows = read(path)
    assert list(rows[0]) == ["step", "loss/mse", "loss/l1", "weight/mse", "weight/l1"]
    assert [int(r["step"]) for r in rows] == [0, 2, 4] == [s for s, _, _ in logged]
    for row, (_, losses, weights) in zip(rows, logged, strict=True):
        assert [float(row["loss/mse"]), float(row["loss/l1"])] == losses  # repr round-trips
        assert [float(row["weight/mse"]), float(row["weight/l1"])] == weights
    assert logger.records[1]["loss/l1"] == logged[1][1][1]


def test_mtadam_magnitudes_and_scales(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = lossbalance.MTAdam(model.parameters(), lr=1e-2)
    logger = lossbalance.TermLogger(csv=tmp_path / "mtadam.csv", names=["anchor", "big"])
    assert mtadam_term_stats(opt) is None
    for step in range(3):
        x = torch.randn(16, 3)
        out = model(x)
        losses = [(out[:, 0] - x[:, 0]).pow(2).mean(), 100 * (out[:, 1] - x[:, 1]).abs().mean()]
        opt.step(losses)
        logger.log(losses, optimizer=opt, step=step)
    logger.close()
    mags = torch.stack(list(opt.magnitudes().values())).double()  # (layers, terms)
    expected_mag = mags.square().sum(0).sqrt()
    row = read(tmp_path / "mtadam.csv")[-1]
    assert list(row) == [
        "step",
        "loss/anchor",
        "loss/big",
        "magnitude/anchor",
        "magnitude/big",
        "scale/anchor",
        "scale/big",
    ]
    assert float(row["magnitude/big"]) == pytest.approx(float(expected_mag[1]), rel=1e-12)
    assert float(row["scale/anchor"]) == pytest.approx(1.0)
    # the 100x term is scaled down towards the anchor's magnitude in every layer
    positive = mags[:, 1] > 0
    ratio = (mags[positive, 0] / mags[positive, 1]).mean()
    assert float(row["scale/big"]) == pytest.approx(float(ratio), rel=1e-12) and ratio < 1


def test_missing_values_are_empty_and_columns_are_fixed(tmp_path):
    balancer = lossbalance.DWA(2)
    logger = lossbalance.TermLogger(csv=tmp_path / "t.csv")
    logger.log([1.0, 2.0], balancer=balancer)  # no weights before the first step
    balancer(torch.tensor([1.0, 2.0], requires_grad=True))
    logger.log(torch.tensor([0.5, 1.5]), balancer=balancer)
    with pytest.raises(ValueError, match=r"new columns \['magnitude/0', 'magnitude/1'\]"):
        logger.log([1.0, 2.0], balancer=balancer, magnitudes=[1.0, 1.0])
    logger.close()
    rows = read(tmp_path / "t.csv")
    assert rows[0]["weight/0"] == "" and rows[1]["weight/0"] == "1.0"
    assert math.isnan(logger.records[0]["weight/1"])


def test_errors():
    with pytest.raises(ValueError, match=r"Invalid every: 0 \(expected an integer >= 1\)"):
        lossbalance.TermLogger(every=0)
    logger = lossbalance.TermLogger()
    with pytest.raises(ValueError, match="the number of terms disagrees between loss \\(2\\)"):
        logger.log([1.0, 2.0], weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="balancer= or weights=, not both"):
        logger.log([1.0], balancer=lossbalance.Uniform(1), weights=[1.0])
    with pytest.raises(TypeError, match="optimizer must be an MTAdam"):
        logger.log([1.0], optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1))
    with pytest.raises(TypeError, match="losses must be a sequence, mapping or 1-D tensor"):
        logger.log(3.0)
    assert not lossbalance.TermLogger(every=3).log([1.0], step=4)


def test_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with lossbalance.TermLogger(every=2, tensorboard=tmp_path / "tb") as logger:
        logged = balanced_steps(logger)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss/mse", "loss/l1", "weight/mse", "weight/l1"}
    scalars = events.Scalars("weight/l1")
    assert [s.step for s in scalars] == [0, 2, 4]
    for s, (_, _, weights) in zip(scalars, logged, strict=True):
        assert s.value == pytest.approx(weights[1], rel=1e-6)  # stored as float32


def test_tensorboard_missing_gives_a_clear_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ImportError, match=r"needs the tensorboard package: pip install"):
        lossbalance.TermLogger(tensorboard=tmp_path)
