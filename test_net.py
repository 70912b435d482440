"""Evaluate a checkpoint (``TEST.WEIGHT``) on the configured dataset's test split.

    python test_net.py --config_file configs/Synthetic/quickstart.yml TEST.WEIGHT output/quickstart/model_best.pth
    python test_net.py --config_file F TEST.WEIGHT W TEST.MISS all      # missing-modality table
    python test_net.py --config_file F TEST.WEIGHT W TEST.MISS matrix   # query x gallery subsets
"""
import json
import os

from config import default_argument_parser
from data.build import build_data
from engine.cli import run_cli
from engine.defaults import default_setup, evaluation_config, load_weights, require_weight
from engine.evaluator import (MISS_TO_MODALITIES, RANK_KEYS, FeatureCollector, ReIDEvaluator,
                              build_evaluators, build_reranker, evaluate, export_features,
                              format_metrics, query_gallery_miss, rank_metrics)
from modeling.model import build_model
from utils.checkpoint import atomic_write_text
from utils.dist import cleanup, get_rank, get_world_size, is_main_process
from utils.manifest import data_line, run_manifest
from utils.visualization import heatmap, stack_vertical

MISS_LABELS = {"none": "all modalities", "r": "M(RGB)", "n": "M(NIR)", "t": "M(TIR)",
               "rn": "M(RGB+NIR)", "rt": "M(RGB+TIR)", "nt": "M(NIR+TIR)"}
# The modalities a TEST.MISS code leaves (the rows and columns of TEST.MISS matrix).
PRESENT_LABELS = {"none": "RGB+NI+TI", "r": "NI+TI", "n": "RGB+TI", "t": "RGB+NI", "rn": "TI",
                  "rt": "NI", "nt": "RGB"}
MATRIX_PLOT = "miss_matrix.png"


def missing_modality_table(rows) -> str:
    """Markdown table of (setting, metrics) rows plus the average over the missing settings."""
    lines = ["| setting | mAP | R1 | R5 | R10 | mINP |", "|---|---|---|---|---|---|"]
    for miss, m in rows:
        lines.append(f"| {MISS_LABELS[miss]} | {m['mAP'] * 100:.2f} | {m['R1'] * 100:.2f} | "
                     f"{m['R5'] * 100:.2f} | {m['R10'] * 100:.2f} | {m['mINP'] * 100:.2f} |")
    missing = [m for miss, m in rows if miss != "none"]
    if missing:
        avg = {k: sum(m[k] for m in missing) / len(missing) for k in RANK_KEYS}
        lines.append(f"| average of missing settings | {avg['mAP'] * 100:.2f} | {avg['R1'] * 100:.2f} | "
                     f"{avg['R5'] * 100:.2f} | {avg['R10'] * 100:.2f} | {avg['mINP'] * 100:.2f} |")
    return "\n".join(lines)


def modality_matrix(model, test_set, cfg, device) -> dict:
    """{query code: {gallery code: metrics}} over the 7 x 7 missing-modality settings: one
    feature pass per setting, then every query subset's features ranked against every gallery
    subset's (:func:`engine.evaluator.rank_metrics`); the diagonal is ``TEST.MISS all``."""
    passes = {}
    for miss in MISS_TO_MODALITIES:
        collector = FeatureCollector.from_config(cfg, test_set)
        evaluate(model, test_set, cfg, device, miss, [collector])
        passes[miss] = collector.extracted
    rerank = build_reranker(cfg)
    return {q: {g: rank_metrics(passes[q], test_set, cfg.TEST.DIST, rerank, passes[g])
                for g in passes} for q in passes}


