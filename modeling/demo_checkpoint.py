"""DeMo's official checkpoints (github.com/924973292/DeMo, ``modeling/make_model.py`` class
``DeMo``, saved as a plain ``model.state_dict()``) in this framework's parameter names.

DeMo's model holds the CLIP visual tower as ``BACKBONE.base`` (OpenAI CLIP names) and the camera
embedding as ``BACKBONE.cv_embed`` (cams, 1, W); PIFE as ``{rgb,nir,tir}_reduce``; HDM and ATMoE
inside ``generalFusion`` (one (1, 1, C) token and one ``nn.MultiheadAttention`` per modality set
``r n t rn rt nt rnt``; ATMoE as ``moe``: per head h and expert e an ``nn.Linear(C/h, C/h)`` and a
``BatchNorm1d(C/h)``, the gate ``gating_network.gate.{linear_re,q_,k_}``); the BNNeck heads as
``bottleneck`` / ``classifier`` (DIRECT), ``bottleneck_{r,n,t}`` / ``classifier_{r,n,t}``
(per modality) and ``bottleneck_moe`` / ``classifier_moe``. :data:`RENAMES` maps the one-to-one
names; HDM's tokens are stacked into ``hdm.queries`` (7, C), ATMoE's experts into
``atmoe.expert_weight`` (E, h, C/h, C/h), ``expert_bias`` (E, h, C/h) and the slices of
``atmoe.expert_norm`` (E * C: expert e, head h at ``e * C + h * C/h``).

:func:`convert_demo_state` converts and checks the result against a model's state dict: every
DeMo key must find a place and every model key must be filled, with equal shapes; otherwise
:class:`DemoCheckpointError` lists the unmatched keys.
"""
import re
from typing import Dict, List, Optional, Tuple

import torch

# A key of every DeMo checkpoint (its CLIP patch embedding), "module." of DDP removed.
MARKER = "BACKBONE.base.conv1.weight"
# Modality sets of DeMo's HDM in the order of modeling.hdm.MODALITY_SETS.
HDM_SETS = ("r", "n", "t", "rn", "rt", "nt", "rnt")

