"""A split held in memory and served as tensors: the split names, `Samples` (a split's arrays) and
`GrayscaleImageDataset`, which turns them into items, augmented and degraded.

The per-sample random stream of the degradation (`degradation_rng`) lives here too: it is keyed by the sample's
split and position, which the dataset knows and the `Degradation` does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.transforms import Degradation

SPLITS = ("train", "val", "test")

DEGRADATION_STREAM = 0x5EED_DE6  # keeps the degradation's random streams apart from the other seeded draws of a seed


def degradation_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of the degradation of sample `index` (its position) of `split`, under data seed `seed`."""
    return np.random.default_rng(np.random.SeedSequence([seed, DEGRADATION_STREAM], spawn_key=(SPLITS.index(split), index)))


@dataclass
class Samples:
    """A split's images (N, S, S) uint8, labels (N,) int64 and, with masks, lung-field masks (N, S, S) uint8 in {0, 1}."""

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None = None

    def __getitem__(self, index: np.ndarray) -> Samples:
        """The samples selected by `index` (an index or boolean array), images, labels and masks alike."""
        return Samples(self.images[index], self.labels[index], None if self.masks is None else self.masks[index])


class GrayscaleImageDataset(Dataset):
    """uint8 images (N, S, S) and labels (N,) -> ``{"image": (C, S, S) float32 in [0, 1], "label", "index"}``.

    ``index`` (the sample's position in its split) keys per-sample random attack starts. With `masks`
    ((N, S, S) uint8 in {0, 1}) items also hold ``"mask": (1, S, S) float32 in {0, 1}``, augmented with the image.
    With a `degradation`, ``"image"`` is the degraded image and ``"clean"`` (C, S, S) float32 in [0, 1] the clean one:
    the augmentation moves the clean image first, then the degradation applies, so input and target stay aligned.
    The degradation's noise is drawn by `degradation_rng(*degradation_key, index)` when `degradation_key`
    ((data seed, split)) is given, the same at every access; without it, fresh from torch's RNG at each access, like
    the augmentation (training).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        channels: int,
        transform: A.Compose | None = None,
        masks: np.ndarray | None = None,
        degradation: Degradation | None = None,
        degradation_key: tuple[int, str] | None = None,
    ):
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.channels = channels
        self.transform = transform
        self.masks = masks
        self.degradation = degradation
        self.degradation_key = degradation_key

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        planes = {"image": self.images[index]}
        if self.masks is not None:
            planes["mask"] = self.masks[index]
        if self.transform is not None:
            # albumentations keeps a random state of its own, seeded from the OS; drawing its seed from torch makes
            # augmentation follow the run's seed (and, in DataLoader workers, torch's per-worker seeds)
            self.transform.set_random_seed(int(torch.randint(2**31, ())))
            planes = self.transform(**planes)
        image = _plane_tensor(planes["image"]).div_(255.0)
        item = {"image": image.expand(self.channels, -1, -1), "label": self.labels[index], "index": index}
        if self.masks is not None:
            item["mask"] = _plane_tensor(planes["mask"])
        if self.degradation is not None:
            degraded = self.degradation.apply(image[0].numpy(), self._degradation_rng(index))
            item["clean"], item["image"] = item["image"], _plane_tensor(degraded).expand(self.channels, -1, -1)
        return item

    def _degradation_rng(self, index: int) -> np.random.Generator:
        if self.degradation_key is not None:
            return degradation_rng(*self.degradation_key, index)
        return np.random.default_rng(int(torch.randint(2**62, ())))


def _plane_tensor(plane: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 -> (1, H, W) float32, values unchanged."""
    return torch.from_numpy(np.ascontiguousarray(plane)).float().unsqueeze(0)
