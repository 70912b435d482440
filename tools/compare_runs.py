"""Why do two runs differ? Compare their configs, manifests and per-epoch metrics.

    python tools/compare_runs.py output/run_a output/run_b [--plot compare.png]
    python tools/compare_runs.py a/summary.json b/summary.json
    python tools/compare_runs.py eval_a/test_results.json eval_b/test_results.json

Each run is a training run folder (its ``summary.json``, and ``log.txt`` beside it for the
losses) or a ``summary.json`` file; an evaluation's ``test_results.json`` (``test_net.py``)
compares as one row, epoch 0. Printed, in order:

* the config differences (``config.flatten_config`` of the configs stored in the manifests);
* the manifest differences (``utils.manifest``): code, libraries, device, world size, loader
  workers, deterministic flag, data fingerprint;
* the test (and validation) metrics per epoch side by side, the mean training loss per epoch
  (from ``log.txt``) and the first epoch where a metric differs by more than 1e-6;
* one last line, ``verdict: <cause>``, the likely cause class. When several apply the first of
  this list is named and the others follow as ``(also: ...)``:

  1. ``different config: KEY, KEY`` -- config keys other than where the run reads and writes
     (``OUTPUT_DIR``, ``DATASETS.ROOT_DIR``; the data is compared by its fingerprint), or the
     number of processes (``world_size``); ``SOLVER.SEED`` is listed with the others;
  2. ``different seed`` -- ``SOLVER.SEED`` is the only config difference;
  3. ``different data`` -- same config, but a split's identities, triplets, cameras, files or
     file sizes differ;
  4. ``different code`` -- another commit, or another uncommitted change;
  5. ``same inputs, numerical differences only`` -- same code, config, data and seed, but another
     device, library version, thread count or platform (or, in the same environment, metrics
     that differ: non-deterministic kernels);
  6. ``identical`` -- nothing of the above differs and the metrics agree to 1e-6.

A config or seed difference explains the data difference it causes (``DATASETS.VAL_IDS`` and
``SOLVER.SEED`` choose the validation identities), and data or code is a stronger claim than the
environment, hence the order. ``--plot`` draws both runs' test mAP and training loss per epoch
(Pillow, as the other tools' plots) into a new PNG, checked before any work and written
atomically (``utils.outputs``): an existing file, an input or a folder is refused.
"""
import argparse
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image, ImageDraw  # noqa: E402

from config import flatten_config  # noqa: E402
from engine.cli import run_cli  # noqa: E402
from engine.defaults import config_changes  # noqa: E402
from tools.plot_results import axis_range  # noqa: E402
from utils.manifest import LOCATION_KEYS  # noqa: E402
from utils.outputs import OutputPathError, check_output, replacing  # noqa: E402
from utils.visualization import (BLACK, LIGHT_GRAY, WHITE, categorical_color, get_font,  # noqa: E402
                                 line_height, text_size)

TOLERANCE = 1e-6
SEED_KEY = "SOLVER.SEED"
# Manifest entries derived from the config: compared as config keys.
DERIVED = ("config", "config_hash", "deterministic", "num_workers")
EPOCH_LINE = re.compile(r"epoch (\d+)/\d+ done in [\d.]+ s: mean loss ([^\s,]+)")


