"""Writers of experiment results: summary.json, results.json, a Markdown table, PNG plots.

Non-finite numbers (a diverged run) are written as JSON ``null`` so that the files stay
strict JSON; the Markdown table shows them as ``NaN``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "ExperimentResult",
    "append_checkpoint",
    "config_fingerprint",
    "cost_cells",
    "cost_headers",
    "decode_images",
    "encode_images",
    "fingerprinted_settings",
    "format_mean_std",
    "library_versions",
    "load_previous_runs",
    "markdown_table",
    "mean_or_none",
    "negative_projection_note",
    "plot_metrics",
    "plot_samples",
    "plot_traces",
    "protocol_cut",
    "protocol_note",
    "rewrite_checkpoint",
    "summarize",
    "timing_note",
    "to_jsonable",
    "write_json",
    "write_report",
    "write_text_atomic",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class ExperimentResult:
    """Everything an experiment produced, ready to be written.

    Attributes:
        name: ``"demo"``, ``"mnist"``, ``"multimnist"``.
        title: heading of the Markdown file.
        config: settings (JSON-serialisable).
        seeds: run seeds.
        rows: row labels in table order.
        runs: run records from :func:`lossbalance.experiments.harness.train_run`.
        metric: key of the main metric in each run's ``final`` dict.
        metric_label: its human name, e.g. ``"test accuracy (%)"``.
        summary: row -> ``{"mean", "std", "n"}`` of the main metric.
        table: the Markdown body (tables and notes), without the command header.
        plot_metrics: ``(key, label)`` of the metrics to plot against epochs.
        term_names: names of the K terms (legend of the trace plot).
        extra: anything else for results.json. With ``extra["sample_images"]`` (reference
            image rows, see :func:`plot_samples`) and runs that carry ``samples``, the
            report also writes ``samples.png``.
        extra_plots: more metric plots, ``(file name, title, [(key, label), ...])``, e.g.
            the training losses per epoch.
        references: horizontal reference lines of the metric plots, metric key ->
            ``[(value, label), ...]`` (a baseline such as bicubic upsampling, or the
            paper's value of a row: a label equal to a row label takes the row's colour).
    """

    name: str
    title: str
    config: dict[str, Any]
    seeds: list[int]
    rows: list[str]
    runs: list[dict[str, Any]]
    metric: str
    metric_label: str
    summary: dict[str, dict[str, Any]]
    table: str
    plot_metrics: list[tuple[str, str]]
    term_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    extra_plots: list[tuple[str, str, list[tuple[str, str]]]] = field(default_factory=list)
    references: dict[str, list[tuple[float, str]]] = field(default_factory=dict)


def library_versions() -> dict[str, Any]:
    """Versions of python, torch, numpy, lossbalance (and optional libraries), the platform."""
    import torch

    import lossbalance

    versions: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "lossbalance": lossbalance.__version__,
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
    }
    for name in ("sklearn", "matplotlib", "tqdm"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", None)
    return versions


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof = 1; ``None``, JSON null, for one value: it
    is not defined) and count.

    Honest about divergence: one NaN run makes the mean and std NaN.
    """
    arr = np.asarray(list(values), dtype=np.float64)
    n = int(arr.size)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = float(arr.mean())
    std = float(arr.std(ddof=1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def to_jsonable(obj: Any) -> Any:
    """Convert to JSON types: NaN/inf -> None, tuples -> lists, numpy and torch scalars,
    paths and devices -> str."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "tolist"):  # torch tensors
        return to_jsonable(obj.tolist())
    return str(obj)


def write_json(path: str | Path, obj: Any, *, compact: bool = False) -> Path:
    """Write strict JSON (non-finite numbers as null): indent 2, or one line without
    spaces when ``compact`` (the run records of a large experiment)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_jsonable(obj)
    if compact:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    else:
        text = json.dumps(data, indent=2, allow_nan=False)
    return write_text_atomic(path, text + "\n")


_UMASK = os.umask(0)
os.umask(_UMASK)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``:
    a kill or a full disk leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600): give it the mode a plain open() would
        os.chmod(name, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return path


def _round_trace(value: Any, digits: int = 7) -> Any:
    # A run's trace (per-term losses, weights, magnitudes at the trace points) holds
    # float32 quantities: 7 significant digits keep them and halve results.json.
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, list):
        return [_round_trace(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _round_trace(v, digits) for k, v in value.items()}
    return value


def _compact_run(run: dict[str, Any]) -> dict[str, Any]:
    if "trace" not in run:
        return run
    return {**run, "trace": _round_trace(to_jsonable(run["trace"]))}


def format_mean_std(stats: Mapping[str, Any], digits: int = 2) -> str:
    """``"97.90 ± 0.07"``; ``"NaN"`` when the mean is not finite."""
    mean, std = stats.get("mean"), stats.get("std")
    if mean is None or not math.isfinite(mean):
        return "NaN"
    if std is None or not math.isfinite(std) or stats.get("n", 0) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def seeds_note(seeds: Sequence[int], recorded: int, expected: int) -> str:
    """The table note's opening on the seeds: ``"Seeds 0..2 (3 per row)"``, or, when the
    report holds fewer runs than requested (``--report-only`` of an unfinished
    experiment), how many it holds."""
    text = f"Seeds {seeds[0]}..{seeds[-1]} ({len(seeds)} per row"
    if recorded >= expected:
        return text + ")"
    return (
        f"{text} requested; {recorded} of the {expected} runs are recorded, and each row's "
        "statistics use the runs it has)"
    )


def protocol_cut(config: Mapping[str, Any]) -> bool:
    """Whether the runs were capped (``--max-batches``, ``--train-limit``,
    ``--test-limit``), so that the protocol's published numbers do not compare."""
    return any(config.get(k) is not None for k in ("max_batches", "train_limit", "test_limit"))


def protocol_note(config: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """What a capped command actually ran: the steps and training images each run saw,
    and the test images it was scored on (empty when nothing was capped)."""
    if not protocol_cut(config):
        return []
    steps = sorted({int(r["steps"]) for r in runs}) or [0]
    batch, epochs, train = (int(config.get(k) or 0) for k in ("batch_size", "epochs", "train_size"))
    seen = [min(s * batch, epochs * train) if train else s * batch for s in steps]
    images = seen[0] if len(seen) == 1 else f"{seen[0]}-{seen[-1]}"
    count = steps[0] if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
    caps = [
        f"{flag} {config[key]}"
        for key, flag in (
            ("max_batches", "--max-batches"),
            ("train_limit", "--train-limit"),
            ("test_limit", "--test-limit"),
        )
        if config.get(key) is not None
    ]
    return [
        f"Not the full protocol ({', '.join(caps)}): each run trained {count} step(s) and saw "
        f"{images} training images (counting repeats over epochs) of the "
        f"{config.get('train_size', '?')} used, and was scored on {config.get('test_size', '?')} "
        "test images; published numbers do not compare with these."
    ]


def timing_note(config: Mapping[str, Any]) -> list[str]:
    """A table note when the runs were trained several at once (``--jobs``)."""
    jobs = int(config.get("jobs", 1) or 1)
    if jobs <= 1:
        return []
    return [
        f"Times per iteration were measured with up to {jobs} runs training at once on the "
        f"same device (--jobs {jobs}): they compare the rows only roughly. The scripts in "
        "benchmarks/ time the methods alone."
    ]


def negative_projection_note(rows: Sequence[str], runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """A table note with the steps of each IMTL-G or hybrid-IMTL run whose common projection
    was negative (``negative_projection_steps`` of the run records, in seed order); none
    when no run counted them (no such row, or runs recorded before the count)."""
    parts = []
    for row in rows:
        row_runs = sorted((r for r in runs if r["row"] == row), key=lambda r: r["seed"])
        counts = [r.get("negative_projection_steps") for r in row_runs]
        if any(c is not None for c in counts):
            listed = ", ".join("-" if c is None else str(c) for c in counts)
            parts.append(f"{row}: {listed}")
    if not parts:
        return []
    return [
        "Steps per run (seed order) where IMTL-G's sum(alpha) = 1 gave every unit gradient "
        "the same negative projection, so that the step raised every term to first order: "
        + "; ".join(parts)
        + "."
    ]


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not ``None`` (``None`` when there are none)."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def cost_headers(with_skips: bool) -> list[str]:
    """The table headers of :func:`cost_cells`."""
    headers = ["n", "ms / iter", "non-finite steps / run"]
    if with_skips:
        headers.append("MTAdam skipped steps / run")
    return headers


def cost_cells(row_runs: Sequence[Mapping[str, Any]], with_skips: bool) -> list[Any]:
    """A row's runs, mean training time per iteration (ms), mean non-finite steps per run
    and, ``with_skips`` (some run counts them), MTAdam's mean skipped steps per run (``-``
    where none of the row's runs counted them)."""
    ms = 1000 * (mean_or_none([r["time_per_iter_s"] for r in row_runs]) or float("nan"))
    nonfinite = mean_or_none([float(r["nonfinite_steps"]) for r in row_runs])
    cells: list[Any] = [
        len(row_runs),
        f"{ms:.2f}",
        "-" if nonfinite is None else f"{nonfinite:.1f}",
    ]
    if with_skips:
        skipped = mean_or_none([r["skipped_steps"] for r in row_runs])
        cells.append("-" if skipped is None else f"{skipped:.1f}")
    return cells


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; the first column is left-aligned, the others right-aligned."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
    lines.append("| " + " | ".join([":---"] + ["---:"] * (len(headers) - 1)) + " |")
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells, expected {len(headers)}")
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def _mean_curve(
    runs: Sequence[Mapping[str, Any]], key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Runs of one row share their evaluation points (same epochs and batches per epoch).
    length = min(len(r["history"]) for r in runs)
    x = np.array([runs[0]["history"][i]["epoch"] for i in range(length)], dtype=np.float64)
    ys = np.array(
        [[np.nan if h.get(key) is None else h[key] for h in r["history"][:length]] for r in runs],
        dtype=np.float64,
    )
    return x, ys.mean(0), ys.std(0)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(
    result: ExperimentResult,
    path: str | Path,
    metrics: Sequence[tuple[str, str]] | None = None,
    *,
    subject: str = "test metrics",
) -> Path:
    """Metrics against epochs: one panel per metric (a grid of up to three columns), one
    line (mean ± std over seeds) per row; rows of a second column group are dashed;
    ``result.references`` as dotted horizontal lines. ``subject`` names what is plotted.
    A panel whose rows have a single evaluation says so instead of pretending a curve."""
    plt = _pyplot()
    metrics = list(metrics or result.plot_metrics)
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    for ax in axes.flat[len(metrics) :]:
        ax.axis("off")
    groups = list(dict.fromkeys(r["group"] for r in result.runs))
    methods = list(dict.fromkeys(r["method"] for r in result.runs))
    cmap = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colors: dict[str, Any] = {}
    for ax, (key, title) in zip(axes.flat, metrics, strict=False):
        longest = 0
        for row in result.rows:
            runs = [r for r in result.runs if r["row"] == row]
            if not runs:
                continue
            x, mean, std = _mean_curve(runs, key)
            longest = max(longest, int(np.isfinite(mean).sum()))
            color = colors.setdefault(row, cmap(methods.index(runs[0]["method"]) % cmap.N))
            style = _GROUP_STYLES[groups.index(runs[0]["group"]) % len(_GROUP_STYLES)]
            ax.plot(x, mean, style, color=color, label=row, marker="." if len(x) < 12 else None)
            if len(runs) > 1:
                ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        for value, label in result.references.get(key, []):
            color = colors.get(label, "0.35")
            ax.axhline(value, color=color, linestyle=":", linewidth=1.2)
            ax.annotate(
                f"paper: {label}" if label in colors else label,
                (0.01, value),
                xycoords=("axes fraction", "data"),
                fontsize=6,
                color=color,
                va="bottom",
            )
        if longest == 1:
            ax.text(
                0.5,
                0.95,
                "one evaluation per run: no curve\n(more epochs or --evals-per-epoch)",
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=7,
                color="0.4",
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel(title)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{result.title}: {subject} (mean ± std over {len(result.seeds)} seed(s))")
    _legend(fig, result, axes, groups, colors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


#: line styles of the column groups, in order (the first group solid)
_GROUP_STYLES: tuple[Literal["-", "--", ":", "-."], ...] = ("-", "--", ":", "-.")


def _legend(fig: Any, result: ExperimentResult, axes: Any, groups: list[Any], colors: dict) -> None:
    """One legend entry per method (its colour) and one per column group (its line
    style), beside the panels, so that many rows and groups never cover the curves."""
    from matplotlib.lines import Line2D

    method_rows: dict[str, str] = {}
    for row in result.rows:
        run = next((r for r in result.runs if r["row"] == row), None)
        if run is not None and row in colors:
            method_rows.setdefault(run["method"], row)
    handles = []
    for row in method_rows.values():
        label = row.split(" [")[0] if len(groups) > 1 else row
        handles.append(Line2D([], [], color=colors[row], label=label))
    if len(groups) > 1:
        handles += [
            Line2D(
                [], [], color="0.3", linestyle=_GROUP_STYLES[i % len(_GROUP_STYLES)], label=str(g)
            )
            for i, g in enumerate(groups)
        ]
    if not handles:
        return
    ncol = math.ceil(len(handles) / 32)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        ncol=ncol,
        fontsize=7,
        title="columns: line style" if len(groups) > 1 else None,
        title_fontsize=7,
    )


_MAX_TRACE_PANELS = 36

_TRACES = {
    "weights": ("weight applied to each term", "balancer weights"),
    "magnitudes": (
        "gradient magnitude EMA, mean over layers (log)",
        "MTAdam's per-term magnitudes",
    ),
}


def plot_traces(result: ExperimentResult, path: str | Path, key: str = "weights") -> Path | None:
    """One trace over training, one panel per row that has it (each row's first seed):
    ``key="weights"``, the balancers' weights, or ``"magnitudes"``, MTAdam's per-term
    gradient magnitude EMAs. Returns ``None`` when no row has it.

    Magnitudes are drawn on a log scale; weights on one scale for the whole figure: log
    when every weight is positive and they span more than a factor 100, else linear."""
    ylabel, what = _TRACES[key]
    panels = []
    for row in result.rows:
        run = next((r for r in result.runs if r["row"] == row), None)
        if run is None:
            continue
        if any(v is not None for v in run["trace"].get(key) or []):
            panels.append((row, run))
    if not panels:
        return None
    groups = list(dict.fromkeys(run["group"] for _, run in panels))
    if len(panels) > _MAX_TRACE_PANELS and len(groups) > 1:
        # one panel per row of the first column group: the other groups' rows are the
        # same methods on other data, and a figure of a hundred panels helps nobody
        panels = [(row, run) for row, run in panels if run["group"] == groups[0]]
    panels = panels[:_MAX_TRACE_PANELS]
    series = []
    for _, run in panels:
        pairs = [
            (s, v)
            for s, v in zip(run["trace"]["step"], run["trace"][key], strict=True)
            if v is not None
        ]
        values = np.array([v for _, v in pairs], dtype=np.float64)
        series.append(([s for s, _ in pairs], np.where(np.isfinite(values), values, np.nan)))
    finite = np.concatenate([v[np.isfinite(v)] for _, v in series])
    log = key == "magnitudes" or bool(
        finite.size and finite.min() > 0 and finite.max() / finite.min() > 100
    )
    if key == "weights" and log:
        ylabel = "weight applied to each term (log scale)"
    plt = _pyplot()
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (row, run), (steps, values) in zip(axes.flat, panels, series, strict=False):
        for i in range(values.shape[1]):
            # term names count from 1 ("term 1", "term 2"), so do the unnamed ones
            name = result.term_names[i] if i < len(result.term_names) else f"term {i + 1}"
            ax.plot(steps, values[:, i], label=name, linewidth=1)
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{row} (seed {run['seed']})", fontsize=8)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(True, alpha=0.3)
    # the legend of the panel with the most terms (benchmarks of 2 and of 10 terms share
    # one figure in `lossbalance bench`)
    handles, labels = max(
        (ax.get_legend_handles_labels() for ax in axes.flat[: len(panels)]),
        key=lambda pair: len(pair[1]),
    )
    ncol = min(10 if cols > 1 else 5, len(labels))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7)
    title = _wrapped(f"{result.title}: {what} over training (each row's first seed)", fig, 9)
    fig.suptitle(title, fontsize=9)
    legend_rows = math.ceil(len(labels) / max(1, ncol))
    top = 0.95 - 0.04 * title.count("\n") / nrows
    fig.tight_layout(rect=(0, min(0.3, 0.04 * legend_rows / nrows + 0.02), 1, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _wrapped(text: str, fig: Any, fontsize: float) -> str:
    """``text`` broken into lines that fit the figure's width (a one-panel figure is about
    5 inches wide; a title that names the experiment in full is wider)."""
    import textwrap

    # an average character is about 0.6 em wide
    chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
    return textwrap.fill(text, chars, break_on_hyphens=False)


def encode_images(images: Any) -> dict[str, Any]:
    """uint8 images ``(N, H, W)`` as a compact JSON value: ``{"shape", "base64"}``."""
    arr = np.ascontiguousarray(np.asarray(images, dtype=np.uint8))
    return {"shape": list(arr.shape), "base64": base64.b64encode(arr.tobytes()).decode("ascii")}


def decode_images(blob: Mapping[str, Any]) -> np.ndarray:
    """The inverse of :func:`encode_images`."""
    raw = base64.b64decode(blob["base64"])
    return np.frombuffer(raw, dtype=np.uint8).reshape(blob["shape"]).copy()


def plot_samples(result: ExperimentResult, path: str | Path) -> Path | None:
    """A grid of test samples: the reference rows of ``result.extra["sample_images"]``
    (a list of ``[label, encoded images]``, e.g. the input and the target), then one row per
    table row with the outputs of its first seed's run (``run["samples"]``). Returns
    ``None`` when there is nothing to show."""
    reference = result.extra.get("sample_images") or []
    rows: list[tuple[str, np.ndarray]] = [(label, decode_images(b)) for label, b in reference]
    for row in result.rows:
        run = next((r for r in result.runs if r["row"] == row and r.get("samples")), None)
        if run is not None:
            rows.append((f"{row} (seed {run['seed']})", decode_images(run["samples"])))
    if not rows or len(rows) == len(reference):
        return None
    plt = _pyplot()
    cols = max(len(images) for _, images in rows)
    side = max(max(images.shape[1:]) for _, images in rows)
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(0.75 * cols + 2.8, 0.8 * len(rows) + 0.3), squeeze=False
    )
    for ax, (label, images) in zip(axes[:, 0], rows, strict=True):
        # images of another size (a low-resolution input) are centred in a side x side cell
        # a 2-pixel white gap between images, none after the last
        canvas = np.full((side, cols * (side + 2) - 2), 255, dtype=np.uint8)
        for j, img in enumerate(images):
            h, w = img.shape
            r0, c0 = (side - h) // 2, j * (side + 2) + (side - w) // 2
            if (h, w) != (side, side):
                scale = side // max(h, w)
                img = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
                h, w = img.shape
                r0, c0 = (side - h) // 2, j * (side + 2) + (side - w) // 2
            canvas[r0 : r0 + h, c0 : c0 + w] = img
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{result.title}: test samples", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # "tight" keeps the long right-aligned row labels, which tight_layout cuts off
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


CHECKPOINT = "runs.jsonl"
# settings that do not change a run's result: a resumed experiment may differ in them
_NOT_FINGERPRINTED = (
    "methods",
    "seeds",
    "first_seed",
    "progress",
    "threads",
    "ablation",
    "jobs",
    # the bench's list of benchmarks: each run is keyed by its benchmark, so choosing more
    # (or fewer) benchmarks changes no run's result
    "benchmarks",
)


def fingerprinted_settings(config: Any) -> dict[str, Any]:
    """The settings that determine each run's result (JSON values), as fingerprinted."""
    values = {k: v for k, v in sorted(asdict(config).items()) if k not in _NOT_FINGERPRINTED}
    return to_jsonable(values)


def config_fingerprint(config: Any) -> str:
    """A short hash of the settings that determine each run's result (for ``--resume``)."""
    blob = json.dumps(fingerprinted_settings(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _matches(item: Mapping[str, Any], fingerprint: str, current: Mapping[str, Any] | None) -> bool:
    # a record is reused when its fingerprint is the current one, or when its stored settings
    # equal the current ones outside _NOT_FINGERPRINTED (a record written before a setting
    # joined that list still matches)
    if item.get("fingerprint") == fingerprint:
        return True
    recorded = item.get("settings")
    if not isinstance(recorded, Mapping) or current is None:
        return False
    kept = {k: v for k, v in recorded.items() if k not in _NOT_FINGERPRINTED}
    return kept == {k: v for k, v in current.items() if k not in _NOT_FINGERPRINTED}


def settings_diff(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str:
    """What differs between recorded and current settings, e.g. ``"epochs 1 -> 2"``."""
    if not recorded:
        return "settings not stored with the record"
    parts = []
    for key in sorted(set(recorded) | set(current)):
        if key in _NOT_FINGERPRINTED:
            continue
        old, new = recorded.get(key, "unset"), current.get(key, "unset")
        if old != new:
            parts.append(f"{key} {old!r} -> {new!r}")
    return ", ".join(parts) or "settings differ (same values, other fingerprint)"


def _restore_nan(record: dict[str, Any]) -> dict[str, Any]:
    # results.json stores NaN as null; a reused run must summarise as NaN again
    def fix(d: dict[str, Any]) -> dict[str, Any]:
        return {k: float("nan") if v is None else v for k, v in d.items()}

    record["final"] = fix(record["final"])
    record["history"] = [fix(h) for h in record["history"]]
    return record


def rewrite_checkpoint(
    out_dir: str | Path,
    fingerprint: str,
    records: Sequence[dict[str, Any]],
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Replace ``out_dir/runs.jsonl`` by ``records``, atomically (:func:`write_text_atomic`)."""
    lines = [_checkpoint_line(fingerprint, r, settings) for r in records]
    write_text_atomic(Path(out_dir) / CHECKPOINT, "".join(lines))


def _checkpoint_line(
    fingerprint: str, record: dict[str, Any], settings: Mapping[str, Any] | None
) -> str:
    item: dict[str, Any] = {"fingerprint": fingerprint, "run": record}
    if settings is not None:
        item["settings"] = settings
    return json.dumps(to_jsonable(item), allow_nan=False) + "\n"


def append_checkpoint(
    out_dir: str | Path,
    fingerprint: str,
    record: dict[str, Any],
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Append a finished run to ``out_dir/runs.jsonl`` (kept until the report is written).

    Every record starts on a fresh line: a line cut off without its newline (a kill in the
    middle of a write) is ended first, so the new record is not glued onto it and lost.
    ``settings`` (:func:`fingerprinted_settings`) are stored with it so that a ``--resume``
    with other settings can say what changed.
    """
    path = Path(out_dir) / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    line = _checkpoint_line(fingerprint, record, settings)
    with path.open("ab") as f:
        if f.tell() > 0:
            with path.open("rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


_RUN_FIELDS = ("group", "row", "seed", "final", "history")


@dataclass
class RecordedElsewhere:
    """Records in an output folder that a command cannot use: ``where`` (results.json or
    runs.jsonl line N) and ``why`` (the settings that differ, or what is malformed)."""

    where: str
    why: str
    runs: int = 1
    malformed: bool = False


def load_previous_runs(
    out_dir: str | Path,
    fingerprint: str,
    *,
    settings: Mapping[str, Any] | None = None,
    problems: list[RecordedElsewhere] | None = None,
) -> dict[str, dict[str, Any]]:
    """Runs already in ``out_dir`` (results.json and the checkpoint) with the same settings,
    keyed by ``group|row|seed``.

    What cannot be used is appended to ``problems`` when given: records with other
    settings (with :func:`settings_diff` against ``settings``), and checkpoint lines that
    are not a JSON object of a run (cut off, not UTF-8, a field missing), which are
    skipped.
    """
    from lossbalance.experiments.harness import run_key
    from lossbalance.experiments.methods import canonical_row

    out = Path(out_dir)
    found = problems if problems is not None else []
    current = settings or {}
    records: list[dict[str, Any]] = []
    results = out / "results.json"
    if results.is_file():
        try:
            data = json.loads(results.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            found.append(
                RecordedElsewhere("results.json", f"not valid JSON ({exc})", malformed=True)
            )
            data = {}
        if not isinstance(data, dict):
            data = {}
        if _matches(data, fingerprint, settings):
            records += data.get("runs", [])
        elif data.get("runs"):
            why = settings_diff(data.get("settings"), current)
            found.append(RecordedElsewhere("results.json", why, runs=len(data["runs"])))
    checkpoint = out / CHECKPOINT
    if checkpoint.is_file():
        for number, raw in enumerate(checkpoint.read_bytes().split(b"\n"), start=1):
            if not raw.strip():
                continue
            where = f"{CHECKPOINT} line {number}"
            try:
                item = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                found.append(RecordedElsewhere(where, "not UTF-8 text", malformed=True))
                continue
            except json.JSONDecodeError:  # a line cut short when a run was killed
                found.append(RecordedElsewhere(where, "not valid JSON (cut off?)", malformed=True))
                continue
            run = item.get("run") if isinstance(item, dict) else None
            if not isinstance(run, dict):
                found.append(RecordedElsewhere(where, "not a JSON object of a run", malformed=True))
                continue
            lacking = [f for f in _RUN_FIELDS if f not in run]
            if lacking:
                why = f"the run lacks {', '.join(lacking)}"
                found.append(RecordedElsewhere(where, why, malformed=True))
                continue
            if _matches(item, fingerprint, settings):
                records.append(run)
            else:
                why = settings_diff(item.get("settings"), current)
                found.append(RecordedElsewhere(where, why))
    for r in records:
        r["row"] = canonical_row(r["row"])
    return {run_key(r["group"], r["row"], r["seed"]): _restore_nan(r) for r in records}


def write_report(
    result: ExperimentResult,
    out_dir: str | Path,
    command: str,
    *,
    plots: bool = True,
    fingerprint: str | None = None,
    settings: Mapping[str, Any] | None = None,
    keep_checkpoint: bool = False,
) -> list[Path]:
    """Write summary.json, results.json, results.md and the plots into ``out_dir``.

    Returns the paths written. The Markdown file starts with the exact command line. The
    run checkpoint (``runs.jsonl``), if any, is removed, since results.json now holds every
    run, unless ``keep_checkpoint`` (a report of some of its runs, ``--report-only``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"metric": result.metric, "metric_label": result.metric_label, "rows": result.summary}
    written = [write_json(out / "summary.json", summary)]
    written.append(
        write_json(
            out / "results.json",
            {
                "experiment": result.name,
                "command": command,
                "fingerprint": fingerprint,
                "settings": settings,
                "config": result.config,
                "seeds": result.seeds,
                "versions": library_versions(),
                "metric": result.metric,
                "metric_label": result.metric_label,
                "rows": result.rows,
                "summary": result.summary,
                "term_names": result.term_names,
                **result.extra,
                "runs": [_compact_run(run) for run in result.runs],
            },
            compact=True,
        )
    )
    md = write_text_atomic(
        out / "results.md", f"# {result.title}\n\nCommand: `{command}`\n\n{result.table.rstrip()}\n"
    )
    written.append(md)
    plot_names = {
        "metrics.png",
        "weights.png",
        "magnitudes.png",
        "samples.png",
        *(n for n, _, _ in result.extra_plots),
    }
    if plots:
        written.append(plot_metrics(result, out / "metrics.png"))
        for key in _TRACES:
            traces = plot_traces(result, out / f"{key}.png", key)
            if traces is not None:
                written.append(traces)
        for name, title, keys in result.extra_plots:
            written.append(plot_metrics(result, out / name, keys, subject=title))
        samples = plot_samples(result, out / "samples.png")
        if samples is not None:
            written.append(samples)
    # a plot left from an earlier command in this folder would sit beside results it
    # does not show (--no-plots, or fewer plots this time): remove it
    for name in plot_names - {p.name for p in written}:
        (out / name).unlink(missing_ok=True)
    if not keep_checkpoint:
        (out / CHECKPOINT).unlink(missing_ok=True)
    return written
