"""Host-side cost of the training input pipeline: per-image decoding against the decoded-image cache.

Run from the repository root (CPU is enough; nothing here uses a GPU):

    python bench/loader_speed.py                      # RGBNT201-sized: 3,951 triplets at 256x128
    python bench/loader_speed.py --batches 5 --triplets 600   # a quick look

Data: the synthetic generator at RGBNT201's size (``--triplets`` training triplets of 256x128
JPEGs, 171 identities), generated once under ``--root``. Every figure comes from the project's own
loaders (``data.build.build_data``): the identity sampler, 64-triplet batches, DeMo's augmentation.

* per image (``DATALOADER.CACHE none``, ``INPUT.AUG_DEVICE loader``) with 0, 1 and 2 workers:
  read + decode + resize + flip + pad/crop + normalise + erase of every image, in the workers;
  host CPU time per triplet = CPU time of this process and of its (reaped) worker processes over
  ``--batches`` batches, divided by the triplets; wall time per triplet beside it.
* cache (``DATALOADER.CACHE memory``, ``INPUT.AUG_DEVICE model``): with the store in host memory
  (CPU training) the host's work per batch is the gather of B uint8 rows (on a GPU machine
  with ``AUG_DEVICE loader`` add the pinned copy and transfer of those bytes, 4x fewer than
  float32). On CUDA with ``AUG_DEVICE model`` the store lives on the GPU and the host only runs
  the sampler and gathers the labels: measured here with the store replaced by a data-less
  ``meta`` tensor (the GPU gather kernel's launch, some microseconds a batch, is not included).
  The batched augmentation's CPU cost (were there no GPU) is reported separately, as is the
  one-time cache build.

Target (issue 14): host work per triplet of the cache path <= 1/20 of the per-image path's.
"""
import argparse
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import build_cfg  # noqa: E402
from data.build import build_data  # noqa: E402
from data.transforms import BatchTrainAugment  # noqa: E402

NUM_IDS = 171  # RGBNT201's training identities


def cpu_seconds() -> float:
    """CPU time of this process plus its terminated, reaped children (the loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def config(root: str, triplets: int, workers: int, cache: str, aug_device: str):
    per_id = -(-triplets // NUM_IDS)
    return build_cfg("", [
        "MODEL.DEVICE", "cpu", "DATASETS.NAMES", "Synthetic", "DATASETS.ROOT_DIR", root,
        "DATASETS.GENERATE", "True",
        "DATASETS.SYNTHETIC.NUM_TRAIN_IDS", str(NUM_IDS), "DATASETS.SYNTHETIC.NUM_TEST_IDS", "2",
        "DATASETS.SYNTHETIC.SAMPLES_PER_ID", str(per_id),
        "DATASETS.SYNTHETIC.HEIGHT", "256", "DATASETS.SYNTHETIC.WIDTH", "128",
        "INPUT.SIZE_TRAIN", "[256, 128]", "SOLVER.IMS_PER_BATCH", "64",
        "DATALOADER.NUM_INSTANCE", "8", "DATALOADER.NUM_WORKERS", str(workers),
        "DATALOADER.CACHE", cache, "INPUT.AUG_DEVICE", aug_device,
    ])


def time_batches(loader, sampler, batches: int, work=None):
    """(wall s, CPU s, triplets) of the first ``batches`` batches of a fresh epoch; ``work`` is
    applied to each batch's images (the part timed on its own)."""
    sampler.set_epoch(0)
    wall, cpu, triplets = time.perf_counter(), cpu_seconds(), 0
    iterator = iter(loader)
    for _ in range(batches):
        batch = next(iterator)
        triplets += batch["images"].shape[0]
        if work is not None:
            work(batch["images"])
    del iterator  # joins the workers, so their CPU time is counted
    return time.perf_counter() - wall, cpu_seconds() - cpu, triplets


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "reid_loader_bench"),
                        help="where the 256x128 synthetic dataset is generated (once)")
    parser.add_argument("--triplets", type=int, default=3951, help="training triplets (RGBNT201: 3951)")
    parser.add_argument("--batches", type=int, default=20, help="timed 64-triplet batches per setting")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # one core per process, as in a loader worker
    print(f"data: {args.root} ({args.triplets} triplets requested, 256x128 JPEG); "
          f"{args.batches} batches of 64 per setting; torch threads 1; {os.cpu_count()} CPUs")
    rows = []
    for workers in (0, 1, 2):
        data = build_data(config(args.root, args.triplets, workers, "none", "loader"))
        wall, cpu, n = time_batches(data.train_loader, data.train_sampler, args.batches)
        rows.append((f"per image, {workers} worker(s)", cpu / n, wall / n))
    per_image_cpu = min(r[1] for r in rows)

    start = time.perf_counter()
    data = build_data(config(args.root, args.triplets, 2, "memory", "model"))
    build = time.perf_counter() - start
    cache = data.train_loader.dataset.cache
    wall, cpu, n = time_batches(data.train_loader, data.train_sampler, args.batches)
    rows.append(("cache in host memory: gather of uint8 rows", cpu / n, wall / n))
    images = cache.images
    cache.images = torch.empty_like(images, device="meta")  # a store elsewhere: no bytes here
    meta_wall, meta_cpu, n = time_batches(data.train_loader, data.train_sampler, args.batches)
    rows.append(("cache on the GPU: host part (sampler, indices, labels)", meta_cpu / n,
                 meta_wall / n))
    cache.images = images
    augment = BatchTrainAugment(0.5, 10, 0.5, [0.5] * 3, [0.5] * 3)
    aug_wall, aug_cpu, n = time_batches(data.train_loader, data.train_sampler, args.batches,
                                        work=augment)
    rows.append(("cache: gather + batched augmentation on this CPU", aug_cpu / n, aug_wall / n))

    print(f"\n{'path':52s} {'host CPU ms/triplet':>20s} {'wall ms/triplet':>16s}")
    for name, cpu_per, wall_per in rows:
        print(f"{name:52s} {cpu_per * 1e3:20.3f} {wall_per * 1e3:16.3f}")
    gather_cpu, device_store_cpu = rows[3][1], rows[4][1]
    print(f"\ncache build: {len(cache.samples)} triplets in {build:.1f} s (2 workers), "
          f"{cache.nbytes / 1024 ** 3:.2f} GiB uint8")
    print(f"batched augmentation alone on CPU: {(aug_cpu / n - gather_cpu) * 1e3:.3f} ms/triplet "
          f"(on a GPU it runs on the device)")
    for name, host in (("store in host memory", gather_cpu), ("store on the GPU", device_store_cpu)):
        ratio = per_image_cpu / host
        print(f"host work per triplet, cache ({name}) / per image: 1/{ratio:.0f} (target: at most "
              f"1/20) -> {'met' if ratio >= 20 else 'NOT met'}")


if __name__ == "__main__":
    main()
