"""Per-term gradient variants of ``lossbalance.engine._vjp`` against the sequential reference."""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

import lossbalance.engine._vjp as vjp
from lossbalance import LossBalanceWarning

# --------------------------------------------------------------------------- reference


def reference(losses: list[Tensor], params: list[Tensor]) -> list[Tensor | None]:
    """Plain loop: one autograd.grad per term; None where no term reaches a parameter."""
    rows = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses
    ]
    out: list[Tensor | None] = []
    for j, p in enumerate(params):
        col = [row[j] for row in rows]
        if all(g is None for g in col):
            out.append(None)
        else:
            out.append(torch.stack([torch.zeros_like(p) if g is None else g for g in col]))
    return out


def assert_same(got: list[Tensor | None], want: list[Tensor | None], *, none_as_zero=False):
    assert len(got) == len(want)
    for j, (g, w) in enumerate(zip(got, want, strict=True)):
        if w is None:
            if none_as_zero and g is not None:
                assert not g.count_nonzero(), f"param {j}: expected zeros"
            else:
                assert g is None, f"param {j}: expected None"
            continue
        assert g is not None, f"param {j}: got None"
        assert g.shape == w.shape
        tight = g.dtype == torch.float64
        torch.testing.assert_close(
            g, w, rtol=1e-10 if tight else 1e-4, atol=1e-12 if tight else 1e-5
        )


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU())
        self.out = nn.Linear(16, k)

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.out(self.net(x)), dim=1)


