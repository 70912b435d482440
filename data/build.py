"""Data loaders for training and evaluation, built from the config.

A batch is a dict:
    images  (B, 3, 3, H, W) float  modality order RGB, NI, TI; normalised (training batches with
                                   INPUT.AUG_DEVICE model: uint8, augmented by the trainer on its
                                   device with DataBundle.train_augment)
    pids    (B,) long              (train: relabelled 0..num_classes-1)
    camids  (B,) long              0-based
    sceneids (B,) long             MSVR310 scenes, -1 elsewhere
    index   (B,) long              position of the sample in its split list
    seed    (B,) long              training: each sample's augmentation seed (AugmentKeySampler);
                                   INPUT.AUG_DEVICE model draws the batch's from the first
    masks   (B, H, W) float        foreground masks (evaluation of the synthetic dataset only)
    num_skipped int                unreadable images skipped in this batch (SKIP_BAD_IMAGES)
"""
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset

from data.cache import CachedBatches, DecodedImageCache, identity_collate
from data.datasets import BadImageError, ReIDDataset, Sample, build_dataset_from_config, read_triplet
from data.samplers import AugmentKeySampler, RandomIdentitySampler, ShardSampler
from data.transforms import (BatchTrainAugment, TriModalTestTransform, TriModalTrainTransform,
                             mask_to_tensor, pil_triplet_to_tensor, pil_triplet_to_uint8)
from utils.logger import get_logger
from utils.seed import worker_init_fn


class TriModalImageDataset(Dataset):
    """Reads RGB/NI/TI triplets of ``samples`` and applies ``transform`` to (3, 3, H, W) floats in
    [0, 1]; without a transform the images stay uint8 (3, 3, H, W). ``dataset[index]``, or
    ``dataset[(index, seed)]`` (training: ``AugmentKeySampler``), which draws the transform's
    randomness from ``seed``."""

    def __init__(self, samples: List[Sample], size, transform, with_masks: bool = False,
                 skip_bad_images: bool = False, interpolation: str = "bilinear"):
        self.samples = samples
        self.size = size
        self.interpolation = interpolation
        self.transform = transform
        self.with_masks = with_masks
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> Optional[dict]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        try:
            images = read_triplet(sample)
        except BadImageError as exc:
            if not self.skip_bad_images:
                raise BadImageError(f"{exc}; set DATALOADER.SKIP_BAD_IMAGES True to skip (and "
                                    f"count) unreadable images") from exc
            get_logger().warning("skipping unreadable image: %s", exc)
            return None
        if self.transform is None:
            pixels = pil_triplet_to_uint8(images, self.size, self.interpolation)
        elif seed is None:
            pixels = self.transform(pil_triplet_to_tensor(images, self.size, self.interpolation))
        else:
            pixels = self.transform(pil_triplet_to_tensor(images, self.size, self.interpolation),
                                    seed)
        item = {
            "images": pixels,
            "pids": sample.pid,
            "camids": sample.camid,
            "sceneids": sample.sceneid,
            "index": index,
        }
        if seed is not None:
            item["seed"] = seed
        if self.with_masks and sample.mask_path:
            with Image.open(sample.mask_path) as mask:
                item["masks"] = mask_to_tensor(mask, self.size)
        return item


def collate_skipping(items: List[Optional[dict]]) -> dict:
    """Stack the dict items of a batch, dropping the ``None`` of skipped images."""
    kept = [it for it in items if it is not None]
    batch = {"num_skipped": len(items) - len(kept)}
    if not kept:
        return batch
    for key in kept[0]:
        values = [it[key] for it in kept]
        batch[key] = torch.stack(values) if torch.is_tensor(values[0]) else torch.tensor(values)
    return batch


@dataclass
class EvalSet:
    """One retrieval problem: the loader yields query samples then gallery samples.

    When ``shared`` is true the query list IS the gallery list (RGBNT201 protocol: every test
    sample is queried against all others; same pid + same camera is removed as junk).
    """

    name: str
    loader: DataLoader
    num_query: int
    shared: bool
    uses_scenes: bool
    samples: List[Sample]


@dataclass
class DataBundle:
    train_loader: DataLoader
    train_sampler: RandomIdentitySampler
    eval_sets: Dict[str, EvalSet]
    num_classes: int
    num_cams: int
    dataset: ReIDDataset
    # INPUT.AUG_DEVICE model: uint8 training batches -> augmented floats, on the training device
    train_augment: Optional[BatchTrainAugment] = None


def split_validation(train: List[Sample], num_val_ids: int, seed: int):
    """Carve ``num_val_ids`` identities out of the training split.

    Returns (train samples relabelled 0..n-1, validation samples with their original labels).
    """
    pids = sorted({s.pid for s in train})
    if num_val_ids >= len(pids):
        raise ValueError(
            f"DATASETS.VAL_IDS ({num_val_ids}) must be smaller than the number of training "
            f"identities ({len(pids)})"
        )
    rng = np.random.default_rng(seed)
    val_pids = set(int(p) for p in rng.choice(pids, size=num_val_ids, replace=False))
    remaining = sorted(p for p in pids if p not in val_pids)
    relabel = {p: i for i, p in enumerate(remaining)}
    new_train = [replace(s, pid=relabel[s.pid]) for s in train if s.pid in relabel]
    val = [s for s in train if s.pid in val_pids]
    return new_train, val


