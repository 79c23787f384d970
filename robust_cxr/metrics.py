"""Classification and robustness metrics (torchmetrics, synced across DDP ranks)."""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryRecall,
    BinarySpecificity,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassRecall,
    MulticlassSpecificity,
)


def classification_metrics(num_classes: int) -> MetricCollection:
    """acc, auroc, sensitivity, specificity and f1; updated with `class_scores(logits)` and labels (B,).

    Binary tasks treat class 1 as positive (e.g. tuberculosis); multiclass ones macro-average.
    """
    if num_classes == 2:
        return MetricCollection(
            {
                "acc": BinaryAccuracy(),
                "auroc": BinaryAUROC(),
                "sensitivity": BinaryRecall(),
                "specificity": BinarySpecificity(),
                "f1": BinaryF1Score(),
            }
        )
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "auroc": MulticlassAUROC(num_classes),
            "sensitivity": MulticlassRecall(num_classes, average="macro"),
            "specificity": MulticlassSpecificity(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
    )


def class_scores(logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) -> what `classification_metrics` takes: P(class 1) (B,) for K = 2, else probabilities (B, K)."""
    probabilities = logits.float().softmax(dim=1)
    return probabilities[:, 1] if logits.shape[1] == 2 else probabilities


def recall_names(class_names: list[str]) -> list[str]:
    """Names of the per-class recall figures: ``specificity``, ``sensitivity`` for a binary task (class 1 positive),
    else ``recall_<class name>`` per class."""
    if len(class_names) == 2:
        return ["specificity", "sensitivity"]
    return [f"recall_{name}" for name in class_names]


class RobustnessCounts(Metric):
    """Per-class counts for one attack on one model, summed over DDP ranks.

    `update` takes labels (B,), (B,) bool `clean_correct` and `adversarial_correct`, and (B,) float perturbation
    norms. An image is robust when it is classified right both clean and after the attack (the AutoAttack /
    RobustBench definition), so robust accuracy never exceeds clean accuracy, also for a random defense whose
    fresh noise can right a clean mistake. `compute` returns:

    - ``clean_acc``, ``robust_acc``, ``after_attack_acc`` (right after the attack, whether or not right clean);
    - ``clean_recall``, ``robust_recall`` (K,): the same per class (NaN for a class without images), and their
      means over the classes present, ``clean_balanced_acc`` and ``robust_balanced_acc``;
    - ``attack_success``: share of clean-correct images the attack fooled;
    - ``perturbation``: mean norm over the fooled images (NaN if none), so a minimum-norm attack such as CW-L2,
      which returns failed images unchanged, reports the size of its successes;
    - ``total``, ``robust_correct``: counts.
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        for name in ("total", "clean_correct", "robust_correct", "after_attack_correct"):
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("perturbation_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, labels: torch.Tensor, clean_correct: torch.Tensor, adversarial_correct: torch.Tensor, perturbation: torch.Tensor) -> None:
        robust = clean_correct & adversarial_correct

        def per_class(flags: torch.Tensor) -> torch.Tensor:
            return torch.bincount(labels[flags], minlength=self.num_classes)

        self.total += torch.bincount(labels, minlength=self.num_classes)
        self.clean_correct += per_class(clean_correct)
        self.robust_correct += per_class(robust)
        self.after_attack_correct += per_class(adversarial_correct)
        self.perturbation_sum += perturbation[clean_correct & ~robust].double().sum()

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.sum().clamp_min(1)
        present = self.total > 0
        per_class_total = self.total.double().where(present, torch.nan)
        clean_recall = self.clean_correct / per_class_total
        robust_recall = self.robust_correct / per_class_total
        clean, robust = self.clean_correct.sum(), self.robust_correct.sum()
        fooled = clean - robust
        return {
            "clean_acc": clean / total,
            "robust_acc": robust / total,
            "after_attack_acc": self.after_attack_correct.sum() / total,
            "clean_recall": clean_recall,
            "robust_recall": robust_recall,
            "clean_balanced_acc": clean_recall[present].mean(),
            "robust_balanced_acc": robust_recall[present].mean(),
            "attack_success": fooled / clean.clamp_min(1),
            "perturbation": self.perturbation_sum / fooled if fooled > 0 else torch.tensor(torch.nan, dtype=torch.float64),
            "total": self.total.sum(),
            "robust_correct": robust,
        }
