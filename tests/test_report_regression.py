"""Every stage kind's robustness report, row for row: fixed tiny checkpoints and seeds evaluated by evaluate.py under a
suite of every threat model that applies, against the references in tests/data/report_regression/. A change that is
meant to keep behaviour (a refactor) keeps these; one that changes what attacks or reports do regenerates them
(``ROBUST_CXR_WRITE_REFERENCES=1 pytest tests/test_report_regression.py``) and says so in its commit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import TINY_VIT, fit_and_save

REFERENCES = Path(__file__).parent / "data" / "report_regression"
WRITE = os.environ.get("ROBUST_CXR_WRITE_REFERENCES") == "1"
EPS = 0.03
CLASSIFICATION = [  # a random subject's white-box attacks take 2 draws; a deterministic one's run one
    dict(method="fgsm", eps=EPS, eot_samples=2),
    dict(method="pgd", eps=EPS, steps=2, eot_samples=2),
    dict(method="pgd", eps=EPS, steps=2, eot_samples=2, eot_average="logits", name="pgd2_logits"),
    dict(method="apgd_ce", eps=EPS, steps=3, eot_samples=2),
    dict(method="square", eps=EPS, queries=8, eot_samples=2),
    dict(method="pgd", eps=EPS, steps=2, eot_samples=2, bpda=True),
    dict(method="pgd", eps=EPS, steps=2, threat_model="graybox", name="pgd2_graybox"),
    dict(method="pgd", eps=EPS, steps=2, threat_model="transfer", name="pgd2_transfer"),
    dict(method="pgd", eps=EPS, steps=2, eot_samples=2, threat_model="adaptive", name="pgd2_adaptive"),
]
SEGMENTATION = [
    dict(method="fgsm", eps=EPS),
    dict(method="pgd", eps=EPS, steps=2),
    dict(method="pgd", eps=EPS, steps=2, target="empty"),
    dict(method="pgd", eps=EPS, steps=2, threat_model="graybox", name="pgd2_graybox"),
    dict(method="pgd", eps=EPS, steps=2, threat_model="adaptive", name="pgd2_adaptive"),
]
RESTORATION = [
    dict(method="fgsm", eps=EPS / 4),
    dict(method="mifgsm", eps=EPS / 4, steps=2),
    dict(method="pgd_l2", eps=0.3, steps=2),
    dict(method="pgd", eps=EPS / 4, steps=2, threat_model="graybox", name="pgd2_graybox"),
]


@pytest.fixture(scope="module")
def stage_checkpoints(tiny_stage_checkpoints, tiny_defended_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """A checkpoint of every stage kind at 32 px, 3 seeded training steps each: the classifier stages of conftest, and a
    segmenter with a detector and a reformer behind it, a restorer, and SEViT on the tiny teacher."""
    import lightning as L

    from callbacks import AdversarialExampleCallback
    from datamodules import ChestXRayDataModule, Degradation
    from datamodules.sources import SYNTHETIC_CLASS_NAMES
    from lightning_modules import AdversarialDetector, AdversarialReformer, LungSegmenter, Restorer, SelfEnsembleViT
    from robust_cxr.attacks import AttackSpec

    directory = tmp_path_factory.mktemp("regression")
    L.seed_everything(0, verbose=False)
    common = dict(num_classes=2, class_names=list(SYNTHETIC_CLASS_NAMES), image_size=32)
    data = dict(image_size=32, synthetic_samples=240, batch_size=32, num_workers=0)
    masks, degraded = ChestXRayDataModule(masks=True, **data), ChestXRayDataModule(degradation=Degradation(), **data)
    attacked = [AdversarialExampleCallback(train_attack=AttackSpec(method="fgsm", eps=EPS), train_fraction=0.5)]
    paths = {**tiny_stage_checkpoints, **tiny_defended_checkpoints}
    paths["segmenter"] = fit_and_save(LungSegmenter(encoder_depth=3, decoder_channels=(16, 8, 4), **common), masks, directory / "segmenter.ckpt")
    paths["detector"] = fit_and_save(AdversarialDetector(target_ckpt=str(paths["segmenter"]), widths=(8,), **common), masks,
                                     directory / "detector.ckpt", attacked)
    paths["segmenter_reformer"] = fit_and_save(
        AdversarialReformer(target_ckpt=str(paths["segmenter"]), detector_ckpt=str(paths["detector"]), decoder_channels=(8, 8, 8), **common),
        masks, directory / "segmenter_reformer.ckpt", attacked)
    paths["restorer"] = fit_and_save(Restorer(encoder_depth=2, decoder_channels=(16, 8), feature_channels=8, head_channels=16, **common), degraded,
                                     directory / "restorer.ckpt")
    paths["sevit"] = fit_and_save(SelfEnsembleViT(teacher_ckpt=str(paths["teacher"]), num_blocks=TINY_VIT["depth"], hidden_sizes=(16,), **common),
                                  ChestXRayDataModule(**data), directory / "sevit.ckpt")
    return paths


KINDS = {
    "classifier": ("teacher", CLASSIFICATION),
    "purified_classifier": ("purify_finetune", CLASSIFICATION),
    "student": ("student", CLASSIFICATION),
    "nim_purified_classifier": ("purify_finetune_nim", CLASSIFICATION),
    "classifier_reformer": ("reformer", CLASSIFICATION),
    "sevit": ("sevit", CLASSIFICATION),
    "segmenter_reformer_detector": ("segmenter_reformer", SEGMENTATION),
    "restorer": ("restorer", RESTORATION),
}


@pytest.mark.parametrize("kind", KINDS)
def test_every_stage_kind_reports_what_it_did(kind, stage_checkpoints, tmp_path):
    import evaluate

    checkpoint, suite = KINDS[kind]
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump(suite))
    rows = evaluate.main([str(stage_checkpoints[checkpoint]), "--suite", str(suite_file), "--max_images", "16", "--data.batch_size", "8",
                          "--output_dir", str(tmp_path / "eval")])
    reference = REFERENCES / f"{kind}.json"
    if WRITE:
        reference.parent.mkdir(parents=True, exist_ok=True)
        reference.write_text(json.dumps(rows, indent=2) + "\n")
    expected = json.loads(reference.read_text())
    assert [(row["model"], row["defense"], row["attack"], row["metric"]) for row in rows] == \
        [(row["model"], row["defense"], row["attack"], row["metric"]) for row in expected]
    for row, reference_row in zip(rows, expected):
        assert set(row) == set(reference_row), (row["attack"], row["metric"])
        for column, value in reference_row.items():
            assert row[column] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), (kind, row["attack"], column)
