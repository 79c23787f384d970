"""The loggers of a run directory: each logger's files in it, and one W&B run per directory that never asks for a login.

The functions here work on the logger configs of a parsed ``trainer.logger`` option (jsonargparse namespaces with
``class_path`` and ``init_args``), before the loggers are instantiated, so that `train.py` and `evaluate.py` place
their loggers the same way.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

WANDB_RUN_ID_FILE = "wandb_run_id"  # in the run directory: one W&B run per run directory, across resumes and requeues


def logger_configs(option: object) -> list:
    """The logger configs of a parsed ``trainer.logger`` option (one config, a list of them, or a bool) as a list."""
    return option if isinstance(option, list) else [option]


def is_wandb_config(logger: object) -> bool:
    """Whether the logger config `logger` is of a `WandbLogger`."""
    return str(getattr(logger, "class_path", "")).endswith("WandbLogger")


def configure_loggers(loggers: list, directory: Path) -> None:
    """Points the logger configs `loggers` at `directory`: the `save_dir` of each that has one, and for the WandbLogger
    configs the W&B mode (`wandb_mode`), their run id (`wandb_run_id`) unless they name one, and their name unless they
    have one (default: the directory's name)."""
    for logger in loggers:
        if hasattr(logger, "init_args") and "save_dir" in logger.init_args:
            logger.init_args.save_dir = str(directory)
    wandb_loggers = [logger for logger in loggers if is_wandb_config(logger)]
    if not wandb_loggers:
        return
    os.environ["WANDB_MODE"] = wandb_mode()
    run_id = wandb_run_id(directory)
    for logger in wandb_loggers:
        if not (logger.init_args.get("id") or logger.init_args.get("version")):
            logger.init_args.id = run_id
        logger.init_args.name = logger.init_args.get("name") or directory.name


def wandb_mode() -> str:
    """W&B never prompts for a login: `WANDB_MODE` if set, else online under a sweep agent and offline otherwise.

    Online without credentials (`wandb login`, WANDB_API_KEY) falls back to offline with a warning.
    """
    mode = os.environ.get("WANDB_MODE") or ("online" if "WANDB_SWEEP_ID" in os.environ else "offline")
    if mode in ("online", "run"):
        import wandb

        if not wandb.login(prompt=False, verify=False):
            rank_zero_warn("WANDB_MODE=online, but W&B has no credentials (`wandb login` or WANDB_API_KEY): logging offline.")
            return "offline"
    return mode


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of `run_dir`: a sweep agent's WANDB_RUN_ID, else the one stored in the run directory, else a new one.

    Global rank 0 stores it in `<run_dir>/wandb_run_id`, so a resumed or requeued run continues the same W&B run.
    """
    path = run_dir / WANDB_RUN_ID_FILE
    stored = path.read_text().strip() if path.is_file() else None
    run_id = os.environ.get("WANDB_RUN_ID") or stored or secrets.token_hex(4)
    if rank_zero_only.rank == 0 and run_id != stored:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


def finish_wandb_runs(trainer: L.Trainer) -> None:
    """Finishes the W&B run of each of `trainer`'s WandbLoggers, so that a later run in this process starts its own."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
