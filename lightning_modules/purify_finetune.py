"""Stage 2b: purify-then-fine-tune, a trained stage's model fine-tuned behind a frozen purifier (diffusion or NIM).

One mechanism, `FinetunedBehindPurifier`, for any stage whose network is ``self.model`` and whose `training_loss`,
`deployed_model` and `task` say the rest: the classifier (`PurifyThenFinetune`) and the restorer
(`PurifyThenFinetuneRestorer`) are that mechanism in front of their own stage class.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from lightning_modules.classifier import TEACHER_COMMAND, ImageClassifierModule
from lightning_modules.restorer import NETWORK_ARGUMENTS, RESTORER_COMMAND, Restorer
from lightning_modules.stage import MODEL_INPUT_KEYS, StageModule, StepLoss, load_stage_module
from robust_cxr.attacks import IdentityBackward
from robust_cxr.purification import PurifiedModel, load_purifier, resolve_purifier_settings
from robust_cxr.runs import check_fits
from robust_cxr.threat import DefendedModel

TrainingAttackSource = Literal["model", "pipeline", "bpda"]
LEGACY_DIFFUSION_SETTINGS = ("t_star", "method", "steps", "eta")  # arguments of their own in checkpoints older than `purifier_settings`


class FinetunedBehindPurifier:
    """Fine-tunes a trained stage's model behind a frozen purifier (the UDC and De^3 recipe); put it before the stage
    class in the bases, e.g. ``class PurifyThenFinetuneRestorer(FinetunedBehindPurifier, Restorer)``.

    The stage's ``__init__`` loads the stage to start from and calls `start_behind_purifier`: ``self.model`` becomes a
    trainable copy of the start's, the start's deployed model stays frozen as the report's baseline
    (``self.start_model``), and the purifier export stays frozen in front (``self.purifier``): the diffusion purifier
    stage's or the NIM stage's, whichever `load_purifier` finds there. Each training batch draws a purifier strength from
    `train_strength_range` (t* for diffusion, sigma for NIM), so the model learns the whole range of purification
    outputs. The adversarial callback attacks part of the batch (`adversarial_training_source`, see `training_attack`);
    every training input (`MODEL_INPUT_KEYS`) is then purified at the batch's strength before the stage's own
    `training_loss`. Validation, test and `forward` run the deployed pipeline: the
    purifier as `purifier_settings` say, then the fine-tuned model, averaged over `n_repeats` purifications, [0, 1]
    images (B, C, H, W) -> the stage's outputs (logits, restored images, ...).

    Hyperparameters it reads (the stage's arguments):
        purifier_dir: a purifier export: ``runs/purifier/export`` (diffusion: ``unet/``, ``scheduler/``) or
            ``runs/nim/export`` (NIM: ``config.json``, ``model.safetensors``).
        purifier_settings: the deployed purification, that purifier's own settings: diffusion ``{t_star, method, steps,
            eta}`` (see `Purifier`), NIM ``{sigma}`` (a number or a noise distribution, see `NIMPurifier`); those not given
            come from the export's defaults (`load_purifier`: the strength `select_strength.py` chose, if any). Or
            ``{smoothing_sigma}`` for either export: the denoiser of denoised smoothing at that sigma (Gaussian noise,
            then one denoising step; `robust_cxr.smoothing`), the classifier fine-tuned on denoised noisy images.
        n_repeats: purifications per image whose outputs are averaged at deployment.
        train_strength_range: inclusive [low, high] range of the purifier's strength for training batches: t* for
            diffusion (integers, e.g. [50, 100]), sigma in [0, 1] pixel units for NIM (De^3: [0, 0.1176], i.e. 0..30/255)
            and for denoised smoothing (above 0); None trains at the deployed strength.
        training_attack: what the training attacks follow: ``model``, the model alone (they are then purified: training
            for the gray-box threat); ``pipeline``, the purifier at the batch's strength then the model, with exact
            gradients through the differentiable purifier (training for the white-box threat; EOT as the attack's
            `eot_samples` say); ``bpda``, the same pipeline with the purifier's backward pass taken as the identity.
    """

    def start_behind_purifier(self, start: StageModule) -> None:
        """Copies `start`'s model to train, keeps `start`'s deployed model as the baseline, loads the purifier."""
        self.register_purifier(self.hparams.purifier_settings)
        strength_range = self.hparams.train_strength_range
        if strength_range is not None:
            low, high = strength_range
            if not 0 <= low <= high:
                raise ValueError(f"train_strength_range must be [low, high] with 0 <= low <= high ({self.purifier.strength_name}), got {strength_range}.")
            for strength in (low, high):  # a strength the purifier cannot take fails here, not mid-training
                self.purifier.at_strength(strength)
        self.model = copy.deepcopy(start.model).train().requires_grad_(True)
        baseline = start.deployed_model()
        self.register_frozen("start_model", baseline.undefended)
        self.start_name = baseline.model

    def register_purifier(self, settings: dict[str, Any] | None) -> None:
        """Makes the export in `purifier_dir` with `settings` over the export's defaults, differentiable (for white-box
        attacks), ``self.purifier``; the resolved settings become the `purifier_settings` hyperparameter, so that the
        checkpoint deploys the purification it was trained with even after the export's defaults change."""
        self.hparams.purifier_settings = resolve_purifier_settings(self.hparams.purifier_dir, settings)
        self.register_frozen("purifier", load_purifier(self.hparams.purifier_dir, differentiable=True, **self.hparams.purifier_settings))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The purifier then the fine-tuned model (before any operating point): [0, 1] images (B, C, H, W) -> outputs (B, ...)."""
        return PurifiedModel(self.purifier, self.model, self.hparams.n_repeats)(images)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> StepLoss:
        """The stage's training loss on the batch with its inputs purified at the batch's strength (`training_purifier`)."""
        purifier = self.training_purifier()
        with torch.no_grad():
            purified = {key: purifier(value) if key in MODEL_INPUT_KEYS else value for key, value in batch.items()}
        return super().training_loss(purified)

    def training_purifier(self, differentiable: bool = False) -> nn.Module:
        """The purifier at this training batch's strength, drawn from `train_strength_range` at the batch's first call (the
        deployed one without a range): the training attack and the training loss see the same purification."""
        strength_range = self.hparams.train_strength_range
        if strength_range is None:
            return self.purifier
        if getattr(self, "_batch_strength", None) is None:
            self._batch_strength = self.purifier.draw_strength(*strength_range)
        return self.purifier.at_strength(self._batch_strength, differentiable)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._batch_strength = None  # the next batch draws its own

    def adversarial_training_source(self) -> nn.Module:
        """What training attacks follow (`training_attack`): the model alone, or the purifier at the batch's strength then
        the model, exactly or with BPDA."""
        if self.hparams.training_attack == "model":
            return self.model
        purifier = self.training_purifier(differentiable=True)
        pipeline = PurifiedModel(purifier, self.model)
        return pipeline if self.hparams.training_attack == "pipeline" else IdentityBackward(pipeline, purifier)

    def behind_purifier(self, alone: DefendedModel) -> DefendedModel:
        """`alone` (a model without a defense) deployed behind the purifier; gray-box attacks follow `alone.undefended`."""
        return alone.behind(f"purifier/{self.purifier.label}", self.purifier, PurifiedModel(self.purifier, alone.undefended, self.hparams.n_repeats))

    def deployed_model(self) -> DefendedModel:
        """The purifier then the fine-tuned model, and the fine-tuned model alone (the stage's own deployed model)."""
        return self.behind_purifier(super().deployed_model())

    def robustness_subjects(self) -> list[DefendedModel]:
        """The starting model alone, the starting model behind the purifier, and the fine-tuned model behind it."""
        start = DefendedModel.alone(self.start_name, self.start_model)
        return [start, self.behind_purifier(start), self.deployed_model()]


class PurifyThenFinetune(FinetunedBehindPurifier, ImageClassifierModule):
    """The teacher classifier fine-tuned on purified clean and purified adversarial images (`FinetunedBehindPurifier`).

    Args:
        teacher_ckpt: checkpoint of the classifier stage to start from (its operating point too).
        purifier_dir, purifier_settings, n_repeats, train_strength_range, training_attack: see `FinetunedBehindPurifier`.
        classifier: the other arguments, see `ImageClassifierModule`; the data must be the teacher's.
    """

    report_name = "teacher_finetuned"

    def __init__(
        self,
        num_classes: int,
        teacher_ckpt: str = "runs/teacher/checkpoints/best.ckpt",
        purifier_dir: str = "runs/purifier/export",
        purifier_settings: dict[str, Any] | None = None,
        n_repeats: int = 1,
        train_strength_range: tuple[float, float] | None = None,
        training_attack: TrainingAttackSource = "model",
        lr: float = 1e-4,
        warmup_epochs: float = 0.5,
        **classifier: Any,
    ):
        # a checkpoint older than `purifier_settings` passes its diffusion settings and training range as arguments of their own
        legacy = {name: classifier.pop(name) for name in LEGACY_DIFFUSION_SETTINGS if name in classifier}
        purifier_settings = purifier_settings or legacy or None
        train_strength_range = classifier.pop("train_t_star_range", train_strength_range)
        super().__init__(num_classes, lr=lr, warmup_epochs=warmup_epochs, **classifier)
        teacher = self.load_upstream(teacher_ckpt, TEACHER_COMMAND, ImageClassifierModule, "classifier")
        self.start_behind_purifier(teacher)
        self.operating_point.offset.copy_(teacher.operating_point.offset)  # starts at the teacher's; target_sensitivity re-chooses it


class PurifyThenFinetuneRestorer(FinetunedBehindPurifier, Restorer):
    """The restorer fine-tuned on purified degraded and purified adversarial inputs (Song et al.'s UDC recipe,
    `FinetunedBehindPurifier`), with the pixel loss against the clean targets; the purifier is trained on the degraded
    inputs (configs/purifier_restore.yaml).

    Args:
        restorer_ckpt: checkpoint of the restorer stage to start from (its network settings too).
        purifier_dir, purifier_settings, n_repeats, train_strength_range, training_attack: see `FinetunedBehindPurifier`; Song et al.
            fine-tune at 50..100 diffusion steps.
        pixel_loss, ssim_weight, lr, weight_decay, warmup_epochs: see `Restorer`, whose network comes from `restorer_ckpt`.
        data: see `StageModule`; the restorer's.
    """

    report_name = "restorer_finetuned"

    def __init__(
        self,
        restorer_ckpt: str = "runs/restorer/checkpoints/best.ckpt",
        purifier_dir: str = "runs/purifier_restore/export",
        purifier_settings: dict[str, Any] | None = None,
        n_repeats: int = 1,
        train_strength_range: tuple[float, float] | None = (50, 100),
        training_attack: TrainingAttackSource = "model",
        pixel_loss: Literal["mse", "l1"] = "mse",
        ssim_weight: float = 0.0,
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 0.2,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        in_chans: int = 1,
        image_size: int = 64,
    ):
        start = load_stage_module(restorer_ckpt, RESTORER_COMMAND, Restorer, "restorer")
        super().__init__(**{name: start.hparams[name] for name in NETWORK_ARGUMENTS}, pixel_loss=pixel_loss, ssim_weight=ssim_weight, lr=lr,
                         weight_decay=weight_decay, warmup_epochs=warmup_epochs, num_classes=num_classes, class_names=class_names,
                         in_chans=in_chans, image_size=image_size)
        check_fits(start.hparams, restorer_ckpt, **self.data_settings)
        self.start_behind_purifier(start)
