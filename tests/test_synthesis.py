"""Image-synthesis experiments: metrics against hand-computed values, the classifier cache,
the networks' shapes, and ``lossbalance pix2pix`` / ``srgan`` / ``cyclegan`` end to end on
tiny slices.

MNIST and Fashion-MNIST come from ``<repo>/../shared/data`` when present, else from tiny
synthetic idx files (then ``--no-verify``). Every run here is CPU-only and offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lossbalance.cli import main
from lossbalance.experiments.data import ClassificationData
from lossbalance.experiments.report import PNG_SIGNATURE, decode_images, encode_images
from lossbalance.experiments.synthesis import (
    ClassifierConfig,
    FashionClassifier,
    FrechetScorer,
    PatchDiscriminator,
    ResnetGenerator,
    SRDiscriminator,
    SRGenerator,
    UNetGenerator,
    feature_statistics,
    frechet_distance,
    gaussian_window,
    image_errors,
    load_or_train_classifier,
    pick_samples,
    psnr,
    sobel_edges,
    ssim,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def fashion_args(tmp_path_factory, write_idx) -> list[str]:
    """``--data-dir`` (plus ``--no-verify`` for synthetic files) and a fresh ``--cache-dir``."""
    cache = tmp_path_factory.mktemp("cache")
    names = ("mnist", "fashion-mnist")
    if all((SHARED_DATA / n / "train-images-idx3-ubyte.gz").is_file() for n in names):
        return ["--data-dir", str(SHARED_DATA), "--no-download", "--cache-dir", str(cache)]
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name in names:
        for prefix, n in (("train", 300), ("t10k", 100)):
            images = np.zeros((n, 28, 28), dtype=np.uint8)
            images[:, 6:22, 8:20] = rng.integers(60, 256, (n, 16, 12))  # an object-like block
            write_idx(root / name / f"{prefix}-images-idx3-ubyte.gz", images)
            write_idx(root / name / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return ["--data-dir", str(root), "--no-download", "--no-verify", "--cache-dir", str(cache)]


# ----------------------------------------------------------------------------- metrics


def test_psnr_of_a_known_mse():
    y = torch.zeros(2, 1, 8, 8)
    x = torch.full_like(y, 0.1)  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    x[1] = 0.01  # MSE 1e-4 -> 40 dB
    assert psnr(x, y).tolist() == pytest.approx([20.0, 40.0], rel=1e-5)
    # data range 2 (images in [-1, 1]): 10 log10(4 / 0.01)
    assert float(psnr(x[:1], y[:1], data_range=2.0)) == pytest.approx(10 * math.log10(400.0))
    assert math.isinf(float(psnr(y[:1], y[:1])))
    with pytest.raises(ValueError, match="tensors of one shape"):
        psnr(x, y[:, :, :4])
    with pytest.raises(ValueError, match="Invalid data_range: 0"):
        psnr(x, y, data_range=0)


def test_image_errors_by_hand():
    y = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # energy 2
    x = torch.tensor([[[[0.5, 0.0], [0.0, 1.0]]]])  # one error of 0.5
    e = image_errors(x, y)
    assert float(e["l1"]) == pytest.approx(0.5 / 4)
    assert float(e["l2"]) == pytest.approx(0.25 / 4)
    assert float(e["nmse"]) == pytest.approx(0.25 / 2)


def test_ssim_of_identical_images_is_one_and_falls_with_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 28, 28, generator=gen)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-10)
    scores = []
    for sigma in (0.02, 0.1, 0.3):
        noisy = (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        scores.append(float(ssim(noisy, x).mean()))
    assert 1.0 > scores[0] > scores[1] > scores[2]
    # symmetric, and a constant shift of a flat image only changes the luminance term
    assert ssim(x, x.flip(0)).tolist() == pytest.approx(ssim(x.flip(0), x).tolist())
    a, b = torch.full((1, 1, 11, 11), 0.2), torch.full((1, 1, 11, 11), 0.6)
    c1 = 0.01**2
    assert float(ssim(a, b)) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1))
    with pytest.raises(ValueError, match="smaller than the 11-pixel window"):
        ssim(x[..., :8, :8], x[..., :8, :8])


def test_gaussian_window():
    w = gaussian_window(11, 1.5, dtype=torch.float64)
    assert float(w.sum()) == pytest.approx(1.0)
    assert int(w.argmax()) == 5 and torch.allclose(w, w.flip(0))
    with pytest.raises(ValueError, match="Invalid window size: 4"):
        gaussian_window(4)


def _sqrtm_trace_reference(s1: np.ndarray, s2: np.ndarray) -> float:
    # tr (S1 S2)^{1/2} from the (real, nonnegative) eigenvalues of the product
    ev = np.linalg.eigvals(s1 @ s2)
    return float(np.sqrt(np.clip(ev.real, 0, None)).sum())


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    f = torch.tensor(rng.normal(size=(500, 6)))
    mu, sigma = feature_statistics(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    # diagonal covariances: |mu1 - mu2|^2 + sum_k (sqrt(s1_k) - sqrt(s2_k))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    d1, d2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    expected = 1.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    got = frechet_distance(mu1, torch.diag(d1), mu2, torch.diag(d2))
    assert got == pytest.approx(expected, rel=1e-10)
    # commuting covariances S2 = c S1: tr(S1) (1 - sqrt(c))^2
    a = torch.tensor(rng.normal(size=(4, 4)))
    s1 = a @ a.T + 0.1 * torch.eye(4, dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)
    assert frechet_distance(zero, s1, zero, 9 * s1) == pytest.approx(
        float(torch.trace(s1)) * (1 - 3) ** 2, rel=1e-9
    )
    # general covariances: against an independent eigenvalue computation
    b = torch.tensor(rng.normal(size=(4, 4)))
    s2 = b @ b.T
    m1, m2 = torch.tensor(rng.normal(size=4)), torch.tensor(rng.normal(size=4))
    ref = float((m1 - m2).pow(2).sum() + torch.trace(s1) + torch.trace(s2))
    ref -= 2 * _sqrtm_trace_reference(s1.numpy(), s2.numpy())
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)
    # rank-deficient covariance (fewer samples than dimensions) stays finite and >= 0
    few = feature_statistics(torch.tensor(rng.normal(size=(3, 6))))
    assert 0 <= frechet_distance(*few, mu, sigma) < math.inf
    with pytest.raises(ValueError, match=r"expected \(D,\), \(D, D\) twice"):
        frechet_distance(mu1, torch.eye(2), mu2, torch.eye(2))


def test_frechet_scorer_of_the_reference_is_zero():
    torch.manual_seed(0)
    images = torch.rand(40, 1, 28, 28)
    scorer = FrechetScorer(images, FashionClassifier().eval(), batch_size=16)
    assert scorer(images) == pytest.approx(0.0, abs=1e-6)
    assert scorer(images.flip(-1)) > 0
    images[0, 0, 0, 0] = float("nan")
    assert math.isnan(scorer(images))


# ----------------------------------------------------------------------------- data, networks


def test_sobel_edges_of_a_square():
    img = torch.zeros(2, 10, 10, dtype=torch.uint8)
    img[0, 3:7, 3:7] = 255
    edges = sobel_edges(img, 0.25)
    assert edges.dtype == torch.uint8 and set(edges.unique().tolist()) <= {0, 255}
    assert edges[0, 5, 5] == 0 and edges[0, 0, 0] == 0  # flat inside and outside
    assert edges[0, 3, 5] == 255 and edges[0, 5, 2] == 255  # on the border
    assert int(edges[1].sum()) == 0  # a blank image has no edges
    with pytest.raises(ValueError, match=r"Invalid threshold: 1\.5"):
        sobel_edges(img, 1.5)


def test_network_shapes():
    torch.manual_seed(0)
    g = UNetGenerator(1, 1, width=8)
    out = g(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 1, 32, 32) and out.abs().max() <= 1
    assert PatchDiscriminator(2, width=8)(out, out).shape == (2, 1, 6, 6)
    with pytest.raises(ValueError, match="divisible by 32"):
        g(torch.randn(2, 1, 28, 28))
    sr = SRGenerator(4, width=8, blocks=1)
    assert sr(torch.randn(2, 1, 7, 7)).shape == (2, 1, 28, 28)
    assert SRDiscriminator(width=8)(torch.randn(3, 1, 28, 28)).shape == (3,)
    with pytest.raises(ValueError, match="Invalid scale: 3"):
        SRGenerator(3)
    cyc = ResnetGenerator(width=4, blocks=1)
    assert cyc(torch.randn(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    assert PatchDiscriminator(1, width=8)(torch.randn(2, 1, 28, 28)).shape == (2, 1, 5, 5)
    c = FashionClassifier()
    x = torch.rand(2, 1, 28, 28)
    assert c.feature_maps(x).shape == (2, 64, 7, 7) and c.features(x).shape == (2, 128)


def test_pick_samples_and_image_codec():
    labels = torch.tensor([3, 3, 1, 0, 1, 2])
    assert pick_samples(labels, 5).tolist() == [3, 2, 5, 0, 1]
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    blob = json.loads(json.dumps(encode_images(images)))
    assert np.array_equal(decode_images(blob), images)


def _tiny_data(n: int = 64, seed: int = 0) -> ClassificationData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 10
    return ClassificationData(x, y, x[:16], y[:16], 0.0, 1.0, 255.0)


def test_classifier_is_cached_and_reused(tmp_path):
    data = _tiny_data()
    cfg = ClassifierConfig(epochs=1, batch_size=32)
    model, info = load_or_train_classifier(data, tmp_path, cfg=cfg)
    assert info["trained"] and Path(info["path"]).is_file()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    mtime = Path(info["path"]).stat().st_mtime_ns
    again, info2 = load_or_train_classifier(data, tmp_path, cfg=cfg)
    assert not info2["trained"] and info2["key"] == info["key"]
    assert info2["test_accuracy"] == info["test_accuracy"]
    assert info2["weights_sha256"] == info["weights_sha256"]
    assert Path(info["path"]).stat().st_mtime_ns == mtime
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # another configuration, or other training data, is another classifier
    _, other = load_or_train_classifier(data, tmp_path, cfg=ClassifierConfig(epochs=2))
    _, other_data = load_or_train_classifier(_tiny_data(seed=1), tmp_path, cfg=cfg)
    assert len({info["key"], other["key"], other_data["key"]}) == 3
    assert other["trained"] and other_data["trained"]
    with pytest.raises(ValueError, match="Invalid classifier epochs: 0"):
        load_or_train_classifier(data, tmp_path, cfg=ClassifierConfig(epochs=0))


def test_classifier_weights_do_not_depend_on_the_thread_count(tmp_path):
    # CPU kernels reduce in an order that depends on the thread count; the cached
    # classifier (and so every FD value) must not depend on --threads, --jobs or the cores
    data = _tiny_data(256)
    cfg = ClassifierConfig(epochs=2, batch_size=64)
    threads = torch.get_num_threads()
    digests = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            _, info = load_or_train_classifier(data, tmp_path / str(n), cfg=cfg)
            assert info["trained"]
            digests.append(info["weights_sha256"])
            assert torch.get_num_threads() == n  # restored after training
    finally:
        torch.set_num_threads(threads)
    assert len(set(digests)) == 1


# ----------------------------------------------------------------------------- end to end

_TINY = [
    "--seeds", "1", "--epochs", "1", "--batch-size", "8", "--max-batches", "2",
    "--train-limit", "64", "--test-limit", "32", "--classifier-train-limit", "256",
    "--classifier-epochs", "1", "--samples", "4", "--device", "cpu", "--threads", "1",
    "--quiet",
]  # fmt: skip


def _check(out: Path, rows: list[str], command: str, metric: str) -> dict:
    summary = json.loads((out / "summary.json").read_text())["rows"]
    assert list(summary) == rows
    for stats in summary.values():
        assert set(stats) == {"mean", "std", "n"} and stats["n"] == 1
        assert isinstance(stats["mean"], float) and stats["std"] is None
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == command and results["metric"] == metric
    assert {"torch", "numpy", "lossbalance"} <= set(results["versions"])
    md = (out / "results.md").read_text()
    assert f"Command: `{command}`" in md
    for row in rows:
        assert f"| {row} |" in md
        run = next(r for r in results["runs"] if r["row"] == row)
        assert run["final"][metric] == pytest.approx(summary[row]["mean"])
        assert run["steps"] == 2 and len(run["history"]) == 2  # before and after the epoch
        assert decode_images(run["samples"]).shape == (4, 28, 28)
    for name in ("metrics.png", "losses.png", "samples.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    assert "FD-FMNIST" in md and "not FID" in md
    return results


def test_pix2pix_end_to_end(tmp_path, capsys, fashion_args):
    out = tmp_path / "p2p"
    argv = ["pix2pix", *fashion_args, "--methods", "balanced-adam,sgd-m,mtadam", "--width", "8"]
    argv += [*_TINY, "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Balanced-Adam |" in printed and str(out / "samples.png") in printed
    rows = ["Balanced-Adam", "Unbalanced-SGD-M", "Unbalanced-MTAdam"]
    results = _check(out, rows, "lossbalance " + " ".join(argv), "l1")
    runs = {r["row"]: r for r in results["runs"]}
    assert runs["Balanced-Adam"]["term_weights"] == [100.0, 1.0]
    assert runs["Unbalanced-MTAdam"]["term_weights"] == [100.0, 100.0]
    assert runs["Unbalanced-MTAdam"]["skipped_steps"] == 0
    assert runs["Unbalanced-MTAdam"]["trace"]["magnitudes"]
    assert (out / "magnitudes.png").read_bytes()[:8] == PNG_SIGNATURE
    final = runs["Balanced-Adam"]["final"]
    assert set(final) == {"l1", "l2", "nmse", "psnr", "ssim", "fd_fmnist"}
    assert 0 < final["l1"] < 1 and final["fd_fmnist"] >= 0
    assert final["psnr"] == pytest.approx(final["psnr"])  # finite
    after = runs["Balanced-Adam"]["history"][1]
    assert {"train_l1", "train_gan", "train_d"} <= set(after)
    assert results["config"]["classifier"]["train_size"] == 256
    assert results["config"]["classifier"]["trained"]
    digest = results["config"]["classifier"]["weights_sha256"]
    assert all(r["classifier"] == digest for r in results["runs"])
    assert [label for label, _ in results["sample_images"]] == ["input (edges)", "target"]

    # the second command finds the cached classifier; --resume reuses the finished run
    again = tmp_path / "again"
    argv2 = ["pix2pix", *fashion_args, "--methods", "mtadam", "--width", "8", *_TINY]
    assert main([*argv2, "--out", str(again), "--no-plots"]) == 0
    first = json.loads((again / "results.json").read_text())
    assert not first["config"]["classifier"]["trained"]
    assert first["config"]["classifier"]["key"] == results["config"]["classifier"]["key"]
    assert first["runs"][0]["final"] == runs["Unbalanced-MTAdam"]["final"]  # seeded
    capsys.readouterr()
    argv3 = [*argv2, "--out", str(again), "--no-plots", "--resume", "--seeds", "2"]
    assert main(argv3) == 0
    assert "Resuming: 1 run(s)" in capsys.readouterr().out
    resumed = json.loads((again / "results.json").read_text())["runs"]
    assert [r["seed"] for r in resumed] == [0, 1] and resumed[0] == first["runs"][0]


def test_pix2pix_ablation_rows(tmp_path, capsys, fashion_args):
    out = tmp_path / "abl"
    tiny = [*_TINY]
    tiny[tiny.index("--max-batches") + 1] = "1"
    argv = ["pix2pix", *fashion_args, "--ablation", "--width", "8", *tiny, "--no-plots"]
    assert main([*argv, "--out", str(out)]) == 0
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
    assert "ablations" in (out / "results.md").read_text()


def test_srgan_end_to_end(tmp_path, capsys, fashion_args):
    out = tmp_path / "sr"
    logs = tmp_path / "logs"
    argv = ["srgan", *fashion_args, "--methods", "balanced-adam", "rmsprop", "mtadam"]
    argv += ["--width", "8", "--blocks", "1", *_TINY, "--out", str(out), "--log-dir", str(logs)]
    assert main(argv) == 0
    capsys.readouterr()
    assert sorted(p.name for p in logs.glob("*.csv")) == [
        "Balanced-Adam-seed0.csv",
        "Unbalanced-MTAdam-seed0.csv",
        "Unbalanced-RMSProp-seed0.csv",
    ]
    header = (logs / "Unbalanced-MTAdam-seed0.csv").read_text().splitlines()[0].split(",")
    assert sum(h.startswith("magnitude/") for h in header) == 3
    rows = ["Balanced-Adam", "Unbalanced-RMSProp", "Unbalanced-MTAdam"]
    results = _check(out, rows, "lossbalance " + " ".join(argv), "psnr")
    runs = {r["row"]: r for r in results["runs"]}
    assert runs["Balanced-Adam"]["term_weights"] == pytest.approx([1.0, 0.001, 0.006])
    assert runs["Unbalanced-MTAdam"]["term_weights"] == [1.0, 1.0, 1.0]
    assert len(runs["Unbalanced-MTAdam"]["trace"]["magnitudes"][0]) == 3
    assert {"train_mse", "train_gan", "train_perceptual"} <= set(
        runs["Balanced-Adam"]["history"][1]
    )
    baseline = results["bicubic_baseline"]
    assert baseline["psnr"] > 0 and 0 < baseline["ssim"] <= 1
    labels = [label for label, _ in results["sample_images"]]
    assert labels == ["input (7x7)", "bicubic", "target"]
    assert decode_images(dict(results["sample_images"])["input (7x7)"]).shape == (4, 7, 7)


def test_gan_errors_are_clear(tmp_path, capsys, fashion_args):
    base = ["--out", str(tmp_path / "x"), "--device", "cpu"]
    assert main(["pix2pix", *fashion_args, "--unbalanced-weights", "1", "2", "3", *base]) == 2
    assert "Invalid unbalanced_weights: [1.0, 2.0, 3.0] (expected 2 weights" in (
        capsys.readouterr().err
    )
    assert main(["srgan", *fashion_args, "--methods", "nope", *base]) == 2
    assert "Unknown method 'nope'" in capsys.readouterr().err
    empty = ["--data-dir", str(tmp_path / "nodata"), "--no-download"]
    assert main(["srgan", *empty, "--methods", "adam", *base]) == 1
    err = capsys.readouterr().err
    assert "Put the four files" in err and "fashion-mnist" in err
    assert not (tmp_path / "x" / "summary.json").exists()


def test_cyclegan_end_to_end(tmp_path, capsys, fashion_args):
    out = tmp_path / "cyc"
    argv = ["cyclegan", *fashion_args, "--methods", "balanced-adam,mtadam"]
    argv += ["--width", "4", "--blocks", "1", *_TINY, "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())["rows"]
    assert list(summary) == ["Balanced-Adam", "Unbalanced-MTAdam"]
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "fd_fmnist"
    runs = {r["row"]: r for r in results["runs"]}
    assert runs["Balanced-Adam"]["term_weights"] == [1.0, 1.0, 10.0, 10.0, 5.0, 5.0]
    assert len(runs["Unbalanced-MTAdam"]["trace"]["magnitudes"][0]) == 6
    final = runs["Unbalanced-MTAdam"]["final"]
    assert set(final) == {"fd_fmnist", "fd_mnist", "cycle_l1_a", "cycle_l1_b"}
    assert all(v >= 0 for v in final.values())
    # a row of samples: the 4 MNIST -> Fashion outputs, then the 4 Fashion -> MNIST ones
    assert decode_images(runs["Balanced-Adam"]["samples"]).shape == (8, 28, 28)
    assert set(results["config"]["classifier"]) == {"mnist", "fashion-mnist"}
    assert (out / "samples.png").read_bytes()[:8] == PNG_SIGNATURE


def test_report_warns_when_runs_used_different_classifiers():
    from lossbalance.experiments.gan import gan_result
    from lossbalance.experiments.methods import resolve_methods

    def record(seed: int, classifier: str) -> dict:
        return {
            "row": "Unbalanced-Adam", "method": "adam", "group": None, "seed": seed,
            "final": {"l1": 0.1 * (seed + 1)}, "time_per_iter_s": 0.01,
            "nonfinite_steps": 0, "skipped_steps": None, "classifier": classifier,
        }  # fmt: skip

    specs = resolve_methods(["adam"], weighted=True)
    args = dict(
        metric="l1", metric_label="L1", columns=[("l1", "L1", 4)], plot_keys=["l1"],
        term_names=["l1", "gan"], notes=[], sample_images=[],
    )  # fmt: skip
    same = gan_result("x", "t", {}, specs, [0, 1], [record(0, "a"), record(1, "a")], **args)
    assert same.summary["Unbalanced-Adam"]["mean"] == pytest.approx(0.15)
    assert "different feature classifiers" not in same.table
    mixed = gan_result("x", "t", {}, specs, [0, 1], [record(0, "a"), record(1, "b")], **args)
    assert "different feature classifiers (weights a, b)" in mixed.table
    assert "not with the one described above" not in mixed.table
    # one classifier for every run, but not the one this command loaded (a report of runs
    # recorded on another machine): the table says so
    other = gan_result(
        "x", "t", {}, specs, [0, 1], [record(0, "a"), record(1, "a")], classifier="c", **args
    )
    assert "classifier of weights a, not with the one described above (weights c)" in other.table
    matching = gan_result(
        "x", "t", {}, specs, [0, 1], [record(0, "a"), record(1, "a")], classifier="a", **args
    )
    assert "Warning" not in matching.table
