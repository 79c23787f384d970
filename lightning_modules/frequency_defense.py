"""The frequency-domain defense of Park et al. as two stages in front of any trained target stage (the lung segmenter
or a classifier), which stays frozen: a detector of adversarial inputs, and a reformer that maps inputs back toward
clean images. Both train on adversarial images that the callback crafts on the fly against the frozen target
(``adversarial.train_attack`` or a mix drawn per batch, ``adversarial.train_attack_mix``), added beside the clean ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.stage import StageModule, StepLoss, TrainingAttack, calibrate_detector_threshold, load_stage_module
from robust_cxr.frequency import DetectThenReform, FrequencyDetector, FrequencyRepresentation
from robust_cxr.attacks import AttackSpec, cross_entropy
from robust_cxr.metrics import LogitsAndLabels
from robust_cxr.models import ResidualRestorer, check_unet_image_size
from robust_cxr.tasks import Task, per_image_mse
from robust_cxr.threat import DefendedModel, seen_label

TARGET_COMMAND = "python train.py --config configs/segment.yaml (or a classifier stage's config)"
DETECTOR_COMMAND = "python train.py --config configs/detector.yaml"


class TargetDefenseStage(StageModule):
    """A defense trained in front of the frozen target stage of `target_ckpt`.

    The target's deployed pipeline is ``self.target`` ([0, 1] images -> its outputs) and its task is this stage's
    task: the callback's attacks ascend the target's loss and the report scores the target's outputs.

    Args:
        target_ckpt: checkpoint (or run directory) of a classifier or segmenter stage, trained on this data.
        lr, weight_decay, warmup_epochs: AdamW with linear warmup, then cosine decay per step.
        data: the data's classes, channels and image side (see `StageModule`).
    """

    def __init__(self, target_ckpt: str, lr: float = 1e-3, weight_decay: float = 1e-4, warmup_epochs: float = 0.5, **data: Any):
        super().__init__(**data)
        target = self.load_upstream(target_ckpt, TARGET_COMMAND)
        if target.task is None:
            raise ValueError(f"{target_ckpt} holds a {type(target).__name__} stage, which has no task to defend; "
                             "pass a classifier's or the segmenter's checkpoint as target_ckpt.")
        self.target_deployed: DefendedModel = target.deployed_model()
        self.register_frozen("target", self.target_deployed.pipeline)
        self._task: Task = target.task

    @property
    def task(self) -> Task:
        return self._task

    def adversarial_training_source(self) -> nn.Module:
        """The frozen target: the defense learns from attacks on it."""
        return self.target

    def check_adversarial_training(self, trades_beta: float | None) -> None:
        if trades_beta is not None:
            raise ValueError(f"{type(self).__name__} learns from attacks on its target's own objective, which TRADES would override: "
                             "set trades_beta to null.")

    def adversarial_training_attack(self, batch: dict[str, torch.Tensor], count: int, spec: AttackSpec, trades_beta: float | None) -> TrainingAttack:
        """The target's own objective on the first `count` images; the adversarial images go beside the clean ones."""
        targets, loss = self._task.attack_objective(spec, self._task.targets(batch)[:count])
        return TrainingAttack(batch, targets, loss, paired=True)

    def on_fit_start(self) -> None:
        if not any(getattr(callback, "train_attacks", None) for callback in self.trainer.callbacks):
            raise ValueError(f"{type(self).__name__} learns from adversarial images: set adversarial.train_attack or adversarial.train_attack_mix.")


class AdversarialDetector(TargetDefenseStage):
    """Tells adversarial inputs of the target from clean ones: a `FrequencyDetector`, trained with binary
    cross-entropy on each batch's clean images (0) and the attacked ones (1).

    Each validation sets the detector's threshold to the score that `false_positive_rate` of the clean validation
    images exceed (gathered over ranks); it is saved with the detector, with the attacks it was trained on (for the
    report's seen / unseen marks). The report evaluates the target with the detector attached: detection rows
    (AUROC, detection rate at the threshold) per attack, and the ``adaptive`` threat model, which evades it.

    Args:
        representation, with_image, widths: the detector (see `robust_cxr.frequency.FrequencyDetector`).
        false_positive_rate: the share of clean images the threshold may flag.
        stage: the other arguments, see `TargetDefenseStage`.
    """

    def __init__(
        self,
        target_ckpt: str = "runs/segmenter/checkpoints/best.ckpt",
        representation: FrequencyRepresentation = "log_magnitude",
        with_image: bool = False,
        widths: tuple[int, ...] = (16, 32, 64),
        false_positive_rate: float = 0.05,
        **stage: Any,
    ):
        super().__init__(target_ckpt, **stage)
        self.model = FrequencyDetector(self.hparams.in_chans, representation, with_image, tuple(widths))
        self.val_clean_scores = LogitsAndLabels()  # scores (B, 1) of clean validation images, with their indices
        self.seen_attacks: list[str] = []

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.seen_attacks = sorted({seen_label(spec.method, spec.eps) for callback in self.trainer.callbacks
                                    for spec in getattr(callback, "train_attacks", [])})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["seen_attacks"] = self.seen_attacks

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.seen_attacks = list(checkpoint.get("seen_attacks", []))

    def deployed_model(self) -> DefendedModel:
        """The target with the detector attached (its outputs unchanged)."""
        target = DefendedModel.alone(self.target_deployed.model, self.target)
        return target.with_detector(self.model, self.seen_attacks).attacked_under("whitebox", "adaptive")

    def training_loss(self, batch: dict[str, torch.Tensor]) -> StepLoss:
        """Binary cross-entropy of the scores (2B,) of the clean (0) and the attacked (1) images, and those scores."""
        # One forward over both: BatchNorm statistics of a clean-only or an attacked-only batch would hide the difference.
        scores = self.model(torch.cat([batch["image"], batch["adversarial_image"]]))
        labels = torch.cat([torch.zeros(len(batch["image"])), torch.ones(len(batch["adversarial_image"]))]).to(scores)
        return StepLoss(F.binary_cross_entropy_with_logits(scores, labels), scores)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, scores = self.training_loss(batch)
        flagged_right = (scores > 0) == torch.arange(len(scores), device=scores.device).ge(len(batch["image"]))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/detection_acc", flagged_right.float().mean(), prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scores = self.model(batch["image"])
        self.val_clean_scores.update(scores[:, None], batch["index"])

    def on_validation_epoch_end(self) -> None:
        """Sets the threshold for `false_positive_rate` from the epoch's clean validation scores (all ranks)."""
        calibrate_detector_threshold(self, self.val_clean_scores, self.model.threshold, self.hparams.false_positive_rate, "val/threshold")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("test/false_positive_rate", self.model.flagged(batch["image"]).float().mean(), sync_dist=True)


