"""DGAF: dual-gated adaptive fusion of the tokens kept by SDTPS (registered fusion "dgaf").

Shapes: B batch, M = 3 modalities (RGB, NI, TI), N patches, C channels.

1. Pooling. One learnable query per modality attends over that modality's tokens through a
   multi-head attention SHARED by the three modalities (:class:`WeightedAttentionPool`), whose
   key padding mask is given as selection weights: weight 0 = dropped token, exactly zero
   attention whatever its value; SDTPS's straight-through weights are exactly 0/1 in the forward
   pass and carry the selection's gradient to every position. Then a LayerNorm: ``h_m`` (B, C).
2. Entropy gate. ``p = |h_m| / sum_c |h_m|``, ``H_m = -sum_c p log p``,
   ``z_m = mean_c(Linear(h_m))``, ``w = softmax_m(z_m * exp(-H_m / tau))``,
   ``h_ent = sum_m w_m h_m``.
3. Importance gate. ``g = sigmoid(MLP(concat_m h_m))`` in (0, 1)^3, ``h_imp = sum_m g_m h_m``.
4. Mix. ``h_f = alpha h_ent + (1 - alpha) h_imp``, ``alpha = sigmoid(a)`` with the logit ``a``
   initialised to ``log(init_alpha / (1 - init_alpha))`` so that alpha == init_alpha at init.
5. Output. ``concat_m(h_m + LayerNorm(Linear(h_f)))``, (B, 3C).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from modeling.registry import FUSION_REGISTRY

ENTROPY_EPS = 1e-12


def check_init_alpha(init_alpha: float) -> None:
    if not 0.0 < init_alpha < 1.0:
        raise ValueError(f"init_alpha must be in (0, 1), got {init_alpha}")


def check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


class WeightedAttentionPool(nn.Module):
    """Multi-head attention of one query per row over N tokens, with selection weights.

    For a row with query x (C,), tokens t_n (N, C) and weights w_n >= 0 (at least one > 0), per
    head h (H heads of size d = C / H): ``q = W_q x``, ``k_n = W_k t_n``, ``v_n = W_v t_n``,
    ``e_n = exp(q . k_n / sqrt(d))`` and ``out_h = sum_n e_n w_n v_n / sum_n e_n w_n``, then
    ``W_o concat_h out_h`` (biases on the query, value and output projections; a key bias would
    be cancelled by the softmax).

    With 0/1 weights this is exactly softmax attention restricted to the w = 1 tokens (a key
    padding mask): the softmax normaliser cancels. Tokens with w = 0 do not change the output,
    whatever their values: the exponent is taken relative to the largest kept logit and dropped
    logits above it are clipped to it, so no inf * 0 can arise. Gradient with respect to w_n
    (dropped tokens too): ``e_n <dL/dout_h, v_n - out_h> / sum_m e_m w_m``.

    forward(query (R, C), tokens (R, N, C), weights (R, N)) -> (R, C).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        # No key bias: q . b_k is the same for every token, so the softmax cancels it and it could
        # never be trained (nn.MultiheadAttention carries one that stays at zero).
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation: Xavier-uniform over the stacked (3C, C) input
        projection, zero biases, nn.Linear's default for the output weight."""
        bound = math.sqrt(6.0 / (self.dim + 3 * self.dim))
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.zeros_(self.q_proj.bias)
        nn.init.zeros_(self.v_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        r, n, c = tokens.shape
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(r, h, d)
        k = self.k_proj(tokens).view(r, n, h, d)
        v = self.v_proj(tokens).view(r, n, h, d)
        logits = torch.einsum("rhd,rnhd->rhn", q, k).float() / math.sqrt(d)  # (R, H, N)
        kept = (weights.detach() > 0).unsqueeze(1)  # (R, 1, N)
        top = logits.masked_fill(~kept, float("-inf")).amax(dim=-1, keepdim=True).detach()
        expo = torch.exp(torch.where(kept, logits, torch.minimum(logits, top)) - top)  # (0, 1]
        mass = expo * weights.float().unsqueeze(1)  # (R, H, N)
        attn = mass / mass.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
        pooled = torch.einsum("rhn,rnhd->rhd", attn.to(v.dtype), v).reshape(r, c)
        return self.out_proj(pooled)


class DGAFDetails(NamedTuple):
    """Intermediate values of one DGAF forward (for logging and tests)."""

    pooled: torch.Tensor  # (B, 3, C) h_m after the LayerNorm
    entropy: torch.Tensor  # (B, 3) H_m
    entropy_weights: torch.Tensor  # (B, 3) w, sums to 1 over modalities
    importance: torch.Tensor  # (B, 3) g in (0, 1)
    alpha: torch.Tensor  # () mixing weight
    fused: torch.Tensor  # (B, C) h_f


@FUSION_REGISTRY.register("dgaf")
class DGAF(nn.Module):
    """Dual-gated adaptive fusion (see the module docstring for the equations).

    Args:
        dim: channels C.
        num_heads: heads of the shared pooling attention (C % num_heads == 0).
        tau: temperature of the entropy gate (> 0).
        init_alpha: initial mixing weight of the entropy gate, in (0, 1).

    forward(tokens (B, 3, N, C), weights (B, 3, N)) -> (B, 3C). ``weights`` is SDTPS's
    straight-through selection weights (``SDTPSOutput.weights``, forward exactly 0/1) or a bool
    keep mask (True = kept); 0 = dropped. Every row needs at least one kept token (SDTPS always
    keeps K >= 1); a row without any gives a zero pooled vector.
    """

    def __init__(self, dim: int, num_heads: int = 8, tau: float = 1.0, init_alpha: float = 0.5):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        check_tau(tau)
        check_init_alpha(init_alpha)
        self.dim, self.out_dim, self.num_heads, self.tau, self.init_alpha = (
            dim, 3 * dim, num_heads, float(tau), init_alpha)
        self.queries = nn.Parameter(torch.empty(3, dim))  # one pooling query per modality
        self.pool_attn = WeightedAttentionPool(dim, num_heads)
        self.pool_norm = nn.LayerNorm(dim)
        self.entropy_proj = nn.Linear(dim, dim)
        self.importance_mlp = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.Linear(dim, 3))
        self.alpha_logit = nn.Parameter(torch.empty(()))
        self.fuse_proj = nn.Linear(dim, dim)
        self.fuse_norm = nn.LayerNorm(dim)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg, dim: int) -> "DGAF":
        d = cfg.MODEL.DGAF
        return cls(dim, num_heads=d.NUM_HEADS, tau=d.TAU, init_alpha=d.INIT_ALPHA)

    @staticmethod
    def check_config(cfg) -> None:
        """ValueError naming the MODEL.DGAF key of a value the module would refuse."""
        for key, check in (("INIT_ALPHA", check_init_alpha), ("TAU", check_tau)):
            try:
                check(cfg.MODEL.DGAF[key])
            except ValueError as exc:
                raise ValueError(f"MODEL.DGAF.{key}: {exc}") from None

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.queries, std=0.02)
        with torch.no_grad():
            self.alpha_logit.fill_(math.log(self.init_alpha / (1.0 - self.init_alpha)))

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit)

    def forward(self, tokens: torch.Tensor, weights: torch.Tensor, return_details: bool = False):
        """tokens (B, 3, N, C), weights (B, 3, N) float or bool -> (B, 3C) [, DGAFDetails]."""
        b, m, n, c = tokens.shape
        if m != 3 or c != self.dim or weights.shape != (b, m, n):
            raise ValueError(f"expected tokens (B, 3, N, {self.dim}) and weights (B, 3, N); got "
                             f"{tuple(tokens.shape)} and {tuple(weights.shape)}")
        query = self.queries.to(tokens.dtype).unsqueeze(0).expand(b, -1, -1).reshape(b * m, c)
        w = weights.to(torch.float32) if weights.dtype == torch.bool else weights
        pooled = self.pool_attn(query, tokens.reshape(b * m, n, c), w.reshape(b * m, n))
        h = self.pool_norm(pooled.reshape(b, m, c))  # (B, 3, C)

        # Entropy gate (float32 for the logs).
        mag = h.float().abs()
        p = mag / (mag.sum(dim=-1, keepdim=True) + ENTROPY_EPS)
        entropy = -(p * torch.log(p + ENTROPY_EPS)).sum(dim=-1)  # (B, 3)
        z = self.entropy_proj(h).float().mean(dim=-1)  # (B, 3)
        w = torch.softmax(z * torch.exp(-entropy / self.tau), dim=-1)  # (B, 3)
        h_ent = (w.to(h.dtype).unsqueeze(-1) * h).sum(dim=1)  # (B, C)

        # Importance gate.
        g = torch.sigmoid(self.importance_mlp(h.reshape(b, m * c)))  # (B, 3)
        h_imp = (g.unsqueeze(-1) * h).sum(dim=1)  # (B, C)

        alpha = self.alpha
        h_f = alpha * h_ent + (1.0 - alpha) * h_imp  # (B, C)
        fused = self.fuse_norm(self.fuse_proj(h_f))  # (B, C)
        out = (h + fused.unsqueeze(1)).reshape(b, m * c)
        if return_details:
            return out, DGAFDetails(h, entropy, w, g, alpha, h_f)
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, tau={self.tau}, init_alpha={self.init_alpha}"
