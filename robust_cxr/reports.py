"""Robustness reports: JSON rows, a Markdown table, a PNG grid of adversarial examples, and robustness curves over eps."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from robust_cxr.attacks import AttackSpec, is_stochastic
from robust_cxr.evaluation import WORST_CASE, SuiteEvaluation
from robust_cxr.tasks import Task
from robust_cxr.threat import DefendedModel, seen_label

MARKDOWN_LEFT_OUT = ("correct",)  # a count the JSON keeps; the Markdown table gives its share


def robustness_rows(evaluation: SuiteEvaluation, results: list[tuple[DefendedModel, str, dict, dict | None]]) -> list[dict]:
    """The report's rows of `evaluation`'s `results` (`SuiteEvaluation.results`), in their order: per subject and attack
    the setting (model, defense, the operating point's threshold, attack, threat model, norm, eps, what ran: steps, EOT,
    version; the worst-case row names the attacks it is the worst of; the precision), then the task's columns
    (`Task.report_rows`) and, for a subject with a detector, its rows (`detection_rows`). NaN is written as None."""
    specs = {spec.label: spec for spec in evaluation.attacks}
    rows = []
    for subject, attack, result, detection in results:
        setting = dict(model=subject.model, defense=subject.defense, threshold=subject.decision_threshold, attack=attack)
        spec = specs.get(attack)
        if attack == WORST_CASE:
            suite = evaluation.applied(subject)
            setting.update(
                threat_model="+".join(dict.fromkeys(spec.threat_model for spec in suite)), norm="+".join(dict.fromkeys(spec.norm for spec in suite)),
                eps=max(spec.eps for spec in suite), steps=None, eot_samples=None, eot_average=None, version=None,
                worst_of=", ".join(spec.label for spec in suite),
            )
        elif spec is None:
            setting.update(threat_model="none", norm="none", eps=0.0, steps=None, eot_samples=None, eot_average=None, version=None)
        else:
            stochastic = is_stochastic(subject.attack_source(spec.threat_model, spec.bpda))
            setting.update(threat_model=spec.threat_model, norm=spec.norm, eps=spec.eps, **spec.executed(evaluation.task.num_classes, stochastic))
        setting["precision"] = evaluation.precision(subject)
        rows += [{**setting, **columns} for columns in evaluation.task.report_rows(result, attacked=attack != "none")]
        if detection is not None:
            rows += detection_rows(setting, detection, spec, subject.detector_seen)
    return [{key: None if isinstance(value, float) and math.isnan(value) else value for key, value in row.items()} for row in rows]


def detection_rows(setting: dict, detection: dict[str, float], spec: AttackSpec | None, seen_attacks: tuple[str, ...]) -> list[dict]:
    """A detector's report rows (see `DetectionScores`): ``detection_rate``, the share of the attacked images it flags
    (`clean_value`: of the clean ones, its false-positive rate; the clean row has that share alone), and under an
    attack ``detection_auroc`` (clean against attacked), ``robust_or_rejected`` (an image counts if right clean and
    unflagged, and right or flagged attacked; `clean_value`: right and unflagged clean) and ``evasion_rate`` (right
    clean, fooled and unflagged). `seen_in_training` says whether the detector was trained on that attack's method and
    eps; an adaptive attack, which aims at the detector, never was."""
    seen = None if spec is None else spec.threat_model != "adaptive" and seen_label(spec.method, spec.eps) in seen_attacks
    common = {**setting, "n": detection["n"], "seen_in_training": seen}
    rate = dict(common, metric="detection_rate", value=detection["fpr" if spec is None else "tpr"], clean_value=detection["fpr"])
    if spec is None:
        return [rate]
    return [dict(common, metric="detection_auroc", value=detection["auroc"], clean_value=None), rate,
            dict(common, metric="robust_or_rejected", value=detection["robust_or_rejected"], clean_value=detection["clean_unflagged"]),
            dict(common, metric="evasion_rate", value=detection["evasion_rate"], clean_value=None)]


def report_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """(columns, values) of `rows`: every key of any row, in order of first appearance, and each row's value of each (None
    where it has none), e.g. for a W&B table."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return columns, [[row.get(column) for column in columns] for row in rows]


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
        "against attacked, `robust_or_rejected`: right clean and unflagged, and right or flagged attacked, `evasion_rate`: right "
        "clean, fooled and unflagged, `seen_in_training`: whether the detector trained on that method and eps; "
        "`eot_samples`, `eot_average`: draws of a random source averaged per attack step and how (the per-draw losses, or the "
        "logits); `precision`: the dtype attacks and scores ran in. A random defense scores the clean and the attacked images on "
        "independent draws of its noise, one draw per decision as deployed.",
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
    subject: str,
    attack: str,
    threat_model: str,
    defended: torch.Tensor | None = None,
    tile: int = 128,
) -> Path:
    """A grid under a header line naming what it shows (`subject`, `attack`, `threat_model`), one row per image: the
    task's columns (`Task.example_columns`; by default clean | adversarial, each with what the task draws of its
    prediction) | perturbation amplified to the eps range | [defense output] | the task's caption (e.g. true and
    predicted classes). Column titles wrap, and shrink if a word is wider than a tile, so that none runs into the next.

    Args:
        clean, adversarial: (N, C, H, W) in [0, 1]; targets (N, ...), and the model's outputs (N, ...) for both.
        eps: the attack budget; the perturbation tile maps -eps..eps to black..white.
        subject, attack, threat_model: the model and defense attacked, the attack's label and its threat model.
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
    width, margin, font_size = len(columns) * tile + 2 * tile, 4, max(10, tile // 9)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # for measuring text
    header_font, header = _fitted_lines(draw, [f"{subject} | attack: {attack} | threat model: {threat_model}"], width - 2 * margin, font_size)
    title_font, titles = _fitted_lines(draw, [title for title, _ in columns], tile - 2 * margin, font_size)
    header_height = _text_height(draw, header[0], header_font) + 2 * margin
    title_height = max(_text_height(draw, lines, title_font) for lines in titles) + 2 * margin
    top = header_height + title_height
    canvas = Image.new("RGB", (width, top + tile * len(panels)), color=(255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((margin, margin), "\n".join(header[0]), fill=(0, 0, 0), font=header_font, spacing=_LINE_SPACING)
    for index, lines in enumerate(titles):
        draw.multiline_text((index * tile + margin, header_height + margin), "\n".join(lines), fill=(0, 0, 0), font=title_font,
                            spacing=_LINE_SPACING)
    caption_font = ImageFont.load_default(size=font_size)
    for row, (panel, caption) in enumerate(zip(panels, task.caption(targets, clean_outputs, adversarial_outputs))):
        pixels = (panel.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        row_top = top + row * tile
        canvas.paste(Image.fromarray(np.ascontiguousarray(pixels)), (0, row_top))
        draw.multiline_text((len(columns) * tile + 8, row_top + 8), caption, fill=(0, 0, 0), font=caption_font, spacing=_LINE_SPACING)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


_LINE_SPACING = 4  # pixels between lines of text in the grid
_SMALLEST_FONT = 6


def _fitted_lines(draw: ImageDraw.ImageDraw, texts: list[str], width: int, size: int) -> tuple[ImageFont.FreeTypeFont, list[list[str]]]:
    """The default font at the largest size from `size` down to `_SMALLEST_FONT` at which each of `texts`, wrapped at
    spaces, has no line wider than `width` pixels (the smallest if none), and the wrapped lines of each text."""
    for font_size in range(size, _SMALLEST_FONT - 1, -1):
        font = ImageFont.load_default(size=font_size)
        wrapped = [_wrapped(draw, text, font, width) for text in texts]
        if all(draw.textlength(line, font=font) <= width for lines in wrapped for line in lines):
            break
    return font, wrapped


def _wrapped(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """`text` broken at spaces into lines of at most `width` pixels, greedily (a wider word keeps a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _text_height(draw: ImageDraw.ImageDraw, lines: list[str], font: ImageFont.FreeTypeFont) -> int:
    return draw.multiline_textbbox((0, 0), "\n".join(lines), font=font, spacing=_LINE_SPACING)[3]


CURVE_EPS_255 = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)  # the default eps of a robustness curve, in 1/255 units


