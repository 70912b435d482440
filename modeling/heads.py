"""BNNeck heads and the retrieval features built from them.

A head is BatchNorm on a global feature, then a bias-free identity classifier. A retrieval
feature (``TEST.FEAT``) is registered in ``RETRIEVAL_FEATURES`` as a tuple of head parts, joined
in order: a name ending in "?" is used when the model has that head; "ori" is the "ori" head or,
without ``MODEL.DIRECT``, the three per-modality heads ``ori_rgb/ori_ni/ori_ti`` joined.
"""
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.registry import Registry

MODALITIES = ("rgb", "ni", "ti")

RETRIEVAL_FEATURES = Registry("retrieval feature")
RETRIEVAL_FEATURES.register("ori", ("ori",))
RETRIEVAL_FEATURES.register("fused", ("fused",))
RETRIEVAL_FEATURES.register("hdm", ("hdm",))
RETRIEVAL_FEATURES.register("moe", ("moe",))
RETRIEVAL_FEATURES.register("ori+moe", ("ori", "moe"))
RETRIEVAL_FEATURES.register("concat", ("ori", "hdm?", "moe?", "fused?"))

# How to give a model each optional head (for configuration errors).
HEAD_HINTS = {"fused": "set MODEL.FUSION.NAME (mean, dgaf, ...)",
              "hdm": "set MODEL.HDM.ENABLED without MODEL.ATMOE.ENABLED (with ATMoE the head is moe)",
              "moe": "set MODEL.ATMOE.ENABLED"}


class HeadOutput(NamedTuple):
    feat: torch.Tensor  # (B, D) before the BN: the triplet loss's feature
    feat_bn: torch.Tensor  # (B, D) after the BN
    logits: torch.Tensor  # (B, num_classes): the ID loss's input


class BNNeckHead(nn.Module):
    """forward(feat (B, D)) -> HeadOutput(feat, feat_bn, logits).

    ``TEST.NECK_FEAT`` picks ``feat`` ("before") or ``feat_bn`` ("after") for retrieval.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.constant_(self.bn.weight, 1.0)
        nn.init.constant_(self.bn.bias, 0.0)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: torch.Tensor) -> HeadOutput:
        feat_bn = self.bn(feat)
        return HeadOutput(feat, feat_bn, self.classifier(feat_bn))


def _part_heads(part: str, head_names: Sequence[str]) -> Tuple[str, ...]:
    """The heads one part reads, () when an optional part's head is absent."""
    name = part.rstrip("?")
    if name == "ori" and "ori" not in head_names:
        name_tuple = tuple(f"ori_{m}" for m in MODALITIES)
        if all(h in head_names for h in name_tuple):
            return name_tuple
    elif name in head_names:
        return (name,)
    if part.endswith("?"):
        return ()
    hint = HEAD_HINTS.get(name)
    raise KeyError(f"needs the '{name}' head, which this model does not have"
                   + (f": {hint}" if hint else ""))


def feature_parts(feat: str, head_names: Sequence[str]) -> List[Tuple[str, ...]]:
    """The heads of each part of retrieval feature ``feat`` for a model with ``head_names``;
    KeyError (saying how to add the head) when the model lacks one."""
    parts = [_part_heads(p, head_names) for p in RETRIEVAL_FEATURES.get(feat)]
    return [p for p in parts if p]


def retrieval_feature(heads: Dict[str, HeadOutput], feat: str, neck_feat: str,
                      norm: str = "once") -> torch.Tensor:
    """The (B, D) retrieval feature ``feat`` from the heads' outputs.

    ``neck_feat``: "before" or "after" the BNNeck's BN. ``norm`` (``TEST.FEAT_NORM``) for
    features defined by several parts: "once" joins the raw parts (DeMo; the distance L2-normalises the
    whole), "per_part" L2-normalises each part first, so that no part dominates by its scale.
    """
    field = "feat" if neck_feat == "before" else "feat_bn"
    values = [torch.cat([getattr(heads[h], field) for h in part], dim=1)
              for part in feature_parts(feat, tuple(heads))]
    if norm == "per_part" and len(RETRIEVAL_FEATURES.get(feat)) > 1:
        values = [F.normalize(v, dim=1) for v in values]
    return values[0] if len(values) == 1 else torch.cat(values, dim=1)
