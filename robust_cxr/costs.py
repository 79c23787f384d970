"""What a model costs to deploy: parameter count and measured inference latency."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

COST_COLUMNS = ("model", "parameters", "latency_ms_batch1", "latency_ms_batch64")


def parameter_count(model: nn.Module) -> int:
    """Number of parameter values in `model`, trainable or not."""
    return sum(parameter.numel() for parameter in model.parameters())


@torch.no_grad()
def inference_latency_ms(
    model: nn.Module, image_shape: tuple[int, int, int], batch_size: int, device: torch.device, warmup: int = 3, repeats: int = 10
) -> float:
    """Median wall-clock milliseconds of one forward of `model` on a batch of random [0, 1] images (C, H, W) on `device`.

    The first `warmup` forwards (allocator, kernel selection) are not counted; CUDA work is synchronised.
    """
    images = torch.rand(batch_size, *image_shape, device=device)
    timings = []
    for run in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if run >= warmup:
            timings.append(1000 * (time.perf_counter() - start))
    return statistics.median(timings)


def model_costs(models: dict[str, nn.Module], image_shape: tuple[int, int, int], device: torch.device) -> list[dict]:
    """One row per named model (the first is the reference): parameters, median latency at batch 1 and 64,
    and each figure's ratio to the reference's (``parameters_ratio``, ``latency_ms_batch1_ratio`` ...)."""
    rows = []
    for name, model in models.items():
        rows.append(
            dict(
                model=name,
                parameters=parameter_count(model),
                latency_ms_batch1=inference_latency_ms(model, image_shape, 1, device),
                latency_ms_batch64=inference_latency_ms(model, image_shape, 64, device),
            )
        )
    reference = rows[0]
    for row in rows:
        row.update({f"{column}_ratio": row[column] / reference[column] for column in COST_COLUMNS[1:]})
    return rows


def write_model_costs(rows: list[dict], directory: str | Path, device: torch.device) -> Path:
    """Writes `rows` of `model_costs` to `model_costs.json` and `model_costs.md` in `directory`; returns the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "model_costs.json"
    json_path.write_text(json.dumps(dict(device=str(device), models=rows), indent=2) + "\n")
    reference = rows[0]["model"]
    header = ["model", "parameters", "ms/forward (batch 1)", "ms/forward (batch 64)",
              f"parameters / {reference}", f"latency / {reference} (batch 1)", f"latency / {reference} (batch 64)"]
    lines = [f"Median milliseconds per forward after warm-up runs, under no_grad, on {device}.", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], f"{row['parameters']:,}", f"{row['latency_ms_batch1']:.2f}", f"{row['latency_ms_batch64']:.2f}",
                 f"{row['parameters_ratio']:.1f}", f"{row['latency_ms_batch1_ratio']:.1f}", f"{row['latency_ms_batch64_ratio']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    (directory / "model_costs.md").write_text("\n".join(lines) + "\n")
    return json_path
