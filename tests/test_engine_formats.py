"""The per-term gradient engine on any memory format, and the memory of the auto chooser.

Every mode (forced, or chosen by ``mode="auto"`` with each candidate made to win) on a
``channels_last`` conv net and on parameters that are non-contiguous views, through
``term_grads``, ``MTAdam.step(losses)`` and ``lossbalance.backward``, against a plain
float64 for-loop; the chooser's results alive at once (weak references); fallback messages
without C++ stacks.
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import Tensor, nn

import lossbalance
import lossbalance.engine._autogram
import lossbalance.engine._engine as engine
import lossbalance.engine._vjp as vjp
from lossbalance import LossBalanceWarning, MTAdam, term_grads

K = 3
MODES = ("sequential", "batched", "two_stage")


# --------------------------------------------------------------------------- reference


def reference(losses: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """One autograd.grad per term, stacked, zeros where a term does not reach a parameter."""
    rows = [
        torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses
    ]
    return [
        torch.stack([torch.zeros_like(p) if row[j] is None else row[j] for row in rows])
        for j, p in enumerate(params)
    ]


def assert_stacks(got: list[Tensor | None], want: list[Tensor]) -> None:
    assert len(got) == len(want)
    for j, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g is not None, f"param {j}: got None"
        assert g.shape == w.shape, f"param {j}: shape {tuple(g.shape)}"
        # the contract: (K, *p.shape) stacks in the default layout, whatever the parameter's
        assert g.is_contiguous(), f"param {j}: strides {g.stride()} are not contiguous"
        tight = g.dtype == torch.float64
        torch.testing.assert_close(
            g, w, rtol=1e-9 if tight else 1e-4, atol=1e-11 if tight else 1e-5
        )


# --------------------------------------------------------------------------- models


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4 * 3 * 3, K)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(x, 1))


class ViewNet(nn.Module):
    """Linear layers whose weights are non-contiguous views: a transpose and a strided slice."""

    def __init__(self, device, dtype) -> None:
        super().__init__()
        # built in place: Module.to would make the strided slices contiguous
        kw = dict(device=device, dtype=dtype)
        self.w1 = nn.Parameter(torch.randn(5, 6, **kw).t())  # (6, 5), strides (1, 6)
        self.b1 = nn.Parameter(torch.randn(12, **kw)[::2])  # (6,), stride 2
        self.w2 = nn.Parameter(torch.randn(K, 10, **kw)[:, ::2])  # (K, 5), strides (10, 2)
        self.w3 = nn.Parameter(torch.randn(K, 6, **kw).t())

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(x @ self.w1.T + self.b1)
        return h @ self.w3 + (x @ self.w2.T)


def make(name: str, device, dtype) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    if name == "channels_last":
        model = ConvNet().to(device, dtype).to(memory_format=torch.channels_last)
        x = torch.randn(6, 2, 7, 7).to(device, dtype).to(memory_format=torch.channels_last)
    else:
        model = ViewNet(device, dtype)
        x = torch.randn(6, 5).to(device, dtype)
    if name == "views":
        assert not any(p.is_contiguous() for p in model.parameters())
    else:
        assert not all(p.is_contiguous() for p in model.parameters())
    return model, x


def contiguous_twin(model: nn.Module) -> nn.Module:
    """A copy whose parameters are contiguous (the layout-free reference)."""
    twin = copy.deepcopy(model)
    for mod in twin.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            setattr(mod, name, nn.Parameter(p.detach().contiguous()))
    return twin


def terms(out: Tensor) -> list[Tensor]:
    # per-column terms of one shared output: two_stage finds it, batched vmaps everything
    return [out[:, 0].square().mean(), (out[:, 1] - 1).abs().mean(), out.tanh().sum() / 10]


@pytest.fixture
def fresh_choices():
    vjp.clear_choices()
    yield
    vjp.clear_choices()


def force_winner(monkeypatch, winner: str) -> None:
    """A fake clock: every run of a mode advances it; ``winner`` is twice as fast."""
    clock = [0.0]
    real = vjp.vjp_term_grads

    def timed(losses, params, mode="sequential", **kwargs):
        clock[0] += 0.5 if mode == winner else 1.0
        return real(losses, params, mode, **kwargs)

    monkeypatch.setattr(vjp, "vjp_term_grads", timed)
    monkeypatch.setattr(vjp.time, "perf_counter", lambda: clock[0])


GRAD_MODES = [*MODES, *(f"auto:{m}" for m in MODES)]


def grad_mode_of(spec: str, monkeypatch) -> str:
    if spec.startswith("auto:"):
        force_winner(monkeypatch, spec.split(":")[1])
        return "auto"
    return spec


# --------------------------------------------------------------------------- item 8


@pytest.mark.parametrize("name", ["channels_last", "views"])
@pytest.mark.parametrize("spec", GRAD_MODES)
def test_term_grads_any_memory_format(name, spec, device, dtype, monkeypatch, fresh_choices):
    model, x = make(name, device, dtype)
    params = list(model.parameters())
    mode = grad_mode_of(spec, monkeypatch)
    losses = terms(model(x))
    want = reference(losses, params)
    assert_stacks(term_grads(losses, params, mode=mode), want)
    if mode == "auto":
        assert vjp.cached_choice(engine.auto_key(params, K)) == spec.split(":")[1]
        # the cached mode, run once through the engine's own path
        assert_stacks(term_grads(terms(model(x)), params), want)


@pytest.mark.parametrize("name", ["channels_last", "views"])
@pytest.mark.parametrize("spec", GRAD_MODES)
def test_mtadam_step_any_memory_format(name, spec, device, dtype, monkeypatch, fresh_choices):
    model, x = make(name, device, dtype)
    twin = copy.deepcopy(model)
    opt = MTAdam(model.parameters(), lr=1e-2, grad_mode=grad_mode_of(spec, monkeypatch))
    ref = MTAdam(twin.parameters(), lr=1e-2, grad_mode="sequential")
    for _ in range(2):
        opt.step(terms(model(x)))
        ref.step(terms(twin(x)))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["channels_last", "views"])
@pytest.mark.parametrize("mode", ["exact", "batched", "gramian"])
def test_backward_any_memory_format(name, mode, device, dtype):
    model, x = make(name, device, dtype)
    twin = contiguous_twin(model)
    lossbalance.backward(terms(model(x)), lossbalance.create("imtl-g", K), model, mode=mode)
    lossbalance.backward(terms(twin(x)), lossbalance.create("imtl-g", K), twin, mode="exact")
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------- item 20a


def count_alive(monkeypatch) -> list[int]:
    """Before each candidate run: how many earlier runs' results are still alive."""
    alive_at_start: list[int] = []
    runs: list[list[weakref.ref[Tensor]]] = []
    real = vjp.vjp_term_grads

    def spy(losses, params, mode="sequential", **kwargs):
        alive_at_start.append(sum(any(r() is not None for r in refs) for refs in runs))
        grads = real(losses, params, mode, **kwargs)
        runs.append([weakref.ref(g) for g in grads if g is not None])
        return grads

    monkeypatch.setattr(vjp, "vjp_term_grads", spy)
    return alive_at_start


