"""Purify-then-fine-tune for the restorer: the one fine-tuning mechanism behind a frozen purifier, on a tiny restorer and
a tiny untrained diffusion purifier at 32 px: purified training inputs at a drawn t*, the three report subjects with
PSNR / SSIM rows under gray-box and white-box attacks, its configs, and errors that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from diffusers import DDPMScheduler, UNet2DModel

from conftest import CONFIGS, TINY_SUBSET, TINY_UNET, TINY_VIT, run_train, shrink_config
from datamodules import ChestXRayDataModule, Degradation
from lightning_modules import PurifyThenFinetune, PurifyThenFinetuneRestorer, Restorer, TeacherClassifier
from lightning_modules.stage import load_stage_module
from robust_cxr.purification import Purifier
from robust_cxr.tasks import restoration_loss

IMAGE_SIZE = 32
TINY_RESTORER = dict(encoder_depth=2, decoder_channels=[16, 8], feature_channels=8, head_channels=16)
TEST_IMAGES = 36  # of the 240 phantoms of a shrunk config


def _trainer(directory: Path, **limits) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=directory, **limits)


@pytest.fixture(scope="module")
def stages(tmp_path_factory, single_thread) -> dict[str, str]:
    """A tiny restorer trained 4 steps on degraded phantoms, a tiny untrained diffusion purifier (1000 timesteps, so the
    configs' t* apply) and a tiny teacher classifier (a stage of the wrong kind), all at 32 px."""
    directory = tmp_path_factory.mktemp("purify_finetune_restore")
    L.seed_everything(0, verbose=False)
    data = ChestXRayDataModule(image_size=IMAGE_SIZE, synthetic_samples=120, batch_size=16, num_workers=0, degradation=Degradation())
    trainer = _trainer(directory, limit_train_batches=4)
    trainer.fit(Restorer(image_size=IMAGE_SIZE, **TINY_RESTORER), datamodule=data)
    trainer.save_checkpoint(directory / "restorer.ckpt")
    teacher_trainer = _trainer(directory, limit_train_batches=1)
    teacher_trainer.fit(TeacherClassifier(num_classes=2, image_size=IMAGE_SIZE, model_kwargs=TINY_VIT),
                        datamodule=ChestXRayDataModule(image_size=IMAGE_SIZE, synthetic_samples=120, batch_size=16, num_workers=0))
    teacher_trainer.save_checkpoint(directory / "teacher.ckpt")
    unet = UNet2DModel(sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, **TINY_UNET)
    Purifier(unet, DDPMScheduler(num_train_timesteps=1000)).save_pretrained(directory / "purifier")
    return dict(restorer=str(directory / "restorer.ckpt"), purifier=str(directory / "purifier"), teacher=str(directory / "teacher.ckpt"))


def _finetuner(stages: dict[str, str], **overrides) -> PurifyThenFinetuneRestorer:
    settings = dict(image_size=IMAGE_SIZE, restorer_ckpt=stages["restorer"], purifier_dir=stages["purifier"],
                    purifier_settings=dict(t_star=30, method="ddim", steps=2), train_strength_range=(10, 20))
    return PurifyThenFinetuneRestorer(**{**settings, **overrides})


def test_the_restorer_trains_on_inputs_purified_at_a_drawn_t_star(stages, monkeypatch):
    module = _finetuner(stages)
    start = load_stage_module(stages["restorer"], "the stages fixture")
    assert all(torch.equal(a, b) for a, b in zip(module.model.parameters(), start.model.parameters(), strict=True))
    assert module.hparams.encoder_depth == 2  # the network of the checkpoint, not the Restorer defaults
    drawn = []
    monkeypatch.setattr(Purifier, "draw_strength", staticmethod(lambda low, high: drawn.append((low, high)) or 15))
    seen = []
    module.model.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].detach().clone()))
    module.train()
    degraded, clean = torch.rand(4, 1, IMAGE_SIZE, IMAGE_SIZE), torch.rand(4, 1, IMAGE_SIZE, IMAGE_SIZE)
    torch.manual_seed(0)
    loss, _ = module.training_loss({"image": degraded, "clean": clean, "label": torch.tensor([0, 1, 0, 1])})
    torch.manual_seed(0)
    expected = module.purifier.at_strength(15)(degraded)  # the same noise: the purification the model was given
    assert drawn == [(10, 20)] and len(seen) == 1
    torch.testing.assert_close(seen[0], expected)
    assert not torch.allclose(seen[0], degraded, atol=1e-2)  # purified, not the raw inputs
    torch.testing.assert_close(loss, restoration_loss(module.model(expected), clean).mean())  # against the clean targets
    loss.backward()
    assert all(p.grad is None for p in module.purifier.parameters()) and any(p.grad is not None for p in module.model.parameters())
    assert not any(p.requires_grad for p in module.start_model.parameters()) and not module.start_model.training
    assert all(key.startswith(("model.", "val_", "test_")) for key in module.state_dict())  # purifier, start model: not saved


