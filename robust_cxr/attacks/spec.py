"""`AttackSpec`, one attack as a config states it, and `craft_adversarial`, which runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from robust_cxr.attacks.common import LossFn, Norm, ScoreFn, attacking, is_stochastic, project
from robust_cxr.attacks.engine import EotAverage
from robust_cxr.attacks.library import autoattack_attacks
from robust_cxr.attacks.methods import GRADIENT_METHODS, METHODS, AttackRun

AttackMethod = Literal[tuple(METHODS)]  # the registered methods, for the configs' type checks
ThreatModel = Literal["whitebox", "graybox", "transfer", "adaptive"]


@dataclass
class AttackSpec:
    """One attack, with eps in [0, 1] pixel units (L-inf unless the method is an L2 one).

    Args:
        method: the algorithm (see `robust_cxr.attacks.methods.METHODS`).
        eps: perturbation budget; for ``cw_l2`` (unbounded) it only labels the report row.
        steps: iterations (CW: optimisation steps per binary-search round).
        step_size: per-step size; default 2.5 * eps / steps (CW: Adam learning rate 0.01).
        random_start: start PGD / L2-PGD / APGD from a random point of the eps-ball.
        threat_model: ``whitebox`` (source = the defended target), ``graybox`` (source = the undefended classifier),
            ``transfer`` (source = another model, e.g. the teacher), ``adaptive`` (white-box through a defense with a
            detector, also driving the detector's score under its threshold: see `robust_cxr.threat.DefendedModel`).
        eot_samples: draws of a random source per evaluation (EOT). An attack on a random source (a purifier that
            draws noise) needs at least 2: it is an error otherwise. A deterministic source is evaluated once whatever
            this says (its draws would all be the same; a source that answers differently twice is an error unless it
            declares itself random).
        eot_average: how the draws are combined: ``loss``, the mean of the per-draw losses and so of their gradients
            (EOT proper); ``logits``, the loss of the draw-averaged outputs. CW always averages logits.
        target: a targeted goal of the task (e.g. segmentation's ``empty``: every pixel background), which the
            attack drives the output toward instead of away from the truth; None: untargeted.
        name: label in metric names and reports; default from method, steps and target (``pgd10``, ``pgd10_to_empty``).
        queries: the queries of ``square`` and of AutoAttack's Square (margin evaluations per image, the standard 5000 by
            default; each averages `eot_samples` draws).
        bpda: ``whitebox`` only: BPDA (Athalye et al. 2018), for defenses that are not (usefully) differentiable. The
            forward pass runs the deployed pipeline as it is, the backward pass takes the defense in front of the model
            as the identity (`IdentityBackward`). Subjects without a defense skip it.
        detector_weight: ``adaptive`` only: the weight of the detector term (its gradient normalised per image, like
            the task term's, so that 1 weighs them alike).
        max_images: evaluate this attack on the test images of index < `max_images` only (None: every image
            the callback attacks), a class-stratified subset (see `datamodules.sampling.interleaved_order`),
            the same for any batch size and number of ranks; for attacks too costly for the whole set, such as
            white-box attacks through a diffusion purifier. Its report row states the images it covered and
            their clean accuracy.
    """

    method: AttackMethod = "pgd"
    eps: float = 0.03
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    threat_model: ThreatModel = "whitebox"
    eot_samples: int = 1
    eot_average: EotAverage = "loss"
    target: str | None = None
    name: str | None = None
    queries: int = 5000
    bpda: bool = False
    detector_weight: float = 1.0
    max_images: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Attack {self.name or self.method}: unknown method {self.method!r}; use one of {list(METHODS)}.")
        if self.threat_model not in get_args(ThreatModel):
            raise ValueError(f"Attack {self.label}: unknown threat model {self.threat_model!r}; use one of {list(get_args(ThreatModel))}.")
        if self.eot_average not in get_args(EotAverage):
            raise ValueError(f"Attack {self.label}: eot_average must be one of {list(get_args(EotAverage))}, got {self.eot_average!r}.")
        if self.queries < 1:
            raise ValueError(f"Attack {self.label}: queries must be >= 1 (got {self.queries}).")
        if self.bpda and self.threat_model != "whitebox":
            raise ValueError(f"Attack {self.label}: bpda differentiates through the defense, so it needs threat_model whitebox "
                             f"(got {self.threat_model}); set bpda to false for the other threat models.")
        if self.eps <= 0 or self.steps < 1 or self.eot_samples < 1 or (self.max_images is not None and self.max_images < 1):
            raise ValueError(f"Attack {self.label}: eps must be > 0, steps and eot_samples >= 1, max_images >= 1 or null (got {self}).")
        if self.threat_model == "adaptive" and self.method not in GRADIENT_METHODS:
            raise ValueError(f"Attack {self.label}: the adaptive threat model ascends a loss with a detector term, which needs one of "
                             f"{GRADIENT_METHODS} (got {self.method}).")
        if self.detector_weight < 0:
            raise ValueError(f"Attack {self.label}: detector_weight must be >= 0, got {self.detector_weight}.")

    @property
    def norm(self) -> Norm:
        return METHODS[self.method].norm

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        label = METHODS[self.method].report_label(self) + "_bpda" * self.bpda
        return label if self.target is None else f"{label}_to_{self.target}"

    @property
    def alpha(self) -> float:
        """Step size of the iterative attacks."""
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def executed(self, num_classes: int | None = None, stochastic: bool = False) -> dict[str, int | str | None]:
        """What the attack runs on a source (`stochastic`: random) of a task of `num_classes` classes, for report columns:
        ``steps`` (gradient steps in all; CW's binary-search rounds times its steps; AutoAttack's APGD iterations;
        Square's queries), ``eot_samples``, ``eot_average`` (how draws were combined, None for one draw) and
        ``version`` (AutoAttack's version and attacks, e.g. ``custom: apgd-ce, fab, square-5000``; ``bpda`` for a BPDA
        attack)."""
        method = METHODS[self.method]
        version = "bpda" if self.bpda else None
        if self.method == "autoattack":
            if num_classes is None or num_classes < 2:
                raise ValueError(f"Attack {self.label}: AutoAttack attacks a classifier of 2 or more classes; got num_classes={num_classes}.")
            name, attacks = autoattack_attacks(num_classes, stochastic)
            version = f"{name}: " + ", ".join(f"square-{self.queries}" if attack == "square" else attack for attack in attacks)
        draws = self.eot_samples if stochastic else 1
        average = None if draws == 1 else "logits" if self.method == "cw_l2" else self.eot_average
        return dict(steps=method.report_steps(self), eot_samples=draws, eot_average=average, version=version)


def check_eot(spec: AttackSpec, source: nn.Module, subject: str) -> None:
    """Raises a ValueError naming the fix when `spec` would attack the random `source` (of `subject`) on one draw."""
    if spec.eot_samples < 2 and is_stochastic(source):
        raise ValueError(
            f"Attack {spec.label} on {subject}: its source is random (it draws noise, e.g. a purifier), and one draw per step "
            "judges success on luck. Set eot_samples >= 2 on this attack (e.g. 8), or leave this threat model out for this subject."
        )


def _check_declared_random(spec: AttackSpec, source: nn.Module, images: torch.Tensor) -> None:
    """Raises a ValueError when `spec` asks for EOT on a `source` that does not declare itself random but answers two
    calls on the same images differently: its EOT draws would otherwise be skipped."""
    with torch.no_grad():
        first, second = source(images), source(images)
    first, second = (first[0], second[0]) if isinstance(first, tuple) else (first, second)
    if not torch.allclose(first.float(), second.float(), rtol=1e-3, atol=1e-4):
        raise ValueError(f"Attack {spec.label} asks for {spec.eot_samples} EOT draws of {type(source).__name__}, which answers the same "
                         "images differently on two calls but declares no random part: set `stochastic = True` on its random module.")


def craft_adversarial(
    spec: AttackSpec,
    source: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_classes: int | None = None,
    keys: torch.Tensor | None = None,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    score_fn: ScoreFn | None = None,
    autocast_dtype: torch.dtype | None = None,
    one_draw_allowed: bool = False,
) -> torch.Tensor:
    """Adversarial versions of `images` that follow the gradients (or queries) of `source`.

    Args:
        images: (B, C, H, W) in [0, 1]; targets: what the loss takes: labels (B,) for a classifier's own loss, or for a
            custom `loss_fn` e.g. clean probabilities (B, K) for TRADES, masks (B, 1, H, W).
        num_classes: K, for the classification attacks that need it (DLR, CW, AutoAttack).
        keys, seed: make random starts a function of (seed, key) per image (see `keyed_uniform`).
        loss_fn: per-image loss (B,) to ascend, ``loss_fn(outputs, targets)`` (or loss terms, `LossTerms`); default
            cross-entropy. Only the methods that ascend any loss (`GRADIENT_METHODS`) accept one.
        score_fn: per-image score (B,) of (draw-averaged) outputs, lower = more adversarial (e.g. 1 where a classifier is
            right): the attack keeps, per image, its lowest-score iterate, then the highest-loss one; None: the
            highest-loss one.
        autocast_dtype: run the source under autocast in this dtype (bf16); None runs fp32.
        one_draw_allowed: a random source may be attacked on one draw per step: a training attack's stochastic gradient,
            never an evaluation (where success would be judged on luck).

    Returns:
        (B, C, H, W) in [0, 1], within `spec.eps` of `images` in `spec.norm` (except CW-L2), finite.
    """
    method = METHODS[spec.method]
    if loss_fn is not None and not method.any_loss:
        raise ValueError(f"Attack {spec.label}: a custom loss needs one of {GRADIENT_METHODS}, not {spec.method}.")
    if method.min_classes > 2 and num_classes is not None and num_classes < method.min_classes:
        raise ValueError(
            f"Attack {spec.label}: the loss of {spec.method} needs at least {method.min_classes} classes (this task has {num_classes}); "
            "use apgd_ce, autoattack, pgd or cw_l2 for binary classifiers."
        )
    if not one_draw_allowed:
        check_eot(spec, source, type(source).__name__)
    images = images.detach()
    run = AttackRun(spec, source, images.clone(), targets, loss_fn, score_fn, num_classes, keys, seed, is_stochastic(source))
    with attacking(source), torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        if spec.eot_samples > 1 and not run.stochastic:
            _check_declared_random(spec, source, images[:2])
        adversarial = method.run(run)
    adversarial = project(adversarial.detach().float(), images, None if spec.method == "cw_l2" else spec.eps, spec.norm)
    if not torch.isfinite(adversarial).all():
        raise FloatingPointError(f"Attack {spec.label} produced non-finite images: the source's outputs or gradients overflowed "
                                 "(under bf16? attack in fp32), or the checkpoint holds non-finite weights.")
    return adversarial
