"""What model and data a run's checkpoints belong to, so that a resume continues only its own run."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from robust_cxr.safe_loading import load_checkpoint

RUN_IDENTITY_KEY = "run_identity"  # in every checkpoint: what model and data it belongs to


class RunIdentity(L.Callback):
    """Stores `identity` (see `run_identity`) in every checkpoint, so that a resume can check it continues this run."""

    def __init__(self, identity: dict):
        self.identity = identity

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_IDENTITY_KEY] = self.identity


def run_identity(model: L.LightningModule, datamodule: L.LightningDataModule) -> dict:
    """What a run's checkpoints belong to: the class of `model` and the data of `datamodule` (a `ChestXRayDataModule`:
    source, root, seed, split and subsampling, classes, size, degradation, generated training data)."""
    data = datamodule.hparams
    degradation = datamodule.degradation
    return dict(
        model=f"{type(model).__module__}.{type(model).__qualname__}",
        data_source=data.source,
        data_root=str(Path(data.root).resolve()) if data.root else None,
        data_seed=data.seed,
        data_split=list(data.split),
        synthetic_samples=data.synthetic_samples if data.source == "synthetic" else None,
        class_ratio=dict(data.class_ratio) if data.class_ratio else None,
        class_names=list(datamodule.class_names),
        image_size=data.image_size,
        channels=data.channels,
        degradation=asdict(degradation) if degradation is not None else None,
        generated=str(Path(data.generated).resolve()) if data.get("generated") else None,
        generated_ratio=data.generated_ratio if data.get("generated") else None,
    )


def check_resumes_this_run(checkpoint_path: str, identity: dict) -> None:
    """Raises ValueError when the checkpoint to resume from was written by a run of another model or other data."""
    stored = load_checkpoint(checkpoint_path, mmap=True).get(RUN_IDENTITY_KEY)
    if stored is None:
        rank_zero_warn(f"{checkpoint_path} predates run identities: not checking that it belongs to this run's model and data.")
        return
    differences = [f"{key}: {stored.get(key)!r} in the checkpoint, {value!r} in this run" for key, value in identity.items() if stored.get(key) != value]
    if differences:
        raise ValueError(
            f"Not resuming from {checkpoint_path}: it belongs to another run (" + "; ".join(differences) + "). Its run directory "
            "is left as it is. Start a fresh run with --resume never (a new numbered run directory beside it) or another --run_dir."
        )
