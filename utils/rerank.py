"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification
with k-reciprocal Encoding", CVPR 2017) as a chunked, vectorised torch routine.

See :func:`re_ranking` for the exact behaviour and memory bounds; measured speed and
memory: docs/modules.md.
"""

import torch

__all__ = ["re_ranking"]


def _chunks(total, size):
    """Yield (start, end) pairs covering range(total) in steps of ``size``."""
    for start in range(0, total, size):
        yield start, min(start + size, total)


class _Distances:
    """Squared euclidean distances of ``feats``, on demand: whole rows
    (blocks of rows x all items) or selected (row, column) pairs.

    The features are centred first (distances do not change under a shift,
    but the cancellation error of ``|a|^2 + |b|^2 - 2ab`` shrinks with the
    norms).  Values are clamped at zero and the diagonal is set to exactly 0,
    so every item is its own nearest neighbour unless it has an exact
    duplicate.
    """

    def __init__(self, feats):
        self.feats = feats - feats.mean(dim=0, keepdim=True)
        self.sq = (self.feats * self.feats).sum(dim=1)

    def rows(self, start, end):
        block = torch.addmm(self.sq.unsqueeze(0), self.feats[start:end],
                            self.feats.t(), beta=1.0, alpha=-2.0)
        block += self.sq[start:end].unsqueeze(1)
        block.clamp_(min=0)
        local = torch.arange(end - start, device=block.device)
        block[local, local + start] = 0
        return block

    def pairs(self, start, others, budget=1 << 22):
        """d[start + r, others[r, c]] for a (rows, cols) index tensor, with
        the gathered features kept under ``budget`` elements at a time."""
        rows, cols = others.shape
        res = torch.empty(rows, cols, dtype=self.feats.dtype,
                          device=self.feats.device)
        step = max(1, budget // max(1, cols * self.feats.shape[1]))
        for s, e in _chunks(rows, step):
            idx = others[s:e]
            dots = torch.bmm(self.feats[idx],
                             self.feats[start + s:start + e].unsqueeze(2))
            res[s:e] = (self.sq[idx] + self.sq[start + s:start + e, None]
                        - 2 * dots.squeeze(2))
        res.clamp_(min=0)
        res[others == torch.arange(start, start + rows,
                                   device=others.device).unsqueeze(1)] = 0
        return res


def _reciprocal_mask(ranks, chunk_size):
    """mask[i, a] is True when i is among the first ``ranks.shape[1]``
    neighbours of ranks[i, a], i.e. when ranks[i, a] is a reciprocal
    neighbour of i."""
    n, width = ranks.shape
    mask = torch.empty(n, width, dtype=torch.bool, device=ranks.device)
    for s, e in _chunks(n, chunk_size):
        own = torch.arange(s, e, device=ranks.device).view(-1, 1, 1)
        mask[s:e] = (ranks[ranks[s:e]] == own).any(dim=2)
    return mask


@torch.no_grad()
def re_ranking(q_feat, g_feat, k1=20, k2=6, lambda_value=0.3, chunk_size=1024):
    """k-reciprocal re-ranking of a query x gallery distance matrix.

    Args:
        q_feat: (Q, D) query features (torch tensor or array-like).
        g_feat: (G, D) gallery features, same device as ``q_feat``.
        k1: size of the k-reciprocal neighbourhood (the "k1" of the paper).
        k2: size of the local query expansion (``k2 == 1`` disables it).
        lambda_value: weight of the original distance in the final mix.
        chunk_size: rows handled at once (distance blocks are
            chunk_size x (Q+G)); the sparse stages cap their working sets
            at chunk_size * 1024 (expansion) and chunk_size * 2048
            (Jaccard pairs) entries.  It bounds memory and does not change
            the result.

    Returns:
        (Q, G) tensor on the inputs' device; float64 when either input is
        float64, float32 otherwise.  Smaller means more similar.

    What is computed, over all N = Q + G items (queries first):

    1. ``d[i, j] = ||x_i - x_j||^2`` (squared euclidean) of the features *as
       given*: nothing is normalised here.  Re-ID pipelines usually pass
       L2-normalised features (then d lies in [0, 4]); whether to normalise
       is the caller's choice, as in the widely used reference code.
    2. Like that reference (which divides every column by its maximum and
       transposes), each row is divided by its own maximum over all N items:
       ``o[i, j] = d[i, j] / max_k d[i, k]`` (identical because d is
       symmetric).  A row whose maximum is 0 (all features equal) is left
       at 0 instead of producing NaN.
    3. ``R(i, k)``: the first k+1 items of i's ranking by ``o`` (i itself
       included).  The k1-reciprocal set of i is
       ``{j in R(i, k1) : i in R(j, k1)}``.
    4. Expansion: with ``h = round(k1 / 2)`` (Python/numpy rounding, half to
       even), each member c of i's k1-reciprocal set contributes its own
       h-reciprocal set C(c) when ``|C(c) & set(i)| > 2/3 |C(c)|``; the
       expanded set is the union of i's set and those C(c).
    5. ``V[i, j] = exp(-o[i, j]) / sum_j' exp(-o[i, j'])`` over the
       expanded set, 0 elsewhere (sparse: at most (k1+1)(h+2) non-zeros a
       row).  V is kept in the working float type; the original numpy code
       stores it in float16, so its results differ slightly from these.
    6. Local query expansion (k2 > 1): row i of V is replaced by the mean
       of the rows of its first k2 items of ``o``-ranking (i included).
    7. Jaccard distance ``1 - S / (2 - S)`` with
       ``S[i, j] = sum_k min(V[i, k], V[j, k])`` (rows of V sum to 1), for
       query rows i and gallery columns j only, via an inverted index over
       the non-zeros of the gallery rows of V.
    8. ``final = (1 - lambda) * jaccard + lambda * o``, query x gallery.

    Memory: nothing N x N is held.  Distances are computed once, in
    (chunk_size x N) blocks, keeping only the row maxima, the first
    max(k1+1, k2) neighbours and the query x gallery part; the step-5
    weights are recomputed from the features for the expanded sets only.
    Held: N x max(k1+1, k2) neighbour indices, V sparse (padded rows of at
    most (k1+1)(h+2) entries, CSR after step 6) and the (Q, G) result;
    working sets are O(chunk_size * N) plus the expansion / Jaccard caps
    above.  The Jaccard chunks are capped in (query non-zero, gallery
    posting) pairs too, so a hub column cannot blow up the working set.
    All torch ops on the inputs' device; the only Python loops are over
    chunks.  Ties in distance (exact duplicate features) are broken by
    torch.topk and may differ from numpy's argsort.

    Measured time and peak memory: docs/modules.md.
    """
    q = torch.as_tensor(q_feat)
    g = torch.as_tensor(g_feat)
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"expected (Q, D) and (G, D) features, got "
                         f"{tuple(q.shape)} and {tuple(g.shape)}")
    if q.device != g.device:
        raise ValueError("q_feat and g_feat must be on the same device")
    if k1 < 1 or k2 < 1 or chunk_size < 1:
        raise ValueError("k1, k2 and chunk_size must be >= 1")
    device = q.device
    wtype = torch.float64 if torch.float64 in (q.dtype, g.dtype) else torch.float32
    num_q, num_g = q.shape[0], g.shape[0]
    n = num_q + num_g
    out = torch.empty(num_q, num_g, dtype=wtype, device=device)
    if num_q == 0 or num_g == 0:
        return out

    dist = _Distances(torch.cat([q.detach().to(wtype), g.detach().to(wtype)]))
    width_k1 = min(k1 + 1, n)
    width_half = min(int(round(k1 / 2)) + 1, n)
    width_k2 = min(k2, n)
    width = max(width_k1, width_k2)

    # Pass 1: row maxima and the first `width` neighbours of every item.
    row_max = torch.empty(n, dtype=wtype, device=device)
    ranks = torch.empty(n, width, dtype=torch.long, device=device)
    for s, e in _chunks(n, chunk_size):
        block = dist.rows(s, e)
        peak = block.max(dim=1).values
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        row_max[s:e] = peak
        ranks[s:e] = block.topk(width, dim=1, largest=False, sorted=True).indices
        if s < num_q:  # query rows of `o`, gallery columns -> output
            stop = min(e, num_q)
            out[s:stop] = block[:stop - s, num_q:] / peak[:stop - s].unsqueeze(1)
        del block

    near = ranks[:, :width_k1].contiguous()        # R(i, k1)
    near_half = ranks[:, :width_half].contiguous()  # R(i, h)
    recip = _reciprocal_mask(near, chunk_size)
    recip_half = _reciprocal_mask(near_half, chunk_size)

    # Pass 2: expanded sets and their Gaussian weights (padded sparse rows,
    # padding index = n, weight 0).
    idx_parts, val_parts = [], []
    for s, e in _chunks(n, chunk_size):
        own = near[s:e]                              # (c, k1+1)
        own_ok = recip[s:e]                          # (c, k1+1)
        own_set = torch.where(own_ok, own, n).sort(dim=1).values
        cand = near_half[own]                        # (c, k1+1, h+1)
        cand_ok = recip_half[own] & own_ok.unsqueeze(2)
        flat = cand.flatten(1)
        slot = torch.searchsorted(own_set, flat).clamp_(max=width_k1 - 1)
        in_own = (own_set.gather(1, slot) == flat).view_as(cand)
        n_common = (in_own & cand_ok).sum(dim=2)
        n_cand = cand_ok.sum(dim=2)
        accept = own_ok & (3 * n_common > 2 * n_cand)
        take = cand_ok & accept.unsqueeze(2)
        merged = torch.cat([own_set, torch.where(take, cand, n).flatten(1)],
                           dim=1).sort(dim=1).values
        repeated = torch.zeros_like(merged, dtype=torch.bool)
        repeated[:, 1:] = merged[:, 1:] == merged[:, :-1]
        merged = torch.where(repeated, n, merged).sort(dim=1).values
        valid = merged < n
        keep = int(valid.sum(dim=1).max())
        merged, valid = merged[:, :keep], valid[:, :keep]
        scaled = dist.pairs(s, merged.clamp(max=n - 1))
        scaled /= row_max[s:e].unsqueeze(1)
        weight = torch.exp(-scaled) * valid
        weight /= weight.sum(dim=1, keepdim=True)
        idx_parts.append(merged.to(torch.int32))
        val_parts.append(weight)
        del own_set, cand, cand_ok, flat, slot, in_own, take, scaled
    nnz_max = max(p.shape[1] for p in idx_parts)
    v_idx = torch.full((n, nnz_max), n, dtype=torch.int32, device=device)
    v_val = torch.zeros(n, nnz_max, dtype=wtype, device=device)
    for (s, e), pi, pv in zip(_chunks(n, chunk_size), idx_parts, val_parts):
        v_idx[s:e, :pi.shape[1]] = pi
        v_val[s:e, :pv.shape[1]] = pv
    del idx_parts, val_parts, near, near_half, recip, recip_half

    # Pass 3: local query expansion -> V in CSR form (per-row counts, int32
    # columns ascending within a row, values).
    entry_budget = chunk_size * 1024
    step = max(1, min(chunk_size, entry_budget // (width_k2 * nnz_max)))
    count_l, cols_l, vals_l = [], [], []
    for s, e in _chunks(n, step):
        if width_k2 > 1:
            nb = ranks[s:e, :width_k2]
            cols = v_idx[nb].flatten(1)
            vals = v_val[nb].flatten(1)
        else:
            cols, vals = v_idx[s:e], v_val[s:e]
        used = cols < n
        local = torch.arange(e - s, device=device).unsqueeze(1)
        keys = (local * (n + 1) + cols)[used]
        vals = vals[used]
        keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        summed = torch.zeros(keys.shape[0], dtype=wtype, device=device)
        summed.index_add_(0, inverse, vals)
        if width_k2 > 1:
            summed /= width_k2
        count_l.append(torch.bincount(keys // (n + 1), minlength=e - s))
        cols_l.append((keys % (n + 1)).to(torch.int32))
        vals_l.append(summed)
        del cols, vals, used, keys, inverse
    del v_idx, v_val, ranks
    row_count = torch.cat(count_l)
    cols, vals = torch.cat(cols_l), torch.cat(vals_l)
    del count_l, cols_l, vals_l
    row_ptr = torch.zeros(n + 1, dtype=torch.long, device=device)
    torch.cumsum(row_count, 0, out=row_ptr[1:])
    q_end = int(row_ptr[num_q])

    # Inverted index: for every column k, the gallery rows j with V[j, k] > 0
    # (post_rows / post_vals, column k at col_start[k] .. + col_count[k]).
    g_cols = cols[q_end:]
    post_rows = torch.repeat_interleave(
        torch.arange(num_g, dtype=torch.int32, device=device),
        row_count[num_q:], output_size=g_cols.shape[0])
    order = torch.argsort(g_cols, stable=True)
    post_rows, post_vals = post_rows[order], vals[q_end:][order]
    col_count = torch.bincount(g_cols, minlength=n)
    col_start = torch.cumsum(col_count, 0) - col_count
    del order, g_cols
    q_cols, q_vals = cols[:q_end], vals[:q_end]
    del cols, vals

    # Pass 4: Jaccard over query chunks, each also capped in (query non-zero,
    # gallery posting) pairs so hub columns cannot blow up memory.
    pair_budget = chunk_size * 2048
    pairs_per_entry = col_count[q_cols]
    pair_end = torch.zeros(num_q + 1, dtype=torch.long, device=device)
    entry_query = torch.repeat_interleave(
        torch.arange(num_q, device=device), row_count[:num_q], output_size=q_end)
    per_query = torch.zeros(num_q, dtype=torch.long, device=device)
    per_query.index_add_(0, entry_query, pairs_per_entry)
    torch.cumsum(per_query, 0, out=pair_end[1:])
    del entry_query, per_query
    pair_end = pair_end.tolist()
    row_ptr = row_ptr.tolist()
    # int32 offsets when every index fits: half the memory traffic
    small = int(col_count.sum()) < 2 ** 31 and chunk_size * num_g < 2 ** 31
    itype = torch.int32 if small else torch.long
    lam = float(lambda_value)
    s = 0
    while s < num_q:
        e = min(s + chunk_size, num_q)
        while e > s + 1 and pair_end[e] - pair_end[s] > pair_budget:
            e = max(s + 1, (s + e) // 2)
        a, b = row_ptr[s], row_ptr[e]
        total = pair_end[e] - pair_end[s]
        counts = pairs_per_entry[a:b]
        base = col_start[q_cols[a:b]] - (torch.cumsum(counts, 0) - counts)
        pos = torch.repeat_interleave(base.to(itype), counts,
                                      output_size=total)
        pos += torch.arange(total, dtype=itype, device=device)
        row_of = torch.repeat_interleave(
            torch.arange(0, (e - s) * num_g, num_g, dtype=itype, device=device),
            row_count[s:e], output_size=b - a)
        target = torch.repeat_interleave(row_of, counts, output_size=total)
        target += post_rows[pos]
        common = torch.repeat_interleave(q_vals[a:b], counts, output_size=total)
        torch.minimum(common, post_vals[pos], out=common)
        sim = torch.zeros((e - s) * num_g, dtype=wtype, device=device)
        sim.index_add_(0, target, common)
        del base, pos, row_of, target, common
        sim = sim.view(e - s, num_g)
        jaccard = 1 - sim / (2 - sim)
        out[s:e] *= lam
        out[s:e] += (1 - lam) * jaccard
        del sim, jaccard
        s = e
    return out
