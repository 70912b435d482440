"""The ViT backbone shared by the three modalities.

Built by name with timm (``MODEL.BACKBONE``), at the configured input size and patch stride
(position embeddings are resampled to the new grid: ``pos_embed_resize`` "bilinear" is DeMo's
plain bilinear interpolation without antialias, "bicubic" timm's default, with antialias). Optional camera embedding (SIE) is added to
the CLS token. For CLIP-style models the tokens go through the final LayerNorm and a projection to
``MODEL.PROJ_DIM`` (512 for CLIP ViT-B/16), as DeMo does.

Weights come from a local file (``MODEL.PRETRAIN_PATH``): a timm/torch state dict, or an
OpenAI CLIP checkpoint (the TorchScript archive or its state dict with ``visual.*`` keys); a name
``openai:ViT-B-16`` is downloaded once into a cache and verified (``utils.download``). Without a
file the backbone starts from random init and the log says so.
"""
import os
import zipfile
from typing import Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from modeling.registry import BACKBONE_REGISTRY
from utils.checkpoint import UNSAFE_REASON, UnsafeFileError, safe_load, short_reason
from modeling.demo_checkpoint import demo_backbone_state, is_demo_state
from utils.download import resolve_weights
from utils.logger import get_logger


class PretrainedWeightsError(RuntimeError):
    """The pretrained file is unreadable or does not fit the backbone."""


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive is a zip holding ``<name>/constants.pkl``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def read_weight_file(path: str) -> dict:
    """State dict from a torch/timm checkpoint (read by ``utils.checkpoint.safe_load``) or an
    OpenAI CLIP TorchScript archive (``torch.jit.load``: TorchScript only, no Python pickle).
    ``openai:<model>`` is the cached download of that CLIP model (:func:`resolve_weights`)."""
    path = resolve_weights(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"MODEL.PRETRAIN_PATH {path} is a folder: name the weight file in "
                                f"it (e.g. {os.path.join(path, 'ViT-B-16.pt')}), or "
                                "openai:ViT-B-16 to download it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MODEL.PRETRAIN_PATH not found: {path}")
    try:
        if _is_torchscript(path):
            obj = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            obj = safe_load(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
        reason = UNSAFE_REASON if isinstance(exc, UnsafeFileError) else short_reason(exc)
        raise PretrainedWeightsError(
            f"MODEL.PRETRAIN_PATH {path} is not a weights file ({reason}): give OpenAI's CLIP "
            "ViT-B-16.pt or a torch/timm state dict of the backbone") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise PretrainedWeightsError(f"{path} does not hold a state dict")
    if is_demo_state(obj):  # a DeMo checkpoint: its CLIP tower
        get_logger().info("%s is a DeMo checkpoint: the backbone gets its CLIP tower", path)
        obj = demo_backbone_state(obj)
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


@BACKBONE_REGISTRY.register("vit")
class ViTBackbone(nn.Module):
    """timm ViT returning all tokens.

    forward(images (B, 3, H, W), cam_ids (B,) long or None) -> tokens (B, 1 + N, out_dim),
    token 0 being CLS, N = grid_h * grid_w patches (register tokens, if any, are not returned).
    """

    def __init__(self, name: str, img_size: Sequence[int], stride: Sequence[int], num_cams: int,
                 depth: int = 0, drop_path: float = 0.0, proj_dim: int = 0,
                 sie_camera: bool = True, sie_coe: float = 1.0, pretrain_path: str = "",
                 reg_tokens: int = 0, pos_embed_resize: str = "bilinear"):
        super().__init__()
        # F.interpolate arguments of every position-embedding resampling
        self.resize_args = dict(interpolation=pos_embed_resize, antialias=pos_embed_resize == "bicubic")
        kwargs = dict(img_size=tuple(img_size), num_classes=proj_dim, drop_path_rate=drop_path,
                      global_pool="")
        if depth > 0:
            kwargs["depth"] = depth
        if reg_tokens > 0:
            kwargs["reg_tokens"] = reg_tokens
        try:
            self.vit = timm.create_model(name, pretrained=False, **kwargs)
        except RuntimeError as exc:
            raise ValueError(f"MODEL.BACKBONE {name!r} is not a timm model: {exc}") from exc
        self._set_stride(tuple(stride))
        self.embed_dim = self.vit.embed_dim
        self.out_dim = proj_dim if proj_dim > 0 else self.embed_dim
        self.sie_coe = sie_coe
        self.cam_embed = None
        if sie_camera and num_cams > 0:
            self.cam_embed = nn.Parameter(torch.zeros(num_cams, self.embed_dim))
            nn.init.trunc_normal_(self.cam_embed, std=0.02)
        if pretrain_path:
            self.load_pretrained(pretrain_path)

    @classmethod
    def from_config(cls, cfg, num_cams: int) -> "ViTBackbone":
        m = cfg.MODEL
        return cls(m.BACKBONE, cfg.INPUT.SIZE_TRAIN, m.STRIDE_SIZE, num_cams, depth=m.BACKBONE_DEPTH,
                   drop_path=m.DROP_PATH, proj_dim=m.PROJ_DIM, sie_camera=m.SIE_CAMERA,
                   sie_coe=m.SIE_COE, pretrain_path=m.PRETRAIN_PATH, reg_tokens=m.REG_TOKENS,
                   pos_embed_resize=m.POS_EMBED_RESIZE)

    def tower_parameters(self):
        """Parameters of the ViT tower (not the camera embedding): ``SOLVER.BACKBONE_LR``."""
        return self.vit.parameters()

    @property
    def grid_size(self) -> Tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def patch_size(self) -> Tuple[int, int]:
        return tuple(self.vit.patch_embed.patch_size)

    @property
    def stride(self) -> Tuple[int, int]:
        return tuple(self.vit.patch_embed.proj.stride)

    def _set_stride(self, stride: Tuple[int, int]) -> None:
        """Change the patch-embedding stride and resample the position embedding to the new grid."""
        pe = self.vit.patch_embed
        if tuple(pe.proj.stride) == stride:
            return
        old_grid = tuple(pe.grid_size)
        h, w = pe.img_size
        ph, pw = pe.patch_size
        new_grid = ((h - ph) // stride[0] + 1, (w - pw) // stride[1] + 1)
        pe.proj.stride = stride
        pe.grid_size = new_grid
        pe.num_patches = new_grid[0] * new_grid[1]
        prefix = 0 if self.vit.no_embed_class else self.vit.num_prefix_tokens
        with torch.no_grad():
            resampled = resample_abs_pos_embed(self.vit.pos_embed.data, new_size=new_grid,
                                               old_size=old_grid, num_prefix_tokens=prefix,
                                               **self.resize_args)
        self.vit.pos_embed = nn.Parameter(resampled)

    def load_pretrained(self, path: str) -> None:
        """Load a local timm/torch or OpenAI CLIP checkpoint, reporting missing/unexpected keys."""
        logger = get_logger()
        state = read_weight_file(path)
        if getattr(self.vit, "reg_token", None) is not None and "reg_token" not in state:
            raise PretrainedWeightsError(
                f"{path} has no register tokens but MODEL.REG_TOKENS is "
                f"{self.vit.reg_token.shape[1]}: its position embedding has no slots for them. "
                "Set MODEL.REG_TOKENS 0 for this file, or use a checkpoint trained with registers")
        try:
            # CLIP key conversion, position-embedding resampling to the patch grid
            state = checkpoint_filter_fn(state, self.vit, **self.resize_args)
        except Exception as exc:  # noqa: BLE001
            raise PretrainedWeightsError(f"{path} is not compatible with {type(self.vit).__name__}: {exc}") from exc
        own = self.vit.state_dict()
        mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
        if mismatched:
            details = "; ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                                for k in mismatched[:10])
            raise PretrainedWeightsError(f"{path} does not fit the backbone: {details}")
        result = self.vit.load_state_dict(state, strict=False)
        matched = len([k for k in state if k in own])
        if matched == 0:
            raise PretrainedWeightsError(f"{path}: no parameter name matches the backbone")
        logger.info("loaded %d tensors from %s; missing keys: %s; unexpected keys: %s", matched, path,
                    list(result.missing_keys) or "none", list(result.unexpected_keys) or "none")

    def forward(self, images: torch.Tensor, cam_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        if self.cam_embed is not None and cam_ids is not None:
            cls = x[:, :1] + self.sie_coe * self.cam_embed[cam_ids].unsqueeze(1)
            x = torch.cat([cls, x[:, 1:]], dim=1)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = vit.norm(x)
        if vit.num_prefix_tokens > 1:  # drop register tokens: CLS, then the N patches
            x = torch.cat([x[:, :1], x[:, vit.num_prefix_tokens:]], dim=1)
        return vit.head(x)
