"""Certified robustness by (denoised) randomized smoothing: CERTIFY against the closed form of a linear classifier,
abstention on a tie, the DDPM timestep of a sigma, the keyed noise, certify.py on 1 and 2 processes and after a kill,
training behind the smoothing modules, and bad inputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from scipy.stats import binomtest, kstest
from torch import nn

import certify
import lightning_modules.certification
from callbacks.evaluation_journal import BatchJournal
from conftest import CONFIGS, REPO, TINY_UNET, TINY_VIT
from lightning_modules import PurifyThenFinetune, TeacherClassifier
from robust_cxr.certification import ABSTAIN, Certificates, CertificationSettings, RadiusCheck, certify_images, check_radii, clopper_pearson_lower
from robust_cxr.keyed_noise import keyed_normal
from robust_cxr.nim import NIMPurifier, NoisyImageModel
from robust_cxr.purification import load_purifier, write_default_settings
from robust_cxr.smoothing import DiffusionSmoothing, GaussianSmoothing, NIMSmoothing, matching_timestep

CHECKPOINT = Path(__file__).parent / "data" / "tiny_teacher.ckpt"  # TeacherClassifier (timm test_resnet), 64 px, 600 phantoms
CLASS_NAMES = ["normal", "tuberculosis"]
SHAPE = (1, 4, 4)  # the linear classifier's images

pytestmark = pytest.mark.usefixtures("single_thread")


class LinearClassifier(nn.Module):
    """images (B, 1, 4, 4) -> logits (B, 2) = [0, w . (x - 0.5)] with a unit-norm w: class 1 on one side of a hyperplane."""

    def __init__(self):
        super().__init__()
        weight = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        self.register_buffer("weight", weight / weight.norm())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        margin = ((images - 0.5) * self.weight).flatten(1).sum(dim=1)
        return torch.stack([torch.zeros_like(margin), margin], dim=1)


class RandomAnswers(nn.Module):
    """A base classifier that ignores its input: logits (B, 3) drawn from torch's global RNG."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn(len(images), 3)


def test_certify_on_a_linear_classifier_stays_below_its_exact_radius_and_comes_close():
    """For f(x) = [w . (x - 0.5) > 0] and noise N(0, sigma^2), p_A = Phi(|d| / sigma) at signed distance d = w . (x - 0.5)
    from the hyperplane (||w|| = 1), and the smoothed classifier's exact radius is sigma PhiInverse(p_A) = |d|."""
    classifier = LinearClassifier()
    distances = torch.tensor([0.25, 0.5, -0.375])  # p_A = Phi(1), Phi(2), Phi(1.5)
    images = 0.5 + distances[:, None, None, None] * classifier.weight
    settings = CertificationSettings(sigma=0.25, n0=100, n=100_000, alpha=0.001, draws_per_batch=50_000)
    results = certify_images(classifier, GaussianSmoothing(settings.sigma), images, torch.arange(3), settings, num_classes=2)
    true_class = (distances > 0).long()
    assert torch.equal(results["prediction"], true_class) and torch.equal(results["predict"], true_class)
    assert results["counts"].sum(dim=1).tolist() == [100_000] * 3 and results["selection_counts"].sum(dim=1).tolist() == [100] * 3
    exact = distances.abs().double()
    assert (results["radius"] <= exact).all(), (results["radius"], exact)
    assert (results["radius"] >= 0.95 * exact).all(), (results["radius"], exact)
    frequency = results["counts"].gather(1, true_class[:, None])[:, 0] / 100_000
    expected = torch.special.ndtr(exact / settings.sigma)
    assert torch.allclose(frequency.double(), expected, atol=0.005)  # the keyed noise is Gaussian of std sigma


