"""Draw rank lists of a checkpoint on the test split: each row a query, then its top-k gallery.

    python tools/visualize_ranks.py --config_file configs/Synthetic/quickstart.yml \\
        TEST.WEIGHT output/quickstart/model_best.pth
    python tools/visualize_ranks.py --config_file F --num_queries 8 --topk 10 --order worst \\
        --output vis/ranks TEST.WEIGHT W [KEY VALUE ...]

Features come from the same path as ``test_net.py`` (``TEST.FEAT``, ``TEST.NECK_FEAT``,
``TEST.DIST``, ``TEST.FLIP``, ``TEST.MISS`` other than "all"). Each query's ranked list drops the
same junk as the evaluation (same identity and same camera; same scene for MSVR310; on RGBNT201
this removes the query itself). Queries without a positive left are skipped, as in the evaluation.
Rows are ordered by the query's average precision: ``--order worst`` (lowest AP first, the
default) or ``best``; ties keep the query order.

Each cell shows the sample's RGB / NI / TI images stacked vertically in a frame: blue for the
query, green for a gallery item of the query's identity, red otherwise. Written to ``--output``
(default ``OUTPUT_DIR/rank_vis``): ``ranks_<order>.png`` and ``ranks_<order>.csv``, one CSV line per
gallery cell shown (row, query path, rank, gallery path, pid, correct, and the query's AP,
cameras and distance). Paths are the RGB file of a triplet (or the one side-by-side file).
"""
import argparse
import csv
import os
import sys
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_cli  # noqa: E402
from utils.outputs import check_output_folder, replacing  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from config import ConfigArgumentParser, build_cfg  # noqa: E402
from data.datasets import BadImageError, read_triplet  # noqa: E402
from engine.defaults import load_trained  # noqa: E402
from engine.evaluator import ReIDEvaluator, evaluate, split_query_gallery  # noqa: E402
from utils.metrics import compute_distance, junk_mask  # noqa: E402
from utils.visualization import (CORRECT, LIGHT_GRAY, MID_GRAY, QUERY, WRONG, GridLayout,  # noqa: E402
                                 add_border, draw_text, get_font, line_height,
                                 stack_vertical, wrap_text)

CSV_FIELDS = ("row", "query_index", "query_path", "query_pid", "query_camid", "query_ap", "rank",
              "gallery_index", "gallery_path", "pid", "camid", "distance", "correct")
BORDER = 3        # frame width (px) around each cell's image stack
GAP = 4           # px between cells and rows
SPLIT_GAP = 10    # extra px between the query column and its gallery


