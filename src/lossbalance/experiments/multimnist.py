"""MultiMNIST with three tasks of different scales: the IMTL paper's Table 1 protocol, small.

Liu et al. (ICLR 2021, "Towards Impartial Multi-task Learning") compare balancing
methods with the losses as they are and with one task's loss multiplied by 10: a
scale-invariant method should give the same results in both column groups (|Δ| = 0). Here
the data is MultiMNIST built deterministically from MNIST (two digits overlaid with
opposite shifts on a 36x36 canvas), the tasks are the upper-left digit (cross-entropy),
the lower-right digit (cross-entropy) and the reconstruction of the input (L1, a different
loss type and scale), the model a shared LeNet trunk with one head per task. Every method
runs, MTAdam included; the time per training iteration is reported as the IMTL paper does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lossbalance.experiments.data import MultiMnistData, load_idx_dataset, make_multimnist
from lossbalance.experiments.harness import ExperimentConfig, run_experiment
from lossbalance.experiments.methods import MethodSpec, registry_balancers, resolve_methods
from lossbalance.experiments.mnist import expand_methods
from lossbalance.experiments.report import (
    ExperimentResult,
    format_mean_std,
    markdown_table,
    negative_projection_note,
    protocol_note,
    seeds_note,
    summarize,
    timing_note,
)
from lossbalance.experiments.tasks import MultiMnistTask

__all__ = ["TASKS", "MultiMnistConfig", "build_data", "default_methods", "method_names", "run"]

TASKS = ("left", "right", "recon")
_TASK_METRIC = {"left": "left_accuracy", "right": "right_accuracy", "recon": "recon_l1"}
_TASK_LABEL = {"left": "left acc (%)", "right": "right acc (%)", "recon": "recon L1"}


@dataclass
class MultiMnistConfig(ExperimentConfig):
    """Settings of ``lossbalance multimnist``.

    Attributes (besides :class:`~lossbalance.experiments.harness.ExperimentConfig`):
        dataset: source digits, ``"mnist"`` or ``"fashion-mnist"``.
        data_dir: directory holding the idx .gz files.
        download: try to download missing files (md5-checked).
        verify: check the md5 sums of local files too.
        data_seed: seed of the digit pairing (the dataset is the same for every run).
        scale_task: the task whose loss is multiplied in the second column group.
        scale: its multiplier.
        grad_source: ``"params"`` or ``"features"`` for the gradient-level balancers.
        feature_dim: width of the shared feature.
    """

    seeds: int = 3
    epochs: int = 5
    batch_size: int = 256
    dataset: str = "mnist"
    data_dir: str = "data"
    download: bool = True
    verify: bool = True
    data_seed: int = 0
    scale_task: str = "left"
    scale: float = 10.0
    grad_source: str = "params"
    feature_dim: int = 64

    def validate(self) -> None:
        super().validate()
        if self.scale_task not in TASKS:
            raise ValueError(f"Invalid scale_task: {self.scale_task!r} (expected one of {TASKS})")
        if not 0 < self.scale < math.inf:
            raise ValueError(f"Invalid scale: {self.scale} (expected a finite scale > 0)")
        if self.grad_source not in ("params", "features"):
            raise ValueError(
                f"Invalid grad_source: {self.grad_source!r} (expected 'params' or 'features')"
            )


def default_methods() -> list[str]:
    """Adam on the plain sum, MTAdam, and every registry balancer."""
    return ["adam", "mtadam", *registry_balancers()]


def build_data(cfg: MultiMnistConfig) -> MultiMnistData:
    """MultiMNIST from the idx files: training pairs from the training set, test from test."""
    digits = load_idx_dataset(
        cfg.dataset, Path(cfg.data_dir), download=cfg.download, verify=cfg.verify
    )
    digits = digits.limit(cfg.train_limit, cfg.test_limit)
    train_x, train_y = make_multimnist(digits.train_x, digits.train_y, seed=cfg.data_seed)
    test_x, test_y = make_multimnist(digits.test_x, digits.test_y, seed=cfg.data_seed + 1)
    return MultiMnistData(train_x, train_y, test_x, test_y)


def _group_name(cfg: MultiMnistConfig) -> str:
    return f"{cfg.scale_task} x{cfg.scale:g}"


def column_groups(cfg: MultiMnistConfig) -> list[str]:
    """The column groups every row is trained in: the losses as they are, and rescaled."""
    return ["original", _group_name(cfg)]


def method_names(cfg: MultiMnistConfig) -> list[str]:
    """The row names that ``cfg`` asks for (its methods, or the experiment's default rows)."""
    return expand_methods(cfg.methods, default_methods(), weighted=False)


def run(
    cfg: MultiMnistConfig,
    *,
    previous: Mapping[str, dict[str, Any]] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> ExperimentResult:
    """Run both column groups for every method and seed."""
    cfg.validate()
    specs = resolve_methods(method_names(cfg), weighted=False)
    data = build_data(cfg)
    scales = [1.0, 1.0, 1.0]
    scales[TASKS.index(cfg.scale_task)] = cfg.scale
    original, scaled_group = column_groups(cfg)
    tasks = [
        (original, MultiMnistTask(data, (1.0, 1.0, 1.0), feature_dim=cfg.feature_dim)),
        (scaled_group, MultiMnistTask(data, tuple(scales), feature_dim=cfg.feature_dim)),  # type: ignore[arg-type]
    ]

    def label(spec: MethodSpec, group: str | None) -> str:
        return spec.label if group == "original" else f"{spec.label} [{group}]"

    train_cfg = cfg.train_config(grad_source=cfg.grad_source)
    seeds = cfg.seed_list()
    runs = run_experiment(
        tasks, specs, seeds, train_cfg, label=label, previous=previous, on_run=on_run
    )
    rows = [label(s, g) for g, _ in tasks for s in specs]
    summary = {
        row: summarize([r["final"]["mean_accuracy"] for r in runs if r["row"] == row])
        for row in rows
    }

    metrics: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    deltas: dict[str, dict[str, float | None]] = {}
    times: dict[str, float] = {}
    for spec in specs:
        per_group = {}
        for group, _ in tasks:
            row_runs = [r for r in runs if r["row"] == label(spec, group)]
            per_group[group] = {
                t: summarize([r["final"][_TASK_METRIC[t]] for r in row_runs]) for t in TASKS
            }
        metrics[spec.label] = per_group
        deltas[spec.label] = {
            t: abs(per_group[scaled_group][t]["mean"] - per_group["original"][t]["mean"])
            for t in TASKS
        }
        spec_runs = [r for r in runs if r["method"] == spec.name]
        times[spec.label] = sum(r["time_per_iter_s"] for r in spec_runs) / len(spec_runs)

    headers = ["Method"]
    headers += [_TASK_LABEL[t] for t in TASKS]
    headers += [f"{_TASK_LABEL[t]} [{scaled_group}]" for t in TASKS]
    headers += [f"|Δ| {t}" for t in TASKS]
    headers += ["ms / iter"]
    table_rows = []
    for spec in specs:
        m = metrics[spec.label]
        cells: list[Any] = [spec.label]
        for group, _ in tasks:
            for t in TASKS:
                cells.append(format_mean_std(m[group][t], 4 if t == "recon" else 2))
        for t in TASKS:
            d = deltas[spec.label][t]
            cells.append("NaN" if d != d else f"{d:.4f}" if t == "recon" else f"{d:.2f}")
        cells.append(f"{1000 * times[spec.label]:.2f}")
        table_rows.append(cells)

    config = {**asdict(cfg), "device": str(train_cfg.device)}
    config.update(
        methods=[s.name for s in specs],
        train_size=int(data.train_y.shape[0]),
        test_size=int(data.test_y.shape[0]),
        groups={g: list(t.scales) for g, t in tasks},
    )
    body = [
        markdown_table(headers, table_rows),
        "",
        f"- MultiMNIST from {cfg.dataset} ({config['train_size']} train / "
        f"{config['test_size']} test images, 36x36, pairing seed {cfg.data_seed}); tasks: "
        "left digit (CE), right digit (CE), reconstruction of the input (L1).",
        f"- Column groups: the losses as they are, and the {cfg.scale_task} loss multiplied by "
        f"{cfg.scale:g} ([{scaled_group}]). |Δ|: absolute change of the mean metric between "
        "the groups (0 for a scale-invariant method).",
        f"- Shared LeNet trunk + one head per task, {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"lr {cfg.lr:g}, Adam for every method but MTAdam; gradient balancers use "
        f"{cfg.grad_source}-level gradients.",
        f"- {seeds_note(seeds, len(runs), len(rows) * len(seeds))}; mean ± sample std. "
        "ms / iter: training time per step, evaluation excluded, averaged over both groups.",
    ]
    body += [f"- {note}" for note in protocol_note(config, runs)]
    body += [f"- {note}" for note in timing_note(config)]
    body += [f"- {note}" for note in negative_projection_note(rows, runs)]
    return ExperimentResult(
        name="multimnist",
        title="MultiMNIST, three tasks, original and rescaled losses (IMTL paper, Table 1 protocol)",
        config=config,
        seeds=seeds,
        rows=rows,
        runs=runs,
        metric="mean_accuracy",
        metric_label="mean digit accuracy (%)",
        summary=summary,
        table="\n".join(body),
        plot_metrics=[
            ("left_accuracy", "left digit accuracy (%)"),
            ("right_accuracy", "right digit accuracy (%)"),
            ("recon_l1", "reconstruction L1"),
        ],
        term_names=list(TASKS),
        extra={"task_metrics": metrics, "abs_delta": deltas, "time_per_iter_s": times},
    )
