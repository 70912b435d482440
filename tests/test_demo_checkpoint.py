"""DeMo's official checkpoints: ``tools/convert_checkpoint.py --from demo``, TEST.WEIGHT and
MODEL.PRETRAIN_PATH given such a file directly (modeling/demo_checkpoint.py).

The DeMo state dict is built from the names and shapes below (read from DeMo's code:
modeling/make_model.py, meta_arch.py, clip/model.py, moe/AttnMOE.py) with random values; DeMo
itself is not imported. The model is configs/RGBNT201/DeMo.yml with a 1-block ViT-B at 64 x 32."""
import json
import os
import subprocess
import sys

import pytest
import torch

from config import build_cfg
from conftest import ROOT
from engine.evaluator import RANK_KEYS, model_outputs
from modeling.model import build_model
from utils.checkpoint import load_checkpoint_file, load_model_weights

CONFIG = "configs/RGBNT201/DeMo.yml"
SMALL = ["MODEL.PRETRAIN_PATH", "", "MODEL.BACKBONE_DEPTH", "1", "INPUT.SIZE_TRAIN", "[64, 32]",
         "INPUT.SIZE_TEST", "[64, 32]", "MODEL.DEVICE", "cpu"]
W, D, L, HEADS, EXPERTS = 768, 512, 1, 4, 7  # CLIP width, projection, blocks, ATMoE heads
TOKENS = 4 * 2 + 1  # 64 x 32 at stride 16, plus CLS
SETS = ("r", "n", "t", "rn", "rt", "nt", "rnt")


def demo_names(classes: int, cams: int, hdm: bool = True):
    """[(name, shape)] of DeMo's DeMo(...).state_dict() for MODEL.TRANSFORMER_TYPE ViT-B-16,
    DIRECT 1, GLOBAL_LOCAL, HDM and ATM with HEAD 4 (DeMo's RGBNT201 config)."""
    bn = lambda p, n: [(f"{p}.weight", (n,)), (f"{p}.bias", (n,)), (f"{p}.running_mean", (n,)),  # noqa: E731
                       (f"{p}.running_var", (n,)), (f"{p}.num_batches_tracked", ())]
    names = [("BACKBONE.cv_embed", (cams, 1, W)), ("BACKBONE.base.class_embedding", (W,)),
             ("BACKBONE.base.positional_embedding", (TOKENS, W)), ("BACKBONE.base.proj", (W, D)),
             ("BACKBONE.base.conv1.weight", (W, 3, 16, 16)), ("BACKBONE.base.ln_pre.weight", (W,)),
             ("BACKBONE.base.ln_pre.bias", (W,))]
    for i in range(L):
        p = f"BACKBONE.base.transformer.resblocks.{i}."
        names += [(p + "attn.in_proj_weight", (3 * W, W)), (p + "attn.in_proj_bias", (3 * W,)),
                  (p + "attn.out_proj.weight", (W, W)), (p + "attn.out_proj.bias", (W,)),
                  (p + "ln_1.weight", (W,)), (p + "ln_1.bias", (W,)),
                  (p + "mlp.c_fc.weight", (4 * W, W)), (p + "mlp.c_fc.bias", (4 * W,)),
                  (p + "mlp.c_proj.weight", (W, 4 * W)), (p + "mlp.c_proj.bias", (W,)),
                  (p + "ln_2.weight", (W,)), (p + "ln_2.bias", (W,))]
    names += [("BACKBONE.base.ln_post.weight", (W,)), ("BACKBONE.base.ln_post.bias", (W,))]
    for m in ("rgb", "nir", "tir"):
        names += [(f"{m}_reduce.0.weight", (2 * D,)), (f"{m}_reduce.0.bias", (2 * D,)),
                  (f"{m}_reduce.1.weight", (D, 2 * D)), (f"{m}_reduce.1.bias", (D,))]
    if hdm:
        for s in SETS:
            names += [(f"generalFusion.{s}_token", (1, 1, D)),
                      (f"generalFusion.{s}.in_proj_weight", (3 * D, D)), (f"generalFusion.{s}.in_proj_bias", (3 * D,)),
                      (f"generalFusion.{s}.out_proj.weight", (D, D)), (f"generalFusion.{s}.out_proj.bias", (D,))]
        hd = D // HEADS
        for h in range(HEADS):
            for e in range(EXPERTS):
                p = f"generalFusion.moe.experts.{h}.expertHead.{e}.mlp."
                names += [(p + "0.weight", (hd, hd)), (p + "0.bias", (hd,))] + bn(p + "2", hd)
        g = "generalFusion.moe.gating_network.gate."
        names += [(g + "linear_re.0.weight", (D, 7 * D)), (g + "linear_re.0.bias", (D,))]
        names += bn(g + "linear_re.2", D) + [(g + "q_.weight", (D, D)), (g + "k_.weight", (D, D))]
        names += [("classifier_moe.weight", (classes, 7 * D))] + bn("bottleneck_moe", 7 * D)
    names += [("classifier.weight", (classes, 3 * D))] + bn("bottleneck", 3 * D)
    return names


