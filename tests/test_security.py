"""Opening a checkpoint or weight file never runs code stored in it (docs/robustness.md, "What
can run code"): a checkpoint whose pickle calls ``os.system`` is refused with one line by
test_net.py, train_net.py --resume, the Predictor, tools/export_onnx.py and the pretrained-weights
reader, and its command never runs; what training writes loads with ``weights_only=True``; a
checkpoint of the previous release (numpy RNG states) is converted by tools/convert_checkpoint.py
and then resumes to the same weights as an uninterrupted run."""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_OPTS
from utils import checkpoint as ckpt
from utils.seed import set_rng_state


class _RunsCommand:
    """Pickles as a call of ``os.system(command)``: what a malicious checkpoint holds."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def malicious(tmp_path):
    """(path of a checkpoint that would create ``marker`` when unpickled, marker path)."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "sent.pth"
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 1, "payload": _RunsCommand(f"touch {marker}")},
               path)
    return str(path), marker


def _cli(args, script="train_net.py", timeout=180):
    return subprocess.run([sys.executable, script] + list(args), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _error_lines(proc):
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def _assert_refused(proc, path, marker):
    """One error line naming the file and the reason; the payload never ran."""
    errors = _error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert path in errors[0] and ckpt.UNSAFE_REASON in errors[0], errors[0]
    assert "posix.system" in errors[0] and "weights_only" not in errors[0], errors[0]
    assert not marker.exists()


def test_test_net_refuses_a_checkpoint_that_runs_code(malicious, tiny_opts):
    """Catches: full unpickling restored in utils/checkpoint.load_checkpoint_file; the
    refusal without the file name or as a traceback."""
    path, marker = malicious
    _assert_refused(_cli(list(tiny_opts) + ["TEST.WEIGHT", path], "test_net.py"), path, marker)


def test_resume_refuses_a_checkpoint_that_runs_code(malicious, tiny_opts):
    """The newest checkpoint of an output folder is the malicious one: --resume stops on it
    (catches: resume skipping it as unreadable and silently starting from scratch, which would
    also overwrite the folder's run) and the payload never runs."""
    path, marker = malicious
    out = tiny_opts[tiny_opts.index("OUTPUT_DIR") + 1]
    os.makedirs(out)
    newest = os.path.join(out, "checkpoint_epoch3.pth")
    shutil.copy(path, newest)
    with open(os.path.join(out, ckpt.LAST_POINTER), "w") as f:
        f.write("checkpoint_epoch3.pth")
    before = open(newest, "rb").read()
    proc = _cli(["--resume"] + list(tiny_opts))
    _assert_refused(proc, newest, marker)
    assert open(newest, "rb").read() == before
    assert [n for n in os.listdir(out) if n.endswith(".pth")] == ["checkpoint_epoch3.pth"]


def test_predictor_refuses_a_checkpoint_that_runs_code(malicious):
    """Catches: engine.predictor loading TEST.WEIGHT by another path than the safe loader."""
    from config import build_cfg
    from engine.predictor import Predictor

    path, marker = malicious
    with pytest.raises(ckpt.UnsafeFileError, match=re.escape(path)):
        Predictor(build_cfg("", list(TINY_OPTS)), path)
    assert not marker.exists()


def test_export_onnx_refuses_a_checkpoint_that_runs_code(malicious, tmp_path):
    """tools/export_onnx.py (the tools open TEST.WEIGHT through the Predictor / load_weights)."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module)
    path, marker = malicious
    onnx_file = tmp_path / "model.onnx"
    proc = _cli(["--output", str(onnx_file)] + list(TINY_OPTS) + ["TEST.WEIGHT", path],
                "tools/export_onnx.py")
    _assert_refused(proc, path, marker)
    assert not onnx_file.exists()


def test_pretrained_weights_that_run_code_are_refused(malicious):
    """MODEL.PRETRAIN_PATH (modeling/backbone.py) goes through the same loader.
    Catches: the backbone reading weight files with full unpickling."""
    from modeling.backbone import PretrainedWeightsError, read_weight_file

    path, marker = malicious
    with pytest.raises(PretrainedWeightsError, match=re.escape(ckpt.UNSAFE_REASON)):
        read_weight_file(path)
    assert not marker.exists()


def test_a_file_torch_did_not_write_gets_no_weights_only_advice(tmp_path):
    """A garbage file is 'not a checkpoint torch can read' with the unpickler's reason, not
    torch's advice to turn weights_only off (catches: that advice passed through)."""
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(RuntimeError) as err:
        ckpt.load_checkpoint_file(str(garbage))
    message = str(err.value)
    assert f"{garbage} is not a checkpoint torch can read" in message
    assert "weights_only" not in message and "not a file torch.save wrote" in message


def test_no_loader_unpickles_python_objects():
    """Outside the explicit legacy conversion, no source file turns weights_only off (catches: a
    new loading path that bypasses utils.checkpoint.safe_load)."""
    needle = "weights_only" + "=False"  # spelt apart, so that a grep finds only real uses
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "output", "datasets")]
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and os.path.relpath(path, ROOT) != os.path.join("tools", "convert_checkpoint.py"):
                with open(path, encoding="utf-8") as f:
                    if needle in f.read():
                        found.append(os.path.relpath(path, ROOT))
    assert found == []


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    """get_rng_state -> file -> safe_load -> set_rng_state gives the same python, numpy and torch
    random streams (catches: numpy's state stored as an ndarray again, which the loader refuses,
    or its keys restored with the wrong dtype)."""
    import random

    from utils.seed import get_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    path = str(tmp_path / "rng.pth")
    torch.save(get_rng_state(), path)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    set_rng_state(ckpt.safe_load(path))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_search_html_escapes_file_names(tmp_path):
    """tools/search.py --html: a file name that is markup shows as text (catches: html.escape
    dropped from a title attribute or a caption)."""
    from tools.search import write_html

    evil = '<script>alert(1)</script>"onload="x.jpg'
    row = {"label": "<b>q</b>", "query_paths": [evil] * 3, "query_caption": "<i>cap</i>",
           "matches": [{"paths": [evil] * 3, "correct": True, "caption": "<u>m</u>"}]}
    page_path = str(tmp_path / "page.html")
    write_html(page_path, "<title>", "<sum>", [row], 32)
    page = open(page_path, encoding="utf-8").read()
    for markup in ("<script>", '"onload="', "<b>q", "<i>cap", "<u>m", "<sum>"):
        assert markup not in page
    assert "<title>&lt;title&gt;</title>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;onload=&quot;x.jpg" in page


