"""``lossbalance bench``: every method on the field's small offline benchmarks, one table.

Benchmarks (``--benchmarks``, default all):

- ``toy``: the two-objective problem of CAGrad on R^2, f_1 scaled by 0.1
  (:mod:`lossbalance.experiments.toy`): trajectories from several starts and whether each
  ends on the Pareto set. Not part of the Δm ranking (it has no baseline metric).
- ``multimnist``, ``multifashion``, ``multifashionmnist``: two overlaid items (Lin et al.
  2019's Multi-MNIST, Multi-Fashion, Multi-(Fashion+MNIST)), two cross-entropy tasks on a
  shared LeNet trunk; metrics the two accuracies (higher is better).
- ``energy``, ``parkinsons`` (UCI Energy Efficiency, UCI Parkinsons Telemonitoring) and
  their ``-x1000`` variants (the first target multiplied by 1000 after standardisation):
  two MSE terms on an MLP; metrics the test MAE of each target (lower is better).
- ``mnist``: the MTAdam paper's per-class protocol (ten terms with weights
  w_i ~ U(1, 1000), :mod:`lossbalance.experiments.mnist`); metric the test accuracy.

Per benchmark: each task's metric (mean ± std over the seeds), Δm% against equal
weighting (Adam on the plain sum, the row ``adam``), the rank of each method by Δm, and the
time per step. Δm follows LibMTL (Lin & Zhang 2023):

    Δm = 100 / T * sum_t (-1)^{s_t} (M_{m,t} - M_{EW,t}) / M_{EW,t}

with s_t = 1 where lower is better, so a positive Δm is an improvement; the means over
seeds enter (the ± is the std of the per-seed Δm against the baseline's mean). One overall
table ranks the methods by their mean rank over the trained benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lossbalance.experiments.data import (
    MultiMnistData,
    load_idx_dataset,
    load_uci,
    make_multi_pair,
    make_multimnist,
)
from lossbalance.experiments.harness import (
    ExperimentConfig,
    RecordedRuns,
    run_experiment,
    run_key,
    seed_everything,
)
from lossbalance.experiments.methods import MethodSpec, registry_balancers, resolve_methods
from lossbalance.experiments.mnist import expand_methods
from lossbalance.experiments.report import (
    ExperimentResult,
    format_mean_std,
    markdown_table,
    summarize,
)
from lossbalance.experiments.toy import ToyConfig, plot_toy, run_toy
from lossbalance.experiments.uci import PairTask, RegressionTask

__all__ = [
    "BENCHMARKS",
    "BenchConfig",
    "column_groups",
    "default_methods",
    "delta_m",
    "method_names",
    "prepare_toy",
    "rank",
    "run",
    "write_plots",
]

#: benchmark -> (title, [(metric key, label, lower is better)])
BENCHMARKS: dict[str, tuple[str, list[tuple[str, str, bool]]]] = {
    "toy": ("Two-objective toy problem (CAGrad), f1 x 0.1", []),
    "multimnist": (
        "Multi-MNIST (2 tasks)",
        [("left_accuracy", "left acc (%)", False), ("right_accuracy", "right acc (%)", False)],
    ),
    "multifashion": (
        "Multi-Fashion (2 tasks)",
        [("left_accuracy", "left acc (%)", False), ("right_accuracy", "right acc (%)", False)],
    ),
    "multifashionmnist": (
        "Multi-(Fashion+MNIST) (2 tasks)",
        [("left_accuracy", "MNIST acc (%)", False), ("right_accuracy", "Fashion acc (%)", False)],
    ),
    "energy": (
        "UCI Energy Efficiency (heating, cooling)",
        [("Y1_mae", "heating MAE", True), ("Y2_mae", "cooling MAE", True)],
    ),
    "energy-x1000": (
        "UCI Energy Efficiency, heating target x1000",
        [("Y1_mae", "heating MAE", True), ("Y2_mae", "cooling MAE", True)],
    ),
    "parkinsons": (
        "UCI Parkinsons Telemonitoring (motor, total UPDRS)",
        [("motor_UPDRS_mae", "motor MAE", True), ("total_UPDRS_mae", "total MAE", True)],
    ),
    "parkinsons-x1000": (
        "UCI Parkinsons Telemonitoring, motor target x1000",
        [("motor_UPDRS_mae", "motor MAE", True), ("total_UPDRS_mae", "total MAE", True)],
    ),
    "mnist": (
        "MNIST, ten weighted per-class terms (MTAdam paper protocol)",
        [("test_accuracy", "test acc (%)", False)],
    ),
}
_IMAGES = ("multimnist", "multifashion", "multifashionmnist", "mnist")
BASELINE = "adam"


@dataclass
class BenchConfig(ExperimentConfig):
    """Settings of ``lossbalance bench``.

    Attributes (besides :class:`~lossbalance.experiments.harness.ExperimentConfig`, whose
    epochs, batch size, limits and lr apply to the image benchmarks):
        benchmarks: which benchmarks (``None``: all of :data:`BENCHMARKS`).
        data_dir: directory holding ``mnist/``, ``fashion-mnist/`` and the UCI folders.
        download: try to download missing idx files (the UCI files are never downloaded).
        verify: check the md5 sums of local files.
        uci_batch_size: batch of the UCI benchmarks.
        energy_epochs, parkinsons_epochs: their epochs (about 600 steps each by default).
        toy_steps, toy_lr: updates per start and step size on the toy problem.
        toy_seed: the seed of its one run per method (trajectories are deterministic but
            for the random-weight methods).
        quick: a tiny version of everything (tests; a few seconds per method).
        extra_notes: lines added to the report's protocol notes (what else ran on the
            machine, say).
    """

    seeds: int = 3
    epochs: int = 1
    batch_size: int = 128
    train_limit: int | None = 12000
    test_limit: int | None = 2000
    threads: int | None = 1
    benchmarks: list[str] | None = None
    data_dir: str = "data"
    download: bool = True
    verify: bool = True
    uci_batch_size: int = 64
    energy_epochs: int = 60
    parkinsons_epochs: int = 8
    toy_steps: int = 400
    toy_lr: float = 0.1
    toy_seed: int = 0
    quick: bool = False
    extra_notes: list[str] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        self.check_counts("uci_batch_size", "energy_epochs", "parkinsons_epochs", "toy_steps")
        if not isinstance(self.toy_seed, int) or self.toy_seed < 0:
            raise ValueError(f"Invalid toy_seed: {self.toy_seed!r} (expected an integer >= 0)")
        if not 0 < self.toy_lr < math.inf:
            raise ValueError(f"Invalid toy_lr: {self.toy_lr} (expected a finite toy_lr > 0)")
        for name in self.benchmarks or []:
            if name not in BENCHMARKS:
                raise ValueError(
                    f"Invalid benchmark: {name!r} (expected one of {', '.join(BENCHMARKS)})"
                )

    def selected(self) -> list[str]:
        """The benchmarks to run, in :data:`BENCHMARKS` order."""
        chosen = set(self.benchmarks or BENCHMARKS)
        return [b for b in BENCHMARKS if b in chosen]

    def effective(self) -> BenchConfig:
        """The settings that train: with ``quick``, tiny ones."""
        if not self.quick:
            return self
        return replace(
            self,
            seeds=min(self.seeds, 2),
            train_limit=256,
            test_limit=200,
            max_batches=2,
            batch_size=64,
            energy_epochs=1,
            parkinsons_epochs=1,
            uci_batch_size=128,
            toy_steps=5,
            quick=False,
        )


def default_methods() -> list[str]:
    """Equal weighting (Adam on the sum), MTAdam, and every registry balancer."""
    return [BASELINE, "mtadam", *registry_balancers()]


def method_names(cfg: BenchConfig) -> list[str]:
    """The row names that ``cfg`` asks for."""
    return expand_methods(cfg.methods, default_methods(), weighted=False)


def column_groups(cfg: BenchConfig) -> list[str]:
    """The trained benchmarks (the toy problem is computed, one run per method)."""
    return [b for b in cfg.selected() if b != "toy"]


def _label(spec: MethodSpec, group: str | None) -> str:
    return f"{spec.label} [{group}]"


def _pairs(cfg: BenchConfig, bench: str) -> PairTask:
    root = Path(cfg.data_dir)

    def load(name: str) -> Any:
        d = load_idx_dataset(name, root, download=cfg.download, verify=cfg.verify)
        return d.limit(cfg.train_limit, cfg.test_limit)

    if bench == "multifashionmnist":
        left, right = load("mnist"), load("fashion-mnist")
        tr = make_multi_pair(left.train_x, left.train_y, right.train_x, right.train_y, seed=0)
        te = make_multi_pair(left.test_x, left.test_y, right.test_x, right.test_y, seed=1)
    else:
        d = load("mnist" if bench == "multimnist" else "fashion-mnist")
        tr = make_multimnist(d.train_x, d.train_y, seed=0)
        te = make_multimnist(d.test_x, d.test_y, seed=1)
    return PairTask(bench, MultiMnistData(tr[0], tr[1], te[0], te[1]))


def _task(cfg: BenchConfig, bench: str) -> tuple[Any, dict[str, Any]]:
    """The benchmark's task and the overrides of its training settings."""
    if bench in ("multimnist", "multifashion", "multifashionmnist"):
        return _pairs(cfg, bench), {}
    if bench == "mnist":
        from lossbalance.experiments.models import MnistCNN
        from lossbalance.experiments.tasks import ClassTermsTask

        d = load_idx_dataset("mnist", Path(cfg.data_dir), download=cfg.download, verify=cfg.verify)
        d = d.limit(cfg.train_limit, cfg.test_limit)
        return ClassTermsTask("mnist", d, MnistCNN, (1, 28, 28)), {}
    name = bench.removesuffix("-x1000")
    data = load_uci(name, cfg.data_dir, verify=cfg.verify)
    scales = [1000.0 if bench.endswith("-x1000") else 1.0, 1.0]
    epochs = cfg.energy_epochs if name == "energy" else cfg.parkinsons_epochs
    overrides = {
        "epochs": epochs,
        "batch_size": cfg.uci_batch_size,
        "max_batches": cfg.max_batches,
        "evals_per_epoch": 1,
    }
    return RegressionTask(bench, data, scales), overrides


