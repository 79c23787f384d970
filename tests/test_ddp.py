"""The student config, and the test of a finished teacher run, under 2-process CPU DDP (gloo) from the command line,
against 1-process runs in-process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, REPO, TEACHER_RUN_EPOCHS, run_train, shrink_config

TRAIN_IMAGES, TEST_IMAGES = 420, 90  # the 70 % and 15 % splits of 600 phantoms


def run_train_py(config: Path, run_dir: Path, *overrides: str, processes: int = 2) -> tuple[dict[str, float], list[dict]]:
    """Runs train.py on the CPU: `python train.py` under 2-process DDP, in-process for 1 process; returns the run's test
    metrics and report rows."""
    arguments = ["--config", str(config), "--run_dir", str(run_dir), "--trainer.accelerator", "cpu", *overrides]
    if processes == 1:
        run_train(config, run_dir, *arguments[4:])
    else:
        command = [sys.executable, "train.py", *arguments, "--trainer.devices", str(processes), "--trainer.strategy", "ddp"]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((run_dir / "test_metrics.json").read_text()), json.loads((run_dir / "robustness_report.json").read_text())


def train_student(run_dir: Path, teacher_checkpoint: str, processes: int) -> tuple[dict[str, float], list[dict]]:
    """The tiny student config for one epoch on `processes` processes."""
    config = shrink_config(CONFIGS / "distill.yaml", run_dir.parent, image_size=64, synthetic_samples=600)
    return run_train_py(config, run_dir, "--trainer.max_epochs", "1", "--model.init_args.teacher_ckpt", teacher_checkpoint,
                        "--model.init_args.purifier_dir", "null", processes=processes)


def exact_fields(row: dict) -> dict:
    """A report row without its mean perturbation norm, a float sum whose rounding depends on the order of ranks."""
    return {key: value for key, value in row.items() if key != "perturbation"}


def test_student_metrics_under_two_process_ddp_match_one_process(teacher_run, tmp_path):
    # The session's trained teacher: a tiny teacher trained here for the test sometimes predicted one class,
    # which no attack changes, and then the exact comparison of its rows below would test nothing.
    teacher_checkpoint = str(teacher_run / "checkpoints" / "best.ckpt")
    single, single_report = train_student(tmp_path / "one_process", teacher_checkpoint, processes=1)
    distributed, distributed_report = train_student(tmp_path / "two_processes", teacher_checkpoint, processes=2)

    last = torch.load(tmp_path / "two_processes" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == (TRAIN_IMAGES // 2) // 32  # each of 2 ranks trained on its half
    assert single.keys() == distributed.keys()
    # The frozen teacher (scored clean here) does not depend on training: the same images, each counted once.
    teacher_rows, distributed_teacher_rows = ([row for row in report if row["model"] == "teacher"] for report in (single_report, distributed_report))
    assert teacher_rows == distributed_teacher_rows and all(row["n"] == TEST_IMAGES for row in teacher_rows)
    # The student trained on other batches (two shards, DDP-averaged gradients, half the steps), so its accuracies
    # differ after one epoch (a tolerance on them flipped between runs); its rows still count each test image once.
    student_rows = [row for row in distributed_report if row["model"] == "student"]
    assert student_rows and all(row["n"] == TEST_IMAGES for row in student_rows)


def test_a_finished_runs_report_under_two_process_ddp_matches_one_process(teacher_run, tmp_path):
    """Re-running a finished teacher run only re-runs its test: under DDP the frozen teacher meets the same images, each
    counted once, and the same attack per image, so every row equals the 1-process report."""
    run_dir = tmp_path / "teacher_run"
    shutil.copytree(teacher_run, run_dir)
    (run_dir / "robustness_report.json").unlink()
    _, distributed = run_train_py(teacher_run.parent / "tiny_teacher.yaml", run_dir, "--trainer.max_epochs", str(TEACHER_RUN_EPOCHS))
    single = json.loads((teacher_run / "robustness_report.json").read_text())
    assert [exact_fields(row) for row in single] == [exact_fields(row) for row in distributed]
    for row, distributed_row in zip(single, distributed):
        assert distributed_row["perturbation"] == pytest.approx(row["perturbation"], rel=1e-5)  # float sums in another order
    assert any(row["attack_success"] for row in single), "a teacher whose predictions no attack changes tests nothing"
