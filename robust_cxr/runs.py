"""Finished runs as the commands that read them see them (`evaluate.py`, `certify.py`, `select_strength.py`): the checkpoint
and resolved config of a run directory or checkpoint file, the data and Trainer settings they default to, and checks
that the data fit the stage."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from robust_cxr.safe_loading import load_checkpoint

if TYPE_CHECKING:
    from datamodules import ChestXRayDataModule
    from lightning_modules.stage import StageModule

MADE_BY = "python train.py --config configs/<stage>.yaml"  # what writes a finished run
DEVICE_KEYS = ("accelerator", "strategy", "devices", "num_nodes", "precision")  # the run's Trainer settings of where it runs


def find_run(run: str | Path) -> tuple[Path, dict | None]:
    """The checkpoint of `run` (a run directory: its `checkpoints/best.ckpt`; or a checkpoint file) and the run's resolved
    config (`config.yaml` of the run directory, or two folders above the checkpoint), or None if there is none."""
    path = Path(run)
    if path.is_dir():
        checkpoint, config = path / "checkpoints" / "best.ckpt", path / "config.yaml"
        missing = [str(file) for file in (checkpoint, config) if not file.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{path} is not a finished run directory: {' and '.join(missing)} missing. Give the directory a `{MADE_BY}` run "
                "wrote (--run_dir), or the path of a checkpoint file."
            )
    elif path.is_file():
        checkpoint, config = path, path.parent.parent / "config.yaml"
    else:
        raise FileNotFoundError(f"{path} does not exist; give a run directory (with config.yaml and checkpoints/best.ckpt) or a checkpoint file.")
    return checkpoint, yaml.safe_load(config.read_text()) if config.is_file() else None


def run_directory(checkpoint: Path) -> Path:
    """The run directory of `checkpoint` (two folders up from ``<run>/checkpoints/<file>``, else its own folder)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def run_defaults(checkpoint: Path, config: dict | None, trainer_keys: tuple[str, ...] = DEVICE_KEYS) -> dict:
    """Parser defaults from the run: its data settings (the config's, else those stored in the checkpoint) and the
    `trainer_keys` of its Trainer's settings."""
    if config is None:
        data = load_checkpoint(checkpoint, mmap=True).get("datamodule_hyper_parameters")
        if data is None:
            raise ValueError(f"{checkpoint} holds no data settings and has no run config.yaml two folders up: give its run directory.")
        return {"data": dict(data)}
    trainer = {key: value for key, value in config.get("trainer", {}).items() if key in trainer_keys}
    return {"data": config["data"], **{f"trainer.{key}": value for key, value in trainer.items()}}


def check_fits(hyperparameters: dict, checkpoint: str | Path, class_names: list[str] | None = None, num_classes: int | None = None,
               in_chans: int | None = None, image_size: int | None = None) -> None:
    """Raises ValueError when the stage of `checkpoint` (its `hyperparameters`) was trained on other classes, channels or
    image size than those given (None: not checked), naming every difference and the fix."""
    expected = dict(class_names=None if class_names is None else list(class_names), num_classes=num_classes, in_chans=in_chans,
                    image_size=image_size)
    stored = {name: hyperparameters.get(name) for name in expected}
    stored["class_names"] = None if stored["class_names"] is None else list(stored["class_names"])
    differing = [name for name, value in expected.items() if value is not None and stored[name] is not None and stored[name] != value]
    if differing:
        found = "; ".join(f"{name}: {stored[name]!r} in the checkpoint, {expected[name]!r} here" for name in differing)
        fixes = {"in_chans": f"--data.channels {stored['in_chans']}", "image_size": f"--data.image_size {stored['image_size']}",
                 "class_names": f"data of the classes {stored['class_names']}", "num_classes": f"data of {stored['num_classes']} classes"}
        if "class_names" in differing and "num_classes" in differing:
            differing.remove("num_classes")
        raise ValueError(f"{checkpoint} was trained on other data ({found}): use a checkpoint trained on this data, or run with "
                         + " and ".join(fixes[name] for name in differing) + ".")


def check_data_fits(stage: StageModule, data: ChestXRayDataModule, checkpoint: Path) -> None:
    """Raises ValueError when `data`'s classes, image size or channels differ from those the stage was trained on."""
    check_fits(stage.hparams, checkpoint, class_names=list(data.class_names), in_chans=data.hparams.channels, image_size=data.hparams.image_size)


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at `path`, in hex."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upstream_sha256(hyperparameters: dict) -> dict[str, str]:
    """The SHA-256 of every earlier stage's file a stage reads (its hyperparameters ending in ``_ckpt`` or ``_dir`` that
    name an existing file or folder, e.g. the purifier export), by hyperparameter name: a folder's digest covers each of
    its files, by relative path and content. A resumed evaluation checks them, since the stage loads them anew."""
    digests = {}
    for name, value in sorted(hyperparameters.items()):
        path = Path(value) if isinstance(value, str) and name.endswith(("_ckpt", "_dir")) else None
        if path is None or not path.exists():
            continue
        files = sorted(file for file in path.rglob("*") if file.is_file()) if path.is_dir() else [path]
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{file_sha256(file)}\n".encode())
        digests[name] = digest.hexdigest()
    return digests
