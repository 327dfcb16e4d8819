"""The per-term gradient engine against a plain float64 for-loop reference."""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import lossbalance
import lossbalance.engine._engine as engine
import lossbalance.engine._vjp as vjp
from lossbalance import LossBalanceWarning, term_grads, term_gramian

MODES = ("exact", "batched", "gramian")


# --------------------------------------------------------------------------- reference


def reference_jacobian(losses: list[Tensor], params: list[Tensor]) -> Tensor:
    """K x P matrix of per-term gradients: one autograd.grad per term, zeros where unused."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1).to(torch.float64)
                    for p, g in zip(params, grads, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def reference_gramian(losses: list[Tensor], params: list[Tensor]) -> Tensor:
    jac = reference_jacobian(losses, params)
    return jac @ jac.T


# --------------------------------------------------------------------------- models


class MultiHead(nn.Module):
    """Shared trunk (Linear-act-...-Linear) and K heads with regression/classification losses."""

    def __init__(self, in_dim: int, hidden: int, depth: int, tasks: list[str], act: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.Tanh() if act == "tanh" else nn.ReLU()]
            d = hidden
        layers.append(nn.Linear(d, hidden))
        self.trunk = nn.Sequential(*layers)
        self.tasks = tasks
        self.heads = nn.ModuleList(nn.Linear(hidden, 3 if task == "cls" else 1) for task in tasks)

    def forward(self, x: Tensor, targets: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        losses = []
        for task, head, y in zip(self.tasks, self.heads, targets, strict=True):
            out = head(z)
            if task == "cls":
                losses.append(nn.functional.cross_entropy(out, y))
            elif task == "l1":
                losses.append((out.squeeze(-1) - y).abs().mean())
            else:
                losses.append((out.squeeze(-1) - y).pow(2).mean())
        return z, losses


def make_problem(
    seed, dtype, device, in_dim=4, hidden=6, depth=1, tasks=("reg", "cls"), act="relu", batch=5
):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MultiHead(in_dim, hidden, depth, list(tasks), act).to(device=device, dtype=dtype)
    x = torch.randn(batch, in_dim, generator=gen).to(device=device, dtype=dtype)
    targets = []
    for task in tasks:
        if task == "cls":
            targets.append(torch.randint(0, 3, (batch,), generator=gen).to(device))
        else:
            targets.append(torch.randn(batch, generator=gen).to(device=device, dtype=dtype))
    return model, x, targets


SHAPES = [
    dict(tasks=("reg", "cls")),
    dict(tasks=("reg", "cls", "l1"), act="tanh"),
    dict(in_dim=3, hidden=4, depth=2, tasks=("reg", "reg", "reg", "cls"), act="tanh", batch=7),
    dict(in_dim=2, hidden=3, depth=0, tasks=("l1",), act="tanh", batch=1),
]


def tol(dtype):
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- term_grads


@pytest.mark.parametrize("mode", ["auto", "sequential", "batched", "two_stage"])
def test_term_grads_matches_reference(mode, dtype, device):
    model, x, targets = make_problem(0, dtype, device, tasks=("reg", "cls", "l1"))
    _, losses = model(x, targets)
    params = list(model.parameters())
    ref = reference_jacobian(losses, params)
    grads = term_grads(losses, params, mode=mode, retain_graph=True)
    assert all(g is not None for g in grads)
    flat = torch.cat([g.reshape(len(losses), -1) for g in grads], dim=1)
    torch.testing.assert_close(flat.to(torch.float64), ref, **tol(dtype))


def test_term_grads_unreached_is_none_and_zero_rows(dtype, device):
    a = torch.randn(3, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(2, dtype=dtype, device=device, requires_grad=True)
    c = torch.randn(2, dtype=dtype, device=device, requires_grad=True)
    losses = [a.pow(2).sum(), (a.sum() * b).sum()]
    for mode in ("sequential", "batched", "two_stage", "auto"):
        ga, gb, gc = term_grads(losses, [a, b, c], mode=mode, retain_graph=True)
        assert gc is None
        torch.testing.assert_close(gb[0], torch.zeros_like(b))
        torch.testing.assert_close(ga[0], 2 * a.detach())


def test_term_grads_writes_into_out_where_it_fits(dtype, device):
    a = torch.randn(3, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(2, dtype=dtype, device=device, requires_grad=True)
    losses = [a.pow(2).sum(), (a.sum() * b).sum()]
    ref = term_grads(losses, [a, b], mode="sequential", retain_graph=True)
    fits = torch.full((2, 3), float("nan"), dtype=dtype, device=device)  # stale contents
    wrong = torch.empty(3, 2, dtype=dtype, device=device)
    ga, gb = term_grads(losses, [a, b], mode="sequential", retain_graph=True, out=[fits, wrong])
    assert ga is fits and gb is not wrong
    torch.testing.assert_close(ga, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(gb, ref[1], rtol=0, atol=0)
    # b's row of term 0 is not reached: the stale contents of a reused stack become zeros
    stale = torch.full((2, 2), float("nan"), dtype=dtype, device=device)
    _, gb = term_grads(losses, [a, b], mode="sequential", retain_graph=True, out=[None, stale])
    assert gb is stale and torch.equal(gb[0], torch.zeros_like(b))
    with pytest.raises(ValueError, match="out has 1 entries for 2 parameters"):
        term_grads(losses, [a, b], out=[None])


def test_term_grads_under_no_grad(dtype, device):
    w = torch.randn(3, dtype=dtype, device=device, requires_grad=True)
    losses = [w.sum(), w.pow(2).sum()]
    with torch.no_grad():
        (g,) = term_grads(losses, [w])
    torch.testing.assert_close(g[1], 2 * w.detach())


class _InplaceBackward(torch.autograd.Function):
    # its backward writes into an unbatched buffer: vmap (is_grads_batched) cannot run it
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        out = torch.zeros(g.shape, dtype=g.dtype, device=g.device)
        out.copy_(g)
        return 2 * out


def test_term_grads_batched_falls_back_with_warning(dtype, device):
    w = torch.randn(3, dtype=dtype, device=device, requires_grad=True)
    y = _InplaceBackward.apply(w)
    losses = [y.sum(), y.pow(2).sum()]
    ref = reference_jacobian(losses, [w])
    with pytest.warns(LossBalanceWarning, match="fell back to K sequential"):
        (g,) = term_grads(losses, [w], mode="batched")
    torch.testing.assert_close(g.to(torch.float64), ref, **tol(dtype))


@pytest.fixture
def fresh_choices():
    vjp.clear_choices()
    yield
    vjp.clear_choices()


def _flat(grads: list[Tensor | None], k: int) -> Tensor:
    return torch.cat([g.reshape(k, -1) for g in grads if g is not None], dim=1)


def test_term_grads_auto_times_once_per_shape_key(dtype, device, monkeypatch, fresh_choices):
    calls = []
    real = vjp.choose_mode

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(vjp, "choose_mode", spy)
    tasks = ("reg", "cls", "l1")
    model, x, targets = make_problem(0, dtype, device, tasks=tasks)
    twin, _, _ = make_problem(0, dtype, device, tasks=tasks)
    params, twin_params = list(model.parameters()), list(twin.parameters())
    _, losses = model(x, targets)
    ref = reference_jacobian(losses, params)
    got = term_grads(losses, params)
    assert len(calls) == 1
    assert calls[0]["repeats"] == engine.AUTO_REPEATS == 2
    assert calls[0]["margin"] == engine.AUTO_MARGIN == 0.05
    torch.testing.assert_close(_flat(got, 3).to(torch.float64), ref, **tol(dtype))
    chosen = vjp.cached_choice(engine.auto_key(params, 3))
    assert chosen in vjp.VJP_MODES
    # a copy of the model has other tensors but the same key: no timing, the same mode,
    # bit-identical gradients
    again = term_grads(twin(x, targets)[1], twin_params)
    assert len(calls) == 1
    assert torch.equal(_flat(again, 3), _flat(term_grads(losses, params, mode=chosen), 3))
    # forced modes, one term, deterministic algorithms and graph capture time nothing
    for mode in ("sequential", "batched", "two_stage"):
        term_grads(model(x, targets)[1], params, mode=mode)
    term_grads(model(x, targets)[1][:1], params)
    other, _, _ = make_problem(0, dtype, device, hidden=5, tasks=tasks)
    other_params = list(other.parameters())
    torch.use_deterministic_algorithms(True)
    try:
        term_grads(other(x, targets)[1], other_params)
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(engine, "_capturing", lambda params: True)
    seq = term_grads(other(x, targets)[1], other_params)
    assert len(calls) == 1
    assert vjp.cached_choice(engine.auto_key(other_params, 3)) is None
    want = term_grads(other(x, targets)[1], other_params, mode="sequential")
    assert torch.equal(_flat(seq, 3), _flat(want, 3))


@pytest.mark.parametrize(("vectorised", "expected"), [(0.96, "sequential"), (0.9, "batched")])
def test_term_grads_auto_needs_five_percent(
    vectorised, expected, dtype, device, monkeypatch, fresh_choices
):
    # a fake clock: every run of a mode advances it by that mode's cost
    clock = [0.0]
    cost = {"sequential": 1.0, "batched": vectorised, "two_stage": 0.99}
    real = vjp.vjp_term_grads

    def timed(losses, params, mode="sequential", **kwargs):
        clock[0] += cost[mode]
        return real(losses, params, mode, **kwargs)

    monkeypatch.setattr(vjp, "vjp_term_grads", timed)
    monkeypatch.setattr(vjp.time, "perf_counter", lambda: clock[0])
    model, x, targets = make_problem(0, dtype, device, tasks=("reg", "cls", "l1"))
    params = list(model.parameters())
    term_grads(model(x, targets)[1], params)
    assert vjp.cached_choice(engine.auto_key(params, 3)) == expected


def test_term_grads_auto_is_silent_about_unbatchable_ops(dtype, device, fresh_choices):
    w = torch.randn(3, dtype=dtype, device=device, requires_grad=True)
    y = _InplaceBackward.apply(w)
    losses = [y.sum(), y.pow(2).sum()]
    ref = reference_jacobian(losses, [w])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossBalanceWarning)
        (g,) = term_grads(losses, [w])
    torch.testing.assert_close(g.to(torch.float64), ref, **tol(dtype))
    assert vjp.cached_choice(engine.auto_key([w], 2)) == "sequential"


def test_term_grads_auto_surfaces_a_freed_graph(dtype, device, fresh_choices):
    w = torch.randn(3, dtype=dtype, device=device, requires_grad=True)
    y = w.exp()
    losses = [y.sum(), y.pow(2).sum()]
    term_grads(losses, [w], mode="sequential")  # frees the graph
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        term_grads(losses, [w])


def test_term_grads_rejects_sparse(dtype, device):
    emb = nn.Embedding(5, 2, sparse=True).to(device=device, dtype=dtype)
    out = emb(torch.tensor([0, 1, 1], device=device))
    with pytest.raises(TypeError, match="sparse gradient"):
        term_grads([out.sum(), out.pow(2).sum()], [emb.weight])


# --------------------------------------------------------------------------- term_gramian


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_gramian_modes_match_reference(mode, shape, dtype, device):
    model, x, targets = make_problem(shape + 1, dtype, device, **SHAPES[shape])
    _, losses = model(x, targets)
    shared = list(model.trunk.parameters())
    ref = reference_gramian(losses, shared)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback for these models
        gram = term_gramian(losses, shared, mode=mode, retain_graph=True)
    assert gram.dtype == torch.float64 and gram.shape == ref.shape
    torch.testing.assert_close(gram, ref, **tol(dtype))
    torch.testing.assert_close(gram, gram.T, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_gramian_with_terms_not_reaching_some_params(mode, dtype, device):
    a = torch.randn(4, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(3, dtype=dtype, device=device, requires_grad=True)
    unused = torch.randn(2, dtype=dtype, device=device, requires_grad=True)
    losses = [a.tanh().pow(2).sum(), (a.sum() * b).sin().sum(), b.pow(3).sum()]
    ref = reference_gramian(losses, [a, b, unused])
    gram = term_gramian(losses, [a, b, unused], mode=mode, retain_graph=True)
    torch.testing.assert_close(gram, ref, **tol(dtype))


def test_gramian_zero_gradients(dtype, device):
    w = torch.randn(3, dtype=dtype, device=device, requires_grad=True)
    losses = [(w * 0).sum(), w.sum()]
    for mode in MODES:
        gram = term_gramian(losses, [w], mode=mode, retain_graph=True)
        expected = torch.tensor([[0.0, 0.0], [0.0, 3.0]], dtype=torch.float64, device=device)
        torch.testing.assert_close(gram, expected, **tol(dtype))


class _OnceDifferentiableTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def test_gramian_mode_needs_no_double_backward(dtype, device):
    # once_differentiable cuts a double-backward path silently; the Gramian engine uses
    # first-order passes only, so it is exact there and needs no fallback
    w = torch.randn(4, 3, dtype=dtype, device=device, requires_grad=True)
    x = torch.randn(5, 4, dtype=dtype, device=device)
    h = _OnceDifferentiableTanh.apply(x @ w)
    losses = [h.pow(2).mean(), h.sum(), (h[:, 0] - 1).abs().mean()]
    ref = reference_gramian(losses, [w])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossBalanceWarning)
        gram = term_gramian(losses, [w], mode="gramian", retain_graph=True)
    torch.testing.assert_close(gram, ref, **tol(dtype))


def test_feature_gramian_is_per_sample_z_gradients(dtype, device):
    model, x, targets = make_problem(3, dtype, device, tasks=("reg", "cls", "l1"), act="tanh")
    z, losses = model(x, targets)
    zgrads = torch.stack(
        [torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses]
    ).to(torch.float64)
    assert zgrads.shape == (3, z.numel())  # K x (B*D): not summed over the batch
    gram = term_gramian(losses, features=z, retain_graph=True)  # auto -> feature
    torch.testing.assert_close(gram, zgrads @ zgrads.T, **tol(dtype))
    # summing over the batch first would give a different (wrong) matrix
    summed = zgrads.reshape(3, x.shape[0], -1).sum(1)
    assert not torch.allclose(gram, summed @ summed.T)


def test_feature_gramian_several_features(dtype, device):
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=dtype, device=device)
    w = torch.randn(3, 5, dtype=dtype, device=device, requires_grad=True)
    z1, z2 = (x @ w).tanh(), (x @ w).sin()
    losses = [(z1 * z2).sum(), z1.pow(2).mean(), z2.sum()]
    rows = []
    for loss in losses:
        gs = torch.autograd.grad(loss, [z1, z2], retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(z) if g is None else g).reshape(-1)
                    for z, g in zip((z1, z2), gs, strict=True)
                ]
            )
        )
    ref = torch.stack(rows).to(torch.float64)
    gram = term_gramian(losses, features=[z1, z2], mode="feature", retain_graph=True)
    torch.testing.assert_close(gram, ref @ ref.T, **tol(dtype))


def test_term_gramian_errors(dtype, device):
    w = torch.randn(3, dtype=dtype, device=device, requires_grad=True)
    losses = [w.sum(), w.pow(2).sum()]
    with pytest.raises(ValueError, match=r"Invalid mode: 'fast' \(expected one of"):
        term_gramian(losses, [w], mode="fast")
    with pytest.raises(ValueError, match="needs params"):
        term_gramian(losses, mode="exact")
    with pytest.raises(ValueError, match="mode='feature' needs features=z"):
        term_gramian(losses, [w], mode="feature")
    with pytest.raises(ValueError, match=r"features\[0\] .* does not require grad"):
        term_gramian(losses, features=w.detach())
    with pytest.raises(ValueError, match="losses is empty"):
        term_gramian([], [w])


def test_reachable_leaves_stops_at_features(dtype, device):
    model, x, targets = make_problem(0, dtype, device, tasks=("reg", "cls"))
    z, losses = model(x, targets)
    stacked = torch.stack(losses)
    all_ids = {id(p) for p in engine.reachable_leaves([stacked])}
    assert all_ids == {id(p) for p in model.parameters()}
    head_ids = {id(p) for p in engine.reachable_leaves([stacked], stop=[z])}
    assert head_ids == {id(p) for p in model.heads.parameters()}
    trunk_ids = {id(p) for p in engine.reachable_leaves([z])}
    assert trunk_ids == {id(p) for p in model.trunk.parameters()}
    leaf = torch.ones(2, requires_grad=True)
    assert engine.reachable_leaves([leaf])[0] is leaf
    assert engine.reachable_leaves([leaf * 2], stop=[leaf]) == []


def test_gramian_mode_never_stacks_k_gradients(dtype, device):
    # the Gramian-only path must not go through the K-copy per-term routine
    w = torch.randn(50, dtype=dtype, device=device, requires_grad=True)
    losses = [(w * (i + 1)).sin().sum() for i in range(6)]
    calls = {"n": 0}
    original = engine.per_term

    def spy(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    engine.per_term = spy
    try:
        gram = term_gramian(losses, [w], mode="gramian", retain_graph=True)
    finally:
        engine.per_term = original
    assert calls["n"] == 0
    torch.testing.assert_close(gram, reference_gramian(losses, [w]), **tol(dtype))


def test_docstring_examples_run():
    result = doctest.testmod(engine, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_public_api_exports_engine():
    assert lossbalance.term_gramian is term_gramian
    assert "term_gramian" in lossbalance.__all__ and "term_grads" in lossbalance.__all__


def test_gramian_in_cpu_chunks_equals_one_float64_product(monkeypatch):
    # large matrices are converted to float64 in chunks of columns on the CPU (no fresh
    # float64 copy of the whole matrix); the accumulation stays float64
    import lossbalance._base as base

    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(5, 1000, generator=gen) * torch.logspace(-3, 3, 5).unsqueeze(1)
    ref = matrix.double() @ matrix.double().T
    whole = base.gramian(matrix)
    monkeypatch.setattr(base, "_CHUNK_BYTES", 8 * 5 * 300)  # 4096-column floor: 1 chunk
    torch.testing.assert_close(base.gramian(matrix), whole, rtol=0, atol=0)
    wide = torch.randn(3, 20000, generator=gen)
    chunked = torch.zeros(3, 3, dtype=torch.float64)
    calls = []
    real = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda *a, **k: calls.append(1) or real(*a, **k))
    base.add_gramian(chunked, wide)  # 20000 columns: 5 chunks of at most 4096
    monkeypatch.setattr(torch.Tensor, "addmm_", real)
    assert len(calls) == 5
    exact = wide.double() @ wide.double().T
    # entries with cancellation: compare relative to the largest entry (the diagonal)
    assert (chunked - exact).abs().max() <= 1e-14 * exact.abs().max()
    assert (whole - ref).abs().max() <= 1e-14 * ref.abs().max()
