"""The report's plots: every panel says what its axes are, traces come one kind per
figure, metric panels form a grid, reference lines and single evaluations are drawn."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from lossbalance.experiments.report import ExperimentResult, write_report

matplotlib.use("Agg")


def _run(row: str, method: str, seed: int, evals: int, weights: bool, magnitudes: bool) -> dict:
    rng = np.random.default_rng(seed)
    history = [
        {"epoch": e / max(1, evals - 1), "step": 10 * e, "acc": 50 + 40 * e / evals + rng.normal()}
        for e in range(evals)
    ]
    for h in history:
        h.update(l1=1 / (1 + h["epoch"]), psnr=20 + h["epoch"], ssim=0.5, fd=3.0)
    steps = list(range(1, 41, 4))
    return {
        "row": row,
        "method": method,
        "group": None,
        "seed": seed,
        "history": history,
        "final": dict(history[-1]),
        "steps": 40,
        "trace": {
            "step": steps,
            "losses": [[1.0, 2.0] for _ in steps],
            "weights": [[0.5 + 0.01 * s, 1e3] for s in steps] if weights else [],
            "magnitudes": [[1e-3 * s, 10.0] for s in steps] if magnitudes else [],
        },
    }


def result(evals: int = 5) -> ExperimentResult:
    runs = [
        _run(row, method, seed, evals, weights=method == "imtl-g", magnitudes=method == "mtadam")
        for row, method in (("Adam", "adam"), ("MTAdam", "mtadam"), ("IMTL-G", "imtl-g"))
        for seed in (0, 1)
    ]
    keys = [("acc", "test accuracy (%)"), ("l1", "L1"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM")]
    return ExperimentResult(
        name="t",
        title="A title",
        config={},
        seeds=[0, 1],
        rows=["Adam", "MTAdam", "IMTL-G"],
        runs=runs,
        metric="acc",
        metric_label="test accuracy (%)",
        summary={},
        table="",
        plot_metrics=keys,
        term_names=["a", "b"],
        references={"acc": [(88.8, "Adam"), (70.0, "a baseline")]},
        extra_plots=[("fd.png", "FD", [("fd", "FD")])],
    )


@pytest.fixture
def figures(monkeypatch):
    """The figures written, by file name, as (axes labels, y scales, texts, lines)."""
    from matplotlib.figure import Figure

    seen: dict[str, list[dict]] = {}
    real = Figure.savefig

    def record(self, fname, *args, **kwargs):
        panels = []
        for ax in self.axes:
            if not ax.axison:
                continue
            panels.append(
                {
                    "xlabel": ax.get_xlabel(),
                    "ylabel": ax.get_ylabel(),
                    "yscale": ax.get_yscale(),
                    "texts": [t.get_text() for t in ax.texts],
                    "hlines": [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"],
                }
            )
        seen[str(fname).rsplit("/", 1)[-1]] = panels
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return seen


def test_every_plot_labels_its_axes(tmp_path, figures):
    write_report(result(), tmp_path, "cmd")
    assert set(figures) == {"metrics.png", "weights.png", "magnitudes.png", "fd.png"}
    for name, panels in figures.items():
        assert panels, name
        for panel in panels:
            assert panel["xlabel"] and panel["ylabel"], (name, panel)


def test_traces_are_split_by_kind_on_one_scale(tmp_path, figures):
    write_report(result(), tmp_path, "cmd")
    assert len(figures["weights.png"]) == 1 and len(figures["magnitudes.png"]) == 1
    assert {p["yscale"] for p in figures["magnitudes.png"]} == {"log"}
    assert {p["yscale"] for p in figures["weights.png"]} == {"log"}  # spans 0.5 .. 1000
    assert "log scale" in figures["weights.png"][0]["ylabel"]


def test_metric_panels_form_a_grid_with_reference_lines(tmp_path, figures):
    write_report(result(), tmp_path, "cmd")
    assert len(figures["metrics.png"]) == 4
    acc = figures["metrics.png"][0]
    assert len(acc["hlines"]) == 2
    assert "paper: Adam" in acc["texts"] and "a baseline" in acc["texts"]
    from PIL import Image

    width, height = Image.open(tmp_path / "metrics.png").size
    assert width / height < 2.5  # a grid, not a strip


def test_a_single_evaluation_is_said_not_drawn_as_a_curve(tmp_path, figures):
    write_report(result(evals=1), tmp_path, "cmd")
    texts = [t for p in figures["metrics.png"] for t in p["texts"]]
    assert any(t.startswith("one evaluation per run") for t in texts)


def test_every_title_fits_in_its_figure(tmp_path, monkeypatch):
    # a one-panel trace figure is 5 inches wide: a long suptitle ran off both edges
    from matplotlib.figure import Figure

    cut: list[str] = []
    real = Figure.savefig

    def check(self, fname, *args, **kwargs):
        renderer = self.canvas.get_renderer()
        self.draw(renderer)
        tight = kwargs.get("bbox_inches") == "tight"
        box = self.get_tightbbox(renderer) if tight else self.bbox
        if tight:
            box = box.transformed(self.dpi_scale_trans)
        title = self._suptitle
        if title is not None and title.get_text():
            ext = title.get_window_extent(renderer)
            if ext.x0 < box.x0 - 1 or ext.x1 > box.x1 + 1:
                cut.append(str(fname).rsplit("/", 1)[-1])
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", check)
    long = result()
    long.title = "A long experiment title that names its protocol, data set and terms in full"
    long.rows = ["MTAdam"]
    long.runs = [r for r in long.runs if r["row"] == "MTAdam"]
    write_report(long, tmp_path, "cmd")
    assert not cut, cut


def test_a_trace_legend_names_every_term_of_the_widest_panel(tmp_path, monkeypatch):
    # the bench draws 2-term and 10-term runs in one figure: the legend came from the first
    # panel (2 names) and unnamed terms were numbered from 0 ("term 2" twice)
    from matplotlib.figure import Figure

    legends: dict[str, list[str]] = {}
    real = Figure.savefig

    def record(self, fname, *args, **kwargs):
        legends[str(fname).rsplit("/", 1)[-1]] = [t.get_text() for t in self.legends[0].texts]
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    res = result()
    wide = dict(res.runs[2], row="MTAdam [ten]", group="ten")
    wide["trace"] = dict(
        wide["trace"], magnitudes=[[1.0 + i for i in range(10)] for _ in range(10)]
    )
    res.runs.append(wide)
    res.rows.append("MTAdam [ten]")
    write_report(res, tmp_path, "cmd")
    names = legends["magnitudes.png"]
    assert names == ["a", "b", *[f"term {i}" for i in range(3, 11)]]
