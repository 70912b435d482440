"""SDTPS: cosine-gated cross-modal attention scores and top-K patch selection for RGB / NI / TI.

Two modules live here:

* :class:`CrossModalAttention` scores the N patches of one modality against one guiding global
  vector (one "pair"). It is the readable reference of the maths.
* :class:`MultiModalSDTPS` scores the 9 pairs (3 patch modalities x 3 guides) in one batched pass
  (stacked ``(9, ...)`` parameters + ``einsum``), combines the three guides' scores per modality,
  keeps the top-K patches and returns the masked tokens. Its per-pair results are identical to
  9 :class:`CrossModalAttention` calls with the same weights (see :meth:`MultiModalSDTPS.pair_module`).

Shapes: B batch, M = 3 modalities (RGB, NI, TI in that order), N patches, C channels, H heads,
d = C / H head dim.

Gradient path of the selection (straight-through selection weights)
--------------------------------------------------------------------
The hard top-K mask has no gradient. The selection therefore also returns straight-through
weights ``w = hard + (s - s.detach())``, where ``s`` (B, M, N) is the soft combined score in
[0, 1]: in the forward pass ``s - s.detach()`` is exactly 0.0, so ``w`` is exactly the 0/1 keep
mask; in the backward pass ``dw/ds = 1`` at EVERY position, kept or dropped. The pooling after
SDTPS uses ``w`` as normalised pooling weights over all N patches (:func:`modeling.fusion.weighted_mean`, or
DGAF's weighted attention pooling), which in the forward pass is exactly pooling over the kept
patches only. Its gradient is relative: for mean pooling ``dL/dw_n = <dL/df, p_n - f> / K``,
"would giving patch n more weight move the pooled feature f in a loss-reducing direction than
the kept average does?", defined for dropped patches too (so the scorer learns which dropped
patch it should have kept). It flows through the min-max normalisation, the guide combination
(and its learned weights), the head mean, the gate (per-head scale and bias) and the softmax
attention (query and key projections) to every SDTPS parameter.

Measured reason for this form (synthetic dataset, SDTPS + DGAF, 10 epochs): the earlier form,
multiplying the kept tokens by ``w`` and letting the pooling ignore dropped positions, gives the
absolute signal ``<dL/dtoken_n, p_n>`` ("scale this token up") on kept patches only; the scorer
learned to prefer background patches (kept-token foreground precision 22-25 % against 27.7 % for
random selection). See docs/sdtps.md for the figures of the current form.

The scorer reads detached patches and globals: the selection's gradient trains the scorer's own
parameters but does not flow on into the backbone through the scores (the backbone still gets
the ordinary gradient of the kept patches' values). Measured reason: the min-max normalisation
divides by ``max - min`` of nearly flat early scores, amplifying that gradient by up to
``1 / (max - min)`` (~1e4 at initialisation); passed into the backbone it wrecked training on the
synthetic dataset (10 epochs: test mAP 3.4 % with SDTPS against 16.3 % without). Adam normalises
the scorer's own step sizes, so the scorer itself trains normally.
"""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from modeling.registry import SELECTION_REGISTRY

MODALITIES = ("RGB", "NI", "TI")
# GUIDE_ORDER[m]: the guides of modality m's three scorers, the modality itself first, then the
# two others in MODALITIES order. Pair p = 3 * m + j scores modality m's patches with guide
# GUIDE_ORDER[m][j].
GUIDE_ORDER = ((0, 1, 2), (1, 0, 2), (2, 0, 1))
# "patches<-guide" name of each of the 9 pairs, in pair order (for logging).
PAIR_NAMES = tuple(f"{MODALITIES[m]}<-{MODALITIES[g]}" for m in range(3) for g in GUIDE_ORDER[m])

