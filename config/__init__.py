"""Configuration: defaults, command-line parsing and validation (detectron2's habits).

``build_cfg`` clones the defaults, imports ``IMPORTS`` (as the file and the overrides set it),
lets every registered part declare its own keys (:func:`add_part_config`), merges the config
file, merges trailing ``KEY VALUE`` pairs (then the command-line shortcuts of :data:`KEY_FLAGS`),
records ``IMPORTS`` files as absolute paths, validates, and freezes. The names of registered parts (datasets, selection and fusion modules, retrieval
features, evaluators) are checked against their registries.
"""
import argparse
import difflib
import importlib
import importlib.util
import os
import sys
from typing import Dict, List, Optional

import yaml
from yacs.config import CfgNode

from config.defaults import get_cfg_defaults

# Allowed values of the enumerated keys: a wrong value fails early, naming the key. Keys naming
# a registered part are checked against the registry instead (:func:`registered_choices`).
CHOICES = {
    "SOLVER.OPTIMIZER": ("Adam", "AdamW", "SGD"),
    "SOLVER.AMP": ("off", "fp16", "bf16"),
    "SOLVER.PARAM_GROUPS": ("demo", "ndim"),
    "TEST.AMP": ("off", "fp16", "bf16"),
    "TEST.FEAT_NORM": ("once", "per_part"),
    "MODEL.POS_EMBED_RESIZE": ("bilinear", "bicubic"),
    "INPUT.TRAIN_INTERPOLATION": ("bicubic", "bilinear"),
    "TEST.NECK_FEAT": ("before", "after"),
    "TEST.DIST": ("cosine", "euclidean"),
    "TEST.MISS": ("none", "r", "n", "t", "rn", "rt", "nt", "all", "matrix"),
    "TEST.QUERY_MISS": ("", "none", "r", "n", "t", "rn", "rt", "nt"),
    "TEST.GALLERY_MISS": ("", "none", "r", "n", "t", "rn", "rt", "nt"),
    "MODEL.COMPILE": ("", "default", "reduce-overhead", "max-autotune"),
    "INPUT.AUG_DEVICE": ("loader", "model"),
    "DATALOADER.CACHE": ("none", "memory"),
}

# Values of earlier versions still accepted: key -> {old value: current value}.
LEGACY_VALUES = {"MODEL.SDTPS.GATE_NORM": {False: "none", True: "patches"}}

# Keys of earlier versions: key -> what replaced it.
REMOVED_KEYS = {
    "MODEL.SDTPS.ENABLED": "MODEL.SELECTION.NAME sdtps (with MODEL.FUSION.NAME mean, or dgaf)",
    "MODEL.DGAF.ENABLED": "MODEL.FUSION.NAME dgaf",
    "MODEL.SDTPS.LOSS_WEIGHT": "MODEL.FUSION.LOSS_WEIGHT",
}

# Command-line shortcuts of train_net.py: flag -> (config key, help). They override the file and
# the KEY VALUE pairs.
KEY_FLAGS = {
    "--init_scale": ("MODEL.SDTPS.GATE_INIT_SCALE", "initial per-head scale of the SDTPS cosine gate"),
    "--init_bias": ("MODEL.SDTPS.GATE_INIT_BIAS", "initial per-head bias of the SDTPS cosine gate"),
}


class ConfigError(ValueError):
    """A configuration value or combination that cannot work; the message names the key."""


class ConfigArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose leftover words are the config overrides (``args.opts``, KEY VALUE
    pairs), so that flags may come before, between or after them."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("usage", "%(prog)s [options] [KEY VALUE ...]")
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, rest = self.parse_known_args(args, namespace)
        flags = [word for word in rest if word.startswith("--")]
        if flags:
            self.error(f"unrecognized option(s): {' '.join(flags)} (see --help)")
        namespace.opts = rest
        return namespace


def default_argument_parser(description: str = "Multi-modal ReID", training: bool = True,
                            epilog: str = "") -> ConfigArgumentParser:
    """The shared CLI: ``--config_file``, ``--debug`` and KEY VALUE overrides; for training also
    ``--resume``, ``--overwrite`` and the :data:`KEY_FLAGS` shortcuts."""
    parser = ConfigArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(epilog + "\n\n" if epilog else "") +
        "KEY VALUE pairs override the config file (flags may come before or after them), e.g.\n"
        "  SOLVER.MAX_EPOCHS 5 MODEL.SELECTION.NAME sdtps MODEL.FUSION.NAME mean",
    )
    parser.add_argument("--config_file", default="", metavar="FILE", help="path to a yaml config")
    if training:
        parser.add_argument(
            "--resume", action="store_true", help="continue the run in OUTPUT_DIR from its last checkpoint"
        )
        parser.add_argument(
            "--overwrite", action="store_true",
            help="OUTPUT_DIR holds an earlier run: move it aside (to OUTPUT_DIR.old-<time>) and start anew")
        for flag, (key, text) in KEY_FLAGS.items():  # initial values: no use to an evaluation
            parser.add_argument(flag, type=float, default=None,
                                help=f"{text} (sets {key}; overrides the file and opts)")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback here (it is always in the log)")
    return parser


