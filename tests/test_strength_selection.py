"""The purifier's strength frontier and its selection (select_strength.py), and the export's default settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDPMScheduler, UNet2DModel

import select_strength
from lightning_modules import DiffusionPurifier, PurifyThenFinetune
from robust_cxr.purification import DEFAULT_SETTINGS_FILE, Purifier, load_purifier, write_default_settings
from robust_cxr.attacks import AttackSpec
from robust_cxr.strength import evaluate_subject, frechet_distance, pooled_features, select_strength as choose
from robust_cxr.threat import DefendedModel
from conftest import TINY_UNET

pytestmark = pytest.mark.usefixtures("single_thread")

CHECKPOINT = Path(__file__).parent / "data" / "tiny_teacher.ckpt"  # TeacherClassifier (timm test_resnet), 64 px, 600 phantoms


def _row(strength: float, clean: float, robust: float) -> dict:
    return dict(strength=strength, clean_acc=clean, robust_acc=robust, clean_balanced_acc=clean - 0.1, robust_balanced_acc=robust)


ROWS = [_row(25, 0.95, 0.30), _row(50, 0.90, 0.55), _row(75, 0.88, 0.55), _row(100, 0.86, 0.70), _row(150, 0.60, 0.80)]


def test_the_selection_is_the_most_robust_strength_within_the_clean_drop_and_the_smaller_on_ties():
    chosen = choose(ROWS, undefended_clean=0.92, max_clean_drop=0.04, metric="acc")  # floor 0.88: 25, 50, 75 qualify
    assert chosen["strength"] == 50  # 50 and 75 tie at 0.55 robust; 100 and 150 are more robust but below the floor
    assert choose(ROWS, undefended_clean=0.92, max_clean_drop=0.06, metric="acc")["strength"] == 100
    assert choose(ROWS, undefended_clean=0.92, max_clean_drop=0.5, metric="acc")["strength"] == 150
    # the metric decides: clean balanced accuracy is 0.1 lower in these rows, so a floor of 0.82 admits t* 25 alone
    assert choose(ROWS, undefended_clean=0.86, max_clean_drop=0.04, metric="balanced_acc")["strength"] == 25


def test_no_strength_within_the_drop_is_an_error_that_says_what_to_change():
    with pytest.raises(ValueError, match=r"best is 0.950 at 25.*--strengths.*--max_clean_drop"):
        choose(ROWS, undefended_clean=0.99, max_clean_drop=0.01, metric="acc")
    with pytest.raises(ValueError, match="max_clean_drop must be >= 0"):
        choose(ROWS, undefended_clean=0.9, max_clean_drop=-0.1, metric="acc")


def test_a_subject_on_the_frontier_is_counted_as_the_report_counts_it():
    """`evaluate_subject` runs the report's evaluation: robust means right clean and attacked, per class."""
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)).eval()
    images = torch.rand(10, 1, 8, 8)
    labels = classifier(images).argmax(1).detach()
    labels[:2] = 1 - labels[:2]  # two images wrong clean
    attack = AttackSpec(method="pgd", eps=0.5, steps=5)  # far beyond what a linear classifier of [0, 1] images withstands
    results = evaluate_subject(DefendedModel.alone("linear", classifier), [attack], images, labels, torch.arange(10), batch_size=4,
                               seed=0, num_classes=2)
    assert results["none"]["clean_acc"].item() == pytest.approx(0.8) and int(results["none"]["total"]) == 10
    assert results["pgd5"]["robust_acc"].item() == 0.0 and results["pgd5"]["clean_acc"].item() == pytest.approx(0.8)


def test_the_fid_criterion_takes_the_lowest_fid_whatever_the_accuracies():
    rows = [dict(row, fid=fid) for row, fid in zip(ROWS, [9.0, 4.0, 2.0, 2.0, 7.0])]
    assert choose(rows, undefended_clean=0.99, max_clean_drop=0.0, metric="acc", criterion="fid")["strength"] == 75


def test_frechet_distance_of_gaussians_is_the_closed_form():
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(40_000, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0])
    second = torch.randn(40_000, 3, generator=generator, dtype=torch.float64) * torch.tensor([2.0, 2.0, 1.0]) + torch.tensor([1.0, 0, 0])
    # diagonal covariances: |mu_1 - mu_2|^2 + sum_i (s_1i - s_2i)^2 = 1 + 1 + 0 + 4
    assert frechet_distance(first, second) == pytest.approx(6.0, abs=0.15)
    assert frechet_distance(first, first) == pytest.approx(0.0, abs=1e-6)


def test_pooled_features_are_the_input_of_the_last_linear_layer():
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    images = torch.rand(5, 1, 2, 2)
    expected = classifier[:3](images).double()
    assert torch.allclose(pooled_features(classifier, classifier, images, batch_size=2, seed=0), expected)
    with pytest.raises(ValueError, match="no linear head"):
        pooled_features(torch.nn.Flatten(), torch.nn.Flatten(), images, batch_size=2, seed=0)


@pytest.fixture
def purifier_dir(tmp_path) -> Path:
    """An untrained tiny diffusion purifier export at 64 px, with default settings as the purifier stage writes them."""
    directory = tmp_path / "export"
    Purifier(UNet2DModel(sample_size=64, in_channels=1, out_channels=1, **TINY_UNET), DDPMScheduler()).save_pretrained(directory)
    write_default_settings(directory, {"t_star": 100, "method": "ddim", "steps": 1})
    return directory


