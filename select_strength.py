"""Choose the purifier's strength (t* for diffusion, sigma for NIM) for a classifier, on validation, and make it the export's default.

    python select_strength.py runs/teacher --purifier_dir runs/purifier/export                       # t* 25..200, white-box PGD-10 EOT-2
    python select_strength.py runs/teacher --purifier_dir runs/nim/export --strengths '[0.1, 0.2, 0.3, 0.4]'   # sigma
    python select_strength.py runs/teacher --attack.threat_model graybox --max_clean_drop 0.05 --max_images 256
    python select_strength.py runs/teacher --data.root ../shared/data/chest_xray_pneumonia_128 --data.source folder

The classifier is a run directory or a checkpoint file, with its data settings, as in `evaluate.py` (`--data.*`
overrides). On the first `--max_images` images of the validation split (a class-stratified subset) it measures the
classifier alone and behind the purifier at each strength of `--strengths` (the purifier's other settings: `--settings`
over the export's defaults): clean accuracy, and robust accuracy (right clean and attacked) under `--attack`, crafted
through the purifier (white-box, exact gradients, EOT) or, with ``threat_model: graybox``, on the classifier alone.
It selects the strength with the highest robust `--metric` among those whose clean `--metric` stays within
`--max_clean_drop` of the classifier alone (ties: the smaller strength), or with `--criterion fid` the one of lowest FID
between the classifier's pooled features of the purified adversarial images and of clean training images (UAD-RS), writes `strength_frontier.{json,png}` to
`--output_dir` (default: the purifier export) and, unless `--write_selection false`, the chosen settings to the export's
`purifier_settings.json`, which `load_purifier` (purify-then-fine-tune, the student) then uses unless told otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query PyPI on import

import torch  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser  # noqa: E402

from datamodules import ChestXRayDataModule  # noqa: E402
from lightning_modules.classifier import load_classifier  # noqa: E402
from robust_cxr.attacks import AttackSpec  # noqa: E402
from robust_cxr.cli_errors import run_cli  # noqa: E402
from robust_cxr.purification import purifier_class, write_default_settings  # noqa: E402
from robust_cxr.runs import MADE_BY, check_data_fits, file_sha256, find_run, run_defaults  # noqa: E402
from robust_cxr.strength import Criterion, SelectionMetric, select_strength, strength_frontier, stratified_images  # noqa: E402

DEFAULT_STRENGTHS = {"t_star": [25, 50, 75, 100, 125, 150, 200], "sigma": [level / 255 for level in (25, 50, 75, 100, 125, 150)]}
FRONTIER_FILE = "strength_frontier.json"  # the PNG goes beside it


def build_parser() -> LightningArgumentParser:
    parser = LightningArgumentParser(description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("run", type=str, help="the classifier: a run directory (config.yaml, checkpoints/best.ckpt) or a checkpoint file")
    parser.add_argument("--purifier_dir", type=str, default="runs/purifier/export", help="a diffusion or NIM purifier export")
    parser.add_argument("--strengths", type=list[float] | None, default=None,
                        help=f"t* (diffusion) or sigma in [0, 1] pixel units (NIM); default {DEFAULT_STRENGTHS}")
    parser.add_argument("--settings", type=dict | None, default=None,
                        help="the purifier's other settings, e.g. '{method: ddim, steps: 1}' (default: the export's)")
    parser.add_argument("--attack", type=AttackSpec,
                        default=AttackSpec(method="pgd", eps=0.03, steps=10, eot_samples=2, threat_model="whitebox"))
    parser.add_argument("--max_images", type=int | None, default=128, help="the validation images of index < N, class-stratified")
    parser.add_argument("--max_clean_drop", type=float, default=0.03, help="allowed drop of clean --metric below the classifier alone")
    parser.add_argument("--metric", type=SelectionMetric, default="balanced_acc",
                        help="balanced_acc (mean per-class recall, robust to class imbalance) or acc")
    parser.add_argument("--criterion", type=Criterion, default="clean_drop",
                        help="clean_drop: the most robust within --max_clean_drop; fid: UAD-RS, the lowest FID of the classifier's "
                             "pooled features of the purified adversarial images against --max_images clean training images")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="purifier noise of batch i: seed + i; attack starts keyed by image")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_dir", type=str | None, default=None, help="for strength_frontier.{json,png}; default: --purifier_dir")
    parser.add_argument("--write_selection", type=bool, default=True, help="write the selection to the export's purifier_settings.json")
    parser.add_class_arguments(ChestXRayDataModule, "data")
    return parser


def plot_frontier(frontier: dict, path: Path) -> None:
    """Clean and robust `metric` against strength, the classifier alone's clean level, the allowed-drop line (and the FID,
    for that criterion) and the selected strength, as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, rows, chosen = frontier["metric"], frontier["rows"], frontier["selected"]
    strengths = [row["strength"] for row in rows]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot(strengths, [row[f"clean_{metric}"] for row in rows], marker="o", label=f"clean {metric}")
    attack = f"{frontier['threat_model']} {frontier['attack']}, eps {frontier['eps']}, EOT-{frontier['eot_samples']}"
    axis.plot(strengths, [row[f"robust_{metric}"] for row in rows], marker="s", label=f"robust {metric} ({attack})")
    reference = frontier["undefended"][f"clean_{metric}"]
    axis.axhline(reference, color="gray", linestyle="--", label=f"classifier alone, clean ({reference:.3f})")
    if frontier["criterion"] == "clean_drop":
        axis.axhline(reference - frontier["max_clean_drop"], color="red", linestyle=":", label=f"allowed drop ({frontier['max_clean_drop']})")
    axis.axhline(frontier["undefended"][f"robust_{metric}"], color="gray", linestyle="-.", label="classifier alone, attacked")
    if frontier["criterion"] == "fid":
        fid_axis = axis.twinx()
        fid_axis.plot(strengths, [row["fid"] for row in rows], marker="^", color="purple", label="FID to clean training images")
        fid_axis.set_ylabel("FID (classifier's pooled features)")
        fid_axis.legend(fontsize=7, loc="upper center")
    if chosen is not None:
        axis.scatter([chosen["strength"]] * 2, [chosen[f"clean_{metric}"], chosen[f"robust_{metric}"]], s=160, facecolors="none",
                     edgecolors="black", zorder=3, label=f"selected {frontier['strength_name']} = {chosen['strength']:g}")
    axis.set_xlabel(f"purifier strength ({frontier['strength_name']})")
    axis.set_ylabel(metric)
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    axis.set_title(f"{Path(frontier['classifier']).name} behind {Path(frontier['purifier_dir']).parent.name}: "
                   f"{frontier['images']} validation images", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(args: list[str] | None = None) -> dict:
    """Parses `args` (default: the command line), measures the frontier, selects and writes; returns the frontier record."""
    parser = build_parser()
    checkpoint, config = find_run(parser.parse_args(args).run)
    parser.set_defaults({"data": run_defaults(checkpoint, config)["data"]})  # its data settings (no Trainer here)
    options = parser.parse_args(args)
    instantiated = parser.instantiate(options)
    data: ChestXRayDataModule = instantiated.data
    stage = load_classifier(checkpoint, MADE_BY)
    check_data_fits(stage, data, checkpoint)
    data.setup("validate")
    device = torch.device(options.device)
    classifier = stage.deployed_model().undefended.to(device)  # at its operating point
    images, labels, keys = (tensor.to(device) for tensor in stratified_images(data.datasets["val"], options.max_images))
    purifier_dir = Path(options.purifier_dir)
    strengths = options.strengths or DEFAULT_STRENGTHS[purifier_class(purifier_dir).strength_name]
    attack: AttackSpec = instantiated.attack
    reference = stratified_images(data.datasets["train"], options.max_images)[0].to(device) if options.criterion == "fid" else None
    frontier = strength_frontier(classifier, purifier_dir, sorted(strengths), options.settings, attack, images, labels, keys,
                                 options.batch_size, options.seed, data.num_classes, reference)
    frontier.update(
        classifier=str(checkpoint.resolve()), classifier_sha256=file_sha256(checkpoint), purifier_dir=str(purifier_dir.resolve()),
        split="val", images=len(images), attack=attack.label, threat_model=attack.threat_model, eps=attack.eps,
        eot_samples=attack.eot_samples, metric=options.metric, max_clean_drop=options.max_clean_drop, criterion=options.criterion,
        seed=options.seed, selected=None,
    )
    output_dir = Path(options.output_dir or purifier_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        frontier["selected"] = select_strength(frontier["rows"], frontier["undefended"][f"clean_{options.metric}"],
                                               options.max_clean_drop, options.metric, options.criterion)
    finally:  # the frontier is worth keeping when nothing qualifies
        (output_dir / FRONTIER_FILE).write_text(json.dumps(frontier, indent=2) + "\n")
        plot_frontier(frontier, (output_dir / FRONTIER_FILE).with_suffix(".png"))
    chosen = frontier["selected"]
    print(f"Selected {frontier['strength_name']} = {chosen['strength']:g}: clean {options.metric} {chosen[f'clean_{options.metric}']:.3f} "
          f"(alone {frontier['undefended'][f'clean_{options.metric}']:.3f}), robust {chosen[f'robust_{options.metric}']:.3f}; "
          f"wrote {output_dir / FRONTIER_FILE}")
    if options.write_selection:
        selection = {key: frontier[key] for key in ("criterion", "metric", "max_clean_drop", "classifier", "classifier_sha256", "split",
                                                    "images", "attack", "threat_model", "eps", "eot_samples", "seed", "undefended")}
        settings = {**frontier["settings"], frontier["strength_name"]: chosen["strength"]}
        write_default_settings(purifier_dir, settings, dict(selection, selected=chosen, frontier=str((output_dir / FRONTIER_FILE).resolve())))
        print(f"Wrote {settings} to {purifier_dir}: later stages load the purifier with them unless their purifier_settings say otherwise.")
    return frontier


if __name__ == "__main__":
    run_cli(main)
