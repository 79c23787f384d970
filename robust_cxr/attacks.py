"""Adversarial attacks on plain `nn.Module`s, in [0, 1] pixel space (no Lightning here).

advertorch supplies FGSM, PGD / BIM / L2-PGD (its `perturb_iterative`), MI-FGSM and CW-L2;
pyautoattack, the pip-packaged reference code of Croce & Hein, supplies APGD-CE, APGD-DLR, Square
(gradient-free) and AutoAttack. Every attack follows the gradients of a *source* module and is scored elsewhere on a
*target* (see `robust_cxr.threat`). While it runs, the source is in eval mode with frozen
parameters: advertorch calls `loss.backward()`, and freezing is what keeps attack gradients out
of parameter `.grad` and away from DDP's gradient hooks whatever the backend does.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn


def _zero_gradients(tensors: torch.Tensor | list[torch.Tensor]) -> None:
    """`torch.autograd.gradcheck.zero_gradients`, removed from torch in 1.9 but imported by advertorch 0.2.3."""
    if isinstance(tensors, torch.Tensor):
        if tensors.grad is not None:
            tensors.grad.detach_().zero_()
    else:
        for tensor in tensors:
            _zero_gradients(tensor)


# The one compatibility shim advertorch needs: installed before its first import, here only.
sys.modules["torch.autograd.gradcheck"].zero_gradients = _zero_gradients

from advertorch.attacks import CarliniWagnerL2Attack, GradientSignAttack, MomentumIterativeAttack  # noqa: E402
from advertorch.attacks.iterative_projected_gradient import perturb_iterative  # noqa: E402
from pyautoattack import AutoAttack  # noqa: E402
from pyautoattack.autopgd_base import APGDAttack  # noqa: E402
from pyautoattack.square import SquareAttack  # noqa: E402

AttackMethod = Literal["fgsm", "pgd", "bim", "mifgsm", "pgd_l2", "cw_l2", "apgd_ce", "apgd_dlr", "square", "autoattack"]
ThreatModel = Literal["whitebox", "graybox", "transfer", "adaptive"]
L2_METHODS = ("pgd_l2", "cw_l2")
GRADIENT_METHODS = ("fgsm", "pgd", "bim", "mifgsm", "pgd_l2")  # the methods that ascend any given loss
CW_SEARCH_STEPS = 5  # binary-search rounds over CW's trade-off constant
AUTOATTACK_ITERATIONS = 100  # APGD and FAB iterations of every AutoAttack version
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class AttackSpec:
    """One attack, with eps in [0, 1] pixel units (L-inf unless the method is an L2 one).

    Args:
        method: the algorithm (see `AttackMethod`).
        eps: perturbation budget; for ``cw_l2`` (unbounded) it only labels the report row.
        steps: iterations (CW: optimisation steps per binary-search round).
        step_size: per-step size; default 2.5 * eps / steps (CW: Adam learning rate 0.01).
        random_start: start PGD / L2-PGD / APGD from a random point of the eps-ball.
        threat_model: ``whitebox`` (source = the defended target), ``graybox`` (source = the
            undefended classifier), ``transfer`` (source = another model, e.g. the teacher), ``adaptive``
            (white-box through a defense with a detector, also descending the detector's score: see
            `robust_cxr.threat.DefendedModel`).
        eot_samples: draws of a stochastic source averaged per gradient step (EOT). Above 1 the source counts
            as random: APGD then returns its highest-loss point and AutoAttack runs its ``rand`` version (see
            `autoattack_version`).
        target: a targeted goal of the task (e.g. segmentation's ``empty``: every pixel background), which the
            attack drives the output toward instead of away from the truth; None: untargeted.
        name: label in metric names and reports; default from method, steps and target (``pgd10``, ``pgd10_to_empty``).
        queries: the queries of ``square`` and of AutoAttack's Square (model evaluations per image, the standard 5000 by
            default).
        bpda: ``whitebox`` only: BPDA (Athalye et al. 2018), for defenses that are not (usefully) differentiable. The
            forward pass runs the deployed pipeline as it is, the backward pass takes the defense in front of the model
            as the identity (`IdentityBackward`). Subjects without a defense skip it.
        max_images: evaluate this attack on the test images of index < `max_images` only (None: every image
            the callback attacks), a class-stratified subset (see `datamodules.chest_xray.interleaved_order`),
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
    target: str | None = None
    name: str | None = None
    queries: int = 5000
    bpda: bool = False
    max_images: int | None = None

    def __post_init__(self) -> None:
        if self.method not in get_args(AttackMethod):
            raise ValueError(f"Attack {self.label}: unknown method {self.method!r}; use one of {list(get_args(AttackMethod))}.")
        if self.queries < 1:
            raise ValueError(f"Attack {self.label}: queries must be >= 1 (got {self.queries}).")
        if self.bpda and self.threat_model != "whitebox":
            raise ValueError(f"Attack {self.label}: bpda differentiates through the defense, so it needs threat_model whitebox "
                             f"(got {self.threat_model}); set bpda to false for the other threat models.")
        if self.eps <= 0 or self.steps < 1 or self.eot_samples < 1 or (self.max_images is not None and self.max_images < 1):
            raise ValueError(f"Attack {self.label}: eps must be > 0, steps and eot_samples >= 1, max_images >= 1 or null (got {self}).")
        if self.threat_model == "adaptive" and (self.method not in GRADIENT_METHODS or self.eot_samples > 1):
            raise ValueError(f"Attack {self.label}: the adaptive threat model needs one of {GRADIENT_METHODS} and eot_samples 1 (got {self}).")

    @property
    def stochastic_source(self) -> bool:
        """Whether the attack treats its source as random (EOT over more than one draw)."""
        return self.eot_samples > 1

    def executed(self, num_classes: int | None = None) -> dict[str, int | str | None]:
        """What the attack actually runs on a task of `num_classes` classes (needed for AutoAttack only), for report
        columns: ``steps`` (gradient steps in all; CW's binary-search rounds times its steps; AutoAttack's APGD iterations;
        Square's queries, one forward pass each), ``eot_samples`` and ``version`` (AutoAttack's version and attacks, e.g.
        ``custom: apgd-ce, fab, square-5000``; ``bpda`` for a BPDA attack)."""
        if self.method == "autoattack":
            version, attacks = autoattack_version(self, num_classes)
            ran = ", ".join(f"square-{self.queries}" if attack == "square" else attack for attack in attacks)
            return dict(steps=AUTOATTACK_ITERATIONS, eot_samples=self.eot_samples, version=f"{version}: {ran}")
        steps = {"fgsm": 1, "cw_l2": CW_SEARCH_STEPS * self.steps, "square": self.queries}.get(self.method, self.steps)
        return dict(steps=steps, eot_samples=self.eot_samples, version="bpda" if self.bpda else None)

    @property
    def norm(self) -> Literal["linf", "l2"]:
        return "l2" if self.method in L2_METHODS else "linf"

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.method == "square":
            label = f"square{self.queries}"
        elif self.method in ("fgsm", "cw_l2", "apgd_ce", "apgd_dlr", "autoattack"):
            label = self.method
        else:
            label = f"{self.method}{self.steps}"
        label += "_bpda" * self.bpda
        return label if self.target is None else f"{label}_to_{self.target}"

    @property
    def alpha(self) -> float:
        """Step size of the iterative attacks."""
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps


class ExpectationOverTransformation(nn.Module):
    """Outputs of a stochastic model averaged over `samples` draws: (B, C, H, W) in [0, 1] -> (B, ...) (logits).

    The gradient of the averaged logits is the average of the per-draw gradients (EOT). The draws
    run as one batch of B * samples images.
    """

    def __init__(self, model: nn.Module, samples: int):
        super().__init__()
        self.model = model
        self.samples = samples

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.model(images.repeat(self.samples, 1, 1, 1))
        return outputs.unflatten(0, (self.samples, images.shape[0])).mean(dim=0)


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


@contextmanager
def attacking(source: nn.Module) -> Iterator[None]:
    """Eval mode, frozen parameters and gradients enabled (also inside inference mode) for an attack."""
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


def random_start(images: torch.Tensor, spec: AttackSpec, keys: torch.Tensor | None, seed: int) -> torch.Tensor:
    """A random point of the eps-ball around `images` (B, C, H, W), kept inside [0, 1]."""
    uniform = keyed_uniform(images, keys, seed) if keys is not None else torch.rand_like(images)
    delta = spec.eps * (2 * uniform - 1)
    if spec.norm == "l2":
        # A direction from the cube's noise, and a radius from its first coordinate.
        flat = delta.flatten(1)
        radius = spec.eps * uniform.flatten(1)[:, :1]
        delta = (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12) * radius).view_as(images)
    return (images + delta).clamp(0, 1)


