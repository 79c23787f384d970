"""Shared test helpers: tiny configs derived from the real ones, paths to the optional shared data."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["WANDB_MODE"] = "disabled"

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"
PNEUMONIA_FOLDER = SHARED_DATA / "chest_xray_pneumonia_128"
PNEUMONIA_NPZ = SHARED_DATA / "pneumoniamnist.npz"

requires_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")

TEACHER_RUN_EPOCHS = 4  # the session's trained teacher: about 0.84 clean test accuracy, every attack of its config well below
TINY_SUBSET = 24  # images of an attack's subset (`max_images`) in a shrunk config: fewer than any tiny test split
TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}  # for the default hybrid ViT-Tiny
TINY_NIM = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
TINY_UNET = {
    "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "add_attention": False,
    "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
}

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny tensors: a second costs more than it saves, far more on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shrink_config(config: str | Path, directory: Path, max_steps: int = 2, keep_model: bool = False, **data: object) -> Path:
    """A copy of a real config made tiny: small ViT, small synthetic data, attacks capped at `max_steps` and their
    subsets at `TINY_SUBSET` images.

    Keyword arguments override `data` settings; `keep_model` keeps the config's own model. Returns the YAML path.
    """
    settings = yaml.safe_load(Path(config).read_text())
    settings["data"].update(dict(image_size=32, channels=1, synthetic_samples=240, batch_size=32, num_workers=0), **data)
    init_args = settings["model"]["init_args"]
    if "model_name" in init_args and not keep_model:
        init_args.update(model_name="vit_tiny_r_s16_p8_224", model_kwargs=dict(TINY_VIT), pretrained_weights=None)
    if "unet" in init_args and not keep_model:
        init_args["unet"] = dict(TINY_UNET)
    settings["trainer"].update(accelerator="cpu", devices=1, strategy="auto", precision="32-true", enable_progress_bar=False)
    adversarial = settings.get("adversarial", {})
    for spec in adversarial.get("attacks", []) + [adversarial.get("train_attack") or {}]:
        if "steps" in spec:
            spec["steps"] = min(spec["steps"], max_steps)
        if spec.get("max_images"):
            spec["max_images"] = min(spec["max_images"], TINY_SUBSET)
    path = directory / f"tiny_{Path(config).name}"
    path.write_text(yaml.safe_dump(settings))
    return path


def without_nan(metrics: dict[str, float]) -> dict[str, float | None]:
    """`metrics` with NaN (a robustness figure with nothing to measure, e.g. no image fooled) as None, so that two
    runs' metrics compare with `==` (NaN equals nothing, itself included)."""
    return {name: None if math.isnan(value) else value for name, value in metrics.items()}


def command_line(monkeypatch: pytest.MonkeyPatch, main, script: str, *arguments: str) -> str:
    """Runs a script's command line (`run_cli` around its `main`) in-process on `arguments`, as ``python script`` would;
    returns the message it exits with ("" on success)."""
    from robust_cxr.cli_errors import run_cli

    monkeypatch.setattr(sys, "argv", [script, *arguments])
    try:
        run_cli(main)
    except SystemExit as exited:
        return str(exited.code or "")
    return ""


def run_train(config: Path, run_dir: Path, *overrides: str) -> dict[str, float]:
    """Runs `train.main` in-process on `config` with the run directory and extra CLI overrides."""
    from train import main

    return main(["--config", str(config), "--run_dir", str(run_dir), *overrides])


def train_stages_in(directory: Path, stages: dict[str, list[str]], **shrink: object) -> dict[str, dict[str, float]]:
    """Runs `train.main` on a `shrink_config` copy (keyword arguments: its settings) of each config named in `stages`
    (``teacher`` -> configs/teacher.yaml), in order, with `directory` as the working directory and no --run_dir, so that
    each stage finds the earlier ones by its config's default paths; each with its extra CLI arguments. Returns each
    stage's test metrics."""
    from train import main

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(directory)
    try:
        return {stage: main(["--config", str(shrink_config(CONFIGS / f"{stage}.yaml", directory, **shrink)), *arguments])
                for stage, arguments in stages.items()}
    finally:
        monkeypatch.undo()


