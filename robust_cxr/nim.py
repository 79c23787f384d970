"""Noisy image modeling (NIM, the De^3 defense): an MAE-style ViT denoiser and its purifier, as plain `nn.Module`s.

`NoisyImageModel` is a masked autoencoder without the masking: the encoder sees every patch of a noised image, a
lighter decoder predicts the clean pixels of every patch. `NIMPurifier` is the De^3 defense in front of a classifier,
images x in [0, 1] -> clamp(decode(x + N(0, sigma^2)), 0, 1), sigma fixed or drawn per image from a `NoiseScale`.
Noise scales are in [0, 1] pixel units (De^3's sigma on the 0-255 scale, divided by 255).
"""

from __future__ import annotations

import inspect
import json
import math
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

NOISE_PARAMETERS = {"gamma": ("shape", "scale"), "uniform": ("low", "high"), "fixed": ("sigma",)}
DE3_NOISE = {"distribution": "gamma", "shape": 25.0, "scale": 3 / 255}  # sigma ~ Gamma(25, 3)/255: mean 75/255, std 15/255
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CLASS_NAME = "NoisyImageModel"
NIM_COMMAND = "python train.py --config configs/nim.yaml"  # what writes runs/nim/export


class NoiseScale:
    """A distribution of per-image noise std sigma in [0, 1] pixel units.

    Args:
        distribution: ``gamma`` (parameters ``shape``, ``scale``; De^3's default is shape 25, scale 3/255),
            ``uniform`` (``low``, ``high``) or ``fixed`` (``sigma``).
        parameters: that distribution's parameters, and no others.
    """

    def __init__(self, distribution: str, **parameters: float):
        if distribution not in NOISE_PARAMETERS:
            choices = ", ".join(f"{name} ({', '.join(names)})" for name, names in NOISE_PARAMETERS.items())
            raise ValueError(f"Unknown noise distribution {distribution!r}; choose one of {choices}.")
        expected = NOISE_PARAMETERS[distribution]
        if set(parameters) != set(expected):
            raise ValueError(
                f"The {distribution} noise distribution takes the parameters {', '.join(expected)}, got {sorted(parameters) or 'none'}: "
                f"e.g. {{distribution: gamma, shape: 25, scale: 0.0117647}} (De^3's Gamma(25, 3)/255)."
            )
        values = {name: float(value) for name, value in parameters.items()}
        if distribution == "gamma" and not (values["shape"] > 0 and values["scale"] > 0):
            raise ValueError(f"Gamma noise needs shape > 0 and scale > 0, got shape {values['shape']} and scale {values['scale']}.")
        if distribution == "uniform" and not 0 <= values["low"] <= values["high"]:
            raise ValueError(f"Uniform noise needs 0 <= low <= high, got low {values['low']} and high {values['high']}.")
        if distribution == "fixed" and values["sigma"] < 0:
            raise ValueError(f"A fixed noise scale needs sigma >= 0, got {values['sigma']}.")
        self.distribution = distribution
        self.parameters = values

    @classmethod
    def from_spec(cls, spec: float | dict[str, Any] | NoiseScale) -> NoiseScale:
        """A noise scale from a number (fixed sigma) or a dict ``{distribution: <name>, <parameter>: <value>, ...}``."""
        if isinstance(spec, NoiseScale):
            return spec
        if isinstance(spec, (int, float)):
            return cls("fixed", sigma=spec)
        if not isinstance(spec, dict) or "distribution" not in spec:
            raise ValueError(f"A noise scale is a number (fixed sigma) or a dict with a 'distribution' key, e.g. {DE3_NOISE}; got {spec!r}.")
        parameters = dict(spec)
        return cls(parameters.pop("distribution"), **parameters)

    @property
    def spec(self) -> dict[str, Any]:
        """The dict `from_spec` rebuilds this distribution from."""
        return {"distribution": self.distribution, **self.parameters}

    @property
    def mean(self) -> float:
        values = self.parameters
        if self.distribution == "gamma":
            return values["shape"] * values["scale"]
        if self.distribution == "uniform":
            return (values["low"] + values["high"]) / 2
        return values["sigma"]

    @property
    def std(self) -> float:
        values = self.parameters
        if self.distribution == "gamma":
            return math.sqrt(values["shape"]) * values["scale"]
        if self.distribution == "uniform":
            return (values["high"] - values["low"]) / math.sqrt(12)
        return 0.0

    @property
    def label(self) -> str:
        """Short name in 8-bit levels, e.g. ``s75``, ``s~gamma(25,3)``, ``s~U(0,30)``."""
        levels = {name: f"{value * 255:.3g}" if name != "shape" else f"{value:.3g}" for name, value in self.parameters.items()}
        if self.distribution == "fixed":
            return f"s{levels['sigma']}"
        if self.distribution == "gamma":
            return f"s~gamma({levels['shape']},{levels['scale']})"
        return f"s~U({levels['low']},{levels['high']})"

    def sample(self, count: int, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """`count` independent draws of sigma, (count,) float32 on `device` (the generator's device when it is given)."""
        device = generator.device if generator is not None else device
        values = self.parameters
        if self.distribution == "fixed":
            return torch.full((count,), values["sigma"], device=device)
        if self.distribution == "uniform":
            return values["low"] + (values["high"] - values["low"]) * torch.rand(count, generator=generator, device=device)
        return _standard_gamma(values["shape"], count, generator, device) * values["scale"]

    def __repr__(self) -> str:
        return f"NoiseScale({self.spec})"


def _standard_gamma(shape: float, count: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(count,) draws of Gamma(shape, 1) by Marsaglia and Tsang's method, vectorised, from `generator`.

    torch's own gamma sampler takes no generator; this one lets a seeded generator fix the noise like every other draw.
    Shapes below 1 are drawn at shape + 1 and scaled by U^(1 / shape).
    """
    boosted = shape < 1
    d = (shape + 1 if boosted else shape) - 1 / 3
    c = 1 / math.sqrt(9 * d)
    draws = torch.empty(count, device=device)
    pending = torch.ones(count, dtype=torch.bool, device=device)
    while pending.any():  # each round accepts > 95 % of the pending draws
        normal = torch.randn(count, generator=generator, device=device)
        uniform = torch.rand(count, generator=generator, device=device)
        v = (1 + c * normal) ** 3
        accept = (v > 0) & (uniform.log() < 0.5 * normal**2 + d - d * v + d * v.clamp_min(1e-12).log())
        newly = pending & accept
        draws[newly] = (d * v)[newly]
        pending &= ~accept
    if boosted:
        draws = draws * torch.rand(count, generator=generator, device=device) ** (1 / shape)
    return draws


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch_size^2 * C) patches in row-major order, pixels (row, column, channel) within a patch."""
    batch, channels, height, width = images.shape
    rows, columns = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, columns, patch_size).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(batch, rows * columns, patch_size**2 * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int, size: int) -> torch.Tensor:
    """The inverse of `patchify` for square (B, C, size, size) images."""
    batch, side = patches.shape[0], size // patch_size
    images = patches.reshape(batch, side, side, patch_size, patch_size, channels).permute(0, 5, 1, 3, 2, 4)
    return images.reshape(batch, channels, size, size)


class NoisyImageModel(nn.Module):
    """An MAE without masking: noisy images (B, C, S, S) (clean [0, 1] images plus noise) -> clean estimates (B, C, S, S).

    The encoder (timm ViT blocks) embeds every patch of the noisy image, mapped to [-1, 1] inside; the decoder, narrower
    and shallower, predicts each patch's pixels. With `norm_pix_loss` the decoder predicts per-patch normalised pixels
    (MAE's target) and the estimate takes each patch's mean and spread from the noisy patch, its variance less sigma^2.

    Args:
        image_size, in_chans: input side and channels; the side must be a multiple of `patch_size`.
        patch_size: side of the square patches (tokens).
        embed_dim, depth, num_heads: the encoder.
        decoder_embed_dim, decoder_depth, decoder_num_heads: the decoder.
        mlp_ratio: MLP width over token width, in both.
        norm_pix_loss: the target is each clean patch normalised to zero mean and unit variance.
    """

    def __init__(
        self,
        image_size: int = 64,
        in_chans: int = 1,
        patch_size: int = 8,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}; change one of them.")
        for width, heads, part in ((embed_dim, num_heads, "embed_dim"), (decoder_embed_dim, decoder_num_heads, "decoder_embed_dim")):
            if width % heads:
                raise ValueError(f"{part} ({width}) must be a multiple of its number of heads ({heads}).")
        self.config = dict(
            image_size=image_size, in_chans=in_chans, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
            norm_pix_loss=norm_pix_loss,
        )
        self.patch_size, self.in_chans, self.image_size, self.norm_pix_loss = patch_size, in_chans, image_size, norm_pix_loss
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, embed_dim)
        tokens = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, tokens, decoder_embed_dim))
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "decoder_pos_embed"}

    def predict_patches(self, noisy: torch.Tensor) -> torch.Tensor:
        """The decoder's output (B, N, patch_size^2 * C) for noisy images (B, C, S, S): pixels in [-1, 1] space, or
        normalised patches with `norm_pix_loss`."""
        tokens = self.blocks(self.patch_embed(2 * noisy - 1) + self.pos_embed)
        tokens = self.decoder_blocks(self.decoder_embed(self.norm(tokens)) + self.decoder_pos_embed)
        return self.decoder_pred(self.decoder_norm(tokens))

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Clean estimates (B, C, S, S) in about [0, 1] (not clamped) of noisy images (B, C, S, S) of noise std sigma (B,)."""
        patches = self.predict_patches(noisy)
        if self.norm_pix_loss:
            noisy_patches = patchify(noisy, self.patch_size)
            clean_variance = (noisy_patches.var(dim=-1, unbiased=False, keepdim=True) - sigma.view(-1, 1, 1) ** 2).clamp_min(0)
            patches = patches * (clean_variance + 1e-6).sqrt() + noisy_patches.mean(dim=-1, keepdim=True)
        else:
            patches = (patches + 1) / 2
        return unpatchify(patches, self.patch_size, self.in_chans, self.image_size)

    def reconstruction_loss(self, noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """Mean squared error over every patch of the prediction for noisy images (B, C, S, S) against the clean ones:
        in [0, 1] pixel units, or against normalised patches with `norm_pix_loss`."""
        patches = self.predict_patches(noisy)
        target = patchify(clean, self.patch_size)
        if self.norm_pix_loss:
            target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
            return F.mse_loss(patches, target)
        return F.mse_loss((patches + 1) / 2, target)

    def save_pretrained(self, directory: str | Path, **extra: Any) -> None:
        """Writes `config.json` (architecture, and `extra` entries such as the training noise) and `model.safetensors`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": MODEL_CLASS_NAME, **self.config, **extra}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file({name: tensor.contiguous() for name, tensor in self.state_dict().items()}, directory / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> tuple[NoisyImageModel, dict[str, Any]]:
        """The model saved by `save_pretrained` in `directory`, in eval mode, and the config's other entries."""
        config = read_nim_config(directory)
        if config is None:
            raise FileNotFoundError(
                f"{Path(directory) / CONFIG_NAME} is missing or not a {MODEL_CLASS_NAME} config: a NIM folder holds {CONFIG_NAME} "
                f"and {WEIGHTS_NAME} as written by `{NIM_COMMAND}` (runs/nim/export)."
            )
        architecture = {name: config.pop(name) for name in list(config) if name in _ARCHITECTURE_NAMES}
        config.pop("_class_name")
        model = cls(**architecture)
        model.load_state_dict(load_file(Path(directory) / WEIGHTS_NAME))
        return model.eval(), config


