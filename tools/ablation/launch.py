"""Training a grid's runs: here (``--max-parallel`` at a time, each with its own GPUs or a share of
the CPU threads) or as one Slurm job array through submitit. Each run is ``python train_net.py
...`` in its own subprocess, its output appended to ``<run>/stdout.log``; SIGTERM is forwarded to
the running trainings (each checkpoints and exits)."""
import concurrent.futures
import contextlib
import datetime
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from engine.defaults import run_files
from tools.ablation.grid import GridError
from tools.ablation.plan import RUN_LOG, Run, read_json, write_stamp


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


class Forward:
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


def prepare(run: Run, say: Console) -> Tuple[List[str], dict]:
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
               "command": shlex.join(cmd), "cwd": os.getcwd()}  # relative config paths start here
    write_stamp(run, attempt)
    return cmd, attempt


def run_command(cmd: List[str], folder: str, env: Optional[Dict[str, str]] = None,
                verbose: bool = False, forward: Optional[Forward] = None,
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


def execute(run: Run, say: Console, forward: Forward, verbose: bool,
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


def _report(tag: str, run: Run, rc: Optional[int], seconds: float, say: Console,
            stopped: bool) -> bool:
    """Log how a run ended; True when it failed."""
    summary = read_json(os.path.join(run.folder, "summary.json"))
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


def launch_local(runs: List[Run], say: Console, forward: Forward, args) -> List[Run]:
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
    import cloudpickle  # submitit's pickler
    import submitit

    # The jobs unpickle run_command by value: their Python need not find this package on its path.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
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
