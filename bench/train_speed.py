"""Training speed of a configured model: triplets/s and images/s, peak GPU memory, the share of
time spent waiting for the data loader, and model FLOP utilisation (MFU).

Run from the repository root (CPU or GPU, whatever MODEL.DEVICE picks):

    python bench/train_speed.py --config_file configs/Synthetic/quickstart.yml --steps 20 \\
        --warmup 3 MODEL.DEVICE cpu SOLVER.AMP bf16
    bash bench/gpu.sh        # the CLIP ViT-B/16 SDTPS+DGAF model on one GPU

Method: the project's own Trainer step (forward, ID + triplet losses of every head, backward,
optimizer step, autocast and grad scaler as SOLVER.AMP says) on batches from the project's own
training loader (identity sampler, tri-modal augmentations, DATALOADER.NUM_WORKERS workers,
restarted every epoch as in training). The first ``--warmup`` steps are not timed. Each timed
step is split into

* loader wait: from asking the loader for the next batch until it is there (at an epoch start
  this includes starting the loader's workers), and
* compute: Trainer.train_step (which itself does not wait for the device); on CUDA the device
  is synchronised explicitly after it, so no work leaks into the next step's wait.

Reported: triplets/s and images/s (3 images per triplet) over wait + compute; loader wait share
= wait / (wait + compute); peak GPU memory (allocated and reserved by PyTorch's allocator) over
the timed steps; MFU = 3 x forward FLOPs per triplet (``modeling.model_size.count_flops``, 2 FLOPs
per multiply-add, at INPUT.SIZE_TRAIN; backward counted as twice the forward) x triplets/s,
divided by ``--peak-tflops`` (default on CUDA: 989 TFLOP/s, the H100/H200 SXM dense BF16 peak
without sparsity; give the figure of your device and precision; none on CPU unless given).

A JSON file with every figure is written to ``--json`` (default: ``$OUT/train_speed_<tag>.json``
when the environment variable OUT is set).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import build_cfg  # noqa: E402
from data.build import build_data  # noqa: E402
from engine.defaults import select_device  # noqa: E402
from engine.evaluator import evaluate  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from modeling.model import build_model  # noqa: E402
from utils.logger import setup_logger  # noqa: E402
from modeling.model_size import build_on_meta, count_flops  # noqa: E402
from utils.seed import seed_everything, set_deterministic  # noqa: E402

H200_BF16_DENSE_TFLOPS = 989.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", default="", help="yaml config (default: the defaults)")
    parser.add_argument("--steps", type=int, default=50, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"device peak for MFU (default on CUDA: {H200_BF16_DENSE_TFLOPS:g})")
    parser.add_argument("--tag", default="", help="name of this measurement (JSON file name)")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--eval", action="store_true",
                        help="also time one evaluation of the test split (the run's TEST options)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg, steps: int, warmup: int, logger, time_eval: bool = False) -> dict:
    """Run ``warmup + steps`` training steps; return the timings of the last ``steps``."""
    device = select_device(cfg)
    seed_everything(cfg.SOLVER.SEED)
    set_deterministic(cfg.SOLVER.DETERMINISTIC)
    t0 = time.perf_counter()
    data = build_data(cfg, device=device)
    data_seconds = time.perf_counter() - t0
    flops = count_flops(build_on_meta(cfg, data.num_classes, data.num_cams), cfg.INPUT.SIZE_TRAIN)
    model = build_model(cfg, data.num_classes, data.num_cams)
    trainer = Trainer(cfg, model, data, device)
    trainer.model.train()

    wait = compute = 0.0
    triplets = done = nonfinite = 0
    epoch = 0
    while done < warmup + steps:
        data.train_sampler.set_epoch(epoch)
        asked = time.perf_counter()
        iterator = iter(data.train_loader)  # starts the workers: counted as waiting
        while done < warmup + steps:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            got = time.perf_counter()
            if done == warmup and device.type == "cuda":  # peak memory of the timed steps
                torch.cuda.reset_peak_memory_stats(device)
            result = trainer.train_step(batch)
            synchronize(device)
            finished = time.perf_counter()
            if done >= warmup:
                wait += got - asked
                compute += finished - got
                triplets += batch["images"].shape[0]
                nonfinite += not result["finite"]
            done += 1
            asked = time.perf_counter()
        epoch += 1
        del iterator

    total = wait + compute
    rate = triplets / total
    out = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "amp": trainer.amp,
        "backbone": cfg.MODEL.BACKBONE,
        "input_size": list(cfg.INPUT.SIZE_TRAIN),
        "batch_triplets": cfg.SOLVER.IMS_PER_BATCH,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
        "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "epochs_started": epoch,
        "nonfinite_steps": nonfinite,
        "triplets_per_s": rate,
        "images_per_s": 3 * rate,
        "step_ms": 1000 * total / steps,
        "compute_ms_per_step": 1000 * compute / steps,
        "loader_wait_ms_per_step": 1000 * wait / steps,
        "loader_wait_share": wait / total,
        "compute_only_triplets_per_s": triplets / compute,
        "forward_gflops_per_triplet": flops / 1e9,
        "train_tflops_per_s": 3 * flops * rate / 1e12,
        "dataset_prepare_s": data_seconds,
    }
    if device.type == "cuda":
        out["peak_mem_allocated_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_mem_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / 2**30
    if time_eval:
        test = data.eval_sets["test"]
        synchronize(device)
        t0 = time.perf_counter()
        evaluate(trainer.model, test, cfg, device)
        synchronize(device)
        out["eval_seconds"] = time.perf_counter() - t0
        out["eval_triplets"] = len(test.samples)
    if trainer.writer is not None:
        trainer.writer.close()
    return out


def summary_text(r: dict) -> str:
    lines = [
        f"device            {r['device_name']} ({r['device']}), torch {r['torch']}, "
        f"{r['torch_threads']} CPU threads",
        f"model             {r['backbone']} {r['parameters_M']:.1f} M params, input "
        f"{r['input_size'][0]}x{r['input_size'][1]}, AMP {r['amp']}",
        f"batch             {r['batch_triplets']} triplets ({3 * r['batch_triplets']} images), "
        f"{r['num_workers']} loader workers, {r['timed_steps']} timed steps after "
        f"{r['warmup_steps']} warm-up",
        f"throughput        {r['triplets_per_s']:.1f} triplets/s = {r['images_per_s']:.1f} "
        f"images/s  ({r['step_ms']:.1f} ms/step)",
        f"loader wait       {100 * r['loader_wait_share']:.1f}% of the time "
        f"({r['loader_wait_ms_per_step']:.1f} ms/step); compute alone "
        f"{r['compute_only_triplets_per_s']:.1f} triplets/s",
        f"FLOPs             {r['forward_gflops_per_triplet']:.1f} GFLOP forward per triplet; "
        f"{r['train_tflops_per_s']:.2f} TFLOP/s achieved (fwd+bwd = 3 x fwd)",
    ]
    if "mfu" in r:
        lines.append(f"MFU               {100 * r['mfu']:.1f}% of {r['peak_tflops']:g} TFLOP/s "
                     f"(assumed peak)")
    if "peak_mem_allocated_GiB" in r:
        lines.append(f"peak GPU memory   {r['peak_mem_allocated_GiB']:.2f} GiB allocated, "
                     f"{r['peak_mem_reserved_GiB']:.2f} GiB reserved")
    if "eval_seconds" in r:
        lines.append(f"evaluation        {r['eval_seconds']:.1f} s for {r['eval_triplets']} test "
                     f"triplets (features, distances, ranking, metrics)")
    if r["nonfinite_steps"]:
        lines.append(f"WARNING           {r['nonfinite_steps']} timed steps had a non-finite loss")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    opts = list(args.opts or [])
    scratch = None
    if "OUTPUT_DIR" not in opts[0::2]:  # TensorBoard events of the Trainer: thrown away after
        scratch = tempfile.TemporaryDirectory(prefix="train_speed_")
        opts += ["OUTPUT_DIR", scratch.name]
    cfg = build_cfg(args.config_file, opts)
    logger = setup_logger(cfg.OUTPUT_DIR)
    try:
        result = measure(cfg, args.steps, args.warmup, logger, args.eval)
    finally:
        if scratch is not None:
            scratch.cleanup()
    peak = args.peak_tflops
    if peak is None and result["device"].startswith("cuda"):
        peak = H200_BF16_DENSE_TFLOPS
    if peak:
        result["peak_tflops"] = peak
        result["mfu"] = result["train_tflops_per_s"] / peak
    result["config_file"] = args.config_file
    result["opts"] = args.opts or []
    print("=" * 30 + f" train_speed {args.tag} " + "=" * 30)
    print(summary_text(result), flush=True)
    path = args.json
    if path is None and os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], f"train_speed{'_' + args.tag if args.tag else ''}.json")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"figures written to {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
