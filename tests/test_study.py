"""tools/ablate.py --study: a study's grids run together (a shared row once), REPORT.md against the
run folders' summary.json and a hand-computed Welch test, skip / --collect, the RGBNT201 dry run
with its GPU-hour estimate, and the gate values of an SDTPS run folder."""
import json
import math
import os
import re
import statistics
import subprocess
import sys

import pytest
import yaml
from scipy import stats as scipy_stats

from conftest import ROOT, TINY_OPTS
from test_ablate import ablate

# A stand-in for train_net.py (no torch: instant). It logs each call, and writes a summary.json
# whose metrics follow the run's options: test mAP = 100 x SOLVER.BASE_LR + SOLVER.WEIGHT_DECAY x
# seed (so BASE_LR sets a row's level and WEIGHT_DECAY its spread over the seeds).
FAKE_TRAINER = """
import json, os, sys
args = sys.argv
out = args[args.index("OUTPUT_DIR") + 1]
os.makedirs(out, exist_ok=True)
with open(CALLS, "a") as f:
    f.write(out + "\\n")
lr = float(args[args.index("SOLVER.BASE_LR") + 1])
wd = float(args[args.index("SOLVER.WEIGHT_DECAY") + 1])
seed = int(args[args.index("SOLVER.SEED") + 1])
m = 100 * lr + wd * seed
test = {"mAP": m, "R1": m + 0.05, "R5": m + 0.1, "R10": m + 0.15, "mINP": m - 0.05}
val = {k: v - 0.01 for k, v in test.items()}
best = {k: v - 0.02 for k, v in test.items()}
paper = {k: v + 0.03 for k, v in test.items()}
summary = {"last": {"epoch": 2, "results": {"val": val, "test": test}},
           "best": {"epoch": 1, "split": "val", "mAP": 0.1, "metrics": {"val": val, "test": best}},
           "best_test_paper_protocol": {"epoch": 1, "metrics": paper},
           "train_seconds": 1.0,
           "history": [{"epoch": 1, "results": {"val": val, "test": paper}},
                       {"epoch": 2, "results": {"val": val, "test": test}}],
           "manifest": {"code": {"commit": "abc123", "dirty": False},
                        "libraries": {"torch": "x"}, "device": {"type": "cpu", "names": ["fake"]}}}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f)
"""

LEVEL = {"ref": (0.001, 0.0001), "other": (0.002, 0.05), "third": (0.003, 0.0002)}


def _row(name, kind):
    lr, wd = LEVEL[kind]
    return {"name": name, "opts": ["SOLVER.BASE_LR", lr, "SOLVER.WEIGHT_DECAY", wd]}


def _test_map(kind, seed):
    lr, wd = LEVEL[kind]
    return 100 * lr + wd * seed


@pytest.fixture
def tiny_study(tmp_path, monkeypatch):
    """Two grids of 2 rows x 2 seeds; grid B's `ref_again` is grid A's `ref` (same config)."""
    calls = tmp_path / "calls.txt"
    trainer = tmp_path / "fake_train_net.py"
    trainer.write_text(FAKE_TRAINER.replace("CALLS", repr(str(calls))))
    monkeypatch.setattr(ablate, "TRAIN_NET", str(trainer))
    study = {"description": "tiny", "base": "configs/Synthetic/quickstart.yml",
             "opts": ["SOLVER.MAX_EPOCHS", 1], "seeds": [1, 2],
             "grids": [{"name": "A", "reference": "ref", "rows": [_row("ref", "ref"), _row("other", "other")]},
                       {"name": "B", "reference": "ref_again",
                        "rows": [_row("ref_again", "ref"), _row("third", "third")]}]}
    path = tmp_path / "tiny_study.yml"
    path.write_text(yaml.safe_dump(study))
    return str(path), tmp_path / "out", calls


