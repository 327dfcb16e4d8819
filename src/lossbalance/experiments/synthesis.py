"""Building blocks of the image-synthesis experiments: networks, data, metrics, classifier.

- Networks: a small U-Net generator and a PatchGAN discriminator (pix2pix, Isola et al.
  2017), an SRResNet-style generator and a strided-conv discriminator (SRGAN, Ledig et
  al. 2017), sized for 28x28 and 32x32 images.
- Data: Sobel edge maps (the pix2pix input), padding and box downsampling.
- Metrics, per image, in torch: L1, L2 (MSE), NMSE, PSNR, SSIM (Wang et al. 2004,
  gaussian window) and the Fréchet distance between two feature sets (Heusel et al. 2017,
  eq. 6). Computed in the feature space of a Fashion-MNIST classifier rather than
  Inception's (whose weights cannot be downloaded here), it is called FD-FMNIST, not FID:
  its values are not comparable with published FIDs.
- :class:`FashionClassifier`, trained once per configuration and cached in a file keyed
  by a hash of that configuration and of the training data: its penultimate features
  give FD-FMNIST, its convolutional features SRGAN's perceptual loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lossbalance.experiments.data import ClassificationData

__all__ = [
    "CLASSIFIER_ARCH",
    "ClassifierConfig",
    "FashionClassifier",
    "FrechetScorer",
    "ImageEvaluator",
    "PatchDiscriminator",
    "ResnetGenerator",
    "SRDiscriminator",
    "SRGenerator",
    "UNetGenerator",
    "box_downsample",
    "default_cache_dir",
    "feature_statistics",
    "frechet_distance",
    "gaussian_window",
    "image_errors",
    "load_or_train_classifier",
    "pick_samples",
    "psnr",
    "sobel_edges",
    "ssim",
    "to_uint8",
    "to_unit",
]

#: version tag of :class:`FashionClassifier`; part of the cache key
CLASSIFIER_ARCH = "FashionClassifier-v1"


# ----------------------------------------------------------------------------- networks


class UNetGenerator(nn.Module):
    """A small pix2pix U-Net (Isola et al. 2017, appendix 6.1.1) for 32x32 images.

    ``depth`` stride-2 4x4 convolutions take the image down to ``32 / 2**depth`` pixels
    (1x1 for the default depth 5), and transposed convolutions take it back up, each
    concatenated with the encoder feature of the same resolution. Encoder: LeakyReLU 0.2,
    BatchNorm except on the first and innermost layers; decoder: ReLU, BatchNorm, dropout
    0.5 (the pix2pix noise) on the two innermost levels, tanh output in [-1, 1]. Widths
    double from ``width`` up to ``4 * width``.

    Args:
        in_channels: input channels (1 for an edge map).
        out_channels: output channels.
        width: channels of the first layer, ``>= 1`` (default 32).
        depth: down-sampling steps, ``1 <= depth``; the input side must be divisible by
            ``2**depth`` (default 5).
        dropout: dropout probability on the two innermost decoder levels.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        width: int = 32,
        depth: int = 5,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"Invalid depth: {depth} (expected depth >= 1)")
        if width < 1:
            raise ValueError(f"Invalid width: {width} (expected width >= 1)")
        self.depth = depth
        ch = [width * min(2**i, 4) for i in range(depth)]
        downs: list[nn.Module] = []
        for i in range(depth):
            layers: list[nn.Module] = []
            if i > 0:
                layers.append(nn.LeakyReLU(0.2))
            norm = 0 < i < depth - 1
            c_in = in_channels if i == 0 else ch[i - 1]
            layers.append(nn.Conv2d(c_in, ch[i], 4, 2, 1, bias=not norm))
            if norm:
                layers.append(nn.BatchNorm2d(ch[i]))
            downs.append(nn.Sequential(*layers))
        ups: list[nn.Module] = []
        for j in reversed(range(depth)):
            c_in = ch[j] if j == depth - 1 else 2 * ch[j]
            c_out = out_channels if j == 0 else ch[j - 1]
            layers = [nn.ReLU(), nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=j == 0)]
            if j == 0:
                layers.append(nn.Tanh())
            else:
                layers.append(nn.BatchNorm2d(c_out))
                if j >= depth - 2 and dropout > 0:
                    layers.append(nn.Dropout(dropout))
            ups.append(nn.Sequential(*layers))
        self.downs = nn.ModuleList(downs)
        self.ups = nn.ModuleList(ups)

    def forward(self, x: Tensor) -> Tensor:
        side = 2**self.depth
        if x.dim() != 4 or x.shape[-1] % side or x.shape[-2] % side:
            raise ValueError(
                f"UNetGenerator expects (N, C, H, W) with H and W divisible by {side}, "
                f"got {tuple(x.shape)}"
            )
        skips = []
        h = x
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = self.ups[0](skips[-1])
        for k, up in enumerate(self.ups[1:]):
            h = up(torch.cat([h, skips[-2 - k]], dim=1))
        return h


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (pix2pix's ``n_layers`` design) for small images.

    conv 4x4 stride 2 - LeakyReLU, then ``layers - 1`` more stride-2 convolutions with
    BatchNorm, one stride-1, and a 1-channel stride-1 output: for 32x32 inputs and the
    default ``layers = 2``, a 6x6 map of logits, each judging a 22x22 patch (5x5 for
    28x28 inputs).

    Args:
        in_channels: channels of the (condition, image) pair, concatenated.
        width: channels of the first layer (default 64, pix2pix's ``ndf``).
        layers: stride-2 convolutions, ``>= 1`` (default 2).
    """

    def __init__(self, in_channels: int = 2, width: int = 64, layers: int = 2) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"Invalid layers: {layers} (expected layers >= 1)")
        seq: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for n in range(1, layers):
            c_out = width * min(2**n, 8)
            seq += [nn.Conv2d(c, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out)]
            seq.append(nn.LeakyReLU(0.2))
            c = c_out
        c_out = width * min(2**layers, 8)
        seq += [nn.Conv2d(c, c_out, 4, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(c_out, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)

    def forward(self, *images: Tensor) -> Tensor:
        """Logits of the channel-wise concatenation of ``images`` (``(condition, image)``
        for pix2pix, the image alone for an unconditional discriminator)."""
        return self.net(torch.cat(images, dim=1))


class _ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.PReLU(width),
            nn.Conv2d(width, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class _InstanceResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(width, width, 3, bias=False),
            nn.InstanceNorm2d(width, affine=True),
            nn.ReLU(),
            nn.ReflectionPad2d(1),
            nn.Conv2d(width, width, 3, bias=False),
            nn.InstanceNorm2d(width, affine=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's ResNet generator (Zhu et al. 2017, appendix 7.2), small, for 28x28 images.

    c7s1-``width``, d``2 width``, d``4 width``, ``blocks`` residual blocks, u``2 width``,
    u``width``, c7s1-1 and tanh (InstanceNorm with affine parameters, reflection padding).
    Input sides must be divisible by 4.
    """

    def __init__(self, width: int = 32, blocks: int = 3, channels: int = 1) -> None:
        super().__init__()
        if width < 1 or blocks < 0:
            raise ValueError(f"Invalid width/blocks: {width}/{blocks} (expected >= 1 / >= 0)")
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, width, 7, bias=False),
            nn.InstanceNorm2d(width, affine=True),
            nn.ReLU(),
        ]
        c = width
        for _ in range(2):
            layers += [
                nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False),
                nn.InstanceNorm2d(2 * c, affine=True),
                nn.ReLU(),
            ]
            c *= 2
        layers += [_InstanceResidualBlock(c) for _ in range(blocks)]
        for _ in range(2):
            layers += [
                nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1, bias=False),
                nn.InstanceNorm2d(c // 2, affine=True),
                nn.ReLU(),
            ]
            c //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(c, channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(
                f"ResnetGenerator expects (N, C, H, W) with H and W divisible by 4, "
                f"got {tuple(x.shape)}"
            )
        return self.net(x)


