"""Run an ablation grid (rows x seeds) of train_net.py and tabulate mean +- std over seeds.

    python tools/ablate.py --grid configs/ablations/modules_Synthetic.yml
    python tools/ablate.py --grid G.yml --output DIR --seeds 1 2 3 --dry_run
    python tools/ablate.py --grid G.yml --max-parallel 8 --gpus-per-run 1      # one run per GPU
    python tools/ablate.py --grid G.yml --launcher slurm --partition gpu --gpus-per-run 1 \
        --max-parallel 16 --time-min 600                                       # a Slurm array
    python tools/ablate.py --grid G.yml --collect       # only the table, from the run folders

A grid file (yaml) names a base config, common overrides, the rows and the seeds::

    base: configs/Synthetic/quickstart.yml   # relative to the working directory or the repo root
    opts: [SOLVER.MAX_EPOCHS, 8, DATASETS.VAL_IDS, 10]   # KEY VALUE list (or a mapping)
    seeds: [1, 2, 3]                          # each seed sets SOLVER.SEED
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
stops the grid, naming the row and the key. A run folder is stamped (``ablate_run.json``) with a
hash of the run's resolved config (all keys except OUTPUT_DIR). Re-running the same command:

* finished runs (``summary.json`` present and the config hash matches) are skipped;
* unfinished runs with checkpoints are continued with ``--resume``;
* folders whose config no longer matches (the grid, base file or defaults changed) are moved
  aside to ``<run>.stale-<time>`` (never deleted) and trained again; the changed keys are logged.

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

results.csv holds fractions (0-1, as in summary.json) at full precision; results.md shows
percent with 2 decimals, the command line that produced it and the date. ``--dry_run`` validates
the grid and prints what would run (and the commands) without touching anything.
"""
import argparse
import concurrent.futures
import contextlib
import csv
import datetime
import glob
import hashlib
import json
import math
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from config import KEY_FLAGS, ConfigError, build_cfg, flatten_config  # noqa: E402
from engine.defaults import run_files  # noqa: E402

TRAIN_NET = os.path.join(ROOT, "train_net.py")
METRICS = ("mAP", "R1", "R5", "R10", "mINP")
# Kept-token foreground precision (synthetic dataset, models with SDTPS): the share of kept
# patches on the person, of all patches (= a random selection), of a perfect selection.
FG_METRICS = ("fg_precision", "fg_share", "fg_best")
STAMP = "ablate_run.json"
RUN_LOG = "stdout.log"
GRID_KEYS = {"base", "opts", "rows", "seeds", "description"}
ROW_KEYS = {"name", "config", "opts", "init_scale", "init_bias", "description"}
# Keys the tool sets per run; a grid may not set them.
RESERVED_KEYS = {"OUTPUT_DIR": "the run folder is <output>/<row>/seed<k>",
                 "SOLVER.SEED": "seeds come from the grid's `seeds` (or --seeds)"}
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")
NA = "n/a"


class GridError(ValueError):
    """A malformed grid file or a row whose config does not resolve; the message says where."""


# ------------------------------------------------------------------------------------ grid
@dataclass
class Row:
    name: str
    opts: List[str] = field(default_factory=list)
    init_scale: Optional[float] = None
    init_bias: Optional[float] = None
    config: Optional[str] = None  # resolved path of the row's own config file (else the base)


@dataclass
class Grid:
    name: str
    path: str
    base: str  # as written in the grid file
    base_path: str  # resolved, absolute
    opts: List[str]
    rows: List[Row]
    seeds: List[int]


