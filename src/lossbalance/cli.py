"""The ``lossbalance`` command line.

Subcommands::

    lossbalance list                     methods from the registry (needs, paper)
    lossbalance demo                     weighted per-class terms on the 8x8 digits (CPU, < 2 min)
    lossbalance mnist [--ablation]       MTAdam paper, Table 1 (Table 5 with --ablation)
    lossbalance multimnist               IMTL paper, Table 1 protocol at small scale
    lossbalance pix2pix [--ablation]     MTAdam paper, pix2pix: edges -> image, Fashion-MNIST
    lossbalance srgan                    MTAdam paper, SRGAN: 4x super-resolution, Fashion-MNIST
    lossbalance cyclegan                 MTAdam paper, CycleGAN: unpaired MNIST <-> Fashion-MNIST
    lossbalance bench [--quick]          every method on the small MTL benchmarks, one ranking

Every experiment writes ``summary.json``, ``results.json``, ``results.md`` (its header
holds the exact command) and PNG plots into ``--out`` and prints the table. The method
names come from :mod:`lossbalance.experiments.methods` and the registry; an unknown name is
an error that lists the valid ones.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


def _out(text: str = "") -> None:
    """The CLI's own output (tables, paths): stdout, nothing else prints."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(f"lossbalance: error: {text}\n")
    sys.stderr.flush()


def _warn(text: str) -> None:
    sys.stderr.write(f"lossbalance: warning: {text}\n")
    sys.stderr.flush()


def _unwritable_dir(path: Path) -> str | None:
    """Why ``path`` cannot be the folder a command writes into, or ``None`` if it can.

    The folder is created (with its parents) when missing, and a file is created and
    removed in it, so that a permission, a read-only file system or a file in the way
    shows up now and not after the first run has trained.
    """
    if path.exists() and not path.is_dir():
        return "exists and is not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".lossbalance-check-"):
            pass
    except OSError as exc:
        return f"cannot write there ({exc.strerror or exc})"
    return None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _plan_line(
    config: Any, rows: list[str], groups: list[Any], planned: int, to_train: int, device: Any
) -> str:
    shape = f"{len(rows)} rows x {planned // max(1, len(rows) * len(groups))} seeds"
    if len(groups) > 1:
        shape += f" x {len(groups)} column groups"
    steps = f"{config.epochs} epoch(s) of batch {config.batch_size} per run"
    if config.max_batches is not None:
        steps += f", at most {config.max_batches} steps per epoch"
    side = f", {config.jobs} at once" if config.jobs > 1 else ""
    return (
        f"Plan: {shape} = {planned} runs ({to_train} to train{side}), {steps}, on {device}. "
        f"Rows: {', '.join(rows)}"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _default(config_cls: type, name: str) -> Any:
    for f in fields(config_cls):
        if f.name == name:
            if callable(f.default_factory):  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            return f.default
    raise KeyError(name)


def _default_rows(config_cls: type) -> str:
    """The rows an experiment trains without --methods (and with --ablation), for --help."""
    module = importlib.import_module(config_cls.__module__)
    rows = module.method_names(config_cls())
    text = f". Default: {len(rows)} rows ({', '.join(rows)})"
    if any(f.name == "ablation" for f in fields(config_cls)):
        ablation = module.method_names(config_cls(ablation=True))
        text += f"; with --ablation {len(ablation)} rows ({', '.join(ablation)})"
    return text


def _add_common(p: argparse.ArgumentParser, config_cls: type, command: str) -> None:
    d = lambda name: _default(config_cls, name)  # noqa: E731
    g = p.add_argument_group("common options")
    g.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="rows to run, space- or comma-separated: sgd-m, rmsprop, adam, mtadam, "
        "mtadam-<ablation>, any registry balancer (see 'lossbalance list'), or 'all'"
        + (
            "; prefix 'balanced-' for unit term weights"
            if command in ("demo", "mnist")
            else "; prefix 'balanced-' for the prescribed term weights"
            if command in _GAN_COMMANDS
            else ""
        )
        + _default_rows(config_cls),
    )
    g.add_argument("--seeds", type=_positive_int, help=f"seeds per row (default: {d('seeds')})")
    g.add_argument("--first-seed", type=int, help="first seed (default: 0)")
    g.add_argument(
        "--device",
        help="auto, cpu, cuda or cuda:N (default: auto: cuda when available)",
    )
    g.add_argument(
        "--out",
        type=Path,
        default=Path("out") / command,
        help=f"output directory (default: out/{command})",
    )
    g.add_argument("--epochs", type=_positive_int, help=f"default: {d('epochs')}")
    g.add_argument("--batch-size", type=_positive_int, help=f"default: {d('batch_size')}")
    g.add_argument(
        "--lr", type=float, help=f"learning rate of every optimizer (default: {d('lr'):g})"
    )
    g.add_argument(
        "--max-batches", type=_positive_int, help="cap on steps per epoch (tiny test runs)"
    )
    g.add_argument(
        "--train-limit", type=_positive_int, help="use only the first N training examples"
    )
    g.add_argument("--test-limit", type=_positive_int, help="evaluate on the first N test examples")
    g.add_argument(
        "--evals-per-epoch",
        type=_positive_int,
        help=f"test evaluations per epoch (default: {d('evals_per_epoch')})",
    )
    g.add_argument(
        "--threads",
        type=_positive_int,
        help="torch CPU threads during the runs (default: "
        + ("1: the tiny model is fastest on one" if d("threads") == 1 else "torch's")
        + ")",
    )
    g.add_argument(
        "--jobs",
        type=_positive_int,
        help="train this many runs at once, each (method, seed) in its own process (default: "
        "1). A small model leaves a GPU mostly idle, so several runs side by side finish "
        "sooner; the results are those of one process, the times per iteration are not.",
    )
    g.add_argument(
        "--log-dir",
        type=Path,
        help="write each run's per-term losses, weights and magnitudes to CSV files there",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs already in --out (results.json, or the runs.jsonl checkpoint "
        "of an interrupted command) that have the same settings; train only the missing "
        "(method, seed) pairs. Lets a long experiment run in several pieces.",
    )
    g.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the reports from the runs already in --out that have "
        "the same settings (as --resume finds them), for example of an experiment cut "
        "off on another machine. Requested runs that are not there are left out and listed "
        "in the table (a row without any is an error); --device names the device the runs "
        "were trained on and need not be present.",
    )