@pytest.mark.parametrize("winner", MODES)
@pytest.mark.parametrize(("repeats", "check"), [(2, True), (3, True), (2, False), (1, False)])
def test_chooser_holds_one_result_besides_the_run(
    winner, repeats, check, device, dtype, monkeypatch, fresh_choices
):
    model, x = make("channels_last", device, dtype)
    params = list(model.parameters())
    force_winner(monkeypatch, winner)  # under the spy: the clock ticks inside it
    alive = count_alive(monkeypatch)
    losses = terms(model(x))
    want = reference(losses, params)
    choice = vjp.choose_mode(losses, params, repeats=repeats, check=check, key="mem")
    assert choice.mode == winner
    assert_stacks(choice.grads, want)
    # the candidates' own runs only (the winner's result of its last run is kept, not
    # recomputed), and never more than one earlier result alive when a run starts
    assert len(alive) == repeats * len(MODES)
    assert max(alive) <= 1, alive


def test_chooser_with_one_repeat_and_check_reruns_a_winner_it_did_not_keep(
    device, dtype, monkeypatch, fresh_choices
):
    model, x = make("channels_last", device, dtype)
    params = list(model.parameters())
    force_winner(monkeypatch, "batched")
    alive = count_alive(monkeypatch)
    losses = terms(model(x))
    want = reference(losses, params)
    choice = vjp.choose_mode(losses, params, repeats=1, key="one")
    assert choice.mode == "batched"
    assert_stacks(choice.grads, want)
    # the reference is held while the others are checked, the winner is run again after
    assert len(alive) == len(MODES) + 1
    assert max(alive) <= 1, alive


def test_auto_term_grads_holds_one_result_besides_the_run(
    device, dtype, monkeypatch, fresh_choices
):
    model, x = make("views", device, dtype)
    params = list(model.parameters())
    alive = count_alive(monkeypatch)
    losses = terms(model(x))
    want = reference(losses, params)
    assert_stacks(term_grads(losses, params), want)
    assert len(alive) == engine.AUTO_REPEATS * len(MODES)
    assert max(alive) <= 1, alive


