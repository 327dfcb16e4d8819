"""CycleGAN-style unpaired MNIST <-> Fashion-MNIST: the MTAdam paper's CycleGAN experiment,
small.

Malkiel & Wolf (2020, section 5) train CycleGAN (Zhu et al. 2017) with its six generator
terms, once with the prescribed weights and Adam ("balanced") and once with all weights 1
and SGD-momentum, RMSProp, Adam or MTAdam ("unbalanced"). Their data sets (horse2zebra)
cannot be downloaded here; the two domains are MNIST (A) and Fashion-MNIST (B), 28x28,
scaled to [-1, 1], drawn independently (unpaired):

- generators G_AB, G_BA: small CycleGAN ResNet generators; discriminators D_A, D_B:
  unconditional PatchGANs with the least-squares GAN loss (CycleGAN's), always Adam, no
  image pool;
- generator terms, in this order (term 0 is MTAdam's anchor): ``gan_ab`` (D_B(G_AB(a))
  against 1), ``gan_ba``, ``cycle_a`` (|G_BA(G_AB(a)) - a|), ``cycle_b``, ``idt_ab``
  (|G_AB(b) - b|), ``idt_ba``; balanced weights (1, 1, 10, 10, 5, 5) as CycleGAN's
  lambda_A = lambda_B = 10 and lambda_identity = 0.5, unbalanced all 1;
- test metrics: FD-FMNIST of G_AB(MNIST test) against the real Fashion-MNIST test images
  (the main metric), FD-MNIST of G_BA(Fashion test) against the real MNIST test images
  (the same classifier architecture trained on MNIST), and the cycle-consistency L1 of each
  direction on the [0, 1] scale.
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
    evaluating,
    method_names,
)
from lossbalance.experiments.report import ExperimentResult, encode_images
from lossbalance.experiments.synthesis import (
    FashionClassifier,
    FrechetScorer,
    PatchDiscriminator,
    ResnetGenerator,
    pick_samples,
    to_uint8,
    to_unit,
)

__all__ = [
    "BALANCED_WEIGHTS",
    "DEFAULT_METHODS",
    "METRIC_COLUMNS",
    "UNBALANCED_WEIGHTS",
    "CycleGanConfig",
    "UnpairedTranslationTask",
    "method_names",
    "run",
]

BALANCED_WEIGHTS = (1.0, 1.0, 10.0, 10.0, 5.0, 5.0)
UNBALANCED_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
TERM_NAMES = ["gan_ab", "gan_ba", "cycle_a", "cycle_b", "idt_ab", "idt_ba"]

METRIC_COLUMNS = [
    ("fd_fmnist", "FD-FMNIST A→B ↓", 2),
    ("fd_mnist", "FD-MNIST B→A ↓", 2),
    ("cycle_l1_a", "cycle L1 A ↓", 4),
    ("cycle_l1_b", "cycle L1 B ↓", 4),
]


@dataclass
class CycleGanConfig(GanConfig):
    """Settings of ``lossbalance cyclegan`` (defaults sized for a GPU: 2 epochs of 60k image
    pairs, 1876 steps per run).

    Attributes (besides :class:`~lossbalance.experiments.gan.GanConfig`):
        width: the generators' first-layer channels.
        blocks: the generators' residual blocks.
    """

    num_terms: ClassVar[int] = 6
    classifier_datasets: ClassVar[tuple[str, ...]] = ("mnist", "fashion-mnist")

    seeds: int = 3
    epochs: int = 2
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.5
    width: int = 32
    blocks: int = 3
    samples: int = 8

    def validate(self) -> None:
        super().validate()
        self.check_counts("width", "blocks")


def _lsgan(prediction: Tensor, real: bool) -> Tensor:
    target = torch.ones_like(prediction) if real else torch.zeros_like(prediction)
    return F.mse_loss(prediction, target)


def _pair(module: nn.Module, first: str, second: str) -> tuple[nn.Module, nn.Module]:
    if not isinstance(module, nn.ModuleDict):
        raise TypeError(f"expected an nn.ModuleDict of two networks, got {type(module).__name__}")
    return module[first], module[second]


Batch = tuple[Tensor, Tensor]
Fake = tuple[Tensor, Tensor]


class UnpairedTranslationTask(AdversarialTask):
    """MNIST (A) <-> Fashion-MNIST (B), for
    :func:`~lossbalance.experiments.gan.train_gan_run`.

    A batch takes the A images of the loop's indices and as many B images drawn uniformly
    with torch's global generator (seeded per run), so that the domains stay unpaired.

    Args:
        domain_a, domain_b: MNIST and Fashion-MNIST (uint8 28x28 images, labels).
        classifier_a, classifier_b: frozen feature classifiers trained on A and on B.
        weights: ``(balanced, unbalanced)`` term weights.
        width, blocks: the generators' size.
        samples: test images per direction in the sample grid.
        device: where the data lives.
    """

    name = "cyclegan"
    metric = "fd_fmnist"
    tensors = ("train_a", "train_b", "test_a", "test_b", "sample_a", "sample_b")
    movable = ("fd_a", "fd_b")

    def __init__(
        self,
        domain_a: ClassificationData,
        domain_b: ClassificationData,
        classifier_a: FashionClassifier,
        classifier_b: FashionClassifier,
        weights: tuple[tuple[float, ...], tuple[float, ...]],
        *,
        width: int = 32,
        blocks: int = 3,
        samples: int = 8,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(TERM_NAMES, weights, int(domain_a.train_y.shape[0]))
        device = torch.device(device)
        self.width = width
        self.blocks = blocks
        self.train_a = domain_a.train_x.unsqueeze(1).to(device)
        self.train_b = domain_b.train_x.unsqueeze(1).to(device)
        self.test_a = domain_a.test_x.unsqueeze(1).to(device)
        self.test_b = domain_b.test_x.unsqueeze(1).to(device)
        # FD of translated images to the real test images of the target domain
        self.fd_b = FrechetScorer(self.test_b.float().div(255.0), classifier_b.to(device))
        self.fd_a = FrechetScorer(self.test_a.float().div(255.0), classifier_a.to(device))
        self.sample_a = pick_samples(domain_a.test_y, samples).to(device)
        self.sample_b = pick_samples(domain_b.test_y, samples).to(device)

    def build_generator(self) -> nn.Module:
        return nn.ModuleDict(
            {
                "ab": ResnetGenerator(self.width, self.blocks),
                "ba": ResnetGenerator(self.width, self.blocks),
            }
        )

    def build_discriminator(self) -> nn.Module:
        return nn.ModuleDict({"a": PatchDiscriminator(1), "b": PatchDiscriminator(1)})

    def train_batch(self, index: Tensor) -> Batch:
        other = torch.randint(0, int(self.train_b.shape[0]), index.shape, device=index.device)
        return to_unit(self.train_a[index]), to_unit(self.train_b[other])

    def generate(self, generator: nn.Module, batch: Batch) -> Fake:
        a, b = batch
        g_ab, g_ba = _pair(generator, "ab", "ba")
        return g_ab(a), g_ba(b)

    def discriminator_loss(self, discriminator: nn.Module, batch: Batch, fake: Fake) -> Tensor:
        a, b = batch
        fake_b, fake_a = fake
        d_a, d_b = _pair(discriminator, "a", "b")
        loss_b = _lsgan(d_b(b), True) + _lsgan(d_b(fake_b.detach()), False)
        loss_a = _lsgan(d_a(a), True) + _lsgan(d_a(fake_a.detach()), False)
        return 0.5 * (loss_a + loss_b)

    def generator_terms(
        self, generator: nn.Module, discriminator: nn.Module, batch: Batch, fake: Fake
    ) -> list[Tensor]:
        a, b = batch
        fake_b, fake_a = fake
        g_ab, g_ba = _pair(generator, "ab", "ba")
        d_a, d_b = _pair(discriminator, "a", "b")
        return [
            _lsgan(d_b(fake_b), True),
            _lsgan(d_a(fake_a), True),
            F.l1_loss(g_ba(fake_b), a),
            F.l1_loss(g_ab(fake_a), b),
            F.l1_loss(g_ab(b), b),
            F.l1_loss(g_ba(a), a),
        ]

    def _directions(
        self, generator: nn.Module, a: Tensor, b: Tensor, batch_size: int
    ) -> dict[str, Tensor]:
        """Translations of uint8 ``a`` and ``b`` in [0, 1]: ``ab`` (A -> B), ``aba``
        (A -> B -> A), ``ba``, ``bab``."""
        g_ab, g_ba = _pair(generator, "ab", "ba")
        out: dict[str, list[Tensor]] = {"ab": [], "aba": [], "ba": [], "bab": []}
        with evaluating(generator):
            for part in a.split(batch_size):
                fake_b = g_ab(to_unit(part))
                out["ab"].append(fake_b)
                out["aba"].append(g_ba(fake_b))
            for part in b.split(batch_size):
                fake_a = g_ba(to_unit(part))
                out["ba"].append(fake_a)
                out["bab"].append(g_ab(fake_a))
        return {k: torch.cat(v).add(1.0).div(2.0) for k, v in out.items()}

    def evaluate(self, generator: nn.Module, batch_size: int = 500) -> dict[str, float]:
        """FD-FMNIST (A -> B), FD-MNIST (B -> A) and the cycle L1 of each domain."""
        t = self._directions(generator, self.test_a, self.test_b, batch_size)
        real_a = self.test_a.float().div(255.0)
        real_b = self.test_b.float().div(255.0)
        finite = all(bool(torch.isfinite(v).all()) for v in t.values())
        if not finite:
            return dict.fromkeys((c[0] for c in METRIC_COLUMNS), float("nan"))
        return {
            "fd_fmnist": self.fd_b(t["ab"]),
            "fd_mnist": self.fd_a(t["ba"]),
            "cycle_l1_a": float((t["aba"] - real_a).abs().mean()),
            "cycle_l1_b": float((t["bab"] - real_b).abs().mean()),
        }

    def samples(self, generator: nn.Module) -> np.ndarray:
        """The sample grid's row: G_AB of the MNIST samples, then G_BA of the Fashion ones."""
        t = self._directions(generator, self.test_a[self.sample_a], self.test_b[self.sample_b], 500)
        return np.concatenate([to_uint8(t["ab"]), to_uint8(t["ba"])])

    def sample_references(self) -> list[tuple[str, dict[str, Any]]]:
        """The grid's first row: the MNIST then the Fashion-MNIST test inputs."""
        a = self.test_a[self.sample_a][:, 0].cpu().numpy()
        b = self.test_b[self.sample_b][:, 0].cpu().numpy()
        return [("input: MNIST | Fashion", encode_images(np.concatenate([a, b])))]


