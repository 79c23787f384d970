"""Where a split's images come from: synthetic phantoms, ImageFolder trees (with or without paired lung-field masks)
and MedMNIST `.npz` files, each read into `Samples` per split.

Every source is decoded once, resized to the image size and kept in memory as 8-bit grayscale (chest X-rays are
grayscale). A folder source is one subfolder per class under the root, or ``root/{train,val,test}/<class>/`` (val/
optional: carved from train); with masks each class folder holds ``images/`` and ``masks/``, paired by file stem, or
the root (each split folder, with split folders) holds them itself: one class, named after the root. A MedMNIST file
brings its official splits.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from datamodules.dataset import SPLITS, Samples
from datamodules.sampling import stratified_split
from datamodules.synthetic import generate_phantoms

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
MEDMNIST_KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))
SYNTHETIC_CLASS_NAMES = ("normal", "tuberculosis")


def synthetic_splits(count: int, image_size: int, masks: bool, fractions: tuple[float, float, float], seed: int) -> dict[str, Samples]:
    """`count` phantoms of `image_size` pixels generated from `seed` (with their lung fields when `masks`), split by
    `stratified_split` into `fractions`; returns {split: samples}."""
    images, labels, *lung_fields = generate_phantoms(count, image_size, seed=seed, masks=masks)
    pixels = images.squeeze(1).mul(255).round().to(torch.uint8).numpy()
    mask_planes = lung_fields[0].squeeze(1).to(torch.uint8).numpy() if lung_fields else None
    return stratified_split(Samples(pixels, labels.numpy(), mask_planes), fractions, seed)


def folder_class_names(root: Path, masks: bool) -> list[str]:
    """The class names of the folder source at `root`, in label order."""
    return list(_class_folders(root, _folder_layout(root)[0], masks))


def folder_splits(root: Path, image_size: int, masks: bool, fractions: tuple[float, float, float], seed: int) -> dict[str, Samples]:
    """The folder source at `root` decoded at `image_size` pixels, with masks when `masks`; returns {split: samples}.

    Without split folders the images are split by `stratified_split` into `fractions`; with them, a missing val/ is
    carved from train/ in the ratio of the first two fractions.
    """
    class_root, split_folders = _folder_layout(root)
    names = list(_class_folders(root, class_root, masks))

    def load(folder: Path) -> Samples:
        classes = _class_folders(root, folder, masks)
        if list(classes) != names:
            raise ValueError(
                f"{folder} has classes {list(classes)}, but the training folder has {names}; every split needs the "
                f"same class subfolders."
            )
        return _load_class_folders(classes, image_size, masks)

    if split_folders is None:
        return stratified_split(load(class_root), fractions, seed)
    splits = {name: load(folder) for name, folder in split_folders.items()}
    if "val" not in splits:
        train_fraction = fractions[0] / (fractions[0] + fractions[1])
        carved = stratified_split(splits["train"], (train_fraction, 1 - train_fraction, 0.0), seed)
        splits["train"], splits["val"] = carved["train"], carved["val"]
    return splits


def medmnist_class_names(path: Path) -> list[str]:
    """``class_0`` to ``class_<K-1>``, K one more than the largest label of the MedMNIST file at `path`."""
    labels = _read_medmnist(path, labels_only=True)
    return [f"class_{i}" for i in range(int(max(labels[k].max() for k in labels)) + 1)]


def medmnist_splits(path: Path, image_size: int) -> dict[str, Samples]:
    """The official splits of the MedMNIST file at `path`, resized to `image_size` pixels; returns {split: samples}."""
    arrays = _read_medmnist(path, labels_only=False)
    return {split: Samples(_resize_uint8(arrays[f"{split}_images"], image_size), arrays[f"{split}_labels"]) for split in SPLITS}


def _class_folders(root: Path, class_root: Path, masks: bool) -> dict[str, Path]:
    """{class name: folder} in label order: the subfolders of `class_root` or, with masks, `class_root` itself
    when it holds ``images/`` (one class, named after `root`)."""
    if masks and (class_root / "images").is_dir():
        return {root.resolve().name: class_root}
    return _folder_classes(class_root, masks)


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


GENERATED_KEYS = ("images", "labels", "soft_targets", "class_names", "image_size", "channels")  # of a generate.py dataset


def read_generated(path: Path, image_size: int, channels: int, class_names: list[str]) -> Samples:
    """The images (uint8 planes (N, S, S)) and labels (N,) of a dataset written by generate.py, which must have been
    generated for this data: its image side, channels and classes; ValueError naming the difference and the fix."""
    if not path.is_file():
        raise FileNotFoundError(f"--data.generated {str(path)!r} does not exist; write one with `python generate.py` (see its --help).")
    with np.load(path, allow_pickle=False) as data:
        missing = sorted(set(GENERATED_KEYS) - set(data.files))
        if missing:
            raise ValueError(f"{path} lacks {missing}: it was not written by generate.py; generate the dataset again.")
        record = {key: data[key] for key in GENERATED_KEYS}
    generated = dict(image_size=int(record["image_size"]), channels=int(record["channels"]), class_names=record["class_names"].tolist())
    expected = dict(image_size=image_size, channels=channels, class_names=list(class_names))
    differences = [f"{name}: {generated[name]!r} there, {value!r} here" for name, value in expected.items() if generated[name] != value]
    if differences:
        raise ValueError(f"{path} was generated for other data (" + "; ".join(differences) + "): generate it from a DDPM and a classifier "
                         "trained on this data, or set --data.* to the data it was generated for.")
    return Samples(record["images"], record["labels"].astype(np.int64), None)
