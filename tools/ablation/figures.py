"""A study's PNG figures (Pillow, as tools/plot_results.py draws, with its axis ticks): panels of
lines, each optionally with a shaded band (e.g. the seeds' range) and dashed."""
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from PIL import Image, ImageDraw

from tools.plot_results import axis_range, nice_step
from utils.outputs import replacing
from utils.visualization import BLACK, LIGHT_GRAY, WHITE, categorical_color, draw_text, get_font, line_height

PANEL_W, PANEL_H = 380, 240  # px of one panel's plot area
MARGIN, TICK, SWATCH = 10, 4, 10
PANELS_PER_LINE = 3
BAND_ALPHA = 60  # of 255


@dataclass
class Series:
    """One line: y over x; ``low`` / ``high`` (same length) shade a band around it."""
    label: str
    x: Sequence[float]
    y: Sequence[float]
    low: Optional[Sequence[float]] = None
    high: Optional[Sequence[float]] = None
    color: int = 0  # index of utils.visualization.categorical_color
    dashed: bool = False


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    series: List[Series] = field(default_factory=list)


def _ticks(lo: float, hi: float) -> List[float]:
    step = nice_step(hi - lo)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.2g}"


def _dashed(draw, points, color, width: int = 2, dash: int = 6) -> None:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        for start in range(0, int(length), 2 * dash):
            a, b = start / max(length, 1e-9), min(1.0, (start + dash) / max(length, 1e-9))
            draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)),
                       (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill=color, width=width)


def _draw_panel(image: Image.Image, left: int, top: int, panel: Panel, font, small) -> None:
    draw = ImageDraw.Draw(image)
    lh, sh = line_height(font), line_height(small)
    draw_text(draw, (left, top, left + PANEL_W + 60, top + lh), panel.title, font)
    plot_left, plot_top = left + 50, top + lh + 6
    plot_right, plot_bottom = plot_left + PANEL_W, plot_top + PANEL_H
    xs = [x for s in panel.series for x in s.x]
    ys = [v for s in panel.series for v in list(s.y) + list(s.low or []) + list(s.high or [])
          if math.isfinite(v)]
    if not xs or not ys:
        draw_text(draw, (plot_left, plot_top, plot_right, plot_bottom), "no data", small)
        return
    ymin, ymax, ystep = axis_range([min(ys)], [max(ys)])
    xmin, xmax = min(xs), max(xs)
    if xmax == xmin:
        xmin, xmax = xmin - 1, xmax + 1

    def pos(x, y):
        return (plot_left + (x - xmin) / (xmax - xmin) * PANEL_W,
                plot_bottom - (y - ymin) / (ymax - ymin) * PANEL_H)

    tick = ymin
    while tick <= ymax + ystep * 1e-6:
        y = pos(xmin, tick)[1]
        draw.line([(plot_left, y), (plot_right, y)], fill=LIGHT_GRAY)
        draw_text(draw, (plot_left - 48, y - sh // 2, plot_left - TICK - 2, y + sh // 2),
                  _label(tick), small, align="right")
        tick += ystep
    for tick in _ticks(xmin, xmax):
        x = pos(tick, ymin)[0]
        draw.line([(x, plot_bottom), (x, plot_bottom + TICK)], fill=BLACK)
        draw_text(draw, (x - 20, plot_bottom + TICK, x + 20, plot_bottom + TICK + sh), _label(tick), small)
    draw.line([(plot_left, plot_top), (plot_left, plot_bottom), (plot_right, plot_bottom)], fill=BLACK)
    draw_text(draw, (plot_left, plot_bottom + TICK + sh, plot_right, plot_bottom + TICK + 2 * sh),
              panel.x_label, small)
    draw_text(draw, (left, plot_top - sh - 2, plot_left + 120, plot_top - 2), panel.y_label, small,
              align="left")
    band = Image.new("RGBA", image.size, (0, 0, 0, 0))
    band_draw = ImageDraw.Draw(band)
    for s in panel.series:
        if s.low is not None and len(s.x) > 1:
            outline = [pos(x, v) for x, v in zip(s.x, s.high)] + \
                      [pos(x, v) for x, v in reversed(list(zip(s.x, s.low)))]
            band_draw.polygon(outline, fill=categorical_color(s.color) + (BAND_ALPHA,))
    image.alpha_composite(band)
    draw = ImageDraw.Draw(image)
    for s in panel.series:
        points = [pos(x, y) for x, y in zip(s.x, s.y)]
        color = categorical_color(s.color)
        if len(points) > 1 and s.dashed:
            _dashed(draw, points, color)
        elif len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)


def save_panels(path: str, title: str, panels: List[Panel], note: str = "") -> str:
    """Draw ``panels`` (a few per line) with one legend of every series label; returns ``path``."""
    font, small = get_font(12), get_font(10)
    lh, sh = line_height(font), line_height(small)
    panel_h = lh + 6 + PANEL_H + TICK + 2 * sh + MARGIN
    per_line = min(PANELS_PER_LINE, len(panels))
    lines = math.ceil(len(panels) / per_line)
    legend = []
    for panel in panels:
        for s in panel.series:
            if (s.label, s.color, s.dashed) not in legend:
                legend.append((s.label, s.color, s.dashed))
    width = MARGIN + per_line * (PANEL_W + 70)
    height = MARGIN + lh + 4 + lines * panel_h + len(legend) * sh + (sh if note else 0) + MARGIN
    image = Image.new("RGBA", (width, height), WHITE + (255,))
    draw = ImageDraw.Draw(image)
    draw_text(draw, (MARGIN, MARGIN, width - MARGIN, MARGIN + lh), title, font)
    for i, panel in enumerate(panels):
        _draw_panel(image, MARGIN + (i % per_line) * (PANEL_W + 70),
                    MARGIN + lh + 4 + (i // per_line) * panel_h, panel, font, small)
    draw = ImageDraw.Draw(image)
    y = MARGIN + lh + 4 + lines * panel_h
    for label, color, dashed in legend:
        fill = categorical_color(color)
        if dashed:
            _dashed(draw, [(MARGIN, y + sh // 2), (MARGIN + 3 * SWATCH, y + sh // 2)], fill)
        else:
            draw.line([(MARGIN, y + sh // 2), (MARGIN + 3 * SWATCH, y + sh // 2)], fill=fill, width=2)
        draw_text(draw, (MARGIN + 3 * SWATCH + 6, y, width - MARGIN, y + sh), label, small, align="left")
        y += sh
    if note:
        draw_text(draw, (MARGIN, y, width - MARGIN, y + sh), note, small, align="left")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path, "figure") as tmp:
        image.convert("RGB").save(tmp, format="PNG")
    return path
