"""Evaluate a checkpoint (``TEST.WEIGHT``) on the configured dataset's test split.

    python test_net.py --config_file configs/Synthetic/quickstart.yml TEST.WEIGHT output/quickstart/model_best.pth
    python test_net.py --config_file F TEST.WEIGHT W TEST.MISS all      # missing-modality table
"""
import json
import os

from config import default_argument_parser
from data.build import build_data
from engine.cli import run_cli
from engine.defaults import default_setup, evaluation_config, load_weights, require_weight
from engine.evaluator import (MISS_TO_MODALITIES, RANK_KEYS, ReIDEvaluator, build_evaluators,
                              evaluate, export_features, format_metrics)
from modeling.model import build_model
from utils.checkpoint import atomic_write_text
from utils.dist import cleanup, get_rank, get_world_size, is_main_process
from utils.manifest import data_line, run_manifest

MISS_LABELS = {"none": "all modalities", "r": "M(RGB)", "n": "M(NIR)", "t": "M(TIR)",
               "rn": "M(RGB+NIR)", "rt": "M(RGB+TIR)", "nt": "M(NIR+TIR)"}


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
    settings = list(MISS_TO_MODALITIES) if cfg.TEST.MISS == "all" else [cfg.TEST.MISS]
    rows = []
    for miss in settings:
        evaluators = build_evaluators(cfg, test_set)
        metrics = evaluate(model, test_set, cfg, device, miss, evaluators)
        rows.append((miss, metrics))
        logger.info("test [%s feature, %s%s]: %s", cfg.TEST.FEAT, MISS_LABELS[miss],
                    ", re-ranked" if cfg.TEST.RERANK.ENABLED else "", format_metrics(metrics))
        if cfg.TEST.EXPORT and miss == settings[0] and is_main_process():
            reid = next(e for e in evaluators if isinstance(e, ReIDEvaluator))
            export_features(cfg.TEST.EXPORT, reid.extracted, test_set)
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
