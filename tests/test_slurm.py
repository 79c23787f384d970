"""SLURM without SLURM: a simulated 2-node x 2-task job, and a real SIGUSR1 requeue that resumes from its checkpoint."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

from pathlib import Path

import pytest
import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from conftest import CONFIGS, REPO, shrink_config
from train import RUN_DIR_ENV, build_cli, resume_checkpoint

JOB_ID = "4242"


def slurm_environment(nodes: int, tasks_per_node: int, global_rank: int, node_list: str = "cxr-node[01-02]") -> dict[str, str]:
    """The variables `srun` sets for one task of a `--nodes=nodes --ntasks-per-node=tasks_per_node` batch job."""
    return {
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": "robust-cxr",  # not "bash" or "interactive", which Lightning treats as no SLURM
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_NODELIST": node_list,
        "SLURM_JOB_NODELIST": node_list,
        "SLURM_PROCID": str(global_rank),
        "SLURM_NODEID": str(global_rank // tasks_per_node),
        "SLURM_LOCALID": str(global_rank % tasks_per_node),
    }


@pytest.fixture
def restored_environment():
    """os.environ as it was, after the test: Lightning's SLURM environment also sets MASTER_ADDR and MASTER_PORT."""
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("global_rank", [0, 3])
def test_two_node_two_task_job_sets_ranks_and_requeue_handling(global_rank, restored_environment, monkeypatch, tmp_path):
    restored_environment.update(slurm_environment(nodes=2, tasks_per_node=2, global_rank=global_rank))
    restored_environment[RUN_DIR_ENV] = str(tmp_path / "run")
    monkeypatch.setattr(rank_zero_only, "rank", 0)  # the DDP strategy sets it from SLURM_PROCID
    config = shrink_config(CONFIGS / "teacher.yaml", tmp_path)
    cli = build_cli(["--config", str(config), "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
                     "--trainer.devices", "2", "--trainer.num_nodes", "2"])
    trainer = cli.trainer

    assert isinstance(trainer.strategy, DDPStrategy)
    assert (trainer.world_size, trainer.num_nodes, trainer.num_devices) == (4, 2, 2)
    assert (trainer.global_rank, trainer.node_rank, trainer.local_rank) == (global_rank, global_rank // 2, global_rank % 2)
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert environment.requeue_signal == signal.SIGUSR1
    assert environment.main_address == "cxr-node01"
    environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)  # srun's layout matches

    connector = trainer._signal_connector
    connector.register_signal_handlers()
    try:
        handlers = signal.getsignal(signal.SIGUSR1).signal_handlers
        assert connector._slurm_sigusr_handler_fn in handlers
    finally:
        connector.teardown()


def test_the_newest_readable_of_last_and_requeue_checkpoints_resumes(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for name, step in [("checkpoints/last.ckpt", 26), ("hpc_ckpt_1.ckpt", 30), ("hpc_ckpt_2.ckpt", 20)]:
        torch.save({"global_step": step}, tmp_path / name)
    assert resume_checkpoint(tmp_path, "auto") == str(tmp_path / "hpc_ckpt_1.ckpt")
    torch.save({"global_step": 52}, tmp_path / "checkpoints" / "last.ckpt")  # the requeued job went on past its checkpoint
    assert resume_checkpoint(tmp_path, "auto") == str(tmp_path / "checkpoints" / "last.ckpt")
    last = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(last[: len(last) // 2])  # killed while writing it
    with pytest.warns(UserWarning, match="cannot be read"):
        assert resume_checkpoint(tmp_path, "auto") == str(tmp_path / "hpc_ckpt_1.ckpt")


def shell_script_environment(directory: Path, **scripts: str) -> dict[str, str]:
    """os.environ with `directory` first on PATH, holding one executable shell script per keyword (name=body)."""
    directory.mkdir()
    for name, body in scripts.items():
        path = directory / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{directory}{os.pathsep}{os.environ['PATH']}"}


def test_sigusr1_requeues_the_sbatch_job_which_resumes_mid_epoch(tmp_path):
    run_dir, scontrol_log = tmp_path / "run", tmp_path / "scontrol.log"
    environment = shell_script_environment(
        tmp_path / "bin",
        srun='exec "$@"',  # the one task of a 1-node x 1-GPU job, in this process
        scontrol='echo "$@" >> "$SCONTROL_LOG"\nkill -TERM "$PPID"',  # records, then ends the job as SLURM does on requeue
    )
    environment.update(slurm_environment(nodes=1, tasks_per_node=1, global_rank=0, node_list="localhost"), SLURM_SUBMIT_DIR=str(REPO),
                       CONFIG=str(shrink_config(CONFIGS / "teacher.yaml", tmp_path, synthetic_samples=1200)), RUN_DIR=str(run_dir),
                       SCONTROL_LOG=str(scontrol_log))
    # The batch script as SLURM runs it, on the CPU; a requeued job runs it again with the same job id.
    command = ["bash", "slurm/train_single_node.sbatch", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2",
               "--trainer.enable_progress_bar", "true", "--adversarial.test_max_images", "32"]
    steps_per_epoch = 840 // 32  # full batches of the 70 % training split: long enough that SIGUSR1 lands inside epoch 1

    job = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.is_file() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.poll() is None, "the job ended before its first checkpoint"
    time.sleep(0.2)  # into epoch 1, which takes longer even on an idle machine
    job.send_signal(signal.SIGUSR1)  # the batch script execs down to train.py: this is the training process
    job.wait(timeout=120)

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]
    assert (resolved["strategy"], str(resolved["devices"]), resolved["num_nodes"]) == ("ddp", "1", 1)  # from the allocation
    assert scontrol_log.read_text().split() == ["requeue", JOB_ID]
    requeue_checkpoint = run_dir / "hpc_ckpt_1.ckpt"
    saved = torch.load(requeue_checkpoint, map_location="cpu", weights_only=False)
    assert steps_per_epoch <= saved["global_step"] < 2 * steps_per_epoch and saved["epoch"] == 1, "SIGUSR1 arrived outside epoch 1"
    assert saved["optimizer_states"][0]["state"], "the requeue checkpoint lacks the optimizer state"
    assert not (run_dir / "test_metrics.json").exists(), "the job ended when it was requeued"

    requeued = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    output = requeued.stdout + requeued.stderr
    assert requeued.returncode == 0, output[-4000:]
    assert f"Resuming from {requeue_checkpoint}" in output
    assert "Epoch 0:" not in output
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert (final["epoch"], final["global_step"]) == (1, 2 * steps_per_epoch)  # the interrupted epoch was finished, not redone
    assert (run_dir / "test_metrics.json").is_file()
