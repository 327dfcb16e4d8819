r"""Fused element-wise MTAdam update: one ``torch.compile`` region per (device, dtype) bucket.

:func:`lossbalance.functional.mtadam` computes the per-layer scalars of all tensors as one
``(P, I)`` table and then runs the element-wise update as ``torch._foreach_*`` ops. On CUDA
those ops launch one kernel each (or one per tensor where torch's foreach kernels fall back,
for lists that differ in shape), about a hundred launches per step for a small CNN: the
eager update is launch-bound. :func:`fused_update` runs the same element-wise math as one
``torch.compile(fullgraph=True)`` region, which inductor turns into a few Triton kernels
on CUDA (C++ on the CPU): per tensor the scaled per-term gradients, both moments, the max
over terms, the bias corrections and the parameter update in one pass over the stack.

The table is the one ``mtadam`` builds, cast to the bucket's device and dtype, ``(n, 2I + 6)``
for the bucket's ``n`` tensors, with the columns

``scale (I) | new magnitude (I) | sqrt(1 - beta2^t) | -lr / (1 - beta1^t) | shared (4)``

where the four shared columns (equal in every row) are the first-moment rate
``(1 - beta1) keep``, the second-moment decay ``beta2 keep + (1 - keep)``, the decoupled
decay factor ``1 - lr weight_decay keep`` and ``1 - keep`` (``keep`` is 1 on a finite step,
0 on a skipped one). Per tensor, with :math:`s` the scales, :math:`b_2` the second bias
correction's root and :math:`\alpha` the step size:

.. math::
    \tilde g_i &= s_i g_i \; (+\, \lambda \theta \text{ for } i = 0
        \text{ with coupled weight decay}) \\
    m &\leftarrow m + r_1 (\textstyle\sum_i \tilde g_i - m), \qquad
    v_i \leftarrow d_2 v_i + (1 - \beta_2) \tilde g_i^2 \\
    \theta &\leftarrow \theta + \alpha m / (\sqrt{\max_i v_i} / b_2 + \epsilon)

(``second_moment="own"``: one ``m_i`` per term and the sum of the per-term quotients;
``"mean"``: one ``v`` fed with the mean of the :math:`\tilde g_i^2`). It equals the
multi-tensor path up to float rounding (inductor may contract to FMAs and sums over terms in
another order); the tests compare both in float32 and float64.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lossbalance._validation import warn_once

__all__ = ["fused_available", "fused_update", "update_reference"]

# (device, dtypes, shapes, options) of a bucket -> its compiled update
_compiled: dict[Any, Any] = {}
# buckets whose compilation failed: they take the multi-tensor path from then on instead of
# paying a failing compile at every step
_failed: set[Any] = set()


def update_reference(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    magnitudes: Sequence[Tensor],
    steps: Sequence[Tensor],
    table: Tensor,
    finite: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    second_moment: str,
    masked: bool,
) -> None:
    """The element-wise MTAdam update of one (device, dtype) bucket, as plain torch ops.

    The function :func:`fused_update` compiles; run eagerly it is the reference. Writes
    ``params``, ``exp_avgs``, ``exp_avg_sqs``, ``magnitudes`` (from the table) and
    ``steps`` (``+ finite``) in place and leaves ``grads`` intact.

    Args:
        params: the bucket's ``n`` parameters (any floating dtype; the update is computed in
            the state dtype of ``grads`` and rounded into them).
        grads: per parameter the ``(I, *p.shape)`` unscaled per-term gradients.
        exp_avgs, exp_avg_sqs, magnitudes, steps: the state, as :func:`lossbalance.functional.mtadam`
            takes it.
        table: ``(n, 2I + 6)`` per-tensor scalars in the state dtype on the bucket's device
            (columns in the module docstring).
        finite: 0-dim bool on the bucket's device; with ``masked`` a false flag leaves
            everything but the table's magnitudes (then the old ones) bit-identical.
        beta1, beta2, eps, weight_decay, decoupled_weight_decay, second_moment: as in
            :class:`lossbalance.MTAdam`.
        masked: apply ``finite`` by masking (the sync-free path); ``False`` when the caller
            knows the step is finite.
    """
    num = grads[0].shape[0]
    rate1, decay2, shrink, skipped = table[0, 2 * num + 2 :].unbind(0)
    increment = finite.to(torch.float32)
    skip = ~finite
    for k, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        row = table[k]
        magnitudes[k].copy_(row[num : 2 * num])
        steps[k].add_(increment)
        master = p if p.dtype == g.dtype else p.to(g.dtype)
        g = g * row[:num].view(num, *[1] * (g.dim() - 1))
        if weight_decay != 0 and not decoupled_weight_decay:
            g[0].add_(master, alpha=weight_decay)
        if masked:
            # x * 0 stays NaN: a skipped step's gradients are zeroed, not scaled away
            g = g.masked_fill(skip, 0.0)
        first = g if second_moment == "own" else g.sum(0)
        m.lerp_(first, rate1 if masked else 1.0 - beta1)
        v.mul_(decay2)
        if second_moment == "mean":
            v.add_((g * g).mean(0), alpha=1.0 - beta2)
        else:
            v.addcmul_(g, g, value=1.0 - beta2)
        if weight_decay != 0 and decoupled_weight_decay:
            master.mul_(shrink)
        vmax = v.amax(0) if second_moment == "max" else v
        denom = vmax.sqrt().div_(row[2 * num]).add_(eps)
        if eps == 0 and masked:
            # 0/0 where a coordinate never had a gradient: a skipped step must stay a no-op
            denom = denom + skipped
        scaled = m * row[2 * num + 1]
        if second_moment == "own":
            master.add_((scaled / denom).sum(0))
        else:
            master.addcdiv_(scaled, denom)
        if master is not p:
            p.copy_(master)


def fused_available(device: torch.device) -> bool:
    """Whether :func:`fused_update` can compile for ``device`` (CUDA needs Triton).

    ``MTAdam(fused=None)`` uses the fused update where this holds on CUDA; on the CPU the
    multi-tensor path (which folds the scales into GEMVs) is the default.
    """
    if not torch._dynamo.is_dynamo_supported():
        return False
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return device.type == "cpu"


def _compiled_for(key: Any) -> Any:
    """The compiled update of one bucket signature, compiled at its first call."""
    fn = _compiled.get(key)
    if fn is None:
        # A fresh code object per bucket: dynamo keeps compiled variants per code object
        # and gives up beyond its recompile limit (8 by default), which a process that steps
        # several models (a test suite) reaches with one shared function.
        ref = update_reference
        copy = types.FunctionType(
            ref.__code__.replace(), ref.__globals__, ref.__name__, ref.__defaults__
        )
        copy.__kwdefaults__ = ref.__kwdefaults__
        # static shapes: a model's bucket keeps its shapes from step to step, and dynamic
        # shapes would trade every kernel's specialisation for recompilations that never come
        fn = torch.compile(copy, fullgraph=True, dynamic=False)
        _compiled[key] = fn
    return fn


def _compile_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo import exc

    errors: list[type[BaseException]] = [exc.TorchDynamoException]
    limit = getattr(exc, "FailOnRecompileLimitHit", None)
    if isinstance(limit, type) and issubclass(limit, BaseException):
        errors.append(limit)
    return tuple(errors)


def fused_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    magnitudes: Sequence[Tensor],
    steps: Sequence[Tensor],
    table: Tensor,
    finite: Tensor,
    **options: Any,
) -> bool:
    """Run :func:`update_reference` compiled (``torch.compile(fullgraph=True, dynamic=False)``).

    Arguments as :func:`update_reference` (``options`` are its keyword arguments). The first
    call for a bucket compiles it (seconds; do it before capturing a CUDA graph: MTAdam's
    first eager step does); later calls with the same shapes, dtypes and options reuse the
    kernels, and values that change from step to step (lr, bias corrections, scales) live
    in ``table``, so they do not recompile.

    Returns:
        ``True`` once the update ran. ``False`` if it could not be compiled here (no Triton,
        no C++ compiler, too many recompilations): nothing was written, a
        ``LossBalanceWarning`` says why (once), and the caller runs its own path; that bucket
        is not compiled again.
    """
    key = (
        table.device,
        tuple((p.dtype, g.dtype, tuple(g.shape)) for p, g in zip(params, grads)),
        tuple(sorted(options.items())),
    )
    if key in _failed:
        return False
    try:
        with torch.no_grad():
            _compiled_for(key)(
                list(params),
                list(grads),
                list(exp_avgs),
                list(exp_avg_sqs),
                list(magnitudes),
                list(steps),
                table,
                finite,
                **options,
            )
    except _compile_errors() as err:
        _failed.add(key)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        warn_once(
            "mtadam-fused",
            f"MTAdam's fused update could not be compiled on {table.device.type} "
            f"({type(err).__name__}: {first}); the multi-tensor update runs instead",
            stacklevel=3,
        )
        return False
    return True