def curve_point_label(spec: AttackSpec, eps_255: float) -> str:
    """The name of `spec` run at eps `eps_255` / 255 as a point of a robustness curve, e.g. ``pgd10_eps4``."""
    return f"{spec.label}_eps{eps_255:g}"


def eps_curve_attacks(spec: AttackSpec, eps_255: list[float]) -> list[AttackSpec]:
    """`spec` at every eps of `eps_255` (1/255 units) above 0, each named `curve_point_label`: ordinary attacks of the
    suite, whose report rows `robustness_curves` gathers (eps 0 is the rows' clean score)."""
    if any(eps < 0 for eps in eps_255) or not any(eps > 0 for eps in eps_255):
        raise ValueError(f"The eps of a robustness curve must be >= 0 with one above 0 (1/255 units), got {list(eps_255)}; e.g. [0, 1, 2, 4, 8, 16].")
    return [replace(spec, eps=eps / 255, name=curve_point_label(spec, eps)) for eps in sorted(set(eps_255)) if eps > 0]


def robustness_curves(rows: list[dict], attacks: list[AttackSpec], eps_255: list[float]) -> list[dict]:
    """The report `rows` of the `eps_curve_attacks` of each of `attacks`, gathered into curves, one per subject (model,
    defense), attack and metric, in the order of the rows.

    Each curve has ``model``, ``defense``, ``attack`` (the swept attack's label), ``method``, ``threat_model``, ``norm``,
    ``metric``, ``scores`` (the names it follows: the metric, e.g. ``accuracy``, then every other column of the rows
    with a ``clean_`` twin, e.g. ``balanced_accuracy``, ``sensitivity``) and ``points``, one per eps in increasing
    order: ``eps_255``, ``eps`` ([0, 1] units), ``n`` and each score, at eps 0 the clean score of the same images
    (the rows' ``clean_value`` and ``clean_*``). A subject an attack does not apply to has no curve for it.
    """
    by_key = {(row["model"], row["defense"], row["attack"], row["metric"]): row for row in rows}
    curves = []
    for spec in attacks:
        points = {eps: curve_point_label(spec, eps) for eps in sorted(set(eps_255))}
        first = next(label for eps, label in points.items() if eps > 0)
        for (model, defense, attack, metric), row in by_key.items():
            if attack != first:
                continue
            twins = [column for column in row if f"clean_{column}" in row and column not in ("value", metric)]
            curve = dict(model=model, defense=defense, attack=spec.label, method=spec.method, threat_model=spec.threat_model, norm=spec.norm,
                         metric=metric, scores=[metric, *twins], points=[])
            for eps, label in points.items():
                if eps == 0:
                    values = {metric: row["clean_value"], **{column: row[f"clean_{column}"] for column in twins}}
                    n = row["n"]
                else:
                    point = by_key[(model, defense, label, metric)]
                    values, n = {metric: point["value"], **{column: point[column] for column in twins}}, point["n"]
                curve["points"].append(dict(eps_255=eps, eps=eps / 255, n=n, **values))
            curves.append(curve)
    return curves


