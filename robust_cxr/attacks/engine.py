"""The gradient-ascent engine of FGSM, BIM, PGD, MI-FGSM, L2-PGD and APGD: expectation over a random source's draws,
the most adversarial iterate per image, and the step rules.

Every iterate is judged where it is computed, on the same forward pass that gives its gradient: its per-image loss
(the mean over the source's draws of each draw's loss: EOT of the loss; or the loss of the draw-averaged outputs) and,
given a score function, the mean over the draws of each draw's score (for a classifier: the share of draws it is right
on). The attack returns, per image, the iterate with the lowest score and, among equals, the highest loss; the last
iterate is evaluated too.
A random model is thus never judged fooled on one lucky draw, and an image fooled at an intermediate step counts as
fooled even if the last step walked back out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from robust_cxr.attacks.common import LossFn, Norm, Outputs, ScoreFn, mean_over_draws, per_image, project, repeat_draws, unit_l2

EotAverage = Literal["loss", "logits"]


@dataclass
class Expectation:
    """A source judged over `draws` draws: per-image loss and score of images (B, C, H, W) in [0, 1].

    Args:
        source: images -> outputs (logits, masks, restored images, or (outputs, detector scores)).
        loss: per-image loss (B,) or loss terms (B, T) of outputs against `targets`.
        targets: (B, ...) what `loss` takes.
        draws: draws of a random source per evaluation (1 for a deterministic one), run as one batch of draws * B.
        average: ``loss``: the mean of the per-draw losses (EOT); ``logits``: the loss of the draw-averaged outputs.
        score: per-image score (B,) of one draw's outputs, lower = more adversarial (averaged over the draws); None
            ranks by loss alone.
    """

    source: nn.Module
    loss: LossFn
    targets: torch.Tensor
    draws: int = 1
    average: EotAverage = "loss"
    score: ScoreFn | None = None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss (B,) or (B, T) with the graph to `images`, score (B,) detached; zeros without a score function).
        `targets` defaults to all of `targets` (pass a subset's for a subset of images)."""
        targets = self.targets if targets is None else targets
        outputs = self.source(repeat_draws(images, self.draws))
        if self.average == "logits" or self.draws == 1:
            loss = self.loss(mean_over_draws(outputs, self.draws), targets)
        else:
            loss = self.loss(outputs, repeat_draws(targets, self.draws)).unflatten(0, (self.draws, -1)).mean(dim=0)
        with torch.no_grad():
            score = self._mean_score(outputs, len(images))
        return loss, score

    def _mean_score(self, outputs: Outputs, count: int) -> torch.Tensor:
        """The mean over draws of each draw's per-image score (B,) (for a classifier: the share of draws it is right on,
        an estimate of its chance to be right on one draw as deployed); zeros without a score function."""
        if self.score is None:
            return torch.zeros(count, dtype=torch.float64, device=_first(outputs).device)
        per_draw = [self.score(_draw(outputs, draw, count)).double() for draw in range(self.draws)]
        return torch.stack(per_draw).mean(dim=0)


def _first(outputs: Outputs) -> torch.Tensor:
    return outputs[0] if isinstance(outputs, tuple) else outputs


def _draw(outputs: Outputs, draw: int, count: int) -> Outputs:
    """The `draw`-th draw's (count, ...) of draw-major outputs (draws * count, ...) (or a tuple of them), detached."""
    if isinstance(outputs, tuple):
        return tuple(_draw(value, draw, count) for value in outputs)
    return outputs[draw * count:(draw + 1) * count].detach().float()


def ranking(loss: torch.Tensor, weights: tuple[float, ...] | None) -> torch.Tensor:
    """The per-image loss (B,) iterates are ranked by: `loss` itself, or the weighted sum of loss terms (B, T)."""
    if loss.ndim == 1:
        return loss.detach().double()
    return (loss.detach().double() * torch.tensor(weights, dtype=torch.float64, device=loss.device)).sum(dim=1)


def input_gradient(loss: torch.Tensor, images: torch.Tensor, weights: tuple[float, ...] | None) -> torch.Tensor:
    """d loss / d images (B, C, H, W) of a per-image loss (B,); for loss terms (B, T), the sum over terms of `weights` times
    each term's gradient normalised per image (L2)."""
    if loss.ndim == 1:
        return torch.autograd.grad(loss.sum(), images)[0]
    gradient = torch.zeros_like(images)
    for term, weight in enumerate(weights):
        grad = torch.autograd.grad(loss[:, term].sum(), images, retain_graph=term < loss.shape[1] - 1)[0]
        gradient = gradient + weight * unit_l2(grad)
    return gradient


class MostAdversarial:
    """Per image, the most adversarial of the points offered so far: the lowest score, then the highest ranking loss."""

    def __init__(self, images: torch.Tensor):
        self.point = images.detach().clone()
        self.score = torch.full((len(images),), math.inf, dtype=torch.float64, device=images.device)
        self.loss = torch.full((len(images),), -math.inf, dtype=torch.float64, device=images.device)

    def offer(self, points: torch.Tensor, score: torch.Tensor, loss: torch.Tensor) -> None:
        """Keeps each of `points` (B, ...) whose (score (B,), loss (B,)) beats the one held for its image."""
        better = (score < self.score) | ((score == self.score) & (loss > self.loss))
        self.point = torch.where(per_image(better, points), points.detach(), self.point)
        self.score = torch.where(better, score, self.score)
        self.loss = torch.where(better, loss, self.loss)


