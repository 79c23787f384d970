"""Generate labelled training data with a DDPM trained on the domain: sample, label with a classifier, write a dataset.

    python generate.py runs/teacher --purifier_dir runs/generator/export --count 6000 --output runs/generate/generated.npz
    python generate.py runs/teacher --purifier_dir runs/generator/export --count 6000 --steps 50 --min_confidence 0.9
    python train.py --config configs/teacher_adv.yaml --data.generated runs/generate/generated.npz --data.generated_ratio 0.7
    python generate.py ... --debug                                              # the full traceback of an error

The classifier is a run directory or checkpoint file of any classifier stage (its data settings too, as in
`evaluate.py`); it labels each image with its class probabilities at its operating point (robust self-training). The
export must be a diffusion purifier stage's, trained on every timestep (``--model.init_args.max_train_timestep null``;
configs/generator.yaml): images are sampled by DDIM with `--steps` steps from pure noise keyed by (`--seed`, image
index), in batches of `--batch_size`, each finished batch kept under `<output>.parts/`, so the same command after a kill
resumes and gives the images an uninterrupted run would. The dataset keeps the images whose top probability is at least
`--min_confidence`. With `--probe_epochs` above 0 a small CNN is trained on the generated images alone and tested on
the real test split: the quality figure, written with the counts and the cost to `<output stem>_quality.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query PyPI on import

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from callbacks.evaluation_journal import check_or_write_settings  # noqa: E402
from datamodules import ChestXRayDataModule  # noqa: E402
from datamodules.sources import read_generated  # noqa: E402
from lightning_modules.classifier import load_classifier  # noqa: E402
from robust_cxr.cli_errors import run_cli  # noqa: E402
from robust_cxr.generation import load_sampler, probe_scores, sample_images, soft_targets, train_probe, write_generated  # noqa: E402
from robust_cxr.runs import MADE_BY, file_sha256, find_run, run_defaults, upstream_sha256  # noqa: E402
from robust_cxr.strength import stratified_images  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("classifier", help="a classifier run directory (config.yaml, checkpoints/best.ckpt) or a checkpoint file")
    parser.add_argument("--purifier_dir", required=True, help="a diffusion purifier export trained on every timestep")
    parser.add_argument("--count", type=int, required=True, help="images to sample")
    parser.add_argument("--output", default="runs/generate/generated.npz", help="the dataset to write (.npz)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps from pure noise")
    parser.add_argument("--min_confidence", type=float, default=0.0, help="keep images whose top class probability is at least this")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="keys each image's noise with its index")
    parser.add_argument("--probe_epochs", type=int, default=0, help="train a small CNN on the generated images for this many epochs "
                        "and test it on the real test split (0: no quality figure)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(args: list[str] | None = None) -> dict:
    """Parses `args` (default: the command line), generates, labels, writes; returns the quality record."""
    options = build_parser().parse_args(args)
    if options.count < 1 or options.steps < 1 or options.batch_size < 1 or not 0 <= options.min_confidence <= 1:
        raise ValueError("--count, --steps and --batch_size must be >= 1 and --min_confidence in [0, 1]; got "
                         f"{options.count}, {options.steps}, {options.batch_size} and {options.min_confidence}.")
    checkpoint, config = find_run(options.classifier)
    stage = load_classifier(checkpoint, MADE_BY)
    device = torch.device(options.device)
    classifier = stage.deployed_model().undefended.to(device)  # at its operating point
    sampler = load_sampler(options.purifier_dir, options.steps).to(device)
    hp, unet = stage.hparams, sampler.unet.config
    if (unet.in_channels, unet.sample_size) != (hp.in_chans, hp.image_size):
        raise ValueError(f"The DDPM in {options.purifier_dir} makes {unet.in_channels}-channel {unet.sample_size} px images, the classifier "
                         f"takes {hp.in_chans}-channel {hp.image_size} px: give an export trained on the classifier's data.")
    output = Path(options.output)
    parts = output.with_name(output.name + ".parts")
    check_or_write_settings(parts / "settings.json", dict(
        classifier_sha256=file_sha256(checkpoint), purifier=upstream_sha256({"purifier_dir": options.purifier_dir})["purifier_dir"],
        count=options.count, steps=options.steps, seed=options.seed, batch_size=options.batch_size,
    ), fix=f"Delete {parts} to generate afresh, or write elsewhere (--output).")
    started = time.perf_counter()
    images, targets = [], []
    for start in tqdm(range(0, options.count, options.batch_size), desc="generating", unit="batch"):
        part = parts / f"part{start // options.batch_size}.pt"
        if not part.is_file():
            batch = sample_images(sampler, torch.arange(start, min(start + options.batch_size, options.count), device=device), options.seed)
            torch.save(dict(images=batch.cpu(), targets=soft_targets(classifier, batch).cpu()), part)
        record = torch.load(part, map_location="cpu", weights_only=True)
        images.append(record["images"])
        targets.append(record["targets"])
    seconds = time.perf_counter() - started
    class_names = list(hp.class_names or [str(label) for label in range(hp.num_classes)])
    kept = write_generated(output, torch.cat(images), torch.cat(targets), class_names, options.min_confidence)
    quality = dict(dataset=str(output), count=options.count, kept=kept, steps=options.steps, min_confidence=options.min_confidence,
                   generation_seconds=seconds, seconds_per_image=seconds / options.count, classifier=str(checkpoint), purifier_dir=options.purifier_dir)
    if options.probe_epochs > 0:
        quality["probe"] = probe(output, run_defaults(checkpoint, config)["data"], hp.num_classes, options.probe_epochs, options.seed)
    output.with_name(f"{output.stem}_quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    print(json.dumps(quality, indent=2))
    return quality


def probe(dataset: Path, data: dict, num_classes: int, epochs: int, seed: int) -> dict:
    """A small CNN trained on the generated images of `dataset` alone, tested on the real test split of `data` (the
    classifier's data settings): its accuracy, balanced accuracy and per-class recall, and its training seconds."""
    real = ChestXRayDataModule(**data)
    real.setup("test")
    generated = read_generated(dataset, real.hparams.image_size, real.hparams.channels, real.class_names)
    planes = torch.from_numpy(generated.images).float().div(255)[:, None]
    images = planes.expand(-1, real.hparams.channels, -1, -1)
    started = time.perf_counter()
    model = train_probe(images, torch.from_numpy(generated.labels), num_classes, epochs, seed)
    test_images, test_labels, _ = stratified_images(real.datasets["test"], None)
    return dict(epochs=epochs, train_images=len(images), test_images=len(test_labels), training_seconds=time.perf_counter() - started,
                **probe_scores(model, test_images, test_labels, num_classes))


if __name__ == "__main__":
    run_cli(main)
