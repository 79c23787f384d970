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


class RobustnessCounts(Metric):
    """Counts for one attack on one model: clean and adversarial correctness, flips, perturbation size.

    `update` takes (B,) bool `clean_correct`, (B,) bool `adversarial_correct` and (B,) float
    `perturbation` norms; `compute` returns accuracy, robust accuracy, attack success rate (share
    of clean-correct samples the attack flips), mean perturbation norm and the raw counts.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("total", "clean_correct", "robust_correct", "flipped"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("perturbation_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, clean_correct: torch.Tensor, adversarial_correct: torch.Tensor, perturbation: torch.Tensor) -> None:
        self.total += clean_correct.numel()
        self.clean_correct += clean_correct.sum()
        self.robust_correct += adversarial_correct.sum()
        self.flipped += (clean_correct & ~adversarial_correct).sum()
        self.perturbation_sum += perturbation.double().sum()

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.clamp_min(1)
        return {
            "clean_acc": self.clean_correct / total,
            "robust_acc": self.robust_correct / total,
            "attack_success": self.flipped / self.clean_correct.clamp_min(1),
            "perturbation": self.perturbation_sum / total,
            "total": self.total,
            "robust_correct": self.robust_correct,
        }
