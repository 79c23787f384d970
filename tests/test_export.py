"""export.py: ONNX and TorchScript exports compute what the PyTorch classifier computes, normalization included."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from datamodules.synthetic import generate_phantoms
from export import exportable_classifier
from export import main as export_main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("stage", ["student", "teacher"])  # SmallCNN, and the default hybrid ViT at a tiny size
def test_onnx_and_torchscript_match_pytorch_on_phantoms_at_any_batch_size(stage, tiny_stage_checkpoints, tmp_path):
    paths = export_main([str(tiny_stage_checkpoints[stage]), "--output", str(tmp_path)])
    classifier, _, input_shape = exportable_classifier(tiny_stage_checkpoints[stage])
    assert input_shape == (1, 1, 32, 32)
    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(paths["torchscript"]))
    for batch_size in (1, 5, 16):  # exported with a batch of 1
        images, _ = generate_phantoms(batch_size, 32, seed=batch_size)  # [0, 1]: normalization is inside the export
        with torch.no_grad():
            expected = classifier(images).numpy()
            from_torchscript = scripted(images).numpy()
        from_onnx = session.run(["logits"], {"images": images.numpy()})[0]
        assert from_onnx.shape == expected.shape == (batch_size, 2)
        np.testing.assert_allclose(from_onnx, expected, atol=1e-4, rtol=0)
        np.testing.assert_allclose(from_torchscript, expected, atol=1e-4, rtol=0)
        assert np.ptp(expected) > 1e-3, "constant logits would make the comparison vacuous"


def test_the_purifier_pipeline_is_refused_with_what_to_export_instead(tiny_stage_checkpoints, tmp_path):
    checkpoint = str(tiny_stage_checkpoints["purify_finetune"])
    with pytest.raises(ValueError, match="--classifier-only") as error:
        export_main([checkpoint, "--output", str(tmp_path)])
    assert "reverse diffusion steps" in str(error.value)
    paths = export_main([checkpoint, "--output", str(tmp_path), "--classifier-only"])
    assert paths["onnx"].is_file() and paths["torchscript"].is_file()