def test_the_selected_strength_obeys_its_clean_accuracy_constraint_on_validation_and_becomes_the_default(purifier_dir, tmp_path):
    drop = 0.07
    frontier = select_strength.main([
        str(CHECKPOINT), "--purifier_dir", str(purifier_dir), "--strengths", "[10, 0, 5]", "--max_images", "48", "--batch_size", "16",
        "--attack", "{method: pgd, eps: 0.03, steps: 2}", "--max_clean_drop", str(drop), "--output_dir", str(tmp_path / "frontier"),
    ])
    assert frontier["split"] == "val" and frontier["images"] == 48 and frontier["metric"] == "balanced_acc"
    written = json.loads((tmp_path / "frontier" / select_strength.FRONTIER_FILE).read_text())
    assert written == json.loads(json.dumps(frontier)) and (tmp_path / "frontier" / "strength_frontier.png").is_file()
    rows, undefended, chosen = written["rows"], written["undefended"], written["selected"]
    assert [row["strength"] for row in rows] == [0, 5, 10]
    # t* = 0 returns the images unchanged: the classifier alone, clean and under the same attack
    assert {key: rows[0][key] for key in undefended} == undefended
    assert all(row["robust_acc"] <= row["clean_acc"] for row in rows)
    floor = undefended["clean_balanced_acc"] - drop
    qualifying = [row for row in rows if row["clean_balanced_acc"] >= floor]
    assert chosen["clean_balanced_acc"] >= floor
    assert chosen["robust_balanced_acc"] == max(row["robust_balanced_acc"] for row in qualifying)

    record = json.loads((purifier_dir / DEFAULT_SETTINGS_FILE).read_text())
    assert record["settings"] == {"t_star": chosen["strength"], "method": "ddim", "steps": 1}
    assert record["selection"]["classifier"] == str(CHECKPOINT.resolve()) and record["selection"]["selected"] == chosen
    assert load_purifier(purifier_dir).t_star == chosen["strength"]
    assert load_purifier(purifier_dir, t_star=40, steps=2).label == "ddim-2@t40"  # explicit settings override the selection


def _run_directory(root: Path) -> Path:
    """A run directory of the reference checkpoint whose config.yaml has data and Trainer settings, as train.py writes."""
    run = root / "teacher"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(CHECKPOINT.read_bytes())
    data = torch.load(CHECKPOINT, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    (run / "config.yaml").write_text(yaml.safe_dump({"data": dict(data), "trainer": {"accelerator": "cpu", "devices": 1}}))
    return run


def test_the_fid_criterion_measures_every_strength_and_only_measures_without_write_selection(purifier_dir, tmp_path):
    before = (purifier_dir / DEFAULT_SETTINGS_FILE).read_text()
    frontier = select_strength.main([str(_run_directory(tmp_path)), "--purifier_dir", str(purifier_dir), "--strengths", "[0, 60]", "--max_images", "16",
                                     "--attack", "{method: fgsm, eps: 0.03}", "--criterion", "fid", "--write_selection", "false",
                                     "--output_dir", str(tmp_path)])
    fids = [row["fid"] for row in frontier["rows"]]
    assert all(fid >= 0 for fid in fids) and fids[0] != fids[1]
    assert frontier["selected"]["fid"] == min(fids) and frontier["criterion"] == "fid"
    assert (purifier_dir / DEFAULT_SETTINGS_FILE).read_text() == before


def test_a_selection_that_nothing_passes_keeps_the_frontier_and_leaves_the_export_alone(purifier_dir, tmp_path):
    before = (purifier_dir / DEFAULT_SETTINGS_FILE).read_text()
    with pytest.raises(ValueError, match="No strength keeps clean acc"):
        select_strength.main([str(CHECKPOINT), "--purifier_dir", str(purifier_dir), "--strengths", "[300]", "--max_images", "12",
                              "--attack", "{method: fgsm, eps: 0.03, threat_model: graybox}", "--metric", "acc",
                              "--max_clean_drop", "0", "--output_dir", str(tmp_path)])
    assert json.loads((tmp_path / select_strength.FRONTIER_FILE).read_text())["selected"] is None
    assert (purifier_dir / DEFAULT_SETTINGS_FILE).read_text() == before


def test_the_purifier_stage_exports_its_t_star_as_the_default(tmp_path):
    stage = DiffusionPurifier(image_size=32, unet=dict(TINY_UNET), t_star=30, method="ddim", steps=3)
    stage.export(tmp_path)
    assert load_purifier(tmp_path).label == "ddim-3@t30"


def test_purify_then_finetune_deploys_the_selected_strength_unless_told_otherwise(purifier_dir):
    write_default_settings(purifier_dir, {"t_star": 40, "method": "ddim", "steps": 1}, selection={"criterion": "clean_drop"})
    common = dict(num_classes=2, image_size=64, teacher_ckpt=str(CHECKPOINT), purifier_dir=str(purifier_dir))
    module = PurifyThenFinetune(**common, purifier_settings={"t_star": None, "method": "ddim", "steps": 1, "eta": 0.0})  # the config's
    assert module.purifier.label == "ddim-1@t40"
    assert module.hparams.purifier_settings == {"t_star": 40, "method": "ddim", "steps": 1, "eta": 0.0}  # kept in the checkpoint
    assert PurifyThenFinetune(**common, purifier_settings={"t_star": 80}).purifier.label == "ddim-1@t80"
