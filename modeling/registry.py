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
naming the key of a bad value; the config calls it before anything is built. Optional
``add_config(cfg)`` (static or class method) declares the part's own keys with their defaults
(``config.add_part_config``).

Building a part goes through :func:`build_part`, which checks the interface: ``from_config``,
and for a fusion an ``out_dim`` (positive int) that one forward on a dummy batch returns.
"""
import torch

from utils.registry import PluginError, Registry

BACKBONE_REGISTRY = Registry("backbone")
SELECTION_REGISTRY = Registry("token selection")
FUSION_REGISTRY = Registry("fusion")


def build_part(registry: Registry, name: str, cfg, *args):
    """``registry``'s part ``name`` built by ``from_config(cfg, *args)`` and checked: a fusion
    (``args``: the token width C) must have ``out_dim`` and map patches (2, 3, 4, C) and weights
    (2, 3, 4) to (2, out_dim). Raises PluginError naming the entry, its file and the rule."""
    part = registry.build(name, cfg, *args)
    if registry is FUSION_REGISTRY:
        out_dim = getattr(part, "out_dim", None)
        if not isinstance(out_dim, int) or isinstance(out_dim, bool) or out_dim < 1:
            raise PluginError(f"{registry.describe(name)}: out_dim must be a positive int, the width "
                              f"of its output (the fused head's input), got {out_dim!r}")
        was_training = part.training
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # no draw, no BatchNorm update
            out = part.eval()(torch.randn(2, 3, 4, args[0]), torch.ones(2, 3, 4))
        part.train(was_training)
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        if shape != (2, out_dim):
            raise PluginError(f"{registry.describe(name)}: forward(patches (B, 3, N, C), weights "
                              f"(B, 3, N)) must return (B, out_dim) = (2, {out_dim}) on a dummy "
                              f"batch, got {shape}")
    return part
