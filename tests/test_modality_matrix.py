"""Query and gallery with different modalities: TEST.QUERY_MISS / TEST.GALLERY_MISS and
``test_net.py ... TEST.MISS matrix`` (7 x 7 table, heat map) on a tiny 1-epoch checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import engine.evaluator as evaluator
import test_net
import train_net
from config import ConfigError, build_cfg
from conftest import ROOT, TINY_OPTS
from engine.evaluator import MISS_TO_MODALITIES, RANK_KEYS


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """(opts, checkpoint) of a 1-epoch tiny run."""
    out = str(tmp_path_factory.mktemp("matrix_run"))
    opts = TINY_OPTS + ["DATASETS.ROOT_DIR", synthetic_root, "OUTPUT_DIR", out, "SOLVER.MAX_EPOCHS", "1"]
    train_net.main(list(opts))
    return opts, os.path.join(out, "checkpoint_epoch1.pth")


@pytest.fixture(scope="module")
def matrix_run(trained, tmp_path_factory):
    """The real command ``test_net.py ... TEST.MISS matrix``: (process, test_results.json, out)."""
    opts, weight = trained
    out = str(tmp_path_factory.mktemp("matrix_eval"))
    args = list(opts) + ["TEST.WEIGHT", weight, "TEST.MISS", "matrix", "OUTPUT_DIR", out]
    proc = subprocess.run([sys.executable, "test_net.py"] + args, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "test_results.json")) as f:
        return proc, json.load(f), out


def test_matrix_diagonal_equals_the_missing_modality_table(trained, matrix_run, tmp_path):
    """The matrix's diagonal is exactly ``TEST.MISS all``'s rows, and an off-diagonal cell
    differs from both its row's and its column's diagonal (catches: the gallery features taken
    from the query pass, a self-match left in when query and gallery features differ, which would
    lift every off-diagonal R1 to 100, rows and columns swapped, a pass per cell that drifts
    from the plain evaluation)."""
    opts, weight = trained
    matrix = matrix_run[1]["matrix"]
    assert set(matrix) == set(MISS_TO_MODALITIES)
    assert all(set(row) == set(MISS_TO_MODALITIES) for row in matrix.values())
    table = test_net.main(list(opts) + ["TEST.WEIGHT", weight, "TEST.MISS", "all",
                                        "OUTPUT_DIR", str(tmp_path)])
    for miss in MISS_TO_MODALITIES:
        for key in RANK_KEYS + ("num_query", "num_gallery", "num_valid_query"):
            assert matrix[miss][miss][key] == table[miss][key], (miss, key)
            assert matrix_run[1]["results"][miss][key] == table[miss][key]  # as TEST.MISS all writes it
    # RGB-only queries against the full gallery: not the full setting, not RGB-only both sides
    cross = matrix["nt"]["none"]["mAP"]
    assert cross != matrix["none"]["none"]["mAP"] and cross != matrix["nt"]["nt"]["mAP"]
    assert not all(matrix[q][g]["R1"] == 1.0 for q in matrix for g in matrix if q != g)


def test_matrix_prints_the_table_and_draws_the_heat_map(matrix_run):
    """The 7 x 7 table is printed with every subset as row and column, and the heat map PNG is
    written to OUTPUT_DIR (catches: a table only in the JSON, a missing or empty plot)."""
    proc, results, out = matrix_run
    log = proc.stdout + proc.stderr
    header = next(line for line in log.splitlines() if "query \\ gallery" in line)
    for label in test_net.PRESENT_LABELS.values():
        assert f" {label} |" in header
    rows = [line for line in log.splitlines() if line.startswith("| ") and " / " in line]
    assert len(rows) == 7 and all(line.count(" / ") == 7 for line in rows)
    m = results["matrix"]["none"]["rt"]
    assert f"{m['mAP'] * 100:.2f} / {m['R1'] * 100:.2f}" in rows[0]
    with Image.open(os.path.join(out, test_net.MATRIX_PLOT)) as image:
        assert image.width > 400 and image.height > 300
        colours = np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 10  # coloured cells, not a blank canvas


def test_matrix_runs_one_feature_pass_per_subset(trained, tmp_path, monkeypatch):
    """Seven passes over the test set, not 49 (catches: features recomputed for every cell)."""
    opts, weight = trained
    calls = []
    real = evaluator.inference_on_dataset
    monkeypatch.setattr(evaluator, "inference_on_dataset",
                        lambda *a, **k: calls.append(a[4] if len(a) > 4 else k.get("miss")) or real(*a, **k))
    test_net.main(list(opts) + ["TEST.WEIGHT", weight, "TEST.MISS", "matrix", "OUTPUT_DIR", str(tmp_path)])
    assert sorted(calls) == sorted(MISS_TO_MODALITIES)


def test_query_and_gallery_miss_equal_the_matrix_cell(trained, matrix_run, tmp_path):
    """TEST.QUERY_MISS nt with the full gallery gives the matrix's cell (RGB queries, all
    modalities in the gallery), and the exported gallery rows carry the gallery pass's features
    (catches: QUERY_MISS / GALLERY_MISS ignored, applied to both sides, or swapped)."""
    opts, weight = trained
    export = str(tmp_path / "cross.npz")
    results = test_net.main(list(opts) + ["TEST.WEIGHT", weight, "TEST.QUERY_MISS", "nt",
                                          "TEST.EXPORT", export, "OUTPUT_DIR", str(tmp_path)])
    cell = matrix_run[1]["matrix"]["nt"]["none"]
    for key in RANK_KEYS:
        assert results["nt"][key] == cell[key], key
    plain = str(tmp_path / "plain.npz")
    test_net.main(list(opts) + ["TEST.WEIGHT", weight, "TEST.EXPORT", plain, "OUTPUT_DIR", str(tmp_path)])
    a, b = np.load(export), np.load(plain)
    np.testing.assert_array_equal(a["gallery_feats"], b["gallery_feats"])
    assert not np.allclose(a["query_feats"], b["query_feats"])


def test_query_miss_with_a_table_setting_is_refused(tiny_opts):
    """TEST.MISS all / matrix with QUERY_MISS set fails naming the keys (catches: a silently
    ignored QUERY_MISS)."""
    with pytest.raises(ConfigError, match="TEST.QUERY_MISS"):
        build_cfg("", list(tiny_opts) + ["TEST.MISS", "matrix", "TEST.QUERY_MISS", "r"])