def demo_state(classes: int, cams: int, hdm: bool = True, seed: int = 0):
    """A DeMo state dict of random values (running variances positive)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in demo_names(classes, cams, hdm):
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        else:
            value = torch.randn(shape, generator=gen) * 0.05
            state[name] = value.abs() + 0.5 if name.endswith("running_var") else value
    return state


def load_by_hand(model, demo):
    """The DeMo tensors written into ``model``'s modules one by one (the test's own mapping)."""
    vit, hd = model.backbone.vit, D // HEADS
    b = "BACKBONE.base."
    with torch.no_grad():
        vit.patch_embed.proj.weight.copy_(demo[b + "conv1.weight"])
        vit.cls_token.view(-1).copy_(demo[b + "class_embedding"])
        vit.pos_embed[0].copy_(demo[b + "positional_embedding"])
        for mine, theirs in ((vit.norm_pre, "ln_pre"), (vit.norm, "ln_post")):
            mine.weight.copy_(demo[b + theirs + ".weight"])
            mine.bias.copy_(demo[b + theirs + ".bias"])
        for i, blk in enumerate(vit.blocks):
            p = f"{b}transformer.resblocks.{i}."
            pairs = ((blk.norm1, "ln_1"), (blk.norm2, "ln_2"), (blk.attn.proj, "attn.out_proj"),
                     (blk.mlp.fc1, "mlp.c_fc"), (blk.mlp.fc2, "mlp.c_proj"))
            for mine, theirs in pairs:
                mine.weight.copy_(demo[p + theirs + ".weight"])
                mine.bias.copy_(demo[p + theirs + ".bias"])
            blk.attn.qkv.weight.copy_(demo[p + "attn.in_proj_weight"])
            blk.attn.qkv.bias.copy_(demo[p + "attn.in_proj_bias"])
        vit.head.weight.copy_(demo[b + "proj"].t())
        vit.head.bias.zero_()
        model.backbone.cam_embed.copy_(demo["BACKBONE.cv_embed"][:, 0])
        for m, name in enumerate(("rgb", "nir", "tir")):
            for j in (0, 1):
                model.pife.reduce[m][j].weight.copy_(demo[f"{name}_reduce.{j}.weight"])
                model.pife.reduce[m][j].bias.copy_(demo[f"{name}_reduce.{j}.bias"])
        for k, s in enumerate(SETS):
            model.hdm.queries[k].copy_(demo[f"generalFusion.{s}_token"].view(-1))
            for param in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
                model.hdm.attn[k].get_parameter(param).copy_(demo[f"generalFusion.{s}.{param}"])
        a = model.atmoe
        for h in range(HEADS):
            for e in range(EXPERTS):
                p = f"generalFusion.moe.experts.{h}.expertHead.{e}.mlp."
                a.expert_weight[e, h].copy_(demo[p + "0.weight"])
                a.expert_bias[e, h].copy_(demo[p + "0.bias"])
                rows = slice(e * D + h * hd, e * D + (h + 1) * hd)
                for param in ("weight", "bias", "running_mean", "running_var"):
                    getattr(a.expert_norm, param)[rows] = demo[p + "2." + param]
        g = "generalFusion.moe.gating_network.gate."
        a.q_proj.weight.copy_(demo[g + "q_.weight"])
        a.k_proj.weight.copy_(demo[g + "k_.weight"])
        a.gate_query[0].weight.copy_(demo[g + "linear_re.0.weight"])
        a.gate_query[0].bias.copy_(demo[g + "linear_re.0.bias"])
        heads = ((a.gate_query[2], g + "linear_re.2"), (model.heads["ori"].bn, "bottleneck"),
                 (model.heads["moe"].bn, "bottleneck_moe"))
        for norm, p in heads:
            for param in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, param).copy_(demo[f"{p}.{param}"])
        model.heads["ori"].classifier.weight.copy_(demo["classifier.weight"])
        model.heads["moe"].classifier.weight.copy_(demo["classifier_moe.weight"])


def _features(model):
    """Every head's eval feature (B, D_head) for fixed random images and cameras."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 3, 64, 32, generator=gen)
    outputs, _ = model_outputs(model.eval(), images, torch.tensor([0, 2]))
    return {name: head.feat for name, head in outputs["heads"].items()}


