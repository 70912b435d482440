"""tools/compare_runs.py through its command line, on tiny 1-epoch runs made to differ in exactly
one way (seed, config key, data), and on copies of a run whose manifest was edited (code,
libraries and device: compare_runs only reads the files)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, TINY_OPTS
from tools.compare_runs import verdict
from utils.visualization import categorical_color


def _train(out, root, *extra):
    proc = subprocess.run([sys.executable, "train_net.py", *TINY_OPTS, "SOLVER.MAX_EPOCHS", "1",
                           "DATASETS.ROOT_DIR", root, "OUTPUT_DIR", out, *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _compare(*args):
    return subprocess.run([sys.executable, "tools/compare_runs.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _verdict(proc):
    """The cause class of the last line (the part before "(also: ...)")."""
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("verdict: "), proc.stdout
    return last[len("verdict: "):]


def _main_cause(proc):
    """The verdict's first cause; a code difference may come along: other engineers' edits
    change this working tree between two runs."""
    cause, _, also = _verdict(proc).partition(" (also: ")
    assert also in ("", "different code)"), _verdict(proc)
    return cause


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    """Four 1-epoch runs: base, another seed, another learning rate, and the same config on a
    copy of the data with one training image one byte longer."""
    top = tmp_path_factory.mktemp("compare")
    grown_root = str(top / "data")
    shutil.copytree(synthetic_root, grown_root)
    rgb = os.path.join(grown_root, "Synthetic", "train_171", "RGB")
    with open(os.path.join(rgb, sorted(os.listdir(rgb))[0]), "ab") as f:
        f.write(b"\0")  # still a readable JPEG, another size
    base = _train(str(top / "base"), synthetic_root)
    evaluation = subprocess.run(
        [sys.executable, "test_net.py", *TINY_OPTS, "DATASETS.ROOT_DIR", synthetic_root,
         "OUTPUT_DIR", str(top / "eval"), "TEST.WEIGHT", os.path.join(base, "checkpoint_epoch1.pth")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    return {"base": base, "eval": str(top / "eval" / "test_results.json"),
            "seed": _train(str(top / "seed"), synthetic_root, "SOLVER.SEED", "7"),
            "lr": _train(str(top / "lr"), synthetic_root, "SOLVER.BASE_LR", "0.002"),
            "data": _train(str(top / "data_run"), grown_root),
            "top": top}


def _copy_with(runs, name, edit):
    """A copy of the base run whose summary.json went through ``edit(summary)``."""
    folder = runs["top"] / name
    shutil.copytree(runs["base"], folder)
    path = folder / "summary.json"
    summary = json.loads(path.read_text())
    edit(summary)
    path.write_text(json.dumps(summary))
    return folder


def test_a_run_and_its_copy_are_identical(runs):
    """Catches: OUTPUT_DIR, timings or the folder's own name reported as differences."""
    copy = runs["top"] / "copy"
    shutil.copytree(runs["base"], copy)
    proc = _compare(runs["base"], copy)
    assert _verdict(proc) == "identical"
    assert "config differences (0)" in proc.stdout and "manifest differences (0)" in proc.stdout
    assert "no metric differs by more than 1e-06 in the 1 epoch(s)" in proc.stdout


@pytest.fixture(scope="module")
def seed_comparison(runs):
    """compare_runs of the base run and the run with another seed."""
    return _compare(runs["base"], runs["seed"])


def test_seed_difference_is_named_as_such(seed_comparison):
    """Catches: a seed difference reported as a config difference (or not at all), and metrics
    that differ without the first differing epoch being named."""
    proc = seed_comparison
    assert _main_cause(proc) == "different seed"
    assert "SOLVER.SEED: 1111 | 7" in proc.stdout
    assert "first difference beyond 1e-06: epoch 1, test" in proc.stdout


def test_config_difference_names_the_key_not_the_folders(runs):
    """Catches: OUTPUT_DIR counted as a cause, and the changed key left out of the verdict."""
    proc = _compare(runs["base"], runs["lr"])
    assert _main_cause(proc) == "different config: SOLVER.BASE_LR"
    assert "SOLVER.BASE_LR: 0.001 | 0.002" in proc.stdout
    assert "OUTPUT_DIR" in proc.stdout  # listed, labelled as a location


def test_data_difference(runs):
    """Catches: a changed file unnoticed, DATASETS.ROOT_DIR named as a config cause, and the
    change attributed to the splits that did not change."""
    proc = _compare(runs["base"], runs["data"])
    assert _main_cause(proc) == "different data"
    assert "data.splits.train.files_hash" in proc.stdout
    assert "data.splits.query" not in proc.stdout and "data.splits.gallery" not in proc.stdout


def test_other_library_and_device_give_numerical_differences_only(runs):
    """Catches: an environment difference named as a code or config cause, and the 1e-6
    tolerance ignored (a 1e-7 change reported, a 1e-3 one missed)."""
    def other_machine(delta):
        def edit(summary):
            summary["manifest"]["libraries"]["torch"] = "9.9.9"
            summary["manifest"]["device"]["names"] = ["Another CPU"]
            summary["history"][0]["results"]["test"]["mAP"] += delta
        return edit

    tiny = _compare(runs["base"], _copy_with(runs, "lib_tiny", other_machine(1e-7)))
    assert _verdict(tiny) == "same inputs, numerical differences only"
    assert "no metric differs by more than 1e-06" in tiny.stdout
    assert "libraries.torch" in tiny.stdout and "device.names" in tiny.stdout
    real = _compare(runs["base"], _copy_with(runs, "lib_real", other_machine(1e-3)))
    assert _verdict(real) == "same inputs, numerical differences only"
    assert "first difference beyond 1e-06: epoch 1, test mAP" in real.stdout


