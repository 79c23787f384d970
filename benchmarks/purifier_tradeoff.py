"""The clean / robust / cost trade-off of the two purifiers in front of one teacher: NIM (De^3) over sigma, diffusion over t*.

Every defense defends the same teacher on the same test images (the whole test split, or its first --max-images,
a class-stratified subset as the split is class-interleaved): the diffusion purifier with DDIM at each ``STEPS:T*,T*``
of --diffusion (each with each --diffusion-repeats purifications per image, logits averaged), and the NIM denoiser at
each sigma of --sigma-levels (8-bit levels, divided by 255), each with each --nim-repeats. The repeats put the two at
about equal cost: one NIM forward costs a fraction of a UNet step, so NIM x4 costs about what DDIM-1 does. For each
it measures

- ``clean_acc``: accuracy on the clean images;
- ``graybox_robust_acc``: PGD (--attack-steps, L-inf --eps) crafted once on the undefended teacher and scored through
  the defense, right both clean and attacked (the report's robust accuracy, clean and attacked images purified with the
  same noise);
- ``whitebox_eot_robust_acc``: PGD through the defense itself (exact gradients) with EOT over --eot-samples draws, on
  the first --whitebox-images images, right both clean and attacked;
- ``*_balanced_acc``: the same, as the mean of the per-class figures (a defense that leaves the classifier answering
  one class reads 0.5 there, whatever that class's share);
- ``ms_per_image``: the median over --timing-rounds of a no_grad forward of the defended teacher on a batch of
  --batch-size images, divided by the batch size; each round times every defense once, in turn (after a warm-up
  round), so that the load of a shared machine weighs on all of them alike;

and, to compare the two at equal noise, ``noise_level_255``: sigma for NIM, and for diffusion the noise that x_t*
carries in [0, 1] pixel units, sqrt(1 - abar) / (2 sqrt(abar)), both in 8-bit levels. It writes the rows (JSON) and a plot
(PNG) of the three accuracies against ms per image, with the undefended teacher for reference, and of white-box against
clean accuracy (the trade-off each defense's strength moves along), and prints a Markdown table.

    python benchmarks/purifier_tradeoff.py --teacher-ckpt runs/teacher --purifier-dir runs/purifier/export \\
        --nim-dir runs/nim/export --output benchmarks/results/purifier_tradeoff_synthetic_cpu.json
    python benchmarks/purifier_tradeoff.py --data-source folder --data-root ../shared/data/chest_xray_pneumonia_128 \\
        --teacher-ckpt runs/pneumonia/teacher --purifier-dir runs/pneumonia/purifier/export --nim-dir runs/pneumonia/nim/export \\
        --output benchmarks/results/purifier_tradeoff_pneumonia_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from datamodules import ChestXRayDataModule  # noqa: E402
from lightning_modules.classifier import TEACHER_COMMAND, load_classifier  # noqa: E402
from robust_cxr.attacks import AttackSpec  # noqa: E402
from robust_cxr.purification import PurifiedClassifier, load_purifier  # noqa: E402
from robust_cxr.strength import evaluate_subject, standard_error, stratified_images  # noqa: E402
from robust_cxr.threat import DefendedModel  # noqa: E402


def ms_per_image(models: list[nn.Module], images: torch.Tensor, rounds: int) -> list[float]:
    """Median milliseconds per image of a no_grad forward of each model on the batch `images`, over `rounds` rounds that
    each time every model once, in turn, after a warm-up round."""
    timings: list[list[float]] = [[] for _ in models]
    with torch.no_grad():
        for run in range(rounds + 1):
            for model, model_timings in zip(models, timings):
                start = time.perf_counter()
                model(images)
                if run:
                    model_timings.append(1000 * (time.perf_counter() - start) / len(images))
    return [statistics.median(model_timings) for model_timings in timings]


def noise_level(purifier: nn.Module) -> float:
    """The std, in [0, 1] pixel units, of the noise the purifier adds: sigma (NIM, fixed), or the noise of x_t* relative to
    the image for diffusion, sqrt(1 - abar_t*) / (2 sqrt(abar_t*)) (x_t* = sqrt(abar) (2x - 1) + sqrt(1 - abar) noise)."""
    if purifier.strength_name == "sigma":
        return purifier.noise.mean
    abar = purifier.scheduler.alphas_cumprod[purifier.t_star].item()
    return (1 - abar) ** 0.5 / (2 * abar**0.5)


def plot(results: dict, path: Path) -> None:
    """Clean, gray-box and white-box-EOT accuracy against ms per image: one line per family (kind, steps, repeats) over its
    strengths, each point labelled by its strength; the undefended teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attack = f"{results['attack']}, eps {results['eps']}"
    metrics = [("clean_acc", "clean accuracy"), ("graybox_robust_acc", f"gray-box {attack}"),
               ("whitebox_eot_robust_acc", f"white-box {attack}, EOT-{results['eot_samples']} ({results['whitebox_images']} images)")]
    figure, axes = plt.subplots(1, 4, figsize=(21, 5))
    families: dict[str, list[dict]] = {}
    for row in results["defenses"]:
        families.setdefault(row["family"], []).append(row)
    teacher = results["teacher"]
    panels = [(axis, "ms_per_image", metric, title) for axis, (metric, title) in zip(axes, metrics)]
    panels.append((axes[3], "whitebox_clean_acc", "whitebox_eot_robust_acc", "trade-off: white-box against clean (same images)"))
    for axis, x_metric, y_metric, title in panels:
        if y_metric != "clean_acc":  # the teacher's white-box PGD, on the images of the panel
            reference = teacher["whitebox_robust_acc_all" if y_metric == "graybox_robust_acc" else "whitebox_robust_acc"]
            axis.axhline(reference, color="gray", linestyle="--", label=f"teacher, no defense: white-box {attack}")
        else:
            axis.axhline(teacher["clean_acc"], color="gray", linestyle="--", label=f"teacher, no defense ({teacher['ms_per_image']:.1f} ms/image)")
        for family, rows in families.items():
            marker = "o" if rows[0]["kind"] == "nim" else "s"
            cost = statistics.median(r["ms_per_image"] for r in rows)
            points = axis.plot([r[x_metric] for r in rows], [r[y_metric] for r in rows], marker=marker, label=f"{family} ({cost:.1f} ms/image)")[0]
            for row in rows:
                axis.annotate(row["strength_label"], (row[x_metric], row[y_metric]), textcoords="offset points", xytext=(4, 3),
                              fontsize=7, color=points.get_color())
        if x_metric == "ms_per_image":
            axis.set_xscale("log")
            axis.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels of a narrow log range overlap
            axis.set_xlabel(f"ms per image (defense + teacher, batch {results['batch_size']}, {results['device_short']})")
        else:
            axis.set_xlabel("clean accuracy on the white-box images")
        axis.set_title(title, fontsize=10)
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (robust: right clean and attacked)")
    for axis in axes[[0, 3]]:
        axis.legend(fontsize=7, loc="upper left" if axis is axes[3] else "lower left")
    figure.suptitle(f"{results['data']}: {results['images']} test images (white-box: {results['whitebox_images']}), eps {results['eps']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def markdown_table(results: dict) -> str:
    """The rows as a Markdown table; balanced accuracy in brackets where the JSON has it."""

    def cell(row: dict, metric: str) -> str:
        balanced = row.get(metric.replace("_acc", "_balanced_acc"))
        return f"{row[metric]:.3f}" + (f" ({balanced:.3f})" if balanced is not None else "")

    header = ("| defense | strength | noise (/255) | n_repeats | ms/image | clean (balanced) | gray-box PGD (balanced) | "
              "white-box PGD + EOT (balanced) | clean on the white-box images |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    teacher = results["teacher"]
    lines.append(f"| none | - | - | - | {teacher['ms_per_image']:.2f} | {cell(teacher, 'clean_acc')} | - | "
                 f"{teacher['whitebox_robust_acc']:.3f} | {teacher['whitebox_clean_acc']:.3f} |")
    for row in results["defenses"]:
        lines.append(
            f"| {row['label']} | {row['strength_label']} | {row['noise_level_255']:.0f} | {row['n_repeats']} | {row['ms_per_image']:.2f} | "
            f"{cell(row, 'clean_acc')} | {cell(row, 'graybox_robust_acc')} | {cell(row, 'whitebox_eot_robust_acc')} | "
            f"{row['whitebox_clean_acc']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-ckpt", default="runs/teacher", help="a classifier checkpoint or run directory")
    parser.add_argument("--purifier-dir", default="runs/purifier/export", help="the diffusion purifier export")
    parser.add_argument("--nim-dir", default="runs/nim/export", help="the NIM export")
    parser.add_argument("--data-source", default="synthetic", choices=["synthetic", "folder", "medmnist"])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--diffusion", nargs="*", default=["1:50,100,150,200", "5:100"],
                        help="DDIM settings STEPS:T*,T*,...: each t* with that many steps (none: NIM only)")
    parser.add_argument("--sigma-levels", type=float, nargs="+", default=[25, 50, 75, 100, 150], help="NIM sigma in 8-bit levels (/255)")
    parser.add_argument("--diffusion-repeats", type=int, nargs="+", default=[1], help="diffusion purifications per image, logits averaged")
    parser.add_argument("--nim-repeats", type=int, nargs="+", default=[1, 4], help="NIM purifications per image, logits averaged")
    parser.add_argument("--eps", type=float, default=0.03)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--eot-samples", type=int, default=2)
    parser.add_argument("--max-images", type=int, default=None, help="the first N images of the class-interleaved test split (default all)")
    parser.add_argument("--whitebox-images", type=int, default=64, help="white-box attacks run on the first N of those")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/purifier_tradeoff_cpu.json"),
                        help="the JSON; the PNG goes beside it with the same stem")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG (and print the table) from the --output JSON")
    args = parser.parse_args()
    if args.replot:
        results = json.loads(args.output.read_text())
        plot(results, args.output.with_suffix(".png"))
        print(markdown_table(results))
        return
    started = time.perf_counter()

    teacher_stage = load_classifier(args.teacher_ckpt, TEACHER_COMMAND)
    teacher = teacher_stage.deployed_model().undefended  # at its operating point
    data = ChestXRayDataModule(source=args.data_source, root=args.data_root, image_size=args.image_size,
                               channels=teacher_stage.hparams.in_chans)
    if data.num_classes != teacher_stage.hparams.num_classes:
        raise ValueError(f"The teacher has {teacher_stage.hparams.num_classes} classes, the data {data.num_classes}: pass the teacher's data.")
    data.setup("test")
    images, labels, keys = stratified_images(data.datasets["test"], args.max_images)
    count = len(images)
    white = min(args.whitebox_images, count)
    # The teacher's white-box PGD is the defenses' gray-box attack; white-box attacks run on the first `white` images.
    attack = AttackSpec(method="pgd", eps=args.eps, steps=args.attack_steps, threat_model="graybox", name="graybox")
    whitebox_attack = AttackSpec(method="pgd", eps=args.eps, steps=args.attack_steps, eot_samples=args.eot_samples, max_images=white, name="whitebox")
    size = args.batch_size
    classes = data.num_classes
    common = dict(images=images, labels=labels, keys=keys, seed=args.seed, num_classes=classes)
    alone = DefendedModel.alone("teacher", teacher)
    on_teacher = evaluate_subject(alone, [replace(attack, threat_model="whitebox"), whitebox_attack], batch_size=size, **common)
    results = dict(
        data=args.data_source if args.data_root is None else f"{args.data_source}:{Path(args.data_root).name}",
        device=f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, load average "
               f"{os.getloadavg()[0]:.1f} at start)",
        device_short=f"CPU, {torch.get_num_threads()} threads", torch=torch.__version__, images=count, whitebox_images=white,
        eps=args.eps, attack=f"PGD-{args.attack_steps}", eot_samples=args.eot_samples, batch_size=size,
        robust="right both clean and attacked, clean and attacked images purified on independent draws (the report's convention)",
        teacher=dict(
            clean_acc=float(on_teacher["none"]["clean_acc"]), whitebox_robust_acc=float(on_teacher["whitebox"]["robust_acc"]),
            whitebox_robust_acc_all=float(on_teacher["graybox"]["robust_acc"]), whitebox_clean_acc=float(on_teacher["whitebox"]["clean_acc"]),
            clean_balanced_acc=float(on_teacher["none"]["clean_balanced_acc"]),
        ),
        defenses=[],
    )
    print(json.dumps(results["teacher"]), flush=True)

    settings, defended_models = [], []
    for spec in args.diffusion:
        steps, t_stars = spec.split(":")
        settings += [("diffusion", f"DDIM-{steps}", dict(t_star=int(t), method="ddim", steps=int(steps)), f"t*={t}", int(t))
                     for t in t_stars.split(",")]
    settings += [("nim", "NIM", dict(sigma=level / 255), f"s={level:g}", level / 255) for level in args.sigma_levels]
    for kind, family, purifier_settings, strength_label, strength in settings:
        directory = args.purifier_dir if kind == "diffusion" else args.nim_dir
        purifier = load_purifier(directory, differentiable=True, **purifier_settings)
        for repeats in args.diffusion_repeats if kind == "diffusion" else args.nim_repeats:
            defended = PurifiedClassifier(purifier, teacher, n_repeats=repeats)
            attack_start = time.perf_counter()
            measured = evaluate_subject(alone.behind(f"purifier/{purifier.label}", purifier, defended), [attack, whitebox_attack],
                                        batch_size=max(1, size // repeats), **common)  # the purifier runs on batches of about --batch-size
            gray, white_box = measured["graybox"], measured["whitebox"]
            row = dict(
                kind=kind, family=family + (f" x{repeats}" if repeats > 1 else ""), label=purifier.label, strength=strength,
                strength_label=strength_label, noise_level_255=255 * noise_level(purifier), n_repeats=repeats,
                clean_acc=float(gray["clean_acc"]), graybox_robust_acc=float(gray["robust_acc"]),
                graybox_robust_acc_se=standard_error(float(gray["robust_acc"]), count),
                whitebox_eot_robust_acc=float(white_box["robust_acc"]), whitebox_eot_robust_acc_se=standard_error(float(white_box["robust_acc"]), white),
                whitebox_clean_acc=float(white_box["clean_acc"]), attack_seconds=time.perf_counter() - attack_start,
                clean_balanced_acc=float(gray["clean_balanced_acc"]), graybox_robust_balanced_acc=float(gray["robust_balanced_acc"]),
                whitebox_eot_robust_balanced_acc=float(white_box["robust_balanced_acc"]),
            )
            results["defenses"].append(row)
            defended_models.append(defended)
            print(json.dumps(row), flush=True)
    costs = ms_per_image([teacher, *defended_models], images[:size], args.timing_rounds)
    for row, cost in zip([results["teacher"], *results["defenses"]], costs):
        row["ms_per_image"] = cost
    results["seconds"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.output.with_suffix(".png"))
    print(markdown_table(results))
    print(f"Wrote {args.output} and {args.output.with_suffix('.png')} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
