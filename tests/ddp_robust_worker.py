"""Worker for ``test_distributed_robust.py``: ``python ddp_robust_worker.py OUT_DIR``.

Two gloo processes on CPU (float64) run the cases of ``CASES`` in order, each rank on its
half of every batch, and save each case's result (final parameters and MTAdam step
counters, or the error raised) to ``OUT_DIR/<case>-rank<r>.pt`` as soon as it is done;
this process then trains the cases that have a single-process reference on the whole
batches. The cases where the ranks disagree come last: on code that does not check the
layout they abort the processes, and the results saved before still count.
"""

from __future__ import annotations

import datetime
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

STEPS = 6
BATCH = 8
# cases with a single-process reference, then cases where the ranks disagree on purpose
MATCHING = ["mtadam", "backward-exact", "backward-feature", "accumulate"]
MISMATCHED = [
    "mtadam-terms",
    "backward-terms",
    "loss-level-heads",
    "feature-heads",
    "exact-heads",
    "accumulate-heads",
    "backward-mode",
]
CASES = MATCHING + MISMATCHED


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        # heads[2]: a task labelled on a few samples only; heads[3]: used on odd steps only
        self.heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1), nn.Linear(8, 2)])
        self.odd = nn.Linear(8, 1)


def batch(step: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 4, generator=gen, dtype=torch.float64)
    y = torch.stack([x.sum(1), torch.sin(3 * x[:, 0]), x[:, 1] * x[:, 2]], 1)
    # three consecutive samples (cyclically) carry the labels of task 2: on some steps
    # they all fall in one rank's shard (the other rank's head 2 is unused), on others
    # they are split
    labelled = (torch.arange(BATCH) + step) % BATCH < 3
    return x, y, labelled


def shard(step: int, rank: int, world: int) -> tuple[Tensor, Tensor, Tensor]:
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    return tuple(t[lo:hi] for t in batch(step))  # type: ignore[return-value]


def terms(
    model: Net, x: Tensor, y: Tensor, labelled: Tensor, *, empty: str, odd: bool
) -> tuple[Tensor, list[Tensor]]:
    """The loss terms of one shard, mean-reduced over the shard (a sum over the labelled
    samples divided by the shard size for task 2, so that the mean over equal shards is
    the loss of the whole batch).

    ``empty`` says what task 2 is on a shard without labels: ``"skip"`` leaves head 2 out
    of the graph (a term on the trunk times zero), ``"select"`` runs head 2 on the empty
    selection (head 2 stays in the graph with zero gradients).
    """
    z = model.trunk(x)
    t0 = (model.heads[0](z).squeeze(1) - y[:, 0]).pow(2).mean()
    t1 = 3.0 * (model.heads[1](z).squeeze(1) - y[:, 1]).abs().mean()
    if odd:
        t1 = t1 + model.odd(z).pow(2).mean()
    if labelled.any() or empty == "select":
        out = model.heads[2](z[labelled])
        t2 = (out - y[labelled, 2:]).pow(2).sum() / len(x)
    else:
        t2 = 0.0 * z.sum()
    return z, [t0, t1, t2]


def build() -> Net:
    torch.manual_seed(0)
    return Net().double()


def run_mtadam(rank: int, world: int, num_terms: int = 3) -> dict:
    model = build()
    opt = lossbalance.MTAdam(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        x, y, labelled = shard(step, rank, world)
        _, losses = terms(model, x, y, labelled, empty="skip", odd=step % 2 == 1)
        opt.step(losses[:num_terms])
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "steps": [
            float(opt.state[p]["step"]) if p in opt.state else 0.0 for p in model.parameters()
        ],
    }


def run_balancer(
    rank: int,
    world: int,
    *,
    method: str = "imtl-g",
    mode: str = "exact",
    empty: str = "select",
    accumulate: int = 1,
    num_terms: int = 3,
    steps: int = STEPS,
) -> dict:
    model = build()
    # MGDA's Frank-Wolfe stops at a tolerance that rounding-level differences can move
    kwargs = {"solver": "exact"} if method == "mgda" else {}
    balancer = lossbalance.create(method, num_terms, **kwargs).double()
    opt = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05)
    acc = lossbalance.Accumulator(balancer, model.trunk, mode=mode) if accumulate > 1 else None
    for step in range(steps):
        x, y, labelled = shard(step, rank, world)
        opt.zero_grad()
        for chunk in range(accumulate):
            part = slice(chunk * len(x) // accumulate, (chunk + 1) * len(x) // accumulate)
            z, losses = terms(model, x[part], y[part], labelled[part], empty=empty, odd=False)
            losses = [loss / accumulate for loss in losses[:num_terms]]
            features = z if mode == "feature" else None
            if acc is not None:
                acc.accumulate(losses, features=features)
            else:
                weights = lossbalance.backward(
                    losses, balancer, model.trunk, features=features, mode=mode
                )
        if acc is not None:
            weights = acc.backward()
        assert not weights.isnan().any(), (step, weights)
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()]}


def run(case: str, rank: int, world: int) -> dict:
    if case == "mtadam":
        return run_mtadam(rank, world)
    if case == "backward-exact":
        return run_balancer(rank, world, method="imtl-g", mode="exact")
    if case == "backward-feature":
        return run_balancer(rank, world, method="mgda", mode="feature")
    if case == "accumulate":
        return run_balancer(rank, world, method="imtl", mode="exact", accumulate=2)
    # the ranks disagree from here on: rank 1 differs from rank 0
    other = rank == 1
    if case == "mtadam-terms":
        return run_mtadam(rank, world, num_terms=3 if other else 2)
    if case == "backward-terms":
        return run_balancer(rank, world, method="mgda", num_terms=3 if other else 2, steps=1)
    # at step 0 task 2's labels are all in rank 0's shard: rank 1 does not reach head 2
    if case == "loss-level-heads":
        return run_balancer(rank, world, method="uncertainty", empty="skip", steps=1)
    if case == "feature-heads":
        return run_balancer(rank, world, method="mgda", mode="feature", empty="skip", steps=1)
    if case == "exact-heads":
        return run_balancer(rank, world, method="pcgrad", mode="exact", empty="skip", steps=1)
    if case == "accumulate-heads":
        return run_balancer(rank, world, method="imtl", accumulate=2, empty="skip", steps=1)
    if case == "backward-mode":
        return run_balancer(rank, world, method="mgda", mode="feature" if other else "exact")
    raise ValueError(case)


def worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    # a rank left waiting in a collective (a check that raised on one rank only) fails
    # within a minute instead of hanging the test
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    warnings.simplefilter("ignore")
    for case in CASES:
        try:
            result = run(case, rank, world)
        except RuntimeError as error:
            result = {"error": str(error)}
        torch.save(result, f"{out}/{case}-rank{rank}.pt")
    dist.barrier()  # the group still works after the errors
    gc.collect()
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort interpreter teardown (see ddp_worker.py)


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for case in MATCHING:
        torch.save(run(case, 0, 1), f"{out}/{case}-single.pt")
    mp.spawn(worker, args=(2, out), nprocs=2)
    print(f"{len(CASES)} cases in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1])
