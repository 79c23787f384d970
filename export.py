"""Export a classifier stage to ONNX and TorchScript, for deployment outside Python (onnxruntime) or without this project.

    python export.py runs/student                      # -> runs/student/export/student.onnx, student.torchscript.pt
    python export.py runs/teacher/checkpoints/best.ckpt --output exported/
    python export.py runs/purify_finetune --classifier-only   # the fine-tuned classifier; run the purifier beside it
    python export.py ... --debug                       # the full traceback of an error, not just its message

The exported model is the stage's deployed classifier with its normalization inside: images (B, C, S, S) float32 in
[0, 1] -> logits (B, K) at the checkpoint's operating point (argmax is its decision), C and S those of the checkpoint,
any batch size B (a dynamic axis of the ONNX graph).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query PyPI on import

from torch import nn  # noqa: E402

from lightning_modules.classifier import CLASSIFIER_COMMAND, load_classifier_module  # noqa: E402
from robust_cxr.cli_errors import run_cli  # noqa: E402
from robust_cxr.deployment import export_classifier  # noqa: E402


def exportable_classifier(checkpoint_or_run_dir: str | Path, classifier_only: bool = False) -> tuple[nn.Module, str, tuple[int, ...]]:
    """The module to export, its name and its input shape (1, C, S, S).

    A stage deployed behind a defense (the diffusion purifier of purify-then-fine-tune) is not exported: the purifier is
    a Python loop over reverse diffusion steps, one UNet call each, on random noise, whose shape, step count and noise
    a trace would fix to the example's. It raises, unless `classifier_only` asks for its classifier alone.
    """
    stage = load_classifier_module(checkpoint_or_run_dir, CLASSIFIER_COMMAND)
    deployed = stage.deployed_model()
    if deployed.defense != "none" and not classifier_only:
        raise ValueError(
            f"{type(stage).__name__} is deployed behind {deployed.defense}, a Python loop over reverse diffusion steps on "
            "random noise, which this export does not turn into one ONNX or TorchScript graph. Export its fine-tuned classifier with "
            "--classifier-only (it takes purified images) and purify with the purifier stage's diffusers export "
            "(runs/purifier/export) in front of it, or export the distilled student (configs/distill.yaml) instead."
        )
    hp = stage.hparams
    return deployed.undefended.eval(), deployed.model, (1, hp.in_chans, hp.image_size, hp.image_size)


def default_export_dir(checkpoint_or_run_dir: Path) -> Path:
    """`<run dir>/export` for a run directory or a checkpoint in its `checkpoints/`; else `export/` beside the checkpoint."""
    if checkpoint_or_run_dir.is_dir():
        return checkpoint_or_run_dir / "export"
    folder = checkpoint_or_run_dir.parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "export"


def main(args: list[str] | None = None) -> dict[str, Path]:
    """Parses `args` (default: the command line) and exports; returns the written files by format."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a classifier stage's run directory (its checkpoints/best.ckpt) or checkpoint file")
    parser.add_argument("--output", help="folder to write to (default: the run directory's export/)")
    parser.add_argument("--classifier-only", action="store_true", help="export the classifier without the purifier in front of it")
    options = parser.parse_args(args)
    classifier, name, input_shape = exportable_classifier(options.checkpoint, options.classifier_only)
    output = Path(options.output) if options.output else default_export_dir(Path(options.checkpoint))
    paths = export_classifier(classifier, input_shape, output, name)
    print(f"Exported {name}, [0, 1] images {tuple(input_shape[1:])} -> logits: " + ", ".join(str(path) for path in paths.values()))
    return paths


if __name__ == "__main__":
    run_cli(main)
