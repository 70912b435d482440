"""Bad input: one test per row of the table in docs/robustness.md (what the user sees).

Every case goes through the command-line entry points (``train_net.main`` / ``test_net.main``)
or the config parser, as a user would meet it.
"""
import json
import os
import re
import shutil

import pytest
import torch

import test_net
import train_net
from config import ConfigError, build_cfg
from data.datasets import BadImageError, DatasetLayoutError
from engine.defaults import RunFolderError


def _out(opts):
    return opts[opts.index("OUTPUT_DIR") + 1]


@pytest.fixture
def copied_root(synthetic_root, tmp_path):
    """A private copy of the tiny synthetic dataset (safe to damage), also laid out as RGBNT201."""
    root = tmp_path / "data"
    shutil.copytree(os.path.join(synthetic_root, "Synthetic"), root / "Synthetic")
    for split in ("train_171", "test"):
        for modality in ("RGB", "NI", "TI"):
            shutil.copytree(root / "Synthetic" / split / modality, root / "RGBNT201" / split / modality)
    return str(root)


def _first_jpg(root, split, modality="RGB", dataset="Synthetic"):
    folder = os.path.join(root, dataset, split, modality)
    return os.path.join(folder, sorted(os.listdir(folder))[0])


# ------------------------------------------------------------------ datasets
def test_missing_dataset_root(tiny_opts, tmp_path):
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(DatasetLayoutError) as info:
        train_net.main(list(tiny_opts) + ["DATASETS.NAMES", "RGBNT201", "DATASETS.ROOT_DIR", missing])
    message = str(info.value)
    assert os.path.join(missing, "RGBNT201") in message  # the path it looked for
    assert "Expected layout" in message and "train_171" in message  # what it expects
    assert "DATASETS.NAMES Synthetic" in message  # how to run without the data


def test_missing_modality_file(tiny_opts, copied_root):
    ni = _first_jpg(copied_root, "train_171", "NI", "RGBNT201")
    os.remove(ni)
    with pytest.raises(DatasetLayoutError) as info:
        train_net.main(list(tiny_opts) + ["DATASETS.NAMES", "RGBNT201", "DATASETS.ROOT_DIR", copied_root])
    assert ni in str(info.value) and "1 expected path(s) missing" in str(info.value)


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])


def test_corrupt_jpg_fails_naming_the_file(tiny_opts, copied_root):
    bad = _first_jpg(copied_root, "train_171", "TI")
    _truncate(bad)
    with pytest.raises(BadImageError) as info:
        train_net.main(list(tiny_opts) + ["DATASETS.ROOT_DIR", copied_root])
    assert bad in str(info.value) and "DATALOADER.SKIP_BAD_IMAGES True" in str(info.value)


def test_corrupt_jpg_skipped_and_counted(tiny_opts, copied_root):
    _truncate(_first_jpg(copied_root, "train_171", "TI"))
    with open(_first_jpg(copied_root, "test", "NI"), "wb") as f:
        f.write(b"not a jpeg at all")
    opts = list(tiny_opts) + ["DATASETS.ROOT_DIR", copied_root, "DATALOADER.SKIP_BAD_IMAGES", "True"]
    summary = train_net.main(opts)
    test = summary["last"]["results"]["test"]
    assert test["num_skipped"] == 1 and test["num_query"] == test["num_gallery"] == 23
    # each epoch samples the bad training triplet at most once; every skip is counted
    assert summary["skipped_train_images"] >= 1
    saved = json.load(open(os.path.join(_out(opts), "summary.json")))
    assert saved["skipped_train_images"] == summary["skipped_train_images"]
    log = open(os.path.join(_out(opts), "log.txt")).read()
    assert "unreadable training image(s) skipped" in log
    assert "[1 unreadable sample(s) skipped]" in log


def test_empty_split(tiny_opts, copied_root):
    for modality in ("RGB", "NI", "TI"):
        folder = os.path.join(copied_root, "RGBNT201", "test", modality)
        shutil.rmtree(folder)
        os.makedirs(folder)
    with pytest.raises(ValueError, match=r"RGBNT201: the query/gallery \(test\) split is empty: "
                                         r"no images found in .*test.RGB"):
        train_net.main(list(tiny_opts) + ["DATASETS.NAMES", "RGBNT201", "DATASETS.ROOT_DIR", copied_root])


# ------------------------------------------------------------------ configuration
def test_config_wrong_type_or_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key: SOLVER.MAX_EPOCH; did you mean "
                                          "SOLVER.MAX_EPOCHS"):
        build_cfg("", ["SOLVER.MAX_EPOCH", "3"])
    with pytest.raises(ConfigError, match="did you mean MODEL.SDTPS.SPARSE_RATIO"):  # wrong node
        build_cfg("", ["SDTPS.SPARSE_RATIO", "0.5"])
    with pytest.raises(ConfigError, match="bad value for config key SOLVER.MAX_EPOCHS"):
        build_cfg("", ["SOLVER.MAX_EPOCHS", "three"])
    with pytest.raises(ConfigError, match="SOLVER.AMP = 'half' is not one of off, fp16, bf16"):
        build_cfg("", ["SOLVER.AMP", "half"])
    unknown = tmp_path / "unknown.yml"
    unknown.write_text("SOLVER:\n  MAX_EPOCH: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yml: unknown config key: .*MAX_EPOCH; did you "
                                          r"mean SOLVER.MAX_EPOCHS"):
        build_cfg(str(unknown))
    wrong = tmp_path / "wrong.yml"
    wrong.write_text("SOLVER:\n  IMS_PER_BATCH: [64]\n")
    with pytest.raises(ConfigError, match=r"wrong.yml: .*IMS_PER_BATCH"):
        build_cfg(str(wrong))


