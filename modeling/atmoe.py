"""ATMoE: Attention-Triggered Mixture of Experts (DeMo, AAAI 2025).

Input: the seven decoupled HDM features ``x_1..x_7`` (B, 7, C).

Gate (multi-head cross-attention over the experts):
    g = BN(QuickGELU(Linear(concat(x_1..x_7))))      Linear(7C -> C), BN(C)
    q = W_q g, k_e = W_k x_e                        W_q, W_k: Linear(C, C, no bias)
    split q, k_e into ``heads`` chunks of C/heads;
    w[h, e] = softmax_e(<q_h, k_e,h> / sqrt(C/heads))   -> gate weights (B, heads, 7)

Experts: every (head h, expert e) pair owns an expert
    E_h,e(z) = BN(QuickGELU(Linear(z)))              Linear(C/heads -> C/heads)
applied to chunk h of feature e.  Output chunk = w[h, e] * E_h,e(x_e,h); the
chunks are put back at their places, giving (B, 7, C) flattened to (B, 7C)
(expert-major, i.e. feature e occupies columns [e*C, (e+1)*C)).

Implementation note: the 7*heads small expert MLPs are stored as one batched
weight (7, heads, C/h, C/h) + bias and evaluated with one einsum; the per-expert
BatchNorm1d(C/h) layers are one BatchNorm1d(7C) over the flattened expert
outputs, which is the same thing (BN statistics are per feature).  Parameter
count: heads*7*((C/h)^2 + C/h) + 2*7C  (= 7*(C^2/h + 3C)).

Parameter accounting vs DeMo's published ablation (RGBNT201, Table "PIFE/HDM/ATMoE")
=====================================================================================
Setting: CLIP ViT-B/16 image tower, 256x128 input, stride 16 -> 16x8 = 128 patches
(+1 CLS = 129 tokens), 171 training ids, one backbone shared by RGB/NI/TI, all
tokens projected 768 -> 512 (C = 512), ATMoE heads = 4 (DeMo's RGBNT201 config).

Components (exact counts, from the real modules):
  backbone  timm vit_base_patch16_clip_quickgelu_224, img_size=(256,128),
            num_classes=512 (head = the CLIP proj)                  86,140,928
              patch conv (no bias) 589,824 + cls 768 + pos 129x768 99,072
              + norm_pre 1,536 + 12 blocks x 7,087,872 = 85,054,464
              + norm 1,536 + head 768x512 393,216 + head bias 512.
              The bias: timm's nn.Linear head always has one (its OpenAI-CLIP
              converter fills it with zeros); DeMo's proj is a bias-free
              nn.Parameter, so the timm backbone is +512 vs DeMo.
  camera    SIE camera embedding, DeMo shape (cams, 1, 768) with
            RGBNT201 cams = 4 (file names cam1..cam4)                   3,072
  head 3C   BNNeck on concat of the 3 globals: BN(1536) 3,072
            (weight+bias; the bias is frozen) + Linear(1536,171,no bias)
            262,656                                                    265,728
  PIFE      3 x [LN(1024) 2,048 + Linear(1024,512) 524,800]          1,580,544
  HDM       7 x MHA(512, 8 heads) 1,050,624 + 7x512 queries        7,357,952
  head 7C   BNNeck on the 7C HDM/ATMoE feature: BN(3584) 7,168
            + Linear(3584,171,no bias) 612,864                         620,032
  ATMoE     gate Linear(3584,512) 1,835,520 + BN(512) 1,024 + W_q 262,144
            + W_k 262,144; experts 4 heads x 7 x (Linear(128,128) 16,512
            + BN(128) 256)                                           2,830,336

Rows (DeMo keeps the 3C "direct" head in every row; HDM brings the 7C head):
  row | modules          | total (all params) | trainable (frozen BN biases out) | published | diff (all / trainable)
  A   | -                |  86,409,728        |  86,408,192                      |  86.41 M  | -0.0003 % / -0.002 %
  B   | PIFE             |  87,990,272        |  87,988,736                      |  87.99 M  | +0.0003 % / -0.001 %
  C   | PIFE+HDM         |  95,968,256        |  95,963,136                      |  95.96 M  | +0.0086 % / +0.003 %
  D   | PIFE+HDM+ATMoE   |  98,798,592        |  98,793,472                      |  98.79 M  | +0.0087 % / +0.004 %
  row A = backbone 86,140,928 + camera 3,072 + head 3C 265,728; B adds PIFE;
  C adds HDM + head 7C (7,977,984); D adds ATMoE.
  The trainable count (what DeMo evidently reports: the BNNeck biases are
  frozen) rounds to all four published numbers to the last digit, with or
  without the 512 head bias; with DeMo's bias-free proj every total is 512
  lower (row D: 98,798,080 all / 98,792,960 trainable).
  Without the 7C head row C would be 95.35 M (-0.64 %), so HDM must bring it;
  with an extra per-modality BNNeck (3 x (BN(512) + Linear(512,171))) every
  row would be +0.27 M (row A 86.68 M, +0.31 %): inside the 0.5 % band but
  not the published 86.41 M, so DeMo's ablation rows do not have them.

Forward FLOPs, one tri-modal sample (3 images 256x128), eval mode, counted with
torch.utils.flop_counter.FlopCounterMode (2 FLOPs per multiply-accumulate) and
SDPA forced to the math backend (FlopCounterMode sees no FLOPs in the fused CPU
SDPA kernels, which both timm's attention and nn.MultiheadAttention use):
  row | FlopCounterMode (2/MAC) | /2 = MACs  | published | MACs vs published
  A   | 68.338 G                | 34.169 G   | 34.28 G   | -0.32 %
  D   | 69.985 G                | 34.992 G   | 35.10 G   | -0.31 %
  DeMo's "FLOPs" are MACs (fvcore's convention, 1 per fused multiply-add;
  DeMo's model file imports fvcore.nn.flop_count); FlopCounterMode's raw
  count is 2x the published figure.  D - A = 0.823 GMAC (published 0.82 G):
  HDM 816.9 M (7 attentions; keys/values over 3x129 + 3x258 + 387 = 1,548
  tokens), ATMoE 4.4 M, PIFE 1.6 M, 7C classifier 0.6 M.  Backbone: 3 x 11.389
  GMAC (12 blocks over 129 tokens + patch conv + 512-d proj of every token).
  (Reproduced by tests/test_demo_modules.py::test_param_count_matches_published
  and ::test_flops_match_published_macs.)
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
