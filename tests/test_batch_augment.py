"""Batched augmentation (INPUT.AUG_DEVICE model / DATALOADER.CACHE memory) against the per-image path.

* Same drawn parameters -> same output as the per-image functions (flip, pad + crop, normalise)
  and as timm's RandomErasing (box and values recovered from timm's own output).
* Over many seeded draws: flip rate, crop offsets, erasing rate, erased areas and aspect ratios
  match the per-image path's specification (timm's draws on the same image size).
* Seeded draws are reproducible; the decoded-image cache holds exactly the per-image decode.
* Training with the cache gives the same steps as decoding per image; the store's size is logged
  and a store that would not fit fails with one line naming the bytes needed and available.
"""
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from timm.data.random_erasing import RandomErasing

from data.cache import CacheMemoryError, DecodedImageCache, check_fits
from data.datasets import build_dataset, read_triplet
from data.transforms import (AugmentParams, BatchTrainAugment, TriModalTrainTransform,
                             flip_pad_crop, pil_triplet_to_uint8)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]  # distinct per channel: catches a channel mix-up


def _augment(sync=False, padding=3, flip_prob=0.5, re_prob=0.5, re_area=(0.02, 1 / 3)):
    return BatchTrainAugment(flip_prob, padding, re_prob, MEAN, STD, sync, re_area)


def _no_erase(params: AugmentParams) -> AugmentParams:
    return params._replace(erase=torch.zeros_like(params.erase), noise=params.noise[:0])


@pytest.mark.parametrize("sync", [False, True])
def test_flip_crop_normalise_equal_the_per_image_path_for_the_same_draws(sync):
    """Catches: crop offsets shifted by the padding, flipping after the crop, padding with
    anything but zeros, normalising with the wrong channel order, a shared draw in sync=False."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 3, 20, 12), dtype=torch.uint8)
    aug = _augment(sync=sync)
    params = _no_erase(aug.draw(6, 20, 12, "cpu"))
    assert params.flip.any() and not params.flip.all()
    out = aug.apply(x, params)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for b in range(6):
        for m in range(3):
            ref = flip_pad_crop(x[b, m].float().div(255.0), bool(params.flip[b, m]), 3,
                                int(params.top[b, m]), int(params.left[b, m]))
            assert torch.equal(out[b, m], (ref - mean) / std), (b, m)
    shared = (params.top[:, 0:1] == params.top).all() and (params.left[:, 0:1] == params.left).all()
    assert bool(shared) == sync


def test_erasing_equals_timm_for_the_same_box_and_values():
    """timm erases one box per modality of the normalised sample; the batched path, given that
    box and those values, returns the same tensor. Catches: an off-by-one box edge, erasing
    before normalisation, one box shared by the three modalities."""
    torch.manual_seed(1)
    random.seed(3)
    x = torch.randint(0, 256, (1, 3, 3, 32, 16), dtype=torch.uint8)
    aug = _augment(padding=0)
    normalised = (x[0].float().div(255.0) - torch.tensor(MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(STD).view(1, 3, 1, 1)
    timm_out = RandomErasing(probability=1.0, min_area=0.02, max_area=1 / 3, min_aspect=0.3,
                             mode="pixel", max_count=1, device="cpu")(normalised.clone())
    changed = (timm_out != normalised).any(dim=1)  # (3, H, W)
    rows, cols = changed.any(dim=2), changed.any(dim=1)  # (3, H), (3, W)
    top = rows.int().argmax(dim=1)
    left = cols.int().argmax(dim=1)
    h, w = rows.sum(dim=1), cols.sum(dim=1)
    assert (h > 0).all() and len(set(top.tolist())) > 1  # three independent boxes
    zeros = torch.zeros(1, 3, dtype=torch.long)
    params = AugmentParams(torch.zeros(1, 3, dtype=torch.bool), zeros, zeros,
                           torch.ones(1, 3, dtype=torch.bool), top[None], left[None], h[None],
                           w[None], torch.where(changed[:, None], timm_out, 100.0))
    assert torch.equal(aug.apply(x, params)[0], timm_out)


def _timm_boxes(n, height, width, re_area, seed=0):
    """(erased, h, w) of ``n`` draws of timm's RandomErasing on a (1, 3, H, W) image."""
    random.seed(seed)
    torch.manual_seed(seed)
    erase = RandomErasing(probability=0.5, min_area=re_area[0], max_area=re_area[1],
                          min_aspect=0.3, mode="const", max_count=1, device="cpu")
    out = []
    for _ in range(n):
        img = torch.zeros(1, 3, height, width)
        img += 1.0
        erase(img)
        box = img[0, 0] == 0
        out.append((bool(box.any()), int(box.any(1).sum()), int(box.any(0).sum())))
    return out


