"""The tri-modal ReID model: shared backbone, optional DeMo modules, token selection and fusion,
BNNeck heads, and its own training objective.

Data flow for a batch of B triplets (modality order RGB, NI, TI), C = backbone output width:

    images (B, 3, 3, H, W) --backbone (one pass over 3B images)--> tokens (B, 3, 1+N, C)
    globals g = tokens[:, :, 0] (B, 3, C);   patches P = tokens[:, :, 1:] (B, 3, N, C)
    ori:    PIFE(g, P) if MODEL.PIFE else g           -> head "ori" on (B, 3C)  (MODEL.DIRECT)
                                                         or heads "ori_rgb/ori_ni/ori_ti" on (B, C)
    HDM:    seven decoupled features (B, 7, C)        -> head "hdm" on (B, 7C)  (without ATMoE)
    ATMoE:  mixture of experts over HDM's features    -> head "moe" on (B, 7C)
    selection (MODEL.SELECTION.NAME, e.g. sdtps): pooling weights (B, 3, N), 0 = dropped
    fusion (MODEL.FUSION.NAME, e.g. mean, dgaf): fusion(P, weights) -> head "fused"
    (without a selection the fusion reads every patch, weights all 1).

Every head is a BNNeck; the objective is the sum of the losses of MODEL.LOSSES (by default "reid":
ID + triplet on every head, the loss weight of "fused" MODEL.FUSION.LOSS_WEIGHT, the others 1). ``TEST.FEAT`` chooses the retrieval feature
(``modeling.heads.RETRIEVAL_FEATURES``).
"""
from typing import Dict, Tuple

import torch
import torch.nn as nn

# The built-in parts register themselves on import.
import modeling.backbone  # noqa: F401
import modeling.dgaf  # noqa: F401
import modeling.fusion  # noqa: F401
import modeling.sdtps  # noqa: F401
from modeling.atmoe import ATMoE
from modeling.hdm import HDM
from modeling.heads import MODALITIES, BNNeckHead, HeadOutput
from modeling.losses import LOSS_REGISTRY
from modeling.pife import PIFE
from modeling.registry import BACKBONE_REGISTRY, FUSION_REGISTRY, SELECTION_REGISTRY, build_part


def head_names(cfg) -> Tuple[str, ...]:
    """The BNNeck heads a model built from ``cfg`` has, in order."""
    m = cfg.MODEL
    names = ["ori"] if m.DIRECT else [f"ori_{name}" for name in MODALITIES]
    if m.HDM.ENABLED:
        names.append("moe" if m.ATMOE.ENABLED else "hdm")
    if m.FUSION.NAME != "none":
        names.append("fused")
    return tuple(names)


