"""MTAdam step time and memory against the number of terms I and the model size.

Question: how does a full MTAdam step (forward + I per-term gradients + update) grow with
I? The slope, in backward passes per added term, is the figure of merit: the per-term
gradients cost one backward pass each by construction (the engine's sequential mode), so
anything above 1.0 is the update's (and the gradient copies') per-term cost. Target on
the CPU: <= 1.05 (issue 5).

Models: the MNIST-example CNN (1.2M parameters, batch 64) and a transformer encoder of
25.2M parameters (d_model 512, 8 layers, batch 8 x 32 tokens by default on the CPU). The
I terms are L_i = sum_n W[i, n] NLL_n / N with a fixed random W >= 0, so that every term
reaches every sample for any I.

A backward pass T_b is one ``autograd.grad`` of the summed loss of the same model and batch
(forward timed apart), measured in the same interleaved loop. The slope is the least-squares fit of the median
step time over I in {1, 2, 4, 10, 32}; the step is split into forward, per-term gradients
(timed around the engine inside ``step``) and the rest (the update).

Memory against I: on CUDA the measured peak (``torch.cuda.max_memory_allocated``) of one
step; everywhere the analytic parameters + optimizer state ((I+1)|theta| + I per tensor)
+ stacked per-term gradients (I|theta|).

Run: ``python benchmarks/bench_scaling.py [--device cuda] [--encoder-batch 8]``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from _common import (
    Encoder,
    MnistCNN,
    Report,
    med,
    mib,
    mixed_terms,
    ms,
    now,
    num_params,
    parser,
    peak_memory,
    peak_memory_reset,
    setup,
    synchronizer,
)
from torch import Tensor, nn

import lossbalance
import lossbalance.optim._mtadam as mtadam_module


def auto_choice(params: list[Tensor], k: int) -> str:
    """What ``term_grads(mode="auto")`` chose for these parameters and I."""
    from lossbalance.engine import _engine, _vjp

    return _vjp.cached_choice(_engine.auto_key(params, k)) or "sequential (I = 1)"


def fit_slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + s x``; returns ``(a, s)``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    s = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - s * mx, s


def make_model(
    name: str, device: torch.device, batch: int, seq: int
) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    if name == "cnn":
        model: nn.Module = MnistCNN()
        x = torch.randn(batch, 1, 28, 28)
        y = torch.randint(0, 10, (batch,))
    else:
        model = Encoder()
        x = torch.randn(batch, seq, 512)
        y = torch.randint(0, 10, (batch, seq))
    return model.to(device), x.to(device), y.to(device)


def run_model(
    rep: Report,
    name: str,
    label: str,
    device: torch.device,
    batch: int,
    seq: int,
    terms: list[int],
    repeats: int,
    warmup: int,
) -> dict[str, Any]:
    base, x, y = make_model(name, device, batch, seq)
    n = num_params(base)
    sync = synchronizer(device)
    tokens = y.numel()
    gen = torch.Generator().manual_seed(1)
    original = mtadam_module.term_grads

    configs: dict[int, dict[str, Any]] = {}
    for k in terms:
        model = copy.deepcopy(base)
        configs[k] = {
            "model": model,
            "opt": lossbalance.MTAdam(model.parameters()),
            "w": torch.rand(k, tokens, generator=gen).to(device),
            "parts": {"forward": [], "term_grads": [], "update": [], "step": []},
        }
    unit_model = copy.deepcopy(base)
    unit_params = list(unit_model.parameters())
    w1 = torch.rand(1, tokens, generator=gen).to(device)
    units: dict[str, list[float]] = {"forward": [], "backward": []}

    def step(k: int, record: bool) -> None:
        cfg = configs[k]
        grads_time: list[float] = []

        def timed(*a: Any, **kw: Any) -> Any:
            sync()
            t = now()
            out = original(*a, **kw)
            sync()
            grads_time.append(now() - t)
            return out

        sync()
        t0 = now()
        losses = mixed_terms(cfg["model"](x), y, cfg["w"])
        sync()
        t1 = now()
        mtadam_module.term_grads = timed  # type: ignore[assignment]
        try:
            cfg["opt"].step(losses)
        finally:
            mtadam_module.term_grads = original
        sync()
        t2 = now()
        if record:
            parts = cfg["parts"]
            parts["forward"].append(t1 - t0)
            parts["term_grads"].append(grads_time[0])
            parts["update"].append(t2 - t1 - grads_time[0])
            parts["step"].append(t2 - t0)

    def unit(record: bool) -> None:
        sync()
        t0 = now()
        losses = mixed_terms(unit_model(x), y, w1)
        sync()
        t1 = now()
        torch.autograd.grad(losses[0], unit_params)
        sync()
        t2 = now()
        if record:
            units["forward"].append(t1 - t0)
            units["backward"].append(t2 - t1)

    for _ in range(warmup):
        unit(False)
        for k in terms:
            step(k, False)
    for _ in range(repeats):
        unit(True)
        for k in terms:
            step(k, True)

    t_f = med(units["forward"])
    t_b = med(units["backward"])
    rows = []
    for k in terms:
        parts = configs[k]["parts"]
        analytic = 4 * n * (1 + (k + 1) + k) + 4 * k * len(list(base.parameters()))
        peak = "n/a (CPU)"
        if device.type == "cuda":
            peak_memory_reset(device)
            step(k, False)
            peak = mib(peak_memory(device))
        rows.append(
            [
                str(k),
                ms(med(parts["step"])),
                ms(med(parts["forward"])),
                ms(med(parts["term_grads"])),
                ms(med(parts["update"])),
                f"{med(parts['term_grads']) / t_b:.2f}",
                auto_choice(list(configs[k]["model"].parameters()), k),
                mib(analytic),
                peak,
            ]
        )
    xs = [float(k) for k in terms]
    _, s_step = fit_slope(xs, [med(configs[k]["parts"]["step"]) for k in terms])
    _, s_grad = fit_slope(xs, [med(configs[k]["parts"]["term_grads"]) for k in terms])
    _, s_upd = fit_slope(xs, [med(configs[k]["parts"]["update"]) for k in terms])
    slope = s_step / t_b
    t_b_min = min(units["backward"])
    _, s_min = fit_slope(xs, [min(configs[k]["parts"]["step"]) for k in terms])
    slope_min = s_min / t_b_min
    rep.add(
        f"### {label}: |theta| = {n:,}, batch {tuple(x.shape)}",
        "",
        f"Forward {ms(t_f)} ms, one backward pass T_b = {ms(t_b)} ms (medians of "
        f"{repeats} interleaved repetitions after {warmup} warm-up rounds).",
        "",
    )
    rep.table(
        [
            "I",
            "step ms",
            "forward ms",
            "per-term grads ms",
            "update ms",
            "grads / T_b",
            "grad mode (auto)",
            "params+state+grads MiB (analytic)",
            "peak MiB (measured)",
        ],
        rows,
    )
    status = "met" if slope <= 1.05 else "missed"
    rep.add(
        f"Slope: **{slope:.3f} backward passes per added term** (target <= 1.05 on the CPU: "
        f"{status}); of which per-term gradients {s_grad / t_b:.3f} and update "
        f"{s_upd / t_b:.3f} ({1e3 * s_upd:.2f} ms per term, {1e9 * s_upd / n:.2f} ns per "
        f"parameter and term). From the minima instead of the medians: {slope_min:.3f} "
        f"(T_b {ms(t_b_min)} ms).",
        "",
    )
    return {
        "slope": slope,
        "slope_min": slope_min,
        "t_b": t_b,
        "update_per_term": s_upd,
        "n": n,
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--terms", default="1,2,4,10,32")
    p.add_argument("--models", default="cnn,encoder")
    p.add_argument("--cnn-batch", type=int, default=64)
    p.add_argument("--encoder-batch", type=int, default=None, help="default 8 (CPU), 32 (CUDA)")
    p.add_argument("--encoder-seq", type=int, default=32)
    p.add_argument("--encoder-repeats", type=int, default=3)
    args = p.parse_args()
    device = setup(args)
    terms = [int(t) for t in args.terms.split(",")]
    if args.quick:
        terms = terms[:3]
    repeats = args.repeats or (1 if args.quick else 5)
    warmup = 0 if args.quick else min(args.warmup, 1)
    rep = Report("scaling", "MTAdam step against I and model size", args, device)
    enc_batch = args.encoder_batch or (32 if device.type == "cuda" else 8)
    summary: list[list[str]] = []
    for name in args.models.split(","):
        res: dict[str, Any] | None = None
        if name == "cnn":
            batch, seq, label = (8 if args.quick else args.cnn_batch), 0, "MNIST CNN"
        elif name == "encoder":
            batch, seq = (2 if args.quick else enc_batch), (8 if args.quick else args.encoder_seq)
            label = "Transformer encoder"
        else:
            raise SystemExit(f"unknown model {name!r} (expected cnn, encoder)")
        reps = repeats if name == "cnn" or args.quick else min(repeats, args.encoder_repeats)
        with rep.guard(label):
            res = run_model(rep, name, label, device, batch, seq, terms, reps, warmup)
        if res is None:
            continue
        summary.append(
            [
                label,
                f"{res['n']:,}",
                ms(res["t_b"]),
                f"{res['slope']:.3f} ({res['slope_min']:.3f})",
                f"{1e3 * res['update_per_term']:.2f}",
            ]
        )
    rep.add("Summary:", "")
    rep.table(
        [
            "model",
            "P (parameters)",
            "T_b ms",
            "slope, backward passes / term (from minima)",
            "update ms / term",
        ],
        summary,
    )
    rep.write()


if __name__ == "__main__":
    main()
