"""AdversarialExampleCallback: robust evaluation, reports, adversarial training, DDP and inference mode."""

from __future__ import annotations

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from lightning.pytorch.callbacks import Callback
from PIL import Image

from callbacks import AdversarialExampleCallback
from conftest import CONFIGS, REPO, TINY_UNET, TINY_VIT, shrink_config, without_nan
from datamodules import Augmentation, ChestXRayDataModule
from lightning_modules import TeacherClassifier
from robust_cxr.attacks import AttackSpec
from robust_cxr.purification import PurifiedClassifier, Purifier
from robust_cxr.threat import DefendedModel

EPS = 0.03
EVAL_ATTACKS = [AttackSpec(method="fgsm", eps=EPS), AttackSpec(method="pgd", eps=EPS, steps=5)]


def _datamodule(**overrides) -> ChestXRayDataModule:
    settings = dict(image_size=64, synthetic_samples=240, batch_size=16, num_workers=0, seed=0)
    return ChestXRayDataModule(**{**settings, **overrides})


def _trainer(tmp_path, callbacks, **overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path))
    return L.Trainer(callbacks=callbacks, **{**settings, **overrides})


def _report(run_dir) -> dict[str, dict]:
    return {row["attack"]: row for row in json.loads((run_dir / "robustness_report.json").read_text())}


def test_test_report_of_a_trained_teacher(teacher_run):
    rows = _report(teacher_run)
    assert set(rows) == {"none", "fgsm", "pgd10", "apgd_ce", "pgd10_eps0.01"}
    clean = rows["none"]["accuracy"]
    assert clean > 0.75
    for name in ("fgsm", "pgd10", "apgd_ce", "pgd10_eps0.01"):
        row = rows[name]
        assert {"model", "defense", "attack", "threat_model", "norm", "eps", "accuracy", "n"} <= set(row)
        assert (row["model"], row["defense"], row["threat_model"], row["norm"]) == ("teacher", "none", "whitebox", "linf")
        assert row["n"] == rows["none"]["n"] == 180
        assert row["accuracy"] < clean - 0.1, row
        assert row["perturbation"] <= row["eps"] + 1e-6
        assert row["clean_accuracy"] == clean  # every attack covers the whole test set here
        assert row["accuracy"] <= row["accuracy_after_attack"]
        assert row["balanced_accuracy"] == pytest.approx((row["sensitivity"] + row["specificity"]) / 2)
        assert row["sensitivity"] <= row["clean_sensitivity"] and row["specificity"] <= row["clean_specificity"]
    assert (rows["fgsm"]["steps"], rows["pgd10"]["steps"], rows["apgd_ce"]["eot_samples"]) == (1, 10, 1)
    assert rows["pgd10_eps0.01"]["accuracy"] >= rows["pgd10"]["accuracy"]
    # APGD-20 is the stronger attack in expectation, not on every image: one image of slack.
    assert rows["fgsm"]["accuracy"] > rows["pgd10"]["accuracy"] >= rows["apgd_ce"]["accuracy"] - 1 / 180
    markdown = (teacher_run / "robustness_report.md").read_text()
    assert "| teacher | none | 0.5000 | pgd10 | whitebox |" in markdown and "| sensitivity |" in markdown
    with Image.open(teacher_run / "adversarial_examples.png") as grid:
        assert grid.size[0] == 5 * 128 and 8 * 128 < grid.size[1] < 9 * 128  # 3 tiles and the text (2 tiles wide) under the titles


def _load_teacher(teacher_run) -> TeacherClassifier:
    return TeacherClassifier.load_from_checkpoint(teacher_run / "checkpoints" / "best.ckpt", map_location="cpu")


@pytest.mark.parametrize("inference_mode", [True, False])
def test_evaluation_works_whatever_the_inference_mode(teacher_run, tmp_path, inference_mode):
    model = _load_teacher(teacher_run)
    callback = AdversarialExampleCallback(attacks=EVAL_ATTACKS, val_max_images=None)
    trainer = _trainer(tmp_path, [callback], inference_mode=inference_mode)
    datamodule = _datamodule(synthetic_samples=400)
    tested = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    validated = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    assert tested["test/robust_acc/pgd5"] < tested["test/acc"] - 0.2
    assert validated["val/robust_acc/pgd5"] < validated["val/acc"] - 0.2


