"""Bar chart with error bars (mean +/- std) of an ablation ``results.csv``.

    python tools/plot_results.py output/ablation/results.csv
    python tools/plot_results.py results.csv --metric mAP --metric R1 --percent \\
        --output ablation.png [--title "RGBNT201 ablation"] [--decimals 1]

The CSV has a ``row`` column naming each configuration (the first column is used when there is
none) and, for every metric M, the columns ``M_mean`` and ``M_std`` (an empty, "n/a" or missing
``M_std`` draws no error bar; such an ``M_mean`` draws no bar), as ``tools/ablate.py`` writes it
(its ``best_mAP`` etc. work too, and its ``seeds`` column is shown as "n=" under each row).
Several ``--metric`` give grouped bars, one colour per metric, in the order given; the groups keep
the CSV's row order. Values are plotted as written (ablate.py writes fractions), or times 100 with
``--percent``. Drawn with Pillow's default font: title, legend, y axis with ticks and grid lines,
one x label per row, the mean above each bar. Default output: ``<csv without .csv>_<metrics>.png``
next to the CSV.
"""
import argparse
import csv
import math
import os
import sys
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_cli  # noqa: E402
from utils.outputs import check_output, replacing  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from utils.visualization import (BLACK, LIGHT_GRAY, WHITE, categorical_color, draw_text,  # noqa: E402
                                 get_font, line_height, text_size, wrap_text)

PLOT_HEIGHT = 320    # px of the plot area (y axis length)
MIN_PLOT_WIDTH = 240
MAX_GROUP_WIDTH = 140  # widest a group may grow to fit its x label
MARGIN = 10
TICK = 4             # tick length (px)
SWATCH = 10          # legend colour square (px)
MAX_LABEL_LINES = 3  # lines of a wrapped x label


def nice_step(span: float, target_ticks: int = 5) -> float:
    """A 1/2/2.5/5 x 10^k step giving about ``target_ticks`` intervals over ``span``."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / target_ticks
    power = 10.0 ** math.floor(math.log10(raw))
    for mult in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= mult * power * (1 + 1e-9):
            return mult * power
    return 10.0 * power


def axis_range(lows: Sequence[float], highs: Sequence[float]):
    """(ymin, ymax, step): ticks from ymin to ymax, always including 0."""
    lo = min([0.0] + [v for v in lows if math.isfinite(v)])
    hi = max([0.0] + [v for v in highs if math.isfinite(v)])
    if hi == lo:
        hi = lo + 1.0
    step = nice_step(hi - lo)
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step, step


def parse_float(text) -> float:
    text = "" if text is None else str(text).strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def read_results(path: str, metrics: Sequence[str], scale: float = 1.0):
    """(row labels, {metric: [(mean, std), ...]}) from the CSV, values times ``scale``."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        records = list(reader)
    if not columns:
        raise ValueError(f"{path}: empty CSV")
    name_col = "row" if "row" in columns else columns[0]
    available = [c[:-5] for c in columns if c.endswith("_mean")]
    missing = [m for m in metrics if f"{m}_mean" not in columns]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(m + '_mean' for m in missing)}; metrics "
                         f"available: {', '.join(available) or 'none (no *_mean column)'}")
    if not records:
        raise ValueError(f"{path}: no data rows")
    names = [str(r.get(name_col, "")) for r in records]
    if "seeds" in columns:
        names = [f"{n} (n={str(r.get('seeds', '')).strip()})" for n, r in zip(names, records)]
    values = {m: [(parse_float(r.get(f"{m}_mean")) * scale, parse_float(r.get(f"{m}_std")) * scale)
                  for r in records] for m in metrics}
    return names, values


def fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def plot(names: List[str], values: Dict[str, list], title: str, decimals: int,
         y_label: str = "mean +/- std"):
    """Draw the chart; returns (image, bars) with one dict per drawn bar (pixel geometry)."""
    font, small = get_font(11), get_font(10)
    lh, sh = line_height(font), line_height(small)
    metrics = list(values)
    means = [v[0] for m in metrics for v in values[m]]
    highs = [v[0] + (v[1] if math.isfinite(v[1]) else 0.0) for m in metrics for v in values[m]]
    lows = [v[0] - (v[1] if math.isfinite(v[1]) else 0.0) for m in metrics for v in values[m]]
    ymin, ymax, step = axis_range(lows + means, highs + means)

    labels = [fmt(v, decimals) for v in means if math.isfinite(v)]
    bar_w = max(24, max((text_size(t, small)[0] for t in labels), default=0) + 6)
    group_gap = max(12, bar_w // 2)
    # Group width: the bars plus a gap, widened (up to MAX_GROUP_WIDTH) for the wrapped x labels.
    longest_word = max((text_size(w, small)[0] for n in names for w in n.split()), default=0)
    longest_name = max((text_size(n, small)[0] for n in names), default=0)
    label_need = min(MAX_GROUP_WIDTH, max(longest_word + 8,
                                          math.ceil(longest_name / MAX_LABEL_LINES) + 16))
    pitch = max(len(metrics) * bar_w + group_gap, label_need, MIN_PLOT_WIDTH // len(names))
    plot_w = len(names) * pitch
    bar_w = max(bar_w, min(40, (pitch - group_gap) // len(metrics)))  # wider bars in wide groups
    ticks = [ymin + i * step for i in range(int(round((ymax - ymin) / step)) + 1)]
    tick_decimals = next(d for d in range(7) if abs(round(step, d) - step) < 1e-9 * step or d == 6)
    tick_labels = [fmt(t, tick_decimals) for t in ticks]
    tick_w = max(text_size(t, small)[0] for t in tick_labels)
    plot_left = MARGIN + lh + 4 + tick_w + TICK + 4
    width = plot_left + plot_w + MARGIN

    title_lines = wrap_text(title, font, width - 2 * MARGIN, max_lines=3)
    # Legend entries flow left to right, wrapping to new lines.
    legend_rows, x = [[]], MARGIN
    for i, metric in enumerate(metrics):
        entry_w = SWATCH + 4 + text_size(metric, small)[0] + 14
        if x + entry_w > width - MARGIN and legend_rows[-1]:
            legend_rows.append([])
            x = MARGIN
        legend_rows[-1].append((i, metric, x))
        x += entry_w
    legend_top = MARGIN + len(title_lines) * lh + 2
    plot_top = legend_top + len(legend_rows) * sh + sh + 6   # room for the top value labels
    plot_bottom = plot_top + PLOT_HEIGHT
    height = plot_bottom + TICK + 4 + MAX_LABEL_LINES * sh + MARGIN

    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(title_lines):
        draw_text(draw, (MARGIN, MARGIN + i * lh, width - MARGIN, MARGIN + (i + 1) * lh), line, font)
    for r, entries in enumerate(legend_rows):
        y = legend_top + r * sh
        for i, metric, x in entries:
            sy = y + (sh - SWATCH) // 2
            draw.rectangle((x, sy, x + SWATCH - 1, sy + SWATCH - 1), fill=categorical_color(i))
            draw_text(draw, (x + SWATCH + 4, y, x + SWATCH + 4 + text_size(metric, small)[0] + 2,
                             y + sh), metric, small, align="left")

    def y_of(v: float) -> int:
        return int(round(plot_bottom - (v - ymin) / (ymax - ymin) * PLOT_HEIGHT))

    # Grid lines, ticks and tick labels.
    for t, label in zip(ticks, tick_labels):
        y = y_of(t)
        draw.line((plot_left, y, plot_left + plot_w - 1, y), fill=LIGHT_GRAY)
        draw.line((plot_left - TICK, y, plot_left - 1, y), fill=BLACK)
        draw_text(draw, (plot_left - TICK - 4 - tick_w, y - sh // 2, plot_left - TICK - 2,
                         y - sh // 2 + sh), label, small, align="right")
    # Y axis title, rotated.
    label_img = Image.new("RGB", (text_size(y_label, font)[0] + 4, lh), WHITE)
    draw_text(ImageDraw.Draw(label_img), (0, 0, label_img.width, lh), y_label, font)
    label_img = label_img.rotate(90, expand=True)
    image.paste(label_img, (MARGIN, plot_top + max(0, (PLOT_HEIGHT - label_img.height) // 2)))

    y_zero = y_of(0.0)
    bars = []
    for g, name in enumerate(names):
        group_left = plot_left + g * pitch
        gx = group_left + (pitch - len(metrics) * bar_w) // 2   # left edge of the first bar
        for j, metric in enumerate(metrics):
            mean, std = values[metric][g]
            if not math.isfinite(mean):
                continue
            x0, x1 = gx + j * bar_w + 1, gx + (j + 1) * bar_w - 2   # inclusive, 1 px apart
            xc = (x0 + x1) // 2
            y_mean = y_of(mean)
            color = categorical_color(j)
            if y_mean < y_zero:
                draw.rectangle((x0, y_mean, x1, y_zero - 1), fill=color)
            elif y_mean > y_zero:
                draw.rectangle((x0, y_zero + 1, x1, y_mean), fill=color)
            has_err = math.isfinite(std) and std > 0
            y_hi, y_lo = (y_of(mean + std), y_of(mean - std)) if has_err else (y_mean, y_mean)
            if has_err:
                cap = max(2, bar_w // 4)
                draw.line((xc, y_hi, xc, y_lo), fill=BLACK)
                draw.line((xc - cap, y_hi, xc + cap, y_hi), fill=BLACK)
                draw.line((xc - cap, y_lo, xc + cap, y_lo), fill=BLACK)
            label = fmt(mean, decimals)
            if mean >= 0:
                top = min(y_hi, y_mean) - 2
                draw_text(draw, (x0 - 4, top - sh, x1 + 5, top), label, small)
            else:
                bottom = max(y_lo, y_mean) + 2
                draw_text(draw, (x0 - 4, bottom, x1 + 5, bottom + sh), label, small)
            bars.append({"row": name, "metric": metric, "mean": mean, "std": std, "x0": x0,
                         "x1": x1, "xc": xc, "y_mean": y_mean, "y_zero": y_zero, "y_hi": y_hi,
                         "y_lo": y_lo, "color": color, "error_bar": has_err})
        lines = wrap_text(name, small, pitch - 2, max_lines=MAX_LABEL_LINES)
        ly = plot_bottom + TICK + 4
        for i, line in enumerate(lines):
            draw_text(draw, (group_left + 1, ly + i * sh, group_left + pitch - 1,
                             ly + (i + 1) * sh), line, small)
        xm = gx + (len(metrics) * bar_w) // 2
        draw.line((xm, plot_bottom, xm, plot_bottom + TICK - 1), fill=BLACK)
    # Axes last, over the grid.
    draw.line((plot_left - 1, plot_top, plot_left - 1, plot_bottom), fill=BLACK)
    draw.line((plot_left - 1, y_zero, plot_left + plot_w - 1, y_zero), fill=BLACK)
    if y_zero != plot_bottom:
        draw.line((plot_left - 1, plot_bottom, plot_left + plot_w - 1, plot_bottom), fill=LIGHT_GRAY)
    return image, bars, {"ymin": ymin, "ymax": ymax, "step": step, "plot_top": plot_top,
                         "plot_bottom": plot_bottom, "plot_left": plot_left, "plot_width": plot_w}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="results.csv with a row column and <metric>_mean/_std columns")
    parser.add_argument("--metric", action="append", default=None,
                        help="metric to plot (repeat for grouped bars); default mAP")
    parser.add_argument("--output", default="", metavar="FILE.png", help="output PNG")
    parser.add_argument("--title", default="", help="chart title (default: file and metrics)")
    parser.add_argument("--percent", action="store_true",
                        help="multiply the values by 100 (results.csv of ablate.py holds fractions)")
    parser.add_argument("--decimals", type=int, default=None,
                        help="decimals of the value labels (default: 3 for fractions, else 1)")
    return parser


def main(argv=None) -> dict:
    """Write the chart; returns its path, size and bar geometry (for tests)."""
    args = build_parser().parse_args(argv)
    if args.decimals is not None and not 0 <= args.decimals <= 10:
        raise ValueError(f"--decimals {args.decimals}: must lie in 0..10")
    metrics = list(dict.fromkeys(args.metric or ["mAP"]))
    out = args.output or f"{os.path.splitext(args.csv)[0]}_{'_'.join(metrics)}.png"
    check_output(out, "--output", (".png",), {"csv": args.csv})  # before the work
    names, values = read_results(args.csv, metrics, 100.0 if args.percent else 1.0)
    finite = [abs(v[0]) for m in metrics for v in values[m] if math.isfinite(v[0])]
    if not finite:
        raise ValueError(f"{args.csv}: no numeric value in {', '.join(m + '_mean' for m in metrics)}")
    decimals = args.decimals if args.decimals is not None else (3 if max(finite) <= 1.0 else 1)
    unit = " (%)" if args.percent else ""
    title = args.title or f"{os.path.basename(args.csv)}: {', '.join(metrics)}{unit}, mean +/- std"
    image, bars, axis = plot(names, values, title, decimals, f"mean +/- std{unit}")
    with replacing(out, "--output") as tmp:
        image.save(tmp)
    print(f"wrote {out} ({image.width}x{image.height}, {len(names)} rows, {len(metrics)} metrics)")
    return {"png": out, "size": image.size, "bars": bars, "axis": axis, "names": names,
            "metrics": metrics}


if __name__ == "__main__":
    run_cli(main)
