"""Evaluate a finished run under an attack suite, without retraining: the usual robustness report, in a folder of its own.

    python evaluate.py runs/purify_finetune --suite configs/eval/strong.yaml     # a run directory, a suite file
    python evaluate.py runs/teacher --suite strong --max_images 256               # a suite name is looked up in configs/eval/
    python evaluate.py runs/student/checkpoints/best.ckpt --attacks '[{method: pgd, eps: 0.01, steps: 50}]'
    python evaluate.py runs/teacher --eps_curve '[{method: pgd, steps: 10}]' --curve_eps '[0, 1, 2, 4, 8, 16]'   # robustness curves
    python evaluate.py runs/teacher --suite strong --data.root ../shared/data/chest_xray_pneumonia_128 --trainer.devices 2 --trainer.strategy ddp
    python evaluate.py ... --debug                                                # the full traceback of an error

The input is a run directory (its `config.yaml` and `checkpoints/best.ckpt`) or a checkpoint file (a run's
`config.yaml` two folders up is read if there is one; otherwise the data settings stored in the checkpoint). The stage is
rebuilt from its checkpoint (`load_stage_module`); the DataModule and the Trainer's devices, strategy, precision and
loggers come from the run's config, each an ordinary override (`--data.*`, `--trainer.*`). The suite is a YAML list of
attacks in the format of the configs' `adversarial.attacks` (`--attacks` adds more). The one adversarial callback runs
it through `trainer.test` and writes `robustness_report.{json,md}`, `adversarial_examples.png`, `test_metrics.json`
(and the W&B table when the run logs to W&B) to `--output_dir` (default `<run dir>/eval/<suite name>`), with a
worst-case row per subject and progress with an ETA. `--eps_curve` adds attacks run at every eps of `--curve_eps` (1/255
units), ordinary attacks of the suite, and gathers their rows into `robustness_curve.{json,png}`. Each finished test batch is saved under `<output_dir>/batches/`: the
same command after a kill (or a SLURM requeue) resumes, attacking only the batches that had not finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query PyPI on import

import lightning as L  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402

from callbacks import AdversarialExampleCallback  # noqa: E402
from callbacks.evaluation_journal import check_or_write_settings  # noqa: E402
from datamodules import ChestXRayDataModule  # noqa: E402
from lightning_modules.stage import load_stage_module  # noqa: E402
from loggers import configure_loggers, finish_wandb_runs, is_wandb_config, logger_configs  # noqa: E402
from robust_cxr.attacks import AttackSpec  # noqa: E402
from robust_cxr.cli_errors import run_cli  # noqa: E402
from robust_cxr.reports import CURVE_EPS_255, eps_curve_attacks, robustness_curves, write_robustness_curves  # noqa: E402
from robust_cxr.runs import DEVICE_KEYS, MADE_BY, check_data_fits, file_sha256, find_run, run_defaults, run_directory, upstream_sha256  # noqa: E402

SUITE_FOLDER = Path(__file__).resolve().parent / "configs" / "eval"  # where `--suite NAME` is looked up
TRAINER_KEYS_KEPT = (*DEVICE_KEYS, "logger")  # from the run's config
BATCHES_FOLDER = "batches"  # in the output folder: each finished test batch's results, for resuming


def load_suite(suite: str | Path) -> list[AttackSpec]:
    """The attacks of a suite file, a YAML list of `AttackSpec` fields (``- {method: pgd, eps: 0.03, steps: 100}``); a
    bare name (``strong``) is looked up in `SUITE_FOLDER`."""
    path = Path(suite)
    if not path.is_file() and path.parent == Path("."):
        path = next((candidate for candidate in (SUITE_FOLDER / path.name, SUITE_FOLDER / f"{path.name}.yaml") if candidate.is_file()), path)
    if not path.is_file():
        raise FileNotFoundError(f"Suite {suite} does not exist; give a YAML file or the name of one in {SUITE_FOLDER}.")
    entries = yaml.safe_load(path.read_text())
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"Suite {path} must be a YAML list of attacks, e.g. `- {{method: pgd, eps: 0.03, steps: 100}}`.")
    fields = set(AttackSpec.__dataclass_fields__)
    for entry in entries:
        unknown = sorted(set(entry) - fields)
        if unknown:
            raise ValueError(f"Suite {path}: {unknown} are no attack fields; use {sorted(fields)}.")
    return [AttackSpec(**entry) for entry in entries]


def build_parser() -> LightningArgumentParser:
    parser = LightningArgumentParser(description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("run", type=str, help="a run directory (config.yaml, checkpoints/best.ckpt) or a checkpoint file")
    parser.add_argument("--suite", type=str | None, default=None, help="a YAML list of attacks, or a suite name in configs/eval/")
    parser.add_argument("--attacks", type=list[AttackSpec] | None, default=None, help="attacks added to the suite's")
    parser.add_argument("--eps_curve", type=list[AttackSpec] | None, default=None,
                        help="attacks each run at every --curve_eps (their own eps is replaced): robustness_curve.{json,png}")
    parser.add_argument("--curve_eps", type=list[float], default=list(CURVE_EPS_255), help="the eps of --eps_curve in 1/255 units; 0: clean")
    parser.add_argument("--max_images", type=int | None, default=None, help="the test images of index < N, class-stratified (default: all)")
    parser.add_argument("--output_dir", type=str | None, default=None, help="default: <run dir>/eval/<suite name>")
    parser.add_argument("--seed", type=int | None, default=None, help="the attacks' seed (default: the run's adversarial.seed)")
    parser.add_argument("--worst_case", type=bool, default=True, help="a worst-case row per subject over the suite")
    parser.add_argument("--grid_images", type=int, default=8, help="images in adversarial_examples.png")
    parser.add_argument("--subjects", type=list[str] | None, default=None,
                        help="report subjects to attack, e.g. '[teacher_finetuned+purifier]' (default: all the stage reports)")
    parser.add_class_arguments(ChestXRayDataModule, "data")
    parser.add_class_arguments(L.Trainer, "trainer")
    parser.set_defaults({"trainer.logger": False, "trainer.enable_checkpointing": False, "trainer.enable_model_summary": False,
                         "trainer.enable_progress_bar": False})  # the callback logs progress with an ETA instead
    return parser


def suite_name(suite: str | None, attacks: list | None, eps_curve: list | None) -> str:
    """The name of the suite: its file's stem, ``custom`` for `--attacks` without one, ``eps_curve`` for `--eps_curve` alone."""
    if not suite and not attacks and not eps_curve:
        raise ValueError("No attacks to run: give --suite (e.g. configs/eval/strong.yaml), --attacks or --eps_curve.")
    return Path(suite).stem if suite else "custom" if attacks else "eps_curve"


