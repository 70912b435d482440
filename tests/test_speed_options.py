"""Model speed options: torch.compile (MODEL.COMPILE) and the fused optimizer on CUDA."""
import pytest
import torch

from data.build import build_data
from engine.trainer import Trainer
from modeling.model import build_model
from solver.build import build_optimizer
from utils.seed import seed_everything


def _one_step(cfg):
    """(loss, weights after the step) of one training step from seed 0 on the first batch."""
    data = build_data(cfg)
    seed_everything(0)
    model = build_model(cfg, data.num_classes, data.num_cams)
    trainer = Trainer(cfg, model, data, torch.device("cpu"))
    trainer._seed_epoch(0)
    batch = next(iter(data.train_loader))
    seed_everything(1)  # the same drop-path draws in both runs
    result = trainer.train_step(batch)
    return float(result["loss"]), {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_compiled_training_step_equals_eager(tiny_cfg):
    """MODEL.COMPILE default trains the compiled module and updates the eager one's weights (the
    ones checkpointed): the loss and the updated weights equal eager mode's within float
    tolerance (catches the compiled copy training weights that are never saved, or a different
    objective). Slow: about 45 s of compilation on 2 CPU cores."""
    # SGD: the update is proportional to the gradient (Adam's first step is lr x sign(gradient),
    # which flips on float noise where a gradient is ~0)
    opts = ("MODEL.DROP_PATH", "0.0", "SOLVER.OPTIMIZER", "SGD")
    eager_loss, eager_weights = _one_step(tiny_cfg(*opts))
    loss, weights = _one_step(tiny_cfg(*opts, "MODEL.COMPILE", "default"))
    assert loss == pytest.approx(eager_loss, rel=1e-4)
    for key, value in eager_weights.items():
        if value.is_floating_point():
            assert torch.allclose(weights[key], value, rtol=1e-4, atol=1e-6), key


def test_optimizer_fused_only_on_cuda(tiny_cfg):
    cfg = tiny_cfg()
    model = build_model(cfg, 4, 4)
    assert not build_optimizer(cfg, model).defaults.get("fused")
    if torch.cuda.is_available():
        assert build_optimizer(cfg, model.cuda()).defaults.get("fused") is True
