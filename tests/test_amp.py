"""Mixed precision (SOLVER.AMP) and non-finite losses.

* bf16 autocast trains on CPU: finite losses, low-precision logits, weights move;
* fp16 on CPU trains in fp32 with a log line; CUDA's fp16 path (autocast + grad scaler) and its
  fused optimizer run on the CPU when the tests enable them (``cuda_paths_on_cpu``): fp16
  training and evaluation, the scaler's state checkpointed and resumed;
* a non-finite loss skips the step (logged, counted in summary.json) and the run continues;
  SOLVER.MAX_NONFINITE consecutive ones stop the run with NonFiniteLossError, and the last
  checkpoint on disk is untouched and still loads.
"""
import hashlib
import os
import shutil

import pytest
import torch

import train_net
from data.build import build_data
from engine.hooks import HookBase
from engine.trainer import NonFiniteLossError, Trainer
from modeling.model import MultiModalReID, build_model
from utils import checkpoint as ckpt
from utils.logger import setup_logger
from utils.seed import seed_everything


def _out(opts):
    return opts[opts.index("OUTPUT_DIR") + 1]


def _trainer(cfg, device="cpu"):
    setup_logger(cfg.OUTPUT_DIR)
    seed_everything(cfg.SOLVER.SEED)
    data = build_data(cfg)
    model = build_model(cfg, data.num_classes, data.num_cams)
    return Trainer(cfg, model, data, torch.device(device))


class StepRecorder(HookBase):
    """Records (finite, loss, dtype of the "ori" head's logits) of every training step."""

    def __init__(self):
        self.seen, self.dtypes = [], []

    def before_train(self) -> None:
        self.trainer.model.heads["ori"].register_forward_hook(
            lambda module, args, out: self.dtypes.append(out.logits.dtype))

    def after_step(self) -> None:
        result = self.trainer.step_result
        self.seen.append((result["finite"], float(result["loss"]), self.dtypes[-1]))