# ------------------------------------------------------------------ checkpoints we write, and old ones
@pytest.fixture(scope="module")
def straight_run(synthetic_root, tmp_path_factory):
    """A 2-epoch tiny run (every epoch checkpoint kept), as the fault-tolerance tests run it."""
    out = str(tmp_path_factory.mktemp("straight") / "out")
    opts = TINY_OPTS + ["DATASETS.ROOT_DIR", synthetic_root, "OUTPUT_DIR", out, "SOLVER.KEEP_LAST", "0"]
    proc = _cli(opts)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return opts, out


def test_training_writes_only_tensors_and_plain_values(straight_run):
    """Every file training writes opens with weights_only=True and names no Python global
    (catches: an RNG state, metric or config stored as a numpy or other Python object)."""
    _, out = straight_run
    for name in ("checkpoint_epoch1.pth", "checkpoint_epoch2.pth", "model_best.pth"):
        path = os.path.join(out, name)
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], name
        assert "model" in ckpt.load_checkpoint_file(path)


def _as_previous_release(state: dict) -> dict:
    """``state`` as the previous release wrote it: numpy's RNG state as np.random.get_state()
    returns it (a tuple holding a uint32 ndarray), also in the per-process states of a run under
    torchrun (2 here), checksummed over that."""
    state = {k: v for k, v in state.items() if k != ckpt.CHECKSUM_KEY}
    name, keys, pos, has_gauss, cached = state["rng"]["numpy"]
    state["rng"] = dict(state["rng"], numpy=(name, keys.numpy().astype(np.uint32), pos, has_gauss,
                                             cached))
    state["rng_per_rank"] = [dict(state["rng"]), dict(state["rng"])]
    return ckpt.with_checksum(state)


