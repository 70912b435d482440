"""Evaluation options: missing modalities, feature export, the missing-modality table, flip TTA."""
import os

import numpy as np
import pytest
import torch

import test_net
import train_net
from engine.evaluator import MISS_TO_MODALITIES, patch_foreground, zero_missing


@pytest.mark.parametrize("miss,zeroed", [("none", ()), ("r", (0,)), ("n", (1,)), ("t", (2,)),
                                         ("rn", (0, 1)), ("rt", (0, 2)), ("nt", (1, 2))])
def test_missing_modality_zeroes_exactly_the_named_inputs(miss, zeroed):
    images = torch.randn(4, 3, 3, 8, 4) + 5.0
    out = zero_missing(images, miss)
    for m in range(3):
        if m in zeroed:
            assert torch.count_nonzero(out[:, m]) == 0
        else:
            assert torch.equal(out[:, m], images[:, m])
    assert torch.count_nonzero(images) == images.numel()  # the input is not modified in place


def test_patch_foreground_share():
    masks = torch.zeros(1, 4, 4)
    masks[0, :2, :2] = 1.0  # top-left patch full, the rest empty
    masks[0, 2:, 2:3] = 1.0  # bottom-right patch half
    share = patch_foreground(masks, (2, 2), (2, 2))
    assert share.tolist() == [[1.0, 0.0, 0.0, 0.5]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_root):
    from tests.conftest import TINY_OPTS

    out = str(tmp_path_factory.mktemp("eval_out"))
    opts = TINY_OPTS + ["DATASETS.ROOT_DIR", synthetic_root, "OUTPUT_DIR", out, "SOLVER.MAX_EPOCHS", "1"]
    train_net.main(list(opts))
    return opts, os.path.join(out, "checkpoint_epoch1.pth")


def test_missing_modality_table_and_export(trained, tmp_path):
    opts, weight = trained
    export = str(tmp_path / "feats.npz")
    results = test_net.main(list(opts) + ["TEST.WEIGHT", weight, "TEST.MISS", "all", "TEST.EXPORT", export])
    assert set(results) == set(MISS_TO_MODALITIES)
    assert len({round(r["mAP"], 9) for r in results.values()}) > 1  # the settings really differ
    data = np.load(export)
    assert data["query_feats"].shape[0] == data["query_pids"].shape[0] == results["none"]["num_query"]
    assert data["gallery_paths"].shape[0] == results["none"]["num_gallery"]
    assert all(p.count("|") == 2 for p in data["query_paths"])
    assert set(np.unique(data["query_camids"])) <= {0, 1, 2, 3}


def test_flip_test_time_augmentation_changes_features(trained, tmp_path):
    opts, weight = trained
    plain = test_net.main(list(opts) + ["TEST.WEIGHT", weight, "TEST.EXPORT", str(tmp_path / "a.npz")])
    flipped = test_net.main(list(opts) + ["TEST.WEIGHT", weight, "TEST.FLIP", "True",
                                          "TEST.EXPORT", str(tmp_path / "b.npz")])
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["query_feats"].shape == b["query_feats"].shape
    assert not np.allclose(a["query_feats"], b["query_feats"])
    assert plain["none"]["num_query"] == flipped["none"]["num_query"]


def test_rerank_option_reaches_evaluation(trained, monkeypatch):
    import utils.rerank

    calls = []
    original = utils.rerank.re_ranking

    def spy(qf, gf, **kwargs):
        calls.append(kwargs)
        return original(qf, gf, **kwargs)

    monkeypatch.setattr(utils.rerank, "re_ranking", spy)
    opts, weight = trained
    results = test_net.main(list(opts) + ["TEST.WEIGHT", weight, "TEST.RERANK.ENABLED", "True",
                                          "TEST.RERANK.K1", "5", "TEST.RERANK.K2", "2"])
    assert calls == [{"k1": 5, "k2": 2, "lambda_value": 0.3}]
    assert 0.0 < results["none"]["mAP"] <= 1.0