def test_an_l2_attack_within_0_9_radius_changes_no_answer_and_beyond_the_radius_it_does():
    """The radius check on the linear classifier: PGD-L2 with EOT at 0.9 x each certified radius walks toward the
    hyperplane (p_A falls from Phi(d / sigma) to about Phi(0.1 d / sigma)) and PREDICT keeps every certified answer; at
    1.5 x the radius, past the exact one, the same attack flips every answer."""
    classifier = LinearClassifier()
    distances = torch.tensor([0.25, 0.5, -0.375])
    images = 0.5 + distances[:, None, None, None] * classifier.weight
    settings = CertificationSettings(sigma=0.25, n0=100, n=20_000, alpha=0.001, draws_per_batch=20_000)
    smoothing, keys = GaussianSmoothing(settings.sigma), torch.arange(3)
    results = certify_images(classifier, smoothing, images, keys, settings, num_classes=2)
    certified = results["prediction"]
    assert torch.equal(certified, (distances > 0).long())
    within = check_radii(classifier, smoothing, images, keys, results, settings, RadiusCheck(images=3, steps=10, eot_samples=8), 2)
    beyond = check_radii(classifier, smoothing, images, keys, results, settings, RadiusCheck(3, 10, 8, factor=1.5), 2)
    assert torch.allclose(within["check_eps"], 0.9 * results["radius"]) and torch.allclose(beyond["check_eps"], 1.5 * results["radius"])
    assert torch.equal(within["check_predict"], certified) and torch.equal(beyond["check_predict"], 1 - certified)
    share = {name: counts.gather(1, certified[:, None])[:, 0] / settings.n
             for name, counts in (("certified", results["counts"]), ("within", within["check_counts"]), ("beyond", beyond["check_counts"]))}
    assert (share["within"] < share["certified"] - 0.25).all() and (share["within"] > 0.5).all() and (share["beyond"] < 0.4).all(), share
    not_checked = check_radii(classifier, smoothing, images, keys, results, settings, RadiusCheck(images=1), 2)
    assert not_checked["check_eps"].tolist()[1:] == [0, 0] and not_checked["check_predict"].tolist()[1:] == [ABSTAIN, ABSTAIN]


def test_the_lower_bound_is_scipys_exact_clopper_pearson_interval():
    for successes, trials in ((0, 50), (1, 50), (37, 50), (50, 50), (9_871, 10_000)):
        interval = binomtest(successes, trials).proportion_ci(confidence_level=1 - 2 * 0.001, method="exact")
        assert clopper_pearson_lower(np.array([successes]), np.array([trials]), 0.001)[0] == pytest.approx(interval.low, abs=1e-12)


def test_a_tie_between_the_top_two_classes_abstains():
    settings = CertificationSettings(sigma=0.25, n0=100, n=2_000, alpha=0.001, draws_per_batch=1_000)
    on_the_hyperplane = torch.full((1, *SHAPE), 0.5)  # p_A = 1/2 exactly
    tie = certify_images(LinearClassifier(), GaussianSmoothing(settings.sigma), on_the_hyperplane, torch.tensor([0]), settings, 2)
    torch.manual_seed(0)
    random = certify_images(RandomAnswers(), GaussianSmoothing(settings.sigma), torch.rand(3, *SHAPE), torch.arange(3), settings, 3)
    for results in (tie, random):
        assert (results["prediction"] == ABSTAIN).all() and (results["radius"] == 0).all() and (results["predict"] == ABSTAIN).all()
        assert (results["p_lower"] < 0.5).all()
    assert (random["counts"] > 500).all()  # each of the 3 classes drawn about a third of the time


def test_the_results_of_a_single_image_stay_per_image_arrays():
    """torchmetrics squeezes single-element tensors out of `compute`: a certification of one image must not lose its axis."""
    settings = CertificationSettings(sigma=0.25, n0=10, n=100)
    image, key = torch.full((1, *SHAPE), 0.6), torch.tensor([3])
    results = certify_images(LinearClassifier(), GaussianSmoothing(0.25), image, key, settings, 2)
    results.update(check_radii(LinearClassifier(), GaussianSmoothing(0.25), image, key, results, settings, RadiusCheck(), 2))
    certificates = Certificates()
    certificates.update(dict(results, index=torch.tensor([3]), label=torch.tensor([1]), seconds=torch.tensor(0.5)))
    gathered = certificates.compute()
    assert all(gathered[name].shape == (1,) for name in ("index", "label", "prediction", "predict", "radius", "p_lower"))
    assert gathered["counts"].shape == (1, 2) and gathered["counts"].sum() == 100 and float(gathered["seconds"]) == 0.5


@pytest.mark.parametrize("sigma", [0.005, 0.1, 0.25, 0.5, 1.0, 3.0])
def test_the_ddpm_timestep_of_a_sigma_has_the_nearest_noise_level(sigma):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    alpha_bar = scheduler.alphas_cumprod.double().numpy()
    expected = int(np.argmin(np.abs(np.sqrt((1 - alpha_bar) / alpha_bar) - 2 * sigma)))
    assert matching_timestep(scheduler.alphas_cumprod, sigma) == expected
    exact_sigma = math.sqrt((1 - alpha_bar[expected]) / alpha_bar[expected]) / 2
    assert matching_timestep(scheduler.alphas_cumprod, exact_sigma) == expected


