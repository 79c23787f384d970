"""The task-general report keeps every classification figure: a report of a fixed checkpoint and seed, written
before rows gained `metric` and `value`, is reproduced column for column. The example grid says what it shows and its
column titles stay within their columns."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from callbacks import AdversarialExampleCallback
from datamodules import ChestXRayDataModule
from lightning_modules import TeacherClassifier
from robust_cxr.attacks import AttackSpec
from robust_cxr.reports import save_example_grid
from robust_cxr.tasks import ClassificationTask

DATA = Path(__file__).parent / "data"
CHECKPOINT = DATA / "tiny_teacher.ckpt"  # TeacherClassifier (timm test_resnet), 64 px, fitted 8 epochs on 600 phantoms (weights only)
REFERENCE = DATA / "tiny_teacher_report.json"  # its report since attacks return their most adversarial iterate
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


def test_the_example_grid_names_what_it_shows_and_no_column_title_runs_into_the_next(tmp_path, monkeypatch):
    drawn = []  # (position, text, font) of every text block drawn
    draw_text = ImageDraw.ImageDraw.multiline_text
    monkeypatch.setattr(ImageDraw.ImageDraw, "multiline_text",
                        lambda self, xy, text, *args, **kwargs: drawn.append((xy, text, kwargs["font"])) or draw_text(self, xy, text, *args, **kwargs))
    clean = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    adversarial = (clean + 0.03 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-1.0, 1.0]])
    subject, attack = "teacher_finetuned + purifier/ddim-10-eta1.0@t100", "pgd100_eot8_bpda"
    tile = 64
    path = save_example_grid(tmp_path / "grid.png", ClassificationTask(["normal", "tuberculosis"]), clean, adversarial,
                             torch.tensor([0, 1, 1]), logits, logits.flip(1), eps=8 / 255, subject=subject, attack=attack,
                             threat_model="whitebox", defended=clean, tile=tile)
    header, *titles = [(xy, text.replace("\n", " "), font) for xy, text, font in drawn[:5]]
    assert subject in header[1] and attack in header[1] and "whitebox" in header[1]
    assert [text for _, text, _ in titles] == ["clean", "adversarial", "perturbation (+-0.0313725)", "defense output"]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for (x, _), text, font in drawn[1:5]:
        assert all(x % tile + measure.textlength(line, font=font) <= tile for line in text.split("\n")), text
    pixels = np.asarray(Image.open(path).convert("L"))
    band = pixels[titles[0][0][1]:pixels.shape[0] - 3 * tile]  # from the titles down to the first image row
    for boundary in range(tile, 4 * tile, tile):
        assert (band[:, boundary - 1:boundary + 2] == 255).all(), f"a title crosses the column boundary at x = {boundary}"
