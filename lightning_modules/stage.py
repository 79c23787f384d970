"""What every trained stage shares: frozen helper modules, and checkpoints that name their own class."""

from __future__ import annotations

import contextvars
import importlib
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from robust_cxr.metrics import LogitsAndLabels, threshold_for_false_positive_rate
from robust_cxr.safe_loading import load_checkpoint, untrusted_checkpoint, weights_only

STAGE_PACKAGE = "lightning_modules"  # the package `load_stage_module` imports the stage class a checkpoint names from

MODEL_INPUT_KEYS = ("image", "adversarial_image")  # the entries of a training batch that are the model's inputs


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
        if name not in self._frozen_names:  # registering a name again replaces its module
            self._frozen_names.append(name)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for name in self._frozen_names:
            getattr(self, name)._apply(fn, *args, **kwargs)
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"


class ExportingDenoiserStage(StageModule):
    """A stage that trains a denoiser and exports it as a purifier folder (the diffusion purifier, NIM).

    Validation and test noise each batch with noise fixed per batch index (`evaluation_metrics`), so epochs compare on
    equal terms, and log ``{stage}/<name>`` of ``val_metrics`` / ``test_metrics`` (`MeanMetric`s in a ModuleDict; the
    ``*_noisy`` ones off the progress bar). At the end of `fit`, rank 0 writes `export` to ``<run dir>/<export_dir>``.
    """

    def update_evaluation_metrics(self, images: torch.Tensor, generator: torch.Generator, metrics: nn.ModuleDict) -> None:
        """Updates `metrics` for clean images (B, C, S, S) in [0, 1], drawing all noise from `generator`."""
        raise NotImplementedError

    def export(self, directory: Path) -> None:
        """Writes the trained denoiser to `directory`, the folder later stages load as a purifier."""
        raise NotImplementedError

    def _evaluation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, metrics: nn.ModuleDict, stage: str) -> None:
        images = batch["image"]
        self.update_evaluation_metrics(images, torch.Generator(images.device).manual_seed(batch_idx), metrics)
        for name, metric in metrics.items():
            self.log(f"{stage}/{name}", metric, prog_bar=not name.endswith("_noisy"))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, self.val_metrics, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, self.test_metrics, "test")

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            directory = Path(self.trainer.default_root_dir) / self.hparams.export_dir
            self.export(directory)
            rank_zero_info(f"Exported {type(self).__name__}'s denoiser to {directory}")


def calibrate_detector_threshold(stage: L.LightningModule, clean_scores: LogitsAndLabels, threshold: torch.Tensor,
                                 false_positive_rate: float, name: str) -> None:
    """At a validation epoch's end: sets the 0-d `threshold` buffer to the score that at most `false_positive_rate` of
    the epoch's clean validation scores (N, 1) in `clean_scores` (gathered over ranks) exceed, resets them and logs the
    threshold as `name`. Does nothing when no scores were collected."""
    if clean_scores.update_count == 0:
        return
    scores, _ = clean_scores.compute()
    clean_scores.reset()
    threshold.fill_(threshold_for_false_positive_rate(scores[:, 0], false_positive_rate))
    stage.log(name, threshold, sync_dist=True)


def load_stage_module(checkpoint_path: str | Path, made_by: str, kind: type[StageModule] = StageModule, kind_name: str = "robust-cxr") -> StageModule:
    """The stage module saved in `checkpoint_path`, on the CPU, frozen, in eval mode.

    `checkpoint_path` is a checkpoint file or a run directory, whose `checkpoints/best.ckpt` is read. `made_by` is the
    command that writes such a checkpoint, quoted in the errors when the file is missing or holds a stage that is no
    `kind` (called `kind_name` in that error). The file is read without unpickling code (`robust_cxr.safe_loading`).
    """
    path = Path(checkpoint_path)
    if path.is_dir():
        path = path / "checkpoints" / "best.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist. Make it with `{made_by}`, or pass the path of another checkpoint.")
    checkpoint = load_checkpoint(path, mmap=True)
    if "module_class" not in checkpoint:
        raise ValueError(f"{path} was not written by a robust-cxr stage (it has no 'module_class' entry).")
    module_path, class_name = checkpoint["module_class"].rsplit(".", 1)
    if weights_only() and module_path.split(".")[0] != STAGE_PACKAGE:
        raise untrusted_checkpoint(path, f"it names the stage class {checkpoint['module_class']}, outside {STAGE_PACKAGE}, and "
                                         "importing its module could run any code")
    module_class = getattr(importlib.import_module(module_path), class_name)
    if not (isinstance(module_class, type) and issubclass(module_class, kind)):
        raise ValueError(f"{checkpoint_path} holds a {class_name} stage, not a {kind_name} stage; pass a {kind_name} stage's checkpoint "
                         f"(made with `{made_by}`).")
    # In a fresh context: inside a stage that LightningCLI instantiates, `save_hyperparameters` would otherwise take that
    # stage's config as the loaded module's hparams. The file passed `load_checkpoint` above: it loads with weights_only.
    module = contextvars.Context().run(module_class.load_from_checkpoint, path, map_location="cpu", weights_only=weights_only())
    return module.eval().requires_grad_(False)
