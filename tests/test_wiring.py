"""Config values reach the objects a run builds, with the right sign.

Every test sets an option through the config (build_cfg with KEY VALUE overrides) and checks the
behaviour of what the run's own build functions make of it (build_data, build_model,
build_optimizer / build_scheduler, build_evaluators, the Trainer). Each names the one-line
breakage it catches. Grouped by config node; the evaluation protocols first.
"""
import math
import os

import pytest
import torch
from PIL import Image

from config import build_cfg
from data.build import build_data
from engine.evaluator import build_evaluators
from modeling.heads import HeadOutput
from modeling.model import build_model
from conftest import TINY_OPTS


# ---------------------------------------------------------------------------------------------
# Evaluation protocols, through the test split and the evaluator a run builds from its config.
# Hand-made features: the sample named N gets the unit vector at ANGLE[N] degrees, so distances
# order as angle differences. Each scenario's expected mAP is worked out in its docstring.
# ---------------------------------------------------------------------------------------------
ANGLE = {
    # RGBNT201 (query list = gallery list): pid from the first field, camera from "camK"
    "000001_cam1_0_00.jpg": 0, "000001_cam1_0_01.jpg": 2, "000001_cam2_0_00.jpg": 50,
    "000002_cam1_0_00.jpg": 20, "000002_cam2_0_00.jpg": 90, "000003_cam3_0_00.jpg": 140,
    # RGBNT100 (separate query and gallery): <pid>_c<camera>_<n>
    "0001_c1_0001.jpg": 0, "0009_c1_0002.jpg": 100,  # queries
    "0001_c1_0003.jpg": 5, "0002_c2_0004.jpg": 20, "0001_c2_0005.jpg": 30,  # gallery
    # MSVR310: <vid>_s<scene>_v<camera>_<n>
    "0001_s001_v0_000.jpg": 0,  # query
    "0001_s001_v1_001.jpg": 5, "0002_s002_v0_000.jpg": 20, "0001_s002_v0_002.jpg": 30,  # gallery
}
TRAIN_NAMES = {"RGBNT201": [f"00001{p}_cam{c}_0_0{p}.jpg" for p in range(4) for c in (1, 2)],
               "RGBNT100": [f"00{10 + p}_c{c}_000{p}.jpg" for p in range(4) for c in (1, 2)],
               "MSVR310": [f"00{10 + p}_s001_v{c}_00{p}.jpg" for p in range(4) for c in (1, 2)]}


def _image(path, size=(32, 64)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)


@pytest.fixture(scope="module")
def protocol_root(tmp_path_factory):
    """RGBNT201, RGBNT100 and MSVR310 trees holding the files of ANGLE (and a training split)."""
    root = str(tmp_path_factory.mktemp("protocols"))
    names = [n for n in ANGLE if "_cam" in n]
    for split, files in (("train_171", TRAIN_NAMES["RGBNT201"]), ("test", names)):
        for modality in ("RGB", "NI", "TI"):
            for name in files:
                _image(os.path.join(root, "RGBNT201", split, modality, name))
    splits = {"bounding_box_train": TRAIN_NAMES["RGBNT100"],
              "query": ["0001_c1_0001.jpg", "0009_c1_0002.jpg"],
              "bounding_box_test": ["0001_c1_0003.jpg", "0002_c2_0004.jpg", "0001_c2_0005.jpg"]}
    for split, files in splits.items():
        for name in files:
            _image(os.path.join(root, "RGBNT100", "rgbir", split, name), (768, 128))
    splits = {"bounding_box_train": TRAIN_NAMES["MSVR310"], "query3": ["0001_s001_v0_000.jpg"],
              "bounding_box_test": ["0001_s001_v1_001.jpg", "0002_s002_v0_000.jpg",
                                    "0001_s002_v0_002.jpg"]}
    for split, files in splits.items():
        for name in files:
            for modality in ("vis", "ni", "th"):
                _image(os.path.join(root, "MSVR310", split, name[:4], modality, name))
    return root