StepRule = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (point, gradient, step) -> next point, unprojected


def gradient_ascent(expectation: Expectation, images: torch.Tensor, start: torch.Tensor, steps: int, step: StepRule,
                    eps: float | torch.Tensor, norm: Norm, weights: tuple[float, ...] | None = None) -> torch.Tensor:
    """Ascends `expectation`'s loss from `start` for `steps` steps of the rule `step`, each projected onto the `norm` ball
    of radius `eps` (or (B,) one per image) around `images` (B, C, H, W) and onto [0, 1]; returns the most adversarial
    iterate per image (the start and the last included)."""
    best = MostAdversarial(images)
    point = start.detach()
    for index in range(steps + 1):
        point.requires_grad_(index < steps)
        with torch.set_grad_enabled(index < steps):
            loss, score = expectation(point)
        best.offer(point, score, ranking(loss, weights))
        if index == steps:
            break
        gradient = input_gradient(loss, point, weights)
        point = project(step(point.detach(), gradient, index), images, eps, norm).detach()
    return best.point


def sign_step(step_size: float) -> StepRule:
    """FGSM, BIM and PGD: a step of `step_size` along the gradient's sign."""
    return lambda point, gradient, _: point + step_size * gradient.sign()


def l2_step(step_size: float | torch.Tensor) -> StepRule:
    """L2-PGD: a step of L2 length `step_size` (or (B,) one per image) along the gradient."""
    def step(point: torch.Tensor, gradient: torch.Tensor, _: int) -> torch.Tensor:
        length = per_image(torch.as_tensor(step_size, dtype=gradient.dtype, device=gradient.device), gradient)
        return point + length * unit_l2(gradient)

    return step


def momentum_sign_step(step_size: float, decay: float = 1.0) -> StepRule:
    """MI-FGSM (Dong et al. 2018): a sign step along the momentum g <- decay * g + gradient / ||gradient||_1."""
    momentum: list[torch.Tensor] = []

    def step(point: torch.Tensor, gradient: torch.Tensor, index: int) -> torch.Tensor:
        normalised = gradient / per_image(gradient.flatten(1).abs().sum(dim=1).clamp_min(1e-12), gradient)
        momentum[:] = [normalised if index == 0 else decay * momentum[0] + normalised]
        return point + step_size * momentum[0].sign()

    return step


APGD_MOMENTUM = 0.75  # alpha of Croce & Hein (2020)
APGD_RHO = 0.75  # below this share of loss increases since the last checkpoint, the step size halves


def apgd(expectation: Expectation, images: torch.Tensor, start: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
    """L-inf APGD (Croce & Hein 2020) on `expectation`'s per-image loss: sign steps with momentum 0.75 and a step size,
    per image, that starts at 2 eps and halves at a checkpoint (after 22 % of the steps, then shorter and shorter spans,
    no shorter than 6 %) when the loss rose in at most 75 % of the steps since the last one, or when neither the step
    size nor the highest loss changed since it; the iterate then restarts from its highest-loss point. Returns the most
    adversarial iterate per image, judged as in `gradient_ascent`."""
    best = MostAdversarial(images)
    step_size = torch.full((len(images),), 2.0 * eps, device=images.device, dtype=images.dtype)
    span, shortest, decrease = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    point = start.detach().requires_grad_(True)
    loss, score = expectation(point)
    gradient = input_gradient(loss, point, None)
    last = ranking(loss, None)
    best.offer(point, score, last)
    highest, highest_point, highest_gradient = last.clone(), point.detach(), gradient  # what the step-size schedule follows
    highest_at_check, halved_at_check = highest.clone(), torch.ones_like(highest, dtype=torch.bool)
    previous, since_check, rises = point.detach(), 0, torch.zeros_like(highest)
    for index in range(steps):
        with torch.no_grad():
            current = point.detach()
            moved = project(current + per_image(step_size, current) * gradient.sign(), images, eps, "linf")
            momentum = APGD_MOMENTUM if index > 0 else 1.0
            point = project(current + momentum * (moved - current) + (1 - momentum) * (current - previous), images, eps, "linf")
            previous = current
        point.requires_grad_(True)
        loss, score = expectation(point)
        gradient = input_gradient(loss, point, None)
        value = ranking(loss, None)
        best.offer(point, score, value)
        rises += (value > last).double()
        improved = value > highest
        highest = torch.where(improved, value, highest)
        highest_point = torch.where(per_image(improved, point), point.detach(), highest_point)
        highest_gradient = torch.where(per_image(improved, gradient), gradient, highest_gradient)
        last, since_check = value, since_check + 1
        if since_check == span:
            halve = (rises <= span * APGD_RHO) | (~halved_at_check & (highest_at_check >= highest))
            step_size = torch.where(halve, step_size / 2, step_size)
            point = torch.where(per_image(halve, point), highest_point, point.detach())
            gradient = torch.where(per_image(halve, gradient), highest_gradient, gradient)
            halved_at_check, highest_at_check = halve, highest.clone()
            since_check, rises, span = 0, torch.zeros_like(rises), max(span - decrease, shortest)
    return best.point