def load_run(path: str, name: str) -> Dict:
    """{"summary", "file", "log"} of a run folder or summary.json; errors name ``path``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} {path}: no such file or folder")
    file = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{name} {path}: no summary.json in this folder (not a finished "
                                "training run): give a run folder or its summary.json")
    try:
        with open(file) as f:
            summary = json.load(f)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{name} {file} is not a JSON file ({exc}): give a run folder or its "
                         "summary.json") from exc
    if not isinstance(summary, dict) or not isinstance(summary.get("manifest"), dict):
        raise ValueError(f"{name} {file} holds no run manifest ('manifest'): it was not written "
                         "by train_net.py of this version (runs before the manifest cannot be "
                         "compared)")
    log = os.path.join(os.path.dirname(file), "log.txt")  # a training run's (losses per epoch)
    return {"summary": summary, "file": file,
            "log": log if "history" in summary and os.path.isfile(log) else ""}


def manifest_changes(a: Dict, b: Dict) -> Dict[str, Tuple]:
    """{dotted key: (a, b)} of the manifest entries that differ, :data:`DERIVED` left out."""
    fa = flatten_config({k: v for k, v in a.items() if k not in DERIVED})
    fb = flatten_config({k: v for k, v in b.items() if k not in DERIVED})
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def _numbers(tree, prefix: str = "") -> Dict[str, float]:
    """The numeric leaves of a metrics dict, by dotted name (``by_feat.ori.mAP``)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def history_by_epoch(summary: Dict) -> Dict[int, Dict[str, Dict[str, float]]]:
    """{epoch: {split: {metric: value}}} of a summary's ``history``; a test_results.json (one
    evaluation, per TEST.MISS setting) as epoch 0 with splits ``test`` and ``test/<miss>``."""
    if "history" not in summary and isinstance(summary.get("results"), dict):
        return {0: {"test" if miss == "none" else f"test/{miss}": _numbers(m)
                    for miss, m in summary["results"].items()}}
    return {int(h["epoch"]): {split: _numbers(m) for split, m in h["results"].items()}
            for h in summary.get("history") or []}


def first_difference(ha: Dict, hb: Dict, tol: float = TOLERANCE) -> Optional[Tuple]:
    """(epoch, split, metric, a, b) of the first metric (epoch order) that differs by more than
    ``tol`` in the epochs both runs evaluated (a metric only one run has counts), or None."""
    for epoch in sorted(set(ha) & set(hb)):
        for split in sorted(set(ha[epoch]) | set(hb[epoch]), key=lambda s: (s != "test", s)):
            ma, mb = ha[epoch].get(split, {}), hb[epoch].get(split, {})
            for metric in sorted(set(ma) | set(mb), key=lambda m: (m != "mAP", m)):
                va, vb = ma.get(metric, math.nan), mb.get(metric, math.nan)
                same = (va == vb) or abs(va - vb) <= tol or (math.isnan(va) and math.isnan(vb))
                if not same:
                    return epoch, split, metric, va, vb
    return None


def read_losses(log: str) -> Dict[int, float]:
    """{epoch: mean training loss} from a log.txt's epoch lines (the last line of an epoch that
    ran twice, e.g. before and after a resume)."""
    losses = {}
    if log:
        with open(log, errors="replace") as f:
            for line in f:
                match = EPOCH_LINE.search(line)
                if match:
                    try:
                        losses[int(match.group(1))] = float(match.group(2))
                    except ValueError:
                        pass
    return losses


def verdict(config_diff: Dict, manifest_diff: Dict, metrics_differ: bool) -> str:
    """The cause class (see the module docstring for the precedence)."""
    keys = [k for k in config_diff if k not in LOCATION_KEYS]
    keys += ["world_size"] if "world_size" in manifest_diff else []
    causes = []
    if [k for k in keys if k != SEED_KEY]:
        causes.append("different config: " + ", ".join(keys))
    elif keys:
        causes.append("different seed")
    if any(k == "data" or k.startswith("data.") for k in manifest_diff):
        causes.append("different data")
    if any(k.startswith("code.") for k in manifest_diff):
        causes.append("different code")
    environment = any(k.startswith(("libraries.", "device.")) for k in manifest_diff)
    if not causes:
        if environment:
            return "same inputs, numerical differences only"
        if metrics_differ:
            return ("same inputs, numerical differences only (in the same environment too: "
                    "non-deterministic kernels?)")
        return "identical"
    causes += ["other device/libraries"] if environment else []
    return causes[0] + (f" (also: {', '.join(causes[1:])})" if len(causes) > 1 else "")


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _pct(value: Optional[float]) -> str:
    return "-" if value is None or math.isnan(value) else f"{value * 100:.4f}"