def _add_data(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir",
        help="directory with the idx .gz files, directly or in a <dataset>/ subdirectory "
        "(default: $LOSSBALANCE_DATA_DIR, else ./data)",
    )
    if dataset:
        g.add_argument(
            "--dataset", choices=["mnist", "fashion-mnist"], help="source images (default: mnist)"
        )
    g.add_argument("--no-download", action="store_true", help="never download (offline machines)")
    g.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the md5 check of local files (a copy re-compressed by hand; downloads "
        "are always checked)",
    )


_GAN_COMMANDS = ("pix2pix", "srgan", "cyclegan")


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _add_gan(
    p: argparse.ArgumentParser,
    config_cls: type,
    command: str,
    weights: tuple[Sequence[float], Sequence[float]],
) -> None:
    d = lambda name: _default(config_cls, name)  # noqa: E731
    _add_common(p, config_cls, command)
    _add_data(p, dataset=False)
    g = p.add_argument_group("adversarial training")
    g.add_argument(
        "--ablation",
        action="store_true",
        help="MTAdam and its five Table 5 variants (unbalanced terms) instead of the default rows",
    )
    g.add_argument(
        "--beta1",
        type=float,
        help=f"beta1 of Adam and MTAdam, generator and discriminator (default: {d('beta1'):g})",
    )
    g.add_argument("--d-lr", type=float, help="the discriminator's learning rate (default: --lr)")
    for which, default in zip(("balanced", "unbalanced"), weights, strict=True):
        g.add_argument(
            f"--{which}-weights",
            type=_nonneg_float,
            nargs="+",
            metavar="W",
            help=f"term weights of the {which.capitalize()} rows, one per term (default: "
            + " ".join(f"{w:g}" for w in default)
            + ")",
        )
    g.add_argument(
        "--samples",
        type=_positive_int,
        help=f"test images in samples.png, per direction for cyclegan (default: {d('samples')})",
    )
    c = p.add_argument_group("feature classifier (FD-FMNIST, perceptual loss)")
    c.add_argument(
        "--cache-dir",
        help="where the trained classifier is cached (default: $LOSSBALANCE_CACHE_DIR, else "
        "<data-dir>/cache when writable, else ~/.cache/lossbalance)",
    )
    c.add_argument(
        "--classifier-epochs",
        type=_positive_int,
        help=f"its training epochs (default: {d('classifier_epochs')})",
    )
    c.add_argument(
        "--classifier-train-limit",
        type=_positive_int,
        help="train it on the first N training images (default: all; tiny test runs)",
    )


