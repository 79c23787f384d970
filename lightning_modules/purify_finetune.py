"""Stage 2b: purify-then-fine-tune, the classifier fine-tuned behind a frozen purifier (diffusion or NIM)."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from lightning_modules.classifier import TEACHER_COMMAND, ImageClassifierModule, load_classifier_module
from robust_cxr.purification import PurifiedClassifier, load_purifier
from robust_cxr.threat import DefendedModel

LEGACY_DIFFUSION_SETTINGS = ("t_star", "method", "steps", "eta")  # arguments of their own in checkpoints before issue 16


class PurifyThenFinetune(ImageClassifierModule):
    """Fine-tunes a trained classifier on purified clean and purified adversarial images (the UDC and De^3 recipe).

    The teacher checkpoint gives the starting classifier; the purifier folder stays frozen in front of it: the export
    of the diffusion purifier stage or of the NIM stage, whichever `load_purifier` finds there. The adversarial
    callback replaces part of each training batch by attacks crafted against the current classifier (``adversarial:``
    section); every training image is then purified at a strength drawn per batch from `train_strength_range` (t* for
    diffusion, sigma for NIM), so the classifier learns the whole range of purification outputs. Validation, test and
    `forward` run the deployed pipeline: the purifier as `purifier_settings` say, then the fine-tuned classifier, images
    (B, C, H, W) in [0, 1] -> logits (B, K).

    Args:
        teacher_ckpt: checkpoint of the classifier stage to start from.
        purifier_dir: a purifier export: ``runs/purifier/export`` (diffusion: ``unet/``, ``scheduler/``) or
            ``runs/nim/export`` (NIM: ``config.json``, ``model.safetensors``).
        purifier_settings: the deployed purification, that purifier's own settings: diffusion ``{t_star, method, steps,
            eta}`` (see `Purifier`), NIM ``{sigma}`` (a number or a noise distribution, see `NIMPurifier`); None: its defaults.
        n_repeats: purifications per image whose logits are averaged at deployment.
        train_strength_range: inclusive [low, high] range of the purifier's strength for training batches: t* for
            diffusion (integers, e.g. [50, 150]), sigma in [0, 1] pixel units for NIM (De^3: [0, 0.1176], i.e. 0..30/255);
            None trains at the deployed strength.
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
        purifier_settings: dict[str, Any] | None = None,
        n_repeats: int = 1,
        train_strength_range: tuple[float, float] | None = None,
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
        purifier = load_purifier(purifier_dir, differentiable=True, **(purifier_settings or {}))
        if train_strength_range is not None:
            low, high = train_strength_range
            if not 0 <= low <= high:
                raise ValueError(f"train_strength_range must be [low, high] with 0 <= low <= high ({purifier.strength_name}), got {train_strength_range}.")
            for strength in (low, high):  # a strength the purifier cannot take fails here, not mid-training
                purifier.at_strength(strength)
        self.model = copy.deepcopy(teacher.model).train().requires_grad_(True)
        self.operating_point.offset.copy_(teacher.operating_point.offset)  # starts at the teacher's; target_sensitivity re-chooses it
        self.register_frozen_teacher(teacher)
        self.register_frozen("purifier", purifier)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {})
        legacy = {name: saved[name] for name in LEGACY_DIFFUSION_SETTINGS if name in saved}
        if legacy:  # Lightning drops the old arguments: deploy the diffusion purifier as that checkpoint was tested
            self.hparams.purifier_settings = legacy
            self.register_frozen("purifier", load_purifier(self.hparams.purifier_dir, differentiable=True, **legacy))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The purifier then the fine-tuned classifier, before the operating point."""
        return PurifiedClassifier(self.purifier, self.model, self.hparams.n_repeats)(images)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's loss on the batch purified at a strength drawn from `train_strength_range`."""
        purifier = self._training_purifier()
        purified = {key: purifier(value) if key in ("image", "adversarial_image") else value for key, value in batch.items()}
        return super().training_loss(purified)

    def _training_purifier(self) -> nn.Module:
        strength_range = self.hparams.train_strength_range
        if strength_range is None:
            return self.purifier
        return self.purifier.at_strength(self.purifier.draw_strength(*strength_range))

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
