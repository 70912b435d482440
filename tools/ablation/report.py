"""results.csv (fractions, full precision) and results.md (percent, with the provenance)."""
import csv
import datetime
import os
import subprocess
from typing import List

from tools.ablation.aggregate import FG_METRICS, METRICS, NA
from tools.ablation.grid import ROOT, Grid


CSV_COLUMNS = (["row", "seeds", "seed_list", "missing_seeds"]
               + [f"{k}_{s}" for k in METRICS for s in ("mean", "std")]
               + [f"best_{k}_{s}" for k in METRICS for s in ("mean", "std")]
               + [f"paper_{k}_{s}" for k in METRICS for s in ("mean", "std")]
               + [f"{k}_{s}" for k in FG_METRICS for s in ("mean", "std")]
               + ["best_epoch_mean", "best_selected_on", "params_M", "train_seconds_mean", "resumed"]
               + [f"{k}_{s}" for k in METRICS for s in ("ci_low", "ci_high")]
               + [f"{k}_{s}" for k in METRICS for s in ("diff", "diff_low", "diff_high", "p", "p_holm")]
               + [f"{k}_inflation" for k in METRICS])
# The metrics of the interval, reference and inflation columns of results.md (all are in the csv).
MD_STATS_METRICS = ("mAP", "R1")
NONE = "-"  # results.md: a statistic that is not computable (under 2 seeds; no reference)


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


def _interval(mean, low, high) -> str:
    """``mean [low, high]`` in percent."""
    if mean is None or low is None:
        return NONE
    return f"{mean * 100:.2f} [{low * 100:.2f}, {high * 100:.2f}]"


def _signed(value, low=None, high=None) -> str:
    """A difference in percentage points, with its interval when given."""
    if value is None:
        return NONE
    return f"{value * 100:+.2f}" + ("" if low is None else f" [{low * 100:+.2f}, {high * 100:+.2f}]")


def _p(value) -> str:
    if value is None:
        return NONE
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _stats_section(grid: Grid, table: List[dict]) -> List[str]:
    """results.md's intervals of the last epoch and, with a reference row, the differences."""
    ref = grid.reference
    head = "| row | seeds | " + " | ".join(f"{k} [95 % CI]" for k in MD_STATS_METRICS)
    align = "|---|---:|" + "---:|" * len(MD_STATS_METRICS)
    if ref:
        head += " | " + " | ".join(f"Δ {k} vs {ref} [95 % CI] | p (Holm)" for k in MD_STATS_METRICS)
        align += "---:|---:|" * len(MD_STATS_METRICS)
    md = ["", "## Last epoch: 95 % intervals" + (f" and differences from `{ref}`" if ref else ""), "",
          ("Interval of the mean over the seeds: t distribution with n - 1 degrees of freedom "
           "(mean ± t × s / √n). ")
          + (f"Δ: row minus `{ref}` in percentage points with its 95 % interval, Welch's t-test "
             "(unequal variances, Welch-Satterthwaite degrees of freedom); p: two-sided, "
             "Holm-adjusted over the grid's rows for each metric (unadjusted p in results.csv). "
             if ref else "")
          + "-: not computable (fewer than 2 finished seeds).", "", head + " |", align]
    for line in table:
        cells = [_interval(line[f"{k}_mean"], line[f"{k}_ci_low"], line[f"{k}_ci_high"])
                 for k in MD_STATS_METRICS]
        if ref:
            for k in MD_STATS_METRICS:
                cells += (["reference", NONE] if line["row"] == ref else
                          [_signed(line[f"{k}_diff"], line[f"{k}_diff_low"], line[f"{k}_diff_high"]),
                           _p(line[f"{k}_p_holm"])])
        md.append(f"| {line['row']} | {line['seeds']} | " + " | ".join(cells) + " |")
    return md


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
    """Write <output>/results.csv and <output>/results.md from :func:`aggregate.aggregate`'s table."""
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
    md += _stats_section(grid, table)
    md += ["", "## Best epoch selected on the validation split (its test metrics)", "",
           "| row | seeds | best epoch (mean) | mAP | R1 | R5 | R10 | mINP |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for line in table:
        cells = [_pct(line[f"best_{k}_mean"], line[f"best_{k}_std"]) for k in METRICS]
        epoch = NA if line["best_epoch_mean"] is None else f"{line['best_epoch_mean']:.1f}"
        md.append(f"| {line['row']} | {line['seeds']} | {epoch} | " + " | ".join(cells) + " |")
    md += ["", ("## Best test epoch (the paper's protocol: the epoch with the highest test mAP, "
                "selected on the test split; optimistic, for comparison with published tables only)"),
           "", ("Inflation: this epoch's test metric minus the last epoch's, mean over the seeds, in "
                "percentage points (how much the test-set selection flatters the row)."), "",
           "| row | seeds | mAP | R1 | R5 | R10 | mINP | "
           + " | ".join(f"inflation {k}" for k in MD_STATS_METRICS) + " |",
           "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(MD_STATS_METRICS)]
    for line in table:
        cells = [_pct(line[f"paper_{k}_mean"], line[f"paper_{k}_std"]) for k in METRICS]
        cells += [_signed(line[f"{k}_inflation"]) for k in MD_STATS_METRICS]
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
