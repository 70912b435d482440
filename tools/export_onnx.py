"""Export a trained model's retrieval path to ONNX, check it, and compare onnxruntime with PyTorch.

    python tools/export_onnx.py --config_file configs/Synthetic/quickstart.yml \\
        TEST.WEIGHT output/quickstart/model_best.pth --output model.onnx --dynamic-batch

The graph (:class:`engine.predictor.RetrievalGraph`): inputs ``rgb``, ``ni``, ``ti`` float32
(B, 3, H, W) at INPUT.SIZE_TEST, normalised as the test loader does ((x / 255 - PIXEL_MEAN) /
PIXEL_STD; a missing modality is all zeros, as TEST.MISS), and ``cam_ids`` int64 (B,) (0-based;
ignored by models without a camera embedding); output ``feat`` float32 (B, D), the config's
TEST.FEAT (with TEST.NECK_FEAT, FEAT_NORM, and the mirrored images' mean with TEST.FLIP). The
batch is fixed (``--batch``) unless ``--dynamic-batch``. Size, normalisation and feature are also
written to the model's metadata (``metadata_props``). The export runs in fp32 on the CPU
whatever MODEL.DEVICE and TEST.AMP say.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the default of the pinned torch 2.14; needs
``onnxscript``). The TorchScript exporter (``dynamo=False``) cannot export SDTPS: tracing turns
the patch count into a tensor, and the top-K size ``K = ceil(N * ratio)`` is computed in Python
from it. Opset ``--opset`` (default 18, the dynamo exporter's lowest native opset; 17 works by
its automatic down-conversion, below 17 it keeps 18 and the tool says so; LayerNormalization
needs 17). SDTPS's top-K is ONNX ``TopK`` (opset >= 11) followed by ``ScatterElements`` for the
keep mask; its pair scores and DGAF's pooling use ``Einsum`` (>= 12), DGAF's masking ``Where`` /
``ReduceMax``.

Checks: ``onnx.checker.check_model``, then onnxruntime (CPU) against PyTorch on ``--trials``
random inputs (random normal images, random cameras; the last trial with TI zeroed): the max
absolute difference is printed, and above ``--tolerance`` (1e-4) the command fails.

Needs ``pip install onnx onnxruntime onnxscript`` (optional dependencies: only this tool uses them).
"""
import argparse
import json
import logging
import os
import sys
import time
import warnings
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from config import ConfigArgumentParser, build_cfg  # noqa: E402
from engine.cli import run_cli  # noqa: E402
from utils.logger import setup_logger  # noqa: E402
from utils.outputs import check_output, replacing  # noqa: E402

INPUT_NAMES = ("rgb", "ni", "ti", "cam_ids")
OUTPUT_NAME = "feat"
DEFAULT_OPSET = 18
PIP_COMMAND = "pip install onnx onnxruntime onnxscript"


class MissingDependency(RuntimeError):
    """onnx, onnxruntime or onnxscript is not installed."""


def require_onnx():
    """(onnx, onnxruntime) imported lazily, or MissingDependency naming the pip command."""
    missing = []
    modules = {}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            modules[name] = __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependency(f"tools/export_onnx.py needs {', '.join(missing)}, which "
                                f"{'is' if len(missing) == 1 else 'are'} not installed: "
                                f"{PIP_COMMAND}")
    return modules["onnx"], modules["onnxruntime"]


def example_inputs(batch: int, size, num_cams: int, seed: int = 0, zero_ti: bool = False):
    """(rgb, ni, ti, cam_ids): random normal (B, 3, H, W) images, random cameras in 0..num_cams-1."""
    g = torch.Generator().manual_seed(seed)
    h, w = int(size[0]), int(size[1])
    images = [torch.randn(batch, 3, h, w, generator=g) for _ in range(3)]
    if zero_ti:
        images[2] = torch.zeros_like(images[2])
    cams = torch.randint(0, max(1, num_cams), (batch,), generator=g)
    return (*images, cams)


def export_graph(graph: torch.nn.Module, path: str, batch: int, size, num_cams: int,
                 dynamic_batch: bool, opset: int, metadata: Dict[str, str]) -> None:
    """torch.onnx.export (dynamo) of ``graph`` to one ``path`` file, with ``metadata``."""
    kwargs = {}
    if dynamic_batch:
        dim = torch.export.Dim("batch", min=1, max=4096)
        kwargs["dynamic_shapes"] = tuple({0: dim} for _ in INPUT_NAMES)
    # The exporter's warnings about its own internals (and onnxscript's optimizer logging
    # "Skipping constant folding for op Split with multiple outputs" on DeMo's modules) are not
    # the user's business.
    optimizer_log = logging.getLogger("onnxscript")
    level = optimizer_log.level
    optimizer_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph, example_inputs(max(batch, 2) if dynamic_batch else batch, size, num_cams),
                None, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                opset_version=opset, dynamo=True, verbose=False, **kwargs)
    finally:
        optimizer_log.setLevel(level)
    program.model.metadata_props.update(metadata)
    program.save(path, external_data=False)


