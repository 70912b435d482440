"""Visualisation tools: rank-list grids, SDTPS kept tokens, ablation bar charts, shared helpers.

The tools run in-process on a tiny SDTPS model trained once for this module; the tests read the
PNGs back and check pixels against rankings and keep masks recomputed here.
"""
import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import test_net
import train_net
from data.datasets import read_triplet
from modeling.model import build_model
from modeling.sdtps import num_kept
from tools import plot_results, probe_selection, visualize_ranks, visualize_tokens
from utils.metrics import evaluate_rank, junk_mask
from utils.visualization import (BLACK, CORRECT, KEPT, PERSON, QUERY, WRONG, GridLayout,
                                 categorical_color, colormap, get_font, mask_edges,
                                 text_size, wrap_text)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """(KEY VALUE opts of the tiny SDTPS model, its checkpoint), trained for one epoch."""
    from tests.conftest import TINY_OPTS

    out = str(tmp_path_factory.mktemp("vis_train"))
    opts = TINY_OPTS + ["DATASETS.ROOT_DIR", synthetic_root, "MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "mean"]
    train_net.main(list(opts) + ["OUTPUT_DIR", out, "SOLVER.MAX_EPOCHS", "1"])
    return opts, os.path.join(out, "model_best.pth")


def tool_opts(trained, tmp_path, *extra):
    opts, weight = trained
    return list(opts) + ["OUTPUT_DIR", str(tmp_path / "out"), "TEST.WEIGHT", weight] + list(extra)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------
def test_grid_layout_boxes_tile_the_canvas_without_overlap():
    layout = GridLayout(3, 4, 20, 30, gap=4, margin=5, title_h=12, header_h=10, row_label_h=8,
                        caption_h=9, split_after=0, split_gap=7)
    w, h = layout.size
    assert w == 2 * 5 + 4 * 20 + 3 * 4 + 7
    assert h == 2 * 5 + 12 + 10 + 3 * (8 + 30 + 9) + 2 * 4
    boxes = [layout.cell_box(r, c) for r in range(3) for c in range(4)]
    occupied = np.zeros((h, w), dtype=int)
    for x0, y0, x1, y1 in boxes + [layout.caption_box(r, c) for r in range(3) for c in range(4)]:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        occupied[y0:y1, x0:x1] += 1
    assert occupied.max() == 1
    assert layout.col_x(1) - (layout.col_x(0) + 20) == 4 + 7      # the split gap
    assert layout.col_x(2) - (layout.col_x(1) + 20) == 4
    assert layout.cell_box(2, 3)[3] + 9 + 5 == h                   # last caption, then margin


def test_colormap_and_palette():
    out = colormap(np.array([[0.0, 0.5, 1.0]]), "gray", vmin=0.0, vmax=1.0)
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 2].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [128, 128, 128]
    heat = colormap(np.linspace(0, 1, 11), "heat")
    assert (np.diff(heat.astype(int).sum(axis=1)) >= 0).all()       # brighter with the value
    assert colormap(np.full(4, 3.0)).tolist() == colormap(np.zeros(4)).tolist()
    with pytest.raises(ValueError, match="unknown colour map"):
        colormap([0.1], "jet")
    assert len({categorical_color(i) for i in range(10)}) == 10
    assert categorical_color(10) == categorical_color(0)


def test_text_wrap_fits_width():
    font = get_font(10)
    lines = wrap_text("a fairly long label that needs several lines to fit", font, 60)
    assert len(lines) > 1 and all(text_size(line, font)[0] <= 60 for line in lines)
    assert len(wrap_text("one two three four five six seven", font, 30, max_lines=2)) == 2


def test_mask_edges_is_the_inner_boundary():
    mask = np.zeros((6, 7), dtype=bool)
    mask[1:5, 2:6] = True
    edges = mask_edges(mask)
    assert edges.sum() == 4 * 4 - 2 * 2 and not edges[2:4, 3:5].any()


