"""MTAdam: reference for-loop comparison, reductions, checkpointing, NaN guard, errors."""

from __future__ import annotations

import copy
import io
import math
import re
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lossbalance
from lossbalance import LossBalanceWarning, MTAdam
from lossbalance.functional import mtadam

# ----------------------------------------------------------------------------- reference


def reference_step(
    params,
    term_grads,
    state,
    *,
    lr,
    betas=(0.9, 0.999, 0.9),
    eps=1e-8,
    weight_decay=0.0,
    decoupled=False,
    term_weights=None,
    layer_of=None,
    normalization="anchor",
    second_moment="max",
    magnitude_init="first",
    threshold=1e-10,
):
    """Algorithm 1 written plainly: I separate Adam moments per term, Python loops."""
    b1, b2, b3 = betas
    num = len(term_grads)
    weights = term_weights or [1.0] * num
    layer_of = layer_of or list(range(len(params)))
    active = [
        j for j in range(len(params)) if any(term_grads[i][j] is not None for i in range(num))
    ]
    grad = {
        (i, j): (term_grads[i][j] if term_grads[i][j] is not None else torch.zeros_like(params[j]))
        for i in range(num)
        for j in active
    }
    layer_sq: dict = {}
    for i in range(num):
        for j in active:
            key = (i, layer_of[j])
            layer_sq[key] = layer_sq.get(key, 0.0) + float(grad[(i, j)].double().pow(2).sum())
    for j in active:
        p = params[j]
        st = state.get(j)
        if st is None:
            st = {
                "step": 0,
                "m": [torch.zeros_like(p) for _ in range(num)],
                "v": [torch.zeros_like(p) for _ in range(num)],
                "n": [1.0] * num,
            }
            state[j] = st
        st["step"] += 1
        t = st["step"]
        for i in range(num):
            measured = math.sqrt(layer_sq[(i, layer_of[j])])
            if t == 1 and magnitude_init == "first":
                st["n"][i] = measured
            else:
                st["n"][i] = b3 * st["n"][i] + (1 - b3) * measured
        n = st["n"]
        anchor = next((i for i in range(num) if n[i] > threshold), None)
        for i in range(num):
            g = grad[(i, j)]
            if normalization == "anchor" and n[i] > threshold:
                g = g * (n[anchor] / n[i])
            elif normalization == "unit" and n[i] > threshold:
                g = g / n[i]
            g = g * weights[i]
            if i == 0 and weight_decay and not decoupled:
                g = g + weight_decay * p.detach()
            st["m"][i] = b1 * st["m"][i] + (1 - b1) * g
            st["v"][i] = b2 * st["v"][i] + (1 - b2) * g * g
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        m_hat = [m / bc1 for m in st["m"]]
        v_hat = [v / bc2 for v in st["v"]]
        if second_moment == "max":
            denom = torch.stack(v_hat).amax(0).sqrt() + eps
            update = sum(m / denom for m in m_hat)
        elif second_moment == "mean":
            denom = torch.stack(v_hat).mean(0).sqrt() + eps
            update = sum(m / denom for m in m_hat)
        else:
            update = sum(m / (v.sqrt() + eps) for m, v in zip(m_hat, v_hat))
        with torch.no_grad():
            if decoupled and weight_decay:
                p.mul_(1 - lr * weight_decay)
            p.sub_(lr * update)


