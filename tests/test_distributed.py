"""The balancers under torch.distributed: two gloo processes equal one process.

``ddp_balancer_worker.py`` runs every configuration in one spawn (two ranks, each on half
of every batch) and then alone on the whole batches; here the results are compared:
parameters within 1e-10 relative of the single process, and bit-identical across ranks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lossbalance
from lossbalance.engine._distributed import resolve_group, world_size

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import ddp_balancer_worker as worker  # noqa: E402

CONFIGS = worker.configs()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-balancers")
    run = subprocess.run(
        [sys.executable, str(HERE / "ddp_balancer_worker.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    load = lambda name: torch.load(out / name, weights_only=False)  # noqa: E731
    return load("single.pt"), load("rank0.pt"), load("rank1.pt")


def test_configurations_cover_every_gradient_level_method():
    names = {cfg["name"] for cfg in CONFIGS}
    gradient_level = {
        name
        for name in lossbalance.available_methods()
        if lossbalance.get_method(name).needs in ("grads", "gramian")
    }
    assert gradient_level and gradient_level <= names
    for name in gradient_level:  # each method raw and wrapped in DistributedDataParallel
        assert {cfg["ddp"] for cfg in CONFIGS if cfg["name"] == name} == {False, True}, name
        second = "batched" if name in worker.NO_FEATURES else "feature"
        assert {cfg["mode"] for cfg in CONFIGS if cfg["name"] == name} >= {"exact", second}
    assert {"uncertainty", "dwa", "initial-loss"} <= names
    for extra in ("nan", "accumulate", "scaler", "group"):
        assert any(cfg.get(extra) for cfg in CONFIGS), extra
    assert {cfg["mode"] for cfg in CONFIGS} >= {"exact", "feature", "batched", "gramian"}


@pytest.mark.parametrize("cfg", CONFIGS, ids=worker.key)
def test_two_ranks_match_one_process(runs, cfg):
    single, rank0, rank1 = runs
    key = worker.key(cfg)
    # MGDA's Frank-Wolfe stops at tol=1e-6: rounding-level changes of the Gramian move its
    # stopping point by up to about tol (the exact solver is held to 1e-10 like the others)
    rtol = 1e-5 if cfg.get("frank_wolfe") else 1e-10
    for p, q in zip(rank0[key]["params"], rank1[key]["params"], strict=True):
        assert torch.equal(p, q), f"ranks diverged: {key}"
    assert_same(rank0[key]["balancer"], rank1[key]["balancer"], key)
    for p, q in zip(rank0[key]["params"], single[key]["params"], strict=True):
        scale = q.abs().max()
        assert (p - q).abs().max() <= rtol * scale, (key, ((p - q).abs().max() / scale).item())
    for name, value in single[key]["balancer"].items():
        other = rank0[key]["balancer"][name]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(other, value, rtol=max(rtol, 1e-9), atol=1e-12)


def expected_collectives(cfg: dict) -> int:
    """All-reduces per step: one, except two for feature mode and loss-level balancers
    (without accumulation), whose second one carries the gradients that need the weights."""
    if cfg.get("accumulate"):
        return 1
    loss_level = lossbalance.get_method(cfg["name"]).needs == "losses"
    balancer = lossbalance.create(cfg["name"], 3)
    # a VectorBalancer without accepts_features falls back to exact mode (warned)
    exact = getattr(balancer, "needs_grads", False) and not balancer.accepts_features
    return 2 if (cfg["mode"] == "feature" and not exact) or loss_level else 1


@pytest.mark.parametrize("cfg", CONFIGS, ids=worker.key)
def test_collectives_per_step(runs, cfg):
    _, rank0, rank1 = runs
    key = worker.key(cfg)
    counts = rank0[key]["collectives"]
    assert counts == rank1[key]["collectives"]
    assert len(counts) == worker.STEPS
    # one layout check (a small all-gather) before the first all-reduce of every step
    assert rank0[key]["checks"] == rank1[key]["checks"] == [1] * worker.STEPS, key
    for step, count in enumerate(counts):
        if cfg.get("nan") and step == worker.NAN_STEP:
            # the averaged losses are NaN: every rank stops after the first collective
            assert count == 1, (key, counts)
        else:
            assert count == expected_collectives(cfg), (key, counts)


def assert_same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], where)
    else:
        assert a == b, where


def test_example_runs_under_torchrun():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "examples" / "ddp_balancer.py"),
            "--steps",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "parameters identical on all 2 ranks: True" in run.stdout


# --------------------------------------------------------------------------- no group


def test_resolve_group_without_distributed():
    assert resolve_group(None) is None
    assert resolve_group("auto") is None  # not initialised: single process
    assert world_size(None) == 1
    with pytest.raises(ValueError, match=r"Invalid process_group: 'world' \(expected 'auto'"):
        resolve_group("world")
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialised"):
        resolve_group(object())


def test_backward_validates_process_group():
    w = torch.zeros(2, requires_grad=True)
    losses = [w.sum(), (w - 1).pow(2).sum()]
    with pytest.raises(ValueError, match=r"Invalid process_group: 'nccl'"):
        lossbalance.backward(losses, lossbalance.MGDA(2), [w], process_group="nccl")
    with pytest.raises(ValueError, match=r"Invalid process_group: 'x'"):
        lossbalance.Accumulator(lossbalance.MGDA(2), [w], process_group="x")
    # None and "auto" without an initialised group are the single-process path
    for group in (None, "auto"):
        w.grad = None
        lossbalance.backward(losses, lossbalance.Uniform(2), process_group=group, retain_graph=True)
        assert torch.equal(w.grad, torch.tensor([-1.0, -1.0]))


def test_graddrop_feature_mode_raises_under_distributed(monkeypatch):
    # raised before any collective (from the configuration alone), so every rank raises
    # the same error instead of waiting for the others; nothing is written
    import lossbalance.engine._backward as backward_module

    monkeypatch.setattr(backward_module, "resolve_group", lambda group: object())
    torch.manual_seed(0)
    trunk, head = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    z = trunk(torch.randn(5, 3))
    out = head(z)
    losses = [out[:, 0].pow(2).mean(), out[:, 1].abs().mean()]
    balancer = lossbalance.GradDrop(2, seed=0)
    with pytest.raises(NotImplementedError, match=r"GradDrop in mode='feature' under torch\.dist"):
        lossbalance.backward(losses, balancer, trunk, features=z)
    assert all(p.grad is None for p in [*trunk.parameters(), *head.parameters()])
    assert balancer.last_weights is None
