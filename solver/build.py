"""Optimizer and learning-rate schedule from the config.

Parameter groups: one group per trainable parameter tensor, named by ``named_parameters()``,
with a ``kind`` (``backbone``, ``backbone_bias``, ``bias`` or ``base``) that sets its lr and weight
decay (``SOLVER.PARAM_GROUPS``):

* ``demo`` (DeMo's rule): every parameter of the backbone tower (``model.backbone.vit``, biases
  included) ``BACKBONE_LR``; any other parameter whose name contains "bias" ``BASE_LR x
  BIAS_LR_FACTOR`` with ``WEIGHT_DECAY_BIAS``; everything else (norm weights and the camera
  embedding included) ``BASE_LR`` with ``WEIGHT_DECAY``.
* ``ndim``: biases and every other 1-d parameter (norm weights, gate scales) are "biases", in the
  tower too: ``x BIAS_LR_FACTOR`` of their part's lr, with ``WEIGHT_DECAY_BIAS``.

Schedule: timm's ``CosineLRScheduler``, stepped once per epoch BEFORE the epoch, at position
``t = epoch + SCHEDULE_START`` for the 0-based epoch (DeMo's convention is ``SCHEDULE_START 1``:
t is the 1-based epoch number; :func:`set_epoch_lr`). Warm-up from ``WARMUP_FACTOR x BASE_LR``
at t = 0 over ``WARMUP_EPOCHS``, cosine down to ``MIN_LR_FACTOR x BASE_LR``, per-epoch
multiplicative noise ``1 + n`` (``|n| < LR_NOISE``, seeded ``LR_NOISE_SEED + t``). With
``SCHEDULE_RELATIVE`` the warm-up start and the floor scale with each group's own lr (timm's
``lr_scale``); with ``WARMUP_PREFIX`` the cosine starts after the warm-up instead of running over
the whole run.
"""
from typing import Dict, List

import torch
from timm.scheduler import CosineLRScheduler

# Device types whose optimizer is torch's fused implementation (one kernel; a non-finite step is
# skipped inside it through ``found_inf``, with no wait for the device). The CPU keeps torch's
# default (foreach) implementation, which needs no such trick; the tests add "cpu" here to run
# the CUDA path on the CPU.
FUSED_DEVICE_TYPES = {"cuda"}

def _is_bias(rule: str, name: str, param: torch.Tensor) -> bool:
    """DeMo's rule: the name contains "bias"; ndim: a ``.bias`` or any other 1-d parameter."""
    if rule == "demo":
        return "bias" in name
    return name.endswith(".bias") or param.ndim <= 1


def build_param_groups(cfg, model: torch.nn.Module) -> List[Dict]:
    """One optimizer group per trainable parameter: params, lr, weight_decay, name, kind."""
    s = cfg.SOLVER
    tower = {id(p) for p in model.backbone_tower_parameters()}
    lrs = {"backbone": s.BACKBONE_LR, "backbone_bias": s.BACKBONE_LR * s.BIAS_LR_FACTOR,
           "bias": s.BASE_LR * s.BIAS_LR_FACTOR, "base": s.BASE_LR}
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        bias = _is_bias(s.PARAM_GROUPS, name, param)
        if id(param) in tower:  # DeMo: the tower's rate wins over the bias rule
            kind = "backbone_bias" if bias and s.PARAM_GROUPS == "ndim" else "backbone"
        else:
            kind = "bias" if bias else "base"
        groups.append({"params": [param], "lr": lrs[kind], "name": name, "kind": kind,
                       "weight_decay": s.WEIGHT_DECAY_BIAS if bias else s.WEIGHT_DECAY})
    return groups


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    s = cfg.SOLVER
    groups = build_param_groups(cfg, model)
    # On FUSED_DEVICE_TYPES one fused kernel updates every parameter (the same update as the
    # per-tensor loop); elsewhere torch picks its multi-tensor (foreach) implementation.
    params = [p for group in groups for p in group["params"]]
    fused = params and all(p.device.type in FUSED_DEVICE_TYPES for p in params)
    kwargs = {"fused": True} if fused else {}
    if s.OPTIMIZER == "SGD":
        return torch.optim.SGD(groups, momentum=s.MOMENTUM, **kwargs)
    if s.OPTIMIZER == "AdamW":
        return torch.optim.AdamW(groups, **kwargs)
    return torch.optim.Adam(groups, **kwargs)


def build_scheduler(cfg, optimizer: torch.optim.Optimizer) -> CosineLRScheduler:
    """timm's CosineLRScheduler with the config's arguments (see the module docstring).

    For DeMo's recipe (BASE_LR 3.5e-4, 50 epochs, 10 warm-up) this is exactly DeMo's
    ``CosineLRScheduler(t_initial=50, lr_min=3.5e-7, warmup_t=10, warmup_lr_init=3.5e-5,
    cycle_limit=1, noise_range_t=(0, 50), noise_pct=0.67, noise_std=1.0, noise_seed=42)``.
    """
    s = cfg.SOLVER
    if s.SCHEDULE_RELATIVE:  # timm multiplies every scheduled value by the group's lr_scale
        for group in optimizer.param_groups:
            group["lr_scale"] = group["lr"] / s.BASE_LR
            group["lr"] = s.BASE_LR
            group.pop("initial_lr", None)
    # the cosine ends (at the floor) at t = MAX_EPOCHS: DeMo's last epoch; one epoch after the
    # run with SCHEDULE_START 0
    t_initial = s.MAX_EPOCHS - s.WARMUP_EPOCHS if s.WARMUP_PREFIX else s.MAX_EPOCHS
    return CosineLRScheduler(
        optimizer, t_initial=max(1, t_initial), lr_min=s.MIN_LR_FACTOR * s.BASE_LR,
        warmup_t=s.WARMUP_EPOCHS, warmup_lr_init=s.WARMUP_FACTOR * s.BASE_LR,
        warmup_prefix=s.WARMUP_PREFIX, cycle_limit=1, t_in_epochs=True,
        noise_range_t=(0, s.MAX_EPOCHS) if s.LR_NOISE > 0 else None, noise_pct=s.LR_NOISE,
        noise_std=s.LR_NOISE_STD, noise_seed=s.LR_NOISE_SEED)


def set_epoch_lr(scheduler: CosineLRScheduler, epoch: int, start: int) -> None:
    """Set every group's lr for training epoch ``epoch`` (0-based loop index) at schedule position
    ``epoch + start`` (``SOLVER.SCHEDULE_START``; DeMo steps before each epoch numbered from 1).
    A pure function of the epoch, so a resumed run needs no scheduler state."""
    scheduler.step(epoch + start)


def lr_by_kind(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """The lr of each group kind (``backbone``, ``bias``, ...) currently set, first group of each."""
    out: Dict[str, float] = {}
    for group in optimizer.param_groups:
        out.setdefault(group.get("kind", group.get("name", "group")), group["lr"])
    return out
