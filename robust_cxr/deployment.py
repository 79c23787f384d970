"""Export for deployment: a classifier (an `nn.Module`, [0, 1] images -> logits) to ONNX and TorchScript, and a defended
pipeline (defense then classifier) to one ONNX graph whose random draws are graph inputs; `ExportedGraph` runs either.

Every ONNX graph written here carries a JSON description under the metadata key `METADATA_KEY`: whatever the exporter
passes (class names, the defense and its settings, ...), plus ``n_repeats`` and ``noise``, the graph's random inputs
as `pipeline_noise` describes them (empty for a deterministic graph).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
from torch import nn

from robust_cxr.nim import NIMPurifier, NoiseScale
from robust_cxr.purification import Purifier

ONNX_OPSET = 17
METADATA_KEY = "robust_cxr"
STANDARD_NORMAL = {"distribution": "normal"}
PIPELINE_EXAMPLE_BATCH = 2  # not 1: a batch size fixed by the trace would then broadcast at other sizes instead of failing


def export_classifier(classifier: nn.Module, input_shape: tuple[int, ...], directory: Path, name: str,
                      metadata: dict[str, Any]) -> dict[str, Path]:
    """Writes `classifier` ([0, 1] images -> logits) as `<name>.onnx` (dynamic batch, `metadata` inside) and
    `<name>.torchscript.pt`."""
    directory.mkdir(parents=True, exist_ok=True)
    example = torch.rand(input_shape)
    paths = {"onnx": directory / f"{name}.onnx", "torchscript": directory / f"{name}.torchscript.pt"}
    _export_onnx(classifier, (example,), paths["onnx"], {}, 1, metadata)
    with torch.no_grad():
        torch.jit.trace(classifier, example).save(paths["torchscript"])
    return paths


def pipeline_noise(defense: nn.Module | None, image_shape: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """The random inputs that `defense`'s forward takes as keywords beside images of `image_shape` (C, H, W), each with
    its ``shape`` (None at the batch axis, whose size is the number of purified images: n_repeats * B) and
    ``distribution``: a diffusion `Purifier` takes ``noise`` (noise_draws, N, C, H, W), a `NIMPurifier` ``noise``
    (1, N, C, H, W), both standard normal (`STANDARD_NORMAL`), and ``sigma`` (N,) from its noise scale
    (`NoiseScale.spec`). Empty for a deterministic defense (the reformer, blur, t* = 0) or none."""
    if isinstance(defense, NIMPurifier):
        return {"noise": {"shape": [1, None, *image_shape], "distribution": STANDARD_NORMAL},
                "sigma": {"shape": [None], "distribution": defense.noise.spec}}
    if isinstance(defense, Purifier) and defense.noise_draws > 0:
        return {"noise": {"shape": [defense.noise_draws, None, *image_shape], "distribution": STANDARD_NORMAL}}
    return {}


def draw_noise(noise: dict[str, dict[str, Any]], rows: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A draw of each input described in `noise` (`pipeline_noise`) for `rows` purified images, float32 on the CPU, from
    `generator` (default: torch's global RNG)."""
    draws = {}
    for name, spec in noise.items():
        if spec["distribution"] == STANDARD_NORMAL:
            draws[name] = torch.randn([rows if size is None else size for size in spec["shape"]], generator=generator)
        else:
            draws[name] = NoiseScale.from_spec(spec["distribution"]).sample(rows, generator)
    return draws


def export_pipeline(pipeline: nn.Module, input_shape: tuple[int, ...], path: Path, noise: dict[str, dict[str, Any]],
                    n_repeats: int, metadata: dict[str, Any]) -> Path:
    """Writes `pipeline` as one ONNX graph at `path`: inputs ``images`` (B, C, H, W) in [0, 1] and each of `noise`
    (`pipeline_noise` of its defense, for n_repeats * B purified images), output ``logits`` (B, K), batch axes dynamic.

    `pipeline(images, **noise)` is traced: a purifier's loop over reverse steps becomes a fixed graph for its method,
    steps and t*, which `metadata` should record.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    images = torch.rand(PIPELINE_EXAMPLE_BATCH, *input_shape[1:])
    draws = draw_noise(noise, n_repeats * PIPELINE_EXAMPLE_BATCH)
    _export_onnx(_NoiseAsInputs(pipeline, list(noise)).eval(), (images, *draws.values()), path, noise, n_repeats, metadata)
    return path


class ExportedGraph:
    """An ONNX graph written here, run by onnxruntime on the CPU: images (B, C, H, W) in [0, 1] -> logits (B, K), its
    random inputs (`metadata["noise"]`) drawn from `generator` (default: torch's global RNG)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist; write it with `python export.py <run directory>`.")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        record = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if record is None:
            raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: it was not written by export.py. Export the run again.")
        self.metadata: dict[str, Any] = json.loads(record)
        self.input_shape = tuple(self.session.get_inputs()[0].shape[1:])  # (C, H, W)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        draws = draw_noise(self.metadata["noise"], self.metadata["n_repeats"] * len(images), generator)
        return self.run(images, draws)

    def run(self, images: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, K) of images (B, C, H, W) in [0, 1] with the given draws of its random inputs."""
        feed = {"images": images.float().contiguous().numpy(), **{name: draw.float().contiguous().numpy() for name, draw in draws.items()}}
        return torch.from_numpy(self.session.run(["logits"], feed)[0])


class _NoiseAsInputs(nn.Module):
    """`pipeline(images, **noise)` with the noise keywords as positional inputs after the images, as the graph takes them."""

    def __init__(self, pipeline: nn.Module, names: list[str]):
        super().__init__()
        self.pipeline = pipeline
        self.names = names

    def forward(self, images: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        return self.pipeline(images, **dict(zip(self.names, noise)))


def _export_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, noise: dict[str, dict[str, Any]],
                 n_repeats: int, metadata: dict[str, Any]) -> None:
    """Traces `module` (in eval mode: the exporter leaves it in the mode it found) on `example` (images, then the `noise`
    inputs) to ONNX at `path`, batch axes dynamic, and stores `metadata` with ``n_repeats`` and ``noise`` under `METADATA_KEY`."""
    dynamic_axes = {"images": {0: "batch"}, "logits": {0: "batch"},
                    **{name: {spec["shape"].index(None): "purified_batch"} for name, spec in noise.items()}}
    # The TorchScript-based ONNX exporter: the torch.export-based one (dynamo=True) needs the onnxscript package.
    with torch.no_grad():
        torch.onnx.export(module, example, path, input_names=["images", *noise], output_names=["logits"],
                          dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET, dynamo=False)
    graph = onnx.load(path)
    onnx.helper.set_model_props(graph, {METADATA_KEY: json.dumps({**metadata, "n_repeats": n_repeats, "noise": noise})})
    onnx.save(graph, path)
