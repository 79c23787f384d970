"""The adversarial-example callback of every stage's config (its ``adversarial:`` section): adversarial training
(`callbacks.adversarial_training`) and robust evaluation (`callbacks.robust_evaluation`) as one callback, so that every
attack setting is an override of one section. What the outputs are, what attacks ascend and how outputs are scored is
the stage's task (`robust_cxr.tasks`), what is attacked its protocol (`lightning_modules.stage.StageModule`); nothing
here depends on either.
"""

from __future__ import annotations

from callbacks.adversarial_training import AdversarialTraining
from callbacks.robust_evaluation import RobustEvaluation
from robust_cxr.attacks import AttackSpec


class AdversarialExampleCallback(AdversarialTraining, RobustEvaluation):
    """Adversarial training and robust evaluation, on every DDP rank's own shard.

    Args:
        attacks, val_every_n_epochs, val_max_images, test_max_images, grid_images, worst_case, batch_results_dir,
            progress, subjects: the evaluation (see `RobustEvaluation`).
        train_attack, train_attack_mix, train_fraction, train_eps_warmup_epochs, trades_beta: adversarial training (see
            `AdversarialTraining`).
        seed: seeds both (random starts depend only on (seed, image index), not on sharding).
    """

    def __init__(
        self,
        attacks: list[AttackSpec] | None = None,
        train_attack: AttackSpec | None = None,
        train_attack_mix: list[AttackSpec] | None = None,
        train_fraction: float = 0.5,
        train_eps_warmup_epochs: float = 0.0,
        trades_beta: float | None = None,
        val_every_n_epochs: int = 1,
        val_max_images: int | None = 128,
        test_max_images: int | None = None,
        grid_images: int = 8,
        seed: int = 0,
        worst_case: bool = False,
        batch_results_dir: str | None = None,
        progress: bool = False,
        subjects: list[str] | None = None,
    ):
        AdversarialTraining.__init__(self, train_attack, train_attack_mix, train_fraction, train_eps_warmup_epochs, trades_beta, seed)
        RobustEvaluation.__init__(self, attacks, val_every_n_epochs, val_max_images, test_max_images, grid_images, seed, worst_case,
                                  batch_results_dir, progress, subjects)
