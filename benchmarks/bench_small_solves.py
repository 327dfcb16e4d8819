"""The gradient balancers' K x K solves on one BLAS thread against NumPy's default threads.

Question: what does ``lossbalance.methods._blas.single_blas_thread`` buy? Each gradient-level
balancer turns the K x K Gramian into weights with small float64 NumPy solves (``eigh``,
``lstsq``) every step. NumPy's OpenBLAS spreads even a 40 x 40 ``eigh`` over every core it
sees; the library runs these solves on one thread. This script times each method's solve
as the library runs it and its undecorated function (``__wrapped__``, NumPy's default BLAS
threads) for K in {2, 10, 40}, on a random Gramian of rank K. Each variant runs in its
own fresh process (switching OpenBLAS's thread count back and forth in one process
changes how its default threads behave afterwards), the two processes alternate over
``--rounds`` rounds, and the ratio is the median of the per-round ratios of the medians.

Leave ``--threads`` unset: it limits NumPy's BLAS threads for the whole process, and both
variants then run on that many threads. Run it on an idle machine and on a loaded one:
the default threads suffer most when other processes hold the cores.

Run: ``python benchmarks/bench_small_solves.py [--repeats 300]``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from typing import Any

import torch
from _common import Report, interleaved, med, parser, ratio, run_child, setup

from lossbalance.methods import _gradnorm, _imtl, _mgda, _pcgrad

Solve = tuple[Callable[..., torch.Tensor], tuple[Any, ...], dict[str, Any]]


def solvers(gram: torch.Tensor) -> dict[str, Solve]:
    """name -> (the decorated solve, its arguments, its keyword arguments) on ``gram``."""
    mgda = {"normalization": "none", "tol": 1e-10, "max_iter": 1000, "method": "mgda"}
    closed = {"normalization": "none", "tol": 1.0, "max_iter": 1, "method": "mgda-closed-form"}
    return {
        "imtl-g": (_imtl._imtl_g, (gram, "imtl-g"), {}),
        "mgda (frank-wolfe)": (_mgda._solve_mgda, (gram, None), {"solver": "frank-wolfe", **mgda}),
        "mgda-closed-form": (_mgda._solve_mgda, (gram, None), {"solver": "closed-form", **closed}),
        "pcgrad": (_pcgrad._pcgrad, (gram, torch.Generator().manual_seed(0), "pcgrad"), {}),
        "grad-normalization": (_gradnorm._grad_normalization, (gram, "grad-normalization"), {}),
    }


def child(k: int, variant: str, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every method at ``k``, the variant alone in this process."""
    g = torch.randn(k, 4 * k + 16, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    gram = g @ g.T
    fns: dict[str, Callable[[], object]] = {}
    for name, (fn, a, kw) in solvers(gram).items():
        call = fn if variant == "one" else fn.__wrapped__  # type: ignore[attr-defined]
        fns[name] = lambda call=call, a=a, kw=kw: call(*a, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return interleaved(fns, repeats, warmup, torch.device("cpu"))


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--terms", default="2,10,40")
    p.add_argument("--rounds", type=int, default=5, help="alternating pairs of processes")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = setup(args)
    if device.type != "cpu":
        raise SystemExit("the solves run in NumPy on the CPU: use --device cpu")
    repeats = args.repeats or (3 if args.quick else 100)
    warmup = 0 if args.quick else args.warmup
    if args.child:
        print(json.dumps(child(args.k, args.child, repeats, warmup)))
        return
    rounds = 1 if args.quick else args.rounds
    rep = Report("small_solves", "K x K solves: one BLAS thread against the default", args, device)
    passed = ["--repeats", str(repeats), "--warmup", str(warmup), "--clock", args.clock]
    rows = []
    for k in [int(t) for t in args.terms.split(",")]:
        medians: dict[str, dict[str, list[float]]] = {"one": {}, "default": {}}
        for r in range(rounds):
            order = ("one", "default") if r % 2 == 0 else ("default", "one")
            for variant in order:
                line = run_child(
                    "bench_small_solves.py", [*passed, "--child", variant, "--k", str(k)]
                )
                for name, ts in json.loads(line).items():
                    medians[variant].setdefault(name, []).append(med(ts))
        for name in medians["one"]:
            one, default = medians["one"][name], medians["default"][name]
            rows.append(
                [
                    str(k),
                    name,
                    f"{1e3 * med(one):.3f} [{1e3 * min(one):.3f}-{1e3 * max(one):.3f}]",
                    f"{1e3 * med(default):.3f} [{1e3 * min(default):.3f}-{1e3 * max(default):.3f}]",
                    f"{ratio(default, one):.1f}",
                    f"{sum(d > 3 * o for d, o in zip(default, one, strict=True))} of {rounds}",
                ]
            )
    rep.add(
        f"{rounds} rounds; in each, one fresh process per variant times every method "
        f"{repeats} times (interleaved, after {warmup} warm-up calls). ms: the median over "
        "the rounds of each process's median [min-max over rounds]. 'one thread': the solve "
        "as the library runs it; 'default': the same function without the decorator, in a "
        "process that never limits the BLAS threads. Ratio: median over the rounds of "
        "default / one thread.",
        "",
    )
    rep.table(
        [
            "K",
            "method",
            "one thread ms",
            "default threads ms",
            "default / one thread",
            "rounds with default > 3x one thread",
        ],
        rows,
    )
    rep.write()


if __name__ == "__main__":
    main()
