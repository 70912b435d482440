"""modeling/losses.py against values worked out by hand.

Worked example A: 4 samples x 2 dims, pids [0, 0, 1, 1]
    x0 (0, 0), x1 (3, 4), x2 (6, 0), x3 (6, 3)
    d01 = 5, d02 = 6, d03 = sqrt(45), d12 = 5, d13 = sqrt(10), d23 = 3
    hardest positive  d_ap: 5, 5, 3, 3
    hardest negative  d_an: 6, sqrt(10), 5, sqrt(10)   (easiest: sqrt(45), 5, 6, sqrt(45))

Worked example B: 6 samples x 2 dims, pids [0, 0, 0, 1, 1, 1] (two positives per anchor)
    a (0, 0), b (3, 0), c (0, 4)  |  d (8, 0), e (8, 3), f (12, 0)
    positives: ab 3, ac 4, bc 5  |  de 3, df 4, ef 5
    hardest positive: a 4, b 5, c 5, d 4, e 5, f 5
    easiest positive: a 3, b 3, c 4, d 3, e 3, f 4
    negatives: ad 8, ae sqrt(73), af 12, bd 5, be sqrt(34), bf 9, cd sqrt(80), ce sqrt(65), cf sqrt(160)
    hardest negative: a 8, b 5, c sqrt(65), d 5, e sqrt(34), f 9
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from modeling.heads import HeadOutput
from modeling.losses import CrossEntropyLabelSmooth, ReIDLoss, TripletLoss, euclidean_dist

X_A = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 0.0], [6.0, 3.0]])
PIDS_A = torch.tensor([0, 0, 1, 1])
AP_A = [5.0, 5.0, 3.0, 3.0]
AN_A = [6.0, math.sqrt(10), 5.0, math.sqrt(10)]

X_B = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [8.0, 0.0], [8.0, 3.0], [12.0, 0.0]])
PIDS_B = torch.tensor([0, 0, 0, 1, 1, 1])
AP_B = [4.0, 5.0, 5.0, 4.0, 5.0, 5.0]
AN_B = [8.0, 5.0, math.sqrt(65), 5.0, math.sqrt(34), 9.0]

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
TARGETS = torch.tensor([0, 1])


def softplus(v):
    return math.log1p(math.exp(v))


def smoothed_ce_by_hand(logits, targets, eps):
    logp = torch.log_softmax(logits, dim=1)
    c = logits.shape[1]
    rows = [-(1 - eps) * logp[i, t] - eps / c * logp[i].sum() for i, t in enumerate(targets.tolist())]
    return float(sum(rows) / len(rows))


# ------------------------------------------------------------------ euclidean_dist
def test_euclidean_dist_by_hand():
    """Pairwise distances of example A, zero (clamped to 1e-6) on the diagonal."""
    d = euclidean_dist(X_A, X_A)
    expected = torch.tensor([[0.0, 5.0, 6.0, math.sqrt(45)],
                             [5.0, 0.0, 5.0, math.sqrt(10)],
                             [6.0, 5.0, 0.0, 3.0],
                             [math.sqrt(45), math.sqrt(10), 3.0, 0.0]])
    assert torch.allclose(d, expected, atol=1e-5)
    assert torch.allclose(euclidean_dist(X_A[:1], X_A[2:]), torch.tensor([[6.0, math.sqrt(45)]]))


# ------------------------------------------------------------------ label smoothing
def test_label_smoothing_by_hand():
    """-(1-eps) log p_y - eps/C sum_c log p_c, eps 0.1, on a 2x3 logits tensor.
    Catches label smoothing ignored (breakage label-smoothing-ignored)."""
    got = CrossEntropyLabelSmooth(0.1)(LOGITS, TARGETS).item()
    expected = smoothed_ce_by_hand(LOGITS, TARGETS, 0.1)
    plain = smoothed_ce_by_hand(LOGITS, TARGETS, 0.0)
    assert abs(expected - plain) > 0.02  # smoothing really changes the value here
    assert got == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_zero_is_cross_entropy():
    """eps 0 is the plain cross entropy -log p_y."""
    logp = torch.log_softmax(LOGITS, dim=1)
    expected = float(-(logp[0, 0] + logp[1, 1]) / 2)
    assert CrossEntropyLabelSmooth(0.0)(LOGITS, TARGETS).item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------ triplet loss
def test_triplet_soft_margin_example_a():
    """mean softplus(d_ap - d_an) with the hardest positive and negative of example A.
    Catches the easiest (self) positive or the easiest negative being used."""
    expected = sum(softplus(p - n) for p, n in zip(AP_A, AN_A)) / 4
    got = TripletLoss(margin=0.3, soft_margin=True)(X_A, PIDS_A).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_triplet_margin_example_a():
    """mean relu(d_ap - d_an + 0.3) of example A: only anchors 1 and 3 are active.
    Catches the margin variant broken or the soft margin used instead."""
    expected = ((5 - math.sqrt(10) + 0.3) + (3 - math.sqrt(10) + 0.3)) / 4
    got = TripletLoss(margin=0.3, soft_margin=False)(X_A, PIDS_A).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_triplet_hardest_positive_not_easiest_example_b():
    """Example B, where every anchor's hardest and easiest positive differ.
    Catches the easiest positive used (breakage triplet-easiest-positive)."""
    easiest = [3.0, 3.0, 4.0, 3.0, 3.0, 4.0]
    expected = sum(softplus(p - n) for p, n in zip(AP_B, AN_B)) / 6
    wrong = sum(softplus(p - n) for p, n in zip(easiest, AN_B)) / 6
    assert abs(expected - wrong) > 0.1
    assert TripletLoss(soft_margin=True)(X_B, PIDS_B).item() == pytest.approx(expected, rel=1e-5)
    # margin 2: anchors b (5 - 5 + 2), d (4 - 5 + 2), e (5 - sqrt(34) + 2) are active
    expected_margin = (2.0 + 1.0 + (7.0 - math.sqrt(34))) / 6
    got = TripletLoss(margin=2.0, soft_margin=False)(X_B, PIDS_B).item()
    assert got == pytest.approx(expected_margin, rel=1e-5)


def test_triplet_hardest_negative_not_easiest_example_b():
    """Example B with the hardest negative per anchor; the easiest negatives (12, 9, sqrt(160),
    8, sqrt(73), 12) would give a smaller loss. Catches breakage triplet-easiest-negative."""
    easiest_neg = [12.0, 9.0, math.sqrt(160), 8.0, math.sqrt(73), 12.0]
    expected = sum(softplus(p - n) for p, n in zip(AP_B, AN_B)) / 6
    wrong = sum(softplus(p - n) for p, n in zip(AP_B, easiest_neg)) / 6
    assert expected - wrong > 0.1
    assert TripletLoss(soft_margin=True)(X_B, PIDS_B).item() == pytest.approx(expected, rel=1e-5)


def test_triplet_soft_margin_flag_is_honoured():
    """soft_margin True and False give the two different hand values of example A.
    Catches the soft margin ignored (breakage triplet-soft-margin-ignored)."""
    soft = TripletLoss(margin=0.3, soft_margin=True)(X_A, PIDS_A).item()
    hard = TripletLoss(margin=0.3, soft_margin=False)(X_A, PIDS_A).item()
    assert soft == pytest.approx(sum(softplus(p - n) for p, n in zip(AP_A, AN_A)) / 4, rel=1e-5)
    assert hard == pytest.approx(((5 - math.sqrt(10) + 0.3) + (3 - math.sqrt(10) + 0.3)) / 4, rel=1e-5)


def test_triplet_without_negatives_is_zero_with_gradient():
    """A batch of one identity has no negative: loss 0, still part of the graph."""
    feat = X_A.clone().requires_grad_(True)
    loss = TripletLoss()(feat, torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert feat.grad is not None


def test_triplet_gradient_reaches_the_hardest_pairs_only():
    """Example A, margin 2: every anchor is active; the gradient of x0 comes from d01 (its
    hardest positive, anchor 0 and 1) and d02 (its hardest negative), not from d03."""
    feat = X_A.clone().requires_grad_(True)
    TripletLoss(margin=2.0, soft_margin=False)(feat, PIDS_A).backward()
    # d_ap - d_an per anchor: 0: d01 - d02, 1: d01 - d13, 2: d23 - d12, 3: d23 - d13
    # d/dx0 = (d(d01)/dx0 * 2 - d(d02)/dx0) / 4, unit vectors (x0 - x1)/5 and (x0 - x2)/6
    u01 = (X_A[0] - X_A[1]) / 5
    u02 = (X_A[0] - X_A[2]) / 6
    assert torch.allclose(feat.grad[0], (2 * u01 - u02) / 4, atol=1e-6)


# ------------------------------------------------------------------ ReIDLoss
def _heads(**names):
    logits = torch.cat([LOGITS, LOGITS])  # 4 rows for the 4 samples of example A
    out = HeadOutput(X_A, X_A * 2.0, logits)
    return {name: out for name in names}


def test_reid_loss_weights_by_hand():
    """Per head w x ID_W x CE and w x TRI_W x triplet; the head of weight 2 has twice both
    losses. Catches the ID weight, triplet weight or head weight ignored."""
    pids = PIDS_A
    targets4 = pids  # logits rows: [LOGITS; LOGITS] against pids [0, 0, 1, 1]
    loss = ReIDLoss(id_weight=0.25, triplet_weight=3.0, label_smooth=0.1, margin=0.3,
                    soft_margin=True, head_weights={"fused": 2.0})
    out = loss({"heads": _heads(ori=1, fused=1)}, pids)
    assert set(out) == {"ori/id", "ori/triplet", "fused/id", "fused/triplet"}
    ce = smoothed_ce_by_hand(torch.cat([LOGITS, LOGITS]), targets4, 0.1)
    tri = sum(softplus(p - n) for p, n in zip(AP_A, AN_A)) / 4
    assert out["ori/id"].item() == pytest.approx(0.25 * ce, rel=1e-5)
    assert out["ori/triplet"].item() == pytest.approx(3.0 * tri, rel=1e-5)
    assert out["fused/id"].item() == pytest.approx(2 * 0.25 * ce, rel=1e-5)
    assert out["fused/triplet"].item() == pytest.approx(2 * 3.0 * tri, rel=1e-5)


def test_reid_loss_triplet_reads_pre_bn_feat():
    """The triplet loss reads HeadOutput.feat (pre-BN), not feat_bn (= 2 x feat here)."""
    out = ReIDLoss(id_weight=1.0, triplet_weight=1.0, soft_margin=False, margin=0.3)(
        {"heads": _heads(ori=1)}, PIDS_A)
    expected = ((5 - math.sqrt(10) + 0.3) + (3 - math.sqrt(10) + 0.3)) / 4
    assert out["ori/triplet"].item() == pytest.approx(expected, rel=1e-5)


def test_reid_loss_from_config():
    """from_config takes MODEL.ID_LOSS_WEIGHT, TRIPLET_LOSS_WEIGHT, LABEL_SMOOTH,
    TRIPLET_MARGIN, TRIPLET_SOFT_MARGIN and the model's loss_weights."""
    from config import build_cfg
    from tests.conftest import TINY_OPTS

    cfg = build_cfg("", TINY_OPTS + ["MODEL.ID_LOSS_WEIGHT", "0.5", "MODEL.TRIPLET_LOSS_WEIGHT", "2.0",
                                     "MODEL.LABEL_SMOOTH", "0.2", "MODEL.TRIPLET_MARGIN", "0.7",
                                     "MODEL.TRIPLET_SOFT_MARGIN", "False"])
    loss = ReIDLoss.from_config(cfg, SimpleNamespace(loss_weights={"ori": 1.0, "fused": 3.0}))
    assert (loss.id_weight, loss.triplet_weight) == (0.5, 2.0)
    assert loss.id_loss.epsilon == pytest.approx(0.2)
    assert (loss.triplet_loss.margin, loss.triplet_loss.soft_margin) == (pytest.approx(0.7), False)
    assert loss.head_weights == {"ori": 1.0, "fused": 3.0}


def test_model_fused_head_loss_weight_from_config():
    """MODEL.FUSION.LOSS_WEIGHT is the fused head's weight in the model's objective, the other
    heads 1. Catches breakage fused-loss-weight-ignored."""
    from config import build_cfg
    from modeling.model_size import build_on_meta
    from tests.conftest import TINY_OPTS

    cfg = build_cfg("", TINY_OPTS + ["MODEL.FUSION.NAME", "mean", "MODEL.FUSION.LOSS_WEIGHT", "0.5"])
    model = build_on_meta(cfg, 4, 4)
    assert model.loss_weights == {"ori": 1.0, "fused": 0.5}
    assert model.objectives["reid"].head_weights == {"ori": 1.0, "fused": 0.5}


def test_cross_entropy_matches_torch_with_smoothing():
    """Cross-check of the hand formula with torch's own label smoothing (guards the helper)."""
    assert smoothed_ce_by_hand(LOGITS, TARGETS, 0.3) == pytest.approx(
        F.cross_entropy(LOGITS, TARGETS, label_smoothing=0.3).item(), rel=1e-6)
