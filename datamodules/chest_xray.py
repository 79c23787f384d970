"""One DataModule for every stage: synthetic phantoms, ImageFolder trees and MedMNIST `.npz` files.

Every source is decoded once, resized to `image_size` and kept in memory as 8-bit grayscale
(chest X-rays are grayscale; `channels=3` replicates the plane for RGB backbones). Batches are
dicts ``{"image": (B, C, S, S) float32 in [0, 1], "label": (B,) int64, "index": (B,) int64}``; with
``masks=True`` (synthetic and folder sources) they also hold ``"mask": (B, 1, S, S) float32 in {0, 1}``,
the lung field of each image, pixel-aligned with it through every split, subsampling and augmentation. With a
`Degradation` (restoration), ``"image"`` is the degraded image and ``"clean"`` (B, C, S, S) float32 in [0, 1] the clean
one it was degraded from.

Each split is stored in a seeded, class-interleaved order (`interleaved_order`): the first n images of
any split hold every class in its share of the split, within an image or two. Evaluation subsets are
therefore "the images of index < n" (see `AdversarialExampleCallback`), the same stratified images for
any batch size and any number of DDP ranks, whatever order the source lists its files in.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from datamodules.synthetic import generate_phantoms

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MEDMNIST_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
SYNTHETIC_CLASS_NAMES = ("normal", "tuberculosis")


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


class UnpaddedDistributedSampler(DistributedSampler):
    """Shards evaluation data over ranks without the padding of `DistributedSampler`.

    Every sample is scored exactly once, so metrics summed across ranks equal a 1-process run.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class ClassBalancedSampler(DistributedSampler):
    """Training indices in which every class gets an equal share of each epoch's draws.

    Each epoch draws one global sequence of N indices (N = len(labels), rounded up to a multiple of num_replicas):
    N/K for each of the K classes present (the remainder to randomly chosen classes, one each), a class's share taken
    by cycling through fresh random permutations of its members, so each of its images is drawn equally often, within
    one; the sequence is then shuffled. The draw is seeded by (seed, epoch), so every rank computes the same sequence
    and a resumed run draws the epoch an uninterrupted one would; rank r yields ``sequence[r::num_replicas]``.
    Subclassing `DistributedSampler` keeps Lightning from replacing it under DDP; Lightning calls `set_epoch`.

    Args:
        labels: (N,) int class of each image, as np.ndarray or tensor.
        num_replicas, rank: the number of processes and this one's rank.
        seed: seeds the draws together with the epoch.
    """

    def __init__(self, labels: np.ndarray | torch.Tensor, num_replicas: int, rank: int, seed: int):
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        super().__init__(range(len(self.labels)), num_replicas=num_replicas, rank=rank, seed=seed)

    def __iter__(self):
        # (seed, epoch) hashed together, not seed + epoch, so runs of neighbouring seeds do not share epochs
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        classes = self.labels.unique()
        shares = torch.full((len(classes),), self.total_size // len(classes))
        shares[torch.randperm(len(classes), generator=generator)[: self.total_size % len(classes)]] += 1
        draws = []
        for label, share in zip(classes, shares.tolist()):
            members = torch.nonzero(self.labels == label).squeeze(1)
            cycles = -(-share // len(members))
            permutations = torch.rand(cycles, len(members), generator=generator).argsort(dim=1)
            draws.append(members[permutations].flatten()[:share])
        sequence = torch.cat(draws)
        sequence = sequence[torch.randperm(len(sequence), generator=generator)]
        return iter(sequence[self.rank :: self.num_replicas].tolist())


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
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["class_names"])  # the model logs the resolved names
        _check_options(source, root, image_size, channels, split, masks)
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
        _check_class_ratio(class_ratio or {}, self._class_names)
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
            return list(self._class_folders(_folder_layout(self.root)[0]))
        labels = _read_medmnist(self.root, labels_only=True)
        return [f"class_{i}" for i in range(int(max(labels[k].max() for k in labels)) + 1)]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        if hp.source == "synthetic":
            splits = self._synthetic_splits()
        elif hp.source == "folder":
            splits = self._folder_splits()
        else:
            splits = self._medmnist_splits()
        for name, samples in splits.items():
            samples = self._apply_class_ratio(name, samples)
            samples = samples[interleaved_order(samples.labels, hp.seed)]
            training = name == "train"
            transform = self.augmentation.build() if training else None
            self.datasets[name] = GrayscaleImageDataset(
                samples.images, samples.labels, hp.channels, transform, samples.masks,
                self.degradation, degradation_key=None if training else (hp.seed, name),
            )

    def _apply_class_ratio(self, split: str, samples: Samples) -> Samples:
        """Keeps round(ratio * n) seeded images of each class of `class_ratio`, n the largest unnamed class's size."""
        ratios = self.hparams.class_ratio
        labels = samples.labels
        if not ratios or len(labels) == 0:
            return samples
        named = [self.class_names.index(name) for name in ratios]
        counts = np.bincount(labels, minlength=self.num_classes)
        unnamed = np.setdiff1d(np.arange(self.num_classes), named)
        reference = unnamed[counts[unnamed].argmax()]
        reference_count = int(counts[reference])
        keep = ~np.isin(labels, named)
        for name, label in zip(ratios, named):
            ratio, count = ratios[name], int(counts[label])
            kept = round(ratio * reference_count)
            if kept > count:
                raise ValueError(
                    f"--data.class_ratio {name}: {ratio} needs {kept} {name} images in the {split} split, which has "
                    f"{count} for {reference_count} {self.class_names[reference]}: the largest possible ratio is "
                    f"{count / reference_count:.4g}."
                )
            # a stream of its own per split and class: the choice does not depend on the other options
            rng = np.random.default_rng(np.random.SeedSequence(self.hparams.seed, spawn_key=(SPLITS.index(split), label)))
            keep[rng.choice(np.flatnonzero(labels == label), kept, replace=False)] = True
        return samples[keep]

    def _synthetic_splits(self) -> dict[str, Samples]:
        hp = self.hparams
        images, labels, *masks = generate_phantoms(hp.synthetic_samples, hp.image_size, seed=hp.seed, masks=hp.masks)
        pixels = images.squeeze(1).mul(255).round().to(torch.uint8).numpy()
        lung_fields = masks[0].squeeze(1).to(torch.uint8).numpy() if masks else None
        return _stratified_split(Samples(pixels, labels.numpy(), lung_fields), hp.split, hp.seed)

    def _class_folders(self, class_root: Path) -> dict[str, Path]:
        """{class name: folder} in label order: the subfolders of `class_root` or, with masks, `class_root` itself
        when it holds ``images/`` (one class, named after `root`)."""
        if self.hparams.masks and (class_root / "images").is_dir():
            return {self.root.resolve().name: class_root}
        return _folder_classes(class_root, self.hparams.masks)

    def _folder_splits(self) -> dict[str, Samples]:
        hp = self.hparams
        class_root, split_folders = _folder_layout(self.root)
        names = list(self._class_folders(class_root))

        def load(folder: Path) -> Samples:
            classes = self._class_folders(folder)
            if list(classes) != names:
                raise ValueError(
                    f"{folder} has classes {list(classes)}, but the training folder has {names}; every split needs the "
                    f"same class subfolders."
                )
            return _load_class_folders(classes, hp.image_size, hp.masks)

        if split_folders is None:
            return _stratified_split(load(class_root), hp.split, hp.seed)
        splits = {name: load(folder) for name, folder in split_folders.items()}
        if "val" not in splits:
            train_fraction = hp.split[0] / (hp.split[0] + hp.split[1])
            carved = _stratified_split(splits["train"], (train_fraction, 1 - train_fraction, 0.0), hp.seed)
            splits["train"], splits["val"] = carved["train"], carved["val"]
        return splits

    def _medmnist_splits(self) -> dict[str, Samples]:
        arrays = _read_medmnist(self.root, labels_only=False)
        return {
            split: Samples(_resize_uint8(arrays[f"{split}_images"], self.hparams.image_size), arrays[f"{split}_labels"])
            for split in SPLITS
        }

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
        if training and self.hparams.balanced_sampling:
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


def _check_class_ratio(class_ratio: dict[str, float], class_names: list[str]) -> None:
    unknown = sorted(set(class_ratio) - set(class_names))
    if unknown:
        raise ValueError(f"--data.class_ratio names unknown class(es) {unknown}; the classes are {class_names}.")
    if len(class_ratio) == len(class_names):
        raise ValueError(f"--data.class_ratio names every class {class_names}: leave out at least one, to count the ratios against.")
    for name, ratio in class_ratio.items():
        if not ratio > 0:
            raise ValueError(f"--data.class_ratio {name}: {ratio} must be positive ({name} images kept per image of the largest class not named).")


def _folder_layout(root: Path) -> tuple[Path, dict[str, Path] | None]:
    """The folder whose subfolders name the classes, and the split folders when `root/train` exists."""
    if not root.is_dir():
        raise NotADirectoryError(f"--data.root {str(root)!r} is a file; --data.source folder needs a folder of class subfolders.")
    if not (root / "train").is_dir():
        return root, None
    if not (root / "test").is_dir():
        raise FileNotFoundError(f"{root / 'train'} exists but {root / 'test'} does not: give both (val/ is optional) or neither.")
    splits = {name: root / name for name in SPLITS if (root / name).is_dir()}
    return root / "train", splits


def _folder_classes(class_root: Path, masks: bool) -> dict[str, Path]:
    """{class name: folder} for the subfolders of `class_root`, sorted by name (label order)."""
    folders = {p.name: p for p in sorted(class_root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if masks and not folders:
        raise ValueError(
            f"{class_root} has no class subfolders and no images/ subfolder; with --data.masks true give images/ and "
            f"masks/ either in {class_root} itself (one class) or in each class subfolder."
        )
    if not masks and set(folders) == {"images", "masks"}:
        raise ValueError(
            f"{class_root} holds images/ and masks/: for image/mask pairs set --data.masks true; a classifier needs one "
            f"subfolder per class."
        )
    if not masks and len(folders) < 2:
        raise ValueError(
            f"{class_root} has {len(folders)} class subfolder(s) {list(folders)}; a classifier needs at least two "
            f"(e.g. Normal/ and Tuberculosis/), each holding that class's images."
        )
    return folders


def _image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _paired_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """`folder/images/` and `folder/masks/` files paired by stem: (images, masks), aligned and sorted by stem."""
    found = {}
    for kind in ("images", "masks"):
        if not (folder / kind).is_dir():
            raise FileNotFoundError(
                f"{folder / kind} does not exist; with --data.masks true each class folder holds images/ and masks/, "
                f"whose files pair by stem (images/a.png <-> masks/a.png)."
            )
        files = _image_files(folder / kind)
        found[kind] = {p.stem: p for p in files}
        if len(found[kind]) < len(files):
            stems = [p.stem for p in files]
            twins = sorted(p.name for p in files if stems.count(p.stem) > 1)
            raise ValueError(f"{folder / kind} holds files of the same stem {twins}: image and mask pair by stem, keep one of each.")
    images, masks = found["images"], found["masks"]
    for stem in sorted(images.keys() ^ masks.keys()):
        if stem in images:
            raise FileNotFoundError(f"Image {images[stem]} has no mask: add {folder / 'masks' / stem}.png, or remove the image.")
        raise FileNotFoundError(f"Mask {masks[stem]} has no image of stem {stem!r} in {folder / 'images'}: add it, or remove the mask.")
    return [images[stem] for stem in sorted(images)], [masks[stem] for stem in sorted(images)]


def _load_class_folders(classes: dict[str, Path], image_size: int, masks: bool) -> Samples:
    """Decode the images (and masks) of each class folder, labels in the order of `classes`; corrupt files are skipped.

    Returns images (N, S, S) uint8 and labels (N,) int64 and, with `masks`, masks (N, S, S) uint8 in {0, 1}. A mask
    whose size differs from its image's is an error.
    """
    image_files, mask_files, labels = [], [], []
    for label, folder in enumerate(classes.values()):
        class_images, class_masks = _paired_files(folder) if masks else (_image_files(folder), [])
        if not class_images:
            where = folder / "images" if masks else folder
            pairs = not masks and (folder / "images").is_dir()
            hint = " It has images/: for image/mask pairs set --data.masks true." if pairs else ""
            raise ValueError(f"Class folder {where} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).{hint}")
        image_files += class_images
        mask_files += class_masks
        labels += [label] * len(class_images)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        decoded = list(pool.map(lambda path: _decode(path, image_size), image_files))
        decoded_masks = list(pool.map(lambda path: _decode(path, image_size, mask=True), mask_files)) if masks else decoded
    for image_path, mask_path, image, mask in zip(image_files, mask_files, decoded, decoded_masks):
        if image is not None and mask is not None and image[1] != mask[1]:
            (mask_width, mask_height), (width, height) = mask[1], image[1]
            raise ValueError(
                f"Mask {mask_path} is {mask_width}x{mask_height} pixels but its image {image_path} is {width}x{height}: "
                f"a mask must have its image's size."
            )
    readable = [image is not None and mask is not None for image, mask in zip(decoded, decoded_masks)]
    skipped = [str(path) for path, image in zip(image_files, decoded) if image is None]
    skipped += [str(path) for path, mask in zip(mask_files, decoded_masks) if mask is None]
    if skipped:
        root = os.path.commonpath(classes.values())
        if not any(readable):
            raise ValueError(f"None of the {len(image_files)} images under {root} could be read (first: {skipped[0]}).")
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        rank_zero_warn(f"Skipped {len(skipped)} unreadable image(s) of {len(image_files)} under {root}: {shown}")
    keep = np.flatnonzero(readable)
    return Samples(
        np.stack([decoded[i][0] for i in keep]),
        np.asarray(labels, dtype=np.int64)[keep],
        np.stack([decoded_masks[i][0] for i in keep]) if masks else None,
    )


def decode_grayscale(path: Path, image_size: int) -> np.ndarray | None:
    """(S, S) uint8 for a readable image file, None for a corrupt or truncated one."""
    decoded = _decode(path, image_size)
    return None if decoded is None else decoded[0]


def _decode(path: Path, image_size: int, mask: bool = False) -> tuple[np.ndarray, tuple[int, int]] | None:
    """A file as (S, S) uint8 with its (width, height) on disk; None for a corrupt or truncated file.

    An image is converted to grayscale and resized bilinearly. A mask must be 8-bit grayscale (or 1-bit) holding
    0/255 or 0/1 (anything else raises ValueError naming the file and its values); it is binarised to {0, 1}, then
    resized by nearest neighbour, so it stays binary.
    """
    try:
        with Image.open(path) as file:
            plane, size = np.asarray(file if mask else file.convert("L")), file.size
    except (OSError, SyntaxError, ValueError):
        return None
    if mask:
        plane = _binarised(plane, path)
    resample = Image.Resampling.NEAREST if mask else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(plane).resize((image_size, image_size), resample)), size


def _binarised(values: np.ndarray, path: Path) -> np.ndarray:
    """A mask file's pixels, (H, W) uint8 0/255 or 0/1 or bool, as (H, W) uint8 in {0, 1}."""
    found = np.unique(values)
    levels = np.isin(found, (0, 1)).all() or np.isin(found, (0, 255)).all()
    binary = values.ndim == 2 and values.dtype in (np.uint8, np.bool_) and levels
    if not binary:
        shown = ", ".join(str(v) for v in found[:8]) + (", ..." if len(found) > 8 else "")
        raise ValueError(
            f"Mask {path} is not binary: it holds the values [{shown}] ({values.dtype}, shape {values.shape}); a mask is "
            f"an 8-bit grayscale PNG of 0 (background) and 255 or 1 (lung field)."
        )
    return (values > 0).astype(np.uint8)


def _read_medmnist(path: Path, labels_only: bool) -> dict[str, np.ndarray]:
    """The arrays of a MedMNIST `.npz`; labels flattened to (N,) int64."""
    try:
        archive = np.load(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable .npz file ({error}); --data.source medmnist needs a MedMNIST .npz.") from error
    with archive:
        wanted = [key for key in MEDMNIST_KEYS if key.endswith("labels") or not labels_only]
        missing = [key for key in MEDMNIST_KEYS if key not in archive.files]
        if missing:
            raise KeyError(f"{path} lacks the MedMNIST keys {missing} (it has {archive.files}); expected {list(MEDMNIST_KEYS)}.")
        arrays = {key: archive[key] for key in wanted}
    for key in arrays:
        if key.endswith("labels"):
            arrays[key] = arrays[key].reshape(len(arrays[key]), -1)[:, 0].astype(np.int64)
    return arrays


def _resize_uint8(images: np.ndarray, image_size: int) -> np.ndarray:
    """(N, h, w) or (N, h, w, 3) uint8 -> (N, S, S) uint8 grayscale, antialiased."""
    pixels = torch.from_numpy(images).float()
    if pixels.ndim == 4:
        pixels = pixels.mean(dim=-1)
    if pixels.shape[-1] != image_size:
        pixels = torch.nn.functional.interpolate(
            pixels.unsqueeze(1), size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        ).squeeze(1)
    return pixels.round().clamp(0, 255).to(torch.uint8).numpy()


def interleaved_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation (N,) of labels (N,) after which every prefix holds each class in proportion.

    Each class is shuffled (seeded), its k-th of n members is placed at (k + u) / n on [0, 1) with a per-class
    random offset u, and all members are sorted by place. A prefix up to any place x then holds floor or ceil
    of x * n members of each class, so class shares of a prefix are exact within one or two images.
    """
    rng = np.random.default_rng(seed)
    places = np.empty(len(labels))
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        places[members] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(places, kind="stable")


def _stratified_split(samples: Samples, fractions: tuple[float, float, float], seed: int) -> dict[str, Samples]:
    """Seeded split keeping each class's share in every split; returns {split: samples}."""
    labels = samples.labels
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = round(len(members) * fractions[1])
        n_test = round(len(members) * fractions[2])
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    return {split: samples[np.sort(np.concatenate(chunks))] for split, chunks in parts.items()}