_ARCHITECTURE_NAMES = set(inspect.signature(NoisyImageModel).parameters)


def read_nim_config(directory: str | Path) -> dict[str, Any] | None:
    """The `config.json` of a NIM export folder, or None when `directory` holds none."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config if config.get("_class_name") == MODEL_CLASS_NAME else None


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class NIMPurifier(nn.Module):
    """The De^3 defense: images (B, C, S, S) in [0, 1] -> clamp(model(x + sigma * noise), 0, 1), (B, C, S, S) in [0, 1].

    Each image gets its own sigma, drawn from `sigma` (fixed, or a distribution), and its own Gaussian noise; the
    defense is therefore random, and white-box attacks need EOT (`PurifiedClassifier` averages `n_repeats` draws).

    Args:
        model: the trained `NoisyImageModel`.
        sigma: the noise scale, in [0, 1] pixel units: a number (fixed) or a `NoiseScale` spec such as
            ``{distribution: uniform, low: 0, high: 0.118}``.
        differentiable: let gradients flow from output to input (white-box attacks); otherwise the defense runs under
            `torch.no_grad()` and returns a detached tensor.

    Its strength, for purify-then-fine-tune's training range, is sigma (`strength_name`, `strength`, `at_strength`, `draw_strength`).
    """

    strength_name = "sigma"

    def __init__(self, model: NoisyImageModel, sigma: float | dict[str, Any] | NoiseScale = 75 / 255, differentiable: bool = False):
        super().__init__()
        self.model = model
        self.noise = NoiseScale.from_spec(sigma)
        self.differentiable = differentiable

    @property
    def label(self) -> str:
        """Report row name, e.g. ``nim@s75`` (sigma 75/255) or ``nim@s~U(0,30)``."""
        return f"nim@{self.noise.label}"

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Purifies (B, C, S, S) images in [0, 1]. `generator` (on the images' device) draws sigma and the noise, unless
        given: `sigma` (B,) the noise std of each image, `noise` (1, B, C, S, S) standard normal."""
        if noise is not None and len(noise) != 1:
            raise ValueError(f"{self.label} takes one noise draw (1, B, C, S, S), got {len(noise)}.")
        with nullcontext() if self.differentiable else torch.no_grad():
            if sigma is None:
                sigma = self.noise.sample(len(images), generator, images.device).to(images.dtype)
            if noise is None:
                noise = torch.randn((1, *images.shape), generator=generator, device=images.device, dtype=images.dtype)
            parameter = next(self.model.parameters())
            noisy = (images + sigma.view(-1, 1, 1, 1) * noise[0]).to(parameter.device, parameter.dtype)
            purified = self.model(noisy, sigma.to(parameter.device, parameter.dtype)).to(images).clamp(0, 1)
        return purified if self.differentiable else purified.detach()

    @property
    def stochastic(self) -> bool:
        """Whether it draws noise (any sigma above 0): attacks on it then average its draws (EOT)."""
        return not (self.noise.distribution == "fixed" and self.noise.mean == 0)

    @property
    def strength(self) -> float:
        """The mean sigma, the strength `at_strength` sets."""
        return self.noise.mean

    def at_strength(self, strength: float, differentiable: bool = False) -> NIMPurifier:
        """This defense at a fixed sigma = `strength` (>= 0); not differentiable by default: what purify-then-fine-tune
        trains on."""
        return NIMPurifier(self.model, float(strength), differentiable)

    @staticmethod
    def draw_strength(low: float, high: float) -> float:
        """A sigma drawn uniformly from [`low`, `high`] (Python's `random`, which Lightning seeds)."""
        return random.uniform(low, high)

    @classmethod
    def from_pretrained(cls, directory: str | Path, sigma: float | dict[str, Any] | None = None, differentiable: bool = False) -> NIMPurifier:
        """Loads a NIM export folder (`NoisyImageModel.save_pretrained`); `sigma` None is fixed at the mean of the noise the
        model was trained with (75/255 for De^3's default)."""
        model, extra = NoisyImageModel.from_pretrained(directory)
        if sigma is None:
            sigma = NoiseScale.from_spec(extra.get("training_noise", DE3_NOISE)).mean
        return cls(model, sigma, differentiable)

    def save_pretrained(self, directory: str | Path, training_noise: dict[str, Any] | None = None) -> None:
        """Writes the model to `directory` (`config.json`, `model.safetensors`), with the noise spec it was trained with."""
        self.model.save_pretrained(directory, training_noise=training_noise or self.noise.spec)
