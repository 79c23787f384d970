"""evaluate.py: a finished run under an attack suite, the worst-case row, and resuming a killed evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import robust_cxr.evaluation
import evaluate
from robust_cxr.evaluation import WORST_CASE, SuiteEvaluation, chosen_subjects
from callbacks.evaluation_journal import BatchJournal
from robust_cxr.metrics import RobustnessCounts
from robust_cxr.attacks import AttackSpec
from robust_cxr.reports import eps_curve_attacks, robustness_curves
from robust_cxr.runs import upstream_sha256
from robust_cxr.tasks import ClassificationTask, SegmentationTask
from robust_cxr.threat import DefendedModel

CHECKPOINT = Path(__file__).parent / "data" / "tiny_teacher.ckpt"  # TeacherClassifier (timm test_resnet), 64 px, 600 phantoms
SUITE = [
    {"method": "fgsm", "eps": 0.03},
    {"method": "pgd", "eps": 0.03, "steps": 3},  # random start keyed by image index
    {"method": "square", "eps": 0.03, "queries": 20},  # random squares from the global RNG, seeded per batch
]


def _evaluate(directory: Path, output: str, *overrides: str) -> list[dict]:
    suite = directory / "tiny.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    return evaluate.main([str(CHECKPOINT), "--suite", str(suite), "--max_images", "48", "--data.batch_size", "16",
                          "--output_dir", str(directory / output), *overrides])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The tiny suite on 48 test images of the reference checkpoint, in 3 batches: the output folder and the report."""
    directory = tmp_path_factory.mktemp("evaluate")
    return directory / "eval", _evaluate(directory, "eval")


def test_a_suite_on_a_checkpoint_gives_every_row_and_a_worst_case_row_below_each(uninterrupted):
    output, report = uninterrupted
    rows = {row["attack"]: row for row in report}
    assert set(rows) == {"none", "fgsm", "pgd3", "square20", WORST_CASE}
    assert all(row["n"] == 48 for row in rows.values())
    assert rows["square20"]["steps"] == 20 and rows["square20"]["perturbation"] <= 0.03 + 1e-6
    worst = rows[WORST_CASE]
    assert worst["worst_of"] == "fgsm, pgd3, square20" and worst["threat_model"] == "whitebox"
    for name in ("fgsm", "pgd3", "square20"):
        assert worst["accuracy"] <= rows[name]["accuracy"] and worst["correct"] <= rows[name]["correct"]
        assert worst["sensitivity"] <= rows[name]["sensitivity"] and worst["specificity"] <= rows[name]["specificity"]
    assert worst["clean_accuracy"] == rows["none"]["accuracy"]
    for name in ("robustness_report.md", "adversarial_examples.png", "test_metrics.json"):
        assert (output / name).is_file()


def test_a_killed_evaluation_resumes_without_attacking_finished_batches_and_gives_the_same_report(uninterrupted, tmp_path, monkeypatch):
    save = BatchJournal.save

    def save_then_die(journal: BatchJournal, batch_idx: int, record: dict) -> None:
        save(journal, batch_idx, record)
        if batch_idx == 1:
            raise _Killed("after test batch 1")

    monkeypatch.setattr(BatchJournal, "save", save_then_die)
    with pytest.raises(_Killed):
        _evaluate(tmp_path, "killed")
    monkeypatch.setattr(BatchJournal, "save", save)
    attacked: list[torch.Tensor] = []
    craft = robust_cxr.evaluation.craft_adversarial

    def recording_craft(*args, keys=None, **kwargs):
        attacked.append(keys)
        return craft(*args, keys=keys, **kwargs)

    monkeypatch.setattr(robust_cxr.evaluation, "craft_adversarial", recording_craft)
    resumed = _evaluate(tmp_path, "killed")
    assert len(attacked) == len(SUITE)  # one batch attacked again, by each attack: the third (images 32..47)
    assert all(keys.min() >= 32 and keys.max() < 48 for keys in attacked)
    output, report = uninterrupted
    assert resumed == report
    # The grid is drawn from batch 0, which the resumed run loaded.
    assert (tmp_path / "killed" / "adversarial_examples.png").read_bytes() == (output / "adversarial_examples.png").read_bytes()


