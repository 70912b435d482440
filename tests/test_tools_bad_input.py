"""Bad input to the tools beyond train_net.py / test_net.py (docs/robustness.md, "Tools"): nothing
the user has is overwritten, inputs are checked for what they claim to be, and every misuse is
one line naming the option. CLI cases run the real command in a subprocess; one tiny checkpoint
is shared by the module."""
import logging
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train_net
from config import ConfigError, build_cfg
from conftest import ROOT, TINY_OPTS
from data.datasets import BadImageError, read_image
from engine.evaluator import distance_metrics, format_metrics
from engine.predictor import Predictor
from tools import embed
from utils.outputs import OutputPathError, check_output, replacing

QUICKSTART = os.path.join(ROOT, "configs", "Synthetic", "quickstart.yml")


def _cli(script, args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", script)] + list(args),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _assert_one_clear_error(proc, *needles):
    """Exit 1 (ablate.py: 2), one ``error:`` line naming the problem, no traceback."""
    assert proc.returncode in (1, 2), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _no_temporary_files(folder):
    return [n for n in os.listdir(folder) if ".tmp" in n]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """(opts, checkpoint, test folder, features .npz of the test folder) of a 1-epoch tiny run."""
    out = str(tmp_path_factory.mktemp("tools_bad_input_run"))
    opts = TINY_OPTS + ["DATASETS.ROOT_DIR", synthetic_root, "OUTPUT_DIR", out, "SOLVER.MAX_EPOCHS", "1"]
    train_net.main(list(opts))
    weight = os.path.join(out, "checkpoint_epoch1.pth")
    test_dir = os.path.join(synthetic_root, "Synthetic", "test")
    feats = os.path.join(out, "feats.npz")
    embed.main(list(opts) + ["TEST.WEIGHT", weight, "--input", test_dir, "--output", feats])
    return list(opts), weight, test_dir, feats


# ---------------------------------------------------------------------------------------------
# Nothing the user has is overwritten
# ---------------------------------------------------------------------------------------------
def test_search_never_overwrites_an_input_or_a_file_of_another_kind(trained, tmp_path):
    """--html / --csv naming the query file, a file of another kind, a folder or a place under a
    file: one line naming the option before any work, the files unchanged, no temporary file
    (catches: the page written over the .npz with exit 0, as before; raw IsADirectoryError /
    FileExistsError after the work)."""
    _, _, _, feats = trained
    gallery = tmp_path / "g.npz"
    gallery.write_bytes(open(feats, "rb").read())
    before = gallery.read_bytes()
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    cases = [(["--html", str(gallery)], ("--html", "also the --gallery file")),
             (["--csv", str(gallery)], ("--csv", "also the --gallery file")),
             (["--csv", str(other)], ("--csv", "name a .csv file")),
             (["--html", str(tmp_path)], ("--html", "is a folder")),
             (["--html", str(gallery / "x.html")], ("--html", "is a file, not a folder"))]
    for extra, needles in cases:
        proc = _cli("search.py", ["--gallery", str(gallery), "--query", str(gallery)] + extra)
        _assert_one_clear_error(proc, *needles)
        assert "queries x" not in proc.stdout, "the check must come before the work"
    assert gallery.read_bytes() == before and other.read_text() == "mine"
    assert _no_temporary_files(tmp_path) == []


def test_export_failure_leaves_the_existing_onnx_intact(trained, tmp_path):
    """An existing --output survives an impossible --opset (refused before the export, naming
    it) and an export that fails its check (written to a temporary file, never renamed)
    (catches: keep.onnx replaced by a model onnxruntime refuses, as before; a torch.export
    banner instead of one line)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    opts, weight, _, _ = trained
    keep = tmp_path / "keep.onnx"
    keep.write_bytes(b"the user's good model")
    base = opts + ["TEST.WEIGHT", weight, "--output", str(keep)]
    _assert_one_clear_error(_cli("export_onnx.py", base + ["--opset", "99"]), "--opset 99", "up to")
    proc = _cli("export_onnx.py", base + ["--tolerance", "1e-30"])  # exports, then fails the check
    _assert_one_clear_error(proc, "--tolerance", "was not written", "unchanged")
    assert keep.read_bytes() == b"the user's good model"
    assert _no_temporary_files(tmp_path) == []
    _assert_one_clear_error(_cli("export_onnx.py", opts + ["TEST.WEIGHT", weight, "--output", weight]),
                            "--output", "also the TEST.WEIGHT file")


def test_embed_output_checks_and_odd_names(trained, tmp_path):
    """embed.py: --output naming the checkpoint or a folder and a negative --batch_size are one
    line; one file name off RGBNT201's pattern is named in the log and the other triplets keep
    their identities (catches: every identity of the folder turned into -1, as before)."""
    opts, weight, test_dir, _ = trained
    base = opts + ["TEST.WEIGHT", weight, "--input", test_dir]
    _assert_one_clear_error(_cli("embed.py", base + ["--output", weight]), "also the TEST.WEIGHT file")
    _assert_one_clear_error(_cli("embed.py", base + ["--output", str(tmp_path)]), "--output", "is a folder")
    _assert_one_clear_error(_cli("embed.py", base + ["--output", str(tmp_path / "f.npz"),
                                                     "--batch_size", "-1"]), "--batch_size -1")
    folder = tmp_path / "odd"
    for m in ("RGB", "NI", "TI"):
        (folder / m).mkdir(parents=True)
        for i, name in enumerate(sorted(os.listdir(os.path.join(test_dir, m)))):
            target = "holiday photo.jpg" if i == 0 else name
            (folder / m / target).write_bytes(open(os.path.join(test_dir, m, name), "rb").read())
    out = tmp_path / "odd.npz"
    proc = _cli("embed.py", opts + ["TEST.WEIGHT", weight, "--input", str(folder), "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "holiday photo.jpg" in proc.stdout + proc.stderr
    pids = np.load(out)["pids"]
    assert (pids == -1).sum() == 1 and (pids >= 0).sum() == len(pids) - 1


def test_most_names_off_the_pattern_leave_every_identity_unknown(monkeypatch):
    """When most names do not follow the pattern the few that parse are coincidences: all -1,
    and the odd names are logged (catches: a stray match taken as an identity)."""
    records = []
    logger = logging.getLogger("test_tools_bad_input")
    logger.handlers = [logging.Handler()]
    logger.handlers[0].emit = records.append
    monkeypatch.setattr(embed, "get_logger", lambda: logger)
    parsed = embed.parse_names("x", ["000001_cam1_0_00.jpg", "a.jpg", "b.jpg"])
    assert parsed == [(-1, -1)] * 3
    assert "a.jpg, b.jpg" in records[0].getMessage()
    assert embed.parse_names("x", ["000001_cam2_0_00.jpg", "000002_cam1_0_00.jpg", "c.jpg"]) == \
        [(1, 1), (2, 0), (-1, -1)]


def test_replacing_keeps_the_old_file_on_failure(tmp_path):
    """utils.outputs.replacing: a failing writer or validation leaves the old file and no
    temporary file; success replaces it with the old file's permissions (catches: writing in
    place, a leftover .tmp, a new file readable only by its owner)."""
    path = tmp_path / "out.csv"
    path.write_text("old")
    os.chmod(path, 0o644)
    with pytest.raises(RuntimeError):
        with replacing(str(path), "--csv") as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("the writer failed")
    with pytest.raises(ValueError):
        with replacing(str(path), "--csv", validate=lambda p: (_ for _ in ()).throw(ValueError("bad"))) as tmp:
            open(tmp, "w").write("invalid")
    assert path.read_text() == "old" and _no_temporary_files(tmp_path) == []
    with replacing(str(path), "--csv") as tmp:
        assert tmp.endswith(".csv") and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "w").write("new")
    assert path.read_text() == "new" and stat.S_IMODE(os.stat(path).st_mode) == 0o644
    with pytest.raises(OutputPathError, match="--csv .* is also the --input file"):
        check_output(str(path), "--csv", (".csv",), {"--input": str(path)})


# ---------------------------------------------------------------------------------------------
# Inputs are checked for what they claim to be
# ---------------------------------------------------------------------------------------------
def test_16_and_12_bit_pngs_are_scaled_not_clipped(tmp_path):
    """A 16-bit PNG is scaled by 65535 and a 12-bit frame stored in 16 bits by 4095 (catches:
    convert("RGB") clipping 99.6 % of a 16-bit gradient to 255, as before; a 12-bit frame
    scaled by 65535, i.e. nearly black); NaN in a float image is refused naming it."""
    ramp16 = np.linspace(0, 65535, 64 * 32).reshape(64, 32).astype(np.uint16)
    ramp12 = np.linspace(0, 4095, 64 * 32).reshape(64, 32).astype(np.uint16)
    for ramp, full in ((ramp16, 65535), (ramp12, 4095)):
        path = tmp_path / f"t{full}.png"
        Image.fromarray(ramp).save(path)
        assert Image.open(path).mode.startswith("I")  # really a high-depth PNG
        got = np.asarray(read_image(str(path)))
        assert got.shape == (64, 32, 3)
        np.testing.assert_allclose(got[..., 0], ramp * 255.0 / full, atol=0.5)
        assert (got == 255).mean() < 0.01
    nan = np.full((8, 8), np.nan, dtype=np.float32)
    Image.fromarray(nan, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(BadImageError, match="nan.tif.*NaN"):
        read_image(str(tmp_path / "nan.tif"))


def test_predictor_checks_tensors_and_scales_16_bit_images(trained):
    """Tensors with NaN/inf, floats outside [0, 1] and non-uint8 integers are refused naming the
    modality; a 16-bit PIL image gives the feature of its 8-bit version, not of a white image
    (catches: a NaN feature returned, 0..255 floats taken as [0, 1], clipping)."""
    opts, weight, _, _ = trained
    predictor = Predictor(build_cfg("", opts), weight)
    x = torch.rand(2, 3, 64, 32)
    nan = x.clone()
    nan[1, 0, 0, 0] = float("nan")
    for bad, needle in ((nan, "NaN"), (x * 255, r"\[0, 1\]"), (x.int(), "int32"), (-x, r"\[0, 1\]")):
        with pytest.raises(ValueError, match="^ni: .*" + needle):
            predictor.embed(x, bad, None)
    ramp = np.linspace(0, 65535, 64 * 32).reshape(64, 32).astype(np.uint16)
    eight = Image.fromarray(np.rint(ramp / 257.0).astype(np.uint8)).convert("RGB")
    white = Image.new("RGB", (32, 64), (255, 255, 255))
    f16, f8, fw = (predictor.embed([im], [im], [im]) for im in (Image.fromarray(ramp), eight, white))
    torch.testing.assert_close(f16, f8)
    assert not torch.allclose(f16, fw, atol=1e-2)


def test_duplicate_yaml_keys_folders_and_zero_epochs_are_named(tmp_path):
    """A key given twice (top level or nested) names the key and both lines; a folder as config
    file says so; SOLVER.MAX_EPOCHS 0 is one line (catches: yaml keeping the second SOLVER block
    silently, SEED and MAX_EPOCHS falling back to the defaults, as before)."""
    top = tmp_path / "dup.yml"
    top.write_text("SOLVER:\n  SEED: 7\n  MAX_EPOCHS: 3\nMODEL:\n  DEVICE: cpu\nSOLVER:\n  BASE_LR: 0.1\n")
    nested = tmp_path / "nested.yml"
    nested.write_text("SOLVER:\n  SEED: 7\n  SEED: 8\n")
    with pytest.raises(ConfigError, match=r"dup.yml, line 6: the key SOLVER .*first on line 1"):
        build_cfg(str(top))
    with pytest.raises(ConfigError, match=r"line 3: the key SEED .*first on line 2"):
        build_cfg(str(nested))
    _assert_one_clear_error(_cli("lr_schedule.py", ["--config_file", str(top)]), "SOLVER", "line 6")
    _assert_one_clear_error(_cli("lr_schedule.py", ["--config_file", os.path.dirname(QUICKSTART)]),
                            "is a folder", ".yml")
    _assert_one_clear_error(_cli("lr_schedule.py", ["--config_file", QUICKSTART, "SOLVER.MAX_EPOCHS", "0"]),
                            "SOLVER.MAX_EPOCHS must be at least 1")


def test_queries_without_a_positive_are_counted_in_the_metric_line(trained, tmp_path):
    """The protocol drops queries with no positive; every metric line says how many (catches:
    'mAP 100.00 (24 queries ...)' computed on 6 of them without a word, as before). A file with
    some unknown identities is scored on the known ones (catches: no metrics at all, as before)."""
    distmat = np.array([[0.1, 0.9, 0.5], [0.2, 0.3, 0.4], [0.3, 0.2, 0.1]])
    metrics = distance_metrics(distmat, np.array([1, 2, 3]), np.array([1, 1, 4]),
                               np.array([0, 0, 0]), np.array([1, 1, 1]))
    assert metrics["num_valid_query"] == 1
    assert "(3 queries, 2 without a positive in the gallery, not counted (metrics over 1); " \
           "3 gallery" in format_metrics(metrics)
    full = distance_metrics(distmat, np.array([1, 1, 4]), np.array([1, 1, 4]),
                            np.array([0, 0, 0]), np.array([1, 1, 1]))
    assert "(3 queries, 3 gallery;" in format_metrics(full)  # nothing dropped: the line as before
    _, _, _, feats = trained
    data = dict(np.load(feats))
    keep = data["pids"] == data["pids"][0]
    gallery = tmp_path / "one_identity.npz"
    np.savez(gallery, **{k: (v[keep] if v.ndim and len(v) == len(keep) else v) for k, v in data.items()})
    proc = _cli("search.py", ["--gallery", str(gallery), "--query", feats, "--show", "0",
                              "--html", str(tmp_path / "p.html")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    dropped = int((data["pids"] != data["pids"][0]).sum())
    assert f"{dropped} without a positive in the gallery, not counted" in proc.stdout
    assert f"{dropped} without a positive" in (tmp_path / "p.html").read_text()
    # a file where 3 rows have no identity: the others are scored, the 3 are named as left out
    data["pids"][:3], data["camids"][:3] = -1, -1
    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, **data)
    proc = _cli("search.py", ["--gallery", str(mixed), "--query", str(mixed), "--show", "0"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"({len(keep) - 3} queries, " in proc.stdout and "[3 queries of unknown identity" in proc.stdout


# ---------------------------------------------------------------------------------------------
# One line for every misuse, before the work
# ---------------------------------------------------------------------------------------------
def test_size_test_and_folders_as_files_are_named(trained, tmp_path):
    """INPUT.SIZE_TEST other than the checkpoint's input size names the key and the size to set
    (catches: timm's 'Input height (128) doesn't match model (64)' assertion, as before); a
    folder as TEST.WEIGHT says so (was 'no such file')."""
    opts, weight, test_dir, _ = trained
    base = opts + ["--input", test_dir, "--output", str(tmp_path / "f.npz")]
    _assert_one_clear_error(_cli("embed.py", base + ["TEST.WEIGHT", weight, "INPUT.SIZE_TEST", "[128, 64]"]),
                            "INPUT.SIZE_TEST [128, 64]", "[64, 32]")
    _assert_one_clear_error(_cli("embed.py", base + ["TEST.WEIGHT", os.path.dirname(weight)]),
                            "TEST.WEIGHT", "is a folder", "model_best.pth")
    assert not (tmp_path / "f.npz").exists()


def test_other_tools_refuse_bad_outputs_and_counts(trained, tmp_path):
    """lr_schedule --plot, plot_results --output, visualize_ranks / visualize_tokens /
    probe_selection --output, model_size's counts and ablate --output: one line naming the option
    before any work (catches: the config or results.csv overwritten by a PNG, ablate's
    FileExistsError traceback, model_size's --num_classes 0 silently meaning the default)."""
    opts, weight, _, feats = trained
    config = tmp_path / "q.yml"
    config.write_text(open(QUICKSTART).read())
    results = tmp_path / "results.csv"
    results.write_text("row,mAP_mean,mAP_std\na,0.5,0.1\n")
    kept = {p: p.read_bytes() for p in (config, results)}
    model = opts + ["TEST.WEIGHT", weight]
    cases = [("lr_schedule.py", ["--config_file", str(config), "--plot", str(config)], ("--plot", "also the --config_file")),
             ("plot_results.py", [str(results), "--output", str(results)], ("--output", "also the csv file")),
             ("visualize_ranks.py", model + ["--output", str(config)], ("--output", "is a file, not a folder")),
             ("visualize_ranks.py", model + ["--topk", "0"], ("--topk 0",)),
             ("visualize_tokens.py", model + ["--output", str(config)], ("--output", "name a .png file")),
             ("probe_selection.py", model + ["--output", weight], ("--output", "also the TEST.WEIGHT file")),
             ("model_size.py", ["--config_file", QUICKSTART, "--num_classes", "0"], ("--num_classes 0",)),
             ("search.py", ["--gallery", feats, "--query", feats, "--top", "0"], ("--top 0",)),
             ("ablate.py", ["--grid", os.path.join(ROOT, "configs", "ablations", "gate_init_Synthetic.yml"),
                            "--output", str(results)], ("--output", "is a file, not a folder"))]
    for script, args, needles in cases:
        _assert_one_clear_error(_cli(script, args), *needles)
    assert all(p.read_bytes() == b for p, b in kept.items())
    assert _no_temporary_files(tmp_path) == []


def test_a_closed_stdout_pipe_ends_quietly():
    """``tools/lr_schedule.py ... | head -1``: the reader closing the pipe is no error (catches:
    'error: BrokenPipeError: [Errno 32] Broken pipe' and exit 1)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "lr_schedule.py"),
                             "--config_file", QUICKSTART], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("epoch,")
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "error" not in stderr, stderr
