"""ATMoE: Attention-Triggered Mixture of Experts (DeMo, AAAI 2025).

forward(features (B, 7, C)) -> (moe_feature (B, 7C), gate_weights (B, heads, 7)); d = C / heads.

Gate (multi-head cross-attention of one query over the 7 features x_e):
    g = BN(QuickGELU(Linear(7C -> C)(concat_e x_e)))       (B, C)
    q = W_q g, k_e = W_k x_e                               W_q, W_k: Linear(C, C, no bias)
    w[h, e] = softmax_e(<q_h, k_e,h> / sqrt(d))            (B, heads, 7)
Experts: one E_h,e(z) = BN(QuickGELU(Linear(d -> d)(z))) per (head h, feature e), applied to
chunk h of x_e; output chunk w[h, e] * E_h,e(x_e,h) goes back in place, so feature e occupies
columns [e*C, (e+1)*C) of the (B, 7C) output.

The 7 * heads expert Linears are one batched weight (7, heads, d, d) + bias (7, heads, d)
evaluated with one einsum; their BatchNorm1d(d) layers are one BatchNorm1d(7C) (the same thing:
BN statistics are per feature). Expert parameters: 7 * (C^2 / heads + 3C).

Parameter and FLOP accounting against DeMo's published ablation: docs/modules.md.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from .pife import QuickGELU

__all__ = ["ATMoE"]


class ATMoE(nn.Module):
    """Multi-head attention-gated mixture of experts over the HDM features.

    Args:
        dim: feature dimension ``C``.
        num_experts: number of input features / experts per head (7 from HDM).
        heads: number of gating heads; every head owns ``num_experts`` experts
            acting on its ``C / heads`` channel slice (DeMo RGBNT201: 4).

    Shapes:
        features: (B, num_experts, C)
        returns:  moe_feature (B, num_experts * C),
                  gate_weights (B, heads, num_experts), softmax over experts
    """

    def __init__(self, dim: int, num_experts: int = 7, heads: int = 4) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.dim = dim
        self.num_experts = num_experts
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5

        # Gate: query from all features, keys from every single feature.
        self.gate_query = nn.Sequential(
            nn.Linear(num_experts * dim, dim), QuickGELU(), nn.BatchNorm1d(dim)
        )
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)

        # Experts: one Linear(C/h, C/h) -> QuickGELU -> BN(C/h) per (expert, head).
        self.expert_weight = nn.Parameter(torch.empty(num_experts, heads, self.head_dim, self.head_dim))
        self.expert_bias = nn.Parameter(torch.empty(num_experts, heads, self.head_dim))
        self.expert_act = QuickGELU()
        self.expert_norm = nn.BatchNorm1d(num_experts * dim)
        self.reset_expert_parameters()

    def reset_expert_parameters(self) -> None:
        """Initialise every expert like a fresh ``nn.Linear(C/h, C/h)``."""
        bound = 1.0 / math.sqrt(self.head_dim)
        # nn.Linear's default: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        nn.init.uniform_(self.expert_weight, -bound, bound)
        nn.init.uniform_(self.expert_bias, -bound, bound)

    def gate(self, features: torch.Tensor) -> torch.Tensor:
        """Gate weights (B, heads, num_experts) for features (B, num_experts, C)."""
        b, e, c = features.shape
        g = self.gate_query(features.reshape(b, e * c))                          # (B, C)
        q = self.q_proj(g).view(b, self.heads, 1, self.head_dim)                 # (B, h, 1, d)
        k = self.k_proj(features).view(b, e, self.heads, self.head_dim).transpose(1, 2)  # (B, h, E, d)
        logits = (q @ k.transpose(-2, -1)).squeeze(2) * self.scale               # (B, h, E)
        return logits.softmax(dim=-1)

    def forward(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if features.dim() != 3 or features.shape[1] != self.num_experts or features.shape[2] != self.dim:
            raise ValueError(
                f"expected features (B,{self.num_experts},{self.dim}), got {tuple(features.shape)}"
            )
        b = features.shape[0]
        weights = self.gate(features)                                            # (B, h, E)

        chunks = features.view(b, self.num_experts, self.heads, self.head_dim)  # (B, E, h, d)
        # y[b,e,h,:] = chunk[b,e,h,:] @ W[e,h]^T + bias[e,h]  (W stored as (out, in)).
        y = torch.einsum("behi,ehoi->beho", chunks, self.expert_weight) + self.expert_bias
        y = self.expert_norm(self.expert_act(y).reshape(b, self.num_experts * self.dim))
        y = y.view(b, self.num_experts, self.heads, self.head_dim)
        y = y * weights.transpose(1, 2).unsqueeze(-1)                            # gate each (e, h) chunk
        return y.reshape(b, self.num_experts * self.dim), weights
