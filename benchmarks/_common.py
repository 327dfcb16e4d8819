"""Shared pieces of the benchmarks: models, loss terms, timing, machine description, output.

Not part of the library. Every benchmark script imports this module from its own folder
(``python benchmarks/bench_x.py`` puts ``benchmarks/`` on ``sys.path``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lossbalance
from lossbalance.experiments.models import MnistCNN as MnistCNN  # the network the CLI trains

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

# --------------------------------------------------------------------------- command line


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions per variant")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter (default); cpu: time.process_time, the CPU time of "
        "this process, nearly independent of other processes' load (use with --threads 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=None,
        help="results file (default benchmarks/results/<script>_<device>[-t<threads>]"
        "[-cputime].md); '-' for none",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition (smoke test)")
    return p


_CLOCK: Callable[[], float] = time.perf_counter
_BLAS_LIMIT: str = "not limited"


def _limit_blas(threads: int) -> None:
    """Limit numpy's BLAS threads too (the balancers solve K x K systems with numpy; they
    run those on one thread anyway, see ``lossbalance.methods._blas``)."""
    global _BLAS_LIMIT, _BLAS_CONTROL
    from threadpoolctl import threadpool_limits

    _BLAS_CONTROL = threadpool_limits(limits=threads)
    _BLAS_LIMIT = f"{threads} (threadpoolctl)"


_BLAS_CONTROL: Any = None


def now() -> float:
    """The benchmark clock in seconds: wall clock, or process CPU time (``--clock cpu``)."""
    return _CLOCK()


def setup(args: argparse.Namespace) -> torch.device:
    """Seed, threads, clock and device."""
    global _CLOCK
    torch.manual_seed(args.seed)
    _CLOCK = time.process_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        _limit_blas(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        if _CLOCK is not time.perf_counter:
            raise SystemExit("--clock cpu measures host CPU time: use the wall clock on CUDA")
        torch.cuda.init()
    return device


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Linear-ReLU stack ``in -> hidden x depth -> out`` with log_softmax output."""

    def __init__(self, d_in: int, hidden: int, depth: int, d_out: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.net(x), dim=-1)


class Encoder(nn.Module):
    """Transformer encoder (d_model 512, 8 heads, FFN 2048, 8 layers: 25.2M parameters)
    on ``(B, T, d_model)`` inputs, with a per-token classifier and log_softmax."""

    def __init__(self, num_classes: int = 10, layers: int = 8, d_model: int = 512) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model, nhead=8, dim_feedforward=4 * d_model, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.head(self.encoder(x)), dim=-1)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- loss terms


def class_terms(logp: Tensor, target: Tensor, num_terms: int) -> list[Tensor]:
    """The MNIST experiment's per-class terms: L_i = (sum of the NLL of class-i samples) / N.

    ``logp`` is ``(..., C)`` log-probabilities, ``target`` the ``(...)`` labels in
    ``[0, num_terms)``.
    """
    nll = F.nll_loss(logp.reshape(-1, logp.shape[-1]), target.reshape(-1), reduction="none")
    sums = torch.zeros(num_terms, dtype=nll.dtype, device=nll.device)
    sums = sums.index_add(0, target.reshape(-1), nll)
    return list((sums / nll.numel()).unbind())


def mixed_terms(logp: Tensor, target: Tensor, weights: Tensor) -> list[Tensor]:
    """I terms that each reach every sample: L_i = sum_n W[i, n] NLL_n / N (W fixed, >= 0).

    Used where I is varied: unlike per-class terms, no term is empty for any I.
    """
    nll = F.nll_loss(logp.reshape(-1, logp.shape[-1]), target.reshape(-1), reduction="none")
    return list((weights @ nll / nll.numel()).unbind())


# --------------------------------------------------------------------------- timing


def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Run every function ``warmup`` times, then ``repeats`` rounds of all of them.

    Returns seconds per run (device synchronised before and after each run). Interleaving
    spreads the load of other processes evenly over the variants; the order within a
    round is shuffled (seeded), so that no variant always runs right after the same
    (e.g. memory-hungry) one.
    """
    sync = synchronizer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            sync()
            start = now()
            fn()
            sync()
            times[name].append(now() - start)
    return times


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the paired ratios ``num[r] / den[r]`` (run r of both in the same round).

    On a shared machine the load changes from round to round; pairing the runs of one
    round cancels most of it, so this is the ratio to quote (see the README).
    """
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def spread(xs: Sequence[float]) -> str:
    """``median [min-max]`` in ms."""
    return f"{1e3 * med(xs):.1f} [{1e3 * min(xs):.1f}-{1e3 * max(xs):.1f}]"


