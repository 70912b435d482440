"""Use a trained model outside the training loop: :class:`Predictor` embeds tri-modal images, and
:class:`RetrievalGraph` is the same retrieval path as a plain module (the ONNX export's graph).

    from engine.predictor import Predictor
    predictor = Predictor("configs/Synthetic/quickstart.yml", "output/quickstart/model_best.pth")
    feats = predictor.embed(["a_rgb.jpg"], ["a_ni.jpg"], None, cam_ids=[0])  # (1, D); TI missing

The model is built from the config and the checkpoint alone (no dataset is read): the number of
identities and cameras come from the checkpoint's classifier and camera-embedding shapes. Images
get the test transforms of ``data/transforms.py`` (resize to INPUT.SIZE_TEST, PIXEL_MEAN/STD),
and the features are computed by the evaluation's own code (``engine.evaluator.model_outputs`` and
``batch_feature``: TEST.FEAT, NECK_FEAT, FEAT_NORM, FLIP, AMP, and TEST.MISS), so they equal
``test_net.py TEST.EXPORT``'s features of the same images.
"""
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from PIL import Image

from config import build_cfg, merge_opts, validate_cfg
from data.datasets import read_image, to_rgb8
from data.transforms import TriModalTestTransform, pil_triplet_to_tensor
from engine.defaults import evaluation_config, require_weight, select_device
from engine.evaluator import MISS_TO_MODALITIES, batch_feature, model_outputs
from modeling.model import build_model
from utils.checkpoint import extract_model_state, load_checkpoint_file, load_model_weights
from utils.logger import get_logger

MODALITY_NAMES = ("rgb", "ni", "ti")
# The letter of each modality in a TEST.MISS code ("rn" = RGB and NI missing).
MISS_LETTERS = ("r", "n", "t")

# One modality of a batch: None (missing), a tensor (B, 3, H, W) / (3, H, W), or a PIL image /
# file path, or a list of them.
ModalityInput = Union[None, torch.Tensor, Image.Image, str, Sequence[Union[Image.Image, str]]]


def trained_sizes(state: dict, source: str) -> Tuple[int, int]:
    """(identities, cameras) of the model a state dict was saved from: the rows of its BNNeck
    classifiers and of the backbone's camera embedding (0 cameras without one)."""
    classes = {v.shape[0] for k, v in state.items()
               if k.startswith("heads.") and k.endswith(".classifier.weight")}
    if len(classes) != 1:
        raise ValueError(f"{source} holds no BNNeck classifier weights (heads.<name>.classifier."
                         "weight): name a checkpoint_epoch<N>.pth or model_best.pth of train_net.py")
    cam_embed = state.get("backbone.cam_embed")
    return classes.pop(), int(cam_embed.shape[0]) if cam_embed is not None else 0


def load_trained_model(cfg, device: torch.device) -> nn.Module:
    """The model of ``cfg`` in eval mode on ``device`` with TEST.WEIGHT loaded, sized from the
    checkpoint (no dataset needed; no pretrained backbone file read)."""
    require_weight(cfg)
    state = extract_model_state(load_checkpoint_file(cfg.TEST.WEIGHT))
    num_classes, num_cams = trained_sizes(state, cfg.TEST.WEIGHT)
    model = build_model(evaluation_config(cfg), num_classes, num_cams)
    load_model_weights(model, state, cfg.MODEL.LOAD_STRICT, cfg.TEST.WEIGHT)
    get_logger().info("loaded weights from %s (%d identities, %d cameras)", cfg.TEST.WEIGHT,
                      num_classes, num_cams)
    return model.to(device).eval()


def miss_code(missing: Sequence[int]) -> str:
    """TEST.MISS code of the missing modality indices, e.g. (0, 2) -> "rt", () -> "none"."""
    code = "".join(MISS_LETTERS[i] for i in sorted(set(missing))) or "none"
    if code not in MISS_TO_MODALITIES:
        raise ValueError("every modality is missing: give at least one of rgb, ni, ti")
    return code


class RetrievalGraph(nn.Module):
    """The retrieval path of a trained model as a module of plain tensors (what
    tools/export_onnx.py exports).

    forward(rgb, ni, ti (B, 3, H, W) float normalised images (a missing modality: zeros),
    cam_ids (B,) int64) -> (B, D) float32 retrieval feature ``feat`` (mean with the mirrored
    images' feature when ``flip``), computed by the evaluation's ``model_outputs`` /
    ``batch_feature``.
    """

    def __init__(self, model: nn.Module, feat: str, neck_feat: str, feat_norm: str,
                 flip: bool = False):
        super().__init__()
        self.model = model
        self.feat, self.neck_feat, self.feat_norm, self.flip = feat, neck_feat, feat_norm, flip

    @classmethod
    def from_config(cls, cfg, model: nn.Module) -> "RetrievalGraph":
        t = cfg.TEST
        return cls(model, t.FEAT, t.NECK_FEAT, t.FEAT_NORM, t.FLIP)

    def forward(self, rgb: torch.Tensor, ni: torch.Tensor, ti: torch.Tensor,
                cam_ids: torch.Tensor) -> torch.Tensor:
        images = torch.stack([rgb, ni, ti], dim=1)  # (B, 3, 3, H, W)
        outputs, flipped = model_outputs(self.model, images, cam_ids, "none", self.flip)
        return batch_feature(outputs, flipped, self.feat, self.neck_feat, self.feat_norm)


