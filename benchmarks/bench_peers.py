"""lossbalance against TorchJD (autojac, autogram) and LibMTL on the same model and data.

Installs nothing. TorchJD (``torchjd==0.18.0``) is required; LibMTL (``LibMTL==1.1.5``,
installed with ``--no-deps``) is optional. Every variant runs one full training step's
backward part on the same forward graph recipe: forward, K loss terms, balanced backward
that writes ``.grad`` (the optimizer step is left out, it is the same for everyone).

- ``lb-exact``, ``lb-gramian``, ``lb-auto``: ``lossbalance.backward(losses, balancer, trunk,
  mode=...)``; the heads get the unweighted sum of their terms' gradients.
- ``tjd-autojac``: ``torchjd.autojac.mtl_backward`` then ``jac_to_grad`` with the method's
  aggregator (heads: their term's gradient, as in lossbalance).
- ``tjd-autogram``: ``torchjd.autogram.Engine(trunk)``, ``compute_gramian``, the method's
  weighting, then one weighted backward (heads get weighted gradients: a different update,
  the same work).
- ``libmtl``: LibMTL's weighting module (K ``backward`` calls, stacks of flat gradients).
  Its package ``__init__`` imports torchvision, so the weighting modules are loaded one by
  one under a stub package; as shipped they crash under torch >= 2.0 because
  ``zero_grad()`` leaves ``.grad`` None, so this benchmark's ``zero_grad_share_params``
  zeroes in place instead.

Timing: interleaved rounds in one process (shuffled order per round), paired ratios
(median and minimum over rounds) against the best peer. ``--clock cpu`` (``process_time``)
with ``--threads 1`` makes the times nearly independent of other processes' load. Peak
memory: each (model, K, variant) in a fresh process, the growth of the peak resident set
over one step after one warm-up step.

Before timing, each cell checks that ``lb-gramian`` writes the same ``.grad`` as
``lb-exact`` (to 1e-3 of the largest entry: float32 rounding, amplified by PCGrad's
projections) and stops if not.

Loss level (``--loss-methods``, default uncertainty, dwa, gls; ``none`` skips): ``plain``
(``sum(losses).backward()``, no balancing), ``lb-backward`` (``lossbalance.backward(losses,
balancer, trunk)``), ``lb-module`` (``balancer(torch.stack(losses)).backward()``) and
LibMTL's UW / DWA / GLS weighting, timed the same way.

Targets of issue 18 (printed, never asserted): gramian / autogram <= 0.8, exact / autojac
<= 0.9, auto / best peer <= 1.0; loss level: lb-backward / LibMTL <= 1.0 and lb-backward /
plain <= 1.1.

    python benchmarks/bench_peers.py --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import Report, interleaved, mib, parser, rss_peak, rss_peak_reset, run_child, setup
from torch import Tensor, nn

import lossbalance

KS = (2, 4, 10, 40)
# lossbalance name -> (TorchJD aggregator, TorchJD weighting or None, LibMTL module or None)
PEERS: dict[str, tuple[str, str | None, str | None]] = {
    "imtl-g": ("IMTLG", "IMTLGWeighting", "IMTL"),
    "mgda": ("MGDA", "MGDAWeighting", "MGDA"),
    "pcgrad": ("PCGrad", "PCGradWeighting", "PCGrad"),
    "upgrad": ("UPGrad", "UPGradWeighting", None),
    "dualproj": ("DualProj", "DualProjWeighting", None),
    # LibMTL's CAGrad reshapes its weights to (1, 3): three tasks only
    "cagrad": ("CAGrad", "CAGradWeighting", None),
    "aligned-mtl": ("AlignedMTL", "AlignedMTLWeighting", None),
    "nash-mtl": ("NashMTL", None, None),
    "config": ("ConFIG", None, None),
}
DEFAULT_METHODS = ("imtl-g", "mgda", "pcgrad")
# loss-level methods: lossbalance name -> LibMTL module
LOSS_PEERS: dict[str, str] = {"uncertainty": "UW", "dwa": "DWA", "gls": "GLS"}
LOSS_VARIANTS = ("plain", "lb-backward", "lb-module", "libmtl")
VARIANTS = ("lb-exact", "lb-gramian", "lb-auto", "tjd-autojac", "tjd-autogram", "libmtl")


# --------------------------------------------------------------------------- models


class Net(nn.Module):
    """A shared trunk and K linear heads (10 classes each)."""

    def __init__(self, kind: str, k: int) -> None:
        super().__init__()
        if kind == "mlp":
            self.trunk: nn.Module = nn.Sequential(
                nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU()
            )
            width = 512
        else:  # the experiments' MNIST CNN up to fc1 (dropout left out: same graph each run)
            self.trunk = nn.Sequential(
                nn.Conv2d(1, 32, 3),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(9216, 128),
                nn.ReLU(),
            )
            width = 128
        self.heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(k))

    def forward(self, x: Tensor, ys: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [F.cross_entropy(h(z), ys[i]) for i, h in enumerate(self.heads)]


def make(kind: str, k: int, batch: int, seed: int) -> tuple[Net, Tensor, Tensor]:
    torch.manual_seed(seed)
    net = Net(kind, k)
    x = torch.randn(batch, 1, 28, 28)
    ys = torch.randint(0, 10, (k, batch))
    return net, x, ys


# --------------------------------------------------------------------------- peers


_ROOT: list[Path] = [Path()]


def load_libmtl(name: str) -> type | None:
    """LibMTL's weighting class ``name`` without its package ``__init__`` (torchvision)."""
    if "LibMTL.weighting" not in sys.modules:
        spec = importlib.util.find_spec("LibMTL")
        if spec is None or not spec.submodule_search_locations:
            return None
        _ROOT[0] = Path(next(iter(spec.submodule_search_locations)))
    root = _ROOT[0]
    for pkg, path in (("LibMTL", root), ("LibMTL.weighting", root / "weighting")):
        if pkg not in sys.modules:
            stub = types.ModuleType(pkg)
            stub.__path__ = [str(path)]
            sys.modules[pkg] = stub
    module = importlib.import_module(f"LibMTL.weighting.{name}")
    return getattr(module, name)


