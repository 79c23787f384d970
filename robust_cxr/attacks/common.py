"""What every attack shares: the attack context, keyed random starts, projection onto the threat model's ball, per-image
losses, draws of a random model, and BPDA's straight-through defense."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["linf", "l2"]
Outputs = torch.Tensor | tuple[torch.Tensor, ...]  # a model's outputs; a tuple for the adaptive source (outputs, detector scores)
LossFn = Callable[[Outputs, torch.Tensor], torch.Tensor]  # (outputs (B, ...), targets (B, ...)) -> per-image loss (B,)
ScoreFn = Callable[[Outputs], torch.Tensor]  # outputs (B, ...) -> per-image score (B,), lower = more adversarial


def is_stochastic(module: nn.Module) -> bool:
    """Whether `module` is random: one of its submodules declares ``stochastic = True`` (a purifier that draws noise).
    The attacks of a random source average its draws (EOT) and judge success on them."""
    return any(getattr(submodule, "stochastic", False) for submodule in module.modules())


class LossTerms:
    """A loss of several per-image terms: ``terms(outputs, targets)`` -> (B, T). An attack normalises each term's input
    gradient per image (L2) before weighting them with `weights` (T,), so that no term swamps another whatever its scale;
    it ranks its iterates by the weighted sum of the terms."""

    def __init__(self, terms: Callable[[Outputs, torch.Tensor], torch.Tensor], weights: Sequence[float]):
        self.terms = terms
        self.weights = tuple(float(weight) for weight in weights)

    def __call__(self, outputs: Outputs, targets: torch.Tensor) -> torch.Tensor:
        return self.terms(outputs, targets)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image cross-entropy (B,) of logits (B, K) against labels (B,): the loss classification attacks ascend."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image margin (B,): the true class's logit minus the largest other one; negative where the image is misclassified."""
    logits = logits.float()
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return true - others


def dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image difference-of-logits-ratio loss (B,) of Croce & Hein (2020): -margin / (z_1 - z_3), z sorted decreasingly;
    invariant to the scale of the logits, defined from 3 classes on."""
    ordered = logits.float().sort(dim=1, descending=True).values
    return -margin(logits, labels) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


def trades_kl(adversarial_logits: torch.Tensor, clean_probabilities: torch.Tensor) -> torch.Tensor:
    """Per-image KL(clean || adversarial) (B,) of the TRADES inner maximisation: logits (B, K), probabilities (B, K)."""
    return F.kl_div(F.log_softmax(adversarial_logits.float(), dim=1), clean_probabilities, reduction="none").sum(dim=1)


def repeat_draws(values: Outputs, draws: int) -> Outputs:
    """`values` (B, ...) (or a tuple of them) repeated `draws` times along the batch: (draws * B, ...), draw-major."""
    if isinstance(values, tuple):
        return tuple(repeat_draws(value, draws) for value in values)
    return values.repeat(draws, *([1] * (values.ndim - 1))) if draws > 1 else values


def mean_over_draws(values: Outputs, draws: int) -> Outputs:
    """The mean over draws of (draws * B, ...) draw-major values (or a tuple of them): (B, ...)."""
    if isinstance(values, tuple):
        return tuple(mean_over_draws(value, draws) for value in values)
    return values.unflatten(0, (draws, -1)).float().mean(dim=0) if draws > 1 else values.float()


@contextmanager
def attacking(source: nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters and gradients enabled (also inside inference mode) for an attack.

    Frozen parameters keep attack gradients out of parameter ``.grad`` and away from DDP's gradient hooks, whatever the
    attack library does (advertorch calls ``loss.backward()``)."""
    modes = [(module, module.training) for module in source.modules()]
    trainable = [p for p in source.parameters() if p.requires_grad]
    source.eval()
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
        for module, training in modes:
            module.training = training


_MASK32 = 0xFFFFFFFF


