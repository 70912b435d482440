"""Tests for DeMo's PIFE / HDM / ATMoE modules and the published param/FLOP accounting.

The small-module tests use tiny dims (C=32, N=8).  The accounting tests build
the real timm CLIP ViT-B/16 (no weights) once per module and wrap it with the
DeMo modules and BNNeck heads in ``DeMoRow`` -- a stand-in for the real model
builder, which is expected to replace it later.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modeling.atmoe import ATMoE
from modeling.hdm import HDM, MODALITY_SETS
from modeling.pife import PIFE, QuickGELU

B, C, N = 4, 32, 8


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(B, 3, C, generator=g)
    patches = torch.randn(B, 3, N, C, generator=g)
    return cls, patches


# --------------------------------------------------------------------------- small modules


def test_quickgelu_formula():
    x = torch.linspace(-4, 4, 17)
    assert torch.allclose(QuickGELU()(x), x * torch.sigmoid(1.702 * x))


def test_pife_shape_and_modality_separation():
    torch.manual_seed(0)
    pife = PIFE(C)
    cls, patches = _inputs()
    out = pife(cls, patches)
    assert out.shape == (B, 3, C)
    # Unshared per-modality branches: LN(2C) + Linear(2C, C) each.
    assert sum(p.numel() for p in pife.parameters()) == 3 * (2 * 2 * C + 2 * C * C + C)
    # Only the mean of the patches matters (patch order is irrelevant) ...
    assert torch.allclose(pife(cls, patches.flip(2)), out, atol=1e-6)
    # ... and modality m's output depends only on modality m's tokens.
    patches2 = patches.clone()
    patches2[:, 1] += 1.0
    out2 = pife(cls, patches2)
    assert torch.allclose(out2[:, [0, 2]], out[:, [0, 2]])
    assert not torch.allclose(out2[:, 1], out[:, 1])


def test_hdm_shape_and_params():
    hdm = HDM(C, num_heads=4)
    cls, patches = _inputs()
    out = hdm(cls, patches)
    assert out.shape == (B, 7, C)
    assert len(hdm.attn) == 7 and hdm.queries.shape == (7, C)
    assert sum(p.numel() for p in hdm.parameters()) == 7 * (4 * C * C + 4 * C) + 7 * C


@pytest.mark.parametrize("modality", [0, 1, 2])
def test_hdm_queries_attend_only_to_their_modality_set(modality):
    torch.manual_seed(0)
    hdm = HDM(C, num_heads=4).eval()  # eval: no attention dropout
    cls, patches = _inputs()
    base = hdm(cls, patches)

    cls2, patches2 = cls.clone(), patches.clone()
    patches2[:, modality] = torch.randn(B, N, C)
    cls2[:, modality] += 3.0  # the global token is part of the keys too
    out = hdm(cls2, patches2)

    for k, mods in enumerate(MODALITY_SETS):
        if modality in mods:
            assert not torch.allclose(out[:, k], base[:, k], atol=1e-4), (k, mods)
        else:
            assert torch.allclose(out[:, k], base[:, k], atol=1e-6), (k, mods)


def test_hdm_global_token_is_a_key():
    torch.manual_seed(0)
    hdm = HDM(C, num_heads=4).eval()
    cls, patches = _inputs()
    base = hdm(cls, patches)
    cls2 = cls.clone()
    cls2[:, 0] += 3.0  # change the RGB global only
    out = hdm(cls2, patches)
    assert not torch.allclose(out[:, 0], base[:, 0], atol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_atmoe_shapes_and_gate_normalisation(train):
    torch.manual_seed(0)
    moe = ATMoE(C, num_experts=7, heads=4).train(train)
    feats = torch.randn(B, 7, C)
    out, gates = moe(feats)
    assert out.shape == (B, 7 * C)
    assert gates.shape == (B, 4, 7)
    assert (gates >= 0).all()
    assert torch.allclose(gates.sum(-1), torch.ones(B, 4), atol=1e-6)


def test_atmoe_param_count():
    h, e = 4, 7
    d = C // h
    moe = ATMoE(C, num_experts=e, heads=h)
    gate = (e * C * C + C) + 2 * C + 2 * C * C
    experts = h * e * (d * d + d + 2 * d)
    assert sum(p.numel() for p in moe.parameters()) == gate + experts


def test_atmoe_matches_explicit_per_expert_loop():
    """The batched experts equal 7*heads separate Linear->QuickGELU->BN experts, gated."""
    torch.manual_seed(0)
    h, e = 4, 7
    d = C // h
    moe = ATMoE(C, num_experts=e, heads=h).train()
    with torch.no_grad():  # non-trivial BN affine params
        moe.expert_norm.weight.uniform_(0.5, 1.5)
        moe.expert_norm.bias.uniform_(-0.5, 0.5)
    feats = torch.randn(B, e, C)
    out, gates = moe(feats)

    # Reference gate: query from the concatenation, keys from each feature, per-head softmax.
    g = moe.gate_query(feats.reshape(B, e * C))
    q = moe.q_proj(g)
    k = moe.k_proj(feats)
    ref_gates = torch.empty(B, h, e)
    for hi in range(h):
        qh = q[:, hi * d:(hi + 1) * d]
        kh = k[:, :, hi * d:(hi + 1) * d]
        ref_gates[:, hi] = (torch.einsum("bd,bed->be", qh, kh) * d ** -0.5).softmax(-1)
    assert torch.allclose(gates, ref_gates, atol=1e-6)

    ref = torch.empty(B, e, C)
    act = QuickGELU()
    for ei in range(e):
        for hi in range(h):
            sl = slice(hi * d, (hi + 1) * d)
            y = act(nn.functional.linear(feats[:, ei, sl], moe.expert_weight[ei, hi], moe.expert_bias[ei, hi]))
            col = slice(ei * C + hi * d, ei * C + (hi + 1) * d)
            y = nn.functional.batch_norm(
                y, None, None, moe.expert_norm.weight[col], moe.expert_norm.bias[col], training=True,
                eps=moe.expert_norm.eps,
            )
            ref[:, ei, sl] = y * ref_gates[:, hi, ei : ei + 1]
    assert torch.allclose(out, ref.reshape(B, e * C), atol=1e-5)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    pife, hdm, moe = PIFE(C), HDM(C, num_heads=4), ATMoE(C, heads=4)
    cls, patches = _inputs()
    g = pife(cls, patches)
    d = hdm(g, patches)
    out, gates = moe(d)
    # Random projection: a plain sum of BN outputs has ~zero gradient.
    loss = (out * torch.randn_like(out)).sum()
    loss.backward()
    for mod in (pife, hdm, moe):
        for name, p in mod.named_parameters():
            assert p.grad is not None, name
            assert p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- accounting

PUBLISHED_PARAMS_M = {"A": 86.41, "B": 87.99, "C": 95.96, "D": 98.79}
PUBLISHED_GFLOPS = {"A": 34.28, "D": 35.10}  # DeMo's "FLOPs" = fvcore count = MACs
ROW_CONFIGS = {"A": "DeMo_A_baseline", "B": "DeMo_B_PIFE", "C": "DeMo_C_PIFE_HDM", "D": "DeMo_D_full"}


def _row_model(row: str):
    """The real model builder for DeMo's ablation row, on the meta device (no weights)."""
    from config import build_cfg
    from modeling.model_size import build_on_meta

    cfg = build_cfg(f"configs/RGBNT201/ablation/{ROW_CONFIGS[row]}.yml")
    return build_on_meta(cfg, num_classes=171, num_cams=4)


@pytest.mark.parametrize("row", sorted(ROW_CONFIGS))
def test_param_count_matches_published(row):
    from modeling.model_size import count_parameters

    params = count_parameters(_row_model(row))
    published = PUBLISHED_PARAMS_M[row] * 1e6
    assert abs(params["total"] - published) / published < 0.005, (row, params)
    # DeMo counted trainable parameters (BNNeck biases are frozen): it even rounds the same.
    assert round(params["trainable"] / 1e6, 2) == PUBLISHED_PARAMS_M[row], (row, params)


def test_flops_match_published_macs():
    from modeling.model_size import count_flops

    flops = {row: count_flops(_row_model(row), (256, 128)) for row in PUBLISHED_GFLOPS}
    for row, pub in PUBLISHED_GFLOPS.items():
        macs_g = flops[row] / 2 / 1e9  # FlopCounterMode counts 2 FLOPs per MAC
        assert abs(macs_g - pub) / pub < 0.05, (row, macs_g)
    # PIFE + HDM + ATMoE + the 7C head add ~0.82 GMAC (published: 35.10 - 34.28 = 0.82 G).
    assert abs((flops["D"] - flops["A"]) / 2e9 - 0.82) < 0.02