def _welch_by_hand(a, b):
    """mean(a) - mean(b), its 95 % interval and p: Welch's formulas written out, p from scipy."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.mean(a) - statistics.mean(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    p = scipy_stats.ttest_ind(a, b, equal_var=False).pvalue
    return diff, diff - half, diff + half, p


def _p(p):
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _section(md, grid, title):
    """The lines of one selection's table of one contrast in REPORT.md."""
    part = md.split(f"## Contrast `{grid}`")[1].split("## Contrast")[0]
    return part.split(f"### {title}")[1].split("###")[0]


def test_tiny_study_shares_a_row_and_reports_the_summaries(tiny_study, capsys):
    """Catches: a shared row trained twice; REPORT.md cells not equal to the summary.json values
    (mean, sd, t interval); a Welch difference, interval or p that differs from the formulas; a
    reading that calls an interval containing 0 a difference."""
    study, out, calls = tiny_study
    assert ablate.main(["--study", study, "--output", str(out)]) == 0
    trained = calls.read_text().split()
    assert len(trained) == 6 and len(set(trained)) == 6  # 3 unique rows x 2 seeds, each once
    assert not (out / "B" / "ref_again").exists()  # read from A/ref's folders
    md = (out / "REPORT.md").read_text()
    summaries = {(row, s): json.loads((out / "A" / row / f"seed{s}" / "summary.json").read_text())
                 for row in ("ref", "other") for s in (1, 2)}
    for row in ("ref", "other"):
        values = [summaries[(row, s)]["last"]["results"]["test"]["mAP"] for s in (1, 2)]
        assert values == pytest.approx([_test_map(row, s) for s in (1, 2)])
        mean, sd = statistics.mean(values), statistics.stdev(values)
        half = scipy_stats.t.ppf(0.975, 1) * sd / math.sqrt(2)
        expected = f"{mean * 100:.2f} ± {sd * 100:.2f} [{(mean - half) * 100:.2f}, {(mean + half) * 100:.2f}]"
        assert f"| `{row}` | 2 | {expected} |" in _section(md, "A", "Last epoch")
    # grid A: other - ref, a wide interval (other's spread) containing 0
    a = [_test_map("other", s) for s in (1, 2)]
    b = [_test_map("ref", s) for s in (1, 2)]
    diff, low, high, p = _welch_by_hand(a, b)
    assert low < 0 < high
    cell = f"{diff * 100:+.2f} [{low * 100:+.2f}, {high * 100:+.2f}] | {_p(p)}"  # Holm over 1 row = p
    assert cell in _section(md, "A", "Last epoch").split("| `other` |")[1].splitlines()[0]
    assert "`other` vs `ref`, last epoch mAP: no detectable difference" in md
    # grid B: third - ref_again (= A's ref), tight: the interval excludes 0
    a = [_test_map("third", s) for s in (1, 2)]
    diff, low, high, p = _welch_by_hand(a, b)
    assert low > 0
    cell = f"{diff * 100:+.2f} [{low * 100:+.2f}, {high * 100:+.2f}] | {_p(p)}"
    assert cell in _section(md, "B", "Last epoch").split("| `third` |")[1].splitlines()[0]
    assert "`third` vs `ref_again`, last epoch mAP: higher" in md
    # the other selections: validation-selected (the fake best: test - 0.02), paper protocol (+0.03)
    ref_best = statistics.mean(_test_map("ref", s) - 0.02 for s in (1, 2))
    assert f"| `ref` | 2 | {ref_best * 100:.2f} ±" in _section(md, "A", "Validation-selected epoch")
    ref_paper = statistics.mean(_test_map("ref", s) + 0.03 for s in (1, 2))
    assert f"| `ref` | 2 | {ref_paper * 100:.2f} ±" in _section(md, "A", "Best test epoch")
    # per-grid tables, curves and the manifest
    assert (out / "A" / "results.md").is_file() and (out / "B" / "results.csv").is_file()
    from PIL import Image

    assert Image.open(out / "curves_A.png").size[0] > 300
    assert "![learning curves](curves_A.png)" in md
    assert "- code: abc123 (6 runs)" in md
    assert f"--study {study} --output {out}" in md  # the exact command, and how to rebuild it