def test_batch_not_divisible_by_instances(tiny_opts):
    with pytest.raises(ConfigError, match=r"SOLVER.IMS_PER_BATCH \(10\) must be a positive multiple "
                                         r"of DATALOADER.NUM_INSTANCE \(4\)"):
        train_net.main(list(tiny_opts) + ["SOLVER.IMS_PER_BATCH", "10", "DATALOADER.NUM_INSTANCE", "4"])


def test_identities_per_batch_not_divisible_by_processes():
    # what build_data meets under torchrun with 2 processes and a batch of 3 identities x 2
    from data.samplers import RandomIdentitySampler

    with pytest.raises(ValueError, match=r"identities per batch \(SOLVER.IMS_PER_BATCH / "
                                         r"DATALOADER.NUM_INSTANCE = 3\) must be divisible by the "
                                         r"number of processes \(2\)"):
        RandomIdentitySampler([0, 0, 1, 1, 2, 2], batch_size=6, num_instances=2, rank=0, world_size=2)


def test_more_instances_than_images_sampled_with_replacement(tiny_opts):
    # 6 triplets per identity, 8 instances asked: drawn with replacement, with a warning
    opts = list(tiny_opts) + ["DATALOADER.NUM_INSTANCE", "8", "SOLVER.IMS_PER_BATCH", "16",
                              "SOLVER.MAX_EPOCHS", "1"]
    summary = train_net.main(opts)
    log = open(os.path.join(_out(opts), "log.txt")).read()
    assert "6 of 6 identities have fewer than 8 images; they are sampled with replacement" in log
    assert summary["last"]["epoch"] == 1 and "epoch 1 iter 1/" in log


# ------------------------------------------------------------------ checkpoints
@pytest.fixture
def other_architecture_checkpoint(tiny_opts):
    """A checkpoint of the tiny baseline (no SDTPS) to load into an SDTPS model."""
    opts = list(tiny_opts) + ["SOLVER.MAX_EPOCHS", "1"]
    train_net.main(opts)
    return opts, os.path.join(_out(opts), "checkpoint_epoch1.pth")


SDTPS = ["MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "mean", "MODEL.BACKBONE_DEPTH", "2"]


def test_checkpoint_of_another_architecture_test_net(other_architecture_checkpoint, tmp_path):
    opts, path = other_architecture_checkpoint
    opts = opts + SDTPS + ["OUTPUT_DIR", str(tmp_path / "eval"), "TEST.WEIGHT", path]
    with pytest.raises(RuntimeError) as info:
        test_net.main(opts)
    message = str(info.value)
    assert path in message and "does not match this model" in message
    assert re.search(r"missing keys \((\d+)\): ", message)
    assert "backbone.vit.blocks.1.attn.qkv.weight" in message  # the listing is sorted
    if int(re.search(r"missing keys \((\d+)\)", message).group(1)) > 20:
        assert re.search(r"\.\.\. and \d+ more", message)
    assert "MODEL.LOAD_STRICT False" in message
    results = test_net.main(opts + ["MODEL.LOAD_STRICT", "False"])  # matching keys only, warned
    assert 0.0 <= results["none"]["mAP"] <= 1.0


def test_checkpoint_of_another_architecture_resume(other_architecture_checkpoint):
    """--resume under another config is refused, naming the differing keys, before anything is
    written; without the run's config.yaml (a folder holding only checkpoints) the weights'
    mismatch is the error, and MODEL.LOAD_STRICT False resumes from the matching weights."""
    opts, path = other_architecture_checkpoint
    opts = opts + SDTPS + ["SOLVER.MAX_EPOCHS", "2"]
    saved = os.path.join(_out(opts), "config.yaml")
    before = open(saved).read()
    with pytest.raises(RunFolderError, match=r"--resume: the config differs from the run's .*"
                                             r"MODEL.BACKBONE_DEPTH: 1 in the run, 2 now.*"
                                             r"MODEL.SELECTION.NAME: 'none' in the run, 'sdtps' now"):
        train_net.main(["--resume"] + opts)
    assert open(saved).read() == before
    os.remove(saved)
    with pytest.raises(RuntimeError, match="does not match this model") as info:
        train_net.main(["--resume"] + opts)
    assert path in str(info.value) and "sdtps." in str(info.value)
    summary = train_net.main(["--resume"] + opts + ["MODEL.LOAD_STRICT", "False"])
    assert summary["last"]["epoch"] == 2  # resumed at epoch 2 with the matching weights
    log = open(os.path.join(_out(opts), "log.txt")).read()
    assert "optimizer state not restored" in log
    state = torch.load(os.path.join(_out(opts), "checkpoint_epoch2.pth"), weights_only=True)
    assert any(k.startswith("sdtps.") for k in state["model"])
