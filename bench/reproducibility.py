"""Does a run depend on the loader's worker count or on the number of processes?

Run from the repository root (CPU only):

    python bench/reproducibility.py                       # workers 0 1 2 4, and 1 vs 2 processes
    python bench/reproducibility.py --workers 0 2 --no-ddp

Trains the same small synthetic config (a 2-block ViT-Tiny at 64x32, 12 training identities,
flip + pad/crop + erasing on, per-modality draws, drop path 0.1) for ``--epochs`` epochs:

* once per ``--workers`` value (``DATALOADER.NUM_WORKERS``): prints, against the first value, the
  number of weight tensors that differ and the largest absolute difference (0 and 0: bit-identical);
* with ``torchrun --nproc_per_node 2`` (gloo) and the same global batch: the images are the same
  (tests/test_reproducibility.py), but each rank mines its hard triplets and normalises its
  BatchNorm layers within its half of the batch, so the weights differ: prints how much.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils import checkpoint as ckpt  # noqa: E402

OPTS = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE", "vit_tiny_patch16_224", "MODEL.BACKBONE_DEPTH", "2",
        "MODEL.PROJ_DIM", "0", "MODEL.DROP_PATH", "0.1", "INPUT.SIZE_TRAIN", "[64, 32]",
        "INPUT.SIZE_TEST", "[64, 32]", "INPUT.PADDING", "2", "INPUT.RE_PROB", "0.5",
        "DATASETS.NAMES", "Synthetic", "DATASETS.GENERATE", "True",
        "DATASETS.SYNTHETIC.NUM_TRAIN_IDS", "12", "DATASETS.SYNTHETIC.NUM_TEST_IDS", "4",
        "DATASETS.SYNTHETIC.SAMPLES_PER_ID", "8", "DATASETS.SYNTHETIC.HEIGHT", "64",
        "DATASETS.SYNTHETIC.WIDTH", "32", "DATALOADER.NUM_INSTANCE", "2", "SOLVER.IMS_PER_BATCH", "16",
        "SOLVER.WARMUP_EPOCHS", "0", "SOLVER.BASE_LR", "0.001", "SOLVER.BACKBONE_LR", "0.0005",
        "SOLVER.EVAL_PERIOD", "0", "SOLVER.DETERMINISTIC", "True"]


def train(out: str, root: str, epochs: int, extra, nproc: int = 1) -> dict:
    opts = OPTS + ["DATASETS.ROOT_DIR", root, "OUTPUT_DIR", out, "SOLVER.MAX_EPOCHS", str(epochs),
                   *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 "--standalone"] if nproc > 1 else [sys.executable])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(launcher + [os.path.join(ROOT, "train_net.py"), *opts], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return ckpt.load_checkpoint_file(os.path.join(out, f"checkpoint_epoch{epochs}.pth"))["model"]


def difference(a: dict, b: dict):
    """(tensors that differ, largest absolute difference) over the floating-point weights."""
    floats = [k for k in a if a[k].is_floating_point()]
    differ = [k for k in floats if not torch.equal(a[k], b[k])]
    largest = max((float((a[k] - b[k]).abs().max()) for k in differ), default=0.0)
    return len(differ), len(floats), largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--no-ddp", action="store_true", help="skip the 1 vs 2 processes run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "datasets")
        runs = {w: train(os.path.join(tmp, f"w{w}"), root, args.epochs,
                         ["DATALOADER.NUM_WORKERS", str(w)]) for w in args.workers}
        first = args.workers[0]
        print(f"weights after {args.epochs} epoch(s), against NUM_WORKERS {first}:")
        for w in args.workers[1:]:
            n, total, largest = difference(runs[first], runs[w])
            print(f"  NUM_WORKERS {w}: {n} of {total} tensors differ, max |diff| {largest:.3g}")
        if not args.no_ddp:
            two = train(os.path.join(tmp, "ddp"), root, args.epochs,
                        ["DATALOADER.NUM_WORKERS", str(first)], nproc=2)
            n, total, largest = difference(runs[first], two)
            print(f"  2 processes (torchrun, gloo, same global batch): {n} of {total} tensors "
                  f"differ, max |diff| {largest:.3g}")


if __name__ == "__main__":
    main()
