"""Worked example (docs/extending.md): a fusion module, each modality's max over its kept patches,
with an option of its own, MODEL.FUSION.MAX_TEMP, declared by the module (``add_config``).

    IMPORTS: [docs/examples/max_fusion.py]
    MODEL:
      FUSION:
        NAME: max
        MAX_TEMP: 0.5     # optional: a soft max (0, the default: the hard max)
"""
import torch
import torch.nn as nn

from modeling.registry import FUSION_REGISTRY


@FUSION_REGISTRY.register("max")
class MaxFusion(nn.Module):
    """forward(patches (B, 3, N, C), weights (B, 3, N)) -> (B, 3C): per modality the channel-wise
    max over the patches with a non-zero weight (``temp`` > 0: the soft max
    ``temp * logsumexp(x / temp)``), concatenated. Multiplying by the weights (exactly 1 on kept
    patches under SDTPS) passes the selection's straight-through gradient on."""

    def __init__(self, dim: int, temp: float = 0.0):
        super().__init__()
        self.out_dim = 3 * dim  # the "fused" head's input width
        self.temp = temp

    @staticmethod
    def add_config(cfg) -> None:
        """Declare this module's keys with their defaults (before the config file is merged)."""
        # Temperature of the soft max over the kept patches; 0 = the hard max.
        cfg.MODEL.FUSION.MAX_TEMP = 0.0

    @staticmethod
    def check_config(cfg) -> None:
        if cfg.MODEL.FUSION.MAX_TEMP < 0:
            raise ValueError(f"MODEL.FUSION.MAX_TEMP must be >= 0, got {cfg.MODEL.FUSION.MAX_TEMP}")

    @classmethod
    def from_config(cls, cfg, dim: int) -> "MaxFusion":
        return cls(dim, cfg.MODEL.FUSION.MAX_TEMP)

    def forward(self, patches: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w = weights.to(patches.dtype).unsqueeze(-1)  # (B, 3, N, 1)
        masked = (patches * w).masked_fill(w == 0, float("-inf"))
        if self.temp > 0:
            return (self.temp * torch.logsumexp(masked / self.temp, dim=2)).flatten(1)
        return masked.amax(dim=2).flatten(1)
