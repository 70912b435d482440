"""Tests for utils.metrics (evaluate_rank, compute_distance)."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.metrics import compute_distance, evaluate_rank  # noqa: E402


# --------------------------------------------------------------------------
# naive reference: one query at a time, explicit stable sort + junk removal
# --------------------------------------------------------------------------
def naive_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50,
               q_scenes=None, g_scenes=None):
    distmat = np.asarray(distmat, dtype=np.float64)
    curves, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        same_pid = g_pids[order] == q_pids[i]
        if q_scenes is not None:
            junk = same_pid & (g_scenes[order] == q_scenes[i])
        else:
            junk = same_pid & (g_camids[order] == q_camids[i])
        rel = same_pid[~junk].astype(np.float64)
        if rel.sum() == 0:
            continue
        found = np.cumsum(rel)
        curve = (found > 0).astype(np.float64)
        if curve.size < max_rank:
            curve = np.concatenate([curve, np.full(max_rank - curve.size, curve[-1])])
        curves.append(curve[:max_rank])
        precision = found / np.arange(1, rel.size + 1)
        aps.append((precision * rel).sum() / rel.sum())
        last = np.nonzero(rel)[0].max()
        inps.append(rel.sum() / (last + 1))
    if not curves:
        raise ValueError("no valid query")
    return np.mean(curves, axis=0), float(np.mean(aps)), float(np.mean(inps))


def random_case(seed, num_q=40, num_g=120, num_ids=15, num_cams=3, decimals=1,
                num_scenes=None):
    rng = np.random.default_rng(seed)
    dist = rng.random((num_q, num_g))
    if decimals is not None:
        dist = np.round(dist, decimals)            # lots of exact ties
    q_pids = rng.integers(0, num_ids, num_q)
    # a few query identities absent from the gallery -> skipped queries
    q_pids[: max(1, num_q // 10)] = num_ids + 5
    g_pids = rng.integers(0, num_ids, num_g)
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    # one identity only ever seen by one camera -> all its items are junk
    g_cams[g_pids == 0] = 0
    q_cams[q_pids == 0] = 0
    case = dict(distmat=dist.astype(np.float32), q_pids=q_pids, g_pids=g_pids,
                q_camids=q_cams, g_camids=g_cams)
    if num_scenes is not None:
        case["q_scenes"] = rng.integers(0, num_scenes, num_q)
        case["g_scenes"] = rng.integers(0, num_scenes, num_g)
    return case


def assert_same(got, want):
    cmc, m_ap, m_inp = got
    w_cmc, w_ap, w_inp = want
    assert isinstance(cmc, np.ndarray) and cmc.dtype.kind == "f"
    assert cmc.shape == w_cmc.shape
    np.testing.assert_allclose(cmc, w_cmc, rtol=0, atol=1e-6)
    assert isinstance(m_ap, float) and isinstance(m_inp, float)
    assert abs(m_ap - w_ap) < 1e-6
    assert abs(m_inp - w_inp) < 1e-6
    assert 0.0 <= m_ap <= 1.0 and 0.0 <= m_inp <= 1.0


# --------------------------------------------------------------------------
# randomised comparisons with the reference
# --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [1, 2, None])
def test_matches_reference_numpy(seed, decimals):
    case = random_case(seed, decimals=decimals)
    want = naive_eval(**case, max_rank=20)
    assert_same(evaluate_rank(**case, max_rank=20), want)
    # small chunks, serial and threaded
    assert_same(evaluate_rank(**case, max_rank=20, chunk_size=7, num_workers=1), want)
    assert_same(evaluate_rank(**case, max_rank=20, chunk_size=5, num_workers=2), want)


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_torch_inputs(seed):
    case = random_case(seed + 100, decimals=1)
    want = naive_eval(**case, max_rank=10)
    tcase = {k: torch.from_numpy(np.asarray(v)) for k, v in case.items()}
    assert_same(evaluate_rank(**tcase, max_rank=10, chunk_size=9), want)
    # float64 tensor distmat and half-precision distances are accepted too
    tcase["distmat"] = tcase["distmat"].double()
    assert_same(evaluate_rank(**tcase, max_rank=10), want)


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_scene_protocol(seed):
    case = random_case(seed + 200, decimals=1, num_scenes=3)
    want = naive_eval(**case, max_rank=15)
    assert_same(evaluate_rank(**case, max_rank=15, chunk_size=8), want)
    # the scene protocol is genuinely different from the camera protocol here
    cam = {k: v for k, v in case.items() if "scene" not in k}
    assert naive_eval(**cam, max_rank=15)[1] != pytest.approx(want[1], abs=1e-9)


def test_float16_and_integer_distances():
    case = random_case(7, decimals=1)
    want = naive_eval(**case, max_rank=10)
    half = dict(case, distmat=torch.from_numpy(case["distmat"]).half())
    # rounding to one decimal is exact enough that float16 keeps the ties
    want_half = naive_eval(**dict(case, distmat=half["distmat"].float().numpy()),
                           max_rank=10)
    assert_same(evaluate_rank(**half, max_rank=10), want_half)
    ints = dict(case, distmat=np.round(case["distmat"] * 10).astype(np.int64))
    assert_same(evaluate_rank(**ints, max_rank=10), want)


def test_large_gallery_few_ties():
    # bigger, bench-like case with float32 cosine distances
    rng = np.random.default_rng(3)
    qf = rng.standard_normal((60, 32)).astype(np.float32)
    gf = rng.standard_normal((900, 32)).astype(np.float32)
    dist = compute_distance(qf, gf).numpy()
    dist[:, 10:20] = dist[:, 10:11]               # inject exact ties
    q_pids = rng.integers(0, 40, 60)
    g_pids = rng.integers(0, 40, 900)
    q_cams = rng.integers(0, 6, 60)
    g_cams = rng.integers(0, 6, 900)
    want = naive_eval(dist, q_pids, g_pids, q_cams, g_cams)
    assert_same(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=16), want)


# --------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------
def test_hand_case_with_junk():
    # valid list: g0 (neg), g1 (pos), g2 (neg), g4 (pos); g3 is junk
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]], dtype=np.float32)
    cmc, m_ap, m_inp = evaluate_rank(dist, np.array([1]), np.array([2, 1, 3, 1, 1]),
                                     np.array([0]), np.array([1, 1, 1, 0, 1]),
                                     max_rank=6)
    np.testing.assert_allclose(cmc, [0, 1, 1, 1, 1, 1])     # padded to max_rank
    assert m_ap == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m_inp == pytest.approx(2 / 4)


def test_hand_case_all_tied_stable_by_index():
    dist = np.full((1, 4), 0.3)
    cmc, m_ap, m_inp = evaluate_rank(dist, [1], [1, 2, 1, 2], [0], [1, 1, 1, 1],
                                     max_rank=4)
    np.testing.assert_allclose(cmc, [1, 1, 1, 1])
    assert m_ap == pytest.approx((1 + 2 / 3) / 2)
    assert m_inp == pytest.approx(2 / 3)


def test_hand_case_tie_positive_after_negative():
    # equal distance: the negative has the lower index, so it ranks first
    cmc, m_ap, m_inp = evaluate_rank(np.array([[0.5, 0.5]]), [1], [2, 1], [0], [1, 1],
                                     max_rank=3)
    np.testing.assert_allclose(cmc, [0, 1, 1])
    assert m_ap == pytest.approx(0.5)
    assert m_inp == pytest.approx(0.5)


def test_hand_case_tied_junk_removed():
    # g0 is junk (same pid, same cam) tied with the positive g1
    cmc, m_ap, m_inp = evaluate_rank(np.array([[0.2, 0.2, 0.2]]), [1], [1, 1, 3],
                                     [0], [0, 1, 1], max_rank=2)
    np.testing.assert_allclose(cmc, [1, 1])
    assert m_ap == pytest.approx(1.0)
    assert m_inp == pytest.approx(1.0)


def test_hand_case_two_queries_and_skipped_query():
    dist = np.array([[0.1, 0.9, 0.5],     # q0: positive at rank 1 -> AP 1
                     [0.1, 0.9, 0.5],     # q1: positive at rank 3 (g1) -> AP 1/3
                     [0.3, 0.2, 0.1]])    # q2: only junk -> skipped
    q_pids, g_pids = [1, 2, 3], [1, 2, 3]
    q_cams, g_cams = [0, 0, 0], [1, 1, 0]
    cmc, m_ap, m_inp = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=3)
    np.testing.assert_allclose(cmc, [0.5, 0.5, 1.0])
    assert m_ap == pytest.approx((1 + 1 / 3) / 2)
    assert m_inp == pytest.approx((1 + 1 / 3) / 2)


def test_hand_case_scene_protocol():
    # g0: same pid, other camera, same scene  -> junk under the scene protocol
    # g1: same pid, same camera, other scene -> junk under the camera protocol
    dist = np.array([[0.1, 0.2, 0.3]])
    args = ([7], [7, 7, 8], [0], [1, 0, 2])
    cmc, m_ap, _ = evaluate_rank(dist, *args, max_rank=3,
                                 q_scenes=[5], g_scenes=[5, 6, 6])
    np.testing.assert_allclose(cmc, [1, 1, 1])      # g1 first in valid list
    assert m_ap == pytest.approx(1.0)
    cmc, m_ap, _ = evaluate_rank(dist, *args, max_rank=3)
    np.testing.assert_allclose(cmc, [1, 1, 1])      # g0 first in valid list
    assert m_ap == pytest.approx(1.0)
    # move the scene-valid positive behind a negative
    dist2 = np.array([[0.1, 0.4, 0.3]])
    _, m_ap, m_inp = evaluate_rank(dist2, *args, q_scenes=[5], g_scenes=[5, 6, 6])
    assert m_ap == pytest.approx(0.5) and m_inp == pytest.approx(0.5)


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
def test_no_valid_query_raises():
    dist = np.random.default_rng(0).random((3, 4))
    with pytest.raises(ValueError, match="no query has a valid positive"):
        # every match shares the query camera -> all junk
        evaluate_rank(dist, [1, 2, 3], [1, 2, 3, 4], [0, 0, 0], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="no query has a valid positive"):
        # no query identity in the gallery
        evaluate_rank(dist, [9, 9, 9], [1, 2, 3, 4], [0, 0, 0], [1, 1, 1, 1])


def test_bad_inputs_raise():
    dist = np.zeros((2, 3))
    with pytest.raises(ValueError):
        evaluate_rank(dist, [1], [1, 2, 3], [0, 0], [1, 1, 1])          # wrong length
    with pytest.raises(ValueError):
        evaluate_rank(dist, [1, 2], [1, 2, 3], [0, 0], [1, 1, 1], q_scenes=[0, 0])
    with pytest.raises(ValueError):
        evaluate_rank(np.zeros(3), [1], [1, 2, 3], [0], [1, 1, 1])
    bad = np.array([[0.1, np.nan, 0.2], [0.1, 0.2, 0.3]])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(bad, [1, 2], [1, 2, 3], [0, 0], [1, 1, 1])


# --------------------------------------------------------------------------
# compute_distance
# --------------------------------------------------------------------------
def test_compute_distance_shapes_and_values():
    rng = np.random.default_rng(1)
    qf = torch.from_numpy(rng.standard_normal((7, 16)).astype(np.float32))
    gf = torch.from_numpy(rng.standard_normal((11, 16)).astype(np.float32))
    for metric in ("cosine", "euclidean"):
        d = compute_distance(qf, gf, metric=metric)
        assert isinstance(d, torch.Tensor) and d.shape == (7, 11)
        assert d.dtype == torch.float32
        assert float(d.min()) >= -1e-6 and float(d.max()) <= 2 + 1e-6
        # scale invariance: features are L2-normalised first
        torch.testing.assert_close(compute_distance(qf * 3.0, gf, metric=metric), d)
        # chunking does not change the result
        torch.testing.assert_close(compute_distance(qf, gf, metric=metric,
                                                    chunk_size=2), d)
    # known values
    cos = compute_distance(qf, gf, "cosine")
    q = qf / qf.norm(dim=1, keepdim=True)
    g = gf / gf.norm(dim=1, keepdim=True)
    torch.testing.assert_close(cos, 1 - q @ g.t())
    euc = compute_distance(qf, gf, "euclidean")
    torch.testing.assert_close(euc, torch.cdist(q, g), atol=1e-5, rtol=1e-5)
    # a vector against itself
    self_d = compute_distance(qf, qf.numpy(), "euclidean").diagonal()
    assert float(self_d.abs().max()) < 1e-3
    with pytest.raises(ValueError):
        compute_distance(qf, gf, metric="manhattan")
    with pytest.raises(ValueError):
        compute_distance(qf, gf[:, :8])


def test_compute_distance_rankings_agree():
    rng = np.random.default_rng(2)
    qf = rng.standard_normal((20, 24))         # float64 to avoid rounding ties
    gf = rng.standard_normal((300, 24))
    cos = compute_distance(qf, gf, "cosine")
    euc = compute_distance(qf, gf, "euclidean")
    assert cos.dtype == torch.float64 and cos.shape == (20, 300)
    np.testing.assert_array_equal(np.argsort(cos.numpy(), axis=1, kind="stable"),
                                  np.argsort(euc.numpy(), axis=1, kind="stable"))
    q_pids = rng.integers(0, 10, 20)
    g_pids = rng.integers(0, 10, 300)
    q_cams = rng.integers(0, 4, 20)
    g_cams = rng.integers(0, 4, 300)
    a = evaluate_rank(cos, q_pids, g_pids, q_cams, g_cams)
    b = evaluate_rank(euc, q_pids, g_pids, q_cams, g_cams)
    assert_same(a, b)


def test_random_ranking_map_is_the_mean_over_every_ranking():
    """Exact: the chance mAP equals the mean AP over all 6! orderings of the gallery (each query's
    row takes every permutation once), with junk (same pid and camera) and a query without a
    positive in the mix. Catches a wrong expectation formula, junk counted as valid items, or the
    query without positives counted."""
    import itertools

    from utils.metrics import random_ranking_map

    q_pids, q_cams = np.array([0, 1, 2, 9]), np.array([0, 0, 1, 0])
    g_pids, g_cams = np.array([0, 0, 1, 1, 2, 0]), np.array([0, 1, 1, 2, 1, 2])
    perms = np.array(list(itertools.permutations(range(6))), dtype=np.float64)  # (720, 6)
    distmat = np.repeat(perms, len(q_pids), axis=0)  # every query row under every ordering
    reps = len(perms)
    _, mean_ap, _ = evaluate_rank(distmat, np.tile(q_pids, reps), g_pids, np.tile(q_cams, reps), g_cams)
    assert random_ranking_map(q_pids, g_pids, q_cams, g_cams) == pytest.approx(mean_ap, rel=1e-12)
    # A single positive among G valid items: E[1 / rank] = H_G / G.
    assert random_ranking_map([0], [0, 1, 2, 3], [0], [1, 1, 1, 1]) == pytest.approx(
        (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
