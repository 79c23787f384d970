"""Checkpoints load without running what they pickled.

Every checkpoint is read with ``torch.load(weights_only=True)``, which rebuilds tensors, containers and primitive values
only, plus the project's own hyperparameter types (`SAFE_HYPERPARAMETER_TYPES`, allowed once, here). Checkpoints that
train.py writes need nothing more: LightningCLI stores hyperparameters as plain values. A stage or DataModule built in
Python with an `Augmentation` or a `Degradation` object stores that object, hence the allow-list. It admits each type by its
module path and by its former one, in `FORMER_HYPERPARAMETER_MODULE`, which older checkpoints name. A file that needs any
other global is refused with `UntrustedCheckpointError`, unless the environment variable `TRUST_CHECKPOINTS_ENV` is
``1``: then every load unpickles in full (``weights_only=False``), for trusted files only.

The exports load without unpickling code either: a diffusion purifier folder holds safetensors (diffusers reads a
legacy ``.bin`` with ``weights_only=True``), a NIM folder safetensors, and export.py writes ONNX.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from datamodules.transforms import Augmentation, Degradation

TRUST_CHECKPOINTS_ENV = "ROBUST_CXR_TRUST_CHECKPOINTS"
SAFE_HYPERPARAMETER_TYPES = (Augmentation, Degradation)
FORMER_HYPERPARAMETER_MODULE = "datamodules.chest_xray"

torch.serialization.add_safe_globals(
    [*SAFE_HYPERPARAMETER_TYPES, *((kind, f"{FORMER_HYPERPARAMETER_MODULE}.{kind.__qualname__}") for kind in SAFE_HYPERPARAMETER_TYPES)]
)


class UntrustedCheckpointError(ValueError):
    """A checkpoint refused because loading it could run code: it pickles more than tensors, plain values and
    `SAFE_HYPERPARAMETER_TYPES`, or names a stage class outside the project's stages (`load_stage_module`)."""


def weights_only() -> bool:
    """The ``weights_only`` of every checkpoint load: True unless `TRUST_CHECKPOINTS_ENV` is ``1``."""
    return os.environ.get(TRUST_CHECKPOINTS_ENV) != "1"


def load_checkpoint(path: str | Path, **options: Any) -> dict[str, Any]:
    """The checkpoint dict in `path`, on the CPU, loaded with `weights_only()`; `options` go to `torch.load` (``mmap``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only(), **options)
    except pickle.UnpicklingError as error:
        raise untrusted_checkpoint(path, f"it pickles {_unsafe_globals(path)}, beyond tensors, plain values and this project's "
                                         "hyperparameter types, and unpickling them could run any code") from error


def untrusted_checkpoint(path: str | Path, reason: str) -> UntrustedCheckpointError:
    """The error refusing `path` because of `reason` (what loading it would run), with the opt-in for trusted files."""
    return UntrustedCheckpointError(
        f"Not loading {path}: {reason}. If you trust the file's origin, prefix the command with {TRUST_CHECKPOINTS_ENV}=1 "
        "(or set that environment variable) to load it in full."
    )


def _unsafe_globals(path: str | Path) -> str:
    try:
        return ", ".join(sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
    except ValueError:  # torch's legacy (non-zip) format, which it cannot scan without unpickling
        return "objects"