class TwoHeads(nn.Module):
    """Shared trunk, head ``a`` (term 0 only) and head ``b`` (terms 1 and 2), one unused."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.a = nn.Linear(6, 1)
        self.b = nn.Linear(6, 2)
        self.unused = nn.Linear(2, 2)

    def losses(self, x, scales=(1.0, 100.0, 0.01)):
        z = self.trunk(x)
        ya, yb = self.a(z), self.b(z)
        return [
            scales[0] * (ya - x[:, :1]).pow(2).mean(),
            scales[1] * (yb[:, 0] - x[:, 1]).pow(2).mean(),
            scales[2] * (yb[:, 1] - x[:, 2]).abs().mean(),
        ]


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return TwoHeads().to(dtype)


def batches(n, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, generator=gen, dtype=dtype) for _ in range(n)]


def run_reference(model, data, **kw):
    params = list(model.parameters())
    state: dict = {}
    layer_of = kw.pop("layer_of", None)
    for x in data:
        losses = model.losses(x)
        grads = [
            list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
            for loss in losses
        ]
        reference_step(params, grads, state, layer_of=layer_of, **kw)
    return state


OPTIONS = [
    {},
    {"sync_free": True},
    {"sync_free": True, "second_moment": "own"},
    {"sync_free": True, "eps": 0.0},
    {"sync_free": True, "second_moment": "mean"},
    {"sync_free": True, "term_weights": [1.0, 2.0, 0.5]},
    {"sync_free": True, "weight_decay": 0.1, "decoupled_weight_decay": True},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"term_weights": [1.0, 2.0, 0.5]},
    {"normalization": "none"},
    {"normalization": "unit"},
    {"second_moment": "own"},
    {"second_moment": "mean"},
    {"magnitude_init": "one"},
    {"grouping": "global"},
    {"grouping": "module"},
    {"betas": (0.8, 0.99, 0.5), "eps": 1e-6},
]


@pytest.mark.parametrize(
    "options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
def test_matches_reference_on_params_and_state(options):
    model = make_model()
    ref_model = copy.deepcopy(model)
    data = batches(12)
    if options.get("grouping") == "module":
        opt = MTAdam(model.named_parameters(), lr=1e-2, **options)
    else:
        opt = MTAdam(model.parameters(), lr=1e-2, **options)
    for x in data:
        opt.step(model.losses(x))

    ref_kw = dict(lr=1e-2)
    for key in (
        "weight_decay",
        "term_weights",
        "normalization",
        "second_moment",
        "magnitude_init",
        "betas",
        "eps",
    ):
        if key in options:
            ref_kw[key] = options[key]
    ref_kw["decoupled"] = options.get("decoupled_weight_decay", False)
    names = [n for n, _ in ref_model.named_parameters()]
    if options.get("grouping") == "global":
        ref_kw["layer_of"] = [0] * len(names)
    elif options.get("grouping") == "module":
        ref_kw["layer_of"] = [n.rpartition(".")[0] for n in names]
    ref_state = run_reference(ref_model, data, **ref_kw)

    for j, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        if j not in ref_state:
            assert p not in opt.state  # the unused layer is never touched
            continue
        st, rs = opt.state[p], ref_state[j]
        assert int(st["step"]) == rs["step"]
        torch.testing.assert_close(st["magnitude"], torch.tensor(rs["n"], dtype=torch.float64))
        if options.get("second_moment") == "own":
            torch.testing.assert_close(st["exp_avg"], torch.stack(rs["m"]), rtol=1e-10, atol=1e-14)
        else:
            torch.testing.assert_close(st["exp_avg"], sum(rs["m"]), rtol=1e-10, atol=1e-14)
        if options.get("second_moment") == "mean":
            torch.testing.assert_close(
                st["exp_avg_sq"], torch.stack(rs["v"]).mean(0), rtol=1e-10, atol=1e-16
            )
        else:
            torch.testing.assert_close(
                st["exp_avg_sq"], torch.stack(rs["v"]), rtol=1e-10, atol=1e-16
            )


def test_anchor_fallback_and_unreached_terms():
    # head b is not reached by term 0: term 1 becomes its anchor; term 0 contributes zeros
    model = make_model()
    opt = MTAdam(model.parameters(), lr=1e-2)
    opt.step(model.losses(batches(1)[0]))
    mags = opt.state[model.b.weight]["magnitude"]
    assert mags[0] == 0 and mags[1] > 0 and mags[2] > 0
    assert model.unused.weight not in opt.state


# ----------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wd,decoupled", [(0.0, False), (0.05, False), (0.05, True)])
def test_one_term_is_bit_identical_to_adam(dtype, wd, decoupled):
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)
    m2 = copy.deepcopy(m1)
    groups1 = [{"params": m1[0].parameters()}, {"params": m1[2].parameters(), "lr": 3e-3}]
    groups2 = [{"params": m2[0].parameters()}, {"params": m2[2].parameters(), "lr": 3e-3}]
    o1 = MTAdam(groups1, lr=1e-2, weight_decay=wd, decoupled_weight_decay=decoupled)
    o2 = torch.optim.Adam(groups2, lr=1e-2, weight_decay=wd, decoupled_weight_decay=decoupled)
    for x in batches(40, dtype):
        o1.step([m1(x).pow(2).mean()])
        o2.zero_grad()
        m2(x).pow(2).mean().backward()
        o2.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(o1.state[p]["exp_avg"], o2.state[q]["exp_avg"])
        assert torch.equal(o1.state[p]["exp_avg_sq"][0], o2.state[q]["exp_avg_sq"])


def test_scaling_a_non_anchor_term_leaves_trajectory_unchanged():
    # term 2 is the anchor of no layer (term 0 anchors the trunk, term 1 head b)
    model = make_model()
    scaled = copy.deepcopy(model)
    o1 = MTAdam(model.parameters(), lr=1e-2)
    o2 = MTAdam(scaled.parameters(), lr=1e-2)
    for x in batches(15):
        o1.step(model.losses(x, scales=(1.0, 1.0, 1.0)))
        o2.step(scaled.losses(x, scales=(1.0, 1.0, 1e3)))
    for p, q in zip(model.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_without_normalisation_scaling_changes_trajectory():
    # the counterpart of the invariance above: ablation (i) is not scale invariant
    model = make_model()
    scaled = copy.deepcopy(model)
    o1 = MTAdam(model.parameters(), lr=1e-2, normalization="none")
    o2 = MTAdam(scaled.parameters(), lr=1e-2, normalization="none")
    for x in batches(15):
        o1.step(model.losses(x, scales=(1.0, 1.0, 1.0)))
        o2.step(scaled.losses(x, scales=(1.0, 1e3, 1.0)))
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), scaled.parameters()))
    assert diff > 1e-4


def test_identical_terms_reduce_to_adam_on_their_mean():
    # I copies of one loss: every term is scaled to the anchor, so the update is
    # I * m_hat / (sqrt(v_hat) + eps): Adam on the loss with I times the learning rate
    torch.manual_seed(0)
    m1 = nn.Linear(3, 2).double()
    m2 = copy.deepcopy(m1)
    o1 = MTAdam(m1.parameters(), lr=1e-3, eps=0.0)
    o2 = torch.optim.Adam(m2.parameters(), lr=3e-3, eps=0.0)
    for x in batches(10):
        x = x[:, :3]
        loss = m1(x).pow(2).mean()
        o1.step([loss, loss, loss])
        o2.zero_grad()
        m2(x).pow(2).mean().backward()
        o2.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- ablations


def _functional_balanced(grads_list, **kw):
    """Run one functional step and return the balanced per-term gradients."""
    params = [torch.zeros(g.shape[1:], dtype=torch.float64) for g in grads_list]
    num = grads_list[0].shape[0]
    grads = [g.clone() for g in grads_list]
    mtadam(
        params,
        grads,
        [torch.zeros_like(p) for p in params],
        [torch.zeros((num, *p.shape), dtype=torch.float64) for p in params],
        [torch.zeros(num, dtype=torch.float64) for _ in params],
        [torch.zeros((), dtype=torch.float32) for _ in params],
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        beta3=0.9,
        eps=1e-8,
        **kw,
    )
    return grads


def test_ablation_normalisations_give_the_paper_magnitudes():
    torch.manual_seed(0)
    g = [
        torch.randn(3, 5, dtype=torch.float64)
        * torch.tensor([[1.0], [1e3], [1e-4]], dtype=torch.float64)
    ]
    norms = torch.linalg.vector_norm(g[0], dim=1)
    anchor = _functional_balanced(g, normalization="anchor")[0]
    torch.testing.assert_close(torch.linalg.vector_norm(anchor, dim=1), norms[0].expand(3))
    unit = _functional_balanced(g, normalization="unit")[0]
    torch.testing.assert_close(
        torch.linalg.vector_norm(unit, dim=1), torch.ones(3, dtype=torch.float64)
    )
    none = _functional_balanced(g, normalization="none")[0]
    torch.testing.assert_close(none, g[0])


def test_ablation_global_grouping_shares_one_magnitude():
    model = make_model()
    opt = MTAdam(model.parameters(), lr=1e-2, grouping="global")
    opt.step(model.losses(batches(1)[0]))
    mags = [s["magnitude"] for s in opt.state.values()]
    for m in mags[1:]:
        torch.testing.assert_close(m, mags[0])
    # one magnitude per term = the norm of the term's whole gradient
    fresh = make_model()
    params = list(fresh.parameters())
    losses = fresh.losses(batches(1)[0])
    for i, loss in enumerate(losses):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in gs if g is not None))
        assert mags[0][i].item() == pytest.approx(total, rel=1e-12)


def test_ablation_second_moment_state_shapes():
    model = make_model()
    for mode, m_shape, v_shape in [("max", (), (3,)), ("own", (3,), (3,)), ("mean", (), ())]:
        opt = MTAdam(model.parameters(), lr=1e-2, second_moment=mode)
        opt.step(model.losses(batches(1)[0]))
        st = opt.state[model.a.weight]
        assert st["exp_avg"].shape == (*m_shape, *model.a.weight.shape)
        assert st["exp_avg_sq"].shape == (*v_shape, *model.a.weight.shape)


# ----------------------------------------------------------------------------- state


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"grouping": "global", "second_moment": "own"}])
def test_checkpoint_resume_is_bit_identical(dtype, options):
    data = batches(20, dtype)
    model = make_model(dtype)
    opt = MTAdam(model.parameters(), lr=1e-2, **options)
    for x in data:
        opt.step(model.losses(x))

    resumed = make_model(dtype)
    opt_r = MTAdam(resumed.parameters(), lr=1e-2, **options)
    for x in data[:10]:
        opt_r.step(resumed.losses(x))
    ckpt = _roundtrip({"model": resumed.state_dict(), "opt": opt_r.state_dict()})
    fresh = make_model(dtype, seed=5)
    fresh.load_state_dict(ckpt["model"])
    opt_f = MTAdam(fresh.parameters(), lr=1e-2, **options)
    opt_f.load_state_dict(ckpt["opt"])
    assert opt_f.num_terms == 3
    for x in data[10:]:
        opt_f.step(fresh.losses(x))
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("chosen", ["sequential", "batched", "two_stage"])
def test_resume_in_a_new_process_keeps_the_auto_grad_mode(monkeypatch, chosen):
    # grad_mode="auto" times the modes once per process; the checkpoint records the choice
    # so that a resumed run computes its per-term gradients the same way (bit-identical)
    from lossbalance.engine import _vjp

    data = batches(12, torch.float32)
    _vjp.clear_choices()
    original = _vjp.choose_mode
    monkeypatch.setattr(  # let auto "choose" the given mode
        _vjp,
        "choose_mode",
        lambda losses, params, **kw: original(losses, params, **{**kw, "candidates": (chosen,)}),
    )
    model = make_model(torch.float32)
    opt = MTAdam(model.parameters(), lr=1e-2)
    for x in data[:6]:
        opt.step(model.losses(x))
    recorded = opt.state_dict()["mtadam"]["grad_mode"]
    assert recorded == chosen
    reference = copy.deepcopy(model)
    opt_ref = MTAdam(reference.parameters(), lr=1e-2, grad_mode=recorded)
    opt_ref.load_state_dict(opt.state_dict())
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})

    _vjp.clear_choices()  # a new process: nothing chosen yet, and no timing may run
    monkeypatch.setattr(_vjp, "choose_mode", lambda *a, **k: pytest.fail("timed again"))
    fresh = make_model(torch.float32, seed=5)
    fresh.load_state_dict(ckpt["model"])
    opt_f = MTAdam(fresh.parameters(), lr=1e-2)
    opt_f.load_state_dict(ckpt["opt"])
    for x in data[6:]:
        opt_f.step(fresh.losses(x))
        opt_ref.step(reference.losses(x))
    assert opt_f.state_dict()["mtadam"]["grad_mode"] == recorded
    for p, q in zip(reference.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    _vjp.clear_choices()


def test_state_memory_bound():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4))
    opt = MTAdam(model.parameters())
    x = torch.randn(6, 10)
    out = model(x)
    num = 5
    opt.step([out[:, i % 4].pow(2).mean() * (i + 1) for i in range(num)])
    numel = sum(p.numel() for p in model.parameters())
    layers = len(list(model.parameters()))
    big = sum(
        t.numel()
        for s in opt.state.values()
        for k, t in s.items()
        if k in ("exp_avg", "exp_avg_sq")
    )
    small = sum(
        t.numel()
        for s in opt.state.values()
        for k, t in s.items()
        if k not in ("exp_avg", "exp_avg_sq")
    )
    assert big == (num + 1) * numel
    assert small <= (num + 1) * layers


# ----------------------------------------------------------------------------- NaN guard


@pytest.mark.parametrize("sync_free", [None, True], ids=["host-check", "sync-free"])
@pytest.mark.parametrize("eps", [1e-8, 0.0])
@pytest.mark.parametrize("where", [0, 4])
def test_nan_step_is_skipped_exactly(where, eps, sync_free):
    data = batches(10)
    model = make_model()
    # the same path as the guarded run (the CPU host-check path rounds differently)
    opt = MTAdam(model.parameters(), lr=1e-2, eps=eps, sync_free=sync_free)
    for x in data:
        opt.step(model.losses(x))

    guarded = make_model()
    opt_g = MTAdam(guarded.parameters(), lr=1e-2, eps=eps, sync_free=sync_free)
    with pytest.warns(LossBalanceWarning, match="skipped a step"):
        for k, x in enumerate(data):
            if k == where:
                before = [p.clone() for p in guarded.parameters()]
                state_before = copy.deepcopy(opt_g.state_dict()["state"])
                bad = guarded.losses(x)
                bad[1] = bad[1] * float("nan")
                opt_g.step(bad)
                for p, b in zip(guarded.parameters(), before):
                    assert torch.equal(p, b)
                after = opt_g.state_dict()["state"]
                if where == 0:
                    # a skipped first step may allocate the state, all zeros as if fresh
                    assert all(not t.any() for s in after.values() for t in s.values())
                else:
                    assert state_before.keys() == after.keys()
                    for key in after:
                        for name in after[key]:
                            assert torch.equal(after[key][name], state_before[key][name])
            opt_g.step(guarded.losses(x))
    assert opt_g.skipped_steps == 1
    for p, q in zip(model.parameters(), guarded.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("sync_free", [None, True], ids=["host-check", "sync-free"])
def test_inf_gradient_via_step_with_grads_is_skipped_and_warns_once(sync_free):
    model = nn.Linear(3, 1).double()
    opt = MTAdam(model.parameters(), lr=1e-2, sync_free=sync_free)
    good = [[torch.ones_like(p) for p in model.parameters()] for _ in range(2)]
    opt.step_with_grads(good)
    before = [p.clone() for p in model.parameters()]
    bad = [[torch.full_like(p, float("inf")) for p in model.parameters()], good[1]]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        opt.step_with_grads(bad)
        opt.step_with_grads(bad)
    assert sum(issubclass(w.category, LossBalanceWarning) for w in rec) == 1
    assert opt.skipped_steps == 2
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert opt.state_dict()["mtadam"]["skipped_steps"] == 2


def test_step_with_grads_matches_step_and_keeps_inputs():
    model = make_model()
    twin = copy.deepcopy(model)
    # the reference below is K autograd.grad calls: bit-identical to the sequential mode
    o1 = MTAdam(model.parameters(), lr=1e-2, grad_mode="sequential")
    o2 = MTAdam(twin.parameters(), lr=1e-2)
    params = list(twin.parameters())
    for x in batches(5):
        o1.step(model.losses(x))
        losses = twin.losses(x)
        grads = [
            list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
            for loss in losses
        ]
        mapping = {}
        for j, p in enumerate(params):
            col = [grads[i][j] for i in range(3)]
            if any(g is not None for g in col):
                mapping[p] = torch.stack([g if g is not None else torch.zeros_like(p) for g in col])
        copies = {p: g.clone() for p, g in mapping.items()}
        o2.step_with_grads(mapping, losses=torch.stack([loss.detach() for loss in losses]))
        for p in mapping:
            assert torch.equal(mapping[p], copies[p])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------- contract


def test_step_without_gradients_is_a_noop():
    model = nn.Linear(2, 2)
    other = nn.Linear(2, 1)
    opt = MTAdam(model.parameters())
    loss = other(torch.randn(3, 2)).sum()
    opt.step([loss, 2 * loss])
    assert len(opt.state) == 0


def test_scheduler_and_param_group_lr():
    model = make_model()
    opt = MTAdam(
        [
            {"params": model.trunk.parameters(), "lr": 0.0},
            {"params": list(model.a.parameters()) + list(model.b.parameters())},
        ],
        lr=1e-2,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trunk_before = [p.clone() for p in model.trunk.parameters()]
    head_before = model.a.weight.clone()
    for x in batches(3):
        opt.step(model.losses(x))
        sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2 / 8)
    for p, b in zip(model.trunk.parameters(), trunk_before):
        assert torch.equal(p, b)
    assert not torch.equal(model.a.weight, head_before)


def test_closure_and_zero_grad():
    model = make_model()
    opt = MTAdam(model.parameters(), lr=1e-2)
    x = batches(1)[0]
    out = opt.step(closure=lambda: model.losses(x))
    assert len(out) == 3
    model.losses(x)[0].backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_batched_grad_mode_matches_sequential():
    model = make_model()
    twin = copy.deepcopy(model)
    o1 = MTAdam(model.parameters(), lr=1e-2, grad_mode="sequential")
    o2 = MTAdam(twin.parameters(), lr=1e-2, grad_mode="batched")
    for x in batches(5):
        o1.step(model.losses(x))
        o2.step(twin.losses(x))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state(low):
    model = make_model(low)
    opt = MTAdam(model.parameters(), lr=1e-2)
    before = model.a.weight.clone()
    for x in batches(3, low):
        opt.step(model.losses(x))
    st = opt.state[model.a.weight]
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    assert st["magnitude"].dtype == torch.float32
    assert model.a.weight.dtype == low and not torch.equal(model.a.weight, before)


def test_mapping_of_losses_and_repr():
    model = make_model()
    opt = MTAdam(model.parameters(), lr=1e-2, term_weights=[1, 2, 3])
    losses = dict(zip(("a", "b", "c"), model.losses(batches(1)[0])))
    opt.step(losses)
    text = repr(opt)
    for word in (
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "decoupled_weight_decay",
        "term_weights",
        "grouping",
        "normalization",
        "second_moment",
        "magnitude_init",
        "grad_mode",
    ):
        assert word in text


class _HostReads(TorchDispatchMode):
    """Counts reads of tensor values on the host (``.item()``, ``bool()``, ...)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bad", [False, True])
