"""Drawing helpers shared by the visualisation tools (Pillow only, no matplotlib).

Used by ``tools/visualize_ranks.py`` (rank-list grids), ``tools/visualize_tokens.py`` (SDTPS kept
patches) and ``tools/plot_results.py`` (ablation bar charts):

* :class:`GridLayout` -- the pixel geometry of a grid of equal cells with an optional title,
  column headers, a label strip above each row and a caption strip under each cell. The tools
  draw with it and the tests read the same boxes back, so "which pixel belongs to which cell" has
  one definition.
* text: :func:`get_font` (Pillow's default font), :func:`line_height`, :func:`text_size`,
  :func:`wrap_text`, :func:`draw_text` (fitted into a box, shortened with "..." when too wide).
* images: :func:`add_border`, :func:`stack_vertical`, :func:`hatch`, :func:`mask_edges`.
* colours: named colours, :func:`categorical_color` (a 10-colour palette) and :func:`colormap`
  (piecewise-linear sequential maps ``"heat"``, ``"cividis"`` and ``"gray"``).

The retrieval protocol's junk rule lives in ``utils.metrics.junk_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

Color = Tuple[int, int, int]

# Named colours (RGB). PNG is lossless, so tests can compare pixels with these exactly.
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
TEXT: Color = (20, 20, 20)
LIGHT_GRAY: Color = (225, 225, 225)
MID_GRAY: Color = (150, 150, 150)
CORRECT: Color = (0, 170, 0)      # same identity as the query
WRONG: Color = (220, 20, 20)      # different identity
QUERY: Color = (30, 80, 220)      # the query's own frame
KEPT: Color = (255, 210, 0)       # outline of a kept SDTPS patch
PERSON: Color = (0, 230, 230)     # person-mask outline

# A categorical palette (distinct, print-friendly hues), cycled by categorical_color.
PALETTE: Tuple[Color, ...] = (
    (52, 101, 164), (237, 125, 49), (84, 160, 70), (200, 55, 60), (136, 98, 180),
    (140, 86, 75), (220, 110, 180), (120, 120, 120), (185, 180, 40), (40, 175, 190),
)

# Anchors of the sequential colour maps: (position in [0, 1], colour), increasing positions.
_COLORMAPS = {
    "heat": ((0.0, (0, 0, 0)), (0.35, (170, 20, 10)), (0.7, (250, 170, 0)), (1.0, (255, 255, 230))),
    "cividis": ((0.0, (0, 34, 78)), (0.25, (64, 77, 108)), (0.5, (124, 123, 120)),
                (0.75, (188, 175, 111)), (1.0, (253, 234, 69))),
    "gray": ((0.0, (0, 0, 0)), (1.0, (255, 255, 255))),
}
COLORMAP_NAMES = tuple(_COLORMAPS)


# ---------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------
def categorical_color(i: int) -> Color:
    """Colour ``i`` of :data:`PALETTE` (cycled)."""
    return PALETTE[int(i) % len(PALETTE)]


def colormap(values, name: str = "heat", vmin: Optional[float] = None,
             vmax: Optional[float] = None) -> np.ndarray:
    """Map ``values`` (any shape) to uint8 RGB colours, shape ``values.shape + (3,)``.

    Values are scaled to [0, 1] by ``vmin``/``vmax`` (default: their min and max; a constant
    array maps to 0) and clipped, then interpolated linearly between the map's anchors.
    """
    if name not in _COLORMAPS:
        raise ValueError(f"unknown colour map {name!r}; choose one of {', '.join(COLORMAP_NAMES)}")
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    span = hi - lo
    t = np.clip((v - lo) / span, 0.0, 1.0) if span > 0 else np.zeros_like(v)
    t = np.nan_to_num(t, nan=0.0)
    anchors = _COLORMAPS[name]
    pos = np.array([a[0] for a in anchors])
    cols = np.array([a[1] for a in anchors], dtype=np.float64)
    out = np.stack([np.interp(t, pos, cols[:, c]) for c in range(3)], axis=-1)
    return np.rint(out).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def get_font(size: int = 11):
    """Pillow's default font at ``size`` px (the built-in bitmap font when FreeType is absent)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def line_height(font) -> int:
    """Pixel height of one line of text (ascent + descent) plus 2 px of leading."""
    if hasattr(font, "getmetrics"):
        ascent, descent = font.getmetrics()
        return int(ascent + descent) + 2
    box = font.getbbox("Ag")
    return int(box[3] - box[1]) + 2