def fit_and_save(module, data, path: Path, callbacks: list | None = None, **limits: int) -> Path:
    """Fits the LightningModule `module` on the DataModule `data` on the CPU, without validation, logger or checkpoint
    callbacks, in `path`'s folder (`limits`: the Trainer's, default one epoch of 3 batches); saves its checkpoint to `path`."""
    import lightning as L

    limits = limits or dict(max_epochs=1, limit_train_batches=3)
    trainer = L.Trainer(accelerator="cpu", **limits, limit_val_batches=0, logger=False, callbacks=callbacks or [], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=path.parent)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory) -> Path:
    """The run directory of the default teacher trained briefly on 1200 phantoms, its attack suite unchanged, deciding by
    argmax: after these few steps the threshold for the config's sensitivity target costs a tenth of its clean accuracy
    (0.71 against 0.84), which the report tests need to stay well above their attacks."""
    directory = tmp_path_factory.mktemp("teacher")
    config = shrink_config(CONFIGS / "teacher.yaml", directory, max_steps=20, keep_model=True, image_size=64, synthetic_samples=1200)
    run_dir = directory / "run"
    run_train(config, run_dir, "--trainer.max_epochs", str(TEACHER_RUN_EPOCHS), "--model.init_args.target_sensitivity", "null")
    return run_dir


@pytest.fixture(scope="session")
def tiny_stage_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints of the classifier stages at 32 px: ``teacher`` (tiny hybrid ViT, 3 steps), ``student`` (SmallCNN with
    the teacher's stage but trained on the labels alone, 8 epochs: above chance) and ``purify_finetune`` (the teacher
    behind a tiny untrained purifier, 3 steps)."""
    import lightning as L
    from diffusers import DDPMScheduler, UNet2DModel

    from datamodules import ChestXRayDataModule
    from datamodules.sources import SYNTHETIC_CLASS_NAMES
    from lightning_modules import DistilledStudent, PurifyThenFinetune, TeacherClassifier
    from robust_cxr.purification import Purifier

    directory = tmp_path_factory.mktemp("stages")
    L.seed_everything(0, verbose=False)  # the same checkpoints whichever tests ran before
    data = ChestXRayDataModule(image_size=32, synthetic_samples=240, batch_size=32, num_workers=0)
    purifier_dir = directory / "purifier"
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, **TINY_UNET)
    Purifier(unet, DDPMScheduler(num_train_timesteps=100), t_star=20).save_pretrained(purifier_dir)
    common = dict(num_classes=2, class_names=list(SYNTHETIC_CLASS_NAMES), image_size=32)
    paths = {name: directory / f"{name}.ckpt" for name in ("teacher", "student", "purify_finetune")}
    fit_and_save(TeacherClassifier(model_kwargs=TINY_VIT, **common), data, paths["teacher"])
    fit_and_save(DistilledStudent(teacher_ckpt=str(paths["teacher"]), purifier_dir=None, alpha=0.0, lr=3e-3, **common), data,
                 paths["student"], max_epochs=8)
    fit_and_save(PurifyThenFinetune(teacher_ckpt=str(paths["teacher"]), purifier_dir=str(purifier_dir),
                                    purifier_settings=dict(t_star=20, steps=2), train_strength_range=(10, 20), **common), data, paths["purify_finetune"])
    return paths


@pytest.fixture(scope="session")
def tiny_defended_checkpoints(tiny_stage_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The teacher of `tiny_stage_checkpoints` behind the other defenses, at 32 px: ``purify_finetune_nim`` (fine-tuned
    3 steps behind a tiny untrained NIM denoiser deployed at sigma ~ U(0.05, 0.2)) and ``reformer`` (a tiny reformer
    trained 3 steps on FGSM images of the teacher)."""
    import lightning as L

    from callbacks import AdversarialExampleCallback
    from datamodules import ChestXRayDataModule
    from datamodules.sources import SYNTHETIC_CLASS_NAMES
    from lightning_modules import AdversarialReformer, PurifyThenFinetune
    from robust_cxr.attacks import AttackSpec
    from robust_cxr.nim import NIMPurifier, NoisyImageModel

    directory = tmp_path_factory.mktemp("defended")
    L.seed_everything(0, verbose=False)
    teacher = str(tiny_stage_checkpoints["teacher"])
    nim_dir = directory / "nim"
    NIMPurifier(NoisyImageModel(image_size=32, **TINY_NIM)).save_pretrained(nim_dir)
    common = dict(num_classes=2, class_names=list(SYNTHETIC_CLASS_NAMES), image_size=32)
    stages = {
        "purify_finetune_nim": (PurifyThenFinetune(teacher_ckpt=teacher, purifier_dir=str(nim_dir), **common,
                                                   purifier_settings=dict(sigma=dict(distribution="uniform", low=0.05, high=0.2))), []),
        "reformer": (AdversarialReformer(target_ckpt=teacher, detector_ckpt=None, decoder_channels=(8, 8, 8), lr=1e-2, **common),
                     [AdversarialExampleCallback(train_attack=AttackSpec(method="fgsm", eps=0.03), train_fraction=0.5)]),
    }
    data = ChestXRayDataModule(image_size=32, synthetic_samples=240, batch_size=32, num_workers=0)
    return {name: fit_and_save(module, data, directory / f"{name}.ckpt", callbacks) for name, (module, callbacks) in stages.items()}
