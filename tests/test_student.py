"""DistilledStudent: KD losses, the frozen teacher, robust distillation with the callback, costs, train.py end to end."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from lightning.pytorch.callbacks import Callback

from callbacks import AdversarialExampleCallback
from conftest import CONFIGS, TINY_UNET, TINY_VIT, run_train, shrink_config
from datamodules import Augmentation, ChestXRayDataModule
from lightning_modules import DistilledStudent, TeacherClassifier
from robust_cxr.attacks import AttackSpec
from robust_cxr.distillation import kd_loss, rslad_loss
from robust_cxr.models import SmallCNN, create_student_classifier, create_timm_classifier
from robust_cxr.purification import Purifier

pytestmark = pytest.mark.usefixtures("single_thread")

EPS = 0.03
CLASS_NAMES = ["normal", "tuberculosis"]


def _datamodule(**overrides) -> ChestXRayDataModule:
    settings = dict(image_size=32, synthetic_samples=240, batch_size=32, num_workers=0, seed=0, augmentation=Augmentation(probability=0.0))
    return ChestXRayDataModule(**{**settings, **overrides})


def _trainer(tmp_path, callbacks=(), **overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    return L.Trainer(callbacks=list(callbacks), **{**settings, **overrides})


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A tiny ViT teacher trained for one epoch at 32 px: enough to test the plumbing, not to teach."""
    directory = tmp_path_factory.mktemp("student_teacher")
    teacher = TeacherClassifier(num_classes=2, class_names=CLASS_NAMES, model_kwargs=TINY_VIT, image_size=32)
    trainer = _trainer(directory, max_epochs=1, limit_val_batches=0)
    # The default augmentation (None in the hyperparameters): an Augmentation object would not load with weights_only.
    trainer.fit(teacher, datamodule=ChestXRayDataModule(image_size=32, synthetic_samples=240, batch_size=32, num_workers=0))
    path = directory / "teacher.ckpt"
    trainer.save_checkpoint(path)
    return path


def _student(teacher_ckpt, **overrides) -> DistilledStudent:
    settings = dict(num_classes=2, class_names=CLASS_NAMES, teacher_ckpt=str(teacher_ckpt), image_size=32, purifier_dir=None)
    return DistilledStudent(**{**settings, **overrides})


# ----------------------------------------------------------------------------- losses
def test_kd_loss_matches_a_value_computed_by_hand():
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1])
    temperature, alpha = 2.0, 0.75

    def softmax(row):
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    kl = sum(
        sum(p * math.log(p / q) for p, q in zip(softmax(t_row), softmax(s_row)))
        for s_row, t_row in zip(student.tolist(), teacher.tolist())
    ) / 2
    ce = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.e / (1 + math.e))) / 2
    expected = alpha * temperature**2 * kl + (1 - alpha) * ce
    assert kd_loss(student, teacher, labels, temperature, alpha).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_with_alpha_zero_is_cross_entropy_and_with_alpha_one_ignores_labels():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 3, generator=generator), torch.randn(8, 3, generator=generator)
    labels = torch.randint(0, 3, (8,), generator=generator)
    torch.testing.assert_close(kd_loss(student, teacher, labels, temperature=4.0, alpha=0.0), F.cross_entropy(student, labels))
    assert kd_loss(student, teacher, labels, 4.0, 1.0) == kd_loss(student, teacher, (labels + 1) % 3, 4.0, 1.0)
    assert kd_loss(teacher, teacher, labels, 4.0, 1.0).abs() < 1e-6  # matching the teacher costs nothing


@pytest.mark.parametrize("temperature, alpha", [(0.0, 0.5), (-1.0, 0.5), (4.0, -0.1), (4.0, 1.5)])
def test_kd_loss_rejects_invalid_settings(temperature, alpha):
    logits = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="temperature" if temperature <= 0 else "alpha"):
        kd_loss(logits, logits, torch.tensor([0, 1]), temperature, alpha)


def test_rslad_loss_weighs_clean_and_adversarial_kl():
    teacher = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    adversarial = torch.tensor([[0.0, 1.0]])  # the first image only
    clean_kl = F.kl_div(F.log_softmax(student, 1), F.softmax(teacher, 1), reduction="batchmean")
    adversarial_kl = F.kl_div(F.log_softmax(adversarial, 1), F.softmax(teacher[:1], 1), reduction="batchmean")
    torch.testing.assert_close(rslad_loss(student, adversarial, teacher, alpha=0.25), 0.75 * clean_kl + 0.25 * adversarial_kl)


# ----------------------------------------------------------------------------- models
def test_small_cnn_is_ten_times_smaller_than_the_default_teacher():
    student = create_student_classifier("small_cnn", num_classes=2, in_chans=1, image_size=64)
    teacher = create_timm_classifier("vit_tiny_r_s16_p8_224", 2, 1, 64, depth=6)
    assert isinstance(student.backbone, SmallCNN)
    assert 10 * sum(p.numel() for p in student.parameters()) <= sum(p.numel() for p in teacher.parameters())
    logits = student(torch.rand(3, 1, 64, 64))
    assert logits.shape == (3, 2)


