"""SEViT: heads on a tiny ViT, the majority vote and its tie rule, the KL consistency score, the straight-through
gradient, the detector's threshold, save / load, clear errors, and a tiny teacher -> SEViT run through train.py and
evaluate.py with detection rows in the report."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import train_stages_in
from datamodules import ChestXRayDataModule
from lightning_modules import SelfEnsembleViT, TeacherClassifier
from lightning_modules.stage import load_stage_module
from robust_cxr.metrics import threshold_for_false_positive_rate
from robust_cxr.models import OperatingPoint, create_timm_classifier
from robust_cxr.sevit import BlockHeads, SelfEnsemble, block_tokens_shape, consistency_score, majority_vote, vote_logits

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 64  # the hybrid ViT's patch grid has stride 32: 4 patch tokens per block
TINY_PLAIN_VIT = dict(depth=3, embed_dim=32, num_heads=2)  # vit_tiny_patch16_224 at 32 px: 4 patch tokens of width 32


def _tiny_ensemble(num_heads: int = 3) -> SelfEnsemble:
    torch.manual_seed(0)
    classifier = create_timm_classifier("vit_tiny_patch16_224", 3, 1, 32, **TINY_PLAIN_VIT).eval()
    tokens, dim = block_tokens_shape(classifier, 1, 32)
    return SelfEnsemble(classifier, OperatingPoint(3), BlockHeads(num_heads, tokens, dim, 3, (16, 8))).eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    """A tiny teacher, then SEViT on it from configs/sevit.yaml's default paths, both through train.py, in one folder."""
    directory = tmp_path_factory.mktemp("sevit")
    stages = {"teacher": ["--trainer.max_epochs", "3", "--adversarial.attacks", "[]"],
              "sevit": ["--trainer.max_epochs", "3", "--adversarial.test_max_images", "32"]}
    metrics = train_stages_in(directory, stages, image_size=SIZE, synthetic_samples=320)["sevit"]
    return SimpleNamespace(directory=directory, teacher=directory / "runs" / "teacher", sevit=directory / "runs" / "sevit", metrics=metrics)


def test_heads_take_each_blocks_patch_tokens_and_there_are_no_more_than_blocks():
    ensemble = _tiny_ensemble()
    assert block_tokens_shape(ensemble.classifier, 1, 32) == (4, 32)  # the class token left out
    assert [head[0].in_features for head in ensemble.heads.heads] == [4 * 32] * 3
    images = torch.rand(5, 1, 32, 32)
    members = ensemble.member_logits(images)
    assert members.shape == (4, 5, 3)
    assert torch.allclose(members[0], ensemble.classifier(images), atol=1e-5)  # the ViT member is the ViT
    tokens = ensemble.classifier.backbone.forward_intermediates(ensemble.classifier.normalize(images), indices=[1], output_fmt="NLC")[1][0]
    assert torch.allclose(members[2], ensemble.heads.heads[1](tokens.flatten(1)), atol=1e-6)  # head 1 on block 1
    ensemble.train()
    assert not ensemble.classifier.training and ensemble.heads.training


def test_majority_vote_with_ties_decided_as_the_vit_decides():
    decisions = torch.tensor([[0, 2, 1, 2],   # member 0: the ViT
                              [1, 0, 1, 0],
                              [1, 0, 0, 0],
                              [2, 2, 0, 1]])  # (members, images): class decided
    member_logits = F.one_hot(decisions, 3).float() * 5
    votes = majority_vote(member_logits)
    assert votes.tolist() == [[1.5, 2, 1], [2, 0, 2.5], [2, 2.5, 0], [2, 1, 1.5]]
    assert vote_logits(member_logits).argmax(dim=1).tolist() == [1, 2, 1, 0]  # majority, ViT's tie, ViT's tie, majority
    shares = torch.tensor([1.5, 2, 1]) / 4.5
    assert torch.allclose(vote_logits(member_logits)[0], shares.log())
    assert vote_logits(member_logits)[1, 1] == pytest.approx(math.log(1e-3))  # no vote: the floored share


def test_consistency_score_is_zero_for_agreement_and_the_kl_frobenius_norm_otherwise():
    same = torch.tensor([[0.3, -1.0], [0.3, -1.0], [0.3, -1.0]])[:, None]  # (3 members, 1 image, 2 classes)
    assert consistency_score(same).item() == pytest.approx(0.0, abs=1e-6)
    two = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])[:, None]  # p = (1/2, 1/2) and (3/4, 1/4)
    kl_12 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_21 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert consistency_score(two).item() == pytest.approx(math.sqrt(kl_12**2 + kl_21**2), rel=1e-5)
    growing = [consistency_score(torch.tensor([[0.0, 0.0], [gap, 0.0], [-gap, 0.0]])[:, None]).item() for gap in (0.5, 1.0, 2.0, 4.0)]
    assert growing == sorted(growing) and growing[0] > 0


def test_the_vote_is_hard_forward_and_straight_through_backward():
    ensemble = _tiny_ensemble()
    images = torch.rand(6, 1, 32, 32, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = ensemble(images)
    members = ensemble.member_logits(images)
    votes = majority_vote(members)
    assert votes.grad_fn is None  # the hard vote alone has no gradient
    assert torch.equal(logits.argmax(dim=1), votes.argmax(dim=1))
    assert torch.allclose(logits, (votes / votes.sum(dim=1, keepdim=True)).clamp_min(1e-3).log())
    (gradient,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), images)
    assert gradient.abs().sum() > 0
    soft = members.softmax(dim=-1).mean(dim=0).log()  # d CE / d logits at the hard values, through the soft ensemble
    pull = (logits.softmax(dim=1) - F.one_hot(labels, 3)).detach()
    (expected,) = torch.autograd.grad((soft * pull).sum(), images)
    assert torch.allclose(gradient, expected, atol=1e-6)