class SRGenerator(nn.Module):
    """An SRResNet-style generator (Ledig et al. 2017, figure 4), small.

    conv 9x9 - PReLU; ``blocks`` residual blocks (conv-BN-PReLU-conv-BN plus identity);
    conv-BN plus the long skip; ``log2(scale)`` sub-pixel upsampling steps (conv to 4x
    channels, PixelShuffle(2), PReLU); conv 9x9 to one channel and tanh (output in
    [-1, 1]).

    Args:
        scale: upscaling factor, a power of two (default 4: 7x7 -> 28x28).
        width: feature channels (default 64).
        blocks: residual blocks (default 4; SRGAN has 16).
        channels: image channels.
    """

    def __init__(self, scale: int = 4, width: int = 64, blocks: int = 4, channels: int = 1) -> None:
        super().__init__()
        steps = scale.bit_length() - 1
        if scale < 2 or 2**steps != scale:
            raise ValueError(f"Invalid scale: {scale} (expected a power of two >= 2)")
        self.head = nn.Sequential(nn.Conv2d(channels, width, 9, 1, 4), nn.PReLU(width))
        self.body = nn.Sequential(
            *[_ResidualBlock(width) for _ in range(blocks)],
            nn.Conv2d(width, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
        )
        up: list[nn.Module] = []
        for _ in range(steps):
            up += [nn.Conv2d(width, 4 * width, 3, 1, 1), nn.PixelShuffle(2), nn.PReLU(width)]
        self.upsample = nn.Sequential(*up)
        self.tail = nn.Conv2d(width, channels, 9, 1, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.head(x)
        h = h + self.body(h)
        return torch.tanh(self.tail(self.upsample(h)))


class SRDiscriminator(nn.Module):
    """SRGAN's discriminator (Ledig et al. 2017, figure 4), small, for 28x28 images.

    Pairs of 3x3 convolutions (stride 1, then stride 2) with BatchNorm and LeakyReLU 0.2,
    channels ``width``, ``2 width``, ``4 width``; global average pooling; a 1x1 dense
    layer of ``8 width``; one logit per image.
    """

    def __init__(self, width: int = 32, channels: int = 1) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(channels, width, 3, 1, 1), nn.LeakyReLU(0.2)]
        c = width
        for i, c_out in enumerate((width, 2 * width, 2 * width, 4 * width, 4 * width)):
            stride = 2 if i % 2 == 0 else 1
            seq += [nn.Conv2d(c, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)]
            seq.append(nn.LeakyReLU(0.2))
            c = c_out
        seq += [
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(c, 8 * width, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(8 * width, 1, 1),
            nn.Flatten(0),
        ]
        self.net = nn.Sequential(*seq)

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)


class FashionClassifier(nn.Module):
    """The feature network of FD-FMNIST and of the perceptual loss.

    conv(1, 32, 3, pad 1) - ReLU - maxpool 2 - conv(32, 64, 3, pad 1) - ReLU - maxpool 2
    (:meth:`feature_maps`, 64x7x7) - fc(3136, 128) - ReLU (:meth:`features`, 128-d) -
    dropout 0.3 - fc(128, 10) (logits). Input: ``(N, 1, 28, 28)`` in [0, 1], normalised
    inside with ``mean`` and ``std``.
    """

    def __init__(self, mean: float = 0.2860, std: float = 0.3530, num_classes: int = 10) -> None:
        super().__init__()
        self.mean = mean
        self.std = std
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, 1, 1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, 1, 1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, num_classes))

    def feature_maps(self, x: Tensor) -> Tensor:
        """The 64x7x7 convolutional features (the perceptual loss compares these)."""
        return self.conv((x - self.mean) / self.std)

    def features(self, x: Tensor) -> Tensor:
        """The 128-d penultimate features (FD-FMNIST's feature space)."""
        return self.fc(self.feature_maps(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------- data


def to_uint8(images: Tensor) -> np.ndarray:
    """``(N, 1, H, W)`` in [0, 1] -> ``(N, H, W)`` uint8 numpy; non-finite pixels become 0."""
    x = torch.nan_to_num(images.detach().float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    return x.mul(255).round().to(torch.uint8)[:, 0].cpu().numpy()


def to_unit(images: Tensor) -> Tensor:
    """uint8 images (0..255) -> float in [-1, 1], the generators' range."""
    return images.float().div(127.5).sub(1.0)


def sobel_edges(images: Tensor, threshold: float = 0.25, chunk: int = 10000) -> Tensor:
    """Binary Sobel edge maps: the pixels whose gradient magnitude exceeds ``threshold``
    times the image's largest.

    Args:
        images: ``(N, H, W)`` uint8 images.
        threshold: relative threshold, ``0 <= threshold < 1``.
        chunk: images processed at a time (memory).

    Returns:
        ``(N, H, W)`` uint8 maps with values 0 and 255.
    """
    if images.dim() != 3:
        raise ValueError(f"sobel_edges expects (N, H, W) images, got {tuple(images.shape)}")
    if not 0 <= threshold < 1:
        raise ValueError(f"Invalid threshold: {threshold} (expected 0 <= threshold < 1)")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernel = torch.stack([kx, kx.T]).unsqueeze(1).to(images.device)
    out = []
    for part in images.split(chunk):
        g = F.conv2d(part.float().div(255.0).unsqueeze(1), kernel, padding=1)
        mag = g.pow(2).sum(1).sqrt()
        peak = mag.amax(dim=(1, 2), keepdim=True)
        # a blank image has no edges (not every pixel above 0 * 0)
        out.append(((mag > threshold * peak) & (peak > 0)).to(torch.uint8) * 255)
    return torch.cat(out) if out else images.new_zeros(images.shape)


def pick_samples(labels: Tensor, count: int) -> Tensor:
    """Indices of ``count`` test images for a grid: the first of each class in class order,
    then the next ones in dataset order."""
    labels = labels.cpu()
    first = [int((labels == c).nonzero()[0]) for c in labels.unique().tolist()]
    chosen = set(first)
    rest = [i for i in range(int(labels.shape[0])) if i not in chosen]
    return torch.tensor((first + rest)[:count], dtype=torch.int64)


def box_downsample(images: Tensor, factor: int) -> Tensor:
    """Average over ``factor x factor`` blocks: ``(N, C, H, W) -> (N, C, H/f, W/f)``."""
    return F.avg_pool2d(images, factor)


# ----------------------------------------------------------------------------- metrics


def _check_pair(x: Tensor, y: Tensor, name: str) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"{name} expects two (N, C, H, W) tensors of one shape, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )


def image_errors(x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Per-image errors of ``x`` against the reference ``y``, ``(N, C, H, W)`` each.

    Returns ``{"l1", "l2", "nmse"}``, each of shape ``(N,)``: mean absolute error, mean
    squared error, and ``||x - y||^2 / ||y||^2`` (the squared error relative to the
    reference's energy; a blank reference counts as energy 1e-12).
    """
    _check_pair(x, y, "image_errors")
    d = (x - y).flatten(1)
    sq = d.pow(2)
    energy = y.flatten(1).pow(2).sum(1).clamp_min(1e-12)
    return {"l1": d.abs().mean(1), "l2": sq.mean(1), "nmse": sq.sum(1) / energy}


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(data_range^2 / MSE)`` in dB, ``(N,)``.

    Identical images give ``inf``.
    """
    _check_pair(x, y, "psnr")
    if not data_range > 0:
        raise ValueError(f"Invalid data_range: {data_range} (expected data_range > 0)")
    mse = (x - y).flatten(1).pow(2).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(
    size: int = 11, sigma: float = 1.5, *, dtype: torch.dtype = torch.float32, device: Any = None
) -> Tensor:
    """The normalised 1-D gaussian of SSIM, ``(size,)``."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"Invalid window size: {size} (expected an odd integer >= 1)")
    if not sigma > 0:
        raise ValueError(f"Invalid sigma: {sigma} (expected sigma > 0)")
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    w = torch.exp(-(r**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    r"""Structural similarity per image (Wang et al. 2004, eq. 13), ``(N,)``.

    .. math::
        \mathrm{SSIM} = \mathrm{mean}\,
        \frac{(2\mu_x\mu_y + C_1)(2\sigma_{xy} + C_2)}
             {(\mu_x^2 + \mu_y^2 + C_1)(\sigma_x^2 + \sigma_y^2 + C_2)}

    with local statistics under a ``window_size`` gaussian of std ``sigma`` (separable,
    "valid" positions only, as the paper and ``pytorch-msssim``), :math:`C_1 = (k_1 R)^2`,
    :math:`C_2 = (k_2 R)^2`, :math:`R` = ``data_range``; the mean runs over positions and
    channels. Computed in float64.
    """
    _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(
            f"ssim: images of {tuple(x.shape[-2:])} are smaller than the {window_size}-pixel window"
        )
    c = x.shape[1]
    x, y = x.double(), y.double()
    g = gaussian_window(window_size, sigma, dtype=torch.float64, device=x.device)
    gh = g.view(1, 1, 1, -1).expand(c, 1, 1, window_size)
    gv = g.view(1, 1, -1, 1).expand(c, 1, window_size, 1)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    s_xx = blur(x * x) - mu_x**2
    s_yy = blur(y * y) - mu_y**2
    s_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * s_xy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (s_xx + s_yy + c2)
    return (num / den).flatten(1).mean(1)


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (ddof = 1) of ``(N, D)`` features, float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(
            f"feature_statistics expects (N, D) features with N >= 2, got {tuple(features.shape)}"
        )
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    r"""Fréchet distance between the gaussians N(mu1, sigma1) and N(mu2, sigma2).

    .. math::
        d^2 = \lVert\mu_1 - \mu_2\rVert^2
              + \mathrm{tr}\big(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2}\big)

    (Dowson & Landau 1982; the FID of Heusel et al. 2017, eq. 6). The trace of the matrix
    square root is computed without ``scipy.linalg.sqrtm``:
    :math:`\Sigma_1\Sigma_2` is similar to the symmetric PSD matrix
    :math:`A\Sigma_2A` with :math:`A = \Sigma_1^{1/2}`, so
    :math:`\mathrm{tr}(\Sigma_1\Sigma_2)^{1/2} = \sum_k \sqrt{\lambda_k(A\Sigma_2A)}`, from
    two symmetric eigendecompositions in float64 (eigenvalues clipped at 0, so singular
    covariances, e.g. fewer samples than dimensions, are fine). The result is clipped at 0.
    """
    if (
        sigma1.shape != sigma2.shape
        or mu1.shape != mu2.shape
        or sigma1.shape
        != (
            mu1.shape[0],
            mu1.shape[0],
        )
    ):
        raise ValueError(
            f"frechet_distance: shapes {tuple(mu1.shape)}, {tuple(sigma1.shape)}, "
            f"{tuple(mu2.shape)}, {tuple(sigma2.shape)} (expected (D,), (D, D) twice)"
        )
    mu1, mu2, s1, s2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    w, v = torch.linalg.eigh(s1)
    a = (v * w.clamp_min(0).sqrt()) @ v.T
    m = a @ s2 @ a
    ev = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0)
    d2 = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * ev.sqrt().sum()
    return max(0.0, float(d2))


# ----------------------------------------------------------------------------- classifier


def default_cache_dir(data_dir: str | Path) -> Path:
    """Where the classifier is cached: ``$LOSSBALANCE_CACHE_DIR``, else ``<data_dir>/cache``
    when the data directory is writable, else ``~/.cache/lossbalance``."""
    env = os.environ.get("LOSSBALANCE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    root = Path(data_dir).expanduser()
    if root.is_dir() and os.access(root, os.W_OK):
        return root / "cache"
    return Path.home() / ".cache" / "lossbalance"


@dataclass(frozen=True)
class ClassifierConfig:
    """How the feature classifier is trained (every field is part of the cache key).

    Attributes:
        dataset: the training data's name (``"fashion-mnist"``).
        epochs: passes over the training images, ``>= 1``.
        batch_size: training batch size.
        lr: Adam's learning rate.
        seed: seed of initialisation and data order.
    """

    dataset: str = "fashion-mnist"
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0


def _data_digest(data: ClassificationData) -> str:
    h = hashlib.sha256()
    for t in (data.train_x, data.train_y):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def classifier_key(cfg: ClassifierConfig, data: ClassificationData) -> str:
    """The cache key: a hash of the architecture, ``cfg`` and the training data."""
    blob = {"arch": CLASSIFIER_ARCH, **asdict(cfg), "train_size": int(data.train_y.shape[0])}
    blob["data"] = _data_digest(data)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> float:
    model.eval()
    correct = 0
    for start in range(0, int(y.shape[0]), 1000):
        xb = x[start : start + 1000].to(device).float().div(255.0).unsqueeze(1)
        correct += int((model(xb).argmax(1) == y[start : start + 1000].to(device)).sum())
    return 100.0 * correct / max(1, int(y.shape[0]))


def _train_classifier(
    data: ClassificationData,
    cfg: ClassifierConfig,
    device: torch.device,
    progress: Callable[[int], Any] | None,
) -> tuple[FashionClassifier, float]:
    """Train the feature classifier; returns it and its test accuracy (%).

    On the CPU it trains on one thread: the kernels' reductions run in an order that
    depends on the thread count, and the weights (so every FD value measured with them)
    must not depend on ``--threads``, ``--jobs`` or the machine's cores."""
    from lossbalance.experiments.harness import seed_everything

    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        seed_everything(cfg.seed)
        model = FashionClassifier().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        n = int(data.train_y.shape[0])
        x_all, y_all = data.train_x.to(device), data.train_y.to(device)
        model.train()
        for _ in range(cfg.epochs):
            for index in torch.randperm(n, generator=gen).split(cfg.batch_size):
                index = index.to(device)
                xb = x_all[index].float().div(255.0).unsqueeze(1)
                loss = F.cross_entropy(model(xb), y_all[index])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if progress is not None:
                    progress(1)
        return model, _accuracy(model, data.test_x, data.test_y, device)
    finally:
        torch.set_num_threads(threads)


def load_or_train_classifier(
    data: ClassificationData,
    cache_dir: str | Path,
    *,
    cfg: ClassifierConfig | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int], Any] | None = None,
) -> tuple[FashionClassifier, dict[str, Any]]:
    """The frozen feature classifier: loaded from ``cache_dir`` or trained and saved there.

    The file is ``<cache_dir>/<dataset>-classifier-<key>.pt`` with ``key`` from
    :func:`classifier_key`, so another configuration or other training data trains
    another classifier instead of reusing a stale one. It is written atomically. On the
    CPU it is trained on one thread, so that its weights do not depend on the thread
    count or on other load (they may still differ between CPU models).

    Args:
        data: the training (and test) images, uint8 ``(N, 28, 28)``.
        cache_dir: directory of the cached files (created when missing).
        cfg: training settings (default :class:`ClassifierConfig`).
        device: where to train and where the returned model lives.
        progress: called with the number of steps done after each step (a progress bar).

    Returns:
        The model (eval mode, ``requires_grad`` off) and its record: ``key``, ``path``,
        ``weights_sha256`` (a digest of the weights: runs that compare FD values must share
        it), ``trained`` (false when loaded from the cache), ``test_accuracy`` (%), the
        config.
    """
    cfg = cfg or ClassifierConfig()
    if cfg.epochs < 1:
        raise ValueError(f"Invalid classifier epochs: {cfg.epochs} (expected an integer >= 1)")
    device = torch.device(device)
    key = classifier_key(cfg, data)
    path = Path(cache_dir).expanduser() / f"{cfg.dataset}-classifier-{key}.pt"
    model = FashionClassifier()
    trained = False
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        accuracy = float(blob["test_accuracy"])
        model.to(device)
    else:
        model, accuracy = _train_classifier(data, cfg, device, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        os.close(fd)
        torch.save({"state_dict": state, "test_accuracy": accuracy}, tmp)
        Path(tmp).replace(path)
        trained = True
    model.eval().requires_grad_(False)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    info = {
        "key": key,
        "path": str(path),
        "weights_sha256": digest.hexdigest()[:16],
        "trained": trained,
        "test_accuracy": accuracy,
        "arch": CLASSIFIER_ARCH,
        **asdict(cfg),
        "train_size": int(data.train_y.shape[0]),
    }
    return model, info


# ----------------------------------------------------------------------------- evaluation


class FrechetScorer:
    """Fréchet distance of a set of images to a fixed reference set, in a classifier's
    128-d feature space (FD-FMNIST with the Fashion-MNIST classifier).

    Args:
        reference: ``(N, 1, 28, 28)`` images in [0, 1]; their feature statistics are
            computed once.
        classifier: the frozen :class:`FashionClassifier` (or the same network trained on
            another data set).
        batch_size: images per forward pass.
    """

    def __init__(
        self, reference: Tensor, classifier: FashionClassifier, batch_size: int = 500
    ) -> None:
        self.classifier = classifier
        self.batch_size = batch_size
        self.stats = feature_statistics(self.features(reference))

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return torch.cat([self.classifier.features(part) for part in images.split(self.batch_size)])

    def to(self, device: torch.device) -> None:
        self.classifier.to(device)
        self.stats = (self.stats[0].to(device), self.stats[1].to(device))

    def __call__(self, images: Tensor) -> float:
        """The distance; NaN when an image is not finite."""
        if not bool(torch.isfinite(images).all()):
            return float("nan")
        return frechet_distance(*feature_statistics(self.features(images)), *self.stats)


class ImageEvaluator:
    """Test metrics of generated images against their references, FD-FMNIST included.

    Holds the reference images and the statistics of their classifier features, computed
    once. :meth:`__call__` takes the generated test images, in the same order, and
    returns ``l1``, ``l2``, ``nmse``, ``psnr``, ``ssim`` (means over images, on the
    [0, 1] scale) and ``fd_fmnist``; every metric is NaN when any output is not finite.

    Args:
        targets: ``(N, 1, 28, 28)`` reference images in [0, 1].
        classifier: the frozen :class:`FashionClassifier`.
        batch_size: images per forward pass.
    """

    def __init__(self, targets: Tensor, classifier: FashionClassifier, batch_size: int = 500):
        self.targets = targets
        self.batch_size = batch_size
        self.fd = FrechetScorer(targets, classifier, batch_size)

    def to(self, device: torch.device) -> None:
        self.targets = self.targets.to(device)
        self.fd.to(device)

    @torch.no_grad()
    def __call__(self, outputs: Tensor) -> dict[str, float]:
        names = ("l1", "l2", "nmse", "psnr", "ssim", "fd_fmnist")
        if outputs.shape != self.targets.shape:
            raise ValueError(
                f"expected outputs of shape {tuple(self.targets.shape)}, got {tuple(outputs.shape)}"
            )
        if not bool(torch.isfinite(outputs).all()):
            return dict.fromkeys(names, float("nan"))
        sums = dict.fromkeys(names[:5], 0.0)
        for out, ref in zip(
            outputs.split(self.batch_size), self.targets.split(self.batch_size), strict=True
        ):
            errors = image_errors(out, ref)
            for k in ("l1", "l2", "nmse"):
                sums[k] += float(errors[k].double().sum())
            # one identical image would make the mean PSNR infinite; cap at 100 dB
            sums["psnr"] += float(psnr(out, ref).clamp(max=100.0).double().sum())
            sums["ssim"] += float(ssim(out, ref).sum())
        n = int(outputs.shape[0])
        metrics = {k: v / n for k, v in sums.items()}
        metrics["fd_fmnist"] = self.fd(outputs)
        return metrics
