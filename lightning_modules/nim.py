"""Stage 2 (alternative): noisy image modeling (De^3), an MAE-style ViT trained to denoise the chest X-rays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_modules.optimization import decay_groups
from lightning_modules.stage import ExportingDenoiserStage, mean_metrics
from robust_cxr.metrics import per_image_psnr
from robust_cxr.nim import DE3_NOISE, NIMPurifier, NoiseScale, NoisyImageModel

DEFAULT_ARCHITECTURE = dict(
    patch_size=8, embed_dim=128, depth=4, num_heads=4, decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.0,
)


class NoisyImageModeling(ExportingDenoiserStage):
    """Trains a `NoisyImageModel` on images (B, C, S, S) in [0, 1] noised with a per-image sigma drawn from `noise`.

    Training minimises the reconstruction MSE of every patch (`NoisyImageModel.reconstruction_loss`). Validation and
    test noise every image at the fixed `eval_sigma` (noise fixed per batch index) and log ``{stage}/loss``,
    ``{stage}/psnr``, the PSNR in dB of the clamped reconstruction against the clean image, and ``{stage}/psnr_noisy``,
    that of the noisy input clamped to [0, 1]. At the end of `fit` the model is exported to ``<run dir>/<export_dir>``
    (`config.json` with the architecture and the training noise, `model.safetensors`), which `NIMPurifier.from_pretrained`
    and `robust_cxr.purification.load_purifier` read.

    Args:
        architecture: `NoisyImageModel` arguments (patch size, encoder and decoder widths and depths, `norm_pix_loss`).
        noise: the training distribution of sigma in [0, 1] pixel units, a `NoiseScale` spec: De^3's
            ``{distribution: gamma, shape: 25, scale: 3/255}`` by default, or ``uniform`` (low, high), ``fixed`` (sigma).
        eval_sigma: the noise std of the validation and test PSNR, in [0, 1] pixel units (75/255 by default).
        lr, weight_decay, warmup_epochs: AdamW (no decay on norms, biases, position embeddings), linear warmup, cosine decay.
        denoiser: ``export_dir`` and the data (see `ExportingDenoiserStage`; the denoiser has no labels).
    """

    def __init__(
        self,
        architecture: dict[str, Any] | None = None,
        noise: dict[str, Any] = DE3_NOISE,
        eval_sigma: float = 75 / 255,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.5,
        **denoiser: Any,
    ):
        super().__init__(**denoiser)
        self.noise = NoiseScale.from_spec(noise)
        if eval_sigma <= 0:
            raise ValueError(f"eval_sigma must be > 0 (a noise std in [0, 1] pixel units, e.g. 0.294 for 75/255), got {eval_sigma}.")
        self.model = NoisyImageModel(image_size=self.hparams.image_size, in_chans=self.hparams.in_chans, **{**DEFAULT_ARCHITECTURE, **(architecture or {})})
        self.val_metrics = mean_metrics("loss", "psnr", "psnr_noisy")
        self.test_metrics = mean_metrics("loss", "psnr", "psnr_noisy")

    def purifier(self, **settings) -> NIMPurifier:
        """The model as the De^3 defense (`NIMPurifier`), at `eval_sigma` unless `settings` say otherwise."""
        return NIMPurifier(self.model, **{"sigma": self.hparams.eval_sigma, **settings})

    def noised(self, images: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, C, S, S) plus Gaussian noise of per-image std sigma (B,), not clamped."""
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return images + sigma.view(-1, 1, 1, 1) * noise

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        loss = self.model.reconstruction_loss(self.noised(images, self.noise.sample(len(images), device=images.device)), images)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def evaluation_values(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        sigma = torch.full((len(images),), self.hparams.eval_sigma, device=images.device)
        noisy = self.noised(images, sigma, generator)
        return dict(loss=self.model.reconstruction_loss(noisy, images).expand(len(images)),
                    psnr=per_image_psnr(self.model(noisy, sigma).clamp(0, 1), images), psnr_noisy=per_image_psnr(noisy.clamp(0, 1), images))

    def export(self, directory: Path) -> None:
        """``config.json`` (architecture and training noise) and ``model.safetensors``."""
        self.purifier().save_pretrained(directory, training_noise=self.noise.spec)

    def optimized_parameters(self) -> list[dict]:
        """The denoiser's parameters, without weight decay on norms, biases and position embeddings."""
        return decay_groups(self.model, self.hparams.weight_decay)