def main(args: list[str] | None = None) -> list[dict]:
    """Parses `args` (default: the command line), evaluates, writes the report; returns its rows."""
    parser = build_parser()
    options = parser.parse_args(args)
    checkpoint, config = find_run(options.run)
    parser.set_defaults(run_defaults(checkpoint, config, TRAINER_KEYS_KEPT))
    options = parser.parse_args(args)
    name = suite_name(options.suite, options.attacks, options.eps_curve)
    attacks = load_suite(options.suite) if options.suite else []
    run_dir = run_directory(checkpoint)
    output_dir = Path(options.output_dir or run_dir / "eval" / name)
    seed = options.seed if options.seed is not None else (config or {}).get("adversarial", {}).get("seed", 0)

    trainer_options = options.trainer
    trainer_options.default_root_dir = str(output_dir)
    loggers = logger_configs(trainer_options.logger)
    for logger in loggers:
        if is_wandb_config(logger):  # a W&B run of its own, resumed with the evaluation
            logger.init_args.id = logger.init_args.version = None
            logger.init_args.name = f"{run_dir.name}-eval-{name}"
    configure_loggers(loggers, output_dir)

    instantiated = parser.instantiate(options)
    attacks += instantiated.attacks or []  # AttackSpecs once instantiated
    curve_attacks = instantiated.eps_curve or []
    attacks += [point for spec in curve_attacks for point in eps_curve_attacks(spec, options.curve_eps)]
    data: ChestXRayDataModule = instantiated.data
    stage = load_stage_module(checkpoint, MADE_BY)
    check_data_fits(stage, data, checkpoint)
    callback = AdversarialExampleCallback(
        attacks=attacks, test_max_images=options.max_images, grid_images=options.grid_images, seed=seed,
        worst_case=options.worst_case, batch_results_dir=str(output_dir / BATCHES_FOLDER), progress=True,
        subjects=options.subjects,
    )
    trainer: L.Trainer = instantiated.trainer
    trainer.callbacks.append(callback)
    check_or_write_settings(
        output_dir / BATCHES_FOLDER / "source.json",
        dict(checkpoint=str(checkpoint.resolve()), checkpoint_sha256=file_sha256(checkpoint), upstream_sha256=upstream_sha256(dict(stage.hparams)),
             data=options.data.as_dict()),
        fix=f"Delete {output_dir} to evaluate afresh, or give another --output_dir.",
    )
    L.seed_everything((config or {}).get("seed_everything", 0), verbose=False)  # a random defense's noise in the stage's own test metrics
    rank_zero_info(f"Evaluating {checkpoint} under {[spec.label for spec in attacks]} -> {output_dir}")
    results = trainer.test(stage, datamodule=data, verbose=False)
    report = output_dir / "robustness_report.json"
    rows = json.loads(report.read_text()) if report.is_file() else []
    if trainer.is_global_zero:
        (output_dir / "test_metrics.json").write_text(json.dumps(results[0] if results else {}, indent=2) + "\n")
        if curve_attacks:
            curves = write_robustness_curves(robustness_curves(rows, curve_attacks, options.curve_eps), output_dir)
            rank_zero_info(f"Robustness curves: {curves}")
    finish_wandb_runs(trainer)
    return rows


if __name__ == "__main__":
    run_cli(main)
