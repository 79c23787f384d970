"""Lightning callbacks shared by every stage."""

from callbacks.adversarial import AdversarialExampleCallback

__all__ = ["AdversarialExampleCallback"]
