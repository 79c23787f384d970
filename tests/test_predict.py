"""predict.py: the deployed pipeline's predictions on image files match the test report; unreadable files become rows."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PNEUMONIA_FOLDER, TINY_VIT, command_line, requires_shared_data
from datamodules import ChestXRayDataModule
from datamodules.sources import SYNTHETIC_CLASS_NAMES
from datamodules.synthetic import generate_phantoms
from export import main as export_main
from lightning_modules import TeacherClassifier
from lightning_modules.classifier import CLASSIFIER_COMMAND, load_classifier
from predict import input_paths
from predict import main as predict_main
from robust_cxr.deployment import ExportedGraph, draw_noise

pytestmark = pytest.mark.usefixtures("single_thread")


def write_phantom_folder(root: Path, count: int, image_size: int, seed: int) -> Path:
    """`count` phantoms as 8-bit PNGs in `root/<class name>/`, as a folder dataset holds them."""
    images, labels = generate_phantoms(count, image_size, seed=seed)
    pixels = images.squeeze(1).mul(255).round().to(torch.uint8).numpy()
    for number, (image, label) in enumerate(zip(pixels, labels.tolist())):
        folder = root / SYNTHETIC_CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{number:04d}.png")
    return root


def report_accuracy(checkpoint: Path, root: Path, run_dir: Path) -> float:
    """test/acc of the checkpoint on every image of the class folders under `root`, through Lightning's test loop
    (what a stage writes at test time goes to `run_dir`)."""
    stage = load_classifier(checkpoint, CLASSIFIER_COMMAND)
    data = ChestXRayDataModule(source="folder", root=str(root), image_size=stage.hparams.image_size,
                               channels=stage.hparams.in_chans, batch_size=64, split=(0.0, 0.0, 1.0))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir)
    return trainer.test(stage, datamodule=data, verbose=False)[0]["test/acc"]



def predicted_accuracy(rows: list[dict[str, str]]) -> float:
    """Share of rows whose prediction is the name of the class folder the image is in."""
    return float(np.mean([row["prediction"] == Path(row["path"]).parent.name for row in rows]))


def test_accuracy_on_a_class_folder_equals_the_test_report(tiny_stage_checkpoints, tmp_path):
    folder = write_phantom_folder(tmp_path / "images", 96, 32, seed=7)
    checkpoint = tiny_stage_checkpoints["student"]
    rows = predict_main([str(checkpoint), str(folder), "--output", str(tmp_path / "predictions.csv"), "--batch-size", "40"])
    assert len(rows) == 96 and not any(row["error"] for row in rows)
    assert {row["prediction"] for row in rows} == set(SYNTHETIC_CLASS_NAMES), "one class for every image: a vacuous comparison"
    assert predicted_accuracy(rows) == pytest.approx(report_accuracy(checkpoint, folder, tmp_path / "test"), abs=1e-6)
    written = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert [row["prediction"] for row in written] == [row["prediction"] for row in rows]
    assert all(row["disagree"] == "false" for row in written), "a student without purifier disagreed with itself"
    for row in written:
        assert float(row["probability/normal"]) + float(row["probability/tuberculosis"]) == pytest.approx(1, abs=1e-5)


@requires_shared_data
def test_accuracy_on_the_pneumonia_folder_equals_the_test_report(tmp_path):
    data = ChestXRayDataModule(source="folder", root=str(PNEUMONIA_FOLDER), image_size=32, batch_size=64)
    teacher = TeacherClassifier(num_classes=2, class_names=data.class_names, model_kwargs=TINY_VIT, image_size=32)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=10, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(teacher, datamodule=data)
    checkpoint = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(checkpoint)
    rows = predict_main([str(checkpoint), str(PNEUMONIA_FOLDER), "--output", str(tmp_path / "predictions.csv")])
    assert not any(row["error"] for row in rows)
    assert predicted_accuracy(rows) == pytest.approx(report_accuracy(checkpoint, PNEUMONIA_FOLDER, tmp_path / "test"), abs=1e-6)


def test_unreadable_files_are_rows_with_the_reason_and_never_stop_the_run(tiny_stage_checkpoints, tmp_path):
    folder = write_phantom_folder(tmp_path / "images", 4, 32, seed=0)
    (folder / "normal" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (folder / "notes.txt").write_text("not an image\n")
    rows = predict_main([str(tiny_stage_checkpoints["student"]), str(folder), "--output", str(tmp_path / "folder.csv"), "--batch-size", "2"])
    assert [row["path"] for row in rows] == [str(path) for path in input_paths(folder)], "rows out of the input order"
    errors = {Path(row["path"]).name: row["error"] for row in rows if row["error"]}
    assert set(errors) == {"corrupt.png", "notes.txt"} and all("not a readable image" in reason for reason in errors.values())
    assert sum(bool(row.get("prediction")) for row in rows) == 4
    listed = tmp_path / "list.txt"
    listed.write_text(f"images/normal/corrupt.png\n{tmp_path / 'missing.png'}\n\n" + "\n".join(str(p) for p in sorted(folder.rglob("0*.png"))))
    rows = predict_main([str(tiny_stage_checkpoints["student"]), str(listed), "--output", str(tmp_path / "list.csv")])
    errors = {Path(row["path"]).name: row["error"] for row in rows if row["error"]}
    assert errors == {"corrupt.png": errors["corrupt.png"], "missing.png": "file does not exist"}
    assert len(rows) == 6 and len(list(csv.DictReader((tmp_path / "list.csv").open()))) == 6


def test_purify_then_finetune_predicts_through_the_purifier_and_saves_what_it_classified(tiny_stage_checkpoints, tmp_path):
    folder = write_phantom_folder(tmp_path / "images", 6, 32, seed=0)
    checkpoint = tiny_stage_checkpoints["purify_finetune"]
    rows = predict_main([str(checkpoint), str(folder), "--output", str(tmp_path / "p.csv"), "--save-purified", str(tmp_path / "purified"),
                         "--batch-size", "4", "--seed", "3"])
    stage = load_classifier(checkpoint, CLASSIFIER_COMMAND)
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(row["path"]))) for row in rows[:4]]).float().div(255).unsqueeze(1)
    purified = torch.stack([torch.from_numpy(np.asarray(Image.open(row["purified_path"]))) for row in rows[:4]]).float().div(255).unsqueeze(1)
    assert not torch.allclose(purified, images, atol=0.05), "the saved images were not purified"
    with torch.inference_mode():
        torch.manual_seed(3)  # the first batch's noise
        deployed = stage(images).softmax(dim=1)
        undefended = stage.model(images).argmax(dim=1)
        from_saved = stage.model(purified).softmax(dim=1)
    names = stage.hparams.class_names
    for row, probabilities, label, saved in zip(rows, deployed, undefended, from_saved):
        assert float(row["probability/normal"]) == pytest.approx(float(probabilities[0]), abs=1e-5)
        assert float(row["probability/normal"]) == pytest.approx(float(saved[0]), abs=1e-2)  # up to 8-bit rounding of the PNG
        assert row["undefended_prediction"] == names[int(label)]
        assert row["disagree"] == str(row["prediction"] != row["undefended_prediction"]).lower()


def test_save_purified_without_a_purifier_and_a_missing_checkpoint_are_short_errors(tiny_stage_checkpoints, tmp_path, monkeypatch):
    folder = write_phantom_folder(tmp_path / "images", 2, 32, seed=0)
    with pytest.raises(ValueError, match="without a purifier"):
        predict_main([str(tiny_stage_checkpoints["teacher"]), str(folder), "--save-purified", str(tmp_path / "purified")])
    message = command_line(monkeypatch, predict_main, "predict.py", str(tmp_path / "nowhere"), str(folder))
    assert message.startswith("error: ") and "nowhere" in message and "python train.py --config" in message


def test_an_exported_pipeline_graph_predicts_with_its_noise_drawn_per_batch_from_the_seed(tiny_defended_checkpoints, tmp_path):
    folder = write_phantom_folder(tmp_path / "images", 6, 32, seed=0)
    checkpoint = tiny_defended_checkpoints["purify_finetune_nim"]  # random sigma and noise, both inputs of the graph
    graph = export_main([str(checkpoint), "--output", str(tmp_path / "export")])["pipeline"]
    arguments = [str(graph), str(folder), "--batch-size", "4", "--seed", "3"]
    rows = predict_main([*arguments, "--output", str(tmp_path / "a.csv")])
    assert predict_main([*arguments, "--output", str(tmp_path / "b.csv")]) == rows, "the same seed drew other noise"
    deployed = load_classifier(checkpoint, CLASSIFIER_COMMAND).deployed_model()
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(row["path"]))) for row in rows]).float().div(255).unsqueeze(1)
    noise = ExportedGraph(graph).metadata["noise"]
    for batch_number, start in enumerate(range(0, len(rows), 4)):  # the checkpoint's pipeline on the draws of each batch's seed
        batch = images[start:start + 4]
        with torch.inference_mode(), torch.random.fork_rng():
            torch.manual_seed(3 + batch_number)
            probabilities = deployed.pipeline(batch, **draw_noise(noise, len(batch))).softmax(dim=1)
            undefended = deployed.undefended(batch).argmax(dim=1)
        for row, probability, label in zip(rows[start:start + 4], probabilities, undefended):
            assert float(row["probability/normal"]) == pytest.approx(float(probability[0]), abs=1e-4)
            assert row["undefended_prediction"] == SYNTHETIC_CLASS_NAMES[int(label)]
    other_seed = predict_main([str(graph), str(folder), "--batch-size", "4", "--seed", "4", "--output", str(tmp_path / "c.csv")])
    assert [row["probability/normal"] for row in other_seed] != [row["probability/normal"] for row in rows]
