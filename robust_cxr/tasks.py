"""Tasks: what a model's outputs are, what an attack on it ascends, and how its outputs are scored.

A stage declares its task (``pl_module.task``); the adversarial callback, the attacks, the threat models and the
report use nothing else about the outputs, so they serve every task unchanged:

- `attack_objective(spec, targets)`: the targets an attack takes and the loss it ascends (None: the attack
  method's own classification loss);
- `robustness_counter()`: a DDP-summed torchmetrics `Metric` updated with the targets and the clean and attacked
  outputs of the same images; `logged` and `report_rows` turn its `compute()` into logged metrics and report rows
  (one row per metric, each with ``metric``, ``value`` (under attack) and ``clean_value`` (the same images clean));
- `per_image_score(targets, outputs)`: how well each image fares, which the worst-case row over an attack suite minimises
  per image (classification: right or wrong; segmentation: Dice; restoration: PSNR);
- `example_columns`, `overlay` and `caption`: the example grid's task columns (by default the clean and attacked
  images with `overlay` drawing what the model predicts on them) and the text beside each row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure

from robust_cxr.attacks import METHODS, AttackSpec, LossFn, trades_kl
from robust_cxr.metrics import ImageScoreSums, RobustnessCounts, dice_and_iou, psnr_and_ssim, recall_names


class Task(ABC):
    """What a stage's model maps [0, 1] images (B, C, H, W) to, and how those outputs are attacked and scored.

    Attributes:
        name: ``classification``, ``segmentation``, ``restoration``, ...
        target_key: the batch entry holding the targets (``label``, ``mask``, ``clean``).
        targeted_goals: the goals a targeted attack (`AttackSpec.target`) may drive outputs toward.
        attack_loss: the loss attacks ascend, ``loss(outputs, targets)`` -> (B,) per image; None: each attack
            method's own classification loss (cross-entropy, CW's margin, APGD's CE or DLR).
        trades_loss: the loss TRADES' training attack ascends, ``loss(outputs, trades_targets(clean_outputs))`` -> (B,);
            None where the task has no TRADES objective.
        num_classes: K for the classification attacks that need it (CW, AutoAttack); None for other tasks.
    """

    name: str
    target_key: str
    targeted_goals: tuple[str, ...] = ()
    attack_loss: LossFn | None = None
    trades_loss: LossFn | None = None
    num_classes: int | None = None

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch[self.target_key]

    @property
    def attack_methods(self) -> tuple[str, ...]:
        """The attack methods that apply (`check_attack` rejects the others): every registered method when the task's
        attacks ascend each method's own classification loss (`attack_loss` None), else those that ascend any loss."""
        return tuple(name for name, method in METHODS.items() if method.any_loss or self.attack_loss is None)

    def check_attack(self, spec: AttackSpec) -> None:
        """Raises a ValueError naming the fix if `spec` does not apply to this task."""
        if spec.method not in self.attack_methods:
            raise ValueError(f"Attack {spec.label}: {spec.method} does not apply to {self.name}; use one of {list(self.attack_methods)}.")
        if spec.target is not None and spec.target not in self.targeted_goals:
            goals = f"one of {list(self.targeted_goals)}" if self.targeted_goals else "null (this task has no targeted goal)"
            raise ValueError(f"Attack {spec.label}: target {spec.target!r} is not a {self.name} goal; set target to {goals}.")

    def attack_objective(self, spec: AttackSpec, targets: torch.Tensor) -> tuple[torch.Tensor, LossFn | None]:
        """(targets, loss) the attack `spec` ascends: untargeted, the task loss against the true targets; targeted,
        the negated task loss against the goal's targets (the attack descends toward the goal)."""
        if spec.target is None:
            return targets, self.attack_loss
        loss = self.attack_loss
        return self.goal_targets(spec.target, targets), lambda outputs, goal: -loss(outputs, goal)

    def trades_targets(self, clean_outputs: torch.Tensor) -> torch.Tensor:
        """What `trades_loss` compares attacked outputs with, from the clean outputs (B, ...)."""
        raise NotImplementedError

    def goal_targets(self, goal: str, targets: torch.Tensor) -> torch.Tensor:
        """The targets of a targeted goal (one of `targeted_goals`, whose tasks define `attack_loss`), shaped like `targets`."""
        raise NotImplementedError

    @abstractmethod
    def robustness_counter(self) -> Metric:
        """A fresh counter: ``update(targets, clean_outputs, adversarial_outputs, perturbation (B,))``."""

    @abstractmethod
    def per_image_score(self, targets: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """(B,) float64 score of each image's outputs (B, ...) against its targets (B, ...), higher is better: the worst-case
        row takes, per image, the attacked outputs of the attack that scores lowest."""

    @abstractmethod
    def logged(self, result: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metric name (without stage and attack) -> value, from a counter's `compute()` under an attack."""

    @abstractmethod
    def report_rows(self, result: dict[str, torch.Tensor], attacked: bool) -> list[dict]:
        """Report columns from a counter's `compute()`: one dict per metric, each starting with ``n``, ``metric``,
        ``value``, ``clean_value``; `attacked` is False for the clean row."""

    def overlay(self, images: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1]: images (N, C, H, W) with what the outputs (N, ...) predict drawn on them; by
        default the images alone, in gray."""
        return _grayscale_rgb(images)

    def example_columns(self, clean: torch.Tensor, adversarial: torch.Tensor, targets: torch.Tensor, clean_outputs: torch.Tensor,
                        adversarial_outputs: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The example grid's task columns, (title, (N, 3, H, W) RGB in [0, 1]), from the clean and attacked images
        (N, C, H, W), the targets and both outputs: by default the clean and the attacked images, each with `overlay`
        of its outputs. The grid adds the perturbation (and a defense's output) after them."""
        return [("clean", self.overlay(clean, clean_outputs)), ("adversarial", self.overlay(adversarial, adversarial_outputs))]

    @abstractmethod
    def caption(self, targets: torch.Tensor, clean_outputs: torch.Tensor, adversarial_outputs: torch.Tensor) -> list[str]:
        """One text per image for the example grid."""


def _grayscale_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 3, H, W): the channel mean repeated."""
    return images.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)


class ClassificationTask(Task):
    """Logits (B, K) against labels (B,); scored by accuracy (right both clean and attacked), balanced accuracy and
    per-class recall. Attacks ascend their method's own loss (cross-entropy for the gradient-ascent methods).

    Args:
        class_names: the K classes in label order.
    """

    name = "classification"
    target_key = "label"
    trades_loss = staticmethod(trades_kl)

    def __init__(self, class_names: list[str]):
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)

    def trades_targets(self, clean_outputs: torch.Tensor) -> torch.Tensor:
        """The clean class probabilities (B, K) of logits (B, K): TRADES' KL(clean || attacked) compares with them."""
        return clean_outputs.softmax(dim=1).detach()

    def robustness_counter(self) -> Metric:
        return RobustnessCounts(self.num_classes)

    def per_image_score(self, targets: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """1 where the argmax of the logits (B, K) is the label (B,), else 0."""
        return (outputs.argmax(dim=1) == targets).double()

    def logged(self, result: dict[str, torch.Tensor]) -> dict[str, float]:
        return {
            "robust_acc": result["robust_acc"], "robust_balanced_acc": result["robust_balanced_acc"],
            "attack_success": result["attack_success"], "perturbation": result["perturbation"],
            **{f"robust_{name}": value for name, value in zip(recall_names(self.class_names), result["robust_recall"])},
        }

    def report_rows(self, result: dict[str, torch.Tensor], attacked: bool) -> list[dict]:
        result = {name: value.tolist() for name, value in result.items()}
        recalls = recall_names(self.class_names)
        return [dict(
            n=int(result["total"]),
            metric="accuracy",
            value=result["robust_acc"],
            clean_value=result["clean_acc"],
            clean_accuracy=result["clean_acc"],
            accuracy=result["robust_acc"],
            balanced_accuracy=result["robust_balanced_acc"],
            **dict(zip(recalls, result["robust_recall"])),
            clean_balanced_accuracy=result["clean_balanced_acc"],
            **{f"clean_{name}": value for name, value in zip(recalls, result["clean_recall"])},
            correct=int(result["robust_correct"]),
            accuracy_after_attack=result["after_attack_acc"] if attacked else None,
            attack_success=result["attack_success"] if attacked else None,
            perturbation=result["perturbation"] if attacked else None,
        )]

    def caption(self, targets: torch.Tensor, clean_outputs: torch.Tensor, adversarial_outputs: torch.Tensor) -> list[str]:
        names = self.class_names
        return [
            f"true: {names[int(label)]}\nclean: {names[int(clean)]}\nadversarial: {names[int(attacked)]}"
            for label, clean, attacked in zip(targets, clean_outputs.argmax(dim=1), adversarial_outputs.argmax(dim=1))
        ]


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) per-image loss: mean pixel-wise binary cross-entropy plus soft Dice loss (1 - soft Dice).

    Args:
        logits: (B, 1, H, W) foreground logits; masks: (B, 1, H, W) in {0, 1}.
    """
    cross_entropy = F.binary_cross_entropy_with_logits(logits.float(), masks, reduction="none").flatten(1).mean(dim=1)
    probabilities = torch.sigmoid(logits.float()).flatten(1)
    masks = masks.flatten(1)
    soft_dice = (2 * (probabilities * masks).sum(dim=1) + 1) / (probabilities.sum(dim=1) + masks.sum(dim=1) + 1)
    return cross_entropy + 1 - soft_dice


class PerImageScoredTask(Task):
    """A task scored per image: `image_scores` gives one (B,) score per name of `score_names`, higher is better, the first
    the one the worst case ranks images by; the stage logs their means, the report has a row per score (its mean under
    attack and clean) and its counter sums them exactly over DDP ranks, in units of 1 / `score_unit`
    (`robust_cxr.metrics.ImageScoreSums`)."""

    score_names: tuple[str, ...]
    score_unit: int = 2**32

    @abstractmethod
    def image_scores(self, targets: torch.Tensor, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """One (B,) float64 score per name of `score_names` of the outputs (B, ...) against the targets (B, ...)."""

    def robustness_counter(self) -> Metric:
        return ImageScoreSums(self.score_names, self.image_scores, self.score_unit)

    def per_image_score(self, targets: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        return self.image_scores(targets, outputs)[self.score_names[0]]

    def logged(self, result: dict[str, torch.Tensor]) -> dict[str, float]:
        return {**{f"robust_{name}": result[name] for name in self.score_names}, "perturbation": result["perturbation"]}

    def report_rows(self, result: dict[str, torch.Tensor], attacked: bool) -> list[dict]:
        return [dict(n=int(result["total"]), metric=name, value=result[name].item(), clean_value=result[f"clean_{name}"].item(),
                     perturbation=result["perturbation"].item() if attacked else None) for name in self.score_names]

    def caption(self, targets: torch.Tensor, clean_outputs: torch.Tensor, adversarial_outputs: torch.Tensor) -> list[str]:
        """The first score of each image, clean and attacked."""
        name = self.score_names[0]
        clean, attacked = self.per_image_score(targets, clean_outputs).tolist(), self.per_image_score(targets, adversarial_outputs).tolist()
        return [f"{name} clean: {before:.3f}\n{name} adversarial: {after:.3f}" for before, after in zip(clean, attacked)]


class SegmentationTask(PerImageScoredTask):
    """Foreground logits (B, 1, H, W) against masks (B, 1, H, W) in {0, 1}; a pixel is foreground where its logit
    is > 0. Attacks ascend `segmentation_loss` per image; the ``empty`` goal drives every pixel to
    background (a DAG-style targeted attack). Scored by per-image Dice and IoU, averaged over the images."""

    name = "segmentation"
    target_key = "mask"
    targeted_goals = ("empty",)
    attack_loss = staticmethod(segmentation_loss)
    score_names = ("dice", "iou")
    score_unit = 2**40  # Dice and IoU in [0, 1]: up to 2**23 images

    def goal_targets(self, goal: str, targets: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(targets)

    def image_scores(self, targets: torch.Tensor, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """``dice`` and ``iou`` (B,) of the predicted foreground (logits (B, 1, H, W) > 0) against the masks (B, 1, H, W)."""
        dice, iou = dice_and_iou(outputs > 0, targets > 0.5)
        return {"dice": dice, "iou": iou}

    def overlay(self, images: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """The predicted foreground tinted red."""
        rgb = _grayscale_rgb(images).clone()
        foreground = (outputs > 0).float()
        red = torch.tensor([1.0, 0.0, 0.0], device=images.device).view(1, 3, 1, 1)
        return rgb * (1 - 0.4 * foreground) + 0.4 * foreground * red

    def caption(self, targets: torch.Tensor, clean_outputs: torch.Tensor, adversarial_outputs: torch.Tensor) -> list[str]:
        clean_dice, _ = dice_and_iou(clean_outputs > 0, targets > 0.5)
        attacked_dice, _ = dice_and_iou(adversarial_outputs > 0, targets > 0.5)
        return [f"Dice clean: {clean:.3f}\nDice adversarial: {attacked:.3f}" for clean, attacked in zip(clean_dice.tolist(), attacked_dice.tolist())]


def per_image_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error per image of outputs (B, C, H, W) against targets of the same shape."""
    return F.mse_loss(outputs.float(), targets.float(), reduction="none").flatten(1).mean(dim=1)


def restoration_loss(restored: torch.Tensor, clean: torch.Tensor, pixel_loss: str = "mse", ssim_weight: float = 0.0) -> torch.Tensor:
    """(B,) per-image training loss of a restorer: the mean absolute (``l1``) or squared (``mse``) pixel error, plus
    `ssim_weight` * (1 - SSIM).

    Args:
        restored, clean: (B, C, H, W) in [0, 1].
    """
    if pixel_loss == "l1":
        loss = F.l1_loss(restored.float(), clean.float(), reduction="none").flatten(1).mean(dim=1)
    elif pixel_loss == "mse":
        loss = per_image_mse(restored, clean)
    else:
        raise ValueError(f"pixel_loss must be l1 or mse, got {pixel_loss!r}.")
    if ssim_weight:
        ssim = structural_similarity_index_measure(restored.float(), clean.float(), data_range=1.0, reduction="none")
        loss = loss + ssim_weight * (1 - ssim)
    return loss


class RestorationTask(PerImageScoredTask):
    """Restored images (B, C, H, W) in [0, 1] against the clean images (B, C, H, W) in [0, 1] (batch ``clean``) that the
    inputs were degraded from. Attacks ascend `per_image_mse` per image (the gradient-ascent methods only:
    CW and APGD/AutoAttack optimise classification margins). Scored by per-image PSNR (dB) and SSIM, averaged over
    the images (`robust_cxr.metrics.psnr_and_ssim`)."""

    name = "restoration"
    target_key = "clean"
    attack_loss = staticmethod(per_image_mse)
    score_names = ("psnr", "ssim")
    score_unit = 2**32  # PSNR up to 100 dB: up to 2**24 images

    def image_scores(self, targets: torch.Tensor, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """``psnr`` (dB) and ``ssim`` (B,) of images (B, C, H, W) against the clean ones (`psnr_and_ssim`)."""
        psnr, ssim = psnr_and_ssim(outputs, targets)
        return {"psnr": psnr, "ssim": ssim}

    def overlay(self, images: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """The restored image (the outputs) as RGB; the input image is not drawn."""
        return _grayscale_rgb(outputs.clamp(0, 1))

    def example_columns(self, clean: torch.Tensor, adversarial: torch.Tensor, targets: torch.Tensor, clean_outputs: torch.Tensor,
                        adversarial_outputs: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The degraded input, its attacked version, the restorations of both, and the clean target."""
        return [
            ("degraded", _grayscale_rgb(clean)),
            ("adversarial", _grayscale_rgb(adversarial)),
            ("restored", self.overlay(clean, clean_outputs)),
            ("restored adv.", self.overlay(adversarial, adversarial_outputs)),
            ("clean target", _grayscale_rgb(targets)),
        ]

    def caption(self, targets: torch.Tensor, clean_outputs: torch.Tensor, adversarial_outputs: torch.Tensor) -> list[str]:
        clean_psnr, _ = psnr_and_ssim(clean_outputs, targets)
        attacked_psnr, _ = psnr_and_ssim(adversarial_outputs, targets)
        return [f"PSNR clean: {clean:.2f} dB\nPSNR adversarial: {attacked:.2f} dB" for clean, attacked in zip(clean_psnr.tolist(), attacked_psnr.tolist())]