def delta_m(
    means: Mapping[str, float], base: Mapping[str, float], metrics: list[tuple[str, str, bool]]
) -> float:
    """LibMTL's Δm% of ``means`` against ``base`` (positive: better); NaN if any is NaN."""
    terms = []
    for key, _, lower in metrics:
        m, b = means.get(key, math.nan), base.get(key, math.nan)
        if m is None or b is None or not (math.isfinite(m) and math.isfinite(b)) or b == 0:
            return math.nan
        terms.append((-1.0 if lower else 1.0) * (m - b) / b)
    return 100.0 * float(np.mean(terms))


def rank(values: Mapping[str, float]) -> dict[str, float]:
    """Rank 1 = the largest value; ties share the mean rank; NaN ranks last (tied)."""
    labels = list(values)
    finite = sorted((v, k) for k, v in values.items() if math.isfinite(v))
    out: dict[str, float] = {}
    i = 0
    while i < len(finite):
        j = i
        while j + 1 < len(finite) and finite[j + 1][0] == finite[i][0]:
            j += 1
        for _, k in finite[i : j + 1]:
            out[k] = len(finite) - (i + j) / 2
        i = j + 1
    nan = [k for k in labels if k not in out]
    for k in nan:
        out[k] = len(finite) + (len(nan) + 1) / 2
    return out


