"""A naive MTAdam written from Algorithm 1 the way the authors' code is written.

The baseline of ``bench_mtadam_step.py``: per-term ``loss.backward(retain_graph=True)``
with a copy of every ``.grad``, per-parameter and per-term Python loops, Python-side
branching on magnitudes (a host synchronisation per parameter and term on CUDA), and two
state buffers per term and parameter (2I|theta| elements). Unlike the authors' code it
runs on the CPU, updates every parameter (theirs stops at the first parameter without a
gradient), applies weight decay once per step and keeps the magnitudes in ``self.state``,
so that its result equals :class:`lossbalance.MTAdam` (the benchmark checks that).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer


class NaiveMTAdam(Optimizer):
    """Algorithm 1 of Malkiel & Wolf 2020 with per-parameter loops (benchmark baseline).

    Args:
        params: parameters.
        lr, betas, eps, weight_decay: as in :class:`lossbalance.MTAdam` (``betas`` has
            three entries, the third the magnitude EMA's decay).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.threshold = 1e-10

    def step(self, losses: Sequence[Tensor]) -> None:  # type: ignore[override]
        k = len(losses)
        params = [p for g in self.param_groups for p in g["params"]]
        term_grads: dict[Tensor, list[Tensor | None]] = {p: [None] * k for p in params}
        for i, loss in enumerate(losses):
            for p in params:
                p.grad = None
            loss.backward(retain_graph=True)
            for p in params:
                if p.grad is not None:
                    term_grads[p][i] = p.grad.clone()
        for p in params:
            p.grad = None
        with torch.no_grad():
            for group in self.param_groups:
                beta1, beta2, beta3 = group["betas"]
                for p in group["params"]:
                    grads = term_grads[p]
                    if all(g is None for g in grads):
                        continue
                    grads = [torch.zeros_like(p) if g is None else g for g in grads]
                    state = self.state[p]
                    if len(state) == 0:
                        state["step"] = 0
                        state["norms"] = [None] * k
                        for i in range(k):
                            state[f"exp_avg{i}"] = torch.zeros_like(p)
                            state[f"exp_avg_sq{i}"] = torch.zeros_like(p)
                    state["step"] += 1
                    norms = state["norms"]
                    for i in range(k):
                        n = torch.norm(grads[i])
                        norms[i] = n if norms[i] is None else beta3 * norms[i] + (1 - beta3) * n
                    anchor = None
                    for i in range(k):
                        if norms[i] > self.threshold:  # a host sync, as in their code
                            anchor = i
                            break
                    m_sum = torch.zeros_like(p)
                    v_max = None
                    for i in range(k):
                        g = grads[i]
                        if anchor is not None and norms[i] > self.threshold:
                            g = g * (norms[anchor] / norms[i])
                        if i == 0 and group["weight_decay"] != 0:
                            g = g.add(p, alpha=group["weight_decay"])
                        exp_avg, exp_avg_sq = state[f"exp_avg{i}"], state[f"exp_avg_sq{i}"]
                        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
                        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                        m_sum.add_(exp_avg)
                        v_max = (
                            exp_avg_sq.clone() if v_max is None else torch.max(v_max, exp_avg_sq)
                        )
                    assert v_max is not None
                    bc1 = 1 - beta1 ** state["step"]
                    bc2 = 1 - beta2 ** state["step"]
                    denom = (v_max.sqrt() / math.sqrt(bc2)).add_(group["eps"])
                    p.addcdiv_(m_sum, denom, value=-group["lr"] / bc1)

    def state_elements(self) -> int:
        """Elements held in tensors of the state (moments and magnitudes)."""
        total = 0
        for s in self.state.values():
            for v in s.values():
                if isinstance(v, Tensor):
                    total += v.numel()
                elif isinstance(v, list):
                    total += sum(t.numel() for t in v if isinstance(t, Tensor))
        return total
