"""train.py end to end: every config runs, a run directory holds what it should, runs resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import CONFIGS, REPO, TEACHER_RUN_EPOCHS, command_line, run_train, shrink_config, without_nan
from robust_cxr.cli_errors import user_message

# The stages that need no earlier stage; the later stages run chained in test_chain.py.
TEACHER_CONFIGS = sorted(CONFIGS.glob("teacher*.yaml"))


@pytest.mark.parametrize("config", TEACHER_CONFIGS, ids=lambda path: path.stem)
def test_fast_dev_run_of_every_teacher_config(config, tmp_path):
    keep_model = config.stem == "teacher_vit_b16"  # the real ViT-B/16 at 224 px, one tiny batch
    data = dict(image_size=224, channels=3, batch_size=2) if keep_model else {}
    overlay = "data" not in yaml.safe_load(config.read_text())  # an overlay of teacher.yaml (teacher_gaussian.yaml)
    tiny = shrink_config(CONFIGS / "teacher.yaml" if overlay else config, tmp_path, max_steps=1, keep_model=keep_model, **data)
    on_top = ["--config", str(config), "--run_dir", str(tmp_path / "run")] if overlay else []
    metrics = run_train(tiny, tmp_path / "run", *on_top, "--trainer.fast_dev_run", "1")
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
    assert last["global_step"] == TEACHER_RUN_EPOCHS * (840 // 32)  # every epoch of the 70 % training split, full batches only


def test_help_lists_every_option(capsys):
    from train import main

    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    for option in ("--data.source", "--data.root", "--data.image_size", "--run_dir", "--resume", "--checkpoint.monitor",
                   "--trainer.max_epochs", "--model CONFIG"):
        assert option in printed, option


def test_a_config_without_loggers_logs_to_the_default_ones_in_its_run_directory_and_its_own_replace_them(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from loggers import ResumableCSVLogger
    from train import RUN_DIR_ENV, build_cli

    config = shrink_config(CONFIGS / "teacher.yaml", tmp_path)
    own = tmp_path / "own_logger.yaml"
    own.write_text(yaml.safe_dump({"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                          "init_args": {"save_dir": "elsewhere", "name": "mine"}}}}))
    run_dir = tmp_path / "run"
    monkeypatch.setenv(RUN_DIR_ENV, str(run_dir))  # as a DDP worker: build_cli leaves the environment as it was

    cli = build_cli(["--config", str(config)])
    assert [type(logger) for logger in cli.trainer.loggers] == [ResumableCSVLogger, WandbLogger]
    assert all(logger.save_dir == str(run_dir) for logger in cli.trainer.loggers) and Path(cli.trainer.loggers[0].log_dir) == run_dir
    wandb_config = cli.config.trainer.logger[1].init_args  # as config.yaml lists it, for evaluate.py
    assert (wandb_config.project, wandb_config.name, wandb_config.log_model) == ("robust-cxr", "run", False)
    assert wandb_config.id == (run_dir / "wandb_run_id").read_text().strip()

    cli = build_cli(["--config", str(config), "--config", str(own)])
    assert [type(logger) for logger in cli.trainer.loggers] == [CSVLogger]
    assert Path(cli.trainer.loggers[0].log_dir) == run_dir / "mine" / "version_0"
    assert build_cli(["--config", str(config), "--trainer.logger", "false"]).trainer.loggers == []


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


SHORT_FIT = ("--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
             "--adversarial.test_max_images", "32")


def test_two_runs_of_the_same_command_and_seed_give_identical_metrics(tmp_path):
    config = shrink_config(CONFIGS / "teacher.yaml", tmp_path)  # training augmentation on, as in the config
    first = run_train(config, tmp_path / "first", "--trainer.max_epochs", "1", *SHORT_FIT)
    second = run_train(config, tmp_path / "second", "--trainer.max_epochs", "1", *SHORT_FIT)
    assert without_nan(first) == without_nan(second)
    assert (tmp_path / "first" / "metrics.csv").read_text() == (tmp_path / "second" / "metrics.csv").read_text()


def test_a_resumed_run_keeps_every_metrics_row_and_trains_as_an_uninterrupted_one(tmp_path):
    config = shrink_config(CONFIGS / "teacher.yaml", tmp_path)
    uninterrupted = run_train(config, tmp_path / "uninterrupted", "--trainer.max_epochs", "2", *SHORT_FIT)
    run_train(config, tmp_path / "resumed", "--trainer.max_epochs", "1", *SHORT_FIT)
    resumed = run_train(config, tmp_path / "resumed", "--trainer.max_epochs", "2", *SHORT_FIT)
    metrics_csv = (tmp_path / "resumed" / "metrics.csv").read_text()
    epochs = {row["epoch"] for row in csv.DictReader(metrics_csv.splitlines()) if row["train/loss"]}
    assert epochs == {"0", "1"}, "the rows of the first epoch were lost on resume"
    # The first run's test rows (logged at the resume step) give way to the resumed run's rows; the rest is identical.
    assert metrics_csv == (tmp_path / "uninterrupted" / "metrics.csv").read_text()
    assert without_nan(resumed) == without_nan(uninterrupted)


def _train_cli(monkeypatch: pytest.MonkeyPatch, *arguments: str) -> str:
    import train

    return command_line(monkeypatch, train.main, "train.py", *arguments)


def test_a_missing_checkpoint_prints_a_short_message_without_traceback_unless_debug(tmp_path, monkeypatch):
    arguments = ("--config", "configs/distill.yaml", "--model.init_args.teacher_ckpt", "nowhere.ckpt", "--run_dir", str(tmp_path / "run"))
    result = subprocess.run([sys.executable, "train.py", *arguments], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 4, result.stderr
    assert "nowhere.ckpt" in result.stderr and "python train.py --config configs/teacher.yaml" in result.stderr
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError) as raised:  # --debug: the error itself propagates (jsonargparse's, around ours)
        _train_cli(monkeypatch, *arguments, "--debug")
    assert isinstance(raised.value.__cause__ or raised.value.__context__, FileNotFoundError), raised.value
    assert "nowhere.ckpt" in user_message(raised.value)


def test_a_bad_option_value_prints_the_option_without_the_usage(tmp_path, monkeypatch):
    message = _train_cli(monkeypatch, "--config", str(CONFIGS / "teacher.yaml"), "--data.source", "bogus", "--run_dir", str(tmp_path / "run"))
    assert message.startswith("error: ") and "data.source" in message and "bogus" in message and "--adversarial.seed" not in message


@pytest.mark.parametrize("name", ["distill.yaml", "distill"])
def test_a_config_name_without_a_folder_is_looked_up_in_configs(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _train_cli(monkeypatch, "--config", name, "--print_config") == ""
    assert "lightning_modules.DistilledStudent" in capsys.readouterr().out


def test_config_lookup_leaves_existing_files_and_paths_with_folders_alone(tmp_path, monkeypatch):
    from train import with_config_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "distill.yaml").write_text("{}")
    assert with_config_folder(["--config", "distill.yaml"]) == ["--config", "distill.yaml"]
    assert with_config_folder(["--config=other/distill.yaml"]) == ["--config=other/distill.yaml"]
    assert with_config_folder(["--config=teacher"]) == [f"--config={CONFIGS / 'teacher.yaml'}"]
