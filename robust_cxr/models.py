"""Classifiers as plain `nn.Module`s: images (B, C, H, W) in [0, 1] -> logits (B, K)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from torch import nn


class NormalizedClassifier(nn.Module):
    """Wraps a backbone that expects normalized input so that callers pass [0, 1] pixels.

    Args:
        backbone: maps normalized (B, C, H, W) images to logits (B, K).
        mean, std: per-channel statistics (length C) the backbone was trained with.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)


def create_timm_classifier(
    model_name: str,
    num_classes: int,
    in_chans: int,
    image_size: int,
    pretrained_weights: str | None = None,
    **model_kwargs: Any,
) -> NormalizedClassifier:
    """A timm model by name with its own normalization inside.

    Args:
        pretrained_weights: optional local weights file (`.safetensors`, `.pth`, `.bin`) for
            `model_name`, loaded through timm's `pretrained_cfg_overlay`; the head is re-initialised
            when `num_classes` differs and the stem adapted when `in_chans` differs.
        image_size: input side S, passed as `img_size` to models that take one (ViTs).
        model_kwargs: extra timm arguments (e.g. ``depth``, ``patch_size``, ``drop_path_rate``).
    """
    if pretrained_weights is not None and not Path(pretrained_weights).is_file():
        raise FileNotFoundError(
            f"pretrained_weights {pretrained_weights!r} is not a file; download the timm weights for {model_name} "
            "(e.g. model.safetensors from its Hugging Face page) to a local path, or set it to null to train from scratch."
        )
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, **model_kwargs)
    if pretrained_weights is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained_weights)))
    try:
        backbone = timm.create_model(model_name, img_size=image_size, **kwargs)
    except TypeError as error:  # convolutional families take any input size and no img_size argument
        if "img_size" not in str(error):
            raise
        backbone = timm.create_model(model_name, **kwargs)
    except AssertionError as error:  # timm asserts that patches tile the image
        raise ValueError(
            f"{model_name} with {model_kwargs} cannot take {image_size}x{image_size} images: the image side must be a "
            "multiple of its patch grid stride (32 for vit_tiny_r_s16_p8_224, i.e. its stride-4 stem times patch_size 8). "
            "Change --data.image_size or the model's patch_size."
        ) from error
    mean, std = backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["std"]
    if len(mean) != in_chans:  # grayscale input to an RGB-normalized model: average the channel statistics
        mean, std = [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans
    return NormalizedClassifier(backbone, mean, std)
