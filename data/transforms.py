"""Tri-modal image transforms.

A sample is a tensor of shape (3 modalities, 3 channels, H, W). Two implementations of the same
training augmentation (flip, zero pad + random crop, normalise, random erasing):

* per image (``TriModalTrainTransform``, in the loader workers): float sample in [0, 1]. With
  ``sync=True`` (``INPUT.SYNC_MODALITY_AUG``) the flip and pad+crop draw ONE set of parameters per
  sample for all three modalities (pixel-aligned modalities stay aligned); with ``sync=False``
  (DeMo) each modality draws its own. Random erasing is timm's ``RandomErasing`` (one box,
  per-pixel N(0, 1) values), always drawn per modality. Called with a sample's ``seed`` (the
  training loader passes one per sample, a function of (SOLVER.SEED, epoch, position in the
  epoch) only: ``data.samplers.AugmentKeySampler``), each modality's draws, and the shared flip
  and crop, come from their own stream derived from it, so the result does not depend on which
  loader worker or process computes it; without a seed they come from the global RNGs.
* batched (``BatchTrainAugment``, ``INPUT.AUG_DEVICE model`` or ``DATALOADER.CACHE memory``):
  uint8 batches (B, 3, 3, H, W) on any device, the same parameter distribution drawn from the
  batch's seed (its first sample's) on that device (``draw``), applied by gathers and masks
  (``apply``). Given the same parameters both give the same output
  (tests/test_batch_augment.py).
"""
import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.random_erasing import RandomErasing

from utils.seed import derive_seed, seeded_rng

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def pil_triplet_to_uint8(images: Sequence[Image.Image], size,
                         interpolation: str = "bilinear") -> torch.Tensor:
    """Three PIL images -> uint8 tensor (3, 3, H, W), resized to ``size`` with PIL's
    ``interpolation`` ("bilinear" or "bicubic")."""
    h, w = int(size[0]), int(size[1])
    out = []
    for img in images:
        if img.size != (w, h):
            img = img.resize((w, h), INTERPOLATIONS[interpolation])
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(out)


def pil_triplet_to_tensor(images: Sequence[Image.Image], size,
                          interpolation: str = "bilinear") -> torch.Tensor:
    """Three PIL images -> float tensor (3, 3, H, W) in [0, 1] (see ``pil_triplet_to_uint8``)."""
    return pil_triplet_to_uint8(images, size, interpolation).float().div_(255.0)


def mask_to_tensor(mask: Image.Image, size) -> torch.Tensor:
    """Foreground mask -> float tensor (H, W) in {0, 1}, resized with nearest neighbour."""
    h, w = int(size[0]), int(size[1])
    mask = mask.convert("L").resize((w, h), Image.NEAREST)
    return torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))


def flip_pad_crop(x: torch.Tensor, flip: bool, padding: int, top: int, left: int) -> torch.Tensor:
    """Per-image flip, then zero padding by ``padding`` and the crop at (``top``, ``left``) of the
    padded image (both in [0, 2 * padding]): x (..., H, W) -> (..., H, W)."""
    if flip:
        x = x.flip(-1)
    if padding > 0:
        h, w = x.shape[-2:]
        x = F.pad(x, (padding, padding, padding, padding))
        x = x[..., top : top + h, left : left + w]
    return x


