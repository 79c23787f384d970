"""Purification speed against the robustness it keeps: DDPM from t* (the reference) vs DDIM with k steps.

For each sampler (DDPM, then DDIM with each k of --ddim-steps and each n of --n-repeats purifications per
image, logits averaged) it reports images per second and peak memory of the defended teacher (purifier then
classifier, the UNet always on batches of --batch-size images), its accuracy on clean test images and on
gray-box PGD examples (crafted once on the undefended teacher and shared by every sampler), and speed-ups and
robust-accuracy gaps against DDPM, each gap with its standard error over the paired test images.

    python benchmarks/purify_throughput.py --output benchmarks/results/purify_throughput_cpu.json
    python benchmarks/purify_throughput.py --eta 1 --n-repeats 1 2 --max-images 128   # stochastic DDIM, averaged
    python benchmarks/purify_throughput.py --data-source folder --data-root ../shared/data/chest_xray_pneumonia_128 \
        --teacher-ckpt runs/pneumonia/teacher/checkpoints/best.ckpt --purifier-dir runs/pneumonia/purifier/export
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from datamodules import ChestXRayDataModule  # noqa: E402
from lightning_modules.classifier import TEACHER_COMMAND, load_classifier  # noqa: E402
from robust_cxr.attacks import AttackSpec, craft_adversarial  # noqa: E402
from robust_cxr.purification import PurifiedClassifier, Purifier  # noqa: E402


@contextmanager
def peak_memory_mb(device: torch.device) -> Iterator[dict]:
    """Yields a dict whose ``peak_mb`` is set on exit: CUDA's peak allocation, or on CPU the resident-set high-water
    mark above the level at entry, sampled every 2 ms from /proc/self/statm."""
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def resident_bytes() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    start, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["peak_mb"] = max(0, peak[0] - start) / 2**20


@torch.no_grad()
def timed_correct(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> tuple[torch.Tensor, float]:
    """Per-image top-1 correctness (N,) bool of `model` on images (N, C, H, W) in [0, 1] with labels (N,), and
    the seconds it took; the global RNG (the purifier's noise) is seeded with `seed` first."""
    torch.manual_seed(seed)
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    start = time.perf_counter()
    predictions = torch.cat([model(batch).argmax(dim=1) for batch in images.split(batch_size)])
    if images.is_cuda:
        torch.cuda.synchronize(images.device)
    return predictions == labels, time.perf_counter() - start


def paired_gap(correct: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Accuracy difference of two (N,) bool correctness vectors on the same images, and its standard error
    (per-image differences; it covers both the choice of test images and both purifiers' noise)."""
    difference = correct.float() - reference.float()
    return difference.mean().item(), (difference.std() / len(difference) ** 0.5).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-ckpt", default="runs/teacher/checkpoints/best.ckpt")
    parser.add_argument("--purifier-dir", default="runs/purifier/export")
    parser.add_argument("--data-source", default="synthetic", choices=["synthetic", "folder", "medmnist"])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--t-star", type=int, default=100)
    parser.add_argument("--ddim-steps", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale: 0 deterministic, 1 DDPM's posterior noise")
    parser.add_argument("--n-repeats", type=int, nargs="+", default=[1], help="DDIM purifications per image, logits averaged")
    parser.add_argument("--eps", type=float, default=0.03)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--max-images", type=int, default=None, help="N test images drawn at random with --seed (default: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per UNet call: n repeats of batch-size // n images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)

    teacher = load_classifier(args.teacher_ckpt, TEACHER_COMMAND)
    classifier = teacher.model.to(device)
    data = ChestXRayDataModule(
        source=args.data_source, root=args.data_root, image_size=args.image_size, channels=teacher.hparams.in_chans
    )
    data.setup("test")
    test_set = data.datasets["test"]
    batch = next(iter(torch.utils.data.DataLoader(test_set, batch_size=len(test_set))))
    # A random subset: folder test sets are ordered by class, so the first N images can all be one class.
    chosen = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(args.seed))[: args.max_images]
    images, labels, keys = batch["image"][chosen].to(device), batch["label"][chosen].to(device), batch["index"][chosen]
    attack = AttackSpec(method="pgd", eps=args.eps, steps=args.attack_steps)
    adversarial = torch.cat(
        [
            craft_adversarial(attack, classifier, x, y, num_classes=teacher.hparams.num_classes, keys=k, seed=args.seed)
            for x, y, k in zip(images.split(args.batch_size), labels.split(args.batch_size), keys.split(args.batch_size))
        ]
    )

    def correct(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = args.batch_size) -> torch.Tensor:
        return timed_correct(model, inputs, labels, batch_size, args.seed)[0]

    teacher_clean = correct(classifier, images)
    results = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        torch=torch.__version__, images=len(images), t_star=args.t_star, attack=f"graybox pgd{args.attack_steps} eps {args.eps}",
        robust="right both clean and attacked, clean and attacked images purified on independent draws (the report's convention)",
        purifier_batch=args.batch_size, teacher_clean_acc=teacher_clean.float().mean().item(),
        teacher_graybox_acc=(teacher_clean & correct(classifier, adversarial)).float().mean().item(), samplers=[],
    )
    settings = [(dict(method="ddpm"), 1)] + [(dict(method="ddim", steps=k, eta=args.eta), n) for k in args.ddim_steps for n in args.n_repeats]
    reference_correct = None
    for setting, repeats in settings:
        purifier = Purifier.from_pretrained(args.purifier_dir, t_star=args.t_star, **setting)
        defended = PurifiedClassifier(purifier, classifier, n_repeats=repeats).to(device)
        # The repeats of an image share the purifier's batch, so every row runs the UNet on batches of --batch-size.
        batch_size = max(1, args.batch_size // repeats)
        timed_correct(defended, images[:8], labels[:8], batch_size, args.seed)  # warm-up: allocator and kernel selection
        with peak_memory_mb(device) as memory:
            adversarial_correct, seconds = timed_correct(defended, adversarial, labels, batch_size, args.seed + 1)  # independent draws
        clean_correct = correct(defended, images, batch_size)
        robust_correct = clean_correct & adversarial_correct
        reference_correct = robust_correct if reference_correct is None else reference_correct
        gap, gap_se = paired_gap(robust_correct, reference_correct)
        row = dict(
            sampler=purifier.label, n_repeats=repeats,
            unet_calls_per_image=repeats * (args.t_star if setting["method"] == "ddpm" else setting["steps"]),
            images_per_s=len(images) / seconds, peak_memory_mb=memory["peak_mb"],
            clean_acc=clean_correct.float().mean().item(),
            graybox_robust_acc=robust_correct.float().mean().item(),
            robust_acc_gap_vs_ddpm=gap, robust_acc_gap_se=gap_se,
        )
        results["samplers"].append(row)
        print(json.dumps(row), flush=True)
    reference = results["samplers"][0]
    for row in results["samplers"]:
        row["speedup_vs_ddpm"] = row["images_per_s"] / reference["images_per_s"]
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
