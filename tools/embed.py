"""Embed every tri-modal triplet of a folder or a CSV with a trained checkpoint.

    python tools/embed.py --config_file configs/Synthetic/quickstart.yml \\
        TEST.WEIGHT output/quickstart/model_best.pth --input datasets/Synthetic/test --output feats.npz
    python tools/embed.py --config_file F TEST.WEIGHT W --input triplets.csv --output feats.npz

``--input`` is either

* a folder holding three sibling modality folders ``RGB``, ``NI``, ``TI`` (any letter case)
  whose image files have matching names (the RGBNT201 convention): one triplet per name. Names
  like ``000123_cam3_2_05.jpg`` give the identity and the 0-based camera; names that do not
  follow this pattern are logged (the first few by name) and get -1 (unknown); when they are the
  majority, every identity and camera is left unknown; or
* a CSV file with a header naming the columns ``rgb``, ``ni``, ``ti`` (image paths, relative to the
  CSV's folder unless absolute; an empty cell = that modality is missing and zero-filled) and
  optionally ``id`` and ``cam`` (0-based; empty = unknown).

Features come from :class:`engine.predictor.Predictor` (the config's TEST.FEAT, test transforms,
TEST.MISS / FLIP), in batches of TEST.IMS_PER_BATCH; an unknown camera is given to the model as
camera 0. The ``.npz`` written holds ``feats`` (N, D) float32, ``paths`` (N, 3) str (rgb, ni, ti;
"" = missing), ``pids`` and ``camids`` (N,) int64 (-1 = unknown) and ``info`` (a JSON string:
config, weight, TEST.FEAT, TEST.DIST, ...). tools/search.py ranks one such file against another.
"""
import argparse
import csv
import json
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from config import ConfigArgumentParser, build_cfg  # noqa: E402
from data.datasets import RGBNT201, is_image_file  # noqa: E402
from engine.cli import run_cli  # noqa: E402
from utils.logger import get_logger, setup_logger  # noqa: E402
from utils.outputs import check_output, replacing  # noqa: E402

FOLDERS = ("RGB", "NI", "TI")  # the RGBNT201 modality folders, in modality order
CSV_COLUMNS = ("rgb", "ni", "ti")
CSV_OPTIONAL = ("id", "cam")
SHOWN = 5  # names listed in an error


class Triplets(dict):
    """paths (N, 3) str ("" = missing), pids and camids (N,) int64 (-1 = unknown)."""


def _listed(items: List[str]) -> str:
    more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def folder_triplets(root: str) -> Triplets:
    """Triplets of ``root/{RGB,NI,TI}`` with matching file names (sorted by name)."""
    subdirs = {name.upper(): name for name in os.listdir(root)
               if os.path.isdir(os.path.join(root, name))}
    absent = [f for f in FOLDERS if f not in subdirs]
    if absent:
        raise FileNotFoundError(
            f"--input {root}: no modality folder {', '.join(absent)} (found: "
            f"{', '.join(sorted(subdirs.values())) or 'no folders'}): a folder input holds RGB/, NI/ "
            "and TI/ with matching image names; for other layouts or missing modalities give a CSV "
            "with columns rgb, ni, ti")
    names = {}
    for f in FOLDERS:
        folder = os.path.join(root, subdirs[f])
        names[f] = {n for n in os.listdir(folder) if not n.startswith(".") and is_image_file(n)
                    and os.path.isfile(os.path.join(folder, n))}
    everywhere = names["RGB"] & names["NI"] & names["TI"]
    unmatched = sorted(f"{subdirs[f]}/{n}" for f in FOLDERS for n in names[f] - everywhere)
    if unmatched:
        raise ValueError(
            f"--input {root}: the modality folders do not match: {len(unmatched)} image(s) without "
            f"a file of the same name in the other two folders ({_listed(unmatched)}); every "
            "triplet needs RGB/<name>, NI/<name> and TI/<name>")
    if not everywhere:
        raise ValueError(f"--input {root}: the folders {', '.join(FOLDERS)} hold no images")
    ordered = sorted(everywhere)
    parsed = parse_names(root, ordered)
    paths = [[os.path.join(root, subdirs[f], n) for f in FOLDERS] for n in ordered]
    return Triplets(paths=np.array(paths, dtype=str).reshape(-1, 3),
                    pids=np.array([p for p, _ in parsed], dtype=np.int64),
                    camids=np.array([c for _, c in parsed], dtype=np.int64))


