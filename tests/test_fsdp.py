"""MTAdam under FSDP2 (``fully_shard``, DTensor parameters): two gloo ranks equal one process.

``fsdp_worker.py`` trains every case in one spawn of two ranks (each on half of every
batch, the trunk's layers and the heads sharded, one head left out of ``fully_shard``) and
then in one process on the whole batches; here the results are compared. Float64, so
"equal" means within 1e-10 relative (the measured differences are ~1e-15: a layer's
magnitude is the square root of the sum of the shards' squared norms, one process takes
the norm of the whole tensor, and FSDP averages the ranks' gradients in another order).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fsdp_worker as worker  # noqa: E402

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

RTOL = 1e-10


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    run = subprocess.run(
        [sys.executable, str(HERE / "fsdp_worker.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return out


def load(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=False)


def max_rel(a: dict, b: dict) -> float:
    return max(
        ((p - q).abs().max() / q.abs().max()).item()
        for p, q in zip(a["params"], b["params"], strict=True)
    )


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a["params"], b["params"], strict=True))


@pytest.mark.parametrize("case", ["mtadam", "groups", "nan", "resume"])
def test_two_sharded_ranks_match_one_process(out, case):
    rank0, rank1, single = (load(out, f"{case}-{tag}") for tag in ("rank0", "rank1", "single"))
    assert same(rank0, rank1), "ranks diverged"
    assert max_rel(rank0, single) < RTOL
    assert rank0["skipped"] == single["skipped"] == (1 if case == "nan" else 0)
    # the parameters moved: the comparison is not between two untouched models
    start = [p.detach() for p in worker.build().parameters()]
    assert all(not torch.equal(p, q) for p, q in zip(single["params"], start))


def test_state_is_sharded(out):
    rank0, rank1, single = (load(out, f"mtadam-{tag}") for tag in ("rank0", "rank1", "single"))
    net = worker.build()
    # (I + 1) elements per parameter element; the plain head `extra` is on every rank
    extra = 4 * sum(p.numel() for p in net.extra.parameters())
    assert single["state_elements"] == 4 * sum(p.numel() for p in net.parameters())
    assert rank0["state_elements"] + rank1["state_elements"] - extra == single["state_elements"]
    assert max(rank0["state_elements"], rank1["state_elements"]) < single["state_elements"]


def test_dcp_checkpoint_resumes_bit_identically_on_two_ranks_and_on_one(out):
    for rank in ("rank0", "rank1"):
        uninterrupted = load(out, f"resume-{rank}")
        assert same(load(out, f"resumed-{rank}"), uninterrupted)
        # through get_optimizer_state_dict / set_optimizer_state_dict
        assert same(load(out, f"resumed-osd-{rank}"), uninterrupted)
    # the two-rank checkpoint resumed in one process without FSDP
    assert max_rel(load(out, "resumed-single"), load(out, "resume-single")) < RTOL


def test_bf16_mixed_precision_keeps_full_precision_state_and_skips(out):
    rank0, rank1 = load(out, "bf16-rank0"), load(out, "bf16-rank1")
    assert same(rank0, rank1)
    # the sharded parameters stay float64 (FSDP computes in bf16): so does the state
    assert rank0["state_dtypes"] == ["torch.float64"]
    assert rank0["skipped"] == rank1["skipped"] == 1
    assert all(torch.isfinite(p).all() for p in rank0["params"])


# ------------------------------------------------------------------ balancers


import fsdp_balancer_worker as balancer_worker  # noqa: E402


@pytest.fixture(scope="module")
def balancer_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp-balancers")
    run = subprocess.run(
        [sys.executable, str(HERE / "fsdp_balancer_worker.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return tuple(load(out, f"balancers-{tag}") for tag in ("rank0", "rank1", "single"))


@pytest.mark.parametrize("cfg", balancer_worker.CONFIGS, ids=balancer_worker.key)
def test_balancers_on_sharded_trunk_match_one_process(balancer_runs, cfg):
    rank0, rank1, single = (run[balancer_worker.key(cfg)] for run in balancer_runs)
    assert same(rank0, rank1), "ranks diverged"
    assert max_rel(rank0, single) < RTOL
    for name, value in single["balancer"].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(rank0["balancer"][name], value, rtol=1e-9, atol=1e-12)
    torch.manual_seed(0)
    start = [p.detach() for p in balancer_worker.Net().double().parameters()]
    assert all(not torch.equal(p, q) for p, q in zip(single["params"], start))


def test_stateful_balancer_resumes_bit_identically_from_dcp(balancer_runs):
    for run in balancer_runs[:2]:
        done, resumed = run["resume"]["uninterrupted"], run["resume"]["resumed"]
        assert same(resumed, done)
        for name, value in done["balancer"].items():
            assert torch.equal(resumed["balancer"][name], value), name
        assert int(done["balancer"]["num_steps"]) == balancer_worker.STEPS


# ------------------------------------------------------------------ examples


@pytest.mark.parametrize(
    ("script", "extra", "expected"),
    [
        ("fsdp_mtadam.py", [], "resumed run identical to the uninterrupted one: True"),
        ("fsdp_balancer.py", ["--mode", "feature"], "trunk identical on all 2 ranks: True"),
    ],
)
def test_example_runs_under_torchrun(script, extra, expected):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(HERE.parent / "examples" / script),
            "--steps",
            "4",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=HERE.parent,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert expected in run.stdout
