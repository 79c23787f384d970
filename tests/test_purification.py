"""Diffusion purification: ranges, the exact-denoiser fixed point, gradients, determinism, save/load, the defended model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from robust_cxr import purification
from robust_cxr.purification import Purifier, PurifiedClassifier

TIMESTEPS = 100


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    ).eval()


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny UNets


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return tiny_unet()


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=TIMESTEPS)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class GaussianDataDenoiser(nn.Module):
    """The exact epsilon predictor for data x_0 ~ N(mean, std^2) per pixel, given in [0, 1] pixel space.

    std = 0 is a point mass at `mean`. Called like a UNet2DModel; records the timesteps it is called at.
    """

    def __init__(self, scheduler: DDPMScheduler, mean: torch.Tensor, std: float = 0.0):
        super().__init__()
        self.alphas_cumprod = scheduler.alphas_cumprod
        self.mean = 2 * mean - 1
        self.variance = (2 * std) ** 2
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the purifier a dtype and device to read
        self.calls: list[torch.Tensor] = []

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> SimpleNamespace:
        self.calls.append(timestep)
        abar = self.alphas_cumprod[timestep].view(-1, 1, 1, 1)
        shrink = abar.sqrt() * self.variance / (abar * self.variance + 1 - abar)
        clean_mean = self.mean + shrink * (sample - abar.sqrt() * self.mean)
        return SimpleNamespace(sample=(sample - abar.sqrt() * clean_mean) / (1 - abar).sqrt())


@pytest.mark.parametrize(
    "settings",
    [dict(method="ddpm", t_star=20), dict(method="ddim", t_star=40, steps=5), dict(method="ddim", t_star=40, steps=5, eta=1.0),
     dict(method="blur", t_star=10, blur_sigma=1.5)],
    ids=["ddpm", "ddim-eta0", "ddim-eta1", "blur"],
)
def test_output_shape_and_range(unet, scheduler, images, settings):
    purified = Purifier(unet, scheduler, **settings)(images, generator=seeded())
    assert purified.shape == images.shape
    assert torch.isfinite(purified).all() and purified.min() >= 0 and purified.max() <= 1
    assert not torch.equal(purified, images)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_t_star_zero_returns_input_exactly(unet, scheduler, images, method):
    assert torch.equal(Purifier(unet, scheduler, t_star=0, method=method)(images), images)


@pytest.mark.parametrize(
    "settings, called_at",
    [(dict(method="ddpm"), list(range(50, 0, -1))), (dict(method="ddim", steps=5), [50, 40, 30, 20, 10]),
     (dict(method="ddim", steps=3, eta=1.0), [50, 33, 16])],
    ids=["ddpm", "ddim-eta0", "ddim-eta1"],
)
def test_exact_denoiser_of_a_point_mass_returns_it(scheduler, images, settings, called_at):
    """With the exact denoiser of a point mass at x0 every posterior is that point, whatever the input."""
    target = torch.rand(1, 1, 16, 16, generator=seeded(5))
    denoiser = GaussianDataDenoiser(scheduler, target)
    purified = Purifier(denoiser, scheduler, t_star=50, **settings)(images, generator=seeded())
    torch.testing.assert_close(purified, target.expand_as(images), atol=1e-4, rtol=0)
    assert [int(t[0]) for t in denoiser.calls] == called_at
    assert all(t.shape == (len(images),) and t.dtype == torch.long and (t == t[0]).all() for t in denoiser.calls)


def test_ddpm_matches_the_mean_of_the_exact_posterior(scheduler):
    """Gaussian data keeps every step linear, so the mean of DDPM's output is exactly E[x_0 | input] (tests every step)."""
    mean, std, t_star = 0.5, 0.1, 50
    denoiser = GaussianDataDenoiser(scheduler, torch.full((1, 1, 1, 1), mean), std)
    inputs = torch.full((8, 1, 64, 64), 0.8)
    purified = Purifier(denoiser, scheduler, t_star=t_star, method="ddpm")(inputs, generator=seeded())
    abar = scheduler.alphas_cumprod[t_star].item()
    variance = (2 * std) ** 2  # in [-1, 1] space
    expected = mean + abar * variance / (abar * variance + 1 - abar) * (0.8 - mean)
    assert abs(purified.mean().item() - expected) < 2e-3
    assert abs(expected - 0.8) > 0.1 and abs(expected - mean) > 0.02  # the check tells shrinkage apart from both ends


