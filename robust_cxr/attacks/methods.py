"""The attack methods, one registry entry each: what the method is (norm, whether it ascends any loss, the classes it
needs, its report label and executed steps) and how it runs. A new method is one `MethodEntry` added to `METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from robust_cxr.attacks.common import LogitAverage, LossFn, Norm, ScoreFn, cross_entropy, dlr, random_start
from robust_cxr.attacks.engine import Expectation, MostAdversarial, apgd, gradient_ascent, l2_step, momentum_sign_step, ranking, sign_step
from robust_cxr.attacks.library import AUTOATTACK_ITERATIONS, CW_SEARCH_STEPS, autoattack_attacks, autoattack_standard, carlini_wagner_l2
from robust_cxr.attacks.square import square_linf

if TYPE_CHECKING:
    from robust_cxr.attacks.spec import AttackSpec


@dataclass
class AttackRun:
    """One attack on one batch: the spec, the source it follows, images (B, C, H, W) in [0, 1], the targets its loss
    takes (labels (B,) for a classifier's own loss), and what the callback knows of the task."""

    spec: "AttackSpec"
    source: nn.Module
    images: torch.Tensor
    targets: torch.Tensor
    loss: LossFn | None
    score: ScoreFn | None
    num_classes: int | None
    keys: torch.Tensor | None
    seed: int
    stochastic: bool

    @property
    def draws(self) -> int:
        """Draws per evaluation: the spec's `eot_samples` for a random source; one for a deterministic one, whose draws
        would all be the same."""
        return self.spec.eot_samples if self.stochastic else 1

    def expectation(self, loss: LossFn | None = None) -> Expectation:
        """The source over its draws with `loss` (default: the run's, else cross-entropy) and the run's score."""
        return Expectation(self.source, loss or self.loss or cross_entropy, self.targets, self.draws, self.spec.eot_average, self.score)

    def start(self, random: bool) -> torch.Tensor:
        """A keyed random start in the eps-ball when `random` and the spec asks for one, else the images."""
        if not (random and self.spec.random_start):
            return self.images
        return random_start(self.images, self.spec.eps, self.spec.norm, self.keys, self.seed)


@dataclass(frozen=True)
class MethodEntry:
    """An attack method.

    Attributes:
        norm: the ball its perturbations live in.
        any_loss: it ascends any per-image loss (the task's, TRADES', the adaptive attack's); otherwise its own
            classification loss, and classification tasks only.
        min_classes: the classes its loss needs (3 for DLR).
        run: the attack, `AttackRun` -> adversarial images (B, C, H, W) (projected afterwards).
        label: its report name without a target or BPDA suffix, from the spec (default ``<method><steps>``).
        steps: the steps its report row states (gradient steps, Square's queries, ...), from the spec.
    """

    name: str
    norm: Norm
    any_loss: bool
    run: Callable[[AttackRun], torch.Tensor]
    min_classes: int = 2
    label: Callable[["AttackSpec"], str] | None = None
    steps: Callable[["AttackSpec"], int] | None = None

    def report_label(self, spec: "AttackSpec") -> str:
        return self.label(spec) if self.label else f"{self.name}{spec.steps}"

    def report_steps(self, spec: "AttackSpec") -> int:
        return self.steps(spec) if self.steps else spec.steps


def _ascent(step_rule: Callable[["AttackSpec"], Callable], random: bool, steps: Callable[["AttackSpec"], int] = lambda spec: spec.steps):
    def run(attack: AttackRun) -> torch.Tensor:
        spec, loss = attack.spec, attack.loss or cross_entropy
        return gradient_ascent(attack.expectation(loss), attack.images, attack.start(random), steps(spec), step_rule(spec), spec.eps, spec.norm,
                               getattr(loss, "weights", None))
    return run


def _apgd(loss: LossFn) -> Callable[[AttackRun], torch.Tensor]:
    return lambda attack: apgd(attack.expectation(loss), attack.images, attack.start(True), attack.spec.steps, attack.spec.eps)


def _square(attack: AttackRun) -> torch.Tensor:
    return square_linf(attack.source, attack.images, attack.targets, attack.spec.eps, attack.spec.queries, attack.draws, attack.stochastic)


def _carlini_wagner(attack: AttackRun) -> torch.Tensor:
    model = LogitAverage(attack.source, attack.draws) if attack.draws > 1 else attack.source
    return carlini_wagner_l2(model, attack.images, attack.targets, attack.num_classes, attack.spec.steps, attack.spec.step_size or 0.01)


def _autoattack(attack: AttackRun) -> torch.Tensor:
    """pyautoattack's suite on a deterministic classifier; on a random one, the ``rand`` version's APGD-CE (and APGD-DLR)
    run over the model's draws, each image keeping the candidate most adversarial on fresh draws."""
    spec = attack.spec
    version, attacks = autoattack_attacks(attack.num_classes, attack.stochastic)
    if not attack.stochastic:
        return autoattack_standard(attack.source, attack.images, attack.targets, spec.eps, version, attacks, spec.queries, attack.num_classes,
                                   attack.seed)
    losses = {"apgd-ce": cross_entropy, "apgd-dlr": dlr}
    candidates = [apgd(attack.expectation(losses[name]), attack.images, attack.start(True), AUTOATTACK_ITERATIONS, spec.eps) for name in attacks]
    best, judge = MostAdversarial(attack.images), attack.expectation(cross_entropy)
    with torch.no_grad():
        for candidate in candidates:
            loss, score = judge(candidate)
            best.offer(candidate, score, ranking(loss, None))
    return best.point


METHODS: dict[str, MethodEntry] = {
    method.name: method
    for method in (
        MethodEntry("fgsm", "linf", True, _ascent(lambda spec: sign_step(spec.eps), False, lambda spec: 1), label=lambda spec: "fgsm",
                     steps=lambda spec: 1),
        MethodEntry("pgd", "linf", True, _ascent(lambda spec: sign_step(spec.alpha), True)),
        MethodEntry("bim", "linf", True, _ascent(lambda spec: sign_step(spec.alpha), False)),
        MethodEntry("mifgsm", "linf", True, _ascent(lambda spec: momentum_sign_step(spec.alpha), False)),
        MethodEntry("pgd_l2", "l2", True, _ascent(lambda spec: l2_step(spec.alpha), True)),
        MethodEntry("apgd_ce", "linf", False, _apgd(cross_entropy), label=lambda spec: "apgd_ce"),
        MethodEntry("apgd_dlr", "linf", False, _apgd(dlr), min_classes=3, label=lambda spec: "apgd_dlr"),
        MethodEntry("square", "linf", False, _square, label=lambda spec: f"square{spec.queries}", steps=lambda spec: spec.queries),
        MethodEntry("cw_l2", "l2", False, _carlini_wagner, label=lambda spec: "cw_l2", steps=lambda spec: CW_SEARCH_STEPS * spec.steps),
        MethodEntry("autoattack", "linf", False, _autoattack, label=lambda spec: "autoattack", steps=lambda spec: AUTOATTACK_ITERATIONS),
    )
}
GRADIENT_METHODS = tuple(name for name, method in METHODS.items() if method.any_loss)  # the methods that ascend any given loss
