"""Robustness reports: JSON rows, a Markdown table and a PNG grid of adversarial examples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MARKDOWN_LEFT_OUT = ("correct",)  # a count the JSON keeps; the Markdown table gives its share


def write_robustness_report(rows: list[dict], directory: str | Path, stem: str = "robustness_report") -> Path:
    """Writes `rows` (dicts with the same keys, in column order) to `<stem>.json` and `<stem>.md`; returns the JSON path.

    The Markdown table has every key as a column but `MARKDOWN_LEFT_OUT`, and is headed by what its accuracy means.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    columns = [column for column in rows[0] if column not in MARKDOWN_LEFT_OUT]
    lines = [
        "`accuracy`: right both clean and after the attack (robust accuracy); `clean_*`: the same images unattacked; "
        "`n`: the images a row covers; recall columns per class; `accuracy_after_attack`: right after the attack alone; "
        "`threshold`: the P(class 1) above which a binary model decides class 1 (its operating point).",
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


def save_adversarial_grid(
    path: str | Path,
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    labels: torch.Tensor,
    clean_predictions: torch.Tensor,
    adversarial_predictions: torch.Tensor,
    eps: float,
    class_names: list[str],
    purified: torch.Tensor | None = None,
    tile: int = 128,
) -> Path:
    """One row per image: clean | adversarial | perturbation amplified to the eps range | [purified] | predictions.

    Args:
        clean, adversarial: (N, C, H, W) in [0, 1]; labels and predictions: (N,) class indices.
        eps: the attack budget; the perturbation tile maps -eps..eps to black..white.
        purified: (N, C, H, W) in [0, 1], the purifier's output for the adversarial images, or None.
    """
    perturbation = (0.5 + 0.5 * (adversarial - clean) / eps).clamp(0, 1)
    tiles = [clean, adversarial, perturbation] + ([purified] if purified is not None else [])
    columns = len(tiles)
    panels = torch.cat(tiles, dim=3).mean(dim=1)  # (N, H, columns * W) grayscale
    panels = torch.nn.functional.interpolate(panels[:, None], size=(tile, columns * tile), mode="nearest")[:, 0]
    text_width = 2 * tile
    canvas = Image.new("L", (columns * tile + text_width, tile * len(panels)), color=255)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, tile // 9))
    for row, panel in enumerate(panels):
        pixels = (panel.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        canvas.paste(Image.fromarray(np.ascontiguousarray(pixels)), (0, row * tile))
        text = (
            f"true: {class_names[int(labels[row])]}\n"
            f"clean: {class_names[int(clean_predictions[row])]}\n"
            f"adversarial: {class_names[int(adversarial_predictions[row])]}"
        )
        draw.multiline_text((columns * tile + 8, row * tile + 8), text, fill=0, font=font, spacing=4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
