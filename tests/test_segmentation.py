"""The segmentation task end to end: Dice / IoU against torchmetrics, LungSegmenter training, attacks on masks, clear
errors for what does not apply, the robustness report and its grid, 1- vs 2-process evaluation, and train.py on
configs/segment.yaml."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.segmentation import dice_score, mean_iou
from torchmetrics.segmentation import DiceScore, MeanIoU

from callbacks import AdversarialExampleCallback
from conftest import CONFIGS, run_train, shrink_config
from datamodules import ChestXRayDataModule
from lightning_modules import LungSegmenter
from lightning_modules.classifier import load_classifier
from lightning_modules.stage import load_stage_module
from robust_cxr.attacks import AttackSpec, LogitAverage, craft_adversarial
from robust_cxr.metrics import dice_and_iou
from robust_cxr.tasks import ClassificationTask, SegmentationTask, segmentation_loss

IMAGE_SIZE = 32
TINY_SEGMENTER = dict(encoder_name="tu-resnet10t", encoder_depth=3, decoder_channels=[16, 8, 4])
SAMPLES = 400  # 280 / 60 / 60 phantoms in the train / val / test splits
TEST_IMAGES = 60
EPS = 0.03


def _datamodule(**overrides) -> ChestXRayDataModule:
    settings = dict(image_size=IMAGE_SIZE, synthetic_samples=SAMPLES, batch_size=32, num_workers=0, seed=0, masks=True)
    return ChestXRayDataModule(**{**settings, **overrides})


def _segmenter(**overrides) -> LungSegmenter:
    return LungSegmenter(**{"image_size": IMAGE_SIZE, **TINY_SEGMENTER, **overrides})


def _trainer(directory: Path, callbacks=(), **overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(directory))
    return L.Trainer(callbacks=list(callbacks), **{**settings, **overrides})


@pytest.fixture(scope="module")
def segmenter_run(tmp_path_factory, single_thread) -> SimpleNamespace:
    """A tiny U-Net trained 4 epochs on 280 phantoms at 32 px (seconds), its checkpoint, and its validation metrics
    before and after training."""
    directory = tmp_path_factory.mktemp("segmenter")
    L.seed_everything(0, verbose=False)
    data = _datamodule()
    model = _segmenter()
    # A copy scores the untrained model: the metric states of a module validated under inference mode cannot be
    # updated by the validation inside `fit`, which runs outside it.
    initial = _trainer(directory).validate(copy.deepcopy(model), datamodule=data, verbose=False)[0]
    trainer = _trainer(directory, max_epochs=4, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    checkpoint = directory / "segmenter.ckpt"
    trainer.save_checkpoint(checkpoint)
    validated = trainer.validate(model, datamodule=data, verbose=False)[0]
    tested = trainer.test(model, datamodule=data, verbose=False)[0]
    return SimpleNamespace(directory=directory, checkpoint=checkpoint, data=data, initial=initial, validated=validated, tested=tested)


def _trained(segmenter_run) -> LungSegmenter:
    module = load_stage_module(segmenter_run.checkpoint, "the segmenter_run fixture")
    assert isinstance(module, LungSegmenter)
    return module


def _test_batch(segmenter_run, count: int = 32) -> dict[str, torch.Tensor]:
    batch = next(iter(segmenter_run.data.test_dataloader()))
    return {key: value[:count] for key, value in batch.items()}


# ------------------------------------------------------------------------------------------------------- metrics
def test_dice_and_iou_equal_torchmetrics_per_image_and_averaged():
    generator = torch.Generator().manual_seed(0)
    shape = (12, 1, 16, 16)
    densities = torch.linspace(0.02, 0.9, shape[0]).view(-1, 1, 1, 1)
    masks = torch.rand(shape, generator=generator) < densities
    predicted = torch.rand(shape, generator=generator) < densities.flip(0)
    predicted[0] = masks[0]  # a perfect prediction
    predicted[1] = False  # an empty prediction of a non-empty mask
    predicted[2] = ~masks[2]  # no overlap at all
    masks[3] = False
    masks[3, 0, 5, 7] = True  # a one-pixel mask
    assert masks.flatten(1).any(dim=1).all() and predicted[2:].flatten(1).any(dim=1).all()
    dice, iou = dice_and_iou(predicted, masks)
    assert dice.dtype == iou.dtype == torch.float64 and dice.shape == iou.shape == (12,)

    indices = dict(preds=predicted[:, 0].long(), target=masks[:, 0].long())
    options = dict(num_classes=2, include_background=False, input_format="index")
    expected_dice = dice_score(**indices, **options, average="none", aggregation_level="samplewise")
    expected_iou = mean_iou(**indices, **options, per_class=True)
    torch.testing.assert_close(dice.float(), expected_dice.flatten().float())
    torch.testing.assert_close(iou.float(), expected_iou.flatten().float())
    assert dice[0] == iou[0] == 1 and dice[1] == iou[1] == 0 and dice[2] == iou[2] == 0
    torch.testing.assert_close(dice, 2 * iou / (1 + iou))  # Dice = 2 IoU / (1 + IoU) per image
    # The module metrics LungSegmenter logs average the same per-image values over the images.
    torch.testing.assert_close(DiceScore(**options)(**indices).double(), dice.mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(MeanIoU(**options)(**indices).double(), iou.mean(), atol=1e-6, rtol=0)


def test_dice_and_iou_are_one_for_an_empty_prediction_of_an_empty_mask():
    empty = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    dice, iou = dice_and_iou(empty, empty)
    assert dice.tolist() == iou.tolist() == [1.0, 1.0, 1.0]
    one_pixel = empty.clone()
    one_pixel[1, 0, 2, 2] = True
    dice, iou = dice_and_iou(one_pixel, empty)  # a false positive on an empty mask scores 0
    assert dice.tolist() == iou.tolist() == [1.0, 0.0, 1.0]


# ------------------------------------------------------------------------------------------------------- training
def test_training_raises_dice_well_above_its_initial_value(segmenter_run):
    initial, validated, tested = segmenter_run.initial, segmenter_run.validated, segmenter_run.tested
    assert initial["val/dice"] < 0.5
    assert validated["val/dice"] > 0.75 and validated["val/dice"] > initial["val/dice"] + 0.3
    assert tested["test/dice"] > 0.75 and tested["test/iou"] > 0.6
    assert validated["val/loss"] < initial["val/loss"] - 0.3
    module = _trained(segmenter_run)
    assert module.hparams.encoder_depth == 3 and not module.training
    batch = _test_batch(segmenter_run)
    with torch.no_grad():
        logits = module(batch["image"])
    assert logits.shape == batch["mask"].shape == (32, 1, IMAGE_SIZE, IMAGE_SIZE)
    dice, _ = dice_and_iou(logits > 0, batch["mask"] > 0.5)
    assert dice.mean() > 0.75  # the reloaded checkpoint is the trained model


# -------------------------------------------------------------------------------------------------------- attacks
def _attack(module: LungSegmenter, batch: dict, spec: AttackSpec, source: torch.nn.Module | None = None) -> torch.Tensor:
    task = module.task
    targets, loss_fn = task.attack_objective(spec, task.targets(batch))
    return craft_adversarial(spec, source or module.model, batch["image"], targets, loss_fn=loss_fn, keys=batch["index"], seed=0)


def _dice(module: LungSegmenter, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return dice_and_iou(module(images) > 0, masks > 0.5)[0]


def test_pgd_lowers_dice_and_raises_the_segmentation_loss_within_eps(segmenter_run):
    module = _trained(segmenter_run)
    batch = _test_batch(segmenter_run)
    images, masks = batch["image"], batch["mask"]
    spec = AttackSpec(method="pgd", eps=EPS, steps=5)
    adversarial = _attack(module, batch, spec)

    change = (adversarial - images).flatten(1).abs().amax(dim=1)
    assert torch.all(change <= EPS + 1e-6) and torch.all(change > EPS / 2)
    assert adversarial.min() >= 0 and adversarial.max() <= 1 and adversarial.shape == images.shape
    clean_dice, adversarial_dice = _dice(module, images, masks), _dice(module, adversarial, masks)
    assert adversarial_dice.mean() < clean_dice.mean() - 0.2
    assert (adversarial_dice < clean_dice).float().mean() > 0.9
    task = SegmentationTask()
    with torch.no_grad():
        clean_loss = segmentation_loss(module(images), masks)
        adversarial_loss = segmentation_loss(module(adversarial), masks)
        assert task.attack_loss(module(adversarial), masks).sum() > task.attack_loss(module(images), masks).sum()
    assert torch.all(adversarial_loss > clean_loss)
    torch.testing.assert_close(task.attack_loss(module(images), masks), clean_loss)  # per image


def test_targeted_empty_attack_shrinks_the_predicted_foreground(segmenter_run):
    module = _trained(segmenter_run)
    batch = _test_batch(segmenter_run)
    images = batch["image"]
    spec = AttackSpec(method="pgd", eps=EPS, steps=5, target="empty")
    assert spec.label == "pgd5_to_empty"
    targets, _ = module.task.attack_objective(spec, batch["mask"])
    assert targets.shape == batch["mask"].shape and not targets.any()
    adversarial = _attack(module, batch, spec)
    assert (adversarial - images).abs().max() <= EPS + 1e-6
    with torch.no_grad():
        clean_area = (module(images) > 0).flatten(1).sum(dim=1)
        adversarial_area = (module(adversarial) > 0).flatten(1).sum(dim=1)
    assert adversarial_area.sum() < 0.75 * clean_area.sum()
    assert (adversarial_area < clean_area).float().mean() > 0.9
    # It descends the loss toward the empty mask, on every image, and further than the untargeted attack does.
    untargeted = _attack(module, batch, AttackSpec(method="pgd", eps=EPS, steps=5))
    empty = torch.zeros_like(batch["mask"])
    with torch.no_grad():
        clean_loss, targeted_loss, untargeted_loss = (segmentation_loss(module(x), empty) for x in (images, adversarial, untargeted))
    assert torch.all(targeted_loss < clean_loss)
    assert targeted_loss.mean() < untargeted_loss.mean()


def test_eot_averages_segmentation_outputs_and_its_attack_works(segmenter_run):
    module = _trained(segmenter_run)
    batch = _test_batch(segmenter_run, count=8)
    images, masks = batch["image"], batch["mask"]
    averaged = LogitAverage(module.model, draws=2)
    with torch.no_grad():
        outputs = averaged(images)
        assert outputs.shape == (8, 1, IMAGE_SIZE, IMAGE_SIZE)
        torch.testing.assert_close(outputs, module.model(images), atol=1e-5, rtol=1e-5)  # a deterministic model: its mean

    class Noisy(torch.nn.Module):
        """A random segmenter: the logits plus fresh noise, so that EOT draws differ; records its batch sizes."""

        stochastic = True

        def __init__(self):
            super().__init__()
            self.batch_sizes: list[int] = []

        def forward(self, x):
            self.batch_sizes.append(len(x))
            return module.model(x) + 0.5 * torch.randn(len(x), 1, *x.shape[2:])

    noisy = Noisy()
    with torch.no_grad():
        torch.manual_seed(1)
        eot = LogitAverage(noisy, draws=2)(images)
        torch.manual_seed(1)
        draws = noisy(images.repeat(2, 1, 1, 1)).unflatten(0, (2, 8))
    assert eot.shape == (8, 1, IMAGE_SIZE, IMAGE_SIZE) and not torch.allclose(draws[0], draws[1])
    torch.testing.assert_close(eot, draws.mean(dim=0))  # each image's two draws averaged, in one batch of 2 B

    noisy.batch_sizes.clear()
    spec = AttackSpec(method="pgd", eps=EPS, steps=5, eot_samples=2)
    assert spec.executed(stochastic=True)["eot_samples"] == 2
    adversarial = _attack(module, batch, spec, source=noisy)
    assert noisy.batch_sizes == [16] * 6  # every PGD step through both draws, and the last iterate judged on both
    assert adversarial.shape == images.shape and (adversarial - images).abs().max() <= EPS + 1e-6
    assert _dice(module, adversarial, masks).mean() < _dice(module, images, masks).mean() - 0.1


# --------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("method", ["apgd_ce", "autoattack", "cw_l2"])
def test_classification_only_attacks_on_a_segmenter_fail_naming_the_method(segmenter_run, tmp_path, method):
    spec = AttackSpec(method=method, eps=EPS, steps=2)
    with pytest.raises(ValueError, match=rf"{method} does not apply to segmentation; use one of \['fgsm', 'pgd'"):
        SegmentationTask().check_attack(spec)
    callback = AdversarialExampleCallback(attacks=[AttackSpec(method="pgd", eps=EPS, steps=2), spec])
    with pytest.raises(ValueError, match=rf"Attack {spec.label}: {method} does not apply to segmentation"):
        _trainer(tmp_path, [callback]).test(_trained(segmenter_run), datamodule=_datamodule(synthetic_samples=60), verbose=False)
    assert not (tmp_path / "robustness_report.json").exists()


def test_a_targeted_goal_fails_on_a_task_without_it():
    empty = AttackSpec(method="pgd", eps=EPS, steps=2, target="empty")
    with pytest.raises(ValueError, match=r"target 'empty' is not a classification goal; set target to null"):
        ClassificationTask(["normal", "tuberculosis"]).check_attack(empty)
    with pytest.raises(ValueError, match=r"target 'full' is not a segmentation goal; set target to one of \['empty'\]"):
        SegmentationTask().check_attack(AttackSpec(method="pgd", eps=EPS, steps=2, target="full"))
    SegmentationTask().check_attack(empty)  # applies


def test_trades_on_a_segmenter_fails(tmp_path):
    callback = AdversarialExampleCallback(train_attack=AttackSpec(method="pgd", eps=EPS, steps=2), trades_beta=6.0)
    model = _segmenter()
    with pytest.raises(ValueError, match=r"TRADES compares class probabilities; LungSegmenter is a segmentation stage: set trades_beta to null"):
        _trainer(tmp_path, [callback], max_epochs=1).fit(model, datamodule=_datamodule(synthetic_samples=60))
    assert model.global_step == 0


@pytest.mark.parametrize("stage", ["fit", "test"])
def test_a_segmenter_without_masks_asks_for_them(tmp_path, stage):
    trainer = _trainer(tmp_path, max_epochs=1)
    run = trainer.fit if stage == "fit" else trainer.test
    with pytest.raises(ValueError, match=r"set --data\.masks true"):
        run(_segmenter(), datamodule=_datamodule(synthetic_samples=60, masks=False))


def test_a_segmenter_checkpoint_is_no_classifier(segmenter_run):
    with pytest.raises(ValueError, match=r"holds a LungSegmenter stage, not a classifier"):
        load_classifier(segmenter_run.checkpoint, "python train.py --config configs/teacher.yaml")


def test_image_size_must_be_a_multiple_of_the_unet_downsampling():
    with pytest.raises(ValueError, match=r"image_size 36 must be a multiple of 8"):
        _segmenter(image_size=36)
    with pytest.raises(ValueError, match=r"image_size 32 must be a multiple of 64"):
        _segmenter(encoder_depth=6, decoder_channels=[8] * 6)
    _segmenter(image_size=40)  # 40 = 5 * 2**3


# --------------------------------------------------------------------------------------------------------- report
REPORT_ATTACKS = [AttackSpec(method="pgd", eps=EPS, steps=3), AttackSpec(method="pgd", eps=EPS, steps=3, target="empty")]


def _rows(directory: Path) -> list[dict]:
    return json.loads((directory / "robustness_report.json").read_text())


def test_robustness_report_of_a_segmenter(segmenter_run, tmp_path):
    trainer = _trainer(tmp_path, [AdversarialExampleCallback(attacks=REPORT_ATTACKS)])
    metrics = trainer.test(_trained(segmenter_run), datamodule=segmenter_run.data, verbose=False)[0]
    rows = _rows(tmp_path)
    assert [(row["attack"], row["metric"]) for row in rows] == [
        (attack, metric) for attack in ("none", "pgd3", "pgd3_to_empty") for metric in ("dice", "iou")
    ]
    by_key = {(row["attack"], row["metric"]): row for row in rows}
    for row in rows:
        assert row["n"] == TEST_IMAGES
        assert (row["model"], row["defense"]) == ("segmenter", "none")
        assert row["clean_value"] == by_key[("none", row["metric"])]["value"]  # every attack covers the whole test set
    for metric in ("dice", "iou"):
        clean = by_key[("none", metric)]
        assert clean["value"] == clean["clean_value"] > 0.6 and clean["perturbation"] is None
        for attack in ("pgd3", "pgd3_to_empty"):
            row = by_key[(attack, metric)]
            assert row["value"] <= row["clean_value"] + 1e-9, row
            assert row["value"] < row["clean_value"] - 0.1, row
            assert (row["threat_model"], row["norm"], row["eps"], row["steps"]) == ("whitebox", "linf", EPS, 3)
            assert 0 < row["perturbation"] <= EPS + 1e-6
    # The callback's Dice (dice_and_iou) and LungSegmenter's torchmetrics Dice agree on the same test images.
    assert metrics["test/dice"] == pytest.approx(by_key[("none", "dice")]["value"], abs=1e-5)
    assert metrics["test/iou"] == pytest.approx(by_key[("none", "iou")]["value"], abs=1e-5)
    assert metrics["test/robust_dice/pgd3"] == pytest.approx(by_key[("pgd3", "dice")]["value"], abs=1e-6)
    assert metrics["test/robust_iou/pgd3_to_empty"] == pytest.approx(by_key[("pgd3_to_empty", "iou")]["value"], abs=1e-6)
    assert "| segmenter | none |" in (tmp_path / "robustness_report.md").read_text()

    with Image.open(tmp_path / "adversarial_examples.png") as grid:
        assert grid.size[0] == 3 * 128 + 2 * 128 and 8 * 128 < grid.size[1] < 9 * 128  # clean | adversarial | perturbation | text, 8 rows
        pixels = np.asarray(grid.convert("RGB")).astype(int)
    title = pixels[: 128 // 4, : 3 * 128]
    assert (title < 128).any() and (title == 255).mean() > 0.8  # dark text on white
    clean_tiles = pixels[128 // 4 :, :128]
    tinted = clean_tiles[..., 0] - clean_tiles[..., 1]
    assert (tinted > 60).mean() > 0.05  # the predicted lungs drawn red on the gray image
    perturbation_tiles = pixels[128 // 4 :, 2 * 128 : 3 * 128]
    assert (perturbation_tiles[..., 0] == perturbation_tiles[..., 1]).all()  # gray


DDP_SAMPLES, DDP_TEST_IMAGES = 233, 35  # 35 test images: 18 and 17 on the two ranks


def _report_on_devices(checkpoint: Path, directory: Path, devices: int) -> list[dict]:
    trainer = _trainer(directory, [AdversarialExampleCallback(attacks=REPORT_ATTACKS)], devices=devices,
                       strategy="ddp_spawn" if devices > 1 else "auto")
    module = load_stage_module(checkpoint, "the segmenter_run fixture")
    trainer.test(module, datamodule=_datamodule(synthetic_samples=DDP_SAMPLES, batch_size=16), verbose=False)
    return _rows(directory)


def test_two_process_evaluation_sums_the_same_dice_as_one_process(segmenter_run, tmp_path):
    single = _report_on_devices(segmenter_run.checkpoint, tmp_path / "one", devices=1)
    double = _report_on_devices(segmenter_run.checkpoint, tmp_path / "two", devices=2)
    assert single[0]["n"] == DDP_TEST_IMAGES  # an odd test split: no padding duplicates, no image lost
    # Each image gets the same Dice on either rank count (same attack start, keyed by its index), and the counters sum
    # Dice and IoU exactly, so the means agree to the last bit; the perturbation is a float sum in another order.
    exact = [{key: value for key, value in row.items() if key != "perturbation"} for row in single]
    assert exact == [{key: value for key, value in row.items() if key != "perturbation"} for row in double]
    for row, distributed_row in zip(single, double):
        if row["perturbation"] is not None:
            assert distributed_row["perturbation"] == pytest.approx(row["perturbation"], rel=1e-9)
    assert all(row["value"] < row["clean_value"] for row in single if row["attack"] != "none")


# --------------------------------------------------------------------------------------------------------- train.py
def test_train_py_on_the_segment_config(tmp_path, single_thread):
    # shrink_config leaves the U-Net as configured (no model_name / unet), so it is shrunk by CLI overrides; max_steps=10
    # keeps the config's attack names (pgd10, ...); 240 phantoms: 36 test images.
    config = shrink_config(CONFIGS / "segment.yaml", tmp_path, max_steps=10, synthetic_samples=240)
    run_dir = tmp_path / "run"
    metrics = run_train(config, run_dir, "--trainer.max_epochs", "1", "--model.init_args.encoder_depth", "3",
                        "--model.init_args.decoder_channels", "[16,8,4]")
    assert {"test/dice", "test/iou", "test/robust_dice/pgd10", "test/robust_iou/pgd10", "test/robust_dice/pgd10_to_empty",
            "test/robust_dice/fgsm", "test/robust_dice/pgd_l210"} <= set(metrics)
    assert json.loads((run_dir / "test_metrics.json").read_text()).keys() == metrics.keys()
    rows = _rows(run_dir)
    assert {row["attack"] for row in rows} == {"none", "fgsm", "pgd10", "mifgsm10", "pgd_l210", "pgd10_to_empty"}
    assert {row["metric"] for row in rows} == {"dice", "iou"} and all(row["n"] == 36 for row in rows)
    assert (run_dir / "adversarial_examples.png").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
    module = load_stage_module(run_dir, "train.py")
    assert isinstance(module, LungSegmenter)
    assert (module.hparams.image_size, module.hparams.encoder_depth, list(module.hparams.decoder_channels)) == (32, 3, [16, 8, 4])
