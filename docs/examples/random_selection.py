"""Worked example (docs/extending.md): a token-selection module keeping K random patches per
modality, the control an informed selection must beat (K as SDTPS's, MODEL.SDTPS.SPARSE_RATIO).

    IMPORTS: [docs/examples/random_selection.py]
    MODEL:
      SELECTION:
        NAME: random
      FUSION:
        NAME: mean
"""
from typing import NamedTuple

import torch
import torch.nn as nn

from modeling.registry import SELECTION_REGISTRY


class RandomSelectionOutput(NamedTuple):
    keep_mask: torch.Tensor  # (B, 3, N) bool, K True per row
    weights: torch.Tensor  # (B, 3, N) float, the keep mask as 0/1


@SELECTION_REGISTRY.register("random")
class RandomSelection(nn.Module):
    """forward(patches (B, 3, N, C), globals (B, 3, C)) -> RandomSelectionOutput. No parameters;
    draws from torch's global generator (seeded per epoch by the trainer)."""

    def __init__(self, ratio: float = 0.5):
        super().__init__()
        self.ratio = ratio

    @classmethod
    def from_config(cls, cfg, dim: int) -> "RandomSelection":  # noqa: ARG003
        return cls(cfg.MODEL.SDTPS.SPARSE_RATIO)

    @staticmethod
    def check_config(cfg) -> None:
        if not 0.0 < cfg.MODEL.SDTPS.SPARSE_RATIO <= 1.0:
            raise ValueError("MODEL.SDTPS.SPARSE_RATIO must be in (0, 1] for the random selection")

    def forward(self, patches: torch.Tensor, globals_: torch.Tensor) -> RandomSelectionOutput:
        b, m, n, _ = patches.shape
        k = max(1, int(round(self.ratio * n)))
        order = torch.rand(b, m, n, device=patches.device).argsort(dim=-1)
        keep = torch.zeros(b, m, n, dtype=torch.bool, device=patches.device)
        keep.scatter_(-1, order[..., :k], True)
        return RandomSelectionOutput(keep, keep.to(patches.dtype))

    def diagnostics(self, output: RandomSelectionOutput):
        """(scalars, histograms) the trainer logs: here the kept share."""
        return {"random/kept_share": output.keep_mask.float().mean()}, {}
