"""The adversarial-example callback: attacks crafted on the fly for training and robust evaluation.

How it plugs in:
- Training: at `setup` the callback wraps `on_after_batch_transfer` (the DataModule's or the
  LightningModule's, whichever Lightning calls), which runs on each rank's own batch after it
  reaches the device, outside the DDP forward and outside autocast. There it crafts adversarial
  versions of the first `train_fraction` of the batch against the module's
  `adversarial_training_source()` and either replaces those images by them (PGD-AT), or, with
  `trades_beta`, adds them as ``adversarial_image`` with ``trades_beta`` for the module's TRADES
  loss. A module that defines `adversarial_training_targets(images, labels) -> (targets, loss_fn)`
  (e.g. robust distillation) chooses what the attack ascends, ``loss_fn(logits, targets)`` (None:
  cross-entropy with `targets` as labels), and gets the result added as ``adversarial_image``
  beside its clean images.
- Evaluation: after each validation / test batch the callback attacks the module's
  `robustness_subjects()` on that rank's batch (under `enable_grad` and outside inference mode),
  each subject under the same seed (so stochastic purifiers draw the same noise for every subject and
  the report's rows pair image by image), accumulates `RobustnessCounts` metrics synced over ranks, logs
  ``{val,test}/robust_acc/<attack>`` (plus ``attack_success`` and ``perturbation``) and at test
  end writes `robustness_report.{json,md}` and `adversarial_examples.png` to the trainer's
  `default_root_dir` (the run directory).
Attacks never write parameter `.grad` (see `robust_cxr.attacks.attacking`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from robust_cxr.attacks import AttackSpec, attacking, craft_adversarial, perturbation_norm, trades_kl_loss
from robust_cxr.metrics import RobustnessCounts
from robust_cxr.purification import PurifiedClassifier
from robust_cxr.reports import save_adversarial_grid, write_robustness_report
from robust_cxr.threat import DefendedModel

GRADIENT_ASCENT_METHODS = ("fgsm", "pgd", "bim", "mifgsm", "pgd_l2")


class AdversarialExampleCallback(Callback):
    """Adversarial training and robust-accuracy evaluation, on every DDP rank's own shard.

    Args:
        attacks: the evaluation suite, run at validation and test.
        train_attack: the attack for adversarial training (white-box against the module being
            trained); None trains on clean images only.
        train_fraction: share of each training batch attacked (0..1): replaced by its adversarial
            images (PGD-AT), or paired with them (TRADES, module-chosen targets).
        train_eps_warmup_epochs: ramp the training eps linearly from 0 to `train_attack.eps` over
            this many epochs; from-scratch adversarial training at full eps can collapse to a
            constant prediction.
        trades_beta: train with TRADES (CE on clean + beta * KL(clean || adversarial)) instead of
            PGD-AT; the training attack then ascends that KL. Not for modules that define
            `adversarial_training_targets`.
        val_every_n_epochs, val_max_batches: strong attacks are expensive, so validation attacks
            run every n epochs on at most m batches per rank (None: all).
        test_max_batches: batches per rank attacked at test (None: the full test set).
        grid_images: images in the test PNG grid (first test batch of rank 0, first attack).
        seed: seeds random starts, which depend only on (seed, sample index), not on sharding.
    """

    def __init__(
        self,
        attacks: list[AttackSpec] | None = None,
        train_attack: AttackSpec | None = None,
        train_fraction: float = 0.5,
        train_eps_warmup_epochs: float = 0.0,
        trades_beta: float | None = None,
        val_every_n_epochs: int = 1,
        val_max_batches: int | None = 2,
        test_max_batches: int | None = None,
        grid_images: int = 8,
        seed: int = 0,
    ):
        if not 0.0 <= train_fraction <= 1.0:
            raise ValueError(f"train_fraction must lie in [0, 1], got {train_fraction}.")
        if train_attack is not None and trades_beta is not None and train_attack.method not in GRADIENT_ASCENT_METHODS:
            raise ValueError(f"TRADES ascends a KL loss: train_attack must be one of {GRADIENT_ASCENT_METHODS}, not {train_attack.method}.")
        if val_every_n_epochs < 1:
            raise ValueError(f"val_every_n_epochs must be >= 1, got {val_every_n_epochs}.")
        labels = [spec.label for spec in attacks or []]
        if len(set(labels)) != len(labels):
            raise ValueError(f"Attack names must be unique (they name metrics): {labels}; set `name` to tell them apart.")
        self.attacks = list(attacks or [])
        self.train_attack = train_attack
        self.train_fraction = train_fraction
        self.train_eps_warmup_epochs = train_eps_warmup_epochs
        self.trades_beta = trades_beta
        self.val_every_n_epochs = val_every_n_epochs
        self.val_max_batches = val_max_batches
        self.test_max_batches = test_max_batches
        self.grid_images = grid_images
        self.seed = seed
        self._counts: dict[tuple[str, str], RobustnessCounts] = {}
        self._subjects: list[DefendedModel] = []
        self._grid: dict[str, torch.Tensor] | None = None
        self._hook_owner: L.LightningModule | L.LightningDataModule | None = None

    # ----------------------------------------------------------------- training
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.train_attack is None or stage != TrainerFn.FITTING.value:
            return
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
        count = round(self.train_fraction * len(batch["label"]))
        spec = self._scheduled_train_attack(trainer)
        if count == 0 or spec is None:
            return batch
        images, labels = batch["image"][:count], batch["label"][:count]
        source = pl_module.adversarial_training_source()
        common = dict(
            num_classes=pl_module.hparams.num_classes,
            keys=batch["index"][:count] if "index" in batch else None,
            seed=self.seed + 1 + trainer.global_step,
            autocast_dtype=_attack_dtype(trainer),
        )
        if hasattr(pl_module, "adversarial_training_targets"):
            targets, loss_fn = pl_module.adversarial_training_targets(images, labels)
            added = {}
        elif self.trades_beta is not None:
            with attacking(source):
                targets = source(images).softmax(dim=1).detach()
            loss_fn, added = trades_kl_loss, {"trades_beta": self.trades_beta}
        else:
            adversarial = craft_adversarial(spec, source, images, labels, **common)
            return {**batch, "image": torch.cat([adversarial, batch["image"][count:]])}
        adversarial = craft_adversarial(spec, source, images, targets, loss_fn=loss_fn, **common)
        return {**batch, "adversarial_image": adversarial, **added}

    def _scheduled_train_attack(self, trainer: L.Trainer) -> AttackSpec | None:
        """The training attack at this step's point of the eps warmup; None while its eps is still 0."""
        if self.train_eps_warmup_epochs <= 0:
            return self.train_attack
        epochs_done = trainer.global_step * trainer.accumulate_grad_batches / max(1, trainer.num_training_batches)
        scale = min(1.0, epochs_done / self.train_eps_warmup_epochs)
        return replace(self.train_attack, eps=self.train_attack.eps * scale) if scale > 0 else None

    # --------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = trainer.state.fn != TrainerFn.FITTING or (trainer.current_epoch + 1) % self.val_every_n_epochs == 0
        self._start_evaluation(pl_module, active=due and not trainer.sanity_checking)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_evaluation(pl_module, active=True)

    def _start_evaluation(self, pl_module: L.LightningModule, active: bool) -> None:
        self._counts, self._grid = {}, None
        if not active or not self.attacks:
            return
        self._subjects = pl_module.robustness_subjects()
        for subject in self._subjects:
            self._counts[(subject.key, "none")] = RobustnessCounts().to(pl_module.device)
            for spec in self.attacks:
                if subject.attack_source(spec.threat_model) is not None:
                    self._counts[(subject.key, spec.label)] = RobustnessCounts().to(pl_module.device)
        skipped = [s.label for s in self.attacks if all((subj.key, s.label) not in self._counts for subj in self._subjects)]
        if skipped:
            rank_zero_info(f"Attacks {skipped} do not apply to {[s.key for s in self._subjects]} and are skipped.")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._counts and (self.val_max_batches is None or batch_idx < self.val_max_batches):
            self._evaluate_batch(trainer, pl_module, batch, batch_idx, capture_grid=False)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._counts and (self.test_max_batches is None or batch_idx < self.test_max_batches):
            self._evaluate_batch(trainer, pl_module, batch, batch_idx, capture_grid=batch_idx == 0 and trainer.is_global_zero)

    def _evaluate_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, batch_idx: int, capture_grid: bool) -> None:
        with torch.inference_mode(False):  # batches made under inference mode cannot enter autograd
            images, labels = batch["image"].clone(), batch["label"].clone()
            keys = batch["index"].clone() if "index" in batch else None
        dtype = _attack_dtype(trainer)
        # The grid shows the first defended subject (with its purified images) when there is one.
        grid_subject = next((s for s in self._subjects if isinstance(s.pipeline, PurifiedClassifier)), self._subjects[0])
        for subject in self._subjects:
            with _seeded_global_rng(self.seed + _RANK_SEED_STRIDE * trainer.global_rank + batch_idx, images.device):
                self._evaluate_subject(subject, pl_module, images, labels, keys, batch_idx, dtype, capture_grid and subject is grid_subject)

    def _evaluate_subject(self, subject: DefendedModel, pl_module: L.LightningModule, images: torch.Tensor, labels: torch.Tensor,
                          keys: torch.Tensor | None, batch_idx: int, dtype: torch.dtype | None, capture_grid: bool) -> None:
        """Counts one subject's clean and attacked predictions on a batch (images (B, C, H, W) in [0, 1]); with
        `capture_grid`, keeps the first attack's images for the report's grid."""
        clean_predictions = _predict(subject.pipeline, images, dtype)
        clean_correct = clean_predictions == labels
        self._counts[(subject.key, "none")].update(clean_correct, clean_correct, torch.zeros_like(labels, dtype=torch.float))
        for spec in self.attacks:
            source = subject.attack_source(spec.threat_model)
            if source is None or (spec.max_batches is not None and batch_idx >= spec.max_batches):
                continue
            adversarial = craft_adversarial(
                spec, source, images, labels, num_classes=pl_module.hparams.num_classes, keys=keys, seed=self.seed, autocast_dtype=dtype
            )
            adversarial_predictions = _predict(subject.pipeline, adversarial, dtype)
            norms = perturbation_norm(adversarial, images, spec.norm)
            self._counts[(subject.key, spec.label)].update(clean_correct, adversarial_predictions == labels, norms)
            if capture_grid and self._grid is None:
                n = self.grid_images
                purified = None
                if isinstance(subject.pipeline, PurifiedClassifier):
                    with torch.no_grad():
                        purified = subject.pipeline.purifier(adversarial[:n])
                self._grid = dict(
                    clean=images[:n], adversarial=adversarial[:n], labels=labels[:n], clean_predictions=clean_predictions[:n],
                    adversarial_predictions=adversarial_predictions[:n], eps=spec.eps, purified=purified,
                )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_results("val", pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self._log_results("test", pl_module)
        if not rows or not trainer.is_global_zero:
            return
        directory = Path(trainer.default_root_dir)
        report = write_robustness_report(rows, directory)
        grid = None
        if self._grid is not None:
            class_names = pl_module.hparams.get("class_names") or [str(i) for i in range(pl_module.hparams.num_classes)]
            grid = save_adversarial_grid(directory / "adversarial_examples.png", class_names=class_names, **self._grid)
        _log_report_to_wandb(trainer, rows, grid)
        rank_zero_info(f"Robustness report: {report}")

    def _log_results(self, stage: str, pl_module: L.LightningModule) -> list[dict]:
        """Computes every counter (a collective: all ranks call it), logs the metrics, returns report rows."""
        rows = []
        specs = {spec.label: spec for spec in self.attacks}
        for (subject_key, attack), counts in self._counts.items():
            result = counts.compute()
            subject = next(s for s in self._subjects if s.key == subject_key)
            suffix = f"/{subject_key}" if len(self._subjects) > 1 else ""
            spec = specs.get(attack)
            if spec is not None:
                for name in ("robust_acc", "attack_success", "perturbation"):
                    pl_module.log(f"{stage}/{name}/{attack}{suffix}", result[name].float(), sync_dist=True)
            rows.append(
                dict(
                    model=subject.model,
                    defense=subject.defense,
                    attack=attack,
                    threat_model=spec.threat_model if spec else "none",
                    norm=spec.norm if spec else "none",
                    eps=spec.eps if spec else 0.0,
                    accuracy=result["robust_acc"].item(),
                    n=int(result["total"]),
                    correct=int(result["robust_correct"]),
                    attack_success=result["attack_success"].item() if spec else None,
                    perturbation=result["perturbation"].item() if spec else None,
                    steps=spec.steps if spec else None,
                    eot_samples=spec.eot_samples if spec else None,
                )
            )
        return rows


def _log_report_to_wandb(trainer: L.Trainer, rows: list[dict], grid: Path | None) -> None:
    """Logs the report rows as a table and the example grid (a PNG path, if any) as an image to every W&B logger."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            table = [list(row.values()) for row in rows]
            logger.log_table("test/robustness_report", columns=list(rows[0]), data=table, step=trainer.global_step)
            if grid is not None:
                logger.log_image("test/adversarial_examples", images=[str(grid)], step=trainer.global_step)


def _batch_hook_owner(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule | L.LightningDataModule:
    """Whose `on_after_batch_transfer` Lightning calls: the DataModule's when it defines one or the model does not."""
    datamodule = trainer.datamodule
    hook = "on_after_batch_transfer"
    if datamodule is not None and (is_overridden(hook, datamodule) or not is_overridden(hook, pl_module)):
        return datamodule
    return pl_module


_RANK_SEED_STRIDE = 1_000_003  # ranks' evaluation seeds stay apart for any number of batches below it


@contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Runs the block on the global RNGs (CPU, and `device` when CUDA) seeded with `seed`, then restores their state.

    Each subject of a batch is scored under the same seed, so stochastic purifiers draw the same noise for every
    subject and report rows compare image by image; the training RNG stream is left where it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _attack_dtype(trainer: L.Trainer) -> torch.dtype | None:
    """bf16 attacks under bf16 mixed precision; fp32 otherwise (fp16 gradients are too coarse)."""
    return torch.bfloat16 if str(trainer.precision).startswith("bf16") else None


@torch.no_grad()
def _predict(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Predicted classes (B,) of `model` for images (B, C, H, W) in [0, 1]."""
    with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return model(images).argmax(dim=1)
