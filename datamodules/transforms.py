"""What happens to an image between storage and batch: the training `Augmentation` and the restoration `Degradation`.

Both are dataclasses, so a DataModule's hyperparameters can hold them (and its checkpoint pickle them; see
`robust_cxr.safe_loading`). Their random draws come from outside: `GrayscaleImageDataset` seeds the augmentation
from torch's RNG and hands the degradation its random stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np


@dataclass
class Augmentation:
    """Mild training augmentation for radiographs (flips stay off: anatomy is not mirror-symmetric)."""

    probability: float = 0.5
    horizontal_flip: bool = False
    rotate_degrees: float = 5.0
    translate: float = 0.04
    scale: float = 0.05
    brightness_contrast: float = 0.1

    def build(self) -> A.Compose:
        """The albumentations pipeline for (H, W) uint8 images and, when passed as ``mask=``, their (H, W) uint8 masks.

        Geometric transforms move image and mask alike (the mask by nearest neighbour, so it keeps its values);
        brightness and contrast change the image only.
        """
        transforms = [
            A.Affine(
                rotate=(-self.rotate_degrees, self.rotate_degrees),
                translate_percent=(-self.translate, self.translate),
                scale=(1 - self.scale, 1 + self.scale),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=self.probability,
            ),
            A.RandomBrightnessContrast(self.brightness_contrast, self.brightness_contrast, p=self.probability),
        ]
        if self.horizontal_flip:
            transforms.append(A.HorizontalFlip(p=0.5))
        return A.Compose(transforms)


@dataclass
class Degradation:
    """A detector's degradation of a radiograph, the input a restorer learns to undo: clean (H, W) float32 in [0, 1] ->
    degraded (H, W) float32 in [0, 1].

    In order: a Gaussian point-spread blur, Poisson quantum noise, Gaussian read noise, then clipping to [0, 1].

    Args:
        blur_sigma: standard deviation of the blur in pixels (0: no blur); edges reflect.
        photons: the Poisson dose, detected counts per unit intensity: a pixel of intensity v becomes
            Poisson(photons * v) / photons, so its noise std is sqrt(v / photons) (fewer photons: noisier); None: no
            Poisson noise.
        read_noise: standard deviation of the additive Gaussian read noise, in [0, 1] units (0: none).
    """

    blur_sigma: float = 1.5
    photons: float | None = 1000.0
    read_noise: float = 0.005

    def __post_init__(self) -> None:
        if not (math.isfinite(self.blur_sigma) and self.blur_sigma >= 0):
            raise ValueError(f"--data.degradation.blur_sigma must be a finite number >= 0 (the blur's standard deviation in "
                             f"pixels; 0 for no blur), got {self.blur_sigma}.")
        if self.photons is not None and not (math.isfinite(self.photons) and self.photons > 0):
            raise ValueError(f"--data.degradation.photons must be a finite number > 0 (Poisson counts per unit intensity; "
                             f"fewer is noisier), or null for no Poisson noise, got {self.photons}.")
        if not (math.isfinite(self.read_noise) and self.read_noise >= 0):
            raise ValueError(f"--data.degradation.read_noise must be a finite number >= 0 (the read noise's standard deviation "
                             f"in [0, 1] units; 0 for none), got {self.read_noise}.")
        if self.blur_sigma == 0 and self.photons is None and self.read_noise == 0:
            raise ValueError("--data.degradation changes nothing (blur_sigma 0, photons null, read_noise 0): set at least one "
                             "of them, or leave --data.degradation null for clean images.")

    def apply(self, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The degraded version of `clean` (H, W) float32 in [0, 1], its noise drawn from `rng`."""
        degraded = clean
        if self.blur_sigma > 0:
            degraded = cv2.GaussianBlur(clean, (0, 0), self.blur_sigma, borderType=cv2.BORDER_REFLECT_101)
        if self.photons is not None:
            degraded = rng.poisson(degraded.clip(0, None) * self.photons) / self.photons
        if self.read_noise > 0:
            degraded = degraded + rng.normal(0.0, self.read_noise, degraded.shape)
        return degraded.clip(0, 1).astype(np.float32)
