"""The stage protocol: what every trained stage declares to the callbacks and commands, with the defaults most stages
keep; frozen modules of earlier stages; checkpoints that name their own class."""

from __future__ import annotations

import contextvars
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from lightning_modules.optimization import adamw_warmup_cosine
from robust_cxr.attacks import AttackSpec, LossFn, attacking
from robust_cxr.metrics import LogitsAndLabels, threshold_for_false_positive_rate
from robust_cxr.runs import check_fits
from robust_cxr.safe_loading import load_checkpoint, untrusted_checkpoint, weights_only
from robust_cxr.tasks import Task
from robust_cxr.threat import DefendedModel

STAGE_PACKAGE = "lightning_modules"  # the package `load_stage_module` imports the stage class a checkpoint names from

MODEL_INPUT_KEYS = ("image", "adversarial_image")  # the entries of a training batch that are the model's inputs


class StepLoss(NamedTuple):
    """A training step's loss (0-d) and the model's outputs (B, ...) for ``batch["image"]`` (None where the step has none
    to report, e.g. a detector's)."""

    loss: torch.Tensor
    outputs: torch.Tensor | None = None


@dataclass
class TrainingAttack:
    """What a training attack on the first `count` images of a batch ascends, and where its images go
    (`StageModule.adversarial_training_attack`).

    Attributes:
        batch: the batch, with whatever the stage computed on the way (e.g. the teacher's logits), kept by the attacked batch.
        targets: what `loss` takes for those images (labels, clean probabilities, masks, ...).
        loss: the per-image loss the attack ascends; None: the attack method's own.
        paired: the adversarial images go beside the clean batch as ``adversarial_image`` (TRADES, robust distillation, a
            defense that learns from attacks); otherwise they replace the first `count` images (PGD-AT).
        extras: entries added to the attacked batch (e.g. ``trades_beta``).
    """

    batch: dict[str, Any]
    targets: torch.Tensor
    loss: LossFn | None = None
    paired: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


