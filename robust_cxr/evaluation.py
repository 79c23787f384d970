"""Robustness evaluation of report subjects under an attack suite, batch by batch, without Lightning: the core that the
evaluation callback and the purifier's strength frontier share.

For each subject (`DefendedModel`) and batch it scores the clean images, crafts every attack that applies
(`DefendedModel.attack_source`) and scores the attacked images, into one counter per (subject, attack) of the task
(`Task.robustness_counter`, synced over DDP ranks when computed), a worst-case counter per subject and, for a subject
with a detector, its detection scores. A batch's draws are seeded: the clean scoring with the batch's seed, each attack
with the batch's seed plus its place in the suite, so a random defense draws the same noise for every subject of an
attack, rows pair image by image, and the clean and attacked images are scored on independent draws.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Iterator

import torch
from torchmetrics import Metric

from robust_cxr.attacks import AttackSpec, check_eot, craft_adversarial, perturbation_norm
from robust_cxr.metrics import DetectionScores
from robust_cxr.tasks import Task
from robust_cxr.threat import DefendedModel

WORST_CASE = "worst_case"  # the attack name of the worst-case rows
BATCH_SEED_STRIDE = 1000  # batch i of an evaluation is seeded with seed + BATCH_SEED_STRIDE * i, its attacks above that
Observer = Callable[[DefendedModel, AttackSpec, torch.Tensor], None]  # (subject, attack, attacked images (n, C, H, W)) of every attack run


def chosen_subjects(subjects: list[DefendedModel], keys: list[str] | None) -> list[DefendedModel]:
    """The `subjects` whose key is in `keys` (all for None), in their order; ValueError naming the available keys for an
    unknown one, or naming subjects that share a key (their rows would merge)."""
    all_keys = [subject.key for subject in subjects]
    shared = sorted({key for key in all_keys if all_keys.count(key) > 1})
    if shared:
        raise ValueError(f"Robustness subjects {shared} occur more than once ({all_keys}): each subject's model and defense must name it "
                         "apart from the others (DefendedModel.model, .defense), or its rows would merge.")
    if keys is None:
        return subjects
    unknown = sorted(set(keys) - set(all_keys))
    if unknown:
        raise ValueError(f"Subjects {unknown} are not among this stage's robustness subjects {all_keys}: pick from those.")
    return [subject for subject in subjects if subject.key in keys]


def subset(keys: torch.Tensor | None, max_images: int | None, batch_size: int) -> torch.Tensor:
    """(B,) bool: the batch's images of index < `max_images` (all of them for None)."""
    if max_images is None:
        return torch.ones(batch_size, dtype=torch.bool)
    if keys is None:
        raise ValueError("An evaluation subset (max_images) needs each image's index in its split: batches must carry 'index'.")
    return keys.cpu() < max_images


@contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Runs the block on the global RNGs (CPU, and `device` when CUDA) seeded with `seed`, then restores their state."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class SuiteEvaluation:
    """The counters of `attacks` on `subjects` of a `task`, and how a batch updates them.

    Args:
        subjects: the report subjects, each with a distinct key (`chosen_subjects`).
        attacks: the suite, each checked against the task and, on a random subject, for EOT (`check_eot`).
        task: what the subjects' outputs are and how they are scored.
        worst_case: add a `WORST_CASE` counter per subject that two or more attacks apply to.
        dtype: attacks and scores of an undefended subject run under autocast in it (bf16), None in fp32; a subject with a
            defense always runs in fp32 (`precision`).
        seed: keys the attacks' random starts with each image's index (see `craft_adversarial`).
        device: where the counters live.
    """

    def __init__(self, subjects: list[DefendedModel], attacks: list[AttackSpec], task: Task, worst_case: bool, dtype: torch.dtype | None,
                 seed: int, device: torch.device | str = "cpu"):
        self.subjects = chosen_subjects(subjects, None)
        self.attacks = attacks
        self.task = task
        self.worst_case = worst_case
        self.dtype = dtype
        self.seed = seed
        self.device = device
        for spec in attacks:
            task.check_attack(spec)
            for subject in self.subjects:
                source = subject.attack_source(spec.threat_model, spec.bpda)
                if source is not None:
                    check_eot(spec, source, subject.key)
        self.counts, self.detections = self.new_counters()
        self.grid: dict | None = None

    def applied(self, subject: DefendedModel) -> list[AttackSpec]:
        """The attacks of the suite that apply to `subject` (those with a source under their threat model)."""
        return [spec for spec in self.attacks if subject.attack_source(spec.threat_model, spec.bpda) is not None]

    def subject_dtype(self, subject: DefendedModel) -> torch.dtype | None:
        """The autocast dtype of `subject`'s attacks and scores: fp32 (None) behind a defense, whose many steps and small
        noise scales lose too much in bf16."""
        return None if subject.defense_module is not None else self.dtype

    def precision(self, subject: DefendedModel) -> str:
        """``bf16`` or ``fp32``: what `subject`'s rows ran in."""
        return "bf16" if self.subject_dtype(subject) == torch.bfloat16 else "fp32"

    def new_counters(self) -> tuple[dict[tuple[str, str], Metric], dict[tuple[str, str], DetectionScores]]:
        """Fresh counters by (subject key, attack label): ``none`` (clean), each attack that applies to the subject and,
        with `worst_case` and two or more of them, `WORST_CASE`; and detection scores for subjects with a detector."""
        keys = []
        for subject in self.subjects:
            applied = [spec.label for spec in self.applied(subject)]
            keys += [(subject.key, label) for label in ["none", *applied]]
            if self.worst_case and len(applied) > 1:
                keys.append((subject.key, WORST_CASE))
        detected = {subject.key for subject in self.subjects if subject.detector is not None}
        with torch.inference_mode(False):  # the counters are updated where attacks run, outside inference mode
            counts = {key: self.task.robustness_counter().to(self.device) for key in keys}
            detections = {key: DetectionScores().to(self.device) for key in keys if key[0] in detected and key[1] != WORST_CASE}
        return counts, detections

    def evaluate(self, images: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor | None, seed: int, capture_grid: bool = False,
                 grid_images: int = 8, observe: Observer | None = None) -> None:
        """Scores every subject clean and under every attack that applies on images (B, C, H, W) in [0, 1] with the task's
        targets (B, ...) and split indices (B,) (None: no subsets, unkeyed random starts), each attack on its own subset
        (`AttackSpec.max_images`). The batch's draws are seeded from `seed` (see the module). With `capture_grid` and no
        grid yet, keeps the first `grid_images` images of the first defended subject (else the first) under its first
        attack, with the defense's output on them, as `grid`; `observe` sees every attack's images."""
        with torch.inference_mode(False):  # tensors made under inference mode cannot enter autograd
            images, targets = images.clone(), targets.clone()
            grid_subject = next((s for s in self.subjects if s.defense_module is not None), self.subjects[0])
            for subject in self.subjects:
                self._evaluate_subject(subject, images, targets, keys, seed, capture_grid and subject is grid_subject, grid_images, observe)
            if capture_grid and self.grid is not None and self.grid["defended"] is None and grid_subject.defense_module is not None:
                # Its own noise stream, so that showing the defense's output changes no row.
                with seeded_global_rng(seed + len(self.attacks) + 1, images.device), torch.no_grad():
                    self.grid["defended"] = grid_subject.defense_module(self.grid["adversarial"])

    def _evaluate_subject(self, subject: DefendedModel, images: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor | None, seed: int,
                          capture_grid: bool, grid_images: int, observe: Observer | None) -> None:
        task, dtype = self.task, self.subject_dtype(subject)
        attacked = []  # (images chosen (B,) bool, their attacked outputs, their perturbation norms) per attack that ran
        with seeded_global_rng(seed, images.device):
            clean_outputs = outputs_of(subject.pipeline, images, dtype, f"{subject.key} on clean images")
        self.counts[(subject.key, "none")].update(targets, clean_outputs, clean_outputs, torch.zeros(len(images), device=images.device))
        if subject.detector is not None:
            clean_scores = outputs_of(subject.detector, images, dtype, f"the detector of {subject.key}")
            clean_task_scores = task.per_image_score(targets, clean_outputs)
            self.detections[(subject.key, "none")].update(clean_scores, clean_task_scores)
        for slot, spec in enumerate(self.attacks, start=1):
            source = subject.attack_source(spec.threat_model, spec.bpda)
            chosen = subset(keys, spec.max_images, len(images)).to(images.device)
            if source is None or not chosen.any():
                continue
            chosen_targets = targets[chosen]
            attack_targets, loss = task.attack_objective(spec, chosen_targets)
            with seeded_global_rng(seed + slot, images.device):
                adversarial = craft_adversarial(
                    spec, source, images[chosen], attack_targets, num_classes=task.num_classes, loss_fn=subject.attack_loss(spec, loss),
                    score_fn=subject.attack_score(spec.threat_model, lambda outputs: task.per_image_score(chosen_targets, outputs)),
                    keys=None if keys is None else keys[chosen], seed=self.seed, autocast_dtype=dtype,
                )
                adversarial_outputs = outputs_of(subject.pipeline, adversarial, dtype, f"{subject.key} under {spec.label}")
            norms = perturbation_norm(adversarial, images[chosen], spec.norm)
            self.counts[(subject.key, spec.label)].update(chosen_targets, clean_outputs[chosen], adversarial_outputs, norms)
            attacked.append((chosen, adversarial_outputs, norms))
            if subject.detector is not None:
                self.detections[(subject.key, spec.label)].update(
                    clean_scores[chosen], clean_task_scores[chosen], outputs_of(subject.detector, adversarial, dtype, f"the detector of {subject.key}"),
                    task.per_image_score(chosen_targets, adversarial_outputs))
            if observe is not None:
                observe(subject, spec, adversarial)
            if capture_grid and self.grid is None:
                self.grid = dict(
                    clean=images[chosen][:grid_images], adversarial=adversarial[:grid_images], targets=chosen_targets[:grid_images],
                    clean_outputs=clean_outputs[chosen][:grid_images], adversarial_outputs=adversarial_outputs[:grid_images], eps=spec.eps,
                    defended=None, attack=spec.label, threat_model=spec.threat_model,
                    subject=subject.model if subject.defense == "none" else f"{subject.model} + {subject.defense}",
                )
        if (subject.key, WORST_CASE) in self.counts:
            self._update_worst_case(subject.key, targets, clean_outputs, attacked)

    def _update_worst_case(self, subject_key: str, targets: torch.Tensor, clean_outputs: torch.Tensor,
                           attacked: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Updates the subject's `WORST_CASE` counter with, per image that every attack applying to it covered, the
        attacked outputs (and perturbation) of the attack with the lowest `Task.per_image_score` (the first of equals).

        `attacked` holds, per attack that ran on the batch, the images it chose (B,) bool, their attacked outputs (n, ...)
        and perturbation norms (n,); targets (B, ...) and clean outputs (B, ...) are the batch's."""
        applying = sum(1 for key in self.counts if key[0] == subject_key and key[1] not in ("none", WORST_CASE))
        if len(attacked) < applying:  # an attack with a subset of its own covered none of these images
            return
        common = torch.stack([chosen for chosen, _, _ in attacked]).all(dim=0)
        if not common.any():
            return
        outputs = torch.stack([outputs[common[chosen]] for chosen, outputs, _ in attacked])  # (A, n, ...)
        norms = torch.stack([norms[common[chosen]] for chosen, _, norms in attacked])  # (A, n)
        scores = torch.stack([self.task.per_image_score(targets[common], attack_outputs) for attack_outputs in outputs])
        worst = scores.argmin(dim=0)
        images = torch.arange(len(worst), device=worst.device)
        self.counts[(subject_key, WORST_CASE)].update(targets[common], clean_outputs[common], outputs[worst, images], norms[worst, images])

    def results(self) -> list[tuple[DefendedModel, str, dict, dict | None]]:
        """(subject, attack label, its counter's `compute()`, its detector's `DetectionScores.compute` at the detector's
        threshold or None) per counter, in order: a collective under DDP, every rank calls it."""
        subjects = {subject.key: subject for subject in self.subjects}
        results = []
        for (key, attack), counts in self.counts.items():
            subject = subjects[key]
            detections = self.detections.get((key, attack))
            detection = None if detections is None else detections.compute(float(subject.detector.threshold))
            results.append((subject, attack, counts.compute(), detection))
        return results


@torch.no_grad()
def outputs_of(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None, what: str) -> torch.Tensor:
    """Float outputs (B, ...) of `model` (logits) for images (B, C, H, W) in [0, 1]; FloatingPointError naming `what` where
    one is not finite (an argmax would silently count it as class 0)."""
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        outputs = model(images).float()
    if not torch.isfinite(outputs).all():
        raise FloatingPointError(f"Non-finite outputs of {what}: the checkpoint holds non-finite weights, or the model overflows "
                                 f"in {dtype or torch.float32} (evaluate with --trainer.precision 32-true).")
    return outputs
