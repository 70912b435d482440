"""End-to-end CPU runs of train_net.py / test_net.py on the tiny synthetic dataset."""
import json
import os

import pytest
import torch

import test_net
import train_net
from engine.hooks import HookBase


def _weights(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_then_test_net_reproduces_map(tiny_opts):
    summary = train_net.main(list(tiny_opts))
    out = tiny_opts[tiny_opts.index("OUTPUT_DIR") + 1]
    for name in ("config.yaml", "log.txt", "summary.json", "model_best.pth", "checkpoint_epoch2.pth"):
        assert os.path.isfile(os.path.join(out, name)), name
    trained_map = summary["last"]["results"]["test"]["mAP"]
    results = test_net.main(list(tiny_opts) + ["TEST.WEIGHT", os.path.join(out, "checkpoint_epoch2.pth")])
    assert abs(results["none"]["mAP"] - trained_map) < 1e-6
    assert json.load(open(os.path.join(out, "summary.json")))["best"]["split"] == "test"


def test_interrupted_run_resumes_to_identical_weights(tiny_opts):
    out = tiny_opts[tiny_opts.index("OUTPUT_DIR") + 1]
    train_net.main(list(tiny_opts) + ["OUTPUT_DIR", out + "_straight"])
    reference = _weights(os.path.join(out + "_straight", "checkpoint_epoch2.pth"))

    # Interrupt in the middle of the second epoch, as SIGTERM would.
    class StopMidEpoch(HookBase):
        def after_step(self):
            if (self.trainer.epoch, self.trainer.iter) == (1, 1):
                self.trainer.stop_requested = True

    with pytest.raises(SystemExit, match="resume"):
        train_net.main(list(tiny_opts), hooks=[StopMidEpoch()])
    interrupted = torch.load(os.path.join(out, "checkpoint_epoch1.pth"), weights_only=True)
    assert (interrupted["epoch"], interrupted["iteration"]) == (1, 2)

    train_net.main(["--resume"] + list(tiny_opts))
    _assert_same_weights(_weights(os.path.join(out, "checkpoint_epoch2.pth")), reference)


def test_validation_split_selects_best(tiny_opts):
    summary = train_net.main(list(tiny_opts) + ["DATASETS.VAL_IDS", "2", "SOLVER.IMS_PER_BATCH", "4"])
    assert summary["best"]["split"] == "val"
    assert set(summary["last"]["results"]) == {"val", "test"}


def test_test_net_without_weight_fails_clearly(tiny_opts):
    with pytest.raises(ValueError, match="TEST.WEIGHT"):
        test_net.main(list(tiny_opts))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        test_net.main(list(tiny_opts) + ["TEST.WEIGHT", "nope.pth"])


def test_epoch_line_gives_the_mean_loss_lr_and_eta(tiny_opts):
    """After each epoch: the mean of that epoch's step losses (LOG_PERIOD 1 logs every step), the
    accuracy, the learning rate and the run's ETA (catches the last step's loss reported as the
    mean, or a mean over the whole run)."""
    import re

    train_net.main(list(tiny_opts))
    log = open(os.path.join(tiny_opts[tiny_opts.index("OUTPUT_DIR") + 1], "log.txt")).read()
    for epoch in (1, 2):
        steps = [float(x) for x in re.findall(rf"epoch {epoch} iter \d+/\d+  loss ([\d.]+)", log)]
        line = re.search(rf"epoch {epoch}/2 done in [\d.]+ s: mean loss ([\d.]+), acc ([\d.]+), "
                         rf"lr ([\d.e+-]+); ETA (.*)", log)
        assert line and steps
        assert abs(float(line.group(1)) - sum(steps) / len(steps)) < 1e-3
        eta = line.group(4).strip()
        assert eta == "done" if epoch == 2 else re.fullmatch(r"\d+ s|\d+ min \d\d s", eta), eta