class TriModalTrainTransform:
    """Flip, pad + random crop, normalise and random erasing of a (3, 3, H, W) sample.

    ``re_area``: (min, max) erased share of the image; aspect ratios log-uniform in [0.3, 1/0.3].
    """

    def __init__(self, flip_prob, padding, re_prob, mean, std, sync=False, re_area=(0.02, 1 / 3)):
        self.flip_prob = flip_prob
        self.padding = int(padding)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.sync = sync
        self.erase = RandomErasing(probability=re_prob, min_area=re_area[0], max_area=re_area[1],
                                   min_aspect=0.3, mode="pixel", max_count=1, device="cpu")

    def _flip_crop(self, x: torch.Tensor) -> torch.Tensor:
        """x: (M, 3, H, W) sharing one draw of flip and crop."""
        flip = bool(torch.rand(()) < self.flip_prob)
        top = left = 0
        if self.padding > 0:
            top = int(torch.randint(0, 2 * self.padding + 1, ()))
            left = int(torch.randint(0, 2 * self.padding + 1, ()))
        return flip_pad_crop(x, flip, self.padding, top, left)

    SHARED = 3  # stream of the flip and crop shared by the modalities (``sync``); 0-2: per modality

    def __call__(self, x: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
        """x (3, 3, H, W) in [0, 1] -> augmented, normalised (3, 3, H, W). With ``seed`` the
        draws of modality m come from ``derive_seed(seed, m)`` (shared flip and crop: from
        ``derive_seed(seed, SHARED)``) and the caller's RNGs are left as they were."""
        def stream(m):
            return seeded_rng(None if seed is None else derive_seed(seed, m))

        if self.sync:
            with stream(self.SHARED):
                x = self._flip_crop(x)
        out = []
        for m in range(x.shape[0]):
            with stream(m):
                xm = x[m : m + 1] if self.sync else self._flip_crop(x[m : m + 1])
                xm = (xm - self.mean) / self.std
                out.append(self.erase(xm[0]))  # one independent erasing draw per modality
        return torch.stack(out)


class TriModalTestTransform:
    """Normalise a (3, 3, H, W) sample (resizing happens when the tensor is made)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class AugmentParams(NamedTuple):
    """Drawn parameters of one batch, B samples x M = 3 modalities (all tensors on one device)."""

    flip: torch.Tensor  # (B, M) bool
    top: torch.Tensor  # (B, M) long, crop offset in the padded image, [0, 2 * padding]
    left: torch.Tensor  # (B, M) long
    erase: torch.Tensor  # (B, M) bool, a box is erased
    erase_top: torch.Tensor  # (B, M) long
    erase_left: torch.Tensor  # (B, M) long
    erase_h: torch.Tensor  # (B, M) long
    erase_w: torch.Tensor  # (B, M) long
    noise: torch.Tensor  # (E, 3, H, W) float, N(0, 1) values for the E erased (sample, modality)
                         # pairs in the row-major order of ``erase.nonzero()``


class BatchTrainAugment:
    """The training augmentation of ``TriModalTrainTransform`` on whole uint8 batches.

    ``__call__(x)``: x (B, M, 3, H, W) uint8 on any device -> float (B, M, 3, H, W), normalised;
    the parameters are drawn from the default torch RNG of x's device (seeded per epoch).

    Distribution (as the per-image path): flip with ``flip_prob``; crop offsets uniform integers
    in [0, 2 * padding] (shared by the M modalities with ``sync``); erasing per modality with
    ``re_prob``: up to 10 attempts of area ~ U(re_area) * H * W and log-aspect ~ U(log 0.3,
    log 1/0.3), h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); the first attempt
    with h < H and w < W is taken (none: no erasing), at a uniform integer position.
    """

    ATTEMPTS = 10
    MIN_ASPECT = 0.3

    def __init__(self, flip_prob, padding, re_prob, mean, std, sync=False, re_area=(0.02, 1 / 3)):
        self.flip_prob = float(flip_prob)
        self.padding = int(padding)
        self.re_prob = float(re_prob)
        self.re_area = (float(re_area[0]), float(re_area[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 1, 3, 1, 1)
        self.sync = sync
        self._generator: Optional[torch.Generator] = None

    def draw(self, batch: int, height: int, width: int, device,
             generator: Optional[torch.Generator] = None) -> AugmentParams:
        """Parameters for a batch of ``batch`` triplets of size (height, width)."""
        def uniform(*shape):
            return torch.rand(shape, device=device, generator=generator)

        m = 3
        draws = 1 if self.sync else m
        flip = (uniform(batch, draws) < self.flip_prob).expand(batch, m)
        span = 2 * self.padding + 1
        top = (uniform(batch, draws) * span).long().clamp_max(span - 1).expand(batch, m)
        left = (uniform(batch, draws) * span).long().clamp_max(span - 1).expand(batch, m)

        erase = uniform(batch, m) < self.re_prob
        lo, hi = self.re_area
        area = (lo + (hi - lo) * uniform(batch, m, self.ATTEMPTS)) * (height * width)
        log_lo = math.log(self.MIN_ASPECT)
        aspect = torch.exp(log_lo + (-2 * log_lo) * uniform(batch, m, self.ATTEMPTS))
        h = torch.round(torch.sqrt(area * aspect)).long()
        w = torch.round(torch.sqrt(area / aspect)).long()
        fits = (h < height) & (w < width)
        first = fits.int().argmax(dim=-1, keepdim=True)  # first fitting attempt (0 when none)
        erase = erase & fits.any(dim=-1)
        h = h.gather(-1, first).squeeze(-1)
        w = w.gather(-1, first).squeeze(-1)
        erase_top = (uniform(batch, m) * (height - h + 1)).long().clamp(min=0)
        erase_left = (uniform(batch, m) * (width - w + 1)).long().clamp(min=0)
        noise = torch.randn((int(erase.sum()), 3, height, width), device=device, generator=generator)
        return AugmentParams(flip, top, left, erase, erase_top, erase_left, h, w, noise)

    def apply(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """x (B, M, 3, H, W) uint8 or float in [0, 1] -> augmented, normalised float32."""
        b, m, c, height, width = x.shape
        p, dev = self.padding, x.device
        rows = params.top.unsqueeze(-1) - p + torch.arange(height, device=dev)  # (B, M, H)
        cols = params.left.unsqueeze(-1) - p + torch.arange(width, device=dev)  # (B, M, W)
        inside = (((rows >= 0) & (rows < height)).unsqueeze(-1)
                  & ((cols >= 0) & (cols < width)).unsqueeze(-2))  # (B, M, H, W): not padding
        cols = torch.where(params.flip.unsqueeze(-1), width - 1 - cols, cols)  # flip, then crop
        rows = rows.clamp(0, height - 1).view(b, m, 1, height, 1).expand(b, m, c, height, width)
        cols = cols.clamp(0, width - 1).view(b, m, 1, 1, width).expand(b, m, c, height, width)
        out = x.gather(3, rows).gather(4, cols).masked_fill(~inside.unsqueeze(2), 0)
        if out.dtype == torch.uint8:
            out = out.float().div_(255.0)
        out = (out - self.mean.to(dev)) / self.std.to(dev)

        r = torch.arange(height, device=dev)
        q = torch.arange(width, device=dev)
        in_rows = ((r >= params.erase_top.unsqueeze(-1))
                   & (r < (params.erase_top + params.erase_h).unsqueeze(-1)))  # (B, M, H)
        in_cols = ((q >= params.erase_left.unsqueeze(-1))
                   & (q < (params.erase_left + params.erase_w).unsqueeze(-1)))  # (B, M, W)
        box = (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2))[params.erase]  # (E, H, W)
        out[params.erase] = torch.where(box.unsqueeze(1), params.noise.to(out.dtype),
                                        out[params.erase])
        return out

    def __call__(self, x: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
        """Draw the batch's parameters (from a generator of x's device seeded with ``seed``; None:
        from the device's RNG) and apply them."""
        generator = None
        if seed is not None:
            if self._generator is None or self._generator.device != x.device:
                self._generator = torch.Generator(device=x.device)
            generator = self._generator.manual_seed(seed)
        params = self.draw(x.shape[0], x.shape[-2], x.shape[-1], x.device, generator)
        return self.apply(x, params)
