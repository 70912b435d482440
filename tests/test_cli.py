"""The command line under bad input, through the real CLI in a subprocess: one clear line and a
non-zero exit (the traceback in the log), no hang, and nothing a user made overwritten."""
import argparse
import errno
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_net
from config import default_argument_parser
from conftest import ROOT, TINY_OPTS
from utils import checkpoint as ckpt

HOOKS = os.path.join(ROOT, "tests", "train_hooks.py")


def _out(opts):
    return opts[opts.index("OUTPUT_DIR") + 1]


def _cli(args, timeout=180, env=None, script="train_net.py"):
    return subprocess.run([sys.executable, script] + list(args), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})))


def _assert_one_clear_error(proc, *needles):
    """Exit 1, the message lines on stderr, no traceback there."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-2000:]


def _snapshot(folder):
    """{relative path: (size, mtime_ns)} of every file under ``folder``."""
    out = {}
    for path in glob.glob(os.path.join(folder, "**"), recursive=True):
        if os.path.isfile(path):
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def finished_run(tiny_opts):
    """A finished 1-epoch run; returns its opts."""
    opts = list(tiny_opts) + ["SOLVER.MAX_EPOCHS", "1"]
    train_net.main(opts)
    return opts


# ------------------------------------------------------------------ no hang
def test_loader_worker_error_ends_the_run_promptly(synthetic_root, tmp_path):
    """A corrupt image read by one of 2 loader workers ends the process within seconds with one
    line naming the file (catches the exit handler waiting for workers that ignore SIGTERM)."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    victim = sorted(glob.glob(str(root / "Synthetic" / "train_171" / "NI" / "*.jpg")))[3]
    with open(victim, "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    opts = [o for o in TINY_OPTS] + ["DATASETS.ROOT_DIR", str(root), "OUTPUT_DIR", str(tmp_path / "out"),
                                    "DATALOADER.NUM_WORKERS", "2"]
    start = time.time()
    proc = _cli(opts, timeout=120)
    assert time.time() - start < 100
    _assert_one_clear_error(proc, "error: cannot decode image", os.path.basename(victim),
                            "DATALOADER.SKIP_BAD_IMAGES")
    assert "Traceback" in open(tmp_path / "out" / "log.txt").read()  # kept for the developer


# ------------------------------------------------------------------ output folders
def test_new_run_into_a_folder_with_a_run_is_refused(finished_run):
    """Without --resume the earlier run is untouched (catches its checkpoints counted as newest
    and the new run's deleted by retention, logs and TensorBoard mixed)."""
    out = _out(finished_run)
    before = _snapshot(out)
    proc = _cli(finished_run)
    _assert_one_clear_error(proc, f"OUTPUT_DIR {out!r} already holds a run", "--resume",
                            "--overwrite", "nothing is deleted")
    assert _snapshot(out) == before


