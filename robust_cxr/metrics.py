"""Classification, segmentation and restoration metrics, and robustness counters (torchmetrics, synced across DDP ranks)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.utilities import dim_zero_cat
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


def class_recalls(correct: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class recall (K,) (NaN for a class without images) and balanced accuracy, their mean over the classes present,
    from per-class counts of right decisions (K,) and of images (K,): the one balanced accuracy of every figure."""
    present = total > 0
    recalls = correct / total.double().where(present, torch.nan)
    return recalls, recalls[present].mean()


class BalancedAccuracy(Metric):
    """Mean per-class recall over the classes present (`class_recalls`), updated like `classification_metrics` with
    `class_scores(logits)` (binary: P(class 1) (B,), decided at 0.5) and labels (B,)."""

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("correct", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        decisions = scores.argmax(dim=1) if scores.ndim == 2 else (scores >= 0.5).long()
        self.correct += torch.bincount(labels[decisions == labels], minlength=self.num_classes)
        self.total += torch.bincount(labels, minlength=self.num_classes)

    def compute(self) -> torch.Tensor:
        return class_recalls(self.correct, self.total)[1].float()


def classification_metrics(num_classes: int) -> MetricCollection:
    """acc, balanced_acc, auroc, sensitivity, specificity and f1; updated with `class_scores(logits)` and labels (B,).

    Binary tasks treat class 1 as positive (e.g. tuberculosis); multiclass ones macro-average.
    """
    if num_classes == 2:
        return MetricCollection(
            {
                "acc": BinaryAccuracy(),
                "balanced_acc": BalancedAccuracy(2),
                "auroc": BinaryAUROC(),
                "sensitivity": BinaryRecall(),
                "specificity": BinarySpecificity(),
                "f1": BinaryF1Score(),
            }
        )
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "balanced_acc": BalancedAccuracy(num_classes),
            "auroc": MulticlassAUROC(num_classes),
            "sensitivity": MulticlassRecall(num_classes, average="macro"),
            "specificity": MulticlassSpecificity(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
    )


def margin_threshold_for_sensitivity(margins: torch.Tensor, labels: torch.Tensor, target_sensitivity: float) -> float:
    """The binary decision threshold on the margin logit_1 - logit_0 that keeps the most specificity while deciding
    class 1 for at least `target_sensitivity` of the positives.

    Args:
        margins: (N,) logit_1 - logit_0 of validation images; labels: (N,) in {0, 1}.
        target_sensitivity: in (0, 1].
    Returns the midpoint between the margin of the ceil(target * P)-th highest positive and the next lower margin of
    any image (1 below it if none), so `margin > threshold` decides class 1 for exactly those images.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must lie in (0, 1], got {target_sensitivity}.")
    positives = margins[labels == 1].sort(descending=True).values
    if len(positives) == 0:
        raise ValueError("The validation images hold no positive (class 1) image to set a target sensitivity on.")
    cutoff = positives[math.ceil(target_sensitivity * len(positives) - 1e-9) - 1]
    lower = margins[margins < cutoff]
    return float((cutoff + lower.max()) / 2 if len(lower) else cutoff - 1)


def class_scores(logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) -> what `classification_metrics` takes: P(class 1) (B,) for K = 2, else probabilities (B, K)."""
    probabilities = logits.float().softmax(dim=1)
    return probabilities[:, 1] if logits.shape[1] == 2 else probabilities


class LogitsAndLabels(Metric):
    """Collects an epoch's logits (B, K) and labels (B,); `compute` returns them all, (N, K) and (N,), gathered over ranks."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.logits.append(logits.detach().float())
        self.labels.append(labels)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return dim_zero_cat(self.logits), dim_zero_cat(self.labels)


def recall_names(class_names: list[str]) -> list[str]:
    """Names of the per-class recall figures: ``specificity``, ``sensitivity`` for a binary task (class 1 positive),
    else ``recall_<class name>`` per class."""
    if len(class_names) == 2:
        return ["specificity", "sensitivity"]
    return [f"recall_{name}" for name in class_names]


class RobustnessCounts(Metric):
    """Per-class counts for one attack on one model, summed over DDP ranks.

    `update` takes labels (B,), the logits (B, K) of the clean and of the attacked images, and (B,) float perturbation
    norms; the decision is the argmax. An image is robust when it is classified right both clean and after the attack (the AutoAttack /
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

    def update(self, labels: torch.Tensor, clean_logits: torch.Tensor, adversarial_logits: torch.Tensor, perturbation: torch.Tensor) -> None:
        clean_correct = clean_logits.argmax(dim=1) == labels
        adversarial_correct = adversarial_logits.argmax(dim=1) == labels
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
        clean_recall, clean_balanced = class_recalls(self.clean_correct, self.total)
        robust_recall, robust_balanced = class_recalls(self.robust_correct, self.total)
        clean, robust = self.clean_correct.sum(), self.robust_correct.sum()
        fooled = clean - robust
        return {
            "clean_acc": clean / total,
            "robust_acc": robust / total,
            "after_attack_acc": self.after_attack_correct.sum() / total,
            "clean_recall": clean_recall,
            "robust_recall": robust_recall,
            "clean_balanced_acc": clean_balanced,
            "robust_balanced_acc": robust_balanced,
            "attack_success": fooled / clean.clamp_min(1),
            "perturbation": self.perturbation_sum / fooled if fooled > 0 else torch.tensor(torch.nan, dtype=torch.float64),
            "total": self.total.sum(),
            "robust_correct": robust,
        }


class ImageScoreSums(Metric):
    """Sums of per-image scores for one attack on one model, summed over DDP ranks: the counter of a task scored per image
    (`robust_cxr.tasks.PerImageScoredTask`: segmentation, restoration).

    `update` takes the targets (B, ...), the outputs (B, ...) of the clean and of the attacked images and (B,)
    perturbation norms; `image_scores(targets, outputs)` gives one (B,) tensor per name of `names`, kept as
    ``clean_<name>`` and ``<name>`` (attacked). `compute` returns the mean of each over the images, ``perturbation``
    (mean norm) and ``total``.

    Scores are summed as int64 multiples of ``1 / unit`` (each image's value rounded by less than 1 / unit): an exact
    sum, the same whatever the order of images and ranks, so N-process DDP reports the same means as one process (a
    float sum differs in the last bit). Values up to V allow 2**63 / (V * unit) images.
    """

    full_state_update = False

    def __init__(self, names: tuple[str, ...], image_scores: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]], unit: int) -> None:
        super().__init__()
        self.names, self.image_scores, self.unit = names, image_scores, unit
        for name in self.states:
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("perturbation", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def states(self) -> list[str]:
        return [*(f"clean_{name}" for name in self.names), *self.names]

    def update(self, targets: torch.Tensor, clean_outputs: torch.Tensor, adversarial_outputs: torch.Tensor, perturbation: torch.Tensor) -> None:
        clean, attacked = self.image_scores(targets, clean_outputs), self.image_scores(targets, adversarial_outputs)
        values = [*(clean[name] for name in self.names), *(attacked[name] for name in self.names)]
        for name, value in zip(self.states, values):
            setattr(self, name, getattr(self, name) + (value.double() * self.unit).round().long().sum())
        self.perturbation = self.perturbation + perturbation.double().sum()
        self.total += len(targets)

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.total.clamp_min(1)
        scores = {name: getattr(self, name).double() / self.unit / count for name in self.states}
        return {**scores, "perturbation": self.perturbation / count, "total": self.total}


def dice_and_iou(predicted: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU (B,) of bool masks (B, 1, H, W); 1 where prediction and mask are both empty."""
    predicted, masks = predicted.flatten(1), masks.flatten(1)
    overlap = (predicted & masks).sum(dim=1).double()
    sizes = predicted.sum(dim=1).double() + masks.sum(dim=1).double()
    union = sizes - overlap
    dice = torch.where(sizes > 0, 2 * overlap / sizes.clamp_min(1), 1.0)
    iou = torch.where(union > 0, overlap / union.clamp_min(1), 1.0)
    return dice, iou


PSNR_CEILING = 100.0  # dB: the PSNR of an image equal to its reference (infinite) counts as this


def per_image_psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image (B,) float64 of images (B, C, H, W) in [0, 1] against references of the same shape:
    torchmetrics' `peak_signal_noise_ratio` (data range 1), capped at `PSNR_CEILING` (an image equal to its reference
    would read infinite): the one PSNR of every figure."""
    psnr = peak_signal_noise_ratio(images.float(), references.float(), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return psnr.double().clamp(max=PSNR_CEILING)


def psnr_and_ssim(images: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image PSNR in dB (`per_image_psnr`) and SSIM (B,) float64 of images (B, C, H, W) in [0, 1] against references
    of the same shape (torchmetrics' `structural_similarity_index_measure`: data range 1, Gaussian window 11 px, sigma 1.5)."""
    ssim = structural_similarity_index_measure(images.float(), references.float(), data_range=1.0, reduction="none")
    return per_image_psnr(images, references), ssim.double()


class DetectionScores(Metric):
    """A detector's scores (higher: more likely adversarial) and the model's per-image task scores (in [0, 1], 1 best:
    right or not, Dice) on clean images and on their attacked versions, gathered over DDP ranks.

    `update` takes the clean detector scores (B,) and task scores (B,), and the same of the attacked images (None for
    the clean row). `compute(threshold)` flags scores above `threshold` and returns ``n``, ``fpr`` (share of clean
    images flagged), ``clean_unflagged`` (mean task score of the clean images, a flagged one counting 0) and, with
    attacked images: ``auroc`` (clean against attacked), ``tpr`` (share of attacked images flagged),
    ``robust_or_rejected`` (per image 0 if flagged clean, else its clean score if flagged attacked, else the lower of
    its clean and attacked scores: for a classifier, right clean and unflagged, and right or flagged attacked) and
    ``evasion_rate`` (per image, unflagged attacked, the score the attack took: for a classifier, right clean, fooled
    and not flagged); NaN without attacked images.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("clean_scores", "clean_task_scores", "adversarial_scores", "adversarial_task_scores"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, clean_scores: torch.Tensor, clean_task_scores: torch.Tensor, adversarial_scores: torch.Tensor | None = None,
               adversarial_task_scores: torch.Tensor | None = None) -> None:
        self.clean_scores.append(clean_scores.detach().float())
        self.clean_task_scores.append(clean_task_scores.detach().float())
        if adversarial_scores is not None:
            self.adversarial_scores.append(adversarial_scores.detach().float())
            self.adversarial_task_scores.append(adversarial_task_scores.detach().float())

    def compute(self, threshold: float) -> dict[str, float]:
        clean, clean_task = dim_zero_cat(self.clean_scores), dim_zero_cat(self.clean_task_scores)
        flagged_clean = clean > threshold
        result = {"n": len(clean), "fpr": flagged_clean.float().mean().item(), "clean_unflagged": (clean_task * ~flagged_clean).mean().item(),
                  "auroc": math.nan, "tpr": math.nan, "robust_or_rejected": math.nan, "evasion_rate": math.nan}
        if not self.adversarial_scores:
            return result
        adversarial, adversarial_task = dim_zero_cat(self.adversarial_scores), dim_zero_cat(self.adversarial_task_scores)
        flagged = adversarial > threshold
        labels = torch.cat([torch.zeros_like(clean), torch.ones_like(adversarial)]).long()
        handled = torch.where(flagged, clean_task, torch.minimum(clean_task, adversarial_task)) * ~flagged_clean
        return {**result, "auroc": binary_auroc(torch.cat([clean, adversarial]), labels).item(), "tpr": flagged.float().mean().item(),
                "robust_or_rejected": handled.mean().item(), "evasion_rate": ((clean_task - adversarial_task).clamp_min(0) * ~flagged).mean().item()}


def threshold_for_false_positive_rate(clean_scores: torch.Tensor, false_positive_rate: float) -> float:
    """The lowest threshold t with at most `false_positive_rate` of `clean_scores` (N,) above it (score > t flags)."""
    if not 0.0 <= false_positive_rate < 1.0:
        raise ValueError(f"false_positive_rate must lie in [0, 1), got {false_positive_rate}.")
    ordered = clean_scores.float().sort(descending=True).values
    allowed = math.floor(false_positive_rate * len(ordered) + 1e-9)  # clean images that may lie above the threshold
    return float(ordered[allowed]) if allowed < len(ordered) else float(ordered[-1]) - 1.0
