"""Decoded-image cache (``DATALOADER.CACHE memory``): the training split decoded and resized once.

Every training triplet is read, decoded and resized to ``INPUT.SIZE_TRAIN`` once (in the loader's
worker processes, with a progress bar) into one uint8 tensor (N, 3, 3, H, W) in host memory (moved to the GPU with ``INPUT.AUG_DEVICE model``
on CUDA). A
training batch is then a gather of B rows of it (no decoding, 1 byte per pixel), augmented as a
batch by :class:`data.transforms.BatchTrainAugment`, in the loader (``INPUT.AUG_DEVICE loader``)
or on the training device after the transfer (``INPUT.AUG_DEVICE model``).

The store needs N x 3 x 3 x H x W bytes (RGBNT201 at 256x128: 3,951 x 294,912 B = 1.09 GiB) per
training process; it is checked against the available host memory before anything is decoded.
"""
import os
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.datasets import Sample
from utils.logger import get_logger

GIB = 1024 ** 3


def format_bytes(size: int) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB / 10 else f"{size / 1024 ** 2:.1f} MiB"


class CacheMemoryError(MemoryError):
    """The decoded-image store would not fit in the available host memory."""


def available_memory() -> Optional[int]:
    """Bytes of host memory available to new allocations (Linux ``MemAvailable``); None if unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(needed: int, available: Optional[int], processes: int = 1) -> None:
    """Raise :class:`CacheMemoryError` when ``processes`` stores of ``needed`` bytes exceed
    ``available`` (a safety margin of 10 % is kept for everything else)."""
    total = needed * processes
    if available is not None and total > 0.9 * available:
        per = f" ({processes} training processes x {needed / GIB:.2f} GiB)" if processes > 1 else ""
        raise CacheMemoryError(
            f"DATALOADER.CACHE memory needs {total:,} bytes ({total / GIB:.2f} GiB){per} for the "
            f"decoded training images but only {available:,} bytes ({available / GIB:.2f} GiB) of "
            f"host memory are available; set DATALOADER.CACHE none (decode per image), lower "
            f"INPUT.SIZE_TRAIN, or free memory")


class DecodedImageCache:
    """uint8 images (N, 3, 3, H, W) of ``samples`` and ``valid`` (N,) bool (False: an unreadable
    image skipped with ``DATALOADER.SKIP_BAD_IMAGES``)."""

    def __init__(self, samples: Sequence[Sample], images: torch.Tensor, valid: torch.Tensor):
        self.samples = list(samples)
        self.images = images
        self.valid = valid
        self.pids = torch.tensor([s.pid for s in self.samples], dtype=torch.long)
        self.camids = torch.tensor([s.camid for s in self.samples], dtype=torch.long)
        self.sceneids = torch.tensor([s.sceneid for s in self.samples], dtype=torch.long)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    @classmethod
    def build(cls, samples: Sequence[Sample], size, interpolation: str, num_workers: int,
              skip_bad_images: bool, processes: int = 1, show_progress: bool = True,
              ) -> "DecodedImageCache":
        """Decode and resize every triplet of ``samples`` (``num_workers`` processes); raises
        :class:`CacheMemoryError` first when ``processes`` such stores would not fit."""
        from data.build import TriModalImageDataset, collate_skipping  # build imports this module

        h, w = int(size[0]), int(size[1])
        needed = len(samples) * 3 * 3 * h * w
        available = available_memory()
        check_fits(needed, available, processes)
        logger = get_logger()
        start = time.time()
        images = torch.zeros((len(samples), 3, 3, h, w), dtype=torch.uint8)
        valid = torch.zeros(len(samples), dtype=torch.bool)
        loader = DataLoader(TriModalImageDataset(samples, size, None, False, skip_bad_images,
                                                 interpolation),
                            batch_size=64, num_workers=num_workers, collate_fn=collate_skipping,
                            generator=torch.Generator())  # the global RNG stays untouched
        bar = tqdm(loader, desc="decoding training images", unit="batch",
                   disable=not (show_progress and sys.stderr.isatty()), leave=False)
        for batch in bar:
            if "index" in batch:
                images[batch["index"]] = batch["images"]
                valid[batch["index"]] = True
        logger.info("decoded-image cache: %d triplets x 3 x 3 x %d x %d uint8 = %s of host memory "
                    "(%s available before), built in %.1f s with %d worker(s)%s",
                    len(samples), h, w, format_bytes(needed),
                    "unknown" if available is None else format_bytes(available),
                    time.time() - start, num_workers,
                    f"; {int((~valid).sum())} unreadable triplet(s) skipped" if not valid.all()
                    else "")
        return cls(samples, images, valid)

    def to_device(self, device: torch.device) -> None:
        """Move the store to a CUDA ``device`` (``INPUT.AUG_DEVICE model``): batches are then
        gathered on the GPU and nothing but indices crosses from the host."""
        free, _ = torch.cuda.mem_get_info(device)
        if self.nbytes > 0.5 * free:  # the rest is the training's
            raise CacheMemoryError(
                f"DATALOADER.CACHE memory with INPUT.AUG_DEVICE model keeps the decoded training "
                f"images on {device}: {self.nbytes:,} bytes ({format_bytes(self.nbytes)}) needed, "
                f"more than half of the {free:,} bytes ({format_bytes(free)}) free there; set "
                f"INPUT.AUG_DEVICE loader (store in host memory) or DATALOADER.CACHE none")
        self.images = self.images.to(device)
        get_logger().info("decoded-image cache moved to %s (%s)", device, format_bytes(self.nbytes))

    def gather(self, indices: List[int], seeds: Optional[List[int]] = None) -> dict:
        """The batch of ``indices`` (with their augmentation ``seeds``) as ``data.build``
        documents it, images uint8 (B, 3, 3, H, W); unreadable samples are dropped and counted in
        ``num_skipped``."""
        index = torch.as_tensor(indices, dtype=torch.long)
        valid = self.valid[index]
        keep = index[valid]
        batch = {"num_skipped": len(index) - len(keep)}
        if len(keep) == 0:
            return batch
        images = self.images.index_select(0, keep.to(self.images.device))
        batch.update(images=images, pids=self.pids[keep], camids=self.camids[keep],
                     sceneids=self.sceneids[keep], index=keep)
        if seeds is not None:
            batch["seed"] = torch.as_tensor(seeds, dtype=torch.long)[valid]
        return batch


class CachedBatches(Dataset):
    """Map-style dataset of whole batches: ``dataset[list of (index, seed)]`` (a ``BatchSampler``
    over ``AugmentKeySampler``, with ``batch_size=None``) -> a gathered batch, augmented by
    ``augment`` (uint8 -> normalised float; ``INPUT.AUG_DEVICE loader``) with draws from the first
    sample's seed, a function of (SOLVER.SEED, epoch, position of the batch) only. The batch's
    ``seed`` (B,) int64 holds the samples' seeds (``INPUT.AUG_DEVICE model`` draws from it)."""

    def __init__(self, cache: DecodedImageCache, augment=None):
        self.cache = cache
        self.augment = augment

    def __len__(self) -> int:
        return len(self.cache.samples)

    def __getitem__(self, keys: List[Tuple[int, int]]) -> dict:
        indices, seeds = zip(*keys)
        batch = self.cache.gather(list(indices), list(seeds))
        if self.augment is not None and "images" in batch:
            batch["images"] = self.augment(batch["images"], int(batch["seed"][0]))
        return batch


def identity_collate(batch: dict) -> dict:
    """The batch as ``CachedBatches`` made it (the loader must not re-collate it)."""
    return batch
