"""pix2pix-style edges -> image on Fashion-MNIST: the MTAdam paper's pix2pix experiment, small.

Malkiel & Wolf (2020, section 5, and the ablations of Table 5) train pix2pix (Isola et
al. 2017) with L = lambda_1 L1 + lambda_2 GAN, once with the prescribed weights (100, 1)
and Adam ("balanced") and once with equal weights (100, 100) and SGD-momentum, RMSProp,
Adam or MTAdam ("unbalanced"). Their data sets (facades, maps) cannot be downloaded here; this is
the same protocol on Fashion-MNIST:

- input: binary Sobel edges of the 28x28 image (gradient magnitude above
  ``edge_threshold`` times the image's largest), target: the image; both zero-padded to
  32x32 and scaled to [-1, 1];
- generator: a 5-level U-Net; discriminator: a conditional PatchGAN (6x6 patches of 22x22
  pixels) with the vanilla (binary cross-entropy) GAN loss, always trained with Adam;
- generator terms: term 0 ``l1`` (mean |G(x) - y| on the [-1, 1] scale, MTAdam's anchor)
  and term 1 ``gan`` (BCE of D(x, G(x)) against "real");
- test metrics on the central 28x28 crop, [0, 1] scale: L1 (the main metric), L2 (MSE),
  NMSE, PSNR, SSIM, and FD-FMNIST (the Fréchet distance between the classifier features of
  the generated and the real test images).

``ablation=True`` runs MTAdam and its five Table 5 variants on the unbalanced terms.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lossbalance.experiments.data import ClassificationData
from lossbalance.experiments.gan import (
    DEFAULT_METHODS,
    AdversarialTask,
    GanConfig,
    GanSetup,
    bce_gan_loss,
    evaluating,
    method_names,
)
from lossbalance.experiments.report import ExperimentResult, encode_images
from lossbalance.experiments.synthesis import (
    FashionClassifier,
    ImageEvaluator,
    PatchDiscriminator,
    UNetGenerator,
    pick_samples,
    sobel_edges,
    to_uint8,
    to_unit,
)

__all__ = [
    "BALANCED_WEIGHTS",
    "DEFAULT_METHODS",
    "METRIC_COLUMNS",
    "UNBALANCED_WEIGHTS",
    "EdgesToImageTask",
    "Pix2PixConfig",
    "method_names",
    "run",
]

#: (lambda_L1, lambda_GAN): pix2pix's prescribed weights, and the equal ones
BALANCED_WEIGHTS = (100.0, 1.0)
UNBALANCED_WEIGHTS = (100.0, 100.0)
TERM_NAMES = ["l1", "gan"]

#: (metric key, table header, decimals)
METRIC_COLUMNS = [
    ("l1", "L1 ↓", 4),
    ("l2", "L2 ↓", 4),
    ("nmse", "NMSE ↓", 4),
    ("psnr", "PSNR (dB) ↑", 2),
    ("ssim", "SSIM ↑", 4),
    ("fd_fmnist", "FD-FMNIST ↓", 2),
]


@dataclass
class Pix2PixConfig(GanConfig):
    """Settings of ``lossbalance pix2pix`` (defaults sized for a GPU: 3 epochs of 60k images,
    2814 steps per run).

    Attributes (besides :class:`~lossbalance.experiments.gan.GanConfig`):
        edge_threshold: relative Sobel threshold of the edge maps, in [0, 1).
        width: the U-Net's first-layer channels (the PatchGAN has 64).
    """

    num_terms: ClassVar[int] = 2

    seeds: int = 3
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    edge_threshold: float = 0.25
    width: int = 32

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.edge_threshold < 1:
            raise ValueError(
                f"Invalid edge_threshold: {self.edge_threshold} (expected 0 <= edge_threshold < 1)"
            )
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"Invalid width: {self.width!r} (expected an integer >= 1)")


def _pad32(images: Tensor) -> Tensor:
    return F.pad(images, (2, 2, 2, 2))


class EdgesToImageTask(AdversarialTask):
    """Fashion-MNIST edges -> image, for :func:`~lossbalance.experiments.gan.train_gan_run`.

    Args:
        data: the Fashion-MNIST images (uint8, 28x28) and labels.
        classifier: the frozen feature classifier (FD-FMNIST).
        weights: ``(balanced, unbalanced)`` term weights.
        edge_threshold: see :func:`~lossbalance.experiments.synthesis.sobel_edges`.
        width: the U-Net's width.
        samples: number of test images in the sample grid.
        device: where the data lives.
    """

    name = "pix2pix"
    metric = "l1"
    tensors = ("train_in", "train_out", "test_in", "sample_index")
    movable = ("evaluator",)

    def __init__(
        self,
        data: ClassificationData,
        classifier: FashionClassifier,
        weights: tuple[tuple[float, ...], tuple[float, ...]],
        *,
        edge_threshold: float = 0.25,
        width: int = 32,
        samples: int = 10,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(TERM_NAMES, weights, int(data.train_y.shape[0]))
        device = torch.device(device)
        self.width = width
        self.train_in = _pad32(sobel_edges(data.train_x, edge_threshold)).unsqueeze(1).to(device)
        self.train_out = _pad32(data.train_x).unsqueeze(1).to(device)
        self.test_in = _pad32(sobel_edges(data.test_x, edge_threshold)).unsqueeze(1).to(device)
        targets = data.test_x.unsqueeze(1).to(device).float().div(255.0)
        self.evaluator = ImageEvaluator(targets, classifier.to(device))
        self.sample_index = pick_samples(data.test_y, samples).to(device)

    def build_generator(self) -> nn.Module:
        return UNetGenerator(1, 1, width=self.width)

    def build_discriminator(self) -> nn.Module:
        return PatchDiscriminator(2)

    def train_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return to_unit(self.train_in[index]), to_unit(self.train_out[index])

    def generate(self, generator: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return generator(batch[0])

    def discriminator_loss(
        self, discriminator: nn.Module, batch: tuple[Tensor, Tensor], fake: Tensor
    ) -> Tensor:
        x, y = batch
        return 0.5 * (
            bce_gan_loss(discriminator(x, y), True)
            + bce_gan_loss(discriminator(x, fake.detach()), False)
        )

    def generator_terms(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        batch: tuple[Tensor, Tensor],
        fake: Tensor,
    ) -> list[Tensor]:
        x, y = batch
        return [F.l1_loss(fake, y), bce_gan_loss(discriminator(x, fake), True)]

    def _outputs(self, generator: nn.Module, inputs: Tensor, batch_size: int) -> Tensor:
        """The generator's test outputs, central 28x28 crop, on the [0, 1] scale."""
        with evaluating(generator):
            out = torch.cat([generator(to_unit(part)) for part in inputs.split(batch_size)])
        return out[..., 2:30, 2:30].add(1.0).div(2.0)

    def evaluate(self, generator: nn.Module, batch_size: int = 500) -> dict[str, float]:
        """L1, L2, NMSE, PSNR, SSIM and FD-FMNIST on the test set (NaN if diverged)."""
        return self.evaluator(self._outputs(generator, self.test_in, batch_size))

    def samples(self, generator: nn.Module) -> np.ndarray:
        out = self._outputs(generator, self.test_in[self.sample_index], 500)
        return to_uint8(out)

    def sample_references(self) -> list[tuple[str, dict[str, Any]]]:
        """The grid's first rows: the edge inputs and the real images."""
        edges = self.test_in[self.sample_index][:, 0, 2:30, 2:30]
        real = self.evaluator.targets[self.sample_index]
        return [
            ("input (edges)", encode_images(edges.cpu().numpy())),
            ("target", encode_images(to_uint8(real))),
        ]