def protocol_metrics(dataset: str, root: str, *opts) -> dict:
    """The reid evaluator's metrics on the test split of ``dataset``, as a run builds both from
    its config, with the ANGLE features in place of the model's."""
    cfg = build_cfg("", TINY_OPTS + ["DATASETS.NAMES", dataset, "DATASETS.ROOT_DIR", root, *opts])
    eval_set = build_data(cfg).eval_sets["test"]
    evaluators = build_evaluators(cfg, eval_set)
    for evaluator in evaluators:
        evaluator.reset()
    for batch in eval_set.loader:
        angles = torch.tensor([math.radians(ANGLE[os.path.basename(eval_set.samples[i].paths[0])])
                               for i in batch["index"].tolist()])
        feat = torch.stack([angles.cos(), angles.sin()], dim=1)
        outputs = {"heads": {"ori": HeadOutput(feat, feat, None)}}
        for evaluator in evaluators:
            evaluator.process(batch, outputs)
    metrics = {}
    for evaluator in evaluators:
        metrics.update(evaluator.evaluate())
    return metrics


@pytest.mark.parametrize("dist", ["euclidean", "cosine"])
def test_rgbnt201_protocol_removes_same_camera_and_self_and_drops_queries_without_positive(
        protocol_root, dist):
    """Query list = gallery list. Per query (pid, camera, angle), the gallery after removing the
    same-pid same-camera items (the query itself among them), ranked by angle:
    a (1, 0, 0):   d c e f -> positive c at 2: AP 1/2;  b (1, 0, 2): the same, AP 1/2;
    c (1, 1, 50):  d e b a f -> b, a at 3, 4: AP (1/3 + 2/4) / 2 = 5/12;
    d (2, 0, 20):  b a c e f -> e at 4: AP 1/4;  e (2, 1, 90): c f d b a -> d at 3: AP 1/3;
    f (3, 2, 140): no positive, dropped.  mAP = (1/2 + 1/2 + 5/12 + 1/4 + 1/3) / 5 = 0.4, R1 0.
    Catches: same-camera junk kept (mAP 0.62), self-match kept, a query without positive
    counted as AP 0 (1/3), query and gallery taken as separate lists."""
    m = protocol_metrics("RGBNT201", protocol_root, "TEST.DIST", dist)
    assert m["num_query"] == 6 and m["num_gallery"] == 6
    assert m["mAP"] == pytest.approx(0.4) and m["R1"] == 0.0
    assert m["R5"] == pytest.approx(1.0)  # every valid query's positive is within rank 4


def test_rgbnt100_protocol_removes_same_camera_and_drops_queries_without_positive(protocol_root):
    """Separate query and gallery. Query (1, cam 0, 0 deg): gallery g1 (1, cam 0, 5) is junk,
    then g2 (pid 2, 20), g3 (1, cam 1, 30): AP 1/2. Query (9, cam 0) has no positive: dropped.
    mAP 0.5. Catches: same-camera junk kept (AP (1 + 2/3) / 2), the query without positive
    counted (mAP 1/4), the query rows ranked as gallery (the RGBNT201 rule applied here)."""
    m = protocol_metrics("RGBNT100", protocol_root)
    assert m["num_query"] == 2 and m["num_gallery"] == 3
    assert m["mAP"] == pytest.approx(0.5) and m["R1"] == 0.0 and m["R5"] == 1.0


def test_msvr310_protocol_removes_same_scene_not_same_camera(protocol_root):
    """Query (vid 1, scene 1, camera 0, 0 deg); gallery g1 (1, scene 1, camera 1, 5): same
    scene, junk; g2 (vid 2, 20); g3 (1, scene 2, camera 0, 30): same camera, other scene, a
    positive. Ranked: g2 g3: AP 1/2. Catches: the scene labels not used (camera rule: g3 junk,
    g1 first: AP 1), no junk removed (AP (1 + 2/3) / 2)."""
    m = protocol_metrics("MSVR310", protocol_root)
    assert m["num_query"] == 1 and m["num_gallery"] == 3
    assert m["mAP"] == pytest.approx(0.5) and m["R1"] == 0.0


# ---------------------------------------------------------------------------------------------
# MODEL: the model build_model makes from the config
# ---------------------------------------------------------------------------------------------
def _batch(b=8, cams=4, classes=6, size=(64, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(b, 3, 3, *size, generator=g),
            "camids": torch.arange(b) % cams, "pids": torch.arange(b) // 2 % classes}


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg, 6, 4)


def test_backbone_depth_and_drop_path_reach_timm(tiny_cfg):
    """Breakages: MODEL.BACKBONE_DEPTH not passed (timm's 12 blocks); MODEL.DROP_PATH not passed
    (every block's DropPath an Identity). timm spreads the rate linearly: the last block gets it."""
    blocks = _model(tiny_cfg("MODEL.BACKBONE_DEPTH", "2", "MODEL.DROP_PATH", "0.4")).backbone.vit.blocks
    assert len(blocks) == 2
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.4)


