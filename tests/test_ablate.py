"""tools/ablate.py: grid validation, dry run, skip/resume of finished runs and the aggregation.

One small true end-to-end grid (2 rows x 2 seeds of the tiny config, each run a train_net.py
subprocess) is shared by the tests of this module; the aggregation details are also checked on
hand-made summary.json files.
"""
import csv
import importlib.util
import json
import os
import statistics

import pytest
import yaml

from conftest import ROOT, TINY_OPTS

METRICS = ("mAP", "R1", "R5", "R10", "mINP")


def _load_ablate():
    spec = importlib.util.spec_from_file_location("ablate_tool", os.path.join(ROOT, "tools", "ablate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablate = _load_ablate()
from tools.ablation import plan as ablate_plan  # noqa: E402  (importable once ablate.py is loaded)


def tiny_grid_opts(synthetic_root):
    """The conftest tiny config as a grid's common opts, with a validation split."""
    return list(TINY_OPTS) + ["DATASETS.ROOT_DIR", synthetic_root, "DATASETS.VAL_IDS", "2",
                              "SOLVER.IMS_PER_BATCH", "4"]


def write_grid(path, rows, opts, seeds=(1, 2), base="configs/Synthetic/quickstart.yml"):
    path.write_text(yaml.safe_dump({"base": base, "opts": opts, "seeds": list(seeds), "rows": rows}))
    return str(path)


def read_csv(path):
    with open(path) as f:
        return {line["row"]: line for line in csv.DictReader(f)}


def read(path):
    with open(path) as f:
        return f.read()


def load_json(path):
    return json.loads(read(path))


def load_yaml(path):
    return yaml.safe_load(read(path))


def mtimes(paths):
    return {p: os.stat(p).st_mtime_ns for p in paths}


# ------------------------------------------------------------------------------ end to end
ROWS = [
    {"name": "base"},
    {"name": "sdtps_gate", "opts": ["MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "mean",
                                  "TEST.FEAT", "concat"],
     "init_scale": 0.9, "init_bias": 0.1},
]


@pytest.fixture(scope="module")
def grid_run(synthetic_root, tmp_path_factory):
    """Run the tiny grid once; returns (grid path, output folder, run folders, captured stdout)."""
    folder = tmp_path_factory.mktemp("ablate")
    grid = write_grid(folder / "tiny.yml", ROWS, tiny_grid_opts(synthetic_root))
    output = str(folder / "out")
    # One torch thread per training subprocess: the runs are tiny, and on a busy 2-core machine
    # oversubscribed threads make them many times slower.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        rc = ablate.main(["--grid", grid, "--output", output])
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    assert rc == 0
    runs = {f"{r['name']}/seed{s}": os.path.join(output, r["name"], f"seed{s}")
            for r in ROWS for s in (1, 2)}
    return grid, output, runs


def test_grid_runs_end_to_end(grid_run):
    grid, output, runs = grid_run
    for run in runs.values():
        assert os.path.isfile(os.path.join(run, "summary.json"))
        assert os.path.isfile(os.path.join(run, "stdout.log"))  # the subprocess output
        assert os.path.isfile(os.path.join(run, "ablate_run.json"))
    table = read_csv(os.path.join(output, "results.csv"))
    assert set(table) == {"base", "sdtps_gate"}
    for column in ["row", "seeds", "params_M", "train_seconds_mean"] + \
            [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]:
        assert column in table["base"]
    md = read(os.path.join(output, "results.md"))
    assert f"--grid {grid}" in md and "tools/ablate.py" in md and "date:" in md
    assert "| base | 2 |" in md and " ± " in md and "ddof=1" in md


def test_results_equal_the_per_run_summaries(grid_run):
    _, output, runs = grid_run
    table = read_csv(os.path.join(output, "results.csv"))
    for row in ("base", "sdtps_gate"):
        summaries = [load_json(os.path.join(runs[f"{row}/seed{s}"], "summary.json")) for s in (1, 2)]
        line = table[row]
        assert int(line["seeds"]) == 2 and line["best_selected_on"] == "val"
        for m in METRICS:
            last = [s["last"]["results"]["test"][m] for s in summaries]
            best = [s["best"]["metrics"]["test"][m] for s in summaries]
            assert float(line[f"{m}_mean"]) == pytest.approx(statistics.mean(last), abs=1e-9)
            assert float(line[f"{m}_std"]) == pytest.approx(statistics.stdev(last), abs=1e-9)
            assert float(line[f"best_{m}_mean"]) == pytest.approx(statistics.mean(best), abs=1e-9)
            assert float(line[f"best_{m}_std"]) == pytest.approx(statistics.stdev(best), abs=1e-9)
        seconds = [s["train_seconds"] for s in summaries]
        assert float(line["train_seconds_mean"]) == pytest.approx(statistics.mean(seconds), abs=1e-9)
        logged = read(os.path.join(runs[f"{row}/seed1"], "log.txt"))
        millions = float(logged.split("model: ")[1].split(" M parameters")[0])
        assert float(line["params_M"]) == pytest.approx(millions, abs=0.005)
        for key in ("fg_precision", "fg_share", "fg_best"):
            if row == "base":  # no token selection: no foreground precision
                assert line[f"{key}_mean"] == "n/a"
            else:
                values = [s["last"]["results"]["test"][key] for s in summaries]
                assert float(line[f"{key}_mean"]) == pytest.approx(statistics.mean(values), abs=1e-9)
    md = read(os.path.join(output, "results.md"))
    fg_line = f"{float(table['sdtps_gate']['fg_precision_mean']) * 100:.2f} ± "
    assert "## Kept-token foreground precision" in md and f"| sdtps_gate | 2 | {fg_line}" in md


def test_init_scale_and_bias_reach_each_runs_config(grid_run):
    _, _, runs = grid_run
    for name, folder in runs.items():
        model = load_yaml(os.path.join(folder, "config.yaml"))["MODEL"]
        sdtps = model["SDTPS"]
        if name.startswith("sdtps_gate"):
            assert (sdtps["GATE_INIT_SCALE"], sdtps["GATE_INIT_BIAS"]) == (0.9, 0.1)
            assert model["SELECTION"]["NAME"] == "sdtps"
        else:
            assert (sdtps["GATE_INIT_SCALE"], sdtps["GATE_INIT_BIAS"]) == (0.5, 0.5)
        seed = load_yaml(os.path.join(folder, "config.yaml"))["SOLVER"]["SEED"]
        assert seed == int(name[-1])


def test_second_invocation_skips_every_finished_run(grid_run, capsys):
    grid, output, runs = grid_run
    watched = [os.path.join(r, n) for r in runs.values() for n in ("summary.json", "stdout.log", "log.txt")]
    before = mtimes(watched)
    capsys.readouterr()
    assert ablate.main(["--grid", grid, "--output", output]) == 0
    out = capsys.readouterr().out
    assert mtimes(watched) == before  # nothing trained, nothing logged by train_net
    assert out.count("skipped (finished") == 4 and "training ->" not in out and "resuming" not in out
    assert read(os.path.join(output, "ablate.log")).count("skipped (finished") >= 4


def test_deleting_a_summary_reruns_only_that_run(grid_run, capsys):
    grid, output, runs = grid_run
    target = runs["sdtps_gate/seed2"]
    others = [os.path.join(r, n) for k, r in runs.items() if k != "sdtps_gate/seed2"
              for n in ("summary.json", "stdout.log")]
    before = mtimes(others)
    os.remove(os.path.join(target, "summary.json"))
    capsys.readouterr()
    assert ablate.main(["--grid", grid, "--output", output]) == 0
    out = capsys.readouterr().out
    assert os.path.isfile(os.path.join(target, "summary.json"))
    assert mtimes(others) == before
    assert out.count("skipped (finished") == 3
    assert out.count("resuming ->") == 1 and "sdtps_gate/seed2: resuming" in out  # from its checkpoint
    stamp = load_json(os.path.join(target, "ablate_run.json"))
    assert [a["resume"] for a in stamp["attempts"]] == [False, True]


def test_an_attempt_that_left_no_checkpoint_is_run_again(tmp_path, synthetic_root, capsys):
    """A run whose earlier attempt failed before its first checkpoint (its folder holds a log
    only) trains from scratch (catches train_net.py refusing the occupied folder)."""
    grid = write_grid(tmp_path / "g.yml", [{"name": "base"}], tiny_grid_opts(synthetic_root)
                      + ["SOLVER.MAX_EPOCHS", 1], seeds=(1,))
    folder = tmp_path / "out" / "base" / "seed1"
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text("an attempt that died while loading the data\n")
    assert ablate.main(["--grid", grid, "--output", str(tmp_path / "out")]) == 0
    assert (folder / "summary.json").is_file()
    assert "starting from scratch" in read(folder / "log.txt")


def _metric_rows(output):
    keep = [k for k in read_csv(os.path.join(output, "results.csv"))["base"] if k.startswith("last_")]
    return {row: {k: line[k] for k in keep} for row, line in read_csv(os.path.join(output, "results.csv")).items()}


def _attempt_window(folder):
    attempt = load_json(os.path.join(folder, "ablate_run.json"))["attempts"][-1]
    return attempt["start"], attempt["end"]


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_parallel_and_slurm_launchers_give_the_sequential_table(grid_run, tmp_path, monkeypatch,
                                                                launcher, capsys):
    """--max-parallel 2 runs the grid two at a time (the attempts overlap), and the Slurm launcher
    (submitit's local executor) submits every run as a job; both give the sequential run's table
    to every digit (catches a launcher that mixes up folders, seeds or opts)."""
    grid, output, runs = grid_run
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as the sequential grid ran
    out = tmp_path / launcher
    extra = ["--max-parallel", "2"]
    if launcher == "slurm":
        extra += ["--launcher", "slurm", "--submitit-cluster", "local", "--time-min", "10",
                  "--cpus-per-run", "1"]
    capsys.readouterr()
    assert ablate.main(["--grid", grid, "--output", str(out)] + extra) == 0
    log = capsys.readouterr().out
    assert _metric_rows(str(out)) == _metric_rows(output)
    folders = [os.path.join(out, r["name"], f"seed{s}") for r in ROWS for s in (1, 2)]
    if launcher == "local":
        windows = sorted(_attempt_window(f) for f in folders)
        assert windows[1][0] < windows[0][1]  # the second run started before the first ended
        assert log.count("(OMP_NUM_THREADS=") == 4
    else:
        assert "submitted 4 job(s) (local)" in log
        jobs = [d for d in os.listdir(out / "slurm") if d.isdigit()]
        assert len(jobs) == 4  # one submitit folder per job (named by its id)


def test_collect_builds_the_table_without_running(grid_run, capsys):
    grid, output, runs = grid_run
    watched = [os.path.join(r, n) for r in runs.values() for n in ("summary.json", "log.txt")]
    before = mtimes(watched)
    table = read(os.path.join(output, "results.csv"))
    os.remove(os.path.join(output, "results.csv"))
    assert ablate.main(["--grid", grid, "--output", output, "--collect"]) == 0
    assert mtimes(watched) == before and read(os.path.join(output, "results.csv")) == table


# ------------------------------------------------------------------------------ no training
def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, synthetic_root, capsys):
    grid = write_grid(tmp_path / "g.yml", ROWS, tiny_grid_opts(synthetic_root), seeds=(1, 2))
    output = tmp_path / "out"
    assert ablate.main(["--grid", grid, "--output", str(output), "--dry_run", "--seeds", "7"]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if "train_net.py" in line]
    assert len(commands) == 2  # 2 rows x the one --seeds override
    assert all("SOLVER.SEED 7" in c and "--config_file" in c for c in commands)
    assert "--init_scale 0.9 --init_bias 0.1" in commands[1]
    assert f"OUTPUT_DIR {output}/sdtps_gate/seed7" in commands[1]
    assert not output.exists()


def test_a_row_may_name_its_own_config(tmp_path, synthetic_root, capsys):
    """`config:` replaces the base for that row (the RGBNT201 grids run the write-up's four
    configs so); its settings reach the planned run, and a missing file is a clear error."""
    own = tmp_path / "own.yml"
    own.write_text("_BASE_: " + os.path.join(ROOT, "configs", "Synthetic", "quickstart.yml")
                   + "\nMODEL:\n  SELECTION:\n    NAME: sdtps\n  FUSION:\n    NAME: mean\n")
    rows = [{"name": "base_row"}, {"name": "own_row", "config": str(own)}]
    grid = write_grid(tmp_path / "g.yml", rows, tiny_grid_opts(synthetic_root), seeds=(1,))
    runs = ablate.plan_runs(ablate.load_grid(grid), str(tmp_path / "out"))
    by_row = {run.row.name: run for run in runs}
    assert by_row["own_row"].config["MODEL.SELECTION.NAME"] == "sdtps"
    assert by_row["base_row"].config["MODEL.SELECTION.NAME"] == "none"
    assert by_row["own_row"].args[:2] == ["--config_file", str(own)]
    missing = write_grid(tmp_path / "m.yml", [{"name": "x", "config": "no/such.yml"}],
                         tiny_grid_opts(synthetic_root))
    assert ablate.main(["--grid", missing, "--output", str(tmp_path / "o"), "--dry_run"]) == 2
    assert "config not found: no/such.yml" in capsys.readouterr().err


def test_unknown_config_key_fails_before_anything_runs(tmp_path, synthetic_root, capsys):
    rows = ROWS + [{"name": "typo", "opts": ["MODEL.SDTPS.GATE_NROM", True]}]
    grid = write_grid(tmp_path / "bad.yml", rows, tiny_grid_opts(synthetic_root))
    output = tmp_path / "out"
    assert ablate.main(["--grid", grid, "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "MODEL.SDTPS.GATE_NROM" in err and "typo" in err and "nothing was run" in err
    assert not output.exists()


@pytest.mark.parametrize("content, message", [
    ({"rows": [{"name": "a", "opts": ["OUTPUT_DIR", "x"]}]}, "OUTPUT_DIR"),
    ({"rows": [{"name": "a", "opts": ["SOLVER.SEED", 3]}]}, "SOLVER.SEED"),
    ({"rows": [{"name": "a", "init_scal": 1.0}]}, "init_scal"),
    ({"rows": [{"name": "a"}, {"name": "a"}]}, "duplicate row"),
    ({"rows": [{"name": "a/b"}]}, "folder name"),
    ({"rows": [{"name": "a", "opts": ["MODEL.SELECTION.NAME"]}]}, "odd number"),
    ({"row": [{"name": "a"}]}, "unknown grid key"),
])
def test_malformed_grids_fail_clearly(tmp_path, capsys, content, message):
    content = {"base": "configs/Synthetic/quickstart.yml", "seeds": [1], **content}
    path = tmp_path / "g.yml"
    path.write_text(yaml.safe_dump(content))
    assert ablate.main(["--grid", str(path), "--output", str(tmp_path / "out"), "--dry_run"]) == 2
    assert message in capsys.readouterr().err


def _fake_summary(values, best_split="val", epoch=2):
    metrics = {m: values + i / 100 for i, m in enumerate(METRICS)}
    best_metrics = {m: v - 0.01 for m, v in metrics.items()}
    return {"last": {"epoch": epoch, "results": {"val": metrics, "test": metrics}},
            "best": {"epoch": epoch - 1, "split": best_split, "mAP": 0.5,
                     "metrics": {"val": best_metrics, "test": best_metrics}},
            "train_seconds": 10.0 * values}


def test_aggregation_of_hand_made_summaries(tmp_path):
    rows = [{"name": "three"}, {"name": "one"}, {"name": "testbest"}]
    grid = ablate.load_grid(write_grid(tmp_path / "g.yml", rows, [], seeds=(1, 2, 3)))
    runs = ablate.plan_runs(grid, str(tmp_path / "out"))
    values = {("three", 1): 0.2, ("three", 2): 0.25, ("three", 3): 0.4, ("one", 1): 0.3,
              ("testbest", 1): 0.5, ("testbest", 2): 0.6}
    for run in runs:
        key = (run.row.name, run.seed)
        if key not in values:
            continue  # unfinished: left out of the means and listed as missing
        os.makedirs(run.folder)
        ablate.write_stamp(run, {})
        split = "test" if key == ("testbest", 2) else "val"
        with open(os.path.join(run.folder, "summary.json"), "w") as f:
            json.dump(_fake_summary(values[key], split), f)
    table = {line["row"]: line for line in ablate.aggregate(grid, runs, with_params=False)}
    ablate.write_results(grid, list(table.values()), str(tmp_path / "out"), "python tools/ablate.py x")
    csv_table = read_csv(tmp_path / "out" / "results.csv")

    three = [values[("three", s)] for s in (1, 2, 3)]
    line = csv_table["three"]
    assert line["seeds"] == "3" and line["seed_list"] == "1 2 3" and line["missing_seeds"] == ""
    for i, m in enumerate(METRICS):
        assert float(line[f"{m}_mean"]) == pytest.approx(statistics.mean(v + i / 100 for v in three), abs=1e-12)
        assert float(line[f"{m}_std"]) == pytest.approx(statistics.stdev(three), abs=1e-12)  # ddof=1
        assert float(line[f"best_{m}_mean"]) == pytest.approx(
            statistics.mean(v + i / 100 - 0.01 for v in three), abs=1e-12)
    assert float(line["train_seconds_mean"]) == pytest.approx(statistics.mean(10 * v for v in three))
    assert float(line["best_epoch_mean"]) == 1.0

    one = csv_table["one"]  # a single seed: std n/a; seeds 2 and 3 missing
    assert one["seeds"] == "1" and one["missing_seeds"] == "2 3"
    assert float(one["mAP_mean"]) == pytest.approx(0.3) and one["mAP_std"] == "n/a"

    mixed = csv_table["testbest"]  # one seed's best was chosen on the test split: no best reported
    assert mixed["best_selected_on"] == "n/a" and mixed["best_mAP_mean"] == "n/a"
    assert float(mixed["mAP_mean"]) == pytest.approx(0.55)

    md = (tmp_path / "out" / "results.md").read_text()
    mean, std = statistics.mean(three) * 100, statistics.stdev(three) * 100
    assert f"| three | 3 | {mean:.2f} ± {std:.2f} |" in md
    assert "| one | 1 | 30.00 ± n/a |" in md
    assert "| testbest | 2 | n/a | n/a |" in md
    assert "NOT FINISHED" in md and "one (seeds 2 3)" in md
    assert "python tools/ablate.py x" in md


def test_changed_config_makes_a_run_stale_and_checkpoints_resume(tmp_path):
    rows = [{"name": "a"}]
    grid = ablate.load_grid(write_grid(tmp_path / "g.yml", rows, ["SOLVER.MAX_EPOCHS", 3], seeds=(1,)))
    (run,) = ablate.plan_runs(grid, str(tmp_path / "out"))
    assert ablate.inspect_run(run).state == "new"
    os.makedirs(run.folder)
    ablate.write_stamp(run, {})
    open(os.path.join(run.folder, "checkpoint_epoch1.pth"), "w").close()
    assert ablate.inspect_run(run).state == "resume"
    with open(os.path.join(run.folder, "summary.json"), "w") as f:
        json.dump(_fake_summary(0.3), f)
    assert ablate.inspect_run(run).state == "finished"

    grid = ablate.load_grid(write_grid(tmp_path / "g.yml", rows, ["SOLVER.MAX_EPOCHS", 4], seeds=(1,)))
    (changed,) = ablate.plan_runs(grid, str(tmp_path / "out"))
    assert changed.folder == run.folder and changed.hash != run.hash
    ablate.inspect_run(changed)
    assert changed.state == "stale" and "SOLVER.MAX_EPOCHS: 3 -> 4" in changed.detail


def _save_run_config(run, flat):
    """What train_net.py (config.yaml) and ablate (the stamp) record for a run made with ``flat``."""
    nested = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    with open(os.path.join(run.folder, "config.yaml"), "w") as f:
        yaml.safe_dump(nested, f)
    with open(os.path.join(run.folder, ablate_plan.STAMP)) as f:
        stamp = json.load(f)
    stamp.update(config=flat, config_hash=ablate_plan.config_hash(flat))
    with open(os.path.join(run.folder, ablate_plan.STAMP), "w") as f:
        json.dump(stamp, f)


def test_a_key_added_to_the_defaults_keeps_a_finished_run(tmp_path):
    """Catches: runs matched by hash equality (a newer commit's default key would retrain a whole
    study), and the opposite slips: a new key at a non-default value, or a key removed since the
    run, accepted as unchanged."""
    grid = ablate.load_grid(write_grid(tmp_path / "g.yml", [{"name": "a"}], ["SOLVER.MAX_EPOCHS", 3], seeds=(1,)))
    (run,) = ablate.plan_runs(grid, str(tmp_path / "out"))
    os.makedirs(run.folder)
    ablate.write_stamp(run, {})
    with open(os.path.join(run.folder, "summary.json"), "w") as f:
        json.dump(_fake_summary(0.3), f)

    older = {k: v for k, v in run.config.items() if k != "TEST.QUERY_MISS"}  # made before that key
    _save_run_config(run, older)
    ablate.inspect_run(run)
    assert run.state == "finished" and "TEST.QUERY_MISS" in run.detail

    not_default = {k: v for k, v in run.config.items() if k != "SOLVER.MAX_EPOCHS"}  # 3, default 50
    _save_run_config(run, not_default)
    ablate.inspect_run(run)
    assert run.state == "stale" and "SOLVER.MAX_EPOCHS: '<absent>' -> 3" in run.detail

    removed = dict(run.config, **{"MODEL.GONE_OPTION": 1})
    _save_run_config(run, removed)
    ablate.inspect_run(run)
    assert run.state == "stale" and "MODEL.GONE_OPTION: 1 -> '<absent>'" in run.detail


# A stand-in for train_net.py (no torch import: instant): "broken" rows crash, "slow" rows wait
# for SIGTERM, the others write a summary.json.
FAKE_TRAINER = """
import json, os, signal, sys, time
out = sys.argv[sys.argv.index("OUTPUT_DIR") + 1]
os.makedirs(out, exist_ok=True)
if "broken" in out:
    sys.exit("boom: simulated crash")
if "slow" in out:
    def stop(signum, frame):
        open(os.path.join(out, "got_sigterm"), "w").close()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    open(os.path.join(out, "started"), "w").close()
    time.sleep(60)
    sys.exit(2)
with open(os.path.join(out, "summary.json"), "w") as f:
    f.write(SUMMARY)
"""


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
    path = tmp_path / "fake_train_net.py"
    path.write_text(FAKE_TRAINER.replace("SUMMARY", repr(json.dumps(_fake_summary(0.3)))))
    monkeypatch.setattr(ablate, "TRAIN_NET", str(path))
    return path


def test_a_crashing_run_does_not_stop_the_grid(tmp_path, fake_trainer, capsys):
    grid = write_grid(tmp_path / "g.yml", [{"name": "broken"}, {"name": "ok"}], [], seeds=(1, 2))
    output = tmp_path / "out"
    assert ablate.main(["--grid", grid, "--output", str(output)]) == 1
    out = capsys.readouterr().out
    assert out.count("FAILED") == 2 and "boom: simulated crash" in out
    assert "boom: simulated crash" in (output / "broken" / "seed1" / "stdout.log").read_text()
    table = read_csv(output / "results.csv")
    assert table["ok"]["seeds"] == "2" and float(table["ok"]["mAP_mean"]) == pytest.approx(0.3)
    assert table["broken"]["seeds"] == "0" and table["broken"]["missing_seeds"] == "1 2"
    assert "NOT FINISHED" in (output / "results.md").read_text()
    capsys.readouterr()
    assert ablate.main(["--grid", grid, "--output", str(output)]) == 1  # retries only the failures
    out = capsys.readouterr().out
    assert out.count("FAILED") == 2 and out.count("skipped (finished") == 2


def test_sigterm_is_forwarded_and_stops_the_grid(tmp_path, fake_trainer, capsys):
    import signal
    import threading
    import time

    grid = write_grid(tmp_path / "g.yml", [{"name": "slow"}, {"name": "ok"}], [], seeds=(1,))
    output = tmp_path / "out"
    started = output / "slow" / "seed1" / "started"

    def send_sigterm():
        deadline = time.time() + 30
        while not started.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=send_sigterm)
    thread.start()
    try:
        assert ablate.main(["--grid", grid, "--output", str(output)]) == 143
    finally:
        thread.join()
    assert (output / "slow" / "seed1" / "got_sigterm").exists()  # the training got the signal
    assert not (output / "ok").exists()  # and the grid stopped
    assert "stopped by SIGTERM" in capsys.readouterr().out
