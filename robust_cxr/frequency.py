"""The frequency-domain defense of Park et al.: a converter, a detector of adversarial inputs on its output, and a
reformer that maps inputs back toward clean images, as plain `nn.Module`s on images (B, C, H, W) in [0, 1].

Adversarial perturbations concentrate their energy at high spatial frequencies, where chest X-rays have little, so
a detector sees them best in a frequency representation. Park et al. do not publish their transform or networks;
`docs/benchmarks.md` measures the representations offered here. The reformer is the restorer's network
(`robust_cxr.models.ResidualRestorer`), an image-to-image map that starts as the identity.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import nn

from robust_cxr.models import ResidualRestorer

FrequencyRepresentation = Literal["log_magnitude", "log_magnitude_phase", "block_dct"]
DCT_BLOCK = 8


def dct_matrix(size: int) -> torch.Tensor:
    """(size, size) orthonormal DCT-II matrix D: the coefficients of a signal x (size,) are D @ x."""
    n = torch.arange(size, dtype=torch.float64)
    matrix = torch.cos(math.pi * (n[None, :] + 0.5) * n[:, None] / size) * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix.float()


def frequency_features(images: torch.Tensor, representation: FrequencyRepresentation) -> torch.Tensor:
    """Frequency representation of images (B, C, H, W) in [0, 1]:

    - ``log_magnitude``: log(1 + |FFT|) of each channel, centred (zero frequency at (H // 2, W // 2)), divided by
      log(1 + H * W) so it lies in [0, 1]: (B, C, H, W);
    - ``log_magnitude_phase``: that, and the phase / pi in [-1, 1]: (B, 2C, H, W);
    - ``block_dct``: the orthonormal DCT of each 8 x 8 block, coefficients in place, as sign * log(1 + 8 |c|) / log(65)
      (B, C, H, W), H and W multiples of 8.
    """
    if representation not in get_args(FrequencyRepresentation):
        raise ValueError(f"Unknown frequency representation {representation!r}; use one of {list(get_args(FrequencyRepresentation))}.")
    height, width = images.shape[-2:]
    if representation == "block_dct":
        if height % DCT_BLOCK or width % DCT_BLOCK:
            raise ValueError(f"block_dct needs image sides that are multiples of {DCT_BLOCK}, got {height}x{width}.")
        basis = dct_matrix(DCT_BLOCK).to(images.device, images.dtype)
        blocks = images.unflatten(-2, (height // DCT_BLOCK, DCT_BLOCK)).unflatten(-1, (width // DCT_BLOCK, DCT_BLOCK))
        coefficients = torch.einsum("ij,bchjwk,lk->bchiwl", basis, blocks, basis).flatten(4, 5).flatten(2, 3)
        return coefficients.sign() * torch.log1p(DCT_BLOCK * coefficients.abs()) / math.log1p(DCT_BLOCK**2)
    spectrum = torch.fft.fftshift(torch.fft.fft2(images.float()), dim=(-2, -1))
    magnitude = torch.log1p(spectrum.abs()) / math.log1p(height * width)
    if representation == "log_magnitude":
        return magnitude
    return torch.cat([magnitude, spectrum.angle() / math.pi], dim=1)


def feature_channels(in_chans: int, representation: FrequencyRepresentation) -> int:
    return 2 * in_chans if representation == "log_magnitude_phase" else in_chans


class FrequencyDetector(nn.Module):
    """Adversarial-input detector: images (B, C, H, W) in [0, 1] -> scores (B,), logits of "adversarial".

    A small CNN (per width a stride-2 conv-BatchNorm-ReLU block, global average pooling, a linear score) on the
    frequency representation, with the image itself as extra channels when `with_image`. ``threshold`` (a buffer,
    saved with the detector) is the score above which an image is flagged, chosen on validation for a stated
    false-positive rate.
    """

    def __init__(self, in_chans: int, representation: FrequencyRepresentation = "log_magnitude", with_image: bool = False,
                 widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        self.representation = representation
        self.with_image = with_image
        channels = feature_channels(in_chans, representation) + (in_chans if with_image else 0)
        layers = []
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(channels, 1)
        self.register_buffer("threshold", torch.tensor(0.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = frequency_features(images, self.representation)
        if self.with_image:
            features = torch.cat([features, 2 * images - 1], dim=1)
        return self.score(self.features(features).mean(dim=(2, 3)))[:, 0]

    def flagged(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) bool: images whose score exceeds the threshold."""
        return self(images) > self.threshold


class DetectThenReform(nn.Module):
    """Reforms only what the detector flags: images (B, C, H, W) in [0, 1] -> the reformer's output where flagged,
    the image itself (bit-identical) elsewhere. Gradients follow the branch each image takes."""

    def __init__(self, detector: FrequencyDetector, reformer: ResidualRestorer):
        super().__init__()
        self.detector = detector
        self.reformer = reformer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flagged = self.detector.flagged(images).view(-1, *([1] * (images.ndim - 1)))
        return torch.where(flagged, self.reformer(images), images)