def libmtl_step(cls: type, net: Net, k: int) -> Callable[[list[Tensor]], Any]:
    trunk = net.trunk

    class Weighting(cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.task_num = k
            self.device = torch.device("cpu")
            self.rep_grad = False
            self.epoch = 0

        def get_share_params(self) -> Any:
            return trunk.parameters()

        def zero_grad_share_params(self) -> None:
            # as shipped, zero_grad() sets .grad to None and _reset_grad then crashes
            trunk.zero_grad(set_to_none=False)

    w = Weighting()
    w.init_param()
    kwargs = {"mgda_gn": "none", "calpha": 0.5, "rescale": 1, "T": 2.0}
    return lambda losses: w.backward(torch.stack(losses), **kwargs)


def variants(method: str, net: Net, x: Tensor, ys: Tensor, names: list[str]) -> dict[str, Any]:
    """One step function per variant (forward, terms, balanced backward)."""
    from torchjd import aggregation
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward

    k = len(net.heads)
    agg_name, weighting_name, libmtl_name = PEERS[method]
    options = {"cagrad": {"c": 0.5}, "nash-mtl": {"n_tasks": k}}.get(method, {})
    aggregator = getattr(aggregation, agg_name)(**options)
    balancers = {m: lossbalance.create(method, k) for m in ("exact", "gramian", "auto")}
    fns: dict[str, Callable[[], Any]] = {}

    def zero() -> None:
        net.zero_grad(set_to_none=True)

    def lb(mode: str) -> Callable[[], Any]:
        def step() -> Any:
            zero()
            _, losses = net(x, ys)
            return lossbalance.backward(losses, balancers[mode], net.trunk, mode=mode)

        return step

    for mode in ("exact", "gramian", "auto"):
        fns[f"lb-{mode}"] = lb(mode)
    trunk_params = list(net.trunk.parameters())

    def autojac() -> Any:
        zero()
        z, losses = net(x, ys)
        mtl_backward(losses, features=z)
        return jac_to_grad(trunk_params, aggregator)

    fns["tjd-autojac"] = autojac
    if weighting_name is not None:
        weighting = getattr(aggregation, weighting_name)(
            **({"c": 0.5} if method == "cagrad" else {})
        )
        # the engine hooks every forward of its modules: a copy of its own
        gnet = copy.deepcopy(net)
        engine = Engine(gnet.trunk, batch_dim=None)

        def autogram() -> Any:
            gnet.zero_grad(set_to_none=True)
            _, losses = gnet(x, ys)
            stacked = torch.stack(losses)
            weights = weighting(engine.compute_gramian(stacked))
            stacked.backward(weights)
            return weights

        fns["tjd-autogram"] = autogram
    step = libmtl_variant(libmtl_name, net, x, ys, zero)
    if step is not None:
        fns["libmtl"] = step
    return {n: f for n, f in fns.items() if n in names}


def libmtl_variant(
    name: str | None, net: Net, x: Tensor, ys: Tensor, zero: Callable[[], None]
) -> Callable[[], Any] | None:
    """LibMTL's weighting ``name`` as one step function (None where it is not installed)."""
    cls = load_libmtl(name) if name is not None else None
    if cls is None:
        return None
    run = libmtl_step(cls, net, len(net.heads))

    def libmtl() -> Any:
        zero()
        _, losses = net(x, ys)
        return run(losses)

    return libmtl


def loss_variants(method: str, net: Net, x: Tensor, ys: Tensor) -> dict[str, Any]:
    """One step function per loss-level variant (forward, terms, weighted backward)."""
    k = len(net.heads)
    balancers = {v: lossbalance.create(method, k) for v in ("lb-backward", "lb-module")}

    def zero() -> None:
        net.zero_grad(set_to_none=True)
        for b in balancers.values():
            b.zero_grad(set_to_none=True)

    def plain() -> Any:
        zero()
        _, losses = net(x, ys)
        torch.stack(losses).sum().backward()

    def lb_backward() -> Any:
        zero()
        _, losses = net(x, ys)
        return lossbalance.backward(losses, balancers["lb-backward"], net.trunk)

    def lb_module() -> Any:
        zero()
        _, losses = net(x, ys)
        balancers["lb-module"](torch.stack(losses)).backward()

    fns: dict[str, Callable[[], Any]] = {
        "plain": plain,
        "lb-backward": lb_backward,
        "lb-module": lb_module,
    }
    step = libmtl_variant(LOSS_PEERS[method], net, x, ys, zero)
    if step is not None:
        fns["libmtl"] = step
    return fns


# --------------------------------------------------------------------------- report


def paired(num: list[float], den: list[float]) -> tuple[float, float]:
    rs = sorted(a / b for a, b in zip(num, den, strict=True))
    return rs[len(rs) // 2], rs[0]


def fmt(r: tuple[float, float] | None) -> str:
    return "-" if r is None else f"{r[0]:.2f} ({r[1]:.2f})"


def check_agreement(fns: dict[str, Any], net: Net) -> None:
    """lb-gramian and lb-exact write the same ``.grad`` (to float32 rounding): else stop."""
    written = {}
    for name in ("lb-exact", "lb-gramian"):
        torch.manual_seed(0)  # PCGrad's random order of the terms
        fns[name]()
        written[name] = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    for a, b in zip(written["lb-exact"], written["lb-gramian"], strict=True):
        # float32: PCGrad's projections amplify the Gramian's rounding (float64 agrees to
        # 1e-9, tests/test_autogram.py)
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))