def test_sync_free_step_never_reads_a_tensor_on_the_host(bad):
    model = make_model()
    opt = MTAdam(model.parameters(), lr=1e-2, sync_free=True, weight_decay=0.1)
    data = batches(3)
    opt.step(model.losses(data[0]))
    opt._flush_pending()  # the previous step's flag is read here, outside the step
    losses = model.losses(data[1])
    if bad:
        losses[2] = losses[2] * float("nan")
    with _HostReads() as mode:
        opt.step(losses)
    assert mode.reads == 0
    # the control: the host-check path does read the flag
    opt_cpu = MTAdam(model.parameters(), lr=1e-2)
    with _HostReads() as mode:
        opt_cpu.step(model.losses(data[2]))
    assert mode.reads >= 1
    if bad:
        with pytest.warns(LossBalanceWarning, match="skipped a step"):
            assert opt.skipped_steps == 1


def test_registry_entry():
    info = lossbalance.get_method("mtadam")
    assert info.needs == "optimizer" and info.factory(3) is MTAdam


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0 (expected learning rate >= 0)"),
        ({"eps": -1e-8}, "Invalid eps: -1e-08"),
        ({"weight_decay": -0.1}, "Invalid weight_decay: -0.1"),
        ({"betas": (1.0, 0.999, 0.9)}, "Invalid beta1: 1.0 (expected 0 <= beta1 < 1)"),
        ({"betas": (0.9, -0.1, 0.9)}, "Invalid beta2: -0.1"),
        ({"betas": (0.9, 0.999, 1.2)}, "Invalid beta3: 1.2 (expected 0 <= beta3 < 1)"),
        ({"betas": (0.9, 0.999)}, "Invalid betas"),
        ({"grouping": "layer"}, "Invalid grouping: 'layer'"),
        ({"normalization": "x"}, "Invalid normalization"),
        ({"second_moment": "min"}, "Invalid second_moment"),
        ({"magnitude_init": "zero"}, "Invalid magnitude_init"),
        ({"term_weights": [1.0, -2.0]}, "Invalid term weight: -2.0"),
        ({"grouping": "module"}, "grouping='module' needs named parameters"),
    ],
)
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MTAdam(nn.Linear(2, 2).parameters(), **kwargs)


