"""The assembled model on a tiny backbone: every switch combination, gradients, retrieval features."""

import pytest
import torch
import torch.nn.functional as F

from modeling.model import build_model, retrieval_feature

COMBOS = [
    # (PIFE, HDM, ATMOE, SDTPS, DGAF, DIRECT)
    (False, False, False, False, False, True),
    (True, False, False, False, False, True),
    (True, True, False, False, False, True),
    (True, True, True, False, False, True),
    (False, False, False, True, False, True),
    (False, False, False, False, True, True),
    (False, False, False, True, True, True),
    (True, True, True, True, True, True),
    (True, True, True, True, True, False),
]


def _opts(pife, hdm, atmoe, sdtps, dgaf, direct):
    return ["MODEL.PIFE.ENABLED", str(pife), "MODEL.HDM.ENABLED", str(hdm),
            "MODEL.ATMOE.ENABLED", str(atmoe), "MODEL.SDTPS.ENABLED", str(sdtps),
            "MODEL.DGAF.ENABLED", str(dgaf), "MODEL.DIRECT", str(direct),
            "MODEL.HDM.NUM_HEADS", "4", "MODEL.DGAF.NUM_HEADS", "4"]


@pytest.mark.parametrize("combo", COMBOS)
def test_output_shapes_for_each_switch_combination(tiny_cfg, combo):
    pife, hdm, atmoe, sdtps, dgaf, direct = combo
    cfg = tiny_cfg(*_opts(*combo))
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5, num_cams=4).train()
    b, c = 4, model.backbone.out_dim
    n = model.backbone.grid_size[0] * model.backbone.grid_size[1]
    out = model(torch.randn(b, 3, 3, 64, 32), torch.tensor([0, 1, 2, 3]))
    heads = out["heads"]
    expected = {"ori": 3 * c} if direct else {f"ori_{m}": c for m in ("rgb", "ni", "ti")}
    if hdm:
        expected["moe" if atmoe else "hdm"] = 7 * c
    if sdtps or dgaf:
        expected["fused"] = 3 * c
    assert {k: v[0].shape[1] for k, v in heads.items()} == expected
    for feat, feat_bn, logits in heads.values():
        assert feat_bn.shape == feat.shape and logits.shape == (b, 5)
    if sdtps:
        assert out["keep_mask"].shape == (b, 3, n)
        assert int(out["keep_mask"][0, 0].sum()) == max(1, -(-n * 7 // 10))
    if atmoe:
        gates = out["moe_gates"]
        assert torch.allclose(gates.sum(-1), torch.ones_like(gates.sum(-1)), atol=1e-5)
    model.eval()
    out = model(torch.randn(b, 3, 3, 64, 32), torch.tensor([0, 1, 2, 3]))
    assert retrieval_feature(out, "ori", "before").shape == (b, 3 * c)
    concat_dim = 3 * c + (7 * c if hdm else 0) + (3 * c if (sdtps or dgaf) else 0)
    assert retrieval_feature(out, "concat", "after").shape == (b, concat_dim)


def test_concat_is_every_head_raw_or_normalised_per_part(tiny_cfg):
    """DeMo's row C (PIFE + HDM, no ATMoE) retrieves with [ori, HDM] (catches the hdm head dropped
    from concat); FEAT_NORM once joins the raw pre-BN parts (DeMo), per_part normalises each."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*_opts(True, True, False, False, False, True)), 5, 4).eval()
    out = model(torch.randn(3, 3, 3, 64, 32), torch.tensor([0, 1, 2]))
    ori, hdm = out["heads"]["ori"][0], out["heads"]["hdm"][0]
    assert torch.equal(retrieval_feature(out, "concat", "before", "once"), torch.cat([ori, hdm], 1))
    per_part = retrieval_feature(out, "concat", "before", "per_part")
    assert torch.allclose(per_part, torch.cat([F.normalize(ori, dim=1), F.normalize(hdm, dim=1)], 1))
    assert torch.equal(retrieval_feature(out, "hdm", "before"), hdm)
    model = build_model(tiny_cfg(*_opts(True, True, True, True, False, True)), 5, 4).eval()
    out = model(torch.randn(3, 3, 3, 64, 32), torch.tensor([0, 1, 2]))
    heads = {k: v[0] for k, v in out["heads"].items()}
    assert torch.equal(retrieval_feature(out, "ori+moe", "before"), torch.cat([heads["ori"], heads["moe"]], 1))
    assert torch.equal(retrieval_feature(out, "concat", "before"),
                       torch.cat([heads["ori"], heads["moe"], heads["fused"]], 1))


def test_missing_head_for_feature_is_a_clear_error(tiny_cfg):
    model = build_model(tiny_cfg(), num_classes=5, num_cams=4).eval()
    out = model(torch.randn(2, 3, 3, 64, 32), torch.tensor([0, 1]))
    with pytest.raises(KeyError, match="fused"):
        retrieval_feature(out, "fused", "before")


def test_camera_embedding_changes_only_with_sie(tiny_cfg):
    images = torch.randn(2, 3, 3, 64, 32)
    for sie, should_differ in ((True, True), (False, False)):
        torch.manual_seed(0)
        model = build_model(tiny_cfg("MODEL.SIE_CAMERA", str(sie), "MODEL.DROP_PATH", "0.0"),
                            num_classes=5, num_cams=4).eval()
        a = model(images, torch.tensor([0, 0]))["heads"]["ori"][0]
        b = model(images, torch.tensor([1, 1]))["heads"]["ori"][0]
        assert (not torch.allclose(a, b)) == should_differ


def test_stride_override_resamples_position_embedding(tiny_cfg):
    model = build_model(tiny_cfg("MODEL.STRIDE_SIZE", "[8, 8]"), num_classes=5, num_cams=4)
    assert model.backbone.grid_size == (7, 3)
    assert model.backbone.vit.pos_embed.shape[1] == 1 + 21
    out = model(torch.randn(2, 3, 3, 64, 32), torch.tensor([0, 1]))
    assert out["heads"]["ori"][0].shape == (2, 3 * model.backbone.out_dim)
