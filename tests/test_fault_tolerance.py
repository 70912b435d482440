"""Interrupted runs resume to exactly the weights of an uninterrupted one (CPU, deterministic).

* SIGKILL of the whole process group at any moment (here: in epoch 1 before any checkpoint, then
  in the middle of epoch 2), ``--resume`` from the last complete checkpoint -> same final weights
  (torch.equal on every tensor), with 0 and with 2 data-loader workers;
* SIGTERM to the process group (as a scheduler pre-empting a job sends it) in the middle of an
  epoch writes a checkpoint at that iteration and exits; resuming gives the same final weights;
* a torn (truncated) or damaged (checksum mismatch) newest checkpoint is never picked: resume
  falls back to the older one;
* SOLVER.CHECKPOINT_PERIOD and SOLVER.KEEP_LAST.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_net
from tests.conftest import ROOT, TINY_OPTS
from utils import checkpoint as ckpt
from utils.logger import setup_logger

HOOKS = os.path.join(ROOT, "tests", "train_hooks.py")
SLOW = {"HOOK_STEP_SLEEP": "0.25"}  # 3-4 steps of ~0.25 s per epoch: time to signal mid-epoch


def _out(opts):
    return opts[opts.index("OUTPUT_DIR") + 1]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _env(extra=None):
    return dict(os.environ, OMP_NUM_THREADS="1", **(extra or {}))


def _run(opts, extra_env=None):
    """A complete training subprocess (same interpreter settings as the interrupted ones)."""
    proc = subprocess.run([sys.executable, HOOKS] + opts, cwd=ROOT, env=_env(extra_env),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _run_until(opts, pattern, sig, timeout=120):
    """Start a slowed-down training subprocess in its own process group, wait until its log
    (new lines only) shows ``pattern``, send ``sig`` to the whole group, and wait for it."""
    log = os.path.join(_out(opts), "log.txt")
    offset = os.path.getsize(log) if os.path.exists(log) else 0
    console = _out(opts) + f"_console_{time.monotonic_ns()}.txt"  # a file: a pipe could fill up
    with open(console, "w") as sink:
        proc = subprocess.Popen([sys.executable, HOOKS] + opts, cwd=ROOT, env=_env(SLOW),
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while True:
            assert proc.poll() is None, "training ended before the signal: " + open(console).read()
            assert time.time() < deadline, f"{pattern!r} never logged"
            if os.path.exists(log):
                with open(log) as f:
                    f.seek(offset)
                    if pattern in f.read():
                        break
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, open(console).read()


@pytest.fixture(scope="module")
def reference(synthetic_root, tmp_path_factory):
    """Final weights of uninterrupted runs, by DATALOADER.NUM_WORKERS (computed once each)."""
    cache = {}

    def get(workers):
        if workers not in cache:
            out = str(tmp_path_factory.mktemp("straight") / "out")
            _run(TINY_OPTS + ["DATASETS.ROOT_DIR", synthetic_root, "OUTPUT_DIR", out,
                              "DATALOADER.NUM_WORKERS", workers])
            cache[workers] = _weights(os.path.join(out, "checkpoint_epoch2.pth"))
        return cache[workers]

    return get


def test_sigkill_at_any_moment_then_resume_is_exact(tiny_opts, reference):
    opts = list(tiny_opts)  # DATALOADER.NUM_WORKERS 0
    out = _out(opts)
    # killed in epoch 1: nothing to resume from yet
    code, _ = _run_until(opts, "epoch 1 iter 2/", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert ckpt.find_resume_checkpoint(out) is None
    # resumed (from scratch), killed again in the middle of epoch 2
    code, _ = _run_until(["--resume"] + opts, "epoch 2 iter 2/", signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "checkpoint_epoch2.pth"))
    # resumed from the end of epoch 1, to the end
    proc = _run(["--resume"] + opts)
    assert "checkpoint_epoch1.pth at epoch 2, iteration 0" in proc.stdout
    _assert_same_weights(_weights(os.path.join(out, "checkpoint_epoch2.pth")), reference("0"))


def test_sigkill_with_loader_workers_then_resume_is_exact(tiny_opts, reference):
    opts = list(tiny_opts) + ["DATALOADER.NUM_WORKERS", "2"]
    out = _out(opts)
    code, _ = _run_until(opts, "epoch 2 iter 2/", signal.SIGKILL)
    assert code == -signal.SIGKILL
    proc = _run(["--resume"] + opts)
    assert "checkpoint_epoch1.pth at epoch 2, iteration 0" in proc.stdout
    _assert_same_weights(_weights(os.path.join(out, "checkpoint_epoch2.pth")), reference("2"))


def test_sigterm_checkpoints_mid_epoch_then_resume_is_exact(tiny_opts, reference):
    opts = list(tiny_opts) + ["DATALOADER.NUM_WORKERS", "2"]
    out = _out(opts)
    # SIGTERM to the whole group: the main process and its data-loader workers
    code, output = _run_until(opts, "epoch 2 iter 1/", signal.SIGTERM)
    assert code == 1, output
    assert "signal 15 received" in output and "resume with --resume" in output
    state = torch.load(os.path.join(out, "checkpoint_epoch1.pth"), weights_only=True)
    assert state["epoch"] == 1 and state["iteration"] >= 1  # mid-epoch position (0-based epoch 1)
    proc = _run(["--resume"] + opts)
    assert f"at epoch 2, iteration {state['iteration']}" in proc.stdout
    _assert_same_weights(_weights(os.path.join(out, "checkpoint_epoch2.pth")), reference("2"))


def test_torn_or_damaged_newest_checkpoint_is_never_picked(tiny_opts):
    out = _out(tiny_opts)
    train_net.main(list(tiny_opts))
    newest = os.path.join(out, "checkpoint_epoch2.pth")
    reference = _weights(newest)
    with open(os.path.join(out, ckpt.LAST_POINTER)) as f:
        assert f.read().strip() == "checkpoint_epoch2.pth"
    data = open(newest, "rb").read()

    # torn: the pointer names a truncated file -> the older checkpoint is used
    with open(newest, "wb") as f:
        f.write(data[: len(data) // 2])
    path, state = ckpt.find_resume_checkpoint(out)
    assert path.endswith("checkpoint_epoch1.pth") and state["epoch"] == 1

    # damaged inside but a valid archive: the checksum refuses it
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    with open(newest, "wb") as f:
        f.write(flipped)
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        ckpt.load_checkpoint_file(newest)
    path, _ = ckpt.find_resume_checkpoint(out)
    assert path.endswith("checkpoint_epoch1.pth")

    # end to end: --resume skips it, retrains epoch 2 and ends with the same weights
    train_net.main(["--resume"] + list(tiny_opts))
    log = open(os.path.join(out, "log.txt")).read()
    assert "skipping unreadable checkpoint" in log and "checksum mismatch" in log
    _assert_same_weights(_weights(newest), reference)


def test_checksum_round_trip_and_model_best(tmp_path):
    setup_logger()
    state = {"model": {"w": torch.randn(64, 64), "b": torch.zeros(3, dtype=torch.bfloat16),
                       "n": torch.tensor(7)}, "epoch": 3, "iteration": 0, "rng": None}
    path = ckpt.save_epoch_checkpoint(state, str(tmp_path), 3, keep_last=0)
    loaded = ckpt.load_checkpoint_file(path)
    assert loaded["checksum"].startswith("crc32:")
    assert ckpt.state_checksum(loaded) == loaded["checksum"]
    loaded["model"]["w"][0, 0] += 1
    assert ckpt.state_checksum(loaded) != loaded["checksum"]


def test_checkpoint_period_and_keep_last(tiny_opts):
    out = _out(tiny_opts)
    train_net.main(list(tiny_opts) + ["SOLVER.MAX_EPOCHS", "5", "SOLVER.CHECKPOINT_PERIOD", "2",
                                      "SOLVER.KEEP_LAST", "2", "SOLVER.EVAL_PERIOD", "10"])
    log = open(os.path.join(out, "log.txt")).read()
    written = [line.rsplit("checkpoint_epoch", 1)[1] for line in log.splitlines()
               if "checkpoint written" in line]
    assert written == ["2.pth", "4.pth", "5.pth"]  # every 2 epochs, and the last
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint_")) == [
        "checkpoint_epoch4.pth", "checkpoint_epoch5.pth"]
    assert open(os.path.join(out, ckpt.LAST_POINTER)).read().strip() == "checkpoint_epoch5.pth"


def test_keep_last_zero_keeps_everything(tmp_path):
    setup_logger()
    for epoch in range(1, 5):
        ckpt.save_epoch_checkpoint({"model": {}, "epoch": epoch}, str(tmp_path), epoch, keep_last=0)
    assert [e for e, _ in ckpt.epoch_checkpoints(str(tmp_path))] == [4, 3, 2, 1]
    ckpt.save_epoch_checkpoint({"model": {}, "epoch": 5}, str(tmp_path), 5, keep_last=1)
    assert [e for e, _ in ckpt.epoch_checkpoints(str(tmp_path))] == [5]
