"""Tests of the synthetic tri-modal generator (data/synthetic.py) and its Synthetic dataset."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from data.datasets import RGBNT201, Synthetic, build_dataset, read_triplet
from data.synthetic import META_NAME, generate_synthetic, is_complete, read_meta

TINY = dict(num_train_ids=4, num_test_ids=3, samples_per_id=6, height=64, width=32, seed=0)
NAME_RE = re.compile(r"^(\d{6})_cam([1-4])_\d+_\d{2}\.jpg$")


def _all_files(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, folder)] = handle.read()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    dataset = Synthetic(str(root), **TINY)
    return str(root), dataset


def _gray(path):
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64)


def test_same_seed_identical_bytes_and_other_seed_differs(tmp_path):
    generate_synthetic(str(tmp_path / "a"), **TINY)
    generate_synthetic(str(tmp_path / "b"), **TINY)
    files_a = _all_files(str(tmp_path / "a"))
    files_b = _all_files(str(tmp_path / "b"))
    assert files_a.keys() == files_b.keys()
    assert files_a == files_b
    generate_synthetic(str(tmp_path / "c"), **dict(TINY, seed=1))
    files_c = _all_files(str(tmp_path / "c"))
    images = [k for k in files_a if k.endswith(".jpg")]
    assert images and sum(files_a[k] != files_c.get(k) for k in images) > len(images) // 2


def test_layout_names_and_counts(tiny):
    root, ds = tiny
    syn_dir = os.path.join(root, "Synthetic")
    for split in ("train_171", "test"):
        for modality in ("RGB", "NI", "TI"):
            names = sorted(os.listdir(os.path.join(syn_dir, split, modality)))
            assert names and all(NAME_RE.match(n) for n in names), names[:3]
        assert os.path.isdir(os.path.join(syn_dir, "masks", split))
    meta = read_meta(syn_dir)
    assert meta["args"]["num_train_ids"] == 4 and meta["args"]["num_cams"] == 4

    assert ds.name == "Synthetic" and not ds.uses_scenes
    assert len(ds.train) == 4 * 6 and len(ds.query) == 3 * 6 and ds.query == ds.gallery
    assert ds.num_train_pids == 4
    assert sorted({s.pid for s in ds.train}) == [0, 1, 2, 3]
    assert sorted({s.pid for s in ds.query}) == [5, 6, 7]  # original ids, disjoint from 1..4
    assert all(0 <= s.camid <= 3 and s.sceneid == -1 for s in ds.train + ds.query)
    assert ds.num_cams <= 4
    for pid in {s.pid for s in ds.query}:  # every test identity is seen by >= 2 cameras
        assert len({s.camid for s in ds.query if s.pid == pid}) >= 2
    # The camera in the name is the 1-based camera of the sample.
    for s in ds.query:
        match = NAME_RE.match(os.path.basename(s.paths[0]))
        assert int(match.group(1)) == s.pid and int(match.group(2)) - 1 == s.camid

    # The plain RGBNT201 loader reads the same folder the same way (without masks).
    os.symlink(syn_dir, os.path.join(root, "RGBNT201"))
    try:
        real = RGBNT201(root)
    finally:
        os.remove(os.path.join(root, "RGBNT201"))
    assert [(s.pid, s.camid) for s in real.train] == [(s.pid, s.camid) for s in ds.train]
    assert [(s.pid, s.camid) for s in real.query] == [(s.pid, s.camid) for s in ds.query]
    assert all(s.mask_path == "" for s in real.train)


def test_masks(tiny):
    _, ds = tiny
    shares = []
    for s in ds.train + ds.query:
        assert os.path.isfile(s.mask_path)
        mask = np.asarray(Image.open(s.mask_path))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        rgb, ni, ti = read_triplet(s)
        assert rgb.size == ni.size == ti.size == (32, 64)
        assert mask.shape == (64, 32)
        shares.append((mask > 0).mean())
    assert 0.15 <= float(np.mean(shares)) <= 0.6
    assert min(shares) > 0.02


def test_modalities_pixel_aligned(tiny):
    _, ds = tiny
    true_gap, shifted_gap = [], []
    for s in ds.train + ds.query:
        mask = np.asarray(Image.open(s.mask_path)) > 0
        ti = _gray(s.paths[2])
        true_gap.append(ti[mask].mean() - ti[~mask].mean())
        shifted = np.roll(mask, 10, axis=1)
        shifted_gap.append(ti[shifted].mean() - ti[~shifted].mean())
    true_gap = np.array(true_gap)
    # The person is warmer than the cool background in thermal, exactly where the mask says.
    assert (true_gap > 0.05 * 255).mean() > 0.9
    assert true_gap.mean() > 2 * np.mean(shifted_gap)


def test_night_frames_dark_in_rgb_clear_in_thermal(tiny):
    root, ds = tiny
    frames = read_meta(os.path.join(root, "Synthetic"))["frames"]
    night = {f["file"] for f in frames if f["night"]}
    assert 0 < len(night) < len(frames)
    rgb = {"night": [], "day": []}
    ti = {"night": [], "day": []}
    for s in ds.train + ds.query:
        key = "night" if os.path.basename(s.paths[0]) in night else "day"
        rgb[key].append(_gray(s.paths[0]).mean())
        ti[key].append(_gray(s.paths[2]).mean())
    assert np.mean(rgb["night"]) < 0.5 * np.mean(rgb["day"])
    assert 0.75 < np.mean(ti["night"]) / np.mean(ti["day"]) < 1.33


def test_regenerates_only_when_needed(tmp_path):
    """The completion marker is rewritten by each generation only: a second load with the same
    arguments leaves it alone (catches regenerating every run), other arguments or a missing
    marker regenerate from scratch (catches a stale set reused)."""
    root = str(tmp_path)
    syn_dir = os.path.join(root, "Synthetic")
    Synthetic(root, **TINY)
    marker = os.path.join(syn_dir, META_NAME)
    stamp = os.stat(marker).st_mtime_ns
    Synthetic(root, **TINY)
    assert os.stat(marker).st_mtime_ns == stamp
    assert is_complete(syn_dir, **TINY)

    # Different arguments: regenerated from scratch, nothing of the old set left.
    stray = os.path.join(syn_dir, "train_171", "RGB", "999999_cam1_0_00.jpg")
    Image.new("RGB", (32, 64)).save(stray)
    changed = Synthetic(root, **dict(TINY, num_train_ids=3))
    assert not os.path.exists(stray)
    assert changed.num_train_pids == 3 and len(changed.train) == 18
    assert json.load(open(marker))["args"]["num_train_ids"] == 3

    # Marker missing (an interrupted generation): regenerated.
    os.remove(marker)
    Synthetic(root, **dict(TINY, num_train_ids=3))
    assert is_complete(syn_dir, **dict(TINY, num_train_ids=3))


def test_build_dataset_synthetic_with_config_keys(tmp_path):
    ds = build_dataset("Synthetic", str(tmp_path), {
        "NUM_TRAIN_IDS": 2, "NUM_TEST_IDS": 2, "SAMPLES_PER_ID": 3, "HEIGHT": 32, "WIDTH": 16,
        "SEED": 5})
    assert isinstance(ds, Synthetic) and len(ds.train) == 6 and len(ds.query) == 6
    assert ds.train[0].mask_path
    with pytest.raises(ValueError, match="num_train_ids"):
        build_dataset("Synthetic", str(tmp_path), {"bogus": 1})


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_synthetic(str(tmp_path / "x"), samples_per_id=1)
    with pytest.raises(ValueError):
        generate_synthetic(str(tmp_path / "x"), num_cams=1)
    with pytest.raises(TypeError):
        generate_synthetic(str(tmp_path / "x"), height=64.0)
