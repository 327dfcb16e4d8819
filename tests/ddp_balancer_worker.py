"""Worker for the balancer DDP tests: ``python ddp_balancer_worker.py OUT_DIR``.

Spawns two gloo processes on CPU (float64). For every configuration in ``CONFIGS``
(every registered gradient-level balancer in several modes, some loss-level ones, the
model raw or wrapped in DistributedDataParallel, a NaN on one rank, accumulation, a
GradScaler, an explicit process group) each rank trains on its half of every batch
through ``lossbalance.backward`` (or ``lossbalance.Accumulator``); then this process
trains the same configuration alone on the whole batches. All final parameters and
balancer states are saved for the test to compare. One spawn for all configurations
keeps the start-up cost (two interpreters importing torch) paid once.
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import lossbalance

STEPS = 10
BATCH = 8
NAN_STEP = 4
GRADIENT_LEVEL = [
    name
    for name in lossbalance.available_methods()
    if lossbalance.get_method(name).needs in ("grads", "gramian")
]
LOSS_LEVEL = ["uncertainty", "dwa", "initial-loss"]
# GradDrop's feature mode draws its masks from the feature gradients of the whole batch,
# needed before each rank's trunk pass: not supported under torch.distributed (it raises,
# see test_distributed.py::test_graddrop_feature_mode_raises_under_distributed); its second
# configuration runs the batched mode instead
NO_FEATURES = {"graddrop"}


def configs() -> list[dict]:
    out = []
    # Every method in both modes, the model raw in one and wrapped in DDP in the other
    # (the wrapper changes nothing for lossbalance, whose per-term passes bypass its
    # hooks); alternating which mode gets the wrapper covers both pairings.
    for i, name in enumerate(GRADIENT_LEVEL):
        for mode in ("exact", "batched" if name in NO_FEATURES else "feature"):
            out.append(dict(name=name, mode=mode, ddp=(mode != "exact") == (i % 2 == 0)))
    for i, name in enumerate(LOSS_LEVEL):
        out.append(dict(name=name, mode="auto", ddp=i % 2 == 0))
    out += [
        dict(name="imtl", mode="batched", ddp=False),
        dict(name="imtl", mode="gramian", ddp=True),
        dict(name="imtl-g", mode="exact", ddp=True, nan=True),
        dict(name="gradnorm", mode="feature", ddp=False, nan=True),
        dict(name="imtl", mode="feature", ddp=True, nan=True),
        dict(name="uncertainty", mode="auto", ddp=True, nan=True),
        dict(name="imtl", mode="exact", ddp=True, accumulate=2),
        dict(name="gradnorm", mode="feature", ddp=False, accumulate=2),
        dict(name="dwa", mode="auto", ddp=True, accumulate=2),
        dict(name="mgda", mode="exact", ddp=True, scaler=True),
        dict(name="imtl", mode="feature", ddp=False, scaler=True),
        dict(name="pcgrad", mode="exact", ddp=False, group=True),
        dict(name="mgda", mode="feature", ddp=True, frank_wolfe=True),
    ]
    return out


def key(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(cfg.items()))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1), nn.Linear(8, 3)])

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


def batch(step: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 4, generator=gen, dtype=torch.float64)
    y = torch.stack([x.sum(1), 3 * torch.sin(x[:, 0] * x[:, 1])], 1)
    c = (x[:, 2] > 0).long() + (x[:, 3] > 0.5).long()
    return x, y, c


def terms(outs: list[Tensor], y: Tensor, c: Tensor) -> list[Tensor]:
    return [
        (outs[0].squeeze(1) - y[:, 0]).pow(2).mean(),
        10.0 * (outs[1].squeeze(1) - y[:, 1]).abs().mean(),
        nn.functional.cross_entropy(outs[2], c),
    ]


def build(cfg: dict) -> tuple[Net, lossbalance.Balancer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Net().double()
    kwargs: dict = {}
    if cfg["name"] in ("pcgrad", "graddrop"):
        kwargs["seed"] = 7  # the same random orders (masks) on every rank
    if cfg["name"] == "mgda" and not cfg.get("frank_wolfe"):
        # Frank-Wolfe stops at tol=1e-6, a stopping point that rounding-level differences
        # of the Gramian can move; the exact solver does not (see frank_wolfe below)
        kwargs["solver"] = "exact"
    balancer = lossbalance.create(cfg["name"], 3, **kwargs).double()
    params = [*model.parameters(), *balancer.parameters()]
    return model, balancer, torch.optim.SGD(params, lr=0.05, momentum=0.5)


def train(cfg: dict, rank: int, world: int, group: object = "auto") -> dict:
    model, balancer, opt = build(cfg)
    net = nn.parallel.DistributedDataParallel(model) if cfg["ddp"] and world > 1 else model
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if cfg.get("scaler") else None
    micro = cfg.get("accumulate", 1) if world > 1 else 1
    acc = (
        lossbalance.Accumulator(balancer, model.trunk, mode=cfg["mode"], grad_scaler=scaler)
        if micro > 1
        else None
    )
    collectives, checks = [], []
    for step in range(STEPS):
        if cfg.get("nan") and step == NAN_STEP and world == 1:
            continue  # the reference never sees the poisoned batch
        before, checked = CALLS[0], CHECKS[0]
        x, y, c = batch(step)
        lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
        x, y, c = x[lo:hi], y[lo:hi], c[lo:hi]
        opt.zero_grad()
        for chunk in range(micro):
            part = slice(chunk * len(x) // micro, (chunk + 1) * len(x) // micro)
            z, outs = net(x[part])
            losses = terms(outs, y[part], c[part])
            if cfg.get("nan") and step == NAN_STEP and rank == 1:
                losses[1] = losses[1] * float("nan")
            features = z if cfg["mode"] == "feature" else None
            if acc is not None:
                acc.accumulate([loss / micro for loss in losses], features=features)
                continue
            weights = lossbalance.backward(
                losses,
                balancer,
                model.trunk,
                features=features,
                mode=cfg["mode"],
                process_group=group,
                grad_scaler=scaler,
            )
        if acc is not None:
            weights = acc.backward()
        collectives.append(CALLS[0] - before)
        checks.append(CHECKS[0] - checked)
        if cfg.get("nan") and step == NAN_STEP:
            assert torch.isnan(weights).all(), weights
            assert all(p.grad is None for p in model.parameters())
            continue
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "balancer": copy.deepcopy(balancer.state_dict()),
        "collectives": collectives,
        "checks": checks,
    }


CALLS = [0]  # all-reduces
CHECKS = [0]  # all-gathers: the layout checks


def counting(collective, calls):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        return collective(*args, **kwargs)

    return wrapper


def worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)  # tiny models: threads would only fight over the cores
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    group = dist.new_group([0, 1])
    # what lossbalance calls, counted per step
    dist.all_reduce = counting(dist.all_reduce, CALLS)
    dist.all_gather = counting(dist.all_gather, CHECKS)
    warnings.simplefilter("ignore")  # skipped steps and fallbacks warn; tested elsewhere
    results = {}
    for cfg in configs():
        results[key(cfg)] = train(cfg, rank, world, group if cfg.get("group") else "auto")
    torch.save(results, f"{out}/rank{rank}.pt")
    # free the DistributedDataParallel wrappers (in reference cycles) while the process
    # group is alive: freed at exit, gloo's threads can abort the process
    gc.collect()
    dist.destroy_process_group()


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    mp.spawn(worker, args=(2, out), nprocs=2)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    single = {key(cfg): train(copy.deepcopy(cfg), 0, 1) for cfg in configs()}
    torch.save(single, f"{out}/single.pt")
    print(f"{len(single)} configurations in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1])