def test_checkpoint_of_the_previous_release_converts_and_resumes(straight_run, tmp_path):
    """A run folder whose newest checkpoint the previous release wrote: --resume refuses it with
    the conversion command; that command (run as printed) rewrites it in place; the RNG states
    are the same; --resume then trains to the uninterrupted run's weights, bit for bit.
    Catches: legacy files silently skipped or loaded unsafely, a message without the command,
    a conversion that changes the state, or one that writes a file the loader refuses."""
    opts, straight = straight_run
    out = str(tmp_path / "old_run")
    os.makedirs(out)
    shutil.copy(os.path.join(straight, "config.yaml"), out)
    current = ckpt.load_checkpoint_file(os.path.join(straight, "checkpoint_epoch1.pth"))
    legacy = _as_previous_release(current)
    path = os.path.join(out, "checkpoint_epoch1.pth")
    torch.save(legacy, path)  # plain torch.save, as the previous release did
    with open(os.path.join(out, ckpt.LAST_POINTER), "w") as f:
        f.write("checkpoint_epoch1.pth")
    resume = ["--resume"] + opts[:-4] + ["OUTPUT_DIR", out, "SOLVER.KEEP_LAST", "0"]

    errors = _error_lines(_cli(resume))
    assert len(errors) == 1 and path in errors[0] and ckpt.UNSAFE_REASON in errors[0], errors
    command = errors[0].split("convert it once: ", 1)[1]
    assert command == (f"python tools/convert_checkpoint.py --from legacy --trust {path} {path} "
                       "--overwrite")
    argv = shlex.split(command)
    converted = subprocess.run([sys.executable] + argv[1:], cwd=ROOT, capture_output=True, text=True,
                               timeout=120)
    assert converted.returncode == 0, converted.stderr

    state = ckpt.load_checkpoint_file(path)  # weights_only, checksum verified
    assert state.keys() == legacy.keys()
    for key, value in legacy["model"].items():
        assert torch.equal(state["model"][key], value), key
    np.random.set_state(legacy["rng"]["numpy"])
    expected = np.random.random(4).tolist()
    set_rng_state(state["rng"])
    assert np.random.random(4).tolist() == expected

    proc = _cli(resume)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = ckpt.load_checkpoint_file(os.path.join(out, "checkpoint_epoch2.pth"))["model"]
    reference = ckpt.load_checkpoint_file(os.path.join(straight, "checkpoint_epoch2.pth"))["model"]
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


def test_conversion_needs_trust_and_never_overwrites_unasked(malicious, tmp_path):
    """Command line: without --trust nothing is unpickled (the payload does not run, nothing is
    written); OUT = IN is refused without --overwrite. Python API: an existing OUT is refused
    and left as it was; a file holding objects other than numpy's is not converted; one that
    already loads safely neither. Catches: the legacy reader run before the --trust or the
    existing-file check, a lost user file, a converted file the loader would refuse."""
    from tools import convert_checkpoint

    path, marker = malicious
    target = tmp_path / "out.pth"
    for args, needles in (([path, str(target)], ["--trust", path]),
                          (["--trust", path, path], [f"{path} exists (it is IN)", "--overwrite"])):
        proc = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--from", "legacy"] + args,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        errors = _error_lines(proc)
        assert len(errors) == 1 and all(n in errors[0] for n in needles), errors
    assert not marker.exists() and not target.exists()

    target.write_bytes(b"the user's file")
    with pytest.raises(ValueError, match=f"{re.escape(str(target))} exists: .* --overwrite"):
        convert_checkpoint.main(["--from", "legacy", "--trust", path, str(target)])
    assert target.read_bytes() == b"the user's file" and not marker.exists()

    objects = tmp_path / "objects.pth"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=1.0)}, objects)
    with pytest.raises(ValueError, match=r"\(argparse.Namespace\): not converted"):
        convert_checkpoint.main(["--from", "legacy", "--trust", str(objects), str(tmp_path / "o.pth")])
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"w": torch.ones(1)}}, plain)
    with pytest.raises(ValueError, match="already loads safely: nothing to convert"):
        convert_checkpoint.main(["--from", "legacy", "--trust", str(plain), str(tmp_path / "p.pth")])
    assert not (tmp_path / "o.pth").exists() and not (tmp_path / "p.pth").exists()
