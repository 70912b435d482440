"""The grid file: base config, common opts, rows and seeds (see tools/ablate.py for the format)."""
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRID_KEYS = {"base", "opts", "rows", "seeds", "reference", "description"}
ROW_KEYS = {"name", "config", "opts", "init_scale", "init_bias", "description"}
# Keys the tool sets per run; a grid may not set them.
RESERVED_KEYS = {"OUTPUT_DIR": "the run folder is <output>/<row>/seed<k>",
                 "SOLVER.SEED": "seeds come from the grid's `seeds` (or --seeds)"}
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")


class GridError(ValueError):
    """A malformed grid file or a row whose config does not resolve; the message says where."""


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
    reference: Optional[str] = None  # the row the others are compared with (Welch's t-test)
    description: str = ""


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


def read_yaml(path: str, what: str) -> dict:
    """A yaml file holding a mapping (a grid or a study file)."""
    if not os.path.isfile(path):
        raise GridError(f"{what} file not found: {path}")
    with open(path) as f:
        try:
            content = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise GridError(f"{path}: not valid yaml: {exc}") from exc
    if not isinstance(content, dict):
        raise GridError(f"{path}: expected a mapping (a {what} file)")
    return content


def load_grid(path: str, seeds: Optional[List[int]] = None) -> Grid:
    """Parse and check a grid file (structure only; ``plan.plan_runs`` resolves the configs)."""
    content = read_yaml(path, "grid")
    return parse_grid(content, path, os.path.splitext(os.path.basename(path))[0], seeds)


def parse_grid(content: dict, path: str, name: str, seeds: Optional[List[int]] = None) -> Grid:
    """A grid from its mapping (a grid file's content, or one grid of a study file); ``path``
    names it in messages."""
    grid_name = name
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
    reference = content.get("reference")
    if reference is not None and str(reference) not in names:
        raise GridError(f"{path}: reference: no row is named {str(reference)!r} (rows: "
                        f"{', '.join(r.name for r in rows)}); name one of them or remove the key")
    return Grid(grid_name, path, base, resolve_base(base, path),
                _opts_list(content.get("opts"), f"{path}: opts"), rows, seeds,
                None if reference is None else str(reference),
                str(content.get("description") or ""))