def test_a_one_seed_contrast_reads_its_difference_against_the_seed_spread(tiny_study):
    """A convergence-style grid of one seed: its reading gives the difference of the two runs and
    sets it against the reference configuration's sd over seeds from the grid that has them.
    Catches: a one-seed contrast read as only "not testable" (the budget check says nothing), the
    spread taken from another row or grid than the reference's configuration, a ratio inverted."""
    study, out, calls = tiny_study
    spec = yaml.safe_load(open(study))
    spec["grids"].append({"name": "C", "reference": "third_once", "seeds": [1],
                          "rows": [_row("third_once", "third"), _row("ref_once", "ref")]})
    with open(study, "w") as f:
        yaml.safe_dump(spec, f)
    assert ablate.main(["--study", study, "--output", str(out)]) == 0
    assert len(calls.read_text().split()) == 6  # C's rows are B's third and A's ref, seed 1
    md = (out / "REPORT.md").read_text()
    diff = _test_map("ref", 1) - _test_map("third", 1)
    sd = statistics.stdev([_test_map("third", s) for s in (1, 2)])  # B's third, not A's ref
    assert sd != pytest.approx(statistics.stdev([_test_map("ref", s) for s in (1, 2)]))
    expected = (f"`ref_once` vs `third_once`, last epoch mAP: not testable (fewer than 2 finished "
                f"seeds in a row); difference of the means {diff * 100:+.2f} pp, {abs(diff) / sd:.1f} "
                f"times the reference's seed-to-seed sd ({sd * 100:.2f} pp over 2 seeds in grid `B`).")
    assert expected in md


def test_rerun_skips_and_collect_rebuilds_the_report(tiny_study, capsys):
    """Catches: a rerun that trains finished runs again; --collect (the real command) that does
    not rebuild REPORT.md from the run folders, or builds other numbers."""
    study, out, calls = tiny_study
    assert ablate.main(["--study", study, "--output", str(out)]) == 0
    first = (out / "REPORT.md").read_text()
    capsys.readouterr()
    assert ablate.main(["--study", study, "--output", str(out)]) == 0
    assert len(calls.read_text().split()) == 6  # nothing trained again
    assert capsys.readouterr().out.count("skipped (finished") == 6
    (out / "REPORT.md").unlink()
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ablate.py"), "--study", study,
                           "--output", str(out), "--collect"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(calls.read_text().split()) == 6
    again = (out / "REPORT.md").read_text()
    tables = lambda md: md.split("## Contrast", 1)[1]  # noqa: E731 - after the dated header
    assert tables(again) == tables(first)


def test_dry_run_of_the_RGBNT201_study_lists_runs_and_gpu_hours(tmp_path):
    """Catches: shared rows listed twice, a GPU-hour estimate not equal to epochs x the stated
    epoch time, a dry run that writes anything."""
    path = os.path.join(ROOT, "configs", "studies", "cosine_gate_RGBNT201.yml")
    with open(path) as f:
        study = yaml.safe_load(f)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "tools/ablate.py", "--study", path, "--output", str(out),
                           "--dry_run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    listed = re.findall(r"^# (\S+/seed\d+): run", done.stdout, re.M)
    # 4 + 3 + 4 + 4 rows x 3 seeds; gate_init's (0.5, 0.5) and gate_options' none are the
    # modules' sdtps+dgaf (its config's defaults)
    assert len(listed) == len(set(listed)) == (15 - 2) * 3
    from config import build_cfg

    configs = [r["config"] for g in study["grids"] for r in g["rows"] if "config" in r]
    epochs = sum(build_cfg(os.path.join(ROOT, c)).SOLVER.MAX_EPOCHS for c in configs) \
        + 5 * build_cfg(os.path.join(ROOT, "configs/RGBNT201/DeMo_SDTPS_DGAF_ablation.yml")).SOLVER.MAX_EPOCHS
    hours = epochs * 3 * study["cost"]["epoch_seconds"] / 3600
    assert f"estimated GPU-hours: {hours:.1f} for all 39 runs" in done.stdout
    assert "stated:" in done.stdout and "not measured here" in done.stdout
    assert not out.exists()


