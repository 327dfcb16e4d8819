"""Tests of the experiment package: idx reader, MultiMNIST, terms, harness, report writers."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lossbalance import LossBalanceWarning
from lossbalance.experiments import data as data_mod
from lossbalance.experiments.data import (
    ChecksumError,
    DatasetNotFoundError,
    IdxDataset,
    load_digits_data,
    locate_idx_files,
    make_multimnist,
    md5sum,
    read_idx,
)
from lossbalance.experiments.harness import TrainConfig, run_experiment, train_loop, train_run
from lossbalance.experiments.methods import resolve_method, resolve_methods
from lossbalance.experiments.mnist import class_terms_result
from lossbalance.experiments.models import DigitsMLP, MnistCNN, MultiMnistNet
from lossbalance.experiments.report import (
    PNG_SIGNATURE,
    format_mean_std,
    markdown_table,
    negative_projection_note,
    summarize,
    to_jsonable,
    write_json,
    write_report,
)
from lossbalance.experiments.tasks import ClassTermsTask, class_terms, draw_term_weights


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> Path:
    """Write ``array`` as an idx file (gzip-compressed when the name ends in .gz)."""
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wb") as f:
        f.write(payload)
    return path


def synthetic_mnist(root: Path, n_train: int = 300, n_test: int = 100) -> IdxDataset:
    """Random MNIST-format files under ``root/mnist``; returns their dataset description."""
    rng = np.random.default_rng(0)
    files = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        img = write_idx(
            root / "mnist" / f"{prefix}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        lab = write_idx(
            root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10
        )
        files[f"{split}-images"] = (img.name, md5sum(img))
        files[f"{split}-labels"] = (lab.name, md5sum(lab))
    return IdxDataset("mnist", files, ("http://127.0.0.1:9/",))


# --- idx reader -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize(
    ("type_code", "dtype"), [(0x08, np.uint8), (0x0C, np.int32), (0x0D, np.float32)]
)
def test_read_idx_round_trip(tmp_path, suffix, type_code, dtype):
    array = (np.arange(2 * 3 * 4) * 7 - 20).reshape(2, 3, 4)
    if dtype == np.uint8:
        array = np.abs(array) % 256
    array = array.astype(dtype)
    path = write_idx(tmp_path / f"x-idx3{suffix}", array, type_code)
    out = read_idx(path)
    assert out.shape == (2, 3, 4)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_checks_md5(tmp_path):
    path = write_idx(tmp_path / "labels.gz", np.arange(10, dtype=np.uint8))
    np.testing.assert_array_equal(read_idx(path, md5=md5sum(path)), np.arange(10))
    with pytest.raises(ChecksumError, match=r"md5 mismatch for .*labels\.gz: expected 0+, got"):
        read_idx(path, md5="0" * 32)


def test_read_idx_rejects_malformed_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(bad_magic)
    truncated = tmp_path / "short"
    truncated.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", 5) + b"\x00\x01")
    with pytest.raises(ValueError, match=r"declares shape \(5,\).*holds 2 bytes"):
        read_idx(truncated)


def test_locate_idx_files_finds_layouts_and_checks_md5(tmp_path):
    info = synthetic_mnist(tmp_path)
    found = locate_idx_files(info, tmp_path, download=False)
    assert set(found) == {"train-images", "train-labels", "test-images", "test-labels"}
    assert all(p.parent == tmp_path / "mnist" for p in found.values())
    # files directly in the data directory are found too
    flat = locate_idx_files(info, tmp_path / "mnist", download=False)
    assert flat["train-labels"].parent == tmp_path / "mnist"

    wrong = IdxDataset(
        "mnist", {**info.files, "test-labels": (info.files["test-labels"][0], "f" * 32)}, ()
    )
    with pytest.raises(ChecksumError, match=r"t10k-labels-idx1-ubyte\.gz: expected f+"):
        locate_idx_files(wrong, tmp_path, download=False)
    # --no-verify accepts a local copy with another md5
    assert locate_idx_files(wrong, tmp_path, download=False, verify=False)


def test_missing_data_offline_gives_clear_error(tmp_path):
    info = synthetic_mnist(tmp_path / "elsewhere")
    empty = tmp_path / "empty"
    with pytest.raises(DatasetNotFoundError) as excinfo:
        locate_idx_files(info, empty, download=False)
    message = str(excinfo.value)
    assert "Put the four files" in message
    assert str(empty / "mnist") in message
    assert "train-images-idx3-ubyte.gz" in message
    assert "--data-dir" in message
    # download attempted, but the (local, closed) mirror refuses: the reason is reported
    with pytest.raises(DatasetNotFoundError, match=r"127\.0\.0\.1:9"):
        locate_idx_files(info, empty, download=True, timeout=2)
    assert not list((empty / "mnist").glob("*.part"))


def test_load_idx_dataset_from_synthetic_files(tmp_path, monkeypatch):
    info = synthetic_mnist(tmp_path, n_train=50, n_test=20)
    monkeypatch.setitem(data_mod.DATASETS, "mnist", info)
    ds = data_mod.load_idx_dataset("mnist", tmp_path, download=False)
    assert ds.train_x.shape == (50, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_y.tolist() == [i % 10 for i in range(20)]
    small = ds.limit(10, 5)
    assert small.train_x.shape[0] == 10 and small.test_y.shape[0] == 5


def test_published_md5_table_matches_shared_readme():
    readme = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "README.md"
    if not readme.is_file():
        pytest.skip("no shared data README")
    text = readme.read_text()
    for name in ("mnist", "fashion-mnist"):
        for fname, md5 in data_mod.DATASETS[name].files.values():
            assert md5 in text, (name, fname)


# --- MultiMNIST ---------------------------------------------------------------------------


def test_make_multimnist_is_deterministic_and_places_digits():
    rng = np.random.default_rng(1)
    imgs = rng.integers(1, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20) % 10
    x1, y1 = make_multimnist(imgs, labels, seed=3)
    x2, y2 = make_multimnist(imgs, labels, seed=3)
    x3, _ = make_multimnist(imgs, labels, seed=4)
    assert x1.shape == (20, 36, 36) and x1.dtype == torch.uint8 and y1.shape == (20, 2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert y1[:, 0].tolist() == labels.tolist()
    # the left digit sits at the upper left, shifted by 4: its top-left 8x8 is untouched
    assert torch.equal(x1[:, :8, :8], torch.from_numpy(imgs[:, :8, :8]))
    # the right digit (a seeded permutation's partner) is shifted the other way
    perm = torch.from_numpy(np.random.default_rng(3).permutation(20))
    assert torch.equal(x1[:, 28:, 28:], torch.from_numpy(imgs)[perm][:, 20:, 20:])
    assert y1[:, 1].tolist() == labels[perm.numpy()].tolist()
    assert torch.all(x1[:, :8, 28:] == 0) and torch.all(x1[:, 28:, :8] == 0)
    with pytest.raises(ValueError, match=r"Invalid shift: 5 \(expected 0 <= shift <= 4"):
        make_multimnist(imgs, labels, shift=5)


# --- terms and models -----------------------------------------------------------------------


def test_paper_terms_sum_to_mean_nll_and_vanish_for_absent_class():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(8, 10, dtype=torch.float64), 1)
    target = torch.tensor([0, 1, 1, 2, 3, 3, 3, 9])
    terms = class_terms(logp, target, torch.ones(10, dtype=torch.float64), "paper")
    assert len(terms) == 10
    torch.testing.assert_close(torch.stack(terms).sum(), torch.nn.functional.nll_loss(logp, target))
    assert terms[5].item() == 0.0  # class 5 absent: defined, zero
    w = torch.arange(1, 11, dtype=torch.float64)
    weighted = class_terms(logp, target, w, "paper")
    torch.testing.assert_close(torch.stack(weighted), torch.stack(terms) * w)


def test_authors_terms_cancel_weights_and_are_nan_for_absent_class():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(8, 10, dtype=torch.float64), 1)
    target = torch.tensor([0, 1, 1, 2, 3, 3, 3, 9])
    w = torch.full((10,), 500.0, dtype=torch.float64)
    terms = class_terms(logp, target, w, "authors")
    nll = torch.nn.functional.nll_loss(logp, target, reduction="none")
    torch.testing.assert_close(terms[3], nll[target == 3].mean())  # w_3 divided back out
    assert math.isnan(terms[5].item())
    with pytest.raises(ValueError, match="Invalid loss form: 'x'"):
        class_terms(logp, target, w, "x")


def test_term_weights_per_scheme_and_seed():
    a, b = draw_term_weights(0, 10, "paper"), draw_term_weights(0, 10, "paper")
    assert torch.equal(a, b) and not torch.equal(a, draw_term_weights(1, 10, "paper"))
    assert a.min() >= 1 and a.max() <= 1000
    c = draw_term_weights(0, 10, "authors")
    assert c[0] == 1 and c[1:].min() >= 0 and c[1:].max() <= 1000


def test_model_shapes():
    assert MnistCNN()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in MnistCNN().fc1.parameters()) == 9216 * 128 + 128
    out = DigitsMLP()(torch.zeros(3, 64))
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3))
    z, heads = MultiMnistNet()(torch.zeros(2, 1, 36, 36))
    assert z.shape == (2, 64) and heads["left"].shape == (2, 10)
    assert heads["recon"].shape == (2, 1, 36, 36)


# --- methods --------------------------------------------------------------------------------


def test_resolve_method_names_and_labels():
    spec = resolve_method("Balanced_Adam", weighted=True)
    assert (spec.name, spec.label, spec.kind, spec.balanced) == (
        "balanced-adam",
        "Balanced-Adam",
        "optimizer",
        True,
    )
    assert resolve_method("mtadam", weighted=True).label == "Unbalanced-MTAdam"
    abl = resolve_method("mtadam-global-magnitude", weighted=True)
    assert abl.kind == "mtadam" and abl.options == {"grouping": "global"}
    assert resolve_method("adam", weighted=False).label == "Adam"
    specs = resolve_methods(["adam,mtadam", "adam"], weighted=True)
    assert [s.name for s in specs] == ["adam", "mtadam"]


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown method 'nope'\. Valid methods: sgd-m, .*mtadam"):
        resolve_method("nope", weighted=True)
    with pytest.raises(ValueError, match="prefixes apply only"):
        resolve_method("balanced-adam", weighted=False)


def test_method_needing_arguments_is_refused(monkeypatch):
    from lossbalance import _registry
    from lossbalance.experiments.methods import method_names

    def factory(num_terms, weights):  # like "fixed", which needs its weights
        raise AssertionError("never built")

    info = _registry.MethodInfo("needs-args", factory, "losses", False, "test", "test")
    monkeypatch.setitem(_registry._REGISTRY, "needs-args", info)
    with pytest.raises(ValueError, match="Invalid method 'needs-args': its constructor needs"):
        resolve_method("needs-args", weighted=True)
    assert "needs-args" not in method_names()


def test_all_expands_to_every_row():
    from lossbalance.experiments.mnist import expand_methods

    weighted = expand_methods(["all"], [])
    assert {"sgd-m", "rmsprop", "adam", "mtadam", "balanced-adam", "imtl-g"} <= set(weighted)
    assert "mtadam-mean-second-moment" in weighted and "fixed" not in weighted
    plain = expand_methods(["adam,all"], [], weighted=False)
    assert "balanced-adam" not in plain and plain[0] == "adam"
    assert resolve_methods(plain, weighted=False)
    assert expand_methods(None, ["x"]) == ["x"]


def test_registry_balancers_resolve():
    import lossbalance
    from lossbalance.experiments.methods import method_names

    for name in lossbalance.available_methods():
        if name not in method_names():  # needs constructor arguments ("fixed")
            continue
        spec = resolve_method(name, weighted=False)
        assert spec.kind in ("balancer", "mtadam", "registry-optimizer")


# --- harness ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits_data().limit(256, 120)


def _task(data, **kw):
    return ClassTermsTask("digits", data, lambda: DigitsMLP(64, 16), (64,), **kw)


def test_train_run_is_reproducible_and_seeds_share_term_weights(digits):
    cfg = TrainConfig(epochs=2, batch_size=32, max_batches=4, trace_points=5)
    task = _task(digits)
    adam = resolve_method("adam", weighted=True)
    r1 = train_run(task, adam, 3, cfg)
    r2 = train_run(task, adam, 3, cfg)
    assert r1["final"] == r2["final"] and r1["trace"] == r2["trace"]
    assert r1["steps"] == 8 and len(r1["history"]) == 3  # before training + once per epoch
    assert [h["epoch"] for h in r1["history"]] == [0.0, 1.0, 2.0]
    other = train_run(task, resolve_method("mtadam", weighted=True), 3, cfg)
    assert other["term_weights"] == r1["term_weights"]
    assert (
        train_run(task, resolve_method("balanced-adam", weighted=True), 3, cfg)["term_weights"]
        == [1.0] * 10
    )


def test_mtadam_and_balancer_runs_record_traces(digits):
    cfg = TrainConfig(epochs=1, batch_size=32, max_batches=3, trace_points=3, progress=True)
    task = _task(digits)
    runs = run_experiment(
        [(None, task)],
        resolve_methods(["mtadam", "imtl-g", "uncertainty"], weighted=True),
        [0],
        cfg,
    )
    mt, imtl, unc = runs
    assert mt["skipped_steps"] == 0
    assert mt["negative_projection_steps"] is None and unc["negative_projection_steps"] is None
    assert isinstance(imtl["negative_projection_steps"], int)
    assert 0 <= imtl["negative_projection_steps"] <= imtl["steps"]
    assert len(imtl["negative_projection_at"]) == imtl["negative_projection_steps"]
    assert mt["negative_projection_at"] is None
    assert mt["trace"]["magnitudes"] and len(mt["trace"]["magnitudes"][0]) == 10
    assert imtl["trace"]["weights"] and len(imtl["trace"]["weights"][-1]) == 10
    assert unc["trace"]["weights"]
    for run in runs:
        assert all(math.isfinite(v) for v in run["final"].values())
        assert run["time_per_iter_s"] > 0


class _CountingStepper:
    """A stepper whose negative-projection counter rises at given steps (twice at one)."""

    def __init__(self, rises: dict[int, int] | None) -> None:
        self.rises, self.count, self.steps = rises, 0, 0

    def step(self, terms, features):
        self.steps += 1
        self.count += (self.rises or {}).get(self.steps, 0)

    def weights(self):
        return None

    def magnitudes(self):
        return None

    def skipped_steps(self):
        return None

    def negative_projection_steps(self):
        return None if self.rises is None else self.count


@pytest.mark.parametrize("rises", [None, {}, {2: 1, 5: 2, 7: 1}])
def test_train_loop_records_the_negative_projection_steps(rises):
    stepper = _CountingStepper(rises)

    def step(index):
        stepper.step([], None)
        return torch.ones(2)

    cfg = TrainConfig(epochs=2, batch_size=4, trace_points=3)
    record = train_loop(
        16,
        step,
        lambda: {"acc": 0.0},
        stepper,
        resolve_method("imtl-g", weighted=True),
        0,
        torch.ones(2),
        cfg,
        metric="acc",
    )
    assert record["steps"] == 8
    if rises is None:
        assert record["negative_projection_steps"] is None
        assert record["negative_projection_at"] is None
    else:
        assert record["negative_projection_steps"] == sum(rises.values())
        assert record["negative_projection_at"] == [
            s for s in sorted(rises) for _ in range(rises[s])
        ]


def test_nan_terms_are_reported_honestly(digits):
    # batches of 4 miss most classes: the authors' loss form is NaN on every step
    cfg = TrainConfig(epochs=1, batch_size=4, max_batches=3)
    task = _task(digits, loss_form="authors", weight_scheme="authors")
    with pytest.warns(LossBalanceWarning, match="skipped a step"):
        adam, mt = run_experiment(
            [(None, task)], resolve_methods(["adam", "mtadam"], weighted=True), [0], cfg
        )
    assert adam["nonfinite_steps"] == 3
    assert math.isnan(adam["final"]["test_accuracy"])  # diverged, not "chance level"
    assert mt["nonfinite_steps"] == 3 and mt["skipped_steps"] == 3
    assert math.isfinite(mt["final"]["test_accuracy"])


# --- report writers ----------------------------------------------------------------------------


def test_summarize_and_format():
    s = summarize([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "n": 3}
    assert summarize([5.0]) == {"mean": 5.0, "std": None, "n": 1}
    assert math.isnan(summarize([1.0, float("nan")])["mean"])
    assert format_mean_std(s) == "2.00 ± 1.00"
    assert format_mean_std(summarize([5.0])) == "5.00"
    assert format_mean_std({"mean": float("nan"), "std": 0, "n": 2}) == "NaN"


def test_json_writer_is_strict(tmp_path):
    obj = {"a": float("nan"), "b": [1, np.float32(2.5), torch.tensor([1.0, float("inf")])]}
    assert to_jsonable(obj) == {"a": None, "b": [1, 2.5, [1.0, None]]}
    path = write_json(tmp_path / "x" / "y.json", {"p": tmp_path, "t": (1, 2), **obj})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {
        "p": str(tmp_path),
        "t": [1, 2],
        "a": None,
        "b": [1, 2.5, [1.0, None]],
    }


def test_negative_projection_note():
    runs = [
        {"row": "imtl", "seed": 1, "negative_projection_steps": 2},
        {"row": "imtl", "seed": 0, "negative_projection_steps": 0},
        {"row": "adam", "seed": 0, "negative_projection_steps": None},
        {"row": "imtl [x10]", "seed": 0},  # recorded before the count
        {"row": "imtl [x10]", "seed": 1, "negative_projection_steps": 5},
    ]
    (note,) = negative_projection_note(["adam", "imtl", "imtl [x10]"], runs)
    assert note.endswith(": imtl: 0, 2; imtl [x10]: -, 5.")
    assert negative_projection_note(["adam", "imtl"], runs[2:4]) == []


def test_markdown_table():
    table = markdown_table(["Method", "acc"], [["a|b", 1.5], ["c", "2"]])
    assert table.splitlines() == [
        "| Method | acc |",
        "| :--- | ---: |",
        "| a\\|b | 1.5 |",
        "| c | 2 |",
    ]
    with pytest.raises(ValueError, match="has 1 cells, expected 2"):
        markdown_table(["a", "b"], [["x"]])


def test_write_report_contents(tmp_path, digits):
    cfg = TrainConfig(epochs=1, batch_size=32, max_batches=2, evals_per_epoch=2)
    specs = resolve_methods(["balanced-adam", "mtadam"], weighted=True)
    runs = run_experiment([(None, _task(digits))], specs, [0, 1], cfg)
    result = class_terms_result("demo", "A title", {"lr": 1e-3}, specs, [0, 1], runs)
    paths = write_report(result, tmp_path / "out", "lossbalance demo --seeds 2")
    names = ["magnitudes.png", "metrics.png", "results.json", "results.md", "summary.json"]
    assert sorted(p.name for p in paths) == names  # MTAdam's magnitudes; no balancer weights

    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["metric"] == "test_accuracy" and written["metric_label"] == "test accuracy (%)"
    summary = written["rows"]
    assert list(summary) == ["Balanced-Adam", "Unbalanced-MTAdam"]
    for row, stats in summary.items():
        assert set(stats) == {"mean", "std", "n"} and stats["n"] == 2
        accs = [r["final"]["test_accuracy"] for r in runs if r["row"] == row]
        assert stats["mean"] == pytest.approx(np.mean(accs))
        assert stats["std"] == pytest.approx(np.std(accs, ddof=1))

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["command"] == "lossbalance demo --seeds 2"
    assert results["seeds"] == [0, 1] and results["config"] == {"lr": 1e-3}
    for key in ("torch", "numpy", "lossbalance", "python", "platform"):
        assert results["versions"][key]
    assert len(results["runs"]) == 4
    run = results["runs"][0]
    assert [h["epoch"] for h in run["history"]] == [0.0, 0.5, 1.0]
    assert {"test_accuracy", "test_loss"} <= set(run["history"][-1])
    assert results["runs"][2]["trace"]["magnitudes"]

    md = (tmp_path / "out" / "results.md").read_text()
    assert md.splitlines()[0] == "# A title"
    assert "Command: `lossbalance demo --seeds 2`" in md.split("|")[0]
    assert "| Balanced-Adam | " + format_mean_std(summary["Balanced-Adam"]) + " | 2 |" in md

    for name in ("metrics.png", "magnitudes.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_SIGNATURE


def test_row_labels_follow_the_papers_and_name_their_method():
    # one scheme everywhere: the papers' spellings, with or without the weighting prefix
    import lossbalance
    from lossbalance.experiments.methods import LABELS, method_names

    assert resolve_method("imtl-g", weighted=True).label == "Unbalanced-IMTL-G"
    assert resolve_method("nash-mtl", weighted=False).label == "Nash-MTL"
    assert resolve_method("balanced-imtl-g", weighted=True).label == "Balanced-IMTL-G"
    for name in lossbalance.available_methods():
        assert name in LABELS, f"{name} has no row label"
        if name in method_names():
            # a label is itself a valid --methods name, naming the same method
            assert resolve_method(LABELS[name], weighted=False).base == name


def test_recorded_rows_are_read_under_the_current_labels():
    from lossbalance.experiments.methods import canonical_row

    assert canonical_row("Unbalanced-imtl-g") == "Unbalanced-IMTL-G"
    assert canonical_row("nash-mtl [mnist]") == "Nash-MTL [mnist]"
    assert canonical_row("Balanced-Adam") == "Balanced-Adam"
    assert canonical_row("MTAdam (i) no normalization") == "MTAdam (i) no normalization"
    assert canonical_row("IMTL-G [toy]") == "IMTL-G [toy]"
