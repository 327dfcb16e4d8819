"""Two gloo ranks that disagree, for the reliability battery (``test_battery.py``).

``python disagree_worker.py OUT CASE [CASE ...]`` runs each case on two spawned ranks,
each bounded by a timeout, and writes ``OUT/CASE.pt``: per rank the error message (or
``None``) and the parameters after training; for the unused-head cases also ``"single"``,
the parameters of one process trained on both halves (each term the mean of the two
ranks' terms, which is what averaging the ranks' gradients computes).

- ``*-terms``: rank 0 has two loss terms, rank 1 three: every rank must raise.
- ``*-unused-head``: head 1 is reached on rank 0 only (rank 1 has no sample of its task
  and its term does not reach the head).
- ``*-empty-head``: rank 1 has no sample of task 1 and runs head 1 on the empty selection.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

STEPS = 3
TIMEOUT_S = 90


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.ModuleDict(
        {
            "trunk": nn.Sequential(nn.Linear(4, 6), nn.Tanh()),
            "heads": nn.ModuleList([nn.Linear(6, 1) for _ in range(3)]),
        }
    )
    return net.double()


def half(step: int, rank: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    return x, y


def terms(net: nn.Module, step: int, rank: int, case: str) -> list[Tensor]:
    x, y = half(step, rank)
    z = net["trunk"](x)
    out = [head(z).squeeze(1) for head in net["heads"]]
    losses = [(out[i] - y[:, i]).pow(2).mean() for i in range(3)]
    if case.endswith("terms"):
        return losses[: 2 + rank]
    if rank == 1 and case.endswith("unused-head"):  # no sample of task 1 in this shard,
        losses[1] = 0.0 * z.sum()  # and the term does not reach head 1
    if rank == 1 and case.endswith("empty-head"):  # no sample of task 1 in this shard,
        losses[1] = net["heads"][1](z[:0]).pow(2).sum() / len(z)  # the head on none of them
    return losses


def train(net: nn.Module, case: str, rank: int, losses_of) -> None:
    import lossbalance

    if case.startswith("mtadam"):
        opt = lossbalance.MTAdam(net.parameters(), lr=1e-2)
        for step in range(STEPS):
            opt.step(losses_of(step))
        return
    balancer = lossbalance.create("imtl-g", len(losses_of(0)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(STEPS):
        opt.zero_grad()
        lossbalance.backward(losses_of(step), balancer, shared=net["trunk"], mode="exact")
        opt.step()


def rank_main(rank: int, case: str, store: str, out: str) -> None:
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    net = model()
    error = None
    try:
        train(net, case, rank, lambda step: terms(net, step, rank, case))
    except Exception as exc:  # recorded for the test to judge
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    params = [p.detach().clone() for p in net.parameters()]
    torch.save({"error": error, "params": params}, Path(out) / f"{case}.rank{rank}.pt")
    dist.destroy_process_group()


def single(case: str) -> list[Tensor]:
    net = model()

    def averaged(step: int) -> list[Tensor]:
        a, b = terms(net, step, 0, case), terms(net, step, 1, case)
        return [(s + t) / 2 for s, t in zip(a, b, strict=True)]

    warnings.simplefilter("ignore")
    train(net, case, 0, averaged)
    return [p.detach().clone() for p in net.parameters()]


def run_case(case: str, out: Path) -> None:
    ctx = mp.get_context("spawn")
    store = out / f"{case}.store"
    procs = [
        ctx.Process(target=rank_main, args=(rank, case, str(store), str(out))) for rank in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S + 30)
    result: dict = {}
    for rank, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            result[rank] = {"error": "timed out (a hang)", "params": None}
            continue
        path = out / f"{case}.rank{rank}.pt"
        if path.exists():
            result[rank] = torch.load(path, weights_only=False)
        else:
            result[rank] = {"error": f"process died with exit code {p.exitcode}", "params": None}
    if case.endswith("head"):
        result["single"] = single(case)
    torch.save(result, out / f"{case}.pt")


if __name__ == "__main__":
    destination = Path(sys.argv[1])
    for name in sys.argv[2:]:
        run_case(name, destination)
