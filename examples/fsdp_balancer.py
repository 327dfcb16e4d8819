"""A gradient-level balancer (IMTL-G) on a trunk sharded with FSDP2 (``fully_shard``).

    torchrun --nproc_per_node=2 examples/fsdp_balancer.py [--mode exact|feature]

Each rank holds a shard of every parameter and trains on its shard of every batch.
``lossbalance.backward`` gets the per-term gradients of the sharded trunk from one backward
pass per term (``mode="exact"``), which FSDP reduce-scatters, and sums the ranks' shard
Gramians with the loss values in one all-reduce; in ``mode="feature"`` it balances the
gradients of the trunk's output and writes the trunk through one backward pass. Every rank
computes the same weights, equal to one process on the whole batch. The head ``aux`` is
left out of ``fully_shard``: its gradient is averaged over the ranks as under DDP. On the
CPU it uses the gloo backend.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import lossbalance


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 1)
        self.aux = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x)
        return z, self.head(z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mode", choices=("exact", "feature"), default="exact")
    args = parser.parse_args()

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
    model = Net().to(device)
    fully_shard(model.trunk[0])
    fully_shard(model.trunk[2])
    fully_shard(model, ignored_params=set(model.aux.parameters()))
    balancer = lossbalance.create("imtl-g", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    for step in range(args.steps):
        data = torch.Generator().manual_seed(step)
        x = torch.randn(args.batch, 8, generator=data)
        y = torch.stack([x[:, :4].sum(1), x[:, 4:].prod(1)], 1)
        shard = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
        z, out = model(x[shard].to(device))
        target = y[shard].to(device)
        losses = [
            (out[:, 0] - target[:, 0]).pow(2).mean(),
            10.0 * (model.aux(z)[:, 0] - target[:, 1]).pow(2).mean(),
        ]
        opt.zero_grad()
        features = z if args.mode == "feature" else None
        weights = lossbalance.backward(
            losses, balancer, model.trunk, features=features, mode=args.mode
        )
        opt.step()
        if rank == 0 and step % 5 == 0:
            shown = [round(float(v.detach()), 4) for v in losses]
            print(f"step {step:3d}  losses {shown}  weights {weights.tolist()}", flush=True)

    flat = torch.cat([p.full_tensor().reshape(-1) for p in model.trunk.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"trunk identical on all {world} ranks: {same}", flush=True)
    # as with DDP (examples/ddp_mtadam.py): the sharded model keeps the gloo group alive
    # past destroy_process_group, which can abort the process at exit
    del model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
