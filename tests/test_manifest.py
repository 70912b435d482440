"""The run manifest (utils/manifest.py): code state, config hash, data fingerprint, and that a
training run and an evaluation write it (summary.json, test_results.json, the logs' first lines)."""
import json
import os
import shutil
import subprocess

import pytest

import test_net
import train_net
from data.build import build_data
from utils.manifest import UNKNOWN, code_state, config_hash, data_fingerprint


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                   check=True, capture_output=True)


def test_code_state_sees_commit_dirty_tree_and_its_content(tmp_path):
    """Catches: the dirty flag always False, a diff hash blind to what changed (two different
    edits with one hash) or to new untracked files, and a crash outside git."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-q", "-m", "one")
    clean = code_state(str(repo))
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert clean == {"commit": head, "dirty": False, "diff_hash": None}

    (repo / "a.py").write_text("x = 2\n")
    first = code_state(str(repo))
    (repo / "a.py").write_text("x = 3\n")
    second = code_state(str(repo))
    assert first["dirty"] is True and second["dirty"] is True
    assert first["diff_hash"].startswith("sha256:") and first["diff_hash"] != second["diff_hash"]
    assert first["commit"] == head

    (repo / "a.py").write_text("x = 1\n")  # back to the commit, plus a new untracked module
    (repo / "new_module.py").write_text("y = 1\n")
    untracked = code_state(str(repo))
    assert untracked["dirty"] is True and untracked["diff_hash"] not in (None, first["diff_hash"])
    (repo / "new_module.py").write_text("y = 2\n")
    assert code_state(str(repo))["diff_hash"] != untracked["diff_hash"]

    outside = tmp_path / "plain"
    outside.mkdir()
    assert code_state(str(outside)) == {"commit": UNKNOWN, "dirty": UNKNOWN, "diff_hash": UNKNOWN}


def test_config_hash_ignores_where_not_what(tiny_cfg, tmp_path):
    """Catches: a hash over OUTPUT_DIR / DATASETS.ROOT_DIR (every run would differ) and a hash
    blind to a value (the seed)."""
    base = config_hash(tiny_cfg())
    assert config_hash(tiny_cfg("OUTPUT_DIR", str(tmp_path / "elsewhere"),
                                "DATASETS.ROOT_DIR", str(tmp_path / "moved"))) == base
    assert config_hash(tiny_cfg("SOLVER.SEED", "7")) != base


def test_data_fingerprint_follows_names_and_sizes_not_the_root(tiny_cfg, synthetic_root, tmp_path):
    """Catches: absolute paths in the hash (moving the data would change it), sizes left out
    (a re-encoded image unnoticed), and a change of one split leaking into the others."""
    original = data_fingerprint(build_data(tiny_cfg()), synthetic_root)
    moved_root = str(tmp_path / "moved")
    shutil.copytree(synthetic_root, moved_root)
    moved = data_fingerprint(build_data(tiny_cfg("DATASETS.ROOT_DIR", moved_root)), moved_root)
    assert moved == original
    train = original["splits"]["train"]
    assert (train["ids"], train["triplets"], train["cameras"]) == (6, 36, 4)

    rgb = os.path.join(moved_root, "Synthetic", "train_171", "RGB")
    with open(os.path.join(rgb, sorted(os.listdir(rgb))[0]), "ab") as f:
        f.write(b"\0")  # one more byte: the same name, another size
    grown = data_fingerprint(build_data(tiny_cfg("DATASETS.ROOT_DIR", moved_root)), moved_root)
    assert grown["splits"]["train"]["files_hash"] != train["files_hash"]
    assert grown["splits"]["query"] == original["splits"]["query"]


def test_train_split_is_fingerprinted_as_trained_on(tiny_cfg, synthetic_root):
    """Catches: the training split fingerprinted before the DATASETS.VAL_IDS carve-out (the
    validation identities counted as trained on)."""
    whole = data_fingerprint(build_data(tiny_cfg()), synthetic_root)["splits"]
    split = data_fingerprint(build_data(tiny_cfg("DATASETS.VAL_IDS", "2")), synthetic_root)["splits"]
    assert (split["train"]["ids"], split["val"]["ids"]) == (4, 2)
    assert split["train"]["triplets"] + split["val"]["triplets"] == whole["train"]["triplets"]
    assert split["train"]["files_hash"] != whole["train"]["files_hash"]
    assert "val" not in whole


@pytest.fixture(scope="module")
def trained_and_tested(synthetic_root, tmp_path_factory):
    """A 1-epoch training run and an evaluation of its checkpoint (in this process)."""
    from conftest import TINY_OPTS

    out = str(tmp_path_factory.mktemp("manifest_run") / "run")
    opts = TINY_OPTS + ["DATASETS.ROOT_DIR", synthetic_root, "OUTPUT_DIR", out,
                        "SOLVER.MAX_EPOCHS", "1"]
    train_net.main(opts)
    test_net.main(opts + ["TEST.WEIGHT", os.path.join(out, "checkpoint_epoch1.pth")])
    return out


def test_training_run_writes_manifest_history_and_log_lines(trained_and_tested, synthetic_root):
    """Catches: summary.json without the manifest or the per-epoch history, a manifest field
    missing, data fingerprinted from another root, and a log that does not start with it."""
    with open(os.path.join(trained_and_tested, "summary.json")) as f:
        summary = json.load(f)
    manifest = summary["manifest"]
    assert set(manifest) >= {"code", "libraries", "device", "world_size", "deterministic",
                             "num_workers", "config_hash", "config", "data"}
    assert set(manifest["libraries"]) == {"python", "torch", "torchvision", "timm", "numpy"}
    assert {"type", "names", "count", "cuda", "cudnn"} <= set(manifest["device"])
    assert manifest["device"]["type"] == "cpu" and manifest["world_size"] == 1
    assert manifest["deterministic"] is True and manifest["num_workers"] == 0
    assert manifest["config"]["SOLVER"]["SEED"] == 1111
    assert set(manifest["code"]) == {"commit", "dirty", "diff_hash"}
    assert manifest["data"]["splits"]["train"]["triplets"] == 36
    assert [h["epoch"] for h in summary["history"]] == [1]
    assert summary["history"][0]["results"]["test"]["mAP"] == summary["last"]["results"]["test"]["mAP"]

    with open(os.path.join(trained_and_tested, "log.txt")) as f:
        log = f.read()
    first = log.splitlines()[:6]
    for needle in ("code: commit", "libraries: python", "device: cpu", "run: world size 1",
                   manifest["config_hash"]):
        assert any(needle in line for line in first), (needle, first)
    assert "data fingerprint (Synthetic): train 6 ids, 36 triplets, 4 cameras" in log


def test_evaluation_writes_the_same_manifest(trained_and_tested):
    """Catches: test_results.json without the manifest, or an evaluation whose data fingerprint
    differs from the training run's on the same data."""
    with open(os.path.join(trained_and_tested, "summary.json")) as f:
        trained = json.load(f)["manifest"]
    with open(os.path.join(trained_and_tested, "test_results.json")) as f:
        tested = json.load(f)["manifest"]
    assert tested["data"] == trained["data"]
    assert tested["libraries"] == trained["libraries"] and tested["code"] == trained["code"]
    with open(os.path.join(trained_and_tested, "test_log.txt")) as f:
        head = f.read().splitlines()[:6]
    assert any("code: commit" in line for line in head)
    assert any("run: world size 1" in line for line in head)
