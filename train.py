"""Train, then test, any stage from its YAML config.

    python train.py --config configs/teacher.yaml [--section.key=value ...]
    python train.py --config teacher              # a config name without a folder is looked up in configs/
    python train.py --help          # every option, with its default
    python train.py ... --debug     # the full traceback of an error, not just its message

Everything a run leaves goes under `--run_dir` (default from the config): `checkpoints/`
(`best.ckpt`, `last.ckpt`), the resolved `config.yaml`, `metrics.csv`, `test_metrics.json`, the
offline W&B run (`wandb/`), and what callbacks write at test time (the robustness report).
Re-running the same command resumes from the newest of `checkpoints/last.ckpt` and the SLURM
requeue checkpoints `hpc_ckpt_<n>.ckpt` (`--resume auto`); `--resume never` starts a fresh numbered
run directory beside it; `--resume path/to.ckpt` resumes from that file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query PyPI on import

import lightning as L  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn  # noqa: E402

from callbacks import AdversarialExampleCallback, EpochSeeding  # noqa: E402
from callbacks.run_identity import RunIdentity, check_resumes_this_run, run_identity  # noqa: E402
from datamodules import ChestXRayDataModule  # noqa: E402
from loggers import configure_loggers, finish_wandb_runs, logger_configs  # noqa: E402
from robust_cxr.cli_errors import run_cli  # noqa: E402
from robust_cxr.safe_loading import load_checkpoint, weights_only  # noqa: E402

CONFIG_FOLDER = Path(__file__).resolve().parent / "configs"  # where `--config NAME` is looked up
RUN_DIR_ENV = "ROBUST_CXR_RUN_DIR"  # the resolved run directory, inherited by DDP worker processes
# The loggers of every config that sets no `trainer.logger` of its own (one that does replaces them; `--trainer.logger false`
# turns them off). Both write to the run directory (their save_dir is replaced by it): metrics.csv, kept across resumes, and
# the run's W&B run, offline unless WANDB_MODE=online (docs/operations/wandb-and-sweeps.md).
DEFAULT_LOGGERS = [
    {"class_path": "loggers.ResumableCSVLogger", "init_args": {"save_dir": "runs/default", "name": "", "version": ""}},
    {"class_path": "lightning.pytorch.loggers.WandbLogger",
     "init_args": {"save_dir": "runs/default", "project": "robust-cxr",
                   "log_model": False}},  # true: upload best.ckpt and last.ckpt as artifacts at the end; "all": every time one is saved
]


class RobustCXRCLI(LightningCLI):
    """LightningCLI with one run directory per run, checkpointing options and DataModule -> model links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/default", help="Directory for everything this run writes.")
        parser.add_argument(
            "--resume",
            type=str,
            default="auto",
            help="auto: resume from the newest (by global step, then time) readable one of <run_dir>/checkpoints/last.ckpt and"
            " <run_dir>/hpc_ckpt_<n>.ckpt (SLURM requeue); never: start a fresh run directory; or a checkpoint path.",
        )
        # Two checkpoints: the best by a metric, and the latest state to resume from. (ModelCheckpoint's
        # own save_last only refreshes last.ckpt when a new best is saved, so it would go stale.)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.filename": "best", "checkpoint.monitor": "val/acc", "checkpoint.mode": "max"})
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {"last_checkpoint.filename": "last", "last_checkpoint.monitor": None, "last_checkpoint.save_top_k": 1,
             "last_checkpoint.enable_version_counter": False}
        )
        # The attack callback as a top-level section, so that every attack setting is a plain override
        # (--adversarial.train_attack.eps=0.02) for sweeps.
        parser.add_lightning_class_args(AdversarialExampleCallback, "adversarial")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.init_args.in_chans")
        parser.link_arguments("data.image_size", "model.init_args.image_size")

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str] | None) -> None:
        """Parses `args` (default: the command line) into ``self.config``, config names looked up in `CONFIG_FOLDER`."""
        self.config = parser.parse_args(with_config_folder(sys.argv[1:] if args is None else args))

    def before_instantiate_classes(self) -> None:
        config = self.config
        run_dir = resolve_run_dir(Path(config.run_dir), config.resume)
        config.run_dir = str(run_dir)
        config.trainer.default_root_dir = str(run_dir)
        config.checkpoint.dirpath = config.last_checkpoint.dirpath = str(run_dir / "checkpoints")
        configure_loggers(logger_configs(config.trainer.logger), run_dir)