def test_invalid_losses():
    model = nn.Linear(2, 2)
    opt = MTAdam(model.parameters())
    out = model(torch.randn(3, 2))
    with pytest.raises(ValueError, match="losses is empty"):
        opt.step([])
    with pytest.raises(
        ValueError, match=r"loss term 1 must be a scalar tensor, got shape \(3, 2\)"
    ):
        opt.step([out.sum(), out])
    with pytest.raises(ValueError, match="loss term 0 does not require grad"):
        opt.step([out.sum().detach(), out.sum()])
    with pytest.raises(TypeError, match="loss term 1 must be a Tensor, got float"):
        opt.step([out.sum(), 1.0])
    with pytest.raises(TypeError, match="needs the loss terms"):
        opt.step()


def test_term_count_is_fixed():
    model = nn.Linear(2, 2)
    opt = MTAdam(model.parameters())
    out = model(torch.randn(3, 2))
    opt.step([out.sum(), out.pow(2).sum()])
    out = model(torch.randn(3, 2))
    with pytest.raises(ValueError, match="stepped with 2 loss terms before, got 3"):
        opt.step([out.sum(), out.pow(2).sum(), out.mean()])
    opt2 = MTAdam(model.parameters(), term_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="term_weights has 3 entries but 2 loss terms"):
        opt2.step([out.sum(), out.mean()])


