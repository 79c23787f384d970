"""Lightning callbacks shared by every stage."""

from callbacks.adversarial import AdversarialExampleCallback
from callbacks.adversarial_training import AdversarialTraining
from callbacks.epoch_seeding import EpochSeeding
from callbacks.robust_evaluation import RobustEvaluation

__all__ = ["AdversarialExampleCallback", "AdversarialTraining", "EpochSeeding", "RobustEvaluation"]
