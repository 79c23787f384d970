"""Classify chest X-ray images with a trained classifier stage and write the predictions to a CSV file.

    python predict.py runs/student images/                   # a run directory (its checkpoints/best.ckpt), a folder
    python predict.py runs/purify_finetune/checkpoints/best.ckpt list.txt --output predictions.csv --save-purified purified/
    python predict.py runs/purify_finetune/export/teacher_finetuned+purifier.onnx images/ --seed 1   # an export.py graph
    python predict.py ... --debug                            # the full traceback of an error, not just its message

The input is an image, a folder (every file under it, recursively) or a `.txt` file listing image paths, one per line
(relative paths are read from the list's folder). Images are decoded as the DataModule decodes them: grayscale,
resized to the checkpoint's image size, replicated to its input channels, [0, 1].

The CSV has one row per input file: `path`; `prediction`, the class the deployed pipeline predicts (for
purify-then-fine-tune, the purifier then the fine-tuned classifier; for other stages, the classifier), and
`probability/<class>` for each class, at the checkpoint's operating point (for a threshold chosen with
`target_sensitivity`, P(class 1) > 0.5 exactly where the decision is class 1); `undefended_prediction`, the class the classifier predicts without the
purifier (the same model for stages without one), and `disagree`; `purified_path` with `--save-purified`; and `error`,
why a file could not be classified (missing, unreadable, not an image), its other columns then empty.

An ONNX graph that export.py wrote runs under onnxruntime instead of the checkpoint: a pipeline graph
(`<model>+<defense>.onnx`) gives `prediction`, its classifier graph beside it (named in its metadata) the undefended
prediction; its random inputs are drawn from torch's RNG seeded per batch (`--seed`), the same draws whenever the seed
is, though not those the checkpoint's pipeline would draw.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query PyPI on import

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from datamodules.sources import decode_grayscale  # noqa: E402
from lightning_modules.classifier import ImageClassifierModule, load_classifier  # noqa: E402
from robust_cxr.cli_errors import run_cli  # noqa: E402
from robust_cxr.deployment import ExportedGraph  # noqa: E402

LIST_SUFFIX = ".txt"
ONNX_SUFFIX = ".onnx"


@dataclass
class Predictor:
    """What predict.py classifies with: the deployed `pipeline` and the `undefended` classifier, [0, 1] images
    (B, C, S, S) -> logits (B, K) at the operating point, random draws from torch's global RNG; the `purifier` in front
    (for `--save-purified`), or None; the input's side and channels, and the class names."""

    name: str
    pipeline: Callable[[torch.Tensor], torch.Tensor]
    undefended: Callable[[torch.Tensor], torch.Tensor]
    purifier: nn.Module | None
    image_size: int
    in_chans: int
    class_names: list[str]


def stage_predictor(stage: ImageClassifierModule) -> Predictor:
    """The stage's deployed model (`deployed_model()`)."""
    deployed, hp = stage.deployed_model(), stage.hparams
    return Predictor(f"the {type(stage).__name__} checkpoint", deployed.pipeline, deployed.undefended, deployed.defense_module,
                     hp.image_size, hp.in_chans, list(hp.class_names or [str(label) for label in range(hp.num_classes)]))


def graph_predictor(path: Path) -> Predictor:
    """An ONNX graph of export.py (`ExportedGraph`); a pipeline graph's undefended classifier is the graph its metadata
    names beside it."""
    graph = ExportedGraph(path)
    undefended = graph
    if "classifier" in graph.metadata:
        classifier_path = path.parent / graph.metadata["classifier"]
        if not classifier_path.is_file():
            raise FileNotFoundError(f"{classifier_path} does not exist: {path} classifies its undefended predictions with it. "
                                    "export.py writes both; export the run again or copy the two files together.")
        undefended = ExportedGraph(classifier_path)
    in_chans, image_size, _ = graph.input_shape
    return Predictor(f"the ONNX graph {path.name}", graph, undefended, None, image_size, in_chans, graph.metadata["class_names"])


def input_paths(source: str | Path) -> list[Path]:
    """The files to classify: `source` itself, every file under a folder (sorted, hidden ones left out), or the paths
    listed in a `.txt` file (one per line, relative to the list's folder; blank lines skipped)."""
    source = Path(source)
    if source.is_dir():
        return sorted(path for path in source.rglob("*") if path.is_file() and not path.name.startswith("."))
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist; give an image, a folder of images or a {LIST_SUFFIX} list of image paths.")
    if source.suffix.lower() == LIST_SUFFIX:
        lines = (line.strip() for line in source.read_text().splitlines())
        return [source.parent / line for line in lines if line]
    return [source]


def read_image(path: Path, image_size: int) -> tuple[np.ndarray | None, str]:
    """(S, S) uint8 pixels of an image file, or None and why it cannot be read."""
    if not path.is_file():
        return None, "file does not exist"
    pixels = decode_grayscale(path, image_size)
    if pixels is None:
        return None, "not a readable image (corrupt, truncated or not an image format)"
    return pixels, ""


