"""Checkpoints load with weights_only: every stage's loads, a resumed run loads its checkpoint so, and a file that would
run code when unpickled (or imported) is refused through every command before it runs anything."""

from __future__ import annotations

import pathlib
import pickletools
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch

import evaluate
import export
import predict
import train
from callbacks import AdversarialExampleCallback
from conftest import CONFIGS, TINY_NIM, TINY_UNET, TINY_VIT, fit_and_save, run_train, shrink_config
from datamodules import Augmentation, ChestXRayDataModule, Degradation
from lightning_modules import (AdversarialDetector, AdversarialReformer, DiffusionPurifier, DistilledStudent, LungSegmenter,
                               NoisyImageModeling, PurifyThenFinetune, PurifyThenFinetuneRestorer, Restorer, SelfEnsembleViT,
                               TeacherClassifier)
from lightning_modules.stage import load_stage_module
from robust_cxr.attacks import AttackSpec
from robust_cxr.safe_loading import TRUST_CHECKPOINTS_ENV, UntrustedCheckpointError, load_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 32
FGSM = AttackSpec(method="fgsm", eps=0.03)


@pytest.fixture(scope="module")
def stage_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint of every stage, each fitted one batch at 32 px on a DataModule built with `Augmentation` and
    `Degradation` objects (which its checkpoint stores), later stages on the earlier ones."""
    directory = tmp_path_factory.mktemp("every_stage")
    L.seed_everything(0, verbose=False)
    data = ChestXRayDataModule(image_size=SIZE, synthetic_samples=120, batch_size=16, num_workers=0, masks=True,
                               augmentation=Augmentation(probability=1.0), degradation=Degradation(photons=None))
    paths: dict[str, Path] = {}

    def fit(name: str, module: L.LightningModule, attacked: bool = False) -> str:  # in a folder of its own: a denoiser exports there
        callbacks = [AdversarialExampleCallback(train_attack=FGSM)] if attacked else []
        paths[name] = fit_and_save(module, data, directory / name / f"{name}.ckpt", callbacks, max_steps=1)
        return str(paths[name])

    tiny = dict(image_size=SIZE)
    teacher = fit("teacher", TeacherClassifier(num_classes=2, model_kwargs=TINY_VIT, **tiny))
    fit("purifier", DiffusionPurifier(unet=dict(TINY_UNET), num_train_timesteps=100, max_train_timestep=50, t_star=20, steps=2, **tiny))
    fit("nim", NoisyImageModeling(architecture=TINY_NIM, **tiny))
    fit("purify_finetune", PurifyThenFinetune(num_classes=2, teacher_ckpt=teacher, purifier_dir=str(directory / "purifier" / "export"), **tiny))
    fit("purify_finetune_nim", PurifyThenFinetune(num_classes=2, teacher_ckpt=teacher, purifier_dir=str(directory / "nim" / "export"), **tiny))
    fit("student", DistilledStudent(num_classes=2, teacher_ckpt=teacher, purifier_dir=None, **tiny))
    fit("sevit", SelfEnsembleViT(num_classes=2, teacher_ckpt=teacher, num_blocks=2, hidden_sizes=(16,), **tiny))
    segmenter = fit("segmenter", LungSegmenter(encoder_depth=3, decoder_channels=[16, 8, 4], **tiny))
    detector = fit("detector", AdversarialDetector(target_ckpt=segmenter, widths=(8,), **tiny), attacked=True)
    fit("reformer", AdversarialReformer(target_ckpt=segmenter, detector_ckpt=detector, decoder_channels=(8, 8, 8), **tiny), attacked=True)
    restorer = fit("restorer", Restorer(encoder_depth=2, decoder_channels=(16, 8), feature_channels=8, **tiny))
    fit("purify_finetune_restorer", PurifyThenFinetuneRestorer(restorer_ckpt=restorer, purifier_dir=str(directory / "purifier" / "export"),
                                                               train_strength_range=(10, 20), **tiny))
    return paths


STAGES = {"teacher": TeacherClassifier, "purifier": DiffusionPurifier, "nim": NoisyImageModeling, "purify_finetune": PurifyThenFinetune,
          "purify_finetune_nim": PurifyThenFinetune, "student": DistilledStudent, "sevit": SelfEnsembleViT, "segmenter": LungSegmenter,
          "detector": AdversarialDetector, "reformer": AdversarialReformer, "restorer": Restorer,
          "purify_finetune_restorer": PurifyThenFinetuneRestorer}


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_checkpoint_loads_with_weights_only(name, stage_checkpoints):
    checkpoint = load_checkpoint(stage_checkpoints[name])  # weights_only: the file holds only allowed types
    data = checkpoint["datamodule_hyper_parameters"]
    assert isinstance(data["augmentation"], Augmentation) and isinstance(data["degradation"], Degradation), "the allow-list went untested"
    module = load_stage_module(stage_checkpoints[name], "the stage_checkpoints fixture")
    assert type(module) is STAGES[name]
    state = module.state_dict()  # SEViT's state holds its frozen upstream ViT, which its checkpoint references
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(state[key], value), key


def test_a_checkpoint_naming_the_types_by_their_former_module_loads_with_weights_only(monkeypatch):
    """tests/data/datamodule_hparams_chest_xray_path.ckpt was written by `torch.save` while `Augmentation` and `Degradation`
    lived in datamodules.chest_xray, so it names them by that module; it loads into today's classes, with weights_only
    and in full."""
    path = Path(__file__).parent / "data" / "datamodule_hparams_chest_xray_path.ckpt"
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(name for name in archive.namelist() if name.endswith("/data.pkl")))
    named = {argument.replace(" ", ".") for opcode, argument, _ in pickletools.genops(pickled) if opcode.name == "GLOBAL"}
    assert {"datamodules.chest_xray.Augmentation", "datamodules.chest_xray.Degradation"} <= named, named
    assert Augmentation.__module__ != "datamodules.chest_xray", "the former module path went untested"
    expected = {"augmentation": Augmentation(probability=1.0, rotate_degrees=3.0), "degradation": Degradation(photons=None, read_noise=0.01)}
    for trusted in ("0", "1"):
        monkeypatch.setenv(TRUST_CHECKPOINTS_ENV, trusted)
        data = load_checkpoint(path)["datamodule_hyper_parameters"]
        assert {key: data[key] for key in expected} == expected  # a dataclass equals only an instance of its own class


def test_a_resumed_run_loads_every_checkpoint_with_weights_only(tmp_path, monkeypatch):
    config = shrink_config(CONFIGS / "teacher.yaml", tmp_path)
    quick = ("--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--adversarial.test_max_images", "8")
    run_dir = tmp_path / "run"
    run_train(config, run_dir, "--trainer.max_epochs", "1", *quick)
    loads = []
    torch_load = torch.load

    def recording_load(file, *args, **kwargs):
        loads.append((Path(getattr(file, "name", file)).name, kwargs.get("weights_only")))
        return torch_load(file, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    run_train(config, run_dir, "--trainer.max_epochs", "2", *quick)
    assert {name for name, _ in loads} >= {"last.ckpt", "best.ckpt"}, "Lightning's resume and test loaded nothing"
    assert all(weights_only is True for name, weights_only in loads if name.endswith(".ckpt")), loads
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4, "the run did not continue from its step"


class _TouchesFile:
    """Unpickles as `Path.touch(path)`: what a malicious checkpoint could run instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


