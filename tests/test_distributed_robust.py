"""torch.distributed when the ranks differ: unused heads, and layouts that disagree.

``ddp_robust_worker.py`` runs every case in one spawn of two gloo ranks. Heads that some
rank (or every rank, on some steps) does not reach must give the result of one process on
the concatenated batch; ranks that pass different numbers of terms, reach different
parameters or take different paths must raise the same clear error on every rank, not
abort in gloo or hang.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lossbalance.engine._distributed import LAYOUT_SIZE, check_layout, layout_of

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import ddp_robust_worker as worker  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-robust")
    run = subprocess.run(
        [sys.executable, str(HERE / "ddp_robust_worker.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    def load(case: str, who: str) -> dict:
        path = out / f"{case}-{who}.pt"
        # a gloo abort kills both ranks; the cases saved before it still count
        assert path.exists(), f"no result for {case} ({who}):\n{run.stderr[-3000:]}"
        return torch.load(path, weights_only=False)

    load.returncode = run.returncode  # type: ignore[attr-defined]
    load.stderr = run.stderr  # type: ignore[attr-defined]
    return load


def test_the_group_survives_the_errors(runs):
    # after every case the ranks meet at a barrier and leave cleanly
    assert runs.returncode == 0, runs.stderr[-3000:]


@pytest.mark.parametrize("case", worker.MATCHING)
def test_unused_heads_match_one_process(runs, case):
    single, rank0, rank1 = runs(case, "single"), runs(case, "rank0"), runs(case, "rank1")
    assert "error" not in rank0, rank0.get("error")
    for p, q in zip(rank0["params"], rank1["params"], strict=True):
        assert torch.equal(p, q), f"ranks diverged: {case}"
    for j, (p, q) in enumerate(zip(rank0["params"], single["params"], strict=True)):
        scale = q.abs().max()
        assert (p - q).abs().max() <= 1e-10 * scale, (case, j, ((p - q).abs().max() / scale).item())


def test_mtadam_steps_only_the_parameters_some_rank_reached(runs):
    single, rank0, rank1 = (
        runs("mtadam", "single"),
        runs("mtadam", "rank0"),
        runs("mtadam", "rank1"),
    )
    model = worker.build()
    names = [name for name, _ in model.named_parameters()]
    odd = [j for j, name in enumerate(names) if name.startswith("odd.")]
    assert odd
    for j in odd:  # reached on odd steps only, on both ranks
        assert single["steps"][j] == worker.STEPS // 2
    head2 = [j for j, name in enumerate(names) if name.startswith("heads.2.")]
    for j in head2:  # reached on one rank (or both) at every step
        assert single["steps"][j] == worker.STEPS
    assert rank0["steps"] == single["steps"] == rank1["steps"]


MISMATCH_MESSAGES = {
    "mtadam-terms": r"MTAdam\.step.*rank 1 has 3 loss terms, rank 0 has 2",
    "backward-terms": r"lossbalance\.backward.*rank 1 has 3 loss terms, rank 0 has 2",
    "loss-level-heads": r"rank 1 reaches 6 leaves, rank 0 reaches 8",
    "feature-heads": r"rank 1 reaches 4 leaves outside `shared`, rank 0 reaches 6",
    "exact-heads": r"rank 1 reaches 4 leaves outside `shared`, rank 0 reaches 6",
    "accumulate-heads": r"rank 1 reaches 4 leaves outside `shared`, rank 0 reaches 6",
    "backward-mode": r"rank 1 takes the feature-mode path, rank 0 the deferred",
}


def test_every_mismatch_has_a_message():
    assert set(MISMATCH_MESSAGES) == set(worker.MISMATCHED)


@pytest.mark.parametrize("case", worker.MISMATCHED)
def test_ranks_that_disagree_raise_the_same_error_on_every_rank(runs, case):
    rank0, rank1 = runs(case, "rank0"), runs(case, "rank1")
    assert "error" in rank0 and "error" in rank1, (rank0.keys(), rank1.keys())
    assert rank0["error"] == rank1["error"]
    assert re.search(MISMATCH_MESSAGES[case], rank0["error"]), rank0["error"]


# --------------------------------------------------------------------------- the check alone


def fake_ranks(monkeypatch, rows, backend="gloo"):
    """Make ``check_layout`` see ``rows`` (one signature per rank) without a process group."""
    sent = []

    def all_gather(table, mine, group=None):
        sent.append(mine)
        for out, row in zip(table, rows, strict=True):
            out.copy_(torch.tensor(row + [0] * (len(out) - len(row))))

    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group: backend)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group: len(rows))
    return sent


ENTRIES = [("has {} loss terms", 2), ("reaches {} leaves", 5, "keep the heads in the graph")]


def test_check_layout_passes_equal_layouts_and_sends_a_few_ints_on_the_cpu(monkeypatch):
    sent = fake_ranks(monkeypatch, [[4, 2, 5]] * 3, backend="cpu:gloo,cuda:nccl")
    check_layout("x", 4, ENTRIES, object(), "cuda")
    (mine,) = sent
    assert mine.device.type == "cpu" and mine.dtype == torch.int64
    assert mine.tolist() == [4, 2, 5] + [0] * (LAYOUT_SIZE - 3)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[4, 2, 5], [4, 2, 5], [4, 3, 4]], r"^x under .*: rank 2 has 3 loss terms, rank 0 has 2 "),
        ([[4, 2, 5], [4, 2, 4]], r"rank 1 reaches 4 leaves, rank 0 reaches 5 .*; keep the heads"),
        ([[4, 2, 5], [3, 2, 5]], r"rank 1 takes the feature-mode path, rank 0 the deferred"),
    ],
)
def test_check_layout_names_the_first_difference(monkeypatch, rows, message):
    fake_ranks(monkeypatch, rows)
    with pytest.raises(RuntimeError, match=message):
        check_layout("x", 4, ENTRIES, object(), "cpu")


def test_layout_of_sees_sizes_in_another_order():
    a, b = torch.zeros(2), torch.zeros(3, 1)
    assert layout_of([a, b])[:2] == layout_of([b, a])[:2] == (2, 5)
    assert layout_of([a, b])[2] != layout_of([b, a])[2]
