"""Cross-checks of the Gramian weightings against TorchJD (``torchjd==0.18.0``, the test extra).

Same aggregated gradient ``alpha @ J`` on random Jacobians of chosen rank and overall
scale (1e-15 .. 1e15), with zero and duplicate rows where the oracle defines them. Where
TorchJD departs from the paper the test says how and compares what is comparable:

- UPGrad, DualProj: TorchJD solves each QP with quadprog (an optional extra,
  ``torchjd[quadprog_projector]``) on ``G / trace(G) + reg_eps I`` and returns zeros
  when ``trace(G) < norm_eps``. With ``norm_eps = reg_eps = 0`` it solves the exact
  problem, which quadprog accepts only for a positive definite G; singular Gramians
  (zero, duplicate, dependent rows) are compared with a ridge of 1e-13 and a tolerance
  that covers its effect.
- Aligned-MTL: TorchJD averages the aligned gradients (weights 1/K); the paper's
  Algorithm 1 and the authors' code sum them, as lossbalance does.
- FairGrad: TorchJD (like the authors' code) solves ``G w = w^{-1/a}`` with
  ``scipy.optimize.least_squares`` to its default tolerances (about 1e-8 relative), so
  the comparison is at 1e-6 and lossbalance's residual must be the smaller one. For
  small Gramians (scale 1e-6) it stops far from the solution (its start w = 1/K is
  far off and its tolerances are absolute): there only lossbalance's residual is checked.
- CAGrad, Nash-MTL: TorchJD needs cvxpy (extras ``torchjd[cagrad]``, ``torchjd[nash_mtl]``);
  without it those checks are skipped. With it, both are compared at the tolerance of
  the oracle's conic solver; TorchJD's Nash-MTL also stops after at most 20 convex
  subproblems at ``||G w - 1/w|| < 1e-3``, so it is compared through that criterion.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch

from lossbalance import LossBalanceWarning
from lossbalance.functional import (
    aligned_mtl_weights,
    cagrad_weights,
    config_weights,
    dualproj_weights,
    fairgrad_weights,
    nash_mtl_weights,
    upgrad_weights,
)

aggregation = pytest.importorskip("torchjd.aggregation", reason="torchjd (test extra) is absent")

F64 = torch.float64
SCALES = [1e-15, 1e-8, 1.0, 1e8, 1e15]
HAS_QUADPROG = all(importlib.util.find_spec(m) is not None for m in ("qpsolvers", "quadprog"))
HAS_CVXPY = importlib.util.find_spec("cvxpy") is not None
needs_quadprog = pytest.mark.skipif(
    not HAS_QUADPROG,
    reason="TorchJD's UPGrad/DualProj need qpsolvers + quadprog (torchjd[quadprog_projector])",
)
needs_cvxpy = pytest.mark.skipif(
    not HAS_CVXPY, reason="TorchJD's CAGrad/NashMTL need cvxpy (torchjd[cagrad], [nash_mtl])"
)


def jacobian(seed: int, k: int, p: int, rank: int | None = None, case: str = "") -> torch.Tensor:
    rng = np.random.default_rng(seed)
    r = min(k, p) if rank is None else rank
    m = rng.standard_normal((k, r)) @ rng.standard_normal((r, p))
    m *= 10.0 ** rng.uniform(-1, 1, size=(k, 1))
    if case == "zero-row":
        m[1] = 0.0
    elif case == "duplicate":
        m[-1] = m[0]
    return torch.from_numpy(m)


def assert_same_update(ours: torch.Tensor, theirs: torch.Tensor, matrix: torch.Tensor, rtol: float):
    d, d_ref = ours.to(F64) @ matrix, theirs.to(F64) @ matrix
    scale = float(matrix.norm(dim=1).max()) * max(float(theirs.abs().max()), 1e-300)
    err = float((d - d_ref).norm())
    assert err <= rtol * max(float(d_ref.norm()), 1e-6 * scale), (err, float(d_ref.norm()))


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossBalanceWarning)
        return fn(*args, **kwargs)


def projector(reg_eps: float):
    from torchjd._linalg._dual_cone import QuadprogProjector

    return QuadprogProjector(norm_eps=0.0, reg_eps=reg_eps)


@needs_quadprog
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("seed", range(4))
def test_upgrad_and_dualproj_full_rank(scale: float, seed: int) -> None:
    matrix = jacobian(seed, 2 + seed, 9) * scale
    gram = matrix @ matrix.T
    up = aggregation.UPGradWeighting(projector=projector(0.0))(gram / gram.trace())
    dp = aggregation.DualProjWeighting(projector=projector(0.0))(gram / gram.trace())
    assert_same_update(upgrad_weights(matrix), up, matrix, 1e-10)
    assert_same_update(dualproj_weights(matrix), dp, matrix, 1e-10)


@needs_quadprog
@pytest.mark.parametrize("case", ["zero-row", "duplicate", "rank-deficient"])
def test_upgrad_and_dualproj_singular(case: str) -> None:
    rank = 2 if case == "rank-deficient" else None
    matrix = jacobian(7, 4, 6, rank=rank, case=case)
    gram = matrix @ matrix.T
    # quadprog needs a positive definite matrix: a ridge of 1e-13 relative to trace(G).
    up = aggregation.UPGradWeighting(projector=projector(1e-13))(gram / gram.trace())
    dp = aggregation.DualProjWeighting(projector=projector(1e-13))(gram / gram.trace())
    assert_same_update(quiet(upgrad_weights, matrix), up, matrix, 1e-5)
    assert_same_update(quiet(dualproj_weights, matrix), dp, matrix, 1e-5)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", ["", "duplicate", "rank-deficient"])
def test_aligned_mtl(scale: float, case: str) -> None:
    rank = 2 if case == "rank-deficient" else None
    matrix = jacobian(11, 4, 7, rank=rank, case=case) * scale
    theirs = aggregation.AlignedMTLWeighting()(matrix @ matrix.T)
    k = matrix.shape[0]
    assert_same_update(quiet(aligned_mtl_weights, matrix), k * theirs, matrix, 1e-10)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("case", ["", "zero-row", "duplicate", "rank-deficient"])
def test_config(scale: float, case: str) -> None:
    rank = 2 if case == "rank-deficient" else None
    matrix = jacobian(12, 4, 7, rank=rank, case=case) * scale
    theirs = aggregation.ConFIG()(matrix)
    ours = quiet(config_weights, matrix) @ matrix
    err = float((ours - theirs).norm())
    assert err <= 1e-10 * float(theirs.norm()), err


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
@pytest.mark.parametrize("a", [0.5, 1.0, 2.0])
def test_fairgrad(scale: float, a: float) -> None:
    matrix = jacobian(14, 3, 6) * scale
    gram = matrix @ matrix.T
    theirs = aggregation.FairGradWeighting(alpha=a)(gram)
    ours = fairgrad_weights(matrix, a)

    def residual(w: torch.Tensor) -> float:
        return float(((gram @ w) * w ** (1 / a) - 1).abs().max())

    assert residual(ours) <= 1e-12
    if scale < 1.0:
        # least_squares starts from w = 1/K with absolute tolerances: for a small Gramian
        # the solution is far (w scales as s^(-a/(a+1))) and it stops short of it, so
        # only our residual is checked there
        return
    assert residual(ours) <= residual(theirs) + 1e-14
    assert_same_update(ours, theirs, matrix, 1e-6)


@needs_cvxpy
@pytest.mark.parametrize("c", [0.1, 0.4, 1.0])
def test_cagrad(c: float) -> None:  # pragma: no cover - needs cvxpy
    matrix = jacobian(15, 4, 7)
    gram = matrix @ matrix.T
    theirs = aggregation.CAGradWeighting(c=c, norm_eps=0.0)(gram).to(matrix.dtype)
    ours = cagrad_weights(matrix, c)
    # TorchJD solves CAGrad's dual with cvxpy, to the conic solver's tolerance (at c = 1
    # its direction is 2e-5 off ours). The primal decides: d maximises min_i <g_i, d> over
    # the ball ||d - g0|| <= c ||g0||, and ours is never worse than the oracle's.
    assert_same_update(ours, theirs, matrix, 1e-4)
    g0 = matrix.mean(0)
    for weights in (ours, theirs):
        d = weights @ matrix
        assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-9)
    worst = [float((matrix @ (w @ matrix)).min()) for w in (ours, theirs)]
    assert worst[0] >= worst[1] - 1e-9 * abs(worst[1])


@needs_cvxpy
def test_nash_mtl() -> None:  # pragma: no cover - needs cvxpy
    matrix = jacobian(16, 3, 7)
    gram = matrix @ matrix.T
    theirs = aggregation.NashMTL(n_tasks=3, max_norm=0.0, optim_niter=100)(matrix)
    ours = nash_mtl_weights(matrix) @ matrix
    w = torch.linalg.lstsq(matrix.T, theirs.unsqueeze(1)).solution.squeeze(1)
    assert float((gram @ w - 1 / w).norm()) < 1e-3  # the oracle's own stopping rule
    assert float((ours - theirs).norm()) <= 1e-2 * float(ours.norm())
