"""The attacks taken from libraries: CW-L2 from advertorch, and AutoAttack's standard suite from pyautoattack (the
pip-packaged reference code of Croce & Hein) for deterministic classifiers.

advertorch 0.2.3 imports `zero_gradients`, removed from torch in 1.9: the one compatibility shim it needs is installed
here, before its first import, and nowhere else.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _zero_gradients(tensors: torch.Tensor | list[torch.Tensor]) -> None:
    """`torch.autograd.gradcheck.zero_gradients`, removed from torch in 1.9 but imported by advertorch 0.2.3."""
    if isinstance(tensors, torch.Tensor):
        if tensors.grad is not None:
            tensors.grad.detach_().zero_()
    else:
        for tensor in tensors:
            _zero_gradients(tensor)


sys.modules["torch.autograd.gradcheck"].zero_gradients = _zero_gradients

from advertorch.attacks import CarliniWagnerL2Attack  # noqa: E402
from pyautoattack import AutoAttack  # noqa: E402

CW_SEARCH_STEPS = 5  # binary-search rounds over CW's trade-off constant
AUTOATTACK_ITERATIONS = 100  # APGD and FAB iterations of every AutoAttack version


def carlini_wagner_l2(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int,
                      learning_rate: float) -> torch.Tensor:
    """advertorch's CW-L2 (`CW_SEARCH_STEPS` binary-search rounds of `steps` Adam steps): per image the smallest
    perturbation that fooled `model` (images (B, C, H, W) in [0, 1] -> logits (B, K)), or the image itself where none
    did (a minimum-norm attack)."""
    attack = CarliniWagnerL2Attack(model, num_classes, learning_rate=learning_rate, binary_search_steps=CW_SEARCH_STEPS,
                                   max_iterations=steps, clip_min=0.0, clip_max=1.0)
    return attack.perturb(images, labels)


def autoattack_standard(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, version: str,
                        attacks: list[str], queries: int, num_classes: int, seed: int) -> torch.Tensor:
    """pyautoattack's `run_standard_evaluation` (L-inf) with `version` and `attacks` (see `autoattack_attacks`), one restart
    each: per image the first point that fooled the deterministic `model`, or the image itself where none did."""
    suite = AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, device=images.device)
    suite.verbose = False
    suite.attacks_to_run = attacks
    suite.apgd.n_restarts = suite.fab.n_restarts = 1  # the standard version's; the custom one would keep pyautoattack's 5
    suite.apgd_targeted.n_target_classes = suite.fab.n_target_classes = min(9, num_classes - 1)
    suite.square.n_queries = queries
    return suite.run_standard_evaluation(images, labels, batch_size=len(images))[0]


def autoattack_attacks(num_classes: int, stochastic: bool) -> tuple[str, list[str]]:
    """(version, the attacks it runs in order) of AutoAttack on a classifier of `num_classes` classes.

    A random model gets ``rand``: APGD-CE, and APGD-DLR from 3 classes on (the DLR loss divides by the gap to the third
    logit), each over the model's draws (this project's APGD; see `robust_cxr.attacks.methods`). A deterministic one
    gets, from 4 classes on, ``standard``: APGD-CE, targeted APGD-DLR, targeted FAB and Square (targeted DLR needs a
    fourth logit); with 2 or 3 classes, ``custom``: APGD-CE, APGD-DLR from 3 classes, untargeted FAB (on 2 classes the
    same as FAB-T toward the one other class) and Square.
    """
    dlr = ["apgd-dlr"] if num_classes >= 3 else []
    if stochastic:
        return "rand", ["apgd-ce", *dlr]
    if num_classes >= 4:
        return "standard", ["apgd-ce", "apgd-t", "fab-t", "square"]
    return "custom", ["apgd-ce", *dlr, "fab", "square"]