def flag_opts(args: argparse.Namespace) -> List[str]:
    """The KEY VALUE pairs of the :data:`KEY_FLAGS` given on the command line."""
    opts = []
    for flag, (key, _) in KEY_FLAGS.items():
        value = getattr(args, flag.lstrip("-"), None)
        if value is not None:
            opts += [key, repr(float(value))]
    return opts


def _get(cfg: CfgNode, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def registered_choices():
    """{key: registry} of the keys naming registered parts (imports the built-in parts)."""
    from data.datasets import DATASET_REGISTRY
    from engine.evaluator import EVALUATOR_REGISTRY
    from modeling.heads import RETRIEVAL_FEATURES
    from modeling.losses import LOSS_REGISTRY
    from modeling.model import BACKBONE_REGISTRY, FUSION_REGISTRY, SELECTION_REGISTRY

    return {"DATASETS.NAMES": DATASET_REGISTRY, "MODEL.BACKBONE_TYPE": BACKBONE_REGISTRY,
            "MODEL.SELECTION.NAME": SELECTION_REGISTRY, "MODEL.FUSION.NAME": FUSION_REGISTRY,
            "TEST.FEAT": RETRIEVAL_FEATURES, "TEST.REPORT_FEATS": RETRIEVAL_FEATURES,
            "MODEL.LOSSES": LOSS_REGISTRY, "TEST.EVALUATORS": EVALUATOR_REGISTRY}


def _check_registered(key: str, value, registry) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    allowed = ("none",) if key in ("MODEL.SELECTION.NAME", "MODEL.FUSION.NAME") else ()
    for v in values:
        if key == "DATASETS.NAMES":  # datasets are looked up case-insensitively
            v = {n.lower(): n for n in registry}.get(str(v).lower(), v)
        if v not in allowed and v not in registry:
            names = ", ".join(allowed + registry.names())
            close = difflib.get_close_matches(str(v), list(allowed + registry.names()), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key} = {v!r} is not one of {names}{hint} (register your own and "
                              "list its module under IMPORTS)")


def validate_cfg(cfg: CfgNode) -> None:
    """Check enumerated values, registered names and cross-key constraints; raise ConfigError
    naming the key."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not one of {', '.join(allowed)}")
    registries = registered_choices()
    for key, registry in registries.items():
        _check_registered(key, _get(cfg, key), registry)
    batch, instances = cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE
    if instances < 1 or batch < instances or batch % instances != 0:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH ({batch}) must be a positive multiple of "
            f"DATALOADER.NUM_INSTANCE ({instances}) (a batch is P identities x K instances)"
        )
    if cfg.TEST.MISS in ("all", "matrix") and (cfg.TEST.QUERY_MISS or cfg.TEST.GALLERY_MISS):
        raise ConfigError(f"TEST.MISS {cfg.TEST.MISS} is a table of settings: leave TEST.QUERY_MISS "
                          "and TEST.GALLERY_MISS empty (they pick one setting)")
    if "reid" not in cfg.TEST.EVALUATORS:
        raise ConfigError("TEST.EVALUATORS must include reid: checkpoints are selected and runs "
                          "reported by its mAP")
    m = cfg.MODEL
    if not m.LOSSES:
        raise ConfigError("MODEL.LOSSES is empty: name at least one training objective, e.g. [reid]")
    if m.SELECTION.NAME != "none" and m.FUSION.NAME == "none":
        raise ConfigError(f"MODEL.SELECTION.NAME {m.SELECTION.NAME} needs a fusion to pool the kept "
                          f"patches: set MODEL.FUSION.NAME ({', '.join(registries['MODEL.FUSION.NAME'])})")
    if m.ATMOE.ENABLED and not m.HDM.ENABLED:
        raise ConfigError("MODEL.ATMOE.ENABLED needs MODEL.HDM.ENABLED (ATMoE mixes HDM's features)")
    for key in ("MODEL.SELECTION.NAME", "MODEL.FUSION.NAME"):
        name = _get(cfg, key)
        check = getattr(registries[key].get(name), "check_config", None) if name != "none" else None
        if check is not None:
            try:
                check(cfg)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    from modeling.heads import feature_parts
    from modeling.model import head_names

    heads = head_names(cfg)
    for key, feats in (("TEST.FEAT", [cfg.TEST.FEAT]), ("TEST.REPORT_FEATS", cfg.TEST.REPORT_FEATS)):
        for feat in feats:
            try:
                feature_parts(feat, heads)
            except KeyError as exc:
                raise ConfigError(f"{key} {feat} {exc.args[0]}") from None
    area = list(cfg.INPUT.RE_AREA)
    if len(area) != 2 or not 0.0 < area[0] <= area[1] <= 1.0:
        raise ConfigError(f"INPUT.RE_AREA must be [min, max] with 0 < min <= max <= 1, got {area}")
    if not 0.0 <= cfg.SOLVER.LR_NOISE < 1.0:
        raise ConfigError(f"SOLVER.LR_NOISE must be in [0, 1), got {cfg.SOLVER.LR_NOISE}")
    if cfg.SOLVER.SCHEDULE_START not in (0, 1):
        raise ConfigError(f"SOLVER.SCHEDULE_START must be 0 or 1, got {cfg.SOLVER.SCHEDULE_START}")
    if cfg.SOLVER.WARMUP_EPOCHS < 0:
        raise ConfigError(f"SOLVER.WARMUP_EPOCHS must be >= 0, got {cfg.SOLVER.WARMUP_EPOCHS}")
    if cfg.DATASETS.VAL_IDS < 0:
        raise ConfigError("DATASETS.VAL_IDS must be >= 0")
    if cfg.SOLVER.MAX_EPOCHS < 1:
        raise ConfigError(f"SOLVER.MAX_EPOCHS must be at least 1, got {cfg.SOLVER.MAX_EPOCHS} (to "
                          "evaluate a checkpoint without training, run test_net.py TEST.WEIGHT <file>)")


def flatten_config(tree, prefix: str = "") -> Dict[str, object]:
    """{"A.B.C": value} of a nested config (a CfgNode or the dict of its yaml dump)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _suggest_key(key: str) -> str:
    """"; did you mean A or B?" with the nearest valid keys, or "" (a key of the wrong case, a
    typo, a key under the wrong node)."""
    keys = list(flatten_config(get_cfg_defaults()))
    by_upper = {k.upper(): k for k in keys}
    close = difflib.get_close_matches(key.upper(), list(by_upper), n=2, cutoff=0.75)
    leaf = key.rsplit(".", 1)[-1].upper()
    close += [k for k in by_upper if k.rsplit(".", 1)[-1] == leaf and k not in close][:2]
    if not close:
        return ""
    return "; did you mean " + " or ".join(by_upper[k] for k in close) + "?"


def merge_opts(cfg: CfgNode, opts: Optional[List[str]]) -> None:
    """Merge trailing KEY VALUE pairs with errors that name the offending key."""
    if not opts:
        return
    if len(opts) % 2 != 0:
        raise ConfigError(
            f"config overrides must be KEY VALUE pairs; got an odd number of items: {' '.join(opts)}"
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        if key in REMOVED_KEYS:
            raise ConfigError(f"{key} was replaced by {REMOVED_KEYS[key]}")
        if key in LEGACY_VALUES:
            decoded = {"True": True, "False": False}.get(value, value) if isinstance(value, str) else value
            if isinstance(decoded, bool):
                value = LEGACY_VALUES[key][decoded]
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, AssertionError) as exc:
            raise ConfigError(f"unknown config key: {key}{_suggest_key(key)}") from exc
        except ValueError as exc:
            raise ConfigError(f"bad value for config key {key}: {exc}") from exc


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key given twice in one mapping (yaml would silently keep the
    last one, dropping the first block)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key in lines:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: the key {key} is given "
                                  f"twice in one block (first on line {lines[key]}); yaml would "
                                  "keep only the second and drop the first: merge them")
            if key is not None:
                lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def merge_file(cfg: CfgNode, path: str, _seen=()) -> None:
    """Merge a yaml file, with errors that name the file and the offending key.

    A file may start with ``_BASE_: other.yml`` (relative to the file): the base is merged first.
    """
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if n.endswith((".yml", ".yaml")))[:4]
        raise ConfigError(f"config file {path} is a folder: name a yaml file"
                          f"{' (e.g. ' + os.path.join(path, found[0]) + ')' if found else ''}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"{path}: _BASE_ cycle through {', '.join(_seen)}")
    with open(path) as f:
        try:
            content = yaml.load(f, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid yaml: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"{path}, {exc}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    base = content.pop("_BASE_", None)
    for key, replacement in REMOVED_KEYS.items():
        node = content
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ConfigError(f"{path}: {key} was replaced by {replacement}")
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
        raise ConfigError(f"{path}: unknown config key: {key}{_suggest_key(key)}") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def import_user_modules(names, config_file: str = "") -> List[str]:
    """Import each of ``IMPORTS``: a dotted module name, or a .py file (relative to the working
    directory, else to the folder of ``config_file``). A file is imported once per process.
    Returns ``names`` with each file as its absolute path."""
    resolved = []
    for name in names:
        if not str(name).endswith(".py"):
            resolved.append(name)
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ConfigError(f"IMPORTS: cannot import module {name!r}: {exc}") from exc
            continue
        path = name if os.path.isfile(name) else os.path.join(os.path.dirname(config_file), name)
        if not os.path.isfile(path):
            raise ConfigError(f"IMPORTS: no such file {name!r} (looked in the working directory"
                              f"{' and next to ' + config_file if config_file else ''})")
        path = os.path.abspath(path)
        resolved.append(path)
        module_name = "reid_imports." + os.path.splitext(os.path.basename(path))[0]
        loaded = sys.modules.get(module_name)
        if loaded is not None and os.path.abspath(getattr(loaded, "__file__", "")) == path:
            continue
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[module_name]
            raise
    return resolved


def _file_imports(path: str) -> List[str]:
    """``IMPORTS`` as the config file sets it (itself or through its ``_BASE_`` chain), read
    before merging; [] when the file cannot be read (merge_file reports that)."""
    try:
        with open(path) as f:
            content = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except (OSError, yaml.YAMLError, ConfigError):
        return []
    if not isinstance(content, dict):
        return []
    if "IMPORTS" in content:
        return list(content["IMPORTS"] or [])
    base = content.get("_BASE_")
    return _file_imports(os.path.join(os.path.dirname(path), base)) if base else []


def declared_imports(config_file: str, opts: Optional[List[str]]) -> List[str]:
    """``IMPORTS`` as the merged config will hold it: the last ``IMPORTS`` override, else the
    file's."""
    pairs = list(zip((opts or [])[0::2], (opts or [])[1::2]))
    values = [value for key, value in pairs if key == "IMPORTS"]
    if values:
        probe = get_cfg_defaults()
        merge_opts(probe, ["IMPORTS", values[-1]])
        return list(probe.IMPORTS)
    return _file_imports(config_file) if config_file else []


# Top-level packages of the project: their registered parts declare their keys in every config.
PROJECT_PACKAGES = ("config", "data", "engine", "modeling", "solver", "utils")


def _declares_keys_for(obj, imports: List[str]) -> bool:
    """Whether a registered part's keys belong to a config whose IMPORTS resolved to ``imports``
    (absolute .py paths or dotted module names): the project's own parts, and those of the
    config's IMPORTS; not the parts other configs of the same process imported."""
    module = getattr(obj, "__module__", "") or ""
    if module.split(".")[0] in PROJECT_PACKAGES:
        return True
    if module.startswith("reid_imports."):
        path = getattr(sys.modules.get(module), "__file__", None)
        return path is not None and os.path.abspath(path) in imports
    return any(module == name or module.startswith(name + ".") for name in imports)


def add_part_config(cfg: CfgNode, imports: Optional[List[str]] = None) -> None:
    """Let every registered part of the project or of ``imports`` (the config's IMPORTS, as
    :func:`import_user_modules` resolves them) with an ``add_config(cfg)`` hook (static or class
    method) declare its own keys with their defaults, detectron2's ``add_*_config``: then a
    config file or ``KEY VALUE`` sets them, with yacs' type check, and config.yaml saves them. A
    config's keys do not depend on what else the process imported. A hook may only add keys;
    changing an existing one fails naming the part."""
    imports = list(imports or [])
    before = flatten_config(cfg)
    seen = set()
    for registry in registered_choices().values():
        if id(registry) in seen:
            continue
        seen.add(id(registry))
        for name, obj in list(registry.items()):
            hook = getattr(obj, "add_config", None)
            if not callable(hook) or not _declares_keys_for(obj, imports):
                continue
            hook(cfg)
            after = flatten_config(cfg)
            changed = [k for k, v in before.items() if after.get(k, object()) != v]
            if changed:
                raise ConfigError(f"{registry.describe(name)}: add_config changed the existing key(s) "
                                  f"{', '.join(changed)}; a part may only declare new keys")
            before = after


def build_cfg(config_file: str = "", opts: Optional[List[str]] = None, freeze: bool = True) -> CfgNode:
    """Defaults + the keys of the parts ``IMPORTS`` registers <- file <- opts, validated (and
    frozen); ``IMPORTS`` files as absolute paths."""
    cfg = get_cfg_defaults()
    add_part_config(cfg, import_user_modules(declared_imports(config_file, opts), config_file))
    if config_file:
        merge_file(cfg, config_file)
    merge_opts(cfg, opts)
    cfg.IMPORTS = import_user_modules(cfg.IMPORTS, config_file)
    validate_cfg(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def cfg_from_args(args: argparse.Namespace) -> CfgNode:
    return build_cfg(args.config_file, list(args.opts or []) + flag_opts(args))
