"""The noise of randomized smoothing, and the denoisers of denoised smoothing, as defense modules in front of a classifier.

For a noise level sigma (in [0, 1] pixel units) the smoothed classifier's base classifier sees
``denoise(x + sigma * noise)`` with standard-normal noise (Cohen, Rosenfeld and Kolter 2019; Carlini et al. 2023):
`GaussianSmoothing` has no denoiser (Cohen's baseline), `DiffusionSmoothing` denoises in one step with the purifier
stage's DDPM, `NIMSmoothing` with the NIM stage's denoiser. Each takes the noise as an explicit argument (certification
draws it from keys, `robust_cxr.keyed_noise`) and draws it from torch's global RNG when not given; each is random
(``stochastic``), differentiable on request, and has sigma as its strength, so purify-then-fine-tune can train behind
it (``purifier_settings: {smoothing_sigma: 0.25}``, see `robust_cxr.purification.load_purifier`).
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from robust_cxr.nim import NIMPurifier, NoisyImageModel
from robust_cxr.purification import SMOOTHING_SETTING, Purifier, check_trained_timestep, load_unet, purifier_class

Denoiser = Literal["diffusion", "nim", "none"]


class SmoothingNoise(nn.Module):
    """images (B, C, H, W) in [0, 1] -> ``denoise(images + sigma * noise)`` (B, C, H, W): what the base classifier of
    (denoised) randomized smoothing sees; subclasses define `denoise`.

    Args:
        sigma: the noise standard deviation, > 0, in [0, 1] pixel units.
        differentiable: let gradients flow from output to input (white-box attacks); otherwise the module runs under
            `torch.no_grad()` and returns a detached tensor.

    Its strength, for purify-then-fine-tune's training range, is sigma (`strength_name`, `strength`, `at_strength`,
    `draw_strength`).
    """

    stochastic = True  # a fresh noise draw per call
    strength_name = "sigma"
    denoiser: Denoiser

    def __init__(self, sigma: float, differentiable: bool = False):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"The smoothing noise sigma must be > 0 (a standard deviation in [0, 1] pixel units, e.g. 0.25), got {sigma}.")
        self.sigma = float(sigma)
        self.differentiable = differentiable

    @property
    def label(self) -> str:
        """Report name, e.g. ``diffusion_smoothing@s0.25`` (``gaussian_smoothing@s0.25`` without a denoiser)."""
        name = "gaussian" if self.denoiser == "none" else self.denoiser
        return f"{name}_smoothing@s{self.sigma:g}"

    @property
    def strength(self) -> float:
        """sigma, the strength `at_strength` sets."""
        return self.sigma

    def at_strength(self, strength: float, differentiable: bool = False) -> SmoothingNoise:
        """This module at sigma = `strength`; not differentiable by default: what purify-then-fine-tune trains on."""
        raise NotImplementedError

    @staticmethod
    def draw_strength(low: float, high: float) -> float:
        """A sigma drawn uniformly from [`low`, `high`] (Python's `random`, which Lightning seeds)."""
        return random.uniform(low, high)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``denoise(images + sigma * noise)`` for images (B, C, H, W) in [0, 1] and standard-normal `noise` of their shape
        (None: drawn from torch's global RNG)."""
        if noise is None:
            noise = torch.randn_like(images)
        elif noise.shape != images.shape:
            raise ValueError(f"The noise must have the images' shape {tuple(images.shape)}, got {tuple(noise.shape)}.")
        with nullcontext() if self.differentiable else torch.no_grad():
            denoised = self.denoise(images + self.sigma * noise.to(images))
        return denoised if self.differentiable else denoised.detach()

    def denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        """Clean estimates (B, C, H, W) of noisy images (B, C, H, W) (clean images in [0, 1] plus noise of std sigma)."""
        raise NotImplementedError


class GaussianSmoothing(SmoothingNoise):
    """Randomized smoothing without a denoiser (Cohen et al. 2019): images + sigma * noise, not clamped (the Gaussian the
    certificate is about, as the classifier trained with noise augmentation saw it)."""

    denoiser = "none"

    def at_strength(self, strength: float, differentiable: bool = False) -> GaussianSmoothing:
        return GaussianSmoothing(strength, differentiable)

    def denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        return noisy


class DiffusionSmoothing(SmoothingNoise):
    """Denoised smoothing with a DDPM as a one-shot denoiser (Carlini et al. 2023): noisy images -> the UNet's one-step
    x_0 estimate, in [0, 1].

    The DDPM works in [-1, 1], where pixel noise of std sigma has std 2 sigma. At the timestep t whose noise level is
    nearest, sqrt((1 - abar_t) / abar_t) = 2 sigma (`matching_timestep`), sqrt(abar_t) (2 (x + delta) - 1) is a sample of
    the forward process at t, and x_0 = (x_t - sqrt(1 - abar_t) epsilon) / sqrt(abar_t), clipped to [-1, 1].

    Args:
        unet: epsilon-predicting denoiser, ``unet(x_t, timesteps).sample`` with timesteps (B,).
        scheduler: supplies ``alphas_cumprod`` of the noise schedule the UNet was trained with; its largest noise level
            bounds sigma.
        sigma, differentiable: see `SmoothingNoise`.
    """

    denoiser = "diffusion"

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, sigma: float, differentiable: bool = False):
        super().__init__(sigma, differentiable)
        self.unet = unet
        self.scheduler = scheduler
        self.timestep = matching_timestep(scheduler.alphas_cumprod, sigma)
        self.alpha_bar = float(scheduler.alphas_cumprod[self.timestep])

    def at_strength(self, strength: float, differentiable: bool = False) -> DiffusionSmoothing:
        return DiffusionSmoothing(self.unet, self.scheduler, strength, differentiable)

    def denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        parameter = next(self.unet.parameters())
        diffused = math.sqrt(self.alpha_bar) * (2 * noisy - 1)
        timesteps = torch.full((len(noisy),), self.timestep, dtype=torch.long, device=parameter.device)
        epsilon = self.unet(diffused.to(parameter), timesteps).sample.to(noisy)
        clean = (diffused - math.sqrt(1 - self.alpha_bar) * epsilon) / math.sqrt(self.alpha_bar)
        return (clean.clamp(-1, 1) + 1) / 2


class NIMSmoothing(SmoothingNoise):
    """Denoised smoothing with the NIM denoiser (De^3), whose training noise is additive Gaussian in pixel space: noisy
    images -> ``clamp(model(noisy, sigma), 0, 1)``; `NIMPurifier` at a fixed sigma with the noise as an argument.

    Args:
        model: the trained `NoisyImageModel`.
        sigma, differentiable: see `SmoothingNoise`.
    """

    denoiser = "nim"

    def __init__(self, model: NoisyImageModel, sigma: float, differentiable: bool = False):
        super().__init__(sigma, differentiable)
        self.model = model

    def at_strength(self, strength: float, differentiable: bool = False) -> NIMSmoothing:
        return NIMSmoothing(self.model, strength, differentiable)

    def denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        parameter = next(self.model.parameters())
        sigma = torch.full((len(noisy),), self.sigma, dtype=parameter.dtype, device=parameter.device)
        return self.model(noisy.to(parameter), sigma).to(noisy).clamp(0, 1)


def matching_timestep(alphas_cumprod: torch.Tensor, sigma: float) -> int:
    """The timestep t of `alphas_cumprod` (T,) whose noise level in [-1, 1] units, sqrt((1 - abar_t) / abar_t), is nearest
    to 2 `sigma` (pixel noise of std sigma in [0, 1] units).

    Raises ValueError when 2 sigma lies above the schedule's largest noise level, naming the largest sigma it reaches.
    """
    alpha_bar = alphas_cumprod.to(torch.float64)
    noise_levels = ((1 - alpha_bar) / alpha_bar).sqrt()
    largest = float(noise_levels.max())
    if 2 * sigma > largest:
        raise ValueError(
            f"The DDPM's noise schedule ({len(alpha_bar)} timesteps) reaches pixel noise sigma {largest / 2:.4g} at most "
            f"(noise level {largest:.4g} in [-1, 1] units), below sigma {sigma}: choose sigma <= {largest / 2:.4g} or an "
            "export whose schedule reaches further (more timesteps or larger betas)."
        )
    return int((noise_levels - 2 * sigma).abs().argmin())


def smoothing_from_export(directory: str | Path, differentiable: bool = False, **settings: float) -> DiffusionSmoothing | NIMSmoothing:
    """Denoised smoothing with the denoiser exported to `directory`, at sigma = ``settings["smoothing_sigma"]``: a
    diffusion purifier export (``unet/``, ``scheduler/``) gives `DiffusionSmoothing`, a NIM export `NIMSmoothing`. The
    export's purification settings (t*, method, ...) do not apply."""
    directory = Path(directory)
    others = sorted(set(settings) - {SMOOTHING_SETTING})
    if others or SMOOTHING_SETTING not in settings:
        raise ValueError(f"Denoised smoothing takes the one setting {SMOOTHING_SETTING} (sigma in [0, 1] pixel units); drop {others}.")
    sigma = settings[SMOOTHING_SETTING]
    if purifier_class(directory) is NIMPurifier:
        return NIMSmoothing(NoisyImageModel.from_pretrained(directory)[0], sigma, differentiable)
    unet = load_unet(directory / "unet").eval()
    smoothing = DiffusionSmoothing(unet, DDPMScheduler.from_pretrained(directory / "scheduler"), sigma, differentiable)
    check_trained_timestep(directory, smoothing.timestep, f"Denoised smoothing at sigma {sigma:g}")
    return smoothing


def smoothing_module(denoiser: Denoiser, sigma: float, purifier_dir: str | Path | None = None) -> SmoothingNoise:
    """The smoothing module of `denoiser` at `sigma`: ``none`` is `GaussianSmoothing`; ``diffusion`` and ``nim`` load the
    export in `purifier_dir`, which must be of that kind (`smoothing_from_export`)."""
    if denoiser == "none":
        return GaussianSmoothing(sigma)
    if denoiser not in ("diffusion", "nim"):
        raise ValueError(f"Unknown denoiser {denoiser!r}: use diffusion, nim or none.")
    if purifier_dir is None:
        example = "runs/purifier/export" if denoiser == "diffusion" else "runs/nim/export"
        raise ValueError(f"The {denoiser} denoiser needs a purifier export: give its folder as purifier_dir (e.g. {example}).")
    exported = "diffusion" if purifier_class(purifier_dir) is Purifier else "nim"
    if exported != denoiser:
        raise ValueError(f"{purifier_dir} holds a {exported} export, not a {denoiser} one: ask for the {exported} denoiser or give a {denoiser} export.")
    return smoothing_from_export(purifier_dir, **{SMOOTHING_SETTING: sigma})
