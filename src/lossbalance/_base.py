"""Base classes of the balancers: loss-level and gradient-level.

A balancer is a ``torch.nn.Module`` so that learnable weights (uncertainty, IMTL-L,
GradNorm) are ordinary parameters for the user's optimizer, running statistics are
buffers, and ``state_dict()`` / ``.to(device)`` work without extra code. The math lives in
pure functions (``lossbalance.functional``); these classes hold hyperparameters and state.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

# Distinguishes balancer instances in once-only warning keys (``id()`` is reused).
_instances = itertools.count()


class Balancer(nn.Module):
    """Common base of every balancing method.

    Attributes:
        num_terms: K, the number of loss terms (fixed at construction).
        last_weights: the weights applied at the last step, shape ``(K,)``, detached;
            ``None`` before the first step. For a loss-level method these are
            d(combined loss)/d(L_i); for a gradient-level method the coefficients alpha_i
            such that the shared gradient written is sum_i alpha_i g_i.
    """

    kind: ClassVar[Literal["loss", "gradient"]]
    last_weights: Tensor | None

    def __init__(self, num_terms: int) -> None:
        super().__init__()
        if isinstance(num_terms, bool) or not isinstance(num_terms, int) or num_terms < 1:
            raise ValueError(f"Invalid num_terms: {num_terms!r} (expected an integer >= 1)")
        self.num_terms = num_terms
        self.last_weights = None
        self._instance = next(_instances)

    def _warning_key(self, what: str) -> str:
        """The key of a once-only warning about this balancer's own inputs or state.

        A condition such as a negative loss belongs to one balancer: a second balancer in
        the same process that meets it warns again (``warn_once`` keys are process-wide).
        """
        return f"{what}#{type(self).__name__}{self._instance}"

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ):  # type: ignore[override]
        """``nn.Module.load_state_dict``, all or nothing: a refused load (a tensor of another
        size, a missing or unexpected key) raises and leaves this balancer as it was.

        ``nn.Module`` copies the tensors that fit before it raises about the others, so a
        checkpoint of a balancer built for another number of terms would leave some
        buffers loaded; the load is tried on a copy first."""
        trial = copy.deepcopy(self)
        nn.Module.load_state_dict(trial, state_dict, strict=strict, assign=assign)
        return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)

    def _check_terms(self, losses: Tensor) -> None:
        if losses.dim() != 1 or losses.shape[0] != self.num_terms:
            raise ValueError(
                f"{type(self).__name__} was built for {self.num_terms} loss terms, "
                f"got losses of shape {tuple(losses.shape)}"
            )

    def _record(self, weights: Tensor) -> Tensor:
        self.last_weights = weights.detach().clone()
        return weights


class Seeded:
    """A balancer that draws from its own CPU ``torch.Generator`` (PCGrad's order, RLW's
    weights, GradDrop's masks, GradVac's orders): the seed and the generator's state are
    the module's extra state, so ``state_dict()`` resumes the same draws and never
    touches the global RNG after construction."""

    seed: int
    generator: torch.Generator

    def _seed_generator(self, seed: int | None) -> None:
        """Validate ``seed`` (``None``: one drawn from the global RNG) and seed the
        generator with it."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Invalid seed: {seed!r} (expected None or an integer >= 0)")
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def get_extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "generator_state": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self.generator.set_state(state["generator_state"])


class LossBalancer(Balancer):
    """A method that needs only the loss values.

    ``forward(losses)`` takes the K losses stacked in a 1-D tensor (differentiable) and
    returns the combined scalar loss to call ``backward()`` on. It records
    ``last_weights`` = d(combined)/d(L_i) at the given losses.
    """

    kind = "loss"

    def forward(self, losses: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class GradientBalancer(Balancer):
    """A method that needs the per-term gradients of the shared parameters.

    Every gradient-level method here is a *weighting*: it maps the K x K Gramian
    ``G G^T`` of the per-term gradients (rows of G) to coefficients alpha, and the shared
    parameters receive ``sum_i alpha_i g_i``. The engine (``lossbalance.backward``) builds
    the Gramian in exact, feature or Gramian-only mode and writes ``.grad``.

    Subclasses implement ``weights(gramian, losses)``. ``transform(losses)`` maps the raw
    losses to the per-term losses whose gradients are balanced (identity by default;
    hybrid IMTL scales them by IMTL-L first); it must be a pure differentiable function
    of the losses (the engine evaluates its K x K Jacobian) and update no state.
    Task-specific parameters receive the gradient of ``transform(losses).sum()``, or of
    ``(alpha * transform(losses)).sum()`` when ``weights_heads`` is set.
    """

    kind = "gradient"
    #: Whether task-specific parameters get their term's gradient scaled by alpha (as in
    #: GradNorm, whose loss is sum_i w_i L_i) rather than unweighted (the other papers).
    weights_heads: ClassVar[bool] = False

    def transform(self, losses: Tensor) -> Tensor:
        return losses

    def weights(self, gramian: Tensor, losses: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, gramian: Tensor, losses: Tensor) -> Tensor:
        """Alias of :meth:`weights`, so a gradient balancer can be called like a module."""
        return self.weights(gramian, losses)


def gramian(matrix: Tensor) -> Tensor:
    """``G G^T`` of a K x P matrix, accumulated in float64 for accuracy on tiny K."""
    if matrix.dim() != 2:
        raise ValueError(f"expected a K x P gradient matrix, got shape {tuple(matrix.shape)}")
    gram = torch.zeros(matrix.shape[0], matrix.shape[0], dtype=torch.float64, device=matrix.device)
    add_gramian(gram, matrix)
    return gram


# columns per float64 chunk on the CPU: 2 MiB of float64 per chunk, at least 4096 columns
_CHUNK_BYTES = 1 << 21


def add_gramian(gram: Tensor, matrix: Tensor) -> None:
    """``gram += M M^T`` in float64 for a K x N ``matrix`` (on ``gram``'s device).

    On the CPU the columns go through in chunks of about 2 MiB of float64: the float64
    copy of a large matrix is a fresh block from the kernel each time (page faults), and
    a chunk stays in cache between its conversion and its product. Same float64
    accumulation, 1.8-2.5x faster for K = 40 x 131k or K = 10 x 788k columns. Elsewhere one
    conversion and one product (fewer kernel launches).
    """
    k, n = matrix.shape
    if matrix.device.type != "cpu" or n * k * 8 <= _CHUNK_BYTES:
        m = matrix.to(device=gram.device, dtype=torch.float64)
        gram.addmm_(m, m.T)
        return
    step = max(4096, _CHUNK_BYTES // (8 * k))
    for start in range(0, n, step):
        m = matrix[:, start : start + step].to(device=gram.device, dtype=torch.float64)
        gram.addmm_(m, m.T)
