"""MTAdam on real training setups (issue 15): param groups, accumulation, checkpoints,
dtypes, memory formats, complex parameters, extreme scales, clipping, GradScaler, buffers."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from lossbalance import LossBalanceWarning, MTAdam


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class Net(nn.Module):
    """Trunk and two heads; term 0 reaches head a, terms 1 and 2 head b."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.a = nn.Linear(6, 1)
        self.b = nn.Linear(6, 2)

    def losses(self, x, scales=(1.0, 1.0, 1.0)):
        z = self.trunk(x)
        ya, yb = self.a(z), self.b(z)
        return [
            scales[0] * (ya - x[:, :1]).pow(2).mean(),
            scales[1] * (yb[:, 0] - x[:, 1]).pow(2).mean(),
            scales[2] * (yb[:, 1] - x[:, 2]).abs().mean(),
        ]


def make_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Net().to(dtype)


def batches(n, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 4, generator=gen).to(dtype) for _ in range(n)]


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------- 1. grouping="module"


def _enc_dec(seed=0):
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    dec = nn.Sequential(nn.Linear(4, 2))
    return enc, dec


def _enc_dec_losses(enc, dec, x):
    z = enc(x)
    y = dec(z)
    return [y[:, 0].pow(2).mean(), 30 * (y[:, 1] - x[:, 0]).abs().mean()]


def test_module_grouping_tells_param_groups_with_equal_names_apart():
    # both groups name their layer "0": they are still two layers, exactly as when the
    # names are unique (one group of nn.Sequential(enc, dec).named_parameters())
    data = [torch.randn(8, 3, generator=torch.Generator().manual_seed(k)) for k in range(5)]
    enc, dec = _enc_dec()
    opt = MTAdam(
        [{"params": enc.named_parameters()}, {"params": dec.named_parameters()}],
        lr=1e-2,
        grouping="module",
    )
    enc_u, dec_u = _enc_dec()
    opt_u = MTAdam(nn.Sequential(enc_u, dec_u).named_parameters(), lr=1e-2, grouping="module")
    for x in data:
        opt.step(_enc_dec_losses(enc, dec, x))
        opt_u.step(_enc_dec_losses(enc_u, dec_u, x))
    mags = opt.magnitudes()
    assert not torch.equal(mags[enc[0].weight], mags[dec[0].weight])
    assert torch.equal(mags[enc[0].weight], mags[enc[0].bias])
    for p, q in zip(
        [*enc.parameters(), *dec.parameters()], [*enc_u.parameters(), *dec_u.parameters()]
    ):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_module_grouping_add_param_group_of_a_head_with_a_colliding_name():
    torch.manual_seed(0)
    trunk, head = nn.Sequential(nn.Linear(3, 4)), nn.Sequential(nn.Linear(4, 1))
    opt = MTAdam(trunk.named_parameters(), lr=1e-2, grouping="module")
    opt.add_param_group({"params": head.named_parameters()})
    x = torch.randn(8, 3)
    y = head(trunk(x))
    opt.step([y.pow(2).mean(), 7 * (y - 1).abs().mean()])
    mags = opt.magnitudes()
    assert not torch.equal(mags[trunk[0].weight], mags[head[0].weight])
    with pytest.raises(ValueError, match="grouping='module' needs named parameters"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))]})


def test_module_grouping_rejects_duplicate_names_in_one_group():
    enc, dec = _enc_dec()
    named = [*enc.named_parameters(), *dec.named_parameters()]
    with pytest.raises(ValueError, match=r"'0\.weight' names two parameters"):
        MTAdam(named, grouping="module")
    # no name repeats, but module "0" of the encoder and of the head would be merged
    torch.manual_seed(0)
    enc, head = nn.Sequential(nn.Linear(3, 4, bias=False)), nn.Sequential(nn.Linear(4, 1))
    named = [*enc.named_parameters(), ("1.weight", nn.Parameter(torch.ones(2)))]
    named += [("0.bias", head[0].bias)]
    with pytest.raises(ValueError, match=r"module '0' are not listed together"):
        MTAdam(named, grouping="module")
    # a module's tensors listed together, in any order, are fine
    MTAdam(sorted(nn.Sequential(enc, head).named_parameters()), grouping="module")


# ------------------------------------------------------------- 2. pending micro-batches


def _twins():
    return make_net(), make_net()