def run(
    cfg: Pix2PixConfig,
    *,
    previous: Mapping[str, dict[str, Any]] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> ExperimentResult:
    """Run the pix2pix experiment; raises ``DatasetNotFoundError`` without the data."""
    setup = GanSetup.load(cfg, BALANCED_WEIGHTS, UNBALANCED_WEIGHTS)
    data = setup.data["fashion-mnist"]
    info = setup.classifier_info["fashion-mnist"]
    task = EdgesToImageTask(
        data,
        setup.classifiers["fashion-mnist"],
        setup.weights,
        edge_threshold=cfg.edge_threshold,
        width=cfg.width,
        samples=cfg.samples,
        device=setup.device,
    )
    runs = setup.train(task, previous=previous, on_run=on_run, classifier=info["weights_sha256"])
    test_size = int(data.test_y.shape[0])
    notes = [
        f"Fashion-MNIST, binary Sobel edges (threshold {cfg.edge_threshold:g} of the image's "
        f"largest gradient) -> image, padded to 32x32; {task.num_train} training / "
        f"{test_size} test images.",
        f"Generator: U-Net (width {cfg.width}); discriminator: conditional PatchGAN, vanilla "
        f"GAN loss, {cfg.optimizers_note()}",
        f"L = λ1·L1 + λ2·GAN; {setup.weights_note()}. MTAdam's anchor is the L1 term.",
        "Test metrics on the central 28x28 crop, pixels in [0, 1], means over test images; "
        "FD-FMNIST: Fréchet distance between the feature classifier's 128-d features of the "
        "generated and the real test images (not FID: not Inception features; it depends on "
        f"the number of test images). Feature classifier: {info['train_size']} "
        f"training images, {info['epochs']} epoch(s), test accuracy "
        f"{info['test_accuracy']:.2f}% (cache key {info['key']}, weights "
        f"{info['weights_sha256']}).",
    ]
    title = "pix2pix-style edges -> image on Fashion-MNIST (MTAdam paper's pix2pix protocol)"
    if cfg.ablation:
        title = "pix2pix-style edges -> image on Fashion-MNIST: MTAdam ablations (Table 5)"
    return setup.result(
        task,
        runs,
        title=title,
        metric_label="test L1 (pixels in [0, 1])",
        columns=METRIC_COLUMNS,
        plot_keys=["l1", "psnr", "ssim", "fd_fmnist"],
        notes=notes,
        test_size=test_size,
        classifier=info,
    )
