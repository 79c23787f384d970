"""W&B logging: an offline run holds the metrics, the resolved config and the robustness report; never a login prompt."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import CONFIGS, run_train, shrink_config

LOG_BLOCK_BYTES = 32768  # a .wandb file is a LevelDB-style log: 32 KiB blocks of records with 7-byte headers
LOG_HEADER_BYTES = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """The protobuf records (`wandb_internal_pb2.Record`) of an offline run's `run-<id>.wandb` file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    position, fragments, records = LOG_HEADER_BYTES, b"", []
    while position + LOG_HEADER_BYTES <= len(data):
        left_in_block = LOG_BLOCK_BYTES - position % LOG_BLOCK_BYTES
        if left_in_block < LOG_HEADER_BYTES:  # block trailer padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + LOG_HEADER_BYTES])
        if kind == 0:
            break
        fragments += data[position + LOG_HEADER_BYTES:position + LOG_HEADER_BYTES + length]
        position += LOG_HEADER_BYTES + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(fragments)
            records.append(record)
            fragments = b""
    return records


def logged_values(records: list, kind: str) -> dict:
    """Every key logged in the `history` or `config` records, the latest value winning; media as nested dicts."""
    values: dict = {}
    for record in records:
        if record.WhichOneof("record_type") != kind:
            continue
        for item in record.history.item if kind == "history" else record.config.update:
            keys = [item.key] if item.key else list(item.nested_key)
            target = values
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = json.loads(item.value_json)
    return values


@pytest.fixture
def fresh_wandb_session():
    """W&B's process-wide session reset before and after, so that it reads this test's WANDB_* variables and no other's."""
    import wandb

    wandb.teardown()
    yield wandb
    wandb.teardown()


def test_offline_run_holds_metrics_config_and_report_and_resumes_the_same_run(fresh_wandb_session, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables W&B
    config = shrink_config(CONFIGS / "teacher.yaml", tmp_path, max_steps=1)
    run_dir = tmp_path / "run"
    quick = ("--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--adversarial.test_max_images", "32")
    run_train(config, run_dir, "--trainer.max_epochs", "1", *quick)
    metrics = run_train(config, run_dir, "--trainer.max_epochs", "2", *quick)  # resumes from last.ckpt
    fresh_wandb_session.teardown()  # waits for W&B's service process to write out the finished runs

    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(path.name.endswith(f"-{run_id}") for path in offline_runs), offline_runs
    resumed = offline_runs[-1]
    records = read_wandb_records(resumed / f"run-{run_id}.wandb")

    history = logged_values(records, "history")
    assert history["test/acc"] == pytest.approx(metrics["test/acc"])
    assert history["test/robust_acc/pgd1"] == pytest.approx(metrics["test/robust_acc/pgd1"])
    assert history["trainer/global_step"] == 4  # 2 epochs x 2 batches: the resumed run continued the step count

    logged_config = logged_values(records, "config")
    assert logged_config["run_dir"] == str(run_dir)
    assert logged_config["model"]["init_args"]["lr"] == 5e-4
    assert logged_config["adversarial"]["attacks"][1]["steps"] == 1  # the shrunk attack, as run

    report = json.loads((run_dir / "robustness_report.json").read_text())
    table = json.loads((resumed / "files" / history["test/robustness_report"]["path"]).read_text())
    assert table["columns"] == list(report[0])
    assert table["data"] == [list(row.values()) for row in report]
    grid = history["test/adversarial_examples"]
    assert grid["_type"] == "images/separated" and grid["count"] == 1
    assert list((resumed / "files" / "media" / "images").rglob("*.png"))


def test_wandb_never_prompts_and_is_offline_unless_asked(fresh_wandb_session, monkeypatch, tmp_path):
    from loggers import wandb_mode

    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no credentials anywhere
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.warns(UserWarning, match="no credentials"):
        assert wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")  # a sweep agent asks for online, but there are no credentials
    with pytest.warns(UserWarning, match="no credentials"):
        assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
