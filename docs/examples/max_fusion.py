"""Worked example (docs/extending.md): a fusion module, each modality's max over its kept patches.

    IMPORTS: [docs/examples/max_fusion.py]
    MODEL:
      FUSION:
        NAME: max
"""
import torch
import torch.nn as nn

from modeling.registry import FUSION_REGISTRY


@FUSION_REGISTRY.register("max")
class MaxFusion(nn.Module):
    """forward(patches (B, 3, N, C), weights (B, 3, N)) -> (B, 3C): per modality the channel-wise
    max over the patches with a non-zero weight, concatenated. Multiplying by the weights (exactly
    1 on kept patches under SDTPS) passes the selection's straight-through gradient on."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = 3 * dim  # the "fused" head's input width

    @classmethod
    def from_config(cls, cfg, dim: int) -> "MaxFusion":  # noqa: ARG003 - registry interface
        return cls(dim)

    def forward(self, patches: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w = weights.to(patches.dtype).unsqueeze(-1)  # (B, 3, N, 1)
        masked = (patches * w).masked_fill(w == 0, float("-inf"))
        return masked.amax(dim=2).flatten(1)
