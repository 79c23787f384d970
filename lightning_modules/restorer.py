"""The restorer: a residual U-Net that maps degraded radiographs (the DataModule's `Degradation`) back to clean ones."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lightning_modules.optimization import adamw_warmup_cosine
from lightning_modules.stage import StageModule
from robust_cxr.models import ResidualRestorer, check_unet_image_size
from robust_cxr.tasks import RestorationTask, restoration_loss
from robust_cxr.threat import DefendedModel

RESTORER_COMMAND = "python train.py --config configs/restore.yaml"  # what writes runs/restorer/checkpoints/best.ckpt
NETWORK_ARGUMENTS = ("encoder_name", "encoder_depth", "decoder_channels", "feature_channels", "head_channels")  # the ResidualRestorer


def _psnr_and_ssim() -> MetricCollection:
    """Per-image PSNR (dB) and SSIM averaged over images, updated with images and references (B, C, H, W) in [0, 1]."""
    return MetricCollection({
        "psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),
        "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
    })


class Restorer(StageModule):
    """Restores degraded images: (B, C, S, S) in [0, 1] -> restored (B, C, S, S) in [0, 1] (`ResidualRestorer`).

    Batches need ``clean`` (B, C, S, S), the image the input was degraded from (``--data.degradation``). The loss is a
    per-image pixel loss (`pixel_loss`, plus `ssim_weight` * (1 - SSIM)); validation and test log ``psnr`` and
    ``ssim`` of the restored images (torchmetrics, per image, averaged) and ``psnr_degraded``, ``ssim_degraded`` of the
    degraded inputs themselves. Attacks and the robustness report follow `RestorationTask`.

    Args:
        num_classes, class_names: linked from the DataModule by the CLI; unused.
        in_chans, image_size: image channels and side, linked from the DataModule (the side a multiple of
            2 ** encoder_depth).
        encoder_name, encoder_depth, decoder_channels, feature_channels, head_channels: the network (see
            `robust_cxr.models.ResidualRestorer`).
        pixel_loss: ``mse`` (what PSNR measures) or ``l1``; ssim_weight: weight of the 1 - SSIM term (0: none).
        lr, weight_decay, warmup_epochs: AdamW with linear warmup, then cosine decay per step.
    """

    report_name = "restorer"

    def __init__(
        self,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        in_chans: int = 1,
        image_size: int = 64,
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
    ):
        super().__init__()
        self.save_hyperparameters()
        check_unet_image_size(image_size, encoder_depth)
        if pixel_loss not in ("mse", "l1"):
            raise ValueError(f"--model.init_args.pixel_loss must be mse or l1, got {pixel_loss!r}.")
        if ssim_weight < 0:
            raise ValueError(f"--model.init_args.ssim_weight must be >= 0 (0: no SSIM term), got {ssim_weight}.")
        self.model = ResidualRestorer(in_chans, encoder_name, encoder_depth, decoder_channels, feature_channels, head_channels)
        self.val_metrics = _psnr_and_ssim().clone(prefix="val/")
        self.val_degraded_metrics = _psnr_and_ssim().clone(prefix="val/", postfix="_degraded")
        self.test_metrics = _psnr_and_ssim().clone(prefix="test/")
        self.test_degraded_metrics = _psnr_and_ssim().clone(prefix="test/", postfix="_degraded")

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

    def deployed_model(self) -> DefendedModel:
        """The restorer as deployed, degraded [0, 1] images (B, C, S, S) -> restored [0, 1] images (B, C, S, S)."""
        return DefendedModel(self.report_name, "none", self.model, self.model)

    def robustness_subjects(self) -> list[DefendedModel]:
        return [self.deployed_model()]

    def adversarial_training_source(self) -> torch.nn.Module:
        return self.model

    def _loss(self, restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        return restoration_loss(restored, clean, self.hparams.pixel_loss, self.hparams.ssim_weight).mean()

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pixel loss of the restorer on ``batch["image"]`` against ``batch["clean"]`` (adversarial training replaces
        part of ``image`` by attacks: the targets stay the clean images)."""
        return self._loss(self.model(batch["image"]), batch["clean"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, metrics: MetricCollection, degraded_metrics: MetricCollection) -> None:
        degraded, clean = batch["image"], batch["clean"]
        restored = self(degraded)
        self.log(f"{stage}/loss", self._loss(restored, clean), sync_dist=True, batch_size=len(restored))
        metrics.update(restored, clean)
        degraded_metrics.update(degraded, clean)
        self.log_dict(metrics, prog_bar=stage == "val")
        self.log_dict(degraded_metrics)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics, self.val_degraded_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics, self.test_degraded_metrics)

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self, self.model.parameters(), hp.lr, hp.weight_decay, hp.warmup_epochs)