def test_per_query_ap_matches_evaluate_rank_with_ties_cameras_and_scenes():
    rng = np.random.default_rng(3)
    num_q, num_g = 12, 30
    dist = rng.integers(0, 6, size=(num_q, num_g)).astype(np.float32)  # many exact ties
    q_pids, g_pids = rng.integers(0, 4, num_q), rng.integers(0, 4, num_g)
    q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    for q_keys, g_keys, scenes in ((q_cams, g_cams, {}),
                                   (q_cams % 2, g_cams % 2, "scenes")):
        ap = visualize_ranks.per_query_ap(dist, q_pids, g_pids, q_keys, g_keys, chunk=5)
        for i in range(num_q):
            kwargs = dict(q_scenes=q_keys[i:i + 1], g_scenes=g_keys) if scenes else {}
            try:
                _, ref, _ = evaluate_rank(dist[i:i + 1], q_pids[i:i + 1], g_pids, q_cams[i:i + 1],
                                          g_cams, **kwargs)
            except ValueError:  # no positive left: skipped by the evaluation
                assert np.isnan(ap[i])
                continue
            assert ap[i] == pytest.approx(ref, abs=1e-12)
        assert np.isfinite(ap).any()
    # top_matches: stable order, junk (same pid and camera) removed.
    top = visualize_ranks.top_matches(dist[0], q_pids[0], q_cams[0], g_pids, g_cams, 8)
    expected = [j for j in sorted(range(num_g), key=lambda j: (dist[0, j], j))
                if not (g_pids[j] == q_pids[0] and g_cams[j] == q_cams[0])][:8]
    assert top.tolist() == expected
    assert junk_mask(1, 2, np.array([1, 1, 0]), np.array([2, 3, 2])).tolist() == [True, False, False]


# ---------------------------------------------------------------------------------------------
# Rank lists
# ---------------------------------------------------------------------------------------------
def reference_ranking(res, q):
    """(AP per evaluate_rank, top-k gallery positions) of query q, from the tool's distances."""
    dist, q_pids, g_pids = res["distmat"], res["q_pids"], res["g_pids"]
    q_keys, g_keys = res["q_keys"], res["g_keys"]
    try:
        _, ap, _ = evaluate_rank(dist[q:q + 1], q_pids[q:q + 1], g_pids, q_keys[q:q + 1], g_keys)
    except ValueError:
        ap = math.nan
    order = sorted(range(dist.shape[1]), key=lambda j: (dist[q, j], j))
    ranked = [j for j in order if not (g_pids[j] == q_pids[q] and g_keys[j] == q_keys[q])]
    return ap, ranked