def project(adversarial: torch.Tensor, images: torch.Tensor, spec: AttackSpec) -> torch.Tensor:
    """Clip `adversarial` to the eps-ball around `images` and to [0, 1] (CW-L2 is only clipped to [0, 1])."""
    delta = adversarial - images
    if spec.norm == "linf":
        delta = delta.clamp(-spec.eps, spec.eps)
    elif spec.method != "cw_l2":
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * (spec.eps / norms).clamp(max=1.0).view(-1, 1, 1, 1)
    return (images + delta).clamp(0, 1)


def perturbation_norm(adversarial: torch.Tensor, images: torch.Tensor, norm: Literal["linf", "l2"]) -> torch.Tensor:
    """Per-sample L-inf or L2 size of the perturbation: (B, C, H, W) pair -> (B,)."""
    delta = (adversarial - images).flatten(1)
    return delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)


def craft_adversarial(
    spec: AttackSpec,
    source: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    keys: torch.Tensor | None = None,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Adversarial versions of `images` that follow the gradients of `source`.

    Args:
        images: (B, C, H, W) in [0, 1]; labels: (B,) class indices, or for a custom `loss_fn`
            whatever targets it takes (e.g. clean probabilities (B, K) for TRADES, masks (B, 1, H, W)).
        num_classes: K, for CW and the AutoAttack suite (classification).
        keys, seed: make random starts a function of (seed, key) per sample (see `keyed_uniform`).
        loss_fn: loss to ascend, ``loss_fn(outputs, labels)`` summed over the batch (see `robust_cxr.tasks`);
            default summed cross-entropy. Only the gradient-ascent methods (fgsm, pgd, bim, mifgsm, pgd_l2) accept one.
        autocast_dtype: run the source under autocast in this dtype (bf16); None runs fp32.

    Returns:
        (B, C, H, W) in [0, 1], within `spec.eps` of `images` in `spec.norm` (except CW-L2).
    """
    if loss_fn is not None and spec.method not in GRADIENT_METHODS:
        raise ValueError(f"Attack {spec.label}: a custom loss needs one of {GRADIENT_METHODS}, not {spec.method}.")
    if spec.method == "apgd_dlr" and num_classes is not None and num_classes < 3:
        raise ValueError(
            f"Attack {spec.label}: the DLR loss of apgd_dlr needs at least 3 classes (this task has {num_classes}); "
            "use apgd_ce, autoattack, pgd or cw_l2 for binary classifiers."
        )
    loss_fn = loss_fn or summed_cross_entropy
    images = images.detach()
    with attacking(source), torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        # AutoAttack's rand version runs EOT itself (over `eot_iter` gradient draws).
        wrap = spec.stochastic_source and spec.method != "autoattack"
        predict = ExpectationOverTransformation(source, spec.eot_samples) if wrap else source
        adversarial = _run_attack(spec, predict, images.clone(), labels, num_classes, keys, seed, loss_fn)
    return project(adversarial.detach().float(), images, spec)


def _run_attack(
    spec: AttackSpec,
    predict: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    keys: torch.Tensor | None,
    seed: int,
    loss_fn: LossFn,
) -> torch.Tensor:
    method = spec.method
    if method == "fgsm":
        return GradientSignAttack(predict, loss_fn, eps=spec.eps, clip_min=0.0, clip_max=1.0).perturb(images, labels)
    if method in ("pgd", "bim", "pgd_l2"):
        start = random_start(images, spec, keys, seed) if spec.random_start and method != "bim" else images
        delta = nn.Parameter(start - images)
        return perturb_iterative(
            images, labels, predict, nb_iter=spec.steps, eps=spec.eps, eps_iter=spec.alpha, loss_fn=loss_fn,
            delta_init=delta, ord=2 if method == "pgd_l2" else math.inf, clip_min=0.0, clip_max=1.0,
        )
    if method == "mifgsm":
        attack = MomentumIterativeAttack(
            predict, loss_fn, eps=spec.eps, nb_iter=spec.steps, eps_iter=spec.alpha, decay_factor=1.0, clip_min=0.0, clip_max=1.0
        )
        return attack.perturb(images, labels)
    if method == "square":
        # Gradient-free: random square updates kept where they lower the margin. Its draws come from the global RNG (the
        # callback seeds it per batch); the best point found is returned for every image, also one it did not fool,
        # since a stochastic model may not be fooled by the next draw anyway.
        attack = SquareAttack(predict, norm="Linf", n_queries=spec.queries, eps=spec.eps, seed=seed, device=images.device)
        attack.init_hyperparam(images)
        return attack.attack_single_run(images, labels)[1]
    if method == "cw_l2":
        attack = CarliniWagnerL2Attack(
            predict, num_classes, learning_rate=spec.step_size or 0.01, binary_search_steps=CW_SEARCH_STEPS,
            max_iterations=spec.steps, clip_min=0.0, clip_max=1.0,
        )
        return attack.perturb(images, labels)
    if method in ("apgd_ce", "apgd_dlr"):
        attack = APGDAttack(predict, n_iter=spec.steps, norm="Linf", eps=spec.eps, loss=method[5:], seed=seed, device=images.device)
        attack.init_hyperparam(images)
        start = random_start(images, spec, keys, seed) if spec.random_start else images
        highest_loss, still_correct, _, first_fooling = attack.attack_single_run(images, labels, x_init=start)
        if spec.stochastic_source:
            # A point that fooled one draw of a random model need not fool the next: keep the highest-loss point.
            return highest_loss
        # Images it never fooled would otherwise get their random start back.
        return torch.where(still_correct.bool().view(-1, 1, 1, 1), highest_loss, first_fooling)
    version, attacks = autoattack_version(spec, num_classes)
    suite = AutoAttack(predict, norm="Linf", eps=spec.eps, version=version, seed=seed, device=images.device)
    suite.verbose = False
    suite.attacks_to_run = attacks
    suite.apgd.n_restarts = suite.fab.n_restarts = 1  # the standard version's; the custom one would keep pyautoattack's 5
    suite.apgd_targeted.n_target_classes = suite.fab.n_target_classes = min(9, num_classes - 1)
    suite.square.n_queries = spec.queries
    if spec.stochastic_source:
        suite.apgd.eot_iter = spec.eot_samples
    return suite.run_standard_evaluation(images, labels, batch_size=len(images))[0]


def autoattack_version(spec: AttackSpec, num_classes: int | None) -> tuple[str, list[str]]:
    """(pyautoattack version, the attacks it runs in order) of AutoAttack on a task of `num_classes` classes.

    A stochastic source (`AttackSpec.stochastic_source`) gets ``rand``: APGD-CE, and APGD-DLR from 3 classes on (the DLR
    loss divides by the gap to the third logit), each gradient averaged over `eot_samples` draws. Otherwise, from 4
    classes on, ``standard``: APGD-CE, targeted APGD-DLR, targeted FAB and Square (targeted DLR needs a fourth logit);
    with 2 or 3 classes, ``custom``: APGD-CE, APGD-DLR from 3 classes, untargeted FAB (on 2 classes the same as FAB-T
    toward the one other class) and Square.
    """
    if num_classes is None or num_classes < 2:
        raise ValueError(f"Attack {spec.label}: AutoAttack attacks a classifier of 2 or more classes; got num_classes={num_classes}.")
    dlr = ["apgd-dlr"] if num_classes >= 3 else []
    if spec.stochastic_source:
        return "rand", ["apgd-ce", *dlr]
    if num_classes >= 4:
        return "standard", ["apgd-ce", "apgd-t", "fab-t", "square"]
    return "custom", ["apgd-ce", *dlr, "fab", "square"]


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, K) against labels (B,), summed over the batch: the default loss attacks ascend."""
    return F.cross_entropy(logits, labels, reduction="sum")


def trades_kl_loss(adversarial_logits: torch.Tensor, clean_probabilities: torch.Tensor) -> torch.Tensor:
    """Summed KL(clean || adversarial) of the TRADES inner maximisation: logits (B, K), probabilities (B, K)."""
    return F.kl_div(F.log_softmax(adversarial_logits, dim=1), clean_probabilities, reduction="sum")