class _FixedSelection(torch.nn.Module):
    """Stub model: keeps the first ``k`` patches of every modality."""

    def __init__(self, patch_size, k):
        super().__init__()
        self.patch_size, self.k = patch_size, k

    def forward(self, batch):
        b, _, _, h, w = batch["images"].shape
        n = (h // self.patch_size[0]) * (w // self.patch_size[1])
        keep = torch.zeros(b, 3, n, dtype=torch.bool)
        keep[..., : self.k] = True
        return {"keep_mask": keep, "patch_geometry": (self.patch_size, self.patch_size)}


def test_kept_token_foreground_precision_against_masks_on_disk(tiny_opts):
    """fg_precision / fg_share / fg_best of a stub that keeps the first k patches, recomputed
    from the mask PNGs (a patch is foreground when at least half its pixels are person)."""
    from PIL import Image

    from config import build_cfg
    from data.build import build_data
    from engine.evaluator import ForegroundPrecisionEvaluator, inference_on_dataset

    cfg = build_cfg(opts=list(tiny_opts))
    data = build_data(cfg)
    eval_set = data.eval_sets["test"]
    k, patch = 3, (16, 16)
    metrics = inference_on_dataset(_FixedSelection(patch, k), eval_set,
                                   [ForegroundPrecisionEvaluator(eval_set)], torch.device("cpu"))

    kept_fg = best = fg = total = 0
    for sample in eval_set.samples:
        with Image.open(sample.mask_path) as img:
            mask = torch.from_numpy((np.asarray(img.convert("L")) > 127).astype(np.float32))
        is_fg = patch_foreground(mask[None], patch, patch)[0] >= 0.5  # (N,)
        kept_fg += 3 * int(is_fg[:k].sum())
        best += 3 * min(int(is_fg.sum()), k)
        fg += 3 * int(is_fg.sum())
        total += 3 * is_fg.numel()
    kept = 3 * k * len(eval_set.samples)
    assert 0 < kept_fg < best  # the stub is neither useless nor perfect on this data
    assert metrics["fg_precision"] == pytest.approx(kept_fg / kept)
    assert metrics["fg_best"] == pytest.approx(best / kept)
    assert metrics["fg_share"] == pytest.approx(fg / total)


from modeling.heads import HeadOutput  # noqa: E402  (used by the flip TTA tests below)


class _AsymmetricStub(torch.nn.Module):
    """Stub model with heads "ori" and "fused" whose features change under a horizontal flip:
    ori = column means of the image (mirrored by the flip), fused = weighted column sums."""

    def forward(self, batch):
        images = batch["images"].float()  # (B, 3, 3, H, W)
        cols = images.mean(dim=(1, 2, 3))  # (B, W)
        ramp = torch.arange(1, cols.shape[1] + 1, dtype=cols.dtype)
        ori = cols
        fused = torch.stack([(cols * ramp).sum(1), cols.sum(1) + 1.0, (cols * ramp.flip(0)).sum(1)], 1)
        heads = {name: HeadOutput(f, 3.0 * f - 1.0, f[:, :2]) for name, f in (("ori", ori), ("fused", fused))}
        return {"heads": heads}


@pytest.mark.parametrize("feat,neck,norm", [("ori", "before", "once"), ("ori", "after", "once"),
                                            ("concat", "before", "per_part"),
                                            ("concat", "after", "once")])
def test_flip_tta_feature_is_the_mean_of_plain_and_mirrored(tiny_opts, feat, neck, norm):
    """With TEST.FLIP the extracted feature is (f(x) + f(mirror x)) / 2 of the retrieval feature
    (TEST.FEAT / NECK_FEAT / FEAT_NORM applied to each pass), not either pass alone.
    Catches breakage flip-tta-mirror-only."""
    from config import build_cfg
    from data.build import build_data
    from engine.evaluator import ReIDEvaluator, evaluate
    from modeling.heads import retrieval_feature

    cfg = build_cfg(opts=list(tiny_opts) + ["TEST.FLIP", "True", "TEST.FEAT", feat,
                                            "TEST.NECK_FEAT", neck, "TEST.FEAT_NORM", norm])
    eval_set = build_data(cfg).eval_sets["test"]
    model = _AsymmetricStub()
    evaluator = ReIDEvaluator.from_config(cfg, eval_set)
    evaluate(model, eval_set, cfg, torch.device("cpu"), evaluators=[evaluator])

    plain, mirrored = [], []
    for batch in eval_set.loader:
        for images, out in ((batch["images"], plain), (batch["images"].flip(-1), mirrored)):
            heads = model({"images": images, "camids": batch["camids"]})["heads"]
            out.append(retrieval_feature(heads, feat, neck, norm))
    plain, mirrored = torch.cat(plain), torch.cat(mirrored)
    got = evaluator.extracted["feats"]
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the stub is asymmetric under the flip
    assert torch.allclose(got, (plain + mirrored) / 2, atol=1e-5)