def matrix_table(matrix: dict) -> str:
    """Markdown table: a row per query subset, a column per gallery subset, "mAP / R1" cells."""
    codes = list(matrix)
    lines = ["| query \\ gallery | " + " | ".join(PRESENT_LABELS[g] for g in codes) + " |",
             "|---" * (len(codes) + 1) + "|"]
    for q in codes:
        cells = (f"{matrix[q][g]['mAP'] * 100:.2f} / {matrix[q][g]['R1'] * 100:.2f}" for g in codes)
        lines.append(f"| {PRESENT_LABELS[q]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_matrix(matrix: dict, path: str) -> None:
    """Heat maps of the matrix's mAP and R1 (percent; rows: query, columns: gallery) to ``path``."""
    codes = list(matrix)
    labels = [PRESENT_LABELS[c] for c in codes]
    panels = [heatmap([[matrix[q][g][key] * 100 for g in codes] for q in codes], labels, labels,
                      f"{key} (%): query modalities (rows) x gallery modalities (columns)")
              for key in ("mAP", "R1")]
    stack_vertical(panels, gap=8).save(path)


def main(argv=None) -> dict:
    args = default_argument_parser(
        "Evaluate a tri-modal ReID checkpoint. TEST.WEIGHT (required) names it: a training "
        "checkpoint or model_best.pth.", training=False,
        epilog="Example:\n  python test_net.py --config_file configs/Synthetic/quickstart.yml "
               "TEST.WEIGHT output/quickstart/model_best.pth").parse_args(argv)
    cfg, device, logger = default_setup(args, training=False, log_name="test_log.txt")
    require_weight(cfg)
    data = build_data(cfg, get_rank(), get_world_size())
    manifest = run_manifest(cfg, device, data, get_world_size())
    logger.info("%s", data_line(manifest["data"]))
    model = build_model(evaluation_config(cfg), data.num_classes, data.num_cams).to(device)
    load_weights(cfg, model)
    test_set = data.eval_sets["test"]
    if cfg.TEST.MISS == "matrix":
        matrix = modality_matrix(model, test_set, cfg, device)
        logger.info("query x gallery modalities [%s feature%s], mAP / R1:\n%s", cfg.TEST.FEAT,
                    ", re-ranked" if cfg.TEST.RERANK.ENABLED else "", matrix_table(matrix))
        if is_main_process():
            plot = os.path.join(cfg.OUTPUT_DIR, MATRIX_PLOT)
            draw_matrix(matrix, plot)
            logger.info("heat map written to %s", plot)
            diagonal = {miss: matrix[miss][miss] for miss in matrix}  # = TEST.MISS all's results
            atomic_write_text(json.dumps({"weight": cfg.TEST.WEIGHT, "feat": cfg.TEST.FEAT,
                                          "results": diagonal, "matrix": matrix, "manifest": manifest},
                                         indent=2, default=float),
                              os.path.join(cfg.OUTPUT_DIR, "test_results.json"))
        cleanup()
        return {"matrix": matrix}
    query_miss, gallery_miss = query_gallery_miss(cfg)
    cross = query_miss != gallery_miss  # TEST.QUERY_MISS / GALLERY_MISS: one setting, two passes
    settings = list(MISS_TO_MODALITIES) if cfg.TEST.MISS == "all" else [query_miss]
    rows = []
    for miss in settings:
        evaluators = build_evaluators(cfg, test_set)
        metrics = evaluate(model, test_set, cfg, device, None if cross else miss, evaluators)
        rows.append((miss, metrics))
        setting = (f"query {MISS_LABELS[query_miss]}, gallery {MISS_LABELS[gallery_miss]}" if cross
                   else MISS_LABELS[miss])
        logger.info("test [%s feature, %s%s]: %s", cfg.TEST.FEAT, setting,
                    ", re-ranked" if cfg.TEST.RERANK.ENABLED else "", format_metrics(metrics))
        if cfg.TEST.EXPORT and miss == settings[0] and is_main_process():
            reid = next(e for e in evaluators if isinstance(e, ReIDEvaluator))
            export_features(cfg.TEST.EXPORT, reid.extracted, test_set, reid.gallery_from)
            logger.info("features exported to %s", cfg.TEST.EXPORT)
    if len(rows) > 1:
        logger.info("missing-modality results:\n%s", missing_modality_table(rows))
    results = {miss: m for miss, m in rows}
    if is_main_process():
        atomic_write_text(json.dumps({"weight": cfg.TEST.WEIGHT, "feat": cfg.TEST.FEAT,
                                      "results": results, "manifest": manifest},
                                     indent=2, default=float),
                          os.path.join(cfg.OUTPUT_DIR, "test_results.json"))
    cleanup()
    return results


if __name__ == "__main__":
    run_cli(main)