def _toy_config(cfg: BenchConfig) -> ToyConfig:
    eff = cfg.effective()
    toy_cfg = ToyConfig(steps=eff.toy_steps, lr=eff.toy_lr)
    return replace(toy_cfg, starts=toy_cfg.starts[:2]) if cfg.quick else toy_cfg


def prepare_toy(
    cfg: BenchConfig,
    previous: dict[str, dict[str, Any]],
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Compute the toy runs missing from ``previous`` and add them to it (``--jobs``: the
    parent does this once, so that the per-(method, seed) workers find them)."""
    if "toy" not in cfg.selected():
        return
    specs = resolve_methods(method_names(cfg), weighted=False)
    for record in _toy_records(specs, cfg.effective(), _toy_config(cfg), previous, on_run):
        previous[run_key("toy", record["row"], record["seed"])] = record


def _toy_records(
    specs: list[MethodSpec],
    cfg: BenchConfig,
    toy_cfg: ToyConfig,
    previous: Mapping[str, dict[str, Any]],
    on_run: Callable[[dict[str, Any]], None] | None,
) -> list[dict[str, Any]]:
    import time

    records = []
    for spec in specs:
        row = _label(spec, "toy")
        key = run_key("toy", row, cfg.toy_seed)
        if key in previous:
            records.append(previous[key])
            continue
        if isinstance(previous, RecordedRuns):
            previous.missing.append((row, cfg.toy_seed))
            continue
        seed_everything(cfg.toy_seed)
        start = time.perf_counter()
        entry = run_toy([spec], toy_cfg)[spec.label]
        elapsed = time.perf_counter() - start
        steps = toy_cfg.steps * len(toy_cfg.starts)
        reached = int(sum(entry["reached"]))
        dist = [d for d in entry["final_distance"] if d is not None]
        final = {
            "reached": reached,
            "starts": len(toy_cfg.starts),
            "mean_final_distance": float(np.mean(dist)) if dist else math.nan,
        }
        record = {
            "row": row,
            "method": spec.name,
            "kind": spec.kind,
            "group": "toy",
            "seed": cfg.toy_seed,
            "history": [{"epoch": 0.0, "step": steps, **final}],
            "final": final,
            "steps": steps,
            "train_time_s": elapsed,
            "time_per_iter_s": elapsed / max(1, steps),
            "toy": entry,
        }
        records.append(record)
        if on_run is not None:
            on_run(record)
    return records


def run(
    cfg: BenchConfig,
    *,
    previous: Mapping[str, dict[str, Any]] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> ExperimentResult:
    """Every selected benchmark for every method and seed; the tables and rankings."""
    cfg.validate()
    eff = cfg.effective()
    previous = previous if previous is not None else {}
    specs = resolve_methods(method_names(cfg), weighted=False)
    seeds = eff.seed_list()
    toy_cfg = _toy_config(cfg)
    runs: list[dict[str, Any]] = []
    toy_runs: list[dict[str, Any]] = []
    if "toy" in cfg.selected():
        toy_runs = _toy_records(specs, eff, toy_cfg, previous, on_run)
    sizes: dict[str, Any] = {}
    for bench in column_groups(cfg):
        task, overrides = _task(eff, bench)
        sizes[bench] = {"train": task.num_train}
        train_cfg = eff.train_config(**overrides)
        runs += run_experiment(
            [(bench, task)],
            specs,
            seeds,
            train_cfg,
            label=_label,
            previous=previous,
            on_run=on_run,
        )

    per_bench: dict[str, Any] = {}
    sections: list[str] = []
    base_label = next((s.label for s in specs if s.name == BASELINE), None)
    for bench in column_groups(cfg):
        title, metrics = BENCHMARKS[bench]
        stats: dict[str, dict[str, Any]] = {}
        means: dict[str, dict[str, float]] = {}
        for spec in specs:
            rr = [r for r in runs if r["row"] == _label(spec, bench)]
            stats[spec.label] = {k: summarize([r["final"][k] for r in rr]) for k, _, _ in metrics}
            means[spec.label] = {k: stats[spec.label][k]["mean"] for k, _, _ in metrics}
            stats[spec.label]["time_per_iter_s"] = summarize([r["time_per_iter_s"] for r in rr])
        dm: dict[str, dict[str, Any]] = {}
        for spec in specs:
            if base_label is None:
                dm[spec.label] = summarize([])
                continue
            rr = [r for r in runs if r["row"] == _label(spec, bench)]
            per_seed = [delta_m(r["final"], means[base_label], metrics) for r in rr]
            d = delta_m(means[spec.label], means[base_label], metrics)
            dm[spec.label] = {**summarize(per_seed), "mean": d}
        ranks = rank({k: v["mean"] for k, v in dm.items()})
        per_bench[bench] = {"metrics": stats, "delta_m": dm, "rank": ranks}
        headers = ["Method", *[lab for _, lab, _ in metrics], "Δm% vs EW", "rank", "ms / step"]
        digits = 2 if metrics[0][2] is False else 3
        table = []
        for spec in sorted(specs, key=lambda s: ranks[s.label]):
            st = stats[spec.label]
            table.append(
                [
                    spec.label,
                    *[format_mean_std(st[k], digits) for k, _, _ in metrics],
                    format_mean_std(dm[spec.label], 2),
                    f"{ranks[spec.label]:g}",
                    f"{1000 * (st['time_per_iter_s']['mean'] or math.nan):.2f}",
                ]
            )
        sections += [f"## {title} (`{bench}`)", "", markdown_table(headers, table), ""]

    overall = {}
    for spec in specs:
        rs = [per_bench[b]["rank"][spec.label] for b in per_bench]
        ds = [per_bench[b]["delta_m"][spec.label]["mean"] for b in per_bench]
        finite = [d for d in ds if d is not None and math.isfinite(d)]
        overall[spec.label] = {
            "mean_rank": float(np.mean(rs)) if rs else math.nan,
            "mean_delta_m": float(np.mean(ds)) if ds else math.nan,
            "benchmarks_nan": len(ds) - len(finite),
        }
    toy_by_label = {r["row"].removesuffix(" [toy]"): r for r in toy_runs}
    headers = ["Method", "mean rank", "mean Δm%", *per_bench]
    if toy_by_label:
        headers.append("toy: starts reaching the Pareto set")
    table = []
    order = sorted(specs, key=lambda s: (overall[s.label]["mean_rank"], s.label))
    for spec in order:
        o = overall[spec.label]
        cells = [
            spec.label,
            f"{o['mean_rank']:.2f}",
            "NaN" if not math.isfinite(o["mean_delta_m"]) else f"{o['mean_delta_m']:+.2f}",
            *[f"{per_bench[b]['rank'][spec.label]:g}" for b in per_bench],
        ]
        if toy_by_label:
            t = toy_by_label.get(spec.label)
            cells.append("-" if t is None else f"{t['final']['reached']}/{t['final']['starts']}")
        table.append(cells)
    body = ["## Overall ranking", "", markdown_table(headers, table), ""]
    if toy_by_label:
        body += [
            "## Toy problem: final distance to the Pareto set per start",
            "",
            _toy_table(toy_by_label, toy_cfg),
            "",
        ]
    body += sections
    body += _notes(cfg, eff, seeds, specs, runs, toy_cfg, sizes, base_label)

    config = {**asdict(cfg), "device": str(eff.train_config().device)}
    config.update(
        methods=[s.name for s in specs],
        effective={k: v for k, v in asdict(eff).items() if k != "extra_notes"},
        sizes=sizes,
        toy={
            "steps": toy_cfg.steps,
            "lr": toy_cfg.lr,
            "scale": toy_cfg.scale,
            "tolerance": toy_cfg.tolerance,
            "starts": [list(s) for s in toy_cfg.starts],
        },
    )
    rows = [_label(s, b) for b in column_groups(cfg) for s in specs]
    summary = {}
    for b in column_groups(cfg):
        for s in specs:
            summary[_label(s, b)] = per_bench[b]["delta_m"][s.label]
    plot_metrics: list[tuple[str, str]] = []
    for b in column_groups(cfg):
        for key, lab, _ in BENCHMARKS[b][1]:
            if key not in [k for k, _ in plot_metrics]:
                plot_metrics.append((key, lab))
    return ExperimentResult(
        name="bench",
        title="lossbalance bench: every method on the small offline MTL benchmarks",
        config=config,
        seeds=seeds,
        rows=rows,
        runs=[*toy_runs, *runs],
        metric="delta_m",
        metric_label="Δm% against equal weighting (Adam on the sum)",
        summary=summary,
        table="\n".join(body),
        plot_metrics=plot_metrics,
        term_names=["term 1", "term 2"],
        extra={"benchmarks": per_bench, "overall": overall},
    )


def _toy_table(toy: Mapping[str, dict[str, Any]], toy_cfg: ToyConfig) -> str:
    headers = ["Method", *[f"start ({s[0]:g}, {s[1]:g})" for s in toy_cfg.starts], "note"]
    rows = []
    for label, rec in toy.items():
        entry = rec["toy"]
        if entry.get("error"):
            rows.append([label, *["-"] * len(toy_cfg.starts), entry["error"][:80]])
            continue
        cells = [
            "diverged" if d is None else (f"**{d:.2f}**" if ok else f"{d:.2f}")
            for d, ok in zip(entry["final_distance"], entry["reached"], strict=True)
        ]
        rows.append([label, *cells, ""])
    note = (
        f"\nDistance of the final point to the Pareto set after {toy_cfg.steps} steps of lr "
        f"{toy_cfg.lr:g}; bold: within {toy_cfg.tolerance:g} (reached). Pictures: `toy.png` "
        "(all methods) and `toy/<method>.png`."
    )
    return markdown_table(headers, rows) + "\n" + note


def _notes(
    cfg: BenchConfig,
    eff: BenchConfig,
    seeds: list[int],
    specs: list[MethodSpec],
    runs: list[dict[str, Any]],
    toy_cfg: ToyConfig,
    sizes: Mapping[str, Any],
    base_label: str | None,
) -> list[str]:
    notes = [
        "## Protocol",
        "",
        f"- Seeds {seeds[0]}..{seeds[-1]} ({len(seeds)} per row; the toy problem one run per "
        f"method, seed {cfg.toy_seed}); mean ± sample std over seeds. {len(runs)} trained runs.",
        "- Δm% (LibMTL): 100/T Σ_t ±(M_t − M_EW,t)/M_EW,t with the sign making an improvement "
        f"positive; EW = {base_label or 'missing (no adam row: Δm is NaN)'} (Adam on the plain "
        "sum of the terms). Ranks by Δm (1 = best; NaN last). ms / step: training time per "
        "step, evaluation excluded"
        + (f", {cfg.jobs} runs side by side" if cfg.jobs > 1 else "")
        + ".",
        f"- Images: first {eff.train_limit} training / {eff.test_limit} test images of each "
        f"source set, {eff.epochs} epoch(s) of batch {eff.batch_size}"
        + (f", at most {eff.max_batches} steps per epoch" if eff.max_batches else "")
        + f", lr {eff.lr:g}. Every balancer trains with Adam through lossbalance.backward on "
        "the shared trunk; MTAdam on the list of terms.",
        f"- UCI: MLP 64-64 with one linear head per target, batch {eff.uci_batch_size}, Energy "
        f"{eff.energy_epochs} epochs (random 80/20 split, seed 0), Parkinsons "
        f"{eff.parkinsons_epochs} epochs (split by subject: ids divisible by 5 are test); "
        "features and targets standardised on the training set; -x1000 multiplies the first "
        "standardised target by 1000 (MAE reported in original units).",
        f"- Toy: {len(toy_cfg.starts)} starts, {toy_cfg.steps} steps, lr {toy_cfg.lr:g}; "
        "balancers take x <- x - lr d with d their combination of the two gradients (plain "
        "SGD), Adam/MTAdam their own update.",
    ]
    if cfg.quick:
        notes.append("- --quick: a tiny smoke-test configuration, not a result.")
    notes += [f"- {n}" for n in cfg.extra_notes]
    nonfinite = sorted({r["row"] for r in runs if r.get("nonfinite_steps")})
    if nonfinite:
        notes.append(f"- Rows with non-finite loss terms in some step: {', '.join(nonfinite)}.")
    return notes


def remove_plots(out_dir: str | Path) -> None:
    """Remove the pictures :func:`write_plots` makes (``--no-plots``: an earlier command's
    toy pictures and Δm map must not sit beside results they do not show)."""
    out = Path(out_dir)
    for name in ("toy.png", "delta_m.png"):
        (out / name).unlink(missing_ok=True)
    if (out / "toy").is_dir():
        for png in (out / "toy").glob("*.png"):
            png.unlink()
        if not any((out / "toy").iterdir()):
            (out / "toy").rmdir()


def write_plots(result: ExperimentResult, out_dir: str | Path) -> list[Path]:
    """The toy pictures and the Δm heat map (``delta_m.png``) beside the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    written: list[Path] = []
    toy = {r["row"].removesuffix(" [toy]"): r["toy"] for r in result.runs if r["group"] == "toy"}
    if toy:
        t = result.config["toy"]
        toy_cfg = ToyConfig(
            steps=t["steps"],
            lr=t["lr"],
            scale=t["scale"],
            tolerance=t["tolerance"],
            starts=tuple(tuple(s) for s in t["starts"]),
        )
        written += plot_toy(toy, toy_cfg, out)
    per_bench = result.extra.get("benchmarks", {})
    if per_bench:
        labels = list(result.extra["overall"])
        labels.sort(key=lambda k: result.extra["overall"][k]["mean_rank"])
        grid = np.array(
            [[per_bench[b]["delta_m"][k]["mean"] for b in per_bench] for k in labels],
            dtype=np.float64,
        )
        fig, ax = plt.subplots(figsize=(1.2 * len(per_bench) + 3, 0.28 * len(labels) + 1.5))
        lim = np.nanpercentile(np.abs(grid), 90) if np.isfinite(grid).any() else 1.0
        im = ax.imshow(np.clip(grid, -lim, lim), cmap="RdYlGn", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(per_bench)), list(per_bench), rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for i in range(len(labels)):
            for j in range(len(per_bench)):
                v = grid[i, j]
                ax.text(
                    j,
                    i,
                    "NaN" if not np.isfinite(v) else f"{v:+.1f}",
                    ha="center",
                    va="center",
                    fontsize=5,
                )
        fig.colorbar(im, ax=ax, label="Δm% vs EW (clipped)")
        ax.set_title("Δm% against equal weighting (rows by mean rank)", fontsize=9)
        fig.tight_layout()
        path = out / "delta_m.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
