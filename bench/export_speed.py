"""ONNX export of the retrieval path: export time, file size, and onnxruntime vs PyTorch CPU latency.

Run from the repository root:

    python bench/export_speed.py [--models quickstart sdtps_dgaf demo_sdtps_dgaf_vitb16] \\
        [--batch 8] [--repeats 5] [--threads N]

Models (random weights: the figures do not depend on training; no pretrained file is read):

* ``quickstart``: configs/Synthetic/quickstart.yml (4-block ViT-Tiny, 128x64);
* ``sdtps_dgaf``: configs/Synthetic/sdtps_dgaf.yml (the same + SDTPS + DGAF, 4 register tokens);
* ``demo_sdtps_dgaf_vitb16``: configs/RGBNT201/DeMo_SDTPS_DGAF.yml (CLIP ViT-B/16, 256x128,
  PIFE + HDM + ATMoE + SDTPS + DGAF) with MODEL.PRETRAIN_PATH "".

Each model is built with its dataset's training sizes (identities, cameras), exported by
tools/export_onnx.py's ``export_graph`` (dynamo exporter, opset 18, dynamic batch) to a
temporary folder, and timed: export (seconds, once), file size (MiB), and per triplet the median
of ``--repeats`` forward passes (after one warm-up) of PyTorch (eval, no_grad) and of onnxruntime's
CPU provider, at batch 1 and ``--batch``, on random normal inputs. Both use ``--threads`` threads
(default: torch's thread count). The max |onnxruntime - PyTorch| of the timed inputs is printed too.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import build_cfg  # noqa: E402
from data.datasets import dataset_class  # noqa: E402
from engine.defaults import evaluation_config  # noqa: E402
from engine.predictor import RetrievalGraph  # noqa: E402
from modeling.model import build_model  # noqa: E402
from tools.export_onnx import (DEFAULT_OPSET, INPUT_NAMES, OUTPUT_NAME, example_inputs,  # noqa: E402
                               export_graph, require_onnx)

MODELS = {
    "quickstart": ("configs/Synthetic/quickstart.yml", []),
    "sdtps_dgaf": ("configs/Synthetic/sdtps_dgaf.yml", []),
    "demo_sdtps_dgaf_vitb16": ("configs/RGBNT201/DeMo_SDTPS_DGAF.yml", ["MODEL.PRETRAIN_PATH", ""]),
}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, folder: str, batch: int, repeats: int, threads: int, ort) -> dict:
    config, opts = MODELS[name]
    cfg = build_cfg(config, opts + ["MODEL.DEVICE", "cpu"])
    num_classes, num_cams = dataset_class(cfg.DATASETS.NAMES).train_size(cfg)
    torch.manual_seed(0)
    model = build_model(evaluation_config(cfg), num_classes, num_cams).eval()
    graph = RetrievalGraph.from_config(cfg, model).eval()
    params = sum(p.numel() for p in model.parameters())
    size = tuple(int(v) for v in cfg.INPUT.SIZE_TEST)
    cams = num_cams if cfg.MODEL.SIE_CAMERA else 0
    path = os.path.join(folder, f"{name}.onnx")
    start = time.perf_counter()
    export_graph(graph, path, batch, size, cams, True, DEFAULT_OPSET, {"bench": name})
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    row = {"name": name, "config": config, "params_m": params / 1e6, "export_s": export_s,
           "size_mib": os.path.getsize(path) / 2 ** 20, "diff": 0.0}
    for b in (1, batch):
        inputs = example_inputs(b, size, cams, seed=b)
        feeds = {n: x.numpy() for n, x in zip(INPUT_NAMES, inputs)}
        with torch.no_grad():
            torch_s = median_time(lambda: graph(*inputs), repeats)
            expected = graph(*inputs).numpy()
        ort_s = median_time(lambda: session.run([OUTPUT_NAME], feeds), repeats)
        got = session.run([OUTPUT_NAME], feeds)[0]
        row["diff"] = max(row["diff"], float(np.abs(got - expected).max()))
        row[f"torch_ms_b{b}"] = torch_s / b * 1e3
        row[f"ort_ms_b{b}"] = ort_s / b * 1e3
    os.remove(path)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, default=8, help="the small batch (besides batch 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per setting (median)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    _, ort = require_onnx()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {threads} threads, "
          f"{os.cpu_count()} CPUs; batch 1 and {args.batch}, median of {args.repeats}")
    b = args.batch
    header = ("| model | params (M) | export (s) | ONNX (MiB) | PyTorch b1 (ms) | ORT b1 (ms) | "
              f"PyTorch b{b} (ms/triplet) | ORT b{b} (ms/triplet) | max abs diff |")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            row = bench_model(name, folder, b, args.repeats, threads, ort)
            rows.append(row)
            print(f"{name}: export {row['export_s']:.1f} s, {row['size_mib']:.1f} MiB", flush=True)
    print("\n" + header + "\n" + "|---" * 9 + "|")
    for r in rows:
        print(f"| {r['name']} | {r['params_m']:.1f} | {r['export_s']:.1f} | {r['size_mib']:.1f} | "
              f"{r['torch_ms_b1']:.1f} | {r['ort_ms_b1']:.1f} | {r[f'torch_ms_b{b}']:.1f} | "
              f"{r[f'ort_ms_b{b}']:.1f} | {r['diff']:.1e} |")


if __name__ == "__main__":
    main()
