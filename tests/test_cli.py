"""End-to-end tests of the command line on tiny slices (CPU, no network).

MNIST comes from ``<repo>/../shared/data`` when present, else from tiny synthetic idx
files (then ``--no-verify``, since their md5 sums are not the published ones).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lossbalance
from lossbalance.cli import main
from lossbalance.experiments.report import PNG_SIGNATURE

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def mnist_args(tmp_path_factory, write_idx) -> list[str]:
    """``--data-dir`` (and ``--no-verify`` for synthetic files) for the MNIST commands."""
    if (SHARED_DATA / "mnist" / "train-images-idx3-ubyte.gz").is_file():
        return ["--data-dir", str(SHARED_DATA)]
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 400), ("t10k", 100)):
        write_idx(
            root / "mnist" / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28)),
        )
        write_idx(root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return ["--data-dir", str(root), "--no-verify"]


def _check_outputs(
    out: Path, rows: list[str], command: str, table_rows: list[str] | None = None
) -> dict:
    written = json.loads((out / "summary.json").read_text())
    assert set(written) == {"metric", "metric_label", "rows"} and written["metric_label"]
    summary = written["rows"]
    assert list(summary) == rows
    for stats in summary.values():
        assert set(stats) == {"mean", "std", "n"}
        assert (stats["std"] is None) == (stats["n"] < 2)  # no std of one value
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == command
    assert results["rows"] == rows
    assert {"torch", "numpy", "lossbalance", "python", "platform"} <= set(results["versions"])
    md = (out / "results.md").read_text()
    assert f"Command: `{command}`" in md
    for row in rows if table_rows is None else table_rows:
        assert f"| {row} |" in md
    assert (out / "metrics.png").read_bytes()[:8] == PNG_SIGNATURE
    return results


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in lossbalance.available_methods():
        info = lossbalance.get_method(name)
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert info.needs in line and info.paper.split()[0] in line
    assert "balanced-adam" in out and "mtadam-global-magnitude" in out


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--seeds", "2", "--epochs", "2", "--max-batches", "3", "--out", str(out)]
    assert main([*argv, "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| Balanced-Adam |" in printed and str(out / "summary.json") in printed
    rows = ["Balanced-Adam", "Unbalanced-Adam", "Unbalanced-MTAdam"]
    rows += ["Unbalanced-Uncertainty", "Unbalanced-IMTL-G"]  # a loss- and a gradient-level one
    results = _check_outputs(out, rows, "lossbalance " + " ".join([*argv, "--quiet"]))
    assert results["seeds"] == [0, 1]
    assert len(results["runs"]) == 10
    assert "**What this table shows.** Weighting the ten per-class terms" in printed
    assert all(len(r["history"]) == 3 for r in results["runs"])  # epochs 0, 1, 2
    mt = [r for r in results["runs"] if r["row"] == "Unbalanced-MTAdam"]
    assert (
        mt[0]["trace"]["magnitudes"] and (out / "magnitudes.png").read_bytes()[:8] == PNG_SIGNATURE
    )
    # every run is seeded: the same command gives the same numbers
    assert main([*argv[:-1], str(tmp_path / "again"), "--quiet", "--no-plots"]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again == json.loads((out / "summary.json").read_text())


def test_unknown_method_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--methods", "adam,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Unknown method 'nope'" in err
    for name in ("sgd-m", "rmsprop", "mtadam", "imtl-g"):
        assert name in err
    assert not (tmp_path / "summary.json").exists()
    assert main(["multimnist", "--methods", "balanced-adam", "--out", str(tmp_path)]) == 2
    assert "prefixes apply only" in capsys.readouterr().err


def test_missing_data_offline_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "nodata"
    argv = ["mnist", "--data-dir", str(empty), "--no-download", "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Put the four files" in err and str(empty / "mnist") in err
    assert "t10k-labels-idx1-ubyte.gz" in err


@pytest.mark.filterwarnings("ignore::lossbalance.LossBalanceWarning")  # classes absent
def test_mnist_end_to_end(tmp_path, capsys, mnist_args):
    out = tmp_path / "mnist"
    argv = [
        "mnist", *mnist_args, "--methods", "adam", "mtadam", "balanced-adam", "imtl-g",
        "--seeds", "1", "--batch-size", "16", "--max-batches", "1", "--test-limit", "50",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    rows = ["Unbalanced-Adam", "Unbalanced-MTAdam", "Balanced-Adam", "Unbalanced-IMTL-G"]
    results = _check_outputs(out, rows, "lossbalance " + " ".join(argv))
    assert results["config"]["loss_form"] == "paper" and results["config"]["test_size"] == 50
    assert all(r["steps"] == 1 for r in results["runs"])
    assert (out / "weights.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "88.8 ± 0.84" in (out / "results.md").read_text()  # the paper's column


def test_mnist_authors_form_reports_nan(tmp_path, capsys, mnist_args):
    out = tmp_path / "authors"
    argv = [
        "mnist", *mnist_args, "--methods", "adam,mtadam", "--loss-form", "authors",
        "--weights", "authors", "--seeds", "1", "--batch-size", "8", "--max-batches", "1",
        "--test-limit", "20", "--evals-per-epoch", "1", "--no-plots", "--out", str(out),
        "--quiet",
    ]  # fmt: skip
    with pytest.warns(lossbalance.LossBalanceWarning, match="skipped a step"):
        assert main(argv) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())["rows"]
    # a batch of 8 misses classes: the authors' form is NaN; Adam's weights turn NaN and
    # its accuracy is reported as NaN (null), MTAdam skips the step
    assert summary["Unbalanced-Adam"]["mean"] is None
    assert summary["Unbalanced-MTAdam"]["mean"] is not None
    results = json.loads((out / "results.json").read_text())
    assert [r["nonfinite_steps"] for r in results["runs"]] == [1, 1]
    assert [r["skipped_steps"] for r in results["runs"]] == [None, 1]
    assert "1 of 1 runs diverged" in (out / "results.md").read_text()


def test_ablation_rows(tmp_path, capsys):
    from lossbalance.experiments.mnist import default_methods

    assert default_methods(ablation=True)[0] == "mtadam" and len(default_methods(True)) == 6
    out = tmp_path / "abl"
    argv = ["demo", "--ablation", "--seeds", "1", "--epochs", "1", "--max-batches", "2"]
    assert main([*argv, "--no-plots", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())["rows"]
    assert list(summary) == [
        "Unbalanced-MTAdam",
        "Unbalanced-MTAdam (i) no normalization",
        "Unbalanced-MTAdam (ii) one global magnitude",
        "Unbalanced-MTAdam (iii) own magnitude, no anchor",
        "Unbalanced-MTAdam (iv) own second moment",
        "Unbalanced-MTAdam (v) mean of second moments",
    ]


def test_multimnist_end_to_end(tmp_path, capsys, mnist_args):
    out = tmp_path / "multi"
    argv = [
        "multimnist", *mnist_args, "--methods", "adam", "mtadam", "imtl",
        "--seeds", "1", "--epochs", "1", "--batch-size", "16", "--max-batches", "2",
        "--train-limit", "64", "--test-limit", "32", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "|Δ| left" in printed.replace("\\|", "|")
    rows = ["Adam", "MTAdam", "IMTL", "Adam [left x10]", "MTAdam [left x10]", "IMTL [left x10]"]
    command = "lossbalance " + " ".join(argv)
    results = _check_outputs(out, rows, command, table_rows=["Adam", "MTAdam", "IMTL"])
    assert results["config"]["groups"] == {"original": [1, 1, 1], "left x10": [10, 1, 1]}
    for method in ("Adam", "MTAdam", "IMTL"):
        delta = results["abs_delta"][method]
        metrics = results["task_metrics"][method]
        assert delta["left"] == pytest.approx(
            abs(metrics["left x10"]["left"]["mean"] - metrics["original"]["left"]["mean"])
        )
        assert results["time_per_iter_s"][method] > 0
    scaled = [r for r in results["runs"] if r["group"] == "left x10"]
    assert all(r["term_weights"] == [10.0, 1.0, 1.0] for r in scaled)


def _run_module(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "lossbalance", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_python_m_lossbalance(tmp_path, mnist_args):
    args = ["demo", "--seeds", "1", "--epochs", "1", "--max-batches", "2", "--out", "o"]
    proc = _run_module(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())["rows"]
    assert list(summary)[:3] == ["Balanced-Adam", "Unbalanced-Adam", "Unbalanced-MTAdam"]
    md = (tmp_path / "o" / "results.md").read_text()
    assert "Command: `python -m lossbalance demo --seeds 1" in md
    args = [
        "mnist", *mnist_args, "--methods", "adam", "--seeds", "1", "--batch-size", "16",
        "--max-batches", "1", "--test-limit", "20", "--no-plots", "--out", "m",
    ]  # fmt: skip
    proc = _run_module(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Unbalanced-Adam" in json.loads((tmp_path / "m" / "summary.json").read_text())["rows"]


def test_resume_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["demo", "--methods", "adam", "--epochs", "1", "--max-batches", "2", "--quiet"]
    base += ["--no-plots", "--out", str(out)]
    assert main([*base, "--seeds", "1"]) == 0
    first = json.loads((out / "results.json").read_text())["runs"]
    assert not (out / "runs.jsonl").exists()  # the checkpoint is folded into results.json

    # an interrupted command leaves only its checkpoint: resume from that
    (out / "runs.jsonl").write_text(
        json.dumps({"fingerprint": json.loads((out / "results.json").read_text())["fingerprint"],
                    "run": first[0]}) + "\n" + '{"truncated'
    )  # fmt: skip
    (out / "results.json").unlink()
    capsys.readouterr()
    assert main([*base, "--seeds", "2", "--resume"]) == 0
    assert "Resuming: 1 run(s)" in capsys.readouterr().out
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert runs[0] == first[0]  # reused as is (same timing), not trained again

    # other settings (here the learning rate) are neither mixed in nor silently dropped:
    # --resume refuses and names what differs; without --resume the runs are replaced
    capsys.readouterr()
    assert main([*base, "--seeds", "2", "--resume", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "results.json (2 run(s)): lr 0.001 -> 0.01" in err and "without --resume" in err
    assert json.loads((out / "results.json").read_text())["runs"] == runs  # untouched
    assert main([*base, "--seeds", "1", "--lr", "0.01"]) == 0
    assert "Resuming" not in capsys.readouterr().out


def test_report_only_writes_the_recorded_runs_and_trains_nothing(tmp_path, capsys):
    from lossbalance.cli import _config, build_parser
    from lossbalance.experiments.demo import DemoConfig
    from lossbalance.experiments.report import config_fingerprint

    base = ["demo", "--methods", "adam", "--epochs", "1", "--max-batches", "2", "--quiet"]
    base += ["--no-plots", "--seeds", "1"]
    trained = tmp_path / "trained"
    assert main([*base, "--out", str(trained)]) == 0
    (run,) = json.loads((trained / "results.json").read_text())["runs"]

    # runs checkpointed by an interrupted command on a CUDA machine, read back here: the
    # device is part of the settings, and need not be present for a report
    argv = [*base, "--device", "cuda", "--out", str(tmp_path / "gpu")]
    fingerprint = config_fingerprint(_config(build_parser().parse_args(argv), DemoConfig))
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    checkpoint = json.dumps({"fingerprint": fingerprint, "run": run}) + "\n"
    (gpu / "runs.jsonl").write_text(checkpoint)
    capsys.readouterr()
    assert main([*argv, "--report-only"]) == 0
    results = json.loads((gpu / "results.json").read_text())
    assert results["runs"] == [run]  # reused as is: nothing was trained
    assert results["config"]["device"] == "cuda"
    assert (gpu / "runs.jsonl").read_text() == checkpoint  # the input is kept
    assert "- Seeds 0..0 (1 per row); mean" in (gpu / "results.md").read_text()

    # a missing run is left out and listed, not trained here
    capsys.readouterr()
    assert main([*argv[:-4], "--seeds", "2", *argv[-4:], "--report-only"]) == 0
    err = capsys.readouterr().err
    assert "warning: --report-only: 1 requested run(s) not recorded" in err and "error" not in err
    results = json.loads((gpu / "results.json").read_text())
    assert results["runs"] == [run] and results["seeds"] == [0, 1]
    assert results["missing_runs"] == [{"row": "Unbalanced-Adam", "seed": 1}]
    assert results["summary"]["Unbalanced-Adam"]["n"] == 1
    table = (gpu / "results.md").read_text()
    assert "never recorded: Unbalanced-Adam, seed 1." in table
    assert "Seeds 0..1 (2 per row requested; 1 of the 2 runs are recorded" in table
    # a row without any recorded run is an error; the report is left as it was
    written = (gpu / "results.json").read_text()
    assert main([*argv[:2], "adam", "sgd-m", *argv[3:], "--report-only"]) == 1
    assert "no recorded run of 'Unbalanced-SGD-M'" in capsys.readouterr().err
    assert (gpu / "results.json").read_text() == written
    # a folder whose runs have other settings is refused, naming what differs (the
    # report would replace their results.json); an empty folder has no runs to report
    assert main([*base, "--lr", "0.5", "--out", str(gpu), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "lr 0.001 -> 0.5" in err
    assert (gpu / "results.json").read_text() == written
    assert main([*base, "--out", str(tmp_path / "empty"), "--report-only"]) == 1
    assert "no runs with these settings" in capsys.readouterr().err


def test_log_dir_writes_term_csv(tmp_path):
    out, logs = tmp_path / "demo", tmp_path / "logs"
    argv = ["demo", "--seeds", "1", "--epochs", "1", "--max-batches", "3", "--out", str(out)]
    assert main([*argv, "--quiet", "--no-plots", "--log-dir", str(logs)]) == 0
    files = sorted(p.name for p in logs.glob("*.csv"))
    assert files == [
        "Balanced-Adam-seed0.csv",
        "Unbalanced-Adam-seed0.csv",
        "Unbalanced-IMTL-G-seed0.csv",
        "Unbalanced-MTAdam-seed0.csv",
        "Unbalanced-Uncertainty-seed0.csv",
    ]
    lines = (logs / "Unbalanced-MTAdam-seed0.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[0] == "step" and sum(h.startswith("loss/") for h in header) == 10
    assert sum(h.startswith("magnitude/") for h in header) == 10
    assert len(lines) >= 3  # header and the traced steps


def _metrics_by_run(out: Path) -> dict:
    runs = json.loads((out / "results.json").read_text())["runs"]
    return {(r["group"], r["row"], r["seed"]): (r["final"], r["history"]) for r in runs}


def test_jobs_train_the_same_runs_in_parallel(tmp_path, capsys, mnist_args):
    # --jobs 2: each (method, seed) in a spawned process; every metric equals the
    # one-process command, the run order and the report are the same.
    base = [
        "multimnist", *mnist_args, "--methods", "adam", "mtadam", "--seeds", "2",
        "--epochs", "1", "--batch-size", "16", "--max-batches", "2", "--train-limit", "64",
        "--test-limit", "32", "--quiet", "--no-plots", "--threads", "1",
    ]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = _metrics_by_run(tmp_path / "one"), _metrics_by_run(tmp_path / "two")
    assert list(one) == list(two)
    for key in one:
        assert one[key] == two[key], key
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["config"]["jobs"] == 2
    assert (
        results["fingerprint"]
        == json.loads((tmp_path / "one" / "results.json").read_text())["fingerprint"]
    )
    assert "--jobs 2" in (tmp_path / "two" / "results.md").read_text()
    assert not (tmp_path / "two" / "runs.jsonl").exists()

    # a resumed parallel command reuses every finished run and trains nothing
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "two"), "--jobs", "2", "--resume"]) == 0
    assert "Resuming: 8 run(s)" in capsys.readouterr().out
    assert _metrics_by_run(tmp_path / "two") == two


def test_jobs_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--jobs", "0", "--out", str(tmp_path)])


def _read(pid: int, name: str) -> bytes:
    # /proc/<pid>/<name>, or b"" once the process is gone
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _read(int(entry.name), "stat")
            if stat and int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_jobs_workers_exit_with_the_parent(tmp_path):
    # a time limit that kills the command must not leave its workers training (on a GPU)
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    args = ["demo", "--jobs", "2", "--epochs", "500", "--quiet", "--out", str(tmp_path / "o")]
    proc = subprocess.Popen([sys.executable, "-m", "lossbalance", *args], env=env)
    try:
        deadline = time.monotonic() + 60
        workers: set[int] = set()
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            workers = {pid for pid in _children(proc.pid) if b"spawn_main" in _read(pid, "cmdline")}
        assert len(workers) >= 2, "the workers did not start"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

        def running(pid: int) -> bool:
            # a zombie (state Z, waiting for init to reap it) is gone for our purposes
            stat = _read(pid, "stat")
            return bool(stat) and b" Z " not in stat

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(running(w) for w in workers):
            time.sleep(0.2)
        alive = [w for w in workers if running(w)]
        assert not alive, f"workers {alive} outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
