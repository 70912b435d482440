"""Rank a gallery for each query: features from tools/embed.py (or test_net.py TEST.EXPORT).

    python tools/search.py --gallery gallery.npz --query query.npz [--rerank] [--top 10] \\
        [--html ranks.html] [--csv ranks.csv]
    python tools/search.py --gallery feats.npz --query feats.npz    # every item against the others

Distances are those of the evaluation (``engine.evaluator.query_gallery_distance``: L2-normalised
features, ``--dist`` defaulting to the TEST.DIST stored by embed.py; ``--rerank``: k-reciprocal
re-ranking, ``utils.rerank``, with TEST.RERANK's default k1/k2/lambda). A gallery item is left
out of a query's list (junk, as in the evaluation) when it has the query's identity and camera;
without known cameras, when it is the query's own triplet (same paths), so a file searched
against itself does not return each query first. When the identities (and cameras) are known in
both files the mAP / CMC / mINP of the evaluation are printed (``utils.metrics.evaluate_rank``):
embed.py + search.py on a test split give test_net.py's figures.

``--html`` writes one static page: a row per query (the first ``--html_queries`` queries, in the
file's order or, with ``--order best`` / ``worst``, by average precision) with the
query and its top results, each as the RGB | NI | TI images side by side in a frame: blue for the
query, green / red for a result of the query's / another identity (grey when identities are
unknown). The images are embedded as small JPEG thumbnails (base64, each image once, as a CSS
class), so the page is one self-contained file that still shows after it is moved or mailed,
whatever folders the images came from.
"""
import argparse
import base64
import csv
import html
import io
import json
import os
import sys
import zipfile
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from config.defaults import get_cfg_defaults  # noqa: E402
from data.datasets import BadImageError, read_image  # noqa: E402
from engine.cli import run_cli  # noqa: E402
from engine.evaluator import (distance_metrics, dropped_queries, format_metrics,  # noqa: E402
                              query_gallery_distance)
from tools.visualize_ranks import order_queries, per_query_ap, top_matches  # noqa: E402
from utils.outputs import OutputPathError, check_output, replacing  # noqa: E402
from utils.rerank import re_ranking  # noqa: E402
from utils.visualization import CORRECT, MID_GRAY, QUERY, WRONG  # noqa: E402

MODALITY_LABELS = ("RGB", "NI", "TI")
CSV_FIELDS = ("query", "query_rgb", "query_pid", "query_cam", "rank", "gallery", "gallery_rgb",
              "pid", "cam", "distance", "correct")


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------
def load_features(path: str, role: str) -> Dict:
    """feats (N, D) float32, paths (N, 3) str, pids / camids / sceneids (N,) int64 (-1 unknown)
    and info of a .npz from tools/embed.py, or the ``role`` ("query" / "gallery") rows of a
    test_net.py TEST.EXPORT file."""
    flag = f"--{role}"
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder: name a .npz file of tools/embed.py (which "
                         "embeds a folder: python tools/embed.py --input <folder> --output f.npz)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{flag} {path} is not a .npz file (not a zip archive): give a file of "
                         "tools/embed.py or of test_net.py TEST.EXPORT")
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear line
        raise ValueError(f"{flag} {path} is not a .npz file numpy can read ({exc})") from exc
    prefix = "" if "feats" in keys else f"{role}_" if f"{role}_feats" in keys else None
    if prefix is None:
        raise ValueError(f"{flag} {path} holds no features (arrays: {', '.join(sorted(keys)) or 'none'}): "
                         "give a file of tools/embed.py ('feats') or of test_net.py TEST.EXPORT "
                         f"('{role}_feats')")
    feats = np.asarray(data[prefix + "feats"], dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"{flag} {path}: '{prefix}feats' must be a non-empty (N, D) array, got "
                         f"shape {feats.shape}")
    n = feats.shape[0]
    out = {"feats": feats, "file": path, "info": {}}
    if prefix + "paths" in keys:
        paths = np.asarray(data[prefix + "paths"]).astype(str)
        out["paths"] = paths if paths.ndim == 2 else np.array([p.split("|") + [""] * (3 - len(p.split("|")))
                                                              for p in paths], dtype=str)
    else:
        out["paths"] = np.array([[f"{role}#{i}", "", ""] for i in range(n)], dtype=str)
    for key in ("pids", "camids", "sceneids"):
        values = np.asarray(data[prefix + key]).astype(np.int64) if prefix + key in keys else \
            np.full(n, -1, dtype=np.int64)
        if values.shape != (n,):
            raise ValueError(f"{flag} {path}: '{prefix}{key}' has shape {values.shape}, expected ({n},)")
        out[key] = values
    if out["paths"].shape != (n, 3):
        raise ValueError(f"{flag} {path}: '{prefix}paths' has shape {out['paths'].shape}, expected ({n}, 3)")
    if "info" in keys:
        try:
            out["info"] = json.loads(str(data["info"]))
        except ValueError:
            pass
    return out


