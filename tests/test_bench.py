"""lossbalance bench: the toy problem's closed form, Δm and ranks, the loaders, --quick."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lossbalance.experiments.bench import BENCHMARKS, delta_m, rank
from lossbalance.experiments.data import load_uci, make_multi_pair
from lossbalance.experiments.methods import resolve_method
from lossbalance.experiments.toy import (
    ToyConfig,
    distance_to_pareto_set,
    pareto_set,
    toy_gradients,
    toy_objectives,
    toy_trajectory,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not here")


def _autograd(x: np.ndarray, scale: float) -> np.ndarray:
    p = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    f = toy_objectives(p, scale)
    return np.stack([torch.autograd.grad(f[i], p, retain_graph=True)[0].numpy() for i in (0, 1)])


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_toy_gradients_match_autograd_below_the_axis(scale: float) -> None:
    rng = np.random.default_rng(0)
    for x in np.stack([rng.uniform(-10, 10, 50), rng.uniform(-10, -1e-3, 50)], 1):
        np.testing.assert_allclose(_autograd(x, scale), toy_gradients(x, scale), atol=1e-12)


def test_toy_gradients_refuse_the_upper_half() -> None:
    with pytest.raises(ValueError, match=r"Invalid x2: 0.5 \(the closed form holds for x2 < 0\)"):
        toy_gradients([0.0, 0.5])


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_pareto_set_is_pareto_stationary(scale: float) -> None:
    points, mu = pareto_set(101, scale)
    assert np.all((mu >= 0) & (mu <= 1))
    for x, m in zip(points, mu, strict=True):
        g = _autograd(x, scale)
        combo = m * g[0] + (1 - m) * g[1]
        assert np.linalg.norm(combo) < 1e-9 * max(1.0, np.linalg.norm(g))
    # the ends are the two minimisers: there one gradient vanishes on its own
    assert np.linalg.norm(_autograd(points[0], scale)[1]) < 1e-9
    assert np.linalg.norm(_autograd(points[-1], scale)[0]) < 1e-9
    np.testing.assert_allclose(points[[0, -1], 0], [-7.0, 7.0])
    # the middle is the point the CAGrad authors mark as the minimum of the mean
    assert abs(points[50, 1] - (-8.3552)) < 1e-4


def _min_norm(g: np.ndarray) -> float:
    # closed-form min-norm point of the segment between two vectors
    d = g[0] - g[1]
    t = 0.0 if d @ d == 0 else float(np.clip(-(g[1] @ d) / (d @ d), 0, 1))
    return float(np.linalg.norm(t * g[0] + (1 - t) * g[1]))


def test_points_off_the_pareto_set_are_not_stationary() -> None:
    points, _ = pareto_set(21)
    for x in points[1:-1]:
        for shift in ([0.0, 0.3], [0.0, -0.3], [0.0, 1.0]):
            assert _min_norm(_autograd(x + np.array(shift), 0.1)) > 1e-4
    for x in ([-8.0, -8.4], [8.0, -8.4], [0.0, -5.0]):
        assert _min_norm(_autograd(np.array(x), 0.1)) > 1e-3


def test_pareto_set_trades_one_objective_for_the_other() -> None:
    points, _ = pareto_set(201)
    f = toy_objectives(torch.tensor(points), 1.0).numpy()
    assert np.all(np.diff(f[:, 0]) < 0) and np.all(np.diff(f[:, 1]) > 0)
    assert np.allclose(distance_to_pareto_set(points), 0, atol=1e-3)
    assert distance_to_pareto_set(np.array([0.0, 0.0])) == pytest.approx(8.3551, abs=1e-3)


def test_a_balancer_step_on_the_toy_is_sgd_on_its_direction() -> None:
    # "uniform" sums the two terms: one step is x - lr (g1 + g2), from the closed form
    cfg = ToyConfig(steps=1, lr=0.05, starts=((2.0, -3.0),))
    start = np.array([2.0, -3.0])
    traj = toy_trajectory(resolve_method("uniform", weighted=False), start, cfg)
    g = toy_gradients(start, cfg.scale)
    expected = start - cfg.lr * g.sum(0)  # Uniform's default reduction is the sum
    assert np.allclose(traj[1], expected, atol=1e-12)


def test_delta_m_signs_follow_the_metric_direction() -> None:
    metrics = [("acc", "acc", False), ("mae", "mae", True)]
    base = {"acc": 50.0, "mae": 2.0}
    # +10% accuracy and -10% error are both improvements
    assert delta_m({"acc": 55.0, "mae": 1.8}, base, metrics) == pytest.approx(10.0)
    assert delta_m({"acc": 45.0, "mae": 2.2}, base, metrics) == pytest.approx(-10.0)
    assert delta_m(base, base, metrics) == 0.0
    assert math.isnan(delta_m({"acc": math.nan, "mae": 1.0}, base, metrics))


def test_rank_ties_and_nan() -> None:
    r = rank({"a": 3.0, "b": 1.0, "c": 3.0, "d": math.nan})
    assert r == {"a": 1.5, "c": 1.5, "b": 3.0, "d": 4.0}


def test_make_multi_pair_puts_each_set_in_its_corner() -> None:
    left = torch.zeros(4, 28, 28, dtype=torch.uint8)
    left[:, 0, 0] = 200
    right = torch.zeros(6, 28, 28, dtype=torch.uint8)
    right[:, 27, 27] = torch.arange(10, 70, 10, dtype=torch.uint8)
    x, y = make_multi_pair(left, torch.arange(4), right, torch.arange(6), seed=3)
    assert x.shape == (4, 36, 36) and y.shape == (4, 2)
    assert torch.all(x[:, 0, 0] == 200)  # upper left: offset 4 - 4 = 0
    # lower right: the right set's item of each pair, at 8 + 27 = 35
    assert torch.equal(x[:, 35, 35].long(), (y[:, 1] + 1) * 10)
    with pytest.raises(ValueError, match="expected at least 4 right images"):
        make_multi_pair(left, torch.arange(4), right[:2], torch.arange(2))


@needs_data
def test_uci_loaders_split_and_shape() -> None:
    e = load_uci("energy", DATA)
    assert e.train_x.shape == (614, 8) and e.test_x.shape == (154, 8)
    assert e.target_names == ["Y1", "Y2"]
    p = load_uci("parkinsons", DATA)
    assert p.train_x.shape[1] == 19 and p.train_x.shape[0] + p.test_x.shape[0] == 5875
    assert p.target_names == ["motor_UPDRS", "total_UPDRS"]
    with pytest.raises(ValueError, match="Invalid UCI set: 'x'"):
        load_uci("x", DATA)


@needs_data
def test_bench_quick_writes_every_output_and_reports_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lossbalance.cli import main

    args = [
        "bench",
        "--quick",
        "--methods",
        "adam,mgda",
        "--benchmarks",
        "toy",
        "energy-x1000",
        "multifashionmnist",
        "--data-dir",
        str(DATA),
        "--no-download",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["benchmarks"]) == {"energy-x1000", "multifashionmnist"}
    assert data["benchmarks"]["energy-x1000"]["delta_m"]["Adam"]["mean"] == 0.0
    assert {r["group"] for r in data["runs"]} == {"toy", "energy-x1000", "multifashionmnist"}
    for name in ("results.md", "toy.png", "toy/Adam.png", "toy/MGDA.png", "delta_m.png"):
        assert (tmp_path / name).is_file(), name
    md = (tmp_path / "results.md").read_text()
    assert "## Overall ranking" in md and BENCHMARKS["energy-x1000"][0] in md
    capsys.readouterr()
    assert main([*args, "--report-only"]) == 0
    assert "Reporting: 10 run(s)" in capsys.readouterr().out
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["overall"] == data["overall"]
    # --no-plots removes the pictures of the earlier command, the bench's own ones too
    assert main([*args, "--report-only", "--no-plots"]) == 0
    assert not list(tmp_path.glob("*.png")) and not (tmp_path / "toy").exists()


@needs_data
def test_bench_jobs_train_the_runs_of_one_process(tmp_path: Path) -> None:
    from lossbalance.cli import main

    base = ["bench", "--quick", "--methods", "adam", "--benchmarks", "toy", "energy"]
    base += ["--data-dir", str(DATA), "--no-download", "--device", "cpu", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0

    def finals(name: str) -> dict[str, object]:
        data = json.loads((tmp_path / name / "results.json").read_text())
        return {f"{r['group']}|{r['row']}|{r['seed']}": r["final"] for r in data["runs"]}

    one, two = finals("one"), finals("two")
    assert len(one) == 3 and one == two  # the toy once (parent), energy for 2 seeds


@needs_data
def test_bench_plan_counts_the_trained_runs_only(tmp_path: Path, capsys) -> None:
    # the toy records are computed, not trained: the plan and the saved count leave them
    # out, and --quick's seeds are the ones planned
    from lossbalance.cli import main

    args = ["bench", "--quick", "--methods", "adam", "--benchmarks", "toy", "energy"]
    args += ["--data-dir", str(DATA), "--no-download", "--device", "cpu", "--quiet"]
    assert main([*args, "--no-plots", "--out", str(tmp_path)]) == 0
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Plan:"))
    data = json.loads((tmp_path / "results.json").read_text())
    trained = [r for r in data["runs"] if r["group"] != "toy"]
    assert f"= {len(trained)} runs ({len(trained)} to train" in plan, plan