@pytest.mark.parametrize("change, message", [
    (lambda s: s["grids"][0].pop("reference"), "`reference:` (the row the others are compared with) is required"),
    (lambda s: s.update(cost={"epoch_seconds": 5}), "cost: needs exactly the keys"),
    (lambda s: s["grids"][1].update(name="A"), "duplicate grid name"),
    (lambda s: s.update(grid=[]), "unknown study key(s) grid"),
])
def test_malformed_study_files_fail_in_one_line(tiny_study, change, message):
    """Catches: a study without a reference per grid, a cost without its source, two grids
    writing one folder, a mistyped key, each run anyway or failing with a traceback."""
    study, out, calls = tiny_study
    content = yaml.safe_load(open(study))
    change(content)
    with open(study, "w") as f:
        yaml.safe_dump(content, f)
    done = subprocess.run([sys.executable, "tools/ablate.py", "--study", study, "--output", str(out),
                           "--dry_run"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_curve_averages_epochs_evaluated_by_every_seed():
    """Catches: a learning curve mixing epochs some seeds lack, or a band that is not the range."""
    from tools.ablation.study_report import curve

    history = lambda pairs: {"history": [{"epoch": e, "results": {"test": {"mAP": v}}} for e, v in pairs]}  # noqa: E731
    epochs, mean, low, high = curve([history([(2, 0.1), (4, 0.3)]), history([(2, 0.2), (3, 0.9), (4, 0.5)])],
                                    "test")
    assert epochs == [2, 4]
    assert mean == pytest.approx([0.15, 0.4]) and low == [0.1, 0.3] and high == [0.2, 0.5]


def test_gate_values_of_a_run_folder(tmp_path, synthetic_root, monkeypatch):
    """Catches: the end-of-run gates not read from the run's last checkpoint, a relative
    DATASETS.ROOT_DIR resolved from the wrong folder, a gate distribution summarised wrongly.
    The checkpoint holds the model at initialisation, so both distributions must be equal, and
    with GATE_NORM heads every gate is exactly 0.5 at initialisation (docs/sdtps.md)."""
    import torch

    from config import build_cfg
    from data.datasets import dataset_class
    from modeling.model import build_model
    from tools.ablation.gates import gate_values
    from utils.checkpoint import atomic_torch_save, with_checksum

    folder = tmp_path / "run"
    folder.mkdir()
    rel_root = os.path.relpath(synthetic_root, tmp_path)
    opts = list(TINY_OPTS) + ["DATASETS.ROOT_DIR", rel_root, "MODEL.SELECTION.NAME", "sdtps",
                              "MODEL.FUSION.NAME", "mean", "TEST.FEAT", "concat", "SOLVER.SEED", "3"]
    for norm in ("heads", "none"):
        cfg = build_cfg("", opts + ["MODEL.SDTPS.GATE_NORM", norm])
        (folder / "config.yaml").write_text(cfg.dump())
        (folder / "ablate_run.json").write_text(json.dumps({"attempts": [{"cwd": str(tmp_path)}]}))
        torch.manual_seed(cfg.SOLVER.SEED)
        model = build_model(cfg, *dataset_class(cfg.DATASETS.NAMES).train_size(cfg))
        atomic_torch_save(with_checksum({"model": model.state_dict(), "cfg": cfg.dump(), "epoch": 1}),
                          str(folder / "checkpoint_epoch1.pth"))
        monkeypatch.chdir(ROOT)  # not where the run's relative ROOT_DIR starts
        values = gate_values(str(folder), 1)
        assert values["init"] == values["end"]
        if norm == "heads":
            assert values["init"]["quantiles"] == pytest.approx([0.5] * 5, abs=1e-6)
        else:  # sigmoid(0.5 cos + 0.5) with cos in [-1, 1]
            assert 0.5 <= values["init"]["quantiles"][0] < values["init"]["quantiles"][-1] <= 0.732
        assert sum(values["init"]["density"]) / 40 == pytest.approx(1.0)
