"""train.py end to end: every config runs, a run directory holds what it should, runs resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import CONFIGS, REPO, run_train, shrink_config

# The stages that need no earlier stage; the later stages run chained in test_chain.py.
TEACHER_CONFIGS = sorted(CONFIGS.glob("teacher*.yaml"))


@pytest.mark.parametrize("config", TEACHER_CONFIGS, ids=lambda path: path.stem)
def test_fast_dev_run_of_every_teacher_config(config, tmp_path):
    keep_model = config.stem == "teacher_vit_b16"  # the real ViT-B/16 at 224 px, one tiny batch
    data = dict(image_size=224, channels=3, batch_size=2) if keep_model else {}
    tiny = shrink_config(config, tmp_path, max_steps=1, keep_model=keep_model, **data)
    metrics = run_train(tiny, tmp_path / "run", "--trainer.fast_dev_run", "1")
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert any(name.startswith("test/robust_acc/") for name in metrics)


def test_run_directory_holds_checkpoints_config_metrics_and_report(teacher_run):
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "config.yaml", "metrics.csv", "test_metrics.json",
                 "robustness_report.json", "robustness_report.md", "adversarial_examples.png"):
        assert (teacher_run / name).is_file(), name
    metrics = json.loads((teacher_run / "test_metrics.json").read_text())
    assert metrics["test/acc"] > 0.75, metrics
    assert {"test/auroc", "test/sensitivity", "test/specificity", "test/f1"} <= set(metrics)
    last = torch.load(teacher_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 10 * (840 // 32)  # 10 epochs of the 70 % training split, full batches only


def test_help_lists_every_option():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, check=True)
    for option in ("--data.source", "--data.root", "--data.image_size", "--run_dir", "--resume", "--checkpoint.monitor",
                   "--trainer.max_epochs", "--model CONFIG"):
        assert option in result.stdout, option


def test_resume_never_starts_a_fresh_run_directory(tmp_path):
    config = shrink_config(CONFIGS / "teacher.yaml", tmp_path)
    run_train(config, tmp_path / "run", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2")
    run_train(config, tmp_path / "run", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--resume", "never")
    assert (tmp_path / "run-1" / "checkpoints" / "last.ckpt").is_file()


def test_image_size_the_model_cannot_tile_is_a_clear_error(tmp_path):
    config = shrink_config(CONFIGS / "teacher.yaml", tmp_path, image_size=48)
    with pytest.raises(ValueError, match="--data.image_size"):
        run_train(config, tmp_path / "run")


def test_missing_resume_checkpoint_is_an_error(tmp_path):
    config = shrink_config(CONFIGS / "teacher.yaml", tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        run_train(config, tmp_path / "run", "--resume", str(tmp_path / "nothing.ckpt"))


def test_resume_on_other_data_is_an_error_that_leaves_the_run_directory_untouched(tmp_path):
    config = shrink_config(CONFIGS / "teacher.yaml", tmp_path)
    run_dir = tmp_path / "run"
    quick = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--adversarial.test_max_images", "8")
    run_train(config, run_dir, *quick)
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in run_dir.rglob("*") if path.is_file()}
    other_data = tmp_path / "other"
    for name in ("NORMAL", "PNEUMONIA"):
        (other_data / name).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (32, 32), color=40 * i).save(other_data / name / f"{i}.png")
    with pytest.raises(ValueError, match=r"belongs to another run.*data_source: 'synthetic' in the checkpoint, 'folder' in this run.*--resume never"):
        run_train(config, run_dir, *quick, "--data.source", "folder", "--data.root", str(other_data))
    after = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in run_dir.rglob("*") if path.is_file()}
    assert after == before
    # The same command again resumes: the identity stored in the checkpoint is this run's.
    run_train(config, run_dir, *quick[2:], "--trainer.max_epochs", "2")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 1


def test_killed_run_resumes_from_last_checkpoint_at_the_next_epoch(tmp_path):
    config = shrink_config(CONFIGS / "teacher.yaml", tmp_path, synthetic_samples=600)
    command = [sys.executable, "train.py", "--config", str(config), "--run_dir", str(tmp_path / "run"),
               "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "true"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    deadline = time.monotonic() + 240
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0, "the run was killed before the first checkpoint or after the last"

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment, check=True)
    output = resumed.stdout + resumed.stderr
    assert "Resuming from" in output and "Epoch 1" in output
    assert "Epoch 0:" not in output, "the resumed run trained epoch 0 again"
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == 3 * saved["global_step"]
