"""Models of the experiments: the PyTorch MNIST-example CNN, a digits MLP, a MultiMNIST net."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DigitsMLP", "MnistCNN", "MultiMnistNet"]


class MnistCNN(nn.Module):
    """The CNN of the PyTorch MNIST example (``pytorch/examples/mnist/main.py``).

    conv(1, 32, 3) - relu - conv(32, 64, 3) - relu - maxpool 2 - dropout 0.25 - flatten -
    fc(9216, 128) - relu - dropout 0.5 - fc(128, 10) - log_softmax. The MTAdam paper's
    MNIST experiment (Table 1) trains this network. Input ``(N, 1, 28, 28)``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


class DigitsMLP(nn.Module):
    """A small MLP for the 8x8 digits: fc(64, hidden) - relu - fc(hidden, 10).

    Returns log-probabilities. Input ``(N, 64)``.
    """

    def __init__(self, in_features: int = 64, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=1)


class MultiMnistNet(nn.Module):
    """Hard parameter sharing for MultiMNIST: a LeNet-style trunk and one head per task.

    Trunk: conv(1, 10, 5) - maxpool 2 - relu - conv(10, 20, 5) - maxpool 2 - relu -
    flatten - fc(720, ``feature_dim``) - relu (the MultiMNIST network of Sener & Koltun
    2018, adapted to 36x36 inputs). Heads: ``left`` and ``right`` are fc - relu - fc(10)
    classifiers returning logits; ``recon`` is fc(``feature_dim``, 36*36) - sigmoid, a
    reconstruction of the input in [0, 1].

    ``forward`` returns ``(z, outputs)``: the shared feature ``z`` (what feature-level
    balancers differentiate with respect to) and a dict of head outputs.
    """

    def __init__(self, feature_dim: int = 64, image_size: int = 36) -> None:
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2
        self.image_size = image_size
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
        self.heads = nn.ModuleDict(
            {
                "left": nn.Sequential(nn.Linear(feature_dim, 50), nn.ReLU(), nn.Linear(50, 10)),
                "right": nn.Sequential(nn.Linear(feature_dim, 50), nn.ReLU(), nn.Linear(50, 10)),
                "recon": nn.Sequential(
                    nn.Linear(feature_dim, image_size * image_size), nn.Sigmoid()
                ),
            }
        )

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.trunk(x)
        out = {name: head(z) for name, head in self.heads.items()}
        out["recon"] = out["recon"].view(-1, 1, self.image_size, self.image_size)
        return z, out
