"""Adversarial attacks on plain `nn.Module`s, in [0, 1] pixel space (no Lightning here).

An attack follows the gradients (or queries) of a *source* module and is scored elsewhere on a *target* (see
`robust_cxr.threat`). The gradient attacks (FGSM, BIM, PGD, MI-FGSM, L2-PGD, APGD) run on this project's engine
(`engine`), Square on its own implementation (`square`), CW-L2 and AutoAttack's standard suite come from advertorch and
pyautoattack (`library`). Every method is an entry of `METHODS` (`methods`).

A source that declares itself random (a submodule with ``stochastic = True``, e.g. a purifier) is attacked over
`eot_samples` draws per evaluation, at least 2, and every decision about success (the iterate kept, Square's
acceptance, AutoAttack's choice among its attacks) is taken on those draws, never on one lucky forward pass. Each attack
returns, per image, its most adversarial point, not its last.
"""

from robust_cxr.attacks.common import (
    IdentityBackward,
    LogitAverage,
    LossFn,
    LossTerms,
    ScoreFn,
    attacking,
    cross_entropy,
    is_stochastic,
    keyed_uniform,
    margin,
    perturbation_norm,
    project,
    random_start,
    trades_kl,
)
from robust_cxr.attacks.methods import GRADIENT_METHODS, METHODS, MethodEntry
from robust_cxr.attacks.spec import AttackMethod, AttackSpec, ThreatModel, check_eot, craft_adversarial

__all__ = [
    "GRADIENT_METHODS", "METHODS", "AttackMethod", "AttackSpec", "IdentityBackward", "LogitAverage", "LossFn", "LossTerms", "MethodEntry",
    "ScoreFn", "ThreatModel", "attacking", "check_eot", "craft_adversarial", "cross_entropy", "is_stochastic", "keyed_uniform", "margin",
    "perturbation_norm", "project", "random_start", "trades_kl",
]
