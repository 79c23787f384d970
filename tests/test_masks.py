"""Lung-field masks: exact synthetic masks, aligned batches on every source, joint augmentation, clear folder errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import Augmentation, ChestXRayDataModule, synthetic
from datamodules.dataset import SPLITS, GrayscaleImageDataset
from datamodules.synthetic import generate_phantoms

NO_AUGMENTATION = Augmentation(probability=0.0)


def test_mask_is_where_the_lungs_darken_the_image(monkeypatch):
    """Rendered again without lungs (same random draws), a normal phantom is darker by k * lung indicator (k per image,
    from the lungs' density); thresholding that darkening at k / 2 gives the mask, and fits it better than the mask
    moved by one pixel."""
    images, _, masks = generate_phantoms(16, 32, seed=2, positive_fraction=0.0, masks=True)
    draw_lungs = synthetic._lungs

    def no_lungs(gen, n, x, y):
        field, geometry = draw_lungs(gen, n, x, y)
        return torch.zeros_like(field), geometry

    monkeypatch.setattr(synthetic, "_lungs", no_lungs)
    without_lungs, _ = generate_phantoms(16, 32, seed=2, positive_fraction=0.0)
    darkening, lung = (without_lungs - images)[:, 0], masks[:, 0].bool()
    k = torch.stack([d[m].median() for d, m in zip(darkening, lung)])
    darkened = darkening > k[:, None, None] / 2

    def misfit(mask: torch.Tensor) -> float:
        return (darkened != mask).float().mean().item()

    assert misfit(lung) < 0.01
    for shift, dim in ((1, 1), (-1, 1), (1, 2), (-1, 2)):
        assert misfit(lung.roll(shift, dim)) > 3 * misfit(lung)


def test_masks_are_the_drawn_lung_indicator_above_one_half_in_every_chunk(monkeypatch):
    """The lung and heart indicators `_render` draws with, recorded per chunk (128 px: chunks of 16 images)."""
    recorded = {"_lungs": [], "_heart": []}

    def recording(draw, drawn):
        def wrapper(*args):
            drawn.append(draw(*args))
            return drawn[-1]

        return wrapper

    for name, drawn in recorded.items():
        monkeypatch.setattr(synthetic, name, recording(getattr(synthetic, name), drawn))
    _, _, masks = generate_phantoms(20, 128, seed=4, masks=True)
    lungs = torch.cat([field for field, _ in recorded["_lungs"]])
    heart = torch.cat(recorded["_heart"])
    assert len(recorded["_heart"]) == 2
    assert torch.equal(masks[:, 0], (lungs * (1 - heart) > 0.5).float())


def test_synthetic_masks_are_seeded_and_leave_the_images_unchanged():
    images, labels, masks = generate_phantoms(24, 32, seed=7, masks=True)
    assert masks.shape == (24, 1, 32, 32) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) == {0.0, 1.0} and 0.1 < masks.mean() < 0.3
    plain_images, plain_labels = generate_phantoms(24, 32, seed=7)
    assert torch.equal(images, plain_images) and torch.equal(labels, plain_labels)
    assert torch.equal(masks, generate_phantoms(24, 32, seed=7, masks=True)[2])
    assert not torch.equal(masks, generate_phantoms(24, 32, seed=8, masks=True)[2])


def test_synthetic_batches_carry_binary_masks():
    datamodule = ChestXRayDataModule(image_size=32, synthetic_samples=60, batch_size=8, channels=3, masks=True)
    for loader in (datamodule.train_dataloader(), datamodule.test_dataloader()):
        batch = next(iter(loader))
        assert batch["image"].shape == (8, 3, 32, 32) and batch["mask"].shape == (8, 1, 32, 32)
        assert batch["mask"].dtype == torch.float32 and set(batch["mask"].unique().tolist()) == {0.0, 1.0}
        assert batch["label"].shape == (8,) and batch["index"].shape == (8,)
    assert "mask" not in next(iter(ChestXRayDataModule(image_size=32, synthetic_samples=60).test_dataloader()))


def test_splits_class_ratio_and_balanced_sampling_keep_each_mask_with_its_image():
    images, _, masks = generate_phantoms(200, 16, seed=0, masks=True)
    pixels = images.squeeze(1).mul(255).round().to(torch.uint8).numpy()
    mask_of = {image.tobytes(): mask for image, mask in zip(pixels, masks.squeeze(1).to(torch.uint8).numpy())}
    kwargs = dict(image_size=16, synthetic_samples=200, split=(0.6, 0.2, 0.2), class_ratio={"tuberculosis": 0.5}, masks=True)
    datamodule = ChestXRayDataModule(**kwargs, balanced_sampling=True, batch_size=30, augmentation=NO_AUGMENTATION)
    datamodule.setup()
    for split in SPLITS:
        dataset = datamodule.datasets[split]
        assert all(np.array_equal(mask_of[image.tobytes()], mask) for image, mask in zip(dataset.images, dataset.masks))
    batch = next(iter(datamodule.train_dataloader()))
    stored = (batch["image"][:, 0] * 255).round().to(torch.uint8).numpy()
    batch_masks = batch["mask"][:, 0].to(torch.uint8).numpy()
    assert all(np.array_equal(mask_of[image.tobytes()], mask) for image, mask in zip(stored, batch_masks))


def _square(size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A (1, size, size) uint8 image, black but for a bright off-centre rectangle, and its (1, size, size) {0, 1} mask."""
    mask = np.zeros((1, size, size), np.uint8)
    mask[0, 10:26, 14:24] = 1
    return mask * 255, mask


def test_augmentation_moves_image_and_mask_together():
    image, mask = _square()
    strong = Augmentation(probability=1.0, rotate_degrees=45, translate=0.25, scale=0.2, horizontal_flip=True)
    dataset = GrayscaleImageDataset(image, np.zeros(1), 1, strong.build(), mask)
    torch.manual_seed(0)
    for _ in range(30):
        item = dataset[0]
        pixels, moved = item["image"][0], item["mask"][0]
        assert set(moved.unique().tolist()) == {0.0, 1.0}
        assert not torch.equal(moved, torch.from_numpy(mask[0]).float())
        # Bilinear image, nearest mask: a pixel over 3/4 bright has a bright nearest source pixel, one under 1/4 a dark one.
        level = (pixels - pixels.min()) / (pixels.max() - pixels.min())
        assert torch.all(moved[level > 0.75] == 1) and torch.all(moved[level < 0.25] == 0)


def _write_pairs(folder, count: int, size: int = 16, seed: int = 0, mask_suffix: str = ".png") -> None:
    """`count` random images in `folder/images/` with masks (image > 127, as 0/255) in `folder/masks/`."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    for i in range(count):
        image = rng.integers(0, 256, (size, size), dtype=np.uint8)
        Image.fromarray(image).save(folder / "images" / f"{seed}_{i}.png")
        Image.fromarray(np.where(image > 127, 255, 0).astype(np.uint8)).save(folder / "masks" / f"{seed}_{i}{mask_suffix}")


def _assert_pairs_aligned(datamodule: ChestXRayDataModule) -> None:
    """Every stored mask is its stored image thresholded (files at image_size: no resizing)."""
    datamodule.setup()
    for dataset in datamodule.datasets.values():
        assert np.array_equal(dataset.masks, (dataset.images > 127).astype(np.uint8))


def test_folder_of_class_folders_with_images_and_masks(tmp_path):
    _write_pairs(tmp_path / "Normal", 20, seed=1)
    _write_pairs(tmp_path / "Tuberculosis", 20, seed=2, mask_suffix=".bmp")
    kwargs = dict(source="folder", root=str(tmp_path), image_size=16, masks=True, split=(0.5, 0.25, 0.25))
    datamodule = ChestXRayDataModule(**kwargs, class_ratio={"Tuberculosis": 0.5})
    assert datamodule.class_names == ["Normal", "Tuberculosis"]
    _assert_pairs_aligned(datamodule)
    assert datamodule.class_counts("train").tolist() == [10, 5]
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["mask"].shape == (len(datamodule.datasets["val"]), 1, 16, 16)


def test_folder_holding_images_and_masks_is_one_class_named_after_it(tmp_path):
    root = tmp_path / "lungs"
    _write_pairs(root, 20)
    datamodule = ChestXRayDataModule(source="folder", root=str(root), image_size=16, masks=True)
    assert datamodule.class_names == ["lungs"]
    _assert_pairs_aligned(datamodule)
    assert sum(len(dataset) for dataset in datamodule.datasets.values()) == 20
    with pytest.raises(ValueError, match="set --data.masks true"):
        ChestXRayDataModule(source="folder", root=str(root))


def test_split_folders_with_images_and_masks(tmp_path):
    for split, count in (("train", 12), ("test", 4)):
        for index, name in enumerate(("NORMAL", "PNEUMONIA")):
            _write_pairs(tmp_path / split / name, count, seed=10 * count + index)
    datamodule = ChestXRayDataModule(source="folder", root=str(tmp_path), image_size=16, masks=True, split=(0.75, 0.25, 0.0))
    _assert_pairs_aligned(datamodule)
    assert {name: len(dataset) for name, dataset in datamodule.datasets.items()} == {"train": 18, "val": 6, "test": 8}


def test_folder_masks_are_resized_nearest_and_stay_aligned(tmp_path):
    image, mask = _square(40)
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    for i in range(4):
        Image.fromarray(np.roll(image[0], 3 * i, axis=1)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(np.roll(mask[0], 3 * i, axis=1)).save(tmp_path / "masks" / f"{i}.png")  # 0/1 values
    datamodule = ChestXRayDataModule(source="folder", root=str(tmp_path), image_size=24, masks=True, split=(0.0, 0.0, 1.0))
    datamodule.setup()
    dataset = datamodule.datasets["test"]
    assert set(np.unique(dataset.masks).tolist()) == {0, 1}
    assert np.all(dataset.masks[dataset.images > 191] == 1) and np.all(dataset.masks[dataset.images < 64] == 0)


def test_one_bit_masks_are_read(tmp_path):
    _write_pairs(tmp_path, 3)
    for path in (tmp_path / "masks").iterdir():
        Image.open(path).convert("1").save(path)
    datamodule = ChestXRayDataModule(source="folder", root=str(tmp_path), image_size=16, masks=True, split=(0.0, 0.0, 1.0))
    _assert_pairs_aligned(datamodule)


def _break_mask_of(tmp_path, how: str) -> str:
    """Spoils the pairs under tmp_path/x (made by _write_pairs) one way; returns the file the error must name."""
    images, masks = tmp_path / "x" / "images", tmp_path / "x" / "masks"
    if how == "missing mask":
        (masks / "0_1.png").unlink()
        return str(images / "0_1.png")
    if how == "orphan mask":
        (images / "0_2.png").unlink()
        return str(masks / "0_2.png")
    if how == "non-binary mask":
        Image.fromarray(np.full((16, 16), 128, np.uint8)).save(masks / "0_3.png")
        return str(masks / "0_3.png")
    if how == "RGB mask":
        Image.new("RGB", (16, 16), (255, 0, 0)).save(masks / "0_3.png")
        return str(masks / "0_3.png")
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(masks / "0_4.png")  # a mask of another size
    return str(masks / "0_4.png")


@pytest.mark.parametrize(
    "how, error, message",
    [
        ("missing mask", FileNotFoundError, "has no mask: add"),
        ("orphan mask", FileNotFoundError, "has no image of stem '0_2'"),
        ("non-binary mask", ValueError, r"is not binary: it holds the values \[128\]"),
        ("RGB mask", ValueError, r"is not binary: it holds the values \[0, 255\] \(uint8, shape \(16, 16, 3\)\)"),
        ("size mismatch", ValueError, r"is 20x16 pixels but its image .* is 16x16"),
    ],
)
def test_bad_mask_folder_is_an_error_that_names_the_file(tmp_path, how, error, message):
    _write_pairs(tmp_path / "x", 6)
    _write_pairs(tmp_path / "y", 6, seed=1)
    named = _break_mask_of(tmp_path, how)
    datamodule = ChestXRayDataModule(source="folder", root=str(tmp_path), image_size=16, masks=True)
    with pytest.raises(error, match=message) as raised:
        datamodule.setup()
    assert named in str(raised.value)


def test_unreadable_mask_skips_its_pair_with_a_warning_that_names_it(tmp_path):
    _write_pairs(tmp_path, 8)
    (tmp_path / "masks" / "0_5.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    datamodule = ChestXRayDataModule(source="folder", root=str(tmp_path), image_size=16, masks=True, split=(0.0, 0.0, 1.0))
    with pytest.warns(UserWarning, match=r"Skipped 1 unreadable image\(s\) of 8 .*0_5\.png"):
        _assert_pairs_aligned(datamodule)
    assert len(datamodule.datasets["test"]) == 7


def test_class_folder_without_masks_folder_is_an_error(tmp_path):
    _write_pairs(tmp_path / "a", 3)
    (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "b" / "0.png")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'b' / 'images'} does not exist"):
        ChestXRayDataModule(source="folder", root=str(tmp_path), masks=True).setup()


def test_medmnist_has_no_masks(tmp_path):
    with pytest.raises(ValueError, match="MedMNIST files hold no lung-field masks"):
        ChestXRayDataModule(source="medmnist", root=str(tmp_path / "any.npz"), masks=True)
