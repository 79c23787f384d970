"""Lightning loggers of the project."""

from loggers.resumable_csv import ResumableCSVLogger

__all__ = ["ResumableCSVLogger"]
