"""SRGAN-style 4x super-resolution of Fashion-MNIST: the MTAdam paper's SRGAN experiment, small.

Malkiel & Wolf (2020, section 5) train SRGAN (Ledig et al. 2017) with three terms, MSE +
adversarial + perceptual (VGG features), once with the prescribed weights
(1, 0.001, 0.006) and Adam ("balanced") and once with equal weights (1, 1, 1) and
SGD-momentum, RMSProp, Adam or MTAdam ("unbalanced"). Here, on Fashion-MNIST:

- input: the 28x28 image averaged over 4x4 blocks (7x7), target: the image, both in
  [-1, 1];
- generator: a small SRResNet (4 residual blocks, two sub-pixel x2 steps, tanh);
  discriminator: SRGAN's strided-conv design, small, vanilla GAN loss, always Adam;
- generator terms: term 0 ``mse`` (on the [-1, 1] scale, MTAdam's anchor), term 1
  ``gan`` (BCE of D(G(x)) against "real", SRGAN's -log D(G(x))), term 2 ``perceptual``
  (MSE between the feature classifier's 64x7x7 convolutional features of the output and of
  the target: the classifier stands in for VGG);
- test metrics, [0, 1] scale: PSNR (the main metric), SSIM, FD-FMNIST, and the MSE.

Differences from SRGAN: no MSE-only pre-training of the generator (every row trains from
scratch with its terms), box instead of bicubic downsampling, tiny networks.
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
    SRDiscriminator,
    SRGenerator,
    box_downsample,
    pick_samples,
    to_uint8,
    to_unit,
)

__all__ = [
    "BALANCED_WEIGHTS",
    "DEFAULT_METHODS",
    "METRIC_COLUMNS",
    "UNBALANCED_WEIGHTS",
    "SrganConfig",
    "SuperResolutionTask",
    "method_names",
    "run",
]

#: (lambda_MSE, lambda_GAN, lambda_perceptual): SRGAN's weights, and the equal ones
BALANCED_WEIGHTS = (1.0, 0.001, 0.006)
UNBALANCED_WEIGHTS = (1.0, 1.0, 1.0)
TERM_NAMES = ["mse", "gan", "perceptual"]
SCALE = 4

METRIC_COLUMNS = [
    ("psnr", "PSNR (dB) ↑", 2),
    ("ssim", "SSIM ↑", 4),
    ("fd_fmnist", "FD-FMNIST ↓", 2),
    ("l2", "MSE ↓", 5),
]


@dataclass
class SrganConfig(GanConfig):
    """Settings of ``lossbalance srgan`` (defaults sized for a GPU: 3 epochs of 60k images,
    2814 steps per run).

    Attributes (besides :class:`~lossbalance.experiments.gan.GanConfig`):
        width: the generator's feature channels.
        blocks: the generator's residual blocks.
    """

    num_terms: ClassVar[int] = 3

    seeds: int = 3
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-4
    beta1: float = 0.9
    width: int = 64
    blocks: int = 4

    def validate(self) -> None:
        super().validate()
        self.check_counts("width", "blocks")


class SuperResolutionTask(AdversarialTask):
    """Fashion-MNIST 7x7 -> 28x28, for :func:`~lossbalance.experiments.gan.train_gan_run`.

    Args:
        data: the Fashion-MNIST images (uint8, 28x28) and labels.
        classifier: the frozen feature classifier (perceptual loss and FD-FMNIST).
        weights: ``(balanced, unbalanced)`` term weights.
        width, blocks: the generator's size.
        samples: number of test images in the sample grid.
        device: where the data lives.
    """

    name = "srgan"
    metric = "psnr"
    tensors = ("train_hr", "test_lr", "sample_index")
    movable = ("evaluator",)

    def __init__(
        self,
        data: ClassificationData,
        classifier: FashionClassifier,
        weights: tuple[tuple[float, ...], tuple[float, ...]],
        *,
        width: int = 64,
        blocks: int = 4,
        samples: int = 10,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(TERM_NAMES, weights, int(data.train_y.shape[0]))
        device = torch.device(device)
        self.width = width
        self.blocks = blocks
        self.classifier = classifier.to(device)
        self.train_hr = data.train_x.unsqueeze(1).to(device)
        test_hr = data.test_x.unsqueeze(1).to(device)
        self.test_lr = box_downsample(to_unit(test_hr), SCALE)
        self.evaluator = ImageEvaluator(test_hr.float().div(255.0), self.classifier)
        self.sample_index = pick_samples(data.test_y, samples).to(device)

    def build_generator(self) -> nn.Module:
        return SRGenerator(SCALE, width=self.width, blocks=self.blocks)

    def build_discriminator(self) -> nn.Module:
        return SRDiscriminator()

    def train_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        hr = to_unit(self.train_hr[index])
        return box_downsample(hr, SCALE), hr

    def generate(self, generator: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return generator(batch[0])

    def discriminator_loss(
        self, discriminator: nn.Module, batch: tuple[Tensor, Tensor], fake: Tensor
    ) -> Tensor:
        hr = batch[1]
        return 0.5 * (
            bce_gan_loss(discriminator(hr), True)
            + bce_gan_loss(discriminator(fake.detach()), False)
        )

    def generator_terms(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        batch: tuple[Tensor, Tensor],
        fake: Tensor,
    ) -> list[Tensor]:
        hr = batch[1]
        maps = self.classifier.feature_maps
        perceptual = F.mse_loss(maps(fake.add(1).div(2)), maps(hr.add(1).div(2)))
        return [F.mse_loss(fake, hr), bce_gan_loss(discriminator(fake), True), perceptual]

    def _outputs(self, generator: nn.Module, inputs: Tensor, batch_size: int) -> Tensor:
        with evaluating(generator):
            out = torch.cat([generator(part) for part in inputs.split(batch_size)])
        return out.add(1.0).div(2.0)

    def evaluate(self, generator: nn.Module, batch_size: int = 500) -> dict[str, float]:
        """PSNR, SSIM, FD-FMNIST, L1, L2, NMSE on the test set (NaN if diverged)."""
        return self.evaluator(self._outputs(generator, self.test_lr, batch_size))

    @torch.no_grad()
    def bicubic_baseline(self) -> dict[str, float]:
        """The test metrics of bicubic upsampling of the input (a reference, no training)."""
        up = F.interpolate(self.test_lr, scale_factor=SCALE, mode="bicubic", align_corners=False)
        return self.evaluator(up.add(1.0).div(2.0).clamp(0, 1))

    def samples(self, generator: nn.Module) -> np.ndarray:
        return to_uint8(self._outputs(generator, self.test_lr[self.sample_index], 500))

    def sample_references(self) -> list[tuple[str, dict[str, Any]]]:
        """The grid's first rows: the 7x7 inputs, their bicubic upsampling, the targets."""
        lr = self.test_lr[self.sample_index]
        up = F.interpolate(lr, scale_factor=SCALE, mode="bicubic", align_corners=False)
        return [
            ("input (7x7)", encode_images(to_uint8(lr.add(1).div(2)))),
            ("bicubic", encode_images(to_uint8(up.add(1).div(2)))),
            ("target", encode_images(to_uint8(self.evaluator.targets[self.sample_index]))),
        ]