# Variance floor of the "patches" gate normalisation: the standardised cosine is
# (cos - mean) / sqrt(var + GATE_NORM_EPS), so its derivative w.r.t. cos is at most
# 1 / sqrt(GATE_NORM_EPS) = 10, whatever the spread of the cosines (no 1/sqrt(1e-5) blow-up).
GATE_NORM_EPS = 1e-2
# Epsilon of the "heads" gate normalisation (the prototype's nn.LayerNorm over the H heads).
HEADS_NORM_EPS = 1e-5
# Added to the denominator of the optional attention renormalisation.
RENORM_EPS = 1e-8
# Added to (max - min) of the per-sample min-max score normalisation.
MINMAX_EPS = 1e-8
# Norm floor of the cosine similarity.
COS_EPS = 1e-8

SCORE_COMBINES = ("mean", "learned")
GATE_NORMS = ("none", "patches", "heads")
# Initial per-head gate scale and bias (also the defaults of MODEL.SDTPS.GATE_INIT_SCALE/_BIAS).
GATE_INIT_SCALE = 0.5
GATE_INIT_BIAS = 0.5


def num_kept(num_patches: int, sparse_ratio: float) -> int:
    """K = max(1, ceil(N * sparse_ratio)), robust to float noise (N=100, ratio=0.55 gives 55, not 56)."""
    if not 0.0 < sparse_ratio <= 1.0:
        raise ValueError(f"sparse_ratio must be in (0, 1], got {sparse_ratio}")
    # 100 * 0.55 == 55.00000000000001 in binary floating point; rounding to 6 decimals first keeps
    # the intended integer while leaving genuine fractions (128 * 0.7 = 89.6 -> 90) untouched.
    return max(1, math.ceil(round(num_patches * sparse_ratio, 6)))


