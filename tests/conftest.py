"""Shared fixtures: a tiny synthetic dataset (generated once per session) and tiny configs."""
import glob
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from config import build_cfg  # noqa: E402

# A model and dataset small enough for a CPU training step in well under a second.
TINY_OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.BACKBONE", "vit_tiny_patch16_224",
    "MODEL.BACKBONE_DEPTH", "1",
    "MODEL.PROJ_DIM", "0",
    "MODEL.DROP_PATH", "0.1",
    "INPUT.SIZE_TRAIN", "[64, 32]",
    "INPUT.SIZE_TEST", "[64, 32]",
    "INPUT.PADDING", "2",
    "DATASETS.NAMES", "Synthetic",
    "DATASETS.SYNTHETIC.NUM_TRAIN_IDS", "6",
    "DATASETS.SYNTHETIC.NUM_TEST_IDS", "4",
    "DATASETS.SYNTHETIC.SAMPLES_PER_ID", "6",
    "DATASETS.SYNTHETIC.HEIGHT", "64",
    "DATASETS.SYNTHETIC.WIDTH", "32",
    "DATALOADER.NUM_WORKERS", "0",
    "DATALOADER.NUM_INSTANCE", "2",
    "SOLVER.IMS_PER_BATCH", "8",
    "SOLVER.MAX_EPOCHS", "2",
    "SOLVER.WARMUP_EPOCHS", "1",
    "SOLVER.BASE_LR", "0.001",
    "SOLVER.BACKBONE_LR", "0.0005",
    "SOLVER.EVAL_PERIOD", "1",
    "SOLVER.LOG_PERIOD", "1",
    "SOLVER.DETERMINISTIC", "True",
    "TEST.IMS_PER_BATCH", "16",
]


# The run configs under configs/ (relative paths): configs/ablations/ and configs/studies/ hold
# the grids and studies of tools/ablate.py, which are not configs.
RUN_CONFIGS = sorted(os.path.relpath(p, ROOT)
                     for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yml"), recursive=True)
                     if os.path.relpath(p, ROOT).split(os.sep)[1] not in ("ablations", "studies"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """Folder holding a tiny generated ``Synthetic`` dataset (shared by all tests)."""
    root = tmp_path_factory.mktemp("datasets")
    from data.datasets import build_dataset

    build_dataset("Synthetic", str(root), dict(num_train_ids=6, num_test_ids=4, samples_per_id=6,
                                                height=64, width=32, seed=0))
    return str(root)


@pytest.fixture
def tiny_opts(synthetic_root, tmp_path):
    """KEY VALUE list for a tiny CPU run writing to a fresh output folder."""
    return TINY_OPTS + ["DATASETS.ROOT_DIR", synthetic_root, "OUTPUT_DIR", str(tmp_path / "out")]


@pytest.fixture
def tiny_cfg(tiny_opts):
    def make(*extra):
        return build_cfg("", list(tiny_opts) + list(extra))

    return make