def run(
    cfg: SrganConfig,
    *,
    previous: Mapping[str, dict[str, Any]] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> ExperimentResult:
    """Run the SRGAN experiment; raises ``DatasetNotFoundError`` without the data."""
    setup = GanSetup.load(cfg, BALANCED_WEIGHTS, UNBALANCED_WEIGHTS)
    data = setup.data["fashion-mnist"]
    info = setup.classifier_info["fashion-mnist"]
    task = SuperResolutionTask(
        data,
        setup.classifiers["fashion-mnist"],
        setup.weights,
        width=cfg.width,
        blocks=cfg.blocks,
        samples=cfg.samples,
        device=setup.device,
    )
    baseline = task.bicubic_baseline()
    runs = setup.train(task, previous=previous, on_run=on_run, classifier=info["weights_sha256"])
    test_size = int(data.test_y.shape[0])
    notes = [
        f"Fashion-MNIST 4x super-resolution: 7x7 (4x4 block means) -> 28x28; "
        f"{task.num_train} training / {test_size} test images.",
        f"Generator: SRResNet-style ({cfg.blocks} residual blocks, width {cfg.width}), trained "
        "from scratch (no MSE pre-training); discriminator: SRGAN-style, vanilla GAN loss, "
        + cfg.optimizers_note(),
        f"L = λ1·MSE + λ2·GAN + λ3·perceptual (MSE of the feature classifier's 64x7x7 conv "
        f"features); {setup.weights_note()}. MTAdam's anchor is the MSE term.",
        "Test metrics with pixels in [0, 1], means over test images; FD-FMNIST: Fréchet "
        "distance between the classifier's 128-d features of the generated and the real test "
        "images (not FID). Feature classifier: "
        f"{info['train_size']} training images, {info['epochs']} "
        f"epoch(s), test accuracy {info['test_accuracy']:.2f}% (cache key "
        f"{info['key']}, weights {info['weights_sha256']}).",
        f"Reference, bicubic upsampling of the input: PSNR {baseline['psnr']:.2f} dB, SSIM "
        f"{baseline['ssim']:.4f}, FD-FMNIST {baseline['fd_fmnist']:.2f}, MSE {baseline['l2']:.5f}.",
    ]
    title = "SRGAN-style 4x super-resolution of Fashion-MNIST (MTAdam paper's SRGAN protocol)"
    if cfg.ablation:
        title = "SRGAN-style 4x super-resolution of Fashion-MNIST: MTAdam ablations"
    return setup.result(
        task,
        runs,
        title=title,
        metric_label="test PSNR (dB)",
        columns=METRIC_COLUMNS,
        plot_keys=["psnr", "ssim", "fd_fmnist"],
        notes=notes,
        test_size=test_size,
        classifier=info,
        extra={"bicubic_baseline": baseline},
        references={k: [(v, "bicubic upsampling")] for k, v in baseline.items()},
    )
