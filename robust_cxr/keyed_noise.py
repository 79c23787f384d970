"""Standard-normal noise that is a function of (seed, image key, draw index, position) alone, computed in parallel.

Randomized smoothing draws many noise samples per image; drawing them from keys rather than from a generator's stream
makes each image's noise independent of batching, of the number of processes and of which draws ran before, so
certificates are the same on 1 or N DDP processes and after a resume. The keys are hashed with MurmurHash3's 32-bit
finaliser: (seed, image key) and then the draw index are mixed into a per-draw state, bijectively in the draw index,
so the draws of one image never share a state; each position mixes its own index into that state. Pairs of 32-bit
uniforms become normals by the Box-Muller transform.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9  # added before mixing, so that no key is a fixed point of the mix (it maps 0 to 0)


def keyed_normal(shape: tuple[int, ...], image_keys: torch.Tensor, draws: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard-normal noise (R, *shape) float32, row r a function of (`seed`, ``image_keys[r]``, ``draws[r]``) only.

    Args:
        shape: one draw's shape, e.g. (C, H, W).
        image_keys: (R,) int, e.g. each image's index in its split; in [0, 2**32).
        draws: (R,) int, the draw index of each row; in [0, 2**32). Two rows of one image key and different draw
            indices are independent draws.
        seed: any int (taken modulo 2**32).
    """
    count = math.prod(shape)
    device = image_keys.device
    state = _mix(torch.tensor(seed & _MASK32, dtype=torch.int64, device=device))
    state = _combine(_combine(state, image_keys.to(torch.int64) & _MASK32), draws.to(device, torch.int64) & _MASK32)
    positions = torch.arange(count + count % 2, dtype=torch.int64, device=device)  # an even count: Box-Muller uses pairs
    bits = _combine(state[:, None], positions[None, :])
    uniform = (bits.to(torch.float64) + 0.5) / 2**32  # in (0, 1), so the logarithm is finite
    radius = (-2 * uniform[:, 0::2].log()).sqrt()
    angle = 2 * math.pi * uniform[:, 1::2]
    normal = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=2).flatten(1)[:, :count]
    return normal.to(torch.float32).view(len(state), *shape)


def _combine(state: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The 32-bit state that follows `state` given `values` (broadcast together): a bijection of either for the other fixed."""
    return _mix(state ^ _mix((values + _GOLDEN32) & _MASK32))


def _mix(values: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32): a bijection that spreads every input
    bit over the output."""
    values = values ^ (values >> 16)
    values = _multiply32(values, 0x85EBCA6B)
    values = values ^ (values >> 13)
    values = _multiply32(values, 0xC2B2AE35)
    return values ^ (values >> 16)


def _multiply32(values: torch.Tensor, constant: int) -> torch.Tensor:
    """``values * constant`` modulo 2**32 for values in [0, 2**32), in 16-bit halves of the constant so that no int64
    product overflows."""
    low, high = constant & 0xFFFF, constant >> 16
    return (values * low + (((values * high) & 0xFFFF) << 16)) & _MASK32
