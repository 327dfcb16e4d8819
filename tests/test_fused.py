"""The fused element-wise MTAdam update (`lossbalance.optim._fused`): its eager reference against
the multi-tensor update (`functional.mtadam`, whose in-place path is `_scaled_moments`), and
the compiled function (inductor: C++ on the CPU, Triton on CUDA) against the reference."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from torch import nn

import lossbalance.optim._mtadam as _mtadam
from lossbalance import LossBalanceWarning, MTAdam
from lossbalance.functional import mtadam
from lossbalance.optim import _fused

SHAPES = [(5, 4), (5,), (2, 3, 3), (1,)]
NUM = 3
# terms of very different sizes, so that the anchor scaling matters
SPREAD = (1.0, 1e3, 1e-2)
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.9)


def _initial(device, state_dtype, param_dtype, second_moment, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    params = [rand(*s).to(device, param_dtype) for s in SHAPES]
    own = second_moment == "own"
    mean = second_moment == "mean"
    return {
        "params": params,
        "exp_avgs": [
            torch.zeros((NUM, *s) if own else s, dtype=state_dtype, device=device) for s in SHAPES
        ],
        "exp_avg_sqs": [
            torch.zeros(s if mean else (NUM, *s), dtype=state_dtype, device=device) for s in SHAPES
        ],
        "magnitudes": [torch.zeros(NUM, dtype=state_dtype, device=device) for _ in SHAPES],
        "steps": [torch.zeros((), dtype=torch.float32, device=device) for _ in SHAPES],
    }


def _grads(step, device, dtype, nan_at):
    gen = torch.Generator().manual_seed(100 + step)
    spread = torch.tensor(SPREAD, dtype=torch.float64)
    grads = [
        (
            torch.randn((NUM, *s), generator=gen, dtype=torch.float64)
            * spread.view(-1, *[1] * len(s))
        )
        for s in SHAPES
    ]
    if step in nan_at:
        grads[2][1, 0] = float("nan")
    return [g.to(device, dtype) for g in grads]


def _same(a, b):
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _clone(state):
    return {name: [t.clone() for t in ts] for name, ts in state.items()}


def _functional(state, grads, options, masked):
    return mtadam(
        state["params"],
        grads,
        state["exp_avgs"],
        state["exp_avg_sqs"],
        state["magnitudes"],
        state["steps"],
        **HYPER,
        masked=masked,
        **{"eps": 1e-8, **options},
    )


def _table(monkeypatch, state, grads, options):
    """The per-tensor table `mtadam` computes for this state and these gradients (from a
    throwaway copy, through its in-place path `_scaled_moments`), and the finite flag."""
    tables = []
    original = _mtadam._scaled_moments

    def spy(ms, vs, gs, masters, tab, *args, **kwargs):
        tables.append(tab.clone())
        return original(ms, vs, gs, masters, tab, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(_mtadam, "_scaled_moments", spy)
        finite = _functional(_clone(state), [g.clone() for g in grads], options, masked=True)
    (table,) = tables
    return table, finite


def _run(update, monkeypatch, device, state_dtype, param_dtype, options, masked, nan_at=()):
    """Four steps of one update path from the same start; returns the final state."""
    second_moment = options.get("second_moment", "max")
    state = _initial(device, state_dtype, param_dtype, second_moment)
    kwargs = {k: v for k, v in options.items() if k != "term_weights"}
    for step in range(4):
        grads = _grads(step, device, state_dtype, nan_at)
        before = _clone(state)
        if update == "multi-tensor":
            finite = _functional(state, grads, options, masked)
        else:
            table, finite = _table(monkeypatch, state, grads, options)
            kept = [g.clone() for g in grads]
            args = [state[n] for n in ("params", "exp_avgs", "exp_avg_sqs", "magnitudes", "steps")]
            fused_options = dict(
                beta1=HYPER["beta1"],
                beta2=HYPER["beta2"],
                eps=kwargs.get("eps", 1e-8),
                weight_decay=kwargs.get("weight_decay", 0.0),
                decoupled_weight_decay=kwargs.get("decoupled_weight_decay", False),
                second_moment=second_moment,
                masked=masked,
            )
            if update == "reference":
                _fused.update_reference(args[0], grads, *args[1:], table, finite, **fused_options)
            else:
                ran = _fused.fused_update(args[0], grads, *args[1:], table, finite, **fused_options)
                if not ran:
                    pytest.skip(f"torch.compile cannot compile here ({device.type})")
            # the fused update reads the stacks and leaves them intact
            assert all(_same(g, k) for g, k in zip(grads, kept, strict=True))
        if step in nan_at:
            assert not bool(finite)
            for name, ts in state.items():
                # a skipped step is a no-op (the step counter too)
                assert all(torch.equal(a, b) for a, b in zip(ts, before[name], strict=True)), name
    return state


def _assert_states_close(a, b, rtol, atol):
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            torch.testing.assert_close(
                x, y, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
            )


OPTIONS = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"second_moment": "own"},
    {"second_moment": "mean"},
    {"term_weights": torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)},
    {"eps": 0.0},
]


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "host-checked"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "default")
def test_reference_matches_the_multi_tensor_update(monkeypatch, device, options, masked):
    # The function that torch.compile fuses, run eagerly, against functional.mtadam on the
    # same gradients: every option the multi-tensor path has, masked (accelerators) and
    # host-checked (the CPU folds the scales into GEMVs there: rounding differs).
    # a skipped first step (zero state: 0/0 with eps = 0) and a skipped later one
    nan_at = (0, 2) if masked else ()
    ref = _run(
        "reference", monkeypatch, device, torch.float64, torch.float64, options, masked, nan_at
    )
    multi = _run(
        "multi-tensor", monkeypatch, device, torch.float64, torch.float64, options, masked, nan_at
    )
    _assert_states_close(ref, multi, rtol=1e-12, atol=1e-15)


def test_reference_updates_low_precision_parameters_in_the_state_dtype(monkeypatch, device):
    # bf16 parameters with float32 state: computed in float32, rounded into the parameter
    options = {"weight_decay": 0.1, "decoupled_weight_decay": True}
    ref = _run("reference", monkeypatch, device, torch.float32, torch.bfloat16, options, True)
    multi = _run("multi-tensor", monkeypatch, device, torch.float32, torch.bfloat16, options, True)
    assert ref["params"][0].dtype == torch.bfloat16
    _assert_states_close(ref, multi, rtol=1e-6, atol=1e-6)


# Few compiled variants, each with several options at once: every distinct set of shapes,
# dtypes and options is one compilation (several seconds on the CPU).
COMPILED = [
    (torch.float32, torch.float32, {"weight_decay": 0.1}, True),
    (
        torch.float64,
        torch.float64,
        {"second_moment": "own", "weight_decay": 0.1, "decoupled_weight_decay": True},
        False,
    ),
    (torch.float64, torch.float64, {"second_moment": "mean", "eps": 0.0}, True),
    (torch.float32, torch.bfloat16, {}, False),
]


@pytest.mark.slow
# inductor's own imports warn about torch.jit deprecations
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    ("state_dtype", "param_dtype", "options", "masked"),
    COMPILED,
    ids=["f32-coupled-masked", "f64-own-decoupled", "f64-mean-eps0-masked", "bf16-host-checked"],
)
def test_compiled_update_matches_the_reference(
    monkeypatch, device, state_dtype, param_dtype, options, masked
):
    # inductor may contract to FMAs and sum over terms in another order: equal to the
    # dtype's rounding, and a masked NaN step is still an exact no-op
    nan_at = (0, 2) if masked else ()
    args = (monkeypatch, device, state_dtype, param_dtype, options, masked, nan_at)
    fused = _run("compiled", *args)
    ref = _run("reference", *args)
    multi = _run("multi-tensor", *args)
    tol = {torch.float64: (1e-12, 1e-15), torch.float32: (1e-5, 1e-6)}[state_dtype]
    if param_dtype == torch.bfloat16:
        tol = (1e-2, 1e-2)  # a bf16 rounding apart at most
    _assert_states_close(fused, ref, *tol)
    _assert_states_close(fused, multi, *tol)


def test_a_failed_compilation_falls_back_once_and_writes_nothing(monkeypatch, device):
    calls = []

    def broken(key):
        def compiled(*args, **kwargs):
            calls.append(1)
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler found")

        return compiled

    monkeypatch.setattr(_fused, "_compiled_for", broken)
    monkeypatch.setattr(_fused, "_failed", set())
    state = _initial(device, torch.float64, torch.float64, "max")
    grads = _grads(0, device, torch.float64, ())
    table, finite = _table(monkeypatch, state, grads, {})
    before = _clone(state)
    args = [state[n] for n in ("params", "exp_avgs", "exp_avg_sqs", "magnitudes", "steps")]
    options = dict(
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decoupled_weight_decay=False,
        second_moment="max",
        masked=True,
    )
    with pytest.warns(LossBalanceWarning, match="could not be compiled.*no C.. compiler"):
        assert not _fused.fused_update(args[0], grads, *args[1:], table, finite, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _fused.fused_update(args[0], grads, *args[1:], table, finite, **options)
    assert len(calls) == 1  # that bucket is not compiled again
    for name, ts in state.items():
        assert all(torch.equal(a, b) for a, b in zip(ts, before[name], strict=True)), name


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_real_compile_failure_falls_back(monkeypatch, device):
    # inductor without a working C++ compiler: an InductorError before anything ran
    if device.type != "cpu":
        pytest.skip("the C++ compiler is the CPU's")
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(_fused, "_failed", set())
    monkeypatch.setattr(_fused, "_compiled", {})
    state = _initial(device, torch.float32, torch.float32, "max")
    grads = _grads(0, device, torch.float32, ())
    table, finite = _table(monkeypatch, state, grads, {})
    before = _clone(state)
    args = [state[n] for n in ("params", "exp_avgs", "exp_avg_sqs", "magnitudes", "steps")]
    options = dict(
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decoupled_weight_decay=False,
        second_moment="max",
        masked=True,
    )
    with (
        inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)}),
        pytest.warns(LossBalanceWarning, match="could not be compiled on cpu"),
    ):
        assert not _fused.fused_update(args[0], grads, *args[1:], table, finite, **options)
    for name, ts in state.items():
        assert all(torch.equal(a, b) for a, b in zip(ts, before[name], strict=True)), name


def test_fused_available():
    assert _fused.fused_available(torch.device("cpu")) == torch._dynamo.is_dynamo_supported()
    assert not _fused.fused_available(torch.device("meta"))


def _integrated():
    return "fused" in inspect.signature(MTAdam).parameters


needs_integration = pytest.mark.skipif(
    not _integrated(),
    reason="MTAdam(fused=...) is not integrated yet (patch in benchmarks/fused_integration.md)",
)


@needs_integration
def test_mtadam_rejects_a_bad_fused_flag():
    with pytest.raises(TypeError, match=r"Invalid fused: 'yes' \(expected None, True or False\)"):
        MTAdam([torch.zeros(2, requires_grad=True)], fused="yes")
    with pytest.raises(RuntimeError, match=r"fused=True.* cannot compile for meta"):
        MTAdam([torch.zeros(2, device="meta", requires_grad=True)], fused=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@needs_integration
@pytest.mark.parametrize("sync_free", [True, False], ids=["masked", "host-checked"])
def test_mtadam_fused_matches_the_multi_tensor_optimizer(device, dtype, sync_free):
    # the optimizer end to end: per-term gradients, scales, table, then the compiled update
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(device, dtype)
    twin = copy.deepcopy(model)
    options = dict(lr=1e-2, weight_decay=0.1, sync_free=sync_free)
    fused = MTAdam(model.parameters(), fused=True, **options)
    plain = MTAdam(twin.parameters(), fused=False, **options)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LossBalanceWarning)
        for step in range(5):
            x = torch.randn(8, 4, generator=gen, dtype=torch.float64).to(device, dtype)
            for net, opt in ((model, fused), (twin, plain)):
                out = net(x)
                losses = [out[:, 0].pow(2).mean(), 100 * out[:, 1].abs().mean(), out.sum() / 100]
                if step == 2 and sync_free:
                    losses[1] = losses[1] * float("nan")
                opt.step(losses)
    # the compiled update ran: no fallback to the multi-tensor path
    assert not [w for w in caught if "could not be compiled" in str(w.message)]
    assert fused.skipped_steps == plain.skipped_steps == (1 if sync_free else 0)
    rtol, atol = (1e-12, 1e-14) if dtype == torch.float64 else (1e-5, 1e-6)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        for name in ("exp_avg", "exp_avg_sq", "magnitude", "step"):
            torch.testing.assert_close(
                fused.state[p][name], plain.state[q][name], rtol=rtol, atol=atol
            )