class AdversarialReformer(TargetDefenseStage):
    """Maps adversarial and clean images to the clean image in front of the frozen target: a `ResidualRestorer` (the
    restorer's network, the identity before training) trained with the pixel loss (mean squared error) on each batch's
    attacked and clean images, plus, with `task_loss_weight`, the target's own loss on the reformed attacked images.

    The report evaluates the target alone, the reformer + target (gray-box: attacks on the target alone; white-box:
    through the reformer) and, with `detector_ckpt`, detector + reformer + target, which reforms only what the
    detector flags (white-box, gray-box and the detector-aware ``adaptive`` attack, with detection rows).

    Args:
        detector_ckpt: an `AdversarialDetector` checkpoint trained for the same target, or None.
        encoder_name, encoder_depth, decoder_channels, feature_channels, head_channels: the reformer's network (see
            `robust_cxr.models.ResidualRestorer`).
        task_loss_weight: weight of the target's loss on reformed attacked images (0: pixel loss only).
        stage: the other arguments, see `TargetDefenseStage`.
    """

    def __init__(
        self,
        target_ckpt: str = "runs/segmenter/checkpoints/best.ckpt",
        detector_ckpt: str | None = "runs/detector/checkpoints/best.ckpt",
        encoder_name: str = "tu-resnet10t",
        encoder_depth: int = 3,
        decoder_channels: tuple[int, ...] = (32, 16, 16),
        feature_channels: int = 16,
        head_channels: int = 32,
        task_loss_weight: float = 0.0,
        **stage: Any,
    ):
        super().__init__(target_ckpt, **stage)
        check_unet_image_size(self.hparams.image_size, encoder_depth)
        self.model = ResidualRestorer(self.hparams.in_chans, encoder_name, encoder_depth, tuple(decoder_channels), feature_channels, head_channels)
        self.detector_stage = None if detector_ckpt is None else _load_detector(detector_ckpt, self._task)
        if self.detector_stage is not None:
            self.register_frozen("detector", self.detector_stage.model)

    def deployed_model(self) -> DefendedModel:
        """The reformer, then the target."""
        return self.target_alone().behind("reformer", self.model)

    def target_alone(self) -> DefendedModel:
        return DefendedModel.alone(self.target_deployed.model, self.target)

    def robustness_subjects(self) -> list[DefendedModel]:
        subjects = [self.target_alone(), self.deployed_model()]
        if self.detector_stage is not None:
            detect_then_reform = DetectThenReform(self.detector, self.model)
            subjects.append(self.target_alone().behind("detector+reformer", detect_then_reform).with_detector(self.detector, self.detector_stage.seen_attacks))
        return subjects

    def training_loss(self, batch: dict[str, torch.Tensor]) -> StepLoss:
        """The pixel loss (MSE) of the reformed attacked and clean images against the clean ones, plus with
        `task_loss_weight` the target's loss on the reformed attacked images; and the reformed images."""
        adversarial, clean = batch["adversarial_image"], batch["image"]
        count = len(adversarial)
        # One forward over both, so that BatchNorm sees the mix the reformer meets.
        reformed = self.model(torch.cat([adversarial, clean]))
        loss = per_image_mse(reformed, torch.cat([clean[:count], clean])).mean()
        if self.hparams.task_loss_weight > 0:
            task_loss = (self._task.attack_loss or cross_entropy)(self.target(reformed[:count]), self._task.targets(batch)[:count]).mean()
            loss = loss + self.hparams.task_loss_weight * task_loss
        return StepLoss(loss, reformed)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/clean_pixel_loss", per_image_mse(self.model(batch["image"]), batch["image"]).mean(), sync_dist=True, prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("test/clean_pixel_loss", per_image_mse(self.model(batch["image"]), batch["image"]).mean(), sync_dist=True)


def _load_detector(detector_ckpt: str, task: Task) -> AdversarialDetector:
    """The detector stage of `detector_ckpt`, which must defend a target of the same task."""
    detector = load_stage_module(detector_ckpt, DETECTOR_COMMAND)
    if not isinstance(detector, AdversarialDetector):
        raise ValueError(f"{detector_ckpt} holds a {type(detector).__name__} stage, not an AdversarialDetector: pass the detector "
                         f"stage's checkpoint (`{DETECTOR_COMMAND}`) as detector_ckpt, or null.")
    if detector.task.name != task.name:
        raise ValueError(f"The detector in {detector_ckpt} was trained against a {detector.task.name} target, this target is "
                         f"{task.name}: train a detector for this target.")
    return detector