# ---------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------
def per_query_ap(distmat: np.ndarray, q_pids, g_pids, q_keys, g_keys,
                 chunk: int = 256) -> np.ndarray:
    """Average precision of every query (NaN for a query with no positive after junk removal).

    Ranking: stable sort of each distance row (ties by gallery index), junk removed, as in
    ``utils.metrics.evaluate_rank``; the mean of the finite values is its mAP.
    """
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_keys, g_keys = np.asarray(q_keys), np.asarray(g_keys)
    num_q = distmat.shape[0]
    ap = np.full(num_q, np.nan)
    for s in range(0, num_q, chunk):
        e = min(s + chunk, num_q)
        order = np.argsort(distmat[s:e], axis=1, kind="stable")
        ranked_pids, ranked_keys = g_pids[order], g_keys[order]
        same = ranked_pids == q_pids[s:e, None]
        valid = ~junk_mask(q_pids[s:e, None], q_keys[s:e, None], ranked_pids, ranked_keys)
        positive = same & valid
        rank = np.cumsum(valid, axis=1)          # 1-based rank among the valid items
        hits = np.cumsum(positive, axis=1)
        num_pos = hits[:, -1]
        precision = np.where(positive, hits / np.maximum(rank, 1), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap[s:e] = np.where(num_pos > 0, precision.sum(axis=1) / num_pos, np.nan)
    return ap


def top_matches(dist_row: np.ndarray, q_pid: int, q_key: int, g_pids, g_keys, k: int) -> np.ndarray:
    """Gallery positions of the ``k`` nearest non-junk items of one query (stable order)."""
    order = np.argsort(dist_row, kind="stable")
    keep = ~junk_mask(q_pid, q_key, np.asarray(g_pids)[order], np.asarray(g_keys)[order])
    return order[keep][:k]


def order_queries(ap: np.ndarray, order: str) -> np.ndarray:
    """Positions of the queries with a finite AP, worst (lowest AP) or best first; ties by position."""
    if order not in ("worst", "best"):
        raise ValueError(f"--order must be 'worst' or 'best', got {order!r}")
    valid = np.flatnonzero(np.isfinite(ap))
    key = ap[valid] if order == "worst" else -ap[valid]
    return valid[np.argsort(key, kind="stable")]


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------
def triplet_stack(sample, image_size: Sequence[int]) -> Image.Image:
    """RGB / NI / TI of ``sample`` resized to ``image_size`` (h, w) and stacked vertically."""
    h, w = image_size
    try:
        images = [im.resize((w, h), Image.BILINEAR) for im in read_triplet(sample)]
    except (BadImageError, FileNotFoundError):
        images = [Image.new("RGB", (w, h), MID_GRAY) for _ in range(3)]
    return stack_vertical(images)


def draw_rank_grid(rows: List[Dict], samples, image_size: Sequence[int], topk: int,
                   title: str):
    """Rank-list grid. ``rows``: dicts with ``query`` (sample index), ``label`` (row text) and
    ``matches``: list of (sample index, correct, caption). Returns (image, GridLayout)."""
    font = get_font(11)
    small = get_font(10)
    h, w = image_size
    cell_w, cell_h = w + 2 * BORDER, 3 * h + 2 * BORDER
    cols = 1 + topk
    probe = GridLayout(len(rows), cols, cell_w, cell_h, gap=GAP, split_after=0, split_gap=SPLIT_GAP)
    title_lines = wrap_text(title, font, probe.size[0] - 2 * probe.margin, max_lines=3)
    layout = GridLayout(len(rows), cols, cell_w, cell_h, gap=GAP,
                        title_h=len(title_lines) * line_height(font) + 4,
                        row_label_h=line_height(small), caption_h=line_height(small),
                        split_after=0, split_gap=SPLIT_GAP)
    canvas = layout.canvas()
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, _ = layout.title_box()
    for i, line in enumerate(title_lines):
        step = line_height(font)
        draw_text(draw, (x0, y0 + i * step, x1, y0 + (i + 1) * step), line, font, align="left")
    cache: Dict[int, Image.Image] = {}

    def stack(index: int) -> Image.Image:
        if index not in cache:
            cache[index] = triplet_stack(samples[index], image_size)
        return cache[index]

    for r, row in enumerate(rows):
        draw_text(draw, layout.row_label_box(r), row["label"], small, align="left")
        cells = [(row["query"], QUERY, "query")] + [
            (idx, CORRECT if ok else WRONG, caption) for idx, ok, caption in row["matches"]]
        for c, (index, color, caption) in enumerate(cells):
            box = layout.cell_box(r, c)
            canvas.paste(add_border(stack(index), BORDER, color), box[:2])
            draw_text(draw, layout.caption_box(r, c), caption, small)
        for c in range(len(cells), cols):  # fewer valid gallery items than topk
            draw.rectangle(layout.cell_box(r, c), outline=LIGHT_GRAY)
    return canvas, layout


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser(description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", default="", metavar="FILE", help="path to a yaml config")
    parser.add_argument("--num_queries", type=int, default=8, help="rows (queries) to draw")
    parser.add_argument("--topk", type=int, default=10, help="gallery items per row")
    parser.add_argument("--order", choices=("worst", "best"), default="worst",
                        help="rows by per-query AP: lowest first (worst) or highest first (best)")
    parser.add_argument("--output", default="", metavar="DIR",
                        help="output folder (default: OUTPUT_DIR/rank_vis)")
    parser.add_argument("--image_height", type=int, default=128,
                        help="display height (px) of each modality image; the width keeps "
                             "INPUT.SIZE_TEST's aspect ratio")
    return parser


def main(argv=None) -> dict:
    """Write the rank-list PNG and CSV; returns their paths and the ranking (for tests)."""
    args = build_parser().parse_args(argv)
    for flag, value, least in (("--num_queries", args.num_queries, 1), ("--topk", args.topk, 1),
                               ("--image_height", args.image_height, 8)):
        if value < least:
            raise ValueError(f"{flag} {value}: must be at least {least}")
    cfg = build_cfg(args.config_file, args.opts)
    out_dir = check_output_folder(args.output or os.path.join(cfg.OUTPUT_DIR, "rank_vis"),
                                  "--output" if args.output else "OUTPUT_DIR")  # before the work
    device, data, model, logger = load_trained(cfg)
    if cfg.TEST.MISS in ("all", "matrix"):
        raise ValueError(f"TEST.MISS {cfg.TEST.MISS} is a table of settings; pick one (none, r, n, t, rn, rt, nt)")
    test_set = data.eval_sets["test"]
    reid = ReIDEvaluator.from_config(cfg, test_set)
    evaluate(model, test_set, cfg, device, evaluators=[reid])
    ex = reid.extracted
    q, g = split_query_gallery(ex, test_set)
    gallery_feats = (reid.gallery_from or ex)["feats"]  # TEST.GALLERY_MISS: the gallery pass's
    distmat = compute_distance(F.normalize(ex["feats"][torch.from_numpy(q)], dim=1),
                               F.normalize(gallery_feats[torch.from_numpy(g)], dim=1),
                               cfg.TEST.DIST).cpu().numpy()
    keys = ex["sceneids"] if test_set.uses_scenes else ex["camids"]
    q_index, g_index = ex["index"][q], ex["index"][g]
    q_pids, g_pids, q_keys, g_keys = ex["pids"][q], ex["pids"][g], keys[q], keys[g]
    q_cams, g_cams = ex["camids"][q], ex["camids"][g]
    ap = per_query_ap(distmat, q_pids, g_pids, q_keys, g_keys)
    ranked = order_queries(ap, args.order)
    skipped = int(np.isnan(ap).sum())
    if ranked.size == 0:
        raise ValueError("no query has a positive in the gallery after junk removal")
    if skipped:
        logger.info("%d queries without a positive after junk removal are skipped", skipped)
    chosen = ranked[:args.num_queries]

    samples = test_set.samples
    rows, records = [], []
    for r, qi in enumerate(chosen):
        top = top_matches(distmat[qi], q_pids[qi], q_keys[qi], g_pids, g_keys, args.topk)
        correct = g_pids[top] == q_pids[qi]
        positives = int(((g_pids == q_pids[qi]) & ~junk_mask(q_pids[qi], q_keys[qi], g_pids,
                                                             g_keys)).sum())
        first = int(np.argmax(correct)) + 1 if correct.any() else None
        label = (f"query {int(q_index[qi])}: pid {int(q_pids[qi])}, cam {int(q_cams[qi])}, "
                 f"AP {ap[qi]:.3f}, {positives} positives, first hit "
                 f"{'rank ' + str(first) if first else 'beyond top-' + str(args.topk)}")
        matches = [(int(g_index[gi]), bool(ok), f"#{rank} pid {int(g_pids[gi])} c{int(g_cams[gi])}")
                   for rank, (gi, ok) in enumerate(zip(top, correct), start=1)]
        rows.append({"query": int(q_index[qi]), "label": label, "matches": matches})
        for rank, (gi, ok) in enumerate(zip(top, correct), start=1):
            records.append({
                "row": r, "query_index": int(q_index[qi]),
                "query_path": samples[q_index[qi]].paths[0], "query_pid": int(q_pids[qi]),
                "query_camid": int(q_cams[qi]), "query_ap": f"{ap[qi]:.6f}", "rank": rank,
                "gallery_index": int(g_index[gi]), "gallery_path": samples[g_index[gi]].paths[0],
                "pid": int(g_pids[gi]), "camid": int(g_cams[gi]),
                "distance": f"{distmat[qi, gi]:.6f}", "correct": int(ok)})

    size_h, size_w = cfg.INPUT.SIZE_TEST
    image_size = (args.image_height, max(1, round(args.image_height * size_w / size_h)))
    mean_ap = float(np.nanmean(ap))
    title = (f"{cfg.DATASETS.NAMES} test, {cfg.TEST.FEAT} feature: {len(chosen)} "
             f"{args.order} queries by AP (mAP {mean_ap * 100:.2f}). Frames: blue query, green "
             f"same identity, red different identity; junk (same identity and "
             f"{'scene' if test_set.uses_scenes else 'camera'}) removed. "
             f"Images top to bottom: RGB, NI, TI.")
    image, layout = draw_rank_grid(rows, samples, image_size, args.topk, title)

    png = os.path.join(out_dir, f"ranks_{args.order}.png")
    csv_path = os.path.join(out_dir, f"ranks_{args.order}.csv")
    with replacing(png, "--output") as tmp:
        image.save(tmp)
    with replacing(csv_path, "--output") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(records)
    logger.info("rank lists of %d queries written: %s, %s", len(chosen), png, csv_path)
    return {"png": png, "csv": csv_path, "layout": layout, "ap": ap, "rows": chosen,
            "distmat": distmat, "q_pids": q_pids, "g_pids": g_pids, "q_keys": q_keys,
            "g_keys": g_keys, "q_index": q_index, "g_index": g_index, "mAP": mean_ap,
            "border": BORDER, "image_size": image_size}


if __name__ == "__main__":
    run_cli(main)
