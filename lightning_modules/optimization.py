"""The optimizer every stage trains with: AdamW, linear warmup, then cosine decay per step."""

from __future__ import annotations

import math
from typing import Any, Iterable

import lightning as L
import torch
from timm.optim import param_groups_weight_decay
from torch import nn


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.01) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_warmup_cosine(module: L.LightningModule, params: Iterable[Any], lr: float, weight_decay: float, warmup_epochs: float) -> dict:
    """`configure_optimizers` output: AdamW over `params` (tensors or param groups), warmed up over `warmup_epochs`
    (fractions allowed) of the module's trainer, then cosine-decayed per step to the end of training."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total_steps = max(1, int(module.trainer.estimated_stepping_batches))
    warmup_steps = round(warmup_epochs * total_steps / max(1, module.trainer.max_epochs or 1))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """`model`'s parameters in two AdamW groups: `weight_decay` on weights, none on norms, biases and the model's own
    `no_weight_decay()` names (a ViT's position embeddings and class token)."""
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