def metrics_lines(ha: Dict, hb: Dict, la: Dict, lb: Dict) -> List[str]:
    """The per-epoch table: mAP and R1 (%) of each evaluated split, mean loss, largest gap."""
    epochs = sorted(set(ha) | set(hb) | set(la) | set(lb))
    splits = sorted({s for h in (ha, hb) for e in h.values() for s in e}, key=lambda s: (s != "test", s))
    header = ["epoch"] + [f"{s} {m} {r}" for s in splits for m in ("mAP", "R1") for r in "AB"]
    header += ["loss A", "loss B", "max |diff|"]
    rows = []
    for epoch in epochs:
        ea, eb = ha.get(epoch, {}), hb.get(epoch, {})
        row = [str(epoch)]
        for split in splits:
            for metric in ("mAP", "R1"):
                row += [_pct(ea.get(split, {}).get(metric)), _pct(eb.get(split, {}).get(metric))]
        row += [f"{la[epoch]:.4f}" if epoch in la else "-", f"{lb[epoch]:.4f}" if epoch in lb else "-"]
        gaps = [abs(ea[s][m] - eb[s][m]) for s in set(ea) & set(eb) for m in set(ea[s]) & set(eb[s])]
        row.append(f"{max(gaps):.2e}" if gaps else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows]


# ------------------------------------------------------------------------------------ plot
def check_plot_path(path: str, runs: Dict[str, str]) -> None:
    """--plot names a new .png file (``utils.outputs.check_output``: not one of the ``runs``
    {name: path}, not a folder, a writable place) that does not exist yet."""
    inputs = {name: os.path.join(p, "summary.json") if os.path.isdir(p) else p
              for name, p in runs.items()}
    check_output(path, "--plot", (".png",), inputs)
    if os.path.exists(path):
        raise OutputPathError(f"--plot {path} exists: choose another file name (it is not "
                              "overwritten)")


