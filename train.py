"""Train, then test, any stage from its YAML config.

    python train.py --config configs/teacher.yaml [--section.key=value ...]
    python train.py --help          # every option, with its default

Everything a run leaves goes under `--run_dir` (default from the config): `checkpoints/`
(`best.ckpt`, `last.ckpt`), the resolved `config.yaml`, `metrics.csv`, `test_metrics.json`, and
what callbacks write at test time (the robustness report). Re-running the same command resumes
from `checkpoints/last.ckpt` (`--resume auto`); `--resume never` starts a fresh numbered run
directory beside it; `--resume path/to.ckpt` resumes from that file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query PyPI on import

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402

from callbacks import AdversarialExampleCallback  # noqa: E402
from datamodules import ChestXRayDataModule  # noqa: E402

RUN_DIR_ENV = "ROBUST_CXR_RUN_DIR"  # the resolved run directory, inherited by DDP worker processes


class RobustCXRCLI(LightningCLI):
    """LightningCLI with one run directory per run, checkpointing options and DataModule -> model links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/default", help="Directory for everything this run writes.")
        parser.add_argument(
            "--resume",
            type=str,
            default="auto",
            help="auto: resume from <run_dir>/checkpoints/last.ckpt if it exists; never: start a fresh run directory; or a checkpoint path.",
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

    def before_instantiate_classes(self) -> None:
        config = self.config
        run_dir = resolve_run_dir(Path(config.run_dir), config.resume)
        config.run_dir = str(run_dir)
        config.trainer.default_root_dir = str(run_dir)
        config.checkpoint.dirpath = config.last_checkpoint.dirpath = str(run_dir / "checkpoints")
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        for logger in loggers:
            if hasattr(logger, "init_args") and "save_dir" in logger.init_args:
                logger.init_args.save_dir = str(run_dir)


def resolve_run_dir(requested: Path, resume: str) -> Path:
    """The run directory: `requested`, or with ``resume=never`` the first of `requested`, -1, -2 ... without checkpoints.

    The choice is made once, by the launching process, and handed to DDP workers through the environment.
    """
    if RUN_DIR_ENV in os.environ:
        return Path(os.environ[RUN_DIR_ENV])
    run_dir = requested
    if resume == "never":
        number = 0
        while (run_dir / "checkpoints").exists():
            number += 1
            run_dir = requested.with_name(f"{requested.name}-{number}")
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def resume_checkpoint(run_dir: Path, resume: str) -> str | None:
    """The checkpoint to resume from for `--resume` (auto / never / a path), or None for a fresh start."""
    if resume == "never":
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"--resume {resume!r} is not a checkpoint file; use auto, never or the path of a .ckpt.")
    return resume


def main(args: list[str] | None = None) -> dict[str, float]:
    """Parses `args` (default: the command line), fits, tests the best checkpoint; returns the test metrics."""
    inherited_run_dir = RUN_DIR_ENV in os.environ
    try:
        return _fit_and_test(args)
    finally:
        if not inherited_run_dir:
            os.environ.pop(RUN_DIR_ENV, None)


def _fit_and_test(args: list[str] | None) -> dict[str, float]:
    cli = RobustCXRCLI(
        L.LightningModule,
        ChestXRayDataModule,
        subclass_mode_model=True,
        run=False,
        args=args,
        auto_configure_optimizers=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
    )
    run_dir = Path(cli.config.run_dir)
    ckpt_path = resume_checkpoint(run_dir, cli.config.resume)
    if ckpt_path:
        rank_zero_info(f"Resuming from {ckpt_path}")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    best = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best or None)
    metrics = results[0] if results else {}
    if cli.trainer.is_global_zero:
        (run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        rank_zero_info(f"Run directory: {run_dir.resolve()}")
    return metrics


if __name__ == "__main__":
    main()