def test_sparse_gradients_are_rejected():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = MTAdam(emb.parameters())
    out = emb(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="sparse gradient"):
        opt.step([out.sum(), out.pow(2).sum()])


# ----------------------------------------------------------------------------- CUDA graphs


def _pretend_capturing(monkeypatch):
    # the branch step() takes while a CUDA graph is being captured, exercised on the CPU
    import lossbalance.optim._mtadam as mtadam_module

    monkeypatch.setattr(mtadam_module, "_is_capturing", lambda device: True)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {
            "term_weights": [1.0, 2.0, 0.5],
            "grouping": "global",
            "weight_decay": 0.1,
            "second_moment": "own",
        },
        {"eps": 0.0, "magnitude_init": "one", "decoupled_weight_decay": True},
    ],
)
def test_capture_path_equals_the_normal_step(options, monkeypatch):
    # the graph-capture branch runs the same device-tensor math (step counter and bias
    # corrections as tensors) and only leaves out the host-side skip bookkeeping
    import lossbalance.optim._mtadam as mtadam_module

    data = batches(8)
    model, twin = make_model(), make_model()
    opt = MTAdam(model.parameters(), lr=1e-2, sync_free=True, **options)
    opt_c = MTAdam(twin.parameters(), lr=1e-2, sync_free=True, **options)
    opt.step(model.losses(data[0]))
    opt_c.step(twin.losses(data[0]))  # the eager warm-up step
    pending = len(opt_c._pending)
    for k, x in enumerate(data[1:]):
        losses, losses_c = model.losses(x), twin.losses(x)
        if k == 3:
            losses[1] = losses[1] * float("nan")
            losses_c[1] = losses_c[1] * float("nan")
        with pytest.warns(LossBalanceWarning) if k == 4 else warnings.catch_warnings():
            opt.step(losses)  # warns at the next step, when the flag has been read
        with monkeypatch.context() as patch, _HostReads() as mode, warnings.catch_warnings():
            patch.setattr(mtadam_module, "_is_capturing", lambda device: True)
            warnings.simplefilter("error")  # no skip warning inside a graph
            opt_c.step(losses_c)
        assert mode.reads == 0
    assert len(opt_c._pending) == pending
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    for s, t in zip(opt.state.values(), opt_c.state.values()):
        for name in s:
            assert torch.equal(s[name], t[name]), name
    assert opt_c.skipped_steps == opt.skipped_steps == 1