def junk_keys(query: Dict, gallery: Dict):
    """(q_pids, g_pids, q_keys, g_keys, what): labels under which a gallery item with the query's
    pid and key is junk. Keys are the scenes or cameras when known for every row of a known
    identity in both files, else an id of the triplet's paths (only the query's own triplet is
    junk). Identities are used when some rows of both files have one (-1 = unknown: such a query
    is left out of the metrics, such a gallery item never matches); rows of an unknown identity
    are keyed by their triplet."""
    q_pids, g_pids = query["pids"], gallery["pids"]
    if not ((q_pids >= 0).any() and (g_pids >= 0).any()):
        q_pids, g_pids = np.full_like(q_pids, -1), np.full_like(g_pids, -1)
    ids: Dict[str, int] = {}
    q_triplet = np.array([ids.setdefault("|".join(p), len(ids)) for p in query["paths"]], dtype=np.int64)
    g_triplet = np.array([ids.setdefault("|".join(p), len(ids)) for p in gallery["paths"]], dtype=np.int64)
    offset = 1 + max(int(query["camids"].max()), int(gallery["camids"].max()),
                     int(query["sceneids"].max()), int(gallery["sceneids"].max()), 0)

    def known(key):
        return bool((q_pids >= 0).any() and (query[key][q_pids >= 0] >= 0).all() and
                    (gallery[key][g_pids >= 0] >= 0).all())

    for key, what in (("sceneids", "scene"), ("camids", "camera")):
        if known(key):  # unknown identities: their triplet, beyond every camera / scene id
            return (q_pids, g_pids, np.where(q_pids >= 0, query[key], offset + q_triplet),
                    np.where(g_pids >= 0, gallery[key], offset + g_triplet), what)
    return q_pids, g_pids, q_triplet, g_triplet, "triplet"


# ---------------------------------------------------------------------------------------------
# HTML page
# ---------------------------------------------------------------------------------------------
def _css_color(color) -> str:
    return "rgb({},{},{})".format(*color)


