"""``lossbalance.backward``: the gradients it writes, checked against plain autograd."""

from __future__ import annotations

import copy
import doctest
import random

import pytest
import torch
from torch import Tensor, nn

import lossbalance
import lossbalance.engine._backward as backward_module
from lossbalance import GradientBalancer, LossBalancer, LossBalanceWarning

GRAD_MODES = ("exact", "batched", "gramian", "feature")


# --------------------------------------------------------------------------- tiny balancers


class FixedAlpha(GradientBalancer):
    """Gradient level, fixed coefficients; counts its calls (state)."""

    def __init__(self, num_terms: int, alpha: list[float]) -> None:
        super().__init__(num_terms)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.gramians: list[Tensor] = []

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        self.calls += 1
        self.gramians.append(gramian.clone())
        return self._record(self.alpha.clone())


class InverseNorm(GradientBalancer):
    """Gradient level, weights from the Gramian: alpha_i = 1 / ||g_i|| (normalised)."""

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        inv = gramian.diagonal().clamp_min(1e-30).rsqrt()
        return self._record(inv / inv.sum())


class LearnedScale(GradientBalancer):
    """Hybrid like IMTL: transform e^s L - s with learnable s, then the mean of the gradients."""

    def __init__(self, num_terms: int) -> None:
        super().__init__(num_terms)
        self.s = nn.Parameter(torch.linspace(-0.3, 0.4, num_terms))

    def transform(self, losses: Tensor) -> Tensor:
        return self.s.exp() * losses - self.s

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        k = gramian.shape[0]
        return self._record(torch.full((k,), 1.0 / k, dtype=gramian.dtype))


class MixingTransform(GradientBalancer):
    """A transform that mixes the terms (non-diagonal Jacobian) with a learnable scale."""

    def __init__(self, num_terms: int) -> None:
        super().__init__(num_terms)
        self.a = nn.Parameter(torch.tensor(0.2))
        mix = torch.eye(num_terms) + 0.3 * torch.ones(num_terms, num_terms).triu(1)
        self.register_buffer("mix", mix)

    def transform(self, losses: Tensor) -> Tensor:
        return self.a.exp() * (self.mix.to(losses) @ losses) + self.a

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        inv = gramian.diagonal().clamp_min(1e-30).rsqrt()
        return self._record(inv / inv.sum())


class NoRecord(GradientBalancer):
    """Does not call _record: backward must still set last_weights."""

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return torch.full((gramian.shape[0],), 0.5, dtype=gramian.dtype)


class NaNWeights(GradientBalancer):
    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return torch.full((gramian.shape[0],), float("nan"), dtype=gramian.dtype)


class LearnedLoss(LossBalancer):
    """Loss level with learnable log-weights: sum_i e^{-s_i} L_i + s_i."""

    def __init__(self, num_terms: int) -> None:
        super().__init__(num_terms)
        self.s = nn.Parameter(torch.linspace(-0.5, 0.5, num_terms))

    def forward(self, losses: Tensor) -> Tensor:
        w = (-self.s).exp()
        self._record(w)
        return (w * losses + self.s).sum()


class DoubleLoss(LossBalancer):
    """Loss level that does not record: backward computes d combined / d L_i = 2."""

    def forward(self, losses: Tensor) -> Tensor:
        return 2 * losses.sum()


# --------------------------------------------------------------------------- model


class TwoHead(nn.Module):
    """Trunk Linear-ReLU-Linear, heads for regression, classification (and L1 regression)."""

    def __init__(self, tasks=("reg", "cls"), in_dim=4, hidden=8) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.tasks = tasks
        self.heads = nn.ModuleList(nn.Linear(hidden, 3 if t == "cls" else 1) for t in tasks)

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