def test_inference_mode_does_not_change_the_numbers(teacher_run, tmp_path):
    results = []
    for inference_mode in (True, False):
        trainer = _trainer(tmp_path, [AdversarialExampleCallback(attacks=EVAL_ATTACKS)], inference_mode=inference_mode)
        results.append(trainer.test(_load_teacher(teacher_run), datamodule=_datamodule(synthetic_samples=400), verbose=False)[0])
    assert without_nan(results[0]) == without_nan(results[1])


class GradientWatch(Callback):
    """Records parameter gradients after each backward and checks them when the next batch starts.

    The training attack runs between the two (in `on_after_batch_transfer`). Lightning zeroes
    gradients only inside the next window's first training step, so nothing may change them in
    between; a leaking attack would, and inside an accumulation window its gradients would be
    added to the update.
    """

    def __init__(self):
        self.after_backward: list[torch.Tensor | None] | None = None
        self.checked = 0

    def on_after_backward(self, trainer, pl_module):
        self.after_backward = [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.after_backward is None:
            return
        for before, parameter in zip(self.after_backward, pl_module.parameters()):
            assert (before is None and parameter.grad is None) or torch.equal(before, parameter.grad), "the attack changed parameter gradients"
        self.checked += 1


def _tiny_teacher() -> TeacherClassifier:
    return TeacherClassifier(num_classes=2, model_kwargs=TINY_VIT, image_size=64, class_names=["normal", "tuberculosis"])


def test_attack_gradients_never_reach_parameter_gradients(tmp_path):
    watch = GradientWatch()
    callback = AdversarialExampleCallback(train_attack=AttackSpec(method="pgd", eps=EPS, steps=2), train_fraction=1.0)
    trainer = _trainer(tmp_path, [callback, watch], max_epochs=1, limit_train_batches=6, limit_val_batches=0, accumulate_grad_batches=3)
    trainer.fit(_tiny_teacher(), datamodule=_datamodule())
    assert watch.checked == 5  # every batch after the first, inside and across accumulation windows


class BatchRecorder(Callback):
    """Keeps the training batches as the training step receives them."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({key: value.clone() if torch.is_tensor(value) else value for key, value in batch.items()})


def test_adversarial_training_replaces_the_configured_fraction(tmp_path):
    recorder = BatchRecorder()
    callback = AdversarialExampleCallback(train_attack=AttackSpec(method="pgd", eps=EPS, steps=2), train_fraction=0.25)
    trainer = _trainer(tmp_path, [callback, recorder], max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    datamodule = _datamodule(augmentation=Augmentation(probability=0.0))
    trainer.fit(_tiny_teacher(), datamodule=datamodule)
    dataset = datamodule.datasets["train"]
    for batch in recorder.batches:
        clean = torch.stack([dataset[int(i)]["image"] for i in batch["index"]])
        change = (batch["image"] - clean).flatten(1).abs().amax(dim=1)
        assert torch.all(change[:4] > 0) and torch.all(change[:4] <= EPS + 1e-6)
        assert torch.all(change[4:] == 0)
        assert batch["image"].min() >= 0 and batch["image"].max() <= 1


def test_training_eps_warms_up_linearly(tmp_path):
    recorder = BatchRecorder()
    callback = AdversarialExampleCallback(train_attack=AttackSpec(method="fgsm", eps=EPS), train_fraction=1.0, train_eps_warmup_epochs=1)
    trainer = _trainer(tmp_path, [callback, recorder], max_epochs=2, limit_train_batches=4, limit_val_batches=0)
    datamodule = _datamodule(augmentation=Augmentation(probability=0.0))
    trainer.fit(_tiny_teacher(), datamodule=datamodule)
    largest = []
    for batch in recorder.batches:
        clean = torch.stack([datamodule.datasets["train"][int(i)]["image"] for i in batch["index"]])
        largest.append((batch["image"] - clean).abs().max().item())
    torch.testing.assert_close(torch.tensor(largest), EPS * torch.tensor([0, 0.25, 0.5, 0.75, 1, 1, 1, 1]), atol=1e-6, rtol=0)


class TaggingDataModule(ChestXRayDataModule):
    """A DataModule with its own `on_after_batch_transfer`, which Lightning then calls instead of the model's."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return {**batch, "tagged": True}


def test_adversarial_training_wraps_the_hook_lightning_calls(tmp_path):
    recorder = BatchRecorder()
    callback = AdversarialExampleCallback(train_attack=AttackSpec(method="fgsm", eps=EPS), train_fraction=1.0)
    trainer = _trainer(tmp_path, [callback, recorder], max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    datamodule = TaggingDataModule(image_size=64, synthetic_samples=240, batch_size=16, augmentation=Augmentation(probability=0.0))
    trainer.fit(_tiny_teacher(), datamodule=datamodule)
    batch = recorder.batches[0]
    clean = torch.stack([datamodule.datasets["train"][int(i)]["image"] for i in batch["index"]])
    assert batch["tagged"] and torch.all((batch["image"] - clean).flatten(1).abs().amax(dim=1) > 0)
    assert "on_after_batch_transfer" not in datamodule.__dict__  # unwrapped at teardown


def test_trades_adds_adversarial_images_and_its_loss_term(tmp_path):
    recorder = BatchRecorder()
    callback = AdversarialExampleCallback(train_attack=AttackSpec(method="pgd", eps=EPS, steps=2), train_fraction=0.5, trades_beta=6.0)
    trainer = _trainer(tmp_path, [callback, recorder], max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    model = _tiny_teacher()
    trainer.fit(model, datamodule=_datamodule(augmentation=Augmentation(probability=0.0)))
    batch = recorder.batches[0]
    assert batch["trades_beta"] == 6.0 and batch["adversarial_image"].shape == (8, 1, 64, 64)
    change = (batch["adversarial_image"] - batch["image"][:8]).flatten(1).abs().amax(dim=1)
    assert torch.all(change > 0) and torch.all(change <= EPS + 1e-6)
    model.eval()
    plain = {key: batch[key] for key in ("image", "label")}
    with torch.no_grad():
        assert model.training_loss(batch)[0] > model.training_loss(plain)[0]


def test_validation_attacks_follow_every_n_epochs_and_max_images(tmp_path):
    class CountAttacks(Callback):
        def __init__(self):
            self.logged = []

        def on_validation_epoch_end(self, trainer, pl_module):
            self.logged.append("val/robust_acc/fgsm" in trainer.callback_metrics)

    counter = CountAttacks()
    callback = AdversarialExampleCallback(attacks=EVAL_ATTACKS[:1], val_every_n_epochs=2, val_max_images=20)
    trainer = _trainer(tmp_path, [callback, counter], max_epochs=4, limit_train_batches=1, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(_tiny_teacher(), datamodule=_datamodule())
    assert [bool(flag) for flag in counter.logged][1::2] == [True, True]
    robust = callback._evaluation.counts[("teacher", "fgsm")].compute()
    assert int(robust["total"]) == 20  # the first 20 validation images, over two batches of 16


def _ddp_report(teacher_run, tmp_path, devices: int) -> list[dict]:
    attacks = EVAL_ATTACKS + [AttackSpec(method="apgd_ce", eps=EPS, steps=5), AttackSpec(method="pgd", eps=EPS, steps=5, max_images=21, name="pgd5_subset")]
    trainer = _trainer(tmp_path / f"devices{devices}", [AdversarialExampleCallback(attacks=attacks, worst_case=True)], devices=devices,
                       strategy="ddp_spawn" if devices > 1 else "auto")
    trainer.test(_load_teacher(teacher_run), datamodule=_datamodule(synthetic_samples=407, batch_size=16), verbose=False)
    return json.loads((tmp_path / f"devices{devices}" / "robustness_report.json").read_text())


def test_ddp_evaluation_counts_equal_single_process(teacher_run, tmp_path):
    single = _ddp_report(teacher_run, tmp_path, devices=1)
    double = _ddp_report(teacher_run, tmp_path, devices=2)
    assert single[0]["n"] == 61  # odd-sized test split (31 and 30 a rank): no padding duplicates, no sample lost
    assert [(row["attack"], row["n"], row["correct"]) for row in double] == [(row["attack"], row["n"], row["correct"]) for row in single]
    # The subset is the same 21 images on one and on two ranks (10 and 11 of them on the two), so every figure agrees.
    subset = [[row for row in report if row["attack"] == "pgd5_subset"][0] for report in (single, double)]
    assert subset[0]["n"] == 21 and subset[0] == subset[1]
    # The worst case over the suite covers the images every attack covered (the subset), summed over ranks alike.
    worst = [[row for row in report if row["attack"] == "worst_case"][0] for report in (single, double)]
    assert worst[0]["n"] == 21 and worst[0] == worst[1] and worst[0]["correct"] <= subset[0]["correct"]


def test_adversarial_training_under_two_process_ddp(tmp_path):
    config = shrink_config(CONFIGS / "teacher_adv.yaml", tmp_path)
    run_dir = tmp_path / "run"
    command = [sys.executable, "train.py", "--config", str(config), "--run_dir", str(run_dir), "--trainer.max_epochs", "1",
               "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=600)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == (168 // 2) // 32  # each of 2 ranks trains on half of the 168 training images
    assert len(json.loads((run_dir / "robustness_report.json").read_text())) == 5  # clean + 4 attacks


def _noisy_purified_subjects(model: TeacherClassifier, names: tuple[str, ...]) -> None:
    """Gives `model` subjects that share one random pipeline: a tiny purifier at t* = 999 (its output is mostly fresh
    noise) in front of a linear classifier whose prediction follows that noise."""
    torch.manual_seed(0)
    noise_sensitive = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 64, 2))
    unet = UNet2DModel(sample_size=64, in_channels=1, out_channels=1, **TINY_UNET)
    purifier = Purifier(unet, DDPMScheduler(), t_star=999, method="ddim", steps=2, eta=1.0, differentiable=True)
    pipeline = PurifiedClassifier(purifier, noise_sensitive)
    model.robustness_subjects = lambda: [DefendedModel.alone(name, noise_sensitive).behind("purifier/noisy", purifier, pipeline) for name in names]


def test_subjects_are_scored_on_the_same_purification_noise_with_the_grid_on(tmp_path):
    """Rows of a report pair image by image: every subject sees the same purifier noise, also after the grid ran the
    purifier once more, and so does every re-run."""
    model = _tiny_teacher()
    _noisy_purified_subjects(model, ("first", "second"))
    attacks = [AttackSpec(method=method, eps=EPS, steps=2, threat_model="graybox") for method in ("pgd", "fgsm", "bim")]
    runs = []
    for _ in range(2):
        trainer = _trainer(tmp_path, [AdversarialExampleCallback(attacks=attacks)])
        metrics = trainer.test(model, datamodule=_datamodule(synthetic_samples=400), verbose=False)[0]
        rows = {(row["model"], row["attack"]): row for row in json.loads((tmp_path / "robustness_report.json").read_text())}
        for attack in ("none", "pgd2", "fgsm", "bim2"):
            assert {**rows[("first", attack)], "model": None} == {**rows[("second", attack)], "model": None}, attack
        assert 0.3 < rows[("first", "none")]["accuracy"] < 0.7  # predictions do follow the noise
        assert (tmp_path / "adversarial_examples.png").is_file()
        runs.append(metrics)
    assert without_nan(runs[0]) == without_nan(runs[1])


def test_robust_accuracy_never_exceeds_clean_accuracy_on_a_random_defense(tmp_path):
    model = _tiny_teacher()
    _noisy_purified_subjects(model, ("noisy",))
    attacks = [AttackSpec(method="pgd", eps=EPS, steps=2, threat_model=threat, name=threat, eot_samples=2) for threat in ("graybox", "whitebox")]
    trainer = _trainer(tmp_path, [AdversarialExampleCallback(attacks=attacks)])
    trainer.test(model, datamodule=_datamodule(synthetic_samples=400), verbose=False)
    rows = json.loads((tmp_path / "robustness_report.json").read_text())
    for row in rows:
        assert row["accuracy"] <= row["clean_accuracy"], row
    # Fresh noise rights some clean mistakes after the attack: the old definition would have counted them as robust.
    assert any(row["accuracy_after_attack"] > row["accuracy"] for row in rows if row["attack"] != "none")


def test_subsets_of_a_class_sorted_folder_hold_both_classes_in_proportion(tmp_path):
    for name, count in (("normal", 60), ("tuberculosis", 20)):  # a folder source lists one class, then the other
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (64, 64), color=3 * i).save(tmp_path / "data" / name / f"{i:03d}.png")
    datamodule = ChestXRayDataModule(source="folder", root=str(tmp_path / "data"), image_size=64, split=(0.0, 0.0, 1.0), batch_size=16)
    attacks = [AttackSpec(method="fgsm", eps=EPS), AttackSpec(method="pgd", eps=EPS, steps=2, max_images=16)]
    callback = AdversarialExampleCallback(attacks=attacks, test_max_images=40)
    _trainer(tmp_path, [callback]).test(_tiny_teacher(), datamodule=datamodule, verbose=False)
    per_class = {attack: callback._evaluation.counts[("teacher", attack)].total.tolist() for attack in ("none", "fgsm", "pgd2")}
    assert per_class == {"none": [30, 10], "fgsm": [30, 10], "pgd2": [12, 4]}  # 3:1, as in the whole split


def test_a_random_subject_attacked_on_one_draw_is_an_error(tmp_path):
    model = _tiny_teacher()
    _noisy_purified_subjects(model, ("noisy",))
    assert model.robustness_subjects()[0].stochastic
    callback = AdversarialExampleCallback(attacks=[AttackSpec(method="square", eps=EPS, queries=10)])
    with pytest.raises(ValueError, match="Attack square10 on noisy\\+purifier: its source is random.*eot_samples >= 2"):
        _trainer(tmp_path, [callback]).test(model, datamodule=_datamodule(), verbose=False)
    graybox = AdversarialExampleCallback(attacks=[AttackSpec(method="pgd", eps=EPS, steps=1, threat_model="graybox")])
    _trainer(tmp_path, [graybox]).test(model, datamodule=_datamodule(), verbose=False)  # its source is the classifier alone


def test_two_subjects_with_one_key_are_an_error(tmp_path):
    model = _tiny_teacher()
    twin = model.deployed_model()
    model.robustness_subjects = lambda: [twin, twin]
    with pytest.raises(ValueError, match=r"Robustness subjects \['teacher'\] occur more than once"):
        _trainer(tmp_path, [AdversarialExampleCallback(attacks=EVAL_ATTACKS[:1])]).test(model, datamodule=_datamodule(), verbose=False)


def test_non_finite_outputs_are_an_error_not_class_zero(tmp_path):
    model = _tiny_teacher()
    broken = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 64, 2))
    with torch.no_grad():
        broken[1].weight.fill_(float("nan"))
    model.robustness_subjects = lambda: [DefendedModel.alone("broken", broken)]
    with pytest.raises(FloatingPointError, match="Non-finite outputs of broken on clean images"):
        _trainer(tmp_path, [AdversarialExampleCallback(attacks=EVAL_ATTACKS[:1])]).test(model, datamodule=_datamodule(), verbose=False)


