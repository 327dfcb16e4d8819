"""Issue 17, third part: GradVac, DB-MTL, MoCo, GradDrop, MoDo, SDMGrad.

The papers' properties (GradVac reaches its target cosine; GradDrop with agreeing signs is
the plain sum; MoCo's y tracks a fixed gradient and its weights reach MGDA's; MoDo and
SDMGrad stay on the simplex and reduce to single sampling with identical batches),
plain-loop references in float64 through ``lossbalance.backward`` on small models,
TorchJD / LibMTL cross-checks with the randomness aligned, state_dict round trips and
hyperparameter validation.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lossbalance
from lossbalance import LossBalanceWarning
from lossbalance._validation import reset_warnings
from lossbalance.functional import mgda_weights
from lossbalance.methods._dbmtl import DBMTL, db_mtl_step
from lossbalance.methods._graddrop import GradDrop, graddrop
from lossbalance.methods._gradvac import GradVac, gradvac_weights
from lossbalance.methods._moco import MoCo
from lossbalance.methods._modo import MoDo
from lossbalance.methods._pcgrad import pcgrad_weights
from lossbalance.methods._sdmgrad import SDMGrad
from lossbalance.methods._vector import cross_gramian, project_simplex

F64 = torch.float64


def _matrix(seed: int, k: int, p: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((k, p)))


class Net(nn.Module):
    def __init__(self, k: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
        self.heads = nn.ModuleList([nn.Linear(4, 1) for _ in range(k)])
        self.double()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def losses(self, x: torch.Tensor, z: torch.Tensor | None = None) -> list[torch.Tensor]:
        z = self.trunk(x) if z is None else z
        return [
            (h(z).squeeze(1) - (i + 1) * x[:, i]).pow(2).mean() for i, h in enumerate(self.heads)
        ]


def _batch(seed: int, n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=F64)


def _per_term(losses: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _grads(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def _simplex_reference(v: np.ndarray) -> np.ndarray:
    # bisection on theta: sum(max(v - theta, 0)) = 1 (independent of the sort-based code)
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - 0.5 * (lo + hi), 0)


def test_project_simplex_matches_bisection() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.standard_normal(rng.integers(1, 7)) * 3
        out = project_simplex(torch.from_numpy(v)).numpy()
        assert out.min() >= 0 and out.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(out, _simplex_reference(v), atol=1e-10)


# --------------------------------------------------------------------------- GradVac


def test_gradvac_with_zero_targets_is_pcgrad() -> None:
    # target 0: a negative cosine is raised to 0, which is PCGrad's projection
    for seed in range(5):
        m = _matrix(seed, 4, 6)
        a, _ = gradvac_weights(m, torch.zeros(4, 4), 0.5, torch.Generator().manual_seed(seed))
        b = pcgrad_weights(m, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(a, b)


def test_gradvac_reaches_the_target_cosine_and_updates_the_ema() -> None:
    m = _matrix(1, 2, 5)
    g1, g2 = m
    phi = float(g1 @ g2 / (g1.norm() * g2.norm()))
    targets = torch.tensor([[0.0, 0.9], [0.9, 0.0]], dtype=F64)
    assert phi < 0.9
    alpha, new = gradvac_weights(m, targets, beta=0.25)
    # K = 2: g1' = g1 + (alpha_2 - 1) g2 and g2' = g2 + (alpha_1 - 1) g1
    g1p = g1 + (alpha[1] - 1) * g2
    g2p = g2 + (alpha[0] - 1) * g1
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(g1p, g2, dim=0)) == pytest.approx(0.9, abs=1e-12)
    assert float(cos(g2p, g1, dim=0)) == pytest.approx(0.9, abs=1e-12)
    assert float(new[0, 1]) == pytest.approx(0.75 * 0.9 + 0.25 * phi, abs=1e-12)
    # above the target: no correction, the target still moves toward phi
    alpha, new = gradvac_weights(m, torch.full((2, 2), -0.99, dtype=F64), beta=0.25)
    torch.testing.assert_close(alpha, torch.ones(2, dtype=F64))
    assert float(new[0, 1]) == pytest.approx(0.75 * -0.99 + 0.25 * phi, abs=1e-12)


def test_gradvac_matches_torchjd_over_steps() -> None:
    from torchjd.aggregation import GradVacWeighting

    ours = GradVac(4, beta=0.3, seed=7)
    theirs = GradVacWeighting(beta=0.3, eps=0.0)
    torch.manual_seed(7)
    for step in range(6):
        m = _matrix(10 + step, 4, 5) + 0.5  # some positive cosines too
        gram = m @ m.T
        a = ours.weights(gram, torch.ones(4))
        b = theirs(gram)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.targets[0], theirs._phi_t * (1 - torch.eye(4, dtype=F64)))


def test_gradvac_through_backward_whole_model_and_per_layer() -> None:
    net = Net(3)
    x = _batch(0)
    shared = list(net.trunk.parameters())
    for per_layer in (False, True):
        net.zero_grad()
        balancer = GradVac(3, per_layer=per_layer, seed=3)
        # targets of 0.3 (one table over the whole model, or one per tensor)
        balancer.targets = torch.full((1 if not per_layer else len(shared), 3, 3), 0.3, dtype=F64)
        losses = net.losses(x)
        stacks = [_per_term(losses, [p]) for p in shared]
        lossbalance.backward(losses, balancer, shared=net.trunk, mode="exact")
        gen = torch.Generator().manual_seed(3)
        start = torch.full((3, 3), 0.3, dtype=F64)
        if per_layer:
            expected = torch.cat([gradvac_weights(s, start, 0.5, gen)[0] @ s for s in stacks])
        else:
            flat = torch.cat(stacks, 1)
            expected = gradvac_weights(flat, start, 0.5, gen)[0] @ flat
        torch.testing.assert_close(_grads(shared), expected)
        assert balancer.targets.shape == (1 if not per_layer else len(shared), 3, 3)
    # mode='gramian' never holds the per-layer gradients: exact mode, warned
    reset_warnings()
    with pytest.warns(LossBalanceWarning, match="fell back to mode='exact'"):
        lossbalance.backward(
            net.losses(x), GradVac(3, per_layer=True), shared=net.trunk, mode="gramian"
        )


def test_gradvac_state_dict_round_trip_continues_identically() -> None:
    for per_layer in (False, True):
        a = GradVac(3, per_layer=per_layer, seed=1)
        net = Net(3)
        x = _batch(1)
        lossbalance.backward(net.losses(x), a, shared=net.trunk)
        b = GradVac(3, per_layer=per_layer, seed=99)
        b.load_state_dict(copy.deepcopy(a.state_dict()))
        wa = lossbalance.backward(net.losses(x), a, shared=net.trunk)
        wb = lossbalance.backward(net.losses(x), b, shared=net.trunk)
        assert torch.equal(wa, wb) and torch.equal(a.targets, b.targets)


def test_gradvac_validates() -> None:
    with pytest.raises(ValueError, match=r"Invalid beta: 1.5 \(expected 0 <= beta <= 1\)"):
        GradVac(2, beta=1.5)
    with pytest.raises(ValueError, match="Invalid seed"):
        GradVac(2, seed=-1)


# --------------------------------------------------------------------------- DB-MTL


def test_db_mtl_through_backward_matches_a_plain_loop() -> None:
    net = Net(3)
    ref = copy.deepcopy(net)
    balancer = DBMTL(3, beta=0.6, beta_sigma=0.5)
    shared = list(net.trunk.parameters())
    ref_shared = list(ref.trunk.parameters())
    avg = torch.zeros(3, sum(p.numel() for p in shared), dtype=F64)
    for step in range(1, 4):
        x = _batch(step)
        net.zero_grad()
        ref.zero_grad()
        lossbalance.backward(net.losses(x), balancer, shared=net.trunk)
        logs = [torch.log(loss + 1e-8) for loss in ref.losses(x)]
        g = _per_term(logs, ref_shared)
        rate = 0.6 / step**0.5
        avg = rate * avg + (1 - rate) * g
        norms = avg.norm(dim=1)
        direction = sum(norms.max() / norms[i] * avg[i] for i in range(3))
        torch.testing.assert_close(_grads(shared), direction)
        # heads: the gradient of sum_i log L_i
        sum(logs).backward()
        for p, q in zip(net.heads.parameters(), ref.heads.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)
    # every term's contribution has the largest averaged norm
    alpha = balancer.last_weights
    contrib = (alpha[:, None] * balancer.average).norm(dim=1)
    torch.testing.assert_close(contrib, torch.full((3,), float(contrib.max()), dtype=F64))


def test_db_mtl_step_equal_norms_is_the_plain_sum_and_zero_rows_drop() -> None:
    g = torch.tensor([[3.0, 4.0], [0.0, 5.0], [0.0, 0.0]], dtype=F64)
    d, _, alpha = db_mtl_step(torch.zeros_like(g), g, 0.0)
    torch.testing.assert_close(alpha, torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    torch.testing.assert_close(d, g.sum(0))


def test_db_mtl_norms_variant_is_a_gramian_weighting() -> None:
    net = Net(2)
    x = _batch(3)
    balancer = DBMTL(2, beta=0.0, ema="norms")
    w = lossbalance.backward(net.losses(x), balancer, shared=net.trunk, mode="gramian")
    logs = [torch.log(loss + 1e-8) for loss in net.losses(x)]
    norms = _per_term(logs, list(net.trunk.parameters())).norm(dim=1)
    torch.testing.assert_close(w, norms.max() / norms)


def test_db_mtl_state_round_trip_and_validation() -> None:
    net = Net(2)
    a = DBMTL(2)
    lossbalance.backward(net.losses(_batch(0)), a, shared=net.trunk)
    b = DBMTL(2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    x = _batch(1)
    assert torch.equal(
        lossbalance.backward(net.losses(x), a, shared=net.trunk),
        lossbalance.backward(net.losses(x), b, shared=net.trunk),
    )
    assert torch.equal(a.average, b.average) and int(a.step) == int(b.step) == 2
    with pytest.raises(ValueError, match="Invalid beta"):
        DBMTL(2, beta=-0.1)
    with pytest.raises(ValueError, match="Invalid ema"):
        DBMTL(2, ema="vectors")
    reset_warnings()
    with pytest.warns(LossBalanceWarning, match="fell back to mode='exact'"):
        lossbalance.backward(net.losses(x), DBMTL(2), shared=net.trunk, mode="gramian")


# --------------------------------------------------------------------------- MoCo


def test_moco_y_tracks_a_fixed_gradient_and_lambda_reaches_mgda() -> None:
    m = _matrix(4, 3, 6)
    stacks = [m[:, :2].clone(), m[:, 2:].clone()]
    inputs = [torch.zeros(2, dtype=F64), torch.zeros(4, dtype=F64)]
    balancer = MoCo(3, gamma=0.5)
    for _ in range(4000):
        (d1, d2), lam = balancer.combine(stacks, torch.ones(3), inputs=inputs, features=False)
    torch.testing.assert_close(balancer.y, m, atol=1e-10, rtol=0)
    expected = mgda_weights(m)
    torch.testing.assert_close(lam, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat([d1, d2]), expected @ m, atol=1e-3, rtol=0)


def test_moco_through_backward_matches_a_plain_loop() -> None:
    net = Net(2)
    ref = copy.deepcopy(net)
    balancer = MoCo(2, beta=0.7, beta_sigma=0.3, gamma=0.2, gamma_sigma=0.4, rho=0.05)
    shared = list(net.trunk.parameters())
    y = torch.zeros(2, sum(p.numel() for p in shared), dtype=F64)
    lam = np.full(2, 0.5)
    for step in range(1, 4):
        x = _batch(step)
        net.zero_grad()
        weights = lossbalance.backward(net.losses(x), balancer, shared=net.trunk)
        g = _per_term(ref.losses(x), list(ref.trunk.parameters()))
        y = y - 0.7 / step**0.3 * (y - g)
        gram = (y @ y.T).numpy()
        lam = _simplex_reference(lam - 0.2 / step**0.4 * (gram + 0.05 * np.eye(2)) @ lam)
        torch.testing.assert_close(weights, torch.from_numpy(lam), atol=1e-9, rtol=0)
        torch.testing.assert_close(_grads(shared), torch.from_numpy(lam) @ y, atol=1e-9, rtol=0)


def test_moco_state_round_trip_errors_and_validation() -> None:
    net = Net(2)
    a = MoCo(2)
    lossbalance.backward(net.losses(_batch(0)), a, shared=net.trunk)
    b = MoCo(2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    x = _batch(1)
    assert torch.equal(
        lossbalance.backward(net.losses(x), a, shared=net.trunk),
        lossbalance.backward(net.losses(x), b, shared=net.trunk),
    )
    assert torch.equal(a.y, b.y) and torch.equal(a.lam, b.lam)
    z = net.features(x)
    reset_warnings()
    with pytest.warns(LossBalanceWarning, match="not of features; fell back to mode='exact'"):
        lossbalance.backward(net.losses(x, z), MoCo(2), shared=net.trunk, features=z)
    # accumulated over two halves of the batch: the stacks of the whole batch, one update
    one, two = MoCo(2), MoCo(2)
    acc = lossbalance.Accumulator(two, shared=net.trunk)
    net.zero_grad()
    expected = lossbalance.backward(net.losses(x), one, shared=net.trunk)
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    for part in (x[: len(x) // 2], x[len(x) // 2 :]):
        acc.accumulate([loss / 2 for loss in net.losses(part)])
    torch.testing.assert_close(acc.backward(), expected)
    for p, g in zip(net.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(two.y, one.y)
    for kwargs, msg in (
        ({"beta": 0.0}, "Invalid beta"),
        ({"gamma": 0.0}, "Invalid gamma"),
        ({"rho": -1.0}, "Invalid rho"),
        ({"gamma_sigma": math.inf}, "Invalid gamma_sigma"),
    ):
        with pytest.raises(ValueError, match=msg):
            MoCo(2, **kwargs)


# --------------------------------------------------------------------------- GradDrop


def test_graddrop_with_agreeing_signs_is_the_plain_sum_in_feature_mode() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 4), nn.Softplus()).double()  # z > 0
    a = [torch.rand(4, dtype=F64) + 0.1 for _ in range(3)]  # dL_i/dz > 0
    x = _batch(5)
    z = trunk(x)
    balancer = GradDrop(3, seed=0)
    weights = lossbalance.backward([(ai * z).sum() for ai in a], balancer, shared=trunk, features=z)
    got = [p.grad.clone() for p in trunk.parameters()]
    trunk.zero_grad()
    z = trunk(x)
    sum((ai * z).sum() for ai in a).backward()
    for g, p in zip(got, trunk.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    torch.testing.assert_close(weights, torch.ones(3, dtype=F64))


def test_graddrop_matches_torchjd_with_the_same_draws() -> None:
    from torchjd.aggregation import GradDrop as TorchJDGradDrop

    m = _matrix(6, 4, 50)
    leak = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=F64)
    ours = GradDrop(4, leak=leak.tolist(), seed=5)
    (out,), _ = ours.combine([m], torch.ones(4), inputs=[torch.zeros(50)], features=False)
    torch.manual_seed(5)
    expected = TorchJDGradDrop(leak=leak)(m)
    torch.testing.assert_close(out, expected)
    # each element keeps either its positive or its negative gradients (leak 0)
    (out,), _ = GradDrop(4, seed=2).combine([m], torch.ones(4), inputs=[m[0]], features=False)
    pos, neg = m.clamp_min(0).sum(0), m.clamp_max(0).sum(0)
    assert bool(((out - pos).abs().lt(1e-12) | (out - neg).abs().lt(1e-12)).all())


def _libmtl_weighting(name: str) -> type:
    """A LibMTL weighting class loaded from its file (the package __init__ needs torchvision)."""
    spec = importlib.util.find_spec("LibMTL")
    assert spec is not None and spec.submodule_search_locations
    root = Path(spec.submodule_search_locations[0]) / "weighting"
    if "LibMTL.weighting.abstract_weighting" not in sys.modules:
        for pkg in ("LibMTL", "LibMTL.weighting"):
            sys.modules.setdefault(pkg, types.ModuleType(pkg))
        base = importlib.util.spec_from_file_location(
            "LibMTL.weighting.abstract_weighting", root / "abstract_weighting.py"
        )
        assert base is not None and base.loader is not None
        module = importlib.util.module_from_spec(base)
        sys.modules[base.name] = module
        base.loader.exec_module(module)
    file = importlib.util.spec_from_file_location(f"LibMTL.weighting.{name}", root / f"{name}.py")
    assert file is not None and file.loader is not None
    module = importlib.util.module_from_spec(file)
    file.loader.exec_module(module)
    return getattr(module, name)


def test_graddrop_feature_mode_matches_libmtl_with_the_same_draws() -> None:
    if importlib.util.find_spec("LibMTL") is None:
        pytest.skip("LibMTL is not installed")
    libmtl_graddrop = _libmtl_weighting("GradDrop")
    net = Net(2, seed=3)
    ref = copy.deepcopy(net)
    x = _batch(7)
    z = net.features(x)
    lossbalance.backward(
        net.losses(x, z), GradDrop(2, leak=0.3, seed=11), shared=net.trunk, features=z
    )

    weighting = libmtl_graddrop()
    weighting.rep_grad = True
    weighting.task_num = 2
    weighting.task_name = ["a", "b"]
    weighting.rep = ref.features(x)
    weighting.rep_tasks = {
        t: weighting.rep.detach().clone().requires_grad_() for t in weighting.task_name
    }
    losses = [ref.losses(x, weighting.rep_tasks[t])[i] for i, t in enumerate(weighting.task_name)]
    weighting.device = torch.device("cpu")
    torch.manual_seed(11)
    weighting.backward(losses, leak=0.3)
    for p, q in zip(net.trunk.parameters(), ref.trunk.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_graddrop_validates_and_round_trips() -> None:
    with pytest.raises(ValueError, match="Invalid leak"):
        GradDrop(2, leak=[0.1])
    with pytest.raises(ValueError, match="Invalid leak"):
        GradDrop(2, leak=1.5)
    m = _matrix(8, 3, 20)
    a = GradDrop(3, seed=4)
    a.combine([m], torch.ones(3), inputs=[m[0]], features=False)
    b = GradDrop(3, seed=0)
    b.load_state_dict(a.state_dict())
    out_a = a.combine([m], torch.ones(3), inputs=[m[0]], features=False)[0][0]
    out_b = b.combine([m], torch.ones(3), inputs=[m[0]], features=False)[0][0]
    assert torch.equal(out_a, out_b)


# --------------------------------------------------------------------------- MoDo / SDMGrad


def test_cross_gramian_is_j1_j2t() -> None:
    net = Net(3)
    x1, x2 = _batch(1), _batch(2)
    shared = list(net.trunk.parameters())
    expected = _per_term(net.losses(x1), shared) @ _per_term(net.losses(x2), shared).T
    torch.testing.assert_close(cross_gramian(net.losses(x1), net.losses(x2), net.trunk), expected)
    with pytest.raises(ValueError, match="expected the same terms"):
        cross_gramian(net.losses(x1), net.losses(x2)[:2], net.trunk)


@pytest.mark.parametrize("cls", [MoDo, SDMGrad])
def test_weights_stay_on_the_simplex(cls: type) -> None:
    balancer = cls(4, **({"gamma": 0.5} if cls is MoDo else {}))
    for seed in range(30):
        a, b = _matrix(seed, 4, 3), _matrix(seed + 100, 4, 3)
        balancer.update(a @ b.T * 10.0 ** (seed % 5 - 2))
        state = balancer.lam if cls is MoDo else balancer.w
        assert float(state.min()) >= 0 and float(state.sum()) == pytest.approx(1, abs=1e-12)


@pytest.mark.parametrize("cls", [MoDo, SDMGrad])
def test_identical_batches_reduce_to_single_sampling(cls: type) -> None:
    net = Net(3)
    x = _batch(4)
    single, double = cls(3), cls(3)
    for _ in range(3):
        # exact mode: the Gramian from the same per-term gradients as cross_gramian's (the
        # default Gramian engine rounds differently in float32, ~1e-6 in the weights)
        w1 = lossbalance.backward(net.losses(x), single, shared=net.trunk, mode="exact")
        double.update(cross_gramian(net.losses(x), net.losses(x), net.trunk))
        w2 = lossbalance.backward(net.losses(x), double, shared=net.trunk, mode="exact")
        torch.testing.assert_close(w1, w2)


def test_modo_converges_to_mgda_and_matches_torchjd() -> None:
    from torchjd.aggregation import MoDoWeighting

    m = _matrix(9, 3, 5)
    balancer = MoDo(3, gamma=0.05, rho=0.0)
    for _ in range(5000):
        balancer.update(m @ m.T)
    torch.testing.assert_close(balancer.lam, mgda_weights(m), atol=1e-6, rtol=0)
    ours, theirs = MoDo(3, gamma=0.1, rho=0.2), MoDoWeighting(gamma=0.1, rho=0.2)
    for seed in range(10):
        a = _matrix(seed, 3, 4) @ _matrix(seed + 50, 3, 4).T
        torch.testing.assert_close(ours.update(a), theirs(a), rtol=1e-12, atol=1e-14)


def test_sdmgrad_matches_torchjd_and_its_solution_is_optimal() -> None:
    from torchjd.aggregation import SDMGradWeighting

    ours = SDMGrad(3, lamda=0.3, lr=10.0)
    theirs = SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3)
    for seed in range(10):
        a = _matrix(seed, 3, 4) @ _matrix(seed + 50, 3, 4).T
        torch.testing.assert_close(ours.update(a), theirs(a), rtol=1e-12, atol=1e-14)
    # deterministic counterpart: w minimises ||J^T (w + lamda / K)||^2 on the simplex (KKT)
    m = _matrix(3, 3, 5)
    gram = m @ m.T
    balancer = SDMGrad(3, lamda=0.3, lr=0.5, n_iter=20)
    for _ in range(300):
        balancer.update(gram)
    w = balancer.w
    grad = gram @ (w + 0.3 / 3)
    support = w > 1e-9
    assert float(grad[support].max() - grad[support].min()) < 1e-6 * float(grad.abs().max())
    assert bool((grad[~support] >= grad[support].min() - 1e-9).all())


@pytest.mark.parametrize("cls", [MoDo, SDMGrad])
def test_three_batches_through_backward(cls: type) -> None:
    net = Net(2)
    xs = [_batch(10), _batch(11), _batch(12)]
    balancer = cls(2)
    weights_before = balancer.update(cross_gramian(net.losses(xs[0]), net.losses(xs[1]), net.trunk))
    if cls is MoDo:
        weights_before = balancer.lam.clone()
    net.zero_grad()
    weights = lossbalance.backward(net.losses(xs[2]), balancer, shared=net.trunk)
    torch.testing.assert_close(weights, weights_before)
    shared = list(net.trunk.parameters())
    torch.testing.assert_close(_grads(shared), weights @ _per_term(net.losses(xs[2]), shared))
    assert not bool(balancer.pending)
    # state round trip, pending included
    balancer.update(torch.eye(2, dtype=F64))
    other = cls(2)
    other.load_state_dict(copy.deepcopy(balancer.state_dict()))
    g = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
    assert torch.equal(balancer.weights(g, torch.ones(2)), other.weights(g, torch.ones(2)))


def test_modo_and_sdmgrad_validate() -> None:
    for cls, kwargs, msg in (
        (MoDo, {"gamma": 0.0}, "Invalid gamma"),
        (MoDo, {"rho": -0.1}, "Invalid rho"),
        (SDMGrad, {"lamda": -1.0}, "Invalid lamda"),
        (SDMGrad, {"momentum": 1.0}, "Invalid momentum"),
        (SDMGrad, {"n_iter": 0}, "Invalid n_iter"),
        (SDMGrad, {"lr": math.nan}, "Invalid lr"),
    ):
        with pytest.raises(ValueError, match=msg):
            cls(2, **kwargs)
    with pytest.raises(ValueError, match="not finite"):
        MoDo(2).update(torch.full((2, 2), math.nan))
    with pytest.raises(ValueError, match="built for 2 loss terms"):
        SDMGrad(2).update(torch.eye(3))


# --------------------------------------------------------------------------- the engine path


def _moco_run(mode: str, scaler: torch.amp.GradScaler | None = None) -> tuple[list, MoCo]:
    net = Net(2)
    balancer = MoCo(2)
    for step in range(2):
        net.zero_grad()
        lossbalance.backward(
            net.losses(_batch(step)), balancer, shared=net.trunk, mode=mode, grad_scaler=scaler
        )
    return [p.grad.clone() for p in net.parameters()], balancer


def test_vector_path_batched_and_grad_scaler_agree_with_exact() -> None:
    exact, a = _moco_run("exact")
    batched, b = _moco_run("batched")
    for g, h in zip(exact, batched, strict=True):
        torch.testing.assert_close(g, h)
    torch.testing.assert_close(a.y, b.y)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaled, c = _moco_run("exact", scaler)
    # .grad holds the scaled gradients (as scaler.scale(loss).backward()); the state is
    # that of the unscaled run
    for g, h in zip(exact, scaled, strict=True):
        torch.testing.assert_close(h / 1024.0, g)
    torch.testing.assert_close(c.y, a.y)
    torch.testing.assert_close(c.lam, a.lam)


def test_vector_path_skips_a_non_finite_loss_without_touching_the_state() -> None:
    net = Net(2)
    balancer = MoCo(2)
    lossbalance.backward(net.losses(_batch(0)), balancer, shared=net.trunk)
    y, lam, step = balancer.y.clone(), balancer.lam.clone(), int(balancer.step)
    net.zero_grad()
    losses = net.losses(_batch(1))
    with pytest.warns(lossbalance.LossBalanceWarning, match="not finite"):
        w = lossbalance.backward([losses[0] * math.nan, losses[1]], balancer, shared=net.trunk)
    assert bool(w.isnan().all())
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(balancer.y, y) and torch.equal(balancer.lam, lam)
    assert int(balancer.step) == step


def test_graddrop_in_exact_mode_through_backward() -> None:
    net = Net(3)
    x = _batch(9)
    shared = list(net.trunk.parameters())
    losses = net.losses(x)
    stacks = [_per_term(losses, [p]) for p in shared]
    lossbalance.backward(losses, GradDrop(3, seed=8), shared=net.trunk, mode="exact")
    gen = torch.Generator().manual_seed(8)
    expected = [graddrop(s, torch.rand(s.shape[1:], generator=gen, dtype=F64))[0] for s in stacks]
    torch.testing.assert_close(_grads(shared), torch.cat(expected))


def test_degenerate_inputs_stay_finite() -> None:
    m = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, 2.0]], dtype=F64)  # a zero row, duplicates
    with pytest.warns(lossbalance.LossBalanceWarning, match="zero gradient"):
        alpha, targets = gradvac_weights(m, torch.full((3, 3), 0.5, dtype=F64))
    assert bool(torch.isfinite(alpha).all() and torch.isfinite(targets).all())
    assert float(targets[0, 1]) == 0.5  # a pair with a zero gradient keeps its target
    with pytest.warns(lossbalance.LossBalanceWarning, match="only one loss term"):
        alpha, _ = gradvac_weights(m[:1], torch.zeros(1, 1, dtype=F64))
    torch.testing.assert_close(alpha, torch.ones(1, dtype=F64))
    inputs = [torch.zeros(2, dtype=F64)]
    for balancer in (MoCo(3), DBMTL(3), GradDrop(3, seed=0)):
        (out,), w = balancer.combine([m], torch.ones(3), inputs=inputs, features=False)
        assert bool(torch.isfinite(out).all() and torch.isfinite(w).all())
    (out,), _ = GradDrop(1, seed=0).combine([m[:1]], torch.ones(1), inputs=inputs, features=False)
    torch.testing.assert_close(out, m[0])
    net = Net(2)
    losses = net.losses(_batch(0))
    with pytest.warns(lossbalance.LossBalanceWarning, match="not finite"):
        with pytest.warns(lossbalance.LossBalanceWarning, match="positive losses"):
            w = lossbalance.backward([losses[0], losses[1] * -1.0], DBMTL(2), shared=net.trunk)
    assert bool(w.isnan().all())
