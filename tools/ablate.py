"""Run an ablation grid (rows x seeds) of train_net.py and tabulate mean +- std over seeds.

    python tools/ablate.py --grid configs/ablations/modules_Synthetic.yml
    python tools/ablate.py --grid G.yml --output DIR --seeds 1 2 3 --dry_run
    python tools/ablate.py --grid G.yml --max-parallel 8 --gpus-per-run 1      # one run per GPU
    python tools/ablate.py --grid G.yml --launcher slurm --partition gpu --gpus-per-run 1 \
        --max-parallel 16 --time-min 600                                       # a Slurm array
    python tools/ablate.py --grid G.yml --collect       # only the table, from the run folders
    python tools/ablate.py --study configs/studies/cosine_gate_Synthetic.yml [--dry_run|--collect]

A grid file (yaml) names a base config, common overrides, the rows and the seeds::

    base: configs/Synthetic/quickstart.yml   # relative to the working directory or the repo root
    opts: [SOLVER.MAX_EPOCHS, 8, DATASETS.VAL_IDS, 10]   # KEY VALUE list (or a mapping)
    seeds: [1, 2, 3]                          # each seed sets SOLVER.SEED
    reference: mean_fusion                    # optional: the row the others are compared with
    rows:
      - name: mean_fusion
        opts: [MODEL.FUSION.NAME, mean]       # overrides the common opts
      - name: gate_1.0_0.0
        init_scale: 1.0                       # train_net.py --init_scale
        init_bias: 0.0                        # train_net.py --init_bias
      - name: dgaf
        config: configs/RGBNT201/DeMo_DGAF_ablation.yml   # this row's config instead of base

(An optional ``description:`` string is allowed at the top and in each row.)

Every row x seed is its own run folder ``<output>/<row>/seed<k>`` (default output:
``output/ablations/<grid file name>``), trained by ``python train_net.py ...`` in a fresh
subprocess (a crash does not stop the grid; memory is released between runs). The subprocess
output goes to ``<run>/stdout.log`` (train_net.py also writes its own ``log.txt`` there).

Before anything runs, every row's config is resolved with ``config.build_cfg``; a bad key or value
stops the grid, naming the row and the key. A run folder is stamped (``ablate_run.json``) with
the run's resolved config and its hash (all keys except OUTPUT_DIR). Re-running the same command:

* finished runs (``summary.json`` present and the config matches, see below) are skipped;
* unfinished runs with checkpoints are continued with ``--resume``;
* folders whose config no longer matches (a key's value changed in the grid, base file or
  defaults, or a key was removed) are moved aside to ``<run>.stale-<time>`` (never deleted) and
  trained again; the changed keys are logged. A key the defaults gained after the run, at its
  default value, is not a change: the run is kept, and the dry run names the key.

So an interrupted grid resumes where it stopped. SIGTERM is forwarded to the running trainings
(each checkpoints and exits); rerun the same command to continue.

Launchers: ``local`` (default) trains here, ``--max-parallel N`` runs at a time, each pinned to its
own ``--gpus-per-run G`` GPUs (``CUDA_VISIBLE_DEVICES``) or, with G = 0, sharing the CPU (each
with cores / N threads). ``slurm`` submits the unfinished runs as one job array through submitit
(``--partition``, ``--time-min``, ``--cpus-per-run``, ``--gpus-per-run``; ``--max-parallel`` is the
array's parallelism), waits for them and writes the same table; the job logs go to
``<output>/slurm/``. The skip / resume / stale rules are the same for both, and ``--collect``
writes the table of a grid whose runs went elsewhere.

Results go to ``<output>/results.csv`` and ``<output>/results.md``, one line per row:

* mean and sample standard deviation (ddof=1) over the finished seeds of mAP, R1, R5, R10 and mINP
  on the TEST split, (a) at the last epoch and (b) at the epoch selected on the VALIDATION split
  (``best`` of summary.json with ``split == "val"``). When any seed's best was chosen on the test
  split (no DATASETS.VAL_IDS), the best columns say ``n/a``: a test-selected best is optimistic
  and is not reported there.
* for comparison with published tables only, (c) the paper's protocol: the test metrics of the
  epoch with the highest test mAP (summary.json's ``best_test_paper_protocol``), in its own,
  labelled section (``paper_*`` columns of results.csv).
  With a single finished seed the std is ``n/a`` (undefined for ddof=1).
* ``params_M``: parameters of the built model (``modeling.model_size.count_parameters`` on the
  meta device, from the run's config.yaml and its dataset's identity/camera counts; falls back to
  the 2-decimal count logged by train_net.py when the dataset is not readable here);
* ``train_seconds_mean``: mean of summary.json's ``train_seconds`` (a resumed run counts only its
  final attempt: such rows are flagged).
* statistics of the last epoch's test metrics (``tools/ablation/stats.py``, scipy's t
  distribution): the 95 % confidence interval of the mean (t with n-1 degrees of freedom;
  ``<metric>_ci_low/high``); against the grid's ``reference`` row, the difference of the means
  with its 95 % interval and Welch's two-sided p-value (Welch-Satterthwaite degrees of freedom;
  ``<metric>_diff``, ``_diff_low/high``, ``_p``), Holm-adjusted over the grid's other rows for each
  metric (``<metric>_p_holm``); with fewer than 2 seeds in a row (or in the reference) these are
  n/a (``-`` in results.md);
* ``<metric>_inflation``: the paper protocol's test metric minus the last epoch's, mean over the
  seeds (how much selecting the epoch on the test split flatters the row).

results.csv holds fractions (0-1, as in summary.json) at full precision; results.md shows
percent with 2 decimals, the command line that produced it and the date. ``--dry_run`` validates
the grid and prints what would run (and the commands) without touching anything.

A study (``--study``, ``configs/studies/``) is several grids run as one: a row shared by
grids (same resolved config) runs once, every run goes through the same launchers and skip /
resume rules, each grid gets its results.csv / results.md in ``<output>/<grid>/``, and the study
one REPORT.md with plots in ``<output>`` (default ``output/studies/<study name>``);
``--dry_run`` also prints the estimated cost from the study's stated epoch time, and
``--collect`` rebuilds the tables and REPORT.md from the run folders (also while the study runs).
See tools/ablation/study.py and docs/study.md.

This file is the command line; the work is done by ``tools/ablation/``: ``grid.py`` (the grid
file), ``plan.py`` (runs, folder states, stamps), ``launch.py`` (local and Slurm launchers),
``aggregate.py`` (summary.json values per row), ``stats.py`` (statistics: intervals,
Welch p-values, Holm), ``report.py`` (tables), ``study.py`` (study files), ``study_report.py``,
``figures.py`` and ``gates.py`` (a study's REPORT.md, its plots and gate values).
"""

