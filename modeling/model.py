"""The tri-modal ReID model: shared ViT backbone, optional DeMo modules and SDTPS/DGAF, BNNeck heads.

Data flow for a batch of B triplets (modality order RGB, NI, TI), C = backbone output width:

    images (B, 3, 3, H, W) --backbone (one pass over 3B images)--> tokens (B, 3, 1+N, C)
    globals g = tokens[:, :, 0] (B, 3, C);   patches P = tokens[:, :, 1:] (B, 3, N, C)
    ori:    PIFE(g, P) if MODEL.PIFE else g           -> head "ori" on (B, 3C)  (MODEL.DIRECT)
                                                         or heads "ori_rgb/ori_ni/ori_ti" on (B, C)
    HDM:    seven decoupled features (B, 7, C)        -> head "hdm" on (B, 7C)  (without ATMoE)
    ATMoE:  mixture of experts over HDM's features    -> head "moe" on (B, 7C)
    SDTPS:  top-K patches per modality: keep mask and straight-through weights (B, 3, N)
            DGAF(P, weights) or mean over kept        -> head "fused" on (B, 3C)
    DGAF without SDTPS fuses all patches (weights all 1).

Every head is a BNNeck trained with ID + triplet losses; the loss weight of "fused" is
MODEL.SDTPS.LOSS_WEIGHT, the others 1. ``TEST.FEAT`` chooses the retrieval feature (see
:func:`retrieval_feature`).
"""
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from modeling.atmoe import ATMoE
from modeling.backbone import ViTBackbone
from modeling.dgaf import DGAF
from modeling.hdm import HDM
from modeling.heads import BNNeckHead
from modeling.pife import PIFE
from modeling.sdtps import MultiModalSDTPS, weighted_mean

MODALITIES = ("rgb", "ni", "ti")