def test_proj_dim_sets_the_token_width(tiny_cfg):
    """Breakage: MODEL.PROJ_DIM not passed (tokens keep the backbone width, 192)."""
    out = _model(tiny_cfg("MODEL.PROJ_DIM", "24")).eval().forward_features(
        _batch()["images"], _batch()["camids"])
    assert out["tokens"].shape[-1] == 24


def test_reg_tokens_reach_the_backbone(tiny_cfg):
    """Breakage: MODEL.REG_TOKENS not passed to timm (no register tokens)."""
    assert _model(tiny_cfg("MODEL.REG_TOKENS", "3")).backbone.vit.reg_token.shape[1] == 3


def test_pos_embed_resize_reaches_the_resampling(tiny_cfg):
    """STRIDE_SIZE 8 resamples the position embeddings to the denser grid: bicubic (antialiased)
    and bilinear give other embeddings from the same initial ones. Breakage:
    MODEL.POS_EMBED_RESIZE not passed to the backbone (bilinear)."""
    def pos_embed(mode):
        cfg = tiny_cfg("MODEL.STRIDE_SIZE", "[8, 8]", "MODEL.POS_EMBED_RESIZE", mode)
        return _model(cfg).backbone.vit.pos_embed.detach()

    assert not torch.allclose(pos_embed("bilinear"), pos_embed("bicubic"))


def test_sie_coe_scales_the_camera_embedding(tiny_cfg):
    """Breakage: MODEL.SIE_COE not passed (1.0): with 0 the camera embedding must not change the
    features; with 1 it does."""
    batch = _batch()
    for coe, camera_matters in (("0.0", False), ("1.0", True)):
        model = _model(tiny_cfg("MODEL.SIE_CAMERA", "True", "MODEL.SIE_COE", coe)).eval()
        with torch.no_grad():
            torch.nn.init.normal_(model.backbone.cam_embed, std=1.0)
            a = model.forward_features(batch["images"], torch.zeros(8, dtype=torch.long))
            b = model.forward_features(batch["images"], torch.full((8,), 3))
        assert torch.equal(a["tokens"], b["tokens"]) != camera_matters


def test_reid_loss_options_reach_the_loss(tiny_cfg):
    """The run's loss equals the formula with the config's values, for the ori head:
    ID_LOSS_WEIGHT x CE(label smoothing LABEL_SMOOTH) and TRIPLET_LOSS_WEIGHT x mean
    relu(d_ap - d_an + TRIPLET_MARGIN) (TRIPLET_SOFT_MARGIN False). Breakages: any of the five
    keys not passed to ReIDLoss, or two of them swapped (ID and triplet weights, smoothing and
    margin); TRIPLET_SOFT_MARGIN inverted."""
    cfg = tiny_cfg("MODEL.ID_LOSS_WEIGHT", "0.7", "MODEL.TRIPLET_LOSS_WEIGHT", "1.3",
                   "MODEL.LABEL_SMOOTH", "0.2", "MODEL.TRIPLET_MARGIN", "5.0",
                   "MODEL.TRIPLET_SOFT_MARGIN", "False")
    model, batch = _model(cfg).train(), _batch()
    with torch.no_grad():
        outputs = model.forward_features(batch["images"], batch["camids"])
        losses = model.losses(outputs, batch["pids"])["losses"]
    head, pids = outputs["heads"]["ori"], batch["pids"]
    ce = torch.nn.functional.cross_entropy(head.logits.float(), pids, label_smoothing=0.2)
    dist = torch.cdist(head.feat.float(), head.feat.float())
    same = pids[:, None] == pids[None, :]
    d_ap = dist.masked_fill(~same, -1.0).max(1).values
    d_an = dist.masked_fill(same, float("inf")).min(1).values
    triplet = torch.relu(d_ap - d_an + 5.0).mean()
    assert float(losses["ori/id"]) == pytest.approx(0.7 * float(ce), rel=1e-5)
    assert float(losses["ori/triplet"]) == pytest.approx(1.3 * float(triplet), rel=1e-4)


def test_atmoe_heads_reach_the_experts(tiny_cfg):
    """Breakage: MODEL.ATMOE.HEADS not passed to ATMoE (its default): the experts are per head."""
    model = _model(tiny_cfg("MODEL.HDM.ENABLED", "True", "MODEL.ATMOE.ENABLED", "True",
                            "MODEL.ATMOE.HEADS", "3", "MODEL.PROJ_DIM", "24"))
    assert model.atmoe.expert_weight.shape[:2] == (7, 3)