def memory_child(args: argparse.Namespace) -> None:
    model, k, method, variant = args.child
    net, x, ys = make(model, int(k), args.batch, args.seed)
    step = variants(method, net, x, ys, [variant])[variant]
    step()
    net.zero_grad(set_to_none=True)
    base = rss_peak_reset()
    step()
    print(rss_peak() - base)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--ks", default=",".join(map(str, KS)))
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="or 'all', 'none'")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no-memory", action="store_true", help="skip the per-process peaks")
    p.add_argument(
        "--loss-methods", default=",".join(LOSS_PEERS), help="loss-level methods, or 'none'"
    )
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = setup(args)
    if args.child:
        memory_child(args)
        return
    if args.methods in ("all", "none"):
        methods = list(PEERS) if args.methods == "all" else []
    else:
        methods = args.methods.split(",")
    ks = [int(s) for s in args.ks.split(",")]
    if args.quick:
        ks, methods = ks[:1], methods[:1]
    repeats = args.repeats or (1 if args.quick else 7)
    report = Report("peers", "lossbalance against TorchJD and LibMTL", args, device)
    report.add(
        "Paired ratios per cell: median (minimum) over interleaved rounds; lb-* / the peer "
        "named in the column. `best` is the fastest peer variant of that row.",
        "",
    )
    for model in args.models.split(","):
        rows, mem_rows = [], []
        for k in ks:
            for method in methods:
                with report.guard(f"{model} K={k} {method}"):
                    net, x, ys = make(model, k, args.batch, args.seed)
                    fns = variants(method, net, x, ys, list(VARIANTS))
                    check_agreement(fns, net)
                    times = interleaved(fns, repeats, args.warmup, device)
                    peers = [n for n in ("tjd-autojac", "tjd-autogram", "libmtl") if n in times]
                    best = min(peers, key=lambda n: sorted(times[n])[len(times[n]) // 2])

                    def r(a: str, b: str, times: dict[str, list[float]] = times) -> Any:
                        return paired(times[a], times[b]) if a in times and b in times else None

                    med = {n: 1e3 * sorted(t)[len(t) // 2] for n, t in times.items()}
                    rows.append(
                        [
                            k,
                            method,
                            " / ".join(f"{n} {med[n]:.1f}" for n in times),
                            fmt(r("lb-exact", "tjd-autojac")),
                            fmt(r("lb-gramian", "tjd-autogram")),
                            fmt(r("lb-gramian", "tjd-autojac")),
                            fmt(r("lb-auto", best)) + f" vs {best}",
                            fmt(r("lb-exact", "libmtl")),
                        ]
                    )
                    if not args.no_memory and method == methods[0]:
                        cells = []
                        for v in fns:
                            out = run_child(
                                "bench_peers.py",
                                [
                                    "--child",
                                    model,
                                    str(k),
                                    method,
                                    v,
                                    "--threads",
                                    str(args.threads or 1),
                                    "--batch",
                                    str(args.batch),
                                    "--out",
                                    "-",
                                ],
                            )
                            cells.append(f"{v} {mib(float(out))}")
                        mem_rows.append([k, method, " / ".join(cells)])
        report.add(f"### {model}, batch {args.batch}", "")
        if rows:
            report.table(
                [
                    "K",
                    "method",
                    "median ms per step",
                    "exact / autojac",
                    "gramian / autogram",
                    "gramian / autojac",
                    "auto / best peer",
                    "exact / LibMTL",
                ],
                rows,
            )
        if mem_rows:
            report.add("Peak RSS growth over one step (fresh process per cell):", "")
            report.table(["K", "method", "MiB"], mem_rows)
        loss_methods = [] if args.loss_methods == "none" else args.loss_methods.split(",")
        loss_rows = []
        for k in ks:
            for method in loss_methods:
                with report.guard(f"{model} K={k} {method} (loss level)"):
                    net, x, ys = make(model, k, args.batch, args.seed)
                    times = interleaved(
                        loss_variants(method, net, x, ys), repeats, args.warmup, device
                    )
                    med = {n: 1e3 * sorted(t)[len(t) // 2] for n, t in times.items()}

                    def q(a: str, b: str, times: dict[str, list[float]] = times) -> Any:
                        return paired(times[a], times[b]) if a in times and b in times else None

                    loss_rows.append(
                        [
                            k,
                            method,
                            " / ".join(f"{n} {med[n]:.1f}" for n in times),
                            fmt(q("lb-backward", "plain")),
                            fmt(q("lb-backward", "libmtl")),
                            fmt(q("lb-module", "libmtl")),
                        ]
                    )
        if loss_rows:
            report.add(f"Loss level, {model}, batch {args.batch}:", "")
            report.table(
                [
                    "K",
                    "method",
                    "median ms per step",
                    "lb-backward / plain",
                    "lb-backward / LibMTL",
                    "lb-module / LibMTL",
                ],
                loss_rows,
            )
    report.add(
        "Targets (issue 18): gramian / autogram <= 0.8, exact / autojac <= 0.9, auto / best "
        "peer <= 1.0 at every K; loss level: lb-backward / LibMTL <= 1.0, lb-backward / "
        "plain <= 1.1.",
        "",
    )
    report.write()


if __name__ == "__main__":
    main()
