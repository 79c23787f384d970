"""Class imbalance: class-weighted losses, the balanced-accuracy metric and the operating point chosen on validation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS, TINY_VIT, run_train, shrink_config
from lightning_modules import TeacherClassifier
from lightning_modules.classifier import load_classifier
from robust_cxr.distillation import kd_loss, rslad_loss
from robust_cxr.metrics import BalancedAccuracy, margin_threshold_for_sensitivity
from robust_cxr.models import OperatingPoint


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_margin_threshold_reaches_the_target_sensitivity_with_the_most_specificity(target):
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(400, generator=generator) < 0.25).long()
    margins = torch.randn(400, generator=generator) + 1.5 * labels
    threshold = margin_threshold_for_sensitivity(margins, labels, target)
    positives = margins[labels == 1]
    sensitivity = (positives > threshold).float().mean()
    assert sensitivity >= target
    # The next positive above the threshold is the one the target needs: deciding it negative misses the target.
    needed = positives[positives > threshold].min()
    assert (positives > needed).float().mean() < target
    assert not torch.any((margins > threshold) != (margins >= needed))  # no image between the threshold and that positive


def test_margin_threshold_rejects_what_it_cannot_meet():
    with pytest.raises(ValueError, match="no positive"):
        margin_threshold_for_sensitivity(torch.zeros(4), torch.zeros(4, dtype=torch.long), 0.9)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        margin_threshold_for_sensitivity(torch.zeros(4), torch.ones(4, dtype=torch.long), 0.0)


def test_operating_point_decides_class_1_above_its_threshold():
    logits = torch.randn(256, 2, generator=torch.Generator().manual_seed(1)) * 3
    point = OperatingPoint(2)
    assert point.probability_threshold == 0.5
    torch.testing.assert_close(point(logits), logits)
    point.set_margin_threshold(1.25)
    decisions = point(logits).argmax(dim=1)
    assert torch.equal(decisions, (logits[:, 1] - logits[:, 0] > 1.25).long())
    assert point.probability_threshold == pytest.approx(torch.sigmoid(torch.tensor(1.25)).item())
    probabilities = logits.softmax(dim=1)[:, 1]
    assert torch.equal(decisions, (probabilities > point.probability_threshold).long())


def test_balanced_accuracy_is_the_mean_recall_of_the_classes():
    metric = BalancedAccuracy(2)
    metric.update(torch.tensor([0.9, 0.2, 0.7, 0.6, 0.1, 0.3]), torch.tensor([1, 1, 0, 0, 0, 0]))
    assert metric.compute().item() == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_class_weighted_losses_match_a_hand_computation():
    logits = torch.tensor([[2.0, 0.0], [0.5, 1.0], [0.0, 3.0], [1.0, 1.0]])
    teacher_logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    class_weights = [1.0, 3.0]
    weights = torch.tensor([class_weights[label] for label in labels.tolist()])
    log_p = logits.log_softmax(dim=1)
    cross_entropy = [-log_p[i, labels[i]] for i in range(4)]
    hand_ce = sum(w * c for w, c in zip(weights, cross_entropy)) / weights.sum()

    module = TeacherClassifier(num_classes=2, image_size=32, model_kwargs=TINY_VIT, class_weights=class_weights)
    module.class_weight.copy_(torch.tensor(class_weights))
    torch.testing.assert_close(module.loss(logits, labels), hand_ce)

    p_teacher = teacher_logits.softmax(dim=1)
    kl = [(p_teacher[i] * (p_teacher[i].log() - log_p[i])).sum() for i in range(4)]
    hand_kl = sum(w * k for w, k in zip(weights, kl)) / weights.sum()
    torch.testing.assert_close(kd_loss(logits, teacher_logits, labels, 1.0, 0.25, weights), 0.25 * hand_kl + 0.75 * hand_ce)
    torch.testing.assert_close(rslad_loss(logits, logits, teacher_logits, 0.5, weights), hand_kl)
    # Equal weights are the unweighted loss.
    torch.testing.assert_close(kd_loss(logits, teacher_logits, labels, 2.0, 0.5, torch.full((4,), 7.0)),
                               kd_loss(logits, teacher_logits, labels, 2.0, 0.5))
    assert F.cross_entropy(logits, labels).item() != pytest.approx(hand_ce.item())


def test_imbalance_options_are_checked():
    with pytest.raises(ValueError, match="binary decision threshold"):
        TeacherClassifier(num_classes=3, image_size=32, model_kwargs=TINY_VIT, target_sensitivity=0.9)
    with pytest.raises(ValueError, match="one per class"):
        TeacherClassifier(num_classes=2, image_size=32, model_kwargs=TINY_VIT, class_weights=[1.0])
    with pytest.raises(ValueError, match="'none', 'balanced'"):
        TeacherClassifier(num_classes=2, image_size=32, model_kwargs=TINY_VIT, class_weights="inverse")


def test_operating_point_is_chosen_on_validation_and_used_by_test_and_report(tmp_path):
    """A teacher on 1:3 imbalanced phantoms, class-weighted, its threshold set to 0.9 sensitivity and best.ckpt
    chosen by val/balanced_acc: the saved threshold reaches the target on the validation split, and the test metrics and
    the robustness report are taken at it."""
    config = shrink_config(CONFIGS / "teacher.yaml", tmp_path, class_ratio={"tuberculosis": 1 / 3})
    run_dir = tmp_path / "run"
    metrics = run_train(config, run_dir, "--trainer.max_epochs", "2", "--model.init_args.target_sensitivity", "0.9",
                        "--model.init_args.class_weights", "balanced", "--checkpoint.monitor", "val/balanced_acc")
    module = load_classifier(run_dir, "teacher")
    assert module.class_weight.tolist() == [1.0, 1.0], "class weights are set for training, not saved"
    threshold = module.operating_point.probability_threshold
    assert 0 < threshold < 1 and "test/balanced_acc" in metrics

    from datamodules import ChestXRayDataModule

    data = ChestXRayDataModule(image_size=32, synthetic_samples=240, class_ratio={"tuberculosis": 1 / 3})
    data.setup()
    for split, sensitivity_key in (("val", None), ("test", "test/sensitivity")):
        dataset = data.datasets[split]
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        labels = torch.as_tensor(dataset.labels)
        with torch.no_grad():
            decisions = module.deployed_model().pipeline(images).argmax(dim=1)
            probabilities = module.model(images).softmax(dim=1)[:, 1]
        assert torch.equal(decisions, (probabilities > threshold).long())
        sensitivity = (decisions[labels == 1] == 1).float().mean().item()
        if sensitivity_key is None:
            assert sensitivity >= 0.9
        else:
            assert metrics[sensitivity_key] == pytest.approx(sensitivity)
    rows = json.loads((run_dir / "robustness_report.json").read_text())
    assert [row["threshold"] for row in rows] == pytest.approx([threshold] * len(rows))