class SmallCNN(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(6 * 3 * 3, k)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return F.log_softmax(self.fc(torch.flatten(self.drop(x), 1)), dim=1)


class Heads(nn.Module):
    """Trunk, three heads; term 3 is a penalty on head 2 only, term 4 a penalty on a trunk
    weight (reached around the trunk output too), and one parameter nothing reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(3))
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        losses = [head(z).square().mean() for head in self.heads[:2]]
        losses.append(self.heads[2].weight.square().sum())
        losses.append(0.1 * self.trunk[0].weight.abs().sum())
        return z, losses


def class_terms(logp: Tensor, y: Tensor, k: int) -> list[Tensor]:
    nll = F.nll_loss(logp, y, reduction="none")
    sums = torch.zeros(k, dtype=nll.dtype, device=nll.device).index_add(0, y, nll)
    return list((sums / len(y)).unbind())


def build(name: str, k: int, device, dtype):
    """(model, forward() -> (output, losses), loss_fn for torch.func, inputs)."""
    torch.manual_seed(0)
    if name == "mlp":
        model = MLP(k)
        x = torch.randn(12, 5)
    else:
        model = SmallCNN(k)
        x = torch.randn(12, 1, 10, 10)
    model = model.to(device, dtype).eval()
    x = x.to(device, dtype)
    y = (torch.arange(12) % k).to(device)

    def forward():
        out = model(x)
        return out, class_terms(out, y, k)

    def loss_fn(out):
        return torch.stack(class_terms(out, y, k))

    return model, forward, loss_fn, x


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("k", [1, 10])
def test_every_variant_equals_sequential(name, k, device, dtype):
    model, forward, loss_fn, x = build(name, k, device, dtype)
    params = list(model.parameters())
    want = reference(forward()[1], params)
    assert_same(vjp.sequential_term_grads(forward()[1], params), want)
    assert_same(vjp.batched_term_grads(forward()[1], params), want)
    out, losses = forward()
    assert_same(vjp.two_stage_term_grads(losses, params, out), want)
    out, losses = forward()
    assert_same(vjp.two_stage_term_grads(losses, params, out, stage1="batched"), want)
    assert_same(vjp.two_stage_term_grads(forward()[1], params), want)  # split found
    values, grads = vjp.func_term_grads(model, x, loss_fn)
    torch.testing.assert_close(values, torch.stack(forward()[1]).detach())
    assert_same(grads, want)
    for mode in vjp.VJP_MODES:
        assert_same(vjp.vjp_term_grads(forward()[1], params, mode), want)


def test_heads_zeros_and_none_consistent(device, dtype):
    torch.manual_seed(1)
    model = Heads().to(device, dtype)
    x = torch.randn(6, 4, device=device, dtype=dtype)
    params = list(model.parameters())
    z, losses = model(x)
    want = reference(losses, params)
    index = {id(p): j for j, p in enumerate(params)}
    assert want[index[id(model.unused)]] is None
    # head 0's weight: zero rows for every term but term 0
    w0 = index[id(model.heads[0].weight)]
    assert want[w0] is not None and not want[w0][1:].count_nonzero()

    for fn in (
        lambda: vjp.sequential_term_grads(model(x)[1], params),
        lambda: vjp.batched_term_grads(model(x)[1], params),
        lambda: vjp.two_stage_term_grads(model(x)[1], params),  # no dominator: batched
    ):
        assert_same(fn(), want)
    z, losses = model(x)
    assert_same(vjp.two_stage_term_grads(losses, params, z), want)
    z, losses = model(x)
    assert_same(vjp.two_stage_term_grads(losses, params, z, stage1="batched"), want)
    z, losses = model(x)
    assert_same(vjp.two_stage_term_grads(losses, params, get_gradient_edge(z)), want)

    def loss_fn(out):
        return torch.stack(out[1])

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, inp):
            return self.inner(inp)

    values, grads = vjp.func_term_grads(Wrapped(model), x, loss_fn)
    assert values.shape == (4,)
    assert_same(grads, want, none_as_zero=True)


def test_find_shared_output_is_the_logits(device, dtype):
    torch.manual_seed(0)
    model = MLP(3).to(device, dtype)
    x = torch.randn(4, 5, device=device, dtype=dtype)
    logits = model.out(model.net(x))
    losses = list(F.log_softmax(logits, 1).sum(0).unbind())
    edges = vjp.find_shared_output(losses, list(model.parameters()))
    assert edges is not None and len(edges) == 1
    assert edges[0].node is logits.grad_fn and edges[0].output_nr == logits.output_nr


def test_find_shared_output_none_without_dominator(device, dtype):
    torch.manual_seed(0)
    model = Heads().to(device, dtype)
    _, losses = model(torch.randn(3, 4, device=device, dtype=dtype))
    assert vjp.find_shared_output(losses[:2], list(model.parameters())) is None
    w = torch.ones(2, device=device, dtype=dtype, requires_grad=True)
    assert vjp.find_shared_output([w.sum()], [w]) is None


def test_losses_that_reach_nothing(device, dtype):
    w = torch.tensor([1.0, 2.0], device=device, dtype=dtype, requires_grad=True)
    const = torch.tensor(3.0, device=device, dtype=dtype)
    losses = [(w * w).sum(), const]
    want = [torch.stack([2 * w.detach(), torch.zeros_like(w)])]
    for mode in vjp.VJP_MODES:
        assert_same(vjp.vjp_term_grads(losses, [w], mode, retain_graph=True), want)
    none = [const, const * 2]
    for mode in vjp.VJP_MODES:
        assert vjp.vjp_term_grads(none, [w], mode) == [None]


def test_choose_mode_picks_an_exact_mode_and_caches(device, dtype):
    vjp.clear_choices()
    model, forward, _, _ = build("mlp", 10, device, dtype)
    params = list(model.parameters())
    want = reference(forward()[1], params)
    choice = vjp.choose_mode(forward()[1], params, repeats=2)
    assert choice.mode in vjp.VJP_MODES and not choice.cached
    assert set(choice.times) == set(vjp.VJP_MODES)
    assert_same(choice.grads, want)
    again = vjp.choose_mode(forward()[1], params)
    assert again.cached and again.mode == choice.mode and again.key == choice.key
    assert_same(again.grads, want)
    forced = vjp.choose_mode(forward()[1], params, candidates=["two_stage"], key="forced")
    assert forced.mode == "two_stage"
    assert_same(forced.grads, want)
    vjp.clear_choices()
    assert not vjp.choose_mode(forward()[1], params, repeats=1).cached
    # a near-total margin keeps the first candidate unless another is 100x faster
    lean = vjp.choose_mode(
        forward()[1], params, candidates=["two_stage", "sequential"], margin=0.99, key="m"
    )
    assert lean.mode == "two_stage" and set(lean.times) == {"two_stage", "sequential"}
    assert_same(lean.grads, want)
    one = vjp.choose_mode(forward()[1][:1], params)
    assert one.mode == "sequential" and one.times == {}
    assert_same(one.grads, [None if g is None else g[:1] for g in want])
    vjp.clear_choices()


def test_choose_mode_drops_failing_and_wrong_candidates(device, dtype, monkeypatch):
    vjp.clear_choices()
    model, forward, _, _ = build("mlp", 3, device, dtype)
    params = list(model.parameters())
    want = reference(forward()[1], params)

    def broken(*args, **kwargs):
        raise RuntimeError("no batching rule")

    real_two_stage = vjp.two_stage_term_grads

    def wrong(*args, **kwargs):
        return [None if g is None else g * 2 for g in real_two_stage(*args, **kwargs)]

    monkeypatch.setattr(vjp, "batched_term_grads", broken)
    monkeypatch.setattr(vjp, "two_stage_term_grads", wrong)
    with pytest.warns(LossBalanceWarning) as record:
        choice = vjp.choose_mode(forward()[1], params, repeats=2)
    messages = " ".join(str(r.message) for r in record)
    assert "'batched' failed" in messages and "'two_stage' disagrees" in messages
    assert choice.mode == "sequential" and set(choice.times) == {"sequential"}
    assert_same(choice.grads, want)
    vjp.clear_choices()


def test_errors(device, dtype):
    w = torch.ones(2, device=device, dtype=dtype, requires_grad=True)
    with pytest.raises(ValueError, match="losses is empty"):
        vjp.batched_term_grads([], [w])
    with pytest.raises(ValueError, match=r"losses\[0\] has shape \(2,\)"):
        vjp.batched_term_grads([w * 2], [w])
    with pytest.raises(TypeError, match=r"losses\[1\] must be a Tensor"):
        vjp.batched_term_grads([w.sum(), 1.0], [w])
    with pytest.raises(ValueError, match=r"outputs\[0\] \(shape \(2,\)\) does not require grad"):
        vjp.two_stage_term_grads([w.sum()], [w], w.detach())
    with pytest.raises(ValueError, match="Invalid stage1"):
        vjp.two_stage_term_grads([w.sum()], [w], w, stage1="loop")
    with pytest.raises(ValueError, match="Invalid mode"):
        vjp.vjp_term_grads([w.sum()], [w], "func")
    with pytest.raises(ValueError, match=r"Invalid repeats: 0 \(expected repeats >= 1\)"):
        vjp.choose_mode([w.sum()], [w], repeats=0)
    with pytest.raises(ValueError, match=r"Invalid margin: 1.0 \(expected 0 <= margin < 1\)"):
        vjp.choose_mode([w.sum()], [w], margin=1.0)
    with pytest.raises(ValueError, match="Invalid candidate"):
        vjp.choose_mode([w.sum()], [w], candidates=["fast"])


def test_docstring_examples():
    vjp.clear_choices()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = doctest.testmod(vjp, optionflags=doctest.NORMALIZE_WHITESPACE)
    vjp.clear_choices()
    assert result.failed == 0 and result.attempted > 0