def parse_names(root: str, names: List[str]) -> List[tuple]:
    """(pid, camid) of each name by RGBNT201's pattern. Names that do not follow it get -1 and are
    logged by name; when they are the majority, every identity is left unknown."""
    parsed, odd = [], []
    for name in names:
        try:
            parsed.append(RGBNT201.parse_name(name))
        except ValueError:
            parsed.append((-1, -1))
            odd.append(name)
    if not odd:
        return parsed
    if len(odd) * 2 > len(names):
        log = get_logger().warning if len(odd) < len(names) else get_logger().info
        log("--input %s: %d of %d names do not follow RGBNT201's pattern (e.g. "
            "000123_cam3_2_05.jpg): %s; identities and cameras are left unknown (-1) for all",
            root, len(odd), len(names), _listed(odd))
        return [(-1, -1)] * len(names)
    get_logger().warning(
        "--input %s: %d of %d names do not follow RGBNT201's pattern (e.g. 000123_cam3_2_05.jpg): "
        "%s; their identity and camera are unknown (-1), the other %d keep theirs", root, len(odd),
        len(names), _listed(odd), len(names) - len(odd))
    return parsed


def _int_cell(value: str, column: str, path: str, line: int) -> int:
    value = value.strip()
    if not value:
        return -1
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--input {path}, line {line}: column {column!r} holds {value!r}, not an "
                         "integer (leave it empty when unknown)") from None


