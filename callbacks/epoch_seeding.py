"""Per-epoch seeding, so that a run resumed from an epoch-end checkpoint trains as an uninterrupted one would."""

from __future__ import annotations

import os
import random

import lightning as L
import numpy as np
import torch


class EpochSeeding(L.Callback):
    """At the start of every training epoch, seeds torch, numpy and `random` from (the run's seed, epoch).

    Lightning seeds once, when the process starts, and a checkpoint does not hold the random state; so without this a
    resumed run would draw epoch 0's shuffling, augmentation, dropout and purification t* again. The epoch starts
    before the training DataLoader draws its shuffling order and its workers' seeds, so those follow too.
    """

    EPOCH_STRIDE = 1_000_003  # epochs' seeds stay apart from the seeds of neighbouring runs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # what seed_everything was given
        seed = (run_seed + self.EPOCH_STRIDE * (trainer.current_epoch + 1)) % 2**32
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