@pytest.fixture
def crafted_checkpoint(tmp_path) -> tuple[Path, Path]:
    """A checkpoint with a stage's entries whose hyperparameters create `tmp_path/created` when unpickled, and that path."""
    created = tmp_path / "created"
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"module_class": "lightning_modules.TeacherClassifier", "global_step": 9, "state_dict": {},
                "hyper_parameters": {"num_classes": 2, "payload": _TouchesFile(created)},
                "datamodule_hyper_parameters": {"payload": _TouchesFile(created)}}, path)
    return path, created


ENTRY_POINTS = {
    "load_stage_module": lambda path: load_stage_module(path, "test"),
    "evaluate": lambda path: evaluate.run_defaults(path, None),
    "export": lambda path: export.main([str(path)]),
    "predict": lambda path: predict.main([str(path), str(path)]),
    "train --resume auto": lambda path: train.resume_checkpoint(path.parent.parent, "auto"),
    "train --resume PATH": lambda path: run_train(shrink_config(CONFIGS / "teacher.yaml", path.parent), path.parent / "run", "--resume", str(path)),
}


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(entry_point, crafted_checkpoint):
    path, created = crafted_checkpoint
    with pytest.raises(UntrustedCheckpointError) as error:
        ENTRY_POINTS[entry_point](path)
    message = str(error.value)
    assert str(path) in message and "pathlib" in message and f"{TRUST_CHECKPOINTS_ENV}=1" in message
    assert not created.exists(), "the payload ran"


def test_the_trust_opt_in_unpickles_in_full(crafted_checkpoint, monkeypatch):
    path, created = crafted_checkpoint
    monkeypatch.setenv(TRUST_CHECKPOINTS_ENV, "1")
    assert load_checkpoint(path)["global_step"] == 9
    assert created.exists(), "the payload is inert: the refusal test would prove nothing"


def test_a_checkpoint_naming_a_stage_class_outside_the_stages_is_refused_before_its_import(tmp_path, monkeypatch):
    created = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(f"from pathlib import Path\nPath({str(created)!r}).touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "planted.ckpt"
    torch.save({"module_class": "planted_module.Stage", "state_dict": {}}, path)
    with pytest.raises(UntrustedCheckpointError, match="planted_module.Stage, outside lightning_modules"):
        load_stage_module(path, "test")
    assert not created.exists()
