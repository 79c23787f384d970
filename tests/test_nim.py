"""Noisy image modeling (De^3): noise-scale distributions, the MAE-style denoiser and its stage, the export, the defense
(random, differentiable) and its place wherever the diffusion purifier goes (purify-then-fine-tune, the student)."""

from __future__ import annotations

import json
import math
import random

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from conftest import CONFIGS, TINY_NIM, TINY_UNET, TINY_VIT, run_train, shrink_config
from lightning_modules import NoisyImageModeling, PurifyThenFinetune, TeacherClassifier
from robust_cxr.metrics import per_image_psnr
from robust_cxr.nim import DE3_NOISE, NIMPurifier, NoiseScale, NoisyImageModel, patchify, unpatchify
from robust_cxr.purification import PurifiedClassifier, Purifier, load_purifier

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models

DRAWS = 200_000


def tiny_model(**settings) -> NoisyImageModel:
    torch.manual_seed(0)
    return NoisyImageModel(image_size=32, in_chans=1, **{**TINY_NIM, **settings})


def phantoms(count: int = 16, size: int = 32) -> torch.Tensor:
    """(count, 1, size, size) smooth images in [0, 1]: a bright disc of random centre and radius on a dark ramp."""
    generator = torch.Generator().manual_seed(3)
    grid = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    centre = 0.3 + 0.4 * torch.rand(count, 2, 1, 1, generator=generator)
    radius = 0.15 + 0.15 * torch.rand(count, 1, 1, generator=generator)
    disc = ((x - centre[:, 0]) ** 2 + (y - centre[:, 1]) ** 2 < radius**2).float()
    return (0.2 * x + 0.6 * disc).unsqueeze(1)


@pytest.mark.parametrize(
    ("spec", "mean", "std"),
    [
        (DE3_NOISE, 75 / 255, 15 / 255),
        ({"distribution": "gamma", "shape": 0.5, "scale": 0.2}, 0.1, math.sqrt(0.5) * 0.2),
        ({"distribution": "uniform", "low": 0.0, "high": 30 / 255}, 15 / 255, 30 / 255 / math.sqrt(12)),
        (0.2, 0.2, 0.0),
    ],
    ids=["de3-gamma", "gamma-shape-below-1", "uniform", "fixed"],
)
def test_noise_scale_follows_its_distribution(spec, mean, std):
    noise = NoiseScale.from_spec(spec)
    draws = noise.sample(DRAWS, torch.Generator().manual_seed(0)).double()
    assert draws.shape == (DRAWS,) and (draws >= 0).all()
    assert noise.mean == pytest.approx(mean) and noise.std == pytest.approx(std)
    # Five standard errors of the sample mean (float32 draws: 1e-6 at least); the spread within 2 %.
    assert abs(draws.mean().item() - mean) <= 5 * std / math.sqrt(DRAWS) + 1e-6
    assert draws.std().item() == pytest.approx(std, rel=0.02, abs=1e-6)
    if noise.distribution == "uniform":
        assert draws.min() >= 0 and draws.max() <= 30 / 255


def test_noise_draws_follow_the_generator():
    noise = NoiseScale.from_spec(DE3_NOISE)
    first = noise.sample(64, torch.Generator().manual_seed(1))
    assert torch.equal(first, noise.sample(64, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, noise.sample(64, torch.Generator().manual_seed(2)))
    assert NoiseScale.from_spec(noise.spec).spec == noise.spec == DE3_NOISE


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"distribution": "gaussian", "sigma": 0.1}, "Unknown noise distribution 'gaussian'; choose one of gamma"),
        ({"distribution": "gamma", "mean": 0.3}, "takes the parameters shape, scale"),
        ({"distribution": "uniform", "low": 0.0}, "takes the parameters low, high"),
        ({"distribution": "gamma", "shape": 0.0, "scale": 0.01}, "shape > 0 and scale > 0"),
        ({"distribution": "uniform", "low": 0.2, "high": 0.1}, "0 <= low <= high"),
        (-0.1, "sigma >= 0"),
        ({"shape": 25, "scale": 0.01}, "'distribution' key"),
    ],
)
def test_bad_noise_settings_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        NoiseScale.from_spec(spec)