@pytest.mark.parametrize("size,re_area", [((64, 32), (0.02, 1 / 3)), ((16, 8), (0.3, 0.9))])
def test_draw_distribution_matches_the_specification(size, re_area):
    """4,000 triplets (12,000 modality draws, seeded). The second case rejects many attempts (boxes
    wider than the image): its erasing rate below RE_PROB must match timm's. Catches: a uniform
    instead of log-uniform aspect ratio, area drawn on the side length, the last instead of the
    first fitting attempt, no retry, crop offsets missing an end value, flip probability 1 - p."""
    height, width = size
    torch.manual_seed(0)
    n = 4000
    aug = _augment(padding=10, re_area=re_area)
    p = aug.draw(n, height, width, "cpu")
    assert abs(p.flip.float().mean().item() - 0.5) < 0.02
    counts = torch.bincount(p.top.flatten(), minlength=21)
    assert len(counts) == 21 and (counts - 3 * n / 21).abs().max() < 0.2 * 3 * n / 21
    assert not (p.top[:, :1] == p.top).all()  # per-modality draws (DeMo)

    timm = _timm_boxes(3000, height, width, re_area)
    timm_rate = sum(e for e, _, _ in timm) / len(timm)
    rate = p.erase.float().mean().item()
    assert abs(rate - timm_rate) < 0.03, (rate, timm_rate)
    h, w = p.erase_h[p.erase].float(), p.erase_w[p.erase].float()
    assert (h < height).all() and (w < width).all()
    area = h * w / (height * width)
    th = torch.tensor([b[1] for b in timm if b[0]], dtype=torch.float)
    tw = torch.tensor([b[2] for b in timm if b[0]], dtype=torch.float)
    tarea = th * tw / (height * width)
    assert abs(area.mean() - tarea.mean()) < 0.1 * tarea.mean(), (area.mean(), tarea.mean())
    assert abs((h > w).float().mean() - (th > tw).float().mean()) < 0.04
    lo, hi = re_area
    slack = 2.5 * (height + width) / (height * width)  # rounding of h and w
    assert area.min() >= lo - slack and area.max() <= hi + slack
    # positions: uniform over the free range, both ends reached
    top, left = p.erase_top[p.erase], p.erase_left[p.erase]
    assert (top + p.erase_h[p.erase] <= height).all() and (left + p.erase_w[p.erase] <= width).all()
    assert (top == 0).any() and (top + p.erase_h[p.erase] == height).any()