class OracleUNet(nn.Module):
    """An epsilon predictor that knows the clean images (B, C, H, W) in [0, 1]: it returns the noise x_t holds."""

    def __init__(self, clean: torch.Tensor, scheduler: DDPMScheduler):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # a parameter, for the module's device and dtype
        self.clean, self.alpha_bar = clean, scheduler.alphas_cumprod.double()
        self.timesteps: list[int] = []

    def forward(self, diffused: torch.Tensor, timesteps: torch.Tensor) -> SimpleNamespace:
        self.timesteps += timesteps.tolist()
        alpha_bar = float(self.alpha_bar[timesteps[0]])
        epsilon = (diffused - math.sqrt(alpha_bar) * (2 * self.clean - 1)) / math.sqrt(1 - alpha_bar)
        return SimpleNamespace(sample=epsilon)


def test_the_diffusion_denoiser_scales_into_the_ddpm_and_returns_its_x0_estimate():
    """With an exact noise predictor, x_t = sqrt(abar_t) (2 (x + delta) - 1) and the one-step x_0 estimate give back x."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    clean = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    oracle = OracleUNet(clean, scheduler)
    smoothing = DiffusionSmoothing(oracle, scheduler, sigma=0.25)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(smoothing(clean, noise), clean, atol=1e-5, rtol=0)
    assert oracle.timesteps == [smoothing.timestep] * 4 == [matching_timestep(scheduler.alphas_cumprod, 0.25)] * 4
    assert smoothing.stochastic and smoothing.label == "diffusion_smoothing@s0.25" and smoothing.strength == 0.25


def test_the_keyed_noise_is_standard_normal_and_depends_on_its_keys_only():
    draws = torch.arange(4_000)
    noise = keyed_normal((1, 8, 8), torch.full_like(draws, 7), draws, seed=3)
    values = noise.flatten().double()
    assert abs(values.mean()) < 0.01 and abs(values.std() - 1) < 0.01 and kstest(values.numpy(), "norm").pvalue > 1e-3
    flat = noise.flatten(1)
    assert abs(torch.corrcoef(torch.stack([flat[:-1, 5], flat[1:, 5]]))[0, 1]) < 0.05  # consecutive draws
    assert abs(torch.corrcoef(flat[:, :2].T)[0, 1]) < 0.05  # the two values of one Box-Muller pair
    rows = keyed_normal((1, 8, 8), torch.tensor([7, 8, 7]), torch.tensor([123, 123, 3_999]), seed=3)
    assert torch.equal(rows[0], noise[123]) and torch.equal(rows[2], noise[3_999]) and not torch.equal(rows[1], noise[123])
    assert not torch.equal(keyed_normal((1, 8, 8), torch.tensor([7]), torch.tensor([123]), seed=4)[0], noise[123])


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """Tiny untrained exports at 64 px: a diffusion purifier of 1000 timesteps (with purifier settings of its own), one of
    10 (reaching sigma 0.17 at most) and a NIM denoiser."""
    directory = tmp_path_factory.mktemp("exports")
    for name, timesteps in (("diffusion", 1000), ("short_schedule", 10)):
        torch.manual_seed(0)
        UNet2DModel(sample_size=64, in_channels=1, out_channels=1, **TINY_UNET).save_pretrained(directory / name / "unet")
        DDPMScheduler(num_train_timesteps=timesteps).save_pretrained(directory / name / "scheduler")
    write_default_settings(directory / "diffusion", {"t_star": 100, "method": "ddim", "steps": 1})
    torch.manual_seed(0)
    nim = NoisyImageModel(image_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    NIMPurifier(nim).save_pretrained(directory / "nim")
    return {name: directory / name for name in ("diffusion", "short_schedule", "nim")}


def test_load_purifier_with_a_smoothing_sigma_gives_the_denoiser_of_either_export(exports):
    diffusion = load_purifier(exports["diffusion"], smoothing_sigma=0.25)  # the export's t* and method do not apply
    nim = load_purifier(exports["nim"], differentiable=True, smoothing_sigma=0.1)
    assert isinstance(diffusion, DiffusionSmoothing) and isinstance(nim, NIMSmoothing) and nim.differentiable
    images = torch.rand(2, 1, 64, 64)
    noise = torch.randn_like(images)
    for module in (diffusion, nim):
        out = module(images, noise)
        assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1 and module.stochastic
        torch.testing.assert_close(module(images, noise), out)  # the noise is the only randomness
        assert not torch.equal(module(images), out)  # drawn when not given
    same_noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(nim(images, same_noise), NIMPurifier(nim.model, 0.1)(images, torch.Generator().manual_seed(5)))  # its fixed sigma
    inputs = torch.rand(1, 1, 64, 64, requires_grad=True)
    nim(inputs).sum().backward()
    assert inputs.grad is not None and inputs.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"takes the one setting smoothing_sigma .* drop \['t_star'\]"):
        load_purifier(exports["diffusion"], smoothing_sigma=0.25, t_star=50)


def test_the_classifier_fine_tunes_behind_the_diffusion_denoiser_at_a_drawn_sigma(exports, monkeypatch):
    common = dict(num_classes=2, class_names=CLASS_NAMES, image_size=64, teacher_ckpt=str(CHECKPOINT), purifier_dir=str(exports["diffusion"]))
    module = PurifyThenFinetune(**common, purifier_settings={"smoothing_sigma": 0.25}, train_strength_range=(0.1, 0.3))
    assert isinstance(module.purifier, DiffusionSmoothing) and module.purifier.differentiable
    assert module.hparams.purifier_settings == {"smoothing_sigma": 0.25}  # none of the export's purification settings
    assert [(s.model, s.defense) for s in module.robustness_subjects()][2] == ("teacher_finetuned", "purifier/diffusion_smoothing@s0.25")
    drawn = []
    monkeypatch.setattr(DiffusionSmoothing, "draw_strength", staticmethod(lambda low, high: drawn.append((low, high)) or 0.2))
    seen = []
    module.model.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].detach().clone()))
    module.train()
    images = torch.rand(4, 1, 64, 64)
    torch.manual_seed(0)
    loss, _ = module.training_loss({"image": images, "label": torch.tensor([0, 1, 0, 1])})
    torch.manual_seed(0)
    torch.testing.assert_close(seen[0], module.purifier.at_strength(0.2)(images))  # noised at the drawn sigma, then denoised
    loss.backward()
    assert drawn == [(0.1, 0.3)] and any(p.grad is not None for p in module.model.parameters())
    assert all(p.grad is None for p in module.purifier.parameters())
    with pytest.raises(ValueError, match="sigma must be > 0"):
        PurifyThenFinetune(**common, purifier_settings={"smoothing_sigma": 0.25}, train_strength_range=(0.0, 0.3))


def test_the_teacher_trains_with_gaussian_noise_augmentation():
    teacher = TeacherClassifier(num_classes=2, image_size=32, model_kwargs=TINY_VIT, train_noise_sigma=0.25)
    seen = []
    teacher.model.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].detach().clone()))
    images = torch.full((64, 1, 32, 32), 0.5)
    teacher.training_loss({"image": images, "label": torch.zeros(64, dtype=torch.long)})
    noise = seen[0] - images
    assert abs(noise.std() - 0.25) < 0.005 and abs(noise.mean()) < 0.005 and noise.max() > 0.5  # not clamped to [0, 1]
    clean = TeacherClassifier(num_classes=2, image_size=32, model_kwargs=TINY_VIT)
    clean.model.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].detach().clone()))
    clean.training_loss({"image": images, "label": torch.zeros(64, dtype=torch.long)})
    assert torch.equal(seen[1], images)
    with pytest.raises(ValueError, match="train_noise_sigma must be >= 0"):
        TeacherClassifier(num_classes=2, train_noise_sigma=-0.1)


def test_the_configs_train_the_two_base_classifiers(capsys):
    import yaml

    from train import main

    def resolved(*configs: str) -> dict:
        with pytest.raises(SystemExit):
            main([argument for config in configs for argument in ("--config", str(CONFIGS / config))] + ["--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    finetune = resolved("purify_finetune.yaml", "purify_finetune_smoothing.yaml")
    assert finetune["model"]["init_args"]["purifier_settings"] == {"smoothing_sigma": 0.25}
    assert finetune["model"]["init_args"]["train_strength_range"] is None and finetune["adversarial"]["train_attack"] is None
    assert finetune["run_dir"] == "runs/purify_finetune_smoothing"
    gaussian = resolved("teacher.yaml", "teacher_gaussian.yaml")
    assert gaussian["model"]["init_args"]["train_noise_sigma"] == 0.25 and gaussian["run_dir"] == "runs/teacher_gaussian"


CERTIFY_SETTINGS = ("--sigma", "0.25", "--n", "48", "--n0", "8", "--max_images", "12", "--data.batch_size", "4", "--draws_per_batch", "32",
                    "--check_images", "4", "--check_steps", "2", "--check_eot", "2")


def _certify(exports: dict[str, Path], output: Path, *overrides: str) -> dict:
    return certify.main([str(CHECKPOINT), "--denoiser", "diffusion", "--purifier_dir", str(exports["diffusion"]), *CERTIFY_SETTINGS,
                         "--output_dir", str(output), *overrides])


@pytest.fixture(scope="module")
def uninterrupted(exports, tmp_path_factory) -> Path:
    """The tiny teacher behind the tiny diffusion denoiser, certified on 12 test images in 3 batches: the output folder."""
    output = tmp_path_factory.mktemp("certify") / "uninterrupted"
    _certify(exports, output)
    return output


def test_certify_writes_certificates_a_report_and_a_curve(uninterrupted):
    certificates = json.loads((uninterrupted / "certificates.json").read_text())
    assert certificates["subject"] == "teacher+diffusion_smoothing@s0.25"
    images = certificates["images"]
    assert [image["index"] for image in images] == list(range(12))
    for image in images:
        assert sum(image["counts"]) == 48 and sum(image["selection_counts"]) == 8
        assert (image["prediction"] is None) == (image["radius"] == 0)
    report = json.loads((uninterrupted / "certification_report.json").read_text())
    assert [row["radius"] for row in report["certified"]] == [0.0, 0.25, 0.5, 1.0, 2.0]
    assert report["certified"][1]["linf_radius"] == pytest.approx(0.25 / 64)  # 64 x 64 px, 1 channel
    accuracies = [row["certified_accuracy"] for row in report["certified"]]
    assert accuracies == sorted(accuracies, reverse=True)
    right = [image for image in images if image["prediction"] == image["label"]]
    assert accuracies[0] == len(right) / 12 and report["forward_passes_per_image"] == 56 and report["images"] == 12
    assert report["abstention_rate"] == sum(image["prediction"] is None for image in images) / 12
    positives = [image for image in images if image["label"] == 1]
    assert report["certified"][0]["certified_sensitivity"] == sum(image["prediction"] == 1 for image in positives) / len(positives)
    curve = json.loads((uninterrupted / "certified_accuracy.json").read_text())
    assert curve["radius"][0] == 0 and curve["certified_accuracy"][0] == accuracies[0] and len(curve["radius"]) == 101
    assert (uninterrupted / "certified_accuracy.png").stat().st_size > 0 and (uninterrupted / "certification_report.md").is_file()
    checked = [image for image in images if image["check_eps"] > 0]
    assert [image["index"] for image in checked] == [image["index"] for image in images if image["index"] < 4 and image["prediction"] is not None]
    assert all(image["check_eps"] == pytest.approx(0.9 * image["radius"]) and sum(image["check_counts"]) == 48 for image in checked)
    check = report["radius_check"]
    assert (check["images_attacked"], check["steps"], check["eot_samples"], check["factor"]) == (len(checked), 2, 2, 0.9)
    assert check["contradicted"] == sum(image["check_predict"] not in (None, image["prediction"]) for image in checked) == 0


class _Killed(Exception):
    """Stands in for a kill (SIGKILL, a SLURM time limit) between two test batches."""


def test_a_killed_certification_resumes_without_certifying_finished_batches_again(exports, uninterrupted, tmp_path, monkeypatch):
    save = BatchJournal.save

    def save_then_die(journal: BatchJournal, batch_idx: int, record: dict) -> None:
        save(journal, batch_idx, record)
        raise _Killed(f"after test batch {batch_idx}")

    monkeypatch.setattr(BatchJournal, "save", save_then_die)
    with pytest.raises(_Killed):
        _certify(exports, tmp_path / "killed")
    monkeypatch.setattr(BatchJournal, "save", save)
    certified = []
    original = lightning_modules.certification.certify_images

    def recording(classifier, smoothing, images, keys, *args):
        certified.append(keys.tolist())
        return original(classifier, smoothing, images, keys, *args)

    monkeypatch.setattr(lightning_modules.certification, "certify_images", recording)
    resumed = _certify(exports, tmp_path / "killed")
    assert [keys for keys in certified if keys] == [[4, 5, 6, 7], [8, 9, 10, 11]]  # batch 0 was loaded, not certified again
    assert (tmp_path / "killed" / "certificates.json").read_text() == (uninterrupted / "certificates.json").read_text()
    expected = json.loads((uninterrupted / "certification_report.json").read_text())
    assert {**resumed, "seconds_per_image": None} == {**expected, "seconds_per_image": None}  # all but the time it took
    with pytest.raises(ValueError, match="n: 48 there, 64 now"):
        _certify(exports, tmp_path / "killed", "--n", "64")


DDP_SETTINGS = ("--denoiser", "none", "--sigma", "0.025", "--n", "64", "--n0", "8", "--max_images", "16", "--data.batch_size", "4",
                "--draws_per_batch", "40")  # Gaussian noise only, at a sigma where the tiny teacher splits its votes on some images


def test_certificates_are_the_same_on_one_and_two_processes(tmp_path):
    certify.main([str(CHECKPOINT), *DDP_SETTINGS, "--output_dir", str(tmp_path / "one_process")])
    command = [sys.executable, "certify.py", str(CHECKPOINT), *DDP_SETTINGS, "--output_dir", str(tmp_path / "two_processes"),
               "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    single, distributed = ((tmp_path / name / "certificates.json").read_text() for name in ("one_process", "two_processes"))
    assert single == distributed
    images = json.loads(single)["images"]
    assert len(images) == 16 and any(0 < min(image["counts"]) for image in images)  # some images split their votes
    assert json.loads((tmp_path / "two_processes" / "batches" / "settings.json").read_text())["world_size"] == 2


def test_bad_inputs_are_errors_that_say_what_to_do(exports, tmp_path):
    run = [str(CHECKPOINT), "--denoiser", "diffusion", "--purifier_dir", str(exports["diffusion"]), "--output_dir", str(tmp_path / "out")]
    for overrides, message in [
        (("--sigma", "0"), "sigma must be > 0"), (("--sigma", "-0.1"), "sigma must be > 0"),
        (("--sigma", "0.25", "--n0", "0"), r"n0 \(selection draws\) must be >= 1"), (("--sigma", "0.25", "--n", "0"), r"n \(estimation draws\) must be >= 1"),
        (("--sigma", "0.25", "--alpha", "0"), r"alpha must lie in \(0, 1\)"), (("--sigma", "0.25", "--alpha", "1.5"), r"alpha must lie in \(0, 1\)"),
        (("--sigma", "0.25", "--check_eot", "1"), r"eot_samples >= 2 \(the smoothed classifier is random\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            certify.main([*run, *overrides])
    with pytest.raises(ValueError, match=r"reaches pixel noise sigma 0\.1\d* at most .* choose sigma <= 0\.1"):
        certify.main([str(CHECKPOINT), "--denoiser", "diffusion", "--purifier_dir", str(exports["short_schedule"]), "--sigma", "0.25"])
    with pytest.raises(ValueError, match="holds a diffusion export, not a nim one"):
        certify.main([str(CHECKPOINT), "--denoiser", "nim", "--purifier_dir", str(exports["diffusion"]), "--sigma", "0.25"])
    with pytest.raises(ValueError, match="needs a purifier export: give its folder as purifier_dir"):
        certify.main([str(CHECKPOINT), "--denoiser", "diffusion", "--sigma", "0.25"])  # the teacher names none
    with pytest.raises(ValueError, match="--denoiser none has no denoiser: drop --purifier_dir"):
        certify.main([str(CHECKPOINT), "--denoiser", "none", "--purifier_dir", str(exports["diffusion"]), "--sigma", "0.25"])
    with pytest.raises(ValueError, match="sigma must be > 0"):
        GaussianSmoothing(0.0)
    purifier_stage = tmp_path / "purifier.ckpt"  # a run without a classifier: the purifier stage's
    datamodule = torch.load(CHECKPOINT, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    torch.save({"module_class": "lightning_modules.purifier.DiffusionPurifier", "datamodule_hyper_parameters": datamodule}, purifier_stage)
    with pytest.raises(ValueError, match="holds a DiffusionPurifier stage, not a classifier stage"):
        certify.main([str(purifier_stage), "--denoiser", "none", "--sigma", "0.25"])