# ----------------------------------------------------------------------------- teacher handling
class FrozenTeacherWatch(Callback):
    """After the last training batch: the teacher's gradients and whether the optimizer holds its parameters."""

    def on_train_end(self, trainer, pl_module):
        teacher_ids = {id(p) for p in pl_module.teacher.parameters()}
        self.optimized_teacher = [p for group in trainer.optimizers[0].param_groups for p in group["params"] if id(p) in teacher_ids]
        self.teacher_grads = [p.grad for p in pl_module.teacher.parameters() if p.grad is not None]
        self.teacher_training = pl_module.teacher.training


def test_the_teacher_gets_no_gradient_no_optimizer_state_and_no_state_dict_entry(teacher_ckpt, tmp_path):
    student = _student(teacher_ckpt)
    teacher_before = [p.clone() for p in student.teacher.parameters()]
    watch = FrozenTeacherWatch()
    _trainer(tmp_path, [watch], max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(student, datamodule=_datamodule())
    assert watch.optimized_teacher == [] and watch.teacher_grads == [] and not watch.teacher_training
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, student.teacher.parameters()))
    assert all(p.grad is not None for p in student.model.parameters())
    assert all(key.startswith(("model.", "operating_point.", "train_acc", "val_metrics", "test_metrics")) for key in student.state_dict())
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in student.model.parameters())


def test_soft_targets_come_before_the_teachers_operating_point(teacher_ckpt, tmp_path):
    """A teacher that decides at a shifted threshold keeps its probabilities: the student matches those, and the report's
    teacher (``self.teacher``) decides at the threshold."""
    checkpoint = torch.load(teacher_ckpt, weights_only=False)
    checkpoint["state_dict"]["operating_point.offset"] = torch.tensor([0.0, 2.0])
    shifted_ckpt = tmp_path / "shifted_teacher.ckpt"
    torch.save(checkpoint, shifted_ckpt)
    student = _student(shifted_ckpt)
    images = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    network_logits = student.teacher_network(images)
    torch.testing.assert_close(student.teacher_logits(images), network_logits)
    torch.testing.assert_close(student.teacher(images), network_logits + torch.tensor([0.0, 2.0]))


def test_a_missing_teacher_checkpoint_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python train.py --config configs/teacher.yaml"):
        _student(tmp_path / "nowhere.ckpt")


def test_a_teacher_of_other_classes_or_input_is_a_clear_error(teacher_ckpt):
    with pytest.raises(ValueError, match=r"\['normal', 'tuberculosis'\].*\['normal', 'pneumonia'\].*trained on this data"):
        _student(teacher_ckpt, class_names=["normal", "pneumonia"])
    with pytest.raises(ValueError, match="num_classes: 2 in the checkpoint, 3 here"):
        _student(teacher_ckpt, num_classes=3, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="run with --data.channels 1 and --data.image_size 32"):
        _student(teacher_ckpt, in_chans=3, image_size=64)


def test_robust_kd_and_the_training_attack_go_together(teacher_ckpt, tmp_path):
    attack = AdversarialExampleCallback(train_attack=AttackSpec(method="fgsm", eps=EPS))
    with pytest.raises(ValueError, match="set adversarial.train_attack"):
        _trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(_student(teacher_ckpt, robust_kd="ard"), datamodule=_datamodule())
    with pytest.raises(ValueError, match="'ard' or 'rslad'"):
        _trainer(tmp_path, [attack], max_epochs=1, limit_train_batches=1).fit(_student(teacher_ckpt), datamodule=_datamodule())
    trades = AdversarialExampleCallback(train_attack=AttackSpec(method="fgsm", eps=EPS), trades_beta=6.0)
    with pytest.raises(ValueError, match="trades_beta to null"):
        _trainer(tmp_path, [trades], max_epochs=1, limit_train_batches=1).fit(_student(teacher_ckpt, robust_kd="rslad"), datamodule=_datamodule())