def test_chooser_drops_a_kept_result_whose_mode_fails_later(
    device, dtype, monkeypatch, fresh_choices
):
    model, x = make("channels_last", device, dtype)
    params = list(model.parameters())
    clock = [0.0]
    runs = {m: 0 for m in MODES}
    real = vjp.vjp_term_grads

    def flaky(losses, params, mode="sequential", **kwargs):
        runs[mode] += 1
        if mode == "batched" and runs[mode] == 2:
            raise RuntimeError("out of luck")
        clock[0] += 0.5 if mode == "batched" else 1.0
        return real(losses, params, mode, **kwargs)

    monkeypatch.setattr(vjp, "vjp_term_grads", flaky)
    monkeypatch.setattr(vjp.time, "perf_counter", lambda: clock[0])
    losses = terms(model(x))
    want = reference(losses, params)
    with pytest.warns(LossBalanceWarning, match="'batched' failed"):
        choice = vjp.choose_mode(losses, params, repeats=2, check=False, key="flaky")
    assert choice.mode == "sequential" and "batched" not in choice.times
    assert_stacks(choice.grads, want)


# --------------------------------------------------------------------------- item 16b

CPP_ERROR = (
    "vmap: no batching rule for aten::fake_op\n"
    "Exception raised from fake_op at /pytorch/aten/src/fake.cpp:12 (most recent call first):\n"
    "frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x96 (0x7f in libc10.so)\n"
    "frame #1: at::native::fake_op(at::Tensor const&) + 0x11 (0x7f in libtorch_cpu.so)"
)


def fail_autograd(monkeypatch, when: str) -> None:
    """``torch.autograd.grad`` raises a multi-line C++-style error for vectorised calls
    (``is_grads_batched``) or double-backward ones (``create_graph``)."""
    real = torch.autograd.grad

    def grad(*args, **kwargs):
        if kwargs.get(when):
            raise RuntimeError(CPP_ERROR)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)


def assert_one_line(record) -> None:
    messages = [str(r.message) for r in record if issubclass(r.category, LossBalanceWarning)]
    assert messages
    for message in messages:
        assert "RuntimeError: vmap: no batching rule for aten::fake_op" in message
        assert "Exception raised from" not in message and "frame #" not in message
        assert "\n" not in message


@pytest.mark.parametrize("mode", ["batched", "two_stage"])
def test_vectorised_fallback_warning_has_one_line(mode, device, dtype, monkeypatch):
    model, x = make("views", device, dtype)
    params = list(model.parameters())
    losses = terms(model(x))
    want = reference(losses, params)
    fail_autograd(monkeypatch, "is_grads_batched")
    with pytest.warns(LossBalanceWarning, match="fell back to K sequential") as record:
        got = term_grads(losses, params, mode=mode)
    assert_stacks(got, want)
    assert_one_line(record)


def test_gramian_fallback_warning_has_one_line(device, dtype, monkeypatch):
    model, x = make("views", device, dtype)
    twin = contiguous_twin(model)

    def engine_fails(*args, **kwargs):
        raise RuntimeError(CPP_ERROR)

    monkeypatch.setattr(lossbalance.engine._autogram, "autogram", engine_fails)
    with pytest.warns(LossBalanceWarning, match="fell back to mode='exact'") as record:
        lossbalance.backward(
            terms(model(x)), lossbalance.create("imtl-g", K), model, mode="gramian"
        )
    assert_one_line(record)
    lossbalance.backward(terms(twin(x)), lossbalance.create("imtl-g", K), twin, mode="exact")
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10)


def test_chooser_warning_has_one_line(device, dtype, monkeypatch, fresh_choices):
    model, x = make("views", device, dtype)
    params = list(model.parameters())
    losses = terms(model(x))
    want = reference(losses, params)
    fail_autograd(monkeypatch, "is_grads_batched")
    with pytest.warns(LossBalanceWarning, match="not a candidate") as record:
        choice = vjp.choose_mode(losses, params, key="cpp")
    assert choice.mode == "sequential"
    assert_stacks(choice.grads, want)
    assert len(record) == 2  # batched and two_stage
    assert_one_line(record)


def test_auto_with_a_zero_size_parameter(device, dtype, fresh_choices):
    # the check compared stacks through a max over all entries, which has no value for an
    # empty one: the chooser raised, and term_grads then ran sequential and timed again at
    # every call
    w = torch.randn(3, device=device, dtype=dtype, requires_grad=True)
    empty = torch.zeros(2, 0, device=device, dtype=dtype, requires_grad=True)
    losses = [w.sum() + empty.sum(), (w * w).sum() + 2 * empty.sum()]
    want = reference(losses, [w, empty])
    assert_stacks(vjp.choose_mode(losses, [w, empty], key="empty").grads, want)
    assert_stacks(term_grads(losses, [w, empty]), want)
    assert vjp.cached_choice(engine.auto_key([w, empty], 2)) in MODES


@pytest.mark.parametrize("name", ["channels_last", "views"])
def test_func_term_grads_any_memory_format(name, device, dtype):
    model, x = make(name, device, dtype)
    params = list(model.parameters())
    want = reference(terms(model(x)), params)
    _, got = vjp.func_term_grads(model, x, lambda out: torch.stack(terms(out)))
    assert_stacks(got, want)
