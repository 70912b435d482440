"""Every key a shipped config sets is read by the run it configures.

For each run config (configs/**/*.yml; not configs/ablations/ or configs/studies/, the grids
and studies of tools/ablate.py),
train_net.main trains one epoch (one step) and evaluates, on the tiny synthetic dataset, with
a config that records which keys are read (config/reads.py). A key the file sets (in the file or
its _BASE_ chain) that nothing reads fails, naming the key and the config: a value that never
reaches its part ("MODEL.DGAF.TAU not passed to DGAF", "SOLVER.WARMUP_FACTOR not given to the
scheduler"). Keys only a tool reads are listed in config.reads.TOOL_KEYS.

To run on CPU in seconds the test overrides only the size-type keys of SHRINK (and
DATASETS.VAL_IDS, to 2 where a config holds identities out): every overridden key is still read.
"""
import os

import pytest
import yaml

import engine.defaults
import train_net
from config import build_cfg, flatten_config
from config.reads import TOOL_KEYS, record_reads
from tests.conftest import RUN_CONFIGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = RUN_CONFIGS

# The keys this test overrides (size, device, place and length; nothing that picks a module,
# a loss, a schedule shape or an evaluation option).
SHRINK = {
    "MODEL.DEVICE": "cpu",
    "MODEL.BACKBONE": "vit_tiny_patch16_224",
    "MODEL.BACKBONE_DEPTH": "1",
    "MODEL.PRETRAIN_PATH": "",  # no weights file here: random init
    "MODEL.PROJ_DIM": "32",
    "INPUT.SIZE_TRAIN": "[64, 32]",
    "INPUT.SIZE_TEST": "[64, 32]",
    "DATASETS.NAMES": "Synthetic",
    "DATASETS.SYNTHETIC.NUM_TRAIN_IDS": "6",
    "DATASETS.SYNTHETIC.NUM_TEST_IDS": "4",
    "DATASETS.SYNTHETIC.SAMPLES_PER_ID": "6",
    "DATASETS.SYNTHETIC.HEIGHT": "64",
    "DATASETS.SYNTHETIC.WIDTH": "32",
    "DATALOADER.NUM_WORKERS": "0",
    "DATALOADER.NUM_INSTANCE": "4",
    "SOLVER.IMS_PER_BATCH": "16",  # 4 identities x 4: one training step per epoch
    "SOLVER.MAX_EPOCHS": "1",
    "TEST.IMS_PER_BATCH": "32",
}
# + DATASETS.ROOT_DIR (the shared tiny dataset) and OUTPUT_DIR (a temporary folder).

# The options of a module are read only when the config uses the module; a config that turns a
# module off may still set (or inherit through _BASE_) its options. options -> "module used".
MODULE_OPTIONS = {
    "MODEL.HDM.": lambda cfg: cfg.MODEL.HDM.ENABLED,
    "MODEL.ATMOE.": lambda cfg: cfg.MODEL.ATMOE.ENABLED,
    "MODEL.SDTPS.": lambda cfg: cfg.MODEL.SELECTION.NAME == "sdtps",
    "MODEL.DGAF.": lambda cfg: cfg.MODEL.FUSION.NAME == "dgaf",
    "MODEL.FUSION.LOSS_WEIGHT": lambda cfg: cfg.MODEL.FUSION.NAME != "none",
}


def file_keys(path: str) -> set:
    """Dotted keys a config file sets, its _BASE_ chain included."""
    with open(path) as f:
        content = yaml.safe_load(f) or {}
    base = content.pop("_BASE_", None)
    keys = set(flatten_config(content))
    if base:
        keys |= file_keys(os.path.join(os.path.dirname(path), base))
    return keys


def unused_module_option(cfg, key: str) -> bool:
    """``key`` is an option of a module that ``cfg`` does not use (MODULE_OPTIONS)."""
    return any(key.startswith(prefix) and not used(cfg) for prefix, used in MODULE_OPTIONS.items())


@pytest.mark.parametrize("config", CONFIGS)
def test_every_key_a_config_sets_is_read(config, synthetic_root, tmp_path, monkeypatch):
    build = engine.defaults.cfg_from_args

    def recording(args):
        cfg, recording.reads = record_reads(build(args))
        return cfg

    monkeypatch.setattr(engine.defaults, "cfg_from_args", recording)
    opts = [word for pair in SHRINK.items() for word in pair]
    set_keys = file_keys(os.path.join(ROOT, config))
    if "DATASETS.VAL_IDS" in set_keys:
        opts += ["DATASETS.VAL_IDS", "2"]
    opts += ["DATASETS.ROOT_DIR", synthetic_root, "OUTPUT_DIR", str(tmp_path / "out")]
    summary = train_net.main(["--config_file", os.path.join(ROOT, config), *opts])
    assert summary["last"]["results"]["test"]["num_query"] > 0  # it trained and evaluated
    cfg = build_cfg(os.path.join(ROOT, config))
    unread = sorted(k for k in set_keys - recording.reads
                    if k not in TOOL_KEYS and not unused_module_option(cfg, k))
    assert not unread, f"{config} sets keys that its run never reads: {', '.join(unread)}"


def test_module_options_are_checked_where_the_module_is_used():
    """Each MODULE_OPTIONS entry has a shipped config that uses the module and sets its options,
    so that the exemption never covers every config that sets them."""
    for prefix, used in MODULE_OPTIONS.items():
        covered = [c for c in CONFIGS if used(build_cfg(os.path.join(ROOT, c)))
                   and any(k.startswith(prefix) for k in file_keys(os.path.join(ROOT, c)))]
        assert covered, f"no shipped config uses and sets {prefix}"


@pytest.mark.parametrize("key", sorted(TOOL_KEYS))
def test_tool_keys_are_read_by_their_tool(key):
    """Each key of TOOL_KEYS appears in the source of the tool said to read it (a key whose tool
    stopped reading it would otherwise stay excused)."""
    with open(os.path.join(ROOT, TOOL_KEYS[key])) as f:
        source = f.read()
    assert key in source, f"{TOOL_KEYS[key]} does not read {key}"


def test_the_recorder_counts_reads_and_nothing_else():
    """Reads through attributes, items, get and items() are noted; clone, dump, printing and
    pickling are not (else every key would look read and the test above would pass vacuously).
    The copy keeps recording into the same set and stays frozen."""
    import pickle

    cfg, reads = record_reads(build_cfg("", ["MODEL.DEVICE", "cpu"]))
    copied = cfg.clone()
    cfg.dump(), str(cfg), repr(cfg), pickle.dumps(cfg), copied.dump()
    assert reads == set() and copied.is_frozen()
    cfg.MODEL.DEVICE, cfg["SOLVER"]["SEED"], cfg.TEST.get("FLIP"), copied.TEST.RERANK.K1
    dict(cfg.DATASETS.SYNTHETIC.items())
    assert reads == {"MODEL.DEVICE", "SOLVER.SEED", "TEST.FLIP", "TEST.RERANK.K1"} | {
        f"DATASETS.SYNTHETIC.{k}" for k in cfg.DATASETS.SYNTHETIC}