def ms(x: float) -> str:
    return f"{1e3 * x:.1f}"


def peak_memory_reset(device: torch.device) -> int:
    """Reset the CUDA peak-memory counter; return the bytes allocated now (0 on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    return 0


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated by torch on CUDA since the last reset; ``None`` on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return None


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_peak_reset() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS; return the current RSS in bytes.

    Linux >= 4.0 (``echo 5 > /proc/self/clear_refs``); elsewhere the peak is not reset and
    the process's lifetime peak (``ru_maxrss``) is the baseline.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def rss_peak() -> int:
    """Peak resident set size in bytes since the last :func:`rss_peak_reset`."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_child(script: str, args: Sequence[str]) -> str:
    """Run ``script`` with ``args`` in a fresh interpreter; return its last stdout line.

    Large allocations are served by mmap (``MALLOC_MMAP_THRESHOLD_=65536``), so freed
    tensors go back to the kernel and the peak-RSS growth measures what was alive.
    """
    cmd = [sys.executable, str(HERE / script), *args]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


# --------------------------------------------------------------------------- report


def machine(device: torch.device) -> list[str]:
    """Machine and versions, one Markdown bullet each."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs, torch threads "
        f"{torch.get_num_threads()}, numpy BLAS threads {_BLAS_LIMIT}, clock "
        f"{'process CPU time' if _CLOCK is time.process_time else 'wall'}, load average at "
        f"start {_load()}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(
            f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA "
            f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, TF32 matmul "
            f"{torch.backends.cuda.matmul.allow_tf32}, TF32 cuDNN "
            f"{torch.backends.cudnn.allow_tf32}, cuDNN benchmark "
            f"{torch.backends.cudnn.benchmark}"
        )
    lines.append(
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"lossbalance {lossbalance.__version__} (git {_git_rev()})"
    )
    lines.append(f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    return lines


def command() -> str:
    """The exact command that ran this script, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_txt = str(script.relative_to(HERE.parent))
    except ValueError:
        script_txt = str(script)
    return shlex.join(["python", script_txt, *sys.argv[1:]])


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            check=False,
        )
        rev = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return rev + ("+dirty src" if dirty else "")
    except OSError:
        return "unknown"


class Report:
    """Collects Markdown lines, echoes them to stdout, writes the results file.

    The file is rewritten after every addition, so that a run that is killed (a time
    limit, a crashed GPU) leaves the sections it finished.
    """

    def __init__(self, name: str, title: str, args: argparse.Namespace, device: torch.device):
        self.name = name
        self.args = args
        self.device = device
        self.path = self._target()
        self.lines: list[str] = [f"## {title} ({device.type})", ""]
        self.lines += [f"- command: `{command()}`", *machine(device), ""]
        for line in self.lines:
            print(line)
        self._flush()

    def _target(self) -> Path | None:
        if self.args.out == "-":
            return None
        if self.args.out:
            return Path(self.args.out)
        tag = self.device.type
        if self.args.threads:
            tag += f"-t{self.args.threads}"
        if getattr(self.args, "clock", "wall") == "cpu":
            tag += "-cputime"
        suffix = "_quick" if self.args.quick else ""
        return RESULTS_DIR / f"{self.name}_{tag}{suffix}.md"

    def _flush(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("\n".join(self.lines).rstrip() + "\n")

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)
        self._flush()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run one section; if it raises, record the error in the report and go on, so
        that one failing section (a CUDA graph capture, out of memory) loses no other."""
        try:
            yield
        except Exception as err:  # any failure of a section is reported, then the next runs
            traceback.print_exc()
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self.add(f"- **{what} failed**: `{type(err).__name__}: {first[:300]}`", "")
            if self.device.type == "cuda":
                try:
                    torch.cuda.synchronize(self.device)
                    torch.cuda.empty_cache()
                except RuntimeError:
                    traceback.print_exc()

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.add(
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
            "",
        )

    def write(self) -> Path | None:
        self.add(f"- load average at end: {_load()}", "")
        if self.path is not None:
            print(f"wrote {self.path}")
        return self.path
