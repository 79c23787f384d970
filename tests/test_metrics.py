"""RobustnessCounts against hand counts: the standard robust accuracy, per-class recall, perturbation of the fooled."""

from __future__ import annotations

import math

import pytest
import torch

from robust_cxr.metrics import DetectionScores, RobustnessCounts, recall_names


def _logits(labels: torch.Tensor, correct: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot logits (B, K) whose argmax is the label where `correct`, the next class elsewhere."""
    return torch.nn.functional.one_hot(torch.where(correct, labels, (labels + 1) % num_classes), num_classes).float()


def test_counts_follow_the_standard_definition_per_class():
    labels = torch.tensor([0, 0, 0, 1, 1])
    clean = torch.tensor([True, True, False, True, False])
    after_attack = torch.tensor([True, False, True, False, True])  # images 2 and 4: wrong clean, right after the attack
    counts = RobustnessCounts(num_classes=2)
    counts.update(labels, _logits(labels, clean, 2), _logits(labels, after_attack, 2), torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05]))
    result = counts.compute()
    assert result["clean_acc"].item() == pytest.approx(3 / 5)
    assert result["robust_acc"].item() == pytest.approx(1 / 5)  # only image 0 is right both clean and attacked
    assert result["after_attack_acc"].item() == pytest.approx(3 / 5)  # the old definition counted the two righted mistakes
    assert result["clean_recall"].tolist() == pytest.approx([2 / 3, 1 / 2])
    assert result["robust_recall"].tolist() == pytest.approx([1 / 3, 0.0])
    assert result["robust_balanced_acc"].item() == pytest.approx((1 / 3 + 0.0) / 2)
    assert result["attack_success"].item() == pytest.approx(2 / 3)  # images 1 and 3 fooled of 3 clean-correct
    assert result["perturbation"].item() == pytest.approx((0.02 + 0.04) / 2)  # the fooled images only


def test_absent_class_and_no_fooled_image_give_nan_not_zero():
    counts = RobustnessCounts(num_classes=3)
    labels = torch.tensor([0, 1])
    right = torch.tensor([True, True])
    counts.update(labels, _logits(labels, right, 3), _logits(labels, right, 3), torch.zeros(2))
    result = counts.compute()
    assert math.isnan(result["robust_recall"][2].item())
    assert result["robust_balanced_acc"].item() == 1.0  # the mean over the classes present
    assert math.isnan(result["perturbation"].item())


def test_robust_accuracy_never_exceeds_clean_accuracy():
    generator = torch.Generator().manual_seed(0)
    counts = RobustnessCounts(num_classes=2)
    for _ in range(20):
        labels = torch.randint(0, 2, (16,), generator=generator)
        clean, after_attack = (torch.rand(2, 16, generator=generator) < 0.6).unbind()
        counts.update(labels, _logits(labels, clean, 2), _logits(labels, after_attack, 2), torch.rand(16, generator=generator))
    result = counts.compute()
    assert result["robust_acc"] <= result["clean_acc"]
    assert torch.all(result["robust_recall"] <= result["clean_recall"])


def test_recall_names():
    assert recall_names(["normal", "tuberculosis"]) == ["specificity", "sensitivity"]
    assert recall_names(["a", "b", "c"]) == ["recall_a", "recall_b", "recall_c"]


def test_reject_option_figures_count_flags_as_the_issue_defines_them():
    """Six images, threshold 0: robust-or-rejected counts an image right clean and unflagged, and right or flagged
    attacked; the evasion rate counts right clean, fooled and unflagged."""
    detection = DetectionScores()
    clean_scores = torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0, -1.0])  # the fifth clean image is flagged: an error
    clean_right = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    attacked_scores = torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, -1.0])
    attacked_right = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    detection.update(clean_scores, clean_right, attacked_scores, attacked_right)
    result = detection.compute(0.0)
    # 1: right, unflagged; 2: fooled but flagged; 3: fooled, unflagged (evades); 4: right and flagged; 5: flagged clean
    # (an error), then fooled unflagged (evades too); 6: wrong clean.
    assert result["robust_or_rejected"] == pytest.approx(3 / 6)
    assert result["evasion_rate"] == pytest.approx(2 / 6)
    assert result["clean_unflagged"] == pytest.approx(4 / 6)
    assert result["fpr"] == pytest.approx(1 / 6) and result["tpr"] == pytest.approx(2 / 6)
    clean_only = DetectionScores()
    clean_only.update(clean_scores, clean_right)
    assert math.isnan(clean_only.compute(0.0)["robust_or_rejected"]) and clean_only.compute(0.0)["clean_unflagged"] == pytest.approx(4 / 6)
