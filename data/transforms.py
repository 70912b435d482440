"""Tri-modal image transforms.

A sample is a tensor of shape (3 modalities, 3 channels, H, W) in [0, 1]. With
``sync=True`` (``INPUT.SYNC_MODALITY_AUG``) the random flip and pad+crop draw ONE set of
parameters per sample and apply it to all three modalities, so pixel-aligned modalities stay
aligned; with ``sync=False`` (DeMo) each modality draws its own. Random erasing is timm's
``RandomErasing`` (one box, per-pixel N(0, 1) values), always drawn per modality. Flip and crop
draw from torch's RNG, erasing from python's and torch's; the data loader seeds both per worker,
so runs are reproducible.
"""
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.random_erasing import RandomErasing

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def pil_triplet_to_tensor(images: Sequence[Image.Image], size,
                          interpolation: str = "bilinear") -> torch.Tensor:
    """Three PIL images -> float tensor (3, 3, H, W) in [0, 1], resized to ``size`` with PIL's
    ``interpolation`` ("bilinear" or "bicubic")."""
    h, w = int(size[0]), int(size[1])
    out = []
    for img in images:
        if img.size != (w, h):
            img = img.resize((w, h), INTERPOLATIONS[interpolation])
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(out).float().div_(255.0)


def mask_to_tensor(mask: Image.Image, size) -> torch.Tensor:
    """Foreground mask -> float tensor (H, W) in {0, 1}, resized with nearest neighbour."""
    h, w = int(size[0]), int(size[1])
    mask = mask.convert("L").resize((w, h), Image.NEAREST)
    return torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.sync:
            x = self._flip_crop(x)
        else:
            x = torch.stack([self._flip_crop(m.unsqueeze(0))[0] for m in x])
        x = (x - self.mean) / self.std
        return self.erase(x)  # (3, 3, H, W): one independent draw per modality


class TriModalTestTransform:
    """Normalise a (3, 3, H, W) sample (resizing happens when the tensor is made)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