def test_patchify_round_trips():
    images = torch.rand(2, 3, 16, 16)
    patches = patchify(images, 4)
    assert patches.shape == (2, 16, 48)
    torch.testing.assert_close(patches[0, 1].view(4, 4, 3).permute(2, 0, 1), images[0, :, :4, 4:8])
    assert torch.equal(unpatchify(patches, 4, 3, 16), images)


def test_normalised_patches_are_restored_from_the_noisy_statistics(monkeypatch):
    """With norm_pix_loss the estimate takes each patch's mean and spread from the input less sigma^2: an exact prediction of
    the normalised clean patches at sigma 0 gives the clean image back."""
    model = tiny_model(norm_pix_loss=True)
    clean = phantoms(4) + 0.05 * torch.rand(4, 1, 32, 32)
    target = patchify(clean, 8)
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    monkeypatch.setattr(model, "predict_patches", lambda noisy: normalised)
    torch.testing.assert_close(model(clean, torch.zeros(4)), clean, atol=1e-4, rtol=0)
    assert model.reconstruction_loss(clean, clean).item() < 1e-10


def test_reconstruction_improves_on_a_fixed_batch():
    model = tiny_model()
    clean = phantoms(16)
    sigma = torch.full((16,), 75 / 255)
    noisy = clean + sigma.view(-1, 1, 1, 1) * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))

    def reconstruction_psnr() -> float:
        with torch.no_grad():
            return per_image_psnr(model(noisy, sigma).clamp(0, 1), clean).mean().item()

    before, noisy_psnr = reconstruction_psnr(), per_image_psnr(noisy.clamp(0, 1), clean).mean().item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    noise = NoiseScale.from_spec(DE3_NOISE)
    for step in range(150):
        generator = torch.Generator().manual_seed(100 + step)
        draws = noise.sample(16, generator)
        optimizer.zero_grad()
        model.reconstruction_loss(clean + draws.view(-1, 1, 1, 1) * torch.randn(clean.shape, generator=generator), clean).backward()
        optimizer.step()
    after = reconstruction_psnr()
    assert after > before + 5 and after > noisy_psnr + 3, (before, after, noisy_psnr)


def test_export_round_trips_and_load_purifier_finds_either_kind(tmp_path):
    model = tiny_model()
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    purifier = NIMPurifier(model, sigma={"distribution": "uniform", "low": 0.1, "high": 0.3})
    purifier.save_pretrained(tmp_path / "nim", training_noise=DE3_NOISE)
    config = json.loads((tmp_path / "nim" / "config.json").read_text())
    assert config["_class_name"] == "NoisyImageModel" and config["training_noise"] == DE3_NOISE and config["embed_dim"] == 32
    reloaded = NIMPurifier.from_pretrained(tmp_path / "nim", sigma={"distribution": "uniform", "low": 0.1, "high": 0.3})
    assert torch.equal(reloaded(images, torch.Generator().manual_seed(5)), purifier(images, torch.Generator().manual_seed(5)))
    default = load_purifier(tmp_path / "nim")
    assert isinstance(default, NIMPurifier) and default.noise.spec == {"distribution": "fixed", "sigma": pytest.approx(75 / 255)}
    assert default.label == "nim@s75" and not default.differentiable

    Purifier(UNet2DModel(sample_size=32, in_channels=1, out_channels=1, **TINY_UNET), DDPMScheduler(num_train_timesteps=100),
             t_star=20).save_pretrained(tmp_path / "diffusion")
    diffusion = load_purifier(tmp_path / "diffusion", differentiable=True, t_star=20, steps=2)
    assert isinstance(diffusion, Purifier) and diffusion.label == "ddim-2@t20" and diffusion.differentiable
    with pytest.raises(ValueError, match=r"\['t_star'\] are not settings of the NIMPurifier .* it takes \['sigma'\]"):
        load_purifier(tmp_path / "nim", t_star=20)
    with pytest.raises(FileNotFoundError, match="neither a diffusion purifier .* nor a NIM denoiser"):
        load_purifier(tmp_path)


