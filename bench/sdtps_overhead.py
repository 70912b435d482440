"""Cost of SDTPS's pair scoring: batched 9 pairs vs 9 sequential CrossModalAttention calls.

Run from the repository root:

    python bench/sdtps_overhead.py [--batch 64] [--patches 128] [--dim 512] [--repeats 3]
                                   [--device cpu] [--threads 0]

Each variant runs forward + backward of the whole selection (9 pair scores, min-max
normalisation, guide combination, top-K, straight-through weights) followed by a cheap
``weighted_mean`` loss, with the patches requiring grad as they would coming out of a backbone.
The variants share the same weights:

* ``batched``: ``MultiModalSDTPS.forward`` (stacked parameters, keys folded into the queries).
* ``sequential``: 9 ``CrossModalAttention`` calls (explicit ``k = W_k P``), stacked, then
  ``MultiModalSDTPS.select``.
* ``batched_explicit_keys``: stacked parameters + einsum, but building the (B, 3, 3, N, C) keys;
  it separates the gain of batching from the gain of folding the keys.

Prints the best-of-N seconds per iteration and the ratios to ``batched``.

``bench_whole_model`` times forward + backward of the whole model (backbone, heads, ID +
triplet losses) with SDTPS + DGAF against the baseline on the same input and prints the ratio
(target: at most 1.10 for CLIP ViT-B/16 at 256x128). ``--model_batch`` sets its batch of
triplets; ``--skip_model`` / ``--skip_pairs`` run one part only.
"""

import argparse
import math
import os
import sys
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling.fusion import weighted_mean  # noqa: E402
from modeling.sdtps import (  # noqa: E402
    COS_EPS,
    GUIDE_ORDER,
    MultiModalSDTPS,
    _gate_logits,
    _gated_scores,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], None], repeats: int, warmup: int, device: torch.device) -> float:
    """Best-of-``repeats`` wall time of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def explicit_key_scores(mod: MultiModalSDTPS, patches: torch.Tensor, globals_: torch.Tensor):
    """The 9 pair scores with stacked parameters but explicit keys (reference for the bench)."""
    b, _, n, c = patches.shape
    h, d = mod.num_heads, mod.head_dim
    guides = globals_[:, mod.guide_index]  # (B, 3, 3, C)
    q = torch.einsum("bmjc,mjoc->bmjo", guides, mod.q_weight.view(3, 3, c, c))
    q = (q + mod.q_bias.view(3, 3, c)).view(b, 3, 3, h, d)
    k = torch.einsum("bmnc,mjoc->bmjno", patches, mod.k_weight.view(3, 3, c, c))
    k = k.view(b, 3, 3, n, h, d)
    attn = (torch.einsum("bmjhe,bmjnhe->bmjhn", q, k) / math.sqrt(d)).float().softmax(-1)
    cos = torch.einsum("bmjc,bmnc->bmjn", F.normalize(guides, dim=-1, eps=COS_EPS),
                       F.normalize(patches, dim=-1, eps=COS_EPS)).float()
    gate = torch.sigmoid(_gate_logits(cos, mod.gate_scale.view(3, 3, h), mod.gate_bias.view(3, 3, h),
                                      mod.gate_norm, mod.gate_norm_eps))
    _, score = _gated_scores(attn, gate, mod.renorm_attn)
    return score, gate


def bench_pair_scoring(
    batch: int = 64,
    num_patches: int = 128,
    dim: int = 512,
    num_heads: int = 4,
    repeats: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    seed: int = 0,
) -> Dict[str, float]:
    """Seconds per forward + backward of each variant (best of ``repeats``) and the ratios."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    mod = MultiModalSDTPS(dim, num_heads).to(dev)
    pairs = [mod.pair_module(p) for p in range(9)]
    patches = torch.randn(batch, 3, num_patches, dim, device=dev, requires_grad=True)
    globals_ = torch.randn(batch, 3, dim, device=dev, requires_grad=True)

    def finish(out) -> None:
        weighted_mean(patches, out.weights).square().mean().backward()

    def batched() -> None:
        finish(mod(patches, globals_))

    def sequential() -> None:
        scores, gates = [], []
        for m in range(3):
            for j, g in enumerate(GUIDE_ORDER[m]):
                res = pairs[3 * m + j](patches[:, m], globals_[:, g])
                scores.append(res.score)
                gates.append(res.gate)
        score = torch.stack(scores, 1).view(batch, 3, 3, num_patches)
        gate = torch.stack(gates, 1).view(batch, 3, 3, num_heads, num_patches)
        finish(mod.select(patches, score, gate))

    def explicit() -> None:
        score, gate = explicit_key_scores(mod, patches, globals_)
        finish(mod.select(patches, score, gate))

    timings = {
        "batched": best_time(batched, repeats, warmup, dev),
        "sequential": best_time(sequential, repeats, warmup, dev),
        "batched_explicit_keys": best_time(explicit, repeats, warmup, dev),
    }
    timings["sequential/batched"] = timings["sequential"] / timings["batched"]
    timings["batched_explicit_keys/batched"] = timings["batched_explicit_keys"] / timings["batched"]
    return timings


