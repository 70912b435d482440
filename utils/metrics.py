"""Retrieval metrics for person / vehicle re-identification.

* :func:`compute_distance` -- qf (Q, D), gf (G, D) -> distances (Q, G) torch.Tensor,
  smaller = more similar.
* :func:`evaluate_rank` -- distmat (Q, G) + identity / camera (optionally scene) labels ->
  (cmc (max_rank,), mAP, mINP).
* :func:`junk_mask` -- the junk rule of :func:`evaluate_rank`.
* :func:`random_ranking_map` -- expected mAP of a random ranking (chance level).

:func:`evaluate_rank` does not argsort the rows: it sorts each row's values, binary-searches
the distances of the query's same-identity items to get their exact positions in a stable
sort, drops the junk items and computes AP / CMC / INP in closed form, vectorised over chunks
of queries (no Python loop per query).  Step by step: docs/modules.md.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["compute_distance", "evaluate_rank"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _to_numpy(x, name: str) -> np.ndarray:
    """Convert a numpy array / torch tensor (any device) / sequence to numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.cpu().numpy()
    if x is None:
        raise ValueError(f"{name} must not be None")
    return np.asarray(x)


def _to_label_array(x, name: str, n: int) -> np.ndarray:
    arr = _to_numpy(x, name).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {n}")
    return arr


def _to_float_tensor(x, name: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach()
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(t.shape)}")
    if t.dtype != torch.float64:
        t = t.float()
    return t


# --------------------------------------------------------------------------
# distances
# --------------------------------------------------------------------------
def compute_distance(qf, gf, metric: str = "cosine",
                     chunk_size: int = 4096) -> torch.Tensor:
    """Pairwise distances between L2-normalised query and gallery features.

    Args:
        qf: query features, shape ``(Q, D)``; numpy array or torch tensor.
        gf: gallery features, shape ``(G, D)``; same feature dimension ``D``.
        metric: ``"cosine"`` or ``"euclidean"``.  Both rows of ``qf`` and
            ``gf`` are first L2-normalised, so the two metrics give the same
            ranking (up to floating-point rounding):

            * ``"cosine"``: ``1 - cos(q, g)``, in ``[0, 2]``;
            * ``"euclidean"``: the plain (NOT squared) Euclidean distance
              ``||q/|q| - g/|g|||_2 = sqrt(2 - 2 cos(q, g))``, in ``[0, 2]``.
        chunk_size: number of query rows processed per matrix product, which
            bounds the temporary memory to ``chunk_size * G`` elements.

    Returns:
        ``torch.Tensor`` of shape ``(Q, G)``, float32 (float64 if either input
        is float64), on the device of ``qf`` when ``qf`` is a tensor (CPU
        otherwise).  Smaller = more similar.
    """
    metric = metric.lower()
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"unknown metric {metric!r}; use 'cosine' or 'euclidean'")
    q = _to_float_tensor(qf, "qf")
    g = _to_float_tensor(gf, "gf").to(q.device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"feature dimensions differ: qf {tuple(q.shape)} vs gf {tuple(g.shape)}")
    dtype = torch.promote_types(q.dtype, g.dtype)
    q = F.normalize(q.to(dtype), p=2, dim=1)
    g = F.normalize(g.to(dtype), p=2, dim=1)
    num_q = q.shape[0]
    out = torch.empty((num_q, g.shape[0]), dtype=dtype, device=q.device)
    step = max(1, int(chunk_size))
    gt = g.t()
    for start in range(0, num_q, step):
        block = out[start:start + step]
        torch.mm(q[start:start + step], gt, out=block)      # cosine similarity
        if metric == "cosine":
            block.neg_().add_(1.0)                           # 1 - cos
        else:
            block.mul_(-2.0).add_(2.0).clamp_(min=0.0).sqrt_()  # sqrt(2 - 2cos)
    return out