def _hash32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 tensors holding values < 2**32); multipliers < 2**31 avoid overflow."""
    values = values ^ (values >> 16)
    values = (values * 0x7FEB352D) & _MASK32
    values = values ^ (values >> 15)
    values = (values * 0x5BD1E995) & _MASK32
    return values ^ (values >> 16)


def keyed_uniform(like: torch.Tensor, keys: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform [0, 1) noise shaped like `like` (B, ...) that depends only on (seed, key, position).

    A sample gets the same noise whatever batch, rank or device it lands on, so random-start
    attacks score identically with 1 or N DDP processes. `keys` (B,) are e.g. dataset indices.
    """
    per_sample = like[0].numel()
    key_hash = _hash32((keys.to(like.device, torch.int64) * 0x2545F491 + seed) & _MASK32)
    positions = torch.arange(per_sample, device=like.device, dtype=torch.int64)
    bits = _hash32((key_hash[:, None] * 0x61C88647 + positions[None, :]) & _MASK32)
    return (bits.to(torch.float64) / 2**32).to(like.dtype).view_as(like)


def per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped to broadcast against `like` (B, ...)."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def unit_l2(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (B, ...) scaled to L2 norm 1 per image (an all-zero image stays zero)."""
    return tensor / per_image(tensor.flatten(1).norm(dim=1).clamp_min(1e-12), tensor)


def random_start(images: torch.Tensor, eps: float, norm: Norm, keys: torch.Tensor | None, seed: int) -> torch.Tensor:
    """A random point of the eps-ball around `images` (B, C, H, W), kept inside [0, 1]: keyed by (seed, key) per image
    when `keys` (B,) are given, else drawn from the global RNG."""
    uniform = keyed_uniform(images, keys, seed) if keys is not None else torch.rand_like(images)
    delta = eps * (2 * uniform - 1)
    if norm == "l2":
        # A direction from the cube's noise, and a radius from its first coordinate.
        delta = unit_l2(delta) * per_image(eps * uniform.flatten(1)[:, 0], images)
    return (images + delta).clamp(0, 1)


def project(adversarial: torch.Tensor, images: torch.Tensor, eps: float | torch.Tensor | None, norm: Norm) -> torch.Tensor:
    """Clip `adversarial` to the `norm` ball of radius `eps` (one for all images, or (B,) one per image) around `images`
    (B, C, H, W) (None: no ball, as for CW-L2) and to [0, 1]."""
    delta = adversarial - images
    if eps is not None and norm == "linf":
        radius = per_image(eps, images) if isinstance(eps, torch.Tensor) else eps
        delta = delta.clamp(-radius, radius)
    elif eps is not None:
        delta = delta * per_image((eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0), images)
    return (images + delta).clamp(0, 1)


def perturbation_norm(adversarial: torch.Tensor, images: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-sample L-inf or L2 size of the perturbation: (B, C, H, W) pair -> (B,)."""
    delta = (adversarial - images).flatten(1)
    return delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)


class _IdentityBackwardFunction(torch.autograd.Function):
    """``function(inputs)`` forward, the identity backward (BPDA's straight-through estimate)."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.dtype = inputs.dtype
        return function(inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype), None


class IdentityBackward(nn.Module):
    """`pipeline` with BPDA through its part `defense`: images (B, C, H, W) in [0, 1] -> the pipeline's outputs.

    The forward pass is the pipeline's own (the defense runs as deployed, random draws and all); in the backward pass
    the defense, which must map images to images of the same shape, counts as the identity. `defense` must be the very
    module the pipeline calls (e.g. `DefendedModel.defense_module`): it is swapped for the straight-through version
    for the duration of each forward pass.
    """

    def __init__(self, pipeline: nn.Module, defense: nn.Module):
        super().__init__()
        self.pipeline = pipeline
        self.defense = defense

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        defense_forward = self.defense.forward
        self.defense.forward = lambda inputs: _IdentityBackwardFunction.apply(inputs, defense_forward)
        try:
            return self.pipeline(images)
        finally:
            del self.defense.forward  # the class's forward again


class LogitAverage(nn.Module):
    """Outputs of a random model averaged over `draws` draws, run as one batch of draws * B: images (B, C, H, W) in
    [0, 1] -> (B, ...). The source the library attacks (CW) see: their gradient is that of the averaged logits."""

    def __init__(self, model: nn.Module, draws: int):
        super().__init__()
        self.model = model
        self.draws = draws

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return mean_over_draws(self.model(repeat_draws(images, self.draws)), self.draws)
