"""Using a trained model outside the training loop: engine/predictor.py, tools/embed.py and
tools/search.py against test_net.py on the same checkpoint and images (a tiny 1-epoch run)."""
import csv
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import test_net
import train_net
from config import build_cfg
from conftest import ROOT, TINY_OPTS
from engine.predictor import Predictor
from tools import embed, search
from utils.visualization import CORRECT, WRONG


def _cli(script, args, timeout=180):
    return subprocess.run([sys.executable, os.path.join("tools", script)] + list(args), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _assert_one_clear_error(proc, *needles):
    """Exit 1, one ``error:`` line naming the problem, no traceback."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    """(opts, checkpoint, test folder) of a 1-epoch tiny run (camera embedding on: SIE)."""
    out = str(tmp_path_factory.mktemp("predictor_run"))
    opts = TINY_OPTS + ["DATASETS.ROOT_DIR", synthetic_root, "OUTPUT_DIR", out, "SOLVER.MAX_EPOCHS", "1"]
    train_net.main(list(opts))
    return opts, os.path.join(out, "checkpoint_epoch1.pth"), os.path.join(synthetic_root, "Synthetic", "test")


def _export(opts, weight, path, *extra):
    results = test_net.main(list(opts) + ["TEST.WEIGHT", weight, "TEST.EXPORT", str(path)] + list(extra))
    return results, np.load(path)


def _split(paths):
    rows = [p.split("|") for p in paths]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


@pytest.mark.parametrize("extra", [(), ("TEST.FLIP", "True", "TEST.FEAT_NORM", "per_part",
                                        "TEST.NECK_FEAT", "after")])
def test_predictor_features_equal_test_net_export(trained, tmp_path, extra):
    """Paths, PIL images and [0, 1] tensors give test_net.py's exported features, in batches of 5
    (catches: other resizing or normalisation than the test loader, the camera ids ignored, a
    batch boundary reordering rows, TEST.FLIP / NECK_FEAT not applied, a model sized other than
    the checkpoint)."""
    opts, weight, _ = trained
    _, data = _export(opts, weight, tmp_path / "e.npz", *extra)
    rgb, ni, ti = _split(data["query_paths"])
    predictor = Predictor(build_cfg("", list(opts) + list(extra)), weight, batch_size=5)
    feats = predictor.embed(rgb, ni, ti, cam_ids=data["query_camids"])
    assert feats.shape == data["query_feats"].shape
    np.testing.assert_allclose(feats.numpy(), data["query_feats"], rtol=0, atol=1e-5)
    # the cameras matter (SIE): all-zero cameras give other features
    assert not np.allclose(predictor.embed(rgb, ni, ti).numpy(), data["query_feats"], atol=1e-4)
    # PIL images and tensors in [0, 1] at INPUT.SIZE_TEST (here the images' own size) agree
    pil = [[Image.open(p).convert("RGB") for p in mod[:4]] for mod in (rgb, ni, ti)]
    tensors = [torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in mod])
               for mod in pil]
    cams = data["query_camids"][:4]
    for inputs in (pil, [t.float() / 255 for t in tensors], tensors):
        np.testing.assert_allclose(predictor.embed(*inputs, cam_ids=cams).numpy(),
                                   data["query_feats"][:4], rtol=0, atol=1e-5)


@pytest.mark.parametrize("miss", ["n", "rt"])
def test_missing_modalities_are_zero_filled_as_test_miss(trained, tmp_path, miss):
    """None for a modality gives test_net.py TEST.MISS's features, and so does the config's own
    TEST.MISS (catches: a missing modality filled with zeros before normalisation, i.e. with
    -mean/std, or with the mean image, instead of zeros after it)."""
    opts, weight, _ = trained
    _, data = _export(opts, weight, tmp_path / "m.npz", "TEST.MISS", miss)
    rgb, ni, ti = _split(data["query_paths"])
    given = [None if letter in miss else mod for letter, mod in zip("rnt", (rgb, ni, ti))]
    feats = Predictor(build_cfg("", list(opts)), weight).embed(*given, cam_ids=data["query_camids"])
    np.testing.assert_allclose(feats.numpy(), data["query_feats"], rtol=0, atol=1e-5)
    from_config = Predictor(build_cfg("", list(opts) + ["TEST.MISS", miss]), weight)
    np.testing.assert_allclose(from_config.embed(rgb, ni, ti, cam_ids=data["query_camids"]).numpy(),
                               data["query_feats"], rtol=0, atol=1e-5)


def test_predictor_bad_input_is_named(trained):
    """Catches: a wrong-size tensor silently resized or broadcast, all modalities missing giving
    a feature of nothing, a camera beyond the model's embedding table indexing out of range."""
    opts, weight, _ = trained
    predictor = Predictor(build_cfg("", list(opts)), weight)
    with pytest.raises(ValueError, match=r"rgb: a tensor must be \(B, 3, 64, 32\)"):
        predictor.embed(torch.zeros(2, 3, 32, 32), None, None)
    with pytest.raises(ValueError, match="every modality is missing"):
        predictor.embed(None, None, None)
    with pytest.raises(ValueError, match="different numbers of images"):
        predictor.embed(torch.zeros(2, 3, 64, 32), torch.zeros(3, 3, 64, 32), None)
    with pytest.raises(ValueError, match=r"cam_ids must lie in 0..3"):
        predictor.embed(torch.zeros(1, 3, 64, 32), None, None, cam_ids=[4])


def _printed_metrics(stdout):
    match = re.search(r"mAP [\d.]+  R1 [\d.]+  R5 [\d.]+  R10 [\d.]+  mINP [\d.]+", stdout)
    assert match, stdout
    return match.group(0)


def _expected(m):
    return (f"mAP {m['mAP'] * 100:.2f}  R1 {m['R1'] * 100:.2f}  R5 {m['R5'] * 100:.2f}  "
            f"R10 {m['R10'] * 100:.2f}  mINP {m['mINP'] * 100:.2f}")


def test_embed_and_search_reproduce_test_net(trained, tmp_path):
    """embed.py on the synthetic test folder + search.py of the file against itself print
    test_net.py's mAP / CMC / mINP, plain and re-ranked, and the page frames every result green
    or red by identity (catches: ids/cameras not parsed from the names, so that the model gets
    camera 0; another junk rule or distance than the evaluation's; the query itself returned
    first; green and red swapped in the page)."""
    opts, weight, test_dir = trained
    plain, data = _export(opts, weight, tmp_path / "e.npz")
    reranked, _ = _export(opts, weight, tmp_path / "r.npz", "TEST.RERANK.ENABLED", "True")
    feats = tmp_path / "feats.npz"
    proc = _cli("embed.py", list(opts) + ["TEST.WEIGHT", weight, "--input", test_dir,
                                          "--output", str(feats)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(feats)
    np.testing.assert_allclose(out["feats"], data["query_feats"], rtol=0, atol=1e-5)
    assert out["paths"].shape == (len(data["query_feats"]), 3)
    np.testing.assert_array_equal(out["pids"], data["query_pids"])
    np.testing.assert_array_equal(out["camids"], data["query_camids"])

    page = tmp_path / "page" / "ranks.html"
    proc = _cli("search.py", ["--gallery", str(feats), "--query", str(feats), "--top", "5",
                              "--html", str(page), "--html_queries", "6", "--show", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _printed_metrics(proc.stdout) == _expected(plain["none"])
    first = proc.stdout.split("query 0: ")[1].splitlines()
    query_rgb = first[0].split(" (pid")[0]
    assert all(query_rgb not in line for line in first[1:6])  # its own triplet is junk

    ranked = search.main(["--gallery", str(feats), "--query", str(feats), "--rerank", "--show", "0"])
    for key in ("mAP", "R1", "R5", "R10", "mINP"):
        assert ranked["metrics"][key] == pytest.approx(reranked["none"][key], abs=1e-9)

    text = page.read_text()
    assert "src=" not in text and "file:" not in text  # self-contained
    rows = text.split('<div class="row">')[1:]
    assert len(rows) == 6
    green, red = "border-color:rgb({},{},{})".format(*CORRECT), "border-color:rgb({},{},{})".format(*WRONG)
    labels = {i: int(p) for i, p in enumerate(out["pids"])}
    for qi, row in enumerate(rows):
        cells = row.split('<div class="cell"')[1:]
        assert len(cells) == 6  # the query and its top 5
        for cell in cells:
            assert cell.count('class="im i') == 3  # RGB | NI | TI, each an embedded image
        results = re.findall(r"pid (\d+)</div>", row)
        assert len(results) == 5
        for cell, pid in zip(cells[1:], results):
            assert (green in cell) == (int(pid) == labels[qi]) and (red in cell) != (green in cell)


def test_embed_csv_with_a_missing_modality(trained, tmp_path):
    """A CSV row with an empty ti cell is embedded with TI zero-filled, the other rows in full, ids
    and cameras from the CSV (catches: rows of different missing patterns mixed in one batch, the
    empty cell read as a path, the id/cam columns dropped)."""
    opts, weight, _ = trained
    _, data = _export(opts, weight, tmp_path / "e.npz")
    rgb, ni, ti = _split(data["query_paths"][:5])
    table = tmp_path / "list.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["RGB", "NI", "TI", "id", "cam"])
        for i in range(5):
            writer.writerow([rgb[i], ni[i], "" if i in (1, 3) else ti[i], data["query_pids"][i],
                             data["query_camids"][i]])
    embed.main(list(opts) + ["TEST.WEIGHT", weight, "--input", str(table),
                             "--output", str(tmp_path / "c.npz")])
    out = np.load(tmp_path / "c.npz")
    predictor = Predictor(build_cfg("", list(opts)), weight)
    cams = data["query_camids"]
    np.testing.assert_allclose(out["feats"][[0, 2, 4]], data["query_feats"][[0, 2, 4]], rtol=0, atol=1e-5)
    missing = predictor.embed([rgb[1], rgb[3]], [ni[1], ni[3]], None, cam_ids=cams[[1, 3]])
    np.testing.assert_allclose(out["feats"][[1, 3]], missing.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out["pids"], data["query_pids"][:5])
    assert list(out["paths"][1]) == [rgb[1], ni[1], ""]


def test_bad_input_is_one_clear_line(trained, tmp_path):
    """Non-matching modality folders, a CSV without a ti column and an npz without features each
    end with one line naming the file and the fix (catches: a KeyError traceback, or an unmatched
    name silently dropped so that fewer triplets are embedded)."""
    opts, weight, test_dir = trained
    folder = tmp_path / "set"
    shutil.copytree(test_dir, folder)
    victim = sorted(os.listdir(folder / "TI"))[2]
    os.rename(folder / "TI" / victim, folder / "TI" / ("x" + victim))
    proc = _cli("embed.py", list(opts) + ["TEST.WEIGHT", weight, "--input", str(folder),
                                          "--output", str(tmp_path / "f.npz")])
    _assert_one_clear_error(proc, "modality folders do not match", f"RGB/{victim}", f"TI/x{victim}")

    table = tmp_path / "bad.csv"
    table.write_text("rgb,ni,id\na.jpg,b.jpg,1\n")
    proc = _cli("embed.py", list(opts) + ["TEST.WEIGHT", weight, "--input", str(table),
                                          "--output", str(tmp_path / "f.npz")])
    _assert_one_clear_error(proc, str(table), "no column 'ti'", "rgb, ni, ti")

    empty = tmp_path / "empty.npz"
    np.savez(empty, pids=np.zeros(3))
    proc = _cli("search.py", ["--gallery", str(empty), "--query", str(empty)])
    _assert_one_clear_error(proc, f"--gallery {empty} holds no features", "tools/embed.py")
