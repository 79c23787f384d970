"""The training, evaluation and optimisation logic shared by every stage that trains a classifier."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn

from robust_cxr.metrics import class_scores, classification_metrics
from robust_cxr.threat import DefendedModel


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.01) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ImageClassifierModule(L.LightningModule):
    """Base LightningModule: `self.model` maps (B, C, H, W) images in [0, 1] to logits (B, K).

    Batches are dicts with ``image`` (B, C, H, W) in [0, 1] and ``label`` (B,). The adversarial
    callback may add ``adversarial_image`` (B', C, H, W) and ``trades_beta`` for TRADES, which
    pairs each adversarial image with the first B' clean ones.

    Subclasses build `self.model` and call `save_hyperparameters()`.

    Args:
        num_classes, class_names: the classes in label order, linked from the DataModule by the CLI.
        lr, weight_decay: AdamW settings (no decay on norms, biases, position embeddings).
        warmup_epochs: linear warmup length (fractions allowed), then cosine decay per step.
        label_smoothing: cross-entropy label smoothing.
    """

    report_name = "classifier"

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = classification_metrics(num_classes)["acc"].clone()
        self.val_metrics = classification_metrics(num_classes).clone(prefix="val/")
        self.test_metrics = classification_metrics(num_classes).clone(prefix="test/")
        self.model: nn.Module
        self._frozen_names: list[str] = []

    def register_frozen(self, name: str, module: nn.Module) -> None:
        """Makes `module` available as ``self.<name>``: frozen, always in eval mode, and kept out of the
        state dict, the optimizer and DDP (it is not a registered submodule), but moved with this module."""
        module.eval().requires_grad_(False)
        self.__dict__[name] = module
        self._frozen_names.append(name)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for name in self._frozen_names:
            getattr(self, name)._apply(fn, *args, **kwargs)
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def deployed_model(self) -> DefendedModel:
        """What this stage deploys: its ``pipeline`` is this module's `forward` (any defense, then the classifier) and its
        ``classifier`` the classifier without the defense; both map [0, 1] images (B, C, H, W) to logits (B, K)."""
        return DefendedModel(self.report_name, "none", self.model, self.model)

    def robustness_subjects(self) -> list[DefendedModel]:
        """The deployed models the adversarial callback evaluates (see `DefendedModel`)."""
        return [self.deployed_model()]

    def adversarial_training_source(self) -> nn.Module:
        """The module that adversarial-training attacks follow: the classifier being trained."""
        return self.model

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of a training batch and the logits of ``batch["image"]``; adds the TRADES term when present."""
        logits = self.model(batch["image"])
        loss = self.criterion(logits, batch["label"])
        if "adversarial_image" in batch:
            adversarial_logits = self.model(batch["adversarial_image"])
            clean_log_probs = F.log_softmax(logits[: len(adversarial_logits)], dim=1)
            kl = F.kl_div(F.log_softmax(adversarial_logits, dim=1), clean_log_probs, reduction="batchmean", log_target=True)
            loss = loss + batch["trades_beta"] * kl
        return loss, logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits = self.training_loss(batch)
        self.train_acc(class_scores(logits), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _evaluation_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        logits = self(batch["image"])
        loss = self.criterion(logits, batch["label"])
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(class_scores(logits), batch["label"])
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=len(logits))
        self.log_dict(metrics, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        no_decay = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        groups = param_groups_weight_decay(self.model, hp.weight_decay, no_weight_decay_list=no_decay)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 1)
        warmup_steps = round(hp.warmup_epochs * steps_per_epoch)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


TEACHER_COMMAND = "python train.py --config configs/teacher.yaml"  # what writes runs/teacher/checkpoints/best.ckpt
CLASSIFIER_COMMAND = "python train.py --config configs/<stage>.yaml"  # what writes any classifier stage's checkpoint


def load_classifier_module(
    checkpoint_path: str | Path, made_by: str, num_classes: int | None = None, class_names: list[str] | None = None
) -> ImageClassifierModule:
    """The stage module saved in `checkpoint_path` (any `ImageClassifierModule`), on the CPU, frozen, in eval mode.

    `checkpoint_path` is a checkpoint file or a run directory, whose `checkpoints/best.ckpt` is read. `made_by` is the command that writes such a checkpoint, quoted in the error when the file is missing. When
    given, `num_classes` and `class_names` (the data's) must match the classes the module was trained on.
    """
    path = Path(checkpoint_path)
    if path.is_dir():
        path = path / "checkpoints" / "best.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist. Make it with `{made_by}`, or pass the path of another checkpoint.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "module_class" not in checkpoint:
        raise ValueError(f"{path} was not written by a robust-cxr classifier stage (it has no 'module_class' entry).")
    module_path, class_name = checkpoint["module_class"].rsplit(".", 1)
    module_class = getattr(importlib.import_module(module_path), class_name)
    module = module_class.load_from_checkpoint(path, map_location="cpu", weights_only=False)  # our own files, with hyperparameter objects
    trained_names, trained_count = module.hparams.get("class_names"), module.hparams.num_classes
    if (num_classes is not None and trained_count != num_classes) or (class_names and trained_names and list(trained_names) != list(class_names)):
        raise ValueError(
            f"The classifier in {path} was trained on classes {trained_names} ({trained_count}) but the data have "
            f"{class_names} ({num_classes}); use a checkpoint trained on this data, or the data it was trained on."
        )
    return module.eval().requires_grad_(False)
