"""The restoration task end to end: degraded batches (seeded per sample, every source, aligned with the augmentation),
clear errors for bad settings, PSNR / SSIM against torchmetrics with exact sums, Restorer training, attacks that raise the
restoration error, the robustness report and its grid, and train.py on configs/restore.yaml."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from callbacks import AdversarialExampleCallback
from conftest import CONFIGS, run_train, shrink_config
from datamodules import Augmentation, ChestXRayDataModule, Degradation
from datamodules.dataset import degradation_rng
from lightning_modules import Restorer
from lightning_modules.stage import load_stage_module
from robust_cxr.attacks import AttackSpec, craft_adversarial
from robust_cxr.cli_errors import user_message
from robust_cxr.metrics import PSNR_CEILING, psnr_and_ssim
from robust_cxr.tasks import RestorationTask, per_image_mse
from test_datamodule import _small_source

IMAGE_SIZE = 32
SAMPLES = 400  # 280 / 60 / 60 phantoms in the train / val / test splits
TEST_IMAGES = 60
DATA_SAMPLES = 100  # for the data tests: 70 / 15 / 15
DEGRADATION = Degradation(blur_sigma=1.0, photons=100.0, read_noise=0.01)
TINY_RESTORER = dict(encoder_depth=2, decoder_channels=[16, 8], feature_channels=8, head_channels=16)
EPS = 4 / 255


def _datamodule(**overrides) -> ChestXRayDataModule:
    settings = dict(image_size=IMAGE_SIZE, synthetic_samples=SAMPLES, batch_size=16, num_workers=0, seed=0, degradation=DEGRADATION)
    return ChestXRayDataModule(**{**settings, **overrides})


def _restorer(**overrides) -> Restorer:
    return Restorer(**{"image_size": IMAGE_SIZE, **TINY_RESTORER, **overrides})


def _trainer(directory: Path, callbacks=(), **overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(directory))
    return L.Trainer(callbacks=list(callbacks), **{**settings, **overrides})


def _items(datamodule: ChestXRayDataModule, split: str, indices) -> list[dict[str, torch.Tensor]]:
    datamodule.setup()
    return [datamodule.datasets[split][i] for i in indices]


# ---------------------------------------------------------------------------------------------------------- data
def test_degradation_is_a_function_of_data_seed_split_and_index():
    first, second = _datamodule(synthetic_samples=DATA_SAMPLES), _datamodule(synthetic_samples=DATA_SAMPLES)
    for split in ("val", "test"):
        items = _items(first, split, range(6))
        again = _items(first, split, range(6))  # a second access (a second epoch)
        other_module = _items(second, split, range(6))
        for item, repeated, other in zip(items, again, other_module):
            assert torch.equal(item["image"], repeated["image"]) and torch.equal(item["image"], other["image"])
            assert torch.equal(item["clean"], other["clean"])
        for index, item in enumerate(items):  # drawn from the stream of (data seed, split, index)
            expected = DEGRADATION.apply(item["clean"][0].numpy(), degradation_rng(0, split, index))
            assert torch.equal(item["image"][0], torch.from_numpy(expected))
    # The stream depends on the seed, the split and the index, each: the same clean image degrades differently.
    clean = items[0]["clean"][0].numpy()
    keys = [(0, "val", 3), (1, "val", 3), (0, "test", 3), (0, "val", 4)]
    degraded = {key: DEGRADATION.apply(clean, degradation_rng(*key)) for key in keys}
    assert all(not np.array_equal(degraded[a], degraded[b]) for a in keys for b in keys if a != b)
    np.testing.assert_array_equal(DEGRADATION.apply(clean, degradation_rng(0, "val", 3)), degraded[(0, "val", 3)])
    # The clean target is the image the DataModule serves without a degradation.
    plain = _items(_datamodule(synthetic_samples=DATA_SAMPLES, degradation=None), "val", range(6))
    assert all(torch.equal(item["clean"], clean["image"]) and "clean" not in clean for item, clean in zip(_items(first, "val", range(6)), plain))


def _blurred(clean: torch.Tensor, sigma: float) -> torch.Tensor:
    plane = cv2.GaussianBlur(clean[0].numpy(), (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    return torch.from_numpy(plane).expand_as(clean)


def test_training_draws_fresh_noise_that_follows_torch_seed():
    datamodule = _datamodule(synthetic_samples=DATA_SAMPLES, augmentation=Augmentation(probability=0.0))
    torch.manual_seed(3)
    first = _items(datamodule, "train", [5, 5])
    torch.manual_seed(3)
    replay = _items(datamodule, "train", [5, 5])
    assert torch.equal(first[0]["clean"], first[1]["clean"]) and not torch.equal(first[0]["image"], first[1]["image"])
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, replay))


def test_noise_follows_the_poisson_dose_and_the_read_noise():
    """Degraded minus blurred clean: mean 0, variance blurred / photons + read_noise**2 (pixels away from the clip)."""
    degradation = Degradation(blur_sigma=1.5, photons=50.0, read_noise=0.02)
    clean = torch.linspace(0.3, 0.7, 64 * 64).view(64, 64).numpy().astype(np.float32)
    blurred = cv2.GaussianBlur(clean, (0, 0), 1.5, borderType=cv2.BORDER_REFLECT_101)
    noise = np.stack([degradation.apply(clean, degradation_rng(0, "test", i)) - blurred for i in range(20)])
    expected_variance = blurred / 50.0 + 0.02**2
    assert abs(noise.mean()) < 0.002
    assert (noise**2 / expected_variance).mean() == pytest.approx(1.0, abs=0.03)
    blur_only = Degradation(blur_sigma=1.5, photons=None, read_noise=0.0).apply(clean, degradation_rng(0, "test", 0))
    np.testing.assert_array_equal(blur_only, blurred.clip(0, 1))


def test_augmentation_moves_the_clean_image_before_the_degradation():
    blur_only = Degradation(blur_sigma=1.2, photons=None, read_noise=0.0)
    augmented = Augmentation(probability=1.0, brightness_contrast=0.3)
    datamodule = _datamodule(synthetic_samples=DATA_SAMPLES, degradation=blur_only, augmentation=augmented)
    plain = _datamodule(synthetic_samples=DATA_SAMPLES, degradation=None, augmentation=Augmentation(probability=0.0))
    for item, unaugmented in zip(_items(datamodule, "train", range(4)), _items(plain, "train", range(4))):
        assert not torch.equal(item["clean"], unaugmented["image"])  # augmented
        torch.testing.assert_close(item["image"], _blurred(item["clean"], 1.2).clamp(0, 1), atol=0, rtol=0)


@pytest.mark.parametrize("source", ["synthetic", "folder", "medmnist"])
def test_every_source_serves_degraded_images_and_clean_targets(source, tmp_path):
    kwargs = {**_small_source(source, tmp_path), "batch_size": 8, "channels": 3}
    datamodule = ChestXRayDataModule(**kwargs, degradation=DEGRADATION)
    plain = ChestXRayDataModule(**kwargs)
    for split in ("train", "test"):
        loader = datamodule.train_dataloader() if split == "train" else datamodule.test_dataloader()
        batch = next(iter(loader))
        assert batch["image"].shape == batch["clean"].shape == (8, 3, 16, 16)
        for key in ("image", "clean"):
            assert batch[key].dtype == torch.float32 and 0 <= batch[key].min() and batch[key].max() <= 1
            assert torch.equal(batch[key][:, 0], batch[key][:, 2])  # one plane, replicated
        error = (batch["image"] - batch["clean"]).square().flatten(1).mean(dim=1)
        assert torch.all(error > 1e-4)
    test_batch, plain_batch = next(iter(datamodule.test_dataloader())), next(iter(plain.test_dataloader()))
    assert torch.equal(test_batch["clean"], plain_batch["image"]) and torch.equal(test_batch["label"], plain_batch["label"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(blur_sigma=-1.0), r"blur_sigma must be a finite number >= 0 .*got -1\.0"),
        (dict(blur_sigma=math.nan), r"blur_sigma must be a finite number >= 0"),
        (dict(photons=0.0), r"photons must be a finite number > 0 .*or null for no Poisson noise, got 0\.0"),
        (dict(photons=-5.0), r"photons must be a finite number > 0"),
        (dict(read_noise=-0.1), r"read_noise must be a finite number >= 0 .*got -0\.1"),
        (dict(blur_sigma=0.0, photons=None, read_noise=0.0), r"--data\.degradation changes nothing .*set at least one"),
    ],
)
def test_bad_degradation_settings_fail_naming_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        Degradation(**settings)


def test_bad_degradation_on_the_command_line_names_the_field(tmp_path):
    config = shrink_config(CONFIGS / "restore.yaml", tmp_path)
    with pytest.raises(Exception) as raised:
        run_train(config, tmp_path / "run", "--data.degradation.photons", "0")
    assert "--data.degradation.photons must be a finite number > 0" in user_message(raised.value)
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


# ------------------------------------------------------------------------------------------------------- metrics
def test_psnr_and_ssim_rows_equal_torchmetrics_and_sum_exactly_in_any_order():
    generator = torch.Generator().manual_seed(0)
    targets = torch.rand(10, 1, 24, 24, generator=generator)
    noise_levels = torch.linspace(0.01, 0.3, 10).view(-1, 1, 1, 1)
    clean_outputs = (targets + noise_levels * torch.randn(targets.shape, generator=generator)).clamp(0, 1)
    adversarial_outputs = (clean_outputs + 0.1 * torch.randn(targets.shape, generator=generator)).clamp(0, 1)
    perturbation = torch.full((10,), EPS)

    psnr, ssim = psnr_and_ssim(clean_outputs, targets)
    expected_psnr = peak_signal_noise_ratio(clean_outputs, targets, data_range=1.0, reduction="none", dim=(1, 2, 3))
    expected_ssim = structural_similarity_index_measure(clean_outputs, targets, data_range=1.0, reduction="none")
    torch.testing.assert_close(psnr, expected_psnr.double())
    torch.testing.assert_close(ssim, expected_ssim.double())
    assert psnr_and_ssim(targets, targets)[0].tolist() == [PSNR_CEILING] * 10  # identical images: capped, not infinite

    task = RestorationTask()
    counter = task.robustness_counter()
    counter.update(targets, clean_outputs, adversarial_outputs, perturbation)
    result = counter.compute()
    rows = task.report_rows(result, attacked=True)
    assert [(row["metric"], row["n"]) for row in rows] == [("psnr", 10), ("ssim", 10)]
    attacked_psnr = peak_signal_noise_ratio(adversarial_outputs, targets, data_range=1.0, dim=(1, 2, 3))  # mean over images
    attacked_ssim = structural_similarity_index_measure(adversarial_outputs, targets, data_range=1.0)
    assert rows[0]["value"] == pytest.approx(attacked_psnr.item(), abs=1e-5)
    assert rows[0]["clean_value"] == pytest.approx(expected_psnr.mean().item(), abs=1e-5)
    assert rows[1]["value"] == pytest.approx(attacked_ssim.item(), abs=1e-6)
    assert rows[1]["clean_value"] == pytest.approx(expected_ssim.mean().item(), abs=1e-6)
    assert rows[0]["perturbation"] == pytest.approx(EPS) and rows[0]["value"] < rows[0]["clean_value"]
    assert task.report_rows(result, attacked=False)[0]["perturbation"] is None
    assert set(task.logged(result)) == {"robust_psnr", "robust_ssim", "perturbation"}

    # Split into shards and updated in another order (as DDP ranks would), the sums are the same to the last bit.
    shuffled = task.robustness_counter()
    for part in (torch.arange(7, 10), torch.arange(0, 3), torch.arange(3, 7)):
        shuffled.update(targets[part], clean_outputs[part], adversarial_outputs[part], perturbation[part])
    for name in ("clean_psnr", "clean_ssim", "psnr", "ssim", "total"):
        assert torch.equal(shuffled.compute()[name], result[name]), name


# ------------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def restorer_run(tmp_path_factory, single_thread) -> SimpleNamespace:
    """A tiny restorer trained 4 epochs on 280 degraded phantoms at 32 px (seconds), its checkpoint, and its
    validation and test metrics."""
    directory = tmp_path_factory.mktemp("restorer")
    L.seed_everything(0, verbose=False)
    data = _datamodule()
    model = _restorer()
    trainer = _trainer(directory, max_epochs=4, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    checkpoint = directory / "restorer.ckpt"
    trainer.save_checkpoint(checkpoint)
    validated = trainer.validate(model, datamodule=data, verbose=False)[0]
    tested = trainer.test(model, datamodule=data, verbose=False)[0]
    return SimpleNamespace(directory=directory, checkpoint=checkpoint, data=data, validated=validated, tested=tested)


def _trained(restorer_run) -> Restorer:
    module = load_stage_module(restorer_run.checkpoint, "the restorer_run fixture")
    assert isinstance(module, Restorer)
    return module


def _test_batch(restorer_run, count: int = 16) -> dict[str, torch.Tensor]:
    batch = next(iter(restorer_run.data.test_dataloader()))
    return {key: value[:count] for key, value in batch.items()}


def test_an_untrained_restorer_is_the_identity():
    images = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(_restorer()(images), images)


def test_a_short_fit_beats_the_degraded_input(restorer_run):
    validated, tested = restorer_run.validated, restorer_run.tested
    assert validated["val/psnr"] > validated["val/psnr_degraded"] + 3.0  # dB
    assert tested["test/psnr"] > tested["test/psnr_degraded"] + 3.0
    assert tested["test/ssim"] > tested["test/ssim_degraded"] + 0.1
    module = _trained(restorer_run)
    batch = _test_batch(restorer_run)
    with torch.no_grad():
        restored = module(batch["image"])
    assert restored.shape == batch["clean"].shape == (16, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert 0 <= restored.min() and restored.max() <= 1
    restored_psnr, degraded_psnr = psnr_and_ssim(restored, batch["clean"])[0], psnr_and_ssim(batch["image"], batch["clean"])[0]
    assert (restored_psnr > degraded_psnr).all()  # the reloaded checkpoint is the trained model, better on every image


# -------------------------------------------------------------------------------------------------------- attacks
@pytest.mark.parametrize(
    "spec",
    [AttackSpec(method="pgd", eps=EPS, steps=5), AttackSpec(method="fgsm", eps=EPS), AttackSpec(method="bim", eps=EPS, steps=5),
     AttackSpec(method="mifgsm", eps=EPS, steps=5), AttackSpec(method="pgd_l2", eps=0.5, steps=5)],
    ids=lambda spec: spec.label,
)
def test_attacks_raise_the_restoration_error_within_eps(restorer_run, spec):
    module = _trained(restorer_run)
    batch = _test_batch(restorer_run)
    images, clean = batch["image"], batch["clean"]
    task = module.task
    targets, loss_fn = task.attack_objective(spec, task.targets(batch))
    assert torch.equal(targets, clean)
    adversarial = craft_adversarial(spec, module.model, images, targets, loss_fn=loss_fn, keys=batch["index"], seed=0)
    delta = (adversarial - images).flatten(1)
    size = delta.abs().amax(dim=1) if spec.norm == "linf" else delta.norm(dim=1)
    assert torch.all(size <= spec.eps + 1e-5) and adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        clean_error, adversarial_error = per_image_mse(module(images), clean), per_image_mse(module(adversarial), clean)
        # What the attack ascends: the per-image MSE.
        torch.testing.assert_close(task.attack_loss(module(images), clean), clean_error)
    assert torch.all(adversarial_error > clean_error)
    clean_psnr, adversarial_psnr = psnr_and_ssim(module(images), clean)[0], psnr_and_ssim(module(adversarial), clean)[0]
    assert adversarial_psnr.mean() < clean_psnr.mean() - 0.5


@pytest.mark.parametrize("method", ["cw_l2", "apgd_ce", "autoattack"])
def test_classification_only_attacks_on_a_restorer_fail_naming_the_supported_methods(method):
    with pytest.raises(ValueError, match=rf"{method} does not apply to restoration; use one of \['fgsm', 'pgd', 'bim', 'mifgsm', 'pgd_l2'\]"):
        RestorationTask().check_attack(AttackSpec(method=method, eps=EPS, steps=2))
    with pytest.raises(ValueError, match=r"target 'empty' is not a restoration goal; set target to null"):
        RestorationTask().check_attack(AttackSpec(method="pgd", eps=EPS, steps=2, target="empty"))


@pytest.mark.parametrize("stage", ["fit", "test"])
def test_a_restorer_without_degradation_asks_for_it(tmp_path, stage):
    trainer = _trainer(tmp_path, max_epochs=1)
    run = trainer.fit if stage == "fit" else trainer.test
    with pytest.raises(ValueError, match=r"Restorer learns to undo a degradation of the images: set --data\.degradation"):
        run(_restorer(), datamodule=_datamodule(synthetic_samples=60, degradation=None))


# --------------------------------------------------------------------------------------------------------- report
REPORT_ATTACKS = [AttackSpec(method="pgd", eps=EPS, steps=3), AttackSpec(method="fgsm", eps=EPS)]


def _rows(directory: Path) -> list[dict]:
    return json.loads((directory / "robustness_report.json").read_text())


def test_robustness_report_of_a_restorer(restorer_run, tmp_path):
    trainer = _trainer(tmp_path, [AdversarialExampleCallback(attacks=REPORT_ATTACKS)])
    metrics = trainer.test(_trained(restorer_run), datamodule=restorer_run.data, verbose=False)[0]
    rows = _rows(tmp_path)
    assert [(row["attack"], row["metric"]) for row in rows] == [
        (attack, metric) for attack in ("none", "pgd3", "fgsm") for metric in ("psnr", "ssim")
    ]
    by_key = {(row["attack"], row["metric"]): row for row in rows}
    for row in rows:
        assert row["n"] == TEST_IMAGES and (row["model"], row["defense"]) == ("restorer", "none")
        assert row["clean_value"] == by_key[("none", row["metric"])]["value"]
    assert by_key[("none", "psnr")]["perturbation"] is None
    for attack in ("pgd3", "fgsm"):
        psnr, ssim = by_key[(attack, "psnr")], by_key[(attack, "ssim")]
        assert psnr["value"] < psnr["clean_value"] - 0.5 and ssim["value"] < ssim["clean_value"]
        assert (psnr["threat_model"], psnr["norm"], psnr["eps"]) == ("whitebox", "linf", EPS)
        assert 0 < psnr["perturbation"] <= EPS + 1e-6
    # The callback's PSNR / SSIM and Restorer's torchmetrics modules agree on the same test images.
    assert metrics["test/psnr"] == pytest.approx(by_key[("none", "psnr")]["value"], abs=1e-4)
    assert metrics["test/ssim"] == pytest.approx(by_key[("none", "ssim")]["value"], abs=1e-5)
    assert metrics["test/robust_psnr/pgd3"] == pytest.approx(by_key[("pgd3", "psnr")]["value"], abs=1e-6)
    assert metrics["test/robust_ssim/fgsm"] == pytest.approx(by_key[("fgsm", "ssim")]["value"], abs=1e-6)
    assert "| restorer | none |" in (tmp_path / "robustness_report.md").read_text()

    with Image.open(tmp_path / "adversarial_examples.png") as grid:
        # degraded | adversarial | restored | restored adv. | clean target | perturbation | text, 8 rows
        assert grid.size[0] == 6 * 128 + 2 * 128 and 8 * 128 < grid.size[1] < 9 * 128  # 6 tiles and the text; 8 rows under the titles
        pixels = np.asarray(grid.convert("L")).astype(float)
    tiles = [pixels[128 // 4 :, column * 128 : (column + 1) * 128] for column in range(5)]
    degraded, adversarial, restored, restored_adversarial, target = tiles
    assert np.abs(restored - target).mean() < np.abs(degraded - target).mean()  # restored clean is closer to the target
    assert np.abs(restored_adversarial - target).mean() > np.abs(restored - target).mean()
    assert 0 < np.abs(adversarial - degraded).mean() < 255 * 2 * EPS


# --------------------------------------------------------------------------------------------------------- train.py
def test_train_py_on_the_restore_config(tmp_path, single_thread):
    # The U-Net is shrunk by CLI overrides; max_steps=2 caps the attacks (pgd10 -> pgd2, named ones keep their names).
    config = shrink_config(CONFIGS / "restore.yaml", tmp_path, synthetic_samples=160)
    run_dir = tmp_path / "run"
    metrics = run_train(config, run_dir, "--trainer.max_epochs", "1", "--model.init_args.encoder_depth", "2",
                        "--model.init_args.decoder_channels", "[16,8]", "--model.init_args.feature_channels", "8")
    assert {"test/psnr", "test/ssim", "test/psnr_degraded", "test/robust_psnr/pgd2", "test/robust_ssim/bim2",
            "test/robust_psnr/fgsm", "test/robust_psnr/pgd10_eps1", "test/robust_psnr/pgd10_eps8"} <= set(metrics)
    rows = _rows(run_dir)
    assert {row["attack"] for row in rows} == {"none", "fgsm", "pgd2", "bim2", "pgd10_eps1", "pgd10_eps8"}
    assert {row["metric"] for row in rows} == {"psnr", "ssim"} and all(row["n"] == 24 for row in rows)
    eps = {row["attack"]: row["eps"] for row in rows}
    assert eps["pgd10_eps1"] == pytest.approx(1 / 255, abs=1e-6) and eps["pgd10_eps8"] == pytest.approx(8 / 255, abs=1e-6)
    assert (run_dir / "adversarial_examples.png").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["callbacks"]  # monitored by val/psnr
    assert any("val/psnr" in str(key) for key in checkpoint["callbacks"])
    module = load_stage_module(run_dir, "train.py")
    assert isinstance(module, Restorer) and module.hparams.encoder_depth == 2