def test_a_run_directory_gives_the_data_and_the_loggers_of_its_config(tmp_path):
    run = tmp_path / "teacher"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(CHECKPOINT.read_bytes())
    data = torch.load(CHECKPOINT, map_location="cpu", weights_only=False)["datamodule_hyper_parameters"]
    loggers = [{"class_path": "loggers.ResumableCSVLogger", "init_args": {"save_dir": str(run), "name": "", "version": ""}},
               {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": str(run), "id": "0123abcd", "project": "robust-cxr"}}]
    config = {"data": {**dict(data), "batch_size": 32}, "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 15, "logger": loggers},
              "adversarial": {"seed": 3}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = evaluate.main([str(run), "--attacks", "[{method: fgsm, eps: 0.03}]", "--max_images", "16", "--data.image_size", "64"])
    output = run / "eval" / "custom"
    assert [row["attack"] for row in rows] == ["none", "fgsm"] and rows[0]["n"] == 16  # one attack: no worst-case row
    assert (output / "metrics.csv").is_file() and (output / "robustness_report.md").is_file()  # loggers moved to the output
    assert (output / "wandb_run_id").read_text().strip() != "0123abcd"  # a W&B run of its own, not the training run's
    assert json.loads((output / "batches" / "settings.json").read_text())["seed"] == 3  # the run's attack seed


class _Killed(Exception):
    """Stands in for a kill (SIGKILL, a SLURM time limit) between two test batches."""


def test_resuming_with_other_settings_is_refused(tmp_path):
    _evaluate(tmp_path, "eval", "--max_images", "16")
    with pytest.raises(ValueError, match="test_max_images: 16 there, 32 now"):
        _evaluate(tmp_path, "eval", "--max_images", "32")
    with pytest.raises(ValueError, match="precision: '32-true' there, 'bf16-mixed' now"):
        _evaluate(tmp_path, "eval", "--max_images", "16", "--trainer.precision", "bf16-mixed")


def test_the_files_of_earlier_stages_are_part_of_an_evaluation_s_identity(tmp_path):
    export = tmp_path / "export"
    (export / "unet").mkdir(parents=True)
    (export / "unet" / "weights.safetensors").write_bytes(b"weights")
    (tmp_path / "teacher.ckpt").write_bytes(b"teacher")
    hyperparameters = dict(purifier_dir=str(export), teacher_ckpt=str(tmp_path / "teacher.ckpt"), detector_ckpt=None, lr=1e-3)
    before = upstream_sha256(hyperparameters)
    assert set(before) == {"purifier_dir", "teacher_ckpt"}
    (export / "unet" / "weights.safetensors").write_bytes(b"retrained")
    after = upstream_sha256(hyperparameters)
    assert after["purifier_dir"] != before["purifier_dir"] and after["teacher_ckpt"] == before["teacher_ckpt"]


def test_bad_inputs_are_errors_that_say_what_to_do(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="config.yaml missing"):
        evaluate.main([str(tmp_path / "run"), "--suite", "strong"])
    suite = tmp_path / "bad.yaml"
    suite.write_text("- {method: sqare, eps: 0.03}\n")
    with pytest.raises(ValueError, match="unknown method 'sqare'"):
        evaluate.main([str(CHECKPOINT), "--suite", str(suite)])
    suite.write_text("- {method: pgd, epsilon: 0.03}\n")
    with pytest.raises(ValueError, match=r"\['epsilon'\] are no attack fields"):
        evaluate.main([str(CHECKPOINT), "--suite", str(suite)])
    with pytest.raises(ValueError, match="trained on other data"):
        evaluate.main([str(CHECKPOINT), "--suite", "strong", "--data.image_size", "32", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ValueError, match=r"Subjects \['student'\] are not among this stage's robustness subjects \['teacher'\]"):
        _evaluate(tmp_path, "y", "--subjects", "[student]")


def test_subjects_keeps_the_subjects_named_in_the_stage_order():
    model = torch.nn.Identity()
    subjects = [DefendedModel.alone("teacher", model), DefendedModel.alone("teacher", model).behind("purifier/ddim-1@t100", model),
                DefendedModel.alone("teacher_finetuned", model).behind("purifier/ddim-1@t100", model)]
    chosen = chosen_subjects(subjects, ["teacher_finetuned+purifier", "teacher"])
    assert [subject.key for subject in chosen] == ["teacher", "teacher_finetuned+purifier"]
    assert chosen_subjects(subjects, None) == subjects


def test_the_strong_suite_parses():
    labels = [spec.label for spec in evaluate.load_suite("strong")]
    assert len(labels) == len(set(labels)) == 3


def _worst_case_evaluation(task, counter) -> SuiteEvaluation:
    evaluation = SuiteEvaluation([], [], task, worst_case=True, dtype=None, seed=0)
    evaluation.counts = {("m", name): counter() for name in ("none", "a", "b", WORST_CASE)}
    return evaluation


def test_worst_case_is_the_intersection_of_the_images_that_survive_each_attack():
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    right = torch.nn.functional.one_hot(labels, 2).float() * 4 - 2  # logits that decide each label
    clean = right.clone()
    clean[5] = -clean[5]  # image 5 is wrong clean
    under_a, under_b = right.clone(), right.clone()
    under_a[[0, 4]] = -under_a[[0, 4]]  # attack a (every image) fools images 0 and 4
    under_b[[0, 1]] = -under_b[[0, 1]]  # attack b (images 0-3 only) fools images 0 and 1
    covered_by_b = torch.tensor([True, True, True, True, False, False])
    evaluation = _worst_case_evaluation(ClassificationTask(["normal", "disease"]), lambda: RobustnessCounts(2))
    attacked = [(torch.ones(6, dtype=torch.bool), under_a, torch.full((6,), 0.03)), (covered_by_b, under_b[covered_by_b], torch.full((4,), 0.02))]
    evaluation._update_worst_case("m", labels, clean, attacked)
    result = evaluation.counts[("m", WORST_CASE)].compute()
    # On images 0-3 (covered by both), right clean and under both: images 2 and 3.
    assert int(result["total"]) == 4 and int(result["robust_correct"]) == 2
    assert result["robust_recall"].tolist() == [0.5, 0.5] and result["attack_success"].item() == 0.5
    assert result["perturbation"].item() == pytest.approx(0.025)  # image 0 fooled by a (first of equals), image 1 by b


def test_worst_case_of_a_segmenter_is_the_lowest_dice_per_image():
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :2] = 1  # the top half is foreground
    perfect = masks * 20 - 10
    half = perfect.clone()
    half[:, :, 0] = -10  # one of two foreground rows missed: Dice 2/3
    empty = torch.full_like(perfect, -10)  # Dice 0
    evaluation = _worst_case_evaluation(SegmentationTask(), SegmentationTask().robustness_counter)
    everything = torch.ones(2, dtype=torch.bool)
    attacked = [(everything, torch.stack([half[0], empty[1]]), torch.zeros(2)), (everything, torch.stack([empty[0], half[1]]), torch.zeros(2))]
    evaluation._update_worst_case("m", masks, perfect, attacked)
    result = evaluation.counts[("m", WORST_CASE)].compute()
    assert result["dice"].item() == pytest.approx(0.0) and result["clean_dice"].item() == pytest.approx(1.0)
    attacked[1] = (everything, torch.stack([perfect[0], half[1]]), torch.zeros(2))
    evaluation = _worst_case_evaluation(SegmentationTask(), SegmentationTask().robustness_counter)
    evaluation._update_worst_case("m", masks, perfect, attacked)
    assert evaluation.counts[("m", WORST_CASE)].compute()["dice"].item() == pytest.approx((2 / 3 + 0) / 2)


def test_an_eps_curve_gives_one_point_per_eps_from_the_clean_score_down(tmp_path):
    rows = evaluate.main([str(CHECKPOINT), "--eps_curve", "[{method: pgd, steps: 5}]", "--curve_eps", "[0, 2, 8, 16]", "--max_images", "32",
                          "--data.batch_size", "16", "--worst_case", "false", "--output_dir", str(tmp_path)])
    assert [row["attack"] for row in rows] == ["none", "pgd5_eps2", "pgd5_eps8", "pgd5_eps16"]  # ordinary attacks of the suite
    assert rows[3]["eps"] == pytest.approx(16 / 255)
    curves = json.loads((tmp_path / "robustness_curve.json").read_text())
    assert len(curves) == 1  # one subject, one metric
    curve = curves[0]
    assert (curve["model"], curve["attack"], curve["threat_model"], curve["metric"]) == (rows[0]["model"], "pgd5", "whitebox", "accuracy")
    assert curve["scores"] == ["accuracy", "balanced_accuracy", "specificity", "sensitivity"]
    points = curve["points"]
    assert [point["eps_255"] for point in points] == [0, 2, 8, 16] and all(point["n"] == 32 for point in points)
    clean = rows[0]
    assert [points[0][score] for score in curve["scores"]] == [clean["accuracy"], clean["balanced_accuracy"], clean["specificity"], clean["sensitivity"]]
    assert [point["accuracy"] for point in points[1:]] == [row["accuracy"] for row in rows[1:]]
    accuracies = [point["accuracy"] for point in points]
    assert accuracies == sorted(accuracies, reverse=True) and accuracies[-1] < accuracies[0]  # PGD on an undefended model
    assert (tmp_path / "robustness_curve.png").stat().st_size > 0


def test_curves_follow_the_rows_of_any_task():
    spec = AttackSpec(method="pgd", steps=3, threat_model="graybox")
    labels = {eps: eps_curve_attacks(spec, [eps])[0].label for eps in (4, 8)}
    rows = [dict(model="segmenter", defense="purifier/ddim-1", attack=labels[eps], metric=metric, n=10, value=value, clean_value=clean)
            for eps, metric, value, clean in ((4, "dice", 0.7, 0.9), (4, "iou", 0.5, 0.8), (8, "dice", 0.4, 0.9), (8, "iou", 0.3, 0.8))]
    curves = robustness_curves(rows, [spec], [8, 0, 4])
    assert [(curve["metric"], curve["scores"]) for curve in curves] == [("dice", ["dice"]), ("iou", ["iou"])]
    assert [(point["eps_255"], point["dice"]) for point in curves[0]["points"]] == [(0, 0.9), (4, 0.7), (8, 0.4)]
    with pytest.raises(ValueError, match="must be >= 0 with one above 0"):
        eps_curve_attacks(spec, [0, -1])