def bench_whole_model(batch: int, repeats: int, warmup: int, device: str,
                      backbone: str = "vit_base_patch16_clip_quickgelu_224", size=(256, 128),
                      proj_dim: int = 512) -> Dict[str, float]:
    """Seconds per forward + backward of the baseline and the SDTPS+DGAF model, and the ratio."""
    from config import build_cfg
    from modeling.model import build_model
    from utils.logger import setup_logger

    setup_logger()
    dev = torch.device(device)
    common = ["MODEL.BACKBONE", backbone, "MODEL.PROJ_DIM", str(proj_dim), "MODEL.DROP_PATH", "0.0",
              "INPUT.SIZE_TRAIN", f"[{size[0]}, {size[1]}]", "SOLVER.IMS_PER_BATCH", str(batch),
              "DATALOADER.NUM_INSTANCE", str(batch // 4 if batch % 4 == 0 else 1)]
    variants = {"baseline": [], "sdtps_dgaf": ["MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "dgaf"]}
    images = torch.randn(batch, 3, 3, size[0], size[1], device=dev)
    cams = torch.zeros(batch, dtype=torch.long, device=dev)
    pids = torch.arange(batch, device=dev) % 4
    timings = {}
    for name, extra in variants.items():
        cfg = build_cfg("", common + extra)
        torch.manual_seed(0)
        model = build_model(cfg, num_classes=10, num_cams=4).to(dev).train()

        def step() -> None:
            out = model({"images": images, "camids": cams, "pids": pids})
            sum(out["losses"].values()).backward()
            model.zero_grad(set_to_none=True)

        timings[name] = best_time(step, repeats, warmup, dev)
    timings["sdtps_dgaf/baseline"] = timings["sdtps_dgaf"] / timings["baseline"]
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patches", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--model_batch", type=int, default=8, help="triplets per whole-model step")
    parser.add_argument("--skip_model", action="store_true", help="skip the whole-model comparison")
    parser.add_argument("--skip_pairs", action="store_true", help="skip the pair-scoring comparison")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if not args.skip_model:
        print(f"Whole model, forward + backward (CLIP ViT-B/16, 256x128, {args.model_batch} triplets), "
              f"device={args.device}, threads={torch.get_num_threads()}, best of {args.repeats}")
        m = bench_whole_model(args.model_batch, args.repeats, args.warmup, args.device)
        print(f"  baseline                               : {m['baseline'] * 1e3:9.1f} ms")
        print(f"  SDTPS + DGAF                           : {m['sdtps_dgaf'] * 1e3:9.1f} ms")
        print(f"  ratio SDTPS+DGAF / baseline            : {m['sdtps_dgaf/baseline']:9.3f}  "
              f"(target <= 1.10: {'MET' if m['sdtps_dgaf/baseline'] <= 1.10 else 'NOT met'})")
    if args.skip_pairs:
        return
    print(f"SDTPS pair scoring, forward + backward: B={args.batch} N={args.patches} C={args.dim} "
          f"H={args.heads}, device={args.device}, threads={torch.get_num_threads()}, "
          f"best of {args.repeats} (after {args.warmup} warm-up), torch {torch.__version__}")
    t = bench_pair_scoring(args.batch, args.patches, args.dim, args.heads, args.repeats,
                           args.warmup, args.device)
    print(f"  batched (MultiModalSDTPS, folded keys) : {t['batched'] * 1e3:9.1f} ms")
    print(f"  sequential (9 x CrossModalAttention)   : {t['sequential'] * 1e3:9.1f} ms")
    print(f"  batched, explicit keys                 : {t['batched_explicit_keys'] * 1e3:9.1f} ms")
    print(f"  ratio sequential / batched             : {t['sequential/batched']:9.2f}")
    print(f"  ratio batched explicit keys / batched  : {t['batched_explicit_keys/batched']:9.2f}")


if __name__ == "__main__":
    main()