def run(
    cfg: CycleGanConfig,
    *,
    previous: Mapping[str, dict[str, Any]] | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> ExperimentResult:
    """Run the CycleGAN experiment; raises ``DatasetNotFoundError`` without the data."""
    setup = GanSetup.load(cfg, BALANCED_WEIGHTS, UNBALANCED_WEIGHTS)
    domain_a, domain_b = setup.data["mnist"], setup.data["fashion-mnist"]
    info_a, info_b = setup.classifier_info["mnist"], setup.classifier_info["fashion-mnist"]
    task = UnpairedTranslationTask(
        domain_a,
        domain_b,
        setup.classifiers["mnist"],
        setup.classifiers["fashion-mnist"],
        setup.weights,
        width=cfg.width,
        blocks=cfg.blocks,
        samples=cfg.samples,
        device=setup.device,
    )
    digest = f"{info_b['weights_sha256']}+{info_a['weights_sha256']}"
    runs = setup.train(task, previous=previous, on_run=on_run, classifier=digest)
    test_size = int(domain_a.test_y.shape[0])
    notes = [
        f"Unpaired MNIST (A) <-> Fashion-MNIST (B), 28x28; {task.num_train} training images "
        f"per domain, {test_size} test images per domain.",
        f"Generators: CycleGAN ResNet (width {cfg.width}, {cfg.blocks} residual blocks); "
        "discriminators: unconditional PatchGANs, least-squares GAN loss, no image pool, "
        + cfg.optimizers_note(),
        "Terms (in order; MTAdam's anchor is the first): "
        + ", ".join(TERM_NAMES)
        + f"; {setup.weights_note()}.",
        "FD-FMNIST: Fréchet distance between the Fashion-MNIST classifier's 128-d features of "
        "G_AB(MNIST test) and of the real Fashion-MNIST test images (not FID); FD-MNIST the "
        "same for G_BA(Fashion test) with the classifier trained on MNIST. Classifiers: "
        f"Fashion-MNIST {info_b['test_accuracy']:.2f}% test accuracy (weights "
        f"{info_b['weights_sha256']}), MNIST {info_a['test_accuracy']:.2f}% (weights "
        f"{info_a['weights_sha256']}). Cycle L1: mean |G_BA(G_AB(a)) - a| (and B's), pixels "
        "in [0, 1].",
    ]
    title = "CycleGAN-style unpaired MNIST <-> Fashion-MNIST (MTAdam paper's CycleGAN protocol)"
    if cfg.ablation:
        title = "CycleGAN-style unpaired MNIST <-> Fashion-MNIST: MTAdam ablations"
    return setup.result(
        task,
        runs,
        title=title,
        metric_label="FD-FMNIST of MNIST -> Fashion-MNIST",
        columns=METRIC_COLUMNS,
        plot_keys=[c[0] for c in METRIC_COLUMNS],
        notes=notes,
        test_size=test_size,
        classifier={"fashion-mnist": info_b, "mnist": info_a},
    )