def test_zero_grad_drops_accumulated_micro_batches():
    (m1, m2), data = _twins(), batches(2)
    o1, o2 = MTAdam(m1.parameters(), lr=1e-2), MTAdam(m2.parameters(), lr=1e-2)
    o1.accumulate(m1.losses(data[0]))
    o1.zero_grad()
    o1.step(m1.losses(data[1]))
    o2.step(m2.losses(data[1]))
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_drops_accumulated_micro_batches():
    (m1, m2), data = _twins(), batches(3)
    o1, o2 = MTAdam(m1.parameters(), lr=1e-2), MTAdam(m2.parameters(), lr=1e-2)
    o1.step(m1.losses(data[0]))
    o2.step(m2.losses(data[0]))
    sd = _roundtrip(o1.state_dict())
    o1.accumulate(m1.losses(data[1]))
    o1.load_state_dict(sd)
    o1.step(m1.losses(data[2]))
    o2.step(m2.losses(data[2]))
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_step_with_grads_refuses_pending_micro_batches_and_keeps_them():
    (m1, m2), data = _twins(), batches(2)
    o1, o2 = MTAdam(m1.parameters(), lr=1e-2), MTAdam(m2.parameters(), lr=1e-2)
    o1.accumulate(m1.losses(data[0]))
    o2.accumulate(m2.losses(data[0]))
    grads = [
        list(torch.autograd.grad(loss, list(m1.parameters()), retain_graph=True, allow_unused=True))
        for loss in m1.losses(data[1])
    ]
    before = params_of(m1)
    with pytest.raises(RuntimeError, match="accumulate"):
        o1.step_with_grads(grads)
    assert all(torch.equal(p, b) for p, b in zip(m1.parameters(), before))
    o1.step()  # the pending micro-batch is still there and applied now
    o2.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------- 4. checkpoint validation