# --------------------------------------------------------------------------
# ranking metrics
# --------------------------------------------------------------------------
def _tied_prefix_counts(dist: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                        vals: np.ndarray, max_elems: int = 1 << 22) -> np.ndarray:
    """For each (row, col, val) return #{k < col : dist[row, k] == val}.

    Vectorised over blocks of entries; memory is bounded by ``max_elems``.
    """
    num_g = dist.shape[1]
    out = np.empty(rows.shape[0], dtype=np.int64)
    step = max(1, max_elems // max(num_g, 1))
    col_index = np.arange(num_g)
    for s in range(0, rows.shape[0], step):
        r = rows[s:s + step]
        c = cols[s:s + step]
        v = vals[s:s + step]
        equal = dist[r] == v[:, None]
        equal &= col_index[None, :] < c[:, None]
        out[s:s + step] = equal.sum(axis=1)
    return out


def _row_lower_bound(sorted_rows: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """Row-wise ``searchsorted(side="left")``: for each ``vals[i, j]`` the
    number of entries of ``sorted_rows[i]`` strictly smaller than it.

    ``sorted_rows``: (n, G) ascending rows; ``vals``: (n, W).  A vectorised
    binary search (``ceil(log2(G + 1))`` numpy steps over all n*W values at
    once), used instead of ``torch.searchsorted``, whose intra-op threading
    costs more than the search itself for these small batches.
    """
    n, num_g = sorted_rows.shape
    flat = sorted_rows.reshape(-1)
    base = (np.arange(n, dtype=np.int64) * num_g)[:, None]
    lo = np.zeros(vals.shape, dtype=np.int64)
    hi = np.full(vals.shape, num_g, dtype=np.int64)
    for _ in range(int(num_g).bit_length()):
        active = lo < hi
        mid = (lo + hi) >> 1
        probe = flat[base + np.minimum(mid, num_g - 1)]
        go = active & (probe < vals)
        hi = np.where(active & ~go, mid, hi)
        lo = np.where(go, mid + 1, lo)
    return lo


def _eval_chunk(dist: np.ndarray, q_lab: np.ndarray, q_key: np.ndarray,
                g_key: np.ndarray, group_start: np.ndarray,
                group_count: np.ndarray, group_members: np.ndarray):
    """Per-query first-positive rank, AP and INP for one chunk of query rows.

    ``dist``: (n, G) rows of the distance matrix.  ``q_lab``: (n,) index of
    each query's identity in the gallery identity groups, -1 if absent.
    ``q_key`` / ``g_key``: camera (or scene) labels deciding junk.
    Returns (first_rank, ap, inp) for the valid queries of the chunk.
    """
    n, num_g = dist.shape
    dist = np.ascontiguousarray(dist)
    sorted_vals = np.sort(dist, axis=1)
    if n and num_g and np.isnan(sorted_vals[:, -1]).any():   # NaNs sort last
        raise ValueError("distmat contains NaN values")

    present = q_lab >= 0
    counts = np.where(present, group_count[np.maximum(q_lab, 0)], 0)
    width = int(counts.max()) if n else 0
    empty = (np.empty(0, np.int64), np.empty(0), np.empty(0))
    if width == 0:
        return empty

    # (n, W) gallery indices of the same-identity items of every query.
    slot = np.arange(width)
    member = slot[None, :] < counts[:, None]
    flat = np.where(member,
                    group_start[np.maximum(q_lab, 0)][:, None] + slot[None, :], 0)
    cols = group_members[flat]
    row_ix = np.arange(n)[:, None]
    vals = dist[row_ix, cols]

    # Position in the full stable order = #strictly smaller + #equal before.
    # Equal values are contiguous in the sorted row starting at `smaller`, so
    # another item ties with this one iff the next sorted value is equal.
    smaller = _row_lower_bound(sorted_vals, vals)
    position = smaller.copy()
    nxt = np.minimum(smaller + 1, num_g - 1)
    tied = member & (smaller + 1 < num_g) & (sorted_vals[row_ix, nxt] == vals)
    if tied.any():
        tr, tc = np.nonzero(tied)
        position[tr, tc] += _tied_prefix_counts(dist, tr, cols[tr, tc], vals[tr, tc])
    position[~member] = num_g            # padding slots go last

    junk = member & (g_key[cols] == q_key[:, None])
    positive = member & ~junk

    # Sort the same-identity items of each row by their stable position.
    order = np.argsort(position, axis=1, kind="stable")
    position = np.take_along_axis(position, order, axis=1)
    junk = np.take_along_axis(junk, order, axis=1)
    positive = np.take_along_axis(positive, order, axis=1)

    junk_before = np.cumsum(junk, axis=1) - junk
    valid_rank = position - junk_before + 1          # 1-based, junk removed
    hits = np.cumsum(positive, axis=1)
    num_pos = hits[:, -1]
    ok = num_pos > 0
    if not ok.any():
        return empty
    valid_rank = valid_rank[ok]
    positive = positive[ok]
    hits = hits[ok]
    num_pos = num_pos[ok]

    ap = np.where(positive, hits / valid_rank, 0.0).sum(axis=1) / num_pos
    first = valid_rank[np.arange(valid_rank.shape[0]), positive.argmax(axis=1)]
    last_slot = width - 1 - positive[:, ::-1].argmax(axis=1)
    last = valid_rank[np.arange(valid_rank.shape[0]), last_slot]
    inp = num_pos / last
    return first.astype(np.int64), ap, inp


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  q_scenes=None, g_scenes=None, chunk_size: int = 256,
                  num_workers: Optional[int] = None
                  ) -> Tuple[np.ndarray, float, float]:
    """CMC, mAP and mINP of a query-gallery distance matrix.

    Args:
        distmat: ``(Q, G)`` distances, smaller = more similar; numpy array or
            torch tensor on any device (copied to CPU numpy).  Must not
            contain NaN (ValueError).  float16/bfloat16 are evaluated in float32.
        q_pids, g_pids: ``(Q,)`` / ``(G,)`` integer identity labels.
        q_camids, g_camids: ``(Q,)`` / ``(G,)`` camera labels.
        max_rank: length of the returned CMC curve.
        q_scenes, g_scenes: optional ``(Q,)`` / ``(G,)`` scene labels (MSVR310
            protocol).  Give both or neither.
        chunk_size: number of query rows evaluated together; extra memory is
            about ``chunk_size * G`` distance values (a sorted copy) per worker
            plus a few ``chunk_size * P`` arrays, ``P`` being the largest
            number of gallery items of one query identity.
        num_workers: threads evaluating chunks in parallel (numpy's sort
            releases the GIL).  Default: ``torch.get_num_threads()``.

    Protocol:
        * Junk: for each query the gallery items with the same pid AND the
          same camera are removed from its ranked list; when scene labels are
          given, the items with the same pid AND the same scene are removed
          instead (the camera labels are then ignored).
        * Positives: the remaining gallery items with the query's pid.  A
          query with no positive left is skipped; if no query is left,
          ``ValueError`` is raised.
        * Ranking: a STABLE sort of each distance row, i.e. exactly tied
          distances are ordered by gallery index, lower index first (the order
          of ``np.argsort(row, kind="stable")``).  Ranks below are 1-based
          positions in that list after junk removal.
        * AP of a query = ``sum_k P(k) * rel(k) / num_positives`` (mean of the
          precision at each positive's rank); mAP = mean over valid queries.
        * INP of a query = ``num_positives / rank of its last positive``;
          mINP = mean over valid queries.
        * CMC: ``cmc[k]`` = fraction of valid queries whose first positive is
          at rank ``<= k + 1``.  When a query has fewer than ``max_rank``
          valid gallery items its own curve is padded by repeating its last
          value (always 1, as a valid query has a positive); so the curve
          always has ``max_rank`` entries, unlike the classic code that
          truncates it to the gallery size.

    Returns:
        ``(cmc, mAP, mINP)``: ``cmc`` float64 numpy array of shape
        ``(max_rank,)`` with values in [0, 1]; ``mAP`` and ``mINP`` Python
        floats in [0, 1] (fractions, not percent).
    """
    dist = _to_numpy(distmat, "distmat")
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D (Q, G), got shape {dist.shape}")
    if dist.dtype.kind != "f":
        dist = dist.astype(np.float64)
    elif dist.dtype == np.float16:
        dist = dist.astype(np.float32)
    num_q, num_g = dist.shape
    max_rank = int(max_rank)
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")

    q_pids = _to_label_array(q_pids, "q_pids", num_q)
    g_pids = _to_label_array(g_pids, "g_pids", num_g)
    if (q_scenes is None) != (g_scenes is None):
        raise ValueError("give both q_scenes and g_scenes, or neither")
    if q_scenes is not None:
        q_key = _to_label_array(q_scenes, "q_scenes", num_q)
        g_key = _to_label_array(g_scenes, "g_scenes", num_g)
    else:
        q_key = _to_label_array(q_camids, "q_camids", num_q)
        g_key = _to_label_array(g_camids, "g_camids", num_g)

    # Group the gallery by identity: members of group u are
    # group_members[group_start[u] : group_start[u] + group_count[u]],
    # in increasing gallery index.
    uniq, g_lab, group_count = np.unique(g_pids, return_inverse=True,
                                         return_counts=True)
    group_members = np.argsort(g_lab.reshape(-1), kind="stable")
    group_start = np.concatenate(([0], np.cumsum(group_count)[:-1])).astype(np.int64)
    loc = np.searchsorted(uniq, q_pids)
    loc_c = np.minimum(loc, max(len(uniq) - 1, 0))
    found = (loc < len(uniq)) & (uniq[loc_c] == q_pids) if len(uniq) else \
        np.zeros(num_q, dtype=bool)
    q_lab = np.where(found, loc_c, -1).astype(np.int64)

    step = max(1, int(chunk_size))
    bounds = [(s, min(s + step, num_q)) for s in range(0, num_q, step)]

    def run(bound):
        s, e = bound
        return _eval_chunk(dist[s:e], q_lab[s:e], q_key[s:e], g_key,
                           group_start, group_count, group_members)

    workers = torch.get_num_threads() if num_workers is None else int(num_workers)
    workers = max(1, min(workers, len(bounds), os.cpu_count() or 1))
    if workers == 1:
        results = [run(b) for b in bounds]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, bounds))

    first = np.concatenate([r[0] for r in results]) if results else np.empty(0)
    if first.size == 0:
        raise ValueError(
            "evaluate_rank: no query has a valid positive in the gallery after "
            "junk removal (same pid and same "
            f"{'scene' if q_scenes is not None else 'camera'}); "
            "cannot compute CMC / mAP / mINP")
    ap = np.concatenate([r[1] for r in results])
    inp = np.concatenate([r[2] for r in results])

    hist = np.bincount(np.minimum(first, max_rank + 1) - 1, minlength=max_rank + 1)
    cmc = np.cumsum(hist[:max_rank]).astype(np.float64) / first.size
    return cmc, float(ap.mean()), float(inp.mean())