def _opts_list(value, where: str) -> List[str]:
    """A grid's ``opts``: a KEY VALUE list or a {KEY: VALUE} mapping -> list of strings."""
    if value is None:
        return []
    if isinstance(value, dict):
        items = []
        for key, val in value.items():
            items += [key, val]
    elif isinstance(value, list):
        items = list(value)
        if len(items) % 2:
            raise GridError(f"{where}: opts must be KEY VALUE pairs; got an odd number of items: "
                            f"{items}")
    else:
        raise GridError(f"{where}: opts must be a KEY VALUE list or a mapping, got {value!r}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (dict, set)):
            raise GridError(f"{where}: opts item {item!r} is not a scalar or list")
        out.append(item if isinstance(item, str) else str(item))
        if i % 2 == 0 and out[-1] in RESERVED_KEYS:
            raise GridError(f"{where}: {out[-1]} is set by tools/ablate.py per run "
                            f"({RESERVED_KEYS[out[-1]]}); remove it from the grid")
    return out


def _optional_float(row: dict, key: str, where: str) -> Optional[float]:
    value = row.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise GridError(f"{where}: {key} must be a number, got {value!r}") from None


def resolve_base(base: str, grid_path: str) -> str:
    """A config path of the grid (its base, a row's config): absolute, or relative to the
    working directory, else to the repo."""
    if os.path.isabs(base):
        return base
    for folder in (os.getcwd(), ROOT):
        candidate = os.path.join(folder, base)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise GridError(f"{grid_path}: config not found: {base} (looked in {os.getcwd()} and {ROOT})")


def load_grid(path: str, seeds: Optional[List[int]] = None) -> Grid:
    """Parse and check a grid file (structure only; see :func:`plan_runs` for the configs)."""
    if not os.path.isfile(path):
        raise GridError(f"grid file not found: {path}")
    with open(path) as f:
        try:
            content = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise GridError(f"{path}: not valid yaml: {exc}") from exc
    if not isinstance(content, dict):
        raise GridError(f"{path}: expected a mapping with base, opts, rows, seeds")
    unknown = set(content) - GRID_KEYS
    if unknown:
        raise GridError(f"{path}: unknown grid key(s) {', '.join(sorted(map(str, unknown)))}; "
                        f"allowed: {', '.join(sorted(GRID_KEYS))}")
    if not content.get("base"):
        raise GridError(f"{path}: `base:` (the base config file) is required")
    base = str(content["base"])
    rows_in = content.get("rows")
    if not isinstance(rows_in, list) or not rows_in:
        raise GridError(f"{path}: `rows:` must be a non-empty list")
    rows, names = [], set()
    for i, row in enumerate(rows_in):
        where = f"{path}: rows[{i}]"
        if not isinstance(row, dict) or "name" not in row:
            raise GridError(f"{where}: each row needs a `name`")
        name = str(row["name"])
        where = f"{path}: row {name!r}"
        if not ROW_NAME.match(name):
            raise GridError(f"{where}: a row name becomes a folder name; use letters, digits and "
                            f"_ . + = - only")
        if name in names:
            raise GridError(f"{where}: duplicate row name")
        names.add(name)
        unknown = set(row) - ROW_KEYS
        if unknown:
            raise GridError(f"{where}: unknown row key(s) {', '.join(sorted(map(str, unknown)))}; "
                            f"allowed: {', '.join(sorted(ROW_KEYS))}")
        rows.append(Row(name, _opts_list(row.get("opts"), where),
                        _optional_float(row, "init_scale", where),
                        _optional_float(row, "init_bias", where),
                        resolve_base(str(row["config"]), where) if row.get("config") else None))
    if seeds is None:
        seeds = content.get("seeds")
        if seeds is None:
            raise GridError(f"{path}: `seeds:` (a list of ints) is required (or pass --seeds)")
        if not isinstance(seeds, list):
            seeds = [seeds]
    if not seeds:
        raise GridError(f"{path}: the seed list is empty")
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise GridError(f"{path}: seeds must be integers, got {seeds!r}") from None
    if len(set(seeds)) != len(seeds):
        raise GridError(f"{path}: duplicate seeds {seeds}")
    name = os.path.splitext(os.path.basename(path))[0]
    return Grid(name, path, base, resolve_base(base, path),
                _opts_list(content.get("opts"), f"{path}: opts"), rows, seeds)


# ------------------------------------------------------------------------------------ runs
def config_identity(cfg_yaml: str) -> Dict[str, object]:
    """The flattened config of a yaml dump, without OUTPUT_DIR (the folder may move)."""
    flat = flatten_config(yaml.safe_load(cfg_yaml) or {})
    flat.pop("OUTPUT_DIR", None)
    return flat


def config_hash(flat: Dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Run:
    row: Row
    seed: int
    folder: str
    args: List[str]  # train_net.py arguments (without --resume)
    config: Dict[str, object]  # flattened resolved config (no OUTPUT_DIR)
    hash: str
    state: str = ""  # new | finished | resume | stale
    detail: str = ""

    @property
    def label(self) -> str:
        return f"{self.row.name}/seed{self.seed}"

    def command(self, resume: bool = False) -> List[str]:
        return [sys.executable, TRAIN_NET] + (["--resume"] if resume else []) + self.args


def flag_pairs(row: Row) -> List[str]:
    """KEY VALUE pairs of the row's --init_scale / --init_bias (config.KEY_FLAGS)."""
    pairs = []
    for flag, value in (("--init_scale", row.init_scale), ("--init_bias", row.init_bias)):
        if value is not None:
            pairs += [KEY_FLAGS[flag][0], repr(float(value))]
    return pairs


def run_args(grid: Grid, row: Row, seed: int, folder: str) -> List[str]:
    args = ["--config_file", row.config or grid.base_path]
    if row.init_scale is not None:
        args += ["--init_scale", repr(row.init_scale)]
    if row.init_bias is not None:
        args += ["--init_bias", repr(row.init_bias)]
    return args + grid.opts + row.opts + ["SOLVER.SEED", str(seed), "OUTPUT_DIR", folder]


def plan_runs(grid: Grid, output: str) -> List[Run]:
    """Resolve every row x seed config (all errors reported together, before anything runs)."""
    runs, errors = [], []
    for row in grid.rows:
        for seed in grid.seeds:
            folder = os.path.join(output, row.name, f"seed{seed}")
            args = run_args(grid, row, seed, folder)
            opts = grid.opts + row.opts + ["SOLVER.SEED", str(seed), "OUTPUT_DIR", folder]
            try:
                cfg = build_cfg(row.config or grid.base_path, opts + flag_pairs(row))
            except (ConfigError, FileNotFoundError, ValueError) as exc:
                errors.append(f"row {row.name!r}: {exc}")
                break  # one message per row is enough
            flat = config_identity(cfg.dump())
            runs.append(Run(row, seed, folder, args, flat, config_hash(flat)))
    if errors:
        raise GridError(f"{grid.path}: config errors (nothing was run):\n  " + "\n  ".join(errors))
    return runs


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _folder_config(folder: str) -> Optional[Dict[str, object]]:
    try:
        with open(os.path.join(folder, "config.yaml")) as f:
            return config_identity(f.read())
    except (OSError, yaml.YAMLError):
        return None


def has_checkpoint(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, "checkpoint_epoch*.pth")))