def _trained(steps=2, **options):
    model = make_net()
    opt = MTAdam(model.parameters(), lr=1e-2, **options)
    for x in batches(steps):
        opt.step(model.losses(x))
    return model, opt


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _assert_same_sd(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["mtadam"] == b["mtadam"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for key in a["state"][k]:
            assert torch.equal(a["state"][k][key], b["state"][k][key])


def _tamper(sd, how):
    sd = copy.deepcopy(sd)
    st = sd["state"][0]
    if how == "extra-row":
        st["exp_avg_sq"] = torch.cat([st["exp_avg_sq"], st["exp_avg_sq"][:1]])
    elif how == "nan":
        st["exp_avg"][0, 0] = float("nan")
    elif how == "negative":
        st["exp_avg_sq"][1, 0, 0] = -1.0
    elif how == "missing":
        del st["magnitude"]
    elif how == "int-dtype":
        st["exp_avg"] = st["exp_avg"].to(torch.int64)
    elif how == "magnitude-shape":
        st["magnitude"] = st["magnitude"][:2]
    elif how == "betas":
        sd["param_groups"][0]["betas"] = (0.9, 0.999)
    elif how == "options":
        sd["mtadam"]["options"]["second_moment"] = "own"
    elif how == "num-terms":
        sd["mtadam"]["num_terms"] = 2
    return sd


@pytest.mark.parametrize(
    "how,message",
    [
        ("extra-row", r"parameter 0.*exp_avg_sq.*shape \(4, 6, 4\).*expected \(3, 6, 4\)"),
        ("nan", r"parameter 0.*exp_avg.*not finite"),
        ("negative", r"parameter 0.*exp_avg_sq.*negative"),
        ("missing", r"parameter 0.*missing 'magnitude'"),
        ("int-dtype", r"parameter 0.*exp_avg.*dtype torch.int64"),
        ("magnitude-shape", r"parameter 0.*magnitude.*shape \(2,\).*expected \(3,\)"),
        ("betas", r"Invalid betas in param group 0"),
        ("options", r"second_moment='own'.*second_moment='max'"),
        ("num-terms", r"parameter 0.*magnitude.*shape \(3,\).*num_terms=2"),
    ],
)
def test_tampered_checkpoint_is_refused_and_changes_nothing(how, message):
    model, opt = _trained()
    good = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(_tamper(good, how))
    _assert_same_sd(opt.state_dict(), good)
    twin, opt_t = _trained()
    for x in batches(2, seed=7):
        opt.step(model.losses(x))
        opt_t.step(twin.losses(x))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_torch_adam_state_dict_is_refused_clearly():
    model, opt = _trained()
    adam = torch.optim.Adam(model.parameters())
    model.losses(batches(1)[0])[0].backward()
    adam.step()
    with pytest.raises(ValueError, match=r"missing 'magnitude'.*MTAdam checkpoint"):
        opt.load_state_dict(adam.state_dict())


def test_checkpoint_without_the_new_entries_still_loads():
    # checkpoints written before the options and the scaler counter were saved
    model, opt = _trained()
    sd = _roundtrip(opt.state_dict())
    del sd["mtadam"]["options"], sd["mtadam"]["scaler_skipped_steps"]
    for group in sd["param_groups"]:
        del group["max_grad_norm"]
    twin = make_net()
    twin.load_state_dict(model.state_dict())
    opt_t = MTAdam(twin.parameters(), lr=1e-2)
    opt_t.load_state_dict(sd)
    assert opt_t.param_groups[0]["max_grad_norm"] is None and opt_t.scaler_skipped_steps == 0
    for x in batches(2, seed=4):
        opt.step(model.losses(x))
        opt_t.step(twin.losses(x))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_term_weights_must_match_the_checkpoint_term_count():
    _, opt = _trained()
    sd = _roundtrip(opt.state_dict())
    other = MTAdam(make_net().parameters(), term_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"term_weights has 2 entries.*3 terms"):
        other.load_state_dict(sd)
    assert other.num_terms is None and len(other.state) == 0


# ------------------------------------------------------------- 7. low-precision resume


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("sync_free", [False, True])
def test_resume_is_bit_identical_for_every_dtype(dtype, sync_free):
    data = batches(8, dtype)
    model = make_net(dtype)
    opt = MTAdam(model.parameters(), lr=1e-2, sync_free=sync_free)
    for x in data:
        opt.step(model.losses(x))

    resumed = make_net(dtype)
    opt_r = MTAdam(resumed.parameters(), lr=1e-2, sync_free=sync_free)
    for x in data[:4]:
        opt_r.step(resumed.losses(x))
    ckpt = _roundtrip({"model": resumed.state_dict(), "opt": opt_r.state_dict()})
    fresh = make_net(dtype, seed=3)
    fresh.load_state_dict(ckpt["model"])
    opt_f = MTAdam(fresh.parameters(), lr=1e-2, sync_free=sync_free)
    opt_f.load_state_dict(ckpt["opt"])
    state = opt_f.state[fresh.a.weight]
    expected = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == expected
    for x in data[4:]:
        opt_f.step(fresh.losses(x))
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------- 8b. memory formats


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 1, 1)
        self.b = nn.Conv2d(4, 1, 1)

    def losses(self, x):
        z = torch.tanh(self.conv(x))
        return [self.a(z).pow(2).mean(), 10 * (self.b(z) - 1).abs().mean()]


def _conv_nets():
    torch.manual_seed(0)
    net = ConvNet().double()
    cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    assert cl.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not cl.conv.weight.is_contiguous()
    return net, cl


def test_step_on_a_channels_last_conv_net_keeps_the_format():
    net, cl = _conv_nets()
    o1, o2 = MTAdam(net.parameters(), lr=1e-2), MTAdam(cl.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
        o1.step(net.losses(x))
        o2.step(cl.losses(x.to(memory_format=torch.channels_last)))
    assert cl.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(net.parameters(), cl.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sync_free", [False, True])
def test_step_with_grads_takes_non_contiguous_per_term_gradients(sync_free):
    net, cl = _conv_nets()
    o1 = MTAdam(net.parameters(), lr=1e-2, sync_free=sync_free)
    o2 = MTAdam(cl.parameters(), lr=1e-2, sync_free=sync_free)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        stacks = {}
        for p, q in zip(net.parameters(), cl.parameters()):
            g = torch.randn(2, *p.shape, generator=gen, dtype=torch.float64)
            stacks[p, q] = g
        o1.step_with_grads({p: g for (p, _), g in stacks.items()})
        odd = {}
        for (_, q), g in stacks.items():
            if g.dim() == 5:  # (I, O, C, H, W) stored as (I, O, H, W, C): channels_last rows
                odd[q] = g.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
            elif g.dim() == 2:  # a transposed view
                odd[q] = g.t().contiguous().t()
            else:
                odd[q] = g
        assert not odd[cl.conv.weight].is_contiguous()
        o2.step_with_grads(odd)
    assert cl.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for p, q in zip(net.parameters(), cl.parameters()):
        assert torch.equal(p, q)


def test_transposed_linear_gradients():
    model = make_net()
    opt = MTAdam(model.parameters(), lr=1e-2)
    w = model.trunk[0].weight
    g = torch.randn(w.shape[1], w.shape[0], 2, dtype=torch.float64).permute(2, 1, 0)
    opt.step_with_grads({w: g})
    assert torch.isfinite(w).all() and opt.state[w]["step"] == 1


# ------------------------------------------------------------- 9. complex parameters


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("sync_free", [False, True])
def test_complex_parameters_one_term_equals_adam(dtype, sync_free):
    torch.manual_seed(0)
    w = torch.randn(5, 3, dtype=dtype)
    x = torch.randn(7, 5, dtype=dtype)
    p1, p2 = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    opt = MTAdam([p1], lr=1e-2, weight_decay=0.1, sync_free=sync_free)
    adam = torch.optim.Adam([p2], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        opt.step([(x @ p1).abs().pow(2).mean()])
        adam.zero_grad()
        (x @ p2).abs().pow(2).mean().backward()
        adam.step()
    assert torch.equal(p1, p2)


def test_complex_parameters_two_terms_train_and_resume():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    opt = MTAdam([p], lr=1e-2)

    def losses():
        return [(p - 1j).abs().pow(2).sum(), 100 * (p.real - 2).abs().sum()]

    for _ in range(3):
        opt.step(losses())
    q = nn.Parameter(p.detach().clone())
    opt_q = MTAdam([q], lr=1e-2)
    opt_q.load_state_dict(_roundtrip(opt.state_dict()))
    opt.step(losses())
    opt_q.step([(q - 1j).abs().pow(2).sum(), 100 * (q.real - 2).abs().sum()])
    assert torch.equal(p, q) and torch.isfinite(torch.view_as_real(p)).all()
    assert opt.state[p]["magnitude"].dtype == torch.float32


# ------------------------------------------------------------- 11/12. extreme scales


def _scaled_run(scale, dtype, steps=6):
    # term 2 is never an anchor (term 0 is, or term 1 in head b): scaling it must change
    # nothing but rounding
    model = make_net(dtype)
    opt = MTAdam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in batches(steps, dtype):
            opt.step(model.losses(x, scales=(1.0, 1.0, scale)))
    assert opt.skipped_steps == 0
    return params_of(model)


@pytest.mark.parametrize("scale", [1e-15, 1e-12, 1e-9, 1e9, 1e15])
def test_scale_invariance_from_1e_minus_15_to_1e15_in_float64(scale):
    for p, q in zip(_scaled_run(scale, torch.float64), _scaled_run(1.0, torch.float64)):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-15, 1e-10, 1e20, 1e25])
def test_float32_norms_do_not_overflow_and_scale_invariance_holds(scale):
    for p, q in zip(_scaled_run(scale, torch.float32), _scaled_run(1.0, torch.float32)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_float32_sync_free_norms_do_not_overflow():
    runs = []
    for scale in (1e25, 1.0):
        model = make_net(torch.float32)
        opt = MTAdam(model.parameters(), lr=1e-2, sync_free=True)
        for x in batches(4, torch.float32):
            opt.step(model.losses(x, scales=(1.0, 1.0, scale)))
        assert opt.skipped_steps == 0
        runs.append(params_of(model))
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_exactly_zero_term_still_passes_unscaled_and_is_not_the_anchor():
    model = make_net()
    opt = MTAdam(model.parameters(), lr=1e-2)
    opt.step(model.losses(batches(1)[0], scales=(0.0, 1.0, 1.0)))
    mags = opt.state[model.b.weight]["magnitude"]
    assert mags[0] == 0 and mags[1] > 0
    assert torch.isfinite(model.b.weight).all()


# ------------------------------------------------------------- 15. gradient clipping


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "wd,decoupled,sync_free",
    [(0.0, False, False), (0.1, False, False), (0.1, True, False), (0.1, False, True)],
)
def test_one_term_max_grad_norm_equals_clip_grad_norm_then_adam(dtype, wd, decoupled, sync_free):
    m1, m2 = make_net(dtype), make_net(dtype)
    kw = dict(lr=1e-2, weight_decay=wd)
    opt = MTAdam(
        m1.parameters(),
        max_grad_norm=0.05,
        decoupled_weight_decay=decoupled,
        sync_free=sync_free,
        **kw,
    )
    adam = (torch.optim.AdamW if decoupled else torch.optim.Adam)(m2.parameters(), **kw)
    clipped = []
    for x in batches(5, dtype):
        opt.step([m1.losses(x)[0]])
        adam.zero_grad()
        m2.losses(x)[0].backward()
        clipped.append(float(nn.utils.clip_grad_norm_(m2.parameters(), 0.05)) > 0.05)
        adam.step()
    assert all(clipped)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, **tol)


def test_max_grad_norm_clips_the_balanced_gradient():
    # identical terms have scales 1, so the balanced gradient is 2g; clipping it to c is the
    # same as feeding both terms f * g with f = min(1, c / ||2g||)
    m1, m2 = make_net(), make_net()
    o1 = MTAdam(m1.parameters(), lr=1e-2, max_grad_norm=0.1)
    o2 = MTAdam(m2.parameters(), lr=1e-2)
    for x in batches(4):
        loss1 = m1.losses(x)[0]
        o1.step([loss1, loss1 * 1.0])
        grads = torch.autograd.grad(m2.losses(x)[0], list(m2.parameters()), allow_unused=True)
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(2 * g) for g in grads if g is not None])
        )
        f = min(1.0, 0.1 / (float(total) + 1e-6))
        assert f < 1
        scaled = [None if g is None else f * g for g in grads]
        o2.step_with_grads([scaled, scaled])
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_max_grad_norm_is_validated_and_saved():
    model = make_net()
    with pytest.raises(
        ValueError, match=r"Invalid max_grad_norm: -1.0 \(expected max_grad_norm > 0\)"
    ):
        MTAdam(model.parameters(), max_grad_norm=-1.0)
    opt = MTAdam(model.parameters(), max_grad_norm=2.0)
    assert opt.state_dict()["param_groups"][0]["max_grad_norm"] == 2.0


