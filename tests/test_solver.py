"""Learning-rate schedule and parameter groups (DeMo's recipe and this project's options).

The expected values are computed here by hand from DeMo's recipe (shared/reference/published.md):
warm-up from the absolute 3.5e-5 over t = 1..9, cosine over t / 50 down to the absolute 3.5e-7,
each epoch times (1 + n) with n ~ N(0, 1) seeded 42 + t and redrawn until |n| < 0.67, and epoch
50 at 3.5e-7 without noise.
"""
import csv
import io
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import train_net
from config import build_cfg
from modeling.model import build_model
from solver.build import build_optimizer, build_scheduler, set_epoch_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_noise(t: int) -> float:
    g = torch.Generator()
    g.manual_seed(42 + t)
    while True:
        n = torch.randn(1, generator=g).item()
        if abs(n) < 0.67:
            return n


def demo_lr(base: float, t: int, epochs: int = 50, warmup: int = 10) -> float:
    """DeMo's lr of a group whose configured rate is ``base`` during epoch t (1-based)."""
    start, floor = 3.5e-5, 3.5e-7
    if t >= epochs:
        return floor
    if t < warmup:
        lr = start + t * (base - start) / warmup
    else:
        lr = floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t / epochs))
    return lr * (1 + demo_noise(t))


