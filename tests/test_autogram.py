"""The Gramian engine of mode="gramian" (``lossbalance.engine._autogram``) against a float64 loop.

Ground truth: the per-term gradients of every parameter by ``torch.autograd.grad`` one
term at a time, concatenated, ``J J^T``. Each case is built so that the engine's
recognised operations (and its fallback) are exercised where they can go wrong; the
number of fallback parameters is checked too, so that a case meant for a recognised
operation cannot pass through the fallback unnoticed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import TorchDispatchMode

import lossbalance
from lossbalance.engine._autogram import autogram

D64 = torch.float64


def reference(losses: list[Tensor], params: list[Tensor]) -> Tensor:
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(params, grads, strict=True)
                ]
            ).to(D64)
        )
    jac = torch.stack(rows)
    return jac @ jac.T


def check(losses: list[Tensor], params: list[Tensor], fallbacks: int | None) -> int:
    res = autogram(losses, params, [], None)
    gram, nf = res.gramian, res.fallbacks
    want = reference(losses, params)
    torch.testing.assert_close(gram, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    assert fallbacks is None or nf == fallbacks
    return nf


def terms(out: Tensor, k: int = 4) -> list[Tensor]:
    flat = out.reshape(out.shape[0], -1)
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(flat.shape[1], k, generator=gen, dtype=flat.dtype)
    y = flat @ mix
    return [
        y[:, 0].pow(2).mean(),
        y[:, 1].tanh().sum(),
        *(y[:, j].sin().mean() for j in range(2, k)),
    ]


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(D64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("batch", [3, 300])  # 3: through x x^T; 300: row by row
def test_linear_layers_ghost_and_direct(batch):
    model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 5, bias=False))
    x = torch.randn(batch, 7)  # the first layer's input does not require grad
    check(terms(model(x)), list(model.parameters()), fallbacks=0)


def test_linear_on_3d_input_and_broadcast_bias():
    lin = nn.Linear(6, 4)
    x = torch.randn(2, 5, 6, requires_grad=True)
    check(terms(lin(x).tanh()), [*lin.parameters(), x], fallbacks=1)  # x: not a layer's


def test_addmm_scalars_and_weight_on_the_left():
    w = torch.randn(4, 6, requires_grad=True)
    v = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    x = torch.randn(6, 5)
    h = torch.addmm(b, (w @ x).T, v, beta=0.5, alpha=2.0)  # w is mm's first operand
    check(terms(h.tanh()), [w, v, b], fallbacks=0)


def test_weight_sharing_and_a_parameter_in_two_layers():
    lin = nn.Linear(5, 5)
    other = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    h = lin(lin(x).tanh())  # the same layer twice
    reg = other.weight.pow(2).sum()  # other.weight also outside its layer
    losses = terms(other(h))
    losses[0] = losses[0] + reg
    check(losses, [*lin.parameters(), *other.parameters()], fallbacks=3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_convolutions_with_stride_groups_dilation(channels_last):
    conv = nn.Conv2d(4, 6, 3, stride=2, groups=2, dilation=2, padding=1)
    conv2 = nn.Conv2d(6, 3, 2, bias=False)
    conv1d = nn.Conv1d(3, 2, 3, stride=2)
    x = torch.randn(2, 4, 11, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        conv = conv.to(memory_format=torch.channels_last)
    h = conv2(conv(x).relu())
    out = conv1d(h.flatten(2))
    params = [*conv.parameters(), *conv2.parameters(), *conv1d.parameters()]
    check(terms(out), params, fallbacks=0)


def test_embedding_with_repeats_and_padding():
    emb = nn.Embedding(12, 5, padding_idx=2)
    idx = torch.tensor([[1, 2, 1, 7], [2, 7, 11, 1]])
    check(terms(emb(idx).tanh()), list(emb.parameters()), fallbacks=0)


def test_norms_and_batch_norm_in_eval_through_the_fallback():
    ln = nn.LayerNorm((3, 4))
    bn = nn.BatchNorm2d(3)
    bn_eval = nn.BatchNorm1d(12).eval()
    x = torch.randn(5, 3, 3, 4)
    h = ln(bn(x))
    out = bn_eval(h.flatten(2).mean(-1).repeat(1, 4))
    params = [*ln.parameters(), *bn.parameters(), *bn_eval.parameters()]
    check(terms(out), params, fallbacks=2)  # running statistics: not recognised


def test_term_reaching_part_of_the_trunk_and_an_unreached_parameter():
    a, b, unused = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(2, 2)
    x = torch.randn(6, 4)
    z = a(x).tanh()
    out = b(z)
    losses = [out.pow(2).mean(), z.sum(), out[:, 1].sin().sum()]  # term 1 skips b
    gram = autogram(
        losses, [*a.parameters(), *b.parameters(), *unused.parameters()], [], None
    ).gramian
    torch.testing.assert_close(gram, reference(losses, [*a.parameters(), *b.parameters()]))


def test_unsupported_layers_through_the_fallback():
    prelu = nn.PReLU(4)
    gru = nn.GRU(4, 3, batch_first=True)
    x = torch.randn(2, 5, 4)
    out, _ = gru(prelu(x.transpose(1, 2)).transpose(1, 2))
    params = [*prelu.parameters(), *gru.parameters()]
    # PReLU's weight and the GRU's (a fused CPU kernel) mostly: whatever is recognised
    # inside the GRU's decomposition is exact as well
    assert check(terms(out), params, fallbacks=None) >= 2


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def test_once_differentiable_needs_no_fallback(recwarn):
    lin, head = nn.Linear(4, 6), nn.Linear(6, 3)
    out = head(_Tanh.apply(lin(torch.randn(5, 4))))
    params = [*lin.parameters(), *head.parameters()]
    gram = lossbalance.term_gramian(terms(out), params, mode="gramian", retain_graph=True)
    torch.testing.assert_close(gram, reference(terms(out), params))
    assert not [w for w in recwarn if issubclass(w.category, lossbalance.LossBalanceWarning)]


class _Largest(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_holds_k_gradients_of_a_layer():
    # a 256 x 256 layer on a batch of 4: K = 8 weight gradients would be 524k numbers; the
    # engine's largest tensor is K output gradients or x x^T
    k = 8
    lin, head = nn.Linear(256, 256), nn.Linear(256, k)
    out = head(lin(torch.randn(4, 256)).tanh())
    losses = [out[:, i].pow(2).sum() for i in range(k)]
    spy = _Largest()
    with spy:
        res = autogram(losses, list(lin.parameters()), list(head.parameters()), None)
    gram, nf = res.gramian, res.fallbacks
    assert nf == 0
    assert spy.largest < lin.weight.numel()
    torch.testing.assert_close(gram, reference(losses, list(lin.parameters())))


@pytest.mark.parametrize("method", ["imtl-g", "mgda", "upgrad", "pcgrad"])
def test_backward_matches_exact_mode(method):
    k = 3

    def run(mode: str) -> tuple[Tensor, list[Tensor]]:
        torch.manual_seed(3)
        trunk = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(36, 8), nn.Tanh()
        )
        heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(k))
        x = torch.randn(5, 2, 7, 7)
        z = trunk(x)
        losses = [h(z).pow(2).mean() * (i + 1) for i, h in enumerate(heads)]
        weights = lossbalance.backward(losses, lossbalance.create(method, k), trunk, mode=mode)
        return weights, [p.grad for p in [*trunk.parameters(), *heads.parameters()]]

    w_exact, g_exact = run("exact")
    w_gram, g_gram = run("gramian")
    torch.testing.assert_close(w_gram, w_exact, rtol=1e-9, atol=1e-12)
    for a, b in zip(g_gram, g_exact, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_float32_model_matches_exact_in_float32_rounding():
    torch.set_default_dtype(torch.float32)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    out = model(torch.randn(4, 16))
    losses = terms(out)
    params = list(model.parameters())
    gram = autogram(losses, params, [], None).gramian
    exact = lossbalance.term_gramian(losses, params, mode="exact", retain_graph=True)
    assert gram.dtype == D64
    torch.testing.assert_close(gram, exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max()))


def test_extra_leaves_get_weighted_sums():
    trunk, head = nn.Linear(3, 4), nn.Linear(4, 2)
    out = head(trunk(torch.randn(5, 3)).tanh())
    losses = [out[:, 0].pow(2).mean(), out[:, 1].sum()]
    c = torch.tensor([2.0, -1.0])
    sums = autogram(losses, list(trunk.parameters()), list(head.parameters()), c).sums
    for p, s in zip(head.parameters(), sums, strict=True):
        want = sum(
            ci * g
            for ci, g in zip(
                c,
                torch.autograd.grad(losses[0], p, retain_graph=True)
                + torch.autograd.grad(losses[1], p, retain_graph=True),
                strict=True,
            )
        )
        torch.testing.assert_close(s, want)


def test_sparse_embedding_raises_like_exact():
    emb = nn.Embedding(5, 3, sparse=True)
    out = emb(torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="parameter 0 received a sparse gradient"):
        autogram(terms(out, 2), list(emb.parameters()), [], None)


def test_functional_linear_without_module():
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(6, 4)
    check(terms(F.linear(x, w).sin()), [w], fallbacks=0)


def test_term_gramian_auto_uses_the_engine(monkeypatch):
    import lossbalance.engine._autogram as module

    calls = []
    original = module.autogram

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "autogram", spy)
    lin = nn.Linear(3, 4)
    z = lin(torch.randn(5, 3))
    losses = terms(z, 2)
    gram = lossbalance.term_gramian(losses, list(lin.parameters()), retain_graph=True)
    assert calls == [1]
    torch.testing.assert_close(gram, reference(losses, list(lin.parameters())))
    lossbalance.term_gramian(losses, list(lin.parameters()), features=z, retain_graph=True)
    assert calls == [1]  # features given: feature mode


def test_records_no_graph_that_keeps_output_gradients():
    # the saved input and weight of a layer require grad: a weight gradient formed from them
    # in grad mode recorded a graph holding that term's output gradient (K of them in all)
    conv, norm = nn.Conv2d(2, 3, 3), nn.LayerNorm(3)
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    h = norm(conv(x).relu().mean((2, 3)))
    params = [*conv.parameters(), *norm.parameters()]
    with torch.enable_grad():
        res = autogram(terms(h), params, [], None)
    assert len(res.held) == 4
    assert not res.gramian.requires_grad
    assert not any(g.requires_grad for _, g in res.held)
