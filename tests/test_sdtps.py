"""Tests of modeling/sdtps.py (CrossModalAttention, MultiModalSDTPS) and modeling/fusion.py's
weighted_mean."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.dgaf import DGAF  # noqa: E402
from modeling.fusion import weighted_mean  # noqa: E402
from modeling.sdtps import (  # noqa: E402
    GUIDE_ORDER,
    PAIR_NAMES,
    CrossModalAttention,
    MultiModalSDTPS,
    diagnostics_histograms,
    diagnostics_summary,
    num_kept,
)

C = 64
H = 4
COSINES = [-1.0, -0.5, 0.0, 0.5, 1.0]
TABLE = {
    (0.5, 0.5): [0.500, 0.562, 0.622, 0.679, 0.731],
    (1.0, 0.0): [0.269, 0.378, 0.500, 0.622, 0.731],
}


def controlled(batch=2, dim=C):
    """Patches with cosines COSINES to the guide (and non-unit norms): (B, 5, C), guide (B, C)."""
    guide = torch.zeros(batch, dim)
    guide[:, 0] = 3.0
    patches = torch.zeros(batch, len(COSINES), dim)
    for n, c in enumerate(COSINES):
        patches[:, n, 0] = 2.0 * c
        patches[:, n, 1] = 2.0 * math.sqrt(1.0 - c * c)
    return patches, guide


def inputs(batch=3, n=32, dim=C, seed=0, aligned=False):
    gen = torch.Generator().manual_seed(seed)
    globals_ = torch.randn(batch, 3, dim, generator=gen)
    noise = torch.randn(batch, 3, n, dim, generator=gen)
    if not aligned:
        return noise, globals_
    # Patches that share a random amount of their global: cosines spread like real features.
    share = torch.rand(batch, 3, n, 1, generator=gen)
    return globals_.unsqueeze(2) * share + 0.8 * noise, globals_


# --------------------------------------------------------------------------------------------
# Gate values
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,bias", list(TABLE))
def test_gate_table_single_pair(scale, bias):
    torch.manual_seed(0)
    mod = CrossModalAttention(C, H, gate_init_scale=scale, gate_init_bias=bias)
    patches, guide = controlled()
    out = mod(patches, guide)
    expected = torch.tensor(TABLE[(scale, bias)]).expand(2, H, 5)
    assert torch.allclose(out.cos, torch.tensor(COSINES).expand(2, 5), atol=1e-6)
    assert out.gate.shape == (2, H, 5)
    assert torch.allclose(out.gate, expected, atol=1e-3)
    assert torch.allclose(mod.gate_from_cos(torch.tensor([COSINES])), expected[:1], atol=1e-3)


@pytest.mark.parametrize("scale,bias", list(TABLE))
def test_gate_table_all_pairs(scale, bias):
    torch.manual_seed(0)
    mod = MultiModalSDTPS(C, H, gate_init_scale=scale, gate_init_bias=bias)
    patches, guide = controlled()
    out = mod(patches.unsqueeze(1).repeat(1, 3, 1, 1), guide.unsqueeze(1).repeat(1, 3, 1))
    assert out.diagnostics.gates.shape == (2, 3, 3, H, 5)
    expected = torch.tensor(TABLE[(scale, bias)]).expand(2, 3, 3, H, 5)
    assert torch.allclose(out.diagnostics.gates, expected, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Batched 9 pairs == 9 CrossModalAttention calls
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate_norm", ["none", "patches", "heads"])
@pytest.mark.parametrize("renorm_attn", [False, True])
def test_batched_pairs_match_single_modules(gate_norm, renorm_attn):
    torch.manual_seed(1)
    mod = MultiModalSDTPS(C, H, gate_norm=gate_norm, renorm_attn=renorm_attn)
    with torch.no_grad():  # distinct per-pair gates, so a pair mix-up cannot go unnoticed
        mod.gate_scale.copy_(torch.randn(9, H))
        mod.gate_bias.copy_(torch.randn(9, H))
        if gate_norm == "heads":
            mod.gate_norm_weight.copy_(torch.randn(9, H))
            mod.gate_norm_bias.copy_(torch.randn(9, H))
    patches, globals_ = inputs(n=32, seed=1, aligned=True)
    batched = mod.pair_scores(patches, globals_)
    singles = []
    for m in range(3):
        for j, g in enumerate(GUIDE_ORDER[m]):
            ref = mod.pair_module(3 * m + j)(patches[:, m], globals_[:, g])
            for name in ("score", "attn", "gate", "attn_gated", "cos"):
                got = getattr(batched, name)[:, m, j]
                assert torch.allclose(got, getattr(ref, name), atol=1e-5, rtol=0), (name, m, j)
            singles.append(ref.score)
    # The whole selection from the 9 sequential scores equals the batched forward.
    stacked = torch.stack(singles, dim=1).view(3, 3, 3, -1)
    seq = mod.select(patches, stacked)
    out = mod(patches, globals_)
    assert torch.allclose(seq.scores, out.scores, atol=1e-5)
    assert torch.equal(seq.keep_mask, out.keep_mask)


def test_pair_order_and_names():
    assert PAIR_NAMES[:3] == ("RGB<-RGB", "RGB<-NI", "RGB<-TI")
    assert PAIR_NAMES[3:6] == ("NI<-NI", "NI<-RGB", "NI<-TI")
    assert PAIR_NAMES[6:] == ("TI<-TI", "TI<-RGB", "TI<-NI")


# --------------------------------------------------------------------------------------------
# Gradients reach every parameter
# --------------------------------------------------------------------------------------------
CONFIGS = [
    {},
    {"score_combine": "learned"},
    {"gate_norm": "patches", "renorm_attn": True},
    {"score_combine": "learned", "gate_norm": "patches", "renorm_attn": True},
    {"gate_norm": "heads"},
]


def _assert_all_grads(module, per_pair):
    for name, param in module.named_parameters():
        assert param.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient"
        if per_pair and name in ("q_weight", "q_bias", "k_weight"):
            norms = param.grad.flatten(1).norm(dim=1)
            assert (norms > 0).all(), f"{name}: pairs without gradient {norms}"
        if per_pair and name in ("gate_scale", "gate_bias", "combine_logits"):
            assert (param.grad != 0).all(), f"{name}: entries without gradient {param.grad}"


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda kw: "-".join(kw) or "default")
@pytest.mark.parametrize("head", ["dgaf", "weighted_mean"])
def test_every_parameter_gets_gradient(kwargs, head):
    torch.manual_seed(2)
    sdtps = MultiModalSDTPS(C, H, **kwargs)
    if kwargs.get("gate_norm") == "heads":  # equal heads normalise to 0 (no affine gradient):
        with torch.no_grad():  # start from distinct heads, as after the first steps
            sdtps.gate_scale.add_(0.1 * torch.randn(9, H))
    dgaf = DGAF(C, num_heads=8)
    patches, globals_ = inputs(n=32, seed=2, aligned=True)
    patches.requires_grad_(True)
    globals_.requires_grad_(True)
    out = sdtps(patches, globals_)
    if head == "dgaf":
        feat = dgaf(patches, out.weights)
    else:
        feat = weighted_mean(patches, out.weights).flatten(1)
    target = torch.randn(feat.shape, generator=torch.Generator().manual_seed(3))
    loss = (feat - target).pow(2).mean()
    loss.backward()
    _assert_all_grads(sdtps, per_pair=True)
    if head == "dgaf":
        _assert_all_grads(dgaf, per_pair=False)
        assert (dgaf.queries.grad.norm(dim=1) > 0).all()
    # The kept tokens' values carry gradient to the patches; the scorer reads detached features,
    # so the globals (used only to score) get none.
    assert patches.grad.abs().sum() > 0 and globals_.grad is None


def test_scores_do_not_send_gradient_into_the_backbone_features():
    torch.manual_seed(5)
    mod = MultiModalSDTPS(C, H)
    patches, globals_ = inputs(n=16, seed=5)
    patches.requires_grad_(True)
    out = mod(patches, globals_)
    out.scores.sum().backward()  # a loss on the scores alone
    assert patches.grad is None or patches.grad.abs().sum() == 0
    assert mod.q_weight.grad.abs().sum() > 0 and mod.gate_scale.grad.abs().sum() > 0


def test_straight_through_gradient_value():
    """Mean pooling with the selection weights: d loss / d score_n = <d loss / d f, p_n - f> / K
    at every position, dropped ones included (the documented gradient path)."""
    torch.manual_seed(4)
    mod = MultiModalSDTPS(C, H)
    patches, globals_ = inputs(n=16, seed=4)
    out = mod(patches, globals_)
    out.scores.retain_grad()
    pooled = weighted_mean(patches, out.weights)  # (B, 3, C)
    upstream = torch.randn_like(pooled)
    (pooled * upstream).sum().backward()
    k = num_kept(16, mod.sparse_ratio)
    expected = torch.einsum("bmc,bmnc->bmn", upstream, patches - pooled.detach().unsqueeze(2)) / k
    assert torch.allclose(out.scores.grad, expected, atol=1e-5)
    assert (out.scores.grad[~out.keep_mask].abs() > 0).all()  # dropped patches get a signal too


# --------------------------------------------------------------------------------------------
# Renormalisation and gate normalisation
# --------------------------------------------------------------------------------------------
def test_renorm_attn_sums_to_one():
    torch.manual_seed(5)
    patches, globals_ = inputs(n=32, seed=5)
    single = CrossModalAttention(C, H, renorm_attn=True)(patches[:, 0], globals_[:, 1])
    assert torch.allclose(single.attn_gated.sum(-1), torch.ones(3, H), atol=1e-5)
    batched = MultiModalSDTPS(C, H, renorm_attn=True).pair_scores(patches, globals_)
    assert torch.allclose(batched.attn_gated.sum(-1), torch.ones(3, 3, 3, H), atol=1e-5)
    plain = MultiModalSDTPS(C, H).pair_scores(patches, globals_)
    assert (plain.attn_gated.sum(-1) < 1.0).all()  # gates < 1 shrink the mass without renorm


def test_gate_norm_keeps_cosine_information_at_init():
    torch.manual_seed(6)
    mod = CrossModalAttention(C, H, gate_norm="patches")  # default init: all heads identical
    patches, guide = controlled()
    gate = mod(patches, guide).gate  # (B, H, 5), cosines increasing along N
    assert (gate[..., 1:] > gate[..., :-1] + 0.02).all(), gate
    assert (gate.max(-1).values - gate.min(-1).values > 0.3).all()
    # Random features: the gate is not the constant 0.5 of a LayerNorm over identical heads.
    batched = MultiModalSDTPS(C, H, gate_norm="patches")(*inputs(n=32, seed=6)).diagnostics.gates
    assert batched.std(dim=-1).min() > 0.05
    assert (batched - 0.5).abs().max() > 0.2


def test_gate_norm_degenerate_inputs_are_finite():
    """N = 1 or identical patches: no spread to standardise; gate = sigmoid(bias), finite grads."""
    torch.manual_seed(7)
    for n in (1, 8):
        mod = MultiModalSDTPS(C, H, gate_norm="patches", sparse_ratio=0.5)
        patches = torch.randn(2, 3, 1, C).repeat(1, 1, n, 1).requires_grad_(True)
        out = mod(patches, torch.randn(2, 3, C))
        assert torch.allclose(out.diagnostics.gates, torch.sigmoid(torch.tensor(0.5)), atol=1e-6)
        dgaf = DGAF(C)
        dgaf(patches, out.weights).pow(2).mean().backward()
        for name, param in mod.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert torch.isfinite(patches.grad).all()


@pytest.mark.parametrize("kind", ["iid", "aligned", "near_constant"])
def test_gate_norm_gradients_within_10x(kind):
    """Same weights and inputs with and without gate_norm; near_constant: the patches of a row are
    one vector + 1e-3 noise, so the cosines hardly spread (a variance floor like 1e-5 fails here)."""
    torch.manual_seed(8)
    base = MultiModalSDTPS(C, H).state_dict()
    dgaf = DGAF(C)
    patches, globals_ = inputs(batch=4, n=32, seed=8, aligned=kind == "aligned")
    if kind == "near_constant":
        patches = patches[:, :, :1] + 1e-3 * patches
    norms = {}
    for gate_norm in ("none", "patches"):
        mod = MultiModalSDTPS(C, H, gate_norm=gate_norm)
        mod.load_state_dict(base)
        x = patches.clone().requires_grad_(True)
        out = mod(x, globals_)
        feat = dgaf(x, out.weights)
        (feat * torch.randn(feat.shape, generator=torch.Generator().manual_seed(9))).sum().backward()
        dgaf.zero_grad()
        norms[gate_norm] = {n: p.grad.norm().item() for n, p in mod.named_parameters()}
        norms[gate_norm]["input"] = x.grad.norm().item()
    for name in norms["none"]:
        ratio = norms["patches"][name] / norms["none"][name]
        assert 0.1 < ratio < 10.0, (name, ratio, norms)


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------
def test_num_kept():
    assert num_kept(32, 0.7) == 23 and num_kept(128, 0.7) == 90
    # 100 * 0.55 == 55.00000000000001 and 100 * 0.57 == 56.99999999999999 in floating point:
    # a plain ceil would keep 56 and 57 (catches the rounding guard dropped)
    assert num_kept(100, 0.55) == 55 and num_kept(100, 0.57) == 57
    assert num_kept(5, 0.01) == 1 and num_kept(1, 0.7) == 1 and num_kept(7, 1.0) == 7
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            num_kept(10, bad)


@pytest.mark.parametrize("n", [1, 10, 32, 128])
@pytest.mark.parametrize("ratio", [0.05, 0.5, 0.7, 1.0])
def test_keep_mask_exact_k_and_top_k(n, ratio):
    torch.manual_seed(10)
    mod = MultiModalSDTPS(C, H, sparse_ratio=ratio)
    patches, globals_ = inputs(batch=2, n=n, seed=10)
    out = mod(patches, globals_)
    k = max(1, math.ceil(round(n * ratio, 6)))
    assert out.keep_mask.dtype == torch.bool and out.keep_mask.shape == (2, 3, n)
    assert (out.keep_mask.sum(-1) == k).all()
    assert torch.equal(out.weights, out.keep_mask.float())  # straight-through forward value 0/1
    if k < n:  # the kept positions are the top-K of the combined score
        kept = out.scores.masked_fill(~out.keep_mask, float("inf")).min(-1).values
        dropped = out.scores.masked_fill(out.keep_mask, float("-inf")).max(-1).values
        assert (kept >= dropped).all()
    assert ((out.scores >= 0) & (out.scores <= 1)).all()


@pytest.mark.parametrize("n", [32, 128])
def test_shapes(n):
    torch.manual_seed(11)
    mod = MultiModalSDTPS(C, H, score_combine="learned")
    patches, globals_ = inputs(batch=2, n=n, seed=11)
    out = mod(patches, globals_)
    assert out.keep_mask.shape == out.scores.shape == (2, 3, n)
    diag = out.diagnostics
    assert diag.gates.shape == (2, 3, 3, H, n)
    assert diag.pair_scores.shape == (2, 3, 3, n)
    assert diag.guide_agreement.shape == (2, 3, 3)
    assert diag.combine_weights.shape == (3, 3)
    assert ((diag.guide_agreement >= 0) & (diag.guide_agreement <= 1)).all()
    assert out.weights.shape == (2, 3, n)
    assert weighted_mean(patches, out.weights).shape == (2, 3, C)
    summary = diagnostics_summary(diag)
    assert len(summary) == 9 * 5 and all(v.dim() == 0 for v in summary.values())
    # pair RGB<-NI is (modality 0, guide slot 1): its gate mean over batch, heads and patches
    assert float(summary["sdtps/gate_mean/RGB<-NI"]) == pytest.approx(float(diag.gates[:, 0, 1].mean()))
    assert float(summary["sdtps/gate_max/TI<-RGB"]) == pytest.approx(float(diag.gates[:, 2, 1].max()))
    hist = diagnostics_histograms(diag)
    assert len(hist) == 9 * H and torch.equal(hist["sdtps/gate_hist/NI<-TI/head2"], diag.gates[:, 1, 2, 2])


def test_learned_combine_equals_mean_at_init():
    torch.manual_seed(12)
    mean = MultiModalSDTPS(C, H)
    learned = MultiModalSDTPS(C, H, score_combine="learned")
    learned.load_state_dict(mean.state_dict(), strict=False)
    patches, globals_ = inputs(n=32, seed=12)
    a, b = mean(patches, globals_), learned(patches, globals_)
    assert torch.allclose(a.scores, b.scores, atol=1e-6)
    assert torch.equal(a.keep_mask, b.keep_mask)


def test_guide_agreement_is_one_when_guides_agree():
    torch.manual_seed(13)
    mod = MultiModalSDTPS(C, H)
    with torch.no_grad():  # the three scorers of a modality share weights, the globals are equal
        for name in ("q_weight", "q_bias", "k_weight", "gate_scale", "gate_bias"):
            p = getattr(mod, name).view(3, 3, *getattr(mod, name).shape[1:])
            p[:, 1:] = p[:, :1]
    patches, globals_ = inputs(n=32, seed=13)
    globals_ = globals_[:, :1].repeat(1, 3, 1)
    out = mod(patches, globals_)
    assert torch.allclose(out.diagnostics.guide_agreement, torch.ones(3, 3, 3))


def test_weighted_mean():
    tokens = torch.arange(2 * 3 * 4 * 2, dtype=torch.float32).view(2, 3, 4, 2)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[..., 1] = True
    mask[0, 0, 3] = True
    got = weighted_mean(tokens, mask)
    assert torch.allclose(got[0, 0], (tokens[0, 0, 1] + tokens[0, 0, 3]) / 2)
    assert torch.allclose(got[1, 2], tokens[1, 2, 1])
    assert torch.equal(weighted_mean(tokens, mask.float()), got)
    weights = torch.zeros(2, 3, 4)
    weights[0, 0, 0], weights[0, 0, 2] = 1.0, 3.0
    got = weighted_mean(tokens, weights)
    assert torch.allclose(got[0, 0], (tokens[0, 0, 0] + 3 * tokens[0, 0, 2]) / 4)
    assert (got[1] == 0).all()  # all-zero weights give zeros, not NaN


def test_autocast_bf16_runs():
    torch.manual_seed(14)
    mod = MultiModalSDTPS(C, H, gate_norm="patches")
    patches, globals_ = inputs(batch=2, n=32, seed=14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(patches, globals_)
    assert (out.keep_mask.sum(-1) == num_kept(32, 0.7)).all()
    assert torch.isfinite(out.scores).all()


def test_invalid_arguments():
    with pytest.raises(ValueError):
        MultiModalSDTPS(C, 5)
    with pytest.raises(ValueError):
        MultiModalSDTPS(C, H, score_combine="max")
    with pytest.raises(ValueError):
        MultiModalSDTPS(C, H, sparse_ratio=0.0)
    with pytest.raises(ValueError):
        CrossModalAttention(C, 3)
    with pytest.raises(ValueError):
        MultiModalSDTPS(C, H)(torch.randn(2, 2, 8, C), torch.randn(2, 2, C))


# --------------------------------------------------------------------------------------------
# The prototype's details: gate normalisation over the heads, Xavier init, guide shape
# --------------------------------------------------------------------------------------------
def test_heads_gate_norm_is_a_layernorm_across_heads():
    """GATE_NORM heads = nn.LayerNorm(H) (eps 1e-5, learnable affine) of the logits after the
    per-head scale and bias (catches a normalisation over the patches, or before the affine)."""
    torch.manual_seed(3)
    mod = CrossModalAttention(C, H, gate_norm="heads")
    with torch.no_grad():
        mod.gate_scale.copy_(torch.randn(H))
        mod.gate_bias.copy_(torch.randn(H))
        mod.gate_norm_weight.copy_(torch.rand(H) + 0.5)
        mod.gate_norm_bias.copy_(torch.randn(H))
    cos = torch.rand(2, 7) * 2 - 1
    logits = cos.unsqueeze(1) * mod.gate_scale.view(1, H, 1) + mod.gate_bias.view(1, H, 1)
    ln = torch.nn.LayerNorm(H, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(mod.gate_norm_weight)
        ln.bias.copy_(mod.gate_norm_bias)
    expected = torch.sigmoid(ln(logits.transpose(1, 2)).transpose(1, 2))
    assert torch.allclose(mod.gate_from_cos(cos), expected, atol=1e-6)


def test_heads_gate_norm_starts_degenerate():
    """With the default init every head is equal, so the LayerNorm over heads gives 0 and the gate
    is 0.5 everywhere (the documented reason this project keeps the "patches" normalisation)."""
    torch.manual_seed(4)
    gates = MultiModalSDTPS(C, H, gate_norm="heads")(*inputs(n=16, seed=4)).diagnostics.gates
    assert torch.allclose(gates, torch.full_like(gates, 0.5), atol=1e-6)


def test_query_and_key_projections_start_xavier_uniform():
    """The prototype's init: Xavier-uniform q/k weights (bound sqrt(6 / (2C)), std bound / sqrt(3)),
    zero query bias (catches nn.Linear's default init, whose std is 3x smaller for C = 64)."""
    torch.manual_seed(5)
    mod = MultiModalSDTPS(64, 4)
    bound = (6.0 / (2 * 64)) ** 0.5
    for weight in (mod.q_weight, mod.k_weight):
        assert weight.abs().max() <= bound
        assert weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    assert torch.equal(mod.q_bias, torch.zeros_like(mod.q_bias))
    pair = CrossModalAttention(64, 4)
    assert pair.q_proj.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    assert torch.equal(pair.q_proj.bias, torch.zeros_like(pair.q_proj.bias))


def test_guide_of_the_wrong_shape_is_refused():
    """A (B, 1, C) guide used to broadcast silently into (B, B, N) scores."""
    mod = CrossModalAttention(C, H)
    with pytest.raises(ValueError, match="guide"):
        mod(torch.randn(3, 5, C), torch.randn(3, 1, C))
