"""Worker for the distributed tests: ``python ddp_worker.py OUT_DIR SCENARIO``.

Spawns two gloo processes on CPU that train with MTAdam on halves of each batch and
save their final parameters; the test compares them with one process on whole batches.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lossbalance


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def batch(step: int) -> torch.Tensor:
    return torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step))


def losses(out: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
    return [(out[:, 0] - x[:, 0]).pow(2).mean(), 100 * (out[:, 1] - x[:, 1]).abs().mean()]


def train(rank: int, world: int, scenario: str, steps: int = 10) -> nn.Module:
    model = make_model()
    net = (
        nn.parallel.DistributedDataParallel(model)
        if scenario.startswith("ddp") and world > 1
        else model
    )
    opt = lossbalance.MTAdam(net.parameters(), lr=1e-2)
    for step in range(steps):
        x = batch(step)
        if world > 1:
            x = x[rank * 8 // world : (rank + 1) * 8 // world]
        terms = losses(net(x), x)
        if scenario == "ddp-nan" and step == 4 and rank == 1:
            terms[1] = terms[1] * float("nan")
        if scenario == "ddp-nan" and step == 4 and world == 1:
            continue  # the reference run never sees the poisoned batch
        opt.step(terms)
    return model


def worker(rank: int, world: int, out: str, scenario: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    model = train(rank, world, scenario)
    torch.save([p.detach() for p in model.parameters()], f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # gloo's threads can abort interpreter teardown ("terminate called without an active
    # exception", a torch issue): the results are saved, so leave without it
    os._exit(0)


if __name__ == "__main__":
    out_dir, scenario = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(worker, args=(2, out_dir, scenario), nprocs=2)
    torch.save([p.detach() for p in train(0, 1, scenario).parameters()], f"{out_dir}/single.pt")