def test_code_difference(runs):
    """Catches: another commit (or another uncommitted diff) left out of the comparison."""
    def edit(summary):
        summary["manifest"]["code"]["commit"] = "0" * 40
    proc = _compare(runs["base"], _copy_with(runs, "code", edit))
    assert _verdict(proc) == "different code"
    assert "code.commit" in proc.stdout


def test_precedence_of_the_causes():
    """Catches: the documented order broken, e.g. a data difference named first when a config
    key (VAL_IDS) or the seed (which draws the validation identities) explains it, the seed
    hidden in a real config difference, or a world-size change called numerical."""
    seed = {"SOLVER.SEED": (1, 2)}
    val = {"DATASETS.VAL_IDS": (0, 2), **seed}
    data = {"data.splits.train.files_hash": ("x", "y")}
    code = {"code.commit": ("a", "b")}
    env = {"libraries.torch": ("1", "2")}
    assert verdict(val, {**data, **code, **env}, True) == (
        "different config: DATASETS.VAL_IDS, SOLVER.SEED (also: different data, different code, "
        "other device/libraries)")
    assert verdict(seed, data, True) == "different seed (also: different data)"
    assert verdict({"OUTPUT_DIR": ("a", "b")}, {**code, **env}, True) == (
        "different code (also: other device/libraries)")
    assert verdict({}, {"world_size": (1, 2)}, True) == "different config: world_size"
    assert verdict({}, {}, True).startswith("same inputs, numerical differences only")
    assert verdict({"DATASETS.ROOT_DIR": ("a", "b")}, {}, False) == "identical"


def test_metrics_side_by_side_with_losses_from_the_log(runs, seed_comparison):
    """Catches: the loss columns empty because the log's epoch line is no longer parsed, and the
    two runs' columns swapped."""
    lines = seed_comparison.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "test mAP A" in line)
    assert "loss A" in lines[header] and "loss B" in lines[header]
    row = lines[header + 1].split()
    summaries = [json.loads(open(os.path.join(runs[k], "summary.json")).read())
                 for k in ("base", "seed")]
    maps = [f"{s['history'][0]['results']['test']['mAP'] * 100:.4f}" for s in summaries]
    assert row[0] == "1" and row[1:3] == maps
    for name, value in zip(("base", "seed"), row[5:7]):
        assert f"mean loss {value}" in open(os.path.join(runs[name], "log.txt")).read()


def test_plot_is_a_new_png_and_nothing_is_overwritten(runs, tmp_path):
    """Catches: an existing file or one of the inputs overwritten by --plot, and an empty plot
    (no curve in either run's colour)."""
    out = tmp_path / "cmp.png"
    proc = _compare(runs["base"], runs["seed"], "--plot", out)
    assert proc.returncode == 0, proc.stderr
    colours = {c for _, c in Image.open(out).convert("RGB").getcolors(1 << 20)}
    assert categorical_color(0) in colours and categorical_color(1) in colours
    before = out.read_bytes()

    again = _compare(runs["base"], runs["seed"], "--plot", out)
    assert again.returncode == 1 and f"error: --plot {out} exists" in again.stderr
    assert out.read_bytes() == before
    summary = os.path.join(runs["base"], "summary.json")
    content = open(summary, "rb").read()
    onto_input = _compare(summary, runs["seed"], "--plot", summary)
    assert onto_input.returncode == 1
    assert f"error: --plot {summary} is also the RUN_A file" in onto_input.stderr
    assert open(summary, "rb").read() == content


def test_bad_inputs_get_one_clear_line(runs, tmp_path):
    """Catches: a traceback instead of a line naming the path, and a wrong exit status."""
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    proc = _compare(empty, runs["base"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: RUN_A {empty}: no summary.json" in proc.stderr
    text = tmp_path / "notes.json"
    text.write_text("not json")
    proc = _compare(runs["base"], text)
    assert proc.returncode == 1 and f"error: RUN_B {text} is not a JSON file" in proc.stderr
    proc = _compare(runs["base"])
    assert proc.returncode == 2 and "RUN_B" in proc.stderr


def test_evaluations_compare_by_their_results(runs):
    """Catches: two test_results.json whose metrics differ called identical (the evaluation's
    results ignored because it has no per-epoch history)."""
    same = runs["top"] / "eval_copy.json"
    shutil.copy(runs["eval"], same)
    assert _verdict(_compare(runs["eval"], same)) == "identical"
    results = json.loads(open(runs["eval"]).read())
    results["results"]["none"]["R1"] += 1e-3
    other = runs["top"] / "eval_other.json"
    other.write_text(json.dumps(results))
    proc = _compare(runs["eval"], other)
    assert _verdict(proc).startswith("same inputs, numerical differences only")
    assert "first difference beyond 1e-06: epoch 0, test R1" in proc.stdout
