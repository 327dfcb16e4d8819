"""The two-objective toy problem of CAGrad (Liu et al., NeurIPS 2021), with its Pareto set.

Two objectives on x = (x1, x2) in R^2 (the CAGrad authors' ``toy.py``, used again by
Nash-MTL, FAMO and Aligned-MTL; written here from its formulas):

    c_+(x2) = max(tanh(x2 / 2), 0),   c_-(x2) = max(tanh(-x2 / 2), 0)
    l_1 = log max(|-(x1 + 7) / 2 + tanh(x2)|, 5e-6) + 6
    l_2 = log max(|(3 - x1) / 2 - tanh(x2) + 2|, 5e-6) + 6
    q_1 = ((x1 - 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20
    q_2 = ((x1 + 7)^2 + 0.1 (x2 + 8)^2) / 10 - 20
    f_i = c_+ l_i + c_- q_i,      and f_1 is multiplied by ``scale``

so that the two objectives have very different scales (``scale = 0.1`` by default; the
unscaled problem is ``scale = 1``). Scaling an objective leaves the Pareto set unchanged.

**Pareto set in closed form.** Below the x1 axis (x2 < 0, where the objectives reach about
-20; above it they are >= -6.2) f_i = c(x2) q_i with c = tanh(-x2 / 2). A convex
combination lambda g_1 + (1 - lambda) g_2 of the *unscaled* gradients vanishes iff

    x1 = 14 lambda - 7                                     (the x1 component)
    h(x2) = c'(x2) (19.6 lambda (1 - lambda) + 0.01 (x2 + 8)^2 - 20)
            + 0.02 c(x2) (x2 + 8) = 0                      (the x2 component)

with c' = -(1 - c^2) / 2: for each lambda in [0, 1] one root x2 in (-10, -8) (h < 0 at
-10, h > 0 at -8, and h increases through it: a minimum of the weighted sum), found by
bisection. The set runs from (-7, x2(0)) to (7, x2(1)) through (0, -8.3552...) (the point
the authors' plot marks as the minimum of the mean). With ``scale`` s the weight on the
scaled f_1 is mu = lambda / (lambda + s (1 - lambda)).

**Trajectories.** From each start, ``steps`` updates of x:

- a registry balancer: :func:`lossbalance.backward` writes d (its combination of the two
  gradients, or the gradient of its combined loss) into ``x.grad``, then
  x <- x - lr d (plain SGD; learnable balancer parameters get the same SGD step);
- ``sgd-m``, ``rmsprop``, ``adam``: that torch optimizer on f_1 + f_2;
- MTAdam (and its ablations): its own update from the two terms.

A run *reaches the Pareto set* when its final point lies within ``tolerance`` of the set
(distance to a dense polyline of it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import lossbalance
from lossbalance.experiments.methods import MethodSpec

__all__ = [
    "TOY_SCALE",
    "TOY_STARTS",
    "ToyConfig",
    "distance_to_pareto_set",
    "pareto_set",
    "plot_toy",
    "run_toy",
    "toy_gradients",
    "toy_objectives",
    "toy_trajectory",
]

#: the multiplier on f_1 (two objectives of very different scales)
TOY_SCALE = 0.1
#: starting points (the CAGrad and Nash-MTL figures start from points like these)
TOY_STARTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (-8.5, 5.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)
_LOWER = 5e-6


def toy_objectives(x: Tensor, scale: float = TOY_SCALE) -> Tensor:
    """``(..., 2)`` points -> ``(..., 2)`` objective values (scale * f_1, f_2)."""
    x1, x2 = x[..., 0], x[..., 1]
    l1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), _LOWER).log() + 6
    l2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), _LOWER).log() + 6
    q1 = ((x1 - 7).pow(2) + 0.1 * (x2 + 8).pow(2)) / 10 - 20
    q2 = ((x1 + 7).pow(2) + 0.1 * (x2 + 8).pow(2)) / 10 - 20
    up = torch.clamp(torch.tanh(x2 * 0.5), 0)
    down = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    return torch.stack([scale * (l1 * up + q1 * down), l2 * up + q2 * down], dim=-1)


def toy_gradients(x: Sequence[float], scale: float = TOY_SCALE) -> np.ndarray:
    """The closed-form gradients (rows g_1 of scale * f_1, g_2 of f_2) at x with x2 < 0."""
    x1, x2 = float(x[0]), float(x[1])
    if not x2 < 0:
        raise ValueError(f"Invalid x2: {x2} (the closed form holds for x2 < 0)")
    c = math.tanh(-x2 / 2)
    dc = -0.5 * (1 - c * c)
    rows = []
    for a, s in ((7.0, scale), (-7.0, 1.0)):
        q = ((x1 - a) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
        rows.append([s * c * (x1 - a) / 5, s * (dc * q + c * 0.02 * (x2 + 8))])
    return np.asarray(rows)


def _pareto_x2(lam: float) -> float:
    def h(x2: float) -> float:
        c = math.tanh(-x2 / 2)
        return -0.5 * (1 - c * c) * (
            19.6 * lam * (1 - lam) + 0.01 * (x2 + 8) ** 2 - 20
        ) + 0.02 * c * (x2 + 8)

    lo, hi = -10.0, -8.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if h(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def pareto_set(num: int = 401, scale: float = TOY_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """``num`` points of the Pareto set and the weight mu on scale * f_1 at each.

    Returns ``(points, mu)``: ``(num, 2)`` points for lambda = 0 .. 1 evenly (see the
    module docstring) and ``(num,)`` weights such that mu g_1 + (1 - mu) g_2 = 0 there.
    """
    lam = np.linspace(0.0, 1.0, num)
    points = np.stack([14 * lam - 7, np.array([_pareto_x2(float(v)) for v in lam])], axis=1)
    mu = lam / (lam + scale * (1 - lam))
    return points, mu


def distance_to_pareto_set(points: np.ndarray, scale: float = TOY_SCALE) -> np.ndarray:
    """Euclidean distance of each ``(..., 2)`` point to the Pareto set (dense polyline)."""
    curve, _ = pareto_set(2001, scale)
    a, b = curve[:-1], curve[1:]
    p = np.asarray(points, dtype=np.float64)[..., None, :]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / (ab * ab).sum(-1), 0.0, 1.0)
    nearest = a + t[..., None] * ab
    return np.sqrt(((p - nearest) ** 2).sum(-1)).min(-1)


@dataclass
class ToyConfig:
    """Settings of the toy trajectories.

    Attributes:
        steps: updates per start.
        lr: step size of every method.
        scale: multiplier on f_1.
        tolerance: distance to the Pareto set that counts as reaching it.
        starts: starting points.
    """

    steps: int = 1500
    lr: float = 0.02
    scale: float = TOY_SCALE
    tolerance: float = 0.25
    starts: tuple[tuple[float, float], ...] = TOY_STARTS


class _Point(nn.Module):
    def __init__(self, start: Sequence[float]) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(list(start), dtype=torch.float64))


def toy_trajectory(spec: MethodSpec, start: Sequence[float], cfg: ToyConfig) -> np.ndarray:
    """The ``(steps + 1, 2)`` trajectory of one method from ``start`` (NaN after a
    non-finite point: the run stops there)."""
    point = _Point(start)
    params = [point.x]
    balancer = None
    opt: Any
    if spec.kind == "optimizer":
        opt = {
            "sgd-m": lambda: torch.optim.SGD(params, lr=cfg.lr, momentum=0.9),
            "rmsprop": lambda: torch.optim.RMSprop(params, lr=cfg.lr),
            "adam": lambda: torch.optim.Adam(params, lr=cfg.lr),
        }[spec.base]()
    elif spec.kind == "mtadam":
        opt = lossbalance.MTAdam(params, lr=cfg.lr, **spec.options)
    elif spec.kind == "registry-optimizer":
        opt = lossbalance.get_method(spec.base).factory(2, **spec.options)(params, lr=cfg.lr)
    else:
        balancer = lossbalance.create(spec.base, 2, **spec.options).double()
        opt = torch.optim.SGD([*params, *balancer.parameters()], lr=cfg.lr)
    traj = np.full((cfg.steps + 1, 2), np.nan)
    traj[0] = start
    for i in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        terms = list(toy_objectives(point.x, cfg.scale).unbind(0))
        if balancer is not None:
            lossbalance.backward(terms, balancer, shared=point)
            if point.x.grad is None or not torch.isfinite(point.x.grad).all():
                break
            opt.step()
        elif spec.kind == "optimizer":
            torch.stack(terms).sum().backward()
            opt.step()
        else:
            opt.step(terms)
        x = point.x.detach().numpy()
        if not np.isfinite(x).all():
            break
        traj[i + 1] = x
    return traj


def run_toy(specs: Sequence[MethodSpec], cfg: ToyConfig) -> dict[str, Any]:
    """Every method's trajectories from every start, and whether each reaches the set.

    Returns ``{label: {"method", "trajectories" (starts x (steps + 1) x 2 lists, NaN as
    None), "final_distance", "reached", "error"}}``; a method that raises on this problem
    records the error instead of trajectories.
    """
    out: dict[str, Any] = {}
    for spec in specs:
        entry: dict[str, Any] = {"method": spec.name, "error": None}
        try:
            with warnings.catch_warnings():
                # warned-once degeneracies (zero gradients at a stationary point) are
                # expected on a 2-D problem; what matters is where the points go
                warnings.simplefilter("ignore")
                trajs = [toy_trajectory(spec, s, cfg) for s in cfg.starts]
        except Exception as exc:
            entry.update(
                trajectories=[], final_distance=[], reached=[], error=f"{type(exc).__name__}: {exc}"
            )
            out[spec.label] = entry
            continue
        finals = []
        for t in trajs:
            finite = t[np.isfinite(t).all(1)]
            finals.append(finite[-1] if len(t) and np.isfinite(t[-1]).all() else None)
        dist = [None if f is None else float(distance_to_pareto_set(f, cfg.scale)) for f in finals]
        entry.update(
            trajectories=[t[:: max(1, cfg.steps // 300)].tolist() for t in trajs],
            final=[None if f is None else [float(v) for v in f] for f in finals],
            final_distance=dist,
            reached=[d is not None and d <= cfg.tolerance for d in dist],
        )
        out[spec.label] = entry
    return out


def _contour(ax: Any, scale: float) -> None:
    grid = np.linspace(-10.5, 10.5, 211)
    xx, yy = np.meshgrid(grid, grid)
    pts = torch.tensor(np.stack([xx, yy], -1), dtype=torch.float64)
    z = toy_objectives(pts, scale).sum(-1).numpy()
    ax.contour(xx, yy, z, levels=20, cmap="viridis", linewidths=0.7)
    curve, _ = pareto_set(201, scale)
    ax.plot(curve[:, 0], curve[:, 1], color="k", linewidth=2.2, label="Pareto set")
    ax.set_xlim(-10.5, 10.5)
    ax.set_ylim(-10.5, 10.5)
    ax.set_aspect("equal")


def _draw(ax: Any, label: str, entry: dict[str, Any], cfg: ToyConfig) -> None:
    _contour(ax, cfg.scale)
    if entry["error"]:
        ax.text(0, 0, "cannot run:\n" + entry["error"][:60], ha="center", fontsize=6, color="r")
    for t, ok in zip(entry["trajectories"], entry["reached"], strict=True):
        arr = np.array([[np.nan, np.nan] if p is None else p for p in t], dtype=np.float64)
        color = "tab:green" if ok else "tab:red"
        ax.plot(arr[:, 0], arr[:, 1], color=color, linewidth=1.2)
        ax.plot(arr[0, 0], arr[0, 1], "o", color="k", markersize=3)
        finite = arr[np.isfinite(arr).all(1)]
        if len(finite):
            ax.plot(finite[-1, 0], finite[-1, 1], "x", color=color, markersize=5)
    n = sum(entry["reached"])
    ax.set_title(f"{label}: {n}/{len(cfg.starts)} reach", fontsize=8)
    ax.tick_params(labelsize=6)


def plot_toy(results: dict[str, Any], cfg: ToyConfig, out_dir: Any) -> list[Any]:
    """One PNG per method (``toy/<label>.png``) and the overview grid (``toy.png``)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    (out / "toy").mkdir(parents=True, exist_ok=True)
    written = []
    for label, entry in results.items():
        fig, ax = plt.subplots(figsize=(4.2, 4.2))
        _draw(ax, label, entry, cfg)
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
        path = out / "toy" / f"{safe}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    cols = 6
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(results) :]:
        ax.axis("off")
    for ax, (label, entry) in zip(axes.flat, results.items(), strict=False):
        _draw(ax, label, entry, cfg)
    fig.suptitle(
        f"Toy problem (f1 x {cfg.scale:g}): trajectories from {len(cfg.starts)} starts, "
        f"{cfg.steps} steps of lr {cfg.lr:g}; green: ends within {cfg.tolerance:g} of the "
        "Pareto set (black)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = out / "toy.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
    return written
