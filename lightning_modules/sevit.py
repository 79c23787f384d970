"""SEViT (Almalik et al.): MLP heads on the first blocks of the trained, frozen teacher ViT, deployed as a self-ensemble
that votes, with the members' disagreement as a detector of adversarial inputs (`robust_cxr.sevit`)."""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from lightning_modules.classifier import TEACHER_COMMAND, ImageClassifierModule
from lightning_modules.stage import StepLoss, calibrate_detector_threshold
from robust_cxr.metrics import LogitsAndLabels, class_scores
from robust_cxr.models import NormalizedModel
from robust_cxr.sevit import BlockHeads, ConsistencyDetector, SelfEnsemble, block_tokens_shape, consistency_score, vote_logits
from robust_cxr.threat import DefendedModel


class SelfEnsembleViT(ImageClassifierModule):
    """Trains one MLP head per block on the first `num_blocks` blocks of the frozen teacher ViT with cross-entropy
    (class-weighted by `class_weights`) on that block's patch tokens; `self.model` is the `SelfEnsemble` of the ViT and
    the heads, whose logits are those of the hard majority vote (ties decided as the ViT decides) and whose gradient
    is that of the log of the members' mean softmax (straight-through; the vote itself has none).

    The checkpoint holds the heads and the detector's threshold, and names the teacher, whose ViT is loaded from its file
    (`upstream_submodules`). Each validation sets the threshold to the consistency score that `false_positive_rate` of
    the clean validation images exceed (gathered over ranks).
    The report evaluates the teacher alone and teacher + SEViT: gray-box (attacks crafted on the ViT alone, as the paper
    does), white-box through the straight-through vote, and the ``adaptive`` attack that also keeps the members
    consistent, with detection rows (AUROC, detection rate) for every attack.

    Args:
        teacher_ckpt: checkpoint of a classifier stage whose model is a timm VisionTransformer (the teacher).
        num_blocks: heads on blocks 0 .. num_blocks - 1 (at most the ViT's depth; fewer blocks, fewer heads).
        hidden_sizes: each head's hidden widths. The paper's 4096-2048-128 is for ViT-B/16 at 224 px (196 tokens x
            768 = 150528 inputs); the default ViT-Tiny hybrid at 64 px has 4 tokens x 192 = 768, hence (256, 64).
        false_positive_rate: the share of clean validation images the detector's threshold may flag.
        classifier: the other arguments, see `ImageClassifierModule` (no `target_sensitivity`: the vote decides by
            majority); the data must be the teacher's.
    """

    report_name = "teacher"
    upstream_submodules = ("model.classifier", "model.operating_point")  # the teacher's ViT, from teacher_ckpt

    def __init__(
        self,
        num_classes: int,
        teacher_ckpt: str = "runs/teacher/checkpoints/best.ckpt",
        num_blocks: int = 5,
        hidden_sizes: tuple[int, ...] = (256, 64),
        false_positive_rate: float = 0.05,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 0.5,
        **classifier: Any,
    ):
        super().__init__(num_classes, weight_decay=weight_decay, warmup_epochs=warmup_epochs, **classifier)
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 (heads on blocks 0 .. num_blocks - 1), got {num_blocks}.")
        if self.hparams.target_sensitivity is not None:
            raise ValueError("SEViT decides by majority vote: leave target_sensitivity unset (the teacher's threshold is its ViT's).")
        teacher = self.load_upstream(teacher_ckpt, TEACHER_COMMAND, ImageClassifierModule, "classifier")
        classifier = teacher.model
        if not (isinstance(classifier, NormalizedModel) and isinstance(classifier.backbone, VisionTransformer)):
            backbone = type(getattr(classifier, "backbone", classifier)).__name__
            raise ValueError(
                f"{teacher_ckpt} holds a {type(teacher).__name__} whose classifier is a {backbone}, not a timm VisionTransformer: "
                f"SEViT puts its heads on a ViT's blocks. Pass the checkpoint of a ViT teacher (`{TEACHER_COMMAND}`, model_name vit_*)."
            )
        depth = len(classifier.backbone.blocks)
        tokens, dim = block_tokens_shape(classifier, self.hparams.in_chans, self.hparams.image_size)
        heads = BlockHeads(min(num_blocks, depth), tokens, dim, num_classes, tuple(hidden_sizes))
        self.model = SelfEnsemble(classifier, teacher.operating_point, heads)
        self.val_clean_scores = LogitsAndLabels()  # consistency scores (B, 1) of clean validation images, with their indices

    def on_fit_start(self) -> None:
        if any(getattr(callback, "train_attacks", None) for callback in self.trainer.callbacks):
            raise ValueError("SEViT's heads train on clean images: leave adversarial.train_attack and train_attack_mix unset.")

    def heads_loss(self, member_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over heads of their class-weighted cross-entropy: member logits (1 + heads, B, K), labels (B,) -> scalar."""
        heads = member_logits[1:]
        return self.loss(heads.flatten(0, 1), labels.repeat(len(heads)))

    def training_loss(self, batch: dict[str, torch.Tensor]) -> StepLoss:
        """The heads' loss and the vote logits (B, K) of ``batch["image"]``."""
        members = self.model.member_logits(batch["image"])
        return StepLoss(self.heads_loss(members, batch["label"]), vote_logits(members))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        members = self.model.member_logits(batch["image"])
        self.log("val/heads_loss", self.heads_loss(members, batch["label"]), sync_dist=True, prog_bar=True, batch_size=len(batch["label"]))
        self.val_outputs.update(vote_logits(members), batch["label"])
        self.val_clean_scores.update(consistency_score(members)[:, None], batch["index"])

    def on_validation_epoch_end(self) -> None:
        """Logs the vote's validation metrics and sets the detector's threshold (`false_positive_rate`)."""
        super().on_validation_epoch_end()
        calibrate_detector_threshold(self, self.val_clean_scores, self.model.threshold, self.hparams.false_positive_rate,
                                     "val/detection_threshold")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        members = self.model.member_logits(batch["image"])
        self.test_metrics.update(class_scores(vote_logits(members)), batch["label"])
        self.log_dict(self.test_metrics)
        scores = consistency_score(members)
        self.log("test/false_positive_rate", (scores > self.model.threshold).float().mean(), sync_dist=True, batch_size=len(scores))

    def deployed_model(self) -> DefendedModel:
        """Teacher + SEViT: the vote of the ViT and its heads, with the consistency detector; gray-box attacks follow the ViT."""
        return self.teacher_alone().behind("sevit", pipeline=self.model).with_detector(ConsistencyDetector(self.model))

    def teacher_alone(self) -> DefendedModel:
        """The frozen ViT at its operating point, undefended: [0, 1] images (B, C, H, W) -> logits (B, K)."""
        return DefendedModel.alone("teacher", torch.nn.Sequential(self.model.classifier, self.model.operating_point))

    def robustness_subjects(self) -> list[DefendedModel]:
        return [self.teacher_alone(), self.deployed_model()]