def test_dot_grad_that_mtadam_ignores_warns():
    model = make_net()
    opt = MTAdam(model.parameters(), lr=1e-2)
    losses = model.losses(batches(1)[0])
    sum(losses).backward(retain_graph=True)
    with pytest.warns(LossBalanceWarning, match=r"\.grad.*max_grad_norm"):
        opt.step(losses)


# ------------------------------------------------------------- 18. GradScaler overflow


def test_grad_scaler_overflow_is_counted_apart_and_quiet():
    model = make_net(torch.float32)
    opt = MTAdam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    data = batches(3, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = params_of(model)
        opt.step(model.losses(data[0], scales=(1.0, 1e6, 1.0)), grad_scaler=scaler)
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        scaler.update()
    assert scaler.get_scale() == 2.0**126
    assert opt.scaler_skipped_steps == 1 and opt.skipped_steps == 0
    bad = model.losses(data[1])
    bad[1] = bad[1] * float("nan")
    with pytest.warns(LossBalanceWarning, match="not finite"):
        opt.step(bad, grad_scaler=scaler)
    scaler.update()
    assert opt.scaler_skipped_steps == 1 and opt.skipped_steps == 1
    other = MTAdam(make_net(torch.float32).parameters(), lr=1e-2)
    other.load_state_dict(_roundtrip(opt.state_dict()))
    assert other.scaler_skipped_steps == 1 and other.skipped_steps == 1


def test_grad_scaler_overflow_of_accumulated_micro_batches_is_quiet():
    model = make_net(torch.float32)
    opt = MTAdam(model.parameters(), lr=1e-2, sync_free=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in batches(2, torch.float32):
            opt.accumulate(model.losses(x, scales=(1.0, 1e6, 1.0)), grad_scaler=scaler)
        opt.step(grad_scaler=scaler)
        assert opt.scaler_skipped_steps == 1 and opt.skipped_steps == 0


# ------------------------------------------------------------- 20b. kept stacks


def test_keep_stacks_false_and_release_buffers():
    runs = []
    for keep in (True, False):
        model = make_net()
        opt = MTAdam(model.parameters(), lr=1e-2, grad_mode="sequential", keep_stacks=keep)
        for x in batches(3):
            opt.step(model.losses(x))
            assert bool(opt._stacks) == keep
        runs.append(params_of(model))
        opt.release_buffers()
        assert opt._stacks == {}
    for p, q in zip(*runs):
        assert torch.equal(p, q)
    with pytest.raises(TypeError, match="keep_stacks"):
        MTAdam(make_net().parameters(), keep_stacks="yes")
