"""Resuming mid-epoch restores the random streams: with a training step that draws random numbers.

The tiny test config (one ViT block) has no random draw in its step: timm spreads MODEL.DROP_PATH
linearly over the blocks, so a single block gets rate 0, and the fault-tolerance tests would pass
with the checkpoint's RNG state lost. Here the backbone has two blocks with MODEL.DROP_PATH 0.5
(the second block drops paths), and the augmentation (flip, crop, erasing) draws too, in the
loader or (INPUT.AUG_DEVICE model) in the training step.
"""
import os

import pytest
import torch

import train_net
from config import build_cfg
from conftest import TINY_OPTS
from data.build import build_data
from engine.hooks import HookBase
from modeling.model import build_model

RANDOM_STEP = ["MODEL.BACKBONE_DEPTH", "2", "MODEL.DROP_PATH", "0.5"]
ONE_EPOCH = ["SOLVER.MAX_EPOCHS", "1"]  # of 4 steps


class StopAfter(HookBase):
    """Acts as SIGTERM after iteration ``it`` (1-based) of epoch ``epoch`` (1-based)."""

    def __init__(self, epoch: int, it: int):
        self.at = (epoch, it)

    def after_step(self) -> None:
        if (self.trainer.epoch + 1, self.trainer.iter + 1) == self.at:
            self.trainer.stop_requested = True


def _final_weights(out: str) -> dict:
    return torch.load(os.path.join(out, "checkpoint_epoch1.pth"), map_location="cpu",
                      weights_only=True)["model"]


def test_the_training_step_draws_random_numbers(synthetic_root, tmp_path):
    """Precondition of the resume test below: the model's training forward consumes the global
    RNG (else a lost RNG state could not change the weights)."""
    cfg = build_cfg("", TINY_OPTS + RANDOM_STEP + ["DATASETS.ROOT_DIR", synthetic_root,
                                                   "OUTPUT_DIR", str(tmp_path / "out")])
    data = build_data(cfg)
    model = build_model(cfg, data.num_classes, data.num_cams).train()
    batch = next(iter(data.train_loader))
    before = torch.random.get_rng_state()
    model(batch)
    assert not torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("extra", [[], ["INPUT.AUG_DEVICE", "model"]],
                         ids=["augment-in-loader", "augment-on-device"])
def test_resume_mid_epoch_gives_the_uninterrupted_weights(synthetic_root, tmp_path, extra):
    """Stopped after step 2 of 4 (the checkpoint holds the RNG states at that step),
    resumed: the same final weights (torch.equal) as a run never stopped. Catches: the RNG state
    not saved or not restored on resume, restored at the wrong batch, the skipped batches
    trained again or not skipped."""
    def opts(name):
        return TINY_OPTS + RANDOM_STEP + ONE_EPOCH + extra + [
            "DATASETS.ROOT_DIR", synthetic_root, "OUTPUT_DIR", str(tmp_path / name)]

    train_net.main(opts("straight"))
    with pytest.raises(SystemExit):
        train_net.main(opts("stopped"), hooks=[StopAfter(1, 2)])
    state = torch.load(os.path.join(tmp_path / "stopped", "checkpoint_epoch0.pth"),
                       map_location="cpu", weights_only=True)
    assert (state["epoch"], state["iteration"]) == (0, 2)  # resumed mid-epoch, not at its start
    train_net.main(["--resume"] + opts("stopped"))
    straight, resumed = _final_weights(str(tmp_path / "straight")), _final_weights(str(tmp_path / "stopped"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