def test_forward_and_the_subjects_put_the_purifier_in_front(stages):
    module = _finetuner(stages).eval()
    images = torch.rand(3, 1, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.manual_seed(1)
        deployed = module(images)
        torch.manual_seed(1)
        torch.testing.assert_close(deployed, module.model(module.purifier(images)))
    subjects = module.robustness_subjects()
    assert [(s.model, s.defense, s.key) for s in subjects] == [
        ("restorer", "none", "restorer"), ("restorer", "purifier/ddim-2@t30", "restorer+purifier"),
        ("restorer_finetuned", "purifier/ddim-2@t30", "restorer_finetuned+purifier"),
    ]
    alone, defended, finetuned = subjects
    assert alone.attack_source("graybox") is None and alone.attack_source("whitebox") is module.start_model
    assert defended.attack_source("graybox") is module.start_model and finetuned.attack_source("graybox") is module.model
    assert defended.defense_module is module.purifier and finetuned.pipeline.purifier is module.purifier


def test_train_py_reports_the_three_subjects_under_graybox_and_whitebox(stages, tmp_path, single_thread):
    config = shrink_config(CONFIGS / "purify_finetune_restore.yaml", tmp_path)
    run_dir = tmp_path / "run"
    metrics = run_train(config, run_dir, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                        "--model.init_args.restorer_ckpt", stages["restorer"], "--model.init_args.purifier_dir", stages["purifier"])
    rows = json.loads((run_dir / "robustness_report.json").read_text())
    table = {(row["model"], row["defense"], row["attack"], row["metric"]): row for row in rows}
    defense = "purifier/ddim-1@t30"
    expected = {("restorer", "none", "none"), ("restorer", "none", "pgd10_whitebox_eot2"),
                *((model, defense, attack) for model in ("restorer", "restorer_finetuned")
                  for attack in ("none", "pgd10_graybox", "pgd10_whitebox_eot2"))}
    assert set(table) == {(*key, metric) for key in expected for metric in ("psnr", "ssim")}
    for (model, defense_name, attack, metric), row in table.items():
        assert row["n"] == (TINY_SUBSET if attack == "pgd10_whitebox_eot2" else TEST_IMAGES)
        assert row["threat_model"] == {"none": "none", "pgd10_graybox": "graybox", "pgd10_whitebox_eot2": "whitebox"}[attack]
        assert attack == "none" or 0 < row["perturbation"] <= 4 / 255 + 1e-6
    whitebox = table[("restorer", "none", "pgd10_whitebox_eot2", "psnr")]
    assert whitebox["value"] < whitebox["clean_value"] - 0.5  # the attack works on the restorer alone
    assert table[("restorer", defense, "pgd10_whitebox_eot2", "psnr")]["eot_samples"] == 2
    assert {"test/psnr", "test/robust_psnr/pgd10_graybox/restorer_finetuned+purifier",
            "test/robust_ssim/pgd10_whitebox_eot2/restorer+purifier"} <= set(metrics)
    module = load_stage_module(run_dir, "train.py")
    assert isinstance(module, PurifyThenFinetuneRestorer) and module.purifier.label == "ddim-1@t30" and module.hparams.n_repeats == 4


def test_the_restoration_configs_chain_with_default_paths(capsys):
    from train import main

    def resolved(*configs: str) -> dict:
        with pytest.raises(SystemExit):
            main([argument for name in configs for argument in ("--config", str(CONFIGS / name))] + ["--print_config"])
        return yaml.safe_load(capsys.readouterr().out)

    restore, purifier = resolved("restore.yaml"), resolved("purifier.yaml", "purifier_restore.yaml")
    finetune = resolved("purify_finetune_restore.yaml")
    assert purifier["run_dir"] == "runs/purifier_restore" and purifier["model"]["class_path"].endswith("DiffusionPurifier")
    for config in (purifier, finetune):  # the purifier and the fine-tuning see the restorer's inputs
        assert config["data"]["degradation"] == restore["data"]["degradation"]
        assert config["data"]["synthetic_samples"] == restore["data"]["synthetic_samples"]
    init_args = finetune["model"]["init_args"]
    assert init_args["restorer_ckpt"] == f"{restore['run_dir']}/checkpoints/best.ckpt"
    assert init_args["purifier_dir"] == f"{purifier['run_dir']}/export" and init_args["train_strength_range"] == [20, 40]
    attacks = {attack["name"]: attack for attack in finetune["adversarial"]["attacks"]}
    assert attacks["pgd10_graybox"]["threat_model"] == "graybox" and attacks["pgd10_graybox"].get("max_images") is None
    assert attacks["pgd10_whitebox_eot2"]["eot_samples"] == 2 and attacks["pgd10_whitebox_eot2"]["max_images"] == 64
    assert all(attack["eps"] == pytest.approx(4 / 255, abs=1e-6) and attack["steps"] == 10 for attack in attacks.values())
    assert finetune["adversarial"]["test_max_images"] == restore["adversarial"]["test_max_images"]


def test_bad_inputs_name_the_fix(stages, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no exported purifier.*Point purifier_dir at one of them"):
        _finetuner(stages, purifier_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"holds a TeacherClassifier stage, not a restorer stage; pass a restorer stage's checkpoint "
                                         r"\(made with `python train.py --config configs/restore.yaml`\)"):
        _finetuner(stages, restorer_ckpt=stages["teacher"])
    with pytest.raises(ValueError, match=r"holds a Restorer stage, not a classifier stage"):
        PurifyThenFinetune(num_classes=2, image_size=IMAGE_SIZE, teacher_ckpt=stages["restorer"], purifier_dir=stages["purifier"])
    with pytest.raises(FileNotFoundError, match=r"Make it with `python train.py --config configs/restore.yaml`"):
        _finetuner(stages, restorer_ckpt=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match=r"in_chans: 1 in the checkpoint, 3 here\): .* --data.channels 1\."):
        _finetuner(stages, in_chans=3)
    with pytest.raises(ValueError, match=r"train_strength_range must be \[low, high\] with 0 <= low <= high \(t_star\)"):
        _finetuner(stages, train_strength_range=(20, 10))


@pytest.mark.parametrize("training_attack", ["pipeline", "bpda"])
def test_training_attacks_through_the_pipeline_follow_the_purifier_at_the_batch_strength(stages, training_attack):
    """The training attack's source is the purifier at the batch's strength then the model: its input gradient (fixed
    purifier noise) matches finite differences and differs from the model alone's; BPDA's is the model's gradient at
    the purified image. The training loss purifies at the same strength."""
    module = PurifyThenFinetune(num_classes=2, image_size=IMAGE_SIZE, teacher_ckpt=stages["teacher"], purifier_dir=stages["purifier"],
                                purifier_settings=dict(t_star=30, method="ddim", steps=1), train_strength_range=(20, 40),
                                training_attack=training_attack)
    source = module.adversarial_training_source()
    pipeline = source.pipeline if training_attack == "bpda" else source
    assert 20 <= pipeline.purifier.t_star <= 40 and module.training_purifier().t_star == pipeline.purifier.t_star  # one strength per batch
    source, alone = source.double(), module.model.double().eval()
    torch.manual_seed(0)
    images, labels = torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.float64).mul(0.6).add(0.2), torch.tensor([0, 1])

    def loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)  # the same purifier noise at every call
        return torch.nn.functional.cross_entropy(model(x), labels, reduction="sum")

    x = images.clone().requires_grad_(True)
    gradient = torch.autograd.grad(loss(source, x), x)[0]
    alone_gradient = torch.autograd.grad(loss(alone, x), x)[0]
    assert not torch.allclose(gradient, alone_gradient, atol=1e-6)
    if training_attack == "bpda":
        return
    step = 1e-5
    for position in torch.randint(0, gradient.numel(), (6,)).tolist():
        shift = torch.zeros(gradient.numel(), dtype=torch.float64)
        shift[position] = step
        shift = shift.view_as(images)
        with torch.no_grad():
            estimate = (loss(source, images + shift) - loss(source, images - shift)) / (2 * step)
        assert estimate.item() == pytest.approx(gradient.flatten()[position].item(), rel=1e-4, abs=1e-7)
    module.on_train_batch_end(None, None, 0)
    assert module._batch_strength is None  # the next batch draws its own strength
