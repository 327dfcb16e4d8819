"""MTAdam under torch.distributed (DDP), launched with torchrun.

    torchrun --nproc_per_node=2 examples/ddp_mtadam.py

Each rank trains on its shard of every batch. MTAdam averages the per-term gradients
and loss values across ranks in one all-reduce per step (DDP's own hooks do not fire for
the per-term ``autograd.grad`` calls), so every rank applies the same update, equal to
single-process training on the whole batch. On CPU it uses the gloo backend.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn

import lossbalance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    # NCCL needs one GPU per process on this node; otherwise (CPU, or fewer GPUs) gloo
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = "nccl" if torch.cuda.device_count() >= local_world else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        if backend == "nccl"
        else torch.device("cpu")
    )

    torch.manual_seed(0)  # identical initial parameters on every rank
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = lossbalance.MTAdam(ddp.parameters(), lr=1e-2)

    data = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        x = torch.randn(args.batch, 8, generator=data)
        y = torch.stack([x[:, :4].sum(1), x[:, 4:].prod(1)], 1)
        shard = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
        out = ddp(x[shard].to(device))
        target = y[shard].to(device)
        losses = [
            (out[:, 0] - target[:, 0]).pow(2).mean(),
            1e3 * (out[:, 1] - target[:, 1]).abs().mean(),
        ]
        opt.step(losses)
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  losses {[round(float(v), 4) for v in losses]}", flush=True)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"parameters identical on all {world} ranks: {same}", flush=True)
    # the DDP wrapper keeps the gloo group alive past destroy_process_group otherwise,
    # which can abort the process at exit
    del ddp
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
