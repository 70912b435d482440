"""Learning-rate schedule and parameter groups."""
import math

import pytest
import torch

from solver.build import lr_factor


def test_warmup_then_cosine():
    f = [lr_factor(e, 10, 2, 0.01, 0.0) for e in range(10)]
    assert f[0] == pytest.approx(0.01)
    assert f[1] == pytest.approx(0.505)
    assert f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert f[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_param_groups_use_backbone_lr(tiny_cfg):
    from modeling.model import build_model
    from solver.build import build_optimizer

    cfg = tiny_cfg()
    model = build_model(cfg, num_classes=5, num_cams=4)
    opt = build_optimizer(cfg, model)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["backbone.vit.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(cfg.SOLVER.BACKBONE_LR)
    assert by_name["heads.ori.classifier.weight"]["lr"] == pytest.approx(cfg.SOLVER.BASE_LR)
    bias = by_name["backbone.vit.blocks.0.attn.qkv.bias"]
    assert bias["lr"] == pytest.approx(cfg.SOLVER.BACKBONE_LR * cfg.SOLVER.BIAS_LR_FACTOR)
    assert bias["weight_decay"] == pytest.approx(cfg.SOLVER.WEIGHT_DECAY_BIAS)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(
        [p for p in model.parameters() if p.requires_grad])
    assert isinstance(opt, torch.optim.Adam)
