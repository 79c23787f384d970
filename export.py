"""Export a classifier stage to ONNX and TorchScript, and its defended pipeline to one ONNX graph, for deployment outside
Python (onnxruntime) or without this project.

    python export.py runs/student                      # -> runs/student/export/student.onnx, student.torchscript.pt
    python export.py runs/teacher/checkpoints/best.ckpt --output exported/
    python export.py runs/purify_finetune              # + teacher_finetuned+purifier.onnx, the purifier then the classifier
    python export.py runs/reformer                     # a reformer in front of a classifier: + teacher+reformer.onnx
    python export.py runs/purify_finetune --classifier-only   # the fine-tuned classifier alone
    python export.py ... --debug                       # the full traceback of an error, not just its message

The classifier export is the stage's deployed classifier with its normalization inside, without its defense: images
(B, C, S, S) float32 in [0, 1] -> logits (B, K) at the checkpoint's operating point (argmax is its decision), C and S
those of the checkpoint, any batch size B (a dynamic axis). A stage deployed behind a defense (purify-then-fine-tune
behind the diffusion purifier or the NIM denoiser, the reformer) also gets its pipeline, defense then classifier, as one
ONNX graph `<model>+<defense>.onnx` with the same input and output; a random defense's draws are inputs of the graph
(`robust_cxr.deployment.pipeline_noise`): ``noise`` (D, R * B, C, S, S) standard normal, D the purifier's draws per
purification (the diffusion purifier: 1 + its reverse steps; NIM: 1), R its ``n_repeats``, repeat r of image b at row
r * B + b; and for NIM ``sigma`` (R * B,), each image's noise std, drawn from the distribution the metadata records.
Every graph describes itself in its ONNX metadata (`robust_cxr.deployment.METADATA_KEY`, JSON): class names, defense
and purifier settings, ``n_repeats`` and its ``noise`` inputs with their shapes and distributions.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would query PyPI on import

from lightning_modules.classifier import CLASSIFIER_COMMAND  # noqa: E402
from lightning_modules.stage import StageModule, load_stage_module  # noqa: E402
from robust_cxr.cli_errors import run_cli  # noqa: E402
from robust_cxr.deployment import ExportedGraph, export_classifier, export_pipeline, pipeline_noise  # noqa: E402


def load_exportable_stage(checkpoint_or_run_dir: str | Path) -> StageModule:
    """The stage in `checkpoint_or_run_dir` (`load_stage_module`), which must deploy a classifier: a classifier stage, or
    a defense stage in front of one (the reformer)."""
    stage = load_stage_module(checkpoint_or_run_dir, CLASSIFIER_COMMAND)
    task = getattr(stage, "task", None)
    if task is None or task.name != "classification":
        deployed = "a denoiser" if task is None else f"a {task.name} model"
        raise ValueError(
            f"{checkpoint_or_run_dir} ({type(stage).__name__}) deploys {deployed}, not a classifier: export.py exports classifier "
            "stages (teacher, student, purify-then-fine-tune) and a reformer in front of a classifier. A purifier stage's "
            "deployable form is its export folder (runs/purifier/export, runs/nim/export)."
        )
    return stage


def export_stage(stage: StageModule, output: Path, classifier_only: bool = False) -> dict[str, Path]:
    """Writes the stage's classifier (ONNX ``onnx``, TorchScript ``torchscript``) and, unless `classifier_only`, for a
    stage deployed behind a defense its pipeline graph (``pipeline``) to `output`; returns the paths by kind."""
    deployed = stage.deployed_model()
    hp = stage.hparams
    input_shape = (1, hp.in_chans, hp.image_size, hp.image_size)
    metadata = dict(model=deployed.model, class_names=list(hp.class_names or [str(label) for label in range(hp.num_classes)]),
                    decision_threshold=deployed.decision_threshold)
    paths = export_classifier(deployed.undefended.eval(), input_shape, output, deployed.model, {**metadata, "defense": "none"})
    if deployed.pipeline is not deployed.undefended and not classifier_only:
        noise = pipeline_noise(deployed.defense_module, input_shape[1:])
        pipeline_metadata = {**metadata, "defense": deployed.defense, "purifier_settings": hp.get("purifier_settings"),
                             "classifier": paths["onnx"].name}
        paths["pipeline"] = export_pipeline(deployed.pipeline.eval(), input_shape, output / f"{deployed.key}.onnx", noise,
                                            hp.get("n_repeats", 1), pipeline_metadata)
    return paths


def default_export_dir(checkpoint_or_run_dir: Path) -> Path:
    """`<run dir>/export` for a run directory or a checkpoint in its `checkpoints/`; else `export/` beside the checkpoint."""
    if checkpoint_or_run_dir.is_dir():
        return checkpoint_or_run_dir / "export"
    folder = checkpoint_or_run_dir.parent
    return (folder.parent if folder.name == "checkpoints" else folder) / "export"


def main(args: list[str] | None = None) -> dict[str, Path]:
    """Parses `args` (default: the command line) and exports; returns the written files by kind."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a classifier or reformer stage's run directory (its checkpoints/best.ckpt) or checkpoint file")
    parser.add_argument("--output", help="folder to write to (default: the run directory's export/)")
    parser.add_argument("--classifier-only", action="store_true", help="export the classifier alone, not the pipeline behind its defense")
    options = parser.parse_args(args)
    stage = load_exportable_stage(options.checkpoint)
    output = Path(options.output) if options.output else default_export_dir(Path(options.checkpoint))
    paths = export_stage(stage, output, options.classifier_only)
    print(f"Exported [0, 1] images {(stage.hparams.in_chans, stage.hparams.image_size, stage.hparams.image_size)} -> logits: "
          + ", ".join(str(path) for path in paths.values()))
    if "pipeline" in paths:
        noise = ExportedGraph(paths["pipeline"]).metadata["noise"]
        inputs = [f"{name} ({', '.join('N' if size is None else str(size) for size in spec['shape'])}) ~ {json.dumps(spec['distribution'])}"
                  for name, spec in noise.items()]
        print(f"{paths['pipeline'].name} also takes " + "; ".join(inputs) + ", N = n_repeats * B" if inputs
              else f"{paths['pipeline'].name} is deterministic: no noise inputs")
    return paths


if __name__ == "__main__":
    run_cli(main)
