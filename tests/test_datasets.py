"""Tests of the dataset loaders (data/datasets.py) on tiny trees with the real file naming."""
import os

import numpy as np
import pytest
from PIL import Image

from data.datasets import (MSVR310, RGBNT100, RGBNT201, BadImageError, DatasetLayoutError,
                           ReIDDataset, Sample, build_dataset, read_triplet)


def _jpg(path, size=(16, 32), value=None, seed=0):
    """Write a small jpg of ``size`` (W, H): flat ``value`` or random noise."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if value is None:
        arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    else:
        arr = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)


# --- tree writers ------------------------------------------------------------------------------
RGBNT201_TRAIN = ["000030_cam1_0_00.jpg", "000010_cam2_0_00.jpg", "000010_cam4_1_03.jpg",
                  "000020_cam3_0_01.jpg"]
RGBNT201_TEST = ["000171_cam1_0_00.jpg", "000171_cam2_0_00.jpg", "000200_cam4_0_00.jpg"]


def make_rgbnt201(root, train=RGBNT201_TRAIN, test=RGBNT201_TEST):
    for split, names in (("train_171", train), ("test", test)):
        for modality in ("RGB", "NI", "TI"):
            os.makedirs(os.path.join(root, "RGBNT201", split, modality), exist_ok=True)
            for name in names:
                _jpg(os.path.join(root, "RGBNT201", split, modality, name))
    return os.path.join(root, "RGBNT201")


def make_rgbnt100(root):
    base = os.path.join(root, "RGBNT100", "rgbir")
    files = {
        "bounding_box_train": ["0007_c003_00000001.jpg", "0002_c001_00000002.jpg",
                               "0002_c008_00000003.jpg", "-1_c002_00000004.jpg"],
        "query": ["0101_c002_00000001.jpg"],
        "bounding_box_test": ["0101_c005_00000002.jpg", "0102_c002_00000003.jpg"],
    }
    for split, names in files.items():
        os.makedirs(os.path.join(base, split), exist_ok=True)
        for name in names:
            # 768x128: RGB | NI | TI thirds with distinct flat values.
            arr = np.zeros((128, 768, 3), dtype=np.uint8)
            arr[:, :256] = 40
            arr[:, 256:512] = 130
            arr[:, 512:] = 220
            Image.fromarray(arr).save(os.path.join(base, split, name), quality=95)
    return base


def make_msvr310(root):
    base = os.path.join(root, "MSVR310")
    files = {
        "bounding_box_train": {"0005": ["0005_s012_v3_000.jpg", "0005_s012_v7_001.jpg"],
                               "0002": ["0002_s004_v0_000.jpg"]},
        "query3": {"0100": ["0100_s020_v1_000.jpg"]},
        "bounding_box_test": {"0100": ["0100_s021_v2_000.jpg", "0100_s020_v4_001.jpg"],
                              "0101": ["0101_s022_v6_000.jpg"]},
    }
    for split, vids in files.items():
        for vid, names in vids.items():
            for modality in ("vis", "ni", "th"):
                for name in names:
                    _jpg(os.path.join(base, split, vid, modality, name))
    return base


# --- RGBNT201 ----------------------------------------------------------------------------------
def test_rgbnt201_parsing(tmp_path):
    make_rgbnt201(str(tmp_path))
    ds = RGBNT201(str(tmp_path))
    assert ds.name == "RGBNT201" and not ds.uses_scenes
    # Sorted listing: 000010 (cam2, cam4), 000020, 000030; train pids relabelled in id order.
    assert [(s.pid, s.camid) for s in ds.train] == [(0, 1), (0, 3), (1, 2), (2, 0)]
    assert ds.num_train_pids == 3
    assert ds.query == ds.gallery
    assert [(s.pid, s.camid) for s in ds.query] == [(171, 0), (171, 1), (200, 3)]
    assert ds.num_cams == 4
    s = ds.train[0]
    assert [p.split(os.sep)[-2:] for p in s.paths] == [["RGB", "000010_cam2_0_00.jpg"],
                                                     ["NI", "000010_cam2_0_00.jpg"],
                                                     ["TI", "000010_cam2_0_00.jpg"]]
    assert s.sceneid == -1 and s.mask_path == ""
    images = read_triplet(s)
    assert len(images) == 3 and all(im.mode == "RGB" and im.size == (16, 32) for im in images)
    assert build_dataset("RGBNT201", str(tmp_path)).train == ds.train


def test_rgbnt201_missing_ni_file_is_named(tmp_path):
    base = make_rgbnt201(str(tmp_path))
    missing = os.path.join(base, "test", "NI", "000200_cam4_0_00.jpg")
    os.remove(missing)
    with pytest.raises(DatasetLayoutError) as info:
        RGBNT201(str(tmp_path))
    assert missing in str(info.value)
    assert "1 expected path(s) missing" in str(info.value)


def test_many_missing_files_list_first_five(tmp_path):
    base = make_rgbnt201(str(tmp_path))
    for name in RGBNT201_TRAIN + RGBNT201_TEST:
        split = "train_171" if name in RGBNT201_TRAIN else "test"
        os.remove(os.path.join(base, split, "TI", name))
    with pytest.raises(DatasetLayoutError) as info:
        RGBNT201(str(tmp_path))
    message = str(info.value)
    assert "7 expected path(s) missing" in message and "... and 2 more" in message
    assert sum(line.strip().endswith(".jpg") for line in message.splitlines()) == 5


def test_missing_root_explains_layout_and_synthetic(tmp_path):
    with pytest.raises(DatasetLayoutError) as info:
        build_dataset("RGBNT201", str(tmp_path / "nowhere"))
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert os.path.join(str(tmp_path / "nowhere"), "RGBNT201") in message
    assert "RGBNT201/train_171/{RGB,NI,TI}/*.jpg" in message and "RGBNT201/test/" in message
    assert "DATASETS.NAMES Synthetic" in message
    assert "configs/Synthetic/quickstart.yml" in message
    for name, fragment in (("RGBNT100", "RGBNT100/rgbir/"), ("MSVR310", "query3")):
        with pytest.raises(DatasetLayoutError, match="Synthetic") as info:
            build_dataset(name, str(tmp_path))
        assert fragment in str(info.value)


def test_missing_modality_folder(tmp_path):
    base = make_rgbnt201(str(tmp_path))
    ti = os.path.join(base, "test", "TI")
    for name in os.listdir(ti):
        os.remove(os.path.join(ti, name))
    os.rmdir(ti)
    with pytest.raises(DatasetLayoutError) as info:
        RGBNT201(str(tmp_path))
    assert ti in str(info.value)


def test_empty_split_raises_value_error(tmp_path):
    make_rgbnt201(str(tmp_path), test=[])
    with pytest.raises(ValueError, match="test") as info:
        RGBNT201(str(tmp_path))
    assert not isinstance(info.value, DatasetLayoutError)
    assert os.path.join("RGBNT201", "test", "RGB") in str(info.value)


def test_unparsable_rgbnt201_name(tmp_path):
    make_rgbnt201(str(tmp_path), train=["000001_c1_0_00.jpg"])
    with pytest.raises(ValueError, match="000001_c1_0_00.jpg"):
        RGBNT201(str(tmp_path))


# --- RGBNT100 ----------------------------------------------------------------------------------
def test_rgbnt100_parsing_and_side_by_side_split(tmp_path):
    base = make_rgbnt100(str(tmp_path))
    ds = RGBNT100(str(tmp_path))
    # pid -1 (junk) is skipped; sorted names: 0002_c001, 0002_c008, 0007_c003.
    assert [(s.pid, s.camid) for s in ds.train] == [(0, 0), (0, 7), (1, 2)]
    assert ds.num_train_pids == 2
    assert [(s.pid, s.camid) for s in ds.query] == [(101, 1)]
    assert [(s.pid, s.camid) for s in ds.gallery] == [(101, 4), (102, 1)]
    assert all(len(s.paths) == 1 for s in ds.train + ds.query + ds.gallery)
    assert ds.query[0].paths == (os.path.join(base, "query", "0101_c002_00000001.jpg"),)
    assert ds.num_cams == 8
    rgb, ni, ti = read_triplet(ds.query[0])
    assert rgb.size == ni.size == ti.size == (256, 128)
    assert all(im.mode == "RGB" for im in (rgb, ni, ti))
    means = [np.asarray(im, dtype=np.float64).mean() for im in (rgb, ni, ti)]
    assert abs(means[0] - 40) < 3 and abs(means[1] - 130) < 3 and abs(means[2] - 220) < 3


def test_rgbnt100_regex_forms():
    assert RGBNT100.parse_name("0012_c3_0001.jpg") == (12, 2)
    assert RGBNT100.parse_name("0600_c008_00012345.jpg") == (600, 7)
    assert RGBNT100.parse_name("-1_c1_0.jpg") == (-1, 0)
    with pytest.raises(ValueError, match="abc.jpg"):
        RGBNT100.parse_name("abc.jpg")


def test_rgbnt100_empty_query(tmp_path):
    base = make_rgbnt100(str(tmp_path))
    for name in os.listdir(os.path.join(base, "query")):
        os.remove(os.path.join(base, "query", name))
    with pytest.raises(ValueError, match="query") as info:
        RGBNT100(str(tmp_path))
    assert os.path.join(base, "query") in str(info.value)


# --- MSVR310 -----------------------------------------------------------------------------------
def test_msvr310_parsing(tmp_path):
    base = make_msvr310(str(tmp_path))
    ds = MSVR310(str(tmp_path))
    assert ds.uses_scenes and ds.name == "MSVR310"
    # vid folders sorted: 0002 then 0005; train ids relabelled 2 -> 0, 5 -> 1.
    assert [(s.pid, s.sceneid, s.camid) for s in ds.train] == [(0, 4, 0), (1, 12, 3), (1, 12, 7)]
    assert ds.num_train_pids == 2
    assert [(s.pid, s.sceneid, s.camid) for s in ds.query] == [(100, 20, 1)]
    assert [(s.pid, s.sceneid, s.camid) for s in ds.gallery] == [
        (100, 20, 4), (100, 21, 2), (101, 22, 6)]
    assert ds.query[0].paths == tuple(
        os.path.join(base, "query3", "0100", m, "0100_s020_v1_000.jpg") for m in ("vis", "ni", "th"))
    assert ds.num_cams == 8
    assert MSVR310.parse_name("0310_s123_v5_042.jpg") == (310, 123, 5)
    table = ds.statistics_table()
    assert "scenes" in table.splitlines()[1]


def test_msvr310_missing_thermal_file(tmp_path):
    base = make_msvr310(str(tmp_path))
    missing = os.path.join(base, "bounding_box_test", "0101", "th", "0101_s022_v6_000.jpg")
    os.remove(missing)
    with pytest.raises(DatasetLayoutError) as info:
        MSVR310(str(tmp_path))
    assert missing in str(info.value)


# --- image reading -----------------------------------------------------------------------------
def test_truncated_jpg_raises_bad_image_naming_it(tmp_path):
    base = make_rgbnt201(str(tmp_path))
    path = os.path.join(base, "train_171", "TI", "000020_cam3_0_01.jpg")
    _jpg(path, size=(64, 128), seed=3)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    ds = RGBNT201(str(tmp_path))  # loading checks presence only
    sample = [s for s in ds.train if s.paths[2] == path][0]
    with pytest.raises(BadImageError) as info:
        read_triplet(sample)
    assert path in str(info.value)
    assert isinstance(info.value, OSError)


def test_garbage_and_missing_image_files(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    good = tmp_path / "good.jpg"
    _jpg(str(good))
    sample = Sample(paths=(str(good), str(good), str(garbage)), pid=0, camid=0)
    with pytest.raises(BadImageError, match="garbage.jpg"):
        read_triplet(sample)
    gone = str(tmp_path / "gone.jpg")
    with pytest.raises(FileNotFoundError) as info:
        read_triplet(Sample(paths=(str(good), gone, str(good)), pid=0, camid=0))
    assert gone in str(info.value)
    assert not isinstance(info.value, BadImageError)


# --- factory and statistics --------------------------------------------------------------------
def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ValueError) as info:
        build_dataset("Market1501", str(tmp_path))
    for name in ("RGBNT201", "RGBNT100", "MSVR310", "Synthetic"):
        assert name in str(info.value)


def test_statistics_table(tmp_path):
    make_rgbnt201(str(tmp_path))
    table = RGBNT201(str(tmp_path)).statistics_table()
    lines = table.splitlines()
    assert "RGBNT201" in lines[0]
    assert [c.strip() for c in lines[1].split("|")] == ["split", "ids", "triplets", "cameras"]
    rows = {line.split("|")[0].strip(): [int(c) for c in line.split("|")[1:]]
            for line in lines[3:]}
    assert rows == {"train": [3, 4, 4], "query": [2, 3, 3], "gallery": [2, 3, 3]}


def test_base_class_from_lists():
    train = [Sample(paths=("a",), pid=0, camid=1), Sample(paths=("b",), pid=1, camid=0)]
    query = [Sample(paths=("c",), pid=7, camid=5)]
    ds = ReIDDataset(train, query, query, name="custom")
    assert ds.num_train_pids == 2 and ds.num_cams == 6 and ds.name == "custom"
    assert "custom" in ds.statistics_table()