def test_hdm_heads_reach_its_attention(tiny_cfg):
    """Breakage: MODEL.HDM.NUM_HEADS not passed to HDM (8)."""
    model = _model(tiny_cfg("MODEL.HDM.ENABLED", "True", "MODEL.HDM.NUM_HEADS", "3",
                            "MODEL.PROJ_DIM", "24"))
    assert model.hdm.num_heads == 3
    assert all(getattr(a, "num_heads", 3) == 3 for a in model.hdm.attn)


SDTPS = ("MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "mean")


@pytest.mark.parametrize("ratio,kept", [("0.25", 2), ("0.5", 4)])
def test_sdtps_sparse_ratio_sets_the_kept_patches(tiny_cfg, ratio, kept):
    """64x32 images: 8 patches; K = ceil(8 x ratio) per modality. Breakage:
    MODEL.SDTPS.SPARSE_RATIO not passed (0.7: 6 kept)."""
    model = _model(tiny_cfg(*SDTPS, "MODEL.SDTPS.SPARSE_RATIO", ratio)).eval()
    out = model.forward_features(_batch()["images"], _batch()["camids"])
    assert (out["keep_mask"].sum(-1) == kept).all()


def test_sdtps_gate_init_and_heads_reach_the_gates(tiny_cfg):
    """Breakages: MODEL.SDTPS.GATE_INIT_SCALE passed as the bias (or the two swapped),
    GATE_INIT_BIAS not passed, NUM_HEADS not passed (4)."""
    model = _model(tiny_cfg(*SDTPS, "MODEL.SDTPS.GATE_INIT_SCALE", "0.3",
                            "MODEL.SDTPS.GATE_INIT_BIAS", "-0.6", "MODEL.SDTPS.NUM_HEADS", "2"))
    assert model.sdtps.gate_scale.shape[-1] == 2
    assert torch.all(model.sdtps.gate_scale == torch.tensor(0.3))
    assert torch.all(model.sdtps.gate_bias == torch.tensor(-0.6))


@pytest.mark.parametrize("key,value", [("MODEL.SDTPS.GATE_NORM", "heads"),
                                       ("MODEL.SDTPS.GATE_NORM", "patches"),
                                       ("MODEL.SDTPS.RENORM_ATTN", "True"),
                                       ("MODEL.SDTPS.SCORE_COMBINE", "learned")])
def test_sdtps_options_change_the_selection_scores(tiny_cfg, key, value):
    """The same weights and input give other SDTPS scores with the option set. Breakages:
    GATE_NORM, RENORM_ATTN or SCORE_COMBINE not passed to SDTPS (their defaults)."""
    batch = _batch()

    def scores(*opts):
        model = _model(tiny_cfg(*SDTPS, *opts)).eval()
        with torch.no_grad():
            if model.sdtps.combine_logits is not None:  # learned combination: away from uniform
                model.sdtps.combine_logits.copy_(torch.arange(9.0).view(3, 3))
            return model.forward_features(batch["images"], batch["camids"])["selection"].scores

    plain = scores()
    assert not torch.allclose(plain, scores(key, value))


def test_dgaf_tau_and_init_alpha_reach_dgaf(tiny_cfg):
    """Breakages: MODEL.DGAF.TAU not passed (1.0: the entropy gate's temperature);
    MODEL.DGAF.INIT_ALPHA not passed (0.5), or passed as 1 - alpha."""
    model = _model(tiny_cfg("MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "dgaf",
                            "MODEL.DGAF.TAU", "2.5", "MODEL.DGAF.INIT_ALPHA", "0.3",
                            "MODEL.DGAF.NUM_HEADS", "2"))
    assert model.dgaf.tau == 2.5
    assert float(torch.sigmoid(model.dgaf.alpha_logit.detach())) == pytest.approx(0.3)


# ---------------------------------------------------------------------------------------------
# INPUT, DATASETS, DATALOADER: the loaders build_data makes from the config
# ---------------------------------------------------------------------------------------------
NO_AUG = ("INPUT.FLIP_PROB", "0.0", "INPUT.PADDING", "0", "INPUT.RE_PROB", "0.0",
          "INPUT.PIXEL_MEAN", "[0.3, 0.4, 0.5]", "INPUT.PIXEL_STD", "[0.2, 0.25, 0.3]",
          "INPUT.TRAIN_INTERPOLATION", "bilinear", "INPUT.SIZE_TRAIN", "[48, 24]")
AUG_PATHS = {"loader": (), "model": ("INPUT.AUG_DEVICE", "model"), "cache": ("DATALOADER.CACHE", "memory")}


def train_batch(cfg):
    """(augmented normalised images (B, 3, 3, H, W), the same samples read, resized with
    INPUT.TRAIN_INTERPOLATION and normalised, unaugmented, the batch as loaded, the DataBundle)
    of the run's first training batch."""
    from data.datasets import read_triplet
    from data.transforms import pil_triplet_to_tensor

    data = build_data(cfg)
    torch.manual_seed(0)  # the augmentation's draws: the same batch on every run
    batch = next(iter(data.train_loader))
    images = batch["images"]
    if data.train_augment is not None:
        images = data.train_augment(images)
    mean = torch.tensor(cfg.INPUT.PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(cfg.INPUT.PIXEL_STD).view(1, 3, 1, 1)
    plain = torch.stack([(pil_triplet_to_tensor(read_triplet(data.dataset.train[i]), cfg.INPUT.SIZE_TRAIN,
                                                cfg.INPUT.TRAIN_INTERPOLATION) - mean) / std
                         for i in batch["index"].tolist()])
    return images, plain, batch, data


@pytest.mark.parametrize("path", AUG_PATHS)
def test_without_augmentation_training_images_are_the_normalised_images(tiny_cfg, path):
    """FLIP_PROB 0, PADDING 0, RE_PROB 0: the training batch is exactly the resized, normalised
    images, by each augmentation path. Breakages: FLIP_PROB, PADDING or RE_PROB not passed (their
    defaults augment); PIXEL_MEAN / PIXEL_STD not passed or swapped; SIZE_TRAIN not used for
    training images; INPUT.AUG_DEVICE or DATALOADER.CACHE ignored (the loader sends uint8
    batches only with AUG_DEVICE model; the cache serves whole batches)."""
    from data.cache import CachedBatches

    images, plain, batch, data = train_batch(tiny_cfg(*NO_AUG, *AUG_PATHS[path]))
    assert images.shape[-2:] == (48, 24)
    assert torch.allclose(images, plain, atol=1e-5)
    assert (batch["images"].dtype == torch.uint8) == (path == "model")
    assert isinstance(data.train_loader.dataset, CachedBatches) == (path == "cache")


@pytest.mark.parametrize("path", AUG_PATHS)
def test_flip_prob_one_mirrors_every_training_image(tiny_cfg, path):
    """Breakages: INPUT.FLIP_PROB not passed, or inverted (1 - p: no flip)."""
    images, plain, *_ = train_batch(tiny_cfg(*NO_AUG, "INPUT.FLIP_PROB", "1.0", *AUG_PATHS[path]))
    assert torch.allclose(images, plain.flip(-1), atol=1e-5)


def test_train_interpolation_reaches_the_training_resize(tiny_cfg):
    """Images resized from 64x32 to 48x24: bicubic differs from bilinear. Breakage:
    INPUT.TRAIN_INTERPOLATION not passed (the training images resized bilinearly)."""
    images, plain, *_ = train_batch(tiny_cfg(*NO_AUG, "INPUT.TRAIN_INTERPOLATION", "bicubic"))
    assert torch.allclose(images, plain, atol=1e-5)  # plain: resized bicubic too
    bilinear, *_ = train_batch(tiny_cfg(*NO_AUG))
    assert not torch.allclose(images, bilinear, atol=1e-3)


def test_padding_shifts_every_image_by_at_most_padding(tiny_cfg):
    """INPUT.PADDING 3: every training image is the plain image shifted by (dy, dx) in [-3, 3]^2,
    zero-padded (-mean / std after normalisation), and some shift is not zero. Breakages: PADDING
    not passed (10: shifts up to 10; or 0: none)."""
    cfg = tiny_cfg(*NO_AUG, "INPUT.PADDING", "3")
    images, plain, *_ = train_batch(cfg)
    fill = (-torch.tensor(cfg.INPUT.PIXEL_MEAN) / torch.tensor(cfg.INPUT.PIXEL_STD)).view(3, 1, 1)
    shifts = []
    for got, ref in zip(images.flatten(0, 1), plain.flatten(0, 1)):
        padded = torch.nn.functional.pad(ref - fill, (3, 3, 3, 3)) + fill
        found = [(dy, dx) for dy in range(7) for dx in range(7)
                 if torch.allclose(padded[:, dy:dy + 48, dx:dx + 24], got, atol=1e-5)]
        assert found, "a training image is no shift of its image within INPUT.PADDING"
        shifts.append(found[0])
    assert any(s != (3, 3) for s in shifts)


def test_random_erasing_prob_and_area(tiny_cfg):
    """RE_PROB 1 erases one box in every image, of RE_AREA's share: with [0.25, 0.25] about a
    quarter of the pixels change (box sides rounded: 0.15-0.35). Breakages: INPUT.RE_PROB not
    passed (0.5: some images unchanged); INPUT.RE_AREA not passed ([0.02, 1/3])."""
    images, plain, *_ = train_batch(tiny_cfg(*NO_AUG, "INPUT.RE_PROB", "1.0", "INPUT.RE_AREA",
                                            "[0.25, 0.25]"))
    changed = (images != plain).any(dim=2).float().mean(dim=(-2, -1))  # (B, 3) per modality
    assert ((changed > 0.15) & (changed < 0.35)).all(), changed


@pytest.mark.parametrize("sync", [True, False])
def test_sync_modality_aug_shares_the_flip(tiny_cfg, sync):
    """FLIP_PROB 0.5: with SYNC_MODALITY_AUG the three modalities of every sample are all flipped
    or all not; without, some sample's modalities differ (8 samples: all agreeing by chance has
    probability 4^-8, and the run is seeded). Breakage: INPUT.SYNC_MODALITY_AUG not passed or
    inverted."""
    images, plain, *_ = train_batch(tiny_cfg(*NO_AUG, "INPUT.FLIP_PROB", "0.5",
                                            "INPUT.SYNC_MODALITY_AUG", str(sync)))
    flipped = torch.tensor([[not torch.allclose(images[b, m], plain[b, m], atol=1e-5)
                             for m in range(3)] for b in range(len(images))])
    for b in range(len(images)):  # each modality is either plain or mirrored
        for m in range(3):
            ref = plain[b, m].flip(-1) if flipped[b, m] else plain[b, m]
            assert torch.allclose(images[b, m], ref, atol=1e-5)
    agree = (flipped == flipped[:, :1]).all(dim=1)
    assert bool(agree.all()) == sync


def test_num_instance_sets_the_instances_per_identity(tiny_cfg):
    """Breakage: DATALOADER.NUM_INSTANCE not passed to the identity sampler."""
    cfg = tiny_cfg("DATALOADER.NUM_INSTANCE", "3", "SOLVER.IMS_PER_BATCH", "6")
    for batch in build_data(cfg).train_loader:
        counts = torch.bincount(batch["pids"])
        assert sorted(counts[counts > 0].tolist()) == [3, 3]


def test_loader_sizes_and_workers(tiny_cfg):
    """Breakages: TEST.IMS_PER_BATCH not passed to the evaluation loader, INPUT.SIZE_TEST not used
    for the evaluation images, DATALOADER.NUM_WORKERS not passed to the loaders."""
    data = build_data(tiny_cfg("TEST.IMS_PER_BATCH", "5", "DATALOADER.NUM_WORKERS", "1",
                               "INPUT.SIZE_TEST", "[48, 24]"))
    loader = data.eval_sets["test"].loader
    batch = next(iter(loader))
    assert loader.batch_size == 5 and batch["images"].shape == (5, 3, 3, 48, 24)
    assert loader.num_workers == 1 and data.train_loader.num_workers == 1


def test_val_ids_carve_identities_out_of_training(tiny_cfg):
    """DATASETS.VAL_IDS 2 of the 6 training identities: 4 classes; a val split of 2 identities,
    none of them trained on. Breakage: VAL_IDS not passed to the split (no val set)."""
    data = build_data(tiny_cfg("DATASETS.VAL_IDS", "2"))
    assert data.num_classes == 4
    val = data.eval_sets["val"]
    assert len({s.pid for s in val.samples}) == 2 and val.shared
    train_paths = {s.paths for s in data.dataset.train} - {s.paths for s in val.samples}
    assert len(train_paths) == 4 * 6


def test_synthetic_options_reach_the_generator(tiny_cfg):
    """The tiny synthetic dataset built from the config's DATASETS.SYNTHETIC keys: 6 training and
    4 test identities, 6 triplets each, 64x32. Breakage: a DATASETS.SYNTHETIC key not passed to
    the generator (the defaults would not match the generated folder: an error)."""
    data = build_data(tiny_cfg())
    assert data.num_classes == 6 and len(data.dataset.train) == 36 and data.num_cams == 4
    assert len({s.pid for s in data.dataset.query}) == 4 and len(data.dataset.query) == 24


# ---------------------------------------------------------------------------------------------
# SOLVER: the optimizer, schedule and trainer the run builds
# ---------------------------------------------------------------------------------------------
def _optimizer(cfg):
    from solver.build import build_optimizer

    return build_optimizer(cfg, _model(cfg))


def test_bias_lr_factor_and_weight_decays_reach_the_groups(tiny_cfg):
    """Breakages: SOLVER.BIAS_LR_FACTOR not passed (2.0); SOLVER.WEIGHT_DECAY and
    WEIGHT_DECAY_BIAS not passed or swapped."""
    opt = _optimizer(tiny_cfg(*SDTPS, "SOLVER.BIAS_LR_FACTOR", "3.0", "SOLVER.PARAM_GROUPS", "demo",
                              "SOLVER.WEIGHT_DECAY", "0.03", "SOLVER.WEIGHT_DECAY_BIAS", "0.07"))
    biases = [g for g in opt.param_groups if g["kind"] == "bias"]
    assert biases and all(g["lr"] == pytest.approx(3.0 * 0.001) for g in biases)
    assert {g["weight_decay"] for g in biases} == {0.07}
    assert {g["weight_decay"] for g in opt.param_groups if g["kind"] == "base"} == {0.03}


def test_optimizer_and_momentum(tiny_cfg):
    """Breakages: SOLVER.OPTIMIZER ignored (always Adam); SOLVER.MOMENTUM not passed to SGD."""
    sgd = _optimizer(tiny_cfg("SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.6"))
    assert isinstance(sgd, torch.optim.SGD) and {g["momentum"] for g in sgd.param_groups} == {0.6}
    assert type(_optimizer(tiny_cfg("SOLVER.OPTIMIZER", "AdamW"))) is torch.optim.AdamW


def _epoch_lrs(cfg, epochs=6):
    from solver.build import build_scheduler, set_epoch_lr

    opt = _optimizer(cfg)
    sched = build_scheduler(cfg, opt)
    lrs = []
    for epoch in range(epochs):
        set_epoch_lr(sched, epoch, cfg.SOLVER.SCHEDULE_START)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_lr_noise_seed_and_std_reach_the_schedule(tiny_cfg):
    """Same LR_NOISE_SEED: the same rates; another seed: others. LR_NOISE_STD 1e-9: the rates
    of the noise-free schedule. Breakages: SOLVER.LR_NOISE_SEED not passed (42),
    SOLVER.LR_NOISE_STD not passed (1.0), SOLVER.LR_NOISE not passed."""
    opts = ("SOLVER.MAX_EPOCHS", "6", "SOLVER.WARMUP_EPOCHS", "2", "SOLVER.LR_NOISE", "0.5")
    seed7 = _epoch_lrs(tiny_cfg(*opts, "SOLVER.LR_NOISE_SEED", "7"))
    assert seed7 == _epoch_lrs(tiny_cfg(*opts, "SOLVER.LR_NOISE_SEED", "7"))
    assert seed7 != _epoch_lrs(tiny_cfg(*opts, "SOLVER.LR_NOISE_SEED", "8"))
    quiet = _epoch_lrs(tiny_cfg(*opts, "SOLVER.LR_NOISE_STD", "1e-9"))
    clean = _epoch_lrs(tiny_cfg(*opts[:-2], "SOLVER.LR_NOISE", "0.0"))
    assert quiet == pytest.approx(clean, rel=1e-6) and seed7 != pytest.approx(clean, rel=1e-3)


@pytest.mark.parametrize("clip", ["0.01", "0.0"])
def test_grad_clip_bounds_the_gradient_norm_of_a_step(tiny_cfg, clip):
    """After one Trainer step the total gradient norm is at most SOLVER.GRAD_CLIP (0.01, far
    below this step's norm); with 0 it is not clipped. Breakages: GRAD_CLIP not applied,
    or clipping at a fixed norm."""
    from engine.trainer import Trainer

    cfg = tiny_cfg("SOLVER.GRAD_CLIP", clip)
    data = build_data(cfg)
    trainer = Trainer(cfg, _model(cfg), data, torch.device("cpu"))
    trainer.train_step(next(iter(data.train_loader)))
    norm = torch.norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()
                                   if p.grad is not None]))
    assert (float(norm) <= 0.01 * (1 + 1e-4)) == (clip != "0.0")


