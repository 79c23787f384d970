"""The student config under 2-process CPU DDP (gloo), from the command line, against a 1-process run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, REPO, shrink_config

TRAIN_IMAGES, TEST_IMAGES = 420, 90  # the 70 % and 15 % splits of 600 phantoms


def train_student(run_dir: Path, teacher_checkpoint: str, *overrides: str) -> tuple[dict[str, float], list[dict]]:
    """Runs `python train.py` on the tiny student config for one epoch; returns its test metrics and report rows."""
    config = shrink_config(CONFIGS / "distill.yaml", run_dir.parent, image_size=64, synthetic_samples=600)
    command = [sys.executable, "train.py", "--config", str(config), "--run_dir", str(run_dir), "--trainer.max_epochs", "1",
               "--model.init_args.teacher_ckpt", teacher_checkpoint, "--model.init_args.purifier_dir", "null",
               "--trainer.accelerator", "cpu", *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((run_dir / "test_metrics.json").read_text()), json.loads((run_dir / "robustness_report.json").read_text())


def exact_fields(row: dict) -> dict:
    """A report row without its mean perturbation norm, a float sum whose rounding depends on the order of ranks."""
    return {key: value for key, value in row.items() if key != "perturbation"}


def test_student_metrics_under_two_process_ddp_match_one_process(teacher_run, tmp_path):
    # The session's trained teacher: a tiny teacher trained here for the test sometimes predicted one class,
    # which no attack changes, and then the exact comparison of its rows below would test nothing.
    teacher_checkpoint = str(teacher_run / "checkpoints" / "best.ckpt")
    single, single_report = train_student(tmp_path / "one_process", teacher_checkpoint)
    distributed, distributed_report = train_student(tmp_path / "two_processes", teacher_checkpoint,
                                                    "--trainer.devices", "2", "--trainer.strategy", "ddp")

    last = torch.load(tmp_path / "two_processes" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == (TRAIN_IMAGES // 2) // 32  # each of 2 ranks trained on its half
    assert single.keys() == distributed.keys()
    # The frozen teacher does not depend on training: the same images, each counted once, the same attack per image.
    teacher_rows, distributed_teacher_rows = ([row for row in report if row["model"] == "teacher"] for report in (single_report, distributed_report))
    assert [exact_fields(row) for row in teacher_rows] == [exact_fields(row) for row in distributed_teacher_rows]
    for row, distributed_row in zip(teacher_rows, distributed_teacher_rows):
        assert distributed_row["perturbation"] == pytest.approx(row["perturbation"], rel=1e-5)  # float sums in another order
    assert all(row["n"] == TEST_IMAGES for row in teacher_rows)
    assert any(row["attack_success"] for row in teacher_rows), "a teacher whose predictions no attack changes tests nothing"
    # The student trained on other batches (two shards, DDP-averaged gradients, half the steps), so its accuracies
    # differ after one epoch (a tolerance on them flipped between runs); its rows still count each test image once.
    student_rows = [row for row in distributed_report if row["model"] == "student"]
    assert student_rows and all(row["n"] == TEST_IMAGES for row in student_rows)
