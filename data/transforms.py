"""Tri-modal image transforms.

A sample is a tensor of shape (3 modalities, 3 channels, H, W) in [0, 1]. With
``sync=True`` (``INPUT.SYNC_MODALITY_AUG``) the random flip and pad+crop draw ONE set of
parameters per sample and apply it to all three modalities, so pixel-aligned modalities stay
aligned; with ``sync=False`` each modality draws its own. Random erasing is always drawn per
modality (it is a regulariser, not a geometric transform). All randomness comes from torch's RNG,
which the data loader seeds per worker, so runs are reproducible.
"""
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def pil_triplet_to_tensor(images: Sequence[Image.Image], size) -> torch.Tensor:
    """Three PIL images -> float tensor (3, 3, H, W) in [0, 1], resized bilinearly to ``size``."""
    h, w = int(size[0]), int(size[1])
    out = []
    for img in images:
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(out).float().div_(255.0)


def mask_to_tensor(mask: Image.Image, size) -> torch.Tensor:
    """Foreground mask -> float tensor (H, W) in {0, 1}, resized with nearest neighbour."""
    h, w = int(size[0]), int(size[1])
    mask = mask.convert("L").resize((w, h), Image.NEAREST)
    return torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))


class TriModalTrainTransform:
    """Flip, pad + random crop, normalise and random erasing of a (3, 3, H, W) sample."""

    def __init__(self, flip_prob, padding, re_prob, mean, std, sync=True):
        self.flip_prob = flip_prob
        self.padding = int(padding)
        self.re_prob = re_prob
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.sync = sync

    def _flip_crop(self, x: torch.Tensor) -> torch.Tensor:
        """x: (M, 3, H, W) sharing one draw of flip and crop."""
        if torch.rand(()) < self.flip_prob:
            x = x.flip(-1)
        if self.padding > 0:
            h, w = x.shape[-2:]
            p = self.padding
            x = F.pad(x, (p, p, p, p))
            top = int(torch.randint(0, 2 * p + 1, ()))
            left = int(torch.randint(0, 2 * p + 1, ()))
            x = x[..., top : top + h, left : left + w]
        return x

    def _erase(self, img: torch.Tensor) -> torch.Tensor:
        """Random erasing of one (3, H, W) normalised image (area 2-40 %, aspect 0.3-3.3)."""
        if torch.rand(()) >= self.re_prob:
            return img
        _, h, w = img.shape
        for _ in range(10):
            area = h * w * float(torch.empty(()).uniform_(0.02, 0.4))
            log_ratio = float(torch.empty(()).uniform_(math.log(0.3), math.log(1 / 0.3)))
            eh = int(round(math.sqrt(area * math.exp(log_ratio))))
            ew = int(round(math.sqrt(area / math.exp(log_ratio))))
            if 0 < eh < h and 0 < ew < w:
                top = int(torch.randint(0, h - eh + 1, ()))
                left = int(torch.randint(0, w - ew + 1, ()))
                img = img.clone()
                img[:, top : top + eh, left : left + ew] = torch.randn(3, eh, ew)
                return img
        return img

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.sync:
            x = self._flip_crop(x)
        else:
            x = torch.stack([self._flip_crop(m.unsqueeze(0))[0] for m in x])
        x = (x - self.mean) / self.std
        return torch.stack([self._erase(m) for m in x])


class TriModalTestTransform:
    """Normalise a (3, 3, H, W) sample (resizing happens when the tensor is made)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
