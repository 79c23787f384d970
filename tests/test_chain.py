"""The whole chain as in a fresh clone (teacher, purifier, purify-then-fine-tune, student), each stage finding the
previous ones by its config's defaults; the purifier stage (DDPM training, EMA, export) and purify-then-fine-tune."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from conftest import TINY_SUBSET, TINY_UNET, train_stages_in
from lightning_modules import DiffusionPurifier, PurifyThenFinetune
from robust_cxr.purification import Purifier

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """Teacher, purifier, purify-then-fine-tune and student run in one working directory with their configs' default paths."""
    directory = tmp_path_factory.mktemp("chain")
    epochs = {"teacher": 4, "purifier": 2, "purify_finetune": 1, "distill": 1}
    metrics = train_stages_in(directory, {stage: ["--trainer.max_epochs", str(n)] for stage, n in epochs.items()},
                              max_steps=2, synthetic_samples=320)
    return {"runs": directory / "runs", "metrics": metrics}


def test_purifier_stage_exports_a_folder_plain_diffusers_reloads_identically(chain):
    run = chain["runs"] / "purifier"
    export = run / "export"
    unet = UNet2DModel.from_pretrained(export / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(export / "scheduler")
    module = DiffusionPurifier.load_from_checkpoint(run / "checkpoints" / "best.ckpt", map_location="cpu").eval()
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    reloaded = Purifier(unet, scheduler, t_star=100, method="ddim", steps=1)(images, generator=torch.Generator().manual_seed(1))
    trained = module.purifier()(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(reloaded, trained)
    assert 0 <= reloaded.min() and reloaded.max() <= 1


def test_purifier_stage_keeps_ema_weights_apart_in_its_checkpoint(chain):
    state = torch.load(chain["runs"] / "purifier" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    weights = state["state_dict"]
    name = next(key for key in weights if key.startswith("unet.") and key.endswith("weight"))
    assert not torch.equal(weights[name], weights["ema_" + name])
    assert "optimizer_states" in state and state["epoch"] == 1


def test_ema_update_moves_towards_the_weights_outside_autograd():
    module = DiffusionPurifier(image_size=16, unet=dict(TINY_UNET), ema_decay=0.5)
    ema_before = [parameter.clone() for parameter in module.ema_unet.parameters()]
    with torch.no_grad():
        for parameter in module.unet.parameters():
            parameter.add_(1.0)
    module.on_train_batch_end(None, None, 0)  # first update: decay min(0.5, 1 / 10)
    for before, ema, weight in zip(ema_before, module.ema_unet.parameters(), module.unet.parameters()):
        assert torch.allclose(ema, 0.1 * before + 0.9 * weight)
        assert ema.grad_fn is None and not ema.requires_grad


def test_purifier_validation_reports_denoising_loss_and_psnr(chain):
    metrics = chain["metrics"]["purifier"]
    assert metrics["test/denoising_loss"] < 1.0  # an untrained epsilon predictor scores about 1
    assert metrics["test/psnr"] > 10 and metrics["test/psnr_noisy"] > 10


def test_purifier_training_lowers_the_denoising_loss():
    torch.manual_seed(0)
    module = DiffusionPurifier(image_size=16, unet=dict(TINY_UNET), max_train_timestep=200, t_star=50)
    images = torch.rand(16, 1, 1, 1).expand(16, 1, 16, 16)  # flat images: the noise is all that varies in space
    optimizer = torch.optim.Adam(module.unet.parameters(), lr=3e-3)
    generator_seed = 7
    before = module.denoising_loss(module.unet, images, torch.Generator().manual_seed(generator_seed)).item()
    for _ in range(60):
        optimizer.zero_grad()
        module.denoising_loss(module.unet, images).backward()
        optimizer.step()
    after = module.denoising_loss(module.unet, images, torch.Generator().manual_seed(generator_seed)).item()
    assert after < 0.5 * before


def test_fine_tuning_starts_from_the_pretrained_folder(chain):
    export = chain["runs"] / "purifier" / "export"
    module = DiffusionPurifier(image_size=32, pretrained=str(export))
    exported = UNet2DModel.from_pretrained(export / "unet")
    for mine, theirs in zip(module.unet.state_dict().values(), exported.state_dict().values()):
        assert torch.equal(mine, theirs)
    assert module.scheduler.config.num_train_timesteps == DDPMScheduler.from_pretrained(export / "scheduler").config.num_train_timesteps


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(pretrained="does/not/exist"), "not a diffusers model folder"),
        (dict(image_size=33), "multiple of 2"),
        (dict(max_train_timestep=50, t_star=100), "must be >= t_star"),
        (dict(ema_decay=1.0), "ema_decay"),
    ],
)
def test_purifier_rejects_bad_settings(settings, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        DiffusionPurifier(**{"unet": dict(TINY_UNET), **settings})


def test_pretrained_unet_with_other_channels_is_a_clear_error(tmp_path):
    UNet2DModel(in_channels=3, out_channels=3, **TINY_UNET).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="takes 3 channels but the data have 1"):
        DiffusionPurifier(pretrained=str(tmp_path), in_chans=1)


