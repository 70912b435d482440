"""Extension points: registries, IMPORTS, hooks alone, and the worked examples of
docs/extending.md (docs/examples/*.py) trained through the real CLI without editing the library."""
import csv
import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from config import ConfigError, build_cfg
from conftest import ROOT, TINY_OPTS
from engine.hooks import BestCheckpointer, EvalHook, PeriodicCheckpointer
from utils.registry import Registry, UnknownNameError


# ------------------------------------------------------------------------------ registry
def test_registry_lookup_suggestion_and_duplicates():
    """Unknown names list the choices with a suggestion (and are a ValueError, so the CLI prints
    one line); a second object under a taken name is refused (catches a plugin silently replacing
    a built-in)."""
    reg = Registry("fusion")

    @reg.register("mean")
    class Mean:
        pass

    reg.register("max", obj=max)
    assert reg.get("mean") is Mean and reg.names() == ("mean", "max") and "max" in reg
    with pytest.raises(UnknownNameError, match=r"unknown fusion 'maen'; did you mean 'mean'\? "
                                               r"\(registered: mean, max\)") as info:
        reg.get("maen")
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)
    with pytest.raises(KeyError, match="'mean' is already registered"):
        reg.register("mean", obj=min)
    reg.register("mean", obj=Mean)  # the same object again (a module imported twice) is fine


def test_imports_errors_name_the_entry(tmp_path):
    with pytest.raises(ConfigError, match=r"IMPORTS: no such file 'nope.py'"):
        build_cfg("", ["IMPORTS", "['nope.py']"])
    with pytest.raises(ConfigError, match=r"IMPORTS: cannot import module 'no_such_module'"):
        build_cfg("", ["IMPORTS", "['no_such_module']"])
    # a name is unknown until the module that registers it is imported
    with pytest.raises(ConfigError, match="MODEL.FUSION.NAME = 'max2' is not one of"):
        build_cfg("", ["MODEL.FUSION.NAME", "max2"])
    # a file is found next to the config that lists it
    (tmp_path / "cfg.yml").write_text("IMPORTS: [my_fusion.py]\nMODEL:\n  FUSION:\n    NAME: max2\n")
    (tmp_path / "my_fusion.py").write_text(
        "from modeling.registry import FUSION_REGISTRY\n"
        "from modeling.fusion import MeanFusion\n"
        "FUSION_REGISTRY.register('max2', obj=type('Max2', (MeanFusion,), {}))\n")
    assert build_cfg(str(tmp_path / "cfg.yml")).MODEL.FUSION.NAME == "max2"


# ------------------------------------------------------------------------------ hooks alone
def _stub_trainer(tmp_path, max_epochs=5):
    saved = []
    return types.SimpleNamespace(
        epoch=0, history=[], best=None, output_dir=str(tmp_path), logger=None, writer=None,
        model=torch.nn.Linear(2, 2), cfg=types.SimpleNamespace(dump=lambda: "",
                                                               SOLVER=types.SimpleNamespace(MAX_EPOCHS=max_epochs)),
        final_epoch=False, saved=saved, save_checkpoint=lambda epoch, it: saved.append((epoch, it)))


def test_periodic_checkpointer_alone(tmp_path):
    """Every `period` epochs and after the last one (catches an off-by-one or a lost last epoch)."""
    t = _stub_trainer(tmp_path)
    hook = PeriodicCheckpointer(2)
    hook.trainer = t
    for epoch in range(5):
        t.epoch, t.final_epoch = epoch, epoch == 4
        hook.after_epoch()
    assert t.saved == [(2, 0), (4, 0), (5, 0)]


def test_best_checkpointer_alone_selects_on_validation(tmp_path):
    """The best epoch is the highest *validation* mAP (not test, not the lowest), and only a
    better one rewrites model_best.pth."""
    t = _stub_trainer(tmp_path)
    hook = BestCheckpointer()
    hook.trainer = t
    best = os.path.join(str(tmp_path), "model_best.pth")
    for epoch, (val, test) in enumerate([(0.5, 0.1), (0.4, 0.9), (0.6, 0.2)]):
        t.epoch = epoch
        t.history.append({"epoch": epoch + 1, "results": {"val": {"mAP": val}, "test": {"mAP": test}}})
        hook.after_epoch()
        if epoch == 0:
            first = os.stat(best).st_mtime_ns
        if epoch == 1:
            assert os.stat(best).st_mtime_ns == first and t.best["epoch"] == 1
    assert (t.best["epoch"], t.best["split"], t.best["mAP"]) == (3, "val", 0.6)
    assert torch.load(best, weights_only=True)["epoch"] == 3


