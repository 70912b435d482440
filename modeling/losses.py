"""Identity and metric losses.

* :class:`CrossEntropyLabelSmooth`: cross entropy with label smoothing epsilon.
* :class:`TripletLoss`: batch-hard triplet loss (hardest positive, hardest negative per anchor)
  on euclidean distances, with a margin or the soft margin log(1 + exp(d_ap - d_an)).
* :class:`ReIDLoss` ("reid"): both, for every BNNeck head of the model.

``LOSS_REGISTRY`` holds the model's objectives, selected by ``MODEL.LOSSES``: each entry is an
nn.Module with ``from_config(cfg, model)`` (the model has its heads and ``loss_weights`` by
then) and ``forward(outputs, pids) -> {name: scalar}``; the objective is the sum over all of them.
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.registry import Registry

LOSS_REGISTRY = Registry("loss")


class CrossEntropyLabelSmooth(nn.Module):
    """forward(logits (B, C), targets (B,)) -> scalar."""

    def __init__(self, epsilon: float = 0.1):
        super().__init__()
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.epsilon)


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise euclidean distance (M, D) x (N, D) -> (M, N), clamped for a stable sqrt."""
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * x @ y.t()
    return d2.clamp_min(1e-12).sqrt()


class TripletLoss(nn.Module):
    """Batch-hard triplet loss. forward(feat (B, D), targets (B,)) -> scalar."""

    def __init__(self, margin: float = 0.3, soft_margin: bool = True):
        super().__init__()
        self.margin = margin
        self.soft_margin = soft_margin

    def forward(self, feat: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dist = euclidean_dist(feat.float(), feat.float())
        same = targets.unsqueeze(0) == targets.unsqueeze(1)
        d_ap = dist.masked_fill(~same, float("-inf")).max(dim=1).values
        d_an = dist.masked_fill(same, float("inf")).min(dim=1).values
        # anchors without a negative in the batch contribute nothing; masks, not indexing, so
        # that nothing waits for the device
        valid = torch.isfinite(d_an)
        diff = torch.where(valid, d_ap - d_an.masked_fill(~valid, 0.0), 0.0)
        per_anchor = F.softplus(diff) if self.soft_margin else F.relu(diff + self.margin)
        some = (per_anchor * valid).sum() / valid.sum().clamp_min(1)
        return torch.where(valid.all(), per_anchor.mean(), some)  # the plain mean when all count


@LOSS_REGISTRY.register("reid")
class ReIDLoss(nn.Module):
    """ID + triplet loss of each BNNeck head: ``w_head x ID_LOSS_WEIGHT x CE`` and
    ``w_head x TRIPLET_LOSS_WEIGHT x batch-hard triplet``.

    forward(outputs with ``heads`` {name: HeadOutput}, pids (B,)) ->
    {"<head>/id": scalar, "<head>/triplet": scalar}. ``head_weights``: {head: w}, 1 if absent.
    """

    def __init__(self, id_weight: float = 1.0, triplet_weight: float = 1.0,
                 label_smooth: float = 0.1, margin: float = 0.3, soft_margin: bool = True,
                 head_weights: Optional[Dict[str, float]] = None):
        super().__init__()
        self.id_weight = id_weight
        self.triplet_weight = triplet_weight
        self.head_weights = dict(head_weights or {})
        self.id_loss = CrossEntropyLabelSmooth(label_smooth)
        self.triplet_loss = TripletLoss(margin, soft_margin)

    @classmethod
    def from_config(cls, cfg, model) -> "ReIDLoss":
        m = cfg.MODEL
        return cls(m.ID_LOSS_WEIGHT, m.TRIPLET_LOSS_WEIGHT, m.LABEL_SMOOTH, m.TRIPLET_MARGIN,
                   m.TRIPLET_SOFT_MARGIN, model.loss_weights)

    def forward(self, outputs: Dict, pids: torch.Tensor) -> Dict[str, torch.Tensor]:
        losses = {}
        for name, head in outputs["heads"].items():
            w = self.head_weights.get(name, 1.0)
            losses[f"{name}/id"] = w * (self.id_weight * self.id_loss(head.logits, pids))
            losses[f"{name}/triplet"] = w * (self.triplet_weight * self.triplet_loss(head.feat, pids))
        return losses