def test_seeded_draws_are_reproducible():
    """Catches: drawing from an unseeded generator (runs would not be reproducible)."""
    x = torch.randint(0, 256, (4, 3, 3, 24, 12), dtype=torch.uint8)
    aug = _augment()
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    b = aug(x)
    torch.manual_seed(6)
    c = aug(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sync_flag_is_shared_by_batched_and_per_image_paths():
    """With SYNC_MODALITY_AUG the three modalities of a sample share flip and crop in both paths.
    Catches: the batched path ignoring ``sync``."""
    torch.manual_seed(0)
    p = _augment(sync=True).draw(200, 32, 16, "cpu")
    assert (p.flip[:, :1] == p.flip).all() and (p.left[:, :1] == p.left).all()
    # per-image: a sample with three identical modalities stays identical without erasing
    t = TriModalTrainTransform(0.5, 3, 0.0, MEAN, STD, sync=True)
    x = torch.rand(1, 3, 32, 16).expand(3, 3, 32, 16).contiguous()
    for _ in range(10):
        y = t(x)
        assert torch.equal(y[0], y[1]) and torch.equal(y[1], y[2])


def test_cache_holds_the_per_image_decode(tmp_path):
    """The store's rows are the per-image path's uint8 decode at SIZE_TRAIN with the training
    interpolation, and a gather returns the rows, labels and indices asked for. Catches: a cache
    resized with another interpolation, rows stored in loader order instead of sample order."""
    ds = build_dataset("Synthetic", str(tmp_path), dict(num_train_ids=3, num_test_ids=2,
                                                        samples_per_id=3, height=40, width=20, seed=0))
    cache = DecodedImageCache.build(ds.train, (32, 16), "bicubic", num_workers=0,
                                    skip_bad_images=False, show_progress=False)
    assert cache.images.shape == (len(ds.train), 3, 3, 32, 16) and cache.valid.all()
    assert cache.nbytes == len(ds.train) * 3 * 3 * 32 * 16
    for i in (0, len(ds.train) - 1):
        assert torch.equal(cache.images[i], pil_triplet_to_uint8(read_triplet(ds.train[i]),
                                                                 (32, 16), "bicubic"))
    batch = cache.gather([4, 1, 4])
    assert batch["index"].tolist() == [4, 1, 4] and batch["num_skipped"] == 0
    assert batch["pids"].tolist() == [ds.train[i].pid for i in (4, 1, 4)]
    assert torch.equal(batch["images"][1], cache.images[1])


def test_memory_check_names_bytes_needed_and_available():
    """Catches: a check that ignores the number of training processes, or lets 100 % through."""
    check_fits(10, 100)
    with pytest.raises(CacheMemoryError, match="needs 120 bytes.*only 100 bytes"):
        check_fits(60, 100, processes=2)
    with pytest.raises(CacheMemoryError):
        check_fits(95, 100)


def _history_losses(out_dir):
    with open(os.path.join(out_dir, "log.txt")) as f:
        return [line.split("loss ")[1].split()[0] for line in f if " iter " in line and "loss" in line]


def test_training_with_the_cache_repeats_the_per_image_run(tiny_opts, tmp_path):
    """Same seed, AUG_DEVICE model: decoding per image and gathering from the cache give the same
    loss at every step; with the cache, augmenting in the loader or on the device also does (one
    random stream). Catches: the cache path consuming the global RNG (other initial weights), a
    batch gathered from the wrong rows, the augmentation applied twice or not at all."""
    import train_net

    runs = {"per_image": ["INPUT.AUG_DEVICE", "model"],
            "cache": ["INPUT.AUG_DEVICE", "model", "DATALOADER.CACHE", "memory"],
            "cache_loader": ["DATALOADER.CACHE", "memory"]}
    losses = {}
    for name, extra in runs.items():
        out = str(tmp_path / name)
        opts = [o if o != tiny_opts[-1] else out for o in tiny_opts]
        train_net.main(opts + ["SOLVER.MAX_EPOCHS", "1", "SOLVER.EVAL_PERIOD", "0"] + extra)
        losses[name] = _history_losses(out)
        if name.startswith("cache"):
            with open(os.path.join(out, "log.txt")) as f:
                assert "decoded-image cache: 36 triplets x 3 x 3 x 64 x 32 uint8 = 0.6 MiB" in f.read()
    assert len(losses["per_image"]) == 3
    assert losses["per_image"] == losses["cache"] == losses["cache_loader"]


def test_cli_store_too_large_fails_with_one_line(tiny_opts):
    """A store beyond the host memory stops before decoding, with the bytes needed and available."""
    proc = subprocess.run([sys.executable, "train_net.py", *tiny_opts, "DATALOADER.CACHE", "memory",
                           "INPUT.SIZE_TRAIN", "[65536, 32768]"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: DATALOADER.CACHE memory needs 695,784,701,952 bytes")
    assert "bytes (" in lines[0] and "available; set DATALOADER.CACHE none" in lines[0]
    assert len(lines) == 2  # the error, then where its traceback is
    assert math.isfinite(float(lines[0].split("only ")[1].split(" bytes")[0].replace(",", "")))
