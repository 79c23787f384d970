"""Robustness reports: JSON rows, a Markdown table and a PNG grid of adversarial examples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from robust_cxr.tasks import Task

MARKDOWN_LEFT_OUT = ("correct",)  # a count the JSON keeps; the Markdown table gives its share


def write_robustness_report(rows: list[dict], directory: str | Path, stem: str = "robustness_report") -> Path:
    """Writes `rows` (dicts, keys in column order) to `<stem>.json` and `<stem>.md`; returns the JSON path.

    The Markdown table has every key of any row as a column (``-`` where a row lacks it) but `MARKDOWN_LEFT_OUT`, and
    is headed by what its values mean.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    columns = [column for column in dict.fromkeys(key for row in rows for key in row) if column not in MARKDOWN_LEFT_OUT]
    lines = [
        "`value`: the row's `metric` under the attack (for `accuracy`: right both clean and after the attack, robust accuracy; "
        "`dice`, `iou`, `psnr` (dB), `ssim`: the mean over images); `clean_value`, `clean_*`: the same images unattacked; "
        "`n`: the images a row covers; recall columns per class; `accuracy_after_attack`: right after the attack alone; "
        "`threshold`: the P(class 1) above which a binary model decides class 1 (its operating point); "
        "`detection_rate`: share of attacked images a detector flags (`clean_value`: of clean images), `detection_auroc`: clean "
        "against attacked, `seen_in_training`: whether the detector trained on that method and eps.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(column)) for column in columns) + " |")
    (directory / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return json_path


def _format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def save_example_grid(
    path: str | Path,
    task: Task,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    targets: torch.Tensor,
    clean_outputs: torch.Tensor,
    adversarial_outputs: torch.Tensor,
    eps: float,
    defended: torch.Tensor | None = None,
    tile: int = 128,
) -> Path:
    """A titled grid, one row per image: the task's columns (`Task.example_columns`; by default clean | adversarial,
    each with what the task draws of its prediction) | perturbation amplified to the eps range | [defense output] | the
    task's caption (e.g. true and predicted classes).

    Args:
        clean, adversarial: (N, C, H, W) in [0, 1]; targets (N, ...), and the model's outputs (N, ...) for both.
        eps: the attack budget; the perturbation tile maps -eps..eps to black..white.
        defended: (N, C, H, W) in [0, 1], the defense's output for the adversarial images (e.g. purified), or None.
    """
    perturbation = (0.5 + 0.5 * (adversarial - clean) / eps).clamp(0, 1)
    columns = [
        *task.example_columns(clean, adversarial, targets, clean_outputs, adversarial_outputs),
        (f"perturbation (+-{eps:g})", perturbation.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)),
    ]
    if defended is not None:
        columns.append(("defense output", defended.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)))
    panels = torch.cat([images.float().cpu() for _, images in columns], dim=3)  # (N, 3, H, columns * W)
    panels = torch.nn.functional.interpolate(panels, size=(tile, len(columns) * tile), mode="nearest")
    title_height, text_width = tile // 4, 2 * tile
    canvas = Image.new("RGB", (len(columns) * tile + text_width, title_height + tile * len(panels)), color=(255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, tile // 9))
    for index, (title, _) in enumerate(columns):
        draw.text((index * tile + 4, 4), title, fill=(0, 0, 0), font=font)
    for row, (panel, caption) in enumerate(zip(panels, task.caption(targets, clean_outputs, adversarial_outputs))):
        pixels = (panel.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        top = title_height + row * tile
        canvas.paste(Image.fromarray(np.ascontiguousarray(pixels)), (0, top))
        draw.multiline_text((len(columns) * tile + 8, top + 8), caption, fill=(0, 0, 0), font=font, spacing=4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