# (DeMo name pattern, our name, change of the tensor): the one-to-one names.
RENAMES: List[Tuple[str, str, Optional[str]]] = [
    (r"BACKBONE\.base\.conv1\.weight", "backbone.vit.patch_embed.proj.weight", None),
    (r"BACKBONE\.base\.class_embedding", "backbone.vit.cls_token", "to_1_1_w"),
    (r"BACKBONE\.base\.positional_embedding", "backbone.vit.pos_embed", "unsqueeze0"),
    (r"BACKBONE\.base\.ln_pre\.(weight|bias)", r"backbone.vit.norm_pre.\1", None),
    (r"BACKBONE\.base\.transformer\.resblocks\.(\d+)\.ln_1\.(weight|bias)", r"backbone.vit.blocks.\1.norm1.\2", None),
    (r"BACKBONE\.base\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"backbone.vit.blocks.\1.attn.qkv.\2", None),
    (r"BACKBONE\.base\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"backbone.vit.blocks.\1.attn.proj.\2", None),
    (r"BACKBONE\.base\.transformer\.resblocks\.(\d+)\.ln_2\.(weight|bias)", r"backbone.vit.blocks.\1.norm2.\2", None),
    (r"BACKBONE\.base\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"backbone.vit.blocks.\1.mlp.fc1.\2", None),
    (r"BACKBONE\.base\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"backbone.vit.blocks.\1.mlp.fc2.\2", None),
    (r"BACKBONE\.base\.ln_post\.(weight|bias)", r"backbone.vit.norm.\1", None),
    (r"BACKBONE\.base\.proj", "backbone.vit.head.weight", "transpose"),  # x @ proj == Linear(W, D)
    (r"BACKBONE\.cv_embed", "backbone.cam_embed", "squeeze1"),
    (r"rgb_reduce\.(\d+)\.(weight|bias)", r"pife.reduce.0.\1.\2", None),
    (r"nir_reduce\.(\d+)\.(weight|bias)", r"pife.reduce.1.\1.\2", None),
    (r"tir_reduce\.(\d+)\.(weight|bias)", r"pife.reduce.2.\1.\2", None),
    *[(rf"generalFusion\.{s}\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
       rf"hdm.attn.{k}.\1", None) for k, s in enumerate(HDM_SETS)],
    (r"generalFusion\.moe\.gating_network\.gate\.linear_re\.(\d+)\.(\w+)", r"atmoe.gate_query.\1.\2", None),
    (r"generalFusion\.moe\.gating_network\.gate\.q_\.weight", "atmoe.q_proj.weight", None),
    (r"generalFusion\.moe\.gating_network\.gate\.k_\.weight", "atmoe.k_proj.weight", None),
    (r"bottleneck\.(\w+)", r"heads.ori.bn.\1", None),
    (r"classifier\.weight", "heads.ori.classifier.weight", None),
    *[(rf"bottleneck_{d}\.(\w+)", rf"heads.ori_{ours}.bn.\1", None)
      for d, ours in (("r", "rgb"), ("n", "ni"), ("t", "ti"))],
    *[(rf"classifier_{d}\.weight", f"heads.ori_{ours}.classifier.weight", None)
      for d, ours in (("r", "rgb"), ("n", "ni"), ("t", "ti"))],
    (r"bottleneck_moe\.(\w+)", r"heads.MOE.bn.\1", None),  # MOE: "moe", or "hdm" without ATMoE
    (r"classifier_moe\.weight", "heads.MOE.classifier.weight", None),
]
HDM_TOKEN = re.compile(r"generalFusion\.(r|n|t|rn|rt|nt|rnt)_token")
EXPERT = re.compile(r"generalFusion\.moe\.experts\.(\d+)\.expertHead\.(\d+)\.mlp\.(0|2)\.(\w+)")

CHANGES = {
    None: lambda t: t,
    "to_1_1_w": lambda t: t.reshape(1, 1, -1),
    "unsqueeze0": lambda t: t.unsqueeze(0),
    "transpose": lambda t: t.t().contiguous(),
    "squeeze1": lambda t: t.squeeze(1),
}


class DemoCheckpointError(ValueError):
    """A DeMo checkpoint that does not fit the config's model; the message lists the keys."""


def strip_module(state: Dict) -> Dict:
    """``state`` without DDP's "module." prefix."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def is_demo_state(state) -> bool:
    """True for a state dict saved by DeMo's code (it has :data:`MARKER`)."""
    return isinstance(state, dict) and MARKER in strip_module(state)


def _listed(keys, shown: int = 30) -> str:
    """``keys`` compactly: indices as ``*``, names sharing a module as ``module.{a,b}``."""
    groups: Dict[str, set] = {}
    for key in keys:
        module, _, leaf = re.sub(r"\.\d+(?=\.|$)", ".*", key).rpartition(".")
        groups.setdefault(module, set()).add(leaf)
    items = [(f"{m}." if m else "") + (next(iter(v)) if len(v) == 1 else "{" + ",".join(sorted(v)) + "}")
             for m, v in sorted(groups.items())]
    more = f", ... and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def convert_demo_state(state: Dict, own: Dict[str, torch.Tensor], source: str = "the checkpoint") -> Dict:
    """DeMo's ``state`` in the names of the model whose state dict is ``own``; raises
    DemoCheckpointError listing the DeMo keys without a place, the model keys left empty and the
    shape mismatches."""
    state = strip_module(state)
    moe_head = "moe" if "heads.moe.bn.weight" in own else "hdm"
    out: Dict[str, torch.Tensor] = {}
    unplaced, tokens, experts, origin = [], {}, {}, {}  # origin: our name -> DeMo's
    for key, value in state.items():
        token, expert = HDM_TOKEN.fullmatch(key), EXPERT.fullmatch(key)
        if token:
            tokens[HDM_SETS.index(token.group(1))] = value.reshape(-1)
            continue
        if expert:
            experts[(int(expert.group(1)), int(expert.group(2)), expert.group(3), expert.group(4))] = value
            continue
        for pattern, target, change in RENAMES:
            match = re.fullmatch(pattern, key)
            if match:
                name = match.expand(target).replace("MOE", moe_head)
                out[name], origin[name] = CHANGES[change](value), key
                break
        else:
            unplaced.append(key)
    if tokens and "hdm.queries" in own:
        out["hdm.queries"] = torch.stack([tokens[k] for k in sorted(tokens)]) if len(tokens) == 7 else None
    elif tokens:
        unplaced += [f"generalFusion.{HDM_SETS[k]}_token" for k in tokens]
    if experts and "atmoe.expert_weight" in own:
        _place_experts(experts, own, out)
    elif experts:
        unplaced += [f"generalFusion.moe.experts.{h}.expertHead.{e}.mlp.{m}.{p}" for h, e, m, p in experts]
    if "backbone.vit.head.weight" in out and "backbone.vit.head.bias" in own:
        out["backbone.vit.head.bias"] = torch.zeros(own["backbone.vit.head.bias"].shape)  # CLIP: none
    unplaced += [origin.get(k, k) for k in out if k not in own]
    missing = [k for k in own if k not in out or out[k] is None]
    shapes = [f"{k}: converted {tuple(out[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if out.get(k) is not None and out[k].shape != own[k].shape]
    problems = []
    if unplaced:
        problems.append(f"DeMo keys with no place in this config's model ({len(unplaced)}): {_listed(unplaced)}")
    if missing:
        problems.append(f"model keys the file does not fill ({len(missing)}): {_listed(missing)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:8])}")
    if problems:
        raise DemoCheckpointError(f"{source} (a DeMo checkpoint) does not fit this config: "
                                  + " | ".join(problems) + " (use the config it was trained with, "
                                  "e.g. configs/RGBNT201/DeMo.yml)")
    return {k: v for k, v in out.items() if k in own}


def _place_experts(experts: Dict, own: Dict, out: Dict) -> None:
    """ATMoE's per-(head, expert) Linear and BatchNorm into the batched tensors of ``own``."""
    num_experts, heads, head_dim, _ = own["atmoe.expert_weight"].shape
    dim = heads * head_dim
    weight = torch.zeros(num_experts, heads, head_dim, head_dim)
    bias = torch.zeros(num_experts, heads, head_dim)
    norm = {p: torch.zeros(num_experts * dim) for p in ("weight", "bias", "running_mean", "running_var")}
    seen = set()
    for (h, e, layer, param), value in experts.items():
        if h >= heads or e >= num_experts or value.numel() not in (head_dim, head_dim * head_dim, 1):
            out[f"atmoe.expert (DeMo head {h}, expert {e})"] = value  # reported as without a place
            continue
        seen.add((h, e, layer, param))
        if layer == "0":
            (weight if param == "weight" else bias)[e, h] = value
        elif param == "num_batches_tracked":
            out["atmoe.expert_norm.num_batches_tracked"] = value
        else:
            norm[param][e * dim + h * head_dim:e * dim + (h + 1) * head_dim] = value
    expected = {(h, e, "0", p) for h in range(heads) for e in range(num_experts) for p in ("weight", "bias")}
    expected |= {(h, e, "2", p) for h in range(heads) for e in range(num_experts) for p in norm}
    if expected <= seen:
        out["atmoe.expert_weight"], out["atmoe.expert_bias"] = weight, bias
        for param, value in norm.items():
            out[f"atmoe.expert_norm.{param}"] = value


def demo_backbone_state(state: Dict) -> Dict[str, torch.Tensor]:
    """The CLIP tower of a DeMo checkpoint in timm's ViT names (``MODEL.PRETRAIN_PATH``: the
    backbone's weights; the camera embedding and DeMo's modules are not part of it)."""
    prefix, out = "backbone.vit.", {}
    for key, value in strip_module(state).items():
        for pattern, target, change in RENAMES:
            match = re.fullmatch(pattern, key)
            if match and target.startswith(prefix):
                out[match.expand(target)[len(prefix):]] = CHANGES[change](value)
                break
    if "head.weight" in out:
        out["head.bias"] = torch.zeros(out["head.weight"].shape[0])
    return out