def readable_batches(paths: list[Path], image_size: int, batch_size: int) -> Iterator[tuple[list[int], np.ndarray, dict[int, str]]]:
    """Per batch of `batch_size` paths: the positions in `paths` of the readable files and their pixels (B, S, S) uint8,
    and the positions of the unreadable files with the reason."""
    for start in range(0, len(paths), batch_size):
        positions, pixels, unreadable = [], [], {}
        for position in range(start, min(start + batch_size, len(paths))):
            image, reason = read_image(paths[position], image_size)
            if image is None:
                unreadable[position] = reason
            else:
                positions.append(position)
                pixels.append(image)
        yield positions, np.stack(pixels) if pixels else np.empty((0, image_size, image_size), np.uint8), unreadable


def predict(
    predictor: Predictor,
    paths: list[Path],
    output: Path,
    batch_size: int = 64,
    purified_dir: Path | None = None,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Classifies `paths` with the predictor's pipeline and its undefended classifier; writes and returns the rows, one
    per path, in the order of `paths`.

    `purified_dir` receives each image after the purifier, as `<position in paths>_<name>.png`, for checkpoints deployed
    behind one. The random draws are seeded by `seed` per batch, the same for the pipeline and the saved images.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}.")
    if purified_dir is not None and predictor.purifier is None:
        raise ValueError(f"--save-purified: {predictor.name} comes without a purifier to run on its own (a checkpoint deployed behind "
                         "one has it; an ONNX pipeline graph keeps it inside); leave the option out.")
    class_names = predictor.class_names
    rows: dict[int, dict[str, str]] = {}  # by position in `paths`
    with tqdm(total=len(paths), unit="image", desc="predict") as progress:
        for batch_number, (positions, pixels, unreadable) in enumerate(readable_batches(paths, predictor.image_size, batch_size)):
            rows.update({position: {"path": str(paths[position]), "error": reason} for position, reason in unreadable.items()})
            if positions:
                images = torch.from_numpy(pixels).float().div_(255.0).unsqueeze(1).expand(-1, predictor.in_chans, -1, -1)
                batch_rows = _classify(predictor, images, [paths[position] for position in positions], seed + batch_number)
                if purified_dir is not None:
                    with torch.inference_mode(), torch.random.fork_rng():
                        torch.manual_seed(seed + batch_number)  # the noise the pipeline drew
                        purified = predictor.purifier(images)
                    for row, position, image in zip(batch_rows, positions, purified):
                        row["purified_path"] = str(_save_png(image, purified_dir / f"{position:06d}_{paths[position].stem}.png"))
                rows.update(zip(positions, batch_rows))
            progress.update(len(positions) + len(unreadable))
    ordered = [rows[position] for position in sorted(rows)]
    _write_csv(ordered, class_names, output, with_purified=purified_dir is not None)
    return ordered


def _classify(predictor: Predictor, images: torch.Tensor, paths: list[Path], seed: int) -> list[dict[str, str]]:
    """Rows of the pipeline's and the undefended classifier's predictions for images (B, C, S, S) in [0, 1]."""
    with torch.inference_mode(), torch.random.fork_rng():
        torch.manual_seed(seed)
        probabilities = predictor.pipeline(images).softmax(dim=1)
        undefended = predictor.undefended(images).argmax(dim=1)
    class_names = predictor.class_names
    rows = []
    for path, probability, undefended_label in zip(paths, probabilities, undefended):
        label = int(probability.argmax())
        row = {"path": str(path), "prediction": class_names[label], "undefended_prediction": class_names[int(undefended_label)],
               "disagree": str(label != int(undefended_label)).lower(), "error": ""}
        row.update({f"probability/{name}": f"{float(value):.6f}" for name, value in zip(class_names, probability)})
        rows.append(row)
    return rows


def _save_png(image: torch.Tensor, path: Path) -> Path:
    """Writes (C, S, S) pixels in [0, 1] as an 8-bit PNG: grayscale for one channel, RGB for three."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = image.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(path)
    return path


def _write_csv(rows: list[dict[str, str]], class_names: list[str], output: Path, with_purified: bool) -> None:
    columns = ["path", "prediction", *(f"probability/{name}" for name in class_names), "undefended_prediction", "disagree"]
    columns += ["purified_path"] * with_purified + ["error"]
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def main(args: list[str] | None = None) -> list[dict[str, str]]:
    """Parses `args` (default: the command line), predicts, writes the CSV; returns its rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a classifier stage's run directory (its checkpoints/best.ckpt) or checkpoint file, or an "
                        f"export.py graph ({ONNX_SUFFIX})")
    parser.add_argument("input", help=f"an image, a folder of images or a {LIST_SUFFIX} file listing image paths")
    parser.add_argument("--output", default="predictions.csv", help="the CSV to write (default: predictions.csv)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--save-purified", metavar="DIR", help="write each purified image to DIR as PNG (stages with a purifier)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the purifier's noise (default: 0)")
    options = parser.parse_args(args)
    model = Path(options.checkpoint)
    predictor = (graph_predictor(model) if model.suffix == ONNX_SUFFIX
                 else stage_predictor(load_classifier(options.checkpoint)))
    paths = input_paths(options.input)
    purified_dir = Path(options.save_purified) if options.save_purified else None
    rows = predict(predictor, paths, Path(options.output), options.batch_size, purified_dir, options.seed)
    failed = sum(bool(row["error"]) for row in rows)
    print(f"{len(rows) - failed} of {len(rows)} files classified ({failed} unreadable, see the error column): {options.output}")
    return rows


if __name__ == "__main__":
    run_cli(main)
