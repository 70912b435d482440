"""Speed of utils.metrics.evaluate_rank against one numpy argsort.

Run from the repository root:

    python bench/eval_speed.py [--repeats 3] [--reference-queries 0]

Setup (Market-1501 sized): 3,368 queries x 15,913 gallery items, random
256-d features, cosine distances as a float32 numpy matrix (computed outside
the timed region), 750 identities and 6 cameras drawn at random for queries
and gallery.  Prints the best-of-N time of ``evaluate_rank`` (default thread
count, and single-threaded), the best-of-N time of
``numpy.argsort(distmat, axis=1)`` and their ratio; the target is a ratio of
at most 1.5.  ``--reference-queries N`` also times the classic per-query
Python loop on N queries and extrapolates it to all queries.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.metrics import compute_distance, evaluate_rank  # noqa: E402

TARGET_RATIO = 1.5


def best_time(fn, repeats):
    times = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def classic_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The usual per-query implementation (argsort every row), for timing."""
    aps, inps, cmcs = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        match = g_pids[order] == q_pids[i]
        keep = ~(match & (g_camids[order] == q_camids[i]))
        rel = match[keep]
        if not rel.any():
            continue
        hits = rel.cumsum()
        cmcs.append(np.minimum(hits, 1)[:max_rank])
        aps.append((hits / np.arange(1, rel.size + 1))[rel].sum() / rel.sum())
        inps.append(rel.sum() / (np.nonzero(rel)[0][-1] + 1))
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-query", type=int, default=3368)
    parser.add_argument("--num-gallery", type=int, default=15913)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num-ids", type=int, default=750)
    parser.add_argument("--num-cams", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-queries", type=int, default=0,
                        help="also time the classic per-query loop on this many "
                             "queries and extrapolate (0 = skip)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    qf = rng.standard_normal((args.num_query, args.dim)).astype(np.float32)
    gf = rng.standard_normal((args.num_gallery, args.dim)).astype(np.float32)
    q_pids = rng.integers(0, args.num_ids, args.num_query)
    g_pids = rng.integers(0, args.num_ids, args.num_gallery)
    q_cams = rng.integers(0, args.num_cams, args.num_query)
    g_cams = rng.integers(0, args.num_cams, args.num_gallery)
    distmat = compute_distance(qf, gf, metric="cosine").numpy()
    assert distmat.dtype == np.float32

    print(f"distmat {distmat.shape[0]} x {distmat.shape[1]} float32, "
          f"{args.num_ids} ids, {args.num_cams} cams; best of {args.repeats}; "
          f"torch threads = {torch.get_num_threads()}, "
          f"cpu_count = {os.cpu_count()}, numpy {np.__version__}, "
          f"torch {torch.__version__}")

    run = lambda **kw: evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams,  # noqa: E731
                                     max_rank=50, **kw)
    t_eval, (cmc, m_ap, m_inp) = best_time(run, args.repeats)
    t_eval1, res1 = best_time(lambda: run(num_workers=1), args.repeats)
    assert np.array_equal(res1[0], cmc) and res1[1] == m_ap and res1[2] == m_inp
    t_sort, _ = best_time(lambda: np.argsort(distmat, axis=1), args.repeats)

    ratio = t_eval / t_sort
    ratio1 = t_eval1 / t_sort
    print(f"evaluate_rank (default workers): {t_eval:.3f} s")
    print(f"evaluate_rank (num_workers=1)  : {t_eval1:.3f} s")
    print(f"np.argsort(distmat, axis=1)    : {t_sort:.3f} s")
    print(f"ratio evaluate_rank / argsort  : {ratio:.3f} "
          f"(single-threaded: {ratio1:.3f}); target <= {TARGET_RATIO}: "
          f"{'MET' if ratio <= TARGET_RATIO else 'NOT MET'}")
    print(f"(metrics: rank-1 {cmc[0]:.4f}, mAP {m_ap:.4f}, mINP {m_inp:.4f})")

    n_ref = min(args.reference_queries, args.num_query)
    if n_ref > 0:
        sub = slice(0, n_ref)
        t0 = time.perf_counter()
        classic_loop(distmat[sub], q_pids[sub], g_pids, q_cams[sub], g_cams)
        t_ref = (time.perf_counter() - t0) * args.num_query / n_ref
        print(f"classic per-query loop (extrapolated from {n_ref} queries): "
              f"{t_ref:.1f} s = {t_ref / t_sort:.1f}x argsort")


if __name__ == "__main__":
    main()