def junk_mask(q_pids, q_keys, g_pids, g_keys) -> np.ndarray:
    """True where a gallery item is junk for a query: same identity AND same camera (or scene).

    The rule of :func:`evaluate_rank`: pass camera ids as keys, or scene ids for the
    MSVR310 protocol. Arguments broadcast like numpy arrays, e.g. queries (Q, 1) against a
    gallery (G,) or against their own ranked lists (Q, G).
    """
    q_pids, q_keys = np.asarray(q_pids), np.asarray(q_keys)
    g_pids, g_keys = np.asarray(g_pids), np.asarray(g_keys)
    return (g_pids == q_pids) & (g_keys == q_keys)


def random_ranking_map(q_pids, g_pids, q_camids, g_camids, q_scenes=None, g_scenes=None) -> float:
    """Expected mAP of a uniformly random ranking under the same protocol as :func:`evaluate_rank`
    (the "chance level" of a split).

    For a query with ``R`` positives among ``G`` valid (non-junk) gallery items, the expected AP of
    a random permutation is exactly ``H_G / G + (R - 1) / (G (G - 1)) * (G - H_G)`` with
    ``H_G = sum_{k<=G} 1/k`` (from E[rel_k P@k] = (1/k)(R/G + (k-1) R(R-1)/(G(G-1)))).
    Queries without a positive are skipped, as in evaluation. Memory: one (Q, G) boolean.
    """
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_key = np.asarray(q_scenes if q_scenes is not None else q_camids)
    g_key = np.asarray(g_scenes if g_scenes is not None else g_camids)
    same_pid = q_pids[:, None] == g_pids[None, :]
    junk = junk_mask(q_pids[:, None], q_key[:, None], g_pids, g_key)
    positives = (same_pid & ~junk).sum(1).astype(np.float64)
    valid = (~junk).sum(1).astype(np.float64)
    keep = positives > 0
    if not keep.any():
        raise ValueError("random_ranking_map: no query has a valid positive")
    r, g = positives[keep], valid[keep]
    harmonic = np.cumsum(1.0 / np.arange(1, int(g.max()) + 1))[g.astype(np.int64) - 1]
    pair_term = np.where(g > 1, (r - 1) / np.maximum(g * (g - 1), 1) * (g - harmonic), 0.0)
    return float(np.mean(harmonic / g + pair_term))
