"""Latency of the exports: milliseconds per image of the exported student under onnxruntime (CPU) and TorchScript beside
PyTorch, and of each default defended pipeline's ONNX graph under onnxruntime beside the PyTorch pipeline.

The default student (SmallCNN, widths 16/32/64, normalization inside) at the default 64 px, exported as export.py
exports it (`robust_cxr.deployment.export_classifier`). The pipelines, exported as export.py exports them
(`export_pipeline`), put the default teacher (the hybrid ViT-Tiny) behind each defense with its configs' deployed
settings: the diffusion purifier of configs/purifier.yaml at configs/purify_finetune.yaml's DDIM, 1 step from t* 100;
the NIM denoiser of configs/nim.yaml at sigma 75/255; the reformer network of configs/reformer.yaml. Weights do not
change the cost, so every model is built untrained. Both sides of a pipeline draw their noise per call (PyTorch inside
the purifier, the graph's inputs from torch's RNG), as a deployment does. Ratios are PyTorch's time over the export's
(above 1: the export is faster), medians of repeated timed batches.

    python benchmarks/export_latency.py --threads 1 --output benchmarks/results/export_latency_cpu_1thread.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import onnxruntime  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from lightning_modules import DiffusionPurifier, NoisyImageModeling, TeacherClassifier  # noqa: E402
from robust_cxr.deployment import ExportedGraph, export_classifier, export_pipeline, pipeline_noise  # noqa: E402
from robust_cxr.models import ResidualRestorer, create_student_classifier  # noqa: E402
from robust_cxr.purification import PurifiedModel  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def median_ms_per_image(runs: dict[str, Callable[[], object]], batch_size: int, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time of each `runs[name]()` (one batch), in milliseconds per image, over `repeats` rounds after
    `warmup`; each round calls every runtime once in turn, so that load from other jobs falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_number in range(warmup + repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_number >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(seconds) / batch_size for name, seconds in times.items()}


def model_arguments(config: str) -> dict:
    """The ``model.init_args`` of configs/<config>.yaml."""
    return yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())["model"]["init_args"]


def default_pipelines(image_size: int) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Each default defense in front of the default teacher, untrained, in eval mode: name -> (pipeline, defense)."""
    teacher = TeacherClassifier(num_classes=2, image_size=image_size).decision_classifier()
    deployed = {name: value for name, value in model_arguments("purify_finetune")["purifier_settings"].items() if value is not None}
    purifier = DiffusionPurifier(image_size=image_size, **model_arguments("purifier")).purifier(**deployed)
    nim = NoisyImageModeling(image_size=image_size, architecture=model_arguments("nim")["architecture"]).purifier()
    reformer_network = {name: model_arguments("reformer")[name] for name in ("encoder_name", "encoder_depth", "feature_channels", "head_channels")}
    reformer = ResidualRestorer(1, decoder_channels=tuple(model_arguments("reformer")["decoder_channels"]), **reformer_network)
    pipelines = {
        f"teacher+purifier/{purifier.label}": (PurifiedModel(purifier, teacher), purifier),
        f"teacher+purifier/{nim.label}": (PurifiedModel(nim, teacher), nim),
        "teacher+reformer": (nn.Sequential(reformer, teacher), reformer),
    }
    return {name: (pipeline.eval(), defense.eval()) for name, (pipeline, defense) in pipelines.items()}


def student_rows(image_size: int, batch_sizes: list[int], repeats: int, threads: int, directory: Path) -> list[dict]:
    """PyTorch, TorchScript and onnxruntime ms per image of the default student, and their ratios, per batch size."""
    classifier = create_student_classifier("small_cnn", 2, 1, image_size).eval()
    input_shape = (1, 1, image_size, image_size)
    paths = export_classifier(classifier, input_shape, directory, "student", {})
    session = ExportedGraph(paths["onnx"], threads).session
    scripted = torch.jit.load(str(paths["torchscript"]))
    rows = []
    for batch_size in batch_sizes:
        images = torch.rand(batch_size, *input_shape[1:])
        feed = {"images": images.numpy()}
        with torch.inference_mode():
            runs = {"pytorch": lambda: classifier(images), "torchscript": lambda: scripted(images),
                    "onnxruntime": lambda: session.run(["logits"], feed)}
            ms = median_ms_per_image(runs, batch_size, repeats)
        rows.append({
            "batch_size": batch_size, **{f"{name}_ms_per_image": value for name, value in ms.items()},
            "pytorch_over_onnxruntime": ms["pytorch"] / ms["onnxruntime"], "pytorch_over_torchscript": ms["pytorch"] / ms["torchscript"],
        })
    return rows


def pipeline_rows(image_size: int, batch_sizes: list[int], repeats: int, threads: int, directory: Path) -> list[dict]:
    """PyTorch and onnxruntime ms per image of each default pipeline, and their ratio, per batch size."""
    rows = []
    input_shape = (1, 1, image_size, image_size)
    for name, (pipeline, defense) in default_pipelines(image_size).items():
        noise = pipeline_noise(defense, input_shape[1:])
        graph = ExportedGraph(export_pipeline(pipeline, input_shape, directory / "pipeline.onnx", noise, 1, {}), threads)
        for batch_size in batch_sizes:
            images = torch.rand(batch_size, *input_shape[1:])
            with torch.inference_mode():
                ms = median_ms_per_image({"pytorch": lambda: pipeline(images), "onnxruntime": lambda: graph(images)}, batch_size, repeats)
            rows.append({"pipeline": name, "noise": {input_name: spec["shape"] for input_name, spec in noise.items()}, "batch_size": batch_size,
                         **{f"{runtime}_ms_per_image": value for runtime, value in ms.items()},
                         "pytorch_over_onnxruntime": ms["pytorch"] / ms["onnxruntime"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=50, help="timed rounds of the student")
    parser.add_argument("--pipeline-repeats", type=int, default=20, help="timed rounds of each pipeline")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads of every runtime")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/export_latency.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as directory:
        rows = student_rows(args.image_size, args.batch_sizes, args.repeats, args.threads, Path(directory))
        pipelines = pipeline_rows(args.image_size, args.batch_sizes, args.pipeline_repeats, args.threads, Path(directory))
    result = {
        "benchmark": "export_latency",
        "device": f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)",
        "model": "DistilledStudent default: SmallCNN widths 16/32/64, untrained",
        "pipelines_model": "TeacherClassifier default (vit_tiny_r_s16_p8_224) behind each default defense, untrained",
        "input_shape": [1, args.image_size, args.image_size],
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "repeats": args.repeats,
        "pipeline_repeats": args.pipeline_repeats,
        "rows": rows,
        "pipelines": pipelines,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
