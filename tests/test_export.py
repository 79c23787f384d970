"""export.py: ONNX and TorchScript exports compute what the PyTorch classifier computes, normalization included, and a
defended stage's pipeline graph computes what its PyTorch pipeline computes on the same noise."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from conftest import TINY_UNET
from datamodules.synthetic import generate_phantoms
from export import load_exportable_stage
from export import main as export_main
from robust_cxr.deployment import STANDARD_NORMAL, ExportedGraph, draw_noise, export_pipeline, pipeline_noise
from robust_cxr.models import create_student_classifier
from robust_cxr.purification import PurifiedModel, Purifier

pytestmark = pytest.mark.usefixtures("single_thread")

PARITY_ATOL = 1e-4  # max abs logit difference between onnxruntime and PyTorch


@pytest.mark.parametrize("stage", ["student", "teacher"])  # SmallCNN, and the default hybrid ViT at a tiny size
def test_onnx_and_torchscript_match_pytorch_on_phantoms_at_any_batch_size(stage, tiny_stage_checkpoints, tmp_path):
    paths = export_main([str(tiny_stage_checkpoints[stage]), "--output", str(tmp_path)])
    assert set(paths) == {"onnx", "torchscript"}, "an undefended classifier has no pipeline of its own"
    classifier = load_exportable_stage(tiny_stage_checkpoints[stage]).deployed_model().undefended
    session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 1, 32, 32]
    scripted = torch.jit.load(str(paths["torchscript"]))
    for batch_size in (1, 5, 16):  # exported with a batch of 1
        images, _ = generate_phantoms(batch_size, 32, seed=batch_size)  # [0, 1]: normalization is inside the export
        with torch.no_grad():
            expected = classifier(images).numpy()
            from_torchscript = scripted(images).numpy()
        from_onnx = session.run(["logits"], {"images": images.numpy()})[0]
        assert from_onnx.shape == expected.shape == (batch_size, 2)
        np.testing.assert_allclose(from_onnx, expected, atol=PARITY_ATOL, rtol=0)
        np.testing.assert_allclose(from_torchscript, expected, atol=PARITY_ATOL, rtol=0)
        assert np.ptp(expected) > 1e-3, "constant logits would make the comparison vacuous"


EXPECTED_NOISE = {  # the random inputs of each pipeline graph: the tiny diffusion purifier runs DDIM, 2 steps from t* 20
    "purify_finetune": {"noise": {"shape": [3, None, 1, 32, 32], "distribution": STANDARD_NORMAL}},
    "purify_finetune_nim": {"noise": {"shape": [1, None, 1, 32, 32], "distribution": STANDARD_NORMAL},
                            "sigma": {"shape": [None], "distribution": {"distribution": "uniform", "low": 0.05, "high": 0.2}}},
    "reformer": {},
}


@pytest.fixture(scope="module")
def defended_checkpoints(tiny_stage_checkpoints, tiny_defended_checkpoints):
    return {"purify_finetune": tiny_stage_checkpoints["purify_finetune"], **tiny_defended_checkpoints}


@pytest.mark.parametrize("stage_name", list(EXPECTED_NOISE))
def test_the_pipeline_graph_computes_the_pytorch_pipeline_on_the_same_noise(stage_name, defended_checkpoints, tmp_path):
    paths = export_main([str(defended_checkpoints[stage_name]), "--output", str(tmp_path)])
    deployed = load_exportable_stage(defended_checkpoints[stage_name]).deployed_model()
    assert paths["pipeline"].name == f"{deployed.key}.onnx" and paths["onnx"].name == f"{deployed.model}.onnx"
    graph = ExportedGraph(paths["pipeline"])
    assert graph.metadata["noise"] == EXPECTED_NOISE[stage_name]
    assert graph.metadata["defense"] == deployed.defense and graph.metadata["classifier"] == paths["onnx"].name
    assert [graph_input.name for graph_input in graph.session.get_inputs()] == ["images", *EXPECTED_NOISE[stage_name]]
    for batch_size in (1, 3):  # traced with a batch of 2
        images, _ = generate_phantoms(batch_size, 32, seed=batch_size)
        draws = draw_noise(graph.metadata["noise"], batch_size, torch.Generator().manual_seed(batch_size))
        with torch.no_grad():
            expected = deployed.pipeline(images, **draws)
            undefended = deployed.undefended(images)
        from_onnx = graph.run(images, draws)
        assert from_onnx.shape == expected.shape == (batch_size, 2)
        torch.testing.assert_close(from_onnx, expected, atol=PARITY_ATOL, rtol=0)
        assert (expected - undefended).abs().max() > 1e-3, "the defense changes nothing: the comparison would not see it"
    if draws:  # the graph uses its noise: other draws, other logits
        assert (graph.run(images, draw_noise(graph.metadata["noise"], batch_size)) - from_onnx).abs().max() > 1e-4


def test_classifier_only_leaves_the_pipeline_out(tiny_stage_checkpoints, tmp_path):
    paths = export_main([str(tiny_stage_checkpoints["purify_finetune"]), "--output", str(tmp_path), "--classifier-only"])
    assert set(paths) == {"onnx", "torchscript"} and sorted(path.name for path in tmp_path.iterdir()) == [
        "teacher_finetuned.onnx", "teacher_finetuned.torchscript.pt"]


def test_a_pipeline_averaging_repeated_purifications_takes_noise_for_every_repeat(tmp_path):
    unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, **TINY_UNET).eval()
    purifier = Purifier(unet, DDPMScheduler(num_train_timesteps=100), t_star=5, method="ddpm")  # 6 draws: t* 5, then 5 steps
    pipeline = PurifiedModel(purifier, create_student_classifier("small_cnn", 2, 1, 32).eval(), n_repeats=2).eval()
    noise = pipeline_noise(purifier, (1, 32, 32))
    graph = ExportedGraph(export_pipeline(pipeline, (1, 1, 32, 32), tmp_path / "repeated.onnx", noise, 2, {}))
    assert graph.metadata["n_repeats"] == 2 and graph.session.get_inputs()[1].shape == [6, "purified_batch", 1, 32, 32]
    images, _ = generate_phantoms(3, 32, seed=0)
    draws = draw_noise(noise, 2 * len(images), torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pipeline(images, **draws)
    torch.testing.assert_close(graph.run(images, draws), expected, atol=PARITY_ATOL, rtol=0)
    first_repeat_only = {"noise": draws["noise"].clone()}
    first_repeat_only["noise"][:, 3:] = draws["noise"][:, :3]  # both repeats of each image purified alike
    with torch.no_grad():
        assert (pipeline(images, **first_repeat_only) - expected).abs().max() > 1e-6, "the second repeat's noise went unused"
