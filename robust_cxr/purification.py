"""Diffusion purification (DiffPure-style), any model behind a purifier (the purify-then-classify defence), and
`load_purifier` for any exported purifier (diffusion or NIM), as plain `nn.Module`s.

Images enter and leave in [0, 1]; the diffusion runs in [-1, 1] in between (GUIDE section 2). A purifier
diffuses its input to a small timestep t* in closed form, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise,
and runs the reverse process back to the clean image. Timestep t indexes the scheduler's `alphas_cumprod`
(the noise level the UNet was trained on at t); timestep 0 stands for the clean image (abar = 1), so the
UNet is called at timesteps t* down to 1 and the last step lands on its x_0 estimate without noise.
"""

from __future__ import annotations

import inspect
import json
import math
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils import is_accelerate_available
from torch import nn
from torch.utils.checkpoint import checkpoint

from robust_cxr.nim import NIM_COMMAND, NIMPurifier, read_nim_config

PurificationMethod = Literal["ddpm", "ddim", "blur"]
Aggregate = Literal["logits", "vote"]
PURIFIER_COMMAND = "python train.py --config configs/purifier.yaml"  # what writes runs/purifier/export
TRAINING_FILE = "training.json"  # in a diffusion export: the timesteps its UNet was trained on
DEFAULT_SETTINGS_FILE = "purifier_settings.json"  # in an export: the settings `load_purifier` uses unless told otherwise
SMOOTHING_SETTING = "smoothing_sigma"  # a purifier setting: the export as the denoiser of denoised smoothing (robust_cxr.smoothing)


