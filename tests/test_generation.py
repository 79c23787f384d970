"""Generated training data: DDIM samples from a DDPM export keyed by image index (a resumed generation gives the same
images), labels from a classifier, a dataset the DataModule mixes into training at a ratio that keeps the class
shares, a quality probe, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

import generate
from conftest import TINY_UNET
from datamodules import ChestXRayDataModule
from datamodules.sampling import GeneratedMixSampler
from robust_cxr.generation import write_generated
from robust_cxr.purification import Purifier, write_trained_timesteps


def _export(directory, trained_to: int | None = 99, size: int = 32):
    torch.manual_seed(0)
    Purifier(UNet2DModel(sample_size=size, in_channels=1, out_channels=1, **TINY_UNET), DDPMScheduler(num_train_timesteps=100), t_star=50).save_pretrained(directory)
    if trained_to is not None:
        write_trained_timesteps(directory, trained_to)
    return directory


@pytest.fixture(scope="module")
def generated(tiny_stage_checkpoints, tmp_path_factory):
    """48 images generated in batches of 16 by an untrained tiny DDPM (every timestep recorded as trained), labelled by
    the tiny teacher, with a 1-epoch quality probe: (the quality record, the output path, the export)."""
    directory = tmp_path_factory.mktemp("generated")
    export = _export(directory / "export")
    output = directory / "generated.npz"
    quality = generate.main([str(tiny_stage_checkpoints["teacher"]), "--purifier_dir", str(export), "--count", "48", "--steps", "4",
                             "--batch_size", "16", "--output", str(output), "--probe_epochs", "1"])
    return quality, output, export


def test_a_generated_dataset_holds_labelled_images_of_the_data_and_its_quality(generated):
    quality, output, _ = generated
    with np.load(output) as data:
        assert data["images"].shape == (48, 32, 32) and data["images"].dtype == np.uint8 and data["images"].std() > 0
        assert data["soft_targets"].shape == (48, 2) and np.allclose(data["soft_targets"].sum(axis=1), 1, atol=1e-5)
        assert (data["labels"] == data["soft_targets"].argmax(axis=1)).all() and list(data["class_names"]) == ["normal", "tuberculosis"]
    assert quality["kept"]["normal"] + quality["kept"]["tuberculosis"] == 48 and quality["kept"]["dropped"] == 0
    assert 0 <= quality["probe"]["balanced_accuracy"] <= 1 and quality["probe"]["test_images"] == 36 and quality["seconds_per_image"] > 0
    assert (output.parent / "generated_quality.json").is_file()


def test_a_resumed_generation_gives_the_images_of_an_uninterrupted_one(generated, tiny_stage_checkpoints, tmp_path):
    _, output, export = generated
    resumed = tmp_path / "resumed.npz"
    arguments = [str(tiny_stage_checkpoints["teacher"]), "--purifier_dir", str(export), "--count", "48", "--steps", "4", "--output", str(resumed)]
    parts = resumed.with_name(resumed.name + ".parts")
    generate.main([*arguments, "--batch_size", "16"])
    (parts / "part1.pt").unlink()  # as if killed after the first and the last batch
    (parts / "part2.pt").unlink()
    generate.main([*arguments, "--batch_size", "16"])
    with np.load(output) as first, np.load(resumed) as second:
        assert np.array_equal(first["images"], second["images"]) and np.array_equal(first["soft_targets"], second["soft_targets"])
    with pytest.raises(ValueError, match="batch_size: 16 there, 8 now"):
        generate.main([*arguments, "--batch_size", "8"])


def test_training_mixes_generated_images_in_at_the_ratio_in_the_real_class_shares(tmp_path):
    output = tmp_path / "generated.npz"
    targets = torch.tensor([[0.9, 0.1]] * 40 + [[0.2, 0.8]] * 8)  # mostly the first class: the mix must not follow that
    write_generated(output, torch.rand(48, 1, 32, 32), targets, ["normal", "tuberculosis"], min_confidence=0.0)
    data = ChestXRayDataModule(image_size=32, synthetic_samples=240, batch_size=10, generated=str(output), generated_ratio=0.7)
    data.setup("fit")
    real = data.real_training_images
    labels = data.datasets["train"].labels
    assert len(labels) == real + 48
    order = list(iter(data.train_dataloader().sampler))
    is_generated = torch.tensor(order) >= real
    assert len(order) == real + round(real * 0.7 / 0.3)
    batches = is_generated[: len(order) // 10 * 10].view(-1, 10).sum(dim=1)
    assert batches.min() >= 6 and batches.max() <= 8  # 7 of every 10, within one
    real_share = (labels[:real] == 1).float().mean()
    generated_share = (labels[torch.tensor(order)][is_generated] == 1).float().mean()
    assert abs(generated_share - real_share) < 0.02  # the generated draws keep the real class shares
    assert sorted(i for i in order if i < real) == list(range(real))  # every real image once


def test_the_mix_sampler_shards_one_sequence_over_ranks():
    labels = torch.tensor([0, 1] * 20 + [0] * 5 + [1] * 15)
    whole = list(iter(GeneratedMixSampler(labels, 40, 0.5, balanced=True, num_replicas=1, rank=0, seed=3)))
    shards = [list(iter(GeneratedMixSampler(labels, 40, 0.5, balanced=True, num_replicas=2, rank=rank, seed=3))) for rank in (0, 1)]
    assert whole[0::2] == shards[0] and whole[1::2] == shards[1]
    only_generated = list(iter(GeneratedMixSampler(labels, 40, 1.0, balanced=False, num_replicas=1, rank=0, seed=3)))
    assert min(only_generated) >= 40 and len(only_generated) == 20


def test_bad_generated_data_and_exports_are_errors_that_say_what_to_do(generated, tiny_stage_checkpoints, tmp_path):
    _, output, _ = generated
    with pytest.raises(ValueError, match="generated_ratio must lie in"):
        ChestXRayDataModule(generated=str(output), generated_ratio=1.5)
    for overrides, difference in ((dict(image_size=64), "image_size: 32 there, 64 here"), (dict(channels=3), "channels: 1 there, 3 here"),
                                  (dict(class_names=["a", "b"]), "class_names")):
        data = ChestXRayDataModule(**{**dict(image_size=32, synthetic_samples=240, generated=str(output)), **overrides})
        with pytest.raises(ValueError, match=difference):
            data.setup("fit")
    one_class = tmp_path / "one_class.npz"
    write_generated(one_class, torch.rand(4, 1, 32, 32), torch.tensor([[0.9, 0.1]] * 4), ["normal", "tuberculosis"], min_confidence=0.0)
    with pytest.raises(ValueError, match=r"no image of class \['tuberculosis'\]"):
        ChestXRayDataModule(image_size=32, synthetic_samples=240, generated=str(one_class)).setup("fit")
    with pytest.raises(FileNotFoundError, match="generate.py"):
        ChestXRayDataModule(image_size=32, synthetic_samples=240, generated=str(tmp_path / "none.npz")).setup("fit")
    teacher = str(tiny_stage_checkpoints["teacher"])
    with pytest.raises(ValueError, match="trained on timesteps up to 20.*max_train_timestep null"):
        generate.main([teacher, "--purifier_dir", str(_export(tmp_path / "partial", trained_to=20)), "--count", "4", "--output", str(tmp_path / "x.npz")])
    with pytest.raises(FileNotFoundError, match="holds no exported purifier"):
        generate.main([teacher, "--purifier_dir", str(tmp_path / "nowhere"), "--count", "4", "--output", str(tmp_path / "y.npz")])
    with pytest.raises(ValueError, match="makes 1-channel 16 px images"):
        generate.main([teacher, "--purifier_dir", str(_export(tmp_path / "small", size=16)), "--count", "4", "--output", str(tmp_path / "z.npz")])
