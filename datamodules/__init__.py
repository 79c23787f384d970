"""The DataModule shared by every stage."""

from datamodules.chest_xray import Augmentation, ChestXRayDataModule, Degradation

__all__ = ["Augmentation", "ChestXRayDataModule", "Degradation"]
