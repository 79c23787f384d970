"""What every trained stage shares: frozen helper modules, and checkpoints that name their own class."""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning as L
import torch
from torch import nn


class StageModule(L.LightningModule):
    """A LightningModule whose checkpoints record their class (``module_class``), so `load_stage_module` rebuilds any
    stage from its file alone, and which can hold frozen modules of earlier stages (`register_frozen`)."""

    def __init__(self) -> None:
        super().__init__()
        self._frozen_names: list[str] = []

    def register_frozen(self, name: str, module: nn.Module) -> None:
        """Makes `module` available as ``self.<name>``: frozen, always in eval mode, and kept out of the
        state dict, the optimizer and DDP (it is not a registered submodule), but moved with this module."""
        module.eval().requires_grad_(False)
        self.__dict__[name] = module
        self._frozen_names.append(name)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for name in self._frozen_names:
            getattr(self, name)._apply(fn, *args, **kwargs)
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"


def load_stage_module(checkpoint_path: str | Path, made_by: str) -> StageModule:
    """The stage module saved in `checkpoint_path`, on the CPU, frozen, in eval mode.

    `checkpoint_path` is a checkpoint file or a run directory, whose `checkpoints/best.ckpt` is read. `made_by` is the
    command that writes such a checkpoint, quoted in the error when the file is missing.
    """
    path = Path(checkpoint_path)
    if path.is_dir():
        path = path / "checkpoints" / "best.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist. Make it with `{made_by}`, or pass the path of another checkpoint.")
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if "module_class" not in checkpoint:
        raise ValueError(f"{path} was not written by a robust-cxr stage (it has no 'module_class' entry).")
    module_path, class_name = checkpoint["module_class"].rsplit(".", 1)
    module_class = getattr(importlib.import_module(module_path), class_name)
    module = module_class.load_from_checkpoint(path, map_location="cpu", weights_only=False)  # our own files, with hyperparameter objects
    return module.eval().requires_grad_(False)
