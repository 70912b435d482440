"""Registries of the model's exchangeable parts, each selected by a config key.

* ``BACKBONE_REGISTRY`` (``MODEL.BACKBONE_TYPE``): ``from_config(cfg, num_cams)``; the module
  maps images (B, 3, H, W) and camera ids (B,) to tokens (B, 1 + N, C) and has ``out_dim`` (C),
  ``patch_size`` and ``stride``.
* ``SELECTION_REGISTRY`` (``MODEL.SELECTION.NAME``; "none" keeps every patch):
  ``from_config(cfg, dim)``; forward(patches (B, 3, N, C), globals (B, 3, C)) -> an object with
  ``weights`` (B, 3, N) (pooling weights, 0 = dropped) and ``keep_mask`` (B, 3, N) bool.
  Optional: ``diagnostics(output) -> (scalars, histograms)`` (dicts of detached tensors).
* ``FUSION_REGISTRY`` (``MODEL.FUSION.NAME``; "none": no fused head): ``from_config(cfg, dim)``;
  forward(patches (B, 3, N, C), weights (B, 3, N)) -> (B, out_dim), read by the "fused" head.

Optional ``check_config(cfg)`` (static or class method) on a registered class raises ValueError
naming the key of a bad value; the config calls it before anything is built.
"""
from utils.registry import Registry

BACKBONE_REGISTRY = Registry("backbone")
SELECTION_REGISTRY = Registry("token selection")
FUSION_REGISTRY = Registry("fusion")