def test_ddim_with_eta_one_over_every_timestep_is_ddpm(unet, scheduler, images):
    ddpm = Purifier(unet, scheduler, t_star=12, method="ddpm")(images, generator=seeded(3))
    ddim = Purifier(unet, scheduler, t_star=12, method="ddim", steps=12, eta=1.0)(images, generator=seeded(3))
    torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=0)


def test_blur_is_a_normalised_gaussian_without_the_unet(scheduler):
    denoiser = GaussianDataDenoiser(scheduler, torch.zeros(1, 1, 1, 1))
    impulse = torch.zeros(1, 1, 33, 33)
    impulse[..., 16, 16] = 1.0
    blurred = Purifier(denoiser, scheduler, t_star=10, method="blur", blur_sigma=2.0)(impulse)
    offsets = torch.arange(33.0) - 16
    assert denoiser.calls == []
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))
    assert abs((blurred[0, 0].sum(0) * offsets**2).sum().item() - 4.0) < 0.2  # per-axis variance = sigma^2
    torch.testing.assert_close(blurred[0, 0], blurred[0, 0].T)


@pytest.mark.parametrize(
    "settings", [dict(method="ddpm", t_star=8), dict(method="ddim", t_star=20, steps=4, eta=0.5)], ids=["ddpm", "ddim"]
)
def test_differentiable_mode_gives_input_gradients(unet, scheduler, images, settings):
    inputs = images.clone().requires_grad_(True)
    Purifier(unet, scheduler, differentiable=True, **settings)(inputs, generator=seeded()).sum().backward()
    assert torch.isfinite(inputs.grad).all() and inputs.grad.abs().sum() > 0
    assert not Purifier(unet, scheduler, **settings)(inputs, generator=seeded()).requires_grad


def test_checkpointing_changes_neither_outputs_nor_gradients(unet, scheduler, images, monkeypatch):
    settings = dict(t_star=8, method="ddpm")
    plain = Purifier(unet, scheduler, **settings)(images, generator=seeded(2))
    inputs = images.clone().requires_grad_(True)
    checkpointed = Purifier(unet, scheduler, differentiable=True, **settings)(inputs, generator=seeded(2))
    (gradient,) = torch.autograd.grad(checkpointed.square().sum(), inputs)
    assert torch.equal(checkpointed.detach(), plain)

    monkeypatch.setattr(purification, "checkpoint", lambda step, *args, use_reentrant: step(*args))
    uncheckpointed = Purifier(unet, scheduler, differentiable=True, **settings)(inputs, generator=seeded(2))
    (reference,) = torch.autograd.grad(uncheckpointed.square().sum(), inputs)
    torch.testing.assert_close(gradient, reference)


def test_only_a_multi_step_reverse_process_is_checkpointed(unet, scheduler, images, monkeypatch):
    calls = []
    monkeypatch.setattr(purification, "checkpoint", lambda step, *args, use_reentrant: calls.append(step) or step(*args))
    inputs = images.clone().requires_grad_(True)
    one_step = Purifier(unet, scheduler, t_star=8, method="ddim", steps=1, differentiable=True)(inputs, generator=seeded())
    torch.autograd.grad(one_step.sum(), inputs)
    assert calls == []
    Purifier(unet, scheduler, t_star=8, method="ddim", steps=2, differentiable=True)(inputs, generator=seeded())
    assert len(calls) == 2


def test_generator_seeds_the_noise(unet, scheduler, images):
    purifier = Purifier(unet, scheduler, t_star=10, method="ddpm")
    assert torch.equal(purifier(images, generator=seeded(0)), purifier(images, generator=seeded(0)))
    assert (purifier(images, generator=seeded(0)) - purifier(images, generator=seeded(1))).abs().max() > 1e-3


def test_save_and_load_purify_identically(unet, scheduler, images, tmp_path):
    settings = dict(t_star=10, method="ddim", steps=5, eta=1.0)
    purifier = Purifier(unet, scheduler, **settings)
    purifier.save_pretrained(tmp_path)
    loaded = Purifier.from_pretrained(tmp_path, **settings)
    plain = Purifier(
        UNet2DModel.from_pretrained(tmp_path / "unet"), DDPMScheduler.from_pretrained(tmp_path / "scheduler"), **settings
    )
    expected = purifier(images, generator=seeded(4))
    assert torch.equal(loaded(images, generator=seeded(4)), expected)
    assert torch.equal(plain(images, generator=seeded(4)), expected)
    with pytest.raises(FileNotFoundError, match="unet"):
        Purifier.from_pretrained(tmp_path / "missing")


