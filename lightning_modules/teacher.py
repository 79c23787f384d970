"""Stage 1: the teacher, any timm classifier (a ViT by default) trained on the chest X-rays."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.classifier import ImageClassifierModule
from lightning_modules.stage import MODEL_INPUT_KEYS
from robust_cxr.models import create_timm_classifier


class TeacherClassifier(ImageClassifierModule):
    """A timm model by name, normalization inside, trained with cross-entropy (optionally adversarially).

    Args:
        model_name: any `timm.create_model` name; the default, ``vit_tiny_r_s16_p8_224``, is ViT-Tiny
            behind a ResNet stem (the hybrid ViT of Dosovitskiy et al.), which learns from a few
            thousand images where a plain ViT needs far more.
        model_kwargs: extra timm arguments (``depth``, ``embed_dim``, ``drop_path_rate`` ...).
        pretrained_weights: local timm weights file, or None to train from scratch.
        train_noise_sigma: Gaussian noise augmentation (Cohen et al. 2019, the base classifier of randomized smoothing):
            every training input gets N(0, sigma^2) noise, in [0, 1] pixel units and not clamped; validation and test
            see clean images. 0: none.
        classifier: the other arguments, see `ImageClassifierModule`.
    """

    report_name = "teacher"

    def __init__(
        self,
        num_classes: int,
        model_name: str = "vit_tiny_r_s16_p8_224",
        model_kwargs: dict[str, Any] | None = None,
        pretrained_weights: str | None = None,
        train_noise_sigma: float = 0.0,
        **classifier: Any,
    ):
        super().__init__(num_classes, **classifier)
        if not train_noise_sigma >= 0:
            raise ValueError(f"train_noise_sigma must be >= 0 (a noise std in [0, 1] pixel units; 0: no noise), got {train_noise_sigma}.")
        hp = self.hparams
        self.model = create_timm_classifier(model_name, num_classes, hp.in_chans, hp.image_size, pretrained_weights, **(model_kwargs or {}))

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's loss on the batch with N(0, train_noise_sigma^2) noise added to its inputs (`MODEL_INPUT_KEYS`)."""
        sigma = self.hparams.train_noise_sigma
        noised = {key: value + sigma * torch.randn_like(value) if key in MODEL_INPUT_KEYS and sigma > 0 else value for key, value in batch.items()}
        return super().training_loss(noised)