def test_the_defense_is_random_clamped_and_differentiable():
    purifier = NIMPurifier(tiny_model(), sigma=DE3_NOISE, differentiable=True)
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    purified = purifier(images)
    assert purified.shape == images.shape and purified.min() >= 0 and purified.max() <= 1
    assert not torch.equal(purified, purifier(images))  # a fresh sigma and noise per call
    (gradient,) = torch.autograd.grad(purified.square().sum(), images)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    # EOT through the defended classifier: n_repeats draws in one batch, gradients through every one.
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 2))
    logits = PurifiedClassifier(purifier, classifier, n_repeats=3)(images)
    (gradient,) = torch.autograd.grad(logits[:, 0].sum(), images)
    assert logits.shape == (4, 2) and gradient.abs().sum() > 0
    assert not NIMPurifier(purifier.model, 0.1)(images).requires_grad


def test_strengths_are_sigmas_for_nim_and_t_star_for_diffusion():
    nim = NIMPurifier(tiny_model(), sigma=DE3_NOISE, differentiable=True)
    fixed = nim.at_strength(0.05)
    assert fixed.noise.spec == {"distribution": "fixed", "sigma": 0.05} and not fixed.differentiable and fixed.model is nim.model
    random.seed(0)
    assert all(0.0 <= NIMPurifier.draw_strength(0.0, 30 / 255) <= 30 / 255 for _ in range(100))
    diffusion = Purifier(UNet2DModel(sample_size=32, in_channels=1, out_channels=1, **TINY_UNET), DDPMScheduler(), t_star=100, steps=5)
    assert diffusion.at_strength(3).label == "ddim-3@t3" and diffusion.at_strength(60).label == "ddim-5@t60"
    assert {Purifier.draw_strength(50, 52) for _ in range(100)} == {50, 51, 52}


def test_stage_trains_exports_and_reports_psnr(tmp_path):
    config = shrink_config(CONFIGS / "nim.yaml", tmp_path, synthetic_samples=320, batch_size=16)
    run_dir = tmp_path / "run"
    metrics = run_train(config, run_dir, "--trainer.max_epochs", "4", "--model.init_args.architecture", json.dumps(TINY_NIM),
                        "--model.init_args.lr", "3e-3")
    assert metrics["test/psnr"] > metrics["test/psnr_noisy"] + 2  # about 15.7 dB against 12.0 dB
    module = NoisyImageModeling.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", map_location="cpu").eval()
    exported = load_purifier(run_dir / "export")
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(exported(images, torch.Generator().manual_seed(1)), module.purifier()(images, torch.Generator().manual_seed(1)))
    assert json.loads((run_dir / "export" / "config.json").read_text())["training_noise"] == pytest.approx(DE3_NOISE)


@pytest.mark.parametrize(
    ("settings", "message"),
    [(dict(noise={"distribution": "beta", "a": 1}), "Unknown noise distribution 'beta'"), (dict(eval_sigma=0.0), "eval_sigma"),
     (dict(image_size=36), "multiple of patch_size")],
)
def test_stage_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        NoisyImageModeling(**{"image_size": 32, "architecture": TINY_NIM, **settings})


@pytest.fixture(scope="module")
def teacher_and_nim(tmp_path_factory) -> dict:
    """A tiny 32 px teacher checkpoint (3 steps) and a tiny untrained NIM export."""
    from datamodules import ChestXRayDataModule
    from datamodules.sources import SYNTHETIC_CLASS_NAMES

    directory = tmp_path_factory.mktemp("nim_stages")
    L.seed_everything(0, verbose=False)
    teacher = TeacherClassifier(num_classes=2, class_names=list(SYNTHETIC_CLASS_NAMES), image_size=32, model_kwargs=TINY_VIT)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=directory)
    trainer.fit(teacher, datamodule=ChestXRayDataModule(image_size=32, synthetic_samples=120, batch_size=16, num_workers=0))
    trainer.save_checkpoint(directory / "teacher.ckpt")
    NIMPurifier(tiny_model()).save_pretrained(directory / "nim", training_noise=DE3_NOISE)
    return dict(teacher=str(directory / "teacher.ckpt"), nim=str(directory / "nim"), class_names=list(SYNTHETIC_CLASS_NAMES))


