"""Models as plain `nn.Module`s on images (B, C, H, W) in [0, 1]: classifiers (-> logits (B, K)), segmenters
(-> foreground logits (B, 1, H, W)) and restorers (-> images (B, C, H, W) in [0, 1])."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn


class NormalizedModel(nn.Module):
    """Wraps a backbone that expects normalized input so that callers pass [0, 1] pixels.

    Args:
        backbone: maps normalized (B, C, H, W) images to its outputs (logits (B, K), or (B, 1, H, W) for a segmenter).
        mean, std: per-channel statistics (length C) the backbone was trained with.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, C, H, W) -> the backbone's normalized input (B, C, H, W)."""
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(images))


def create_timm_classifier(
    model_name: str,
    num_classes: int,
    in_chans: int,
    image_size: int,
    pretrained_weights: str | None = None,
    **model_kwargs: Any,
) -> NormalizedModel:
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
    return NormalizedModel(backbone, mean, std)


class OperatingPoint(nn.Module):
    """Shifts logits (B, K) -> (B, K) by a per-class offset (K,) so that argmax decides at a chosen operating point.

    A binary task's margin threshold m (`set_margin_threshold`) puts -m on class 1: argmax then decides class 1
    exactly when logit_1 - logit_0 > m, i.e. when P(class 1) > sigmoid(m). Zero offsets (the default) leave argmax as is.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros(num_classes))

    def set_margin_threshold(self, threshold: float) -> None:
        """Decide class 1 of a binary task when logit_1 - logit_0 > `threshold`."""
        self.offset.copy_(torch.tensor([0.0, -threshold]))

    @property
    def probability_threshold(self) -> float | None:
        """The P(class 1) above which a binary task decides class 1 (0.5 without a shift); None for K > 2."""
        return float(torch.sigmoid(self.offset[0] - self.offset[1])) if len(self.offset) == 2 else None

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.offset


class SmallCNN(nn.Module):
    """A small convolutional classifier: normalized images (B, C, H, W) -> logits (B, K).

    Per width, a stride-2 and a stride-1 3x3 conv-BatchNorm-ReLU block, then global average pooling
    and a linear head; any input side. Wrap it in `NormalizedModel` for [0, 1] input (see
    `create_student_classifier`).
    """

    def __init__(self, in_chans: int, num_classes: int, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        blocks = []
        channels = in_chans
        for width in widths:
            blocks += [_conv_bn_relu(channels, width, stride=2), _conv_bn_relu(width, width, stride=1)]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def create_student_classifier(
    student_name: str, num_classes: int, in_chans: int, image_size: int, **student_kwargs: Any
) -> NormalizedModel:
    """The distilled student: ``small_cnn`` is `SmallCNN` (kwargs: ``widths``) on [0, 1] pixels centred to
    [-1, 1]; any other name is a timm model built by `create_timm_classifier` with `student_kwargs`."""
    if student_name == "small_cnn":
        return NormalizedModel(SmallCNN(in_chans, num_classes, **student_kwargs), [0.5] * in_chans, [0.5] * in_chans)
    return create_timm_classifier(student_name, num_classes, in_chans, image_size, **student_kwargs)


def check_unet_image_size(image_size: int, encoder_depth: int) -> None:
    """Raises a ValueError naming the fix unless a U-Net of `encoder_depth` stages can take `image_size` px images."""
    if image_size % 2**encoder_depth:
        raise ValueError(f"The U-Net halves the image {encoder_depth} times: image_size {image_size} must be a multiple of "
                         f"{2**encoder_depth}; change --data.image_size or encoder_depth.")


def create_segmenter(
    encoder_name: str, in_chans: int, encoder_depth: int = 4, decoder_channels: Sequence[int] = (64, 32, 16, 8), out_chans: int = 1
) -> NormalizedModel:
    """A U-Net from segmentation_models_pytorch, built from scratch (no downloaded weights), on [0, 1] pixels centred
    to [-1, 1]: images (B, C, S, S) -> `out_chans` maps (B, out_chans, S, S) (a segmenter's foreground logits), S a
    multiple of 2**encoder_depth.

    Args:
        encoder_name: an smp encoder (``resnet18``, ...) or a timm one with the ``tu-`` prefix (``tu-resnet10t``).
        encoder_depth, decoder_channels: the U-Net's number of stages and each decoder stage's width
            (`decoder_channels` holds `encoder_depth` widths).
    """
    if len(decoder_channels) != encoder_depth:
        raise ValueError(f"decoder_channels needs one width per encoder stage ({encoder_depth}), got {list(decoder_channels)}.")
    unet = smp.Unet(encoder_name, encoder_depth=encoder_depth, encoder_weights=None, decoder_channels=list(decoder_channels),
                    in_channels=in_chans, classes=out_chans)
    return NormalizedModel(unet, [0.5] * in_chans, [0.5] * in_chans)


class ResidualRestorer(nn.Module):
    """Image-to-image restoration: degraded images (B, C, S, S) in [0, 1] -> restored images (B, C, S, S) in [0, 1].

    A U-Net (`create_segmenter`, `feature_channels` output maps) sees the whole image; a full-resolution head of two
    3x3 convolutions on the input and those maps predicts a correction, added to the input and clamped to [0, 1].
    The head gives the correction per-pixel detail (noise is per pixel, and the U-Net's finest decoder stage has no
    full-resolution skip connection); its last convolution starts at zero, so an untrained restorer is the identity.

    Args:
        in_chans: image channels C.
        encoder_name, encoder_depth, decoder_channels: the U-Net (see `create_segmenter`); S a multiple of
            2**encoder_depth.
        feature_channels: U-Net output maps fed to the head; head_channels: the head's hidden width.
    """

    def __init__(self, in_chans: int, encoder_name: str = "tu-resnet10t", encoder_depth: int = 3,
                 decoder_channels: Sequence[int] = (32, 16, 16), feature_channels: int = 16, head_channels: int = 32):
        super().__init__()
        self.unet = create_segmenter(encoder_name, in_chans, encoder_depth, decoder_channels, out_chans=feature_channels)
        self.head = nn.Sequential(
            nn.Conv2d(in_chans + feature_channels, head_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(head_channels, in_chans, 3, padding=1),
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        correction = self.head(torch.cat([2 * images - 1, self.unet(images)], dim=1))
        return (images + correction).clamp(0, 1)