def config_diff(old: Dict[str, object], new: Dict[str, object], limit: int = 8) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    parts = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"... {len(keys) - limit} more")
    return "; ".join(parts) or "no key differs (hash of another version)"


def inspect_run(run: Run) -> Run:
    """Set ``run.state``: new, finished (skip), resume (checkpoints, no summary) or stale."""
    folder = run.folder
    if not os.path.isdir(folder) or not os.listdir(folder):
        run.state, run.detail = "new", ""
        return run
    stamp = _read_json(os.path.join(folder, STAMP))
    stamped = stamp.get("config_hash") if isinstance(stamp, dict) else None
    existing = _folder_config(folder)  # written by train_net.py at each start
    if existing is not None and config_hash(existing) != run.hash:
        run.state, run.detail = "stale", config_diff(existing, run.config)
    elif stamped is not None and stamped != run.hash:
        old = stamp.get("config") if isinstance(stamp.get("config"), dict) else {}
        run.state, run.detail = "stale", config_diff(old, run.config)
    elif stamped is None and existing is None:
        if has_checkpoint(folder) or os.path.exists(os.path.join(folder, "summary.json")):
            run.state, run.detail = "stale", "no config.yaml or stamp to compare with"
        else:
            run.state, run.detail = "new", "(folder has no results)"
    elif os.path.isfile(os.path.join(folder, "summary.json")):
        run.state, run.detail = "finished", ""
    elif has_checkpoint(folder):
        run.state, run.detail = "resume", ""
    else:
        run.state, run.detail = "new", "(earlier attempt left no checkpoint)"
    return run


# ------------------------------------------------------------------------------------ execution
class Console:
    """Status lines to stdout and to <output>/ablate.log."""

    def __init__(self, log_path: Optional[str]):
        self.log_path = log_path
        self._lock = threading.Lock()  # parallel runs report from their threads

    def __call__(self, message: str) -> None:
        line = f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] {message}"
        with self._lock:
            print(line, flush=True)
            if self.log_path:
                with open(self.log_path, "a") as f:
                    f.write(line + "\n")


