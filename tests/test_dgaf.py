"""Tests of modeling/dgaf.py (DGAF)."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.dgaf import DGAF, WeightedAttentionPool  # noqa: E402
from modeling.sdtps import MultiModalSDTPS  # noqa: E402

C = 64


def selected(batch=3, n=32, seed=0, ratio=0.7):
    """SDTPS output on random features: (patches with the dropped ones zeroed (B, 3, N, C),
    keep_mask (B, 3, N))."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sdtps = MultiModalSDTPS(C, 4, sparse_ratio=ratio)
    patches = torch.randn(batch, 3, n, C, generator=gen)
    out = sdtps(patches, torch.randn(batch, 3, C, generator=gen))
    return (patches * out.keep_mask.unsqueeze(-1)).detach(), out.keep_mask


@pytest.mark.parametrize("n", [32, 128])
def test_output_shape(n):
    torch.manual_seed(0)
    tokens, mask = selected(n=n)
    out = DGAF(C, num_heads=8)(tokens, mask)
    assert out.shape == (3, 3 * C)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("init_alpha", [0.5, 0.3, 0.8])
def test_alpha_equals_init_alpha(init_alpha):
    mod = DGAF(C, init_alpha=init_alpha)
    assert abs(mod.alpha.item() - init_alpha) < 1e-6
    assert math.isclose(mod.alpha_logit.item(), math.log(init_alpha / (1 - init_alpha)), abs_tol=1e-6)
    if init_alpha == 0.5:
        assert mod.alpha.item() == 0.5


def test_invalid_arguments():
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError):
            DGAF(C, init_alpha=bad)
    with pytest.raises(ValueError):
        DGAF(C, tau=0.0)
    with pytest.raises(ValueError):
        DGAF(C, num_heads=7)


@pytest.mark.parametrize("train", [True, False])
def test_dropped_tokens_do_not_matter(train):
    torch.manual_seed(1)
    tokens, mask = selected(seed=1)
    mod = DGAF(C).train(train)
    ref = mod(tokens, mask)
    noisy = tokens + 1e3 * torch.randn_like(tokens) * (~mask).unsqueeze(-1)
    assert (noisy[~mask].abs() > 0).any()
    out = mod(noisy, mask)
    assert (out - ref).abs().max().item() <= 1e-6
    # Control: the same perturbation with every token visible does change the output.
    full = torch.ones_like(mask)
    assert (mod(noisy, full) - mod(tokens, full)).abs().max().item() > 1e-2


def test_masked_equals_compacted_tokens():
    """Attending with the padding mask == attending to the kept tokens alone."""
    torch.manual_seed(2)
    tokens, mask = selected(seed=2)
    mod = DGAF(C)
    k = int(mask[0, 0].sum())
    idx = mask.float().topk(k, dim=-1).indices.sort(dim=-1).values  # kept positions per row
    compact = torch.gather(tokens, 2, idx.unsqueeze(-1).expand(-1, -1, -1, C))
    a = mod(tokens, mask)
    b = mod(compact, torch.ones(compact.shape[:3], dtype=torch.bool))
    assert torch.allclose(a, b, atol=1e-5)


def test_equations():
    """Recompute the gates and the output from the pooled features."""
    torch.manual_seed(3)
    tokens, mask = selected(seed=3)
    mod = DGAF(C, tau=0.7, init_alpha=0.3)
    out, det = mod(tokens, mask, return_details=True)
    h = det.pooled
    p = h.abs() / h.abs().sum(-1, keepdim=True)
    entropy = -(p * p.log()).sum(-1)
    assert torch.allclose(det.entropy, entropy, atol=1e-4)
    z = mod.entropy_proj(h).mean(-1)
    w = torch.softmax(z * torch.exp(-entropy / 0.7), dim=-1)
    assert torch.allclose(det.entropy_weights, w, atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(3), atol=1e-6)
    g = torch.sigmoid(mod.importance_mlp(h.flatten(1)))
    assert torch.allclose(det.importance, g, atol=1e-6)
    h_f = 0.3 * (w.unsqueeze(-1) * h).sum(1) + 0.7 * (g.unsqueeze(-1) * h).sum(1)
    assert torch.allclose(det.fused, h_f, atol=1e-5)
    expected = (h + mod.fuse_norm(mod.fuse_proj(h_f)).unsqueeze(1)).flatten(1)
    assert torch.allclose(out, expected, atol=1e-5)
    # h_m is the pooled feature of modality m: query m pooling modality m's kept tokens only.
    other = tokens.clone()
    other[:, 1:] = torch.randn_like(other[:, 1:])
    _, det2 = mod(other, mask, return_details=True)
    assert torch.allclose(det2.pooled[:, 0], h[:, 0], atol=1e-6)


def test_every_parameter_gets_gradient():
    torch.manual_seed(4)
    tokens, mask = selected(seed=4)
    tokens.requires_grad_(True)
    mod = DGAF(C)
    mod(tokens, mask).pow(2).mean().backward()
    for name, param in mod.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert (mod.queries.grad.norm(dim=1) > 0).all()
    assert (tokens.grad[~mask] == 0).all()  # dropped tokens receive no gradient
    assert tokens.grad[mask].abs().sum() > 0


def test_pool_equals_multihead_attention_with_key_padding_mask():
    """0/1 weights == nn.MultiheadAttention with the same projections and key_padding_mask (whose
    key bias, random here, changes nothing: the softmax cancels it)."""
    torch.manual_seed(5)
    pool = WeightedAttentionPool(C, 8)
    with torch.no_grad():
        pool.q_proj.bias.normal_()
        pool.v_proj.bias.normal_()
    mha = torch.nn.MultiheadAttention(C, 8, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([pool.q_proj.bias, torch.randn(C), pool.v_proj.bias]))
        mha.out_proj.weight.copy_(pool.out_proj.weight)
        mha.out_proj.bias.copy_(pool.out_proj.bias)
    query, tokens = torch.randn(6, C), torch.randn(6, 20, C)
    keep = torch.rand(6, 20) > 0.5
    keep[:, 3] = True
    ours = pool(query, tokens, keep.float())
    ref = mha(query.unsqueeze(1), tokens, tokens, key_padding_mask=~keep)[0][:, 0]
    assert torch.allclose(ours, ref, atol=1e-5)


def test_selection_weights_get_gradient_at_dropped_positions():
    """Straight-through weights (forward 0/1): DGAF's output is that of the keep mask, and the
    weights of dropped tokens get a gradient (the scorer learns which patch it should keep)."""
    torch.manual_seed(6)
    tokens, mask = selected(seed=6)
    weights = mask.float().requires_grad_(True)
    mod = DGAF(C)
    out = mod(tokens_all := torch.randn_like(tokens), weights)
    assert torch.equal(out, mod(tokens_all, mask))
    out.pow(2).mean().backward()
    assert (weights.grad[~mask].abs() > 0).all() and (weights.grad[mask].abs() > 0).all()
