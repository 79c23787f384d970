"""Lightning loggers of the project, and how a run places its loggers in its run directory."""

from loggers.resumable_csv import ResumableCSVLogger
from loggers.run_loggers import configure_loggers, finish_wandb_runs, is_wandb_config, logger_configs, wandb_mode, wandb_run_id

__all__ = ["ResumableCSVLogger", "configure_loggers", "finish_wandb_runs", "is_wandb_config", "logger_configs", "wandb_mode", "wandb_run_id"]
