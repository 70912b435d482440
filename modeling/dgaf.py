"""DGAF: dual-gated adaptive fusion of the tokens kept by SDTPS.

Shapes: B batch, M = 3 modalities (RGB, NI, TI), N patches, C channels.

1. Pooling. One learnable query per modality attends over that modality's tokens through a
   multi-head attention SHARED by the three modalities, with a key padding mask that hides the
   dropped tokens (they get exactly zero attention weight, whatever their values), then a
   LayerNorm: ``h_m`` (B, C).
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

ENTROPY_EPS = 1e-12


class DGAFDetails(NamedTuple):
    """Intermediate values of one DGAF forward (for logging and tests)."""

    pooled: torch.Tensor  # (B, 3, C) h_m after the LayerNorm
    entropy: torch.Tensor  # (B, 3) H_m
    entropy_weights: torch.Tensor  # (B, 3) w, sums to 1 over modalities
    importance: torch.Tensor  # (B, 3) g in (0, 1)
    alpha: torch.Tensor  # () mixing weight
    fused: torch.Tensor  # (B, C) h_f


class DGAF(nn.Module):
    """Dual-gated adaptive fusion (see the module docstring for the equations).

    Args:
        dim: channels C.
        num_heads: heads of the shared pooling attention (C % num_heads == 0).
        tau: temperature of the entropy gate (> 0).
        init_alpha: initial mixing weight of the entropy gate, in (0, 1).

    forward(tokens (B, 3, N, C), keep_mask (B, 3, N) bool, True = kept) -> (B, 3C). Every row of
    keep_mask needs at least one True (SDTPS always keeps K >= 1); a row without any would make
    the attention undefined.
    """

    def __init__(self, dim: int, num_heads: int = 8, tau: float = 1.0, init_alpha: float = 0.5):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if not 0.0 < init_alpha < 1.0:
            raise ValueError(f"init_alpha must be in (0, 1), got {init_alpha}")
        self.dim, self.num_heads, self.tau, self.init_alpha = dim, num_heads, float(tau), init_alpha
        self.queries = nn.Parameter(torch.empty(3, dim))  # one pooling query per modality
        self.pool_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.pool_norm = nn.LayerNorm(dim)
        self.entropy_proj = nn.Linear(dim, dim)
        self.importance_mlp = nn.Sequential(nn.Linear(3 * dim, dim), nn.GELU(), nn.Linear(dim, 3))
        self.alpha_logit = nn.Parameter(torch.empty(()))
        self.fuse_proj = nn.Linear(dim, dim)
        self.fuse_norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.queries, std=0.02)
        with torch.no_grad():
            self.alpha_logit.fill_(math.log(self.init_alpha / (1.0 - self.init_alpha)))

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit)

    def forward(self, tokens: torch.Tensor, keep_mask: torch.Tensor, return_details: bool = False):
        """tokens (B, 3, N, C), keep_mask (B, 3, N) -> (B, 3C) [, DGAFDetails]."""
        b, m, n, c = tokens.shape
        if m != 3 or c != self.dim or keep_mask.shape != (b, m, n):
            raise ValueError(f"expected tokens (B, 3, N, {self.dim}) and keep_mask (B, 3, N); got "
                             f"{tuple(tokens.shape)} and {tuple(keep_mask.shape)}")
        keys = tokens.reshape(b * m, n, c)
        query = self.queries.to(tokens.dtype).unsqueeze(0).expand(b, -1, -1).reshape(b * m, 1, c)
        padding = ~keep_mask.reshape(b * m, n).bool()  # True = ignore (dropped token)
        pooled, _ = self.pool_attn(query, keys, keys, key_padding_mask=padding, need_weights=False)
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
