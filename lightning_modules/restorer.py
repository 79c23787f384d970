"""The restorer: a residual U-Net that maps degraded radiographs (the DataModule's `Degradation`) back to clean ones."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import nn

from lightning_modules.stage import StageModule, StepLoss, mean_metrics
from robust_cxr.models import ResidualRestorer, check_unet_image_size
from robust_cxr.tasks import RestorationTask, restoration_loss

RESTORER_COMMAND = "python train.py --config configs/restore.yaml"  # what writes runs/restorer/checkpoints/best.ckpt
SCORES = ("psnr", "ssim", "psnr_degraded", "ssim_degraded")  # what validation and test log
NETWORK_ARGUMENTS = ("encoder_name", "encoder_depth", "decoder_channels", "feature_channels", "head_channels")  # the ResidualRestorer


class Restorer(StageModule):
    """Restores degraded images: (B, C, S, S) in [0, 1] -> restored (B, C, S, S) in [0, 1] (`ResidualRestorer`).

    Batches need ``clean`` (B, C, S, S), the image the input was degraded from (``--data.degradation``). The loss is a
    per-image pixel loss (`pixel_loss`, plus `ssim_weight` * (1 - SSIM)); validation and test log ``psnr`` and
    ``ssim`` of the restored images (per image, averaged: the figures of the report, `RestorationTask.image_scores`) and
    ``psnr_degraded``, ``ssim_degraded`` of the
    degraded inputs themselves. Attacks and the robustness report follow `RestorationTask`.

    Args:
        encoder_name, encoder_depth, decoder_channels, feature_channels, head_channels: the network (see
            `robust_cxr.models.ResidualRestorer`); the image side must be a multiple of 2 ** encoder_depth.
        pixel_loss: ``mse`` (what PSNR measures) or ``l1``; ssim_weight: weight of the 1 - SSIM term (0: none).
        lr, weight_decay, warmup_epochs: AdamW with linear warmup, then cosine decay per step.
        data: the data's classes (unused), channels and image side (see `StageModule`).
    """

    report_name = "restorer"

    def __init__(
        self,
        encoder_name: str = "tu-resnet10t",
        encoder_depth: int = 3,
        decoder_channels: Sequence[int] = (32, 16, 16),
        feature_channels: int = 16,
        head_channels: int = 32,
        pixel_loss: Literal["mse", "l1"] = "mse",
        ssim_weight: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 0.2,
        **data: Any,
    ):
        super().__init__(**data)
        check_unet_image_size(self.hparams.image_size, encoder_depth)
        if pixel_loss not in ("mse", "l1"):
            raise ValueError(f"--model.init_args.pixel_loss must be mse or l1, got {pixel_loss!r}.")
        if ssim_weight < 0:
            raise ValueError(f"--model.init_args.ssim_weight must be >= 0 (0: no SSIM term), got {ssim_weight}.")
        self.model = ResidualRestorer(self.hparams.in_chans, encoder_name, encoder_depth, decoder_channels, feature_channels, head_channels)
        self.val_metrics = mean_metrics(*SCORES)
        self.test_metrics = mean_metrics(*SCORES)

    @property
    def task(self) -> RestorationTask:
        return RestorationTask()

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "degradation", None) is None:
            raise ValueError("Restorer learns to undo a degradation of the images: set --data.degradation, e.g. "
                             "--data.degradation '{blur_sigma: 1.5, photons: 1000, read_noise: 0.005}' (configs/restore.yaml sets it).")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The stage's pipeline, what validation and test score: degraded (B, C, S, S) -> restored (B, C, S, S), in [0, 1]."""
        return self.model(images)

    def _loss(self, restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return restoration_loss(restored, clean, self.hparams.pixel_loss, self.hparams.ssim_weight).mean()

    def training_loss(self, batch: dict[str, torch.Tensor]) -> StepLoss:
        """The pixel loss of the restorer on ``batch["image"]`` against ``batch["clean"]`` (adversarial training replaces
        part of ``image`` by attacks: the targets stay the clean images), and the restored images."""
        restored = self.model(batch["image"])
        return StepLoss(self._loss(restored, batch["clean"]), restored)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, metrics: nn.ModuleDict) -> None:
        degraded, clean = batch["image"], batch["clean"]
        restored = self(degraded)
        self.log(f"{stage}/loss", self._loss(restored, clean), sync_dist=True, batch_size=len(restored))
        scores = self.task.image_scores(clean, restored)
        degraded_scores = {f"{name}_degraded": value for name, value in self.task.image_scores(clean, degraded).items()}
        self.log_means(stage, metrics, {**scores, **degraded_scores}, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

