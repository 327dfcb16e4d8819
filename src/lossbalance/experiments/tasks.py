"""Tasks: what a model computes per batch (the K loss terms) and how it is evaluated.

A task holds its data (moved to the run's device once), builds a fresh model, draws the
term weights of a seed, turns a batch into K scalar loss terms and evaluates a model. The
harness (:mod:`lossbalance.experiments.harness`) owns the loop and knows nothing of the
terms' meaning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lossbalance.experiments.data import ClassificationData, MultiMnistData

__all__ = [
    "LOSS_FORMS",
    "WEIGHT_SCHEMES",
    "ClassTermsTask",
    "MultiMnistTask",
    "Task",
    "class_terms",
    "draw_term_weights",
]

LOSS_FORMS = ("paper", "authors")
WEIGHT_SCHEMES = ("paper", "authors")


class Task(Protocol):
    """What the harness needs of an experiment."""

    name: str
    term_names: list[str]
    metric: str
    num_train: int

    def to(self, device: torch.device) -> None: ...

    def build_model(self) -> nn.Module: ...

    def shared(self, model: nn.Module) -> nn.Module: ...

    def term_weights(self, seed: int, balanced: bool) -> Tensor: ...

    def train_batch(self, index: Tensor) -> tuple[Tensor, Tensor]: ...

    def terms(
        self, model: nn.Module, batch: tuple[Tensor, Tensor], weights: Tensor
    ) -> tuple[list[Tensor], Tensor | None]: ...

    def evaluate(self, model: nn.Module, batch_size: int = 1000) -> dict[str, float]: ...


def draw_term_weights(seed: int, num_terms: int, scheme: str) -> Tensor:
    """The random term weights of a seed, identical for every method of that seed.

    ``"paper"``: every w_i ~ U(1, 1000) (MTAdam paper, section 5.1). ``"authors"``:
    w_0 = 1 and w_1..w_{K-1} ~ U(0, 1000) (the authors' ``main.py``). The stream is
    seeded by ``seed`` alone, separately from model initialisation and data order.
    """
    rng = np.random.default_rng([seed, 0x7E12])
    if scheme == "paper":
        w = rng.uniform(1.0, 1000.0, num_terms)
    elif scheme == "authors":
        w = np.concatenate([[1.0], rng.uniform(0.0, 1000.0, num_terms - 1)])
    else:
        raise ValueError(f"Invalid weight scheme: {scheme!r} (expected one of {WEIGHT_SCHEMES})")
    return torch.tensor(w, dtype=torch.float32)


def class_terms(log_probs: Tensor, target: Tensor, weights: Tensor, form: str) -> list[Tensor]:
    """The K per-class loss terms of a batch.

    ``"paper"``: L_i = w_i * (sum of the NLL of the batch's class-i samples) / B with B
    the batch size; L_i = 0 (with a graph) when class i is absent, and sum_i L_i is the
    usual mean NLL when every w_i = 1.

    ``"authors"``: ``nll_loss(log_probs, target, weight=onehot_i * w_i)`` with mean
    reduction, as the MTAdam authors' ``main.py``. The mean divides by the summed weights
    of the targets, so w_i cancels out (every term is the mean NLL of class i) and the
    term is 0/0 = NaN whenever class i is absent from the batch. Offered only to show
    that.
    """
    k = log_probs.shape[1]
    if form == "paper":
        nll = F.nll_loss(log_probs, target, reduction="none")
        per_class = torch.zeros(k, dtype=nll.dtype, device=nll.device).index_add(0, target, nll)
        return list((per_class * weights.to(nll.dtype) / target.shape[0]).unbind(0))
    if form == "authors":
        eye = torch.eye(k, dtype=log_probs.dtype, device=log_probs.device)
        return [F.nll_loss(log_probs, target, weight=eye[i] * weights[i]) for i in range(k)]
    raise ValueError(f"Invalid loss form: {form!r} (expected one of {LOSS_FORMS})")


class ClassTermsTask:
    """Classification with one loss term per class, each with its own random weight.

    The MTAdam paper's MNIST experiment (section 5.1, Table 1) and the demo on the 8x8
    digits. The main metric is the test accuracy in percent.

    Args:
        name: e.g. ``"mnist"``.
        data: train/test tensors (uint8 images or float features).
        model_fn: builds a fresh model returning log-probabilities.
        input_shape: shape of one model input, e.g. ``(1, 28, 28)``.
        loss_form: ``"paper"`` or ``"authors"`` (see :func:`class_terms`).
        weight_scheme: ``"paper"`` or ``"authors"`` (see :func:`draw_term_weights`).
    """

    metric = "test_accuracy"

    def __init__(
        self,
        name: str,
        data: ClassificationData,
        model_fn: Callable[[], nn.Module],
        input_shape: tuple[int, ...],
        *,
        loss_form: str = "paper",
        weight_scheme: str = "paper",
    ) -> None:
        if loss_form not in LOSS_FORMS:
            raise ValueError(f"Invalid loss form: {loss_form!r} (expected one of {LOSS_FORMS})")
        if weight_scheme not in WEIGHT_SCHEMES:
            raise ValueError(
                f"Invalid weight scheme: {weight_scheme!r} (expected one of {WEIGHT_SCHEMES})"
            )
        self.name = name
        self.data = data
        self.model_fn = model_fn
        self.input_shape = input_shape
        self.loss_form = loss_form
        self.weight_scheme = weight_scheme
        self.num_classes = data.num_classes
        self.term_names = [f"class {i}" for i in range(self.num_classes)]
        self.num_train = int(data.train_y.shape[0])

    def to(self, device: torch.device) -> None:
        d = self.data
        self.data = ClassificationData(
            d.train_x.to(device),
            d.train_y.to(device),
            d.test_x.to(device),
            d.test_y.to(device),
            d.mean,
            d.std,
            d.scale,
            d.num_classes,
        )

    def _input(self, raw: Tensor) -> Tensor:
        d = self.data
        x = (raw.float() / d.scale - d.mean) / d.std
        return x.view(-1, *self.input_shape)

    def build_model(self) -> nn.Module:
        return self.model_fn()

    def shared(self, model: nn.Module) -> nn.Module:
        # every parameter serves every class term: there are no task-specific heads
        return model

    def term_weights(self, seed: int, balanced: bool) -> Tensor:
        if balanced:
            return torch.ones(self.num_classes)
        return draw_term_weights(seed, self.num_classes, self.weight_scheme)

    def train_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self._input(self.data.train_x[index]), self.data.train_y[index]

    def terms(
        self, model: nn.Module, batch: tuple[Tensor, Tensor], weights: Tensor
    ) -> tuple[list[Tensor], Tensor | None]:
        x, y = batch
        return class_terms(model(x), y, weights, self.loss_form), None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 1000) -> dict[str, float]:
        """Test accuracy (%) and mean NLL; both NaN if any output is not finite."""
        was_training = model.training
        model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.data.test_y.device)
        nll = torch.zeros((), dtype=torch.float64, device=self.data.test_y.device)
        finite = torch.ones((), dtype=torch.bool, device=self.data.test_y.device)
        n = int(self.data.test_y.shape[0])
        for start in range(0, n, batch_size):
            x = self._input(self.data.test_x[start : start + batch_size])
            y = self.data.test_y[start : start + batch_size]
            out = model(x)
            finite &= torch.isfinite(out).all()
            correct += (out.argmax(1) == y).sum()
            nll += F.nll_loss(out, y, reduction="sum").double()
        model.train(was_training)
        if not bool(finite):
            # A diverged model has no accuracy; argmax over NaN would report chance level.
            return {"test_accuracy": float("nan"), "test_loss": float("nan")}
        return {"test_accuracy": 100.0 * int(correct) / n, "test_loss": float(nll) / n}


class MultiMnistTask:
    """MultiMNIST with three tasks of different types and scales.

    Terms: cross-entropy of the upper-left digit, cross-entropy of the lower-right digit,
    and the L1 error of reconstructing the input image (pixels in [0, 1]), each multiplied
    by its scale (``scales``; one of them 10 in the second column group of the IMTL-style
    table). Metrics: the two accuracies (%), their mean (the main metric) and the test L1.

    Args:
        data: MultiMNIST tensors (:func:`lossbalance.experiments.data.make_multimnist`).
        scales: multiplier of each term, in the order of :attr:`term_names`.
        feature_dim: width of the shared feature.
    """

    metric = "mean_accuracy"

    def __init__(
        self,
        data: MultiMnistData,
        scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
        *,
        feature_dim: int = 64,
    ) -> None:
        if len(scales) != 3:
            raise ValueError(f"expected 3 task scales, got {len(scales)}")
        self.name = "multimnist"
        self.term_names = ["left", "right", "recon"]
        self.data = data
        self.scales = tuple(float(s) for s in scales)
        self.feature_dim = feature_dim
        self.num_train = int(data.train_y.shape[0])
        self.image_size = int(data.train_x.shape[-1])

    def to(self, device: torch.device) -> None:
        d = self.data
        self.data = MultiMnistData(
            d.train_x.to(device), d.train_y.to(device), d.test_x.to(device), d.test_y.to(device)
        )

    def build_model(self) -> nn.Module:
        from lossbalance.experiments.models import MultiMnistNet

        return MultiMnistNet(self.feature_dim, self.image_size)

    def shared(self, model: nn.Module) -> nn.Module:
        trunk = model.trunk
        assert isinstance(trunk, nn.Module)
        return trunk

    def term_weights(self, seed: int, balanced: bool) -> Tensor:
        return torch.tensor(self.scales, dtype=torch.float32)

    def _input(self, raw: Tensor) -> Tensor:
        return (raw.float() / 255.0).unsqueeze(1)

    def train_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self._input(self.data.train_x[index]), self.data.train_y[index]

    def terms(
        self, model: nn.Module, batch: tuple[Tensor, Tensor], weights: Tensor
    ) -> tuple[list[Tensor], Tensor | None]:
        x, y = batch
        z, out = model(x)
        losses = [
            F.cross_entropy(out["left"], y[:, 0]),
            F.cross_entropy(out["right"], y[:, 1]),
            F.l1_loss(out["recon"], x),
        ]
        return [w * loss for w, loss in zip(weights.unbind(0), losses, strict=True)], z

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 1000) -> dict[str, float]:
        """Accuracy of each digit (%), their mean, and the mean L1 reconstruction error."""
        was_training = model.training
        model.eval()
        dev = self.data.test_y.device
        correct = torch.zeros(2, dtype=torch.int64, device=dev)
        l1 = torch.zeros((), dtype=torch.float64, device=dev)
        finite = torch.ones((), dtype=torch.bool, device=dev)
        n = int(self.data.test_y.shape[0])
        for start in range(0, n, batch_size):
            x = self._input(self.data.test_x[start : start + batch_size])
            y = self.data.test_y[start : start + batch_size]
            _, out = model(x)
            finite &= torch.isfinite(out["left"]).all() & torch.isfinite(out["right"]).all()
            finite &= torch.isfinite(out["recon"]).all()
            correct[0] += (out["left"].argmax(1) == y[:, 0]).sum()
            correct[1] += (out["right"].argmax(1) == y[:, 1]).sum()
            l1 += (out["recon"] - x).abs().mean(dim=(1, 2, 3)).sum().double()
        model.train(was_training)
        if not bool(finite):
            nan = float("nan")
            return {
                "left_accuracy": nan,
                "right_accuracy": nan,
                "mean_accuracy": nan,
                "recon_l1": nan,
            }
        left, right = (100.0 * int(c) / n for c in correct.tolist())
        return {
            "left_accuracy": left,
            "right_accuracy": right,
            "mean_accuracy": (left + right) / 2,
            "recon_l1": float(l1) / n,
        }