class Purifier(nn.Module):
    """images (B, C, H, W) in [0, 1] -> purified images (B, C, H, W) in [0, 1].

    Args:
        unet: epsilon-predicting denoiser, ``unet(x_t, timesteps).sample`` with timesteps (B,).
        scheduler: supplies ``alphas_cumprod`` of the noise schedule the UNet was trained with.
        t_star: diffusion timestep, in [0, num_train_timesteps - 1]; 0 makes ddpm and ddim return the input
            unchanged (blur ignores it).
        method: ``ddpm`` ancestral sampling over every timestep t*, ..., 1 (Ho et al. 2020; DiffPure's
            reference); ``ddim`` with `steps` evenly spaced integer timesteps (Song et al. 2021);
            ``blur`` a Gaussian blur of std `blur_sigma` pixels and nothing else: no network, no learned
            restorer, only the "blurred" degradation of the Defensive Diffusion report as a cheap baseline.
        steps: DDIM steps, in [1, t_star].
        eta: DDIM noise scale in [0, 1]: 0 is deterministic, 1 adds DDPM's posterior noise.
        blur_sigma: std of the blur in pixels, > 0 (``blur`` only).
        differentiable: let gradients flow from output to input through every reverse step (white-box
            attacks, EOT), checkpointing each step of a multi-step reverse process so activations stay about one
            step's worth (a single step runs without: it would only be computed twice). Otherwise
            the purifier runs under `torch.no_grad()` and returns a detached tensor.

    Its strength, for purify-then-fine-tune's training range, is t* (`strength_name`, `strength`, `at_strength`, `draw_strength`).
    """

    strength_name = "t_star"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDPMScheduler,
        t_star: int = 100,
        method: PurificationMethod = "ddim",
        steps: int = 10,
        eta: float = 0.0,
        blur_sigma: float = 1.0,
        differentiable: bool = False,
    ):
        super().__init__()
        num_timesteps = len(scheduler.alphas_cumprod)
        if method not in get_args(PurificationMethod):
            raise ValueError(f"method must be one of {get_args(PurificationMethod)}, got {method!r}.")
        if not 0 <= t_star < num_timesteps:
            raise ValueError(f"t_star must be in [0, {num_timesteps - 1}] ({num_timesteps} scheduler timesteps), got {t_star}.")
        if method == "ddim" and (steps < 1 or steps > t_star > 0):
            raise ValueError(f"steps must be in [1, t_star={t_star}] for ddim, got {steps}.")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}.")
        if blur_sigma <= 0:
            raise ValueError(f"blur_sigma must be > 0 pixels, got {blur_sigma}.")
        self.unet = unet
        self.scheduler = scheduler
        self.t_star = t_star
        self.method = method
        self.steps = steps
        self.eta = eta
        self.blur_sigma = blur_sigma
        self.differentiable = differentiable
        self._alphas_cumprod = scheduler.alphas_cumprod.double().tolist()

    @property
    def label(self) -> str:
        """Report row name, e.g. ``ddim-10@t100``, ``ddim-10-eta1.0@t100``, ``ddpm@t100``, ``blur-s1.0``."""
        if self.method == "blur":
            return f"blur-s{self.blur_sigma}"
        if self.method == "ddpm":
            return f"ddpm@t{self.t_star}"
        noise = f"-eta{self.eta}" if self.eta > 0 else ""
        return f"ddim-{self.steps}{noise}@t{self.t_star}"

    @property
    def stochastic(self) -> bool:
        """Whether it draws noise (diffusing to t* > 0): attacks on it then average its draws (EOT)."""
        return self.method != "blur" and self.t_star > 0

    @property
    def strength(self) -> int:
        """t*, the strength `at_strength` sets."""
        return self.t_star

    def at_strength(self, strength: float, differentiable: bool = False) -> "Purifier":
        """This purifier at t* = round(`strength`) (DDIM steps capped at t*); not differentiable by default: what
        purify-then-fine-tune trains on."""
        t_star = round(strength)
        return Purifier(self.unet, self.scheduler, t_star=t_star, method=self.method, steps=max(1, min(self.steps, t_star)),
                        eta=self.eta, blur_sigma=self.blur_sigma, differentiable=differentiable)

    @staticmethod
    def draw_strength(low: float, high: float) -> int:
        """A t* drawn uniformly from the integers `low`..`high` (Python's `random`, which Lightning seeds)."""
        return random.randint(round(low), round(high))

    @property
    def noise_draws(self) -> int:
        """How many standard normal draws of the images' shape one purification takes: the forward diffusion's, then
        one per reverse step; 0 for blur and t* = 0."""
        return 0 if self.method == "blur" or self.t_star == 0 else len(self._timesteps())

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Purifies (B, C, H, W) images in [0, 1]. `generator` (on the images' device) draws the noise, unless `noise`
        gives it: (`noise_draws`, B, C, H, W) standard normal, the forward diffusion's first, then each reverse step's."""
        if noise is not None and len(noise) != self.noise_draws:
            raise ValueError(f"{self.label} takes {self.noise_draws} noise draws (noise_draws, B, C, H, W), got {len(noise)}.")
        with nullcontext() if self.differentiable else torch.no_grad():
            purified = self._purify(images, generator, noise)
        return purified if self.differentiable else purified.detach()

    def _purify(self, images: torch.Tensor, generator: torch.Generator | None, noise: torch.Tensor | None) -> torch.Tensor:
        if self.method == "blur":
            return _gaussian_blur(images, self.blur_sigma).clamp(0, 1)
        if self.t_star == 0:
            return images
        draws = iter(noise) if noise is not None else (_noise_like(images, generator) for _ in range(self.noise_draws))
        abar = self._alpha_bar(self.t_star)
        return self._reverse(math.sqrt(abar) * (2 * images - 1) + math.sqrt(1 - abar) * next(draws), draws)

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] generated by the reverse process from t* started at pure noise: `noise`
        (`noise_draws`, B, C, H, W) standard normal, x_t* then each reverse step's draw (used by DDPM and by DDIM with
        eta > 0). From the last timestep of the schedule this samples the DDPM's distribution."""
        if len(noise) != self.noise_draws or self.noise_draws == 0:
            raise ValueError(f"{self.label} samples from {self.noise_draws} noise draws (noise_draws, B, C, H, W), got {len(noise)}.")
        with torch.no_grad():
            return self._reverse(noise[0], iter(noise[1:]))

    def _reverse(self, x: torch.Tensor, draws) -> torch.Tensor:
        """The reverse process from x_t* (B, C, H, W) in [-1, 1]-space to [0, 1] images, one draw of `draws` per step."""
        step = self._ddpm_step if self.method == "ddpm" else self._ddim_step
        timesteps = self._timesteps()
        # Checkpointing keeps one step's activations at a time, for a second forward pass in the backward; a single step
        # keeps its own anyway, so it runs without.
        checkpointed = self.differentiable and len(timesteps) > 2
        for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
            # Drawn outside the checkpoint so that its recomputation sees the same noise.
            step_noise = next(draws)
            if checkpointed:
                x = checkpoint(step, x, t, t_prev, step_noise, use_reentrant=False)
            else:
                x = step(x, t, t_prev, step_noise)
        return ((x + 1) / 2).clamp(0, 1)

    def _timesteps(self) -> list[int]:
        """Descending integer timesteps from t* to 0: every one for DDPM, `steps` + 1 evenly spaced for DDIM."""
        if self.method == "ddpm":
            return list(range(self.t_star, -1, -1))
        return [self.t_star * i // self.steps for i in range(self.steps, -1, -1)]

    def _alpha_bar(self, t: int) -> float:
        return 1.0 if t == 0 else self._alphas_cumprod[t]

    def _predict_clean(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The UNet's x_0 estimate from x_t (B, C, H, W) in [-1, 1]-space, clipped to [-1, 1]."""
        parameter = next(self.unet.parameters())
        timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=parameter.device)
        epsilon = self.unet(x.to(parameter.device, parameter.dtype), timesteps).sample.to(x)
        abar = self._alpha_bar(t)
        return ((x - math.sqrt(1 - abar) * epsilon) / math.sqrt(abar)).clamp(-1, 1)

    def _ddpm_step(self, x: torch.Tensor, t: int, t_prev: int, noise: torch.Tensor) -> torch.Tensor:
        """A draw of x_{t-1} from the DDPM posterior q(x_{t-1} | x_t, x_0 estimate)."""
        abar, abar_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        # beta_t = 1 - abar_t / abar_{t-1} equals the scheduler's betas[t] for t >= 2; at t = 1 it lands on the
        # clean image, where the posterior variance is 0 and the mean is the x_0 estimate itself.
        beta = 1 - abar / abar_prev
        clean = self._predict_clean(x, t)
        mean = (math.sqrt(abar_prev) * beta * clean + math.sqrt(1 - beta) * (1 - abar_prev) * x) / (1 - abar)
        return mean + math.sqrt(beta * (1 - abar_prev) / (1 - abar)) * noise

    def _ddim_step(self, x: torch.Tensor, t: int, t_prev: int, noise: torch.Tensor) -> torch.Tensor:
        """The DDIM update from x_t to x_{t_prev} with noise scale `eta`."""
        abar, abar_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        clean = self._predict_clean(x, t)
        # Epsilon re-derived from the clipped x_0 keeps the update consistent; with eta = 1 it is then DDPM's posterior.
        epsilon = (x - math.sqrt(abar) * clean) / math.sqrt(1 - abar)
        sigma = self.eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        return math.sqrt(abar_prev) * clean + math.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * epsilon + sigma * noise

    @classmethod
    def from_pretrained(cls, directory: str | Path, **settings) -> "Purifier":
        """Loads a folder written by `save_pretrained` (UNet in `unet/`, scheduler in `scheduler/`), with plain diffusers.

        `settings` are the other constructor arguments (t_star, method, steps, ...).
        """
        directory = Path(directory)
        for part in ("unet", "scheduler"):
            if not (directory / part).is_dir():
                raise FileNotFoundError(
                    f"{directory / part} is missing: a purifier folder holds unet/ and scheduler/ as written by "
                    "Purifier.save_pretrained (or by diffusers' save_pretrained of a UNet2DModel and a DDPMScheduler). "
                    "`python train.py --config configs/purifier.yaml` writes one to runs/purifier/export."
                )
        unet = load_unet(directory / "unet")
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
        return cls(unet.eval(), scheduler, **settings)

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes the UNet to `directory/unet` and the scheduler to `directory/scheduler` (diffusers format)."""
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        self.scheduler.save_pretrained(directory / "scheduler")


def purifier_class(directory: str | Path) -> type[Purifier] | type[NIMPurifier]:
    """`Purifier` for a diffusion purifier export (``unet/``, ``scheduler/``), `NIMPurifier` for a NIM one (``config.json``,
    ``model.safetensors``)."""
    directory = Path(directory)
    if (directory / "unet").is_dir():
        return Purifier
    if read_nim_config(directory) is not None:
        return NIMPurifier
    raise FileNotFoundError(
        f"{directory} holds no exported purifier: neither a diffusion purifier (unet/ and scheduler/, written by "
        f"`{PURIFIER_COMMAND}` to runs/purifier/export) nor a NIM denoiser (config.json and model.safetensors, written by "
        f"`{NIM_COMMAND}` to runs/nim/export). Point purifier_dir at one of them."
    )


def read_default_settings(directory: str | Path) -> dict[str, Any]:
    """The export's `DEFAULT_SETTINGS_FILE` as a dict (``settings``, and ``selection`` once `select_strength.py` chose a
    strength), or ``{"settings": {}}`` when it has none."""
    path = Path(directory) / DEFAULT_SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else {"settings": {}}


def write_trained_timesteps(directory: str | Path, max_train_timestep: int) -> None:
    """Records in the export (`TRAINING_FILE`) the last timestep its UNet was trained on."""
    (Path(directory) / TRAINING_FILE).write_text(json.dumps({"max_train_timestep": max_train_timestep}) + "\n")


def trained_timesteps(directory: str | Path) -> int | None:
    """The last timestep the export's UNet was trained on (`write_trained_timesteps`), or None where the export does not
    say (written before it was recorded, or not by the purifier stage)."""
    path = Path(directory) / TRAINING_FILE
    return json.loads(path.read_text())["max_train_timestep"] if path.is_file() else None


def check_trained_timestep(directory: str | Path, timestep: int, use: str) -> None:
    """Raises a ValueError naming the fix where `use` needs the UNet of the export in `directory` at `timestep`, beyond
    the timesteps it was trained on (a UNet's noise estimate outside its training range is not one)."""
    trained = trained_timesteps(directory)
    if trained is not None and timestep > trained:
        raise ValueError(f"{use} needs the UNet of {directory} at timestep {timestep}, but it was trained on timesteps up to {trained}: "
                         "train the purifier with --model.init_args.max_train_timestep null (every timestep), or ask for less noise.")


def write_default_settings(directory: str | Path, settings: dict[str, Any], selection: dict[str, Any] | None = None) -> None:
    """Writes `settings` (the purifier's own, e.g. ``{t_star: 75, method: ddim, steps: 1}``) as the export's defaults, with
    the `selection` record that chose them, if any."""
    record = {"settings": settings, **({"selection": selection} if selection is not None else {})}
    (Path(directory) / DEFAULT_SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def resolve_purifier_settings(directory: str | Path, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The export's default settings (`read_default_settings`) overridden by the explicit `settings`; a setting of None
    (``t_star: null`` in a config, which a sweep's ``--...purifier_settings.t_star=50`` can still override) is not given.
    With `SMOOTHING_SETTING` the explicit settings alone: the defaults are purification settings, which denoised smoothing
    does not take."""
    explicit = {name: value for name, value in (settings or {}).items() if value is not None}
    if SMOOTHING_SETTING in explicit:
        return explicit
    return {**read_default_settings(directory)["settings"], **explicit}


def load_purifier(directory: str | Path, differentiable: bool = False, **settings) -> nn.Module:
    """The purifier exported to `directory`, [0, 1] images (B, C, H, W) -> [0, 1] images (B, C, H, W).

    A diffusion purifier stage's export (``unet/``, ``scheduler/``) gives a `Purifier`, a NIM stage's export
    (``config.json``, ``model.safetensors``) a `NIMPurifier`. `settings` are that purifier's own: t_star, method, steps,
    eta, blur_sigma for diffusion; sigma (a number or a noise distribution) for NIM. Both have a strength
    (`strength_name`: t* or sigma) that `at_strength` sets and `draw_strength` draws from a range. Settings not given
    come from the export's `DEFAULT_SETTINGS_FILE` (the diffusion stage's t_star, method and steps, or the strength
    `select_strength.py` chose), then from the purifier's own defaults.

    With the setting `SMOOTHING_SETTING` (``smoothing_sigma``, alone) the export is instead the one-step denoiser of
    denoised smoothing at that sigma (`robust_cxr.smoothing.smoothing_from_export`: `DiffusionSmoothing` or
    `NIMSmoothing`), whose strength is sigma.
    """
    directory = Path(directory)
    kind = purifier_class(directory)
    settings = resolve_purifier_settings(directory, settings)
    if SMOOTHING_SETTING in settings:
        from robust_cxr.smoothing import smoothing_from_export  # it imports this module

        return smoothing_from_export(directory, differentiable=differentiable, **settings)
    allowed = sorted(set(inspect.signature(kind).parameters) - {"unet", "scheduler", "model", "differentiable"})
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(f"{unknown} are not settings of the {kind.__name__} in {directory}; it takes {allowed}.")
    return kind.from_pretrained(directory, differentiable=differentiable, **settings)


def load_unet(directory: str | Path) -> UNet2DModel:
    """`UNet2DModel.from_pretrained(directory)`, with accelerate's low-memory loading only where it is installed
    (diffusers would otherwise warn on every load)."""
    return UNet2DModel.from_pretrained(directory, low_cpu_mem_usage=is_accelerate_available())


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of std `sigma` pixels with reflect padding: (B, C, H, W) -> (B, C, H, W)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


class PurifiedModel(nn.Module):
    """A model behind a purifier: images (B, C, H, W) in [0, 1] -> the model's outputs (B, ...) (logits, restored images,
    ...), averaged over `n_repeats` purifications of each image, which run as one batch of B * n_repeats."""

    def __init__(self, purifier: nn.Module, model: nn.Module, n_repeats: int = 1):
        super().__init__()
        if n_repeats < 1:
            raise ValueError(f"n_repeats must be >= 1, got {n_repeats}.")
        self.purifier = purifier
        self.model = model
        self.n_repeats = n_repeats

    def repeated_outputs(self, images: torch.Tensor, **noise: torch.Tensor) -> torch.Tensor:
        """(n_repeats, B, ...): the model's outputs for each purification of each image. `noise`, the purifier's explicit
        noise keywords (e.g. ``noise``), is that of the n_repeats * B purified images, repeat r of image b at r * B + b."""
        outputs = self.model(self.purifier(images.repeat(self.n_repeats, 1, 1, 1), **noise))
        return outputs.view(self.n_repeats, images.shape[0], *outputs.shape[1:])

    def forward(self, images: torch.Tensor, **noise: torch.Tensor) -> torch.Tensor:
        return self.repeated_outputs(images, **noise).mean(dim=0)


class PurifiedClassifier(PurifiedModel):
    """The defended classifier, purifier then classifier: images (B, C, H, W) in [0, 1] -> logits (B, K).

    ``aggregate="logits"`` returns the mean of the `n_repeats` purifications' logits. ``aggregate="vote"`` returns each
    class's share of the votes (argmax of each repeat's logits), in [0, 1] and summing to 1 per image: not logits, but
    their argmax is the majority class (ties go to the lowest class index) and their order ranks classes by votes, so
    accuracy and AUROC read them like logits. A vote has no gradient; to keep it from masking white-box attacks, the
    backward pass is that of the mean softmax probabilities (straight-through), the forward value is exactly the vote
    shares.
    """

    def __init__(self, purifier: nn.Module, classifier: nn.Module, n_repeats: int = 1, aggregate: Aggregate = "logits"):
        super().__init__(purifier, classifier, n_repeats)
        if aggregate not in get_args(Aggregate):
            raise ValueError(f"aggregate must be one of {get_args(Aggregate)}, got {aggregate!r}.")
        self.aggregate = aggregate

    def forward(self, images: torch.Tensor, **noise: torch.Tensor) -> torch.Tensor:
        logits = self.repeated_outputs(images, **noise)
        if self.aggregate == "logits":
            return logits.mean(dim=0)
        shares = F.one_hot(logits.argmax(dim=2), logits.shape[2]).to(logits.dtype).mean(dim=0)
        probabilities = logits.softmax(dim=2).mean(dim=0)
        return shares + (probabilities - probabilities.detach())
