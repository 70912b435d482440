"""Loading local pretrained weights: timm state dicts and OpenAI CLIP checkpoints."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modeling.backbone import PretrainedWeightsError, ViTBackbone

WIDTH, LAYERS, OUT = 768, 1, 512
CLIP_NAME = "vit_base_patch16_clip_quickgelu_224"


def fake_clip_visual_state(seed=0):
    """Random tensors under OpenAI CLIP ViT-B/16's ``visual.*`` names (one block, 224x224)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    sd = {
        "visual.class_embedding": r(WIDTH),
        "visual.positional_embedding": r(1 + 14 * 14, WIDTH),
        "visual.proj": r(WIDTH, OUT),
        "visual.conv1.weight": r(WIDTH, 3, 16, 16),
        "visual.ln_pre.weight": 1 + r(WIDTH), "visual.ln_pre.bias": r(WIDTH),
        "visual.ln_post.weight": 1 + r(WIDTH), "visual.ln_post.bias": r(WIDTH),
    }
    for i in range(LAYERS):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({
            p + "ln_1.weight": 1 + r(WIDTH), p + "ln_1.bias": r(WIDTH),
            p + "attn.in_proj_weight": r(3 * WIDTH, WIDTH), p + "attn.in_proj_bias": r(3 * WIDTH),
            p + "attn.out_proj.weight": r(WIDTH, WIDTH), p + "attn.out_proj.bias": r(WIDTH),
            p + "ln_2.weight": 1 + r(WIDTH), p + "ln_2.bias": r(WIDTH),
            p + "mlp.c_fc.weight": r(4 * WIDTH, WIDTH), p + "mlp.c_fc.bias": r(4 * WIDTH),
            p + "mlp.c_proj.weight": r(WIDTH, 4 * WIDTH), p + "mlp.c_proj.bias": r(WIDTH),
        })
    return sd


def _backbone(path="", pos_embed_resize="bilinear"):
    return ViTBackbone(CLIP_NAME, (64, 32), (16, 16), num_cams=2, depth=LAYERS, proj_dim=OUT,
                       pretrain_path=path, pos_embed_resize=pos_embed_resize)


def _check_clip_loaded(backbone, sd):
    vit = backbone.vit
    assert torch.equal(vit.cls_token.flatten(), sd["visual.class_embedding"])
    assert torch.equal(vit.head.weight, sd["visual.proj"].t())
    assert torch.equal(vit.blocks[0].attn.qkv.weight, sd["visual.transformer.resblocks.0.attn.in_proj_weight"])
    assert torch.equal(vit.norm.weight, sd["visual.ln_post.weight"])
    assert vit.pos_embed.shape == (1, 1 + 4 * 2, WIDTH)  # resampled from 14x14 to the 4x2 grid
    assert torch.equal(vit.pos_embed[0, 0], sd["visual.positional_embedding"][0])


def test_clip_state_dict_with_visual_keys(tmp_path):
    sd = fake_clip_visual_state()
    path = tmp_path / "clip_state.pth"
    torch.save(sd, path)
    _check_clip_loaded(_backbone(str(path)), sd)


def test_clip_torchscript_archive(tmp_path):
    """A TorchScript archive whose tensors are named visual.* (like OpenAI's ViT-B-16.pt)."""
    sd = fake_clip_visual_state(1)

    class Archive(nn.Module):
        def forward(self, x):
            return x

    archive = Archive()
    for name, tensor in sd.items():
        *parents, leaf = name.split(".")
        module = archive
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, tensor)
    path = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(archive, torch.zeros(1)), str(path))
    _check_clip_loaded(_backbone(str(path)), sd)


def test_clip_position_embedding_resize(tmp_path):
    """bilinear (DeMo's resize_pos_embed: the 14x14 grid through F.interpolate(mode="bilinear"),
    no antialias) and bicubic (timm's default, antialiased) each equal their formula, and differ
    from each other on this 14x14 -> 4x2 downsampling (so the test can tell them apart)."""
    sd = fake_clip_visual_state(2)
    path = tmp_path / "clip_state.pth"
    torch.save(sd, path)
    grid = sd["visual.positional_embedding"][1:].reshape(1, 14, 14, WIDTH).permute(0, 3, 1, 2)
    refs = {"bilinear": F.interpolate(grid, size=(4, 2), mode="bilinear"),
            "bicubic": F.interpolate(grid, size=(4, 2), mode="bicubic", antialias=True)}
    for mode, ref in refs.items():
        loaded = _backbone(str(path), mode).vit.pos_embed[0, 1:]
        assert torch.allclose(loaded, ref.permute(0, 2, 3, 1).reshape(8, WIDTH), atol=1e-6), mode
    assert not torch.allclose(refs["bilinear"], refs["bicubic"], atol=1e-3)


def test_timm_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    source = _backbone()
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": source.vit.state_dict()}, path)
    loaded = _backbone(str(path))
    for key, value in source.vit.state_dict().items():
        assert torch.equal(loaded.vit.state_dict()[key], value), key


def test_missing_file_names_the_path():
    with pytest.raises(FileNotFoundError, match="no_such_weights.pt"):
        _backbone("no_such_weights.pt")


def test_garbage_file_is_a_clear_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="garbage.pt"):
        _backbone(str(path))


def test_incompatible_file_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(9, 3)}, path)
    with pytest.raises(PretrainedWeightsError, match="blocks.0.attn.qkv.weight"):
        _backbone(str(path))
    torch.save({"something.else": torch.zeros(3)}, path)
    with pytest.raises(PretrainedWeightsError, match="no parameter name matches"):
        _backbone(str(path))


def test_register_tokens_are_used_but_not_returned():
    """MODEL.REG_TOKENS adds learnable tokens that every block attends to; the output keeps the
    (B, 1 + N, C) layout (CLS, then the patches), and changing a register changes the output."""
    torch.manual_seed(0)
    plain = ViTBackbone("vit_tiny_patch16_224", (64, 32), (16, 16), num_cams=0, depth=2)
    torch.manual_seed(0)
    reg = ViTBackbone("vit_tiny_patch16_224", (64, 32), (16, 16), num_cams=0, depth=2, reg_tokens=3)
    assert reg.vit.num_prefix_tokens == 4 and reg.vit.reg_token.shape == (1, 3, 192)
    images = torch.randn(2, 3, 64, 32)
    out = reg(images)
    assert out.shape == plain(images).shape == (2, 1 + 4 * 2, 192)
    with torch.no_grad():
        reg.vit.reg_token.add_(torch.randn(1, 3, 192))  # (a constant shift would be LayerNormed away)
    changed = reg(images)
    assert not torch.allclose(changed[:, 1:], out[:, 1:], atol=1e-4)


def test_register_tokens_with_a_checkpoint_without_them_is_a_clear_error(tmp_path):
    path = tmp_path / "clip.pt"
    torch.save(fake_clip_visual_state(), path)
    with pytest.raises(PretrainedWeightsError, match="MODEL.REG_TOKENS"):
        ViTBackbone(CLIP_NAME, (64, 32), (16, 16), num_cams=2, depth=LAYERS, proj_dim=OUT,
                    pretrain_path=str(path), reg_tokens=4)


def test_a_folder_as_weight_file_is_named_as_a_folder(tmp_path):
    """MODEL.PRETRAIN_PATH naming a folder says so and names a file to put there (catches the
    folder reported as "not found", which sends the user looking for a missing path)."""
    from modeling.backbone import read_weight_file

    with pytest.raises(IsADirectoryError, match=r"MODEL.PRETRAIN_PATH .* is a folder: name the weight file"):
        read_weight_file(str(tmp_path))
