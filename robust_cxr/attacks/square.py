"""The L-inf Square attack (Andriushchenko et al. 2020), gradient-free, judged over a random model's draws.

Square proposes, per image and query, a square window of the perturbation set to +-eps per channel and keeps it where
the classification margin (true logit minus the largest other) falls. Its window side shrinks with the queries spent
(the schedule of the paper's L-inf attack, from 80 % of the pixels). It exposes gradient masking: a defense that holds
against gradient attacks but falls to Square hides its gradient.

On a deterministic model an image leaves the attack once its margin is negative. On a random model one forward pass
proves nothing: the margin of every proposal is the mean over the model's draws (EOT of the margin), the proposal and
the point it would replace are judged on the same draws (common random numbers, so that a lucky draw neither wins nor
loses a comparison), and every image is attacked until the query budget is spent.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robust_cxr.attacks.common import margin, mean_over_draws, repeat_draws

SQUARE_START_SHARE = 0.8  # p_init: the first windows cover 80 % of the image
# (share of the queries spent, divisor of the window's share of the image) of the paper's schedule, for a budget of any size
_WINDOW_SCHEDULE = ((0.001, 1), (0.005, 2), (0.02, 4), (0.05, 8), (0.1, 16), (0.2, 32), (0.4, 64), (0.6, 128), (0.8, 256), (1.0, 512))


def window_side(query: int, queries: int, height: int, width: int) -> int:
    """The side of query `query`'s square window (of `queries`) on images of `height` x `width` px: at least 1, below
    the shorter side."""
    spent = query / queries
    divisor = next(divisor for limit, divisor in _WINDOW_SCHEDULE if spent <= limit)
    return max(1, min(round(math.sqrt(SQUARE_START_SHARE / divisor * height * width)), min(height, width) - 1))


def _average_margin(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, draws: int, seed: int | None) -> torch.Tensor:
    """Mean over `draws` draws of the margin (B,) of images (B, C, H, W); with `seed`, the draws come from the global RNG
    seeded with it (so that two calls with one seed draw the same noise)."""
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        logits = model(repeat_draws(images, draws))
        return mean_over_draws(margin(logits, repeat_draws(labels, draws))[:, None], draws)[:, 0]


def square_linf(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, queries: int, draws: int,
                stochastic: bool) -> torch.Tensor:
    """Square's most adversarial point (B, C, H, W) within `eps` (L-inf) of `images` (B, C, H, W) in [0, 1] for a
    classifier `model` (images -> logits (B, K)) and labels (B,), after at most `queries` margin evaluations per image
    (the first at the vertical-stripes start). `draws`: model draws averaged per evaluation; `stochastic`: the model is
    random (common random numbers, no early stop). Its own randomness (windows, signs, the noise seeds of the common
    random numbers) comes from a generator seeded from the global RNG."""
    generator = torch.Generator(images.device).manual_seed(int(torch.randint(2**62, (1,))))
    batch, channels, height, width = images.shape

    def signs(*shape: int) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=generator, device=images.device).to(images.dtype) * 2 - 1

    def noise_seed() -> int | None:
        return int(torch.randint(2**62, (1,), generator=generator, device=images.device)) if stochastic else None

    best = (images + eps * signs(batch, channels, 1, width)).clamp(0, 1)
    best_margin = _average_margin(model, best, labels, draws, noise_seed())
    rows = torch.arange(height, device=images.device).view(1, 1, -1, 1)
    columns = torch.arange(width, device=images.device).view(1, 1, 1, -1)
    for query in range(1, queries):
        active = torch.ones(batch, dtype=torch.bool, device=images.device) if stochastic else best_margin > 0
        if not active.any():
            break
        x, current, count = images[active], best[active], int(active.sum())
        side = window_side(query, queries, height, width)
        top = torch.randint(0, height - side + 1, (count, 1, 1, 1), generator=generator, device=images.device)
        left = torch.randint(0, width - side + 1, (count, 1, 1, 1), generator=generator, device=images.device)
        window = (rows >= top) & (rows < top + side) & (columns >= left) & (columns < left + side)
        sign = signs(count, channels, 1, 1)
        unchanged = (torch.where(window, (x + eps * sign).clamp(0, 1), current) == current).flatten(1).all(dim=1)
        sign = torch.where(unchanged.view(-1, 1, 1, 1), -sign, sign)  # a window that would change nothing takes the other sign
        proposal = torch.where(window, (x + eps * sign).clamp(0, 1), current)
        seed = noise_seed()
        proposed_margin = _average_margin(model, proposal, labels[active], draws, seed)
        current_margin = _average_margin(model, current, labels[active], draws, seed) if stochastic else best_margin[active]
        accepted = proposed_margin < current_margin
        best[active] = torch.where(accepted.view(-1, 1, 1, 1), proposal, current)
        best_margin[active] = torch.where(accepted, proposed_margin, current_margin)
    return best