class _NeverFlags(torch.nn.Module):
    """A detector that flags nothing: scores 0 under a threshold of 1."""

    def __init__(self):
        super().__init__()
        self.register_buffer("threshold", torch.tensor(1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, 0] * 0


def test_reject_option_rows_of_a_detector_subject(tmp_path):
    """With a detector that flags nothing, robust-or-rejected accuracy is robust accuracy and the evasion rate is the
    share of images right clean and fooled; an adaptive attack is never marked as seen in training; rows say their
    precision."""
    model = _tiny_teacher()
    classifier = model.decision_classifier()
    subject = DefendedModel.alone("teacher", classifier).with_detector(_NeverFlags(), seen=("pgd@0.03",)).attacked_under("whitebox", "adaptive")
    model.robustness_subjects = lambda: [subject]
    attacks = [AttackSpec(method="pgd", eps=EPS, steps=2), AttackSpec(method="pgd", eps=EPS, steps=2, threat_model="adaptive", name="adaptive")]
    _trainer(tmp_path, [AdversarialExampleCallback(attacks=attacks)]).test(model, datamodule=_datamodule(), verbose=False)
    rows = {(row["attack"], row["metric"]): row for row in json.loads((tmp_path / "robustness_report.json").read_text())}
    for attack in ("pgd2", "adaptive"):
        accuracy = rows[(attack, "accuracy")]
        assert rows[(attack, "robust_or_rejected")]["value"] == pytest.approx(accuracy["value"])
        assert rows[(attack, "robust_or_rejected")]["clean_value"] == pytest.approx(accuracy["clean_value"])
        assert rows[(attack, "evasion_rate")]["value"] == pytest.approx(accuracy["clean_value"] - accuracy["value"])
        assert rows[(attack, "detection_rate")]["value"] == 0.0
    assert rows[("pgd2", "detection_rate")]["seen_in_training"] is True
    assert rows[("adaptive", "detection_rate")]["seen_in_training"] is False
    assert {row["precision"] for row in rows.values()} == {"fp32"}
