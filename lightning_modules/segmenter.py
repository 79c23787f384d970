"""The lung-field segmenter: a U-Net (segmentation_models_pytorch) trained on the DataModule's masks."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lightning_modules.stage import StageModule, StepLoss, mean_metrics
from robust_cxr.models import check_unet_image_size, create_segmenter
from robust_cxr.tasks import SegmentationTask, segmentation_loss


class LungSegmenter(StageModule):
    """Segments the lung fields: images (B, C, S, S) in [0, 1] -> foreground logits (B, 1, S, S), lung where > 0.

    Batches need ``mask`` (B, 1, S, S) in {0, 1} (``--data.masks true``). The loss is pixel-wise binary cross-entropy
    plus soft Dice loss (`robust_cxr.tasks.segmentation_loss`); validation and test log ``dice`` and ``iou``
    (per image, averaged: the figures of the report, `SegmentationTask.image_scores`). Attacks and the robustness report follow `SegmentationTask`.

    Args:
        encoder_name, encoder_depth, decoder_channels: the U-Net (see `robust_cxr.models.create_segmenter`); the image
            side must be a multiple of 2 ** encoder_depth.
        lr, weight_decay, warmup_epochs: AdamW with linear warmup, then cosine decay per step.
        data: the data's classes (unused: one foreground class), channels and image side (see `StageModule`).
    """

    report_name = "segmenter"

    def __init__(
        self,
        encoder_name: str = "tu-resnet10t",
        encoder_depth: int = 4,
        decoder_channels: Sequence[int] = (64, 32, 16, 8),
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 0.5,
        **data: Any,
    ):
        super().__init__(**data)
        check_unet_image_size(self.hparams.image_size, encoder_depth)
        self.model = create_segmenter(encoder_name, self.hparams.in_chans, encoder_depth, decoder_channels)
        self.val_metrics = mean_metrics("dice", "iou")
        self.test_metrics = mean_metrics("dice", "iou")

    @property
    def task(self) -> SegmentationTask:
        return SegmentationTask()

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and not datamodule.hparams.get("masks"):
            raise ValueError("LungSegmenter trains and scores on lung masks: set --data.masks true (configs/segment.yaml does).")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> StepLoss:
        """The mean `segmentation_loss` of ``batch["image"]``'s foreground logits (B, 1, S, S) against ``batch["mask"]``."""
        logits = self.model(batch["image"])
        return StepLoss(segmentation_loss(logits, batch["mask"]).mean(), logits)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, metrics: nn.ModuleDict) -> None:
        logits = self.model(batch["image"])
        self.log(f"{stage}/loss", segmentation_loss(logits, batch["mask"]).mean(), sync_dist=True, batch_size=len(logits))
        self.log_means(stage, metrics, self.task.image_scores(batch["mask"], logits), prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