def _cosine(patches: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """Cosine of every patch with its guide: patches (..., N, C), guide (..., C) -> (..., N).

    Same value as ``F.normalize(patches) @ F.normalize(guide)``, but the patches are divided by
    their norm after the dot product, so no normalised copy of the (large) patch tensor is made.
    """
    g = F.normalize(guide, dim=-1, eps=COS_EPS)
    dots = torch.matmul(patches, g.unsqueeze(-1)).squeeze(-1)
    return dots / patches.norm(dim=-1).clamp_min(COS_EPS)


def _gate_logits(
    cos: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, gate_norm: str, eps: float,
    norm_weight: Optional[torch.Tensor] = None, norm_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-head gate logits from the cosines.

    Args:
        cos: (..., N) cosines, shared by the heads.
        scale, bias: (..., H) per-head affine parameters (leading dims broadcast against cos's).
        gate_norm: "none"; "patches": standardise cos over the N patches of each sample first
            (variance floor ``eps``); "heads": LayerNorm of the logits across the H heads of each
            patch (eps HEADS_NORM_EPS), with the affine ``norm_weight``, ``norm_bias`` (..., H).
    Returns:
        (..., H, N) logits ``cos' * scale_h + bias_h`` (cos' = cos or its standardised version),
        layer-normalised over H for "heads".
    """
    if gate_norm == "patches":
        mean = cos.mean(dim=-1, keepdim=True)
        var = cos.var(dim=-1, correction=0, keepdim=True)
        cos = (cos - mean) * torch.rsqrt(var + eps)
    logits = cos.unsqueeze(-2) * scale.unsqueeze(-1) + bias.unsqueeze(-1)
    if gate_norm == "heads":
        mean = logits.mean(dim=-2, keepdim=True)
        var = logits.var(dim=-2, correction=0, keepdim=True)
        logits = (logits - mean) * torch.rsqrt(var + HEADS_NORM_EPS)
        logits = logits * norm_weight.unsqueeze(-1) + norm_bias.unsqueeze(-1)
    return logits


def _gated_scores(attn: torch.Tensor, gate: torch.Tensor, renorm_attn: bool):
    """attn, gate (..., H, N) -> (gated attention (..., H, N), score = head mean (..., N))."""
    gated = attn * gate
    if renorm_attn:
        gated = gated / (gated.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return gated, gated.mean(dim=-2)


class PairScores(NamedTuple):
    """Scores of one pair (CrossModalAttention) or of the 9 pairs (MultiModalSDTPS).

    Leading dims L are (B,) for one pair and (B, 3, 3) for the batched 9 pairs
    (modality m, guide slot j; guide = GUIDE_ORDER[m][j]).
    """

    score: torch.Tensor  # (L..., N) head mean of the gated attention (before min-max)
    attn: torch.Tensor  # (L..., H, N) softmax attention over N
    gate: torch.Tensor  # (L..., H, N) sigmoid gate in (0, 1)
    attn_gated: torch.Tensor  # (L..., H, N) attn * gate (renormalised over N if renorm_attn)
    cos: torch.Tensor  # (L..., N) raw cosine between each patch and the guide


class CrossModalAttention(nn.Module):
    """Cosine-gated attention of one guiding global vector over N patches (one pair).

    For patches P (B, N, C) and a guide g (B, C), with H heads of size d = C / H:

    1. ``q = W_q g + b_q`` and ``k = W_k P``; ``attn = softmax_N(q_h . k_h / sqrt(d))`` (B, H, N).
       The key projection has no bias: ``q_h . b_k`` is the same for every patch and softmax over
       N ignores it, so a key bias could never receive a gradient (it would be dead weight).
    2. ``cos = cosine(P_n, g)`` in the raw feature space, (B, N), shared by all heads.
    3. ``gate_logits_h = cos * scale_h + bias_h`` with learnable per-head ``scale`` and ``bias``
       initialised to ``gate_init_scale`` and ``gate_init_bias``.
    4. Gate normalisation (``gate_norm``, default "none"). "patches": cos is standardised over
       the N patches of each sample BEFORE the per-head affine, ``cos' = (cos - mean_N) /
       sqrt(var_N + eps)``, with ``eps = gate_norm_eps`` (1e-2): the logits then have a per-head
       spread set by ``scale_h`` alone, it keeps the cosine ranking even when all heads start
       equal, and ``d cos'/d cos <= 1/sqrt(eps) = 10`` bounds the gradient gain. "heads" (the
       prototype's): the logits AFTER the affine go through a LayerNorm across the H heads of each
       patch (eps 1e-5, learnable per-head affine initialised to 1 and 0); with equal heads at
       initialisation every normalised logit is 0 (gate 0.5 everywhere).
       ``gate = sigmoid(gate_logits)`` (B, H, N).
    5. ``attn_gated = attn * gate``; with ``renorm_attn`` it is divided by its sum over N
       (+ 1e-8) so that each head's weights sum to 1.
    6. ``score = mean_h attn_gated`` (B, N).

    At the default init (scale 0.5, bias 0.5) the gate for cosines -1, -0.5, 0, 0.5, 1 is
    0.500, 0.562, 0.622, 0.679, 0.731; with scale 1, bias 0 it is 0.269, 0.378, 0.500, 0.622, 0.731.
    The attention, gate and score are computed in float32 (also under autocast).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        gate_init_scale: float = GATE_INIT_SCALE,
        gate_init_bias: float = GATE_INIT_BIAS,
        gate_norm: str = "none",
        renorm_attn: bool = False,
        gate_norm_eps: float = GATE_NORM_EPS,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        _check_gate_norm(gate_norm)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.gate_norm, self.renorm_attn, self.gate_norm_eps = gate_norm, renorm_attn, gate_norm_eps
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        nn.init.xavier_uniform_(self.q_proj.weight)
        nn.init.zeros_(self.q_proj.bias)
        nn.init.xavier_uniform_(self.k_proj.weight)
        self.gate_scale = nn.Parameter(torch.full((num_heads,), float(gate_init_scale)))
        self.gate_bias = nn.Parameter(torch.full((num_heads,), float(gate_init_bias)))
        heads_norm = gate_norm == "heads"
        self.gate_norm_weight = nn.Parameter(torch.ones(num_heads)) if heads_norm else None
        self.gate_norm_bias = nn.Parameter(torch.zeros(num_heads)) if heads_norm else None

    def gate_from_cos(self, cos: torch.Tensor) -> torch.Tensor:
        """Gate for given cosines: cos (B, N) -> (B, H, N)."""
        return torch.sigmoid(_gate_logits(cos, self.gate_scale, self.gate_bias, self.gate_norm,
                                          self.gate_norm_eps, self.gate_norm_weight,
                                          self.gate_norm_bias))

    def forward(self, patches: torch.Tensor, guide: torch.Tensor) -> PairScores:
        """patches (B, N, C), guide (B, C) -> PairScores with score (B, N), attn/gate (B, H, N)."""
        b, n, c = patches.shape
        if guide.shape != (b, c):
            raise ValueError(f"expected patches (B, N, C) and guide (B, C); got {tuple(patches.shape)} "
                             f"and {tuple(guide.shape)}")
        q = self.q_proj(guide).view(b, self.num_heads, self.head_dim)  # (B, H, d)
        k = self.k_proj(patches).view(b, n, self.num_heads, self.head_dim)  # (B, N, H, d)
        logits = torch.einsum("bhd,bnhd->bhn", q, k) / math.sqrt(self.head_dim)
        attn = logits.float().softmax(dim=-1)
        cos = _cosine(patches, guide).float()
        gate = self.gate_from_cos(cos)
        attn_gated, score = _gated_scores(attn, gate, self.renorm_attn)
        return PairScores(score, attn, gate, attn_gated, cos)


def _check_gate_norm(gate_norm: str) -> None:
    if gate_norm not in GATE_NORMS:
        raise ValueError(f"gate_norm must be one of {', '.join(GATE_NORMS)}, got {gate_norm!r}")


def _check_score_combine(score_combine: str) -> None:
    if score_combine not in SCORE_COMBINES:
        raise ValueError(f"score_combine must be one of {', '.join(SCORE_COMBINES)}, got "
                         f"{score_combine!r}")


class SDTPSDiagnostics(NamedTuple):
    """Detached tensors for logging (see :func:`diagnostics_summary`)."""

    gates: torch.Tensor  # (B, 3, 3, H, N) gate of each pair (modality m, guide slot j)
    pair_scores: torch.Tensor  # (B, 3, 3, N) min-max normalised score of each pair
    guide_agreement: torch.Tensor  # (B, 3, 3) share of the K kept positions that guide j's own
    # top-K also keeps (1 = that guide alone would select exactly the same patches)
    combine_weights: torch.Tensor  # (3, 3) weight of each guide per modality (1/3 for "mean")


class SDTPSOutput(NamedTuple):
    keep_mask: torch.Tensor  # (B, 3, N) bool, exactly K True per row
    weights: torch.Tensor  # (B, 3, N) straight-through pooling weights: forward exactly 0/1
    # (== keep_mask), backward d/d scores at every position (see "Gradient path")
    scores: torch.Tensor  # (B, 3, N) soft combined score in [0, 1] (carries the gradient)
    diagnostics: SDTPSDiagnostics


@SELECTION_REGISTRY.register("sdtps")
class MultiModalSDTPS(nn.Module):
    """Token selection for the three modalities with 9 cosine-gated cross-modal scorers.

    For modality m (RGB, NI, TI order) its patches are scored three times: by its own global
    (``s_self``) and by the two other modalities' globals (``s_a``, ``s_b``), each pair with its
    own parameters (the maths of :class:`CrossModalAttention`). The 9 pairs run in one batched pass:
    parameters are stacked as ``(9, ...)`` in pair order ``p = 3 * m + j`` and the keys are folded
    into the queries (``q_h . (W_k P_n)_h = (W_k,h^T q_h) . P_n``), so no (B, 9, N, C) key tensor is
    ever built. Each pair's score is min-max normalised over N per sample, the three are combined
    (``score_combine="mean"``, or ``"learned"``: softmax weights over the three guides per modality,
    initialised equal) and the top K = max(1, ceil(N * sparse_ratio)) patches are kept, with the
    straight-through weight described in the module docstring.

    Args:
        dim: channels C. num_heads: heads H per scorer (C % H == 0).
        sparse_ratio: share of patches kept, in (0, 1].
        gate_init_scale, gate_init_bias: initial per-head gate scale and bias.
        gate_norm: "none", "patches" or "heads" (see CrossModalAttention).
        renorm_attn: renormalise the gated attention to sum to 1 over N.
        score_combine: "mean" or "learned".
        gate_norm_eps: variance floor of the gate normalisation.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        sparse_ratio: float = 0.7,
        gate_init_scale: float = GATE_INIT_SCALE,
        gate_init_bias: float = GATE_INIT_BIAS,
        gate_norm: str = "none",
        renorm_attn: bool = False,
        score_combine: str = "mean",
        gate_norm_eps: float = GATE_NORM_EPS,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        _check_gate_norm(gate_norm)
        _check_score_combine(score_combine)
        num_kept(1, sparse_ratio)  # validates the ratio
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.sparse_ratio, self.score_combine = sparse_ratio, score_combine
        self.gate_norm, self.renorm_attn, self.gate_norm_eps = gate_norm, renorm_attn, gate_norm_eps
        self.gate_init_scale, self.gate_init_bias = float(gate_init_scale), float(gate_init_bias)
        # Pair p = 3 * m + j; weights are (out, in) like nn.Linear.weight.
        self.q_weight = nn.Parameter(torch.empty(9, dim, dim))
        self.q_bias = nn.Parameter(torch.empty(9, dim))
        self.k_weight = nn.Parameter(torch.empty(9, dim, dim))
        self.gate_scale = nn.Parameter(torch.empty(9, num_heads))
        self.gate_bias = nn.Parameter(torch.empty(9, num_heads))
        if gate_norm == "heads":  # per pair, the LayerNorm's affine over the H heads
            self.gate_norm_weight = nn.Parameter(torch.ones(9, num_heads))
            self.gate_norm_bias = nn.Parameter(torch.zeros(9, num_heads))
        else:
            self.register_parameter("gate_norm_weight", None)
            self.register_parameter("gate_norm_bias", None)
        if score_combine == "learned":
            # (modality, guide slot) logits; zeros = equal weights = the "mean" rule at init.
            self.combine_logits = nn.Parameter(torch.zeros(3, 3))
        else:
            self.register_parameter("combine_logits", None)
        self.register_buffer("guide_index", torch.tensor(GUIDE_ORDER), persistent=False)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg, dim: int) -> "MultiModalSDTPS":
        s = cfg.MODEL.SDTPS
        return cls(dim, num_heads=s.NUM_HEADS, sparse_ratio=s.SPARSE_RATIO,
                   gate_init_scale=s.GATE_INIT_SCALE, gate_init_bias=s.GATE_INIT_BIAS,
                   gate_norm=s.GATE_NORM, renorm_attn=s.RENORM_ATTN, score_combine=s.SCORE_COMBINE)

    @staticmethod
    def check_config(cfg) -> None:
        """ValueError naming the MODEL.SDTPS key of a value the module would refuse."""
        s = cfg.MODEL.SDTPS
        for key, check in (("SPARSE_RATIO", lambda v: num_kept(1, v)),
                           ("GATE_NORM", _check_gate_norm), ("SCORE_COMBINE", _check_score_combine)):
            try:
                check(s[key])
            except ValueError as exc:
                raise ValueError(f"MODEL.SDTPS.{key}: {exc}") from None

    def reset_parameters(self) -> None:
        """Xavier-uniform query/key projections with a zero query bias (the prototype's init),
        the configured gate init."""
        for p in range(9):
            nn.init.xavier_uniform_(self.q_weight.data[p])
            nn.init.xavier_uniform_(self.k_weight.data[p])
        nn.init.zeros_(self.q_bias)
        nn.init.constant_(self.gate_scale, self.gate_init_scale)
        nn.init.constant_(self.gate_bias, self.gate_init_bias)
        if self.gate_norm_weight is not None:
            nn.init.ones_(self.gate_norm_weight)
            nn.init.zeros_(self.gate_norm_bias)
        if self.combine_logits is not None:
            nn.init.zeros_(self.combine_logits)

    # ------------------------------------------------------------------------------------------
    def pair_module(self, pair: int) -> CrossModalAttention:
        """A CrossModalAttention holding a copy of pair ``pair``'s weights (tests, reference)."""
        mod = CrossModalAttention(
            self.dim, self.num_heads, gate_norm=self.gate_norm, renorm_attn=self.renorm_attn,
            gate_norm_eps=self.gate_norm_eps,
        ).to(device=self.q_weight.device, dtype=self.q_weight.dtype)
        with torch.no_grad():
            mod.q_proj.weight.copy_(self.q_weight[pair])
            mod.q_proj.bias.copy_(self.q_bias[pair])
            mod.k_proj.weight.copy_(self.k_weight[pair])
            mod.gate_scale.copy_(self.gate_scale[pair])
            mod.gate_bias.copy_(self.gate_bias[pair])
            if self.gate_norm_weight is not None:
                mod.gate_norm_weight.copy_(self.gate_norm_weight[pair])
                mod.gate_norm_bias.copy_(self.gate_norm_bias[pair])
        return mod

    def combine_weights(self) -> torch.Tensor:
        """(3, 3) weight of guide slot j for modality m."""
        if self.combine_logits is None:
            return self.q_weight.new_full((3, 3), 1.0 / 3.0)
        return self.combine_logits.softmax(dim=-1)

    def pair_scores(self, patches: torch.Tensor, globals: torch.Tensor) -> PairScores:
        """The 9 pairs in one batched pass.

        Args:
            patches: (B, 3, N, C); globals: (B, 3, C).
        Returns:
            PairScores with leading dims (B, 3, 3) = (batch, patch modality m, guide slot j).
        """
        b, m, n, c = patches.shape
        if m != 3 or globals.shape != (b, 3, c) or c != self.dim:
            raise ValueError(f"expected patches (B, 3, N, {self.dim}) and globals (B, 3, {self.dim}); "
                             f"got {tuple(patches.shape)} and {tuple(globals.shape)}")
        h, d = self.num_heads, self.head_dim
        guides = globals[:, self.guide_index]  # (B, 3, 3, C): guide of pair (m, j)
        q = torch.einsum("bmjc,mjoc->bmjo", guides, self.q_weight.view(3, 3, c, c))
        q = (q + self.q_bias.view(3, 3, c)).view(b, 3, 3, h, d)
        # Fold W_k into the query: q_h . (W_k P_n)_h = (W_k,h^T q_h) . P_n.
        qk = torch.einsum("bmjhe,mjhec->bmjhc", q, self.k_weight.view(3, 3, h, d, c))
        logits = torch.einsum("bmjhc,bmnc->bmjhn", qk, patches) / math.sqrt(d)
        attn = logits.float().softmax(dim=-1)  # (B, 3, 3, H, N)
        dots = torch.einsum("bmjc,bmnc->bmjn", F.normalize(guides, dim=-1, eps=COS_EPS), patches)
        cos = (dots / patches.norm(dim=-1).clamp_min(COS_EPS).unsqueeze(2)).float()  # (B, 3, 3, N)
        norm_w, norm_b = self.gate_norm_weight, self.gate_norm_bias
        gate = torch.sigmoid(_gate_logits(
            cos, self.gate_scale.view(3, 3, h), self.gate_bias.view(3, 3, h),
            self.gate_norm, self.gate_norm_eps,
            None if norm_w is None else norm_w.view(3, 3, h),
            None if norm_b is None else norm_b.view(3, 3, h),
        ))
        attn_gated, score = _gated_scores(attn, gate, self.renorm_attn)
        return PairScores(score, attn, gate, attn_gated, cos)

    def select(
        self, patches: torch.Tensor, pair_score: torch.Tensor, gates: Optional[torch.Tensor] = None
    ) -> SDTPSOutput:
        """Normalise, combine, keep the top K, apply the straight-through weight.

        Args:
            patches: (B, 3, N, C).
            pair_score: (B, 3, 3, N) raw score of each pair (``PairScores.score``).
            gates: (B, 3, 3, H, N) for the diagnostics (optional).
        """
        b, _, n, _ = patches.shape
        s = pair_score.float()
        s_min = s.amin(dim=-1, keepdim=True)
        s_max = s.amax(dim=-1, keepdim=True)
        s_norm = (s - s_min) / (s_max - s_min + MINMAX_EPS)  # (B, 3, 3, N) in [0, 1]
        weights = self.combine_weights().to(s.dtype)
        if self.combine_logits is None:
            combined = s_norm.mean(dim=2)
        else:
            combined = torch.einsum("bmjn,mj->bmn", s_norm, weights)  # (B, 3, N)
        k = num_kept(n, self.sparse_ratio)
        keep_idx = combined.detach().topk(k, dim=-1).indices
        keep_mask = torch.zeros_like(combined, dtype=torch.bool).scatter_(-1, keep_idx, True)
        # Straight-through: forward value exactly keep_mask (s - s.detach() == 0.0), backward d/ds.
        ste_weights = keep_mask.to(combined.dtype) + (combined - combined.detach())
        with torch.no_grad():
            guide_idx = s_norm.topk(k, dim=-1).indices  # (B, 3, 3, K)
            guide_mask = torch.zeros_like(s_norm, dtype=torch.bool).scatter_(-1, guide_idx, True)
            agreement = (guide_mask & keep_mask.unsqueeze(2)).sum(dim=-1).float() / k
            if gates is None:
                gates = s_norm.new_empty(b, 3, 3, self.num_heads, 0)
            diag = SDTPSDiagnostics(gates.detach(), s_norm.detach(), agreement, weights.detach())
        return SDTPSOutput(keep_mask, ste_weights, combined, diag)

    def forward(self, patches: torch.Tensor, globals: torch.Tensor) -> SDTPSOutput:
        """patches (B, 3, N, C), globals (B, 3, C) -> SDTPSOutput (keep_mask, weights, scores,
        diagnostics)."""
        # The scorer reads DETACHED features (see "Gradient path" in the module docstring).
        pairs = self.pair_scores(patches.detach(), globals.detach())
        return self.select(patches, pairs.score, pairs.gate)

    def diagnostics(self, output: SDTPSOutput):
        """(scalars, histograms) of one forward's output for the training log."""
        return diagnostics_summary(output.diagnostics), diagnostics_histograms(output.diagnostics)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, sparse_ratio={self.sparse_ratio}, "
                f"gate_init=({self.gate_init_scale}, {self.gate_init_bias}), "
                f"gate_norm={self.gate_norm!r}, renorm_attn={self.renorm_attn}, "
                f"score_combine={self.score_combine!r}")


def diagnostics_summary(diag: SDTPSDiagnostics, prefix: str = "sdtps") -> Dict[str, torch.Tensor]:
    """Detached 0-d tensors for a logger: per pair gate mean/min/max and guide agreement, per
    modality the guides' combination weights (no host sync; a logger converts when it writes).

    Keys look like ``sdtps/gate_mean/RGB<-NI``, ``sdtps/agreement/TI<-TI``.
    """
    out: Dict[str, torch.Tensor] = {}
    gates = diag.gates.float()  # (B, 3, 3, H, N)
    stats = {}
    if gates.numel() > 0:
        stats = {"gate_mean": gates.mean(dim=(0, 3, 4)), "gate_min": gates.amin(dim=(0, 3, 4)),
                 "gate_max": gates.amax(dim=(0, 3, 4))}
    stats["agreement"] = diag.guide_agreement.float().mean(dim=0)  # (3, 3)
    stats["combine_weight"] = diag.combine_weights.float()
    for m in range(3):
        for j in range(3):
            for kind in ("gate_mean", "gate_min", "gate_max", "agreement", "combine_weight"):
                if kind in stats:
                    out[f"{prefix}/{kind}/{PAIR_NAMES[3 * m + j]}"] = stats[kind][m, j]
    return out


def diagnostics_histograms(diag: SDTPSDiagnostics, prefix: str = "sdtps") -> Dict[str, torch.Tensor]:
    """Per pair and head the (B, N) gate values, keyed ``sdtps/gate_hist/RGB<-NI/head0``."""
    gates = diag.gates
    return {f"{prefix}/gate_hist/{PAIR_NAMES[3 * m + j]}/head{h}": gates[:, m, j, h]
            for m in range(3) for j in range(3) for h in range(gates.shape[3])}