class Thumbnails:
    """Each image file once, as a base64 JPEG of ``height`` px in a CSS class (``css()``)."""

    def __init__(self, height: int):
        self.height = height
        self.classes: Dict[str, str] = {}
        self.rules: List[str] = []

    def cell(self, path: str, label: str) -> str:
        """A <span> showing the image at ``path`` (a grey box when it is missing or unreadable)."""
        if not path or path not in self.classes:
            try:
                if not path:
                    raise FileNotFoundError
                img = read_image(path)
            except (FileNotFoundError, BadImageError):
                return (f'<span class="im none" title="{html.escape(label)}: '
                        f'{html.escape(path) if path else "missing"}">{"no " + label}</span>')
            width = max(1, round(img.width * self.height / img.height))
            img = img.resize((width, self.height), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
            name = f"i{len(self.classes)}"
            self.classes[path] = name
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            self.rules.append(f".{name}{{width:{width}px;background-image:url(data:image/jpeg;base64,{data})}}")
        return (f'<span class="im {self.classes[path]}" title="{html.escape(label)}: '
                f'{html.escape(path)}"></span>')

    def css(self) -> str:
        return "\n".join(self.rules)


def _triplet_html(thumbs: Thumbnails, paths, border, caption: str) -> str:
    images = "".join(thumbs.cell(str(p), m) for p, m in zip(paths, MODALITY_LABELS))
    return (f'<div class="cell" style="border-color:{border}"><div class="ims">{images}</div>'
            f'<div class="cap">{html.escape(caption)}</div></div>')


def write_html(path: str, title: str, summary: str, rows: List[Dict], thumb_height: int) -> None:
    """One static page: a row per query, its cell then its results' cells (see the docstring)."""
    thumbs = Thumbnails(thumb_height)
    body = []
    for row in rows:
        cells = [_triplet_html(thumbs, row["query_paths"], _css_color(QUERY), row["query_caption"])]
        for match in row["matches"]:
            color = MID_GRAY if match["correct"] is None else CORRECT if match["correct"] else WRONG
            cells.append(_triplet_html(thumbs, match["paths"], _css_color(color), match["caption"]))
        body.append(f'<div class="row"><div class="label">{html.escape(row["label"])}</div>'
                    f'<div class="cells">{"".join(cells)}</div></div>')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body{{font:13px sans-serif;margin:12px;color:#222}}
h1{{font-size:18px;margin:0 0 4px}} p.sum{{margin:0 0 10px;color:#444}}
.row{{margin:0 0 10px}} .label{{margin:0 0 2px;color:#333}}
.cells{{display:flex;flex-wrap:nowrap;gap:6px;align-items:flex-start}}
.cell{{border:4px solid;padding:1px;background:#fff}} .cell:first-child{{margin-right:10px}}
.ims{{display:flex;gap:1px}}
.im{{display:inline-block;height:{thumb_height}px;background-size:100% 100%}}
.im.none{{width:{max(1, thumb_height // 2)}px;background:#ddd;font-size:9px;color:#666;overflow:hidden}}
.cap{{font-size:11px;text-align:center;white-space:nowrap;max-width:100%}}
{thumbs.css()}
</style></head><body>
<h1>{html.escape(title)}</h1><p class="sum">{html.escape(summary)}</p>
{chr(10).join(body)}
</body></html>
"""
    with replacing(path, "--html") as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(page)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    rerank = get_cfg_defaults().TEST.RERANK
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", required=True, metavar="NPZ", help="gallery features")
    parser.add_argument("--query", required=True, metavar="NPZ",
                        help="query features (the gallery file itself: every item against the others)")
    parser.add_argument("--top", type=int, default=10, help="results listed per query")
    parser.add_argument("--dist", choices=("cosine", "euclidean"), default=None,
                        help="distance (default: the TEST.DIST stored in the gallery file, else cosine)")
    parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    parser.add_argument("--k1", type=int, default=rerank.K1, help="re-ranking k1")
    parser.add_argument("--k2", type=int, default=rerank.K2, help="re-ranking k2")
    parser.add_argument("--lambda_value", type=float, default=rerank.LAMBDA, help="re-ranking lambda")
    parser.add_argument("--html", default="", metavar="FILE", help="write the ranked lists as a web page")
    parser.add_argument("--html_queries", type=int, default=50, help="queries shown in the page")
    parser.add_argument("--order", choices=("input", "worst", "best"), default="input",
                        help="queries of the page: in the file's order, or by AP (identities known; "
                             "queries without a positive left out)")
    parser.add_argument("--thumb_height", type=int, default=64, help="image height (px) in the page")
    parser.add_argument("--csv", default="", metavar="FILE", help="write every query's top results")
    parser.add_argument("--show", type=int, default=5, help="queries whose results are printed")
    parser.add_argument("--debug", action="store_true", help="on an error, print the traceback")
    return parser


def main(argv=None) -> Dict:
    """Rank, print, optionally write the page and CSV; returns metrics and rankings (for tests)."""
    args = build_parser().parse_args(argv)
    for flag, value, least in (("--top", args.top, 1), ("--html_queries", args.html_queries, 1),
                               ("--thumb_height", args.thumb_height, 8), ("--show", args.show, 0),
                               ("--k1", args.k1, 1), ("--k2", args.k2, 1)):
        if value < least:
            raise ValueError(f"{flag} {value}: must be at least {least}")
    if not 0.0 <= args.lambda_value <= 1.0:
        raise ValueError(f"--lambda_value {args.lambda_value}: must lie in [0, 1]")
    inputs = {"--gallery": args.gallery, "--query": args.query}
    for flag, path, ext in (("--html", args.html, (".html", ".htm")), ("--csv", args.csv, (".csv",))):
        if path:  # before the work: an input or a file of another kind is never overwritten
            check_output(path, flag, ext, inputs)
    if args.html and args.csv and os.path.abspath(args.html) == os.path.abspath(args.csv):
        raise OutputPathError(f"--html and --csv both name {args.html}: give two files")
    gallery = load_features(args.gallery, "gallery")
    query = load_features(args.query, "query")
    if query["feats"].shape[1] != gallery["feats"].shape[1]:
        raise ValueError(f"--query {args.query} has {query['feats'].shape[1]}-d features, --gallery "
                         f"{args.gallery} {gallery['feats'].shape[1]}-d: embed both with the same "
                         "checkpoint and TEST.FEAT")
    dist = args.dist or gallery["info"].get("dist") or "cosine"
    reranker = (lambda qf, gf: re_ranking(qf, gf, k1=args.k1, k2=args.k2,
                                          lambda_value=args.lambda_value)) if args.rerank else None
    distmat = query_gallery_distance(torch.from_numpy(query["feats"]), torch.from_numpy(gallery["feats"]),
                                     dist, reranker).cpu().numpy()
    q_pids, g_pids, q_keys, g_keys, key_name = junk_keys(query, gallery)
    ids_known = bool((q_pids >= 0).any())
    counted = q_pids >= 0  # queries of an unknown identity are left out of the metrics
    if args.order != "input" and not ids_known:
        raise ValueError(f"--order {args.order} ranks the queries by average precision, which needs "
                         "the identities of both files: use --order input")
    how = f"{dist} distance" + (f", re-ranked (k1 {args.k1}, k2 {args.k2}, lambda "
                                f"{args.lambda_value})" if args.rerank else "")
    metrics: Optional[Dict] = None
    ap = np.full(len(q_pids), np.nan)
    if ids_known:
        rows = np.flatnonzero(counted)
        ap = np.where(counted, per_query_ap(distmat, q_pids, g_pids, q_keys, g_keys), np.nan)
        unknown = len(q_pids) - len(rows)
        left_out = f" [{unknown} queries of unknown identity (pid -1) left out]" if unknown else ""
    if ids_known and not np.isfinite(ap).any():
        print(f"{len(q_pids)} queries x {len(g_pids)} gallery, {how}: no query has a positive "
              f"(its identity under another {key_name}) in --gallery {args.gallery}: no metrics"
              f"{left_out}")
    elif ids_known:
        if key_name == "scene":
            metrics = distance_metrics(distmat[rows], q_pids[rows], g_pids, query["camids"][rows],
                                       gallery["camids"], q_keys[rows], g_keys)
        else:  # cameras, or the triplet ids standing in for unknown cameras
            metrics = distance_metrics(distmat[rows], q_pids[rows], g_pids, q_keys[rows], g_keys)
        print(f"{len(q_pids)} queries x {len(g_pids)} gallery, {how}, junk = same identity and "
              f"{key_name}: {format_metrics(metrics)}{left_out}")
    else:
        print(f"{len(q_pids)} queries x {len(g_pids)} gallery, {how} (identities unknown: no "
              "metrics; each query's own triplet is left out)")

    ranks = []
    records = []
    for qi in range(len(q_pids)):
        top = top_matches(distmat[qi], q_pids[qi], q_keys[qi], g_pids, g_keys, args.top)
        ranks.append(top)
        for rank, gi in enumerate(top, start=1):
            records.append({
                "query": qi, "query_rgb": query["paths"][qi][0], "query_pid": int(query["pids"][qi]),
                "query_cam": int(query["camids"][qi]), "rank": rank, "gallery": int(gi),
                "gallery_rgb": gallery["paths"][gi][0], "pid": int(gallery["pids"][gi]),
                "cam": int(gallery["camids"][gi]), "distance": f"{distmat[qi, gi]:.6f}",
                "correct": int(g_pids[gi] == q_pids[qi]) if counted[qi] else ""})
    for qi in range(min(args.show, len(q_pids))):
        print(f"query {qi}: {query['paths'][qi][0]}" +
              (f" (pid {q_pids[qi]}, AP {ap[qi]:.3f})" if counted[qi] else ""))
        for rank, gi in enumerate(ranks[qi], start=1):
            mark = (" +" if g_pids[gi] == q_pids[qi] else " -") if counted[qi] else ""
            print(f"  #{rank:<3d}{mark} {distmat[qi, gi]:.4f}  {gallery['paths'][gi][0]}")

    if args.csv:
        with replacing(args.csv, "--csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(records)
        print(f"rankings written to {args.csv}")
    if args.html:
        rows = []
        shown = np.arange(len(q_pids)) if args.order == "input" else order_queries(ap, args.order)
        for qi in shown[:args.html_queries]:
            who = f"pid {query['pids'][qi]}, cam {query['camids'][qi]}" if ids_known else \
                os.path.basename(query["paths"][qi][0])
            label = f"query {qi} ({who})" + (f": AP {ap[qi]:.3f}" if np.isfinite(ap[qi])
                                              else "")
            matches = [{"paths": gallery["paths"][gi],
                        "correct": bool(g_pids[gi] == q_pids[qi]) if counted[qi] else None,
                        "caption": f"#{rank} {distmat[qi, gi]:.3g}" +
                                   (f" pid {g_pids[gi]}" if ids_known else "")}
                       for rank, gi in enumerate(ranks[qi], start=1)]
            rows.append({"query_paths": query["paths"][qi], "query_caption": "query",
                         "label": label, "matches": matches})
        summary = (f"query {args.query} ({len(q_pids)}), gallery {args.gallery} ({len(g_pids)}), "
                   f"{how}. " + (f"mAP {metrics['mAP'] * 100:.2f}, R1 {metrics['R1'] * 100:.2f} "
                                 f"({dropped_queries(metrics)}{metrics['num_query']} queries). "
                                 if metrics else "") +
                   "Frames: blue query, green same identity, red another identity"
                   f"{'' if ids_known else ' (identities unknown: grey)'}; images RGB | NI | TI.")
        order = "" if args.order == "input" else f", {args.order} queries by AP first"
        write_html(args.html, f"Top {args.top} results{order}", summary, rows, args.thumb_height)
        print(f"page written to {args.html} ({len(rows)} queries)")
    return {"metrics": metrics, "distmat": distmat, "ranks": ranks, "ap": ap, "junk": key_name}


if __name__ == "__main__":
    run_cli(main)
