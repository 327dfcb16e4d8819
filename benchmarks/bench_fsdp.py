"""MTAdam under FSDP2 (``fully_shard``) against DDP, two gloo ranks on the CPU, side by side.

    python benchmarks/bench_fsdp.py [--width 512] [--depth 4] [--terms 3] [--steps 20]

Prints, per rank, MTAdam's state elements (moments; target (I + 1)|theta| / R) and
magnitudes, and the median step time (forward + MTAdam.step) of the same model and batch
wrapped in DistributedDataParallel and sharded with ``fully_shard``, the two runs
interleaved step by step so that both see the same machine load. Timings are for this
machine only; the command is printed with them.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

import lossbalance


def build(args) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(32, args.width), nn.Tanh()]
    for _ in range(args.depth - 1):
        layers += [nn.Linear(args.width, args.width), nn.Tanh()]
    layers.append(nn.Linear(args.width, args.terms))
    return nn.Sequential(*layers)


def losses(model, x, terms):
    out = model(x)
    return [(10.0**i) * out[:, i].pow(2).mean() for i in range(terms)]


def state_elements(opt) -> tuple[int, int]:
    moments = mags = 0
    for s in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            t = s[key]
            moments += (t.to_local() if hasattr(t, "to_local") else t).numel()
        mags += s["magnitude"].numel()
    return moments, mags


def worker(rank: int, world: int, store: str, args, queue) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ddp_model = nn.parallel.DistributedDataParallel(build(args))
    fsdp_model = build(args)
    for layer in fsdp_model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(fsdp_model)
    runs = {
        "DDP": (ddp_model, lossbalance.MTAdam(ddp_model.parameters(), lr=1e-3)),
        "FSDP2": (fsdp_model, lossbalance.MTAdam(fsdp_model.parameters(), lr=1e-3)),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    gen = torch.Generator().manual_seed(rank)
    for step in range(args.warmup + args.steps):
        x = torch.randn(args.batch // world, 32, generator=gen)
        for name, (model, opt) in runs.items():
            dist.barrier()
            start = time.perf_counter()
            opt.step(losses(model, x, args.terms))
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                times[name].append(elapsed)
    result = {
        name: (statistics.median(times[name]), *state_elements(opt))
        for name, (_, opt) in runs.items()
    }
    queue.put((rank, result))
    del ddp_model, runs
    gc.collect()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--terms", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    world = 2
    numel = sum(q.numel() for q in build(args).parameters())
    tensors = len(list(build(args).parameters()))
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, f"{tmp}/store", args, queue), nprocs=world)
    results = dict(queue.get() for _ in range(world))
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}, lossbalance {lossbalance.__version__}, gloo, R={world}"
    )
    print(
        f"model: |theta| = {numel} in {tensors} tensors, I = {args.terms} terms, "
        f"batch {args.batch}; target (I + 1)|theta| / R = {(args.terms + 1) * numel // world}"
    )
    print(f"{'rank':>4} {'run':>6} {'state elements':>15} {'magnitudes':>10} {'step ms':>8}")
    for rank in sorted(results):
        for name, (t, moments, mags) in results[rank].items():
            print(f"{rank:>4} {name:>6} {moments:>15} {mags:>10} {1e3 * t:>8.2f}")
    ratio = [results[r]["FSDP2"][0] / results[r]["DDP"][0] for r in sorted(results)]
    print(f"FSDP2 / DDP step time: {', '.join(f'{x:.2f}' for x in ratio)} (per rank)")


if __name__ == "__main__":
    main()