class MultiModalReID(nn.Module):
    """forward(batch) with ``images`` (B, 3, 3, H, W), ``camids`` (B,) and, in training,
    ``pids`` (B,):

    * training: ``{"losses": {name: scalar}, "scalars": {name: 0-d tensor},
      "histograms": {name: tensor}}``; the objective is the sum of the losses;
    * eval: the outputs of :meth:`forward_features`.

    The selection and fusion modules are children named after their registry entry (``sdtps``,
    ``dgaf``, ...), so checkpoints name their parameters ``sdtps.*``, ``dgaf.*``.
    """

    def __init__(self, cfg, num_classes: int, num_cams: int):
        super().__init__()
        m = cfg.MODEL
        self.backbone = build_part(BACKBONE_REGISTRY, m.BACKBONE_TYPE, cfg, num_cams)
        dim = self.backbone.out_dim
        self.direct = m.DIRECT
        names = head_names(cfg)
        # Created in this order (ori heads, DeMo modules, hdm/moe head, selection, fusion, fused
        # head), so that a seed gives the same initial weights as earlier versions.
        heads = {name: BNNeckHead(3 * dim if name == "ori" else dim, num_classes)
                 for name in names if name.startswith("ori")}
        self.pife = PIFE(dim) if m.PIFE.ENABLED else None
        self.hdm = HDM(dim, m.HDM.NUM_HEADS) if m.HDM.ENABLED else None
        self.atmoe = ATMoE(dim, num_experts=7, heads=m.ATMOE.HEADS) if m.ATMOE.ENABLED else None
        for name in ("hdm", "moe"):
            if name in names:
                heads[name] = BNNeckHead(7 * dim, num_classes)
        self.selection_name = self.fusion_name = None
        if m.SELECTION.NAME != "none":
            self.selection_name = m.SELECTION.NAME
            self.add_module(m.SELECTION.NAME, build_part(SELECTION_REGISTRY, m.SELECTION.NAME, cfg, dim))
        if m.FUSION.NAME != "none":
            self.fusion_name = m.FUSION.NAME
            self.add_module(m.FUSION.NAME, build_part(FUSION_REGISTRY, m.FUSION.NAME, cfg, dim))
            heads["fused"] = BNNeckHead(self.fusion.out_dim, num_classes)
        self.heads = nn.ModuleDict(heads)
        self.loss_weights = {name: (m.FUSION.LOSS_WEIGHT if name == "fused" else 1.0)
                             for name in self.heads}
        objectives = {}
        for name in m.LOSSES:
            objectives[name] = build_part(LOSS_REGISTRY, name, cfg, self)
        self.objectives = nn.ModuleDict(objectives)

    @property
    def selection(self):
        """The token-selection module (``MODEL.SELECTION.NAME``), or None."""
        return getattr(self, self.selection_name) if self.selection_name else None

    @property
    def fusion(self):
        """The fusion module (``MODEL.FUSION.NAME``), or None."""
        return getattr(self, self.fusion_name) if self.fusion_name else None

    def backbone_tower_parameters(self):
        """Parameters of the backbone's tower (not the camera embedding): ``SOLVER.BACKBONE_LR``."""
        tower = getattr(self.backbone, "tower_parameters", None)
        return tower() if tower is not None else self.backbone.parameters()

    def encode(self, images: torch.Tensor, cam_ids: torch.Tensor) -> torch.Tensor:
        """(B, 3, 3, H, W), (B,) -> tokens (B, 3, 1 + N, C); one backbone pass over 3B images."""
        b = images.shape[0]
        flat = images.transpose(0, 1).reshape(3 * b, *images.shape[2:])
        tokens = self.backbone(flat, cam_ids.repeat(3))
        return tokens.view(3, b, *tokens.shape[1:]).transpose(0, 1)

    def forward_features(self, images: torch.Tensor, cam_ids: torch.Tensor) -> Dict:
        """images (B, 3, 3, H, W), cam_ids (B,) -> dict with

        * ``heads``: name -> HeadOutput(feat (B, D), feat_bn (B, D), logits (B, num_classes))
        * ``tokens``: the backbone's tokens (B, 3, 1 + N, C)
        * ``patch_geometry``: (patch size, stride) of the backbone's patch grid
        * ``selection`` (the selection's output) and ``keep_mask`` (B, 3, N) bool with a selection
        * ``moe_gates`` (B, heads, 7) with ATMoE
        """
        tokens = self.encode(images, cam_ids)
        globals_, patches = tokens[:, :, 0], tokens[:, :, 1:]
        out: Dict = {"tokens": tokens,
                     "patch_geometry": (self.backbone.patch_size, self.backbone.stride)}
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
        selection = self.selection
        if selection is not None:
            selected = selection(patches, globals_)
            out["selection"] = selected
            out["keep_mask"] = selected.keep_mask
            # The pooling reads every patch; the weights (forward exactly the keep mask) decide which
            # count, and carry the selection's gradient to the scorer (modeling/sdtps.py).
            weights = selected.weights
        else:
            weights = torch.ones(patches.shape[:3], dtype=torch.bool, device=patches.device)
        if self.fusion is not None:
            feats["fused"] = self.fusion(patches, weights)
        out["heads"] = {name: self.heads[name](feat) for name, feat in feats.items()}
        return out

    def losses(self, outputs: Dict, pids: torch.Tensor) -> Dict:
        """The training objective and what to log of one forward's ``outputs``."""
        heads: Dict[str, HeadOutput] = outputs["heads"]
        first = next(iter(heads.values()))
        scalars = {"acc": (first.logits.detach().argmax(1) == pids).float().mean()}
        histograms = {}
        selection = self.selection
        if "selection" in outputs and hasattr(selection, "diagnostics"):
            more_scalars, more_histograms = selection.diagnostics(outputs["selection"])
            scalars.update(more_scalars)
            histograms.update(more_histograms)
        if "moe_gates" in outputs:
            weights = outputs["moe_gates"].detach().float().mean(dim=(0, 1))
            scalars.update({f"atmoe/expert{e}_weight": w for e, w in enumerate(weights)})
        losses = {}
        for name, objective in self.objectives.items():
            for key, value in objective(outputs, pids).items():
                if key in losses:
                    raise KeyError(f"loss {key!r} of MODEL.LOSSES {name!r} is already given by "
                                   "another loss; name it differently")
                losses[key] = value
        return {"losses": losses, "scalars": scalars,
                "histograms": histograms}

    def forward(self, batch: Dict) -> Dict:
        outputs = self.forward_features(batch["images"], batch["camids"])
        if not self.training:
            return outputs
        return self.losses(outputs, batch["pids"])


def build_model(cfg, num_classes: int, num_cams: int) -> MultiModalReID:
    return MultiModalReID(cfg, num_classes, num_cams)
