"""Exact per-term gradient variants of ``lossbalance.engine._vjp``: time and peak memory.

Question: which way of computing the K per-term gradients is fastest, and what does each
cost in memory? Variants (all exact, all checked against the sequential reference first):

- ``sequential``: K ``torch.autograd.grad`` calls (the engine's ``"sequential"``).
- ``batched``: one ``autograd.grad(..., is_grads_batched=True)`` on the stacked losses.
- ``two_stage (y=output)``: K cheap passes from the losses to the model's output, then one
  batched VJP through the network; ``two_stage (auto y)`` finds the split point itself
  (the logits); ``two_stage (batched stage 1)`` vectorises stage 1 too.
- ``torch.func``: ``functional_call`` + ``vjp`` + ``vmap`` over the identity.

Each timed run is forward + per-term gradients (``torch.func`` runs its own forward).
``one backward`` (forward + one ``autograd.grad`` of the summed loss) is the unit.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` during one run, above what was
allocated before it.
On the CPU, torch's allocator is not observable from tracemalloc, so each variant runs in
a fresh subprocess which, after a plain forward + summed backward, resets the kernel's
peak-RSS mark (``/proc/self/clear_refs``) and reports how far one run of the variant
(forward included) raises it above the RSS at that moment; the analytic size of the K gradient copies
(``K |theta|`` elements) is given next to it.

Run: ``python benchmarks/bench_term_grads.py [--device cuda] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _common import (
    MLP,
    Encoder,
    MnistCNN,
    Report,
    class_terms,
    interleaved,
    mib,
    num_params,
    parser,
    peak_memory,
    peak_memory_reset,
    ratio,
    rss_peak,
    rss_peak_reset,
    run_child,
    setup,
    spread,
)
from torch import Tensor, nn

from lossbalance.engine import _vjp

VARIANTS = (
    "one backward",
    "K autograd.grad, discarded",
    "sequential",
    "sequential, preallocated output",
    "batched",
    "two_stage (y=output)",
    "two_stage (auto y)",
    "two_stage (batched stage 1)",
    "torch.func",
)


@dataclass
class Workload:
    model: nn.Module
    x: Tensor
    y: Tensor
    k: int

    def forward(self) -> tuple[Tensor, list[Tensor]]:
        out = self.model(self.x)
        return out, class_terms(out, self.y, self.k)


def workload(name: str, device: torch.device, batch: int, k: int) -> Workload:
    torch.manual_seed(0)
    if name == "cnn":
        model: nn.Module = MnistCNN(k)
        x = torch.randn(batch, 1, 28, 28)
    elif name == "mlp":
        model = MLP(784, 1024, 3, k)
        x = torch.randn(batch, 784)
    elif name == "encoder":
        model = Encoder(k)
        x = torch.randn(max(1, batch // 8), 32, 512)  # batch 64 -> 8 sequences of 32 tokens
    else:
        raise ValueError(f"unknown model {name!r}")
    y = torch.randint(0, k, x.shape[:-1] if name == "encoder" else (batch,))
    return Workload(model.to(device), x.to(device), y.to(device), k)


def variant_fn(name: str, w: Workload) -> Callable[[], object]:
    params = [p for p in w.model.parameters() if p.requires_grad]

    def loss_fn(out: Tensor) -> Tensor:
        return torch.stack(class_terms(out, w.y, w.k))

    if name == "one backward":
        return lambda: torch.autograd.grad(torch.stack(w.forward()[1]).sum(), params)
    if name == "K autograd.grad, discarded":

        def raw() -> object:
            losses = w.forward()[1]
            for i, loss in enumerate(losses):
                torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1)
            return None

        return raw
    if name == "sequential":
        return lambda: _vjp.sequential_term_grads(w.forward()[1], params)
    if name == "sequential, preallocated output":
        # what the engine could do with buffers that persist across steps (e.g. owned by
        # the optimizer): no fresh K|theta| allocation, no zero fill, one copy per term
        bufs = [torch.empty((w.k, *p.shape), dtype=p.dtype, device=p.device) for p in params]

        def prealloc() -> object:
            losses = w.forward()[1]
            for i, loss in enumerate(losses):
                grads = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1)
                for buf, g in zip(bufs, grads, strict=True):
                    buf[i].copy_(g)
            return bufs

        return prealloc
    if name == "batched":
        return lambda: _vjp.batched_term_grads(w.forward()[1], params)
    if name == "two_stage (y=output)":

        def run() -> object:
            out, losses = w.forward()
            return _vjp.two_stage_term_grads(losses, params, out)

        return run
    if name == "two_stage (auto y)":
        return lambda: _vjp.two_stage_term_grads(w.forward()[1], params)
    if name == "two_stage (batched stage 1)":

        def run_b() -> object:
            out, losses = w.forward()
            return _vjp.two_stage_term_grads(losses, params, out, stage1="batched")

        return run_b
    if name == "torch.func":
        return lambda: _vjp.func_term_grads(w.model, w.x, loss_fn)[1]
    raise ValueError(name)


def check(w: Workload, dtype: torch.dtype) -> tuple[float, list[str]]:
    """Largest deviation of any variant from the sequential reference (``dtype``, eval),
    and the ops that vmap ran through its slow per-sample fallback (no batching rule)."""
    model = w.model
    model.to(dtype).eval()
    w.x = w.x.to(dtype)
    caught = warnings.catch_warnings(record=True)
    record = caught.__enter__()
    warnings.simplefilter("always")
    try:
        ref = variant_fn("sequential", w)()
        worst = 0.0
        for name in VARIANTS:
            if name in ("one backward", "K autograd.grad, discarded", "sequential"):
                continue
            got = variant_fn(name, w)()
            for a, b in zip(ref, got, strict=True):
                assert a is not None and b is not None
                worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)))
            del got
        ops = sorted(
            {
                m.group(1)
                for r in record
                if (m := re.search(r"batching rule for (\S+?)\.? ", str(r.message)))
            }
        )
        return worst, ops
    finally:
        caught.__exit__(None, None, None)
        model.float().train()
        w.x = w.x.float()


def child(args) -> None:
    """Subprocess entry: peak RSS growth of one variant over a plain step."""
    device = setup(args)
    w = workload(args.model, device, args.batch, args.terms)
    params = list(w.model.parameters())
    torch.autograd.grad(torch.stack(w.forward()[1]).sum(), params)
    fn = variant_fn(args.child, w)
    base = rss_peak_reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fn()
    print(json.dumps({"rss_delta": rss_peak() - base, "alive": result is not None}))


def run_model(
    rep: Report,
    args: argparse.Namespace,
    model_name: str,
    device: torch.device,
    batch: int,
    k: int,
    repeats: int,
) -> None:
    w = workload(model_name, device, batch, k)
    n = num_params(w.model)
    # float64 where it is cheap; the 25M encoder's K copies are checked in float32
    check_dtype = torch.float32 if model_name == "encoder" else torch.float64
    err, fallbacks = check(w, check_dtype)
    tol = 1e-9 if check_dtype == torch.float64 else 1e-4
    assert err < tol, f"a variant disagrees with the sequential reference ({err})"
    fns = {name: variant_fn(name, w) for name in VARIANTS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        times = interleaved(fns, repeats, 0 if args.quick else args.warmup, device)
    memory: dict[str, str] = {}
    for name in VARIANTS:
        if device.type == "cuda":
            base = peak_memory_reset(device)
            out = fns[name]()
            memory[name] = mib((peak_memory(device) or 0) - base)
            del out
        else:
            line = run_child(
                "bench_term_grads.py",
                [
                    "--child",
                    name,
                    "--model",
                    model_name,
                    "--batch",
                    str(batch),
                    "--terms",
                    str(k),
                    "--device",
                    args.device,
                    *(["--threads", str(args.threads)] if args.threads else []),
                ],
            )
            memory[name] = mib(json.loads(line)["rss_delta"])
    choice = _vjp.choose_mode(w.forward()[1], list(w.model.parameters()), repeats=2)
    unit = times["one backward"]
    seq = times["sequential"]
    rows = [
        [
            name,
            spread(ts),
            f"{ratio(ts, unit):.2f}",
            f"{ratio(ts, seq):.2f}",
            f"{min(ts) / min(seq):.2f}",
            memory[name],
            mib(4 * n * (1 if name == "one backward" else k)),
        ]
        for name, ts in times.items()
    ]
    rep.add(
        f"### {model_name}: |theta| = {n:,}, input {tuple(w.x.shape)}, K = {k}",
        "",
        f"All variants equal the sequential reference in {str(check_dtype)[6:]} (max "
        f"deviation relative to the largest entry, per parameter: {err:.1e}). "
        + (
            "Ops without a vmap batching rule (run by vmap's slow fallback loop in the "
            f"batched variants): {', '.join(f'`{op}`' for op in fallbacks)}."
            if fallbacks
            else "Every op had a vmap batching rule."
        ),
        "",
    )
    rep.table(
        [
            "variant",
            "ms",
            "x 1 bwd",
            "x sequential",
            "x sequential (min)",
            "peak MiB",
            "output MiB (analytic)",
        ],
        rows,
    )
    rep.add(
        f"`_vjp.choose_mode` on this model picks **{choice.mode}** "
        f"(timed: {', '.join(f'{m} {1e3 * t:.1f} ms' for m, t in choice.times.items())}).",
        "",
    )


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--terms", type=int, default=10)
    p.add_argument("--models", default="cnn,mlp", help="any of cnn, mlp, encoder (25.2M)")
    p.add_argument("--child", default=None, help=argparse_hidden())
    p.add_argument("--model", default="cnn", help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        child(args)
        return
    device = setup(args)
    repeats = args.repeats or (1 if args.quick else 10)
    batch = 8 if args.quick else args.batch
    k = args.terms
    name = (
        "term_grads" if args.models == "cnn,mlp" else "term_grads-" + args.models.replace(",", "-")
    )
    rep = Report(name, f"Per-term gradient variants, K = {k}", args, device)
    rep.add(
        f"Each run is forward + the K = {k} per-term gradients of the per-class terms "
        f"(batch {batch}, float32, training mode); {repeats} interleaved repetitions, ms as "
        "median [min-max]; 'x 1 bwd' and 'x sequential' are medians of per-round ratios to forward + one "
        "backward of the summed loss and to the sequential variant; '(min)' divides minima. "
        "Memory: "
        + (
            "peak torch.cuda.max_memory_allocated during one run above the memory "
            "allocated before it (forward graph included)."
            if device.type == "cuda"
            else "peak RSS of one run above the RSS before it, one subprocess per variant "
            "(forward graph included; the analytic K|theta| output is beside it)."
        ),
        "",
    )
    for model_name in args.models.split(","):
        with rep.guard(f"model {model_name}"):
            run_model(rep, args, model_name, device, batch, k, repeats)
    rep.write()


def argparse_hidden() -> str:
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
