"""ChestXRayDataModule on each source: shapes, ranges, splits, determinism, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PNEUMONIA_FOLDER, PNEUMONIA_NPZ, requires_shared_data
from datamodules import Augmentation, ChestXRayDataModule
from datamodules.dataset import SPLITS
from datamodules.sampling import ClassBalancedSampler, interleaved_order


def _batch(datamodule: ChestXRayDataModule, split: str) -> dict[str, torch.Tensor]:
    datamodule.setup()
    return next(iter(getattr(datamodule, f"{split}_dataloader")()))


def _split_images(datamodule: ChestXRayDataModule) -> dict[str, torch.Tensor]:
    datamodule.setup()
    return {name: torch.from_numpy(dataset.images) for name, dataset in datamodule.datasets.items()}


def _assert_disjoint(splits: dict[str, torch.Tensor]) -> None:
    """No image appears in two splits (rows compared byte for byte)."""
    seen: dict[bytes, str] = {}
    for name, images in splits.items():
        for image in images:
            key = image.numpy().tobytes()
            assert seen.setdefault(key, name) == name, f"an image is in both {seen[key]} and {name}"


def _write_folder(root, counts: dict[str, int], size: int = 40, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / name / f"{i}.png")


def _write_npz(path, sizes=(30, 10, 12), image_shape=(28, 28), seed=0, drop: str | None = None) -> None:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    arrays.pop(drop, None)
    np.savez(path, **arrays)


def test_synthetic_batches_shapes_range_and_splits():
    datamodule = ChestXRayDataModule(image_size=48, synthetic_samples=200, batch_size=16, split=(0.6, 0.2, 0.2))
    assert datamodule.num_classes == 2 and datamodule.class_names == ["normal", "tuberculosis"]
    batch = _batch(datamodule, "val")
    assert batch["image"].shape == (16, 1, 48, 48) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= {0, 1}
    sizes = {name: len(dataset) for name, dataset in datamodule.datasets.items()}
    assert sizes == {"train": 120, "val": 40, "test": 40}
    for dataset in datamodule.datasets.values():  # stratified: both classes in every split, about half each
        assert 0.35 < dataset.labels.float().mean() < 0.65
    _assert_disjoint(_split_images(datamodule))


def test_synthetic_is_deterministic_by_seed():
    first = _split_images(ChestXRayDataModule(image_size=32, synthetic_samples=60, seed=3))
    again = _split_images(ChestXRayDataModule(image_size=32, synthetic_samples=60, seed=3))
    other = _split_images(ChestXRayDataModule(image_size=32, synthetic_samples=60, seed=4))
    assert all(torch.equal(first[split], again[split]) for split in first)
    assert not torch.equal(first["test"], other["test"])


def test_three_channels_replicate_grayscale():
    batch = _batch(ChestXRayDataModule(image_size=32, channels=3, synthetic_samples=60, batch_size=8), "test")
    assert batch["image"].shape == (8, 3, 32, 32)
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 2])


def test_augmentation_changes_training_images_only():
    datamodule = ChestXRayDataModule(image_size=32, synthetic_samples=60, augmentation=Augmentation(probability=1.0))
    datamodule.setup()
    train, test = datamodule.datasets["train"], datamodule.datasets["test"]
    stored = torch.from_numpy(train.images[0]).float() / 255
    assert not torch.allclose(train[0]["image"][0], stored)
    assert torch.equal(test[0]["image"][0], torch.from_numpy(test.images[0]).float() / 255)


def test_folder_source_stratified_split(tmp_path):
    _write_folder(tmp_path, {"Normal": 30, "Tuberculosis": 20}, size=40)
    datamodule = ChestXRayDataModule(source="folder", root=str(tmp_path), image_size=24, split=(0.6, 0.2, 0.2), batch_size=4)
    assert datamodule.class_names == ["Normal", "Tuberculosis"]
    batch = _batch(datamodule, "train")
    assert batch["image"].shape == (4, 1, 24, 24)
    counts = {name: torch.bincount(d.labels, minlength=2).tolist() for name, d in datamodule.datasets.items()}
    assert counts == {"train": [18, 12], "val": [6, 4], "test": [6, 4]}
    _assert_disjoint(_split_images(datamodule))
    again = ChestXRayDataModule(source="folder", root=str(tmp_path), image_size=24, split=(0.6, 0.2, 0.2))
    assert torch.equal(_split_images(again)["test"], _split_images(datamodule)["test"])


@pytest.mark.parametrize("counts", [(300, 100), (40, 160, 25)])
def test_every_prefix_of_the_interleaved_order_holds_each_class_in_proportion(counts):
    labels = np.repeat(np.arange(len(counts)), counts)  # sorted by class, as a folder source lists its files
    order = interleaved_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(len(labels)))
    shares = np.asarray(counts) / len(labels)
    prefix_counts = np.cumsum(np.eye(len(counts))[labels[order]], axis=0)  # (N, K): class counts of each prefix
    expected = np.arange(1, len(labels) + 1)[:, None] * shares
    assert np.abs(prefix_counts - expected).max() < 2
    assert not np.array_equal(order, interleaved_order(labels, seed=1))


def test_class_sorted_folder_is_stored_class_interleaved(tmp_path):
    _write_folder(tmp_path, {"Normal": 45, "Tuberculosis": 15}, size=16)
    datamodule = ChestXRayDataModule(source="folder", root=str(tmp_path), image_size=16, split=(0.0, 0.0, 1.0), batch_size=8)
    first_batch = _batch(datamodule, "test")["label"]
    assert torch.bincount(first_batch, minlength=2).tolist() in ([6, 2], [5, 3], [7, 1])  # 3:1, within an image


def test_folder_source_uses_explicit_split_folders(tmp_path):
    for split, count in (("train", 10), ("val", 3), ("test", 4)):
        _write_folder(tmp_path / split, {"NORMAL": count, "PNEUMONIA": count}, seed=count)
    datamodule = ChestXRayDataModule(source="folder", root=str(tmp_path), image_size=16)
    datamodule.setup()
    assert {name: len(d) for name, d in datamodule.datasets.items()} == {"train": 20, "val": 6, "test": 8}


def test_folder_without_val_carves_it_from_train(tmp_path):
    for split, count in (("train", 20), ("test", 4)):
        _write_folder(tmp_path / split, {"a": count, "b": count}, seed=count)
    datamodule = ChestXRayDataModule(source="folder", root=str(tmp_path), image_size=16, split=(0.75, 0.25, 0.0))
    datamodule.setup()
    assert {name: len(d) for name, d in datamodule.datasets.items()} == {"train": 30, "val": 10, "test": 8}


def test_medmnist_source_keeps_official_splits_and_resizes(tmp_path):
    _write_npz(tmp_path / "tiny.npz")
    datamodule = ChestXRayDataModule(source="medmnist", root=str(tmp_path / "tiny.npz"), image_size=32, batch_size=5)
    batch = _batch(datamodule, "test")
    assert batch["image"].shape == (5, 1, 32, 32) and batch["image"].max() <= 1.0
    assert {name: len(d) for name, d in datamodule.datasets.items()} == {"train": 30, "val": 10, "test": 12}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(source="folder", root="/does/not/exist"), FileNotFoundError, "/does/not/exist"),
        (dict(source="folder"), ValueError, "--data.root"),
        (dict(source="medmnist", root="/missing.npz"), FileNotFoundError, "/missing.npz"),
        (dict(channels=2), ValueError, "--data.channels"),
        (dict(split=(0.5, 0.5, 0.5)), ValueError, "--data.split"),
        (dict(source="mnist"), ValueError, "--data.source"),
    ],
)
def test_bad_options_name_the_problem(kwargs, error, message):
    with pytest.raises(error, match=message):
        ChestXRayDataModule(**kwargs)


def test_empty_class_folder_is_an_error(tmp_path):
    _write_folder(tmp_path, {"Normal": 3})
    (tmp_path / "Tuberculosis").mkdir()
    datamodule = ChestXRayDataModule(source="folder", root=str(tmp_path))
    with pytest.raises(ValueError, match="Tuberculosis holds no images"):
        datamodule.setup()


def test_single_class_folder_is_an_error(tmp_path):
    _write_folder(tmp_path, {"Normal": 3})
    with pytest.raises(ValueError, match="at least two"):
        ChestXRayDataModule(source="folder", root=str(tmp_path))


def test_corrupt_image_is_skipped_with_a_warning_that_names_it(tmp_path):
    _write_folder(tmp_path, {"Normal": 10, "Tuberculosis": 10})
    (tmp_path / "Normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    datamodule = ChestXRayDataModule(source="folder", root=str(tmp_path), image_size=16)
    with pytest.warns(UserWarning, match=r"Skipped 1 unreadable image\(s\) of 21 .*broken\.png"):
        datamodule.setup()
    assert sum(len(d) for d in datamodule.datasets.values()) == 20


def test_folder_of_only_corrupt_images_is_an_error(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="could be read"):
        ChestXRayDataModule(source="folder", root=str(tmp_path)).setup()


def test_npz_without_medmnist_keys_is_an_error(tmp_path):
    _write_npz(tmp_path / "partial.npz", drop="test_labels")
    with pytest.raises(KeyError, match="test_labels"):
        ChestXRayDataModule(source="medmnist", root=str(tmp_path / "partial.npz"))


def test_file_that_is_not_an_npz_is_an_error(tmp_path):
    (tmp_path / "fake.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable .npz"):
        ChestXRayDataModule(source="medmnist", root=str(tmp_path / "fake.npz"))


IMBALANCED = torch.tensor([0] * 90 + [1] * 10)


def _balanced_draws(labels: torch.Tensor, num_replicas: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0) -> torch.Tensor:
    sampler = ClassBalancedSampler(labels, num_replicas, rank, seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler))


def test_balanced_sampler_gives_every_class_an_equal_share():
    draws = _balanced_draws(IMBALANCED)
    assert len(draws) == 100
    assert torch.bincount(IMBALANCED[draws]).tolist() == [50, 50]


def test_balanced_sampler_draws_each_minority_image_equally_often_within_one():
    labels = (torch.arange(97) % 14 == 0).long()  # 7 minority images scattered among 90, 48 or 49 minority draws
    counts = torch.bincount(_balanced_draws(labels, seed=3), minlength=97)
    assert counts[labels == 1].max() - counts[labels == 1].min() == 1
    assert counts[labels == 0].max() == 1  # the majority class is drawn without repeats


def test_balanced_sampler_is_seeded_by_seed_and_epoch():
    first = _balanced_draws(IMBALANCED, seed=1, epoch=3)
    assert torch.equal(first, _balanced_draws(IMBALANCED, seed=1, epoch=3))
    assert not torch.equal(first, _balanced_draws(IMBALANCED, seed=1, epoch=4))
    assert not torch.equal(first, _balanced_draws(IMBALANCED, seed=2, epoch=3))
    uninterrupted = ClassBalancedSampler(IMBALANCED, 1, 0, seed=1)
    for epoch in range(4):  # a resumed run's fresh sampler draws epoch 3 as the sampler of a run that never stopped
        uninterrupted.set_epoch(epoch)
        last = torch.tensor(list(uninterrupted))
    assert torch.equal(last, first)


def test_two_ranks_together_draw_what_one_process_draws():
    single = _balanced_draws(IMBALANCED, seed=5, epoch=2)
    ranks = [_balanced_draws(IMBALANCED, 2, rank, seed=5, epoch=2) for rank in (0, 1)]
    assert [len(draws) for draws in ranks] == [50, 50]
    assert torch.equal(torch.bincount(torch.cat(ranks), minlength=100), torch.bincount(single, minlength=100))
    assert len(ClassBalancedSampler(torch.arange(101) % 2, 2, 1, seed=0)) == 51  # 101 rounded up to 102 draws


def _small_source(source: str, tmp_path) -> dict:
    """Constructor arguments for a small two-class dataset of `source`, images 16 pixels wide."""
    if source == "folder":
        _write_folder(tmp_path, {"Normal": 40, "Tuberculosis": 40}, size=16)
        return dict(source="folder", root=str(tmp_path), image_size=16, split=(0.5, 0.25, 0.25))
    if source == "medmnist":
        _write_npz(tmp_path / "tiny.npz", sizes=(60, 20, 20), image_shape=(16, 16))
        return dict(source="medmnist", root=str(tmp_path / "tiny.npz"), image_size=16)
    return dict(image_size=16, synthetic_samples=200, split=(0.6, 0.2, 0.2))


@pytest.mark.parametrize("source", ["synthetic", "folder", "medmnist"])
def test_class_ratio_keeps_ratio_images_per_image_of_the_other_class_in_every_split(source, tmp_path):
    kwargs = _small_source(source, tmp_path)
    full = ChestXRayDataModule(**kwargs)
    reduced = ChestXRayDataModule(**kwargs, class_ratio={full.class_names[1]: 0.25})
    for split in SPLITS:
        others = full.class_counts(split)[0].item()
        assert reduced.class_counts(split).tolist() == [others, round(0.25 * others)]
        kept = {image.tobytes() for image in reduced.datasets[split].images}
        assert kept <= {image.tobytes() for image in full.datasets[split].images}


def test_class_ratio_selection_is_seeded(tmp_path):
    kwargs = _small_source("medmnist", tmp_path)  # official splits: the seed changes only the selection and its order

    def splits(seed: int) -> dict[str, tuple[np.ndarray, torch.Tensor]]:
        datamodule = ChestXRayDataModule(**kwargs, seed=seed, class_ratio={"class_1": 0.25})
        datamodule.setup()
        return {name: (dataset.images, dataset.labels) for name, dataset in datamodule.datasets.items()}

    first, again, other = splits(0), splits(0), splits(1)
    for split in SPLITS:
        assert np.array_equal(first[split][0], again[split][0]) and torch.equal(first[split][1], again[split][1])
    assert sorted(image.tobytes() for image in first["train"][0]) != sorted(image.tobytes() for image in other["train"][0])


@pytest.mark.parametrize(
    "class_ratio, message",
    [
        ({"pneumonia": 0.5}, r"unknown class\(es\) \['pneumonia'\]; the classes are \['normal', 'tuberculosis'\]"),
        ({"tuberculosis": 0.0}, "tuberculosis: 0.0 must be positive"),
        ({"normal": 0.5, "tuberculosis": 0.5}, "names every class"),
    ],
)
def test_bad_class_ratio_is_an_error(class_ratio, message):
    with pytest.raises(ValueError, match=message):
        ChestXRayDataModule(class_ratio=class_ratio)


def test_impossible_class_ratio_names_the_largest_possible_one():
    datamodule = ChestXRayDataModule(**_small_source("synthetic", None), class_ratio={"tuberculosis": 1.5})
    message = r"tuberculosis: 1.5 needs 90 tuberculosis images in the train split, which has 60 .* largest possible ratio is 1\."
    with pytest.raises(ValueError, match=message):
        datamodule.setup()


def test_balanced_sampling_balances_the_training_batches():
    kwargs = dict(_small_source("synthetic", None), class_ratio={"tuberculosis": 0.25}, batch_size=15)
    assert ChestXRayDataModule(**kwargs).class_counts().tolist() == [60, 15]
    datamodule = ChestXRayDataModule(**kwargs, balanced_sampling=True)
    labels = torch.cat([batch["label"] for batch in datamodule.train_dataloader()])
    assert len(labels) == 75 and torch.bincount(labels).tolist() in ([38, 37], [37, 38])


@requires_shared_data
def test_shared_pneumonia_folder():
    datamodule = ChestXRayDataModule(source="folder", root=str(PNEUMONIA_FOLDER), image_size=64, batch_size=8)
    assert datamodule.class_names == ["NORMAL", "PNEUMONIA"]
    datamodule.setup()
    assert sum(len(d) for d in datamodule.datasets.values()) == 3065
    assert len(datamodule.datasets["test"]) == round(1571 * 0.15) + round(1494 * 0.15)
    batch = _batch(datamodule, "test")
    assert batch["image"].shape == (8, 1, 64, 64) and 0 <= batch["image"].min() and batch["image"].max() <= 1


@requires_shared_data
def test_shared_pneumoniamnist():
    datamodule = ChestXRayDataModule(source="medmnist", root=str(PNEUMONIA_NPZ), image_size=28)
    datamodule.setup()
    assert {name: len(d) for name, d in datamodule.datasets.items()} == {"train": 4708, "val": 524, "test": 624}
    assert torch.bincount(datamodule.datasets["test"].labels).tolist() == [234, 390]