def test_capture_needs_a_warm_up_step_and_sync_free(monkeypatch):
    data = batches(2)
    _pretend_capturing(monkeypatch)
    model = make_model()
    with pytest.raises(RuntimeError, match="run at least one eager step before capturing"):
        MTAdam(model.parameters(), sync_free=True).step(model.losses(data[0]))
    with pytest.raises(RuntimeError, match=r"sync_free=False\) reads the finite flag"):
        MTAdam(model.parameters(), sync_free=False).step(model.losses(data[0]))
    # resumed from a checkpoint: the state exists, but the skip counter does not yet
    monkeypatch.undo()
    opt = MTAdam(model.parameters(), sync_free=True)
    opt.step(model.losses(data[0]))
    resumed = MTAdam(model.parameters(), sync_free=True)
    resumed.load_state_dict(_roundtrip(opt.state_dict()))
    _pretend_capturing(monkeypatch)
    with pytest.raises(RuntimeError, match="run at least one eager step"):
        resumed.step(model.losses(data[1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grad_mode", ["auto", "sequential"])
def test_cuda_graph_of_a_whole_step_matches_eager(grad_mode):
    device = torch.device("cuda")
    data = [x.to(device) for x in batches(8)]
    model, twin = make_model().to(device), make_model().to(device)
    opt = MTAdam(model.parameters(), lr=1e-2, grad_mode=grad_mode)
    opt_g = MTAdam(twin.parameters(), lr=1e-2, grad_mode=grad_mode)
    static_x = data[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in data[:3]:
            static_x.copy_(x)
            opt_g.step(twin.losses(static_x))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step(twin.losses(static_x))
    for x in data[3:]:
        static_x.copy_(x)
        graph.replay()
    for x in data:
        opt.step(model.losses(x))
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    for s, t in zip(opt.state.values(), opt_g.state.values()):
        for name in s:
            torch.testing.assert_close(s[name], t[name], rtol=1e-9, atol=1e-12)
    assert opt_g.skipped_steps == 0


# ----------------------------------------------------------------------------- multi-tensor


class _OpCount(TorchDispatchMode):
    """Counts dispatched aten ops that are not views (views launch no kernels)."""

    def __init__(self):
        super().__init__()
        self.ops: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func] = self.ops.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def _update_ops(layers: int, **options) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)]).double()
    opt = MTAdam(model.parameters(), lr=1e-2, weight_decay=0.1, **options)
    opt.num_terms = 3
    params = list(model.parameters())
    with torch.no_grad():
        opt._apply({p: torch.randn(3, *p.shape, dtype=torch.float64) for p in params}, None)
        stacked = {p: torch.randn(3, *p.shape, dtype=torch.float64) for p in params}
        with _OpCount() as mode:
            opt._apply(stacked, None)
    return mode.ops