def compare(graph: torch.nn.Module, path: str, ort, batches: List[int], size, num_cams: int) -> float:
    """Max |onnxruntime (CPU) - PyTorch| over random inputs of each batch size (the last with TI
    zeroed)."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, b in enumerate(batches):
        inputs = example_inputs(b, size, num_cams, seed=100 + i, zero_ti=i == len(batches) - 1)
        with torch.no_grad():
            expected = graph(*inputs).numpy()
        got = session.run([OUTPUT_NAME], {n: x.numpy() for n, x in zip(INPUT_NAMES, inputs)})[0]
        if got.shape != expected.shape:
            raise ValueError(f"onnxruntime returned shape {got.shape}, PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def build_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser(description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", default="", metavar="FILE", help="path to a yaml config")
    parser.add_argument("--output", required=True, metavar="FILE", help="the .onnx file to write")
    parser.add_argument("--dynamic-batch", dest="dynamic_batch", action="store_true",
                        help="a variable batch dimension (default: fixed to --batch)")
    parser.add_argument("--batch", type=int, default=1, help="the fixed batch size (default 1)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (default 18)")
    parser.add_argument("--trials", type=int, default=3,
                        help="random inputs compared in onnxruntime and PyTorch (default 3)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest allowed absolute difference (default 1e-4, fp32)")
    parser.add_argument("--debug", action="store_true", help="on an error, print the traceback")
    return parser


def main(argv=None) -> Dict:
    """Export, check, compare; returns the figures (for tests and bench/export_speed.py)."""
    args = build_parser().parse_args(argv)
    onnx, ort = require_onnx()  # before anything is loaded
    for flag, value in (("--batch", args.batch), ("--trials", args.trials)):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    if not args.tolerance > 0:
        raise ValueError(f"--tolerance {args.tolerance:g}: must be a positive number")
    newest = onnx.defs.onnx_opset_version()
    if not 1 <= args.opset <= newest:
        raise ValueError(f"--opset {args.opset}: the installed onnx knows opsets 1 to {newest}; use "
                         f"{DEFAULT_OPSET} (the default) or another one up to {newest}")
    logger = setup_logger()
    cfg = build_cfg(args.config_file, args.opts)
    check_output(args.output, "--output", (".onnx",),  # before the work: nothing is overwritten
                 {"--config_file": args.config_file, "TEST.WEIGHT": cfg.TEST.WEIGHT})
    from engine.predictor import Predictor  # the model code: after the dependency check

    predictor = Predictor(cfg, device="cpu")
    graph = predictor.retrieval_graph().eval()
    t = cfg.TEST
    if t.MISS not in ("none", "all", "matrix") or t.AMP != "off":
        logger.info("not in the graph: TEST.MISS %s (feed zeros for a missing modality), TEST.AMP %s "
                    "(the export is fp32)", t.MISS, t.AMP)
    size = tuple(int(v) for v in cfg.INPUT.SIZE_TEST)
    metadata = {"input_size_hw": json.dumps(list(size)),
                "pixel_mean": json.dumps(list(cfg.INPUT.PIXEL_MEAN)),
                "pixel_std": json.dumps(list(cfg.INPUT.PIXEL_STD)),
                "pixel_scale": "1/255", "inputs": "rgb, ni, ti (B,3,H,W) normalised; cam_ids (B,) int64",
                "feat": t.FEAT, "neck_feat": t.NECK_FEAT, "feat_norm": t.FEAT_NORM,
                "flip": str(bool(t.FLIP)), "num_cams": str(predictor.num_cams),
                "config_file": args.config_file, "weight": t.WEIGHT}
    with replacing(args.output, "--output") as tmp:  # renamed onto --output once it passed
        return _export_and_check(args, tmp, onnx, ort, graph, size, predictor.num_cams, metadata,
                                 logger)


def _export_and_check(args, path: str, onnx, ort, graph, size, num_cams: int, metadata: Dict,
                      logger) -> Dict:
    """Export to ``path`` (a temporary file), check it, compare it with PyTorch; the figures."""
    start = time.perf_counter()
    try:
        export_graph(graph, path, args.batch, size, num_cams, args.dynamic_batch, args.opset,
                     metadata)
    except Exception as exc:  # noqa: BLE001 - torch.export's own report is not the user's business
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RuntimeError(f"the ONNX export failed (--opset {args.opset}, batch "
                           f"{'dynamic' if args.dynamic_batch else args.batch}): {first[:300]}; "
                           f"{args.output} was not written (try --opset {DEFAULT_OPSET}; --debug "
                           "shows the exporter's traceback)") from exc
    export_s = time.perf_counter() - start
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = (str(exc).strip().splitlines() or ["invalid"])[0]
        raise ValueError(f"onnx.checker rejects the model exported at --opset {args.opset}: "
                         f"{first[:300]}; {args.output} was not written (an existing file is "
                         f"unchanged): use --opset {DEFAULT_OPSET}") from exc
    model = onnx.load(path, load_external_data=False)
    ops = sorted({node.op_type for node in model.graph.node})
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), args.opset)
    if opset != args.opset:
        logger.warning("--opset %d: the exporter could not convert the graph to it; the model has "
                       "opset %d", args.opset, opset)
    size_mb = os.path.getsize(path) / 2 ** 20
    print(f"exported {args.output} in {export_s:.1f} s: {size_mb:.1f} MiB, opset {opset}, "
          f"batch {'dynamic' if args.dynamic_batch else args.batch}, {len(model.graph.node)} nodes; "
          "onnx.checker: ok")
    batches = [1 + (i % 3) for i in range(args.trials)] if args.dynamic_batch else [args.batch] * args.trials
    diff = compare(graph, path, ort, batches, size, num_cams)
    print(f"onnxruntime vs PyTorch on {args.trials} random input(s) (batch "
          f"{', '.join(map(str, batches))}): max abs difference {diff:.3g} (tolerance {args.tolerance:g})")
    if not diff <= args.tolerance:
        raise ValueError(f"onnxruntime and PyTorch differ by {diff:.3g} > --tolerance "
                         f"{args.tolerance:g}: the model does not reproduce PyTorch, so "
                         f"{args.output} was not written (an existing file is unchanged)")
    return {"path": args.output, "export_s": export_s, "size_mb": size_mb, "max_abs_diff": diff,
            "ops": ops, "opset": opset, "graph": graph, "size": size, "num_cams": num_cams}


if __name__ == "__main__":
    run_cli(main)
