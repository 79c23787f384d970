"""Each extension point takes a toy addition of under 40 lines (between the markers) and gives a report row from the
unchanged robust-evaluation callback: a task (`robust_cxr.tasks`), a defense (`DefendedModel.behind`) and an attack
method (`robust_cxr.attacks.METHODS`)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn

from callbacks import RobustEvaluation
from datamodules import ChestXRayDataModule
from lightning_modules.stage import StageModule
from robust_cxr.attacks import METHODS, AttackSpec, MethodEntry
from robust_cxr.tasks import ClassificationTask, PerImageScoredTask
from robust_cxr.threat import DefendedModel


class _ToyStage(StageModule):
    """A stage of `model` under `task`, reporting `subjects` (by default the model alone): nothing to train."""

    def __init__(self, model: nn.Module, task, subjects=None):
        super().__init__()
        self.model, self._task, self._subjects = model, task, subjects

    @property
    def task(self):
        return self._task

    def robustness_subjects(self) -> list[DefendedModel]:
        return self._subjects or super().robustness_subjects()

    def test_step(self, batch, batch_idx) -> None:
        pass


def _report(stage: StageModule, attacks: list[AttackSpec], directory) -> dict[tuple, dict]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(directory), callbacks=[RobustEvaluation(attacks=attacks)])
    trainer.test(stage, datamodule=ChestXRayDataModule(image_size=32, synthetic_samples=120, batch_size=16, num_workers=0), verbose=False)
    rows = json.loads((directory / "robustness_report.json").read_text())
    return {(row["model"], row["defense"], row["attack"], row["metric"]): row for row in rows}


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 2))


# ---- a toy task: the image's mean brightness, regressed; scored by closeness 1 - |error| --------------------- begin
class BrightnessTask(PerImageScoredTask):
    name = "brightness"
    target_key = "image"
    attack_loss = staticmethod(lambda outputs, targets: (outputs[:, 0] - targets).square())
    score_names = ("closeness",)

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["image"].mean(dim=(1, 2, 3))

    def image_scores(self, targets: torch.Tensor, outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"closeness": 1 - (outputs[:, 0] - targets).abs().double()}
# ---- end


def test_a_new_task_gets_report_rows_from_the_unchanged_callback(tmp_path):
    regressor = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 1, bias=False))
    nn.init.constant_(regressor[1].weight, 1 / (32 * 32))  # the mean brightness itself: closeness 1 clean
    rows = _report(_ToyStage(regressor, BrightnessTask()), [AttackSpec(method="pgd", eps=0.05, steps=3)], tmp_path)
    row = rows[("model", "none", "pgd3", "closeness")]
    assert row["clean_value"] == pytest.approx(1.0, abs=1e-5) and row["value"] == pytest.approx(0.95, abs=1e-3)  # the mean moved by eps


# ---- a toy defense: a 2 x 2 average pooling and back, in front of any model --------------------------------- begin
class Smoothing(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(nn.functional.avg_pool2d(images, 2), scale_factor=2, mode="nearest")


def smoothed(subject: DefendedModel) -> DefendedModel:
    return subject.behind("smoothing", Smoothing())
# ---- end


def test_a_new_defense_gets_report_rows_from_the_unchanged_callback(tmp_path):
    alone = DefendedModel.alone("linear", _classifier())
    stage = _ToyStage(alone.undefended, ClassificationTask(["normal", "tuberculosis"]), [alone, smoothed(alone)])
    rows = _report(stage, [AttackSpec(method="pgd", eps=0.03, steps=2, threat_model="graybox", name="graybox")], tmp_path)
    assert ("linear", "smoothing", "graybox", "accuracy") in rows and ("linear", "none", "graybox", "accuracy") not in rows


# ---- a toy attack method: every pixel brightened by eps, no gradient needed --------------------------------- begin
BRIGHTEN = MethodEntry("brighten", "linf", any_loss=False, run=lambda attack: attack.images + attack.spec.eps, label=lambda spec: "brighten")
# ---- end


def test_a_new_attack_gets_report_rows_from_the_unchanged_callback(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "brighten", BRIGHTEN)
    stage = _ToyStage(_classifier(), ClassificationTask(["normal", "tuberculosis"]))
    rows = _report(stage, [AttackSpec(method="brighten", eps=0.02)], tmp_path)
    assert rows[("model", "none", "brighten", "accuracy")]["perturbation"] in (None, pytest.approx(0.02, abs=1e-6))
    assert rows[("model", "none", "brighten", "accuracy")]["n"] == 18


def test_each_toy_addition_is_under_forty_lines():
    source = open(__file__).read().split("\n")
    begins = [number for number, line in enumerate(source) if line.startswith("# ----") and line.endswith("begin")]
    ends = [number for number, line in enumerate(source) if line == "# ---- end"]
    assert len(begins) == len(ends) == 3 and all(0 < end - begin - 1 < 40 for begin, end in zip(begins, ends))