def _eval_loader(cfg, samples, with_masks, rank, world_size) -> DataLoader:
    transform = TriModalTestTransform(cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
    dataset = TriModalImageDataset(samples, cfg.INPUT.SIZE_TEST, transform, with_masks,
                                   cfg.DATALOADER.SKIP_BAD_IMAGES)
    return DataLoader(
        dataset,
        batch_size=cfg.TEST.IMS_PER_BATCH,
        sampler=ShardSampler(len(samples), rank, world_size),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        collate_fn=collate_skipping,
        worker_init_fn=worker_init_fn,
        persistent_workers=False,
    )


def build_data(cfg, rank: int = 0, world_size: int = 1,
               device: Optional[torch.device] = None) -> DataBundle:
    """Dataset, identity-sampled training loader and evaluation sets (``test``, and ``val`` when
    ``DATASETS.VAL_IDS > 0``). ``device``: the training device (a CUDA device receives the
    decoded-image cache with ``INPUT.AUG_DEVICE model``)."""
    logger = get_logger()
    dataset = build_dataset_from_config(cfg)
    logger.info("dataset %s under %s\n%s", dataset.name, cfg.DATASETS.ROOT_DIR,
                dataset.statistics_table())

    train = dataset.train
    eval_sets = {}
    with_masks = any(s.mask_path for s in dataset.query)
    if cfg.DATASETS.VAL_IDS > 0:
        train, val = split_validation(train, cfg.DATASETS.VAL_IDS, cfg.SOLVER.SEED)
        logger.info("validation split: %d identities, %d triplets carved from training",
                    cfg.DATASETS.VAL_IDS, len(val))
        eval_sets["val"] = EvalSet("val", _eval_loader(cfg, val, False, rank, world_size),
                                   len(val), True, dataset.uses_scenes, val)
    shared = dataset.query is dataset.gallery or dataset.query == dataset.gallery
    test_samples = list(dataset.query) if shared else list(dataset.query) + list(dataset.gallery)
    eval_sets["test"] = EvalSet("test", _eval_loader(cfg, test_samples, with_masks, rank, world_size),
                                len(dataset.query), shared, dataset.uses_scenes, test_samples)

    num_classes = len({s.pid for s in train})
    per_rank_batch = cfg.SOLVER.IMS_PER_BATCH // world_size
    sampler = RandomIdentitySampler([s.pid for s in train], cfg.SOLVER.IMS_PER_BATCH,
                                    cfg.DATALOADER.NUM_INSTANCE, cfg.SOLVER.SEED, rank, world_size)
    aug = (cfg.INPUT.FLIP_PROB, cfg.INPUT.PADDING, cfg.INPUT.RE_PROB, cfg.INPUT.PIXEL_MEAN,
           cfg.INPUT.PIXEL_STD, cfg.INPUT.SYNC_MODALITY_AUG, cfg.INPUT.RE_AREA)
    on_device = cfg.INPUT.AUG_DEVICE == "model"
    if cfg.DATALOADER.CACHE == "memory":
        # torchrun starts one process per GPU of the node, each with its own store
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cache = DecodedImageCache.build(train, cfg.INPUT.SIZE_TRAIN, cfg.INPUT.TRAIN_INTERPOLATION,
                                        cfg.DATALOADER.NUM_WORKERS, cfg.DATALOADER.SKIP_BAD_IMAGES,
                                        processes, show_progress=rank == 0)
        if on_device and device is not None and device.type == "cuda":
            cache.to_device(device)
        train_loader = DataLoader(
            CachedBatches(cache, None if on_device else BatchTrainAugment(*aug)),
            batch_size=None,
            sampler=BatchSampler(AugmentKeySampler(sampler), per_rank_batch, drop_last=True),
            num_workers=0,  # a gather from memory: nothing to parallelise
            collate_fn=identity_collate,
            generator=torch.Generator(),
            pin_memory=torch.cuda.is_available() and cache.images.device.type == "cpu",
        )
    else:
        train_loader = DataLoader(
            TriModalImageDataset(train, cfg.INPUT.SIZE_TRAIN,
                                 None if on_device else TriModalTrainTransform(*aug), False,
                                 cfg.DATALOADER.SKIP_BAD_IMAGES, cfg.INPUT.TRAIN_INTERPOLATION),
            batch_size=per_rank_batch,
            sampler=AugmentKeySampler(sampler),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            collate_fn=collate_skipping,
            worker_init_fn=worker_init_fn,
            generator=torch.Generator(),
            drop_last=True,
            persistent_workers=False,
        )
    return DataBundle(train_loader, sampler, eval_sets, num_classes, dataset.num_cams, dataset,
                      BatchTrainAugment(*aug) if on_device else None)
