"""The frequency-domain detector and reformer: the converter on known signals, the threshold's false-positive rate,
flagged-only reforming, save / load, the adaptive threat model, the attack mix, and clear errors."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from callbacks import AdversarialExampleCallback
from datamodules import ChestXRayDataModule
from lightning_modules import AdversarialDetector, AdversarialReformer, LungSegmenter
from lightning_modules.frequency_defense import _load_detector
from lightning_modules.stage import load_stage_module
from robust_cxr.attacks import AttackSpec, craft_adversarial
from robust_cxr.frequency import DetectThenReform, FrequencyDetector, dct_matrix, frequency_features
from robust_cxr.metrics import threshold_for_false_positive_rate
from robust_cxr.models import ResidualRestorer
from robust_cxr.tasks import ClassificationTask, SegmentationTask
from robust_cxr.threat import DefendedModel

SIZE = 32
TINY_SEGMENTER = dict(encoder_name="tu-resnet10t", encoder_depth=3, decoder_channels=[16, 8, 4])
TRAIN_MIX = [AttackSpec(method="pgd", eps=0.03, steps=2), AttackSpec(method="fgsm", eps=0.02)]


def _data() -> ChestXRayDataModule:
    return ChestXRayDataModule(image_size=SIZE, synthetic_samples=200, batch_size=32, num_workers=0, seed=0, masks=True)


def _fit(module: L.LightningModule, directory: Path, callbacks=(), **limits) -> Path:
    """Fits `module` on the tiny masks data and returns the path of its saved checkpoint."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(directory), callbacks=list(callbacks), **{"max_epochs": 1, **limits})
    trainer.fit(module, datamodule=_data())
    path = directory / f"{type(module).__name__}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def stages(tmp_path_factory, single_thread) -> SimpleNamespace:
    """Checkpoints of a tiny segmenter (2 epochs), a detector for it and a reformer (1 epoch each, the attack mix)."""
    directory = tmp_path_factory.mktemp("frequency")
    L.seed_everything(0, verbose=False)
    segmenter = _fit(LungSegmenter(image_size=SIZE, **TINY_SEGMENTER), directory, max_epochs=2)
    detector = _fit(AdversarialDetector(target_ckpt=str(segmenter), image_size=SIZE, widths=(8, 16)), directory,
                    [AdversarialExampleCallback(train_attack_mix=TRAIN_MIX, train_fraction=1.0)])
    reformer = _fit(AdversarialReformer(target_ckpt=str(segmenter), detector_ckpt=str(detector), image_size=SIZE, decoder_channels=(8, 8, 8)),
                    directory, [AdversarialExampleCallback(train_attack=TRAIN_MIX[0], train_fraction=0.5)], limit_train_batches=2)
    return SimpleNamespace(segmenter=segmenter, detector=detector, reformer=reformer)


