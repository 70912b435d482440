"""HDM: Hierarchical Decoupling Module (DeMo, AAAI 2025).

Seven learnable query tokens, one per non-empty subset of {RGB, NI, TI}:

    index: 0    1   2   3       4       5      6
    set:   RGB  NI  TI  RGB+NI  RGB+TI  NI+TI  RGB+NI+TI

Query ``k`` has its own multi-head cross-attention and attends only over the
tokens of the modalities in its set, where a modality contributes its global
token followed by its patch tokens, ``[g_m ; p_m,1 ... p_m,N]`` (1 + N tokens).
Following DeMo there is no extra norm, no residual and no FFN: each decoupled
feature is the attention output (incl. the output projection) for the query.
DeMo uses ``C // 64`` heads (8 for C=512) and attention dropout 0.1.

Parameters: 7 x MHA(C) = 7 x (4C^2 + 4C) plus the 7 x C query tokens
(7,357,952 for C=512).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

__all__ = ["HDM", "MODALITY_SETS", "MODALITY_SET_NAMES"]

# Modality indices: 0 = RGB, 1 = NI, 2 = TI.
MODALITY_SETS: Tuple[Tuple[int, ...], ...] = ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))
MODALITY_SET_NAMES: Tuple[str, ...] = ("RGB", "NI", "TI", "RGB+NI", "RGB+TI", "NI+TI", "RGB+NI+TI")


class HDM(nn.Module):
    """Decouple modality-specific and modality-shared features with 7 queries.

    Args:
        dim: token dimension ``C``.
        num_heads: heads of every cross-attention (DeMo: ``C // 64`` = 8).
        dropout: attention-weight dropout inside each attention (DeMo: 0.1).

    Shapes:
        globals: (B, 3, C)     global feature of RGB / NI / TI
        patches: (B, 3, N, C)  patch tokens of RGB / NI / TI
        returns: (B, 7, C)     features in the order of ``MODALITY_SETS``
    """

    def __init__(self, dim: int, num_heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.modality_sets = MODALITY_SETS
        # One learnable query per modality set, CLIP-style scaled Gaussian init.
        self.queries = nn.Parameter(torch.randn(len(MODALITY_SETS), dim) * dim ** -0.5)
        self.attn = nn.ModuleList(
            nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
            for _ in MODALITY_SETS
        )

    def forward(self, globals: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        if globals.dim() != 3 or patches.dim() != 4 or globals.shape[1] != 3 or patches.shape[1] != 3:
            raise ValueError(
                f"expected globals (B,3,C) and patches (B,3,N,C), got {tuple(globals.shape)} and {tuple(patches.shape)}"
            )
        batch = globals.shape[0]
        # Per-modality key/value sequence: [global ; patches] -> (B, 3, 1+N, C).
        tokens = torch.cat([globals.unsqueeze(2), patches], dim=2)
        outs = []
        for k, (mods, attn) in enumerate(zip(self.modality_sets, self.attn)):
            kv = tokens[:, list(mods)].flatten(1, 2)                 # (B, |set|*(1+N), C)
            # repeat (not expand): a view of a parameter made under no_grad trips
            # FlopCounterMode's module tracker.
            q = self.queries[k].repeat(batch, 1, 1)                  # (B, 1, C)
            out, _ = attn(q, kv, kv, need_weights=False)
            outs.append(out.squeeze(1))
        return torch.stack(outs, dim=1)                              # (B, 7, C)