def test_lr_schedule_tool_reproduces_demo_on_every_epoch():
    """Catches: warm-up relative to each group, cosine shifted by the warm-up, 0-based epochs,
    no noise, a floor relative to the group, the camera embedding or norm weights at the backbone
    or bias rate, tower biases at 2x."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "lr_schedule.py"),
                           "--config_file", os.path.join(ROOT, "configs", "RGBNT201", "DeMo.yml")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert list(rows[0]) == ["epoch", "param", "lr", "weight_decay"]
    by_param = {}
    for row in rows:
        by_param.setdefault(row["param"], {})[int(row["epoch"])] = float(row["lr"])
        assert float(row["weight_decay"]) == pytest.approx(1e-4)
    expected_base = {
        "backbone.vit.blocks.0.attn.qkv.weight": 5e-6,  # CLIP tower
        "backbone.vit.blocks.11.attn.qkv.bias": 5e-6,  # tower bias: the tower's rate wins
        "backbone.vit.norm.weight": 5e-6,  # ln_post
        "backbone.vit.head.weight": 5e-6,  # the 768 -> 512 projection
        "backbone.cam_embed": 3.5e-4,  # camera embedding: not in the tower
        "heads.ori.bn.weight": 3.5e-4,  # a norm weight is not a bias
        "heads.moe.classifier.weight": 3.5e-4,
        "pife.reduce.0.1.bias": 7e-4,  # biases outside the tower: 2x
        "hdm.attn.0.in_proj_bias": 7e-4,  # "bias" in the name
    }
    for name, base in expected_base.items():
        assert name in by_param, f"{name} missing from the CSV"
        assert sorted(by_param[name]) == list(range(1, 51))
        for t in range(1, 51):
            assert by_param[name][t] == pytest.approx(demo_lr(base, t), rel=1e-6), (name, t)
    trainable = sum(1 for p in by_param)
    assert len(rows) == 50 * trainable
    # the reference's worked example: epoch 1 runs the backbone at 1.125e-5, the heads at 2.34e-5
    assert by_param["backbone.vit.cls_token"][1] == pytest.approx(1.125e-5, rel=1e-3)
    assert by_param["heads.ori.classifier.weight"][1] == pytest.approx(2.34e-5, rel=1e-3)


def test_relative_schedule_options(tiny_cfg):
    """SCHEDULE_RELATIVE + WARMUP_PREFIX + SCHEDULE_START 0 without noise is the earlier schedule
    (the quick start's): the first epoch at WARMUP_FACTOR x each group's own lr, linear warm-up,
    then a cosine over the remaining epochs towards MIN_LR_FACTOR x the group's lr (catches
    lr_scale ignored, the prefix dropped, or the start position ignored)."""
    cfg = tiny_cfg("SOLVER.SCHEDULE_RELATIVE", "True", "SOLVER.WARMUP_PREFIX", "True",
                   "SOLVER.SCHEDULE_START", "0", "SOLVER.LR_NOISE", "0.0", "SOLVER.MAX_EPOCHS", "10",
                   "SOLVER.WARMUP_EPOCHS", "4", "SOLVER.WARMUP_FACTOR", "0.01",
                   "SOLVER.MIN_LR_FACTOR", "0.002")
    model = build_model(cfg, num_classes=5, num_cams=4)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt)
    name_lr = {"backbone.vit.blocks.0.attn.qkv.weight": cfg.SOLVER.BACKBONE_LR,
               "heads.ori.classifier.weight": cfg.SOLVER.BASE_LR}
    groups = {g["name"]: g for g in opt.param_groups}
    for epoch in range(10):
        set_epoch_lr(sched, epoch, cfg.SOLVER.SCHEDULE_START)
        if epoch < 4:
            factor = 0.01 + epoch * (1 - 0.01) / 4
        else:
            factor = 0.002 + 0.5 * (1 - 0.002) * (1 + math.cos(math.pi * (epoch - 4) / 6))
        for name, base in name_lr.items():
            assert groups[name]["lr"] == pytest.approx(base * factor, rel=1e-9), (name, epoch)


@pytest.mark.parametrize("rule", ["demo", "ndim"])
def test_param_groups(tiny_cfg, rule):
    """demo: tower (biases too) at BACKBONE_LR, "bias" names elsewhere 2x, the rest (norms, the
    camera embedding) BASE_LR; ndim: every 1-d parameter is a bias, in the tower too."""
    cfg = tiny_cfg("SOLVER.PARAM_GROUPS", rule, "MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "mean",
                   "SOLVER.WEIGHT_DECAY_BIAS", "0.0")
    model = build_model(cfg, num_classes=5, num_cams=4)
    opt = build_optimizer(cfg, model)
    g = {group["name"]: group for group in opt.param_groups}
    s = cfg.SOLVER
    bias_factor = s.BIAS_LR_FACTOR
    assert g["backbone.vit.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(s.BACKBONE_LR)
    assert g["backbone.cam_embed"]["lr"] == pytest.approx(s.BASE_LR)
    assert g["heads.ori.classifier.weight"]["lr"] == pytest.approx(s.BASE_LR)
    tower_bias = g["backbone.vit.blocks.0.attn.qkv.bias"]
    norm = g["heads.ori.bn.weight"]
    gate_scale = g["sdtps.gate_scale"]  # (9, H): 2-d, and not named bias
    q_bias = g["sdtps.q_bias"]  # (9, C): named bias, but 2-d
    if rule == "demo":
        assert q_bias["lr"] == pytest.approx(s.BASE_LR * bias_factor) and q_bias["weight_decay"] == 0.0
        assert tower_bias["lr"] == pytest.approx(s.BACKBONE_LR)
        assert tower_bias["weight_decay"] == 0.0  # DeMo's bias decay follows the name everywhere
        assert norm["lr"] == pytest.approx(s.BASE_LR) and norm["weight_decay"] == s.WEIGHT_DECAY
    else:
        assert q_bias["lr"] == pytest.approx(s.BASE_LR) and q_bias["weight_decay"] == s.WEIGHT_DECAY
        assert tower_bias["lr"] == pytest.approx(s.BACKBONE_LR * bias_factor)
        assert norm["lr"] == pytest.approx(s.BASE_LR * bias_factor) and norm["weight_decay"] == 0.0
    assert gate_scale["lr"] == pytest.approx(s.BASE_LR)
    assert sum(len(group["params"]) for group in opt.param_groups) == len(
        [p for p in model.parameters() if p.requires_grad])
    assert isinstance(opt, torch.optim.Adam)


def test_training_runs_the_tools_learning_rates(tiny_opts):
    """The lr a short CPU run logs for each epoch equals tools/lr_schedule.py's for the same config
    (catches stepping after instead of before the epoch, or a second schedule in the trainer)."""
    from tools.lr_schedule import schedule_rows

    opts = list(tiny_opts) + ["SOLVER.MAX_EPOCHS", "3", "SOLVER.WARMUP_EPOCHS", "2",
                              "SOLVER.EVAL_PERIOD", "3", "MODEL.SELECTION.NAME", "sdtps",
                              "MODEL.FUSION.NAME", "mean"]
    train_net.main(opts)
    out = opts[opts.index("OUTPUT_DIR") + 1]
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    logged = {}
    for epoch, text in re.findall(r"epoch (\d+) lr: (.*)", log):
        logged[int(epoch)] = {k: float(v) for k, v in (item.split() for item in text.split(", "))}
    assert sorted(logged) == [1, 2, 3]
    cfg = build_cfg("", opts)
    expected = {}
    for epoch, _, kind, lr, _ in schedule_rows(cfg):
        expected.setdefault(epoch, {}).setdefault(kind, lr)
    assert set(expected[1]) == {"backbone", "base", "bias"}
    for epoch in (1, 2, 3):
        assert logged[epoch].keys() == expected[epoch].keys()
        for kind, lr in expected[epoch].items():
            assert logged[epoch][kind] == pytest.approx(lr, rel=1e-6), (epoch, kind)
    assert logged[1]["base"] != pytest.approx(logged[2]["base"])
