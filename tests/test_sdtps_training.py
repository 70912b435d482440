"""SDTPS/DGAF inside the full training pipeline: CLI gate initialisation and gradient flow."""
import os

import pytest
import torch
import yaml

import train_net
from config import build_cfg, cfg_from_args, default_argument_parser
from data.build import build_data
from engine.trainer import Trainer
from modeling.model import build_model

SDTPS_DGAF = ["MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "dgaf", "MODEL.DGAF.NUM_HEADS", "4",
              "TEST.FEAT", "concat"]


def test_init_flags_reach_gate_parameters_and_config_yaml(tiny_opts):
    argv = ["--init_scale", "0.3", "--init_bias", "0.7"] + list(tiny_opts) + SDTPS_DGAF + [
        "SOLVER.MAX_EPOCHS", "1"]
    cfg = cfg_from_args(default_argument_parser().parse_args(argv))
    model = build_model(cfg, num_classes=5, num_cams=4)
    assert torch.allclose(model.sdtps.gate_scale, torch.full_like(model.sdtps.gate_scale, 0.3))
    assert torch.allclose(model.sdtps.gate_bias, torch.full_like(model.sdtps.gate_bias, 0.7))

    train_net.main(argv)
    out = tiny_opts[tiny_opts.index("OUTPUT_DIR") + 1]
    dumped = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert dumped["MODEL"]["SDTPS"]["GATE_INIT_SCALE"] == pytest.approx(0.3)
    assert dumped["MODEL"]["SDTPS"]["GATE_INIT_BIAS"] == pytest.approx(0.7)
    reloaded = build_cfg(os.path.join(out, "config.yaml"))
    assert reloaded.MODEL.SDTPS.GATE_INIT_SCALE == pytest.approx(0.3)


@pytest.mark.parametrize("extra", [[], ["MODEL.SDTPS.GATE_NORM", "True", "MODEL.SDTPS.RENORM_ATTN", "True",
                                        "MODEL.SDTPS.SCORE_COMBINE", "learned"]])
def test_one_training_step_gives_every_sdtps_and_dgaf_parameter_a_gradient(tiny_cfg, extra):
    cfg = tiny_cfg(*(SDTPS_DGAF + extra))
    data = build_data(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, data.num_classes, data.num_cams)
    trainer = Trainer(cfg, model, data, torch.device("cpu"))
    trainer._seed_epoch(0)
    batch = next(iter(data.train_loader))
    before = {n: p.detach().clone() for n, p in model.sdtps.named_parameters()}
    result = trainer.train_step(batch)  # backward and one optimizer step
    assert result["finite"]
    for prefix, module in (("sdtps", model.sdtps), ("dgaf", model.dgaf)):
        for name, param in module.named_parameters():
            assert param.grad is not None, f"{prefix}.{name} has no gradient"
            if name in ("gate_scale", "gate_bias"):  # every pair and every head of the gate
                assert bool((param.grad != 0).all()), f"{prefix}.{name}: {param.grad}"
            else:
                assert float(param.grad.abs().sum()) > 0, f"{prefix}.{name} has a zero gradient"
    moved = [n for n, p in model.sdtps.named_parameters() if not torch.equal(p, before[n])]
    assert "gate_scale" in moved and "gate_bias" in moved
