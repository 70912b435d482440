"""A grid's runs: one per row x seed, with its resolved config, hash, folder and state.

A run folder is stamped (``ablate_run.json``) with the run's resolved config and its hash; the
state of a folder (new, finished, resume, stale) comes from that stamp, the folder's config.yaml,
its checkpoints and its summary.json. A folder is stale when a key of its config has another
value now, or was removed; a key the defaults gained since the run (at its default value) is not
a change of the run's config, so a finished study survives a code update that adds an option
(the code commit of each run is in its manifest and in the study report).
"""
import glob
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import yaml

from config import KEY_FLAGS, ConfigError, add_part_config, build_cfg, flatten_config
from config.defaults import get_cfg_defaults
from tools.ablation.grid import ROOT, Grid, GridError, Row

TRAIN_NET = os.path.join(ROOT, "train_net.py")
STAMP = "ablate_run.json"
RUN_LOG = "stdout.log"


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
    train_net: str = TRAIN_NET  # the training script

    @property
    def label(self) -> str:
        return f"{self.row.name}/seed{self.seed}"

    def command(self, resume: bool = False) -> List[str]:
        return [sys.executable, self.train_net] + (["--resume"] if resume else []) + self.args


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


def plan_runs(grid: Grid, output: str, train_net: str = TRAIN_NET) -> List[Run]:
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
            runs.append(Run(row, seed, folder, args, flat, config_hash(flat), train_net=train_net))
    if errors:
        raise GridError(f"{grid.path}: config errors (nothing was run):\n  " + "\n  ".join(errors))
    return runs


def read_json(path: str) -> Optional[dict]:
    """The parsed json file, or None when it is missing or unreadable."""
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


def config_diff(old: Dict[str, object], new: Dict[str, object], limit: int = 8,
                keys: Optional[List[str]] = None) -> str:
    """'KEY: old -> new; ...' for ``keys`` (default: every key that differs)."""
    if keys is None:
        keys = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    parts = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"... {len(keys) - limit} more")
    return "; ".join(parts) or "no key differs (hash of another version)"


_DEFAULTS: Dict[str, object] = {}


def default_identity() -> Dict[str, object]:
    """The flattened defaults with the project parts' keys (cached)."""
    if not _DEFAULTS:
        cfg = get_cfg_defaults()
        add_part_config(cfg)
        _DEFAULTS.update(config_identity(cfg.dump()))
    return _DEFAULTS


def config_change(old: Dict[str, object], new: Dict[str, object]):
    """(changed, added): the keys whose value differs between a run folder's config ``old`` and the
    planned ``new`` one (including keys removed since, and keys added with a non-default value),
    and the keys added since the run at their default value (not a change)."""
    defaults = default_identity()
    changed, added = [], []
    for key in sorted(set(old) | set(new)):
        if key in old and key in new:
            if old[key] != new[key]:
                changed.append(key)
        elif key in new and key in defaults and new[key] == defaults[key]:
            added.append(key)
        else:
            changed.append(key)
    return changed, added


def inspect_run(run: Run) -> Run:
    """Set ``run.state``: new, finished (skip), resume (checkpoints, no summary) or stale."""
    folder = run.folder
    if not os.path.isdir(folder) or not os.listdir(folder):
        run.state, run.detail = "new", ""
        return run
    stamp = read_json(os.path.join(folder, STAMP))
    stamped = stamp.get("config_hash") if isinstance(stamp, dict) else None
    existing = _folder_config(folder)  # written by train_net.py at each start
    recorded = [existing] if existing is not None else []
    if stamped is not None and stamped != run.hash:
        recorded.append(stamp.get("config") if isinstance(stamp.get("config"), dict) else {})
    added: List[str] = []
    for old in recorded:
        if config_hash(old) != run.hash:
            changed, added = config_change(old, run.config)
            if changed:
                run.state, run.detail = "stale", config_diff(old, run.config, keys=changed)
                return run
    if stamped is None and existing is None:
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
    if added and run.state != "new":
        shown = ", ".join(added[:8]) + (f" and {len(added) - 8} more" if len(added) > 8 else "")
        run.detail = f"(made before the defaults gained {shown}, at the default value)"
    return run


def write_stamp(run: Run, attempt: dict) -> None:
    """Record the run's config hash, arguments and this attempt in <run>/ablate_run.json."""
    path = os.path.join(run.folder, STAMP)
    stamp = read_json(path) or {}
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