import argparse
import os
import shlex
import signal
import sys
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools.ablation.aggregate import aggregate  # noqa: E402
from tools.ablation.grid import GridError, load_grid  # noqa: E402
from tools.ablation.launch import Console, Forward, grid_lock, launch_local, launch_slurm  # noqa: E402
from tools.ablation.plan import TRAIN_NET, Run, inspect_run, plan_runs, write_stamp  # noqa: E402
from tools.ablation.report import write_results  # noqa: E402
from tools.ablation.study import estimate_line, load_study, plan_study, shared_with  # noqa: E402
from tools.ablation.study_report import write_report  # noqa: E402
from utils.outputs import OutputPathError, check_output_folder  # noqa: E402

# Also importable from here (the tests use them; TRAIN_NET may be replaced by a stand-in).
__all__ = ["main", "load_grid", "plan_runs", "inspect_run", "write_stamp", "aggregate",
           "write_results", "TRAIN_NET"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--grid", metavar="FILE", help="grid yaml (configs/ablations/)")
    source.add_argument("--study", metavar="FILE",
                        help="study yaml (configs/studies/): its grids, run together, one REPORT.md")
    parser.add_argument("--output", default="", metavar="DIR",
                        help="output folder (default: output/ablations/<grid name>, "
                             "output/studies/<study name>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="override the grid's seeds (each sets SOLVER.SEED)")
    parser.add_argument("--dry_run", action="store_true",
                        help="validate the grid, print each run's state and command; run nothing")
    parser.add_argument("--verbose", action="store_true",
                        help="also stream the training output to the terminal (sequential runs)")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: train here; slurm: submit each run as a Slurm job (submitit)")
    parser.add_argument("--max-parallel", type=int, default=1, metavar="N",
                        help="runs at the same time (local: concurrent processes; slurm: the "
                             "array's parallelism)")
    parser.add_argument("--gpus-per-run", type=int, default=0, metavar="G",
                        help="GPUs of each run (local: disjoint CUDA_VISIBLE_DEVICES sets; 0: "
                             "the runs share the CPU threads / devices)")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: build results.csv / results.md (and a study's "
                             "REPORT.md) from the run folders (a grid that ran elsewhere, a "
                             "study still running)")
    parser.add_argument("--no-gates", action="store_true",
                        help="study report without the gate values (no model is built)")
    slurm = parser.add_argument_group("slurm (--launcher slurm)")
    slurm.add_argument("--partition", default="", help="Slurm partition")
    slurm.add_argument("--time-min", type=int, default=24 * 60, metavar="MIN",
                       help="time limit of each job in minutes (default 1440)")
    slurm.add_argument("--cpus-per-run", type=int, default=8, metavar="C")
    slurm.add_argument("--submitit-cluster", default=None, choices=("slurm", "local", "debug"),
                       help="submitit's executor (default: Slurm when sbatch is available; "
                            "local runs the jobs as local processes, for testing)")
    args = parser.parse_args(argv)
    if args.max_parallel < 1:
        parser.error("--max-parallel must be at least 1")
    if args.gpus_per_run < 0:
        parser.error("--gpus-per-run must be >= 0")
    return args


def launch(runs: List[Run], say: Console, forward: Forward, args, output: str, name: str) -> List[Run]:
    """Train the unfinished runs with the chosen launcher (SIGTERM forwarded); the failed ones."""
    previous = signal.signal(signal.SIGTERM, forward.handler)
    try:
        if args.launcher == "slurm":
            return launch_slurm(runs, say, args, output, name)
        return launch_local(runs, say, forward, args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_runs(runs: List[Run], names=None) -> None:
    """--dry_run: each run's state and command (and which grid rows read it)."""
    for run in runs:
        action = {"finished": "skip (finished)", "resume": "resume", "new": "run",
                  "stale": f"stale, would move aside and rerun: {run.detail}"}[run.state]
        if run.detail and run.state in ("finished", "resume"):
            action += f" {run.detail}"
        readers = names[run.folder] if names else []
        shared = f" [read by {', '.join(readers)}]" if len(readers) > 1 else ""
        print(f"# {run.label}: {action}{shared}")
        print(shlex.join(run.command(run.state == "resume")))


def counts_line(runs: List[Run]) -> str:
    counts = {s: sum(r.state == s for r in runs) for s in ("finished", "resume", "new", "stale")}
    return (f"{counts['finished']} finished, {counts['resume']} to resume, {counts['new']} to run, "
            f"{counts['stale']} stale (config changed)")


def ended(say: Console, forward: Forward, failed: List[Run], what: str) -> int:
    """The exit status after the launch, with its message."""
    if forward.stop:
        say(f"stopped by SIGTERM; run the same command again to resume the {what}")
        return 143
    if failed:
        say(f"{len(failed)} run(s) failed: {', '.join(r.label for r in failed)} "
            f"(rerun the same command to retry them)")
        return 1
    return 0


def run_to_end(work, say: Console, forward: Forward, what: str) -> int:
    """Run ``work()`` (the launch and the tables; it returns the failed runs) and give the exit
    status: 2 with one line on a grid error, 130 on Ctrl-C, else :func:`ended`'s."""
    try:
        failed = work()
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        say(f"interrupted; run the same command again to resume the {what}")
        return 130
    return ended(say, forward, failed, what)


def study_main(args, command: str) -> int:
    """--study: plan every grid, train the unique runs, write each grid's tables and REPORT.md."""
    try:
        study = load_study(args.study, args.seeds)
        output = args.output or os.path.join("output", "studies", study.name)
        check_output_folder(output, "--output")
        unique, by_grid = plan_study(study, output, TRAIN_NET)
        unique = [inspect_run(r) for r in unique]
    except (GridError, OutputPathError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = shared_with(unique, by_grid)
    total = sum(len(runs) for runs in by_grid.values())
    summary_line = (f"study {study.name}: {len(study.grids)} grids, {total} grid runs, "
                    f"{len(unique)} unique (rows shared by grids run once) in {output}: "
                    + counts_line(unique))
    if args.dry_run:
        print(summary_line)
        print_runs(unique, names)
        print(estimate_line(study, unique, args.max_parallel))
        print(f"# the report would be written to {os.path.join(output, 'REPORT.md')}")
        return 0
    os.makedirs(output, exist_ok=True)
    say = Console(os.path.join(output, "ablate.log"))
    forward = Forward()

    def work() -> List[Run]:
        failed = []
        say(f"command: {command}")
        say(summary_line)
        if args.collect:
            say("--collect: nothing is run; the tables and REPORT.md are built from the run folders")
        else:
            with grid_lock(output):
                failed = launch(unique, say, forward, args, output, study.name)
        tables = {}
        for grid in study.grids:
            tables[grid.name] = aggregate(grid, by_grid[grid.name])
            write_results(grid, tables[grid.name], os.path.join(output, grid.name), command)
        report = write_report(study, by_grid, tables, output, command, gates=not args.no_gates)
        say(f"report: {report}")
        return failed

    return run_to_end(work, say, forward, "study")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    prog = os.path.relpath(os.path.abspath(__file__))
    command = shlex.join(["python", prog if not prog.startswith("..") else __file__] + argv)
    if args.study:
        return study_main(args, command)
    try:
        grid = load_grid(args.grid, args.seeds)
        output = args.output or os.path.join("output", "ablations", grid.name)
        check_output_folder(output, "--output")  # a file or an unwritable place: before any run
        runs = [inspect_run(r) for r in plan_runs(grid, output, TRAIN_NET)]
    except (GridError, OutputPathError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary_line = (f"grid {grid.name}: {len(grid.rows)} rows x {len(grid.seeds)} seeds = {len(runs)} "
                    f"runs in {output}: " + counts_line(runs))
    if args.dry_run:
        print(summary_line)
        print_runs(runs)
        print(f"# results would be written to {os.path.join(output, 'results.csv')} and results.md")
        return 0

    os.makedirs(output, exist_ok=True)
    say = Console(os.path.join(output, "ablate.log"))
    forward = Forward()

    def work() -> List[Run]:
        failed = []
        with grid_lock(output):
            say(f"command: {command}")
            say(summary_line)
            if args.collect:
                say("--collect: nothing is run; the table is built from the run folders")
            else:
                failed = launch(runs, say, forward, args, output, grid.name)
            table = aggregate(grid, runs)
            write_results(grid, table, output, command)
            say(f"results: {os.path.join(output, 'results.csv')}, {os.path.join(output, 'results.md')}")
        return failed

    return run_to_end(work, say, forward, "grid")


if __name__ == "__main__":
    sys.exit(main())
