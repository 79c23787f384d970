"""Robust evaluation at validation and test: the stage's report subjects under an attack suite, on every DDP rank's
own shard, and the report.

After each validation / test batch the callback attacks the stage's `robustness_subjects()` on that rank's batch
(`robust_cxr.evaluation.SuiteEvaluation`: under `enable_grad`, outside inference mode), logs
``{val,test}/<metric>/<attack>[/<subject>]`` (the task's `logged` figures; a detector's AUROC and detection rate) and at
test end writes `robustness_report.{json,md}` and `adversarial_examples.png` to the trainer's `default_root_dir`.

A long test can be resumed: with `batch_results_dir`, each finished test batch's share of the counters is saved per rank
(`callbacks.evaluation_journal.BatchJournal`); a re-run loads it instead of attacking the batch again. Every attack is
seeded by (seed, rank, batch index, attack), so the batches attacked after a resume draw what they would have.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from callbacks.evaluation_journal import SETTINGS_FILE, BatchJournal, EvaluationProgress, check_or_write_settings, merge_metric_states, metric_states
from robust_cxr.attacks import AttackSpec
from robust_cxr.evaluation import BATCH_SEED_STRIDE, WORST_CASE, SuiteEvaluation, chosen_subjects, subset
from robust_cxr.reports import report_table, robustness_rows, save_example_grid, write_robustness_report

# Evaluation seeds: callback seed + rank * 10**9 + batch * 1000 + attack slot, apart for < 1000 attacks and < 10**6 batches.
_RANK_SEED_STRIDE = 10**9


class RobustEvaluation(Callback):
    """Robust evaluation of the stage's report subjects at validation and test.

    Args:
        attacks: the evaluation suite, run at validation and test.
        val_every_n_epochs, val_max_images: strong attacks are expensive, so validation attacks run every n epochs
            on the validation images of index < m (None: all). The DataModule stores each split class-interleaved,
            so these are a class-stratified subset, the same for any batch size and number of ranks.
        test_max_images: likewise at test (None: the full test set); each attack may cap itself further
            (`AttackSpec.max_images`).
        grid_images: images in the test PNG grid (rank 0's first attacked test images, first attack).
        seed: seeds the attacks: random starts depend only on (seed, image index), other draws on (seed, rank, batch, attack).
        worst_case: add a row ``worst_case`` per subject that at least two attacks apply to: an image counts only as it
            fares under the attack that is worst for it (classification: robust only if right clean and after every
            attack; segmentation / restoration: its lowest Dice / PSNR, with IoU / SSIM of that attack), on the images
            every one of those attacks covered.
        batch_results_dir: at test, save each finished batch's counts there (per rank and batch index) and, on a re-run
            with the same settings and number of ranks, load them instead of attacking those batches again.
        progress: at test, log images evaluated / total, elapsed time and ETA after each attacked batch (rank 0).
        subjects: keys of the stage's robustness subjects to attack (e.g. ``teacher_finetuned+purifier``); None: all.
    """

    def __init__(self, attacks: list[AttackSpec] | None = None, val_every_n_epochs: int = 1, val_max_images: int | None = 128,
                 test_max_images: int | None = None, grid_images: int = 8, seed: int = 0, worst_case: bool = False,
                 batch_results_dir: str | None = None, progress: bool = False, subjects: list[str] | None = None):
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
        self.val_every_n_epochs = val_every_n_epochs
        self.val_max_images = val_max_images
        self.test_max_images = test_max_images
        self.grid_images = grid_images
        self.seed = seed
        self.worst_case = worst_case
        self.batch_results_dir = batch_results_dir
        self.progress = progress
        self.subjects = subjects
        self._evaluation: SuiteEvaluation | None = None
        self._journal: BatchJournal | None = None
        self._progress: EvaluationProgress | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.attacks and pl_module.task is None:
            raise ValueError(f"{type(pl_module).__name__} has no task to attack: leave adversarial.attacks empty.")
        for spec in self.attacks:
            pl_module.task.check_attack(spec)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = trainer.state.fn != TrainerFn.FITTING or (trainer.current_epoch + 1) % self.val_every_n_epochs == 0
        self._start_evaluation(trainer, pl_module, active=due and not trainer.sanity_checking)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_evaluation(trainer, pl_module, active=True)
        if self._evaluation is None:
            return
        if self.batch_results_dir is not None:
            directory = Path(self.batch_results_dir)
            settings = dict(attacks=[asdict(spec) for spec in self.attacks], test_max_images=self.test_max_images, seed=self.seed,
                            precision=str(trainer.precision), worst_case=self.worst_case, world_size=trainer.world_size,
                            rows=[" | ".join(key) for key in self._evaluation.counts])
            check_or_write_settings(directory / SETTINGS_FILE, settings, fix=f"Delete {directory} to start this evaluation afresh, or write it elsewhere.")
            self._journal = BatchJournal(directory, trainer.global_rank)
        if self.progress:
            self._progress = EvaluationProgress(_images_to_evaluate(trainer, self.test_max_images))

    def _start_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule, active: bool) -> None:
        self._evaluation = self._journal = self._progress = None
        if not active or not self.attacks:
            return
        subjects = chosen_subjects(pl_module.robustness_subjects(), self.subjects)
        dtype = torch.bfloat16 if str(trainer.precision).startswith("bf16") else None  # fp16 gradients are too coarse: fp32
        self._evaluation = SuiteEvaluation(subjects, self.attacks, pl_module.task, self.worst_case, dtype, self.seed, pl_module.device)
        skipped = [spec.label for spec in self.attacks if not any(spec in self._evaluation.applied(subject) for subject in subjects)]
        if skipped:
            rank_zero_info(f"Attacks {skipped} do not apply to {[s.key for s in subjects]} and are skipped.")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._evaluation is not None:
            self._evaluate_batch(trainer, pl_module, batch, batch_idx, self.val_max_images, capture_grid=False)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._evaluation is not None:
            capture_grid = self._evaluation.grid is None and trainer.is_global_zero
            self._evaluate_batch(trainer, pl_module, batch, batch_idx, self.test_max_images, capture_grid)

    def _evaluate_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int, max_images: int | None,
                        capture_grid: bool) -> None:
        """Scores every subject clean and under every attack on the batch's images of index < `max_images` (and each
        attack's own `max_images`), or loads the batch's saved counts when it finished before a resume."""
        evaluation = self._evaluation
        keys = batch["index"].clone() if "index" in batch else None
        selected = subset(keys, max_images, len(batch["image"]))
        record = self._journal.load(batch_idx) if self._journal is not None else None
        if record is None and selected.any():
            totals, grid = (evaluation.counts, evaluation.detections), evaluation.grid
            if self._journal is not None:  # this batch's share on counters of its own, saved, then added to the totals
                evaluation.counts, evaluation.detections = evaluation.new_counters()
            selected = selected.to(batch["image"].device)
            seed = self.seed + _RANK_SEED_STRIDE * trainer.global_rank + BATCH_SEED_STRIDE * batch_idx
            evaluation.evaluate(batch["image"][selected], pl_module.task.targets(batch)[selected], None if keys is None else keys[selected],
                                seed, capture_grid, self.grid_images)
            if self._journal is not None:
                record = dict(keys=None if keys is None else keys.cpu(), counts=metric_states(evaluation.counts),
                              detections=metric_states(evaluation.detections), grid=evaluation.grid if evaluation.grid is not grid else None)
                self._journal.save(batch_idx, record)
                evaluation.counts, evaluation.detections = totals
                evaluation.grid = grid
                self._load_finished_batch(record, keys, batch_idx, capture_grid)
            attacked = True
        else:
            if record is not None:
                self._load_finished_batch(record, keys, batch_idx, capture_grid)
            attacked = False
        images = int(selected.sum())
        if self._progress is not None and images:
            rank_zero_info(self._progress.update(images, attacked))

    def _load_finished_batch(self, record: dict, keys: torch.Tensor | None, batch_idx: int, capture_grid: bool) -> None:
        """Adds a finished batch's saved counts (a `BatchJournal` record) to the totals, and its grid if it has one."""
        if (record["keys"] is None) != (keys is None) or (keys is not None and not torch.equal(record["keys"], keys.cpu())):
            raise ValueError(
                f"Test batch {batch_idx} holds other images than when its results were saved in {self.batch_results_dir}: the data, "
                "its batch size or the number of processes changed. Delete that folder to evaluate afresh, or restore the settings."
            )
        evaluation = self._evaluation
        merge_metric_states(evaluation.counts, record["counts"])
        merge_metric_states(evaluation.detections, record["detections"])
        if capture_grid and evaluation.grid is None and record["grid"] is not None:
            evaluation.grid = record["grid"]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_results("val", pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self._log_results("test", pl_module)
        if not rows or not trainer.is_global_zero:
            return
        directory = Path(trainer.default_root_dir)
        report = write_robustness_report(rows, directory)
        grid = self._evaluation.grid
        grid_path = None if grid is None else save_example_grid(directory / "adversarial_examples.png", pl_module.task, **grid)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                columns, table = report_table(rows)
                logger.log_table("test/robustness_report", columns=columns, data=table, step=trainer.global_step)
                if grid_path is not None:
                    logger.log_image("test/adversarial_examples", images=[str(grid_path)], step=trainer.global_step)
        rank_zero_info(f"Robustness report: {report}")

    def _log_results(self, stage: str, pl_module: L.LightningModule) -> list[dict]:
        """Computes every counter (a collective: all ranks call it), logs the metrics, returns the report's rows."""
        if self._evaluation is None:
            return []
        results = self._evaluation.results()
        several = len(self._evaluation.subjects) > 1
        for subject, attack, result, detection in results:
            suffix = f"/{subject.key}" if several else ""
            if attack == "none":
                continue
            for name, value in pl_module.task.logged(result).items():  # NaN where undefined (e.g. no image fooled): same keys every run
                pl_module.log(f"{stage}/{name}/{attack}{suffix}", value, sync_dist=True)
            if detection is not None and attack != WORST_CASE:
                for name in ("auroc", "tpr"):
                    pl_module.log(f"{stage}/detection_{name}/{attack}{suffix}", detection[name], sync_dist=True)
        return robustness_rows(self._evaluation, results)


def _images_to_evaluate(trainer: L.Trainer, max_images: int | None) -> int:
    """The test images of index < `max_images` (all for None) that this rank's test loader yields."""
    loader = trainer.test_dataloaders
    loader = loader[0] if isinstance(loader, (list, tuple)) else loader
    return sum(1 for index in loader.sampler if max_images is None or index < max_images)
