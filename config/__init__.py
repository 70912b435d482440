"""Configuration: defaults, command-line parsing and validation (detectron2's habits).

``setup(args)`` clones the defaults, merges the config file, merges trailing ``KEY VALUE`` pairs,
applies the ``--init_scale/--init_bias`` shortcuts, validates, and freezes.
"""
import argparse
import os
from typing import List, Optional

import yaml
from yacs.config import CfgNode

from config.defaults import get_cfg_defaults

# Allowed values of the enumerated keys: a wrong value fails early, naming the key.
CHOICES = {
    "DATASETS.NAMES": ("RGBNT201", "RGBNT100", "MSVR310", "Synthetic"),
    "SOLVER.OPTIMIZER": ("Adam", "AdamW", "SGD"),
    "SOLVER.AMP": ("off", "fp16", "bf16"),
    "SOLVER.PARAM_GROUPS": ("demo", "ndim"),
    "TEST.AMP": ("off", "fp16", "bf16"),
    "TEST.FEAT": ("ori", "fused", "concat", "hdm", "moe", "ori+moe"),
    "TEST.FEAT_NORM": ("once", "per_part"),
    "MODEL.POS_EMBED_RESIZE": ("bilinear", "bicubic"),
    "MODEL.SDTPS.GATE_NORM": ("none", "patches", "heads"),
    "INPUT.TRAIN_INTERPOLATION": ("bicubic", "bilinear"),
    "TEST.NECK_FEAT": ("before", "after"),
    "TEST.DIST": ("cosine", "euclidean"),
    "TEST.MISS": ("none", "r", "n", "t", "rn", "rt", "nt", "all"),
    "MODEL.SDTPS.SCORE_COMBINE": ("mean", "learned"),
}


# Values of earlier versions still accepted: key -> {old value: current value}.
LEGACY_VALUES = {"MODEL.SDTPS.GATE_NORM": {False: "none", True: "patches"}}


class ConfigError(ValueError):
    """A configuration value or combination that cannot work; the message names the key."""


def default_argument_parser(description: str = "Multi-modal ReID") -> argparse.ArgumentParser:
    """The shared CLI of train_net.py and test_net.py."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Trailing KEY VALUE pairs override the config file, e.g.\n"
        "  SOLVER.MAX_EPOCHS 5 MODEL.SDTPS.ENABLED True",
    )
    parser.add_argument("--config_file", default="", metavar="FILE", help="path to a yaml config")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR"
    )
    parser.add_argument(
        "--init_scale",
        type=float,
        default=None,
        help="initial per-head scale of the SDTPS cosine gate (sets MODEL.SDTPS.GATE_INIT_SCALE; "
        "overrides the file and opts)",
    )
    parser.add_argument(
        "--init_bias",
        type=float,
        default=None,
        help="initial per-head bias of the SDTPS cosine gate (sets MODEL.SDTPS.GATE_INIT_BIAS; "
        "overrides the file and opts)",
    )
    parser.add_argument(
        "opts", default=None, nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs"
    )
    return parser


def _get(cfg: CfgNode, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate_cfg(cfg: CfgNode) -> None:
    """Check enumerated values and cross-key constraints; raise ConfigError naming the key."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(allowed)}")
    batch, instances = cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE
    if instances < 1 or batch < instances or batch % instances != 0:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH ({batch}) must be a positive multiple of "
            f"DATALOADER.NUM_INSTANCE ({instances}) (a batch is P identities x K instances)"
        )
    for feat in cfg.TEST.REPORT_FEATS:
        if feat not in CHOICES["TEST.FEAT"]:
            raise ConfigError(f"TEST.REPORT_FEATS: {feat!r} is not one of {', '.join(CHOICES['TEST.FEAT'])}")
        _check_feat_available(cfg, "TEST.REPORT_FEATS", feat)
    _check_feat_available(cfg, "TEST.FEAT", cfg.TEST.FEAT)
    area = list(cfg.INPUT.RE_AREA)
    if len(area) != 2 or not 0.0 < area[0] <= area[1] <= 1.0:
        raise ConfigError(f"INPUT.RE_AREA must be [min, max] with 0 < min <= max <= 1, got {area}")
    if not 0.0 <= cfg.SOLVER.LR_NOISE < 1.0:
        raise ConfigError(f"SOLVER.LR_NOISE must be in [0, 1), got {cfg.SOLVER.LR_NOISE}")
    if cfg.SOLVER.SCHEDULE_START not in (0, 1):
        raise ConfigError(f"SOLVER.SCHEDULE_START must be 0 or 1, got {cfg.SOLVER.SCHEDULE_START}")
    if cfg.SOLVER.WARMUP_EPOCHS < 0:
        raise ConfigError(f"SOLVER.WARMUP_EPOCHS must be >= 0, got {cfg.SOLVER.WARMUP_EPOCHS}")
    if not 0.0 < cfg.MODEL.SDTPS.SPARSE_RATIO <= 1.0:
        raise ConfigError(f"MODEL.SDTPS.SPARSE_RATIO must be in (0, 1], got {cfg.MODEL.SDTPS.SPARSE_RATIO}")
    if not 0.0 < cfg.MODEL.DGAF.INIT_ALPHA < 1.0:
        raise ConfigError(f"MODEL.DGAF.INIT_ALPHA must be in (0, 1), got {cfg.MODEL.DGAF.INIT_ALPHA}")
    if cfg.MODEL.ATMOE.ENABLED and not cfg.MODEL.HDM.ENABLED:
        raise ConfigError("MODEL.ATMOE.ENABLED needs MODEL.HDM.ENABLED (ATMoE mixes HDM's features)")
    if cfg.DATASETS.VAL_IDS < 0:
        raise ConfigError("DATASETS.VAL_IDS must be >= 0")