def csv_triplets(path: str) -> Triplets:
    """Triplets of a CSV with the header columns rgb, ni, ti[, id, cam]."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = {(h or "").strip().lower(): h for h in (reader.fieldnames or [])}
        absent = [c for c in CSV_COLUMNS if c not in header]
        if absent:
            raise ValueError(
                f"--input {path}: the header has no column {', '.join(repr(c) for c in absent)} "
                f"(found: {', '.join(repr(h) for h in header) or 'no header'}); the first line must "
                "name the columns rgb, ni, ti and optionally id, cam")
        paths, pids, cams = [], [], []
        for line, row in enumerate(reader, start=2):
            triplet = []
            for c in CSV_COLUMNS:
                cell = (row.get(header[c]) or "").strip()
                triplet.append(os.path.join(base, cell) if cell and not os.path.isabs(cell) else cell)
            if not any(triplet):
                raise ValueError(f"--input {path}, line {line}: no image path in rgb, ni or ti")
            paths.append(triplet)
            pids.append(_int_cell(row.get(header.get("id"), "") or "", "id", path, line)
                        if "id" in header else -1)
            cams.append(_int_cell(row.get(header.get("cam"), "") or "", "cam", path, line)
                        if "cam" in header else -1)
    if not paths:
        raise ValueError(f"--input {path}: no rows after the header")
    return Triplets(paths=np.array(paths, dtype=str).reshape(-1, 3),
                    pids=np.array(pids, dtype=np.int64), camids=np.array(cams, dtype=np.int64))


def find_triplets(path: str) -> Triplets:
    """The triplets of ``--input`` (a folder or a .csv file)."""
    if os.path.isdir(path):
        return folder_triplets(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--input {path}: no such folder or file")
    if not path.lower().endswith(".csv"):
        raise ValueError(f"--input {path}: give a folder holding RGB/, NI/, TI/ or a .csv file")
    return csv_triplets(path)


def embed_triplets(predictor, triplets: Triplets, progress: bool = True) -> np.ndarray:
    """(N, D) float32 features of the triplets, batch by batch; rows missing the same modalities
    are embedded together (a missing modality is zero-filled)."""
    paths, cams = triplets["paths"], triplets["camids"]
    present = paths != ""  # (N, 3)
    feats = None
    bar = tqdm(total=len(paths), desc="embedding", unit="triplet",
               disable=not (progress and sys.stderr.isatty()))
    for pattern in np.unique(present, axis=0):
        rows = np.flatnonzero((present == pattern).all(axis=1))
        for start in range(0, len(rows), predictor.batch_size):
            chunk = rows[start:start + predictor.batch_size]
            inputs = [list(paths[chunk, m]) if pattern[m] else None for m in range(3)]
            f = predictor.embed(*inputs, cam_ids=np.maximum(cams[chunk], 0)).numpy()
            if feats is None:
                feats = np.zeros((len(paths), f.shape[1]), dtype=np.float32)
            feats[chunk] = f
            bar.update(len(chunk))
    bar.close()
    return feats


def save_features(path: str, feats: np.ndarray, triplets: Triplets, info: Dict) -> None:
    """Write the .npz (exactly at ``path``; to a temporary file first, read back, then renamed:
    a failure leaves an existing file as it was)."""
    def validate(tmp: str) -> None:
        with np.load(tmp, allow_pickle=False) as data:
            if data["feats"].shape != feats.shape:
                raise ValueError(f"--output {path}: the written file does not read back; an "
                                 "existing file is unchanged")

    with replacing(path, "--output", validate) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, feats=feats, paths=triplets["paths"], pids=triplets["pids"],
                     camids=triplets["camids"], info=np.array(json.dumps(info)))


def build_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser(description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", default="", metavar="FILE", help="path to a yaml config")
    parser.add_argument("--input", required=True, metavar="DIR|CSV",
                        help="folder with RGB/, NI/, TI/ (matching names) or a CSV rgb,ni,ti[,id,cam]")
    parser.add_argument("--output", required=True, metavar="NPZ", help="features file to write")
    parser.add_argument("--batch_size", type=int, default=0,
                        help="triplets per forward pass (default TEST.IMS_PER_BATCH)")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback here")
    return parser


def main(argv=None) -> Dict:
    """Embed ``--input`` into ``--output``; returns the arrays written (for tests)."""
    args = build_parser().parse_args(argv)
    logger = setup_logger()
    if args.batch_size < 0:
        raise ValueError(f"--batch_size {args.batch_size}: must be at least 1 (0: TEST.IMS_PER_BATCH)")
    cfg = build_cfg(args.config_file, args.opts)
    check_output(args.output, "--output", (".npz",),  # before the work: nothing is overwritten
                 {"--input": args.input, "--config_file": args.config_file,
                  "TEST.WEIGHT": cfg.TEST.WEIGHT})
    triplets = find_triplets(args.input)  # before the model is loaded: bad input fails fast
    from engine.predictor import MODALITY_NAMES, Predictor  # the model code: after the checks

    predictor = Predictor(cfg, batch_size=args.batch_size or None)
    logger.info("embedding %d triplets from %s with %s (TEST.FEAT %s) on %s", len(triplets["paths"]),
                args.input, cfg.TEST.WEIGHT, cfg.TEST.FEAT, predictor.device)
    feats = embed_triplets(predictor, triplets)
    t = cfg.TEST
    info = {"config_file": args.config_file, "weight": t.WEIGHT, "input": args.input,
            "feat": t.FEAT, "neck_feat": t.NECK_FEAT, "feat_norm": t.FEAT_NORM, "dist": t.DIST,
            "miss": t.MISS, "flip": bool(t.FLIP), "size": list(cfg.INPUT.SIZE_TEST),
            "modalities": list(MODALITY_NAMES)}
    save_features(args.output, feats, triplets, info)
    known = int((triplets["pids"] >= 0).sum())
    logger.info("wrote %s: %d x %d features (%d with a known identity)", args.output, *feats.shape,
                known)
    return {"feats": feats, **triplets, "info": info}


if __name__ == "__main__":
    run_cli(main)