def text_size(text: str, font) -> Tuple[int, int]:
    """(width, height) of ``text`` drawn with ``font`` (height: the font's line height)."""
    if not text:
        return 0, line_height(font)
    box = font.getbbox(text)
    return int(np.ceil(box[2])), line_height(font)


def _shorten(text: str, font, width: int) -> str:
    """``text`` cut with a trailing "..." to fit ``width`` px (unchanged when it fits)."""
    if text_size(text, font)[0] <= width:
        return text
    for end in range(len(text) - 1, 0, -1):
        candidate = text[:end].rstrip() + "..."
        if text_size(candidate, font)[0] <= width:
            return candidate
    return ""


def wrap_text(text: str, font, width: int, max_lines: Optional[int] = None) -> List[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` px wide.

    A single word wider than ``width`` is shortened with "..."; with ``max_lines`` the last kept
    line is shortened too when text is left over.
    """
    lines: List[str] = []
    for paragraph in str(text).split("\n"):
        current = ""
        for word in paragraph.split():
            trial = f"{current} {word}" if current else word
            if text_size(trial, font)[0] <= width:
                current = trial
                continue
            if current:
                lines.append(current)
            current = _shorten(word, font, width)
        lines.append(current)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _shorten(lines[-1] + " ...", font, width)
    return lines


def draw_text(draw: ImageDraw.ImageDraw, box: Sequence[int], text: str, font,
              fill: Color = TEXT, align: str = "center", valign: str = "center") -> None:
    """Draw one line of ``text`` inside ``box`` (x0, y0, x1, y1), shortened to fit its width.

    ``align``: "left", "center" or "right"; ``valign``: "top", "center" or "bottom".
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    text = _shorten(str(text), font, max(0, x1 - x0))
    if not text:
        return
    width, height = text_size(text, font)
    left = font.getbbox(text)[0]
    if align == "left":
        x = x0
    elif align == "right":
        x = x1 - width
    else:
        x = x0 + (x1 - x0 - width) // 2
    if valign == "top":
        y = y0
    elif valign == "bottom":
        y = y1 - height
    else:
        y = y0 + (y1 - y0 - height) // 2
    draw.text((x - left, y + 1), text, font=font, fill=fill)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of ``rows`` x ``cols`` cells of ``cell_w`` x ``cell_h`` px.

    From top to bottom: ``margin``, a title strip (``title_h``), a column-header strip
    (``header_h``), then per row a label strip (``row_label_h``), the cells and a caption strip
    under each cell (``caption_h``); rows and columns are ``gap`` px apart, and ``split_gap``
    extra px separate column ``split_after`` from the next (e.g. the query from its gallery).
    All boxes are (x0, y0, x1, y1) with x1/y1 exclusive.
    """

    rows: int
    cols: int
    cell_w: int
    cell_h: int
    gap: int = 4
    margin: int = 6
    title_h: int = 0
    header_h: int = 0
    row_label_h: int = 0
    caption_h: int = 0
    split_after: Optional[int] = None
    split_gap: int = 0

    def _split(self) -> int:
        if self.split_after is None or self.split_after >= self.cols - 1:
            return 0
        return self.split_gap

    @property
    def row_h(self) -> int:
        """Height of one row: label strip + cell + caption strip."""
        return self.row_label_h + self.cell_h + self.caption_h

    @property
    def size(self) -> Tuple[int, int]:
        """(width, height) of the whole canvas."""
        width = 2 * self.margin + self.cols * self.cell_w + max(self.cols - 1, 0) * self.gap
        height = (2 * self.margin + self.title_h + self.header_h + self.rows * self.row_h
                  + max(self.rows - 1, 0) * self.gap)
        return width + self._split(), height

    def col_x(self, c: int) -> int:
        x = self.margin + c * (self.cell_w + self.gap)
        if self.split_after is not None and c > self.split_after:
            x += self._split()
        return x

    def row_y(self, r: int) -> int:
        """Top of row ``r`` (its label strip)."""
        return self.margin + self.title_h + self.header_h + r * (self.row_h + self.gap)

    def cell_box(self, r: int, c: int) -> Tuple[int, int, int, int]:
        x, y = self.col_x(c), self.row_y(r) + self.row_label_h
        return x, y, x + self.cell_w, y + self.cell_h

    def caption_box(self, r: int, c: int) -> Tuple[int, int, int, int]:
        x0, _, x1, y1 = self.cell_box(r, c)
        return x0, y1, x1, y1 + self.caption_h

    def row_label_box(self, r: int) -> Tuple[int, int, int, int]:
        y = self.row_y(r)
        return self.margin, y, self.size[0] - self.margin, y + self.row_label_h

    def header_box(self, c: int) -> Tuple[int, int, int, int]:
        y = self.margin + self.title_h
        return self.col_x(c), y, self.col_x(c) + self.cell_w, y + self.header_h

    def title_box(self) -> Tuple[int, int, int, int]:
        return self.margin, self.margin, self.size[0] - self.margin, self.margin + self.title_h

    def canvas(self, background: Color = WHITE) -> Image.Image:
        return Image.new("RGB", self.size, background)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def add_border(image: Image.Image, width: int, color: Color) -> Image.Image:
    """``image`` framed by a ``width``-px border of ``color`` (the result is 2*width larger)."""
    if width <= 0:
        return image.copy()
    return ImageOps.expand(image.convert("RGB"), border=int(width), fill=tuple(color))


def stack_vertical(images: Sequence[Image.Image], gap: int = 0,
                   background: Color = WHITE) -> Image.Image:
    """Images one under the other, left-aligned, ``gap`` px apart."""
    width = max(im.width for im in images)
    height = sum(im.height for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, height), background)
    y = 0
    for im in images:
        out.paste(im.convert("RGB"), (0, y))
        y += im.height + gap
    return out


def hatch(draw: ImageDraw.ImageDraw, box: Sequence[int], color: Color, spacing: int = 6) -> None:
    """Diagonal 1-px hatching (lines going up to the right) clipped to ``box`` (x1/y1 exclusive)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        return
    w, h = x1 - x0, y1 - y0
    for d in range(0, w + h - 1, max(1, spacing)):
        # Points with (x - x0) + (y - y0) == d inside the box.
        xa, ya = x0 + max(0, d - (h - 1)), y0 + min(d, h - 1)
        xb, yb = x0 + min(d, w - 1), y0 + max(0, d - (w - 1))
        draw.line([(xa, ya), (xb, yb)], fill=tuple(color), width=1)


def mask_edges(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean (H, W) mask: inside it with a 4-neighbour outside it."""
    m = np.asarray(mask, dtype=bool)
    padded = np.pad(m, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return m & ~interior


def heatmap(values, row_labels: Sequence[str], col_labels: Sequence[str], title: str,
            cell: Tuple[int, int] = (64, 28), label_w: int = 96, decimals: int = 1) -> Image.Image:
    """A table of ``values`` (R, C) drawn as "heat"-coloured cells (the colour scaled over the
    finite values) with each value printed in its cell, ``row_labels`` left of the rows,
    ``col_labels`` above the columns and ``title`` on top."""
    v = np.asarray(values, dtype=np.float64)
    font = get_font(11)
    lh = line_height(font)
    layout = GridLayout(rows=v.shape[0], cols=v.shape[1], cell_w=cell[0], cell_h=cell[1], gap=1,
                        title_h=lh + 4, header_h=lh + 4)
    colours = colormap(v, "heat")
    image = Image.new("RGB", (layout.size[0] + label_w, layout.size[1]), WHITE)
    draw = ImageDraw.Draw(image)
    draw_text(draw, (layout.margin, layout.margin, image.width - layout.margin,
                     layout.margin + layout.title_h), title, font)
    for c, label in enumerate(col_labels):
        x0, y0, x1, y1 = layout.header_box(c)
        draw_text(draw, (x0 + label_w, y0, x1 + label_w, y1), label, font)
    for r, label in enumerate(row_labels):
        _, y0, _, y1 = layout.cell_box(r, 0)
        draw_text(draw, (layout.margin, y0, layout.margin + label_w - 4, y1), label, font, align="right")
        for c in range(v.shape[1]):
            x0, y0, x1, y1 = layout.cell_box(r, c)
            box = (x0 + label_w, y0, x1 + label_w, y1)
            fill = tuple(int(x) for x in colours[r, c])
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill)
            dark = sum(fill) < 3 * 128
            draw_text(draw, box, f"{v[r, c]:.{decimals}f}", font, fill=WHITE if dark else TEXT)
    return image
