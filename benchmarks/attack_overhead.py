"""Cost of PGD-k adversarial training: time per training step over a clean step, against the ideal k + 1.

A PGD-k step does k forward-backward passes for the attack plus one for the update, so the ideal
ratio is k + 1; attack passes skip weight gradients and the optimizer, so less is possible.

    python benchmarks/attack_overhead.py --k 10 --output benchmarks/results/attack_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from callbacks import AdversarialExampleCallback  # noqa: E402
from datamodules import ChestXRayDataModule  # noqa: E402
from lightning_modules import TeacherClassifier  # noqa: E402
from robust_cxr.attacks import AttackSpec  # noqa: E402


class StepTimer(Callback):
    """Wall time between consecutive training-batch ends: one full step, attack included."""

    def __init__(self):
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def median_step_seconds(train_attack: AttackSpec | None, args: argparse.Namespace) -> float:
    """Median seconds per training step of the default teacher, skipping `args.warmup` steps."""
    timer = StepTimer()
    callbacks = [timer, AdversarialExampleCallback(train_attack=train_attack, train_fraction=1.0)]
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, precision=args.precision, max_epochs=1, callbacks=callbacks,
        limit_train_batches=args.steps + args.warmup, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    model = TeacherClassifier(num_classes=2, model_kwargs={"depth": 6}, image_size=args.image_size)
    datamodule = ChestXRayDataModule(image_size=args.image_size, batch_size=args.batch_size, synthetic_samples=args.batch_size * (args.steps + args.warmup + 1) * 10 // 7)
    trainer.fit(model, datamodule=datamodule)
    return statistics.median(later - earlier for earlier, later in zip(timer.ends[args.warmup :], timer.ends[args.warmup + 1 :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=10, help="PGD steps")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per setting")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/attack_overhead.json"))
    args = parser.parse_args()

    clean = median_step_seconds(None, args)
    adversarial = median_step_seconds(AttackSpec(method="pgd", eps=0.03, steps=args.k), args)
    result = {
        "benchmark": "attack_overhead",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": "TeacherClassifier vit_tiny_r_s16_p8_224 (depth 6), the default teacher",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "precision": args.precision,
        "k": args.k,
        "clean_step_seconds": clean,
        "adversarial_step_seconds": adversarial,
        "ratio": adversarial / clean,
        "ideal_ratio": args.k + 1,
        "ratio_over_ideal": adversarial / clean / (args.k + 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
