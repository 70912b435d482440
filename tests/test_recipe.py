"""DeMo's recipe in the DeMo configs, the write-up's ablation family, and the paper's reporting
protocol (docs/recipe.md)."""
import glob
import json
import os

import pytest
import torch

import test_net
import train_net
from config import build_cfg
from modeling.losses import ReIDLoss
from modeling.model import build_model
from utils.checkpoint import load_checkpoint_file
from modeling.model_size import build_on_meta, count_parameters

from conftest import ROOT

RGBNT201 = os.path.join(ROOT, "configs", "RGBNT201")
# Every config named after DeMo: DeMo's rows, DeMo + SDTPS variants, the write-up's family, vehicles.
DEMO_CONFIGS = sorted(
    glob.glob(os.path.join(ROOT, "configs", "*", "DeMo*.yml"))
    + glob.glob(os.path.join(RGBNT201, "ablation", "*.yml")))


def flat(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        if hasattr(value, "items"):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_keys(a, b):
    fa, fb = flat(build_cfg(a)), flat(build_cfg(b))
    return {k for k in fa if fa[k] != fb[k]}


@pytest.mark.parametrize("path", DEMO_CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_demo_configs_carry_demos_recipe(path):
    """Catches any DeMo config drifting from DeMo's recipe (pixel statistics, augmentation, drop
    path, resize, schedule, groups, precision, test feature, evaluation period)."""
    cfg = build_cfg(path)
    assert cfg.INPUT.PIXEL_MEAN == [0.5] * 3 and cfg.INPUT.PIXEL_STD == [0.5] * 3
    assert cfg.INPUT.SYNC_MODALITY_AUG is False
    assert cfg.INPUT.RE_PROB == 0.5 and cfg.INPUT.RE_AREA == pytest.approx([0.02, 1 / 3])
    assert cfg.INPUT.TRAIN_INTERPOLATION == "bicubic" and cfg.INPUT.PADDING == 10
    assert cfg.MODEL.DROP_PATH == 0.0 and cfg.MODEL.POS_EMBED_RESIZE == "bilinear"
    assert cfg.MODEL.BACKBONE == "vit_base_patch16_clip_quickgelu_224" and cfg.MODEL.PROJ_DIM == 512
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.BASE_LR, s.BACKBONE_LR, s.BIAS_LR_FACTOR, s.PARAM_GROUPS) == (
        "Adam", 3.5e-4, 5e-6, 2.0, "demo")
    assert (s.WEIGHT_DECAY, s.WEIGHT_DECAY_BIAS) == (1e-4, 1e-4)
    assert (s.WARMUP_FACTOR, s.MIN_LR_FACTOR, s.SCHEDULE_RELATIVE, s.WARMUP_PREFIX,
            s.SCHEDULE_START) == (0.1, 0.001, False, False, 1)
    assert (s.LR_NOISE, s.LR_NOISE_STD, s.LR_NOISE_SEED) == (0.67, 1.0, 42)
    assert s.AMP == "fp16" and s.EVAL_PERIOD == 1
    assert cfg.MODEL.ID_LOSS_WEIGHT == 0.25 and cfg.MODEL.LABEL_SMOOTH == 0.1
    assert cfg.TEST.FEAT_NORM == "once" and cfg.TEST.NECK_FEAT == "before" and cfg.TEST.AMP == "off"
    assert not cfg.TEST.FLIP and not cfg.TEST.RERANK.ENABLED
    epochs = {"RGBNT201": (50, 10, 64, 8), "RGBNT100": (30, 5, 128, 16), "MSVR310": (50, 10, 64, 4)}
    assert (s.MAX_EPOCHS, s.WARMUP_EPOCHS, s.IMS_PER_BATCH,
            cfg.DATALOADER.NUM_INSTANCE) == epochs[cfg.DATASETS.NAMES]


@pytest.mark.parametrize("dataset", ["RGBNT201", "RGBNT100", "MSVR310"])
def test_sdtps_configs_change_sdtps_alone(dataset):
    folder = os.path.join(ROOT, "configs", dataset)
    demo, sdtps, both = (os.path.join(folder, f) for f in ("DeMo.yml", "DeMo_SDTPS.yml", "DeMo_SDTPS_DGAF.yml"))
    test_keys = {"TEST.FEAT", "TEST.REPORT_FEATS", "OUTPUT_DIR"}
    selection = {"MODEL.SELECTION.NAME", "MODEL.FUSION.NAME"}
    assert all(k.startswith("MODEL.SDTPS.") or k in test_keys | selection
               for k in differing_keys(demo, sdtps))
    assert all(k.startswith("MODEL.DGAF.") or k in {"MODEL.FUSION.NAME", "OUTPUT_DIR"}
               for k in differing_keys(sdtps, both))


def test_write_up_family_differs_in_its_switches_only():
    family = [os.path.join(RGBNT201, f"DeMo_{row}_ablation.yml") for row in ("SDTPS", "DGAF", "SDTPS_DGAF")]
    base = os.path.join(RGBNT201, "DeMo_baseline_ablation.yml")
    allowed = {"MODEL.SELECTION.NAME", "MODEL.FUSION.NAME", "TEST.FEAT", "TEST.REPORT_FEATS", "OUTPUT_DIR"}
    for path in family:
        assert differing_keys(base, path) <= allowed, path
    # and the baseline is DeMo's row A with a validation split and the write-up's loss weight
    assert differing_keys(os.path.join(RGBNT201, "ablation", "DeMo_A_baseline.yml"), base) <= {
        "DATASETS.VAL_IDS", "MODEL.FUSION.LOSS_WEIGHT", "OUTPUT_DIR"}


def test_write_up_ablation_config_builds_the_prototype():
    """configs/RGBNT201/DeMo_SDTPS_DGAF_ablation.yml = plain baseline + SDTPS + DGAF with the fused
    loss weighted 2.0 (catches the full DeMo modules sneaking back in, a wrong SDTPS/DGAF size)."""
    cfg = build_cfg(os.path.join(RGBNT201, "DeMo_SDTPS_DGAF_ablation.yml"))
    classes, cams, c, h = 171 - 20, 4, 512, 4
    model = build_on_meta(cfg, classes, cams)
    assert set(model.heads) == {"ori", "fused"}
    assert model.pife is None and model.hdm is None and model.atmoe is None
    assert model.loss_weights == {"ori": 1.0, "fused": 2.0}
    assert (cfg.MODEL.SDTPS.SPARSE_RATIO, cfg.MODEL.SDTPS.NUM_HEADS) == (0.7, 4)
    assert (cfg.MODEL.DGAF.NUM_HEADS, cfg.MODEL.DGAF.TAU, cfg.MODEL.DGAF.INIT_ALPHA) == (8, 1.0, 0.5)
    assert (cfg.TEST.FEAT, list(cfg.TEST.REPORT_FEATS)) == ("concat", ["ori", "fused", "concat"])
    row_a = build_on_meta(build_cfg(os.path.join(RGBNT201, "ablation", "DeMo_A_baseline.yml")), classes, cams)
    sdtps = 9 * (2 * c * c + c + 2 * h)  # q and k weights, q bias, gate scale and bias per pair
    dgaf = 9 * c * c + 16 * c + 4  # pooling q/k/v/out, queries, norms, entropy, importance MLP, alpha, fuse
    fused_head = 2 * 3 * c + 3 * c * classes  # BN weight and bias, bias-free classifier
    by_hand = count_parameters(row_a)["total"] + sdtps + dgaf + fused_head
    assert count_parameters(model)["total"] == by_hand


def test_fused_loss_weight_scales_the_fused_heads_losses(tiny_cfg):
    """The model multiplies the fused head's ID + triplet loss by MODEL.FUSION.LOSS_WEIGHT
    (catches the weight ignored or applied to the wrong head)."""
    cfg = tiny_cfg("MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "mean",
                   "MODEL.FUSION.LOSS_WEIGHT", "2.0")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4, num_cams=4).train()
    pids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    out = model.forward_features(torch.randn(8, 3, 3, 64, 32), torch.zeros(8, dtype=torch.long))
    losses = model.losses(out, pids)["losses"]
    m = cfg.MODEL
    unweighted = ReIDLoss(m.ID_LOSS_WEIGHT, m.TRIPLET_LOSS_WEIGHT, m.LABEL_SMOOTH, m.TRIPLET_MARGIN,
                          m.TRIPLET_SOFT_MARGIN)(out, pids)  # every head weighted 1
    expected = sum(w * (unweighted[f"{name}/id"] + unweighted[f"{name}/triplet"])
                   for name, w in (("ori", 1.0), ("fused", 2.0)))
    assert sum(losses.values()).item() == pytest.approx(expected.item(), rel=1e-5)


