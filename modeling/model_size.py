"""Parameter and FLOP counts of a configured model.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` for one tri-modal sample
(3 images at ``INPUT.SIZE_TEST``) in eval mode, on the meta device (no weights, no arithmetic:
the counts are those of a real run). The counter reports 2 FLOPs per multiply-add; DeMo's
published "FLOPs" are fvcore counts, i.e. multiply-adds (MACs), so both are returned.
Attention is forced onto PyTorch's math kernel while counting, because the fused CPU attention
kernels are invisible to the counter.
"""
from typing import Dict

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from modeling.model import build_model

def count_parameters(model: torch.nn.Module) -> Dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def module_parameters(model: torch.nn.Module) -> Dict[str, int]:
    """Parameters per top-level component (backbone, pife, hdm, atmoe, sdtps, dgaf, heads)."""
    return {name: sum(p.numel() for p in child.parameters())
            for name, child in model.named_children()}


def build_on_meta(cfg, num_classes: int, num_cams: int) -> torch.nn.Module:
    """The configured model on the meta device, without pretrained weights."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.PRETRAIN_PATH = ""
    with torch.device("meta"):
        return build_model(cfg, num_classes, num_cams).eval()


def count_flops(model: torch.nn.Module, size) -> int:
    """Forward FLOPs (2 per multiply-add) of one tri-modal sample of ``size`` (H, W)."""
    device = next(model.parameters()).device
    images = torch.zeros(1, 3, 3, int(size[0]), int(size[1]), device=device)
    cams = torch.zeros(1, dtype=torch.long, device=device)
    # The counter's module tracker fails ("Expected gradient function to be set") on a module
    # called with a parameter as argument (DGAF's pooling query) under no_grad, so the parameters
    # stop requiring gradients while counting (restored afterwards).
    requires = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.forward_features(images, cams)
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
    return counter.get_total_flops()
