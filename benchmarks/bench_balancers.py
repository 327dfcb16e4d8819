"""``lossbalance.backward`` with a gradient balancer: exact, batched, Gramian and feature modes.

Question: what does a balanced backward cost against K, per engine mode, in time and
peak memory? The feature mode differentiates the K terms only through the heads and the
trunk once, so its time should be nearly flat in K; the exact modes grow like K backward
passes through the trunk; the Gramian-only mode trades about three times the compute for
O(|theta|) memory.

Model: a shared MLP trunk (in 512, 3 x [Linear(512, 512), ReLU]), K linear heads 512 -> 1,
MSE terms against random targets, batch 256; balancer IMTL-G (``lossbalance.create
("imtl-g", K)``), K in {2, 10, 40}. Each timed run is forward + ``lossbalance.backward``
(``.grad`` reset to ``None`` between runs); ``sum backward`` (forward + the plain
``sum(losses).backward()``) is the unit.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` during one run above what was
allocated before it; on the CPU the peak
RSS of one run above the RSS before it, in a fresh subprocess per configuration (kernel
peak-RSS mark reset through ``/proc/self/clear_refs``, large allocations served by mmap);
the analytic size of the K trunk-gradient copies (exact modes) is given beside it.

Run: ``python benchmarks/bench_balancers.py [--device cuda] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable

import torch
from _common import (
    Report,
    interleaved,
    mib,
    parser,
    peak_memory,
    peak_memory_reset,
    ratio,
    rss_peak,
    rss_peak_reset,
    run_child,
    setup,
    spread,
)
from torch import Tensor, nn

import lossbalance

MODES = ("sum backward", "exact", "batched", "gramian", "feature")


class SharedTrunk(nn.Module):
    """MLP trunk 3 x 512 and K linear heads; ``forward`` returns (features, K losses)."""

    def __init__(self, k: int, width: int = 512, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))

    def forward(self, x: Tensor, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        losses = [
            (head(z).squeeze(-1) - targets[:, i]).pow(2).mean() for i, head in enumerate(self.heads)
        ]
        return z, losses


def make(k: int, batch: int, device: torch.device) -> Callable[[str], Callable[[], Tensor | None]]:
    torch.manual_seed(k)
    model = SharedTrunk(k).to(device)
    x = torch.randn(batch, 512, device=device)
    targets = torch.randn(batch, k, device=device)
    balancer = lossbalance.create("imtl-g", k).to(device)
    params = list(model.parameters())

    def fn(mode: str) -> Callable[[], Tensor | None]:
        def run() -> Tensor | None:
            for p in params:
                p.grad = None
            z, losses = model(x, targets)
            if mode == "sum backward":
                torch.stack(losses).sum().backward()
                return None
            return lossbalance.backward(
                losses,
                balancer,
                shared=model.trunk,
                features=z if mode == "feature" else None,
                mode=mode,
            )

        return run

    return fn


def child(args) -> None:
    device = setup(args)
    fn = make(args.k, args.batch, device)(args.child)
    fn()  # the first run allocates .grad and the balancer's state
    base = rss_peak_reset()
    fn()
    print(json.dumps({"rss_delta": rss_peak() - base}))


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--terms", default="2,10,40")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--child", default=None, help=argparse_hidden())
    p.add_argument("--k", type=int, default=2, help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        child(args)
        return
    device = setup(args)
    repeats = args.repeats or (1 if args.quick else 10)
    batch = 32 if args.quick else args.batch
    ks = [int(t) for t in args.terms.split(",")]
    rep = Report("balancers", "lossbalance.backward engine modes (IMTL-G)", args, device)
    fns: dict[tuple[int, str], Callable[[], Tensor | None]] = {}
    trunk_params = 3 * (512 * 512 + 512)
    for k in ks:
        builder = make(k, batch, device)
        for mode in MODES:
            fns[(k, mode)] = builder(mode)
    with rep.guard("engine modes"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = interleaved(
                {f"{k}/{m}": f for (k, m), f in fns.items()},
                repeats,
                0 if args.quick else args.warmup,
                device,
            )
        memory: dict[tuple[int, str], str] = {}
        for (k, mode), f in fns.items():
            if device.type == "cuda":
                f()
                base = peak_memory_reset(device)
                f()
                memory[(k, mode)] = mib((peak_memory(device) or 0) - base)
            else:
                line = run_child(
                    "bench_balancers.py",
                    [
                        "--child",
                        mode,
                        "--k",
                        str(k),
                        "--batch",
                        str(batch),
                        "--device",
                        args.device,
                        *(["--threads", str(args.threads)] if args.threads else []),
                    ],
                )
                memory[(k, mode)] = mib(json.loads(line)["rss_delta"])
        rep.add(
            f"Shared trunk 3 x 512 ({trunk_params:,} shared parameters), K heads 512 -> 1, batch "
            f"{batch}, float32; balancer IMTL-G. {repeats} interleaved repetitions (all "
            "configurations in one loop), ms as median [min-max]; 'x sum' is the median of the "
            "per-round ratios to forward + sum(losses).backward() at the same K.",
            "",
        )
        rows = []
        for k in ks:
            unit = times[f"{k}/sum backward"]
            for mode in MODES:
                ts = times[f"{k}/{mode}"]
                copies = k if mode in ("exact", "batched") else (1 if mode == "gramian" else 0)
                rows.append(
                    [
                        str(k),
                        mode,
                        spread(ts),
                        f"{ratio(ts, unit):.2f}",
                        memory[(k, mode)],
                        mib(4 * trunk_params * copies) if mode != "sum backward" else "",
                    ]
                )
        rep.table(
            ["K", "mode", "ms", "x sum", "peak MiB", "trunk-gradient copies MiB (analytic)"], rows
        )
        growth = {
            mode: ratio(times[f"{ks[-1]}/{mode}"], times[f"{ks[0]}/{mode}"]) for mode in MODES
        }
        rep.add(
            f"Time at K = {ks[-1]} over time at K = {ks[0]} (paired): "
            + ", ".join(f"{mode} x{g:.2f}" for mode, g in growth.items())
            + ".",
            "",
        )
    rep.write()


def argparse_hidden() -> str:
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
