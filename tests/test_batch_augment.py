"""Batched augmentation (INPUT.AUG_DEVICE model / DATALOADER.CACHE memory) against the per-image path.

* Same drawn parameters -> same output as the per-image functions (flip, pad + crop, normalise)
  and as timm's RandomErasing (box and values recovered from timm's own output).
* The same uniforms give the same parameters as the per-image path: exact flip and crop counts
  for stratified uniforms, and timm's RandomErasing fed the batched draw's uniforms erases the
  same box for every sample and modality.
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


class _Uniforms:
    """Stands in for ``torch.rand`` in ``BatchTrainAugment.draw``: returns the next of the given
    tables (in draw order) and records them."""

    def __init__(self, tables):
        self.tables = list(tables)

    def __call__(self, shape, device=None, generator=None):
        table = self.tables.pop(0)
        assert tuple(table.shape) == tuple(shape), (table.shape, shape)
        return table.clone()


def _timm_box(uniforms, height, width, re_area):
    """timm's RandomErasing on a (3, H, W) image with its python draws taken from ``uniforms``
    (random() -> u, uniform(a, b) -> a + (b - a) u, randint(a, b) -> a + floor(u (b - a + 1))):
    (erased, top, left, h, w) recovered from the erased pixels (mode const: zeros)."""
    values = iter(float(u) for u in uniforms)
    fake = random.Random()
    fake.random = lambda: next(values)
    fake.uniform = lambda a, b: a + (b - a) * next(values)
    fake.randint = lambda a, b: a + int(next(values) * (b - a + 1))
    erase = RandomErasing(probability=0.5, min_area=re_area[0], max_area=re_area[1],
                          min_aspect=0.3, mode="const", max_count=1, device="cpu")
    img = torch.ones(3, height, width)
    original = RandomErasing.__call__.__globals__["random"]
    RandomErasing.__call__.__globals__["random"] = fake
    try:
        erase(img)
    finally:
        RandomErasing.__call__.__globals__["random"] = original
    box = img[0] == 0
    if not box.any():
        return False, 0, 0, 0, 0
    rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
    return True, int(rows.min()), int(cols.min()), len(rows), len(cols)


@pytest.mark.parametrize("size,re_area", [((64, 32), (0.02, 1 / 3)), ((16, 8), (0.3, 0.9))])
def test_draw_maps_its_uniforms_exactly_as_the_per_image_path(size, re_area):
    """Exact, no sampling margin. Stratified uniforms (every quantile once) give exactly p x N
    flips and equally many crops at every offset; for the erasing, the same uniforms fed to the
    batched draw and to timm's RandomErasing (the per-image path) give the same decision and the
    same box for every (sample, modality), including draws whose first attempts do not fit (the
    second case). Catches: flip probability 1 - p, crop offsets missing an end value, a uniform
    instead of log-uniform aspect, the area drawn on the side length, the last instead of the
    first fitting attempt, no retry, positions not uniform over the free range."""
    height, width = size
    n, m, span = 210, 3, 21  # padding 10: offsets 0..20
    aug = _augment(padding=10, re_area=re_area)
    quantiles = (torch.arange(n * m, dtype=torch.float64) + 0.5) / (n * m)
    strat = quantiles[torch.randperm(n * m, generator=torch.Generator().manual_seed(0))]
    strat = strat.float().view(n, m)
    g = torch.Generator().manual_seed(1)
    erase_u, attempts = torch.rand(n, m, generator=g), torch.rand(n, m, 2, 10, generator=g)
    pos = torch.rand(n, m, 2, generator=g)
    tables = [strat, strat.roll(1, 0), strat.roll(2, 0), erase_u, attempts[..., 0, :],
              attempts[..., 1, :], pos[..., 0], pos[..., 1]]
    original = torch.rand
    torch.rand = _Uniforms(tables)
    try:
        p = aug.draw(n, height, width, "cpu")
    finally:
        torch.rand = original

    assert int(p.flip.sum()) == n * m // 2
    assert torch.equal(torch.bincount(p.top.flatten(), minlength=span),
                       torch.full((span,), n * m // span))
    assert torch.equal(torch.bincount(p.left.flatten(), minlength=span),
                       torch.full((span,), n * m // span))
    compared = 0
    for b in range(n):
        for k in range(m):
            timm_uniforms = [erase_u[b, k]]
            for t in range(10):
                timm_uniforms += [attempts[b, k, 0, t], attempts[b, k, 1, t]]
            # timm stops drawing at the first fitting attempt: the positions follow it
            erased, top, left, h, w = _timm_box_from(timm_uniforms, pos[b, k], height, width,
                                                     re_area)
            assert bool(p.erase[b, k]) == erased, (b, k)
            if erased:
                got = (int(p.erase_top[b, k]), int(p.erase_left[b, k]), int(p.erase_h[b, k]),
                       int(p.erase_w[b, k]))
                assert got == (top, left, h, w), (b, k, got, (top, left, h, w))
                compared += 1
    assert compared > n * m // 4  # the comparison is not vacuous


def _timm_box_from(uniforms, positions, height, width, re_area):
    """``_timm_box`` with the erase and attempt uniforms in timm's order, the two position
    uniforms inserted right after the first attempt that fits (where timm draws them)."""
    erase_u, rest = uniforms[0], uniforms[1:]
    sequence = [erase_u]
    log_lo = math.log(0.3)
    for t in range(10):
        area_u, aspect_u = rest[2 * t], rest[2 * t + 1]
        sequence += [area_u, aspect_u]
        area = (re_area[0] + (re_area[1] - re_area[0]) * float(area_u)) * height * width
        aspect = math.exp(log_lo + (-2 * log_lo) * float(aspect_u))
        if (int(round(math.sqrt(area * aspect))) < height
                and int(round(math.sqrt(area / aspect))) < width):
            sequence += [positions[0], positions[1]]
            break
    return _timm_box(sequence, height, width, re_area)


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
