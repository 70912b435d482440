"""PIFE: Patch-Integrated Feature Extractor (DeMo, AAAI 2025).

The backbone gives, for every modality, a global (CLS) token and a grid of
patch tokens.  PIFE folds the patch information back into the global feature:
for each modality ``m``

    f_m = QuickGELU(Linear_m(LayerNorm_m([cls_m ; mean_n(patch_m,n)])))

with ``LayerNorm(2C)`` and ``Linear(2C -> C)``.  As in DeMo, every modality has
its own (unshared) LayerNorm + Linear; this module simply holds the three of
them, so it adds ``3 * (2*2C + 2C*C + C)`` parameters (1,580,544 for C=512).

This file also hosts the shared :class:`QuickGELU` activation used by the
other DeMo modules (``modeling/hdm.py``, ``modeling/atmoe.py``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QuickGELU", "PIFE"]


class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 * x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class PIFE(nn.Module):
    """Fuse each modality's CLS token with the mean of its patch tokens.

    Args:
        dim: feature dimension ``C`` of the backbone tokens (512 for CLIP
            ViT-B/16 after the visual projection).
        num_modalities: number of modalities ``M`` (3: RGB, NI, TI); each gets
            its own LayerNorm(2C) -> Linear(2C, C) -> QuickGELU branch.

    Shapes:
        cls:     (B, M, C)     global token of every modality
        patches: (B, M, N, C)  patch tokens of every modality
        returns: (B, M, C)     enhanced global feature of every modality
    """

    def __init__(self, dim: int, num_modalities: int = 3) -> None:
        super().__init__()
        self.dim = dim
        self.num_modalities = num_modalities
        self.reduce = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim), QuickGELU())
            for _ in range(num_modalities)
        )

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        if cls.dim() != 3 or patches.dim() != 4:
            raise ValueError(
                f"expected cls (B,M,C) and patches (B,M,N,C), got {tuple(cls.shape)} and {tuple(patches.shape)}"
            )
        if cls.shape[1] != self.num_modalities or patches.shape[1] != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} modalities, got {cls.shape[1]} / {patches.shape[1]}")
        local = patches.mean(dim=2)                      # (B, M, C)
        joint = torch.cat([cls, local], dim=-1)          # (B, M, 2C)
        outs = [branch(joint[:, m]) for m, branch in enumerate(self.reduce)]
        return torch.stack(outs, dim=1)                  # (B, M, C)
