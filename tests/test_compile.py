"""``torch.compile`` with MTAdam and ``lossbalance.backward``: compiled runs match eager ones.

Both ``MTAdam.step`` and ``lossbalance.backward`` run their per-term backward passes
through autograd, so they are excluded from compilation (``torch.compiler.disable``): a
compiled model, or a compiled function that calls them, trains as in eager mode up to
inductor's rounding. The compiled cases use inductor on the CPU (needs a C++ compiler).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import lossbalance

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="inductor on the CPU needs a C++ compiler",
)

STEPS = 3
TOL = {"rtol": 1e-4, "atol": 1e-6}  # inductor reorders float32 reductions


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batches() -> list[Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=gen) for _ in range(STEPS)]


def regressor() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def mtadam_losses(out: Tensor, x: Tensor) -> list[Tensor]:
    return [(out[:, 0] - x[:, 0]).pow(2).mean(), 100.0 * (out[:, 1] - x[:, 1]).abs().mean()]


def train_mtadam(model: nn.Module, step: Callable[..., Tensor] | None = None) -> nn.Module:
    opt = lossbalance.MTAdam(model.parameters(), lr=1e-2, grad_mode="sequential")

    def eager_step(x: Tensor) -> Tensor:
        losses = mtadam_losses(model(x), x)
        opt.step(losses)
        return losses[0].detach()

    run = eager_step if step is None else step(eager_step)
    for x in batches():
        run(x)
    assert opt.skipped_steps == 0
    assert all(int(opt.state[p]["step"]) == STEPS for p in model.parameters())
    return model


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, **TOL)


def test_compiled_model_with_mtadam_matches_eager():
    eager = train_mtadam(regressor())
    model = regressor()
    compiled = torch.compile(model)
    opt = lossbalance.MTAdam(model.parameters(), lr=1e-2, grad_mode="sequential")
    for x in batches():
        opt.step(mtadam_losses(compiled(x), x))
    assert_same_parameters(model, eager)


def test_compiled_function_calling_mtadam_step_matches_eager():
    # a compiled training step that calls opt.step(losses) inside used to fail on its
    # second call ("element 0 of tensors does not require grad")
    eager = train_mtadam(regressor())
    compiled = train_mtadam(regressor(), step=torch.compile)
    assert_same_parameters(compiled, eager)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = self.trunk(x)
        return z, self.heads[0](z), self.heads[1](z)


def train_balanced(
    method: str, mode: str, compile_model: bool = False, compile_step: bool = False
) -> tuple[TwoHeads, list[Tensor]]:
    model = TwoHeads()
    forward = model
    if compile_model and mode == "feature":
        # z must be an input of the heads' graph, not one more output of a fused one
        model.trunk.compile()
        for head in model.heads:
            head.compile()
    elif compile_model:
        forward = torch.compile(model)
    torch.manual_seed(0)
    balancer = lossbalance.create(method, 2)
    opt = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.1)

    def step(x: Tensor) -> Tensor:
        z, a, b = forward(x)
        losses = [
            (a.squeeze(1) - x[:, 0]).pow(2).mean(),
            10.0 * (b.squeeze(1) - x[:, 1]).abs().mean(),
        ]
        opt.zero_grad()
        features = z if mode == "feature" else None
        weights = lossbalance.backward(
            losses, balancer, shared=model.trunk, features=features, mode=mode
        )
        opt.step()
        return weights

    run = torch.compile(step) if compile_step else step
    weights = [run(x).clone() for x in batches()]
    return model, weights


@pytest.mark.parametrize(
    ("method", "mode", "where"),
    [("imtl", "exact", "model"), ("mgda", "feature", "model"), ("imtl", "exact", "step")],
)
def test_compiled_backward_matches_eager(method, mode, where):
    eager, eager_weights = train_balanced(method, mode)
    compiled, weights = train_balanced(
        method, mode, compile_model=where == "model", compile_step=where == "step"
    )
    for w, e in zip(weights, eager_weights, strict=True):
        torch.testing.assert_close(w, e, **TOL)
    assert_same_parameters(compiled, eager)


def test_backward_runs_eagerly_under_a_compiled_caller():
    # traced by dynamo, the per-term engine compiled dozens of frames (about two minutes
    # on the CPU) and the balancer's solve ran inside the trace
    model = TwoHeads()
    balancer = lossbalance.create("imtl", 2)
    seen: list[bool] = []
    weights = balancer.weights

    def recording_weights(*args, **kwargs):
        seen.append(torch.compiler.is_compiling())
        return weights(*args, **kwargs)

    balancer.weights = recording_weights  # type: ignore[method-assign]
    counter = torch._dynamo.testing.CompileCounter()

    @torch.compile(backend=counter)
    def step(x: Tensor) -> Tensor:
        _, a, b = model(x)
        return lossbalance.backward([a.pow(2).mean(), b.abs().mean()], balancer, shared=model.trunk)

    for x in batches():
        assert torch.isfinite(step(x)).all()
    assert seen == [False] * STEPS
    assert counter.frame_count <= 2  # the forward, and what follows the call


def test_accumulate_and_step_with_grads_run_eagerly_under_a_compiled_caller():
    # like step(): the per-term passes cannot be traced, so a compiled caller graph-breaks
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    opts = [lossbalance.MTAdam(m.parameters(), lr=1e-2) for m in (model, twin)]
    x = torch.randn(4, 3)

    def micro_batches(m: torch.nn.Module, opt: lossbalance.MTAdam) -> None:
        for part in x.split(2):
            out = m(part)
            opt.accumulate([out[:, 0].pow(2).mean() / 2, out[:, 1].abs().mean() / 2])

    for _ in range(2):
        torch.compile(micro_batches)(model, opts[0])
        opts[0].step()
        micro_batches(twin, opts[1])
        opts[1].step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
