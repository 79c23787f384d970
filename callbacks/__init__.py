"""Lightning callbacks shared by every stage."""

from callbacks.adversarial import AdversarialExampleCallback
from callbacks.epoch_seeding import EpochSeeding

__all__ = ["AdversarialExampleCallback", "EpochSeeding"]
