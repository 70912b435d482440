"""Worked example (docs/extending.md): a backbone, a small convolutional patch encoder.

    IMPORTS: [docs/examples/conv_backbone.py]
    MODEL:
      BACKBONE_TYPE: conv
      PRETRAIN_PATH: ""
"""
from typing import Optional

import torch
import torch.nn as nn

from modeling.registry import BACKBONE_REGISTRY


@BACKBONE_REGISTRY.register("conv")
class ConvBackbone(nn.Module):
    """forward(images (B, 3, H, W), cam_ids (B,) or None) -> tokens (B, 1 + N, dim): a strided
    convolution per ``patch`` x ``patch`` patch, a global token (mean of the patches plus a
    learned camera embedding) first. Has ``out_dim``, ``patch_size`` and ``stride``."""

    def __init__(self, num_cams: int, dim: int = 64, patch: int = 16):
        super().__init__()
        self.out_dim = dim
        self.patch_size = self.stride = (patch, patch)
        self.embed = nn.Sequential(nn.Conv2d(3, dim, patch, stride=patch), nn.GELU(),
                                   nn.Conv2d(dim, dim, 1))
        self.cam_embed = nn.Parameter(torch.zeros(max(num_cams, 1), dim))

    @classmethod
    def from_config(cls, cfg, num_cams: int) -> "ConvBackbone":
        return cls(num_cams, patch=cfg.MODEL.STRIDE_SIZE[0])

    def forward(self, images: torch.Tensor, cam_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        patches = self.embed(images).flatten(2).transpose(1, 2)  # (B, N, dim)
        global_ = patches.mean(dim=1)
        if cam_ids is not None:
            global_ = global_ + self.cam_embed[cam_ids]
        return torch.cat([global_.unsqueeze(1), patches], dim=1)
