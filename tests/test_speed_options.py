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


def test_attention_runs_through_scaled_dot_product_attention(tiny_cfg, monkeypatch):
    """Every attention that pools values (the ViT blocks of the three modalities and HDM's seven
    query attentions) calls ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
    on CUDA) in a training forward. Catches: timm's fused attention switched off (its explicit
    softmax path), HDM asking nn.MultiheadAttention for its weights (need_weights=True takes the
    explicit path)."""
    import torch.nn.functional as F

    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    cfg = tiny_cfg("MODEL.BACKBONE_DEPTH", "2", "MODEL.HDM.ENABLED", "True",
                   "MODEL.ATMOE.ENABLED", "True", "MODEL.HDM.NUM_HEADS", "3")
    data = build_data(cfg)
    model = build_model(cfg, data.num_classes, data.num_cams).train()
    batch = next(iter(data.train_loader))
    model(batch)["losses"]
    # the three modalities go through the backbone as one batch: one call per block; HDM: 7
    assert len(calls) == 2 + 7, [tuple(c) for c in calls]
