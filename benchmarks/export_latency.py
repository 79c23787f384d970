"""Latency of the exported student: milliseconds per image under onnxruntime (CPU) and TorchScript beside PyTorch.

The default student (SmallCNN, widths 16/32/64, normalization inside) at the default 64 px, exported as export.py
exports it (`robust_cxr.deployment.export_classifier`); its weights do not change the cost, so it is built untrained.
Ratios are PyTorch's time over the export's (above 1: the export is faster), medians of repeated timed batches.

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

from robust_cxr.deployment import export_classifier  # noqa: E402
from robust_cxr.models import create_student_classifier  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads of every runtime")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/export_latency.json"))
    args = parser.parse_args()

    classifier = create_student_classifier("small_cnn", 2, 1, args.image_size).eval()
    input_shape = (1, 1, args.image_size, args.image_size)
    torch.set_num_threads(args.threads)
    threads = args.threads
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # the same number of threads as PyTorch
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        paths = export_classifier(classifier, input_shape, Path(directory), "student")
        session = onnxruntime.InferenceSession(str(paths["onnx"]), options, providers=["CPUExecutionProvider"])
        scripted = torch.jit.load(str(paths["torchscript"]))
        for batch_size in args.batch_sizes:
            images = torch.rand(batch_size, *input_shape[1:])
            feed = {"images": images.numpy()}
            with torch.inference_mode():
                runs = {"pytorch": lambda: classifier(images), "torchscript": lambda: scripted(images),
                        "onnxruntime": lambda: session.run(["logits"], feed)}
                ms = median_ms_per_image(runs, batch_size, args.repeats)
            rows.append({
                "batch_size": batch_size, **{f"{name}_ms_per_image": value for name, value in ms.items()},
                "pytorch_over_onnxruntime": ms["pytorch"] / ms["onnxruntime"], "pytorch_over_torchscript": ms["pytorch"] / ms["torchscript"],
            })
    result = {
        "benchmark": "export_latency",
        "device": f"cpu ({platform.processor() or platform.machine()}, {threads} threads)",
        "model": "DistilledStudent default: SmallCNN widths 16/32/64, untrained",
        "input_shape": list(input_shape[1:]),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "repeats": args.repeats,
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
