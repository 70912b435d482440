"""BNNeck head: BatchNorm on a global feature, then a bias-free identity classifier."""
import torch
import torch.nn as nn


class BNNeckHead(nn.Module):
    """forward(feat (B, D)) -> (feat (B, D), feat_bn (B, D), logits (B, num_classes)).

    The triplet loss uses ``feat`` (before BN), the ID loss uses ``logits``; at test time
    ``TEST.NECK_FEAT`` picks ``feat`` ("before") or ``feat_bn`` ("after").
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.constant_(self.bn.weight, 1.0)
        nn.init.constant_(self.bn.bias, 0.0)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: torch.Tensor):
        feat_bn = self.bn(feat)
        return feat, feat_bn, self.classifier(feat_bn)