def test_purify_then_finetune_takes_the_nim_purifier(teacher_and_nim, monkeypatch):
    common = dict(num_classes=2, class_names=teacher_and_nim["class_names"], image_size=32, teacher_ckpt=teacher_and_nim["teacher"],
                  purifier_dir=teacher_and_nim["nim"])
    module = PurifyThenFinetune(**common, purifier_settings={"sigma": 75 / 255}, train_strength_range=(0.0, 30 / 255))
    assert isinstance(module.purifier, NIMPurifier) and module.purifier.differentiable
    subjects = module.robustness_subjects()
    assert [(s.model, s.defense) for s in subjects] == [("teacher", "none"), ("teacher", "purifier/nim@s75"),
                                                         ("teacher_finetuned", "purifier/nim@s75")]
    drawn = []
    monkeypatch.setattr(NIMPurifier, "draw_strength", staticmethod(lambda low, high: drawn.append((low, high)) or 0.1))
    module.train()
    batch = {"image": torch.rand(4, 1, 32, 32), "label": torch.tensor([0, 1, 0, 1])}
    loss, _ = module.training_loss(batch)
    loss.backward()
    assert drawn == [(0.0, 30 / 255)]
    assert all(p.grad is None for p in module.purifier.parameters()) and any(p.grad is not None for p in module.model.parameters())
    with pytest.raises(ValueError, match=r"train_strength_range must be \[low, high\] with 0 <= low <= high \(sigma\)"):
        PurifyThenFinetune(**common, train_strength_range=(-0.1, 0.1))
    with pytest.raises(ValueError, match="not settings of the NIMPurifier"):
        PurifyThenFinetune(**common, purifier_settings={"t_star": 100})


def test_the_student_reports_the_teacher_behind_nim(teacher_and_nim):
    from lightning_modules import DistilledStudent

    student = DistilledStudent(num_classes=2, class_names=teacher_and_nim["class_names"], image_size=32,
                               teacher_ckpt=teacher_and_nim["teacher"], purifier_dir=teacher_and_nim["nim"],
                               purifier_settings={"sigma": 0.2}, distill_purified=True)
    defended = {subject.key: subject for subject in student.robustness_subjects()}["teacher+purifier"]
    assert defended.defense == "purifier/nim@s51" and defended.attack_source("graybox") is student.teacher
    images = torch.rand(3, 1, 32, 32)
    assert student.teacher_logits(images).shape == (3, 2)


def test_a_purify_finetune_checkpoint_of_the_old_arguments_keeps_its_diffusion_settings(teacher_and_nim, tmp_path):
    """Checkpoints written before `purifier_settings` held t_star, method, steps and eta as arguments of their own."""
    purifier_dir = tmp_path / "diffusion"
    Purifier(UNet2DModel(sample_size=32, in_channels=1, out_channels=1, **TINY_UNET), DDPMScheduler(), t_star=20).save_pretrained(purifier_dir)
    module = PurifyThenFinetune(num_classes=2, class_names=teacher_and_nim["class_names"], image_size=32,
                                teacher_ckpt=teacher_and_nim["teacher"], purifier_dir=str(purifier_dir))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    hparams = checkpoint["hyper_parameters"]
    del hparams["purifier_settings"], hparams["train_strength_range"]
    hparams.update(t_star=20, method="ddim", steps=2, eta=0.0, train_t_star_range=(10, 20))
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = PurifyThenFinetune.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert loaded.purifier.label == "ddim-2@t20" and loaded.purifier.differentiable
    assert loaded.hparams.purifier_settings == dict(t_star=20, method="ddim", steps=2, eta=0.0)
    assert PurifyThenFinetune.load_from_checkpoint(tmp_path / "new.ckpt", map_location="cpu").purifier.label == "ddim-10@t100"


def test_the_nim_overlay_turns_purify_finetune_into_de3_fine_tuning(capsys):
    import yaml

    from train import main

    with pytest.raises(SystemExit):
        main(["--config", str(CONFIGS / "purify_finetune.yaml"), "--config", str(CONFIGS / "purify_finetune_nim.yaml"), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    init_args = config["model"]["init_args"]
    assert init_args["purifier_dir"] == "runs/nim/export" and init_args["purifier_settings"] == {"sigma": None}  # the export's sigma
    assert init_args["train_strength_range"] == [0.0, pytest.approx(30 / 255)] and config["adversarial"]["train_attack"] is None
    assert init_args["teacher_ckpt"] == "runs/teacher/checkpoints/best.ckpt" and config["run_dir"] == "runs/purify_finetune_nim"
    assert [attack["name"] for attack in config["adversarial"]["attacks"]] == ["pgd10_graybox", "pgd10_whitebox_eot2"]
