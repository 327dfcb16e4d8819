"""Long runs of the command line are safe: a plan first, bad paths and devices refused
before anything trains, Ctrl-C without a traceback, resumes that never drop recorded runs,
atomic results, robust checkpoints, no stale plots, one-line data errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lossbalance.cli import main
from lossbalance.experiments import harness
from lossbalance.experiments.data import (
    DATASETS,
    ChecksumError,
    DataFileError,
    DatasetNotFoundError,
    IdxDataset,
    locate_idx_files,
    read_idx,
)
from lossbalance.experiments.report import (
    CHECKPOINT,
    RecordedElsewhere,
    append_checkpoint,
    load_previous_runs,
    write_json,
)

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
TINY = ["demo", "--methods", "adam", "--epochs", "1", "--max-batches", "2", "--quiet"]


def no_training(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a run started although the command should have been refused")

    monkeypatch.setattr(harness, "train_run", refuse)


def test_plan_and_estimate_are_printed_before_and_during_training(tmp_path, capsys):
    argv = [*TINY, "--max-batches", "10", "--seeds", "2", "--no-plots", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    plan = next(line for line in out.splitlines() if line.startswith("Plan:"))
    assert "1 rows x 2 seeds = 2 runs (2 to train)" in plan and "Rows: adam" in plan
    assert "at most 10 steps per epoch, on cpu" in plan
    estimate = next(line for line in out.splitlines() if line.startswith("Estimate"))
    assert estimate.startswith("Estimate from the first 10 steps of the first run: 10 steps")
    assert "for the 2 run(s) to train" in estimate
    assert out.index("Plan:") < out.index("Estimate") < out.index("| Method")


def test_help_shows_the_real_default_rows(capsys):
    with pytest.raises(SystemExit):
        main(["mnist", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: " in text and "rows (sgd-m, rmsprop, adam, mtadam, balanced-adam" in text
    assert "with --ablation 6 rows (mtadam, mtadam-no-normalization" in text


@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:x", "gpu"])
def test_an_unusable_device_is_a_one_line_error(device, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    assert main([*TINY, "--device", device, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"Invalid device: {device!r}" in err


def test_unusable_paths_are_refused_before_training(tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [
        (["--out", str(a_file)], "exists and is not a folder"),
        (["--out", "/proc/x"], "cannot write there"),
        (["--out", str(tmp_path / "ok"), "--log-dir", str(a_file)], "--log-dir"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((["--out", str(locked / "sub")], "cannot write there"))
    try:
        for extra, message in cases:
            assert main([*TINY, *extra]) == 2, extra
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and message in err, err
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--first-seed", "-5"], "Invalid first_seed: -5"),
        (["--lr", "inf"], "Invalid lr: inf"),
        (["--lr", "nan"], "Invalid lr: nan"),
    ],
)
def test_bad_values_are_refused(extra, message, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    assert main([*TINY, *extra, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_ctrl_c_says_what_was_saved_and_how_to_resume(tmp_path, capsys, monkeypatch):
    real = harness.train_run
    calls = []

    def interrupted_second_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "train_run", interrupted_second_run)
    argv = [*TINY, "--seeds", "3", "--no-plots", "--out", str(tmp_path)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"lossbalance: error: interrupted: 1 of 3 runs saved in {tmp_path / CHECKPOINT}; "
        "rerun the same command with --resume to train the rest"
    ]
    monkeypatch.setattr(harness, "train_run", real)
    assert main([*argv, "--resume"]) == 0
    assert "Resuming: 1 run(s)" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 3


def test_checkpoint_lines_that_cannot_be_read_are_skipped_with_a_warning(tmp_path, capsys):
    argv = [*TINY, "--seeds", "1", "--no-plots", "--out", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (tmp_path / "results.json").unlink()
    good = json.dumps({"fingerprint": results["fingerprint"], "run": results["runs"][0]})
    lines = [
        b"[1, 2]",
        b'{"fingerprint": "x", "run": {"row": "adam"}}',
        b"\xff\xfe bytes",
        good.encode(),
    ]
    (tmp_path / CHECKPOINT).write_bytes(b"\n".join(lines) + b"\n")
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "Resuming: 1 run(s)" in captured.out
    for number, why in [(1, "not a JSON object of a run"), (2, "the run lacks"), (3, "not UTF-8")]:
        assert f"{CHECKPOINT} line {number}: skipped, {why}" in captured.err


def test_a_record_after_a_cut_off_line_starts_on_a_fresh_line(tmp_path):
    run = {"group": None, "row": "A", "seed": 0, "final": {"x": 1.0}, "history": []}
    (tmp_path / CHECKPOINT).write_text('{"fingerprint": "f", "run": {"row": "cut')  # no newline
    append_checkpoint(tmp_path, "f", run)
    problems: list[RecordedElsewhere] = []
    runs = load_previous_runs(tmp_path, "f", problems=problems)
    assert list(runs) == ["None|A|0"]
    assert [p.where for p in problems] == [f"{CHECKPOINT} line 1"]


def test_results_are_written_atomically(tmp_path, monkeypatch):
    path = write_json(tmp_path / "results.json", {"runs": [1]})
    before = path.read_text()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_json(path, {"runs": [1, 2]})
    assert path.read_text() == before  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left


def test_no_plots_removes_the_plots_of_an_earlier_command(tmp_path):
    argv = [*TINY, "--seeds", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert (tmp_path / "metrics.png").is_file()
    assert main([*argv, "--no-plots"]) == 0
    assert not list(tmp_path.glob("*.png"))


def test_a_failed_download_leaves_no_empty_dataset_folder(tmp_path):
    info = IdxDataset("mnist", DATASETS["mnist"].files, ((tmp_path / "nowhere").as_uri() + "/",))
    with pytest.raises(DatasetNotFoundError):
        locate_idx_files(info, tmp_path / "data", download=True, timeout=1.0)
    assert not (tmp_path / "data" / "mnist").exists()


def test_broken_files_give_errors_that_name_them(tmp_path, write_idx):
    import numpy as np

    truncated = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(truncated, np.zeros((4, 28, 28)))
    truncated.write_bytes(truncated.read_bytes()[:-12])
    with pytest.raises(DataFileError, match=r"train-images-idx3-ubyte\.gz is not a complete gzip"):
        read_idx(truncated)
    not_gzip = tmp_path / "t10k-labels-idx1-ubyte.gz"
    not_gzip.write_bytes(b"plain text, not gzip")
    with pytest.raises(DataFileError, match=r"t10k-labels-idx1-ubyte\.gz is not a complete gzip"):
        read_idx(not_gzip)


def test_foreign_labels_with_no_verify_are_one_line_errors(tmp_path, write_idx, capsys):
    import numpy as np

    data = tmp_path / "data" / "mnist"
    for split, n in (("train", 64), ("t10k", 32)):
        write_idx(data / f"{split}-images-idx3-ubyte.gz", np.zeros((n, 28, 28)))
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", np.full(n, 12))  # not digits
    argv = ["mnist", "--methods", "adam", "--seeds", "1", "--max-batches", "1", "--quiet"]
    argv += ["--data-dir", str(tmp_path / "data"), "--no-download", "--no-verify"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "labels must lie in 0..9, found 12..12" in err


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="needs ../shared/data/mnist")
@pytest.mark.parametrize("verify", [True, False])
def test_a_mix_up_of_data_sets_is_named(verify):
    with pytest.raises(
        ChecksumError, match=r"is mnist's train-images-idx3-ubyte\.gz, not fashion-mnist's"
    ):
        locate_idx_files("fashion-mnist", SHARED_MNIST, download=False, verify=verify)


def test_resume_reads_runs_recorded_under_the_old_row_labels(tmp_path):
    # rows were once labelled by registry name ("imtl-g [energy]"); such records must
    # resume under the current label ("IMTL-G [energy]") instead of being trained again
    from lossbalance.experiments.bench import BenchConfig
    from lossbalance.experiments.report import config_fingerprint, fingerprinted_settings

    cfg = BenchConfig(benchmarks=["energy"])
    fingerprint, settings = config_fingerprint(cfg), fingerprinted_settings(cfg)
    run = {"group": "energy", "row": "imtl-g [energy]", "seed": 0, "final": {"x": 1.0}}
    append_checkpoint(tmp_path, fingerprint, dict(run, history=[]), settings=settings)
    runs = load_previous_runs(tmp_path, fingerprint, settings=settings)
    assert list(runs) == ["energy|IMTL-G [energy]|0"]
    assert runs["energy|IMTL-G [energy]|0"]["row"] == "IMTL-G [energy]"


def test_bench_resume_reuses_runs_recorded_with_another_list_of_benchmarks(tmp_path):
    # the bench keys each run by its benchmark: a folder trained with --benchmarks toy energy
    # must resume under --benchmarks toy energy multimnist (the list used to be fingerprinted)
    from lossbalance.experiments.bench import BenchConfig
    from lossbalance.experiments.report import config_fingerprint, fingerprinted_settings

    old = fingerprinted_settings(BenchConfig(benchmarks=["toy", "energy"]))
    old["benchmarks"] = ["toy", "energy"]  # as a record written before the change holds it
    run = {"group": "energy", "row": "A", "seed": 0, "final": {"x": 1.0}, "history": []}
    append_checkpoint(tmp_path, "old-fingerprint", run, settings=old)
    other = dict(old, lr=0.5)
    append_checkpoint(tmp_path, "other", dict(run, seed=1), settings=other)
    new = BenchConfig(benchmarks=["toy", "energy", "multimnist"])
    problems: list[RecordedElsewhere] = []
    runs = load_previous_runs(
        tmp_path, config_fingerprint(new), settings=fingerprinted_settings(new), problems=problems
    )
    assert list(runs) == ["energy|A|0"]
    assert len(problems) == 1 and "lr 0.5 -> 0.001" in problems[0].why


def test_a_run_of_some_rows_keeps_the_other_recorded_rows(tmp_path):
    # a --resume with fewer --methods (or --benchmarks) used to write a results.json of its
    # own rows only and delete the checkpoint: the other recorded runs were lost
    out = tmp_path / "demo"
    tiny = ["demo", "--seeds", "1", "--epochs", "1", "--max-batches", "2", "--quiet"]
    tiny += ["--no-plots", "--out", str(out)]
    assert main([*tiny, "--methods", "adam", "mtadam"]) == 0
    assert main([*tiny, "--methods", "adam", "--resume"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert {r["row"] for r in data["runs"]} == {"Unbalanced-Adam"}
    lines = (out / CHECKPOINT).read_text().splitlines()
    assert [json.loads(line)["run"]["row"] for line in lines] == ["Unbalanced-MTAdam"]
    # and a later run of both rows reports both without training either again
    assert main([*tiny, "--methods", "adam", "mtadam", "--report-only"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert {r["row"] for r in data["runs"]} == {"Unbalanced-Adam", "Unbalanced-MTAdam"}
