"""A study's REPORT.md and PNGs in its output folder: per grid (contrast) the metrics of the three
epoch selections with 95 % intervals, the differences from the reference row (Welch, Holm), a
reading line per row, learning curves, the SDTPS rows' gate values and kept-patch foreground
precision; the runs' manifests and the command."""
import datetime
import os
from typing import Dict, List, Optional, Tuple

from tools.ablation.aggregate import NA, SELECTIONS
from tools.ablation.figures import Panel, Series, save_panels
from tools.ablation.gates import QUANTILES, is_sdtps, try_gate_values
from tools.ablation.plan import Run, inspect_run, read_json
from tools.ablation.report import git_revision
from tools.ablation.study import Study, estimate
from utils.outputs import replacing

REPORT_METRICS = ("mAP", "R1", "mINP")
NONE = "-"


def _pp(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return NONE
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"


def cell(line: dict, prefix: str, key: str) -> str:
    """``mean ± sd [low, high]`` in percent (n/a when the selection has no value)."""
    mean, std = line[f"{prefix}{key}_mean"], line[f"{prefix}{key}_std"]
    if mean is None:
        return NA
    text = f"{_pp(mean)} ± {NA if std is None else _pp(std)}"
    low, high = line.get(f"{prefix}{key}_ci_low"), line.get(f"{prefix}{key}_ci_high")
    return text + ("" if low is None else f" [{_pp(low)}, {_pp(high)}]")


def diff_cell(line: dict, prefix: str, key: str) -> Tuple[str, str]:
    """(``Δ [low, high]`` in percentage points, Holm-adjusted p)."""
    diff = line.get(f"{prefix}{key}_diff")
    if diff is None:
        return NONE, NONE
    p = line[f"{prefix}{key}_p_holm"]
    return (f"{_pp(diff, True)} [{_pp(line[f'{prefix}{key}_diff_low'], True)}, "
            f"{_pp(line[f'{prefix}{key}_diff_high'], True)}]",
            NONE if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}"))


def reading(line: dict, reference: str, prefix: str = "", key: str = "mAP",
            ref_line: Optional[dict] = None, spread: Optional[Tuple[float, int, str]] = None) -> str:
    """One line: is the row's difference from the reference detectable at these seeds? Without
    a test (a row with one seed): the plain difference of the means, measured against ``spread``
    (sd, seeds, grid) of the reference's configuration where another grid has it over seeds."""
    diff, low, high = (line.get(f"{prefix}{key}_diff"), line.get(f"{prefix}{key}_diff_low"),
                       line.get(f"{prefix}{key}_diff_high"))
    what = f"`{line['row']}` vs `{reference}`, {SELECTIONS[prefix]} {key}"
    if diff is None:
        text = f"{what}: not testable (fewer than 2 finished seeds in a row)"
        mean, ref_mean = line.get(f"{prefix}{key}_mean"), (ref_line or {}).get(f"{prefix}{key}_mean")
        if mean is None or ref_mean is None:
            return text + "."
        text += f"; difference of the means {_pp(mean - ref_mean, True)} pp"
        if spread is None or not spread[0]:
            return text + " (no seed-to-seed spread of the reference in this study)."
        sd, n, grid = spread
        return (text + f", {abs(mean - ref_mean) / sd:.1f} times the reference's seed-to-seed sd "
                f"({_pp(sd)} pp over {n} seeds in grid `{grid}`).")
    interval = f"{_pp(diff, True)} pp, 95 % CI [{_pp(low, True)}, {_pp(high, True)}]"
    p = line[f"{prefix}{key}_p_holm"]
    p_text = NONE if p is None else f"{p:.3f}"
    if low <= 0 <= high:
        return f"{what}: no detectable difference ({interval}, Holm p {p_text})."
    direction = "higher" if diff > 0 else "lower"
    verdict = ("significant after Holm's correction" if p is not None and p < 0.05
               else "not significant after Holm's correction")
    return f"{what}: {direction} ({interval}, the interval excludes 0; Holm p {p_text}, {verdict})."


def finished_summaries(runs: List[Run]) -> Dict[str, List[Tuple[Run, dict]]]:
    """Row name -> [(run, summary.json)] of the finished runs."""
    out: Dict[str, List[Tuple[Run, dict]]] = {}
    for run in runs:
        summary = read_json(os.path.join(run.folder, "summary.json"))
        if inspect_run(run).state == "finished" and summary and summary.get("last"):
            out.setdefault(run.row.name, []).append((run, summary))
    return out


def curve(summaries: List[dict], split: str, key: str = "mAP"):
    """(epochs, mean, min, max) over the seeds of ``split``'s ``key`` at every epoch evaluated in
    every one of them (summary.json ``history``)."""
    per_run = [{h["epoch"]: h["results"][split][key] for h in s.get("history", [])
                if split in h.get("results", {})} for s in summaries]
    if not per_run:
        return [], [], [], []
    epochs = sorted(set.intersection(*(set(r) for r in per_run)))
    values = [[r[e] for r in per_run] for e in epochs]
    return (epochs, [sum(v) / len(v) for v in values], [min(v) for v in values],
            [max(v) for v in values])


def curves_figure(path: str, name: str, reference: str, rows: List[str],
                  done: Dict[str, List[Tuple[Run, dict]]]) -> Optional[str]:
    panels = []
    for split, title in (("test", "test mAP (%)"), ("val", "validation mAP (%)")):
        series = []
        for i, row in enumerate(rows):
            epochs, mean, low, high = curve([s for _, s in done.get(row, [])], split)
            if epochs:
                series.append(Series(f"{row} (n={len(done[row])})", epochs,
                                     [v * 100 for v in mean], [v * 100 for v in low],
                                     [v * 100 for v in high], color=i, dashed=row == reference))
        if series:
            panels.append(Panel(title, "epoch", "mAP (%)", series))
    if not panels:
        return None
    return save_panels(path, f"{name}: mAP per evaluated epoch (line: mean over seeds; band: "
                             f"their range; dashed: reference)", panels)


def gates_figure(path: str, name: str, gates: Dict[str, dict]) -> Optional[str]:
    from tools.ablation.gates import BINS

    centres = [(i + 0.5) / BINS for i in range(BINS)]
    panels = [Panel(row, "gate value", "density",
                    [Series("at initialisation", centres, g["init"]["density"], color=7, dashed=True),
                     Series("at the last epoch", centres, g["end"]["density"], color=0)])
              for row, g in gates.items() if "error" not in g]
    if not panels:
        return None
    return save_panels(path, f"{name}: SDTPS gate values (all pairs, heads and patches of the first "
                             f"test batches, one seed)", panels)


def manifest_lines(runs: List[Run]) -> List[str]:
    """The distinct code commits, libraries and devices of the finished runs' manifests."""
    seen: Dict[str, Dict[str, int]] = {"code": {}, "libraries": {}, "device": {}}
    for run in runs:
        manifest = (read_json(os.path.join(run.folder, "summary.json")) or {}).get("manifest") or {}
        code = manifest.get("code") or {}
        device = manifest.get("device") or {}
        values = {"code": f"{code.get('commit', 'unknown')}" + (" (dirty)" if code.get("dirty") is True else ""),
                  "libraries": ", ".join(f"{k} {v}" for k, v in sorted((manifest.get("libraries") or {}).items())),
                  "device": " ".join(str(device.get(k, "")) for k in ("type", "names", "cpus", "threads")
                                     if device.get(k) is not None)}
        for key, value in values.items():
            if manifest:
                seen[key][value] = seen[key].get(value, 0) + 1
    lines = []
    for key, values in seen.items():
        for value, count in values.items():
            lines.append(f"- {key}: {value or 'unknown'} ({count} run{'s' * (count != 1)})")
    return lines or ["- no finished run has a manifest yet"]


def seed_spread(folders: set, by_grid: Dict[str, List[Run]], tables: Dict[str, List[dict]],
                prefix: str, key: str) -> Optional[Tuple[float, int, str]]:
    """(sd, seeds, grid) of a row, in any grid, whose runs include all of ``folders`` (the same
    configuration: shared runs share their folder) and that has at least 2 finished seeds."""
    for name, runs in by_grid.items():
        for line in tables.get(name, []):
            theirs = {run.folder for run in runs if run.row.name == line["row"]}
            std = line.get(f"{prefix}{key}_std")
            if folders and folders <= theirs and line["seeds"] >= 2 and std is not None:
                return std, line["seeds"], name
    return None


def _grid_section(study: Study, grid, runs: List[Run], table: List[dict], output: str,
                  gate_cache: Dict[str, dict], gates: bool, by_grid: Dict[str, List[Run]],
                  tables: Dict[str, List[dict]]) -> List[str]:
    ref = grid.reference
    done = finished_summaries(runs)
    md = [f"## Contrast `{grid.name}` (reference `{ref}`)", ""]
    if grid.description:
        md += [grid.description.strip(), ""]
    md += [f"Seeds: {' '.join(map(str, grid.seeds))}; rows: "
           + ", ".join(f"`{r.name}`" for r in grid.rows) + f". Tables: `{grid.name}/results.md`.", ""]
    for prefix, title in SELECTIONS.items():
        head = ["row", "n"] + list(REPORT_METRICS)
        for key in REPORT_METRICS:
            head += [f"Δ {key} vs `{ref}` [95 % CI]", "p (Holm)"]
        md += [f"### {title[0].upper() + title[1:]}", "", "| " + " | ".join(head) + " |",
               "|---|---:|" + "---:|" * (len(head) - 2)]
        for line in table:
            n = line["seeds"] if prefix != "best_" or line["best_selected_on"] == "val" else 0
            cells = [f"`{line['row']}`", str(n)] + [cell(line, prefix, k) for k in REPORT_METRICS]
            for key in REPORT_METRICS:
                cells += (["reference", NONE] if line["row"] == ref else list(diff_cell(line, prefix, key)))
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
    md += ["Reading (mAP; the interval is the unadjusted 95 % interval of the difference, p is "
           "Holm-adjusted over the contrast's rows):", ""]
    ref_line = next((line for line in table if line["row"] == ref), None)
    ref_folders = {run.folder for run in runs if run.row.name == ref}
    for line in table:
        if line["row"] != ref:
            md += ["- " + reading(line, ref, "", "mAP", ref_line,
                                  seed_spread(ref_folders, by_grid, tables, "", "mAP")),
                   "  - " + reading(line, ref, "best_", "mAP", ref_line,
                                    seed_spread(ref_folders, by_grid, tables, "best_", "mAP"))]
    md.append("")
    fig = curves_figure(os.path.join(output, f"curves_{grid.name}.png"), grid.name, ref,
                        [r.name for r in grid.rows], done)
    md += [f"![learning curves]({os.path.basename(fig)})" if fig else
           "No learning curve yet (no finished run).", ""]
    sdtps_rows = [r for r in grid.rows if any(is_sdtps(run) for run in runs if run.row.name == r.name)]
    if sdtps_rows:
        md += _selection_section(grid, table, sdtps_rows, done, output, gate_cache, gates)
    return md


def _selection_section(grid, table, sdtps_rows, done, output, gate_cache, gates) -> List[str]:
    lines = {line["row"]: line for line in table}
    md = ["### SDTPS: kept-patch foreground precision (last epoch, test split)", "",
          "Share of the kept patches on the person, against all patches (= what a random "
          "selection keeps) and a perfect selection of the same size (engine/evaluator.py's "
          "rule, as tools/probe_selection.py).", "",
          "| row | n | kept patches on the person | random | perfect |", "|---|---:|---:|---:|---:|"]
    for row in sdtps_rows:
        line = lines[row.name]
        if line["fg_precision_mean"] is None:
            md.append(f"| `{row.name}` | {line['seeds']} | {NA} | {NA} | {NA} |")
            continue
        std = line["fg_precision_std"]
        md.append(f"| `{row.name}` | {line['seeds']} | {_pp(line['fg_precision_mean'])} ± "
                  f"{NA if std is None else _pp(std)} | {_pp(line['fg_share_mean'])} | "
                  f"{_pp(line['fg_best_mean'])} |")
    md.append("")
    if not gates:
        return md + ["Gate values: not computed (--no-gates).", ""]
    values = {}
    for row in sdtps_rows:
        first = (done.get(row.name) or [None])[0]
        if first is None:
            values[row.name] = {"error": "no finished seed"}
            continue
        run, summary = first
        if run.folder not in gate_cache:
            gate_cache[run.folder] = try_gate_values(run.folder, summary["last"]["epoch"])
        values[row.name] = dict(gate_cache[run.folder], seed=run.seed)
    qs = " / ".join(f"q{int(q * 100)}" for q in QUANTILES)
    md += ["### SDTPS: gate values at initialisation and at the last epoch", "",
           f"Every gate (9 modality pairs x heads x patches) on the first test batches of one seed; "
           f"initialisation: the model built from the run's config with its seed. Mean and "
           f"quantiles {qs}.", "",
           f"| row | seed | init: mean | init: {qs} | end: mean | end: {qs} |", "|---|---:|---:|---|---:|---|"]
    for row, g in values.items():
        if "error" in g:
            md.append(f"| `{row}` | {g.get('seed', NONE)} | {NA} | {g['error']} | {NA} | |")
            continue
        md.append(f"| `{row}` | {g['seed']} | {g['init']['mean']:.3f} | "
                  + " / ".join(f"{q:.3f}" for q in g["init"]["quantiles"])
                  + f" | {g['end']['mean']:.3f} | " + " / ".join(f"{q:.3f}" for q in g["end"]["quantiles"]) + " |")
    fig = gates_figure(os.path.join(output, f"gates_{grid.name}.png"), grid.name, values)
    md += ["", f"![gate values]({os.path.basename(fig)})" if fig else "No gate figure (no values).", ""]
    return md


def write_report(study: Study, by_grid: Dict[str, List[Run]], tables: Dict[str, List[dict]],
                 output: str, command: str, gates: bool = True) -> str:
    """Write ``<output>/REPORT.md`` (and its PNGs); returns its path."""
    unique = {run.folder: run for runs in by_grid.values() for run in runs}
    finished = [run for run in unique.values() if inspect_run(run).state == "finished"]
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    md = [f"# Study `{study.name}`", ""]
    if study.description:
        md += [study.description.strip(), ""]
    md += [f"- command: `{command}`",
           f"- regenerate this report from the run folders: `python tools/ablate.py --study "
           f"{study.path} --output {output} --collect`",
           f"- date: {date}; report code: {git_revision()}",
           f"- study file: `{study.path}`; {len(unique)} unique runs ({len(finished)} finished) "
           f"for {sum(len(r) for r in by_grid.values())} grid runs (a row shared by grids ran once)"]
    cost = estimate(study, list(unique.values()))
    if cost is not None:
        md.append(f"- estimated cost: {cost[0]:.1f} {study.cost.resource}-hours ({cost[1]} epochs x "
                  f"{study.cost.epoch_seconds:g} s; {study.cost.source})")
    md += ["", "Cells: mean ± sample sd (ddof=1) over the finished seeds [95 % t interval of the "
           "mean], percent, TEST split. Δ: row minus reference in percentage points with its 95 % "
           "interval (Welch's t-test), p Holm-adjusted over the contrast's rows for each metric and "
           "selection. Selections: the last epoch (the primary result); the epoch selected on the "
           "validation identities; the best test epoch (the paper's protocol, optimistic: for "
           "comparison with published tables only). n/a: not available (fewer seeds, no "
           "validation split); -: not computable.", ""]
    gate_cache: Dict[str, dict] = {}
    for grid in study.grids:
        md += _grid_section(study, grid, by_grid[grid.name], tables[grid.name], output, gate_cache,
                            gates, by_grid, tables)
    md += ["## Runs: manifest", ""] + manifest_lines(finished) + [""]
    path = os.path.join(output, "REPORT.md")
    with replacing(path, "REPORT.md") as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    return path
