"""Random loss weighting (Lin et al., TMLR 2022): weights drawn afresh at every step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lossbalance._base import LossBalancer, Seeded
from lossbalance._registry import MethodInfo, register
from lossbalance._validation import check_choice, check_positive, warn_once

DISTRIBUTIONS = ("normal", "uniform", "dirichlet")


def rlw_weights(
    num_terms: int,
    generator: torch.Generator,
    distribution: str = "normal",
    *,
    std: float = 1.0,
    concentration: float = 1.0,
    num_draws: int | None = None,
) -> Tensor:
    """One draw of the K random loss weights, on the simplex, in float64 on the CPU.

    - ``"normal"``: ``softmax(x)``, ``x ~ N(0, std^2 I)`` (the paper's default);
    - ``"uniform"``: ``softmax(x)``, ``x ~ U(0, 1)^K``;
    - ``"dirichlet"``: ``w ~ Dirichlet(concentration 1)``, already on the simplex.

    Args:
        num_terms: K >= 1.
        generator: a CPU ``torch.Generator``; the only source of randomness.
        distribution: one of :data:`DISTRIBUTIONS`.
        std: the normal distribution's standard deviation, > 0.
        concentration: the Dirichlet's (symmetric) concentration, > 0.
        num_draws: ``None`` for one draw, or the number of independent draws to return
            at once (rows; they consume the generator in another order than repeated
            single draws).

    Returns:
        K weights, positive and summing to 1 (shape ``(num_draws, K)`` with
        ``num_draws``).
    """
    check_choice("distribution", distribution, DISTRIBUTIONS)
    shape = (num_terms,) if num_draws is None else (num_draws, num_terms)
    if distribution == "normal":
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * std
        return torch.softmax(x, dim=-1)
    if distribution == "uniform":
        x = torch.rand(shape, generator=generator, dtype=torch.float64)
        return torch.softmax(x, dim=-1)
    # Dirichlet(a) as normalised Gamma(a, 1) draws: torch.distributions.Dirichlet cannot
    # take a generator; torch._standard_gamma neither, so the gammas come from
    # torch.Tensor.exponential_ when a = 1 (Gamma(1, 1) is Exp(1)) and from the
    # Marsaglia-Tsang method otherwise.
    g = _standard_gamma(torch.full(shape, float(concentration), dtype=torch.float64), generator)
    return g / g.sum(dim=-1, keepdim=True)


def _standard_gamma(alpha: Tensor, generator: torch.Generator) -> Tensor:
    """Gamma(alpha, 1) draws from ``generator`` (Marsaglia & Tsang, 2000)."""
    if bool((alpha == 1.0).all()):
        return torch.empty_like(alpha).exponential_(1.0, generator=generator)
    # alpha < 1: draw Gamma(alpha + 1) and scale by U^(1/alpha)
    boost = alpha < 1.0
    a = torch.where(boost, alpha + 1.0, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(alpha)
    pending = torch.ones_like(alpha, dtype=torch.bool)
    while bool(pending.any()):
        x = torch.randn(alpha.shape, generator=generator, dtype=alpha.dtype)
        u = torch.rand(alpha.shape, generator=generator, dtype=alpha.dtype)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        take = pending & ok
        out = torch.where(take, d * v, out)
        pending = pending & ~ok
    if bool(boost.any()):
        u = torch.rand(alpha.shape, generator=generator, dtype=alpha.dtype)
        out = torch.where(boost, out * u ** (1.0 / alpha), out)
    return out


class RandomLossWeighting(Seeded, LossBalancer):
    """Random loss weighting (RLW): a fresh random point of the simplex at every step.

    Lin, Ye, Xu, Shi, Zhang & Kwok, "Reasonable Effectiveness of Random Weighting: A Litmus
    Test for Multi-Task Learning", TMLR 2022 (arXiv 2111.10603), Algorithm 2::

        lambda~(t) ~ p(lambda~),   w(t) = softmax(lambda~(t)),   L(t) = sum_i w_i(t) L_i(t)

    with p = N(0, I) by default (``distribution="normal"``, the paper's choice; ``std``
    scales it), or U(0, 1)^K (``"uniform"``, also softmax-normalised), or a Dirichlet
    (``"dirichlet"``, whose draws are on the simplex already). ``E[w] = 1/K`` for every
    distribution (they are exchangeable), so the combined loss is on the scale of the
    mean of the losses.

    The draws come from a CPU ``torch.Generator`` that the balancer owns, seeded with
    ``seed``; its state is in ``state_dict()`` (``get_extra_state``), so a resumed run
    draws the same weights as the uninterrupted one, and no other RNG is touched.

    Args:
        num_terms: K >= 1, the number of loss terms.
        distribution: ``"normal"`` (default), ``"uniform"`` or ``"dirichlet"``.
        std: standard deviation of the normal distribution, > 0 (default 1.0).
        concentration: the Dirichlet's concentration, > 0 (default 1.0: uniform on the
            simplex).
        seed: seed of the balancer's generator; ``None`` (default) takes one from
            torch's global generator once, at construction (so ``torch.manual_seed``
            makes the run reproducible).

    Example:
        >>> import torch
        >>> from lossbalance.methods._rlw import RandomLossWeighting
        >>> balancer = RandomLossWeighting(3, seed=0)
        >>> combined = balancer(torch.tensor([1.0, 2.0, 3.0], requires_grad=True))
        >>> w = balancer.last_weights
        >>> bool((w > 0).all()), round(float(w.sum()), 6)
        (True, 1.0)

    Differences from the paper / the authors' code:
        - LibMTL's ``RLW`` (the authors' library) draws from torch's global RNG, and also
          applies a softmax to its Dirichlet draws (which are on the simplex already);
          here the Dirichlet draws are used as they are, as in the paper.
        - The Bernoulli variants (weights in {0, 1}, not on the simplex) are left out.
    """

    def __init__(
        self,
        num_terms: int,
        distribution: str = "normal",
        *,
        std: float = 1.0,
        concentration: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(num_terms)
        check_choice("distribution", distribution, DISTRIBUTIONS)
        for name, value in (("std", std), ("concentration", concentration)):
            check_positive(name, value)
            if not math.isfinite(value):
                raise ValueError(f"Invalid {name}: {value} (expected 0 < {name} < inf)")
        self.distribution = distribution
        self.std = float(std)
        self.concentration = float(concentration)
        self._seed_generator(seed)
        if num_terms == 1:
            warn_once(
                "rlw-one-term", "RandomLossWeighting with num_terms=1 has nothing to balance: w = 1"
            )

    def forward(self, losses: Tensor) -> Tensor:
        self._check_terms(losses)
        weights = self.sample().to(losses)
        self._record(weights)
        return (weights * losses).sum()

    def sample(self) -> Tensor:
        """Draw the next weights (float64, CPU) and advance the generator."""
        return rlw_weights(
            self.num_terms,
            self.generator,
            self.distribution,
            std=self.std,
            concentration=self.concentration,
        )

    def extra_repr(self) -> str:
        return f"num_terms={self.num_terms}, distribution={self.distribution!r}, seed={self.seed}"


register(
    MethodInfo(
        name="rlw",
        factory=RandomLossWeighting,
        needs="losses",
        stateful=True,
        paper="Lin et al., TMLR 2022",
        summary="random loss weighting: softmax of normal draws at every step",
    )
)