def test_overwrite_moves_the_earlier_run_aside(finished_run):
    out = _out(finished_run)
    before = _snapshot(out)
    proc = _cli(["--overwrite"] + finished_run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    aside = glob.glob(out + ".old-*")
    assert len(aside) == 1 and _snapshot(aside[0]) == before
    assert os.path.isfile(os.path.join(out, "checkpoint_epoch1.pth"))
    assert "moved to" in proc.stdout


def test_resume_of_a_finished_run_changes_nothing(finished_run):
    """Catches "resumed at epoch 2 of a 1-epoch run" and summary.json rewritten."""
    out = _out(finished_run)
    before = _snapshot(out)
    proc = _cli(["--resume"] + finished_run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is finished (epoch 1 of 1): nothing to do, nothing changed" in proc.stdout
    assert _snapshot(out) == before
    # a longer schedule is a reason to resume
    proc = _cli(finished_run[:-2] + ["SOLVER.MAX_EPOCHS", "2", "--resume"])  # flag after the opts
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.isfile(os.path.join(out, "checkpoint_epoch2.pth"))
    assert "resumed with SOLVER.MAX_EPOCHS 2 (the run had 1)" in open(os.path.join(out, "log.txt")).read()


def test_a_failing_run_writes_no_config(tiny_opts, tmp_path):
    """config.yaml appears only once the run starts (catches a failed start leaving a config that
    does not describe the folder)."""
    opts = list(tiny_opts) + ["DATASETS.ROOT_DIR", str(tmp_path / "nowhere")]
    proc = _cli(opts)
    _assert_one_clear_error(proc, "error: Synthetic: no generated dataset in",
                            "DATASETS.GENERATE True")
    assert not os.path.exists(os.path.join(_out(opts), "config.yaml"))
    assert not os.path.exists(tmp_path / "nowhere")  # nothing generated at a mistyped root


def test_synthetic_generation_only_when_asked(tiny_opts, tmp_path):
    root = tmp_path / "fresh"
    opts = list(tiny_opts) + ["DATASETS.ROOT_DIR", str(root), "SOLVER.MAX_EPOCHS", "1",
                              "DATASETS.GENERATE", "True"]
    train_net.main(opts)
    assert os.path.isfile(root / "Synthetic" / "meta.json")
    other = list(tiny_opts) + ["DATASETS.ROOT_DIR", str(root), "DATASETS.SYNTHETIC.SEED", "3",
                               "OUTPUT_DIR", str(tmp_path / "o2")]
    with pytest.raises(FileNotFoundError, match=r"generated with other arguments \(SEED 0 "
                                                r"\(config: 3\)\)"):
        train_net.main(other)


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_unusable_output_dir_names_the_key(tiny_opts, tmp_path, kind):
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("x")
        message = "is a file, not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write into read-only folders")
        target.mkdir()
        os.chmod(target, 0o500)
        target = target / "sub"
        message = "cannot be written"
    opts = list(tiny_opts) + ["OUTPUT_DIR", str(target)]
    _assert_one_clear_error(_cli(opts), f"OUTPUT_DIR {str(target)!r}", message, "choose another OUTPUT_DIR")


def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError; the message names the file, the
    cause and OUTPUT_DIR, the partial temporary file is removed, the earlier file is intact."""
    path = str(tmp_path / "checkpoint_epoch2.pth")
    ckpt.atomic_torch_save({"a": torch.ones(3)}, path)
    before = open(path, "rb").read()

    def full_disk(obj, f):
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 73664") from exc

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.WriteError, match=r"cannot write .*checkpoint_epoch2.pth: no space left "
                                               r"on device \(OUTPUT_DIR .*\).*--resume"):
        ckpt.atomic_torch_save({"a": torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == ["checkpoint_epoch2.pth"] and open(path, "rb").read() == before


# ------------------------------------------------------------------ messages
def test_flags_anywhere_and_unknown_flags():
    args = default_argument_parser().parse_args(["SOLVER.MAX_EPOCHS", "3", "--resume", "--init_scale",
                                                 "-0.5", "TEST.FEAT", "ori"])
    assert args.resume and args.init_scale == -0.5
    assert args.opts == ["SOLVER.MAX_EPOCHS", "3", "TEST.FEAT", "ori"]
    proc = _cli(["--resum"])
    assert proc.returncode == 2 and "unrecognized option(s): --resum" in proc.stderr


def test_config_errors_are_one_line(tmp_path):
    proc = _cli(["SOLVER.MAX_EPOCH", "3", "OUTPUT_DIR", str(tmp_path / "o")])
    _assert_one_clear_error(proc, "error: unknown config key: SOLVER.MAX_EPOCH; did you mean "
                                  "SOLVER.MAX_EPOCHS")
    proc = _cli(["--debug", "SOLVER.MAX_EPOCH", "3", "OUTPUT_DIR", str(tmp_path / "o")])
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # --debug shows it


def test_weight_files_that_are_not_weights(tiny_opts, tmp_path):
    """Neither message sends the user to torch's weights_only advice."""
    pickled = tmp_path / "objects.pth"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1.0)}, pickled)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    proc = _cli(list(tiny_opts) + ["MODEL.PRETRAIN_PATH", str(pickled)])
    _assert_one_clear_error(proc, f"MODEL.PRETRAIN_PATH {pickled} is not a weights file")
    assert "weights_only" not in proc.stderr
    proc = _cli(list(tiny_opts) + ["TEST.WEIGHT", str(garbage)], script="test_net.py")
    _assert_one_clear_error(proc, f"{garbage} is not a checkpoint torch can read",
                            "checkpoint_epoch<N>.pth or model_best.pth")
    proc = _cli(list(tiny_opts), script="test_net.py")
    _assert_one_clear_error(proc, "TEST.WEIGHT is empty")


def test_test_net_keeps_its_own_log(finished_run):
    out = _out(finished_run)
    log = open(os.path.join(out, "log.txt")).read()
    proc = _cli(finished_run + ["TEST.WEIGHT", os.path.join(out, "checkpoint_epoch1.pth")],
                script="test_net.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert open(os.path.join(out, "log.txt")).read() == log
    assert "mAP" in open(os.path.join(out, "test_log.txt")).read()


def test_ctrl_c_is_one_line(tiny_opts):
    opts = list(tiny_opts) + ["SOLVER.MAX_EPOCHS", "5"]
    # a shell's background job inherits SIGINT ignored, and Python keeps it so: restore it
    proc = subprocess.Popen([sys.executable, HOOKS] + opts, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HOOK_STEP_SLEEP="0.3"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = os.path.join(_out(opts), "log.txt")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and "iter 1/" in open(log).read()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted (Ctrl-C)" in err and "--resume" in err and "Traceback" not in err
