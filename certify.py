"""Certify a finished classifier run's L2 robustness by (denoised) randomized smoothing: Cohen et al.'s PREDICT and CERTIFY.

    python certify.py runs/teacher --denoiser diffusion --purifier_dir runs/purifier/export --sigma 0.25     # Carlini et al.
    python certify.py runs/purify_finetune_smoothing --denoiser diffusion --sigma 0.25 --n 10000 --max_images 256
    python certify.py runs/teacher_gaussian --denoiser none --sigma 0.25                                       # Cohen et al.
    python certify.py runs/teacher --denoiser nim --purifier_dir runs/nim/export --sigma 0.25 --trainer.devices 2 --trainer.strategy ddp
    python certify.py runs/teacher_gaussian --denoiser none --sigma 0.25 --check_images 16    # and attack 16 certificates at 0.9 x radius
    python certify.py ... --debug                                                  # the full traceback of an error

The input is a run directory or a checkpoint file of any classifier stage, as in `evaluate.py`: the DataModule and the
Trainer's accelerator, strategy, devices, num_nodes and precision come from the run's config, each an ordinary override
(`--data.*`, `--trainer.*`). The base classifier is the run's classifier alone at its operating point (without the
run's own purifier), behind the smoothing module of `--denoiser` at `--sigma` ([0, 1] pixel units): ``none`` adds
Gaussian noise only, ``diffusion`` and ``nim`` denoise it in one step with the export in `--purifier_dir` (default: the
run's own `purifier_dir`). On the class-stratified first `--max_images` test images (default: all), each image gets
`--n0` selection and `--n` estimation draws of noise keyed by (`--seed`, image index, draw index), `--draws_per_batch`
per forward pass. With `--check_images N`, each certified image of index < N is attacked by PGD-L2 with EOT on the
smoothed classifier within `--check_factor` (0.9) x its radius, and PREDICT runs again at the attacked image: the
report's `radius_check` counts the answers that changed (`contradicted`, which must be 0). `--output_dir` (default
`<run dir>/certify/<subject>`, e.g. `teacher+diffusion_smoothing@s0.25`) receives `certificates.json`,
`certification_report.{json,md}` and `certified_accuracy.{json,png}`. Each finished test batch is saved under
`<output_dir>/batches/`: the same command after a kill resumes; other settings with an existing `batches/` are an
error that names what changed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Literal

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query PyPI on import

import lightning as L  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402

from callbacks.evaluation_journal import SETTINGS_FILE, check_or_write_settings  # noqa: E402
from datamodules import ChestXRayDataModule  # noqa: E402
from lightning_modules.certification import SmoothingCertifier  # noqa: E402
from lightning_modules.classifier import load_classifier  # noqa: E402
from robust_cxr.certification import CERTIFIED_RADII, CertificationSettings, RadiusCheck  # noqa: E402
from robust_cxr.cli_errors import run_cli  # noqa: E402
from robust_cxr.runs import MADE_BY, check_data_fits, file_sha256, find_run, run_defaults, run_directory  # noqa: E402
from robust_cxr.smoothing import smoothing_module  # noqa: E402

BATCHES_FOLDER = "batches"  # in the output folder: each finished test batch's results, for resuming


def build_parser() -> LightningArgumentParser:
    parser = LightningArgumentParser(description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("run", type=str, help="a classifier run directory (config.yaml, checkpoints/best.ckpt) or a checkpoint file")
    parser.add_argument("--sigma", type=float, required=True, help="the noise std in [0, 1] pixel units, > 0")
    parser.add_argument("--denoiser", type=Literal["diffusion", "nim", "none"], required=True,
                        help="diffusion: the DDPM export in one step; nim: the NIM export; none: Gaussian noise only (Cohen et al.)")
    parser.add_argument("--purifier_dir", type=str | None, default=None, help="the denoiser's export (default: the run's purifier_dir)")
    parser.add_argument("--n0", type=int, default=100, help="selection draws per image")
    parser.add_argument("--n", type=int, default=10000, help="estimation draws per image")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability of each certificate")
    parser.add_argument("--seed", type=int, default=0, help="keys the noise with each image's index and each draw's index")
    parser.add_argument("--draws_per_batch", type=int, default=1000, help="noisy images per forward pass (memory); the noise does not depend on it")
    parser.add_argument("--max_images", type=int | None, default=None, help="the test images of index < N, class-stratified (default: all)")
    parser.add_argument("--radii", type=list[float], default=list(CERTIFIED_RADII), help="L2 radii of the report's rows")
    parser.add_argument("--check_images", type=int, default=0,
                        help="attack the certified images of index < N at --check_factor x their radius (PGD-L2 with EOT; 0: none)")
    parser.add_argument("--check_steps", type=int, default=20, help="PGD-L2 steps of the radius check")
    parser.add_argument("--check_eot", type=int, default=8, help="noise draws per step of the radius check, >= 2")
    parser.add_argument("--check_factor", type=float, default=0.9, help="the radius check's L2 budget as a share of each radius")
    parser.add_argument("--output_dir", type=str | None, default=None, help="default: <run dir>/certify/<subject>")
    parser.add_class_arguments(ChestXRayDataModule, "data")
    parser.add_class_arguments(L.Trainer, "trainer")
    parser.set_defaults({"trainer.logger": False, "trainer.enable_checkpointing": False, "trainer.enable_model_summary": False,
                         "trainer.enable_progress_bar": False})  # the certifier logs progress with an ETA instead
    return parser


def main(args: list[str] | None = None) -> dict:
    """Parses `args` (default: the command line), certifies, writes the results; returns the report (rank 0; {} elsewhere)."""
    parser = build_parser()
    options = parser.parse_args(args)
    settings = CertificationSettings(options.sigma, options.n0, options.n, options.alpha, options.seed, options.draws_per_batch)
    check = RadiusCheck(options.check_images, options.check_steps, options.check_eot, options.check_factor)
    checkpoint, config = find_run(options.run)
    parser.set_defaults(run_defaults(checkpoint, config))
    options = parser.parse_args(args)
    stage = load_classifier(checkpoint, MADE_BY)
    if options.denoiser == "none" and options.purifier_dir is not None:
        raise ValueError("--purifier_dir names the denoiser's export, and --denoiser none has no denoiser: drop --purifier_dir.")
    purifier_dir = options.purifier_dir or (stage.hparams.get("purifier_dir") if options.denoiser != "none" else None)
    smoothing = smoothing_module(options.denoiser, settings.sigma, purifier_dir)
    deployed = stage.deployed_model()
    subject = f"{deployed.model}+{smoothing.label}"
    output_dir = Path(options.output_dir or run_directory(checkpoint) / "certify" / subject)
    options.trainer.default_root_dir = str(output_dir)
    instantiated = parser.instantiate(options)
    data: ChestXRayDataModule = instantiated.data
    check_data_fits(stage, data, checkpoint)
    trainer: L.Trainer = instantiated.trainer
    journal_dir = output_dir / BATCHES_FOLDER
    check_or_write_settings(
        journal_dir / SETTINGS_FILE,
        dict(checkpoint=str(checkpoint.resolve()), checkpoint_sha256=file_sha256(checkpoint), data=options.data.as_dict(), subject=subject,
             purifier_dir=str(Path(purifier_dir).resolve()) if purifier_dir else None, max_images=options.max_images,
             world_size=trainer.world_size, radius_check=asdict(check),
             **{key: value for key, value in asdict(settings).items() if key != "draws_per_batch"}),
        fix=f"Delete {journal_dir} to certify afresh, or give another --output_dir.",
    )
    certifier = SmoothingCertifier(deployed.undefended, smoothing, settings, data.class_names, subject, output_dir, journal_dir,
                                   options.max_images, tuple(options.radii), check)
    rank_zero_info(f"Certifying {subject} ({checkpoint}) at sigma {settings.sigma}, n0 {settings.n0}, n {settings.n}, alpha {settings.alpha} -> {output_dir}")
    trainer.test(certifier, datamodule=data, verbose=False)
    report = output_dir / "certification_report.json"
    return json.loads(report.read_text()) if trainer.is_global_zero else {}


if __name__ == "__main__":
    run_cli(main)