class SaveConfigToWandb(SaveConfigCallback):
    """Writes the resolved config to the run directory (`config.yaml`) and logs it to every W&B logger."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(config)


def with_config_folder(args: list[str]) -> list[str]:
    """`args` with each ``--config NAME`` that is no file but names one in `CONFIG_FOLDER` (``distill``, ``distill.yaml``)
    replaced by that file's path."""
    resolved = list(args)
    for position, argument in enumerate(resolved):
        option, equals, value = argument.partition("=")
        if option != "--config":
            continue
        if not equals:
            if position + 1 == len(resolved):
                break
            position, value = position + 1, resolved[position + 1]
        path = Path(value)
        if path.is_file() or path.parent != Path("."):
            continue
        for candidate in (CONFIG_FOLDER / path.name, CONFIG_FOLDER / f"{path.name}.yaml"):
            if candidate.is_file():
                resolved[position] = f"--config={candidate}" if equals else str(candidate)
                break
    return resolved


def resolve_run_dir(requested: Path, resume: str) -> Path:
    """The run directory: `requested`, or with ``resume=never`` the first of `requested`, -1, -2 ... without checkpoints.

    The choice is made once, by the launching process, and handed to DDP workers through the environment. With
    ``resume=never`` the directory is claimed by creating its `checkpoints/`, so parallel runs (sweep agents) never share one.
    """
    if RUN_DIR_ENV in os.environ:
        return Path(os.environ[RUN_DIR_ENV])
    run_dir = requested
    if resume == "never":
        number = 0
        while not _claim(run_dir / "checkpoints"):
            number += 1
            run_dir = requested.with_name(f"{requested.name}-{number}")
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def _claim(directory: Path) -> bool:
    """Creates `directory` (and its parents); False if it already existed."""
    try:
        directory.mkdir(parents=True)
    except FileExistsError:
        return False
    return True


def resume_checkpoint(run_dir: Path, resume: str) -> str | None:
    """The checkpoint to resume from for `--resume` (auto / never / a path), or None for a fresh start."""
    if resume == "never":
        return None
    if resume == "auto":
        candidates = [path for path in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if path.is_file()]
        steps = {path: step for path in candidates if (step := _stored_global_step(path)) is not None}
        return str(max(steps, key=lambda path: (steps[path], path.stat().st_mtime))) if steps else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"--resume {resume!r} is not a checkpoint file; use auto, never or the path of a .ckpt.")
    return resume


def _stored_global_step(path: Path) -> int | None:
    """The global step a checkpoint was saved at; None, with a warning, for a file cut short when its job was killed."""
    try:
        return load_checkpoint(path, mmap=True)["global_step"]
    except RuntimeError as error:
        rank_zero_warn(f"Not resuming from {path}, which cannot be read (written when the run was killed?): {error}")
        return None


def main(args: list[str] | None = None) -> dict[str, float]:
    """Parses `args` (default: the command line), fits, tests the best checkpoint; returns the test metrics."""
    inherited_run_dir = RUN_DIR_ENV in os.environ
    try:
        return _fit_and_test(args)
    finally:
        if not inherited_run_dir:
            os.environ.pop(RUN_DIR_ENV, None)


def build_cli(args: list[str] | None) -> RobustCXRCLI:
    """Parses `args` (default: the command line) and instantiates the model, the DataModule and the Trainer."""
    return RobustCXRCLI(
        L.LightningModule,
        ChestXRayDataModule,
        subclass_mode_model=True,
        run=False,
        args=args,
        auto_configure_optimizers=False,
        seed_everything_default=0,
        save_config_callback=SaveConfigToWandb,
        save_config_kwargs={"overwrite": True},  # a resumed or requeued run rewrites its config.yaml
        parser_kwargs={"exit_on_error": False},  # a bad option raises, for run_cli to print without the whole usage
        trainer_defaults={"callbacks": [EpochSeeding()],  # added to the config's callbacks
                          "logger": DEFAULT_LOGGERS},  # replaced by the config's loggers
    )


def _fit_and_test(args: list[str] | None) -> dict[str, float]:
    cli = build_cli(args)
    run_dir = Path(cli.config.run_dir)
    ckpt_path = resume_checkpoint(run_dir, cli.config.resume)
    identity = run_identity(cli.model, cli.datamodule)
    if ckpt_path:
        check_resumes_this_run(ckpt_path, identity)
        rank_zero_info(f"Resuming from {ckpt_path}")
    cli.trainer.callbacks.append(RunIdentity(identity))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, weights_only=weights_only())
    best = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None, weights_only=weights_only())
    metrics = results[0] if results else {}
    if cli.trainer.is_global_zero:
        (run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        rank_zero_info(f"Run directory: {run_dir.resolve()}")
    finish_wandb_runs(cli.trainer)
    return metrics


if __name__ == "__main__":
    run_cli(main)
