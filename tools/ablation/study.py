"""A study: several grids read separately (each with its reference row) and run together.

A study file (yaml, ``configs/studies/``)::

    description: ...
    base: configs/Synthetic/study.yml   # every grid's base unless the grid names its own
    opts: [SOLVER.MAX_EPOCHS, 12]       # every grid's common opts start with these
    seeds: [1, 2, 3]                    # shared; a grid may list its own (e.g. one seed)
    cost:                               # optional: the estimate printed by --dry_run
      epoch_seconds: 60                 # one epoch of one run, evaluation included
      resource: GPU                     # the unit one run occupies: "<resource>-hours"
      source: "stated: our estimate, not measured here"   # where the figure comes from
    grids:
      - name: modules
        reference: baseline             # required: the row the others are compared with
        opts: [...]                     # after the study's opts
        rows: [...]                     # as in a grid file (tools/ablate.py)

A row whose resolved config (the hash ``plan.py`` stamps, seed included, run folder excluded)
equals a row of an earlier grid is not run again: both grids read the first one's folder
``<output>/<grid>/<row>/seed<k>``. The unique runs go to the launchers of ``launch.py`` in seed
order (every row's first seed before any second seed), so a partly finished study already
compares every row.
"""
import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from tools.ablation.grid import Grid, GridError, parse_grid, read_yaml
from tools.ablation.plan import TRAIN_NET, Run, plan_runs

STUDY_KEYS = {"description", "base", "opts", "seeds", "cost", "grids"}
STUDY_GRID_KEYS = {"name", "description", "base", "opts", "seeds", "reference", "rows"}
COST_KEYS = {"epoch_seconds", "resource", "source"}


@dataclass
class Cost:
    """The stated (or measured) time of one epoch, for the estimate of --dry_run."""
    epoch_seconds: float
    resource: str
    source: str


@dataclass
class Study:
    name: str
    path: str
    grids: List[Grid]
    cost: Optional[Cost] = None
    description: str = ""


def _cost(value, path: str) -> Optional[Cost]:
    if value is None:
        return None
    where = f"{path}: cost"
    if not isinstance(value, dict) or set(value) != COST_KEYS:
        raise GridError(f"{where}: needs exactly the keys {', '.join(sorted(COST_KEYS))} "
                        f"(the source names where the epoch time comes from)")
    try:
        seconds = float(value["epoch_seconds"])
    except (TypeError, ValueError):
        raise GridError(f"{where}: epoch_seconds must be a number, got "
                        f"{value['epoch_seconds']!r}") from None
    if seconds <= 0 or not str(value["source"]).strip():
        raise GridError(f"{where}: epoch_seconds must be positive and source non-empty")
    return Cost(seconds, str(value["resource"]), str(value["source"]))


def load_study(path: str, seeds: Optional[List[int]] = None) -> Study:
    """Parse and check a study file; ``seeds`` (--seeds) replaces the study's shared seeds."""
    content = read_yaml(path, "study")
    unknown = set(content) - STUDY_KEYS
    if unknown:
        raise GridError(f"{path}: unknown study key(s) {', '.join(sorted(map(str, unknown)))}; "
                        f"allowed: {', '.join(sorted(STUDY_KEYS))}")
    grids_in = content.get("grids")
    if not isinstance(grids_in, list) or not grids_in:
        raise GridError(f"{path}: `grids:` must be a non-empty list")
    shared_opts = content.get("opts") or []
    if not isinstance(shared_opts, list):
        raise GridError(f"{path}: the study's opts must be a KEY VALUE list")
    grids, names = [], set()
    for i, entry in enumerate(grids_in):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise GridError(f"{path}: grids[{i}]: each grid needs a `name`")
        name = str(entry["name"])
        where = f"{path}: grid {name!r}"
        unknown = set(entry) - STUDY_GRID_KEYS
        if unknown:
            raise GridError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                            f"allowed: {', '.join(sorted(STUDY_GRID_KEYS))}")
        if name in names:
            raise GridError(f"{where}: duplicate grid name")
        names.add(name)
        if not entry.get("reference"):
            raise GridError(f"{where}: `reference:` (the row the others are compared with) is "
                            f"required in a study")
        grid_opts = entry.get("opts") or []
        if not isinstance(grid_opts, list):
            raise GridError(f"{where}: opts must be a KEY VALUE list")
        grid_seeds = entry.get("seeds", content.get("seeds"))
        merged = {"base": entry.get("base", content.get("base")), "opts": shared_opts + grid_opts,
                  "seeds": grid_seeds, "reference": entry["reference"], "rows": entry.get("rows"),
                  "description": entry.get("description")}
        own_seeds = seeds if seeds is not None and "seeds" not in entry else None
        grids.append(parse_grid(merged, where, name, own_seeds))
    return Study(os.path.splitext(os.path.basename(path))[0], path, grids,
                 _cost(content.get("cost"), path), str(content.get("description") or ""))


def plan_study(study: Study, output: str, train_net: str = TRAIN_NET
               ) -> Tuple[List[Run], Dict[str, List[Run]]]:
    """(unique runs in launch order, each grid's runs): a run whose config hash an earlier grid
    already has is that run under this grid's row name (same folder). All config errors of all
    grids are reported together."""
    first: Dict[str, Run] = {}
    by_grid: Dict[str, List[Run]] = {}
    errors = []
    for grid in study.grids:
        try:
            runs = plan_runs(grid, os.path.join(output, grid.name), train_net)
        except GridError as exc:
            errors.append(str(exc))
            continue
        by_grid[grid.name] = [dataclasses.replace(first.setdefault(run.hash, run), row=run.row)
                              for run in runs]
    if errors:
        raise GridError("\n".join(errors))
    order = []
    for grid in study.grids:
        order += [s for s in grid.seeds if s not in order]
    unique = sorted(first.values(), key=lambda run: order.index(run.seed))  # stable: grid order
    return unique, by_grid


def shared_with(unique: List[Run], by_grid: Dict[str, List[Run]]) -> Dict[str, List[str]]:
    """Run folder -> the ``grid/row`` names that read it (more than one for a shared row)."""
    names: Dict[str, List[str]] = {run.folder: [] for run in unique}
    for grid, runs in by_grid.items():
        for run in runs:
            names[run.folder].append(f"{grid}/{run.row.name}")
    return names


def estimate(study: Study, runs: List[Run]) -> Optional[Tuple[float, int]]:
    """(resource-hours, epochs) of ``runs`` at the study's stated epoch time; None without one."""
    if study.cost is None:
        return None
    epochs = sum(int(run.config["SOLVER.MAX_EPOCHS"]) for run in runs)
    return epochs * study.cost.epoch_seconds / 3600.0, epochs


def estimate_line(study: Study, unique: List[Run], max_parallel: int) -> str:
    """The --dry_run line of the estimated cost (all runs and the unfinished ones)."""
    total = estimate(study, unique)
    if total is None:
        return "# no cost: in the study file (cost: epoch_seconds, resource, source); no estimate"
    todo = estimate(study, [r for r in unique if r.state != "finished"])
    cost = study.cost
    return (f"# estimated {cost.resource}-hours: {total[0]:.1f} for all {len(unique)} runs "
            f"({total[1]} epochs x {cost.epoch_seconds:g} s per epoch), {todo[0]:.1f} for the "
            f"unfinished ones; with --max-parallel {max_parallel}: about "
            f"{todo[0] / max_parallel:.1f} h wall. Epoch time: {cost.source}")