@pytest.mark.parametrize("sync_free", [None, True], ids=["host-check", "sync-free"])
def test_update_ops_do_not_grow_with_the_number_of_tensors(sync_free):
    # the update is multi-tensor (torch._foreach_*): 40 parameter tensors dispatch as many
    # ops as 4; the per-parameter loop it replaced dispatched about 18 per tensor. The
    # masked path keeps one masked_fill_ per tensor (no foreach op maps NaN to 0), and on
    # the CPU the max over terms is one amax per tensor (a foreach tree on accelerators).
    few, many = _update_ops(2, sync_free=sync_free), _update_ops(20, sync_free=sync_free)
    per_tensor = (1 if sync_free else 0) + 1
    assert sum(many.values()) - sum(few.values()) <= per_tensor * (40 - 4), many
    assert sum(few.values()) <= 80 + per_tensor * 4, few
    if sync_free:
        assert many.get(torch.ops.aten.masked_fill_.Scalar, 0) == 40


@pytest.mark.parametrize("num", [1, 2, 3, 5, 8])
def test_max_tree_equals_amax(num):
    # the accelerators' pairwise foreach tree of the max over terms (the CPU uses amax)
    from lossbalance.optim._mtadam import _reduce_terms

    tensors = [torch.randn(num, *shape) for shape in [(3,), (2, 4), (5, 1, 2)]]
    copies = [t.clone() for t in tensors]
    out = _reduce_terms(tensors, num, torch._foreach_maximum, torch._foreach_maximum_)
    for o, t, c in zip(out, tensors, copies, strict=True):
        assert torch.equal(o, t.amax(dim=0))
        assert torch.equal(t, c)  # the inputs are left intact


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"second_moment": "mean"},
        {"term_weights": [1.0, 3.0, 0.5]},
        {"weight_decay": 0.1, "decoupled_weight_decay": True},
    ],
    ids=lambda o: ",".join(o) or "default",
)
def test_cpu_path_folds_the_scales_and_leaves_the_stack_intact(options):
    # On the CPU a finite step folds the per-term scales into the moments (one GEMV per
    # tensor for the first, s_i^2 per term for the second) instead of a read-write pass
    # g *= s over the (I, |p|) stack: the stack is not written, and the result equals the
    # in-place path (the masked one of accelerators) up to rounding.
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    folded = MTAdam(models[0].parameters(), lr=1e-2, **options)
    scaled = MTAdam(models[1].parameters(), lr=1e-2, sync_free=True, **options)
    folded.num_terms = scaled.num_terms = 3
    gen = torch.Generator().manual_seed(3)
    spread = torch.tensor([1.0, 1e3, 1e-2], dtype=torch.float64)
    with torch.no_grad():
        for _ in range(5):
            grads = [
                torch.randn(3, *p.shape, generator=gen, dtype=torch.float64)
                * spread.view(3, *[1] * p.dim())
                for p in models[0].parameters()
            ]
            kept = [g.clone() for g in grads]
            folded._apply(dict(zip(models[0].parameters(), grads)), None)
            assert all(torch.equal(g, k) for g, k in zip(grads, kept, strict=True))
            scaled._apply(dict(zip(models[1].parameters(), kept)), None)
            assert not all(torch.equal(g, k) for g, k in zip(grads, kept, strict=True))
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
        for name in ("exp_avg", "exp_avg_sq", "magnitude"):
            torch.testing.assert_close(
                folded.state[p][name], scaled.state[q][name], rtol=1e-12, atol=1e-18
            )