def write_stamp(run: Run, attempt: dict) -> None:
    path = os.path.join(run.folder, STAMP)
    stamp = _read_json(path) or {}
    if stamp.get("config_hash") != run.hash:
        stamp = {}
    stamp.update({"row": run.row.name, "seed": run.seed, "config_hash": run.hash,
                  "args": run.args, "config": run.config})
    stamp.setdefault("attempts", [])
    if attempt:
        if stamp["attempts"] and stamp["attempts"][-1].get("start") == attempt.get("start"):
            stamp["attempts"][-1] = attempt
        else:
            stamp["attempts"].append(attempt)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stamp, f, indent=2, default=str)
    os.replace(tmp, path)


class _Forward:
    """While trainings run, forward SIGTERM to them (each checkpoints and exits) and stop the grid."""

    def __init__(self):
        self.procs = set()
        self.stop = False
        self._lock = threading.Lock()

    def handler(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self.stop = True
        with self._lock:
            for proc in list(self.procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    def add(self, proc) -> None:
        with self._lock:
            self.procs.add(proc)
            if self.stop:  # SIGTERM arrived while the process was starting
                proc.send_signal(signal.SIGTERM)

    def remove(self, proc) -> None:
        with self._lock:
            self.procs.discard(proc)


def prepare(run: Run, say: "Console") -> Tuple[List[str], dict]:
    """Before a run starts: move a stale folder aside, stamp the folder; returns (command, attempt).

    A folder that an earlier attempt of the same config left without a checkpoint is continued
    with --resume too (train_net.py refuses a new run into a folder that holds one; with no
    checkpoint it starts from scratch)."""
    resume = run.state == "resume" or (run.state == "new" and bool(run_files(run.folder)))
    if run.state == "stale":
        aside = f"{run.folder}.stale-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        os.rename(run.folder, aside)
        say(f"{run.label}: config changed ({run.detail}); old folder moved to {aside}")
    os.makedirs(run.folder, exist_ok=True)
    cmd = run.command(resume)
    attempt = {"start": datetime.datetime.now().isoformat(timespec="seconds"), "resume": resume,
               "command": shlex.join(cmd)}
    write_stamp(run, attempt)
    return cmd, attempt


def run_command(cmd: List[str], folder: str, env: Optional[Dict[str, str]] = None,
                verbose: bool = False, forward: Optional[_Forward] = None,
                cwd: Optional[str] = None) -> int:
    """Run one training command (in ``cwd``, default the current folder), appending its output
    to <folder>/stdout.log; returns its exit status. Top-level (picklable): it is also what a
    Slurm job executes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(os.path.join(folder, RUN_LOG), "a", buffering=1) as log:
        log.write(f"\n===== {datetime.datetime.now():%Y-%m-%dT%H:%M:%S} tools/ablate.py: "
                  f"{shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, errors="replace", cwd=cwd)
        if forward is not None:
            forward.add(proc)
        try:
            for line in proc.stdout:
                log.write(line)
                if verbose:
                    sys.stdout.write(line)
            return proc.wait()
        except KeyboardInterrupt:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise
        finally:
            if forward is not None:
                forward.remove(proc)


def finish_attempt(run: Run, attempt: dict, rc: Optional[int], seconds: float) -> None:
    attempt.update(end=datetime.datetime.now().isoformat(timespec="seconds"),
                   wall_seconds=round(seconds, 1), rc=rc)
    write_stamp(run, attempt)


def execute(run: Run, say: "Console", forward: _Forward, verbose: bool,
            env: Optional[Dict[str, str]] = None) -> int:
    """Train one run in a subprocess here (stdout to <run>/stdout.log); returns its exit status."""
    cmd, attempt = prepare(run, say)
    start, rc = time.time(), None
    try:
        rc = run_command(cmd, run.folder, env, verbose, forward)
    finally:
        finish_attempt(run, attempt, rc, time.time() - start)
    return rc


def run_envs(max_parallel: int, gpus_per_run: int) -> List[Dict[str, str]]:
    """One environment per concurrent slot: its own GPUs (CUDA_VISIBLE_DEVICES) with
    ``gpus_per_run``, else a share of the CPU threads."""
    if gpus_per_run > 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = [g for g in visible.split(",") if g.strip()]
        else:
            import torch

            gpus = [str(i) for i in range(torch.cuda.device_count())]
        need = max_parallel * gpus_per_run
        if len(gpus) < need:
            raise GridError(f"--max-parallel {max_parallel} x --gpus-per-run {gpus_per_run} needs "
                            f"{need} GPUs; {len(gpus)} visible ({','.join(gpus) or 'none'})")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * gpus_per_run:(i + 1) * gpus_per_run])}
                for i in range(max_parallel)]
    if max_parallel == 1:
        return [{}]
    threads = str(max(1, (os.cpu_count() or 1) // max_parallel))
    return [{"OMP_NUM_THREADS": threads} for _ in range(max_parallel)]


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------ results
def _mean_std(values: List[float]):
    """Mean and sample std (ddof=1); std is None for a single value, both None for none."""
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def run_metrics(summary: dict):
    """(last test metrics, val-selected best's test metrics or None, best epoch or None)."""
    last = summary["last"]["results"]["test"]
    best = summary.get("best") or {}
    if best.get("split") == "val" and "test" in (best.get("metrics") or {}):
        return last, best["metrics"]["test"], best.get("epoch")
    return last, None, None


_LOGGED_PARAMS = re.compile(r"model: ([0-9.]+) M parameters")


def run_params(folder: str) -> Optional[float]:
    """Parameters (millions) of the run's model: exact on the meta device, else the logged count."""
    try:
        from data.datasets import build_dataset
        from modeling.model_size import build_on_meta, count_parameters

        with contextlib.redirect_stdout(sys.stderr):
            cfg = build_cfg(os.path.join(folder, "config.yaml"))
            syn = {k.lower(): v for k, v in cfg.DATASETS.SYNTHETIC.items()}
            dataset = build_dataset(cfg.DATASETS.NAMES, cfg.DATASETS.ROOT_DIR, syn)
            num_classes = dataset.num_train_pids - cfg.DATASETS.VAL_IDS
            model = build_on_meta(cfg, num_classes, dataset.num_cams)
            return count_parameters(model)["total"] / 1e6
    except Exception:  # noqa: BLE001 - dataset not readable here: the count train_net.py logged
        for name in ("log.txt", RUN_LOG):
            try:
                with open(os.path.join(folder, name), errors="replace") as f:
                    found = _LOGGED_PARAMS.findall(f.read())
            except OSError:
                continue
            if found:
                return float(found[-1])
    return None


def aggregate(grid: Grid, runs: List[Run], with_params: bool = True) -> List[dict]:
    """One dict per row: the mean/std columns of results.csv (fractions; None = n/a)."""
    table = []
    for row in grid.rows:
        lasts, bests, best_epochs, seconds, seeds, missing, papers = [], [], [], [], [], [], []
        all_val, resumed, params = True, False, None
        for run in runs:
            if run.row.name != row.name:
                continue
            summary = _read_json(os.path.join(run.folder, "summary.json"))
            if inspect_run(run).state != "finished" or not summary or not summary.get("last"):
                missing.append(run.seed)
                continue
            last, best, best_epoch = run_metrics(summary)
            paper = summary.get("best_test_paper_protocol") or {}
            if paper.get("metrics"):
                papers.append(paper["metrics"])
            seeds.append(run.seed)
            lasts.append(last)
            seconds.append(float(summary.get("train_seconds", float("nan"))))
            if best is None:
                all_val = False
            else:
                bests.append(best)
                best_epochs.append(best_epoch)
            stamp = _read_json(os.path.join(run.folder, STAMP)) or {}
            resumed |= any(a.get("resume") for a in stamp.get("attempts", []))
            if with_params and params is None:
                params = run_params(run.folder)
        line = {"row": row.name, "seeds": len(seeds), "seed_list": " ".join(map(str, seeds)),
                "missing_seeds": " ".join(map(str, missing))}
        for key in METRICS:
            line[f"{key}_mean"], line[f"{key}_std"] = _mean_std([m[key] for m in lasts])
        val_ok = all_val and bool(bests)
        for key in METRICS:
            stats = _mean_std([m[key] for m in bests]) if val_ok else (None, None)
            line[f"best_{key}_mean"], line[f"best_{key}_std"] = stats
        for key in METRICS:
            stats = _mean_std([m[key] for m in papers]) if len(papers) == len(lasts) else (None, None)
            line[f"paper_{key}_mean"], line[f"paper_{key}_std"] = stats
        for key in FG_METRICS:
            values = [m[key] for m in lasts if key in m]
            stats = _mean_std(values) if values and len(values) == len(lasts) else (None, None)
            line[f"{key}_mean"], line[f"{key}_std"] = stats
        line["best_epoch_mean"] = _mean_std(best_epochs)[0] if val_ok else None
        line["best_selected_on"] = "val" if val_ok else NA
        line["params_M"] = params
        line["train_seconds_mean"] = _mean_std(seconds)[0]
        line["resumed"] = resumed
        table.append(line)
    return table


CSV_COLUMNS = (["row", "seeds", "seed_list", "missing_seeds"]
               + [f"{k}_{s}" for k in METRICS for s in ("mean", "std")]
               + [f"best_{k}_{s}" for k in METRICS for s in ("mean", "std")]
               + [f"paper_{k}_{s}" for k in METRICS for s in ("mean", "std")]
               + [f"{k}_{s}" for k in FG_METRICS for s in ("mean", "std")]
               + ["best_epoch_mean", "best_selected_on", "params_M", "train_seconds_mean", "resumed"])


def _csv_cell(value) -> str:
    if value is None:
        return NA
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _pct(mean, std) -> str:
    if mean is None:
        return NA
    return f"{mean * 100:.2f} ± " + (NA if std is None else f"{std * 100:.2f}")


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return (rev + (" (with uncommitted changes)" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_results(grid: Grid, table: List[dict], output: str, command: str) -> None:
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for line in table:
            writer.writerow([_csv_cell(line[c]) for c in CSV_COLUMNS])
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    md = [f"# Ablation `{grid.name}`", "",
          f"- command: `{command}`",
          f"- date: {date}; code: {git_revision()}",
          f"- grid: `{grid.path}`; base config: `{grid.base}`",
          f"- common opts: `{' '.join(grid.opts) or '(none)'}`",
          f"- seeds: {' '.join(map(str, grid.seeds))} (SOLVER.SEED)", "",
          ("Cells are mean ± sample standard deviation (ddof=1) over the finished seeds, in percent "
           "on the TEST split; with one seed the std is n/a. Raw values (fractions) are in "
           "results.csv."), "",
          "## Last epoch", "",
          "| row | seeds | mAP | R1 | R5 | R10 | mINP | params (M) | train time (s) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for line in table:
        cells = [_pct(line[f"{k}_mean"], line[f"{k}_std"]) for k in METRICS]
        params = NA if line["params_M"] is None else f"{line['params_M']:.2f}"
        secs = line["train_seconds_mean"]
        secs = NA if secs is None else f"{secs:.0f}" + (" †" if line["resumed"] else "")
        md.append(f"| {line['row']} | {line['seeds']} | " + " | ".join(cells) + f" | {params} | {secs} |")
    md += ["", "## Best epoch selected on the validation split (its test metrics)", "",
           "| row | seeds | best epoch (mean) | mAP | R1 | R5 | R10 | mINP |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for line in table:
        cells = [_pct(line[f"best_{k}_mean"], line[f"best_{k}_std"]) for k in METRICS]
        epoch = NA if line["best_epoch_mean"] is None else f"{line['best_epoch_mean']:.1f}"
        md.append(f"| {line['row']} | {line['seeds']} | {epoch} | " + " | ".join(cells) + " |")
    md += ["", ("## Best test epoch (the paper's protocol: the epoch with the highest test mAP, "
                "selected on the test split; optimistic, for comparison with published tables only)"),
           "", "| row | seeds | mAP | R1 | R5 | R10 | mINP |", "|---|---:|---:|---:|---:|---:|---:|"]
    for line in table:
        cells = [_pct(line[f"paper_{k}_mean"], line[f"paper_{k}_std"]) for k in METRICS]
        md.append(f"| {line['row']} | {line['seeds']} | " + " | ".join(cells) + " |")
    if any(line["fg_precision_mean"] is not None for line in table):
        md += ["", "## Kept-token foreground precision (last epoch, test split)", "",
               ("Share of the kept patches on the person (at least half of their pixels on the "
                "person mask), against the share of all patches (what a random selection keeps) "
                "and what a perfect selection of the same size would keep."), "",
               "| row | seeds | kept patches on the person | all patches | perfect selection |",
               "|---|---:|---:|---:|---:|"]
        for line in table:
            if line["fg_precision_mean"] is None:
                continue
            md.append(f"| {line['row']} | {line['seeds']} | "
                      f"{_pct(line['fg_precision_mean'], line['fg_precision_std'])} | "
                      f"{line['fg_share_mean'] * 100:.2f} | {line['fg_best_mean'] * 100:.2f} |")
    notes = ["", "Notes:",
             ("- n/a in the best table: some seed had no validation split (DATASETS.VAL_IDS 0), so "
              "its best was chosen on the test split; that number is optimistic and not reported."),
             "- params: parameters of the built model (modeling.model_size.count_parameters).",
             ("- train time: mean of summary.json's train_seconds; † = some seed was resumed, and a "
              "resumed run counts only its final attempt.")]
    missing = [f"{line['row']} (seeds {line['missing_seeds']})" for line in table if line["missing_seeds"]]
    if missing:
        notes.append("- NOT FINISHED, left out of the means: " + ", ".join(missing))
    md += notes
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, metavar="FILE", help="grid yaml (configs/ablations/)")
    parser.add_argument("--output", default="", metavar="DIR",
                        help="output folder (default: output/ablations/<grid name>)")
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
                        help="run nothing: build results.csv / results.md from the run folders "
                             "(a grid that ran elsewhere)")
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


@contextlib.contextmanager
def grid_lock(output: str):
    """One ablate.py per output folder at a time."""
    import fcntl

    path = os.path.join(output, ".ablate.lock")
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise GridError(f"another tools/ablate.py is running on {output} ({path} is locked)") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    prog = os.path.relpath(os.path.abspath(__file__))
    command = shlex.join(["python", prog if not prog.startswith("..") else __file__] + argv)
    try:
        grid = load_grid(args.grid, args.seeds)
        output = args.output or os.path.join("output", "ablations", grid.name)
        runs = [inspect_run(r) for r in plan_runs(grid, output)]
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = {s: sum(r.state == s for r in runs) for s in ("finished", "resume", "new", "stale")}
    summary_line = (f"grid {grid.name}: {len(grid.rows)} rows x {len(grid.seeds)} seeds = {len(runs)} "
                    f"runs in {output}: {counts['finished']} finished, {counts['resume']} to resume, "
                    f"{counts['new']} to run, {counts['stale']} stale (config changed)")
    if args.dry_run:
        print(summary_line)
        for run in runs:
            action = {"finished": "skip (finished)", "resume": "resume", "new": "run",
                      "stale": f"stale, would move aside and rerun: {run.detail}"}[run.state]
            print(f"# {run.label}: {action}")
            print(shlex.join(run.command(run.state == "resume")))
        print(f"# results would be written to {os.path.join(output, 'results.csv')} and results.md")
        return 0

    os.makedirs(output, exist_ok=True)
    say = Console(os.path.join(output, "ablate.log"))
    failed: List[Run] = []
    forward = _Forward()
    try:
        with grid_lock(output):
            say(f"command: {command}")
            say(summary_line)
            if args.collect:
                say("--collect: nothing is run; the table is built from the run folders")
            else:
                previous = signal.signal(signal.SIGTERM, forward.handler)
                try:
                    if args.launcher == "slurm":
                        failed = launch_slurm(runs, say, args, output, grid.name)
                    else:
                        failed = launch_local(runs, say, forward, args)
                finally:
                    signal.signal(signal.SIGTERM, previous)
            table = aggregate(grid, runs)
            write_results(grid, table, output, command)
            say(f"results: {os.path.join(output, 'results.csv')}, {os.path.join(output, 'results.md')}")
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        say("interrupted; run the same command again to resume the grid")
        return 130
    if forward.stop:
        say("stopped by SIGTERM; run the same command again to resume the grid")
        return 143
    if failed:
        say(f"{len(failed)} run(s) failed: {', '.join(r.label for r in failed)} "
            f"(rerun the same command to retry them)")
        return 1
    return 0


def _report(tag: str, run: Run, rc: Optional[int], seconds: float, say: Console,
            stopped: bool) -> bool:
    """Log how a run ended; True when it failed."""
    summary = _read_json(os.path.join(run.folder, "summary.json"))
    if summary and summary.get("last"):
        test = summary["last"]["results"]["test"]
        say(f"{tag}: done in {seconds:.0f} s (rc {rc}); last epoch test "
            f"mAP {test['mAP'] * 100:.2f} R1 {test['R1'] * 100:.2f}")
        return False
    if stopped:
        say(f"{tag}: stopped by SIGTERM (rc {rc}); it resumes from its checkpoint when the same "
            f"command is run again")
        return False
    say(f"{tag}: FAILED (rc {rc}) after {seconds:.0f} s; log {os.path.join(run.folder, RUN_LOG)}:\n"
        + _tail(os.path.join(run.folder, RUN_LOG)))
    return True


def _say_skipped(runs: List[Run], say: Console) -> None:
    for i, run in enumerate(runs, 1):
        if run.state == "finished":
            say(f"[{i}/{len(runs)}] {run.label}: skipped (finished: {run.folder}/summary.json, "
                "config matches)")


def launch_local(runs: List[Run], say: Console, forward: _Forward, args) -> List[Run]:
    """Run the unfinished runs here, ``--max-parallel`` at a time (each with its own GPUs with
    ``--gpus-per-run``, else a share of the CPU threads); returns the failed ones."""
    todo = [(i, run) for i, run in enumerate(runs, 1) if run.state != "finished"]
    _say_skipped(runs, say)
    slots = queue.Queue()
    for env in run_envs(args.max_parallel, args.gpus_per_run):
        slots.put(env)
    failed: List[Run] = []

    def one(i: int, run: Run) -> None:
        tag = f"[{i}/{len(runs)}] {run.label}"
        if forward.stop:
            return
        env = slots.get()
        try:
            where = f" ({', '.join(f'{k}={v}' for k, v in env.items())})" if env else ""
            say(f"{tag}: {'resuming' if run.state == 'resume' else 'training'} -> {run.folder}{where}")
            start = time.time()
            rc = execute(run, say, forward, args.verbose and args.max_parallel == 1, env)
            if _report(tag, run, rc, time.time() - start, say, forward.stop):
                failed.append(run)
        finally:
            slots.put(env)

    if args.max_parallel == 1:
        for i, run in todo:
            one(i, run)
        return failed
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.max_parallel) as pool:
        futures = [pool.submit(one, i, run) for i, run in todo]
        try:
            for future in futures:
                future.result()
        except KeyboardInterrupt:
            forward.handler(signal.SIGTERM, None)  # every running training checkpoints and exits
            raise
    return failed


def launch_slurm(runs: List[Run], say: Console, args, output: str, name: str) -> List[Run]:
    """Submit the unfinished runs as one Slurm array through submitit (each job runs its
    train_net.py command on its node), wait for them, return the failed ones. Logs and pickles of
    the jobs go to <output>/slurm/."""
    import submitit

    executor = submitit.AutoExecutor(folder=os.path.join(output, "slurm", "%j"),
                                     cluster=args.submitit_cluster)
    params = dict(timeout_min=args.time_min, gpus_per_node=args.gpus_per_run,
                  cpus_per_task=args.cpus_per_run, name=f"ablate-{name}",
                  slurm_array_parallelism=args.max_parallel)
    if args.partition:
        params["slurm_partition"] = args.partition
    executor.update_parameters(**params)
    _say_skipped(runs, say)
    pending, attempts = [], []
    for i, run in enumerate(runs, 1):
        if run.state == "finished":
            continue
        cmd, attempt = prepare(run, say)
        pending.append((i, run, cmd))
        attempts.append(attempt)
    if not pending:
        return []
    with executor.batch():
        jobs = [executor.submit(run_command, cmd, run.folder, None, False, None, os.getcwd())
                for _, run, cmd in pending]
    say(f"submitted {len(jobs)} job(s) ({executor.cluster}): "
        + ", ".join(f"{run.label}={job.job_id}" for (_, run, _), job in zip(pending, jobs)))
    failed: List[Run] = []
    start = time.time()
    for (i, run, _), job, attempt in zip(pending, jobs, attempts):
        tag = f"[{i}/{len(runs)}] {run.label} (job {job.job_id})"
        try:
            rc = job.result()
        except Exception as exc:  # noqa: BLE001 - a failed or cancelled job: reported, grid goes on
            say(f"{tag}: job failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}")
            rc = None
        finish_attempt(run, attempt, rc, time.time() - start)
        if _report(tag, run, rc, time.time() - start, say, False):
            failed.append(run)
    return failed


if __name__ == "__main__":
    sys.exit(main())
