"""Stage 2b: purify-then-fine-tune, the classifier fine-tuned behind the frozen diffusion purifier."""

from __future__ import annotations

import copy
import random
from typing import Literal

import torch

from lightning_modules.classifier import TEACHER_COMMAND, ImageClassifierModule, load_classifier_module
from robust_cxr.purification import PurificationMethod, PurifiedClassifier, Purifier
from robust_cxr.threat import DefendedModel


class PurifyThenFinetune(ImageClassifierModule):
    """Fine-tunes a trained classifier on purified clean and purified adversarial images (the UDC recipe).

    The teacher checkpoint gives the starting classifier; the purifier folder (an export of the purifier
    stage) stays frozen in front of it. The adversarial callback replaces part of each training batch by
    attacks crafted against the current classifier (``adversarial:`` section); every training image is
    then purified at a t* drawn per batch from `train_t_star_range`, so the classifier learns the whole
    range of purification outputs. Validation, test and `forward` run the deployed pipeline: purifier at
    `t_star`, then the fine-tuned classifier, images (B, C, H, W) in [0, 1] -> logits (B, K).

    Args:
        teacher_ckpt: checkpoint of the classifier stage to start from.
        purifier_dir: folder written by the purifier stage (``unet/``, ``scheduler/``).
        t_star, method, steps, eta: the deployed purification (see `Purifier`).
        n_repeats: purifications per image whose logits are averaged at deployment.
        train_t_star_range: inclusive [low, high] range of t* for training batches; None uses `t_star`.
        Other arguments: see `ImageClassifierModule`; `in_chans` and `image_size` must match the teacher.
    """

    report_name = "teacher_finetuned"

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        in_chans: int = 1,
        image_size: int = 64,
        teacher_ckpt: str = "runs/teacher/checkpoints/best.ckpt",
        purifier_dir: str = "runs/purifier/export",
        t_star: int = 100,
        method: PurificationMethod = "ddim",
        steps: int = 5,
        eta: float = 0.0,
        n_repeats: int = 1,
        train_t_star_range: tuple[int, int] | None = (50, 150),
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.5,
        label_smoothing: float = 0.0,
        class_weights: Literal["none", "balanced"] | list[float] = "none",
        target_sensitivity: float | None = None,
    ):
        super().__init__(num_classes, class_names, lr, weight_decay, warmup_epochs, label_smoothing, class_weights, target_sensitivity)
        self.save_hyperparameters()
        teacher = load_classifier_module(teacher_ckpt, TEACHER_COMMAND, num_classes, class_names)
        if train_t_star_range is not None and not 0 < train_t_star_range[0] <= train_t_star_range[1]:
            raise ValueError(f"train_t_star_range must be [low, high] with 0 < low <= high, got {train_t_star_range}.")
        purifier = Purifier.from_pretrained(purifier_dir, t_star=t_star, method=method, steps=steps, eta=eta, differentiable=True)
        self.model = copy.deepcopy(teacher.model).train().requires_grad_(True)
        self.operating_point.offset.copy_(teacher.operating_point.offset)  # starts at the teacher's; target_sensitivity re-chooses it
        self.register_frozen_teacher(teacher)
        self.register_frozen("purifier", purifier)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The purifier then the fine-tuned classifier, before the operating point."""
        return PurifiedClassifier(self.purifier, self.model, self.hparams.n_repeats)(images)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's loss on the batch purified at a t* drawn from `train_t_star_range`."""
        purifier = self._training_purifier()
        purified = {key: purifier(value) if key in ("image", "adversarial_image") else value for key, value in batch.items()}
        return super().training_loss(purified)

    def _training_purifier(self) -> Purifier:
        hp = self.hparams
        if hp.train_t_star_range is None:
            return self.purifier
        t_star = random.randint(*hp.train_t_star_range)
        steps = min(hp.steps, t_star)
        return Purifier(self.purifier.unet, self.purifier.scheduler, t_star=t_star, method=hp.method, steps=steps, eta=hp.eta)

    def deployed_model(self) -> DefendedModel:
        """The purifier then the fine-tuned classifier, and the fine-tuned classifier alone, both at the operating point."""
        classifier = self.decision_classifier()
        pipeline = PurifiedClassifier(self.purifier, classifier, self.hparams.n_repeats)
        return DefendedModel(self.report_name, f"purifier/{self.purifier.label}", classifier, pipeline, defense_module=self.purifier,
                             decision_threshold=self.operating_point.probability_threshold)

    def robustness_subjects(self) -> list[DefendedModel]:
        """The classifier alone, the classifier behind the purifier, and the fine-tuned classifier behind it."""
        deployed = self.deployed_model()
        defended_teacher = PurifiedClassifier(self.purifier, self.teacher, self.hparams.n_repeats)
        return [
            DefendedModel("teacher", "none", self.teacher, self.teacher, decision_threshold=self.teacher_threshold),
            DefendedModel("teacher", deployed.defense, self.teacher, defended_teacher, defense_module=self.purifier,
                          decision_threshold=self.teacher_threshold),
            deployed,
        ]