def write_robustness_curves(curves: list[dict], directory: str | Path, stem: str = "robustness_curve") -> Path:
    """Writes `curves` (from `robustness_curves`) to `<stem>.json` and plots them to `<stem>.png`: a row of panels per
    attack and metric, a panel per score, a line per subject (score against eps in 1/255 units); returns the JSON path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    json_path.write_text(json.dumps(curves, indent=2) + "\n")
    groups = list(dict.fromkeys((curve["attack"], curve["threat_model"], curve["metric"]) for curve in curves))
    columns = max((len(curve["scores"]) for curve in curves), default=1)
    figure = Figure(figsize=(3.6 * columns, 2.8 * max(1, len(groups))), layout="constrained")
    axes = figure.subplots(max(1, len(groups)), columns, squeeze=False)
    for row, group in enumerate(groups):
        members = [curve for curve in curves if (curve["attack"], curve["threat_model"], curve["metric"]) == group]
        scores = members[0]["scores"]
        for column, score in enumerate(scores):
            panel = axes[row, column]
            for curve in members:
                known = [point for point in curve["points"] if point[score] is not None]
                subject = curve["model"] if curve["defense"] == "none" else f"{curve['model']} + {curve['defense']}"
                panel.plot([point["eps_255"] for point in known], [point[score] for point in known], marker="o", label=subject)
            panel.set(title=f"{group[0]} ({group[1]})", xlabel="eps (x / 255)", ylabel=score)
            panel.grid(alpha=0.3)
            panel.legend(fontsize="small")
        for column in range(len(scores), columns):
            axes[row, column].axis("off")
    figure.savefig(directory / f"{stem}.png", dpi=100)
    return json_path
