"""The finished runs' summary.json values -> one line per grid row: mean and std over the seeds,
the 95 % interval of the last epoch's mean, the difference from the grid's reference row (Welch,
Holm-adjusted p) and the paper protocol's inflation (computed in ``stats.py``)."""
import contextlib
import os
import re
import sys
from typing import List, Optional

from config import build_cfg
from tools.ablation.grid import Grid
from tools.ablation.plan import RUN_LOG, STAMP, Run, inspect_run, read_json
from tools.ablation.stats import holm, mean_std, t_interval, welch

METRICS = ("mAP", "R1", "R5", "R10", "mINP")
# Kept-token foreground precision (synthetic dataset, models with SDTPS): the share of kept
# patches on the person, of all patches (= a random selection), of a perfect selection.
FG_METRICS = ("fg_precision", "fg_share", "fg_best")
NA = "n/a"
# The selections of the reported epoch: column prefix -> what it is.
SELECTIONS = {"": "last epoch", "best_": "validation-selected epoch",
              "paper_": "best test epoch (the paper's protocol)"}


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
    """One dict per row: the columns of results.csv (fractions; None = n/a)."""
    table = []
    values_by = {prefix: {} for prefix in SELECTIONS}  # selection -> row -> per-seed metrics
    for row in grid.rows:
        lasts, bests, best_epochs, seconds, seeds, missing, papers = [], [], [], [], [], [], []
        inflations = []  # per seed: the paper protocol's test metrics minus the last epoch's
        all_val, resumed, params = True, False, None
        for run in runs:
            if run.row.name != row.name:
                continue
            summary = read_json(os.path.join(run.folder, "summary.json"))
            if inspect_run(run).state != "finished" or not summary or not summary.get("last"):
                missing.append(run.seed)
                continue
            last, best, best_epoch = run_metrics(summary)
            paper = summary.get("best_test_paper_protocol") or {}
            if paper.get("metrics"):
                papers.append(paper["metrics"])
                inflations.append({k: paper["metrics"][k] - last[k] for k in METRICS})
            seeds.append(run.seed)
            lasts.append(last)
            seconds.append(float(summary.get("train_seconds", float("nan"))))
            if best is None:
                all_val = False
            else:
                bests.append(best)
                best_epochs.append(best_epoch)
            stamp = read_json(os.path.join(run.folder, STAMP)) or {}
            resumed |= any(a.get("resume") for a in stamp.get("attempts", []))
            if with_params and params is None:
                params = run_params(run.folder)
        line = {"row": row.name, "seeds": len(seeds), "seed_list": " ".join(map(str, seeds)),
                "missing_seeds": " ".join(map(str, missing))}
        for key in METRICS:
            line[f"{key}_mean"], line[f"{key}_std"] = mean_std([m[key] for m in lasts])
            line[f"{key}_ci_low"], line[f"{key}_ci_high"] = (
                t_interval([m[key] for m in lasts]) or (None, None))
        val_ok = all_val and bool(bests)
        for key in METRICS:
            stats = mean_std([m[key] for m in bests]) if val_ok else (None, None)
            line[f"best_{key}_mean"], line[f"best_{key}_std"] = stats
        for key in METRICS:
            stats = mean_std([m[key] for m in papers]) if len(papers) == len(lasts) else (None, None)
            line[f"paper_{key}_mean"], line[f"paper_{key}_std"] = stats
            line[f"{key}_inflation"] = (mean_std([d[key] for d in inflations])[0]
                                        if len(inflations) == len(lasts) else None)
        for key in FG_METRICS:
            values = [m[key] for m in lasts if key in m]
            stats = mean_std(values) if values and len(values) == len(lasts) else (None, None)
            line[f"{key}_mean"], line[f"{key}_std"] = stats
        line["best_epoch_mean"] = mean_std(best_epochs)[0] if val_ok else None
        line["best_selected_on"] = "val" if val_ok else NA
        line["params_M"] = params
        line["train_seconds_mean"] = mean_std(seconds)[0]
        line["resumed"] = resumed
        table.append(line)
        values_by[""][row.name] = lasts
        values_by["best_"][row.name] = bests if val_ok else []
        values_by["paper_"][row.name] = papers if len(papers) == len(lasts) else []
        for prefix in ("best_", "paper_"):
            for key in METRICS:
                line[f"{prefix}{key}_ci_low"], line[f"{prefix}{key}_ci_high"] = (
                    t_interval([m[key] for m in values_by[prefix][row.name]]) or (None, None))
    for prefix, by_row in values_by.items():
        compare_with_reference(table, by_row, grid.reference, prefix)
    return table


def compare_with_reference(table: List[dict], values_by_row: dict, reference: Optional[str],
                           prefix: str = "") -> None:
    """Add each row's difference from the reference row for one selection of the epoch (prefix
    ``""``: last, ``best_``: validation-selected, ``paper_``: best test epoch):
    ``<prefix><metric>_diff`` with its interval, Welch's p-value and, per metric, the p-values
    Holm-adjusted over the other rows."""
    for key in METRICS:
        tests = [welch([m[key] for m in values_by_row[line["row"]]],
                       [m[key] for m in values_by_row[reference]])
                 if reference is not None and line["row"] != reference else None for line in table]
        adjusted = holm([test.p if test else None for test in tests])
        for line, test, p_holm in zip(table, tests, adjusted):
            line[f"{prefix}{key}_diff"] = test.diff if test else None
            line[f"{prefix}{key}_diff_low"] = test.low if test else None
            line[f"{prefix}{key}_diff_high"] = test.high if test else None
            line[f"{prefix}{key}_p"] = test.p if test else None
            line[f"{prefix}{key}_p_holm"] = p_holm