# every command and its one-line help: the full parser and the light one of `--help` (which
# answers without importing torch) are built from this table
_COMMANDS: dict[str, str] = {
    "list": "list the methods of the registry",
    "demo": "ten weighted per-class terms on the bundled 8x8 digits (no data files, CPU, < 2 min)",
    "mnist": "MTAdam paper, Table 1: MNIST with ten weighted per-class terms",
    "multimnist": "IMTL paper, Table 1 protocol: MultiMNIST, three tasks, one loss rescaled",
    "pix2pix": "MTAdam paper, pix2pix: Fashion-MNIST edges -> image, L1 + GAN",
    "srgan": "MTAdam paper, SRGAN: 4x super-resolution of Fashion-MNIST, MSE + GAN + perceptual",
    "cyclegan": "MTAdam paper, CycleGAN: unpaired MNIST <-> Fashion-MNIST, six terms",
    "bench": "every method on the toy problem, Multi-MNIST/-Fashion/-(Fashion+MNIST), UCI "
    "Energy and Parkinsons (and x1000 variants), per-class MNIST: Δm%% and ranks",
}


def _light_parser(prog: str) -> argparse.ArgumentParser:
    """The top-level parser without the commands' options: `lossbalance --help`,
    `--version` and a missing command, answered without importing torch."""
    from lossbalance import __version__

    parser = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lossbalance {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in _COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


_DESCRIPTION = (
    "Automatic balancing of multi-term losses: MTAdam and the multi-task balancing methods, "
    "with the experiments of their papers."
)


def build_parser(prog: str = "lossbalance") -> argparse.ArgumentParser:
    """The argument parser of the command line."""
    import lossbalance
    from lossbalance.experiments import cyclegan, pix2pix, srgan
    from lossbalance.experiments.cyclegan import CycleGanConfig
    from lossbalance.experiments.demo import DemoConfig
    from lossbalance.experiments.mnist import MnistConfig
    from lossbalance.experiments.multimnist import MultiMnistConfig
    from lossbalance.experiments.pix2pix import Pix2PixConfig
    from lossbalance.experiments.srgan import SrganConfig

    parser = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION)
    parser.add_argument(
        "--version", action="version", version=f"lossbalance {lossbalance.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help=_COMMANDS["list"], description="List the methods.")

    demo = sub.add_parser(
        "demo",
        help=_COMMANDS["demo"],
        description="Balanced Adam, unbalanced Adam and unbalanced MTAdam on ten per-class "
        "loss terms with weights w_i ~ U(1, 1000), on the bundled 8x8 digits (UCI, 1797 images).",
    )
    _add_common(demo, DemoConfig, "demo")
    demo.add_argument("--hidden", type=_positive_int, help="MLP hidden width (default: 64)")
    demo.add_argument(
        "--weights", choices=["paper", "authors"], help="weight scheme (default: paper)"
    )
    demo.add_argument(
        "--ablation",
        action="store_true",
        help="MTAdam and its five Table 5 variants instead of the default rows",
    )

    mnist = sub.add_parser(
        "mnist",
        help=_COMMANDS["mnist"],
        description="The MTAdam paper's MNIST protocol: MNIST-example CNN, 1 epoch, batch 64, "
        "lr 1e-3, ten per-class terms L_i = w_i * sum of class-i NLL / batch size.",
    )
    _add_common(mnist, MnistConfig, "mnist")
    _add_data(mnist)
    mnist.add_argument(
        "--ablation",
        action="store_true",
        help="MTAdam and its five Table 5 variants instead of the Table 1 rows",
    )
    mnist.add_argument(
        "--loss-form",
        choices=["paper", "authors"],
        help="paper: w_i * class-i NLL sum / B (default); authors: the authors' "
        "nll_loss(weight=onehot*w_i), which cancels w_i and is NaN when a class is absent "
        "from a batch (only to show that)",
    )
    mnist.add_argument(
        "--weights",
        choices=["paper", "authors"],
        help="paper: all w_i ~ U(1, 1000) (default); authors: w_0 = 1, w_1..9 ~ U(0, 1000)",
    )

    multi = sub.add_parser(
        "multimnist",
        help=_COMMANDS["multimnist"],
        description="MultiMNIST (left digit, right digit, reconstruction) with the losses as "
        "they are and with one task's loss multiplied by --scale; |Δ| per method.",
    )
    _add_common(multi, MultiMnistConfig, "multimnist")
    _add_data(multi)
    multi.add_argument(
        "--scale-task",
        choices=["left", "right", "recon"],
        help="the task rescaled in the second column group (default: left)",
    )
    multi.add_argument("--scale", type=float, help="its multiplier (default: 10)")
    multi.add_argument("--data-seed", type=int, help="seed of the digit pairing (default: 0)")
    multi.add_argument(
        "--grad-source",
        choices=["params", "features"],
        help="per-term gradients of the shared parameters or of the shared feature "
        "(default: params)",
    )
    multi.add_argument(
        "--feature-dim", type=_positive_int, help="shared feature width (default: 64)"
    )

    pix = sub.add_parser(
        "pix2pix",
        help=_COMMANDS["pix2pix"],
        description="pix2pix-style edges -> image on Fashion-MNIST (U-Net, PatchGAN): "
        "L = λ1·L1 + λ2·GAN, Balanced-Adam λ = (100, 1) against SGD-M, RMSProp, Adam and "
        "MTAdam on λ = (100, 100). Test L1, L2, NMSE, PSNR, SSIM and FD-FMNIST.",
    )
    _add_gan(pix, Pix2PixConfig, "pix2pix", (pix2pix.BALANCED_WEIGHTS, pix2pix.UNBALANCED_WEIGHTS))
    pix.add_argument(
        "--edge-threshold",
        type=float,
        help="Sobel threshold relative to the image's largest gradient (default: 0.25)",
    )
    pix.add_argument("--width", type=_positive_int, help="U-Net width (default: 32)")

    sr = sub.add_parser(
        "srgan",
        help=_COMMANDS["srgan"],
        description="SRGAN-style 7x7 -> 28x28 super-resolution of Fashion-MNIST: "
        "L = λ1·MSE + λ2·GAN + λ3·perceptual, Balanced-Adam λ = (1, 0.001, 0.006) against "
        "SGD-M, RMSProp, Adam and MTAdam on λ = (1, 1, 1). Test PSNR, SSIM and FD-FMNIST.",
    )
    _add_gan(sr, SrganConfig, "srgan", (srgan.BALANCED_WEIGHTS, srgan.UNBALANCED_WEIGHTS))
    sr.add_argument("--width", type=_positive_int, help="generator width (default: 64)")
    sr.add_argument("--blocks", type=_positive_int, help="generator residual blocks (default: 4)")

    cyc = sub.add_parser(
        "cyclegan",
        help=_COMMANDS["cyclegan"],
        description="CycleGAN-style unpaired translation between MNIST and Fashion-MNIST with "
        "the six CycleGAN terms (2 GAN, 2 cycle, 2 identity): Balanced-Adam λ = "
        "(1, 1, 10, 10, 5, 5) against SGD-M, RMSProp, Adam and MTAdam on all λ = 1. Test "
        "FD-FMNIST (MNIST -> Fashion), FD-MNIST (Fashion -> MNIST) and the cycle L1.",
    )
    _add_gan(
        cyc, CycleGanConfig, "cyclegan", (cyclegan.BALANCED_WEIGHTS, cyclegan.UNBALANCED_WEIGHTS)
    )
    cyc.add_argument("--width", type=_positive_int, help="generator width (default: 32)")
    cyc.add_argument("--blocks", type=_positive_int, help="generator residual blocks (default: 3)")

    from lossbalance.experiments.bench import BENCHMARKS, BenchConfig

    bench = sub.add_parser(
        "bench",
        help=_COMMANDS["bench"],
        description="Every method on the small offline MTL benchmarks: per-task metrics, "
        "Δm% against equal weighting (Adam on the sum), ranks, time per step, and one "
        "overall ranking. --epochs, --batch-size, --train-limit, --test-limit apply to the "
        "image benchmarks.",
    )
    _add_common(bench, BenchConfig, "bench")
    _add_data(bench, dataset=False)
    bench.add_argument(
        "--benchmarks",
        nargs="+",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"which benchmarks (default: all: {', '.join(BENCHMARKS)})",
    )
    bench.add_argument(
        "--quick", action="store_true", help="a tiny version of everything (a smoke test)"
    )
    bench.add_argument(
        "--uci-batch-size", type=_positive_int, help="batch of the UCI benchmarks (default: 64)"
    )
    bench.add_argument("--energy-epochs", type=_positive_int, help="default: 60")
    bench.add_argument("--parkinsons-epochs", type=_positive_int, help="default: 8")
    bench.add_argument(
        "--toy-steps", type=_positive_int, help="updates per start on the toy (default: 400)"
    )
    bench.add_argument("--toy-lr", type=float, help="step size on the toy (default: 0.1)")
    bench.add_argument("--toy-seed", type=int, help="seed of the toy runs (default: 0)")
    return parser


# argparse destination -> config field, where they differ
_RENAME = {"weights": "weight_scheme"}


def _config(args: argparse.Namespace, config_cls: type) -> Any:
    names = {f.name for f in fields(config_cls)}
    values: dict[str, Any] = {}
    for key, value in vars(args).items():
        field_name = _RENAME.get(key, key)
        if field_name in names and value is not None and value is not False:
            values[field_name] = value
    if "data_dir" in names and "data_dir" not in values and os.environ.get("LOSSBALANCE_DATA_DIR"):
        values["data_dir"] = os.environ["LOSSBALANCE_DATA_DIR"]
    if getattr(args, "no_download", False):
        values["download"] = False
    if getattr(args, "no_verify", False):
        values["verify"] = False
    if "data_dir" in values:
        values["data_dir"] = str(values["data_dir"])
    values["progress"] = not args.quiet and sys.stderr.isatty()
    return config_cls(**values)


def _list_methods() -> None:
    # a static table of the built-in methods: importing them (and torch) takes seconds
    from lossbalance._catalog import BUILTIN_METHODS
    from lossbalance.experiments.methods import MTADAM_VARIANTS, OPTIMIZERS

    rows = BUILTIN_METHODS
    header = ("name", "needs", "stateful", "paper", "summary")
    table = [header] + [
        (name, needs, "yes" if stateful else "no", paper, summary)
        for name, needs, stateful, paper, summary in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    _out(f"Registered methods ({len(rows)}):")
    for r in table:
        _out("  " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    _out()
    _out("Experiment rows (for --methods, besides the registry names):")
    _out(
        "  "
        + ", ".join(OPTIMIZERS)
        + "   torch optimizers on the summed terms (sgd-m: momentum 0.9)"
    )
    _out("  " + ", ".join(MTADAM_VARIANTS))
    _out("      MTAdam and the five ablations of the MTAdam paper's Table 5")
    _out("  prefix 'balanced-' (demo, mnist): train on unit term weights, e.g. balanced-adam")
    _out("  prefix 'balanced-' (pix2pix, srgan, cyclegan): train on the prescribed term weights")


def main(argv: Sequence[str] | None = None, prog: str = "lossbalance") -> int:
    """Run the command line; returns the exit status (argparse exits 2 on bad syntax)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in _COMMANDS for a in argv):  # top-level help, version or a bad command
        _light_parser(prog).parse_args(argv)
    if argv == ["list"]:  # answered without the experiments' parsers (and torch)
        _list_methods()
        return 0
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    command = " ".join([prog, shlex.join(argv)])

    if args.command == "list":
        _list_methods()
        return 0

    from lossbalance.experiments import (
        bench,
        cyclegan,
        demo,
        harness,
        mnist,
        multimnist,
        pix2pix,
        srgan,
    )
    from lossbalance.experiments.data import ChecksumError, DataFileError, DatasetNotFoundError
    from lossbalance.experiments.harness import MissingRunError, RecordedRuns, resolve_device
    from lossbalance.experiments.methods import resolve_methods
    from lossbalance.experiments.parallel import run_parallel
    from lossbalance.experiments.report import (
        CHECKPOINT,
        RecordedElsewhere,
        append_checkpoint,
        config_fingerprint,
        fingerprinted_settings,
        load_previous_runs,
        rewrite_checkpoint,
        write_report,
    )

    module: Any
    config_cls: type
    module, config_cls = {
        "demo": (demo, demo.DemoConfig),
        "mnist": (mnist, mnist.MnistConfig),
        "multimnist": (multimnist, multimnist.MultiMnistConfig),
        "pix2pix": (pix2pix, pix2pix.Pix2PixConfig),
        "srgan": (srgan, srgan.SrganConfig),
        "cyclegan": (cyclegan, cyclegan.CycleGanConfig),
        "bench": (bench, bench.BenchConfig),
    }[args.command]
    # Bad names and values are reported before any data is read or any run starts.
    try:
        config = _config(args, config_cls)
        config.validate()
        if not args.report_only:
            resolve_device(config.device)
        if config.methods:
            weighted = args.command not in ("multimnist", "bench")
            names = mnist.expand_methods(config.methods, [], weighted=weighted)
            resolve_methods(names, weighted=weighted)
    except ValueError as exc:
        _err(str(exc))
        return 2
    out = Path(args.out)
    # every path is checked before anything trains: a run is never lost to a bad --out
    for option, path in (("--out", out), ("--log-dir", getattr(config, "log_dir", None))):
        problem = None if path is None else _unwritable_dir(Path(path))
        if problem is not None:
            _err(f"{option} {path}: {problem}")
            return 2
    fingerprint = config_fingerprint(config)
    settings = fingerprinted_settings(config)
    resume = args.resume or args.report_only
    problems: list[RecordedElsewhere] = []
    previous = (
        load_previous_runs(out, fingerprint, settings=settings, problems=problems) if resume else {}
    )
    for p in problems:
        if p.malformed:
            _warn(f"{out / p.where}: skipped, {p.why}")
    other = [p for p in problems if not p.malformed]
    if other:
        flag = "--report-only" if args.report_only else "--resume"
        listed = "; ".join(f"{p.where} ({p.runs} run(s)): {p.why}" for p in other)
        _err(
            f"{flag}: {out} holds runs recorded with other settings, which this command "
            f"would drop: {listed}. Rerun with those settings, choose another --out, or "
            "run without --resume to replace them."
        )
        return 2
    if not resume:
        (out / CHECKPOINT).unlink(missing_ok=True)
    if args.report_only and not previous:
        _err(f"--report-only: no runs with these settings in {out}")
        return 1
    if previous:
        verb = "Reporting" if args.report_only else "Resuming"
        _out(f"{verb}: {len(previous)} run(s) with the same settings found in {out}")

    rows = module.method_names(config)
    groups = getattr(module, "column_groups", lambda cfg: [None])(config)
    # the runs that train: the bench's toy records (computed, not trained) are left out
    trained = set(groups)
    seeds = getattr(config, "effective", lambda: config)().seeds  # --quick changes them
    planned = len(rows) * len(groups) * seeds
    already = sum(1 for r in previous.values() if r.get("group") in trained)
    to_train = 0 if args.report_only else max(0, planned - already)
    if not args.report_only:
        _out(_plan_line(config, rows, groups, planned, to_train, resolve_device(config.device)))
    saved = 0

    def estimate(steps: int, seconds_per_step: float) -> None:
        per_run = steps * seconds_per_step
        _out(
            f"Estimate from the first {min(steps, harness._ESTIMATE_AFTER)} steps of the "
            f"first run: {steps} steps per run at {seconds_per_step * 1e3:.3g} ms per step, "
            f"{_duration(per_run)} per run, about "
            f"{_duration(per_run * to_train / max(1, config.jobs))} for the {to_train} "
            "run(s) to train if every row costs as much (rows differ: a gradient-level "
            "balancer takes K backward passes per step)"
        )

    def checkpoint(record: dict[str, Any]) -> None:
        nonlocal saved
        append_checkpoint(out, fingerprint, record, settings)
        if record.get("group") not in trained:
            return
        saved += 1
        if saved == 1 and config.jobs > 1:  # the workers' first steps are not seen here
            estimate(int(record["steps"]), record["time_per_iter_s"])

    harness.set_first_steps_hook(estimate if config.jobs == 1 and to_train else None)
    try:
        if args.report_only:
            # nothing trains, so the runs' device is only a recorded setting: the data and
            # the report's tensors stay on the CPU
            recorded = RecordedRuns(previous)
            result = module.run(replace(config, device="cpu"), previous=recorded)
            result.config["device"] = config.device
            result.extra["report_only"] = True
            result.extra["missing_runs"] = [{"row": r, "seed": s} for r, s in recorded.missing]
            notes = [
                f"Written by --report-only from runs trained earlier (device {config.device}) "
                "and recorded in this folder; the versions in results.json are those of the "
                "machine that wrote the report."
            ]
            if recorded.missing:
                listed = "; ".join(f"{r}, seed {s}" for r, s in recorded.missing)
                notes.append(f"Not in this report, never recorded: {listed}.")
                _warn(f"--report-only: {len(recorded.missing)} requested run(s) not recorded")
            result.table = result.table.rstrip() + "\n" + "".join(f"- {n}\n" for n in notes)
        elif config.jobs > 1:
            if args.command == "bench":  # once here, not in every (method, seed) worker
                bench.prepare_toy(config, previous, on_run=checkpoint)
            result = run_parallel(module, config, previous=previous, on_run=checkpoint)
        else:
            result = module.run(config, previous=previous, on_run=checkpoint)
    except (DatasetNotFoundError, ChecksumError, DataFileError) as exc:
        _err(str(exc))
        return 1
    except MissingRunError as exc:
        _err(f"--report-only: {exc.args[0]} in {out}; run the command with --resume to train")
        return 1
    except KeyboardInterrupt:
        done = min(planned, already + saved)
        _err(
            f"interrupted: {done} of {planned} runs saved in {out / CHECKPOINT}; "
            "rerun the same command with --resume to train the rest"
        )
        return 130
    finally:
        harness.set_first_steps_hook(None)
    # Recorded runs with these settings that this report does not show (other rows or
    # benchmarks than --methods / --benchmarks chose) would be lost with the old
    # results.json: they stay in the checkpoint, which a later --resume reads.
    shown = {harness.run_key(r.get("group"), r["row"], r["seed"]) for r in result.runs}
    kept = [r for key, r in previous.items() if key not in shown]
    if kept and not args.report_only:
        rewrite_checkpoint(out, fingerprint, kept, settings)
        _out(
            f"Kept {len(kept)} recorded run(s) that this report does not show in "
            f"{out / CHECKPOINT} (rerun with --resume and their rows or benchmarks to "
            "report them)"
        )
    paths = write_report(
        result,
        out,
        command,
        plots=not args.no_plots,
        fingerprint=fingerprint,
        settings=settings,
        keep_checkpoint=args.report_only or bool(kept),
    )
    if args.command == "bench" and not args.no_plots:
        paths += bench.write_plots(result, out)
    elif args.command == "bench":  # no stale pictures beside results they do not show
        bench.remove_plots(out)
    _out((out / "results.md").read_text().rstrip())
    _out()
    _out("Wrote:")
    for path in paths:
        _out(f"  {path}")
    return 0
