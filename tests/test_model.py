"""The assembled model on a tiny backbone: every module combination, its objective, retrieval
features."""

import pytest
import torch
import torch.nn.functional as F

from modeling.heads import retrieval_feature
from modeling.model import build_model, head_names

COMBOS = [
    # (PIFE, HDM, ATMOE, SELECTION, FUSION, DIRECT)
    (False, False, False, "none", "none", True),
    (True, False, False, "none", "none", True),
    (True, True, False, "none", "none", True),
    (True, True, True, "none", "none", True),
    (False, False, False, "sdtps", "mean", True),
    (False, False, False, "none", "dgaf", True),
    (False, False, False, "none", "mean", True),
    (False, False, False, "sdtps", "dgaf", True),
    (True, True, True, "sdtps", "dgaf", True),
    (True, True, True, "sdtps", "dgaf", False),
]


def _opts(pife, hdm, atmoe, selection, fusion, direct):
    return ["MODEL.PIFE.ENABLED", str(pife), "MODEL.HDM.ENABLED", str(hdm),
            "MODEL.ATMOE.ENABLED", str(atmoe), "MODEL.SELECTION.NAME", selection,
            "MODEL.FUSION.NAME", fusion, "MODEL.DIRECT", str(direct),
            "MODEL.HDM.NUM_HEADS", "4", "MODEL.DGAF.NUM_HEADS", "4"]


def _features(model, images, cams):
    return model({"images": images, "camids": cams})