@pytest.mark.parametrize("value", [True, False])
def test_deterministic_reaches_torch(tiny_opts, value):
    """Breakage: SOLVER.DETERMINISTIC not passed to set_deterministic (or inverted)."""
    from config import default_argument_parser
    from engine.defaults import default_setup

    before = torch.are_deterministic_algorithms_enabled()
    try:
        args = default_argument_parser().parse_args(list(tiny_opts) + ["SOLVER.DETERMINISTIC", str(value)])
        default_setup(args)
        assert torch.are_deterministic_algorithms_enabled() == value
    finally:
        torch.use_deterministic_algorithms(before)


def test_periods_of_evaluation_checkpoints_and_log(tiny_opts):
    """3 epochs with EVAL_PERIOD 2, CHECKPOINT_PERIOD 2, KEEP_LAST 5, LOG_PERIOD 2: evaluations
    after epochs 2 and 3 (the last), checkpoints of epochs 2 and 3, a step line for step 2, none
    for step 1. Breakages: SOLVER.EVAL_PERIOD, CHECKPOINT_PERIOD or LOG_PERIOD not passed
    to its hook (1: every epoch / step)."""
    import train_net
    from utils.checkpoint import epoch_checkpoints

    out = tiny_opts[tiny_opts.index("OUTPUT_DIR") + 1]
    summary = train_net.main(list(tiny_opts) + [
        "SOLVER.MAX_EPOCHS", "3", "SOLVER.EVAL_PERIOD", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
        "SOLVER.KEEP_LAST", "5", "SOLVER.LOG_PERIOD", "2"])
    assert summary["last"]["epoch"] == 3 and summary["best"]["epoch"] in (2, 3)
    assert sorted(epoch for epoch, _ in epoch_checkpoints(out)) == [2, 3]
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert "epoch 1 iter 2/" in log and "epoch 1 iter 1/" not in log
    assert "epoch 1 test" not in log and "epoch 2 test" in log and "epoch 3 test" in log


