"""A gradient balancer under torch.distributed (DDP), launched with torchrun.

    torchrun --nproc_per_node=2 examples/ddp_balancer.py
    torchrun --nproc_per_node=2 examples/ddp_balancer.py --method mgda --mode exact --amp

Each rank trains a shared trunk with three task heads on its shard of every batch.
``lossbalance.backward`` notices the process group and averages what the balancer needs
across the ranks before it runs: in ``--mode feature`` (the default) the loss values and
the K x K Gramian of the features' per-term gradients, then the trunk's gradient; in
``--mode exact`` the per-term gradients of the trunk, in one all-reduce. Every rank thus
computes the same weights and writes the same ``.grad``, equal to one process on the
whole batch; DDP's own gradient hooks do not fire (the per-term passes use
``torch.autograd.grad``), so wrapping the model in ``DistributedDataParallel`` is optional
(done here, as in a real script, for its parameter broadcast at start).

``--amp`` adds ``torch.autocast`` (bfloat16 on CPU, float16 on CUDA) and a
``torch.amp.GradScaler``: the balanced ``.grad`` is written scaled, and
``scaler.step(optimizer)`` unscales it and skips overflowing steps. On CPU the script
uses the gloo backend; with one GPU per rank, NCCL.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn

import lossbalance


class MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(32, 1), nn.Linear(32, 1), nn.Linear(32, 4)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="global batch (all ranks)")
    parser.add_argument("--method", default="imtl", help="a gradient- or loss-level method")
    parser.add_argument("--mode", default="feature", choices=["feature", "exact", "batched"])
    parser.add_argument("--amp", action="store_true", help="autocast + GradScaler")
    args = parser.parse_args()

    # NCCL needs one GPU per process on this node; otherwise (CPU, or fewer GPUs) gloo
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = "nccl" if torch.cuda.device_count() >= local_world else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    torch.manual_seed(0)  # identical initial parameters and balancer state on every rank
    model = MultiTask().to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    balancer = lossbalance.create(args.method, 3).to(device)
    params = [*model.parameters(), *balancer.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp)

    data = torch.Generator().manual_seed(1)  # the same batches on every rank: each takes a shard
    for step in range(args.steps):
        x = torch.randn(args.batch, 8, generator=data)
        y = torch.stack([x[:, :4].sum(1), torch.sin(3 * x[:, 4])], 1)
        c = (x[:, 5] > 0).long() + 2 * (x[:, 6] > 0).long()
        shard = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
        x, y, c = x[shard].to(device), y[shard].to(device), c[shard].to(device)

        opt.zero_grad()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            z, outs = ddp(x)
        losses = [
            (outs[0].float().squeeze(1) - y[:, 0]).pow(2).mean(),
            100.0 * (outs[1].float().squeeze(1) - y[:, 1]).abs().mean(),  # any scale
            nn.functional.cross_entropy(outs[2].float(), c),
        ]
        weights = lossbalance.backward(
            losses,
            balancer,
            shared=model.trunk,
            features=z if args.mode == "feature" else None,
            mode=args.mode,
            grad_scaler=scaler,
        )
        scaler.step(opt)  # a plain opt.step() when the scaler is disabled
        scaler.update()
        if rank == 0 and step % 10 == 0:
            print(
                f"step {step:3d}  losses {[round(float(v.detach()), 4) for v in losses]}  "
                f"weights {[round(float(w), 3) for w in weights]}",
                flush=True,
            )

    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"parameters identical on all {world} ranks: {same}", flush=True)
    # DistributedDataParallel keeps the process group alive past destroy_process_group;
    # freed at interpreter exit instead, gloo's worker threads can abort the process
    # ("terminate called without an active exception"). Free it first.
    del ddp
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