def make_data(seed, dtype, device, tasks=("reg", "cls"), batch=16, in_dim=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_dim, generator=gen)
    targets = []
    for i, t in enumerate(tasks):
        if t == "cls":
            targets.append((x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())
        else:
            a = torch.randn(in_dim, generator=gen)
            y = (x @ a) if i % 2 == 0 else 3.0 * torch.sin(x @ a)
            targets.append(y.to(dtype))
    return x.to(device=device, dtype=dtype), [t.to(device) for t in targets]


def make_model(seed, dtype, device, tasks=("reg", "cls")):
    torch.manual_seed(seed)
    return TwoHead(tasks).to(device=device, dtype=dtype)


def per_term(losses: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """Plain reference: (K, *p.shape) per parameter, one autograd.grad per term."""
    rows = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses
    ]
    return [
        torch.stack([torch.zeros_like(p) if r[j] is None else r[j] for r in rows])
        for j, p in enumerate(params)
    ]


def combine(w: Tensor, stack: Tensor) -> Tensor:
    return torch.tensordot(w.to(stack), stack, dims=1)


def tol(dtype):
    return dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)


def grads_of(module: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


# --------------------------------------------------------------------------- gradient level


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("kind", ["fixed", "inverse-norm", "learned-scale", "mixing"])
def test_gradient_level_writes_weighted_shared_and_own_head_grads(mode, kind, dtype, device):
    tasks = ("reg", "cls", "l1")
    model = make_model(0, dtype, device, tasks)
    x, targets = make_data(1, dtype, device, tasks)
    balancer = {
        "fixed": lambda: FixedAlpha(3, [0.2, 1.5, -0.7]),
        "inverse-norm": lambda: InverseNorm(3),
        "learned-scale": lambda: LearnedScale(3),
        "mixing": lambda: MixingTransform(3),
    }[kind]().to(device=device, dtype=dtype)
    z, losses = model(x, targets)
    # reference on the same graph, before backward frees it
    losses_t = list(balancer.transform(torch.stack(losses)).unbind(0))
    trunk, heads = list(model.trunk.parameters()), list(model.heads.parameters())
    bal_params = list(balancer.parameters())
    ref_trunk = per_term(losses_t, trunk)
    ref_heads = per_term(losses_t, heads)
    ref_bal = per_term(losses_t, bal_params) if bal_params else []
    ref_z = per_term(losses_t, [z])[0].reshape(3, -1).to(torch.float64)
    flat = torch.cat([g.reshape(3, -1) for g in ref_trunk], dim=1).to(torch.float64)

    w = lossbalance.backward(
        losses, balancer, model.trunk, features=z if mode == "feature" else None, mode=mode
    )

    assert w.shape == (3,) and not w.requires_grad
    torch.testing.assert_close(balancer.last_weights, w)
    if kind in ("inverse-norm", "mixing"):
        gram = ref_z @ ref_z.T if mode == "feature" else flat @ flat.T
        inv = gram.diagonal().rsqrt()
        torch.testing.assert_close(w, inv / inv.sum(), **tol(dtype))
    for p, g in zip(trunk, ref_trunk, strict=True):
        torch.testing.assert_close(p.grad, combine(w, g), **tol(dtype))
    # each head its own term's gradient, unweighted (the papers' rule)
    for p, g in zip(heads, ref_heads, strict=True):
        if kind != "mixing":
            assert (g != 0).any(dim=tuple(range(1, g.dim()))).sum() == 1
        torch.testing.assert_close(p.grad, g.sum(0), **tol(dtype))
    # the balancer's own parameters: gradient of sum_i transform(L)_i
    for p, g in zip(bal_params, ref_bal, strict=True):
        torch.testing.assert_close(p.grad, g.sum(0), **tol(dtype))


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_gramian_passed_to_balancer_matches_reference(mode, dtype, device):
    model = make_model(2, dtype, device)
    x, targets = make_data(3, dtype, device)
    balancer = FixedAlpha(2, [1.0, 1.0])
    z, losses = model(x, targets)
    trunk = list(model.trunk.parameters())
    if mode == "feature":
        g = per_term(losses, [z])[0].reshape(2, -1).to(torch.float64)
    else:
        g = torch.cat([t.reshape(2, -1) for t in per_term(losses, trunk)], 1).to(torch.float64)
    lossbalance.backward(losses, balancer, trunk, features=z, mode=mode)
    torch.testing.assert_close(balancer.gramians[-1], g @ g.T, **tol(dtype))


class Counter(torch.autograd.Function):
    """Identity whose backward counts how often autograd runs through it."""

    @staticmethod
    def forward(ctx, x, counts, key):
        ctx.counts, ctx.key = counts, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.counts[ctx.key] = ctx.counts.get(ctx.key, 0) + 1
        return g, None, None


@pytest.mark.parametrize(
    ("mode", "head_passes", "trunk_passes"),
    # gramian (lossbalance.engine._autogram): one pass per term from the losses to the trunk's
    # layer outputs, then one weighted pass that reaches every layer (no double backward)
    [("exact", 1, 3), ("batched", 1, 1), ("gramian", 2, 4), ("feature", 1, 1)],
)
@pytest.mark.parametrize("kind", ["fixed", "learned-scale"])
def test_backward_passes_per_head_and_trunk(mode, head_passes, trunk_passes, kind, dtype, device):
    # pass i differentiates L_i alone: no zero gradients pushed through the other heads
    tasks = ("reg", "cls", "l1")
    model = make_model(42, dtype, device, tasks)
    x, targets = make_data(43, dtype, device, tasks)
    counts: dict[str, int] = {}
    z = Counter.apply(model.trunk(x), counts, "trunk")
    losses = []
    for i, (head, y) in enumerate(zip(model.heads, targets, strict=True)):
        out = Counter.apply(head(z), counts, f"head{i}")
        loss = (
            nn.functional.cross_entropy(out, y) if i == 1 else (out.squeeze(-1) - y).pow(2).mean()
        )
        losses.append(loss)
    balancer = FixedAlpha(3, [1.0, 2.0, 3.0]) if kind == "fixed" else LearnedScale(3)
    balancer = balancer.to(device=z.device, dtype=z.dtype)
    lossbalance.backward(losses, balancer, model.trunk, features=z, mode=mode)
    expected = {f"head{i}": head_passes for i in range(3)}
    expected["trunk"] = trunk_passes
    assert counts == expected


def test_feature_mode_trunk_gradient_is_vjp_of_combined_z_gradient(dtype, device):
    model = make_model(4, dtype, device)
    x, targets = make_data(5, dtype, device)
    balancer = InverseNorm(2)
    z, losses = model(x, targets)
    dz = per_term(losses, [z])[0]  # (K, B, D)
    gram = dz.reshape(2, -1).to(torch.float64) @ dz.reshape(2, -1).to(torch.float64).T
    inv = gram.diagonal().rsqrt()
    alpha = inv / inv.sum()
    trunk = list(model.trunk.parameters())
    by_hand = torch.autograd.grad(z, trunk, grad_outputs=combine(alpha, dz), retain_graph=True)
    w = lossbalance.backward(losses, balancer, model.trunk, features=z)  # auto -> feature
    torch.testing.assert_close(w, alpha, **tol(dtype))
    for p, g in zip(trunk, by_hand, strict=True):
        torch.testing.assert_close(p.grad, g, **tol(dtype))


def test_feature_mode_non_shared_trunk_leaves_get_the_sum(dtype, device):
    model = make_model(6, dtype, device)
    x, targets = make_data(7, dtype, device)
    z, losses = model(x, targets)
    first = list(model.trunk[0].parameters())  # not declared shared: task-specific rule
    second = list(model.trunk[2].parameters())
    ref_first = per_term(losses, first)
    ref_second = per_term(losses, second)
    w = lossbalance.backward(losses, FixedAlpha(2, [0.3, 2.0]), second, features=z)
    for p, g in zip(first, ref_first, strict=True):
        torch.testing.assert_close(p.grad, g.sum(0), **tol(dtype))
    for p, g in zip(second, ref_second, strict=True):
        torch.testing.assert_close(p.grad, combine(w, g), **tol(dtype))
    assert z.grad_fn is not None and all(p.grad is not None for p in model.heads.parameters())


def test_feature_mode_shared_weight_used_by_heads(dtype, device):
    # a shared parameter reached both through z and directly by a head
    torch.manual_seed(0)
    w_shared = torch.randn(3, 3, dtype=dtype, device=device, requires_grad=True)
    head = torch.randn(3, dtype=dtype, device=device, requires_grad=True)
    x = torch.randn(5, 3, dtype=dtype, device=device)
    z = (x @ w_shared).tanh()
    losses = [(z @ head).pow(2).mean(), (z @ w_shared).sum().sin()]
    ref = per_term(losses, [w_shared, head])
    with pytest.warns(LossBalanceWarning, match="tied between trunk and heads"):
        alpha = lossbalance.backward(losses, FixedAlpha(2, [0.25, 4.0]), [w_shared], features=z)
    torch.testing.assert_close(w_shared.grad, combine(alpha, ref[0]), **tol(dtype))
    torch.testing.assert_close(head.grad, ref[1].sum(0), **tol(dtype))


def test_feature_mode_split_features(dtype, device):
    # z1, z2 are two outputs of one operation; only z1 passed: z2's path bypasses it
    torch.manual_seed(1)
    lin = nn.Linear(3, 6).to(device=device, dtype=dtype)
    heads = [torch.randn(3, dtype=dtype, device=device, requires_grad=True) for _ in range(2)]
    x = torch.randn(7, 3, dtype=dtype, device=device)
    shared = list(lin.parameters())

    def forward():
        z1, z2 = lin(x).tanh().split([3, 3], dim=1)
        return z1, z2, [(z1 @ heads[0]).pow(2).mean(), (z1 @ heads[1] * z2.sum(1)).mean()]

    z1, z2, losses = forward()
    ref = per_term(losses, shared)
    with pytest.warns(LossBalanceWarning, match="without going through features"):
        w = lossbalance.backward(losses, FixedAlpha(2, [0.5, 3.0]), shared, features=z1)
    for p, g in zip(shared, ref, strict=True):
        torch.testing.assert_close(p.grad, combine(w, g), **tol(dtype))
    for p in shared:
        p.grad = None
    z1, z2, losses = forward()
    w = lossbalance.backward(losses, FixedAlpha(2, [0.5, 3.0]), shared, features=[z1, z2])
    for p, g in zip(shared, ref, strict=True):
        torch.testing.assert_close(p.grad, combine(w, g), **tol(dtype))


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_accumulates_into_existing_grad(mode, dtype, device):
    model = make_model(8, dtype, device)
    x, targets = make_data(9, dtype, device)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    z, losses = model(x, targets)
    ref = per_term(losses, list(model.parameters()))
    balancer = FixedAlpha(2, [0.5, 2.0])
    w = lossbalance.backward(losses, balancer, model.trunk, features=z, mode=mode)
    n_trunk = len(list(model.trunk.parameters()))
    for j, (p, g) in enumerate(zip(model.parameters(), ref, strict=True)):
        expected = combine(w, g) if j < n_trunk else g.sum(0)
        torch.testing.assert_close(p.grad, 1 + expected, **tol(dtype))


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_retain_graph(mode, dtype, device):
    model = make_model(10, dtype, device)
    x, targets = make_data(11, dtype, device)
    z, losses = model(x, targets)
    balancer = FixedAlpha(2, [1.0, 0.5])
    lossbalance.backward(losses, balancer, model.trunk, features=z, mode=mode, retain_graph=True)
    once = grads_of(model)
    lossbalance.backward(losses, balancer, model.trunk, features=z, mode=mode)
    for a, b in zip(once, grads_of(model), strict=True):
        torch.testing.assert_close(2 * a, b, **tol(dtype))
    if mode != "batched":  # the vectorised pass always keeps the graph (see term_grads)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            lossbalance.backward(losses, balancer, model.trunk, features=z, mode=mode)


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_runs_under_no_grad(mode, dtype, device):
    model = make_model(12, dtype, device)
    x, targets = make_data(13, dtype, device)
    z, losses = model(x, targets)
    ref = per_term(losses, list(model.trunk.parameters()))
    with torch.no_grad():
        w = lossbalance.backward(
            losses, LearnedScale(2).to(device, dtype), model.trunk, features=z, mode=mode
        )
    assert all(p.grad is not None for p in model.parameters())
    scale = torch.linspace(-0.3, 0.4, 2).to(device, dtype).exp()  # as the parameter s
    for p, g in zip(model.trunk.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, combine(w * scale, g), **tol(dtype))


def test_shared_as_module_list_or_generator_agree(dtype, device):
    results = []
    for form in ("module", "list", "generator"):
        model = make_model(14, dtype, device)
        x, targets = make_data(15, dtype, device)
        _, losses = model(x, targets)
        shared = {
            "module": model.trunk,
            "list": list(model.trunk.parameters()),
            "generator": model.trunk.parameters(),
        }[form]
        lossbalance.backward(losses, InverseNorm(2), shared)
        results.append(grads_of(model))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_frozen_and_unreached_shared_params_get_no_grad(dtype, device):
    model = make_model(16, dtype, device)
    model.trunk[0].weight.requires_grad_(False)
    unreached = nn.Parameter(torch.zeros(3, dtype=dtype, device=device))
    x, targets = make_data(17, dtype, device)
    _, losses = model(x, targets)
    lossbalance.backward(losses, FixedAlpha(2, [1.0, 1.0]), [*model.trunk.parameters(), unreached])
    assert model.trunk[0].weight.grad is None and unreached.grad is None
    assert model.trunk[0].bias.grad is not None


def test_last_weights_set_when_balancer_does_not_record(dtype, device):
    model = make_model(18, dtype, device)
    x, targets = make_data(19, dtype, device)
    _, losses = model(x, targets)
    balancer = NoRecord(2)
    w = lossbalance.backward(losses, balancer, model.trunk)
    torch.testing.assert_close(w, torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(balancer.last_weights, w)


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_single_term(mode, dtype, device):
    model = make_model(36, dtype, device, ("reg",))
    x, targets = make_data(37, dtype, device, ("reg",))
    z, losses = model(x, targets)
    ref = per_term(losses, list(model.parameters()))
    w = lossbalance.backward(losses, FixedAlpha(1, [0.5]), model.trunk, features=z, mode=mode)
    n_trunk = len(list(model.trunk.parameters()))
    for j, (p, g) in enumerate(zip(model.parameters(), ref, strict=True)):
        torch.testing.assert_close(p.grad, (w[0] if j < n_trunk else 1) * g[0], **tol(dtype))


def test_mapping_of_losses(dtype, device):
    model = make_model(20, dtype, device)
    x, targets = make_data(21, dtype, device)
    _, losses = model(x, targets)
    ref = per_term(losses, list(model.trunk.parameters()))
    w = lossbalance.backward(
        {"reg": losses[0], "cls": losses[1]}, FixedAlpha(2, [3.0, 1.0]), model.trunk
    )
    for p, g in zip(model.trunk.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, combine(w, g), **tol(dtype))


def test_written_grads_are_not_aliased_and_follow_param_layout(dtype, device):
    a = torch.zeros(3, dtype=dtype, device=device, requires_grad=True)
    b = torch.zeros(3, dtype=dtype, device=device, requires_grad=True)
    losses = [(a + b).sum(), (2 * (a + b)).sum()]  # autograd hands a and b one expanded tensor
    lossbalance.backward(losses, DoubleLoss(2))
    assert a.grad.data_ptr() != b.grad.data_ptr()
    assert a.grad.stride() == a.stride()
    a.grad.mul_(0)  # in place, like clip_grad_norm_
    torch.testing.assert_close(b.grad, torch.full_like(b, 6.0))


# --------------------------------------------------------------------------- loss level


def test_loss_level_writes_weighted_sum(dtype, device):
    model = make_model(22, dtype, device, ("reg", "cls", "l1"))
    x, targets = make_data(23, dtype, device, ("reg", "cls", "l1"))
    balancer = LearnedLoss(3).to(device=device, dtype=dtype)
    _, losses = model(x, targets)
    params = list(model.parameters())
    ref = per_term(losses, params)
    w = lossbalance.backward(losses, balancer, shared=model.trunk)  # shared ignored
    torch.testing.assert_close(w, (-balancer.s.detach()).exp())
    for p, g in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, combine(w, g), **tol(dtype))
    expected_s = 1 - (-balancer.s.detach()).exp() * torch.stack(losses).detach()
    torch.testing.assert_close(balancer.s.grad, expected_s, **tol(dtype))


def test_loss_level_weights_by_autograd_when_not_recorded(dtype, device):
    model = make_model(24, dtype, device)
    x, targets = make_data(25, dtype, device)
    _, losses = model(x, targets)
    balancer = DoubleLoss(2)
    w = lossbalance.backward(losses, balancer)
    torch.testing.assert_close(w, torch.full((2,), 2.0, dtype=dtype, device=device))
    torch.testing.assert_close(balancer.last_weights, w)


# --------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_nan_loss_skips_without_touching_grad_or_state(mode, dtype, device):
    model = make_model(26, dtype, device)
    x, targets = make_data(27, dtype, device)
    z, losses = model(x, targets)
    losses[1] = losses[1] * float("nan")
    balancer = FixedAlpha(2, [1.0, 1.0])
    with pytest.warns(LossBalanceWarning, match="loss is not finite.*NaN weights"):
        w = lossbalance.backward(losses, balancer, model.trunk, features=z, mode=mode)
    assert w.shape == (2,) and w.isnan().all()
    assert all(p.grad is None for p in model.parameters())
    assert balancer.calls == 0 and balancer.last_weights is None


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_nan_gradient_skips_before_balancer(mode, dtype, device):
    model = make_model(28, dtype, device)
    x, targets = make_data(29, dtype, device)
    z, losses = model(x, targets)
    bad = (z.sum() * 0).abs().sqrt()  # value 0, gradient 0 * inf = nan
    balancer = FixedAlpha(2, [1.0, 1.0])
    with pytest.warns(LossBalanceWarning, match="not finite"):
        w = lossbalance.backward([losses[0], bad], balancer, model.trunk, features=z, mode=mode)
    assert w.isnan().all()
    assert all(p.grad is None for p in model.parameters())
    assert balancer.calls == 0


def test_nan_weights_skip(dtype, device):
    model = make_model(30, dtype, device)
    x, targets = make_data(31, dtype, device)
    _, losses = model(x, targets)
    with pytest.warns(LossBalanceWarning, match="non-finite weights"):
        w = lossbalance.backward(losses, NaNWeights(2), model.trunk)
    assert w.isnan().all()
    assert all(p.grad is None for p in model.parameters())


def test_loss_level_nan_gradient_skips(dtype, device):
    model = make_model(32, dtype, device)
    x, targets = make_data(33, dtype, device)
    z, losses = model(x, targets)
    bad = (z.sum() * 0).abs().sqrt()
    with pytest.warns(LossBalanceWarning, match="gradient is not finite"):
        w = lossbalance.backward([losses[0], bad], lossbalance.Uniform(2))
    assert w.isnan().all()
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- errors


def test_errors(dtype, device):
    model = make_model(34, dtype, device)
    x, targets = make_data(35, dtype, device)
    z, losses = model(x, targets)
    grad_bal = FixedAlpha(2, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"gradient-level balancer: pass shared=\.\.\."):
        lossbalance.backward(losses, grad_bal)
    with pytest.raises(
        TypeError, match=r"got the string 'mgda'.*lossbalance\.create\('mgda', num_terms\)"
    ):
        lossbalance.backward(losses, "mgda", model.trunk)
    with pytest.raises(TypeError, match="must be a lossbalance Balancer instance, got Linear"):
        lossbalance.backward(losses, nn.Linear(1, 1), model.trunk)
    with pytest.raises(ValueError, match="losses is empty"):
        lossbalance.backward([], grad_bal, model.trunk)
    with pytest.raises(ValueError, match=r"loss term 1 must be a scalar tensor, got shape \(2,\)"):
        lossbalance.backward(
            [losses[0], z[0, :2].sum() * torch.ones(2, dtype=dtype, device=device)],
            grad_bal,
            model.trunk,
        )
    with pytest.raises(ValueError, match="loss term 0 does not require grad"):
        lossbalance.backward([losses[0].detach(), losses[1]], grad_bal, model.trunk)
    with pytest.raises(ValueError, match="was built for 3 loss terms, got 2"):
        lossbalance.backward(losses, FixedAlpha(3, [1.0, 1.0, 1.0]), model.trunk)
    with pytest.raises(ValueError, match=r"Invalid mode: 'fast'"):
        lossbalance.backward(losses, grad_bal, model.trunk, mode="fast")
    with pytest.raises(ValueError, match="mode='feature' needs features=z"):
        lossbalance.backward(losses, grad_bal, model.trunk, mode="feature")
    with pytest.raises(
        ValueError, match=r"features\[0\] \(shape \(16, 8\)\) does not require grad"
    ):
        lossbalance.backward(losses, grad_bal, model.trunk, features=z.detach())
    with pytest.raises(ValueError, match="is not a leaf tensor"):
        lossbalance.backward(losses, grad_bal, [z])
    with pytest.raises(ValueError, match="shared contains no tensor that requires grad"):
        lossbalance.backward(losses, grad_bal, [torch.zeros(2)])
    with pytest.raises(TypeError, match=r"shared\[0\] must be a Tensor, got str"):
        lossbalance.backward(losses, grad_bal, ["w"])
    with pytest.raises(TypeError, match=r"shared must be an nn\.Module or an iterable of tensors"):
        lossbalance.backward(losses, grad_bal, 3)
    assert grad_bal.calls == 0
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- registry sweep

# Constructor arguments for registered methods that need some (create(name, K, **kwargs)).
METHOD_KWARGS = {"fixed": lambda k: {"weights": [1.0 + i / 2 for i in range(k)]}}
SWEEP = [
    name
    for name in lossbalance.available_methods()
    if lossbalance.get_method(name).needs != "optimizer"
]


def build(name: str, k: int, dtype, device):
    kwargs = METHOD_KWARGS.get(name, lambda _k: {})(k)
    balancer = lossbalance.create(name, k, **kwargs)
    assert isinstance(balancer, lossbalance.Balancer), f"{name} did not build a Balancer"
    return balancer.to(device=device, dtype=dtype)


def make_optimizer(model, balancer):
    groups = [{"params": list(model.parameters())}]
    own = list(balancer.parameters())
    if own:
        groups.append({"params": own})
    return torch.optim.Adam(groups, lr=1e-2)


def train_step(model, balancer, opt, x, targets, mode):
    opt.zero_grad()
    z, losses = model(x, targets)
    w = lossbalance.backward(
        losses, balancer, model.trunk, features=z if mode == "feature" else None, mode=mode
    )
    opt.step()
    return w, torch.stack(losses).detach()


def modes_for(balancer) -> list[str]:
    return ["exact", "feature", "gramian"] if balancer.kind == "gradient" else ["auto"]


# The methods the sweep must cover: a missing one fails here instead of silently
# shrinking the parametrised tests below.
EXPECTED_METHODS = {
    "db-mtl",
    "dwa",
    "dynamic",
    "excess-mtl",
    "fixed",
    "gls",
    "grad-normalization",
    "graddrop",
    "gradnorm",
    "gradvac",
    "imtl",
    "imtl-g",
    "imtl-l",
    "initial-loss",
    "metabalance",
    "mgda",
    "moco",
    "modo",
    "pcgrad",
    "sdmgrad",
    "uncertainty",
    "uniform",
}


def test_sweep_covers_every_method():
    missing = EXPECTED_METHODS - set(SWEEP)
    assert not missing, f"not registered (or needs == 'optimizer'): {sorted(missing)}"
    kinds = {build(name, 2, torch.float64, "cpu").kind for name in SWEEP}
    assert kinds == {"loss", "gradient"}


@pytest.mark.parametrize("name", SWEEP)
def test_registered_weights_reproduce_written_grads(name, dtype, device):
    tasks = ("reg", "cls", "l1")
    for mode in modes_for(build(name, 3, dtype, device)):
        model = make_model(40, dtype, device, tasks)
        balancer = build(name, 3, dtype, device)
        opt = make_optimizer(model, balancer)
        x, targets = make_data(41, dtype, device, tasks)
        for _ in range(3):  # past any first-step initialisation of the method's state
            train_step(model, balancer, opt, x, targets, mode)
        opt.zero_grad()
        z, losses = model(x, targets)
        stacked = torch.stack(losses)
        terms = balancer.transform(stacked) if balancer.kind == "gradient" else stacked
        trunk, heads = list(model.trunk.parameters()), list(model.heads.parameters())
        ref_trunk = per_term(list(terms.unbind(0)), trunk)
        ref_heads = per_term(list(terms.unbind(0)), heads)
        w = lossbalance.backward(
            losses, balancer, model.trunk, features=z if mode == "feature" else None, mode=mode
        )
        assert w.shape == (3,) and torch.isfinite(w).all(), (name, mode, w)
        torch.testing.assert_close(balancer.last_weights.to(w), w)
        # a VectorBalancer (MoCo, GradDrop, ...) writes its own combination into the trunk,
        # not sum_i w_i g_i: its tests check that; the heads' gradients are the same rule
        if not getattr(balancer, "needs_grads", False):
            for p, g in zip(trunk, ref_trunk, strict=True):
                torch.testing.assert_close(
                    p.grad, combine(w, g), **tol(dtype), msg=f"{name} {mode}"
                )
        for p, g in zip(heads, ref_heads, strict=True):
            weighted = balancer.kind == "loss" or getattr(balancer, "weights_heads", False)
            expected = combine(w, g) if weighted else g.sum(0)
            torch.testing.assert_close(p.grad, expected, **tol(dtype), msg=f"{name} {mode}")


@pytest.mark.parametrize("name", SWEEP)
def test_registered_training_reduces_total_loss(name, dtype, device):
    for mode in modes_for(build(name, 2, dtype, device))[:2]:
        model = make_model(50, dtype, device, ("reg", "reg"))
        balancer = build(name, 2, dtype, device)
        opt = make_optimizer(model, balancer)
        x, targets = make_data(51, dtype, device, ("reg", "reg"), batch=32)
        _, first = train_step(model, balancer, opt, x, targets, mode)
        for _ in range(49):
            train_step(model, balancer, opt, x, targets, mode)
        with torch.no_grad():
            _, losses = model(x, targets)
        total = torch.stack(losses).sum()
        assert total < 0.5 * first.sum(), (name, mode, first.tolist(), total.item())


@pytest.mark.parametrize("name", SWEEP)
def test_registered_state_dict_round_trip(name, dtype, device):
    for mode in modes_for(build(name, 2, dtype, device))[:2]:
        x, targets = make_data(61, dtype, device, batch=16)
        model = make_model(60, dtype, device)
        balancer = build(name, 2, dtype, device)
        opt = make_optimizer(model, balancer)
        for _ in range(4):
            train_step(model, balancer, opt, x, targets, mode)
        saved = copy.deepcopy((model.state_dict(), balancer.state_dict(), opt.state_dict()))

        model2 = make_model(99, dtype, device)
        balancer2 = build(name, 2, dtype, device)
        opt2 = make_optimizer(model2, balancer2)
        model2.load_state_dict(saved[0])
        balancer2.load_state_dict(saved[1])
        opt2.load_state_dict(saved[2])

        outs = []
        for m, b, o in ((model, balancer, opt), (model2, balancer2, opt2)):
            torch.manual_seed(123)
            random.seed(123)
            steps = [train_step(m, b, o, x, targets, mode)[0] for _ in range(2)]
            outs.append((steps, [p.detach().clone() for p in m.parameters()], b.state_dict()))
        (w1, p1, s1), (w2, p2, s2) = outs
        for a, b in zip(w1, w2, strict=True):
            assert torch.equal(a, b), (name, mode)
        for a, b in zip(p1, p2, strict=True):
            assert torch.equal(a, b), (name, mode)
        assert_same_state(s1, s2, (name, mode))


def assert_same_state(a, b, where) -> None:
    """Bit-identical nested state (tensors, dicts, lists, numbers)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], (*where, key))
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, (*where, i))
    else:
        assert a == b, where


# --------------------------------------------------------------------------- docs


def test_docstring_examples_run():
    result = doctest.testmod(backward_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def test_public_api_exports_backward():
    assert lossbalance.backward is backward_module.backward
    assert "backward" in lossbalance.__all__
