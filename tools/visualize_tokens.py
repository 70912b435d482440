"""Show which patches SDTPS keeps: test samples with RGB / NI / TI side by side, per modality.

    python tools/visualize_tokens.py --config_file configs/RGBNT201/DeMo_SDTPS.yml \\
        TEST.WEIGHT output/rgbnt201_sdtps/model_best.pth
    python tools/visualize_tokens.py --config_file F --num_samples 6 --output tokens.png \\
        [--indices 0 5 9] [--scale 3] [--person_outline] [--scores] TEST.WEIGHT W [KEY VALUE ...]

The model must select tokens (``MODEL.SELECTION.NAME sdtps``); otherwise the tool stops with an
error before loading anything. Each image is shown as the model sees it (resized to
``INPUT.SIZE_TEST``), enlarged ``--scale`` times with nearest-neighbour pixels. Every patch is
drawn as its tile: the patch itself when the stride is at least the patch size, else the
stride-sized square around the patch centre (overlapping patches, stride < patch size, then get
non-overlapping tiles). Kept patches are left untouched with a yellow outline; dropped patches
are darkened and hatched; pixels under no tile (when the grid does not reach the image edge) are
darkened. Patch geometry: ``model.backbone.grid_size``, ``patch_size`` and ``stride``.

``--person_outline`` draws the person mask outline (cyan) on the synthetic dataset, whose
samples carry masks. With masks the captions also give how many of the person patches (at least
half of their pixels on the person, the rule of the evaluation's foreground precision) are kept.
``--scores`` adds, next to each image, the combined SDTPS score of every patch as a heat map
(kept tiles outlined).
Samples: ``--indices`` (positions in the test list), or ``--num_samples`` spread evenly over it.
The PNG goes to ``--output`` (default ``OUTPUT_DIR/tokens.png``).
"""
import argparse
import math
import os
import sys
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_cli  # noqa: E402
from utils.outputs import check_output, replacing  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from config import ConfigArgumentParser, build_cfg  # noqa: E402
from engine.defaults import load_trained  # noqa: E402
from data.build import collate_skipping  # noqa: E402
from data.datasets import read_triplet  # noqa: E402
from engine.evaluator import patch_foreground  # noqa: E402
from modeling.sdtps import MODALITIES  # noqa: E402
from utils.visualization import (KEPT, MID_GRAY, PERSON, GridLayout, colormap, draw_text,  # noqa: E402
                                 get_font, hatch, line_height, mask_edges, wrap_text)

DARKEN = 0.35       # brightness factor of dropped / uncovered pixels
HATCH = (235, 235, 235)
HATCH_SPACING = 5
PANEL_GAP = 3       # px between an image and its score map (--scores)


class SDTPSDisabledError(ValueError):
    """The configured model does not select tokens (MODEL.SELECTION.NAME none)."""


def patch_tiles(grid: Sequence[int], patch: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """(N, 4) tiles (y0, x0, y1, x1), exclusive ends, in input pixels, row-major like the tokens.

    A tile is the patch when stride >= patch size, else the stride-sized square centred in the
    patch, so tiles never overlap.
    """
    (gh, gw), (ph, pw), (sh, sw) = grid, patch, stride
    th, tw = min(sh, ph), min(sw, pw)
    oy, ox = (ph - th) // 2, (pw - tw) // 2
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    y0 = (rows * sh + oy).reshape(-1)
    x0 = (cols * sw + ox).reshape(-1)
    return np.stack([y0, x0, y0 + th, x0 + tw], axis=1).astype(np.int64)


def display_image(image: Image.Image, size: Sequence[int], scale: int) -> Image.Image:
    """``image`` resized to the model input ``size`` (h, w) as the loader does (bilinear), then
    enlarged ``scale`` times with nearest-neighbour pixels."""
    h, w = int(size[0]), int(size[1])
    if image.size != (w, h):
        image = image.resize((w, h), Image.BILINEAR)
    image = image.convert("RGB")
    return image.resize((w * scale, h * scale), Image.NEAREST) if scale != 1 else image


def render_kept(image: Image.Image, tiles: np.ndarray, keep: np.ndarray, scale: int,
                person: Optional[np.ndarray] = None) -> Image.Image:
    """Highlight the kept tiles of a display image (see the module docstring).

    ``tiles`` in input pixels (N, 4); ``keep`` (N,) bool; ``person``: optional (H*scale,
    W*scale) bool mask whose outline is drawn.
    """
    src = np.asarray(image, dtype=np.uint8)
    out = (src.astype(np.float32) * DARKEN).round().astype(np.uint8)
    boxes = tiles * scale
    for (y0, x0, y1, x1), kept in zip(boxes, keep):
        if kept:
            out[y0:y1, x0:x1] = src[y0:y1, x0:x1]
    panel = Image.fromarray(out)
    draw = ImageDraw.Draw(panel)
    for (y0, x0, y1, x1), kept in zip(boxes, keep):
        if kept:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=KEPT)
        else:
            hatch(draw, (x0, y0, x1, y1), HATCH, HATCH_SPACING)
    if person is not None:
        edge = mask_edges(person)
        arr = np.asarray(panel).copy()
        arr[edge] = PERSON
        panel = Image.fromarray(arr)
    return panel


