"""Stage 2: the diffusion purifier, a diffusers `UNet2DModel` trained or fine-tuned as a DDPM on the chest X-rays."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from lightning_modules.stage import ExportingDenoiserStage, mean_metrics
from robust_cxr.metrics import per_image_psnr
from robust_cxr.purification import PurificationMethod, Purifier, load_unet, write_default_settings, write_trained_timesteps

DEFAULT_UNET = dict(
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    add_attention=False,
)


class DiffusionPurifier(ExportingDenoiserStage):
    """An epsilon-predicting DDPM on images in [0, 1] (mapped to [-1, 1] inside), with EMA weights.

    Training draws t uniformly from 1..`max_train_timestep` and regresses the noise of
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise. Validation and test use the EMA weights: they log
    ``{stage}/denoising_loss`` (same objective, fixed noise per batch) and ``{stage}/psnr``, the PSNR in dB
    of clean images purified at `t_star` against the originals (with ``{stage}/psnr_noisy`` of x_t* itself
    for comparison). At the end of `fit`, the EMA UNet and the scheduler are exported with diffusers'
    `save_pretrained` to ``<run dir>/<export_dir>`` (``unet/``, ``scheduler/``), which
    `Purifier.from_pretrained` (or plain diffusers) reloads, with `t_star`, `method` and `steps` as the export's default
    settings (``purifier_settings.json``, read by `load_purifier`).

    Args:
        unet: `UNet2DModel` arguments for training from scratch (channels and sample size come from the data).
        pretrained: a local diffusers folder to fine-tune from instead: an export of this stage (``unet/`` and
            ``scheduler/``) or a bare `UNet2DModel` folder (``config.json`` and weights).
        num_train_timesteps, beta_schedule, beta_start, beta_end: the `DDPMScheduler` (a pretrained folder's
            ``scheduler/`` takes precedence).
        max_train_timestep: train on timesteps up to this one only; purification never goes beyond t*, so
            a small range learns the useful noise levels faster. None trains on all.
        ema_decay: decay of the weights' exponential moving average (warmed up as (1 + n) / (10 + n)).
        t_star, method, steps: the purification whose PSNR validation reports.
        lr, weight_decay, warmup_epochs: AdamW with linear warmup, then cosine decay per step.
        denoiser: ``export_dir`` and the data (see `ExportingDenoiserStage`; the DDPM is unconditional: no classes).
    """

    def __init__(
        self,
        unet: dict[str, Any] | None = None,
        pretrained: str | None = None,
        num_train_timesteps: int = 1000,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        max_train_timestep: int | None = 200,
        ema_decay: float = 0.999,
        t_star: int = 100,
        method: PurificationMethod = "ddim",
        steps: int = 5,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_epochs: float = 0.5,
        **denoiser: Any,
    ):
        super().__init__(**denoiser)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")
        schedule = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end)
        if pretrained is None:
            self.unet, self.scheduler = _new_unet(self.hparams.in_chans, self.hparams.image_size, unet), DDPMScheduler(**schedule)
        else:
            self.unet, self.scheduler = _load_pretrained(Path(pretrained), self.hparams.in_chans, schedule)
        total_timesteps = self.scheduler.config.num_train_timesteps
        self.max_train_timestep = min(max_train_timestep or total_timesteps - 1, total_timesteps - 1)
        if self.max_train_timestep < t_star:
            raise ValueError(f"max_train_timestep ({max_train_timestep}) must be >= t_star ({t_star}): the UNet would never see t*.")
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.float(), persistent=False)
        self.val_metrics = mean_metrics("denoising_loss", "psnr", "psnr_noisy")
        self.test_metrics = mean_metrics("denoising_loss", "psnr", "psnr_noisy")

    def purifier(self, **settings) -> Purifier:
        """The EMA UNet as a `Purifier` (t_star, method, steps from the hyperparameters unless given)."""
        hp = self.hparams
        settings = {"t_star": hp.t_star, "method": hp.method, "steps": hp.steps, **settings}
        return Purifier(self.ema_unet, self.scheduler, **settings)

    def denoising_loss(self, unet: UNet2DModel, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean squared error of the predicted noise for images (B, C, H, W) in [0, 1] at random timesteps."""
        clean = 2 * images - 1
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        timesteps = torch.randint(1, self.max_train_timestep + 1, (len(clean),), generator=generator, device=clean.device)
        abar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * clean + (1 - abar).sqrt() * noise
        return F.mse_loss(unet(noisy, timesteps).sample, noise)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.denoising_loss(self.unet, batch["image"])
        self.log("train/denoising_loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        updates = self.global_step
        decay = min(self.hparams.ema_decay, (1 + updates) / (10 + updates))
        torch._foreach_lerp_(list(self.ema_unet.parameters()), list(self.unet.parameters()), 1 - decay)

    def evaluation_values(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        loss = self.denoising_loss(self.ema_unet, images, generator)
        purified = self.purifier()(images, generator=generator)
        abar = self.alphas_cumprod[self.hparams.t_star]
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        noisy = (abar.sqrt() * (2 * images - 1) + (1 - abar).sqrt() * noise + 1) / 2
        return dict(denoising_loss=loss.expand(len(images)), psnr=per_image_psnr(purified, images), psnr_noisy=per_image_psnr(noisy.clamp(0, 1), images))

    def export(self, directory: Path) -> None:
        """The EMA UNet and the scheduler (diffusers folders ``unet/``, ``scheduler/``), t_star, method and steps as the
        export's default settings (`write_default_settings`; a later `select_strength.py` replaces them), and the timesteps
        the UNet was trained on (`write_trained_timesteps`)."""
        self.purifier().save_pretrained(directory)
        hp = self.hparams
        write_default_settings(directory, {"t_star": hp.t_star, "method": hp.method, "steps": hp.steps})
        write_trained_timesteps(directory, self.max_train_timestep)

    def optimized_parameters(self):
        """The UNet's parameters (not its EMA copy)."""
        return self.unet.parameters()


def _new_unet(in_chans: int, image_size: int, settings: dict[str, Any] | None) -> UNet2DModel:
    settings = {**DEFAULT_UNET, **(settings or {})}
    stride = 2 ** (len(settings["block_out_channels"]) - 1)
    if image_size % stride:
        raise ValueError(
            f"image_size {image_size} must be a multiple of {stride} for a UNet with {len(settings['block_out_channels'])} "
            "levels; change --data.image_size or --model.init_args.unet.block_out_channels."
        )
    return UNet2DModel(sample_size=image_size, in_channels=in_chans, out_channels=in_chans, **settings)


def _load_pretrained(directory: Path, in_chans: int, schedule: dict[str, Any]) -> tuple[UNet2DModel, DDPMScheduler]:
    """A UNet and its scheduler from a local diffusers folder (a new `schedule` scheduler if it has none)."""
    unet_directory = directory / "unet" if (directory / "unet").is_dir() else directory
    if not (unet_directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} is not a diffusers model folder (no config.json in it or in unet/). Point --model.init_args.pretrained "
            "at a folder written by save_pretrained, e.g. runs/purifier/export from `python train.py --config configs/purifier.yaml`."
        )
    unet = load_unet(unet_directory)
    if unet.config.in_channels != in_chans:
        raise ValueError(
            f"The UNet in {unet_directory} takes {unet.config.in_channels} channels but the data have {in_chans}; "
            f"set --data.channels {unet.config.in_channels} or train a purifier for {in_chans} channels."
        )
    scheduler_directory = directory / "scheduler"
    scheduler = DDPMScheduler.from_pretrained(scheduler_directory) if scheduler_directory.is_dir() else DDPMScheduler(**schedule)
    return unet, scheduler
