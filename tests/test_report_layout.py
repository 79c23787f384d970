"""The task-general report keeps every classification figure: a report of a fixed checkpoint and seed, written
before rows gained `metric` and `value`, is reproduced column for column."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

from callbacks import AdversarialExampleCallback
from datamodules import ChestXRayDataModule
from lightning_modules import TeacherClassifier
from robust_cxr.attacks import AttackSpec

DATA = Path(__file__).parent / "data"
CHECKPOINT = DATA / "tiny_teacher.ckpt"  # TeacherClassifier (timm test_resnet), 64 px, fitted 8 epochs on 600 phantoms (weights only)
REFERENCE = DATA / "tiny_teacher_report.json"  # its report before the task interface (commit 6c02040)
ATTACKS = [
    AttackSpec(method="fgsm", eps=0.03),
    AttackSpec(method="pgd", eps=0.03, steps=5),
    AttackSpec(method="apgd_ce", eps=0.03, steps=5),
    AttackSpec(method="pgd_l2", eps=0.5, steps=5),
]


def report_of_reference_checkpoint(directory: Path) -> list[dict]:
    """The robustness report of the reference checkpoint on its test phantoms, callback seed 0."""
    model = TeacherClassifier.load_from_checkpoint(CHECKPOINT, map_location="cpu")
    data = ChestXRayDataModule(image_size=64, synthetic_samples=600, batch_size=16, num_workers=0, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(directory),
                        callbacks=[AdversarialExampleCallback(attacks=ATTACKS, seed=0)])
    trainer.test(model, datamodule=data, verbose=False)
    return json.loads((directory / "robustness_report.json").read_text())


def test_classification_report_keeps_its_values_under_the_task_layout(tmp_path):
    reference = json.loads(REFERENCE.read_text())
    rows = report_of_reference_checkpoint(tmp_path)
    assert len(rows) == len(reference)
    for row, expected in zip(rows, reference):
        assert (row["metric"], row["value"]) == ("accuracy", row["accuracy"])
        for column, value in expected.items():
            assert row[column] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), (expected["attack"], column)
