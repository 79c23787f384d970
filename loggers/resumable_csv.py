"""A CSVLogger whose `metrics.csv` survives a resumed run."""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class ResumingExperimentWriter(ExperimentWriter):
    """Lightning's writer, except that it keeps an existing `metrics.csv` instead of deleting it.

    Rows already in the file are kept when their step is below the first step this run logs; rows from that step on
    were logged after the checkpoint the run resumed from, and the resumed run logs them again.
    """

    def _check_log_dir_exists(self) -> None:
        self._earlier_rows: list[dict[str, str]] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                self._earlier_rows = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        """Writes the recorded rows; the first time, rewrites the file with the earlier rows that come before them."""
        if self._earlier_rows is None or not self.metrics:
            super().save()
            return
        first_step = min(row["step"] for row in self.metrics)
        kept = [row for row in self._earlier_rows if int(float(row["step"])) < first_step]
        self._record_new_keys()
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept + self.metrics)
        self._earlier_rows = None
        self.metrics = []


class ResumableCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` (same arguments) that keeps the rows of earlier runs in the same
    directory, so that a resumed run's `metrics.csv` holds every logged row, before and after the resume."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ResumingExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
