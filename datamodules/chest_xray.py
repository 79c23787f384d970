"""The DataModule every stage shares: images of one of three sources (`datamodules.sources`), split, ordered and
sampled (`datamodules.sampling`), and loaded in batches from a `GrayscaleImageDataset` per split, which applies the
`Augmentation` and `Degradation` of `datamodules.transforms`.

Batches are dicts ``{"image": (B, C, S, S) float32 in [0, 1], "label": (B,) int64, "index": (B,) int64}`` (``channels=3``
replicates the grayscale plane for RGB backbones); with ``masks=True`` (synthetic and folder sources) they also hold
``"mask": (B, 1, S, S) float32 in {0, 1}``, the lung field of each image, pixel-aligned with it through every split,
subsampling and augmentation. With a `Degradation` (restoration), ``"image"`` is the degraded image and ``"clean"``
(B, C, S, S) float32 in [0, 1] the clean one it was degraded from. Each split is stored in a seeded, class-interleaved
order (`interleaved_order`), so its first n images are a stratified subset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from datamodules.dataset import GrayscaleImageDataset, Samples
from datamodules.sampling import (ClassBalancedSampler, GeneratedMixSampler, UnpaddedDistributedSampler, check_class_ratio, interleaved_order,
                                  subsample_to_class_ratio)
from datamodules.sources import (SYNTHETIC_CLASS_NAMES, folder_class_names, folder_splits, medmnist_class_names, medmnist_splits,
                                 read_generated, synthetic_splits)
from datamodules.transforms import Augmentation, Degradation


class ChestXRayDataModule(L.LightningDataModule):
    """Chest X-ray classification data from one of three sources.

    Args:
        source: ``synthetic`` (phantoms generated from `seed`, no files), ``folder`` (one subfolder
            per class under `root`, or `root/{train,val,test}/<class>/`) or ``medmnist`` (a MedMNIST
            `.npz` with its official splits).
        root: folder or `.npz` path for the file sources.
        image_size: side S of the square images the model sees.
        channels: 1 (grayscale) or 3 (grayscale replicated, for RGB backbones).
        split: train/val/test fractions for sources without their own splits (stratified, seeded).
        synthetic_samples: number of phantoms generated in total for ``synthetic``.
        class_names: overrides the names of the classes (e.g. for `.npz` files, which carry none).
        class_ratio: {class name: ratio} subsamples each named class, in every split, to round(ratio * n) images,
            n being the size of the largest class not named (e.g. ``{PNEUMONIA: 0.25}`` keeps 1 PNEUMONIA image
            per 4 NORMAL ones); which images stay is seeded by `seed` and the split.
        balanced_sampling: training draws every class equally often each epoch (`ClassBalancedSampler`) instead of
            shuffling the training split.
        masks: batches also hold ``"mask"``, each image's lung field, (B, 1, S, S) float32 in {0, 1}. ``synthetic``
            draws them with the phantoms; ``folder`` reads them from ``images/`` and ``masks/`` subfolders of each
            class folder (or of `root` itself, one class named after it), paired by file stem; ``medmnist`` has none.
        degradation: restoration data, from any source: ``"image"`` is the image degraded by it (after the training
            augmentation) and ``"clean"`` (B, C, S, S) float32 in [0, 1] the clean image. Validation and test images
            are degraded by noise drawn from (`seed`, split, index), the same in every epoch and run; training images
            draw fresh noise at every epoch, from torch's RNG like the augmentation (so a run's seed fixes them).
        generated: a dataset written by generate.py (images sampled from a DDPM trained on this data, labelled by a
            classifier), added to the training split: training draws mix it in at `generated_ratio`
            (`GeneratedMixSampler`), in the real images' class shares. Validation and test stay real.
        generated_ratio: the generated share of each training batch, in [0, 1] (Wang et al. 2023: 0.7); 1 trains on the
            generated images alone (their quality figure).
    """

    def __init__(
        self,
        source: Literal["synthetic", "folder", "medmnist"] = "synthetic",
        root: str | None = None,
        image_size: int = 64,
        channels: int = 1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        split: tuple[float, float, float] = (0.7, 0.15, 0.15),
        synthetic_samples: int = 3000,
        augmentation: Augmentation | None = None,
        class_names: list[str] | None = None,
        class_ratio: dict[str, float] | None = None,
        balanced_sampling: bool = False,
        masks: bool = False,
        degradation: Degradation | None = None,
        generated: str | None = None,
        generated_ratio: float = 0.7,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["class_names"])  # the model logs the resolved names
        _check_options(source, root, image_size, channels, split, masks)
        if not 0 <= generated_ratio <= 1:
            raise ValueError(f"--data.generated_ratio must lie in [0, 1] (the generated share of each training batch), got {generated_ratio}.")
        if generated is not None and masks:
            raise ValueError("--data.generated images have no lung masks: leave --data.masks false to train on them.")
        self.root = Path(root) if root is not None else None
        self.augmentation = augmentation if augmentation is not None else Augmentation()
        self.degradation = degradation  # under LightningCLI, hparams hold the config's dict rather than the dataclass
        discovered = self._discover_class_names()
        if class_names is not None and len(class_names) != len(discovered):
            raise ValueError(
                f"--data.class_names has {len(class_names)} names but the data has {len(discovered)} classes "
                f"({discovered}); give one name per class or leave it unset."
            )
        self._class_names = list(class_names) if class_names is not None else discovered
        check_class_ratio(class_ratio or {}, self._class_names)
        self.datasets: dict[str, GrayscaleImageDataset] = {}

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (label i is `class_names[i]`)."""
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self._class_names)

    def class_counts(self, split: str = "train") -> torch.Tensor:
        """(K,) int64 number of images of each class in `split`."""
        self.setup()
        return torch.bincount(self.datasets[split].labels, minlength=self.num_classes)

    def _discover_class_names(self) -> list[str]:
        if self.hparams.source == "synthetic":
            return list(SYNTHETIC_CLASS_NAMES)
        if self.hparams.source == "folder":
            return folder_class_names(self.root, self.hparams.masks)
        return medmnist_class_names(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        if hp.source == "synthetic":
            splits = synthetic_splits(hp.synthetic_samples, hp.image_size, hp.masks, hp.split, hp.seed)
        elif hp.source == "folder":
            splits = folder_splits(self.root, hp.image_size, hp.masks, hp.split, hp.seed)
        else:
            splits = medmnist_splits(self.root, hp.image_size)
        for name, samples in splits.items():
            samples = subsample_to_class_ratio(samples, name, hp.class_ratio, self.class_names, hp.seed)
            samples = samples[interleaved_order(samples.labels, hp.seed)]
            training = name == "train"
            if training and hp.generated is not None:  # real first, then generated: a sample's index is its place
                extra = read_generated(Path(hp.generated), hp.image_size, hp.channels, self.class_names)
                absent = [name for label, name in enumerate(self.class_names) if not (extra.labels == label).any()]
                if absent and hp.generated_ratio > 0:
                    raise ValueError(f"{hp.generated} holds no image of class {absent}: the training mix keeps every class's share; "
                                     "generate more images (or with a lower --min_confidence).")
                samples = Samples(np.concatenate([samples.images, extra.images]), np.concatenate([samples.labels, extra.labels]), None)
                self.real_training_images = len(samples.labels) - len(extra.labels)
            transform = self.augmentation.build() if training else None
            self.datasets[name] = GrayscaleImageDataset(
                samples.images, samples.labels, hp.channels, transform, samples.masks,
                self.degradation, degradation_key=None if training else (hp.seed, name),
            )

    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        dataset = self.datasets[split]
        training = split == "train"
        # Training shuffles from the global RNG when iteration starts (callbacks.EpochSeeding seeds it per epoch); the
        # loader's own generator draws the workers' base seed when the iterator is made, which in a resumed run's first
        # epoch is before that epoch's seeding. Balanced sampling instead seeds its sampler from the data seed and epoch.
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if training and self.hparams.generated is not None:
            sampler = GeneratedMixSampler(dataset.labels, self.real_training_images, self.hparams.generated_ratio, self.hparams.balanced_sampling,
                                          world_size, rank, self.hparams.seed)
        elif training and self.hparams.balanced_sampling:
            sampler = ClassBalancedSampler(dataset.labels, world_size, rank, self.hparams.seed)
        elif training:
            sampler = RandomSampler(dataset)
        elif world_size > 1:
            sampler = UnpaddedDistributedSampler(dataset, world_size, rank)
        else:
            sampler = None
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(self.hparams.seed),
            drop_last=training and len(dataset) > self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def _check_options(source: str, root: str | None, image_size: int, channels: int, split: tuple[float, ...], masks: bool) -> None:
    if source not in ("synthetic", "folder", "medmnist"):
        raise ValueError(f"--data.source must be synthetic, folder or medmnist, got {source!r}.")
    if masks and source == "medmnist":
        raise ValueError(
            "--data.masks true: MedMNIST files hold no lung-field masks; use --data.source synthetic, or folder with "
            "images/ and masks/ subfolders in each class folder."
        )
    if source != "synthetic" and root is None:
        raise ValueError(f"--data.source {source} reads files: set --data.root to the dataset's folder or .npz file.")
    if source != "synthetic" and not Path(root).exists():
        expected = "a folder with one subfolder per class (e.g. Normal/, Tuberculosis/)" if source == "folder" else "a MedMNIST .npz file"
        raise FileNotFoundError(f"--data.root {root!r} does not exist; point it at {expected}.")
    if image_size < 8:
        raise ValueError(f"--data.image_size must be at least 8 pixels, got {image_size}.")
    if channels not in (1, 3):
        raise ValueError(f"--data.channels must be 1 (grayscale) or 3 (replicated for RGB models), got {channels}.")
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1) > 1e-6:
        raise ValueError(f"--data.split must be three non-negative train/val/test fractions summing to 1, got {split}.")
