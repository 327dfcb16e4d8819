"""The PyTorch Lightning examples train for a few CPU steps (skipped without lightning)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

import lossbalance

L = pytest.importorskip("lightning")

pytestmark = pytest.mark.lightning

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fit(module, data) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        # Lightning's advice on data loader workers and logging is not under test
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    return trainer


def test_lightning_mtadam_example_trains():
    example = load("lightning_mtadam")
    module, data = example.build()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = fit(module, data)
    assert trainer.global_step == 3
    opt = module.optimizers().optimizer
    assert isinstance(opt, lossbalance.MTAdam)
    for p, b in zip(module.parameters(), before, strict=True):
        assert int(opt.state[p]["step"]) == 3
        assert not torch.equal(p, b) and torch.isfinite(p).all()
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("method", ["imtl", "gradnorm", "uncertainty"])
def test_lightning_balancer_example_trains(method):
    example = load("lightning_balancer")
    module, data = example.build(method)
    before = [p.detach().clone() for p in module.trunk.parameters()]
    trainer = fit(module, data)
    assert trainer.global_step == 3
    weights = module.balancer.last_weights
    assert weights is not None and weights.shape == (3,) and torch.isfinite(weights).all()
    for p, b in zip(module.trunk.parameters(), before, strict=True):
        assert not torch.equal(p, b) and torch.isfinite(p).all()
    state = trainer.optimizers[0].state
    assert all(int(state[p]["step"]) == 3 for p in module.trunk.parameters())
