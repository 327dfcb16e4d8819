"""MNIST with ten weighted per-class terms: the MTAdam paper's Table 1 (and Table 5).

Protocol (Malkiel & Wolf 2020, section 5.1): the PyTorch MNIST-example CNN, one epoch,
batch 64, learning rate 1e-3 (the optimizers' other hyperparameters at their defaults;
SGD-M uses momentum 0.9). The loss has ten terms, one per class,

    L_i = w_i * (sum of the NLL of the batch's class-i samples) / B,

with random weights w_i (``--weights paper``: all w_i ~ U(1, 1000); ``--weights authors``:
w_0 = 1, w_1..w_9 ~ U(0, 1000) as the authors' ``main.py`` draws them). The weights
differ per seed and are the same for every method of a seed. Rows: the torch optimizers
and MTAdam on the weighted ("unbalanced") terms, Adam on unit weights ("balanced"), and
every registry balancer with Adam on the weighted terms. ``ablation=True`` runs MTAdam
next to its five Table 5 variants instead.

``--loss-form authors`` reproduces the authors' ``nll_loss(weight=onehot_i * w_i)`` with
mean reduction: it divides w_i back out (so the terms are not unbalanced at all) and is NaN
for every class absent from a batch (about 1.2% of batches of 64). It is offered only to
show this; the harness counts those steps, MTAdam skips them (``skipped_steps``), and a
plain optimizer's parameters turn NaN, which is reported as a NaN accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lossbalance.experiments.data import load_idx_dataset
from lossbalance.experiments.harness import ExperimentConfig, run_experiment
from lossbalance.experiments.methods import (
    ABLATIONS,
    MethodSpec,
    registry_balancers,
    resolve_methods,
)
from lossbalance.experiments.models import MnistCNN
from lossbalance.experiments.report import (
    ExperimentResult,
    format_mean_std,
    markdown_table,
    negative_projection_note,
    protocol_cut,
    protocol_note,
    seeds_note,
    summarize,
    timing_note,
)
from lossbalance.experiments.tasks import ClassTermsTask

__all__ = [
    "PAPER_TABLE1",
    "MnistConfig",
    "class_terms_result",
    "default_methods",
    "method_names",
    "run",
]

#: test accuracy (%) reported in the MTAdam paper's Table 1 (100 runs each)
PAPER_TABLE1: dict[str, str] = {
    "Unbalanced-SGD-M": "85.4 ± 1.23",
    "Unbalanced-RMSProp": "87.2 ± 0.97",
    "Unbalanced-Adam": "88.8 ± 0.84",
    "Unbalanced-MTAdam": "97.9 ± 0.07",
    "Balanced-Adam": "98.3 ± 0.05",
}


@dataclass
class MnistConfig(ExperimentConfig):
    """Settings of ``lossbalance mnist`` (defaults: the paper's protocol).

    Attributes (besides :class:`~lossbalance.experiments.harness.ExperimentConfig`):
        dataset: ``"mnist"`` or ``"fashion-mnist"``.
        data_dir: directory holding the idx .gz files (or ``<data_dir>/<dataset>/``).
        download: try to download missing files (md5-checked).
        verify: check the md5 sums of local files too.
        loss_form: ``"paper"`` or ``"authors"``.
        weight_scheme: ``"paper"`` or ``"authors"``.
        ablation: run MTAdam and its five Table 5 variants (when ``methods`` is None).
    """

    seeds: int = 10
    epochs: int = 1
    batch_size: int = 64
    evals_per_epoch: int = 4
    dataset: str = "mnist"
    data_dir: str = "data"
    download: bool = True
    verify: bool = True
    loss_form: str = "paper"
    weight_scheme: str = "paper"
    ablation: bool = False


def default_methods(ablation: bool = False) -> list[str]:
    """The Table 1 rows plus every registry balancer (or the Table 5 rows)."""
    if ablation:
        return list(ABLATIONS)
    return ["sgd-m", "rmsprop", "adam", "mtadam", "balanced-adam", *registry_balancers()]


def expand_methods(
    methods: list[str] | None, default: list[str], *, weighted: bool = True
) -> list[str]:
    """``None`` -> the default rows; ``"all"`` -> every optimizer, variant and balancer
    (plus Balanced-Adam where the terms are weighted)."""
    if not methods:
        return default
    everything = [*default_methods(), *ABLATIONS[1:]]
    if not weighted:
        everything = [m for m in everything if not m.startswith("balanced-")]
    out: list[str] = []
    for item in methods:
        for part in item.split(","):
            if part.strip().lower() == "all":
                out += everything
            elif part.strip():
                out.append(part)
    return out


def accuracy_at(run: Mapping[str, Any], epoch: int) -> float:
    """The test accuracy of the last evaluation at or before ``epoch`` (NaN if none)."""
    points = [h for h in run["history"] if h["epoch"] <= epoch + 1e-9]
    return float(points[-1]["test_accuracy"]) if points else float("nan")


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def class_terms_result(
    name: str,
    title: str,
    config: dict[str, Any],
    specs: list[MethodSpec],
    seeds: list[int],
    runs: list[dict[str, Any]],
    *,
    paper: dict[str, str] | None = None,
    notes: list[str] | None = None,
    early_epoch: int | None = None,
    lessons: Callable[[dict[str, dict[str, Any]], dict[str, dict[str, Any]]], list[str]]
    | None = None,
) -> ExperimentResult:
    """Summary and Markdown table of a per-class-terms experiment (mnist, demo).

    ``early_epoch`` adds a column with the test accuracy after that many epochs (how fast
    each row learns, besides where it ends); ``lessons(final, early)`` returns sentences
    that say what the table shows, computed from its numbers (row -> summary)."""
    rows = [s.label for s in specs]
    summary = {
        row: summarize([r["final"]["test_accuracy"] for r in runs if r["row"] == row])
        for row in rows
    }
    early = {
        row: summarize(
            [accuracy_at(r, early_epoch) for r in runs if r["row"] == row]
            if early_epoch is not None
            else []
        )
        for row in rows
    }
    headers = ["Method", "Test accuracy (%)", "n", "ms / iter", "non-finite steps / run"]
    if early_epoch is not None:
        headers.insert(1, f"After epoch {early_epoch} (%)")
    has_skips = any(r["skipped_steps"] is not None for r in runs)
    if has_skips:
        headers.append("MTAdam skipped steps / run")
    cut = protocol_cut(config)
    if paper is not None:
        headers.append(
            "Paper (Table 1; full protocol, not comparable)" if cut else "Paper (Table 1)"
        )
    table_rows = []
    for row in rows:
        row_runs = [r for r in runs if r["row"] == row]
        ms = 1000 * (_mean([r["time_per_iter_s"] for r in row_runs]) or float("nan"))
        nonfinite = _mean([float(r["nonfinite_steps"]) for r in row_runs])
        cells: list[Any] = [
            row,
            format_mean_std(summary[row]),
            summary[row]["n"],
            f"{ms:.2f}",
            f"{nonfinite:.1f}" if nonfinite is not None else "-",
        ]
        if early_epoch is not None:
            cells.insert(1, format_mean_std(early[row]))
        if has_skips:
            skipped = _mean([r["skipped_steps"] for r in row_runs])
            cells.append("-" if skipped is None else f"{skipped:.1f}")
        if paper is not None:
            cells.append(paper.get(row, "-"))
        table_rows.append(cells)
    diverged = {
        row: sum(
            1
            for r in runs
            if r["row"] == row and r["final"]["test_accuracy"] != r["final"]["test_accuracy"]
        )
        for row in rows
    }
    body = [markdown_table(headers, table_rows), ""]
    if lessons is not None:
        said = lessons(summary, early)
        if said:
            body += ["**What this table shows.** " + " ".join(said), ""]
    body += [f"- {note}" for note in (notes or [])]
    body.append(
        f"- {seeds_note(seeds, len(runs), len(rows) * len(seeds))}; mean ± sample std (ddof = 1) "
        "of the final test accuracy. ms / iter: training time per step, evaluation excluded."
    )
    body += [f"- {note}" for note in protocol_note(config, runs)]
    body += [f"- {note}" for note in timing_note(config)]
    body += [f"- {note}" for note in negative_projection_note(rows, runs)]
    for row, count in diverged.items():
        if count:
            body.append(
                f"- {row}: {count} of {summary[row]['n']} runs diverged (non-finite outputs); "
                "their accuracy is NaN, so the row's mean is NaN (null in the JSON files)."
            )
    return ExperimentResult(
        name=name,
        title=title,
        config=config,
        seeds=seeds,
        rows=rows,
        runs=runs,
        metric="test_accuracy",
        metric_label="test accuracy (%)",
        summary=summary,
        table="\n".join(body),
        plot_metrics=[("test_accuracy", "test accuracy (%)"), ("test_loss", "test NLL")],
        term_names=[f"class {i}" for i in range(10)],
        references={
            "test_accuracy": [
                (float(value.split()[0]), row)
                for row, value in (paper or {}).items()
                if row in rows and not cut
            ]
        },
    )


def method_names(cfg: MnistConfig) -> list[str]:
    """The row names that ``cfg`` asks for (its methods, or the experiment's default rows)."""
    return expand_methods(cfg.methods, default_methods(cfg.ablation))


def run(
    cfg: MnistConfig,
    *,
    previous: Mapping[str, dict[str, Any]] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> ExperimentResult:
    """Run the MNIST experiment; raises ``DatasetNotFoundError`` without the data."""
    cfg.validate()
    specs = resolve_methods(method_names(cfg), weighted=True)
    data = load_idx_dataset(
        cfg.dataset, Path(cfg.data_dir), download=cfg.download, verify=cfg.verify
    )
    data = data.limit(cfg.train_limit, cfg.test_limit)
    task = ClassTermsTask(
        cfg.dataset,
        data,
        MnistCNN,
        (1, 28, 28),
        loss_form=cfg.loss_form,
        weight_scheme=cfg.weight_scheme,
    )
    train_cfg = cfg.train_config()
    seeds = cfg.seed_list()
    runs = run_experiment([(None, task)], specs, seeds, train_cfg, previous=previous, on_run=on_run)
    config = {**asdict(cfg), "device": str(train_cfg.device), "train_size": task.num_train}
    config["test_size"] = int(data.test_y.shape[0])
    config["methods"] = [s.name for s in specs]
    weights_note = (
        "w_i ~ U(1, 1000) for every class (paper)"
        if cfg.weight_scheme == "paper"
        else "w_0 = 1, w_1..w_9 ~ U(0, 1000) (authors' main.py)"
    )
    form_note = (
        "L_i = w_i * sum of class-i NLL / batch size (paper)"
        if cfg.loss_form == "paper"
        else "nll_loss(weight=onehot_i * w_i), mean reduction (authors' main.py): w_i cancels "
        "and a class absent from a batch gives NaN"
    )
    notes = [
        f"{cfg.dataset}, MNIST-example CNN, {cfg.epochs} epoch(s), batch {cfg.batch_size}, "
        f"lr {cfg.lr:g}, {task.num_train} training / {config['test_size']} test images.",
        f"Terms: {form_note}; weights: {weights_note}, drawn per seed.",
        "Unbalanced rows train on the weighted terms, Balanced rows on unit weights; registry "
        "balancers run with Adam on the weighted terms.",
    ]
    paper = PAPER_TABLE1 if (cfg.dataset == "mnist" and not cfg.ablation) else None
    title = "MNIST, ten weighted per-class terms (MTAdam paper, Table 1)"
    if cfg.ablation:
        title = "MNIST, MTAdam ablations (MTAdam paper, Table 5)"
    if cfg.dataset != "mnist":
        title = title.replace("MNIST", cfg.dataset, 1)
    return class_terms_result("mnist", title, config, specs, seeds, runs, paper=paper, notes=notes)