def test_purify_finetune_report_compares_the_three_pipelines_on_the_same_images(chain):
    rows = json.loads((chain["runs"] / "purify_finetune" / "robustness_report.json").read_text())
    table = {(row["model"], row["defense"], row["attack"]): row for row in rows}
    defense = "purifier/ddim-1@t100"
    expected = {
        ("teacher", "none", "none"), ("teacher", "none", "pgd10_whitebox_eot2"),
        ("teacher", defense, "none"), ("teacher", defense, "pgd10_graybox"), ("teacher", defense, "pgd10_whitebox_eot2"),
        ("teacher_finetuned", defense, "none"), ("teacher_finetuned", defense, "pgd10_graybox"),
        ("teacher_finetuned", defense, "pgd10_whitebox_eot2"),
    }
    assert set(table) == expected  # gray-box on the undefended teacher is white-box, so it is not repeated
    metrics = chain["metrics"]["purify_finetune"]  # metric names carry the kind of defense, not its settings
    assert "test/robust_acc/pgd10_graybox/teacher_finetuned+purifier" in metrics
    test_images = {row["n"] for key, row in table.items() if key[2] != "pgd10_whitebox_eot2"}
    assert len(test_images) == 1  # clean and gray-box rows cover the same images
    assert all(table[key]["n"] == TINY_SUBSET for key in table if key[2] == "pgd10_whitebox_eot2")  # its max_images
    for row in rows:
        assert row["perturbation"] is None or row["perturbation"] <= 0.03 + 1e-6
        assert row["accuracy"] <= row["clean_accuracy"]
    grid = Image.open(chain["runs"] / "purify_finetune" / "adversarial_examples.png")
    assert grid.width == 4 * 128 + 2 * 128  # clean, adversarial, perturbation, purified tiles, then the text


def test_purify_finetune_keeps_teacher_and_purifier_frozen_and_out_of_the_checkpoint(chain):
    runs = chain["runs"]
    module = PurifyThenFinetune(
        num_classes=2, image_size=32, teacher_ckpt=str(runs / "teacher" / "checkpoints" / "best.ckpt"),
        purifier_dir=str(runs / "purifier" / "export"),
    )
    for parameter, teacher_parameter in zip(module.model.parameters(), module.start_model.parameters(), strict=True):
        assert torch.equal(parameter, teacher_parameter)
    assert all(key.startswith(("model.", "operating_point.", "train_acc", "val_metrics", "test_metrics")) for key in module.state_dict())
    assert not any(p.requires_grad for p in [*module.start_model.parameters(), *module.purifier.parameters()])
    module.train()
    assert not module.start_model.training and not module.purifier.unet.training
    batch = {"image": torch.rand(4, 1, 32, 32), "label": torch.tensor([0, 1, 0, 1])}
    loss, _ = module.training_loss(batch)
    loss.backward()
    assert all(p.grad is None for p in module.purifier.parameters())
    assert any(p.grad is not None for p in module.model.parameters())


def test_purify_finetune_names_the_missing_teacher_checkpoint(chain, tmp_path):
    with pytest.raises(FileNotFoundError, match="python train.py --config configs/teacher.yaml"):
        PurifyThenFinetune(num_classes=2, teacher_ckpt=str(tmp_path / "none.ckpt"), purifier_dir=str(chain["runs"] / "purifier" / "export"))


def test_purify_finetune_rejects_a_teacher_of_other_classes(chain):
    with pytest.raises(ValueError, match="num_classes: 2 in the checkpoint, 3 here"):
        PurifyThenFinetune(
            num_classes=3, teacher_ckpt=str(chain["runs"] / "teacher" / "checkpoints" / "best.ckpt"),
            purifier_dir=str(chain["runs"] / "purifier" / "export"),
        )


def test_the_student_stage_finds_teacher_and_purifier_and_reports_the_defended_teacher(chain):
    run = chain["runs"] / "student"
    rows = json.loads((run / "robustness_report.json").read_text())
    table = {(row["model"], row["defense"], row["attack"]): row for row in rows}
    defense = "purifier/ddim-1@t100"
    assert {("student", "none", "pgd10_transfer"), ("teacher", "none", "none"), ("teacher", defense, "none"),
            ("teacher", defense, "pgd10_graybox")} <= set(table)
    assert {row["attack"] for row in rows if row["model"] == "student" and row["threat_model"] == "whitebox"} == {"fgsm", "pgd2", "apgd_ce"}
    assert ("teacher", "none", "fgsm") not in table  # the teacher stage's report
    assert ("teacher", defense, "fgsm") not in table  # white-box through the purifier: the purify_finetune report
    costs = {row["model"]: row for row in json.loads((run / "model_costs.json").read_text())["models"]}
    assert set(costs) == {"student", "teacher", f"teacher+purifier/{defense.split('/')[1]}"}
    defended = costs[f"teacher+purifier/{defense.split('/')[1]}"]
    assert defended["parameters"] > costs["teacher"]["parameters"] > costs["student"]["parameters"]


def test_the_chain_summary_reads_every_deployable_model_from_the_stage_reports(chain):
    from summarize import main as summarize

    runs = chain["runs"]
    summary = summarize([str(runs)])
    models = {model["name"]: model for model in summary["models"]}
    assert list(models) == ["teacher", "teacher + purifier", "fine-tuned teacher + purifier", "student"]
    defended = models["teacher + purifier"]
    assert defended["whitebox"]["report"] == "purify_finetune"  # the student's report attacks it gray-box only
    assert {attack["attack"] for attack in defended["whitebox"]["attacks"]} == {"pgd10_graybox", "pgd10_whitebox_eot2"}
    assert models["teacher"]["graybox"] is None and models["student"]["graybox"] is None
    assert all(model["cost"] is not None and model["clean"]["n"] > 0 for model in models.values())
    assert models["fine-tuned teacher + purifier"]["cost"] == models["teacher + purifier"]["cost"]
    assert summary["chain"]["max_epochs"] == {"teacher": 4, "purifier": 2, "purify_finetune": 1, "student": 1}
    recommended = summary["recommendation"]["model"]
    assert recommended in models or (recommended is None and summary["recommendation"]["reason"].startswith("No model meets the rule"))
    assert (runs / "SUMMARY.md").read_text().startswith("# Chain summary")
