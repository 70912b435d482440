"""tools/export_onnx.py through the real CLI: the quick-start model and the synthetic SDTPS + DGAF
model export, pass onnx.checker, and give in onnxruntime the Predictor's features within 1e-4."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from config import build_cfg
from conftest import ROOT
from engine.predictor import Predictor
from modeling.model import build_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CONFIGS = {"quickstart": "configs/Synthetic/quickstart.yml",
           "sdtps_dgaf": "configs/Synthetic/sdtps_dgaf.yml"}


def _cli(args, env=None, timeout=300):
    return subprocess.run([sys.executable, "tools/export_onnx.py"] + list(args), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def _checkpoint(config: str, path: str, num_cams: int = 4) -> str:
    """A checkpoint of the config's model with random weights (the export does not care whether
    they were trained) and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = build_model(build_cfg(config, ["MODEL.DEVICE", "cpu"]), 150, num_cams)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    """(config, weight, onnx path, CLI output) of a --dynamic-batch export."""
    folder = tmp_path_factory.mktemp(f"onnx_{request.param}")
    config = CONFIGS[request.param]
    weight = _checkpoint(config, str(folder / "model.pth"))
    path = str(folder / "model.onnx")
    proc = _cli(["--config_file", config, "TEST.WEIGHT", weight, "MODEL.DEVICE", "cpu",
                 "--output", path, "--dynamic-batch"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return request.param, config, weight, path, proc.stdout


def test_export_matches_the_predictor_in_onnxruntime(exported):
    """The printed difference is within 1e-4, and independently: onnxruntime on images normalised
    as documented (PIXEL_MEAN / STD, TI all zeros = missing) at batch 3 (the export traced batch
    2) gives the Predictor's features of the same images within 1e-4 (catches: a graph of another
    feature or neck, the documented normalisation not the model's, a batch size baked into the
    graph, a missing modality not zeros after normalisation)."""
    name, config, weight, path, stdout = exported
    diff = float(re.search(r"max abs difference ([\d.e+-]+)", stdout).group(1))
    assert diff <= 1e-4 and "onnx.checker: ok" in stdout
    predictor = Predictor(config, weight, opts=["MODEL.DEVICE", "cpu"])
    h, w = predictor.size
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 3, h, w, generator=g) for _ in range(2)]
    cams = torch.tensor([0, 2, 3]) if predictor.num_cams else torch.zeros(3, dtype=torch.long)
    expected = predictor.embed(images[0], images[1], None, cam_ids=cams).numpy()
    model = onnx.load(path)
    meta = {p.key: p.value for p in model.metadata_props}
    mean = torch.tensor(json.loads(meta["pixel_mean"])).view(1, 3, 1, 1)
    std = torch.tensor(json.loads(meta["pixel_std"])).view(1, 3, 1, 1)
    feeds = {"rgb": ((images[0] - mean) / std).numpy(), "ni": ((images[1] - mean) / std).numpy(),
             "ti": np.zeros((3, 3, h, w), dtype=np.float32), "cam_ids": cams.numpy()}
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["feat"], feeds)[0]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4
    assert meta["feat"] == predictor.cfg.TEST.FEAT and json.loads(meta["input_size_hw"]) == [h, w]


def test_sdtps_top_k_and_dgaf_are_in_the_graph(exported):
    """Catches: the selection or the fusion traced away (e.g. the top-K constant-folded for the
    example input, or the model exported without its fused head)."""
    name, _, _, path, _ = exported
    ops = {node.op_type for node in onnx.load(path, load_external_data=False).graph.node}
    if name == "sdtps_dgaf":
        assert {"TopK", "ScatterElements", "Einsum", "Where"} <= ops, sorted(ops)
    else:
        assert "TopK" not in ops


def test_comparison_detects_a_different_model(exported):
    """export_onnx.compare against a PyTorch model whose weights changed after the export reports
    a difference above the tolerance (catches: a comparison of PyTorch with itself, or of two
    runs of the ONNX model)."""
    from tools import export_onnx

    _, config, weight, path, _ = exported
    predictor = Predictor(config, weight, opts=["MODEL.DEVICE", "cpu"])
    graph = predictor.retrieval_graph().eval()
    assert export_onnx.compare(graph, path, ort, [2], predictor.size, predictor.num_cams) <= 1e-4
    with torch.no_grad():
        predictor.model.backbone.vit.patch_embed.proj.weight.mul_(1.5)
    assert export_onnx.compare(graph, path, ort, [2], predictor.size, predictor.num_cams) > 1e-4


def test_missing_onnx_names_the_pip_command(tmp_path):
    """Without onnx installed the tool stops at once with the pip command, no traceback (catches
    a module-level import of onnx, i.e. an ImportError traceback)."""
    (tmp_path / "onnx.py").write_text("raise ImportError('onnx hidden by the test')\n")
    proc = _cli(["--config_file", CONFIGS["quickstart"], "TEST.WEIGHT", "nowhere.pth", "--output",
                 str(tmp_path / "m.onnx")], env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tools/export_onnx.py needs onnx" in errors[0]
    assert errors[0].endswith("pip install onnx onnxruntime onnxscript")
