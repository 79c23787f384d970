"""LightningModules, one per stage; they wire the plain modules of `robust_cxr` to data, optimizers and logging."""

from lightning_modules.classifier import ImageClassifierModule
from lightning_modules.frequency_defense import AdversarialDetector, AdversarialReformer
from lightning_modules.nim import NoisyImageModeling
from lightning_modules.purifier import DiffusionPurifier
from lightning_modules.purify_finetune import PurifyThenFinetune, PurifyThenFinetuneRestorer
from lightning_modules.restorer import Restorer
from lightning_modules.segmenter import LungSegmenter
from lightning_modules.sevit import SelfEnsembleViT
from lightning_modules.student import DistilledStudent
from lightning_modules.teacher import TeacherClassifier

__all__ = ["AdversarialDetector", "AdversarialReformer", "DiffusionPurifier", "DistilledStudent", "ImageClassifierModule", "LungSegmenter", "NoisyImageModeling", "PurifyThenFinetune", "PurifyThenFinetuneRestorer", "Restorer", "SelfEnsembleViT", "TeacherClassifier"]