def test_rank_grid_png_csv_borders_and_ap_order(trained, tmp_path):
    nq, k = 5, 6
    res = visualize_ranks.main(["--num_queries", str(nq), "--topk", str(k), "--output",
                                str(tmp_path / "ranks")] + tool_opts(trained, tmp_path))
    assert os.path.basename(res["png"]) == "ranks_worst.png"
    image = Image.open(res["png"]).convert("RGB")
    layout = res["layout"]
    # Pixel size: rows x (query + k) cells of RGB/NI/TI stacked (display height 128, input 64x32).
    h, w = 128, 64
    border = visualize_ranks.BORDER
    assert res["image_size"] == (h, w)
    assert (layout.rows, layout.cols) == (nq, 1 + k)
    assert (layout.cell_w, layout.cell_h) == (w + 2 * border, 3 * h + 2 * border)
    assert image.size == layout.size
    assert image.width == (2 * layout.margin + (1 + k) * layout.cell_w + k * visualize_ranks.GAP
                           + visualize_ranks.SPLIT_GAP)
    assert image.height >= nq * layout.cell_h

    # Per-query AP equals the evaluation's, query by query; its mean is the evaluated mAP.
    ap = res["ap"]
    ref = [reference_ranking(res, q) for q in range(len(ap))]
    ref_ap = np.array([r[0] for r in ref])
    assert np.array_equal(np.isnan(ap), np.isnan(ref_ap))
    assert np.allclose(ap[~np.isnan(ap)], ref_ap[~np.isnan(ref_ap)], atol=1e-12)
    evaluated = test_net.main(tool_opts(trained, tmp_path))["none"]
    assert res["mAP"] == pytest.approx(evaluated["mAP"], abs=1e-6)

    rows = read_csv(res["csv"])
    assert len(rows) == nq * k
    # Rows in AP order, worst first (ties by query position): the nq lowest-AP queries.
    valid = [q for q in range(len(ap)) if not np.isnan(ref_ap[q])]
    expected_queries = sorted(valid, key=lambda q: (ref_ap[q], q))[:nq]
    q_index, g_index = res["q_index"], res["g_index"]
    for r, q in enumerate(expected_queries):
        mine = [row for row in rows if int(row["row"]) == r]
        assert [int(row["rank"]) for row in mine] == list(range(1, k + 1))
        assert {int(row["query_index"]) for row in mine} == {int(q_index[q])}
        assert float(mine[0]["query_ap"]) == pytest.approx(ref_ap[q], abs=1e-6)
        # CSV lines are the top-k after junk removal, with the right pids and correctness.
        top = ref[q][1][:k]
        assert [int(row["gallery_index"]) for row in mine] == [int(g_index[j]) for j in top]
        assert [int(row["pid"]) for row in mine] == [int(res["g_pids"][j]) for j in top]
        for row in mine:
            assert int(row["correct"]) == int(int(row["pid"]) == int(row["query_pid"]))
            assert int(row["gallery_index"]) != int(row["query_index"])  # itself is junk
            assert os.path.isfile(row["query_path"]) and os.path.isfile(row["gallery_path"])
        # Frames: blue query, then green / red by correctness, at the left edge and the top.
        x0, y0, x1, y1 = layout.cell_box(r, 0)
        assert image.getpixel((x0 + 1, (y0 + y1) // 2)) == QUERY
        for row in mine:
            x0, y0, x1, y1 = layout.cell_box(r, int(row["rank"]))
            color = CORRECT if row["correct"] == "1" else WRONG
            assert image.getpixel((x0 + 1, (y0 + y1) // 2)) == color
            assert image.getpixel(((x0 + x1) // 2, y0 + 1)) == color
            assert image.getpixel(((x0 + x1) // 2, y1 - 2)) == color
    assert [float(rows[i * k]["query_ap"]) for i in range(nq)] == sorted(
        float(rows[i * k]["query_ap"]) for i in range(nq))


def test_rank_grid_best_order(trained, tmp_path):
    res = visualize_ranks.main(["--num_queries", "3", "--topk", "2", "--order", "best",
                                "--image_height", "64", "--output", str(tmp_path / "best")]
                               + tool_opts(trained, tmp_path))
    assert res["png"].endswith("ranks_best.png")
    rows = read_csv(res["csv"])
    aps = [float(rows[i * 2]["query_ap"]) for i in range(3)]
    assert aps == sorted(aps, reverse=True)
    assert aps[0] == pytest.approx(np.nanmax(res["ap"]), abs=1e-6)
    assert Image.open(res["png"]).size == res["layout"].size
    assert res["layout"].cell_h == 3 * 64 + 2 * visualize_ranks.BORDER


# ---------------------------------------------------------------------------------------------
# Kept tokens
# ---------------------------------------------------------------------------------------------
def kept_tiles_in_png(image, layout, res, boxes, ignore=None):
    """(rows, 3, N) bool: tiles whose interior is exactly the model-input image (not darkened).

    ``ignore``: optional per-row (H, W) bool masks of panel pixels left out of the comparison.
    """
    h, w = res["size"]
    scale = res["scale"]
    found = np.zeros((len(res["indices"]), 3, len(boxes)), dtype=bool)
    for r, sample in enumerate(res["samples"]):
        triplet = read_triplet(sample)
        for m in range(3):
            orig = np.asarray(triplet[m].resize((w, h), Image.BILINEAR)
                              .resize((w * scale, h * scale), Image.NEAREST).convert("RGB"))
            x0, y0, x1, y1 = layout.cell_box(r, m)
            panel = np.asarray(image.crop((x0, y0, x0 + w * scale, y0 + h * scale)))
            skip = ignore[r] if ignore is not None else np.zeros(panel.shape[:2], dtype=bool)
            for n, (ty0, tx0, ty1, tx1) in enumerate(boxes):
                inner = (slice(ty0 + 1, ty1 - 1), slice(tx0 + 1, tx1 - 1))
                use = ~skip[inner]
                found[r, m, n] = np.array_equal(panel[inner][use], orig[inner][use])
                if found[r, m, n] and not skip[ty0, tx0]:
                    assert tuple(panel[ty0, tx0]) == KEPT          # outlined
    return found


def test_token_grid_highlights_k_of_n_patches(trained, tmp_path):
    out = str(tmp_path / "tokens.png")
    res = visualize_tokens.main(["--num_samples", "4", "--output", out]
                                + tool_opts(trained, tmp_path))
    image = Image.open(out).convert("RGB")
    layout = res["layout"]
    assert image.size == layout.size and (layout.rows, layout.cols) == (4, 3)
    assert res["indices"] == [0, 8, 15, 23]                    # spread over the 24 test samples
    # Tiny config: 64x32 input, 16x16 patches, stride 16 -> a 4x2 grid, K = ceil(0.7 * 8) = 6.
    assert (res["grid"], res["patch"], res["stride"]) == ((4, 2), (16, 16), (16, 16))
    n, k, s = 8, num_kept(8, 0.7), res["scale"]
    assert s == 3 and res["panel_size"] == (64 * s, 32 * s)
    boxes = [((i // 2) * 16 * s, (i % 2) * 16 * s, (i // 2 + 1) * 16 * s, (i % 2 + 1) * 16 * s)
             for i in range(n)]
    found = kept_tiles_in_png(image, layout, res, boxes)
    assert (found.sum(axis=-1) == k).all()                     # highlighted share K / N
    assert found.mean() == pytest.approx(k / n)
    assert np.array_equal(found, res["keep"])                  # exactly the model's keep mask


def test_token_grid_overlapping_patches_and_person_outline(trained, tmp_path):
    # An untrained model with stride 12 < patch 16: a 5x2 grid of overlapping patches.
    opts = tool_opts(trained, tmp_path, "MODEL.STRIDE_SIZE", "[12, 12]")
    from config import build_cfg
    cfg = build_cfg("", opts)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=6, num_cams=4)
    weight = str(tmp_path / "stride12.pth")
    torch.save({"model": model.state_dict()}, weight)
    res = visualize_tokens.main(["--indices", "2", "20", "--person_outline", "--scores",
                                 "--output", str(tmp_path / "t12.png")]
                                + opts + ["TEST.WEIGHT", weight])
    assert (res["grid"], res["stride"]) == ((5, 2), (12, 12))
    n, k, s = 10, num_kept(10, 0.7), res["scale"]
    # Tiles: the 12x12 square centred in each 16x16 patch (offset 2), never overlapping.
    boxes = [((2 + 12 * (i // 2)) * s, (2 + 12 * (i % 2)) * s, (14 + 12 * (i // 2)) * s,
              (14 + 12 * (i % 2)) * s) for i in range(n)]
    image = Image.open(res["png"]).convert("RGB")
    arr = np.asarray(image)
    layout = res["layout"]
    h, w = res["size"]
    edges = []  # the person outline is drawn over the tiles: left out of the tile comparison
    for r, sample in enumerate(res["samples"]):
        mask = np.asarray(Image.open(sample.mask_path).convert("L").resize((w, h), Image.NEAREST)) > 127
        big = np.kron(mask, np.ones((s, s), dtype=bool))
        inside = np.pad(big, 1)
        edge = big & ~(inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:])
        assert edge.any()
        edges.append(edge)
        for m in range(3):
            x0, y0, _, _ = layout.cell_box(r, m)
            panel = arr[y0:y0 + h * s, x0:x0 + w * s]
            assert (panel[edge] == PERSON).all()               # the whole outline is drawn
            orig = np.asarray(read_triplet(sample)[m].resize((w, h), Image.BILINEAR)
                              .resize((w * s, h * s), Image.NEAREST).convert("RGB"))
            # Pixels under no tile (top 2 input rows) are darkened.
            top = (orig[:2 * s].astype(np.float32) * visualize_tokens.DARKEN).round().astype(np.uint8)
            off = ~edge[:2 * s]
            assert np.array_equal(panel[:2 * s][off], top[off])
    found = kept_tiles_in_png(image, layout, res, boxes, ignore=edges)
    assert (found.sum(axis=-1) == k).all() and np.array_equal(found, res["keep"])
    # --scores: a heat map right of each image, the same size.
    assert layout.cell_w == 2 * w * s + visualize_tokens.PANEL_GAP


def test_token_tool_requires_sdtps(trained, tmp_path):
    with pytest.raises(ValueError, match="MODEL.SELECTION.NAME none"):
        visualize_tokens.main(tool_opts(trained, tmp_path, "MODEL.SELECTION.NAME", "none"))
    proc = subprocess.run([sys.executable, "tools/visualize_tokens.py", "MODEL.SELECTION.NAME",
                           "none"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "MODEL.SELECTION.NAME none" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Ablation bar chart
# ---------------------------------------------------------------------------------------------
RESULTS = [  # row, mAP mean/std, R1 mean/std
    ("baseline", "50.0", "2.0", "60.0", "3.0"),
    ("+ SDTPS", "70.0", "5.0", "65.0", "0"),
    ("+ SDTPS + DGAF with a long name", "60.0", "", "80.0", "4.0"),
    ("+ DGAF", "40.0", "1.5", "55.0", "2.5"),
]


def write_results(path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "mAP_mean", "mAP_std", "R1_mean", "R1_std", "runs"])
        for row in RESULTS:
            writer.writerow(list(row) + ["3"])


def bar_height(image, bar):
    """Pixels of the bar's colour going up from the zero line, in its second column."""
    x, y, count = bar["x0"] + 1, bar["y_zero"] - 1, 0
    while y >= 0 and image.getpixel((x, y)) == bar["color"]:
        count += 1
        y -= 1
    return count


def test_plot_grouped_bars_heights_and_error_bars(tmp_path):
    csv_path = str(tmp_path / "results.csv")
    write_results(csv_path)
    res = plot_results.main([csv_path, "--metric", "mAP", "--metric", "R1"])
    assert res["png"] == str(tmp_path / "results_mAP_R1.png")
    image = Image.open(res["png"]).convert("RGB")
    assert image.size == res["size"]
    assert image.height > plot_results.PLOT_HEIGHT and image.width > plot_results.MIN_PLOT_WIDTH
    bars = res["bars"]
    assert len(bars) == 8 and res["names"] == [r[0] for r in RESULTS]
    span = res["axis"]["ymax"] - res["axis"]["ymin"]
    assert res["axis"]["ymin"] == 0 and res["axis"]["ymax"] >= 84.0   # 80 + 4 fits
    for j, metric in enumerate(("mAP", "R1")):
        mine = [b for b in bars if b["metric"] == metric]
        assert all(b["color"] == categorical_color(j) for b in mine)
        heights = [bar_height(image, b) for b in mine]
        means = [b["mean"] for b in mine]
        assert np.argsort(heights).tolist() == np.argsort(means).tolist()
        for height, mean in zip(heights, means):
            assert abs(height - mean / span * plot_results.PLOT_HEIGHT) <= 1.0
        # Groups left to right in CSV order; bars of a group side by side.
        assert [b["x0"] for b in mine] == sorted(b["x0"] for b in mine)
    for bar in bars:
        x, hi, lo = bar["xc"], bar["y_hi"], bar["y_lo"]
        if bar["std"] > 0:
            assert bar["error_bar"]
            assert hi < bar["y_mean"] < lo
            assert all(image.getpixel((x, y)) == BLACK for y in range(hi, lo + 1))
            assert image.getpixel((x - 2, hi)) == BLACK == image.getpixel((x + 2, lo))  # caps
            assert abs((lo - hi) - 2 * bar["std"] / span * plot_results.PLOT_HEIGHT) <= 1.0
        else:  # std 0 or empty: no whisker above the bar
            assert not bar["error_bar"]
            assert image.getpixel((x, bar["y_mean"] - 1)) != BLACK
            assert image.getpixel((x, bar["y_mean"] + 2)) == bar["color"]


def test_plot_single_metric_ablate_style_csv_and_errors(tmp_path):
    # tools/ablate.py style: fractions, "n/a" for a missing std, a seeds column.
    csv_path = str(tmp_path / "ablate.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "seeds", "mAP_mean", "mAP_std"])
        for name, mean, std, *_ in RESULTS:
            writer.writerow([name, 3, float(mean) / 100, "n/a" if not std else float(std) / 100])
    out = str(tmp_path / "chart.png")
    res = plot_results.main([csv_path, "--output", out, "--percent", "--title", "ablation"])
    assert res["metrics"] == ["mAP"] and len(res["bars"]) == 4
    assert res["names"][0] == "baseline (n=3)"
    assert [b["mean"] for b in res["bars"]] == pytest.approx([50.0, 70.0, 60.0, 40.0])
    assert [b["error_bar"] for b in res["bars"]] == [True, True, False, True]
    image = Image.open(out).convert("RGB")
    heights = [bar_height(image, b) for b in res["bars"]]
    assert heights[1] > heights[2] > heights[0] > heights[3]
    csv_path = str(tmp_path / "results.csv")
    write_results(csv_path)
    with pytest.raises(ValueError, match="R5_mean.*available: mAP, R1"):
        plot_results.main([csv_path, "--metric", "R5"])
    proc = subprocess.run([sys.executable, "tools/plot_results.py", csv_path, "--metric", "R1",
                           "--output", str(tmp_path / "cli.png")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "cli.png").size[0] > 0


# ---------------------------------------------------------------------------------------------
# Selection probe
# ---------------------------------------------------------------------------------------------
def test_probe_selection_agrees_with_the_evaluation(trained, tmp_path):
    """At the model's own ratio the probe's sdtps row is the evaluation's kept-token foreground
    precision; random is the all-patch share and perfect the best selection of that size."""
    out = str(tmp_path / "probe.md")
    result = probe_selection.main(["--ratios", "0.25,0.7", "--output", out]
                                  + tool_opts(trained, tmp_path))
    metrics = test_net.main(tool_opts(trained, tmp_path))["none"]
    prec = result["precision"]
    assert result["K"] == [num_kept(8, 0.25), num_kept(8, 0.7)] and result["N"] == 8
    assert set(prec) == {"sdtps", "sdtps RGB", "sdtps NI", "sdtps TI", "cls_attn", "cos_own",
                         "cos_other", "norm", "random", "perfect"}
    assert prec["sdtps"][1] == pytest.approx(metrics["fg_precision"], abs=1e-9)
    for i in range(2):  # the modalities' rows average to the overall row
        per_modality = [prec[f"sdtps {m}"][i] for m in ("RGB", "NI", "TI")]
        assert sum(per_modality) / 3 == pytest.approx(prec["sdtps"][i], abs=1e-9)
    assert prec["perfect"][1] == pytest.approx(metrics["fg_best"], abs=1e-9)
    assert prec["random"] == pytest.approx([metrics["fg_share"]] * 2, abs=1e-9)
    for name, values in prec.items():
        assert all(0.0 <= v <= p + 1e-12 for v, p in zip(values, prec["perfect"])), name
    with open(out) as handle:
        assert "| sdtps |" in handle.read()


def test_probe_cls_attention_equals_the_blocks_own_attention(trained):
    """The hook's recomputed CLS -> patch attention equals the attention matrix the timm block
    computes in its non-fused path (captured at its attn_drop)."""
    from config import build_cfg

    opts, weight = trained
    cfg = build_cfg(opts=list(opts) + ["TEST.WEIGHT", weight])
    model = build_model(cfg, num_classes=6, num_cams=4).eval()
    attn = model.backbone.vit.blocks[-1].attn
    attn.fused_attn = False
    captured = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.update(a=o))
    hook = probe_selection.LastBlockClsAttention(attn, model.backbone.vit.num_prefix_tokens)
    try:
        with torch.no_grad():
            model.encode(torch.randn(2, 3, 3, 64, 32), torch.tensor([0, 1]))
    finally:
        handle.remove()
        hook.remove()
    expected = captured["a"][:, :, 0, 1:].mean(dim=1)  # (3B, N)
    assert hook.value.shape == (6, 8)
    assert torch.allclose(hook.value, expected, atol=1e-6)


def test_probe_ratios_parse_before_the_config_overrides():
    """--ratios takes one comma-separated value, so the KEY VALUE overrides after it stay
    overrides (a space-separated list once swallowed TEST.WEIGHT as a ratio); bad ratios are
    refused by argparse, naming the value."""
    args = probe_selection.build_parser().parse_args(
        ["--ratios", "0.3,0.7", "TEST.WEIGHT", "w.pth"])
    assert args.ratios == [0.3, 0.7] and args.opts == ["TEST.WEIGHT", "w.pth"]
    for bad in ("0.3,1.5", "a,b", ","):
        with pytest.raises(SystemExit):
            probe_selection.build_parser().parse_args(["--ratios", bad])
