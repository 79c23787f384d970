"""Export of a classifier (an `nn.Module`, [0, 1] images -> logits) to ONNX and TorchScript."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ONNX_OPSET = 17


def export_classifier(classifier: nn.Module, input_shape: tuple[int, ...], directory: Path, name: str) -> dict[str, Path]:
    """Writes `classifier` ([0, 1] images -> logits) as `<name>.onnx` (dynamic batch) and `<name>.torchscript.pt`."""
    directory.mkdir(parents=True, exist_ok=True)
    example = torch.rand(input_shape)
    paths = {"onnx": directory / f"{name}.onnx", "torchscript": directory / f"{name}.torchscript.pt"}
    # The TorchScript-based ONNX exporter: the torch.export-based one (dynamo=True) needs the onnxscript package.
    torch.onnx.export(
        classifier, (example,), paths["onnx"], input_names=["images"], output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False,
    )
    with torch.no_grad():
        torch.jit.trace(classifier, example).save(paths["torchscript"])
    return paths