@pytest.mark.parametrize("combo", COMBOS)
def test_output_shapes_for_each_module_combination(tiny_cfg, combo):
    pife, hdm, atmoe, selection, fusion, direct = combo
    cfg = tiny_cfg(*_opts(*combo))
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5, num_cams=4).eval()
    b, c = 4, model.backbone.out_dim
    n = model.backbone.grid_size[0] * model.backbone.grid_size[1]
    out = _features(model, torch.randn(b, 3, 3, 64, 32), torch.tensor([0, 1, 2, 3]))
    heads = out["heads"]
    expected = {"ori": 3 * c} if direct else {f"ori_{m}": c for m in ("rgb", "ni", "ti")}
    if hdm:
        expected["moe" if atmoe else "hdm"] = 7 * c
    if fusion != "none":
        expected["fused"] = 3 * c
    assert {k: v.feat.shape[1] for k, v in heads.items()} == expected
    assert tuple(heads) == head_names(cfg)  # the config's validation sees the model's heads
    for head in heads.values():
        assert head.feat_bn.shape == head.feat.shape and head.logits.shape == (b, 5)
    assert ("keep_mask" in out) == (selection != "none")
    if selection != "none":
        assert out["keep_mask"].shape == (b, 3, n)
        assert int(out["keep_mask"][0, 0].sum()) == max(1, -(-n * 7 // 10))
    if atmoe:
        gates = out["moe_gates"]
        assert torch.allclose(gates.sum(-1), torch.ones_like(gates.sum(-1)), atol=1e-5)
    assert retrieval_feature(heads, "ori", "before").shape == (b, 3 * c)
    concat_dim = 3 * c + (7 * c if hdm else 0) + (3 * c if fusion != "none" else 0)
    assert retrieval_feature(heads, "concat", "after").shape == (b, concat_dim)


def test_selection_and_fusion_are_children_named_after_their_registry_entry(tiny_cfg):
    """Checkpoints of earlier versions name the parameters sdtps.* and dgaf.*; a renamed child
    would make them unloadable."""
    model = build_model(tiny_cfg(*_opts(False, False, False, "sdtps", "dgaf", True)), 5, 4)
    names = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert {"sdtps", "dgaf"} <= names
    assert model.selection is model.sdtps and model.fusion is model.dgaf
    plain = build_model(tiny_cfg(), 5, 4)
    assert plain.selection is None and plain.fusion is None


def test_training_forward_returns_the_weighted_objective(tiny_cfg):
    """The model owns its objective: per head w x ID_W x CE and w x TRI_W x triplet, the fused
    head weighted by MODEL.FUSION.LOSS_WEIGHT (catches a dropped or misplaced weight)."""
    from modeling.losses import CrossEntropyLabelSmooth, TripletLoss

    cfg = tiny_cfg(*_opts(False, False, False, "sdtps", "mean", True), "MODEL.FUSION.LOSS_WEIGHT",
                   "2.5", "MODEL.ID_LOSS_WEIGHT", "0.25", "MODEL.TRIPLET_LOSS_WEIGHT", "3.0")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5, num_cams=4).train()
    batch = {"images": torch.randn(4, 3, 3, 64, 32), "camids": torch.tensor([0, 1, 2, 3]),
             "pids": torch.tensor([0, 0, 1, 1])}
    torch.manual_seed(1)
    out = model(batch)
    assert set(out) == {"losses", "scalars", "histograms"}
    assert set(out["losses"]) == {"ori/id", "ori/triplet", "fused/id", "fused/triplet"}
    torch.manual_seed(1)  # the same drop-path draws: the same heads
    heads = model.forward_features(batch["images"], batch["camids"])["heads"]
    ce, tri = CrossEntropyLabelSmooth(cfg.MODEL.LABEL_SMOOTH), TripletLoss(
        cfg.MODEL.TRIPLET_MARGIN, cfg.MODEL.TRIPLET_SOFT_MARGIN)
    for name, w in (("ori", 1.0), ("fused", 2.5)):
        pids = batch["pids"]
        assert out["losses"][f"{name}/id"].item() == pytest.approx(w * 0.25 * ce(heads[name].logits, pids).item(), rel=1e-5)
        assert out["losses"][f"{name}/triplet"].item() == pytest.approx(w * 3.0 * tri(heads[name].feat, pids).item(), rel=1e-5)
    assert 0.0 <= float(out["scalars"]["acc"]) <= 1.0
    assert "sdtps/gate_mean/RGB<-NI" in out["scalars"]
    assert out["histograms"]["sdtps/gate_hist/RGB<-RGB/head0"].dim() == 2


def test_concat_is_every_head_raw_or_normalised_per_part(tiny_cfg):
    """DeMo's row C (PIFE + HDM, no ATMoE) retrieves with [ori, HDM] (catches the hdm head dropped
    from concat); FEAT_NORM once joins the raw pre-BN parts (DeMo), per_part normalises each."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*_opts(True, True, False, "none", "none", True)), 5, 4).eval()
    out = _features(model, torch.randn(3, 3, 3, 64, 32), torch.tensor([0, 1, 2]))["heads"]
    ori, hdm = out["ori"].feat, out["hdm"].feat
    assert torch.equal(retrieval_feature(out, "concat", "before", "once"), torch.cat([ori, hdm], 1))
    per_part = retrieval_feature(out, "concat", "before", "per_part")
    assert torch.allclose(per_part, torch.cat([F.normalize(ori, dim=1), F.normalize(hdm, dim=1)], 1))
    assert torch.equal(retrieval_feature(out, "hdm", "before"), hdm)
    assert torch.equal(retrieval_feature(out, "hdm", "after"), out["hdm"].feat_bn)
    model = build_model(tiny_cfg(*_opts(True, True, True, "sdtps", "mean", True)), 5, 4).eval()
    out = _features(model, torch.randn(3, 3, 3, 64, 32), torch.tensor([0, 1, 2]))["heads"]
    heads = {k: v.feat for k, v in out.items()}
    assert torch.equal(retrieval_feature(out, "ori+moe", "before"), torch.cat([heads["ori"], heads["moe"]], 1))
    assert torch.equal(retrieval_feature(out, "concat", "before"),
                       torch.cat([heads["ori"], heads["moe"], heads["fused"]], 1))


def test_missing_head_for_feature_is_a_clear_error(tiny_cfg):
    model = build_model(tiny_cfg(), num_classes=5, num_cams=4).eval()
    out = _features(model, torch.randn(2, 3, 3, 64, 32), torch.tensor([0, 1]))
    with pytest.raises(KeyError, match="fused.*MODEL.FUSION.NAME"):
        retrieval_feature(out["heads"], "fused", "before")


def test_camera_embedding_changes_only_with_sie(tiny_cfg):
    images = torch.randn(2, 3, 3, 64, 32)
    for sie, should_differ in ((True, True), (False, False)):
        torch.manual_seed(0)
        model = build_model(tiny_cfg("MODEL.SIE_CAMERA", str(sie), "MODEL.DROP_PATH", "0.0"),
                            num_classes=5, num_cams=4).eval()
        a = _features(model, images, torch.tensor([0, 0]))["heads"]["ori"].feat
        b = _features(model, images, torch.tensor([1, 1]))["heads"]["ori"].feat
        assert (not torch.allclose(a, b)) == should_differ


def test_stride_override_resamples_position_embedding(tiny_cfg):
    model = build_model(tiny_cfg("MODEL.STRIDE_SIZE", "[8, 8]"), num_classes=5, num_cams=4)
    assert model.backbone.grid_size == (7, 3)
    assert model.backbone.vit.pos_embed.shape[1] == 1 + 21
    out = _features(model.eval(), torch.randn(2, 3, 3, 64, 32), torch.tensor([0, 1]))
    assert out["heads"]["ori"].feat.shape == (2, 3 * model.backbone.out_dim)
