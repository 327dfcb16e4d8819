"""Worker for ``test_fsdp.py``: ``python fsdp_worker.py OUT_DIR``.

Two gloo processes on the CPU (float64) train the cases of ``CASES`` with the model under
FSDP2 (``fully_shard`` on the trunk's layers and the root, the plain head ``extra`` left
out), each rank on its half of every batch, and save the full parameters (gathered) and the
per-rank state sizes to ``OUT_DIR/<case>-rank<r>.pt``; then this process trains the same
cases without FSDP on the whole batches (``OUT_DIR/<case>-single.pt``). The ``resume``
case also saves a distributed checkpoint after ``SPLIT`` steps, resumes from it on two ranks
and on one process.
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
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import lossbalance

STEPS = 10
SPLIT = 5
BATCH = 8
CASES = ["mtadam", "groups", "nan", "resume", "bf16"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # 5 rows in a layer: uneven shards (3 and 2 rows) over two ranks
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 8), nn.Tanh())
        self.head_a = nn.Linear(8, 1)
        self.head_b = nn.Linear(8, 2)
        self.extra = nn.Linear(8, 1)  # left out of fully_shard: a plain tensor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # through the root's forward, where FSDP all-gathers the root group (the heads)
        f = self.trunk(x)
        # head_b sees detached features: its term reaches only head_b (a sharded head)
        return f, self.head_a(f), self.head_b(f.detach())


def build(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def shard(net: Net, case: str) -> Net:
    mp_policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if case == "bf16"
        else MixedPrecisionPolicy()
    )
    fully_shard(net.trunk[0], mp_policy=mp_policy)
    fully_shard(net.trunk[2], mp_policy=mp_policy)
    # the root group holds the heads; `extra` is ignored by FSDP
    fully_shard(net, mp_policy=mp_policy, ignored_params=set(net.extra.parameters()))
    return net


def batch(step: int, case: str) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 4, generator=gen, dtype=torch.float64)
    y = torch.stack([x.sum(1), torch.sin(3 * x[:, 0])], 1)
    if case in ("nan", "bf16") and step == 3:
        x[BATCH - 1, 0] = float("nan")  # on rank 1's half only
    return x, y


def losses(net: Net, x: Tensor, y: Tensor) -> list[Tensor]:
    f, a, b = net(x)
    return [
        (a.squeeze(1).to(x.dtype) - y[:, 0]).pow(2).mean(),
        100.0 * (b.to(x.dtype) - y[:, 1:]).pow(2).mean(),
        # the plain head and the trunk
        0.01 * net.extra(f.to(net.extra.weight.dtype)).pow(2).mean(),
    ]


def optimizer(net: Net, case: str) -> lossbalance.MTAdam:
    if case == "groups":
        named = list(net.named_parameters())
        return lossbalance.MTAdam(
            [
                {"params": [(n, p) for n, p in named if n.startswith("trunk")], "lr": 1e-2},
                {"params": [(n, p) for n, p in named if not n.startswith("trunk")]},
            ],
            lr=3e-3,
            grouping="module",
        )
    return lossbalance.MTAdam(net.parameters(), lr=1e-2)


def full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(net: Net, opt: lossbalance.MTAdam, case: str, steps: range, rank: int, world: int):
    for step in steps:
        x, y = batch(step, case)
        half = BATCH // world
        x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        opt.step(losses(net, x, y))


def result(net: Net, opt: lossbalance.MTAdam) -> dict:
    local_state = 0
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            t = state[key]
            local_state += (t._local_tensor if hasattr(t, "_local_tensor") else t).numel()
    return {
        "params": [full(p).detach().clone() for p in net.parameters()],
        "skipped": opt.skipped_steps,
        "state_elements": local_state,
        "state_dtypes": sorted(
            {str(s[k].dtype) for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")}
        ),
    }


def run_case(case: str, rank: int, world: int, out: str) -> None:
    net = build()
    if world > 1:
        shard(net, case)
    opt = optimizer(net, case)
    if case != "resume":
        train(net, opt, case, range(STEPS), rank, world)
        torch.save(result(net, opt), f"{out}/{case}-{f'rank{rank}' if world > 1 else 'single'}.pt")
        return
    train(net, opt, case, range(SPLIT), rank, world)
    if world > 1:
        dcp.save(
            {"model": net.state_dict(), "optim": opt.state_dict()}, checkpoint_id=f"{out}/ckpt"
        )
        # a copy: the helper returns the live state tensors, which the next steps change
        osd = copy.deepcopy(get_optimizer_state_dict(net, opt))
    train(net, opt, case, range(SPLIT, STEPS), rank, world)
    tag = f"rank{rank}" if world > 1 else "single"
    torch.save(result(net, opt), f"{out}/resume-{tag}.pt")
    # resume from the distributed checkpoint into a fresh model and optimizer
    net2 = build(seed=1)
    if world > 1:
        shard(net2, case)
    opt2 = optimizer(net2, case)
    opt2.init_state(3)
    sd = {"model": net2.state_dict(), "optim": opt2.state_dict()}
    dcp.load(sd, checkpoint_id=f"{out}/ckpt")
    net2.load_state_dict(sd["model"])
    opt2.load_state_dict(sd["optim"])
    train(net2, opt2, case, range(SPLIT, STEPS), rank, world)
    torch.save(result(net2, opt2), f"{out}/resumed-{tag}.pt")
    if world > 1:
        # the same through torch.distributed.checkpoint.state_dict's optimizer helpers
        net3 = build(seed=2)
        shard(net3, case)
        dcp.load({"model": net3.state_dict()}, checkpoint_id=f"{out}/ckpt")
        opt3 = optimizer(net3, case)
        opt3.init_state(3)
        set_optimizer_state_dict(net3, opt3, osd)
        train(net3, opt3, case, range(SPLIT, STEPS), rank, world)
        torch.save(result(net3, opt3), f"{out}/resumed-osd-{tag}.pt")


def worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    try:
        for case in CASES:
            run_case(case, rank, world, out)
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
    for case in CASES:
        if case != "bf16":
            run_case(case, 0, 1, out)


if __name__ == "__main__":
    main(sys.argv[1])