class MultiModalReID(nn.Module):
    """forward(images (B, 3, 3, H, W), cam_ids (B,)) -> dict with

    * ``heads``: name -> (feat (B, D), feat_bn (B, D), logits (B, num_classes))
    * ``keep_mask`` (B, 3, N) bool and ``sdtps`` (the selection output) when SDTPS is on
    * ``moe_gates`` (B, heads, 7) when ATMoE is on
    """

    def __init__(self, cfg, num_classes: int, num_cams: int):
        super().__init__()
        m = cfg.MODEL
        self.backbone = ViTBackbone(
            m.BACKBONE, cfg.INPUT.SIZE_TRAIN, m.STRIDE_SIZE, num_cams, depth=m.BACKBONE_DEPTH,
            drop_path=m.DROP_PATH, proj_dim=m.PROJ_DIM, sie_camera=m.SIE_CAMERA,
            sie_coe=m.SIE_COE, pretrain_path=m.PRETRAIN_PATH, reg_tokens=m.REG_TOKENS,
            pos_embed_resize=m.POS_EMBED_RESIZE)
        dim = self.backbone.out_dim
        self.direct = m.DIRECT
        heads = {}
        if self.direct:
            heads["ori"] = BNNeckHead(3 * dim, num_classes)
        else:
            for name in MODALITIES:
                heads[f"ori_{name}"] = BNNeckHead(dim, num_classes)
        self.pife = PIFE(dim) if m.PIFE.ENABLED else None
        self.hdm = HDM(dim, m.HDM.NUM_HEADS) if m.HDM.ENABLED else None
        self.atmoe = ATMoE(dim, num_experts=7, heads=m.ATMOE.HEADS) if m.ATMOE.ENABLED else None
        if self.hdm is not None:
            heads["moe" if self.atmoe is not None else "hdm"] = BNNeckHead(7 * dim, num_classes)
        self.sdtps = None
        self.dgaf = None
        if m.SDTPS.ENABLED:
            s = m.SDTPS
            self.sdtps = MultiModalSDTPS(
                dim, num_heads=s.NUM_HEADS, sparse_ratio=s.SPARSE_RATIO,
                gate_init_scale=s.GATE_INIT_SCALE, gate_init_bias=s.GATE_INIT_BIAS,
                gate_norm=s.GATE_NORM, renorm_attn=s.RENORM_ATTN, score_combine=s.SCORE_COMBINE)
        if m.DGAF.ENABLED:
            self.dgaf = DGAF(dim, num_heads=m.DGAF.NUM_HEADS, tau=m.DGAF.TAU,
                             init_alpha=m.DGAF.INIT_ALPHA)
        if self.sdtps is not None or self.dgaf is not None:
            heads["fused"] = BNNeckHead(3 * dim, num_classes)
        self.heads = nn.ModuleDict(heads)
        self.loss_weights = {name: (m.SDTPS.LOSS_WEIGHT if name == "fused" else 1.0) for name in heads}

    def backbone_tower_parameters(self):
        """Parameters of the ViT tower (not the camera embedding): ``SOLVER.BACKBONE_LR``."""
        return self.backbone.vit.parameters()

    def encode(self, images: torch.Tensor, cam_ids: torch.Tensor) -> torch.Tensor:
        """(B, 3, 3, H, W), (B,) -> tokens (B, 3, 1 + N, C); one backbone pass over 3B images."""
        b = images.shape[0]
        flat = images.transpose(0, 1).reshape(3 * b, *images.shape[2:])
        tokens = self.backbone(flat, cam_ids.repeat(3))
        return tokens.view(3, b, *tokens.shape[1:]).transpose(0, 1)

    def forward(self, images: torch.Tensor, cam_ids: torch.Tensor) -> Dict:
        tokens = self.encode(images, cam_ids)
        globals_, patches = tokens[:, :, 0], tokens[:, :, 1:]
        out: Dict = {}
        ori = self.pife(globals_, patches) if self.pife is not None else globals_
        feats = {}
        if self.direct:
            feats["ori"] = ori.flatten(1)
        else:
            for i, name in enumerate(MODALITIES):
                feats[f"ori_{name}"] = ori[:, i]
        if self.hdm is not None:
            decoupled = self.hdm(ori, patches)
            if self.atmoe is not None:
                feats["moe"], out["moe_gates"] = self.atmoe(decoupled)
            else:
                feats["hdm"] = decoupled.flatten(1)
        if self.sdtps is not None:
            selection = self.sdtps(patches, globals_)
            out["sdtps"] = selection
            out["keep_mask"] = selection.keep_mask
            # The pooling reads every patch; the weights (forward exactly the keep mask) decide which
            # count, and carry the selection's gradient to the scorer (modeling/sdtps.py).
            weights = selection.weights
        else:
            weights = torch.ones(patches.shape[:3], dtype=torch.bool, device=patches.device)
        if self.dgaf is not None:
            feats["fused"] = self.dgaf(patches, weights)
        elif self.sdtps is not None:
            feats["fused"] = weighted_mean(patches, weights).flatten(1)
        out["heads"] = {name: self.heads[name](feat) for name, feat in feats.items()}
        return out


def retrieval_feature(outputs: Dict, feat: str, neck_feat: str, norm: str = "once") -> torch.Tensor:
    """The (B, D) retrieval feature named by ``TEST.FEAT``.

    ``ori``: the original globals (one head, or the three per-modality heads concatenated);
    ``fused``: the SDTPS/DGAF head; ``moe``: the ATMoE head; ``ori+moe``: ori and moe;
    ``concat``: every head the model has (ori, then hdm or moe, then fused).
    ``neck_feat``: "before" or "after" the BNNeck's BN. ``norm`` (``TEST.FEAT_NORM``) for the
    concatenations: "once" joins the raw parts (DeMo; the distance L2-normalises the whole),
    "per_part" L2-normalises each part first, so that no part dominates by its scale.
    """
    heads = outputs["heads"]
    pick = 0 if neck_feat == "before" else 1

    def one(name: str) -> torch.Tensor:
        if name == "ori" and "ori" not in heads:
            return torch.cat([heads[f"ori_{m}"][pick] for m in MODALITIES], dim=1)
        if name not in heads:
            raise KeyError(f"TEST.FEAT needs the '{name}' head, which this model does not have")
        return heads[name][pick]

    if feat not in ("concat", "ori+moe"):
        return one(feat)
    parts = ("ori", "moe") if feat == "ori+moe" else ("ori",) + tuple(
        p for p in ("hdm", "moe", "fused") if p in heads)
    values = [one(p) for p in parts]
    if norm == "per_part":
        values = [F.normalize(v, dim=1) for v in values]
    return torch.cat(values, dim=1)


def build_model(cfg, num_classes: int, num_cams: int) -> MultiModalReID:
    return MultiModalReID(cfg, num_classes, num_cams)
