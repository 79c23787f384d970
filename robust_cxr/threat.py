"""Threat models: which module an attack follows and which one it is scored on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from torch import nn

from robust_cxr.attacks import ThreatModel


@dataclass
class DefendedModel:
    """A model as deployed (a classifier, a segmenter, ...), with what robustness evaluation needs to attack it.

    Args:
        model: name of the model in reports (``teacher``, ``teacher_finetuned``, ``student``, ``segmenter``).
        defense: ``none`` or what stands in front of the model (``purifier/ddim-10``).
        undefended: the model without the defense, [0, 1] images -> outputs (logits; the gray-box source).
        pipeline: defense then model, what is deployed and scored (the model itself when `defense` is ``none``).
        transfer_source: another model whose attacks are transferred (e.g. the teacher).
        defense_module: what stands in front of the model, [0, 1] images -> [0, 1] images (the purifier), or
            None; the report grid and `predict.py` show its output.
        decision_threshold: for a binary classifier, the P(class 1) above which it decides class 1 (its operating
            point, 0.5 for argmax); None for more classes.
        threat_models: the threat models it is attacked under; e.g. leave out ``whitebox`` where a stage
            reports a purifier's white-box robustness elsewhere, since each white-box step runs the
            reverse diffusion forward and backward.
    """

    model: str
    defense: str
    undefended: nn.Module
    pipeline: nn.Module
    transfer_source: nn.Module | None = None
    defense_module: nn.Module | None = None
    decision_threshold: float | None = None
    threat_models: tuple[ThreatModel, ...] = get_args(ThreatModel)

    @property
    def key(self) -> str:
        """Identifier for metric names, e.g. ``teacher`` or ``teacher+purifier``: the kind of defense without its
        settings (``purifier/ddim-1@t100`` -> ``purifier``), so that a sweep over those settings names one metric."""
        return self.model if self.defense == "none" else f"{self.model}+{self.defense.split('/')[0]}"

    def attack_source(self, threat_model: ThreatModel) -> nn.Module | None:
        """The module an attack of `threat_model` follows; None where that threat model does not
        apply (gray-box on an undefended model is white-box; transfer needs a transfer source) or is not asked for."""
        if threat_model not in self.threat_models:
            return None
        if threat_model == "whitebox":
            return self.pipeline
        if threat_model == "graybox":
            return None if self.defense == "none" else self.undefended
        return self.transfer_source