def render_scores(scores: np.ndarray, tiles: np.ndarray, keep: np.ndarray, size: Sequence[int],
                  scale: int) -> Image.Image:
    """Heat map of the per-patch scores (N,) on a gray canvas of the display size."""
    h, w = int(size[0]) * scale, int(size[1]) * scale
    arr = np.full((h, w, 3), MID_GRAY, dtype=np.uint8)
    colors = colormap(scores, "heat", vmin=0.0, vmax=1.0)
    for (y0, x0, y1, x1), color in zip(tiles * scale, colors):
        arr[y0:y1, x0:x1] = color
    panel = Image.fromarray(arr)
    draw = ImageDraw.Draw(panel)
    for (y0, x0, y1, x1), kept in zip(tiles * scale, keep):
        if kept:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=KEPT)
    return panel


def pick_indices(num_samples: int, total: int, indices: Optional[List[int]]) -> List[int]:
    if indices:
        bad = [i for i in indices if not 0 <= i < total]
        if bad:
            raise ValueError(f"--indices {bad} outside the test list (0..{total - 1})")
        return list(indices)
    if num_samples < 1:
        raise ValueError("--num_samples must be at least 1")
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, min(num_samples, total))})


def build_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser(description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", default="", metavar="FILE", help="path to a yaml config")
    parser.add_argument("--num_samples", type=int, default=6,
                        help="test samples (rows), spread evenly over the test list")
    parser.add_argument("--indices", type=int, nargs="+", default=None, metavar="I",
                        help="positions in the test list to show (instead of --num_samples)")
    parser.add_argument("--output", default="", metavar="FILE.png",
                        help="output PNG (default: OUTPUT_DIR/tokens.png)")
    parser.add_argument("--scale", type=int, default=0,
                        help="enlargement of the input-size images (default: the smallest "
                             "integer making them at least 96 px wide)")
    parser.add_argument("--person_outline", action="store_true",
                        help="draw the person mask outline (datasets with masks: Synthetic)")
    parser.add_argument("--scores", action="store_true",
                        help="add each modality's SDTPS score heat map next to its image")
    return parser


def main(argv=None) -> dict:
    """Write the kept-token PNG; returns its path, the keep masks and the geometry (for tests)."""
    args = build_parser().parse_args(argv)
    if args.num_samples < 1:
        raise ValueError(f"--num_samples {args.num_samples}: must be at least 1")
    if args.scale < 0:
        raise ValueError(f"--scale {args.scale}: must be at least 0 (0: automatic)")
    cfg = build_cfg(args.config_file, args.opts)
    out = args.output or os.path.join(cfg.OUTPUT_DIR, "tokens.png")
    check_output(out, "--output" if args.output else "OUTPUT_DIR", (".png",),  # before the work
                 {"--config_file": args.config_file, "TEST.WEIGHT": cfg.TEST.WEIGHT})
    if cfg.MODEL.SELECTION.NAME == "none":
        raise SDTPSDisabledError(
            "visualize_tokens needs a model that selects tokens, but the config has "
            "MODEL.SELECTION.NAME none: give the config the checkpoint was trained with, or add "
            "MODEL.SELECTION.NAME sdtps MODEL.FUSION.NAME mean (or dgaf)")
    device, data, model, logger = load_trained(cfg)

    test_set = data.eval_sets["test"]
    dataset = test_set.loader.dataset
    indices = pick_indices(args.num_samples, len(dataset), args.indices)
    batch = collate_skipping([dataset[i] for i in indices])
    if batch["num_skipped"]:
        raise ValueError(f"{batch['num_skipped']} of the chosen samples could not be read")
    with torch.no_grad():
        outputs = model.forward_features(batch["images"].to(device), batch["camids"].to(device))
    keep = outputs["keep_mask"].cpu().numpy()                  # (B, 3, N)
    scores = outputs["selection"].scores.float().cpu().numpy()  # (B, 3, N)
    backbone = model.backbone
    grid, patch, stride = backbone.grid_size, backbone.patch_size, backbone.stride
    n = keep.shape[-1]
    if grid[0] * grid[1] != n:
        raise ValueError(f"the keep mask has {n} patches but the backbone grid {grid} has "
                         f"{grid[0] * grid[1]}: INPUT.SIZE_TEST must match INPUT.SIZE_TRAIN")
    tiles = patch_tiles(grid, patch, stride)
    size = tuple(int(v) for v in cfg.INPUT.SIZE_TEST)
    scale = args.scale or max(1, math.ceil(96 / size[1]))
    has_masks = "masks" in batch
    if args.person_outline and not has_masks:
        logger.warning("--person_outline: this dataset has no person masks; outline skipped")
    fg = None
    if has_masks:
        fg = (patch_foreground(batch["masks"], patch, stride) >= 0.5).numpy()  # (B, N)

    font, small = get_font(11), get_font(10)
    panel_w, panel_h = size[1] * scale, size[0] * scale
    cell_w = panel_w * 2 + PANEL_GAP if args.scores else panel_w
    k = int(keep[0, 0].sum())
    title = (f"SDTPS kept patches ({cfg.DATASETS.NAMES} test): K = {k} of N = {n} per modality "
             f"(MODEL.SDTPS.SPARSE_RATIO {cfg.MODEL.SDTPS.SPARSE_RATIO}); grid {grid[0]}x{grid[1]}, "
             f"patch {patch[0]}x{patch[1]}, stride {stride[0]}x{stride[1]}. Kept: outlined; "
             f"dropped: darkened and hatched"
             + ("; cyan: person outline" if args.person_outline and has_masks else "")
             + ("; right of each image: combined score (dark low, bright high)" if args.scores
                else "") + ".")
    probe = GridLayout(len(indices), 3, cell_w, panel_h)
    title_lines = wrap_text(title, font, probe.size[0] - 2 * probe.margin, max_lines=6)
    lh, sh = line_height(font), line_height(small)
    layout = GridLayout(len(indices), 3, cell_w, panel_h, gap=6,
                        title_h=len(title_lines) * lh + 4, header_h=lh, row_label_h=sh,
                        caption_h=sh * (2 if fg is not None else 1))
    canvas = layout.canvas()
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, _ = layout.title_box()
    for i, line in enumerate(title_lines):
        draw_text(draw, (x0, y0 + i * lh, x1, y0 + (i + 1) * lh), line, font, align="left")
    for m, name in enumerate(MODALITIES):
        draw_text(draw, layout.header_box(m), name, font)
    for r, index in enumerate(indices):
        sample = dataset.samples[index]
        images = read_triplet(sample)
        person = None
        if args.person_outline and has_masks:
            mask = batch["masks"][r].numpy() > 0.5
            person = np.kron(mask, np.ones((scale, scale), dtype=bool)) if scale > 1 else mask
        draw_text(draw, layout.row_label_box(r),
                  f"test sample {index}: pid {sample.pid}, cam {sample.camid}, "
                  f"{os.path.basename(sample.paths[0])}", small, align="left")
        for m in range(3):
            shown = display_image(images[m], size, scale)
            panel = render_kept(shown, tiles, keep[r, m], scale, person)
            bx0, by0, bx1, by1 = layout.cell_box(r, m)
            canvas.paste(panel, (bx0, by0))
            if args.scores:
                canvas.paste(render_scores(scores[r, m], tiles, keep[r, m], size, scale),
                             (bx0 + panel_w + PANEL_GAP, by0))
            cx0, cy0, cx1, _ = layout.caption_box(r, m)
            lines = [f"kept {int(keep[r, m].sum())}/{n}"]
            if fg is not None:
                kept_fg = int((keep[r, m] & fg[r]).sum())
                lines.append(f"person patches kept {kept_fg}/{int(fg[r].sum())}")
            for i, line in enumerate(lines):
                draw_text(draw, (cx0, cy0 + i * sh, cx1, cy0 + (i + 1) * sh), line, small)

    with replacing(out, "--output") as tmp:
        canvas.save(tmp)
    logger.info("kept tokens of %d samples written: %s", len(indices), out)
    return {"png": out, "keep": keep, "scores": scores, "indices": indices,
            "samples": [dataset.samples[i] for i in indices], "tiles": tiles,
            "scale": scale, "layout": layout, "grid": grid, "patch": patch, "stride": stride,
            "size": size, "panel_size": (panel_h, panel_w)}


if __name__ == "__main__":
    run_cli(main)
