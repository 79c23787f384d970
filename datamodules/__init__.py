"""Data for every stage: the shared DataModule and the transforms its hyperparameters take.

`sources` reads images, `sampling` splits, orders and samples them, `dataset` serves a split as tensors, `transforms`
augments and degrades them, `chest_xray` ties them into `ChestXRayDataModule`, and `synthetic` draws phantoms.
"""

from datamodules.chest_xray import ChestXRayDataModule
from datamodules.transforms import Augmentation, Degradation

__all__ = ["Augmentation", "ChestXRayDataModule", "Degradation"]
