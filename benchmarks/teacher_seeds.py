"""Seed stability of the default teacher: configs/teacher.yaml trained and tested once per seed, against a floor.

Each seed is `python train.py --config configs/teacher.yaml --seed_everything SEED` in a run directory of its own. The
data seed (`--data.seed`) stays the config's, so every run has the same split and the same test images and only the
training's randomness changes (initialisation, shuffling, augmentation, attack starts): the spread is the training's,
not the test sample's. Per seed: test accuracy, balanced accuracy and sensitivity (the tuberculosis recall) and the
wall time of the whole command; then their mean, lowest and spread, and whether the floor holds. Writes a JSON and a
Markdown table; exits with status 1 when the floor is missed.

    python benchmarks/teacher_seeds.py                                   # seeds 0 1 2 -> benchmarks/results/teacher_seeds_<device>.{json,md}
    python benchmarks/teacher_seeds.py --seeds 0 --output /tmp/seeds.json --run_root /tmp/seed_runs -- --trainer.max_epochs 1
                                                                         # a quick check: arguments after -- go to train.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/teacher.yaml"
FLOOR = dict(mean_accuracy=0.90, lowest_accuracy=0.88, lowest_sensitivity=0.85)  # every seed's sensitivity at least the last
METRICS = dict(accuracy="test/acc", balanced_accuracy="test/balanced_acc", sensitivity="test/sensitivity")  # test_metrics.json names


def train_seed(seed: int, run_dir: Path, overrides: list[str]) -> dict:
    """Trains and tests the default teacher with `seed` in the absolute `run_dir` (which must not exist yet, or train.py would
    resume the run there); returns its test figures (`METRICS`) and ``wall_seconds``."""
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists: a run there would resume instead of training afresh; delete it or pass another --run_root.")
    command = [sys.executable, "train.py", "--config", CONFIG, "--seed_everything", str(seed), "--run_dir", str(run_dir), *overrides]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    wall_seconds = time.perf_counter() - start
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    return dict(seed=seed, **{name: metrics[key] for name, key in METRICS.items()}, wall_seconds=wall_seconds)


def seed_statistics(runs: list[dict]) -> dict:
    """Mean, lowest, highest and spread (highest - lowest) of each figure over `runs`, and the wall time's mean."""
    figures = {name: [run[name] for run in runs] for name in METRICS}
    result = {f"{kind}_{name}": value for name, values in figures.items()
              for kind, value in (("mean", statistics.fmean(values)), ("lowest", min(values)), ("highest", max(values)),
                                  ("spread", max(values) - min(values)))}
    return dict(result, mean_wall_seconds=statistics.fmean(run["wall_seconds"] for run in runs))


def floor_misses(summary: dict, floor: dict[str, float] = FLOOR) -> list[str]:
    """The floors of `floor` that `summary` (`seed_statistics`) misses, in words; empty when all hold."""
    return [f"{name.replace('_', ' ')} {summary[name]:.3f} < {minimum}" for name, minimum in floor.items() if summary[name] < minimum]


def current_commit() -> str | None:
    """The repository's commit (short hash, ``-dirty`` with uncommitted changes), None outside a git checkout."""
    described = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    return described.stdout.strip() or None


def markdown_table(result: dict) -> str:
    """The runs, their statistics and the floor of `result` (the JSON this benchmark writes) as Markdown."""
    summary = result["summary"]
    lines = [f"Default teacher ({CONFIG}) per seed, data seed fixed; commit {result.get('commit') or 'unknown'}; {result['device']}; "
             f"train.py overrides: {' '.join(result['overrides']) or 'none'}.", "",
             "| seed | accuracy | balanced accuracy | sensitivity | wall time (s) |", "|---|---|---|---|---|"]
    for run in result["runs"]:
        lines.append(f"| {run['seed']} | {run['accuracy']:.3f} | {run['balanced_accuracy']:.3f} | {run['sensitivity']:.3f} | {run['wall_seconds']:.0f} |")
    for kind in ("mean", "lowest", "spread"):
        lines.append(f"| {kind} | " + " | ".join(f"{summary[f'{kind}_{name}']:.3f}" for name in METRICS)
                     + (f" | {summary['mean_wall_seconds']:.0f} |" if kind == "mean" else " | |"))
    floor = ", ".join(f"{name.replace('_', ' ')} >= {minimum}" for name, minimum in result["floor"].items())
    verdict = "met" if not result["floor_misses"] else "missed: " + "; ".join(result["floor_misses"])
    lines += ["", f"Floor ({floor}): {verdict}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    own, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--output", type=Path, default=REPO / f"benchmarks/results/teacher_seeds_{device}.json", help="the JSON; the .md goes beside it")
    parser.add_argument("--run_root", type=Path, default=Path("runs/teacher_seeds"), help="run directories seed<N> go here (relative: to the repository)")
    args = parser.parse_args(own)
    runs = [train_seed(seed, REPO / args.run_root / f"seed{seed}", overrides) for seed in args.seeds]
    summary = seed_statistics(runs)
    result = dict(
        benchmark="teacher_seeds", config=CONFIG, commit=current_commit(), overrides=overrides, data_seed="the config's (fixed)",
        device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        runs=runs, summary=summary, floor=FLOOR, floor_misses=floor_misses(summary),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result)
    args.output.with_suffix(".md").write_text(table)
    print(table, end="")
    return 1 if result["floor_misses"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
