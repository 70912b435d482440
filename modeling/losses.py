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


class ReIDCriterion:
    """The training objective: sum over heads of w_head x (ID_W x CE + TRI_W x triplet).

    __call__(outputs (the model's dict), pids (B,), loss_weights {head: w}) ->
    (total loss, {"<head>/id": float, "<head>/triplet": float}, accuracy of the first head).
    """

    def __init__(self, cfg):
        m = cfg.MODEL
        self.id_weight = m.ID_LOSS_WEIGHT
        self.triplet_weight = m.TRIPLET_LOSS_WEIGHT
        self.id_loss = CrossEntropyLabelSmooth(m.LABEL_SMOOTH)
        self.triplet_loss = TripletLoss(m.TRIPLET_MARGIN, m.TRIPLET_SOFT_MARGIN)

    def __call__(self, outputs, pids: torch.Tensor, loss_weights):
        total, parts, acc = 0.0, {}, None
        for name, (feat, _, logits) in outputs["heads"].items():
            id_loss = self.id_loss(logits, pids)
            tri_loss = self.triplet_loss(feat, pids)
            total = total + loss_weights[name] * (self.id_weight * id_loss + self.triplet_weight * tri_loss)
            parts[f"{name}/id"] = id_loss.item()
            parts[f"{name}/triplet"] = tri_loss.item()
            if acc is None:
                acc = (logits.argmax(1) == pids).float().mean().item()
        return total, parts, acc