def test_labels(unet, scheduler):
    assert Purifier(unet, scheduler, t_star=50, steps=10).label == "ddim-10@t50"
    assert Purifier(unet, scheduler, t_star=50, steps=10, eta=1.0).label == "ddim-10-eta1.0@t50"
    assert Purifier(unet, scheduler, t_star=50, method="ddpm").label == "ddpm@t50"
    assert Purifier(unet, scheduler, t_star=50, method="blur").label == "blur-s1.0"


class CountingPurifier(nn.Module):
    """Wraps a purifier and records the batch size of every call."""

    def __init__(self, purifier: nn.Module):
        super().__init__()
        self.purifier = purifier
        self.batch_sizes: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(len(images))
        return self.purifier(images)


def test_purified_classifier_runs_the_repeats_as_one_batch(unet, scheduler, images):
    counting = CountingPurifier(Purifier(unet, scheduler, t_star=10, steps=2, differentiable=True))
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(256, 3))
    inputs = images.clone().requires_grad_(True)
    logits = PurifiedClassifier(counting, classifier, n_repeats=3)(inputs)
    assert counting.batch_sizes == [3 * len(images)]
    assert logits.shape == (len(images), 3)
    (gradient,) = torch.autograd.grad(logits[:, 0].sum(), inputs)
    assert gradient.abs().sum() > 0


class LookupClassifier(nn.Module):
    """Returns fixed logits (N, K) for a batch of N images, whatever the images."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits + 0 * images.sum()


def test_vote_returns_the_majority_class_and_logits_the_mean():
    # Repeat-major batch of 3 repeats x 2 images: image 0 votes 2, 2, 0 but its mean logits favour class 0.
    logits = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [9.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    images = torch.rand(2, 1, 4, 4, requires_grad=True)
    vote = PurifiedClassifier(nn.Identity(), LookupClassifier(logits), n_repeats=3, aggregate="vote")(images)
    mean = PurifiedClassifier(nn.Identity(), LookupClassifier(logits), n_repeats=3, aggregate="logits")(images)
    assert vote.argmax(1).tolist() == [2, 1] and mean.argmax(1).tolist() == [0, 1]
    torch.testing.assert_close(vote.detach(), torch.tensor([[1 / 3, 0, 2 / 3], [1 / 3, 2 / 3, 0]]))
    torch.testing.assert_close(mean, logits.view(3, 2, 3).mean(0))


def test_vote_passes_gradients_straight_through(unet, scheduler, images):
    inputs = images.clone().requires_grad_(True)
    purifier = Purifier(unet, scheduler, t_star=10, steps=2, differentiable=True)
    vote = PurifiedClassifier(purifier, nn.Sequential(nn.Flatten(), nn.Linear(256, 2)), n_repeats=2, aggregate="vote")(inputs)
    (gradient,) = torch.autograd.grad(vote[:, 0].sum(), inputs)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


@pytest.mark.parametrize(
    "settings, parameter",
    [(dict(t_star=-1), "t_star"), (dict(t_star=TIMESTEPS), "t_star"), (dict(method="euler"), "method"),
     (dict(steps=0), "steps"), (dict(t_star=5, steps=6), "steps"), (dict(eta=-0.1), "eta"), (dict(eta=1.5), "eta"),
     (dict(method="blur", blur_sigma=0.0), "blur_sigma")],
)
def test_bad_purifier_arguments_name_the_parameter(unet, scheduler, settings, parameter):
    with pytest.raises(ValueError, match=parameter):
        Purifier(unet, scheduler, **{"t_star": 10, **settings})


@pytest.mark.parametrize("settings, parameter", [(dict(n_repeats=0), "n_repeats"), (dict(aggregate="mean"), "aggregate")])
def test_bad_classifier_arguments_name_the_parameter(settings, parameter):
    with pytest.raises(ValueError, match=parameter):
        PurifiedClassifier(nn.Identity(), nn.Identity(), **settings)
