"""Threat models: which module an attack follows, which loss it ascends, and which module it is scored on."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from robust_cxr.attacks import AttackSpec, IdentityBackward, LossFn, LossTerms, ScoreFn, ThreatModel, cross_entropy, is_stochastic
from robust_cxr.models import OperatingPoint


@dataclass(frozen=True)
class DefendedModel:
    """A model as deployed (a classifier, a segmenter, ...), with what robustness evaluation needs to attack it: a report
    subject. Build one with `alone`, then `behind` (a defense in front), `with_detector`, `with_transfer_source` and
    `attacked_under`.

    Args:
        model: name of the model in reports (``teacher``, ``teacher_finetuned``, ``student``, ``segmenter``).
        undefended: the model without the defense, [0, 1] images -> outputs (logits; the gray-box source); a
            classifier includes its operating point (`decision_threshold`).
        defense: ``none`` or what stands in front of the model (``purifier/ddim-10@t100``, ``reformer``).
        pipeline: defense then model, what is deployed and scored (the model itself without a defense).
        defense_module: what stands in front of the model, [0, 1] images -> [0, 1] images (the purifier), or
            None; the report grid and `predict.py` show its output, and BPDA takes it as the identity.
        transfer_source: another model whose attacks are transferred (e.g. the teacher).
        threat_models: the threat models it is attacked under.
        detector: a detector of adversarial inputs that is part of the defense, [0, 1] images (B, C, H, W) ->
            scores (B,), flagging scores above its ``threshold``; the report then adds detection rows, and the
            ``adaptive`` threat model applies.
        detector_seen: ``method@eps`` labels of the attacks the detector was trained on (`seen_label`), to mark
            detection rows seen or unseen.
    """

    model: str
    undefended: nn.Module
    defense: str = "none"
    pipeline: nn.Module | None = None
    defense_module: nn.Module | None = None
    transfer_source: nn.Module | None = None
    threat_models: tuple[ThreatModel, ...] = get_args(ThreatModel)
    detector: nn.Module | None = None
    detector_seen: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.pipeline is None:
            object.__setattr__(self, "pipeline", self.undefended)

    @classmethod
    def alone(cls, model: str, undefended: nn.Module) -> DefendedModel:
        """`undefended` ([0, 1] images -> outputs) deployed as it is, named `model`."""
        return cls(model, undefended)

    def behind(self, defense: str, defense_module: nn.Module | None = None, pipeline: nn.Module | None = None) -> DefendedModel:
        """This model deployed behind the defense named `defense`: `defense_module` ([0, 1] images -> [0, 1] images) in
        front of it, or a `pipeline` that replaces it (e.g. a `PurifiedModel` averaging several purifications, an
        ensemble around it); by default the defense module then the model. Gray-box attacks follow the model alone."""
        if pipeline is None and defense_module is None:
            raise ValueError(f"A subject behind {defense} needs the defense's module or the pipeline it deploys.")
        return replace(self, defense=defense, defense_module=defense_module,
                       pipeline=pipeline if pipeline is not None else nn.Sequential(defense_module, self.undefended))

    def with_detector(self, detector: nn.Module, seen: tuple[str, ...] = (), defense: str | None = None) -> DefendedModel:
        """This subject with `detector` as part of its defense (see the class), named `defense` (default: the current
        defense, ``detector`` without one); the adaptive threat model then applies."""
        name = defense or ("detector" if self.defense == "none" else self.defense)
        return replace(self, defense=name, detector=detector, detector_seen=tuple(seen))

    def with_transfer_source(self, source: nn.Module) -> DefendedModel:
        """This subject, attacked also by transfer from `source` ([0, 1] images -> outputs)."""
        return replace(self, transfer_source=source)

    def attacked_under(self, *threat_models: ThreatModel) -> DefendedModel:
        """This subject attacked under `threat_models` only (none: reported clean only); e.g. leave out ``whitebox`` where
        a stage reports a purifier's white-box robustness elsewhere."""
        return replace(self, threat_models=tuple(threat_models))

    @property
    def decision_threshold(self) -> float | None:
        """For a binary classifier, the P(class 1) above which the pipeline decides class 1 (the operating point inside
        it, 0.5 for argmax); None for more classes and other tasks."""
        point = next((module for module in self.pipeline.modules() if isinstance(module, OperatingPoint)), None)
        return None if point is None else point.probability_threshold

    @property
    def stochastic(self) -> bool:
        """Whether the deployed pipeline is random (its defense draws noise): its attacks then need EOT (`check_eot`)."""
        return is_stochastic(self.pipeline)

    @property
    def key(self) -> str:
        """Identifier for metric names, e.g. ``teacher`` or ``teacher+purifier``: the kind of defense without its
        settings (``purifier/ddim-1@t100`` -> ``purifier``), so that a sweep over those settings names one metric."""
        return self.model if self.defense == "none" else f"{self.model}+{self.defense.split('/')[0]}"

    def attack_source(self, threat_model: ThreatModel, bpda: bool = False) -> nn.Module | None:
        """The module an attack of `threat_model` follows; None where that threat model does not
        apply (gray-box on an undefended model is white-box; transfer needs a transfer source; BPDA needs a
        `defense_module`) or is not asked for. `bpda` (white-box only): the pipeline with the identity as the
        defense's backward pass (`IdentityBackward`)."""
        if threat_model not in self.threat_models:
            return None
        if bpda:
            return None if threat_model != "whitebox" or self.defense_module is None else IdentityBackward(self.pipeline, self.defense_module)
        if threat_model == "whitebox":
            return self.pipeline
        if threat_model == "graybox":
            return None if self.defense == "none" else self.undefended
        if threat_model == "adaptive":
            return None if self.detector is None else _OutputsAndScores(self.pipeline, self.detector)
        return self.transfer_source

    def attack_loss(self, spec: AttackSpec, loss: LossFn | None) -> LossFn | None:
        """The per-image loss an attack `spec` ascends, given the task's (`loss(outputs, targets)` -> (B,); None: the attack
        method's own). The adaptive attack ascends two terms on the (outputs, scores) its source returns: the task's loss
        (cross-entropy for None) and minus the hinge relu(score - threshold), which is 0 once the detector no longer flags
        the image; each term's gradient is normalised per image, the hinge's weighted by `spec.detector_weight`
        (`LossTerms`), so that it evades the detector without a weight tuned to the scale of either term. The other
        threat models ascend `loss`."""
        if spec.threat_model != "adaptive":
            return loss
        task_loss, detector = loss or cross_entropy, self.detector

        def terms(outputs_and_scores: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
            outputs, scores = outputs_and_scores
            return torch.stack([task_loss(outputs, targets), -F.relu(scores.float() - detector.threshold)], dim=1)

        return LossTerms(terms, (1.0, spec.detector_weight))

    def attack_score(self, threat_model: ThreatModel, score: ScoreFn) -> ScoreFn:
        """The per-image score (lower: more adversarial) an attack of `threat_model` judges its iterates by, given the
        task's on the model's outputs: the adaptive attack, whose source returns (outputs, detector scores), counts an
        image as failed where the detector flags it (right or flagged scores 1: what robust-or-rejected accuracy counts)."""
        if threat_model != "adaptive":
            return score
        detector = self.detector
        return lambda outputs_and_scores: torch.maximum(score(outputs_and_scores[0]).double(),
                                                        (outputs_and_scores[1] > detector.threshold).double())


def seen_label(method: str, eps: float) -> str:
    """How a detector records an attack it was trained on, e.g. ``pgd@0.03``."""
    return f"{method}@{eps:g}"


class _OutputsAndScores(nn.Module):
    """images (B, C, H, W) -> (pipeline outputs, detector scores (B,)), the source of the adaptive attack."""

    def __init__(self, pipeline: nn.Module, detector: nn.Module):
        super().__init__()
        self.pipeline = pipeline
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pipeline(images), self.detector(images)