def _check_feat_available(cfg: CfgNode, key: str, feat: str) -> None:
    """The retrieval feature ``feat`` (named by config key ``key``) needs a head the model has."""
    m = cfg.MODEL
    if feat == "fused" and not (m.SDTPS.ENABLED or m.DGAF.ENABLED):
        raise ConfigError(f"{key} fused needs MODEL.SDTPS.ENABLED or MODEL.DGAF.ENABLED")
    if feat in ("moe", "ori+moe") and not m.ATMOE.ENABLED:
        raise ConfigError(f"{key} {feat} needs MODEL.ATMOE.ENABLED")
    if feat == "hdm" and not (m.HDM.ENABLED and not m.ATMOE.ENABLED):
        raise ConfigError(f"{key} hdm needs MODEL.HDM.ENABLED without MODEL.ATMOE.ENABLED "
                          "(with ATMoE the head is moe)")


def merge_opts(cfg: CfgNode, opts: Optional[List[str]]) -> None:
    """Merge trailing KEY VALUE pairs with errors that name the offending key."""
    if not opts:
        return
    if len(opts) % 2 != 0:
        raise ConfigError(
            f"config overrides must be KEY VALUE pairs; got an odd number of items: {' '.join(opts)}"
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        if key in LEGACY_VALUES:
            decoded = {"True": True, "False": False}.get(value, value) if isinstance(value, str) else value
            if isinstance(decoded, bool):
                value = LEGACY_VALUES[key][decoded]
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, AssertionError) as exc:
            raise ConfigError(f"unknown config key: {key}") from exc
        except ValueError as exc:
            raise ConfigError(f"bad value for config key {key}: {exc}") from exc


def merge_file(cfg: CfgNode, path: str, _seen=()) -> None:
    """Merge a yaml file, with errors that name the file and the offending key.

    A file may start with ``_BASE_: other.yml`` (relative to the file): the base is merged first.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"{path}: _BASE_ cycle through {', '.join(_seen)}")
    with open(path) as f:
        try:
            content = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid yaml: {exc}") from exc
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    base = content.pop("_BASE_", None)
    for key, mapping in LEGACY_VALUES.items():
        *parents, leaf = key.split(".")
        node = content
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), bool):
            node[leaf] = mapping[node[leaf]]
    if base:
        merge_file(cfg, os.path.join(os.path.dirname(path), base), _seen + (os.path.abspath(path),))
    try:
        cfg.merge_from_other_cfg(CfgNode(content))
    except (KeyError, AssertionError) as exc:
        key = str(exc.args[0]).replace("Non-existent config key: ", "")
        raise ConfigError(f"{path}: unknown config key: {key}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def build_cfg(
    config_file: str = "",
    opts: Optional[List[str]] = None,
    init_scale: Optional[float] = None,
    init_bias: Optional[float] = None,
    freeze: bool = True,
) -> CfgNode:
    """Defaults <- file <- opts <- --init_scale/--init_bias, validated (and frozen)."""
    cfg = get_cfg_defaults()
    if config_file:
        merge_file(cfg, config_file)
    merge_opts(cfg, opts)
    if init_scale is not None:
        cfg.MODEL.SDTPS.GATE_INIT_SCALE = float(init_scale)
    if init_bias is not None:
        cfg.MODEL.SDTPS.GATE_INIT_BIAS = float(init_bias)
    validate_cfg(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def cfg_from_args(args: argparse.Namespace) -> CfgNode:
    return build_cfg(args.config_file, args.opts, args.init_scale, args.init_bias)
