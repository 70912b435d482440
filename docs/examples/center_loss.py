"""Worked example (docs/extending.md): a loss, the center loss on the "ori" head's feature.

    IMPORTS: [docs/examples/center_loss.py]
    MODEL:
      LOSSES: [reid, center]
"""
from typing import Dict

import torch
import torch.nn as nn

from modeling.losses import LOSS_REGISTRY


@LOSS_REGISTRY.register("center")
class CenterLoss(nn.Module):
    """forward(outputs, pids (B,)) -> {"ori/center": weight x mean ||feat - center[pid]||^2}.

    The centers (num_classes, D) are parameters of the model (``objectives.center.centers``), so
    the optimizer trains them with the rest."""

    def __init__(self, num_classes: int, dim: int, weight: float = 5e-4, head: str = "ori"):
        super().__init__()
        self.weight, self.head = weight, head
        self.centers = nn.Parameter(torch.zeros(num_classes, dim))

    @classmethod
    def from_config(cls, cfg, model) -> "CenterLoss":  # noqa: ARG003 - registry interface
        head = model.heads["ori"]
        return cls(head.classifier.out_features, head.bn.num_features)

    def forward(self, outputs: Dict, pids: torch.Tensor) -> Dict[str, torch.Tensor]:
        feat = outputs["heads"][self.head].feat.float()
        distance = (feat - self.centers[pids]).pow(2).sum(dim=1)
        return {f"{self.head}/center": self.weight * distance.mean()}
