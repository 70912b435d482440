"""Identity and metric losses.

* :class:`CrossEntropyLabelSmooth`: cross entropy with label smoothing epsilon.
* :class:`TripletLoss`: batch-hard triplet loss (hardest positive, hardest negative per anchor)
  on euclidean distances, with a margin or the soft margin log(1 + exp(d_ap - d_an)).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


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
        valid = torch.isfinite(d_an)  # anchors without a negative in the batch contribute nothing
        if not bool(valid.any()):
            return feat.sum() * 0.0
        diff = d_ap[valid] - d_an[valid]
        if self.soft_margin:
            return F.softplus(diff).mean()
        return F.relu(diff + self.margin).mean()
