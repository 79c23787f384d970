"""The training, evaluation and optimisation logic shared by every stage that trains a classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.optimization import decay_groups
from lightning_modules.stage import StageModule, StepLoss, load_stage_module
from robust_cxr.distillation import soft_target_kl, weighted_mean
from robust_cxr.metrics import LogitsAndLabels, class_scores, classification_metrics, margin_threshold_for_sensitivity
from robust_cxr.models import OperatingPoint
from robust_cxr.tasks import ClassificationTask
from robust_cxr.threat import DefendedModel


class ImageClassifierModule(StageModule):
    """Base LightningModule: `self.model` maps (B, C, H, W) images in [0, 1] to logits (B, K).

    Batches are dicts with ``image`` (B, C, H, W) in [0, 1] and ``label`` (B,). The adversarial
    callback may add ``adversarial_image`` (B', C, H, W) and ``trades_beta`` for TRADES, which
    pairs each adversarial image with the first B' clean ones.

    Every loss is a mean over images weighted by `class_weights` of their labels. Decisions (test metrics, the
    robustness report, `deployed_model` and so prediction and export) are taken at `self.operating_point`: with
    `target_sensitivity`, each validation picks the binary threshold that reaches it on the validation images
    (gathered over ranks) and the validation metrics of that epoch are taken at it, so ``best.ckpt`` holds the
    threshold its metrics were measured at.

    Subclasses build `self.model`.

    Args:
        num_classes, class_names: the classes in label order, linked from the DataModule by the CLI.
        lr, weight_decay: AdamW settings (no decay on norms, biases, position embeddings).
        warmup_epochs: linear warmup length (fractions allowed), then cosine decay per step.
        label_smoothing: cross-entropy label smoothing.
        class_weights: ``none`` (every image counts the same), ``balanced`` (class c weighs N / (K * N_c), from
            the training split's counts, so every class contributes equally) or one weight per class.
        target_sensitivity: binary tasks only: the sensitivity (recall of class 1) the decision threshold must
            reach on validation; None decides by argmax (P(class 1) > 0.5).
        data: ``in_chans``, ``image_size`` (see `StageModule`).
    """

    report_name = "classifier"

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        label_smoothing: float = 0.0,
        class_weights: Literal["none", "balanced"] | list[float] = "none",
        target_sensitivity: float | None = None,
        **data: int,
    ):
        super().__init__(num_classes, class_names, **data)
        _check_imbalance_options(num_classes, class_weights, target_sensitivity)
        self.train_acc = classification_metrics(num_classes)["acc"].clone()
        self.val_outputs = LogitsAndLabels()
        self.val_metrics = classification_metrics(num_classes).clone(prefix="val/")
        self.test_metrics = classification_metrics(num_classes).clone(prefix="test/")
        self.operating_point = OperatingPoint(num_classes)  # its offset is saved with the model
        self.register_buffer("class_weight", torch.ones(num_classes), persistent=False)  # set at fit start
        self.model: nn.Module

    def register_frozen_teacher(self, teacher: ImageClassifierModule) -> None:
        """Makes the loaded `teacher` stage's classifier ``self.teacher`` at its operating point (its decisions) and
        ``self.teacher_network`` before it (its probabilities), both frozen (see `register_frozen`)."""
        self.register_frozen("teacher", teacher.deployed_model().undefended)
        self.register_frozen("teacher_network", teacher.model)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # Checkpoints written before operating points were saved decide by argmax.
        checkpoint["state_dict"].setdefault("operating_point.offset", torch.zeros(self.hparams.num_classes))

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.class_weights != "none":
            self.class_weight.copy_(_resolve_class_weights(self.hparams.class_weights, self.trainer.datamodule))

    @property
    def task(self) -> ClassificationTask:
        """What the adversarial callback attacks and scores: logits against labels (``0``, ``1``, ... without class names)."""
        return ClassificationTask(list(self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The stage's pipeline before its operating point: [0, 1] images (B, C, H, W) -> logits (B, K)."""
        return self.model(images)

    def decision_classifier(self) -> nn.Module:
        """The classifier at this stage's operating point: [0, 1] images (B, C, H, W) -> shifted logits (B, K)."""
        return nn.Sequential(self.model, self.operating_point)

    def deployed_model(self) -> DefendedModel:
        """What this stage deploys: its ``pipeline`` (any defense, then the classifier) and its ``undefended`` classifier (without
        the defense), both at the operating point and mapping [0, 1] images (B, C, H, W) to logits (B, K)."""
        return DefendedModel.alone(self.report_name, self.decision_classifier())

    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) loss weights of images with labels (B,): their class's weight."""
        return self.class_weight[labels]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross-entropy of logits (B, K) against labels (B,)."""
        losses = F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.hparams.label_smoothing)
        return weighted_mean(losses, self.sample_weights(labels))

    def training_loss(self, batch: dict[str, torch.Tensor]) -> StepLoss:
        """Loss of a training batch and the logits of ``batch["image"]``; adds the TRADES term when present."""
        logits = self.model(batch["image"])
        loss = self.loss(logits, batch["label"])
        if "adversarial_image" in batch:
            adversarial_logits = self.model(batch["adversarial_image"])
            count = len(adversarial_logits)
            kl = soft_target_kl(adversarial_logits, logits[:count], weights=self.sample_weights(batch["label"][:count]))
            loss = loss + batch["trades_beta"] * kl
        return StepLoss(loss, logits)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits = self.training_loss(batch)
        self.train_acc(class_scores(logits), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _evaluation_logits(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """Logits (B, K) of the batch before the operating point; logs the loss."""
        logits = self(batch["image"])
        self.log(f"{stage}/loss", self.loss(logits, batch["label"]), sync_dist=True, batch_size=len(logits))
        return logits

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_outputs.update(self._evaluation_logits(batch, "val"), batch["label"])

    def on_validation_epoch_end(self) -> None:
        """Sets the operating point from the epoch's validation logits (all ranks), then logs the metrics taken at it."""
        if self.val_outputs.update_count == 0:
            return
        logits, labels = self.val_outputs.compute()
        self.val_outputs.reset()
        if self.hparams.get("target_sensitivity") is not None:  # stages without the option decide by argmax
            margins = logits[:, 1] - logits[:, 0]
            self.operating_point.set_margin_threshold(margin_threshold_for_sensitivity(margins, labels, self.hparams.target_sensitivity))
        values = self.val_metrics(class_scores(self.operating_point(logits)), labels)  # gathered already: no second sync
        self.val_metrics.reset()
        if self.operating_point.probability_threshold is not None:
            values["val/threshold"] = torch.tensor(self.operating_point.probability_threshold)
        self.log_dict(values, prog_bar=True, sync_dist=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self._evaluation_logits(batch, "test")
        self.test_metrics.update(class_scores(self.operating_point(logits)), batch["label"])
        self.log_dict(self.test_metrics)

    def optimized_parameters(self) -> list[dict]:
        """The classifier's parameters, without weight decay on norms, biases and the model's `no_weight_decay` names."""
        return decay_groups(self.model, self.hparams.weight_decay)


def _check_imbalance_options(num_classes: int, class_weights: str | list[float], target_sensitivity: float | None) -> None:
    if isinstance(class_weights, str) and class_weights not in ("none", "balanced"):
        raise ValueError(f"class_weights must be 'none', 'balanced' or one weight per class, got {class_weights!r}.")
    if not isinstance(class_weights, str) and (len(class_weights) != num_classes or min(class_weights) <= 0):
        raise ValueError(f"class_weights needs {num_classes} positive weights (one per class), got {class_weights}.")
    if target_sensitivity is not None and num_classes != 2:
        raise ValueError(f"target_sensitivity sets a binary decision threshold; the data have {num_classes} classes. "
                         "Set it to null (--model.init_args.target_sensitivity null: argmax decisions).")
    if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
        raise ValueError(f"target_sensitivity must lie in (0, 1], got {target_sensitivity}.")


def _resolve_class_weights(class_weights: str | list[float], datamodule: L.LightningDataModule | None) -> torch.Tensor:
    """(K,) loss weight per class for `class_weights` ``balanced`` or a list (see `ImageClassifierModule`)."""
    if not isinstance(class_weights, str):
        return torch.tensor(class_weights, dtype=torch.float)
    if datamodule is not None and datamodule.hparams.get("balanced_sampling") and class_weights == "balanced":
        raise ValueError(
            "--data.balanced_sampling and --model.init_args.class_weights balanced both correct the class imbalance, "
            "which then counts twice; use one of them."
        )
    if datamodule is None or not hasattr(datamodule, "class_counts"):
        raise ValueError("class_weights='balanced' needs a DataModule with class_counts() (datamodules.ChestXRayDataModule).")
    counts = datamodule.class_counts("train").float()
    if (counts == 0).any():
        raise ValueError(f"class_weights='balanced' needs every class in the training split; its counts are {counts.long().tolist()}.")
    return counts.sum() / (len(counts) * counts)


TEACHER_COMMAND = "python train.py --config configs/teacher.yaml"  # what writes runs/teacher/checkpoints/best.ckpt
CLASSIFIER_COMMAND = "python train.py --config configs/<stage>.yaml"  # what writes any classifier stage's checkpoint


def load_classifier(checkpoint_path: str | Path, made_by: str = CLASSIFIER_COMMAND, **data: object) -> ImageClassifierModule:
    """The classifier stage (any `ImageClassifierModule`) of `checkpoint_path`, as `load_stage_module` loads it, trained on
    `data` (``class_names``, ``num_classes``, ``in_chans``, ``image_size``; those given)."""
    return load_stage_module(checkpoint_path, made_by, ImageClassifierModule, "classifier", **data)