class StageModule(L.LightningModule):
    """A trained stage: what the adversarial callbacks, the report and the commands know of it, with defaults.

    The protocol:
    - `task`: what its model maps [0, 1] images to and how they are attacked and scored (`robust_cxr.tasks`); None for a
      stage whose model is not attacked (the purifier and NIM stages);
    - `deployed_model` and `robustness_subjects`: the report's subjects (`DefendedModel`), by default the model alone;
    - `adversarial_training_source`, `check_adversarial_training` and `adversarial_training_attack`: what training
      attacks follow and ascend (by default the model, the task's objective, TRADES where the task has one);
    - `training_loss`: a training batch's `StepLoss`;
    - `configure_optimizers`: AdamW with warmup and cosine decay over `optimized_parameters`, from the ``lr``,
      ``weight_decay`` and ``warmup_epochs`` hyperparameters.

    Its checkpoints record its class (``module_class``), so `load_stage_module` rebuilds any stage from its file alone.
    The modules of earlier stages it uses are frozen and never saved with it (`register_frozen`, `upstream_submodules`):
    its checkpoint names their files, which it loads again.
    """

    report_name = "model"  # the model's name in report rows
    # Submodules (dotted names) that the constructor loads from an earlier stage's checkpoint and that stay frozen inside the
    # trained model (SEViT's ViT): like `register_frozen` modules, they are not saved in this stage's checkpoints but
    # loaded again from the earlier stage's file.
    upstream_submodules: tuple[str, ...] = ()

    def __init__(self, num_classes: int = 2, class_names: list[str] | None = None, in_chans: int = 1, image_size: int = 64) -> None:
        """Args: num_classes, class_names, in_chans, image_size: the data's classes, channels and image side, linked from the
        DataModule by the CLI and saved with every stage (a stage that does not use them keeps what it was trained on).
        Every stage's arguments become its hyperparameters (``self.hparams``)."""
        super().__init__()
        self._frozen_names: list[str] = []
        self.save_hyperparameters()

    @property
    def task(self) -> Task | None:
        return None

    def deployed_model(self) -> DefendedModel:
        """What the stage deploys: `self.model` alone."""
        return DefendedModel.alone(self.report_name, self.model)

    def robustness_subjects(self) -> list[DefendedModel]:
        """The subjects the robustness evaluation attacks and reports: the deployed model."""
        return [self.deployed_model()]

    def adversarial_training_source(self) -> nn.Module:
        """The module training attacks follow: the model being trained."""
        return self.model

    def check_adversarial_training(self, trades_beta: float | None) -> None:
        """Raises a ValueError naming the fix where this stage cannot train on the callback's attacks as configured."""
        if trades_beta is not None and self.task.trades_loss is None:
            raise ValueError(f"TRADES compares class probabilities; {type(self).__name__} is a {self.task.name} stage: set trades_beta to null.")

    def adversarial_training_attack(self, batch: dict[str, Any], count: int, spec: AttackSpec, trades_beta: float | None) -> TrainingAttack:
        """What the training attack `spec` on the first `count` images of `batch` ascends: with `trades_beta`, TRADES'
        KL from the source's clean predictions (adversarial images paired with the clean ones); otherwise the task's
        objective against its targets (adversarial images replace the clean ones)."""
        if trades_beta is None:
            targets, loss = self.task.attack_objective(spec, self.task.targets(batch)[:count])
            return TrainingAttack(batch, targets, loss)
        source = self.adversarial_training_source()
        with attacking(source), torch.no_grad():
            clean_outputs = source(batch["image"][:count])
        return TrainingAttack(batch, self.task.trades_targets(clean_outputs), self.task.trades_loss, paired=True, extras={"trades_beta": trades_beta})

    def training_loss(self, batch: dict[str, torch.Tensor]) -> StepLoss:
        """The loss of a training batch (after the adversarial callback's changes) and the model's outputs for its images."""
        raise NotImplementedError

    def optimized_parameters(self):
        """What the optimizer trains: the model's parameters (or parameter groups)."""
        return self.model.parameters()

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self, self.optimized_parameters(), hp.lr, hp.weight_decay, hp.warmup_epochs)

    def log_means(self, stage: str, metrics: nn.ModuleDict, values: dict[str, torch.Tensor], prog_bar: bool = False) -> None:
        """Adds per-image `values` (name -> (B,)) to the `mean_metrics` of the same names and logs each as ``{stage}/<name>``
        (on the progress bar with `prog_bar`, but for the ``*_noisy`` and ``*_degraded`` references)."""
        for name, value in values.items():
            metrics[name].update(value)
            self.log(f"{stage}/{name}", metrics[name], prog_bar=prog_bar and not name.endswith(("_noisy", "_degraded")))

    @property
    def data_settings(self) -> dict[str, Any]:
        """The data this stage trains on: ``class_names``, ``num_classes``, ``in_chans``, ``image_size``."""
        return {name: self.hparams[name] for name in ("class_names", "num_classes", "in_chans", "image_size")}

    def load_upstream(self, checkpoint: str | Path, made_by: str, kind: type[StageModule] | None = None, kind_name: str = "robust-cxr") -> StageModule:
        """The earlier stage of `checkpoint` (a `kind`, by default any stage), frozen, checked to have been trained on this
        stage's data (`load_stage_module`): the one way a stage loads the stage it builds on."""
        return load_stage_module(checkpoint, made_by, kind or StageModule, kind_name, **self.data_settings)

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
        for key in [key for key in checkpoint["state_dict"] if key.startswith(self._upstream_prefixes())]:
            del checkpoint["state_dict"][key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The earlier stages' weights come from their own files, which the constructor has just loaded.
        checkpoint["state_dict"].update({key: value for key, value in self.state_dict().items() if key.startswith(self._upstream_prefixes())})

    def _upstream_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{name}." for name in self.upstream_submodules)


def mean_metrics(*names: str) -> nn.ModuleDict:
    """One `MeanMetric` per name: the running means, synced over DDP ranks, of per-image figures (`StageModule.log_means`)."""
    return nn.ModuleDict({name: MeanMetric() for name in names})


class ExportingDenoiserStage(StageModule):
    """A stage that trains a denoiser and exports it as a purifier folder (the diffusion purifier, NIM).

    Validation and test noise each batch with noise fixed per batch index (`evaluation_values`), so epochs compare on
    equal terms, and log ``{stage}/<name>`` of ``val_metrics`` / ``test_metrics`` (`mean_metrics`; the ``*_noisy`` ones
    off the progress bar). At the end of `fit`, rank 0 writes `export` to ``<run dir>/<export_dir>``.
    """

    def __init__(self, export_dir: str = "export", **data: Any) -> None:
        """Args: export_dir: the export folder, relative to the run directory; data: see `StageModule`."""
        super().__init__(**data)

    def evaluation_values(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per-image figures (name -> (B,)) of ``val_metrics`` for clean images (B, C, S, S) in [0, 1], drawing all noise
        from `generator`."""
        raise NotImplementedError

    def export(self, directory: Path) -> None:
        """Writes the trained denoiser to `directory`, the folder later stages load as a purifier."""
        raise NotImplementedError

    def _evaluation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, metrics: nn.ModuleDict, stage: str) -> None:
        images = batch["image"]
        self.log_means(stage, metrics, self.evaluation_values(images, torch.Generator(images.device).manual_seed(batch_idx)), prog_bar=True)

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


def load_stage_module(checkpoint_path: str | Path, made_by: str, kind: type[StageModule] = StageModule, kind_name: str = "robust-cxr",
                      **data: object) -> StageModule:
    """The stage module saved in `checkpoint_path`, on the CPU, frozen, in eval mode: how a stage loads an earlier one
    (a teacher, a target, a detector) and a command loads a run.

    `checkpoint_path` is a checkpoint file or a run directory, whose `checkpoints/best.ckpt` is read. `made_by` is the
    command that writes such a checkpoint, quoted in the errors when the file is missing or holds a stage that is no
    `kind` (called `kind_name` in that error). `data` (``class_names``, ``num_classes``, ``in_chans``, ``image_size``) are
    the data's, which the stage must have been trained on (`check_fits`). The file is read without unpickling code
    (`robust_cxr.safe_loading`).
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
    check_fits(module.hparams, checkpoint_path, **data)
    return module.eval().requires_grad_(False)
