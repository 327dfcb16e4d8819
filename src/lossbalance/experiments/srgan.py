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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lossbalance.experiments.data import ClassificationData, load_idx_dataset
from lossbalance.experiments.gan import GanConfig, gan_result, run_gan_experiment
from lossbalance.experiments.methods import ABLATIONS, resolve_methods
from lossbalance.experiments.mnist import expand_methods
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
DEFAULT_METHODS = ["balanced-adam", "sgd-m", "rmsprop", "adam", "mtadam"]
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
        for name in ("width", "blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")


def _bce(logits: Tensor, real: bool) -> Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


class SuperResolutionTask:
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
        device = torch.device(device)
        self.term_names = list(TERM_NAMES)
        self.weights = weights
        self.width = width
        self.blocks = blocks
        self.num_train = int(data.train_y.shape[0])
        self.classifier = classifier.to(device)
        self.train_hr = data.train_x.unsqueeze(1).to(device)
        test_hr = data.test_x.unsqueeze(1).to(device)
        self.test_lr = box_downsample(to_unit(test_hr), SCALE)
        self.evaluator = ImageEvaluator(test_hr.float().div(255.0), self.classifier)
        self.sample_index = pick_samples(data.test_y, samples).to(device)

    def to(self, device: torch.device) -> None:
        for name in ("train_hr", "test_lr", "sample_index"):
            setattr(self, name, getattr(self, name).to(device))
        self.evaluator.to(device)

    def build_generator(self) -> nn.Module:
        return SRGenerator(SCALE, width=self.width, blocks=self.blocks)

    def build_discriminator(self) -> nn.Module:
        return SRDiscriminator()

    def term_weights(self, balanced: bool) -> Tensor:
        return torch.tensor(self.weights[0] if balanced else self.weights[1])

    def train_batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        hr = to_unit(self.train_hr[index])
        return box_downsample(hr, SCALE), hr

    def generate(self, generator: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return generator(batch[0])

    def discriminator_loss(
        self, discriminator: nn.Module, batch: tuple[Tensor, Tensor], fake: Tensor
    ) -> Tensor:
        hr = batch[1]
        return 0.5 * (_bce(discriminator(hr), True) + _bce(discriminator(fake.detach()), False))

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
        return [F.mse_loss(fake, hr), _bce(discriminator(fake), True), perceptual]

    @torch.no_grad()
    def _outputs(self, generator: nn.Module, inputs: Tensor, batch_size: int) -> Tensor:
        was_training = generator.training
        generator.eval()
        out = torch.cat([generator(part) for part in inputs.split(batch_size)])
        generator.train(was_training)
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


def method_names(cfg: SrganConfig) -> list[str]:
    """The row names that ``cfg`` asks for (its methods, or the experiment's default rows)."""
    return expand_methods(cfg.methods, list(ABLATIONS) if cfg.ablation else DEFAULT_METHODS)


def run(
    cfg: SrganConfig,
    *,
    previous: Mapping[str, dict[str, Any]] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> ExperimentResult:
    """Run the SRGAN experiment; raises ``DatasetNotFoundError`` without the data."""
    cfg.validate()
    weights = cfg.weights(BALANCED_WEIGHTS, UNBALANCED_WEIGHTS)
    specs = resolve_methods(method_names(cfg), weighted=True)
    train_cfg = cfg.gan_train_config()
    full = load_idx_dataset(
        "fashion-mnist", Path(cfg.data_dir), download=cfg.download, verify=cfg.verify
    )
    classifier, classifier_info = cfg.feature_classifier(full, train_cfg.device)
    data = full.limit(cfg.train_limit, cfg.test_limit)
    task = SuperResolutionTask(
        data,
        classifier,
        weights,
        width=cfg.width,
        blocks=cfg.blocks,
        samples=cfg.samples,
        device=train_cfg.device,
    )
    baseline = task.bicubic_baseline()
    seeds = cfg.seed_list()
    runs = run_gan_experiment(
        task,
        specs,
        seeds,
        train_cfg,
        previous=previous,
        on_run=on_run,
        classifier=classifier_info["weights_sha256"],
    )
    config = {**asdict(cfg), "device": str(train_cfg.device), "methods": [s.name for s in specs]}
    config.update(
        train_size=task.num_train,
        test_size=int(data.test_y.shape[0]),
        weights={"balanced": list(weights[0]), "unbalanced": list(weights[1])},
        classifier=classifier_info,
    )
    notes = [
        f"Fashion-MNIST 4x super-resolution: 7x7 (4x4 block means) -> 28x28; "
        f"{task.num_train} training / {config['test_size']} test images.",
        f"Generator: SRResNet-style ({cfg.blocks} residual blocks, width {cfg.width}), trained "
        "from scratch (no MSE pre-training); discriminator: SRGAN-style, vanilla GAN loss, Adam "
        f"(lr {train_cfg.d_lr or cfg.lr:g}, betas ({cfg.beta1:g}, 0.999)). {cfg.epochs} "
        f"epoch(s), batch {cfg.batch_size}, generator lr {cfg.lr:g} for every row (Adam/MTAdam "
        f"beta1 {cfg.beta1:g}, SGD-M momentum 0.9, RMSProp torch defaults).",
        f"L = λ1·MSE + λ2·GAN + λ3·perceptual (MSE of the feature classifier's 64x7x7 conv "
        f"features); Balanced rows λ = {weights[0]}, Unbalanced rows λ = {weights[1]}. "
        "MTAdam's anchor is the MSE term.",
        "Test metrics with pixels in [0, 1], means over test images; FD-FMNIST: Fréchet "
        "distance between the classifier's 128-d features of the generated and the real test "
        "images (not FID). Feature classifier: "
        f"{classifier_info['train_size']} training images, {classifier_info['epochs']} "
        f"epoch(s), test accuracy {classifier_info['test_accuracy']:.2f}% (cache key "
        f"{classifier_info['key']}, weights {classifier_info['weights_sha256']}).",
        f"Reference, bicubic upsampling of the input: PSNR {baseline['psnr']:.2f} dB, SSIM "
        f"{baseline['ssim']:.4f}, FD-FMNIST {baseline['fd_fmnist']:.2f}, MSE {baseline['l2']:.5f}.",
    ]
    title = "SRGAN-style 4x super-resolution of Fashion-MNIST (MTAdam paper's SRGAN protocol)"
    if cfg.ablation:
        title = "SRGAN-style 4x super-resolution of Fashion-MNIST: MTAdam ablations"
    return gan_result(
        "srgan",
        title,
        config,
        specs,
        seeds,
        runs,
        metric="psnr",
        metric_label="test PSNR (dB)",
        columns=METRIC_COLUMNS,
        plot_keys=["psnr", "ssim", "fd_fmnist"],
        term_names=list(TERM_NAMES),
        notes=notes,
        sample_images=task.sample_references(),
        extra={"bicubic_baseline": baseline},
    )