def test_the_threshold_meets_its_false_positive_rate_on_validation(runs, monkeypatch):
    monkeypatch.chdir(runs.directory)  # the checkpoint names its teacher by the config's relative path
    stage = load_stage_module(runs.sevit, "the runs fixture")
    data = ChestXRayDataModule(image_size=SIZE, synthetic_samples=320, batch_size=32, num_workers=0)
    data.setup("validate")
    with torch.no_grad():
        scores = torch.cat([consistency_score(stage.model.member_logits(batch["image"])) for batch in data.val_dataloader()])
    threshold = float(stage.model.threshold)
    assert threshold > 0  # calibrated, not the initial 0
    assert (scores > threshold).float().mean() <= 0.05
    assert threshold == pytest.approx(threshold_for_false_positive_rate(scores, 0.05), rel=1e-5)


def test_heads_train_and_round_trip_through_the_checkpoint(runs, tmp_path):
    data = ChestXRayDataModule(image_size=SIZE, synthetic_samples=320, batch_size=32, num_workers=0)
    stage = SelfEnsembleViT(num_classes=2, teacher_ckpt=str(runs.teacher), image_size=SIZE, num_blocks=5, hidden_sizes=(8,))
    assert len(stage.model.heads.heads) == 2  # the tiny teacher has 2 blocks
    before = [parameter.clone() for parameter in stage.model.parameters()]
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(stage, datamodule=data)
    changed = [not torch.equal(old, new) for old, new in zip(before, stage.model.parameters())]
    heads = len(list(stage.model.heads.parameters()))
    assert all(changed[-heads:]) and not any(changed[:-heads])  # the heads train, the ViT stays frozen
    trainer.save_checkpoint(tmp_path / "sevit.ckpt")
    reloaded = load_stage_module(tmp_path / "sevit.ckpt", "this test")  # its teacher_ckpt is absolute
    images = torch.rand(4, 1, SIZE, SIZE)
    stage.eval()
    with torch.no_grad():
        assert torch.equal(reloaded.model.member_logits(images), stage.model.member_logits(images))
        assert torch.equal(reloaded.model(images), stage.model(images))
    assert float(reloaded.model.threshold) == float(stage.model.threshold) != 0.0


def test_clear_errors_for_a_teacher_that_is_no_vit_and_for_training_attacks(runs, tmp_path):
    cnn = TeacherClassifier(num_classes=2, model_name="resnet10t", image_size=SIZE)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(cnn, datamodule=ChestXRayDataModule(image_size=SIZE, synthetic_samples=80, batch_size=16, num_workers=0))
    trainer.save_checkpoint(tmp_path / "cnn.ckpt")
    with pytest.raises(ValueError, match="classifier is a ResNet, not a timm VisionTransformer.*ViT teacher"):
        SelfEnsembleViT(num_classes=2, teacher_ckpt=str(tmp_path / "cnn.ckpt"), image_size=SIZE)
    with pytest.raises(ValueError, match=f"image_size: {SIZE} in the checkpoint, 32 here.*--data.image_size {SIZE}"):
        SelfEnsembleViT(num_classes=2, teacher_ckpt=str(runs.teacher), image_size=32)
    with pytest.raises(FileNotFoundError, match="configs/teacher.yaml"):
        SelfEnsembleViT(num_classes=2, teacher_ckpt=str(tmp_path / "missing.ckpt"), image_size=SIZE)


def test_the_report_compares_the_teacher_and_sevit_with_detection_rows(runs):
    rows = json.loads((runs.sevit / "robustness_report.json").read_text())
    table = {(row["defense"], row["attack"], row["metric"]): row["value"] for row in rows}
    for attack in ("fgsm_graybox", "pgd10_graybox", "pgd_l2_graybox", "pgd10", "pgd10_adaptive"):
        assert 0.0 <= table[("sevit", attack, "detection_auroc")] <= 1.0
        assert ("sevit", attack, "accuracy") in table
    assert ("none", "pgd10", "accuracy") in table and ("none", "pgd10_graybox", "accuracy") not in table
    assert table[("sevit", "none", "detection_rate")] <= 0.25  # the clean false-positive rate, on 32 test images
    assert table[("sevit", "none", "accuracy")] > 0.5
    assert "test/detection_auroc/pgd10_graybox/teacher+sevit" in runs.metrics


def test_evaluate_rebuilds_the_sevit_run(runs, monkeypatch):
    monkeypatch.chdir(runs.directory)
    from evaluate import main as evaluate

    rows = evaluate([str(runs.sevit), "--attacks", "[{method: pgd, eps: 0.03, steps: 2, threat_model: adaptive, name: adaptive2}]",
                     "--max_images", "16", "--output_dir", str(runs.sevit / "eval_test")])
    assert {(row["defense"], row["metric"]) for row in rows if row["attack"] == "adaptive2"} >= {("sevit", "detection_auroc"), ("sevit", "accuracy")}
