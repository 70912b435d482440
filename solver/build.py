"""Optimizer and learning-rate schedule from the config.

Parameter groups: backbone parameters use ``SOLVER.BACKBONE_LR``, the rest ``SOLVER.BASE_LR``;
biases (and other 1-d parameters: norms, gate biases) get ``BIAS_LR_FACTOR`` x the lr and
``WEIGHT_DECAY_BIAS``. The schedule is per epoch: linear warm-up from ``WARMUP_FACTOR`` x lr over
``WARMUP_EPOCHS``, then cosine decay to ``MIN_LR_FACTOR`` x lr at ``MAX_EPOCHS``.
"""
import math

import torch


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    s = cfg.SOLVER
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = s.BACKBONE_LR if id(param) in backbone_ids else s.BASE_LR
        weight_decay = s.WEIGHT_DECAY
        if name.endswith(".bias") or param.ndim <= 1:
            lr *= s.BIAS_LR_FACTOR
            weight_decay = s.WEIGHT_DECAY_BIAS
        groups.append({"params": [param], "lr": lr, "weight_decay": weight_decay, "name": name})
    if s.OPTIMIZER == "SGD":
        return torch.optim.SGD(groups, momentum=s.MOMENTUM)
    if s.OPTIMIZER == "AdamW":
        return torch.optim.AdamW(groups)
    return torch.optim.Adam(groups)


def lr_factor(epoch: int, max_epochs: int, warmup_epochs: int, warmup_factor: float,
              min_factor: float) -> float:
    """Multiplier of the base lr during ``epoch`` (0-based)."""
    if epoch < warmup_epochs:
        alpha = epoch / warmup_epochs
        return warmup_factor * (1 - alpha) + alpha
    span = max(1, max_epochs - warmup_epochs)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(cfg, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch LambdaLR (call ``step()`` once at the end of each epoch)."""
    s = cfg.SOLVER
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda epoch: lr_factor(epoch, s.MAX_EPOCHS, s.WARMUP_EPOCHS, s.WARMUP_FACTOR, s.MIN_LR_FACTOR),
    )