def test_cpu_stacks_are_reused_across_steps_without_stale_rows(monkeypatch):
    # On the CPU the per-term gradient stacks of one step are written again at the next;
    # a term that reaches a layer at one step and not the next must leave zeros there, not
    # the last step's gradient: the run equals one with fresh stacks bit for bit.
    def losses(model, x, k):
        z = model.trunk(x)
        ya, yb = model.a(z), model.b(z)
        second = (yb[:, 0] - x[:, 1]).pow(2).mean()
        if k % 2:  # every other step the second term does not reach head b
            second = (ya - x[:, 1:2]).abs().mean()
        return [(ya - x[:, :1]).pow(2).mean(), second, (yb[:, 1] - x[:, 2]).abs().mean()]

    runs = []
    for fresh in (False, True):
        model = make_model()
        opt = MTAdam(model.parameters(), lr=1e-2, grad_mode="sequential")
        stacks = []
        for k, x in enumerate(batches(6)):
            if fresh:
                opt._stacks = {}
            opt.step(losses(model, x, k))
            stacks.append(opt._stacks[model.b.weight])
        runs.append([p.detach().clone() for p in model.parameters()])
        assert all(s is stacks[0] for s in stacks) != fresh
    for p, q in zip(*runs, strict=True):
        assert torch.equal(p, q)
