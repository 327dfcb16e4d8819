"""MTAdam on a model sharded with FSDP2 (``fully_shard``), with a distributed checkpoint.

    torchrun --nproc_per_node=2 examples/fsdp_mtadam.py

Each rank holds a shard of every parameter and of MTAdam's state ((I + 1)|theta| / R
elements, plus the per-layer magnitudes) and trains on its shard of every batch. The
per-term gradients come from one backward pass per term, which FSDP reduce-scatters; the
magnitude of a layer is the norm of the whole layer, from the shards' squared norms summed
in one all-reduce per step. The update equals single-process training on the whole batch.
Halfway, the model and optimizer are saved with ``torch.distributed.checkpoint`` and
loaded into a fresh model and optimizer, which continue bit-identically. On the CPU it
uses the gloo backend.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard

import lossbalance


def build(device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # identical initial parameters on every rank
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    model.append(nn.Linear(64, 2))
    model.to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def train(model, opt, steps, rank, world, args, device) -> None:
    for step in steps:
        data = torch.Generator().manual_seed(step)
        x = torch.randn(args.batch, 8, generator=data)
        y = torch.stack([x[:, :4].sum(1), x[:, 4:].prod(1)], 1)
        shard = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
        out = model(x[shard].to(device))
        target = y[shard].to(device)
        losses = [
            (out[:, 0] - target[:, 0]).pow(2).mean(),
            1e3 * (out[:, 1] - target[:, 1]).abs().mean(),
        ]
        opt.step(losses)
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  losses {[round(float(v.detach()), 4) for v in losses]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
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
    half = args.steps // 2

    model = build(device)
    opt = lossbalance.MTAdam(model.parameters(), lr=1e-2)
    train(model, opt, range(half), rank, world, args, device)
    local = sum(
        s["exp_avg_sq"].to_local().numel() + s["exp_avg"].to_local().numel()
        for s in opt.state.values()
    )
    total = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"MTAdam state on rank 0: {local} elements ((I + 1)|theta| = {3 * total})")

    # the checkpoint directory must be the same on every rank
    path = [tempfile.mkdtemp(prefix="fsdp_mtadam_") if rank == 0 else None]
    dist.broadcast_object_list(path)
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path[0])
    train(model, opt, range(half, args.steps), rank, world, args, device)

    resumed = build(device)
    opt2 = lossbalance.MTAdam(resumed.parameters(), lr=1e-2)
    opt2.init_state(num_terms=2)  # the state DCP loads into
    state = {"model": resumed.state_dict(), "optim": opt2.state_dict()}
    dcp.load(state, checkpoint_id=path[0])
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["optim"])
    train(resumed, opt2, range(half, args.steps), rank, world, args, device)
    same = all(
        torch.equal(p.to_local(), q.to_local())
        for p, q in zip(model.parameters(), resumed.parameters())
    )
    flag = torch.tensor([float(same)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"resumed run identical to the uninterrupted one: {bool(flag.item())}", flush=True)
    # as with DDP (examples/ddp_mtadam.py): sharded modules and their optimizers keep the
    # gloo group alive past destroy_process_group, which can abort the process at exit
    del model, resumed, opt, opt2, state
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
