"""Fusion of the (selected) patch tokens into the "fused" head's feature: the plain weighted mean.

DGAF (modeling/dgaf.py) is the other registered fusion; see modeling/registry.py for the interface.
"""
import torch
import torch.nn as nn

from modeling.registry import FUSION_REGISTRY


def weighted_mean(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_n w_n t_n / sum_n w_n`` over all N positions.

    With the straight-through selection weights (forward exactly the 0/1 keep mask) this is the
    mean over the kept positions, and every position (dropped ones too) gets the relative
    gradient ``<dL/df, t_n - f> / sum w``.

    Args:
        tokens: (B, M, N, C).
        weights: (B, M, N) non-negative float, or bool (True = kept).
    Returns:
        (B, M, C); a row whose weights are all zero gives zeros.
    """
    weight = weights.to(tokens.dtype)
    total = weight.sum(dim=-1, keepdim=True)  # (B, M, 1)
    summed = torch.einsum("bmn,bmnc->bmc", weight, tokens)
    return summed / torch.where(total > 0, total, torch.ones_like(total))


@FUSION_REGISTRY.register("mean")
class MeanFusion(nn.Module):
    """forward(patches (B, 3, N, C), weights (B, 3, N)) -> (B, 3C): each modality's weighted
    mean (over the kept patches under a selection), concatenated. No parameters."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = 3 * dim

    @classmethod
    def from_config(cls, cfg, dim: int) -> "MeanFusion":  # noqa: ARG003 - registry interface
        return cls(dim)

    def forward(self, patches: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weighted_mean(patches, weights).flatten(1)