@pytest.mark.parametrize("frequency", [3, 5])
def test_log_magnitude_of_a_sinusoid_peaks_at_its_frequency(frequency):
    columns = torch.arange(SIZE, dtype=torch.float)
    image = (0.5 + 0.4 * torch.cos(2 * math.pi * frequency * columns / SIZE)).expand(1, 1, SIZE, SIZE)
    spectrum = frequency_features(image, "log_magnitude")[0, 0]
    spectrum[SIZE // 2, SIZE // 2] = 0  # the mean
    peaks = (spectrum > 0.5 * spectrum.max()).nonzero().tolist()
    assert peaks == [[SIZE // 2, SIZE // 2 - frequency], [SIZE // 2, SIZE // 2 + frequency]]
    assert 0 <= spectrum.min() and spectrum.max() <= 1
    with_phase = frequency_features(image, "log_magnitude_phase")
    assert with_phase.shape == (1, 2, SIZE, SIZE) and with_phase[:, 1].abs().max() <= 1


def test_block_dct_is_orthonormal_and_puts_a_constant_into_dc_coefficients():
    basis = dct_matrix(8)
    assert torch.allclose(basis @ basis.T, torch.eye(8), atol=1e-6)
    coefficients = frequency_features(torch.full((1, 1, 16, 16), 0.5), "block_dct")[0, 0]
    assert (coefficients.abs() > 1e-6).nonzero().tolist() == [[0, 0], [0, 8], [8, 0], [8, 8]]
    with pytest.raises(ValueError, match="multiples of 8"):
        frequency_features(torch.rand(1, 1, 12, 12), "block_dct")
    with pytest.raises(ValueError, match="Unknown frequency representation 'wavelet'"):
        frequency_features(torch.rand(1, 1, 8, 8), "wavelet")


@pytest.mark.parametrize("false_positive_rate", [0.0, 0.05, 0.2])
def test_threshold_flags_at_most_its_false_positive_rate_and_no_lower_one_would(false_positive_rate):
    scores = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    threshold = threshold_for_false_positive_rate(scores, false_positive_rate)
    assert (scores > threshold).float().mean() <= false_positive_rate
    lower = scores[scores <= threshold].max()  # the next threshold down flags one more image
    assert (scores >= lower).float().mean() > false_positive_rate


def test_the_detector_stage_meets_its_false_positive_rate_on_validation_and_records_its_attacks(stages):
    detector = load_stage_module(stages.detector, "the stages fixture")
    data = _data()
    data.setup("validate")
    clean = torch.cat([batch["image"] for batch in data.val_dataloader()])
    assert detector.model.flagged(clean).float().mean() <= 0.05
    assert detector.seen_attacks == ["fgsm@0.02", "pgd@0.03"]


def test_flagged_only_reforming_leaves_unflagged_images_bit_identical():
    torch.manual_seed(0)
    detector, reformer = FrequencyDetector(1, widths=(8,)).eval(), ResidualRestorer(1, decoder_channels=(8, 8, 8)).eval()
    images = torch.rand(16, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.nn.init.normal_(reformer.head[-1].weight, std=0.1)  # an untrained reformer is the identity
        detector.threshold.fill_(detector(images).median())
        flagged = detector.flagged(images)
        output = DetectThenReform(detector, reformer)(images)
        reformed = reformer(images)
    assert 0 < flagged.sum() < len(images)
    assert torch.equal(output[~flagged], images[~flagged])
    assert torch.equal(output[flagged], reformed[flagged]) and not torch.equal(reformed[flagged], images[flagged])


def test_detector_and_reformer_round_trip_through_their_checkpoints(stages):
    images = torch.rand(4, 1, SIZE, SIZE)
    reformer_stage = load_stage_module(stages.reformer, "the stages fixture")
    detector_stage = load_stage_module(stages.detector, "the stages fixture")
    assert isinstance(reformer_stage, AdversarialReformer) and isinstance(detector_stage, AdversarialDetector)
    assert torch.equal(reformer_stage.detector.threshold, detector_stage.model.threshold)
    with torch.no_grad():
        assert torch.equal(reformer_stage.detector(images), detector_stage.model(images))
    subjects = reformer_stage.robustness_subjects()
    assert [s.defense for s in subjects] == ["none", "reformer", "detector+reformer"]
    assert subjects[2].detector_seen == ("fgsm@0.02", "pgd@0.03")
    reloaded = load_stage_module(stages.reformer, "the stages fixture")
    with torch.no_grad():
        assert torch.equal(reloaded.model(images), reformer_stage.model(images))


def test_the_adaptive_attack_evades_the_detector_that_plain_pgd_ignores():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIZE * SIZE, 2)).eval()
    detector = FrequencyDetector(1, widths=(8,)).eval()
    with torch.no_grad():  # a detector that responds to the image, scoring around 0
        detector.score.weight.mul_(50)
        detector.score.bias.fill_(-float(detector(torch.rand(64, 1, SIZE, SIZE)).mean()))
    subject = DefendedModel.alone("toy", model).with_detector(detector).attacked_under("whitebox", "adaptive")
    images, labels = torch.rand(16, 1, SIZE, SIZE), torch.randint(0, 2, (16,))
    spec = AttackSpec(method="pgd", eps=0.05, steps=10)
    adaptive_spec = AttackSpec(method="pgd", eps=0.05, steps=10, threat_model="adaptive")
    plain = craft_adversarial(spec, subject.attack_source("whitebox"), images, labels)
    adaptive = craft_adversarial(adaptive_spec, subject.attack_source("adaptive"), images, labels,
                                 loss_fn=subject.attack_loss(adaptive_spec, None))
    with torch.no_grad():
        assert detector(adaptive).mean() < detector(plain).mean() - 0.1
    assert subject.attack_source("adaptive") is not None
    assert DefendedModel.alone("toy", model).attack_source("adaptive") is None
    with pytest.raises(ValueError, match="adaptive threat model ascends a loss with a detector term"):
        AttackSpec(method="apgd_ce", threat_model="adaptive")


def test_the_attack_mix_draws_every_attack_by_step_the_same_way_each_time():
    callback = AdversarialExampleCallback(train_attack_mix=TRAIN_MIX)
    draws = [callback._scheduled_train_attack(SimpleNamespace(global_step=step)).label for step in range(40)]
    assert set(draws) == {"pgd2", "fgsm"}
    assert draws == [callback._scheduled_train_attack(SimpleNamespace(global_step=step)).label for step in range(40)]
    with pytest.raises(ValueError, match="not both"):
        AdversarialExampleCallback(train_attack=TRAIN_MIX[0], train_attack_mix=TRAIN_MIX)


def test_clear_errors_for_a_target_of_another_image_size_or_a_detector_of_another_task(stages):
    with pytest.raises(ValueError, match="--data.image_size 32"):
        AdversarialDetector(target_ckpt=str(stages.segmenter), image_size=64)
    with pytest.raises(ValueError, match="trained against a segmentation target, this target is classification"):
        _load_detector(str(stages.detector), ClassificationTask(["a", "b"]))
    with pytest.raises(ValueError, match="not an AdversarialDetector"):
        _load_detector(str(stages.segmenter), SegmentationTask())
    with pytest.raises(ValueError, match="set adversarial.train_attack"):
        _fit(AdversarialDetector(target_ckpt=str(stages.segmenter), image_size=SIZE), stages.segmenter.parent / "none")
