"""Adversarial training: attacks crafted on the fly on each DDP rank's own training batch.

At `setup` the callback wraps `on_after_batch_transfer` (the DataModule's or the LightningModule's, whichever Lightning
calls), which runs on each rank's batch after it reaches the device, outside the DDP forward and outside autocast. There
it attacks the first `train_fraction` of the batch as the stage's protocol says (`StageModule.adversarial_training_attack`,
following `adversarial_training_source`): the attacked images replace the clean ones (PGD-AT) or go beside them as
``adversarial_image`` (TRADES, robust distillation, a defense that learns from attacks). A random source (a purifier
in front of the model) may be followed on one draw per step: a stochastic gradient is fine for training, unlike for
evaluation. Attacks never write parameter ``.grad`` (see `robust_cxr.attacks.attacking`).
"""

from __future__ import annotations

import random
from dataclasses import replace

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden

from robust_cxr.attacks import GRADIENT_METHODS, AttackSpec, craft_adversarial, is_stochastic


class AdversarialTraining(Callback):
    """Replaces or pairs part of every training batch with attacked images.

    Args:
        train_attack: the attack (white-box against the stage's `adversarial_training_source()`); None trains on clean
            images only.
        train_attack_mix: instead of `train_attack`, attacks of which each training step draws one (seeded by the step,
            the same on every rank), e.g. several methods and eps for a detector.
        train_fraction: share of each training batch attacked (0..1).
        train_eps_warmup_epochs: ramp the training eps linearly from 0 to the attack's eps over this many epochs;
            from-scratch adversarial training at full eps can collapse to a constant prediction.
        trades_beta: train with TRADES (CE on clean + beta * KL(clean || adversarial)) instead of PGD-AT, for stages whose
            task has a TRADES objective (`Task.trades_loss`); the training attack then ascends that KL.
        seed: seeds the attacks' random starts (by step and image index) and the mix's draws.
    """

    def __init__(self, train_attack: AttackSpec | None = None, train_attack_mix: list[AttackSpec] | None = None, train_fraction: float = 0.5,
                 train_eps_warmup_epochs: float = 0.0, trades_beta: float | None = None, seed: int = 0):
        if not 0.0 <= train_fraction <= 1.0:
            raise ValueError(f"train_fraction must lie in [0, 1], got {train_fraction}.")
        if train_attack is not None and train_attack_mix:
            raise ValueError("Set train_attack or train_attack_mix, not both.")
        train_attacks = [train_attack] if train_attack is not None else list(train_attack_mix or [])
        if trades_beta is not None and any(spec.method not in GRADIENT_METHODS for spec in train_attacks):
            raise ValueError(f"TRADES ascends a KL loss: training attacks must be among {GRADIENT_METHODS}, got {[s.method for s in train_attacks]}.")
        self.train_attacks = train_attacks
        self.train_fraction = train_fraction
        self.train_eps_warmup_epochs = train_eps_warmup_epochs
        self.trades_beta = trades_beta
        self.seed = seed
        self._hook_owner: L.LightningModule | L.LightningDataModule | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not self.train_attacks:
            return
        if pl_module.task is None:
            raise ValueError(f"{type(pl_module).__name__} has no task to attack: leave adversarial.train_attack and train_attack_mix unset.")
        for spec in self.train_attacks:
            pl_module.task.check_attack(spec)
        if stage != TrainerFn.FITTING.value:
            return
        pl_module.check_adversarial_training(self.trades_beta)
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
        super().teardown(trainer, pl_module, stage)
        if self._hook_owner is not None:
            self._hook_owner.__dict__.pop("on_after_batch_transfer", None)
            self._hook_owner = None

    def _adversarial_training_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict) -> dict:
        count = round(self.train_fraction * len(batch["image"]))
        spec = self._scheduled_train_attack(trainer)
        if count == 0 or spec is None:
            return batch
        plan = pl_module.adversarial_training_attack(batch, count, spec, self.trades_beta)
        batch, source = plan.batch, pl_module.adversarial_training_source()
        # bf16 under bf16 training, but fp32 through a random defense (a purifier), whose small noise scales bf16 would lose.
        dtype = torch.bfloat16 if str(trainer.precision).startswith("bf16") and not is_stochastic(source) else None
        adversarial = craft_adversarial(
            spec, source, batch["image"][:count], plan.targets, loss_fn=plan.loss, num_classes=pl_module.task.num_classes,
            keys=batch["index"][:count] if "index" in batch else None, seed=self.seed + 1 + trainer.global_step, autocast_dtype=dtype,
            one_draw_allowed=True,
        )
        if plan.paired:
            return {**batch, "adversarial_image": adversarial, **plan.extras}
        return {**batch, "image": torch.cat([adversarial, batch["image"][count:]]), **plan.extras}

    def _scheduled_train_attack(self, trainer: L.Trainer) -> AttackSpec | None:
        """This step's training attack (drawn from the mix, if any) at its point of the eps warmup; None while its eps is
        still 0."""
        spec = self.train_attacks[random.Random(self.seed + trainer.global_step).randrange(len(self.train_attacks))]
        if self.train_eps_warmup_epochs <= 0:
            return spec
        epochs_done = trainer.global_step * trainer.accumulate_grad_batches / max(1, trainer.num_training_batches)
        scale = min(1.0, epochs_done / self.train_eps_warmup_epochs)
        return replace(spec, eps=spec.eps * scale) if scale > 0 else None


def _batch_hook_owner(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule | L.LightningDataModule:
    """Whose `on_after_batch_transfer` Lightning calls: the DataModule's when it defines one or the model does not."""
    datamodule = trainer.datamodule
    hook = "on_after_batch_transfer"
    if datamodule is not None and (is_overridden(hook, datamodule) or not is_overridden(hook, pl_module)):
        return datamodule
    return pl_module
