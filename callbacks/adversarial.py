"""The adversarial-example callback: attacks crafted on the fly for training and robust evaluation.

How it plugs in:
- Training: at `setup` the callback wraps `on_after_batch_transfer` (the DataModule's or the
  LightningModule's, whichever Lightning calls), which runs on each rank's own batch after it
  reaches the device, outside the DDP forward and outside autocast. There it crafts adversarial
  versions of the first `train_fraction` of the batch against the module's
  `adversarial_training_source()` and either replaces those images by them (PGD-AT), or, with
  `trades_beta`, adds them as ``adversarial_image`` with ``trades_beta`` for the module's TRADES
  loss. A module that defines `adversarial_training_targets(batch, count) -> (batch, targets, loss_fn)`
  (e.g. robust distillation) chooses what the attack on the first `count` images ascends,
  ``loss_fn(logits, targets)`` (None: cross-entropy with `targets` as labels), may add what it
  computed on the way to the batch it returns, and gets the result added as ``adversarial_image``
  beside its clean images.
- Evaluation: after each validation / test batch the callback attacks the module's
  `robustness_subjects()` on that rank's batch (under `enable_grad` and outside inference mode),
  every subject of an attack under the same seed (so stochastic purifiers draw the same noise for every
  subject and the report's rows pair image by image), accumulates the task's counters synced over
  ranks, logs ``{val,test}/<metric>/<attack>`` (classification: ``robust_acc``, balanced accuracy, per-class
  robust recall, ``attack_success``, ``perturbation``; segmentation: ``robust_dice``, ``robust_iou``) and at
  test end writes `robustness_report.{json,md}` and `adversarial_examples.png` to the trainer's
  `default_root_dir` (the run directory). With `worst_case`, each subject also gets a row over the whole suite: per
  image, the attacked outputs of the attack it fares worst under (`Task.per_image_score`).
- Resuming a test: with `batch_results_dir`, each finished test batch's share of the counters is saved per rank
  (`callbacks.evaluation_journal.BatchJournal`); a re-run loads it instead of attacking the batch again. Every attack is
  seeded by (seed, rank, batch index, attack), so the batches attacked after a resume draw what they would have.
What the outputs are, what attacks ascend and how outputs are scored is the module's `task`
(`robust_cxr.tasks`); nothing here depends on it. Attacks never write parameter `.grad` (see
`robust_cxr.attacks.attacking`).
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torchmetrics import Metric

from callbacks.evaluation_journal import SETTINGS_FILE, BatchJournal, EvaluationProgress, check_or_write_settings, merge_metric_states, metric_states
from robust_cxr.attacks import GRADIENT_METHODS, AttackSpec, attacking, check_eot, craft_adversarial, is_stochastic, perturbation_norm, trades_kl
from robust_cxr.metrics import DetectionScores
from robust_cxr.reports import save_example_grid, write_robustness_report
from robust_cxr.tasks import Task
from robust_cxr.threat import DefendedModel, seen_label

class AdversarialExampleCallback(Callback):
    """Adversarial training and robust-accuracy evaluation, on every DDP rank's own shard.

    Args:
        attacks: the evaluation suite, run at validation and test.
        train_attack: the attack for adversarial training (white-box against the module's
            `adversarial_training_source()`); None trains on clean images only.
        train_attack_mix: instead of `train_attack`, attacks of which each training step draws one (seeded by the
            step, the same on every rank), e.g. several methods and eps for a detector.
        train_fraction: share of each training batch attacked (0..1): replaced by its adversarial
            images (PGD-AT), or paired with them (TRADES, module-chosen targets).
        train_eps_warmup_epochs: ramp the training eps linearly from 0 to `train_attack.eps` over
            this many epochs; from-scratch adversarial training at full eps can collapse to a
            constant prediction.
        trades_beta: train with TRADES (CE on clean + beta * KL(clean || adversarial)) instead of
            PGD-AT; the training attack then ascends that KL. Not for modules that define
            `adversarial_training_targets`.
        val_every_n_epochs, val_max_images: strong attacks are expensive, so validation attacks run every n epochs
            on the validation images of index < m (None: all). The DataModule stores each split class-interleaved,
            so these are a class-stratified subset, the same for any batch size and number of ranks.
        test_max_images: likewise at test (None: the full test set); each attack may cap itself further
            (`AttackSpec.max_images`).
        grid_images: images in the test PNG grid (rank 0's first attacked test images, first attack).
        seed: seeds random starts, which depend only on (seed, sample index), not on sharding.
        worst_case: add a row ``worst_case`` per subject that at least two attacks apply to: an image counts only as it
            fares under the attack that is worst for it (classification: robust only if right clean and after every
            attack; segmentation / restoration: its lowest Dice / PSNR, with IoU / SSIM of that attack), on the images
            every one of those attacks covered.
        batch_results_dir: at test, save each finished batch's counts there (per rank and batch index) and, on a re-run
            with the same settings and number of ranks, load them instead of attacking those batches again.
        progress: at test, log images evaluated / total, elapsed time and ETA after each attacked batch (rank 0).
        subjects: keys of the module's robustness subjects to attack (e.g. ``teacher_finetuned+purifier``); None: all.
    """

    def __init__(
        self,
        attacks: list[AttackSpec] | None = None,
        train_attack: AttackSpec | None = None,
        train_attack_mix: list[AttackSpec] | None = None,
        train_fraction: float = 0.5,
        train_eps_warmup_epochs: float = 0.0,
        trades_beta: float | None = None,
        val_every_n_epochs: int = 1,
        val_max_images: int | None = 128,
        test_max_images: int | None = None,
        grid_images: int = 8,
        seed: int = 0,
        worst_case: bool = False,
        batch_results_dir: str | None = None,
        progress: bool = False,
        subjects: list[str] | None = None,
    ):
        if not 0.0 <= train_fraction <= 1.0:
            raise ValueError(f"train_fraction must lie in [0, 1], got {train_fraction}.")
        if train_attack is not None and train_attack_mix:
            raise ValueError("Set train_attack or train_attack_mix, not both.")
        train_attacks = [train_attack] if train_attack is not None else list(train_attack_mix or [])
        if trades_beta is not None and any(spec.method not in GRADIENT_METHODS for spec in train_attacks):
            raise ValueError(f"TRADES ascends a KL loss: training attacks must be among {GRADIENT_METHODS}, got {[s.method for s in train_attacks]}.")
        if val_every_n_epochs < 1:
            raise ValueError(f"val_every_n_epochs must be >= 1, got {val_every_n_epochs}.")
        for name, value in (("val_max_images", val_max_images), ("test_max_images", test_max_images)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or null (every image), got {value}.")
        labels = [spec.label for spec in attacks or []]
        if len(set(labels)) != len(labels):
            raise ValueError(f"Attack names must be unique (they name metrics): {labels}; set `name` to tell them apart.")
        if {"none", WORST_CASE} & set(labels):
            raise ValueError(f"Attacks cannot be named 'none' or '{WORST_CASE}' (report rows of their own): rename them in {labels}.")
        self.attacks = list(attacks or [])
        self.train_attacks = train_attacks
        self.train_fraction = train_fraction
        self.train_eps_warmup_epochs = train_eps_warmup_epochs
        self.trades_beta = trades_beta
        self.val_every_n_epochs = val_every_n_epochs
        self.val_max_images = val_max_images
        self.test_max_images = test_max_images
        self.grid_images = grid_images
        self.seed = seed
        self.worst_case = worst_case
        self.batch_results_dir = batch_results_dir
        self.progress = progress
        self.subjects = subjects
        self._journal: BatchJournal | None = None
        self._progress: EvaluationProgress | None = None
        self._counts: dict[tuple[str, str], Metric] = {}
        self._detections: dict[tuple[str, str], DetectionScores] = {}
        self._subjects: list[DefendedModel] = []
        self._grid: dict[str, torch.Tensor] | None = None
        self._hook_owner: L.LightningModule | L.LightningDataModule | None = None

    # ----------------------------------------------------------------- training
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.attacks and not self.train_attacks:  # e.g. the purifier stage, which has no task to attack
            return
        task: Task = pl_module.task
        for spec in self.attacks + self.train_attacks:
            task.check_attack(spec)
        if not self.train_attacks or stage != TrainerFn.FITTING.value:
            return
        if self.trades_beta is not None and task.name != "classification":
            raise ValueError(f"TRADES compares class probabilities; {type(pl_module).__name__} is a {task.name} stage: set trades_beta to null.")
        if self.trades_beta is not None and hasattr(pl_module, "adversarial_training_targets"):
            raise ValueError(
                f"{type(pl_module).__name__} chooses its own adversarial training targets (adversarial_training_targets), "
                "which TRADES would override: set trades_beta to null."
            )
        owner = _batch_hook_owner(trainer, pl_module)
        original = owner.on_after_batch_transfer

        def on_after_batch_transfer(batch, dataloader_idx):
            batch = original(batch, dataloader_idx)
            if trainer.training:
                batch = self._adversarial_training_batch(trainer, pl_module, batch)
            return batch

        owner.on_after_batch_transfer = on_after_batch_transfer
        self._hook_owner = owner

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._hook_owner is not None:
            self._hook_owner.__dict__.pop("on_after_batch_transfer", None)
            self._hook_owner = None

    def _adversarial_training_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict) -> dict:
        task: Task = pl_module.task
        count = round(self.train_fraction * len(batch["image"]))
        spec = self._scheduled_train_attack(trainer)
        if count == 0 or spec is None:
            return batch
        images = batch["image"][:count]
        source = pl_module.adversarial_training_source()
        common = dict(
            num_classes=task.num_classes,
            keys=batch["index"][:count] if "index" in batch else None,
            seed=self.seed + 1 + trainer.global_step,
            autocast_dtype=_attack_dtype(trainer),
        )
        if hasattr(pl_module, "adversarial_training_targets"):
            batch, targets, loss_fn = pl_module.adversarial_training_targets(batch, count)
            if loss_fn is None:
                targets, loss_fn = task.attack_objective(spec, targets)
            added = {}
        elif self.trades_beta is not None:
            with attacking(source):
                targets = source(images).softmax(dim=1).detach()
            loss_fn, added = trades_kl, {"trades_beta": self.trades_beta}
        else:
            targets, loss_fn = task.attack_objective(spec, task.targets(batch)[:count])
            adversarial = craft_adversarial(spec, source, images, targets, loss_fn=loss_fn, **common)
            return {**batch, "image": torch.cat([adversarial, batch["image"][count:]])}
        adversarial = craft_adversarial(spec, source, images, targets, loss_fn=loss_fn, **common)
        return {**batch, "adversarial_image": adversarial, **added}

    def _scheduled_train_attack(self, trainer: L.Trainer) -> AttackSpec | None:
        """This step's training attack (drawn from the mix, if any) at its point of the eps warmup; None while its eps is
        still 0."""
        spec = self.train_attacks[random.Random(self.seed + trainer.global_step).randrange(len(self.train_attacks))]
        if self.train_eps_warmup_epochs <= 0:
            return spec
        epochs_done = trainer.global_step * trainer.accumulate_grad_batches / max(1, trainer.num_training_batches)
        scale = min(1.0, epochs_done / self.train_eps_warmup_epochs)
        return replace(spec, eps=spec.eps * scale) if scale > 0 else None

    # --------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = trainer.state.fn != TrainerFn.FITTING or (trainer.current_epoch + 1) % self.val_every_n_epochs == 0
        self._start_evaluation(pl_module, active=due and not trainer.sanity_checking)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_evaluation(pl_module, active=True)
        if not self._counts:
            return
        if self.batch_results_dir is not None:
            directory = Path(self.batch_results_dir)
            settings = dict(attacks=[asdict(spec) for spec in self.attacks], test_max_images=self.test_max_images, seed=self.seed,
                            precision=str(trainer.precision),
                            worst_case=self.worst_case, world_size=trainer.world_size, rows=[" | ".join(key) for key in self._counts])
            check_or_write_settings(directory / SETTINGS_FILE, settings,
                                    fix=f"Delete {directory} to start this evaluation afresh, or write it elsewhere.")
            self._journal = BatchJournal(directory, trainer.global_rank)
        if self.progress:
            self._progress = EvaluationProgress(_images_to_evaluate(trainer, self.test_max_images))

    def _start_evaluation(self, pl_module: L.LightningModule, active: bool) -> None:
        self._counts, self._detections, self._grid = {}, {}, None
        self._journal = self._progress = None
        if not active or not self.attacks:
            return
        self._subjects = _chosen_subjects(pl_module.robustness_subjects(), self.subjects)
        for subject in self._subjects:
            for spec in self.attacks:
                source = subject.attack_source(spec.threat_model, spec.bpda)
                if source is not None:
                    check_eot(spec, source, subject.key)
        self._counts, self._detections = self._new_counters(pl_module)
        skipped = [s.label for s in self.attacks if all((subj.key, s.label) not in self._counts for subj in self._subjects)]
        if skipped:
            rank_zero_info(f"Attacks {skipped} do not apply to {[s.key for s in self._subjects]} and are skipped.")

    def _new_counters(self, pl_module: L.LightningModule) -> tuple[dict[tuple[str, str], Metric], dict[tuple[str, str], DetectionScores]]:
        """Fresh counters by (subject key, attack label): ``none`` (clean), each attack that applies to the subject and,
        with `worst_case` and two or more of them, `WORST_CASE`; and detection scores for subjects with a detector."""
        task: Task = pl_module.task
        keys = []
        for subject in self._subjects:
            applied = [spec.label for spec in self.attacks if subject.attack_source(spec.threat_model, spec.bpda) is not None]
            keys += [(subject.key, label) for label in ["none", *applied]]
            if self.worst_case and len(applied) > 1:
                keys.append((subject.key, WORST_CASE))
        detected = {subject.key for subject in self._subjects if subject.detector is not None}
        with torch.inference_mode(False):  # the counters are updated where attacks run, outside inference mode
            counts = {key: task.robustness_counter().to(pl_module.device) for key in keys}
            detections = {key: DetectionScores().to(pl_module.device) for key in keys if key[0] in detected and key[1] != WORST_CASE}
        return counts, detections

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._counts:
            self._evaluate_batch(trainer, pl_module, batch, batch_idx, self.val_max_images, capture_grid=False)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._counts:
            capture_grid = self._grid is None and trainer.is_global_zero
            self._evaluate_batch(trainer, pl_module, batch, batch_idx, self.test_max_images, capture_grid)

    def _evaluate_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int,
                        max_images: int | None, capture_grid: bool) -> None:
        """Scores every subject clean and under every attack on the batch's images of index < `max_images` (and each
        attack's own `max_images`).

        Each (subject, attack) pair runs on the global RNG seeded by (callback seed, rank, batch, attack), so a random
        defense draws the same noise for every subject of an attack and rows pair image by image, whatever ran before.
        """
        keys = batch["index"].clone() if "index" in batch else None
        record = self._journal.load(batch_idx) if self._journal is not None else None
        attacked = record is None
        if record is not None:
            self._load_finished_batch(record, keys, batch_idx, capture_grid)
        else:
            totals, grid = (self._counts, self._detections), self._grid
            if self._journal is not None:  # this batch's share on counters of its own, saved, then added to the totals
                self._counts, self._detections = self._new_counters(pl_module)
            with torch.inference_mode(False):  # tensors made under inference mode cannot enter autograd
                self._evaluate_images(trainer, pl_module, batch["image"].clone(), pl_module.task.targets(batch).clone(),
                                      keys, batch_idx, max_images, capture_grid)
            if self._journal is not None:
                record = dict(keys=None if keys is None else keys.cpu(), counts=metric_states(self._counts), detections=metric_states(self._detections),
                              grid=self._grid if self._grid is not grid else None)
                self._journal.save(batch_idx, record)
                self._counts, self._detections = totals
                self._load_finished_batch(record, keys, batch_idx, capture_grid)
        images = int(_subset(keys, max_images, len(batch["image"])).sum())
        if self._progress is not None and images:
            rank_zero_info(self._progress.update(images, attacked))

    def _load_finished_batch(self, record: dict, keys: torch.Tensor | None, batch_idx: int, capture_grid: bool) -> None:
        """Adds a finished batch's saved counts (a `BatchJournal` record) to the totals, and its grid if it has one."""
        if (record["keys"] is None) != (keys is None) or (keys is not None and not torch.equal(record["keys"], keys.cpu())):
            raise ValueError(
                f"Test batch {batch_idx} holds other images than when its results were saved in {self.batch_results_dir}: the data, "
                "its batch size or the number of processes changed. Delete that folder to evaluate afresh, or restore the settings."
            )
        merge_metric_states(self._counts, record["counts"])
        merge_metric_states(self._detections, record["detections"])
        if capture_grid and self._grid is None and record["grid"] is not None:
            self._grid = record["grid"]

    def _evaluate_images(self, trainer: L.Trainer, pl_module: L.LightningModule, images: torch.Tensor, targets: torch.Tensor,
                         keys: torch.Tensor | None, batch_idx: int, max_images: int | None, capture_grid: bool) -> None:
        """`_evaluate_batch` on images (B, C, H, W) in [0, 1], the task's targets (B, ...) and split indices (B,) or None."""
        selected = _subset(keys, max_images, len(images)).to(images.device)
        if not selected.any():
            return
        images, targets, keys = images[selected], targets[selected], None if keys is None else keys[selected]
        task: Task = pl_module.task
        seed = self.seed + _RANK_SEED_STRIDE * trainer.global_rank + _BATCH_SEED_STRIDE * batch_idx
        # The grid shows the first defended subject (with its defense's output) when there is one.
        grid_subject = next((s for s in self._subjects if s.defense_module is not None), self._subjects[0])
        for subject in self._subjects:
            dtype = _attack_dtype(trainer, subject)
            attacked = []  # (images chosen (B,) bool, their attacked outputs, their perturbation norms) per attack that ran
            with _seeded_global_rng(seed, images.device):
                clean_outputs = _outputs(subject.pipeline, images, dtype, f"{subject.key} on clean images")
            self._counts[(subject.key, "none")].update(targets, clean_outputs, clean_outputs, torch.zeros(len(images), device=images.device))
            if subject.detector is not None:
                clean_scores = _outputs(subject.detector, images, dtype, f"the detector of {subject.key}")
                clean_task_scores = task.per_image_score(targets, clean_outputs)
                self._detections[(subject.key, "none")].update(clean_scores, clean_task_scores)
            for slot, spec in enumerate(self.attacks, start=1):
                source = subject.attack_source(spec.threat_model, spec.bpda)
                chosen = _subset(keys, spec.max_images, len(images)).to(images.device)
                if source is None or not chosen.any():
                    continue
                true_targets = targets[chosen]
                attack_targets, loss_fn = task.attack_objective(spec, true_targets)
                with _seeded_global_rng(seed + slot, images.device):
                    adversarial = craft_adversarial(
                        spec, source, images[chosen], attack_targets, num_classes=task.num_classes,
                        loss_fn=subject.attack_loss(spec, loss_fn),
                        score_fn=subject.attack_score(spec.threat_model, lambda outputs: task.per_image_score(true_targets, outputs)),
                        keys=None if keys is None else keys[chosen], seed=self.seed, autocast_dtype=dtype,
                    )
                    adversarial_outputs = _outputs(subject.pipeline, adversarial, dtype, f"{subject.key} under {spec.label}")
                norms = perturbation_norm(adversarial, images[chosen], spec.norm)
                self._counts[(subject.key, spec.label)].update(true_targets, clean_outputs[chosen], adversarial_outputs, norms)
                attacked.append((chosen, adversarial_outputs, norms))
                if subject.detector is not None:
                    self._detections[(subject.key, spec.label)].update(
                        clean_scores[chosen], clean_task_scores[chosen], _outputs(subject.detector, adversarial, dtype, f"the detector of {subject.key}"),
                        task.per_image_score(true_targets, adversarial_outputs))
                if capture_grid and subject is grid_subject and self._grid is None:
                    n = self.grid_images
                    self._grid = dict(
                        clean=images[chosen][:n], adversarial=adversarial[:n], targets=true_targets[:n],
                        clean_outputs=clean_outputs[chosen][:n], adversarial_outputs=adversarial_outputs[:n],
                        eps=spec.eps, defended=None, attack=spec.label, threat_model=spec.threat_model,
                        subject=subject.model if subject.defense == "none" else f"{subject.model} + {subject.defense}",
                    )
            if (subject.key, WORST_CASE) in self._counts:
                self._update_worst_case(task, subject.key, targets, clean_outputs, attacked)
        if self._grid is not None and self._grid["defended"] is None and grid_subject.defense_module is not None:
            # Its own noise stream, so that showing the defense's output changes no row.
            with _seeded_global_rng(seed + len(self.attacks) + 1, images.device), torch.no_grad():
                self._grid["defended"] = grid_subject.defense_module(self._grid["adversarial"])

    def _update_worst_case(self, task: Task, subject_key: str, targets: torch.Tensor, clean_outputs: torch.Tensor,
                           attacked: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Updates the subject's `WORST_CASE` counter with, per image that every attack applying to it covered, the
        attacked outputs (and perturbation) of the attack with the lowest `Task.per_image_score` (the first of equals).

        `attacked` holds, per attack that ran on the batch, the images it chose (B,) bool, their attacked outputs (n, ...)
        and perturbation norms (n,); targets (B, ...) and clean outputs (B, ...) are the batch's."""
        applying = sum(1 for key in self._counts if key[0] == subject_key and key[1] not in ("none", WORST_CASE))
        if len(attacked) < applying:  # an attack with a subset of its own covered none of these images
            return
        common = torch.stack([chosen for chosen, _, _ in attacked]).all(dim=0)
        if not common.any():
            return
        outputs = torch.stack([outputs[common[chosen]] for chosen, outputs, _ in attacked])  # (A, n, ...)
        norms = torch.stack([norms[common[chosen]] for chosen, _, norms in attacked])  # (A, n)
        scores = torch.stack([task.per_image_score(targets[common], attack_outputs) for attack_outputs in outputs])
        worst = scores.argmin(dim=0)
        images = torch.arange(len(worst), device=worst.device)
        self._counts[(subject_key, WORST_CASE)].update(targets[common], clean_outputs[common], outputs[worst, images], norms[worst, images])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_results("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self._log_results("test", trainer, pl_module)
        if not rows or not trainer.is_global_zero:
            return
        directory = Path(trainer.default_root_dir)
        report = write_robustness_report(rows, directory)
        grid = None
        if self._grid is not None:
            grid = save_example_grid(directory / "adversarial_examples.png", pl_module.task, **self._grid)
        _log_report_to_wandb(trainer, rows, grid)
        rank_zero_info(f"Robustness report: {report}")

    def _log_results(self, stage: str, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict]:
        """Computes every counter (a collective: all ranks call it), logs the metrics, returns report rows."""
        if not self._counts:  # nothing was attacked (e.g. the purifier and NIM stages, which have no task)
            return []
        task: Task = pl_module.task
        rows = []
        specs = {spec.label: spec for spec in self.attacks}
        for (subject_key, attack), counts in self._counts.items():
            result = counts.compute()
            subject = next(s for s in self._subjects if s.key == subject_key)
            suffix = f"/{subject_key}" if len(self._subjects) > 1 else ""
            if attack != "none":
                for name, value in task.logged(result).items():  # NaN where undefined (e.g. no image fooled): same keys every run
                    pl_module.log(f"{stage}/{name}/{attack}{suffix}", value, sync_dist=True)
            setting = dict(model=subject.model, defense=subject.defense, threshold=subject.decision_threshold, attack=attack)
            if attack == WORST_CASE:
                suite = [spec for spec in self.attacks if (subject_key, spec.label) in self._counts]
                setting.update(
                    threat_model="+".join(dict.fromkeys(spec.threat_model for spec in suite)), norm="+".join(dict.fromkeys(spec.norm for spec in suite)),
                    eps=max(spec.eps for spec in suite), steps=None, eot_samples=None, eot_average=None, version=None,
                    worst_of=", ".join(spec.label for spec in suite),
                )
            else:
                spec = specs.get(attack)
                executed = (spec.executed(task.num_classes, is_stochastic(subject.attack_source(spec.threat_model, spec.bpda))) if spec
                            else dict(steps=None, eot_samples=None, eot_average=None, version=None))
                setting.update(threat_model=spec.threat_model if spec else "none", norm=spec.norm if spec else "none",
                               eps=spec.eps if spec else 0.0, **executed)
            setting["precision"] = "bf16" if _attack_dtype(trainer, subject) == torch.bfloat16 else "fp32"
            rows += [{**setting, **columns} for columns in task.report_rows(result, attacked=attack != "none")]
            if (subject_key, attack) in self._detections:  # never the worst-case row
                detection = self._detections[(subject_key, attack)].compute(float(subject.detector.threshold))
                rows += _detection_rows(setting, detection, spec, subject.detector_seen)
                for name in ("auroc", "tpr") if spec is not None else ():
                    pl_module.log(f"{stage}/detection_{name}/{attack}{suffix}", detection[name], sync_dist=True)
        return [{key: None if isinstance(value, float) and math.isnan(value) else value for key, value in row.items()} for row in rows]


def _detection_rows(setting: dict, detection: dict[str, float], spec: AttackSpec | None, seen_attacks: tuple[str, ...]) -> list[dict]:
    """A detector's report rows (see `DetectionScores`): ``detection_rate``, the share of the attacked images it flags
    (`clean_value`: of the clean ones, its false-positive rate; the clean row has that share alone), and under an
    attack ``detection_auroc`` (clean against attacked), ``robust_or_rejected`` (an image counts if right clean and
    unflagged, and right or flagged attacked; `clean_value`: right and unflagged clean) and ``evasion_rate`` (right
    clean, fooled and unflagged). `seen_in_training` says whether the detector was trained on that attack's method and
    eps; an adaptive attack, which aims at the detector, never was."""
    seen = None if spec is None else spec.threat_model != "adaptive" and seen_label(spec.method, spec.eps) in seen_attacks
    common = {**setting, "n": detection["n"], "seen_in_training": seen}
    rate = dict(common, metric="detection_rate", value=detection["fpr" if spec is None else "tpr"], clean_value=detection["fpr"])
    if spec is None:
        return [rate]
    return [dict(common, metric="detection_auroc", value=detection["auroc"], clean_value=None), rate,
            dict(common, metric="robust_or_rejected", value=detection["robust_or_rejected"], clean_value=detection["clean_unflagged"]),
            dict(common, metric="evasion_rate", value=detection["evasion_rate"], clean_value=None)]


def _log_report_to_wandb(trainer: L.Trainer, rows: list[dict], grid: Path | None) -> None:
    """Logs the report rows as a table and the example grid (a PNG path, if any) as an image to every W&B logger."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            columns = list(dict.fromkeys(key for row in rows for key in row))
            table = [[row.get(column) for column in columns] for row in rows]
            logger.log_table("test/robustness_report", columns=columns, data=table, step=trainer.global_step)
            if grid is not None:
                logger.log_image("test/adversarial_examples", images=[str(grid)], step=trainer.global_step)


def _batch_hook_owner(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule | L.LightningDataModule:
    """Whose `on_after_batch_transfer` Lightning calls: the DataModule's when it defines one or the model does not."""
    datamodule = trainer.datamodule
    hook = "on_after_batch_transfer"
    if datamodule is not None and (is_overridden(hook, datamodule) or not is_overridden(hook, pl_module)):
        return datamodule
    return pl_module


WORST_CASE = "worst_case"  # the attack name of the worst-case rows


def _chosen_subjects(subjects: list[DefendedModel], keys: list[str] | None) -> list[DefendedModel]:
    """The `subjects` whose key is in `keys` (all for None); ValueError naming the available keys for an unknown one, or
    naming two subjects that share a key (their rows would merge)."""
    all_keys = [subject.key for subject in subjects]
    shared = sorted({key for key in all_keys if all_keys.count(key) > 1})
    if shared:
        raise ValueError(f"Robustness subjects {shared} occur more than once ({all_keys}): each subject's model and defense must name it "
                         "apart from the others (DefendedModel.model, .defense), or its rows would merge.")
    if keys is None:
        return subjects
    unknown = sorted(set(keys) - {subject.key for subject in subjects})
    if unknown:
        raise ValueError(f"Subjects {unknown} are not among this stage's robustness subjects {[s.key for s in subjects]}: pick from those.")
    return [subject for subject in subjects if subject.key in keys]


def _images_to_evaluate(trainer: L.Trainer, max_images: int | None) -> int:
    """The test images of index < `max_images` (all for None) that this rank's test loader yields."""
    loader = trainer.test_dataloaders
    loader = loader[0] if isinstance(loader, (list, tuple)) else loader
    return sum(1 for index in loader.sampler if max_images is None or index < max_images)


# Evaluation seeds: callback seed + rank * 10**9 + batch * 1000 + attack slot, apart for < 1000 attacks and < 10**6 batches.
_RANK_SEED_STRIDE = 10**9
_BATCH_SEED_STRIDE = 1000


def _subset(keys: torch.Tensor | None, max_images: int | None, batch_size: int) -> torch.Tensor:
    """(B,) bool: the batch's images of index < `max_images` (all of them for None)."""
    if max_images is None:
        return torch.ones(batch_size, dtype=torch.bool)
    if keys is None:
        raise ValueError("An evaluation subset (max_images) needs each image's index in its split: batches must carry 'index'.")
    return keys.cpu() < max_images


@contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Runs the block on the global RNGs (CPU, and `device` when CUDA) seeded with `seed`, then restores their state.

    Each subject of a batch is scored under the same seed, so stochastic purifiers draw the same noise for every
    subject and report rows compare image by image; the training RNG stream is left where it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _attack_dtype(trainer: L.Trainer, subject: DefendedModel | None = None) -> torch.dtype | None:
    """bf16 attacks under bf16 mixed precision; fp32 otherwise (fp16 gradients are too coarse), and always for a
    `subject` with a defense in front of its model: a purifier's many steps and small noise scales lose too much in bf16."""
    defended = subject is not None and subject.defense_module is not None
    return torch.bfloat16 if str(trainer.precision).startswith("bf16") and not defended else None


@torch.no_grad()
def _outputs(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None, what: str) -> torch.Tensor:
    """Float outputs (B, ...) of `model` (logits) for images (B, C, H, W) in [0, 1]; FloatingPointError naming `what` where
    one is not finite (an argmax would silently count it as class 0)."""
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        outputs = model(images).float()
    if not torch.isfinite(outputs).all():
        raise FloatingPointError(f"Non-finite outputs of {what}: the checkpoint holds non-finite weights, or the model overflows "
                                 f"in {dtype or torch.float32} (evaluate with --trainer.precision 32-true).")
    return outputs