def _convert(args, timeout=300):
    return subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--from", "demo"] + args,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    """(path, state) of a DeMo checkpoint for 6 identities and 4 cameras (the tiny synthetic
    training split), saved as DeMo saves it (a plain state dict)."""
    path = str(tmp_path_factory.mktemp("demo") / "demo_rgbnt201.pth")
    state = demo_state(classes=6, cams=4)
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def converted(demo_file, tmp_path_factory):
    """The real command's output file."""
    out = str(tmp_path_factory.mktemp("demo_out") / "converted.pth")
    proc = _convert([demo_file[0], out, "--config_file", CONFIG] + SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_converted_file_loads_strictly_and_gives_the_hand_mapped_features(demo_file, converted):
    """The converted checkpoint loads strictly into DeMo.yml's model and every head's feature
    equals that of the same weights written module by module (catches: a transposed projection,
    HDM tokens or experts in the wrong order, an expert's BatchNorm slice misplaced, the camera
    embedding dropped, any unfilled key)."""
    cfg = build_cfg(CONFIG, SMALL)
    model = build_model(cfg, 6, 4)
    state = load_checkpoint_file(converted)["model"]  # safe loading, checksum verified
    assert load_model_weights(model, state, strict=True, source=converted) == []
    by_hand = build_model(cfg, 6, 4)
    load_by_hand(by_hand, demo_file[1])
    ours, theirs = _features(model), _features(by_hand)
    assert set(ours) == {"ori", "moe"}
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)
    assert not torch.equal(ours["moe"], _features(build_model(cfg, 6, 4))["moe"])  # weights matter


def test_demo_with_hdm_into_a_config_without_it_is_refused_with_the_keys(demo_file, tmp_path):
    """A DeMo checkpoint with HDM / ATMoE into a config without them fails with one line that
    lists the keys without a place, and writes nothing (catches: a silent partial conversion)."""
    out = str(tmp_path / "x.pth")
    proc = _convert([demo_file[0], out, "--config_file", CONFIG, "MODEL.HDM.ENABLED", "False",
                     "MODEL.ATMOE.ENABLED", "False", "TEST.REPORT_FEATS", "[]", "TEST.FEAT", "ori"] + SMALL)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "DeMo keys with no place" in errors[0] and "r_token" in errors[0], errors[0]
    assert "bottleneck_moe.{" in errors[0] and "generalFusion.moe.experts.*" in errors[0]
    assert not os.path.exists(out)


def test_model_keys_a_file_does_not_fill_are_listed(tmp_path):
    """A DeMo file without HDM into DeMo.yml's model names the model keys left empty."""
    from modeling.demo_checkpoint import DemoCheckpointError, convert_demo_state

    own = build_model(build_cfg(CONFIG, SMALL), 6, 4).state_dict()
    with pytest.raises(DemoCheckpointError, match=r"model keys the file does not fill .*hdm\.queries"):
        convert_demo_state(demo_state(6, 4, hdm=False), own)


def test_test_net_reads_a_demo_file_directly(demo_file, converted, synthetic_root, tmp_path):
    """TEST.WEIGHT naming the DeMo file itself evaluates like the converted file (catches: the
    detection by keys missing, so the DeMo file would be refused as not matching)."""
    opts = SMALL + ["DATASETS.NAMES", "Synthetic", "DATASETS.ROOT_DIR", synthetic_root,
                    "DATASETS.SYNTHETIC.NUM_TRAIN_IDS", "6", "DATASETS.SYNTHETIC.NUM_TEST_IDS", "4",
                    "DATASETS.SYNTHETIC.SAMPLES_PER_ID", "6", "DATASETS.SYNTHETIC.HEIGHT", "64",
                    "DATASETS.SYNTHETIC.WIDTH", "32", "DATALOADER.NUM_WORKERS", "0",
                    "TEST.IMS_PER_BATCH", "16", "TEST.REPORT_FEATS", "[]", "SOLVER.IMS_PER_BATCH", "8",
                    "DATALOADER.NUM_INSTANCE", "2"]
    results = []
    for weight in (demo_file[0], converted):
        out = str(tmp_path / os.path.basename(weight))
        proc = subprocess.run([sys.executable, "test_net.py", "--config_file", CONFIG] + opts +
                              ["TEST.WEIGHT", weight, "OUTPUT_DIR", out], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(os.path.join(out, "test_results.json")) as f:
            results.append(json.load(f)["results"]["none"])
    assert {k: results[0][k] for k in RANK_KEYS} == {k: results[1][k] for k in RANK_KEYS}


def test_pretrain_path_takes_the_clip_tower_of_a_demo_file(demo_file, converted):
    """MODEL.PRETRAIN_PATH naming a DeMo file gives the backbone its CLIP tower (catches: a DeMo
    file refused as matching no backbone parameter)."""
    cfg = build_cfg(CONFIG, SMALL[:1] + [demo_file[0]] + SMALL[2:])
    backbone = build_model(cfg, 6, 4).backbone
    state = load_checkpoint_file(converted)["model"]
    for key, value in backbone.vit.state_dict().items():
        torch.testing.assert_close(value, state[f"backbone.vit.{key}"], rtol=0, atol=0)
