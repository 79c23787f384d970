"""What a long test evaluation keeps on disk to survive a kill, and how it reports its progress.

`BatchJournal` holds, per rank and finished test batch, what that batch added to the robustness counters (torchmetrics
states with sum or cat reductions), so a re-run merges them instead of attacking the batch again; `check_or_write_settings`
keeps partial results from being merged into an evaluation of other settings; `EvaluationProgress` counts images and
estimates the time left.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from torchmetrics import Metric

SETTINGS_FILE = "settings.json"


def check_or_write_settings(path: Path, settings: dict, fix: str) -> None:
    """Writes `settings` (JSON-serialisable) to `path`, or, if the file exists, raises a ValueError naming every setting
    that differs from it, followed by `fix` (what to do instead)."""
    current = json.loads(json.dumps(settings, default=str))
    if path.is_file():
        stored = json.loads(path.read_text())
        differences = [f"{key}: {stored.get(key)!r} there, {value!r} now" for key, value in current.items() if stored.get(key) != value]
        if differences:
            raise ValueError(f"{path.parent} holds partial results of another evaluation (" + "; ".join(differences) + f"). {fix}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(current, indent=2) + "\n")
    os.replace(temporary, path)  # atomic: another rank reads the whole file or none


class BatchJournal:
    """The finished test batches of one rank, as ``<directory>/rank<r>_batch<b>.pt``: the batch's image indices, its
    counters' states and the example grid if the batch captured it. Files are written whole (renamed into place), so a
    kill leaves no partial file."""

    def __init__(self, directory: str | Path, rank: int):
        self.directory = Path(directory)
        self.rank = rank
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, batch_idx: int) -> Path:
        return self.directory / f"rank{self.rank}_batch{batch_idx}.pt"

    def load(self, batch_idx: int) -> dict | None:
        """The saved record of a batch, on the CPU, or None if it did not finish."""
        path = self._path(batch_idx)
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None

    def save(self, batch_idx: int, record: dict) -> None:
        path = self._path(batch_idx)
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save(record, temporary)
        os.replace(temporary, path)


def metric_states(metrics: dict[tuple[str, str], Metric]) -> dict[tuple[str, str], dict]:
    """The states of `metrics` on the CPU (tensors, or lists of tensors for cat states), by the same keys."""
    return {
        key: {name: [t.cpu() for t in value] if isinstance(value, list) else value.cpu() for name, value in metric.metric_state.items()}
        for key, metric in metrics.items()
    }


def merge_metric_states(metrics: dict[tuple[str, str], Metric], states: dict[tuple[str, str], dict]) -> None:
    """Adds `states` (from `metric_states`) into `metrics` by their reductions (sum: added, cat: appended)."""
    for key, metric in metrics.items():
        state = states[key]
        moved = {name: [t.to(metric.device) for t in value] if isinstance(value, list) else value.to(metric.device)
                 for name, value in state.items()}
        metric.merge_state(moved)
        metric._update_count += 1  # merged states count as an update: `compute` warns on a metric it thinks was never updated


class EvaluationProgress:
    """Images evaluated out of `total` on this rank, elapsed time and the time left, estimated from the images attacked
    in this session (resumed batches count as done but not toward the rate)."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.attacked = 0
        self.start = time.monotonic()

    def update(self, images: int, attacked: bool) -> str:
        """Counts `images` more as done (`attacked` here, or loaded from a finished batch); returns the progress line."""
        self.done += images
        self.attacked += images if attacked else 0
        elapsed = time.monotonic() - self.start
        left = elapsed / self.attacked * (self.total - self.done) if self.attacked else math.nan
        share = 100 * self.done / max(1, self.total)
        return f"evaluated {self.done}/{self.total} images ({share:.0f} %), elapsed {_clock(elapsed)}, ETA {_clock(left)}"


def _clock(seconds: float) -> str:
    """h:mm:ss, or ``?`` for NaN."""
    if math.isnan(seconds):
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