# ---------------------------------------------------------------------------------------------
# TEST: the evaluators the run builds
# ---------------------------------------------------------------------------------------------
RERANK = ("TEST.RERANK.ENABLED", "True", "TEST.RERANK.K1", "3", "TEST.RERANK.K2", "1")


def test_rerank_lambda_weighs_the_original_distance(protocol_root):
    """TEST.RERANK.LAMBDA 1: the re-ranked distance is the original one (per query, rescaled), so
    the metrics are exactly those without re-ranking; 0 (the Jaccard distance alone) changes
    them here. Breakage: LAMBDA not passed to re_ranking (0.3)."""
    plain = protocol_metrics("RGBNT201", protocol_root)["mAP"]
    assert protocol_metrics("RGBNT201", protocol_root, *RERANK, "TEST.RERANK.LAMBDA", "1.0")["mAP"] == \
        pytest.approx(plain, abs=1e-12)
    assert protocol_metrics("RGBNT201", protocol_root, *RERANK, "TEST.RERANK.LAMBDA", "0.0")["mAP"] != \
        pytest.approx(plain, abs=1e-6)


def test_evaluators_are_those_the_config_lists(tiny_cfg):
    """Breakage: TEST.EVALUATORS ignored (always reid and foreground)."""
    from engine.evaluator import ForegroundPrecisionEvaluator, ReIDEvaluator

    cfg = tiny_cfg("TEST.EVALUATORS", "['reid']")
    eval_set = build_data(cfg).eval_sets["test"]
    assert [type(e) for e in build_evaluators(cfg, eval_set)] == [ReIDEvaluator]
    cfg = tiny_cfg("TEST.EVALUATORS", "['reid', 'foreground']")
    assert [type(e) for e in build_evaluators(cfg, eval_set)] == [ReIDEvaluator,
                                                                  ForegroundPrecisionEvaluator]


def test_report_feats_are_scored_beside_the_retrieval_feature(protocol_root):
    """Breakage: TEST.REPORT_FEATS not passed to the evaluator (no by_feat report)."""
    m = protocol_metrics("RGBNT201", protocol_root, "TEST.REPORT_FEATS", "['ori']")
    assert m["by_feat"]["ori"]["mAP"] == m["mAP"] == pytest.approx(0.4)