class Predictor:
    """Retrieval features of tri-modal images from a trained checkpoint.

    Args:
        config: a yaml config file or a built config (``config.build_cfg``).
        weights: the checkpoint (sets TEST.WEIGHT; default: the config's TEST.WEIGHT).
        opts: KEY VALUE overrides, as on the command line (e.g. ["TEST.FEAT", "ori"]).
        device: "cpu", "cuda", ... (default: MODEL.DEVICE, "auto" = CUDA when available).
        batch_size: triplets per forward pass (default TEST.IMS_PER_BATCH).

    ``embed`` gives the feature TEST.FEAT of the config with its TEST.NECK_FEAT, FEAT_NORM, FLIP,
    AMP and TEST.MISS (its modalities zeroed, as test_net.py does).
    """

    def __init__(self, config, weights: Optional[str] = None, opts: Sequence[str] = (),
                 device: Optional[str] = None, batch_size: Optional[int] = None):
        extra = list(opts) + (["TEST.WEIGHT", str(weights)] if weights else [])
        extra += ["MODEL.DEVICE", device] if device else []
        if isinstance(config, (str, os.PathLike)):
            cfg = build_cfg(str(config), extra)
        else:
            cfg = config.clone()
            cfg.defrost()
            merge_opts(cfg, extra)
            validate_cfg(cfg)
            cfg.freeze()
        if cfg.TEST.MISS in ("all", "matrix"):
            raise ValueError(f"TEST.MISS {cfg.TEST.MISS} is a table of settings, not one feature: set none, r, n, "
                             "t, rn, rt or nt (or pass None for a missing modality to embed)")
        self.cfg = cfg
        self.device = select_device(cfg)
        self.batch_size = int(batch_size or cfg.TEST.IMS_PER_BATCH)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        self.model = load_trained_model(cfg, self.device)
        self.size = tuple(int(v) for v in cfg.INPUT.SIZE_TEST)  # (H, W)
        trained = next((tuple(int(v) for v in m.img_size) for m in self.model.modules()
                        if hasattr(m, "img_size") and hasattr(m, "patch_size")), self.size)
        if trained != self.size:
            raise ValueError(f"INPUT.SIZE_TEST {list(self.size)} does not match the input size of "
                             f"the model of {cfg.TEST.WEIGHT} ({list(trained)}, its INPUT.SIZE_TRAIN):"
                             f" set INPUT.SIZE_TEST \"{list(trained)}\" (images of any size are "
                             "resized to it)")
        self.transform = TriModalTestTransform(cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)
        cam_embed = getattr(self.model.backbone, "cam_embed", None)
        self.num_cams = int(cam_embed.shape[0]) if cam_embed is not None else 0

    # ---------------------------------------------------------------------------------------
    def _modality(self, value: ModalityInput, name: str) -> Optional[torch.Tensor]:
        """One modality -> float (B, 3, H, W) in [0, 1] at INPUT.SIZE_TEST, or None."""
        if value is None:
            return None
        if torch.is_tensor(value):
            x = value.unsqueeze(0) if value.dim() == 3 else value
            h, w = self.size
            if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (h, w):
                raise ValueError(f"{name}: a tensor must be (B, 3, {h}, {w}) or (3, {h}, {w}) "
                                 f"(INPUT.SIZE_TEST), got {tuple(value.shape)}; pass PIL images or "
                                 "file paths to have them resized")
            x = x.detach().cpu()  # prepared on the CPU, moved to ``device`` batch by batch
            if x.dtype == torch.uint8:
                return x.float().div(255.0)
            if not x.is_floating_point():
                raise ValueError(f"{name}: a {x.dtype} tensor; give uint8 (0..255) or float in [0, 1] "
                                 "(scale images of more than 8 bits first, or pass PIL images / "
                                 "file paths, which are scaled by their bit depth)")
            x = x.float()
            if not torch.isfinite(x).all():
                raise ValueError(f"{name}: the tensor holds {int((~torch.isfinite(x)).sum())} NaN "
                                 "or infinite value(s): it is not an image")
            if x.numel() and (x.min() < 0 or x.max() > 1):
                raise ValueError(f"{name}: a float tensor must lie in [0, 1] (got {x.min():.4g} .. "
                                 f"{x.max():.4g}); divide 0..255 images by 255, or pass uint8")
            return x
        items = [value] if isinstance(value, (str, os.PathLike, Image.Image)) else list(value)
        if not items:
            raise ValueError(f"{name}: an empty list of images (pass None for a missing modality)")
        images = [read_image(str(v)) if isinstance(v, (str, os.PathLike)) else v for v in items]
        for v in images:
            if not isinstance(v, Image.Image):
                raise TypeError(f"{name}: expected a tensor, PIL images or file paths, got "
                                f"{type(v).__name__}")
        images = [to_rgb8(v, f"{name} #{i}") for i, v in enumerate(images)]  # 16-bit: scaled
        # pil_triplet_to_tensor resizes and converts any number of images: (B, 3, H, W)
        return pil_triplet_to_tensor(images, self.size)

    def preprocess(self, rgb: ModalityInput, ni: ModalityInput,
                   ti: ModalityInput) -> Tuple[torch.Tensor, str]:
        """(images (B, 3, 3, H, W) normalised, missing-modality code): a missing modality is a
        zero placeholder that :func:`~engine.evaluator.zero_missing` zeroes after normalisation,
        together with the config's TEST.MISS."""
        given = [self._modality(v, n) for v, n in zip((rgb, ni, ti), MODALITY_NAMES)]
        sizes = {x.shape[0] for x in given if x is not None}
        if not sizes:
            raise ValueError("every modality is missing: give at least one of rgb, ni, ti")
        if len(sizes) > 1:
            counts = ", ".join(f"{n} {x.shape[0]}" for n, x in zip(MODALITY_NAMES, given) if x is not None)
            raise ValueError(f"the modalities hold different numbers of images ({counts})")
        b = sizes.pop()
        h, w = self.size
        images = torch.stack([x if x is not None else torch.zeros(b, 3, h, w) for x in given], 1)
        images = self.transform(images)  # its (1, 3, 1, 1) mean/std broadcast over the batch
        missing = [i for i, x in enumerate(given) if x is None]
        missing += list(MISS_TO_MODALITIES[self.cfg.TEST.MISS])
        return images, miss_code(missing)

    def _cams(self, cam_ids, b: int) -> torch.Tensor:
        cams = torch.zeros(b, dtype=torch.long) if cam_ids is None else \
            torch.as_tensor(cam_ids, dtype=torch.long).reshape(-1)
        if cams.numel() == 1 and b > 1:
            cams = cams.expand(b)
        if cams.numel() != b:
            raise ValueError(f"cam_ids holds {cams.numel()} values for {b} triplets")
        if self.num_cams and (cams.min() < 0 or cams.max() >= self.num_cams):
            raise ValueError(f"cam_ids must lie in 0..{self.num_cams - 1} (the model's "
                             f"{self.num_cams} cameras), got {cams.tolist()[:8]}")
        return cams

    @torch.no_grad()
    def embed(self, rgb: ModalityInput, ni: ModalityInput, ti: ModalityInput,
              cam_ids=None) -> torch.Tensor:
        """Retrieval features (B, D) float32 on the CPU of B triplets.

        Each modality: None (missing: zero-filled after normalisation, exactly as TEST.MISS), a
        float tensor (B, 3, H, W) in [0, 1] (or uint8 in 0..255) at INPUT.SIZE_TEST (other
        integer types, NaN / inf and floats outside [0, 1] are refused, naming the modality), or
        B PIL images / file paths (resized bilinearly to INPUT.SIZE_TEST, as the test loader
        does; 16-bit images scaled to 8 bits by ``data.datasets.to_rgb8``).
        cam_ids: (B,) 0-based cameras, one int for all, or None (camera 0; unused by models
        without a camera embedding). Run in batches of ``batch_size`` on ``device``.
        """
        images, miss = self.preprocess(rgb, ni, ti)
        cams = self._cams(cam_ids, images.shape[0])
        t = self.cfg.TEST
        out: List[torch.Tensor] = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start:start + self.batch_size].to(self.device)
            outputs, flipped = model_outputs(self.model, chunk,
                                             cams[start:start + self.batch_size].to(self.device),
                                             miss, t.FLIP, t.AMP)
            out.append(batch_feature(outputs, flipped, t.FEAT, t.NECK_FEAT, t.FEAT_NORM).cpu())
        return torch.cat(out)

    def retrieval_graph(self) -> RetrievalGraph:
        """The model's retrieval path as a module of tensors (for export)."""
        return RetrievalGraph.from_config(self.cfg, self.model)