def test_bf16_trains_on_cpu(tiny_cfg):
    trainer = _trainer(tiny_cfg("SOLVER.AMP", "bf16", "SOLVER.MAX_EPOCHS", "1"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    recorder = StepRecorder()
    trainer.register_hooks([recorder])
    summary = trainer.train()
    seen = recorder.seen
    assert seen and all(finite for finite, _, _ in seen)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss, _ in seen)
    assert {dtype for _, _, dtype in seen} == {torch.bfloat16}  # autocast really ran
    after = trainer.model.state_dict()
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert summary["nonfinite_steps"] == 0
    assert 0.0 <= summary["last"]["results"]["test"]["mAP"] <= 1.0


def test_fp16_on_cpu_trains_in_fp32_with_a_log_line(tiny_cfg):
    """DeMo's configs ask for fp16 (CUDA autocast + grad scaler); on CPU the run goes on in fp32
    and says so (catches autocast left on, the scaler left enabled, or a silent fallback)."""
    cfg = tiny_cfg("SOLVER.AMP", "fp16", "SOLVER.MAX_EPOCHS", "1")
    trainer = _trainer(cfg)
    assert trainer.amp == "off" and not trainer.scaler.is_enabled()
    recorder = StepRecorder()
    trainer.register_hooks([recorder])
    trainer.train()
    dtypes = [dtype for _, _, dtype in recorder.seen]
    assert dtypes and set(dtypes) == {torch.float32}
    with open(os.path.join(cfg.OUTPUT_DIR, "log.txt")) as f:
        assert "SOLVER.AMP fp16 needs CUDA: training in fp32 on cpu" in f.read()


@pytest.fixture
def cuda_paths_on_cpu(monkeypatch):
    """Run CUDA's code paths on the CPU: fp16 autocast with the grad scaler, and the fused
    optimizer (torch 2.14 has CPU kernels for all three); nothing else changes."""
    import engine.evaluator
    import solver.build

    monkeypatch.setattr(engine.evaluator, "FP16_DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(solver.build, "FUSED_DEVICE_TYPES", {"cuda", "cpu"})


def test_fp16_trains_and_evaluates_through_the_cuda_path(tiny_cfg, cuda_paths_on_cpu):
    """SOLVER.AMP fp16 and TEST.AMP fp16 as on CUDA: fp16 logits in training and evaluation, the
    grad scaler enabled, the fused optimizer stepping with the scaler. Catches: autocast not
    entered (fp32 logits), the scaler left disabled, TEST.AMP ignored, the optimizer not fused,
    or a scaler/fused combination that never applies an update."""
    cfg = tiny_cfg("SOLVER.AMP", "fp16", "TEST.AMP", "fp16", "SOLVER.MAX_EPOCHS", "1")
    trainer = _trainer(cfg)
    assert trainer.amp == "fp16" and trainer.scaler.is_enabled() and trainer.skips_on_device
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    recorder = StepRecorder()
    trainer.register_hooks([recorder])
    summary = trainer.train()
    steps = len(recorder.seen)
    assert steps and {dtype for _, _, dtype in recorder.seen} == {torch.float16}
    assert recorder.dtypes[steps:] and set(recorder.dtypes[steps:]) == {torch.float16}  # evaluation
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert 0 < trainer.scaler.get_scale() <= 65536.0
    assert 0.0 <= summary["last"]["results"]["test"]["mAP"] <= 1.0


def test_fp16_grad_scaler_state_is_checkpointed_and_resumed(tiny_opts, cuda_paths_on_cpu):
    """An fp16 run stopped after epoch 1 and resumed ends with the same weights and the same
    grad-scaler state (scale, growth tracker) as the uninterrupted run. Catches: the scaler's
    state not saved, or not restored (a resumed scaler restarts at 2^16 with a zero tracker)."""
    opts = list(tiny_opts) + ["SOLVER.AMP", "fp16"]
    out = _out(opts)
    train_net.main(opts + ["OUTPUT_DIR", out + "_whole"])
    shutil.copytree(out + "_whole", out)  # the same run, stopped after epoch 1
    for name in ("checkpoint_epoch2.pth", "summary.json"):
        os.remove(os.path.join(out, name))
    ckpt.atomic_write_text("checkpoint_epoch1.pth", os.path.join(out, ckpt.LAST_POINTER))
    train_net.main(["--resume"] + opts)
    ref = ckpt.load_checkpoint_file(os.path.join(out + "_whole", "checkpoint_epoch2.pth"))
    resumed = ckpt.load_checkpoint_file(os.path.join(out, "checkpoint_epoch2.pth"))
    assert ref["scaler"]["scale"] > 0 and "_growth_tracker" in ref["scaler"]
    assert resumed["scaler"] == ref["scaler"]
    assert all(torch.equal(ref["model"][k], resumed["model"][k]) for k in ref["model"])


def _nan_loss_at(steps, before=None):
    """A MultiModalReID.losses whose first loss is NaN (keeping the graph) at the given training
    steps (0-based, counted by its calls: one per step); ``before(step)`` runs first."""
    original = MultiModalReID.losses
    calls = []

    def losses(self, outputs, pids):
        step = len(calls)
        calls.append(step)
        if before is not None:
            before(step)
        out = original(self, outputs, pids)
        if steps(step):
            first = next(iter(out["losses"]))
            out["losses"][first] = out["losses"][first] * float("nan")
        return out

    return losses


def test_nonfinite_steps_are_skipped_and_logged(tiny_opts, monkeypatch):
    monkeypatch.setattr(MultiModalReID, "losses", _nan_loss_at(lambda step: step in (1, 2)))
    summary = train_net.main(list(tiny_opts))
    log = open(os.path.join(_out(tiny_opts), "log.txt")).read()
    assert log.count("non-finite loss (nan)") == 2
    assert "epoch 1 iteration 2: step skipped (1 in a row)" in log
    assert "epoch 1 iteration 3: step skipped (2 in a row)" in log
    assert summary["nonfinite_steps"] == 2
    assert summary["last"]["epoch"] == 2  # the run went on to the end


def test_too_many_nonfinite_losses_stop_with_last_checkpoint_intact(tiny_opts, monkeypatch):
    out = _out(tiny_opts)
    first = os.path.join(out, "checkpoint_epoch1.pth")
    snapshot = {}

    def snapshot_first_checkpoint(step):
        if step >= 3 and not snapshot:
            snapshot["sha"] = hashlib.sha256(open(first, "rb").read()).hexdigest()

    # epoch 1 has 3 steps: NaN from epoch 2 on
    monkeypatch.setattr(MultiModalReID, "losses",
                        _nan_loss_at(lambda step: step >= 3, snapshot_first_checkpoint))
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses") as info:
        train_net.main(list(tiny_opts) + ["SOLVER.MAX_NONFINITE", "3"])
    assert "SOLVER.MAX_NONFINITE" in str(info.value) and "--resume" in str(info.value)
    assert snapshot and hashlib.sha256(open(first, "rb").read()).hexdigest() == snapshot["sha"]
    assert not os.path.exists(os.path.join(out, "checkpoint_epoch2.pth"))
    path, state = ckpt.find_resume_checkpoint(out)
    assert path == first and (state["epoch"], state["iteration"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class _NoDeviceWait:
    """Raises if a tensor is read on the host (``item``, ``bool``, ``float``, ``tolist``) inside
    ``Trainer.train_step``: each such read waits for a GPU to finish the step."""

    def __init__(self, monkeypatch):
        original = Trainer.train_step

        def guarded(trainer, batch):
            with monkeypatch.context() as m:
                for name in ("item", "__bool__", "__float__", "tolist"):
                    m.setattr(torch.Tensor, name, _forbidden(name))
                return original(trainer, batch)

        monkeypatch.setattr(Trainer, "train_step", guarded)


def _forbidden(name):
    def read(self, *args, **kwargs):
        raise AssertionError(f"Tensor.{name} inside the training step (a host-device sync)")
    return read


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_fused_optimizer_skips_nonfinite_steps_without_waiting_for_the_device(
        tiny_opts, monkeypatch, cuda_paths_on_cpu, amp):
    """The CUDA path (fused optimizer, fp32 or fp16 with the grad scaler): no host read of a
    tensor inside the training step, the fused kernel skips the NaN steps (``found_inf``, from
    the trainer or the scaler), and the flags read every LOG_PERIOD steps give the same warnings
    and counts as the per-step check. Catches: a per-step ``.item()`` (or ``if finite:``)
    reintroduced, found_inf not passed (NaN weights), flags lost or misnumbered when read in
    groups, the optimizer built unfused."""
    _NoDeviceWait(monkeypatch)
    monkeypatch.setattr(MultiModalReID, "losses", _nan_loss_at(lambda step: step in (1, 2)))
    summary = train_net.main(list(tiny_opts) + ["SOLVER.LOG_PERIOD", "2", "SOLVER.AMP", amp])
    log = open(os.path.join(_out(tiny_opts), "log.txt")).read()
    assert log.count("non-finite loss (nan)") == 2
    assert "epoch 1 iteration 2: step skipped (1 in a row)" in log
    assert "epoch 1 iteration 3: step skipped (2 in a row)" in log
    assert summary["nonfinite_steps"] == 2 and summary["last"]["epoch"] == 2
    state = ckpt.load_checkpoint_file(os.path.join(_out(tiny_opts), "checkpoint_epoch2.pth"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(group["fused"] for group in state["optimizer"]["param_groups"])
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    if amp == "off":
        assert steps == {5.0}, steps  # 3 + 4 batches, 2 of them skipped
    else:  # the scaler also skips the steps whose fp16 gradients overflowed
        assert len(steps) == 1 and 1.0 <= steps.pop() <= 5.0