def _panel(draw, box, title: str, curves: List[Tuple[str, Dict[int, float]]], font) -> None:
    """One line chart of ``curves`` (label, {epoch: value}) in ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    values = [v for _, c in curves for v in c.values() if math.isfinite(v)]
    epochs = sorted({e for _, c in curves for e in c})
    draw.text((x0, y0 - line_height(font) - 6), title, fill=BLACK, font=font)
    if not values:
        draw.rectangle([x0, y0, x1, y1], outline=BLACK)
        draw.text((x0 + 10, y0 + 10), "no data", fill=BLACK, font=font)
        return
    lo, hi, step = axis_range(values, values)
    first, last = epochs[0], max(epochs[-1], epochs[0] + 1)

    def xy(epoch: float, value: float):
        return (x0 + (x1 - x0) * (epoch - first) / (last - first),
                y1 - (y1 - y0) * (value - lo) / (hi - lo))

    tick = lo
    while tick <= hi + step / 2:
        y = xy(first, tick)[1]
        draw.line([(x0, y), (x1, y)], fill=LIGHT_GRAY)
        label = f"{tick:g}"
        draw.text((x0 - 6 - text_size(label, font)[0], y - line_height(font) / 2), label,
                  fill=BLACK, font=font)
        tick += step
    every = max(1, round(len(epochs) / 12))
    for epoch in epochs[::every]:
        x = xy(epoch, lo)[0]
        draw.text((x - text_size(str(epoch), font)[0] / 2, y1 + 4), str(epoch), fill=BLACK, font=font)
    draw.rectangle([x0, y0, x1, y1], outline=BLACK)  # over the grid lines
    for i, (_, curve) in enumerate(curves):
        points = [xy(e, v) for e, v in sorted(curve.items()) if math.isfinite(v)]
        color = categorical_color(i)
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=color, width=2 if i else 1)


def plot(path: str, names: Tuple[str, str], panels: Dict[str, Tuple[Dict, Dict]]) -> None:
    """One panel per entry of ``panels`` ({title: ({epoch: value} of A, of B)}), run A and B
    each in its colour, written to ``path``."""
    font = get_font(11)
    width, panel_h, left, top, gap = 760, 260, 70, 40, 60
    legend_h = 2 * line_height(font) + 10
    height = top + len(panels) * (panel_h + gap) - gap + 30 + legend_h
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    for i, (title, series) in enumerate(panels.items()):
        y0 = top + i * (panel_h + gap)
        _panel(draw, (left, y0, width - 20, y0 + panel_h - 20), title, list(zip(names, series)),
               font)
    for i, name in enumerate(names):
        y = height - legend_h + i * line_height(font)
        draw.rectangle([left, y + 3, left + 10, y + 13], fill=categorical_color(i))
        draw.text((left + 16, y), f"{'AB'[i]}: {name}", fill=BLACK, font=font)
    with replacing(path, "--plot") as tmp:
        image.save(tmp, format="PNG")


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("RUN_A", "RUN_B"):
        parser.add_argument(name.lower(), metavar=name,
                            help="training run folder, its summary.json, or a test_results.json")
    parser.add_argument("--plot", default="", metavar="PNG",
                        help="also draw both runs' test mAP and loss per epoch to this new PNG")
    return parser


def main(argv=None) -> Dict:
    """Print the comparison; returns its parts (for tests)."""
    args = build_parser().parse_args(argv)
    if args.plot:
        check_plot_path(args.plot, {"RUN_A": args.run_a, "RUN_B": args.run_b})
    a, b = load_run(args.run_a, "RUN_A"), load_run(args.run_b, "RUN_B")
    ma, mb = a["summary"]["manifest"], b["summary"]["manifest"]
    config_diff = config_changes(ma.get("config") or {}, mb.get("config") or {})
    manifest_diff = manifest_changes(ma, mb)
    ha, hb = history_by_epoch(a["summary"]), history_by_epoch(b["summary"])
    la, lb = read_losses(a["log"]), read_losses(b["log"])
    first = first_difference(ha, hb)

    print(f"A: {a['file']}\nB: {b['file']}")
    print(f"\nconfig differences ({len(config_diff)}):")
    for key, (va, vb) in config_diff.items():
        note = "  (where the run reads or writes: not a cause)" if key in LOCATION_KEYS else ""
        print(f"  {key}: {_short(va)} | {_short(vb)}{note}")
    print(f"\nmanifest differences ({len(manifest_diff)}):")
    for key, (va, vb) in manifest_diff.items():
        print(f"  {key}: {_short(va)} | {_short(vb)}")
    print("\nper-epoch metrics (A | B):")
    if ha or hb or la or lb:
        for line in metrics_lines(ha, hb, la, lb):
            print("  " + line)
    else:
        print("  no per-epoch history in either run")
    only = sorted(set(ha) ^ set(hb))
    if only:
        print(f"  epochs evaluated by one run only: {', '.join(map(str, only))}")
    if first is None:
        print(f"no metric differs by more than {TOLERANCE:g} in the "
              f"{len(set(ha) & set(hb))} epoch(s) both runs evaluated")
    else:
        epoch, split, metric, va, vb = first
        print(f"first difference beyond {TOLERANCE:g}: epoch {epoch}, {split} {metric}: "
              f"{va!r} | {vb!r}")
    if args.plot:
        maps = tuple({e: s["test"]["mAP"] * 100 for e, s in h.items() if "mAP" in s.get("test", {})}
                     for h in (ha, hb))
        plot(args.plot, (args.run_a, args.run_b),
             {"test mAP (%) per epoch": maps, "mean training loss per epoch": (la, lb)})
        print(f"plot written to {args.plot}")
    result = verdict(config_diff, manifest_diff, first is not None)
    print(f"verdict: {result}")
    return {"config": config_diff, "manifest": manifest_diff, "first_difference": first,
            "verdict": result}


if __name__ == "__main__":
    run_cli(main)
