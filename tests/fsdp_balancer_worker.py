"""Worker for ``test_fsdp.py``'s balancer cases: ``python fsdp_balancer_worker.py OUT_DIR``.

Two gloo processes on the CPU (float64) train every configuration of ``CONFIGS`` through
``lossbalance.backward`` with the trunk's layers and the heads sharded by ``fully_shard``
(the head ``extra`` left out, a plain tensor), each rank on its half of every batch; then
this process trains the same configurations without FSDP on the whole batches. The full
(gathered) parameters and the balancers' states are saved for the test to compare.
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

import lossbalance

STEPS = 10
BATCH = 8
CONFIGS = [
    dict(name=name, mode=mode)
    for mode in ("exact", "feature")
    for name in ("imtl-g", "mgda", "pcgrad", "gradnorm", "imtl")
] + [dict(name="mgda", mode="exact", accumulate=2)]


def key(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(cfg.items()))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 8), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 3)])
        self.extra = nn.Linear(8, 1)  # left out of fully_shard

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


def batch(step: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 4, generator=gen, dtype=torch.float64)
    y = torch.stack([x.sum(1), 3 * torch.sin(x[:, 0] * x[:, 1])], 1)
    c = (x[:, 2] > 0).long() + (x[:, 3] > 0.5).long()
    return x, y, c


def terms(net: Net, z: Tensor, outs: list[Tensor], y: Tensor, c: Tensor) -> list[Tensor]:
    return [
        (outs[0].squeeze(1) - y[:, 0]).pow(2).mean(),
        nn.functional.cross_entropy(outs[1], c),
        10.0 * (net.extra(z).squeeze(1) - y[:, 1]).abs().mean(),
    ]


def build(cfg: dict, world: int):
    torch.manual_seed(0)
    net = Net().double()
    if world > 1:
        fully_shard(net.trunk[0])
        fully_shard(net.trunk[2])
        fully_shard(net, ignored_params=set(net.extra.parameters()))
    kwargs: dict = {}
    if cfg["name"] == "pcgrad":
        kwargs["seed"] = 7
    if cfg["name"] == "mgda":
        kwargs["solver"] = "exact"
    balancer = lossbalance.create(cfg["name"], 3, **kwargs).double()
    opt = torch.optim.SGD([*net.parameters(), *balancer.parameters()], lr=0.05, momentum=0.5)
    return net, balancer, opt


def full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(cfg: dict, rank: int, world: int, steps: range = range(STEPS), run=None) -> dict:
    net, balancer, opt = build(cfg, world) if run is None else run
    for step in steps:
        x, y, c = batch(step)
        lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
        opt.zero_grad()
        micro = cfg.get("accumulate", 1) if world > 1 else 1
        if micro > 1:
            # micro-batches on the ranks, the whole batch at once in the reference
            acc = lossbalance.Accumulator(balancer, net.trunk, mode=cfg["mode"])
            for part in range(micro):
                sl = slice(lo + part * (hi - lo) // micro, lo + (part + 1) * (hi - lo) // micro)
                z, outs = net(x[sl])
                acc.accumulate([loss / micro for loss in terms(net, z, outs, y[sl], c[sl])])
            acc.backward()
            opt.step()
            continue
        z, outs = net(x[lo:hi])
        losses = terms(net, z, outs, y[lo:hi], c[lo:hi])
        features = z if cfg["mode"] == "feature" else None
        lossbalance.backward(losses, balancer, net.trunk, features=features, mode=cfg["mode"])
        opt.step()
    return {
        "params": [full(p).detach().clone() for p in net.parameters()],
        "balancer": copy.deepcopy(balancer.state_dict()),
    }


RESUME = dict(name="gradnorm", mode="exact")
SPLIT = 5


class Optimizers:
    """The model's and the balancer's optimizers, stepped together: the state-dict helpers
    of torch.distributed.checkpoint take only the model's parameters."""

    def __init__(self, net: Net, balancer: lossbalance.Balancer) -> None:
        self.model = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.5)
        self.balancer = torch.optim.SGD(balancer.parameters(), lr=0.05, momentum=0.5)

    def zero_grad(self) -> None:
        self.model.zero_grad()
        self.balancer.zero_grad()

    def step(self) -> None:
        self.model.step()
        self.balancer.step()


def fresh_run(world: int):
    net, balancer, _ = build(RESUME, world)
    return net, balancer, Optimizers(net, balancer)


def checkpoint(net: Net, balancer: lossbalance.Balancer, opt: Optimizers) -> dict:
    return {
        "model": net.state_dict(),
        "balancer": balancer.state_dict(),
        "optim": get_optimizer_state_dict(net, opt.model),
        "balancer_optim": get_optimizer_state_dict(balancer, opt.balancer),
    }


def resume(rank: int, world: int, out: str) -> dict:
    """GradNorm (stateful: L(0), its task weights) saved with torch.distributed.checkpoint
    after SPLIT steps, resumed into a fresh model, balancer and optimizer."""
    run = fresh_run(world)
    train(RESUME, rank, world, range(SPLIT), run)
    dcp.save(checkpoint(*run), checkpoint_id=f"{out}/balancer-ckpt")
    done = train(RESUME, rank, world, range(SPLIT, STEPS), run)
    fresh = fresh_run(world)
    net2, balancer2, opt2 = fresh
    target = checkpoint(*fresh)
    dcp.load(target, checkpoint_id=f"{out}/balancer-ckpt")
    net2.load_state_dict(target["model"])
    balancer2.load_state_dict(target["balancer"])
    set_optimizer_state_dict(net2, opt2.model, target["optim"])
    set_optimizer_state_dict(balancer2, opt2.balancer, target["balancer_optim"])
    return {
        "uninterrupted": done,
        "resumed": train(RESUME, rank, world, range(SPLIT, STEPS), fresh),
    }


def worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        results = {key(cfg): train(cfg, rank, world) for cfg in CONFIGS}
        results["resume"] = resume(rank, world, out)
        torch.save(results, f"{out}/balancers-rank{rank}.pt")
    finally:
        # sharded modules in reference cycles keep the gloo group alive past
        # destroy_process_group, which can abort the process at exit: collect them first
        gc.collect()
        dist.destroy_process_group()


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    mp.spawn(worker, args=(2, out), nprocs=2)
    results = {key(cfg): train(cfg, 0, 1) for cfg in CONFIGS}
    torch.save(results, f"{out}/balancers-single.pt")


if __name__ == "__main__":
    main(sys.argv[1])