def test_paper_protocol_figure_and_features_side_by_side(tiny_opts):
    """summary.json and the log give the best test epoch, labelled as the paper's protocol; every
    evaluation scores TEST.REPORT_FEATS from the same pass, and each equals what test_net.py gives
    for that feature alone (catches swapped labels or a stale feature)."""
    opts = list(tiny_opts) + ["SOLVER.MAX_EPOCHS", "3", "SOLVER.EVAL_PERIOD", "1",
                              "MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "mean",
                              "TEST.FEAT", "concat",
                              "TEST.REPORT_FEATS", "['ori', 'fused', 'concat']"]
    summary = train_net.main(opts)
    out = opts[opts.index("OUTPUT_DIR") + 1]
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["best_test_paper_protocol"] == json.loads(json.dumps(
            summary["best_test_paper_protocol"], default=float))
    paper = summary["best_test_paper_protocol"]
    test_maps = {h["epoch"]: h["results"]["test"]["mAP"] for h in summary_history(out)}
    assert paper["evaluated_epochs"] == 3 and set(test_maps) == {1, 2, 3}
    assert paper["metrics"]["mAP"] == max(test_maps.values())
    assert test_maps[paper["epoch"]] == paper["metrics"]["mAP"]
    assert "paper's protocol" in paper["protocol"]
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert "best test mAP over the 3 evaluated epochs (the paper's protocol" in log
    last = summary["last"]["results"]["test"]
    assert set(last["by_feat"]) == {"ori", "fused", "concat"}
    assert last["by_feat"]["concat"]["mAP"] == last["mAP"]
    weight = os.path.join(out, "checkpoint_epoch3.pth")
    for feat in ("ori", "fused"):
        alone = test_net.main(opts + ["TEST.WEIGHT", weight, "TEST.FEAT", feat, "TEST.REPORT_FEATS", "[]",
                                      "OUTPUT_DIR", os.path.join(out, f"test_{feat}")])
        assert alone["none"]["mAP"] == pytest.approx(last["by_feat"][feat]["mAP"], abs=1e-9), feat
    assert last["by_feat"]["ori"]["mAP"] != last["by_feat"]["fused"]["mAP"]


def summary_history(out):
    """Every evaluation of the run, from its last checkpoint's history."""
    return load_checkpoint_file(os.path.join(out, "checkpoint_epoch3.pth"))["history"]
