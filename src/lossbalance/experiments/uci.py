"""Two-target regression on the UCI sets with an MLP, and two-task overlaid images.

Both are :class:`~lossbalance.experiments.tasks.Task` s for the harness (the benchmark
suite, :mod:`lossbalance.experiments.bench`, trains them):

- :class:`RegressionTask`: features standardised with the training set's statistics, each
  target divided by its training standard deviation (so that the losses start on one
  scale) and then multiplied by its ``scales`` entry (a scaled-target variant multiplies
  one target by 1000: its MSE grows by 10^6). Terms: the MSE of each standardised, scaled
  target. Metrics: the test MAE of each target in its original units (the scaling is
  undone, so the variants are comparable), lower is better.
- :class:`PairTask`: MultiMNIST-style images of two overlaid items (Multi-MNIST,
  Multi-Fashion, Multi-(Fashion+MNIST) of Lin et al. 2019), two cross-entropy terms (the
  upper-left and the lower-right item) on a shared LeNet trunk. Metrics: both test
  accuracies (%), higher is better.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lossbalance.experiments.data import MultiMnistData, RegressionData

__all__ = ["PairNet", "PairTask", "RegressionMLP", "RegressionTask"]


class RegressionMLP(nn.Module):
    """Shared trunk fc(D, h) - relu - fc(h, h) - relu, one linear head per target."""

    def __init__(self, in_features: int, num_targets: int, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_targets))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.trunk(x)
        return z, torch.cat([head(z) for head in self.heads], dim=1)


class RegressionTask:
    """Multi-target regression, one MSE term per target (see the module docstring).

    Args:
        name: e.g. ``"energy"``.
        data: the split (:func:`lossbalance.experiments.data.load_uci`).
        scales: multiplier of each standardised target (1 for all: the plain problem).
        hidden: MLP width.
    """

    def __init__(
        self, name: str, data: RegressionData, scales: Sequence[float], *, hidden: int = 64
    ) -> None:
        k = int(data.train_y.shape[1])
        if len(scales) != k:
            raise ValueError(f"expected {k} target scales, got {len(scales)}")
        self.name = name
        self.term_names = list(data.target_names)
        self.metric = f"{self.term_names[0]}_mae"
        self.num_train = int(data.train_y.shape[0])
        self.hidden = hidden
        self.scales = torch.tensor([float(s) for s in scales])
        self._mu = data.train_x.mean(0)
        self._sd = data.train_x.std(0).clamp_min(1e-8)
        self._ysd = data.train_y.std(0).clamp_min(1e-8)
        self._ymu = data.train_y.mean(0)
        self.data = data

    def to(self, device: torch.device) -> None:
        d = self.data
        self.data = RegressionData(
            d.train_x.to(device),
            d.train_y.to(device),
            d.test_x.to(device),
            d.test_y.to(device),
            d.feature_names,
            d.target_names,
        )
        for key in ("_mu", "_sd", "_ysd", "_ymu", "scales"):
            setattr(self, key, getattr(self, key).to(device))

    def build_model(self) -> nn.Module:
        return RegressionMLP(int(self.data.train_x.shape[1]), len(self.term_names), self.hidden)

    def shared(self, model: nn.Module) -> nn.Module:
        trunk = model.trunk
        assert isinstance(trunk, nn.Module)
        return trunk

    def term_weights(self, seed: int, balanced: bool) -> Tensor:
        return torch.ones(len(self.term_names))

    def _x(self, x: Tensor) -> Tensor:
        return (x - self._mu) / self._sd

    def _y(self, y: Tensor) -> Tensor:
        return (y - self._ymu) / self._ysd * self.scales

    def train_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self._x(self.data.train_x[index]), self._y(self.data.train_y[index])

    def terms(
        self, model: nn.Module, batch: tuple[Tensor, Tensor], weights: Tensor
    ) -> tuple[list[Tensor], Tensor | None]:
        x, y = batch
        z, out = model(x)
        mse = ((out - y) ** 2).mean(0)
        return [w * m for w, m in zip(weights.unbind(0), mse.unbind(0), strict=True)], z

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 1000) -> dict[str, float]:
        """Test MAE of each target in its original units (NaN if an output is not finite)."""
        was_training = model.training
        model.eval()
        _, out = model(self._x(self.data.test_x))
        model.train(was_training)
        pred = out / self.scales * self._ysd + self._ymu
        mae = (pred - self.data.test_y).abs().double().mean(0)
        finite = bool(torch.isfinite(pred).all())
        return {
            f"{n}_mae": float(v) if finite else float("nan")
            for n, v in zip(self.term_names, mae.tolist(), strict=True)
        }


class PairNet(nn.Module):
    """The MultiMNIST LeNet trunk (as :class:`~lossbalance.experiments.models.MultiMnistNet`)
    with two classification heads and no reconstruction."""

    def __init__(self, feature_dim: int = 64, image_size: int = 36) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 10, 5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(10, 20, 5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(20 * side * side, feature_dim),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(feature_dim, 50), nn.ReLU(), nn.Linear(50, 10))
            for _ in range(2)
        )

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


class PairTask:
    """Two overlaid items, two cross-entropy terms (see the module docstring)."""

    metric = "left_accuracy"

    def __init__(self, name: str, data: MultiMnistData, *, feature_dim: int = 64) -> None:
        self.name = name
        self.term_names = ["left", "right"]
        self.data = data
        self.feature_dim = feature_dim
        self.num_train = int(data.train_y.shape[0])
        self.image_size = int(data.train_x.shape[-1])

    def to(self, device: torch.device) -> None:
        d = self.data
        self.data = MultiMnistData(
            d.train_x.to(device), d.train_y.to(device), d.test_x.to(device), d.test_y.to(device)
        )

    def build_model(self) -> nn.Module:
        return PairNet(self.feature_dim, self.image_size)

    def shared(self, model: nn.Module) -> nn.Module:
        trunk = model.trunk
        assert isinstance(trunk, nn.Module)
        return trunk

    def term_weights(self, seed: int, balanced: bool) -> Tensor:
        return torch.ones(2)

    def _input(self, raw: Tensor) -> Tensor:
        return (raw.float() / 255.0).unsqueeze(1)

    def train_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self._input(self.data.train_x[index]), self.data.train_y[index]

    def terms(
        self, model: nn.Module, batch: tuple[Tensor, Tensor], weights: Tensor
    ) -> tuple[list[Tensor], Tensor | None]:
        x, y = batch
        z, out = model(x)
        return [w * F.cross_entropy(o, y[:, i]) for i, (w, o) in enumerate(zip(weights, out))], z

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 1000) -> dict[str, float]:
        """Accuracy (%) of each item (NaN if an output is not finite)."""
        was_training = model.training
        model.eval()
        correct = [0, 0]
        finite = True
        n = int(self.data.test_y.shape[0])
        for start in range(0, n, batch_size):
            x = self._input(self.data.test_x[start : start + batch_size])
            y = self.data.test_y[start : start + batch_size]
            _, out = model(x)
            for i in range(2):
                finite &= bool(torch.isfinite(out[i]).all())
                correct[i] += int((out[i].argmax(1) == y[:, i]).sum())
        model.train(was_training)
        nan = float("nan")
        return {
            f"{t}_accuracy": 100.0 * c / n if finite else nan
            for t, c in zip(self.term_names, correct, strict=True)
        }