def test_eval_hook_alone_respects_its_period(tmp_path, monkeypatch):
    import engine.hooks as hooks

    calls = []
    monkeypatch.setattr(hooks, "evaluate", lambda model, eval_set, cfg, device: calls.append(1) or {"mAP": 0.5})
    monkeypatch.setattr(hooks, "broadcast_buffers", lambda model: None)
    monkeypatch.setattr(hooks, "format_metrics", lambda metrics: "")
    t = _stub_trainer(tmp_path)
    t.data = types.SimpleNamespace(eval_sets={"test": None})
    t.device = torch.device("cpu")
    t.logger = types.SimpleNamespace(info=lambda *a: None)
    t.cfg.TEST = types.SimpleNamespace(FEAT="ori")
    hook = EvalHook(3)
    hook.trainer = t
    for epoch in range(5):
        t.epoch, t.final_epoch = epoch, epoch == 4
        hook.after_epoch()
    assert [h["epoch"] for h in t.history] == [3, 5]


# ------------------------------------------------------------------------------ worked examples
def _write_csv_dataset(synthetic_root, folder):
    """triplets.csv under ``folder`` listing the tiny synthetic set's images (relative paths)."""
    from data.datasets import build_dataset

    ds = build_dataset("Synthetic", synthetic_root, dict(num_train_ids=6, num_test_ids=4,
                                                         samples_per_id=6, height=64, width=32, seed=0))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "triplets.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "pid", "camid", "rgb", "ni", "ti"])
        for split, samples in (("train", ds.train), ("query", ds.query), ("gallery", ds.gallery)):
            for s in samples:
                writer.writerow([split, s.pid, s.camid] + [os.path.relpath(p, folder) for p in s.paths])
    return len(ds.train)


def _train_cli(tmp_path, config_text, extra=()):
    """python train_net.py with a user config (listing its IMPORTS) and the tiny opts, in a
    subprocess from the repository root, as a user runs it. Returns (output folder, log text)."""
    config = tmp_path / "user.yml"
    config.write_text(config_text)
    out = tmp_path / "out"
    opts = [x for key, value in zip(TINY_OPTS[0::2], TINY_OPTS[1::2]) if key != "DATASETS.NAMES"
            for x in (key, value)]
    cmd = [sys.executable, "train_net.py", "--config_file", str(config)] + opts + [
        "SOLVER.MAX_EPOCHS", "1", "OUTPUT_DIR", str(out)] + list(extra)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, (out / "log.txt").read_text()


def test_dataset_and_fusion_from_outside_the_package(synthetic_root, tmp_path):
    """docs/examples/csv_dataset.py and max_fusion.py, listed under IMPORTS, train one epoch
    through the CLI with SDTPS selecting the patches: no library file names them (catches
    IMPORTS read after validation, a hand-kept list of datasets or fusions, a model that only
    builds the fusions it knows)."""
    csv_root = tmp_path / "csv_set"
    num_train = _write_csv_dataset(synthetic_root, str(csv_root))
    out, log = _train_cli(tmp_path, (
        "IMPORTS: [docs/examples/csv_dataset.py, docs/examples/max_fusion.py]\n"
        f"DATASETS:\n  NAMES: CSVTriplets\n  ROOT_DIR: {csv_root}\n"
        "MODEL:\n  SELECTION:\n    NAME: sdtps\n  FUSION:\n    NAME: max\n"
        "TEST:\n  FEAT: concat\n"))
    assert "Dataset CSVTriplets statistics" in log
    assert re.search(rf"train\s*\|\s*6\s*\|\s*{num_train}\s*\|", log)
    assert "heads: ori, fused" in log
    state = torch.load(out / "checkpoint_epoch1.pth", weights_only=True)["model"]
    assert any(k.startswith("sdtps.") for k in state)
    assert not any(k.startswith("dgaf.") for k in state)
    assert state["heads.fused.bn.weight"].shape == state["heads.ori.bn.weight"].shape  # 3C wide
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 < summary["last"]["results"]["test"]["mAP"] <= 1.0


def test_backbone_selection_loss_and_evaluator_from_outside_the_package(synthetic_root, tmp_path):
    """The other four worked examples together: a conv backbone, a random selection, the center
    loss and a feature-norm evaluator (catches a part registered but not used: the backbone's
    weights, the loss's trained centers and the evaluator's metric must all show up)."""
    out, log = _train_cli(tmp_path, (
        "IMPORTS: [docs/examples/conv_backbone.py, docs/examples/random_selection.py,\n"
        "          docs/examples/center_loss.py, docs/examples/feature_norm_evaluator.py]\n"
        f"DATASETS:\n  NAMES: Synthetic\n  ROOT_DIR: {synthetic_root}\n"
        "MODEL:\n  BACKBONE_TYPE: conv\n  LOSSES: [reid, center]\n"
        "  SELECTION:\n    NAME: random\n  FUSION:\n    NAME: mean\n"
        "TEST:\n  EVALUATORS: [reid, feature_norm]\n"))
    state = torch.load(out / "checkpoint_epoch1.pth", weights_only=True)["model"]
    assert "backbone.embed.0.weight" in state and not any(k.startswith("backbone.vit") for k in state)
    centers = state["objectives.center.centers"]  # zeros at init, moved by the optimizer
    assert centers.shape[0] == 6 and bool((centers != 0).any())
    test = json.loads((out / "summary.json").read_text())["last"]["results"]["test"]
    assert test["norm/ori"] > 0 and test["norm/fused"] > 0 and 0.0 < test["mAP"] <= 1.0