# ----------------------------------------------------------------------------- robust distillation
class BatchRecorder(Callback):
    """Keeps the training batches as the training step receives them."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(dict(batch))


@pytest.mark.parametrize("robust_kd", ["ard", "rslad"])
def test_robust_distillation_trains_on_clean_and_adversarial_images(teacher_ckpt, tmp_path, robust_kd):
    recorder = BatchRecorder()
    callback = AdversarialExampleCallback(train_attack=AttackSpec(method="pgd", eps=EPS, steps=2), train_fraction=0.5)
    student = _student(teacher_ckpt, robust_kd=robust_kd)
    _trainer(tmp_path, [callback, recorder], max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(student, datamodule=_datamodule())
    batch = recorder.batches[-1]
    assert batch["adversarial_image"].shape == (16, 1, 32, 32) and batch["image"].shape == (32, 1, 32, 32)
    change = (batch["adversarial_image"] - batch["image"][:16]).flatten(1).abs().amax(dim=1)
    assert torch.all(change > 0) and torch.all(change <= EPS + 1e-6)
    student.eval()
    with torch.no_grad():
        clean_as_adversarial = {**batch, "adversarial_image": batch["image"][:16]}
        assert student.training_loss(batch)[0] != student.training_loss(clean_as_adversarial)[0]
    plan = student.adversarial_training_attack(batch, 16, AttackSpec(method="pgd", eps=EPS, steps=2), None)
    assert plan.paired
    if robust_kd == "ard":
        assert torch.equal(plan.targets, batch["label"][:16]) and plan.loss is None and "teacher_logits" not in plan.batch
    else:
        teacher_logits = student.teacher(batch["image"])
        torch.testing.assert_close(plan.batch["teacher_logits"], teacher_logits)
        torch.testing.assert_close(plan.targets, teacher_logits[:16].softmax(dim=1))


def _save_tiny_purifier(directory):
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, **TINY_UNET)
    Purifier(unet, DDPMScheduler(num_train_timesteps=100), t_star=20).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("distill_purified", [False, True])
def test_the_teacher_behind_the_purifier_is_evaluated_gray_box_and_optionally_distilled(teacher_ckpt, tmp_path, distill_purified):
    purifier_dir = str(_save_tiny_purifier(tmp_path / "purifier"))
    student = _student(teacher_ckpt, purifier_dir=purifier_dir, distill_purified=distill_purified, purifier_settings=dict(t_star=20, steps=2))
    assert student.purifier.label == "ddim-2@t20" and not student.purifier.differentiable
    assert all(not key.startswith(("teacher", "purifier")) for key in student.state_dict())
    subjects = {subject.key: subject for subject in student.robustness_subjects()}
    assert set(subjects) == {"student", "teacher", "teacher+purifier"}
    assert subjects["teacher+purifier"].defense == "purifier/ddim-2@t20"
    assert subjects["student"].attack_source("transfer") is student.teacher
    assert subjects["teacher"].attack_source("transfer") is None
    defended = subjects["teacher+purifier"]
    assert defended.attack_source("graybox") is student.teacher
    assert defended.attack_source("whitebox") is None and defended.attack_source("transfer") is None
    # The soft targets: the purified teacher's when distill_purified, the plain teacher's otherwise.
    images = torch.rand(4, 1, 32, 32)
    assert not torch.allclose(student.defended_teacher(images), student.teacher(images))
    torch.manual_seed(0)
    targets = student.distilled(images)
    torch.manual_seed(0)  # the same diffusion noise
    torch.testing.assert_close(targets, student.defended_teacher(images) if distill_purified else student.teacher(images))


def test_purifier_settings_are_checked(teacher_ckpt, tmp_path):
    with pytest.raises(ValueError, match="distill_purified=True needs purifier_dir"):
        _student(teacher_ckpt, distill_purified=True)
    with pytest.raises(FileNotFoundError, match="configs/purifier.yaml"):
        _student(teacher_ckpt, purifier_dir=str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- end to end
def test_a_kd_student_trains_above_chance_through_train_py(teacher_run, tmp_path):
    # Plain KD: the default ARD needs more than 6 epochs of 840 images to leave chance (docs/benchmarks.md); 4 suffice for KD.
    config = shrink_config(CONFIGS / "distill.yaml", tmp_path, image_size=64, synthetic_samples=1200)
    run_dir = tmp_path / "run"
    teacher_ckpt = teacher_run / "checkpoints" / "best.ckpt"
    metrics = run_train(config, run_dir, "--trainer.max_epochs", "4", "--model.init_args.teacher_ckpt", str(teacher_ckpt),
                        "--model.init_args.purifier_dir", "null", "--adversarial.test_max_images", "32",
                        "--model.init_args.robust_kd", "none", "--adversarial.train_attack", "null")
    assert metrics["test/acc"] > 0.75
    report = {(row["model"], row["attack"]): row for row in json.loads((run_dir / "robustness_report.json").read_text())}
    assert report[("student", "pgd10_transfer")]["threat_model"] == "transfer"
    assert ("teacher", "pgd10_transfer") not in report
    costs = {row["model"]: row for row in json.loads((run_dir / "model_costs.json").read_text())["models"]}
    assert set(costs) == {"student", "teacher"}
    for row in costs.values():
        assert row["parameters"] > 0 and row["latency_ms_batch1"] > 0 and row["latency_ms_batch64"] > 0
    assert costs["teacher"]["parameters_ratio"] > 1
    assert "| student |" in (run_dir / "model_costs.md").read_text()
