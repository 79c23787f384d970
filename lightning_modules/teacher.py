"""Stage 1: the teacher, any timm classifier (a ViT by default) trained on the chest X-rays."""

from __future__ import annotations

from typing import Any, Literal

from lightning_modules.classifier import ImageClassifierModule
from robust_cxr.models import create_timm_classifier


class TeacherClassifier(ImageClassifierModule):
    """A timm model by name, normalization inside, trained with cross-entropy (optionally adversarially).

    Args:
        model_name: any `timm.create_model` name; the default, ``vit_tiny_r_s16_p8_224``, is ViT-Tiny
            behind a ResNet stem (the hybrid ViT of Dosovitskiy et al.), which learns from a few
            thousand images where a plain ViT needs far more.
        model_kwargs: extra timm arguments (``depth``, ``embed_dim``, ``drop_path_rate`` ...).
        pretrained_weights: local timm weights file, or None to train from scratch.
        in_chans, image_size: input channels and side, linked from the DataModule by the CLI.
        Other arguments: see `ImageClassifierModule`.
    """

    report_name = "teacher"

    def __init__(
        self,
        num_classes: int,
        model_name: str = "vit_tiny_r_s16_p8_224",
        model_kwargs: dict[str, Any] | None = None,
        pretrained_weights: str | None = None,
        in_chans: int = 1,
        image_size: int = 64,
        class_names: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 1.0,
        label_smoothing: float = 0.0,
        class_weights: Literal["none", "balanced"] | list[float] = "none",
        target_sensitivity: float | None = None,
    ):
        super().__init__(num_classes, class_names, lr, weight_decay, warmup_epochs, label_smoothing, class_weights, target_sensitivity)
        self.save_hyperparameters()
        self.model = create_timm_classifier(
            model_name, num_classes, in_chans, image_size, pretrained_weights, **(model_kwargs or {})
        )
