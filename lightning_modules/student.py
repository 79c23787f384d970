"""Stage 3: a small student distilled from the frozen teacher (optionally the teacher behind its purifier)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_modules.classifier import TEACHER_COMMAND, ImageClassifierModule
from lightning_modules.stage import StepLoss, TrainingAttack
from robust_cxr.attacks import AttackSpec, trades_kl
from robust_cxr.costs import model_costs, write_model_costs
from robust_cxr.distillation import ard_loss, check_distillation_settings, kd_loss, rslad_loss
from robust_cxr.models import create_student_classifier
from robust_cxr.purification import PurifiedClassifier, load_purifier, resolve_purifier_settings
from robust_cxr.threat import DefendedModel


class DistilledStudent(ImageClassifierModule):
    """A student classifier trained to match a frozen teacher's soft predictions (before the teacher's operating point:
    a shifted threshold would bias every soft target towards one class).

    The teacher (and its purifier) is loaded at construction and kept out of the state dict, the
    optimizer and DDP (`register_frozen`); a student checkpoint therefore names its teacher, it
    does not contain it.

    Robust distillation (`robust_kd`) needs the adversarial callback's `train_attack`: the callback
    asks `adversarial_training_attack` what to attack, crafts against the student and adds
    ``adversarial_image`` (B', C, H, W) for the first B' clean images of the batch.

    Args:
        student_name: ``small_cnn`` (a `SmallCNN`, the default) or any timm model name.
        student_kwargs: ``widths`` for ``small_cnn``; extra timm arguments otherwise.
        teacher_ckpt: checkpoint of a classifier stage (the teacher, or a purify-then-fine-tune run).
        purifier_dir: a purifier export that defends the teacher (the diffusion purifier stage's or the NIM stage's, see
            `load_purifier`): the report and the cost table then add the teacher behind it. None leaves it out.
        distill_purified: the teacher's soft targets come from purified images, so the student distils the
            defended pipeline (purifier then teacher); needs `purifier_dir`. False distils the teacher alone.
        purifier_settings: that purifier's own settings: diffusion ``{t_star, method, steps, eta}`` (see `Purifier`), NIM
            ``{sigma}`` (see `NIMPurifier`); those not given come from the export's defaults (`load_purifier`).
        temperature: softmax temperature T > 0 of the soft targets (``none`` and ``ard``; RSLAD uses 1).
        alpha: weight in [0, 1] of the teacher-matching term (on adversarial images for ard / rslad).
        robust_kd: ``none`` (Hinton KD on the training batch), ``ard`` (Goldblum et al. 2020: student
            on x' matched to the teacher on x, plus CE on x; the attack ascends CE) or ``rslad``
            (Zi et al. 2021: teacher soft labels replace the labels in the loss and in the attack).
        classifier: the other arguments, see `ImageClassifierModule`.
    """

    report_name = "student"

    def __init__(
        self,
        num_classes: int,
        student_name: str = "small_cnn",
        student_kwargs: dict[str, Any] | None = None,
        teacher_ckpt: str = "runs/teacher/checkpoints/best.ckpt",
        purifier_dir: str | None = "runs/purifier/export",
        distill_purified: bool = False,
        purifier_settings: dict[str, Any] | None = None,
        temperature: float = 4.0,
        alpha: float = 0.9,
        robust_kd: Literal["none", "ard", "rslad"] = "none",
        **classifier: Any,
    ):
        super().__init__(num_classes, **classifier)
        check_distillation_settings(temperature, alpha)
        self.model = create_student_classifier(student_name, num_classes, self.hparams.in_chans, self.hparams.image_size, **(student_kwargs or {}))
        teacher = self.load_upstream(teacher_ckpt, TEACHER_COMMAND, ImageClassifierModule, "classifier")
        if distill_purified and purifier_dir is None:
            raise ValueError("distill_purified=True needs purifier_dir, the purifier stage's export (runs/purifier/export).")
        self.register_frozen_teacher(teacher)
        if purifier_dir is not None:
            self.hparams.purifier_settings = resolve_purifier_settings(purifier_dir, purifier_settings)  # as deployed now
            self.register_frozen("purifier", load_purifier(purifier_dir, **self.hparams.purifier_settings))

    @property
    def defended_teacher(self) -> PurifiedClassifier:
        """The purifier then the teacher, [0, 1] images (B, C, H, W) -> logits (B, K)."""
        return PurifiedClassifier(self.purifier, self.teacher)

    @property
    def distilled(self) -> nn.Module:
        """What the student learns to match: the teacher's network, or the purifier then it (`distill_purified`), before the
        teacher's operating point, a decision rule and not part of its probabilities (the student sets its own)."""
        return PurifiedClassifier(self.purifier, self.teacher_network) if self.hparams.distill_purified else self.teacher_network

    def on_fit_start(self) -> None:
        attacked = any(getattr(callback, "train_attacks", None) for callback in self.trainer.callbacks)
        robust_kd = self.hparams.robust_kd
        if robust_kd != "none" and not attacked:
            raise ValueError(
                f"robust_kd={robust_kd!r} needs adversarial examples: set adversarial.train_attack, e.g. {{method: pgd, eps: 0.03, steps: 5}}."
            )
        if robust_kd == "none" and attacked:
            raise ValueError("robust_kd='none' distils on clean images; set robust_kd to 'ard' or 'rslad' to use adversarial.train_attack.")

    def check_adversarial_training(self, trades_beta: float | None) -> None:
        if trades_beta is not None:
            raise ValueError(f"{type(self).__name__} chooses its own adversarial training targets (robust_kd), which TRADES would "
                             "override: set trades_beta to null.")

    def adversarial_training_attack(self, batch: dict[str, torch.Tensor], count: int, spec: AttackSpec, trades_beta: float | None) -> TrainingAttack:
        """What the training attack on the student's first `count` images of ``batch`` ascends; the adversarial images go
        beside the clean ones.

        ARD: the attack's own cross-entropy with the labels. RSLAD: KL to the distilled model's probabilities (count, K),
        from ``teacher_logits`` (B, K) that the returned batch carries on to `training_loss`, so the teacher (and
        purifier) runs once per batch.
        """
        if self.hparams.robust_kd == "rslad":
            batch = {**batch, "teacher_logits": self.teacher_logits(batch["image"])}
            return TrainingAttack(batch, batch["teacher_logits"][:count].softmax(dim=1), trades_kl, paired=True)
        return TrainingAttack(batch, batch["label"][:count], paired=True)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The distilled model's logits (B, K) for [0, 1] images (B, C, H, W)."""
        return self.distilled(images)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> StepLoss:
        """The distillation loss of a training batch and the student's logits (B, K) of ``batch["image"]``."""
        hp = self.hparams
        images, labels = batch["image"], batch["label"]
        logits = self.model(images)
        teacher_logits = batch["teacher_logits"] if "teacher_logits" in batch else self.teacher_logits(images)
        weights = self.sample_weights(labels)
        if hp.robust_kd == "none":
            return StepLoss(kd_loss(logits, teacher_logits, labels, hp.temperature, hp.alpha, weights), logits)
        # While the eps warmup holds the training eps at 0 the callback adds nothing: x' is then x.
        adversarial_logits = self.model(batch["adversarial_image"]) if "adversarial_image" in batch else logits
        if hp.robust_kd == "ard":
            return StepLoss(ard_loss(logits, adversarial_logits, teacher_logits, labels, hp.temperature, hp.alpha, weights), logits)
        return StepLoss(rslad_loss(logits, adversarial_logits, teacher_logits, hp.alpha, weights), logits)

    def robustness_subjects(self) -> list[DefendedModel]:
        """The student (white-box, and transfer from the teacher), the teacher clean (its white-box rows are the teacher
        stage's report, on the same test images), and with a purifier the teacher behind it, gray-box only: white-box
        attacks through the purifier, with EOT, belong to the purify-then-fine-tune report (configs/purify_finetune.yaml)."""
        teacher = DefendedModel.alone("teacher", self.teacher)
        subjects = [self.deployed_model().with_transfer_source(self.teacher), teacher.attacked_under()]
        if self.hparams.purifier_dir is not None:
            subjects.append(teacher.behind(f"purifier/{self.purifier.label}", self.purifier, self.defended_teacher).attacked_under("graybox"))
        return subjects

    def on_test_epoch_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        models = {self.report_name: self.model, "teacher": self.teacher}
        if self.hparams.purifier_dir is not None:
            models[f"teacher+purifier/{self.purifier.label}"] = self.defended_teacher
        image_shape = (self.hparams.in_chans, self.hparams.image_size, self.hparams.image_size)
        path = write_model_costs(model_costs(models, image_shape, self.device), self.trainer.default_root_dir, self.device)
        rank_zero_info(f"Model costs: {path}")
