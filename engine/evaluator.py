"""Feature extraction and retrieval evaluation.

``extract`` runs the model over an :class:`~data.build.EvalSet` (all ranks, each its contiguous
shard; results gathered in rank order, so every sample is counted once and the order is kept).
``evaluate`` turns the features into distances and CMC / mAP / mINP with ``utils.metrics``.

Missing-modality evaluation (``TEST.MISS``): the named modalities' inputs are replaced by zeros
after normalisation, as in the published protocol. Flip TTA (``TEST.FLIP``) averages the features
of the image and its horizontal mirror.
"""
import os
from contextlib import nullcontext
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from modeling.model import retrieval_feature
from utils.dist import all_gather_tensor
from utils.metrics import compute_distance, evaluate_rank, random_ranking_map

# The retrieval metrics of rank_metrics that every report shows.
RANK_KEYS = ("mAP", "R1", "R5", "R10", "mINP")

MISS_TO_MODALITIES = {"none": (), "r": (0,), "n": (1,), "t": (2,), "rn": (0, 1), "rt": (0, 2),
                      "nt": (1, 2)}


def zero_missing(images: torch.Tensor, miss: str) -> torch.Tensor:
    """Replace the modalities named by ``miss`` (e.g. "rn") with zeros. images: (B, 3, 3, H, W)."""
    drop = MISS_TO_MODALITIES[miss]
    if not drop:
        return images
    images = images.clone()
    images[:, list(drop)] = 0.0
    return images


def patch_foreground(masks: torch.Tensor, patch_size, stride) -> torch.Tensor:
    """Share of person pixels in each patch. masks (B, H, W) -> (B, N) in [0, 1], row-major grid."""
    cover = F.avg_pool2d(masks.unsqueeze(1).float(), kernel_size=tuple(patch_size), stride=tuple(stride))
    return cover.flatten(1)


def autocast_context(device: torch.device, amp: str):
    """Autocast for SOLVER.AMP / TEST.AMP: "bf16" anywhere, "fp16" on CUDA (fp32 elsewhere)."""
    if amp == "off" or (amp == "fp16" and device.type != "cuda"):
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def extract(model, eval_set, device, feat: str, neck_feat: str, miss: str = "none",
            flip: bool = False, amp: str = "off", feat_norm: str = "once",
            extra_feats: Sequence[str] = ()) -> Dict:
    """Features of every sample of ``eval_set`` (see :func:`retrieval_feature` for feat,
    neck_feat and feat_norm).

    Returns dict: feats (M, D) float32 CPU, extra_feats {name: (M, D')} for ``extra_feats`` (from
    the same forward passes), pids/camids/sceneids/index (M,) int64 numpy,
    num_skipped, and when the model selects tokens and masks exist: fg_kept / kept / fg_all / all
    / fg_best patch counts (foreground = at least half of the patch's pixels on the person;
    fg_best = sum over rows of min(foreground patches, kept patches): the foreground kept by a
    perfect selection of the same size).
    """
    was_training = model.training
    model.eval()
    names = (feat,) + tuple(n for n in extra_feats if n != feat)
    feats = {name: [] for name in names}
    meta = {k: [] for k in ("pids", "camids", "sceneids", "index")}
    counts = torch.zeros(5, dtype=torch.float64)
    skipped = 0
    backbone = model.backbone
    for batch in eval_set.loader:
        skipped += batch["num_skipped"]
        if "images" not in batch:
            continue
        images = zero_missing(batch["images"].to(device, non_blocking=True), miss)
        cams = batch["camids"].to(device)
        with autocast_context(device, amp):
            outputs = model(images, cams)
            flipped = model(images.flip(-1), cams) if flip else None
        for name in names:
            f = retrieval_feature(outputs, name, neck_feat, feat_norm).float()
            if flipped is not None:
                f = (f + retrieval_feature(flipped, name, neck_feat, feat_norm).float()) / 2
            feats[name].append(f.cpu())
        for key in meta:
            meta[key].append(batch[key])
        if "keep_mask" in outputs and "masks" in batch:
            fg = patch_foreground(batch["masks"], backbone.patch_size, backbone.stride) >= 0.5
            keep = outputs["keep_mask"].cpu()  # (B, 3, N)
            fg3 = fg.unsqueeze(1).expand_as(keep)
            best = torch.minimum(fg3.sum(-1), keep.sum(-1)).sum()
            counts += torch.tensor([(keep & fg3).sum(), keep.sum(), fg3.sum(), fg3.numel(), best],
                                   dtype=torch.float64)
    model.train(was_training)
    local = {f"feats/{name}": torch.cat(v) if v else torch.zeros(0, 0) for name, v in feats.items()}
    local.update({k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for k, v in meta.items()})
    result = {k: torch.cat(all_gather_tensor(v.to(device))).cpu() for k, v in local.items()}
    stats = torch.cat([counts, torch.tensor([float(skipped)], dtype=torch.float64)])
    totals = torch.cat(all_gather_tensor(stats.unsqueeze(0).to(device))).sum(0).cpu()
    out = {"feats": result[f"feats/{feat}"].float(),
           "extra_feats": {name: result[f"feats/{name}"].float() for name in names[1:]}}
    out.update({k: result[k].numpy().astype(np.int64) for k in meta})
    out["num_skipped"] = int(totals[5])
    if totals[1] > 0:
        out.update(fg_kept=float(totals[0]), kept=float(totals[1]), fg_all=float(totals[2]),
                   all=float(totals[3]), fg_best=float(totals[4]))
    return out


def split_query_gallery(extracted: Dict, eval_set):
    """Boolean masks (M,) of query and gallery rows of ``extracted``."""
    index = extracted["index"]
    if eval_set.shared:
        everything = np.ones(len(index), dtype=bool)
        return everything, everything
    is_query = index < eval_set.num_query
    return is_query, ~is_query


def rank_metrics(extracted: Dict, eval_set, dist_metric: str, rerank=None) -> Dict:
    """mAP, CMC (R1/R5/R10) and mINP (fractions in [0, 1]) of extracted features.

    ``rerank``: optional callable (qf, gf) -> (Q, G) distance replacing the plain distance.
    """
    q, g = split_query_gallery(extracted, eval_set)
    feats = F.normalize(extracted["feats"], dim=1)
    qf, gf = feats[torch.from_numpy(q)], feats[torch.from_numpy(g)]
    distmat = rerank(qf, gf) if rerank is not None else compute_distance(qf, gf, dist_metric)
    scenes = {}
    if eval_set.uses_scenes:
        scenes = dict(q_scenes=extracted["sceneids"][q], g_scenes=extracted["sceneids"][g])
    cmc, mean_ap, minp = evaluate_rank(distmat, extracted["pids"][q], extracted["pids"][g],
                                       extracted["camids"][q], extracted["camids"][g], **scenes)
    chance = random_ranking_map(extracted["pids"][q], extracted["pids"][g], extracted["camids"][q],
                                extracted["camids"][g], **scenes)
    metrics = {"mAP": float(mean_ap), "mINP": float(minp), "num_query": int(q.sum()),
               "num_gallery": int(g.sum()), "chance_mAP": chance}
    for k in (1, 5, 10):
        metrics[f"R{k}"] = float(cmc[min(k, len(cmc)) - 1])
    if "kept" in extracted:
        metrics["fg_precision"] = extracted["fg_kept"] / extracted["kept"]
        metrics["fg_share"] = extracted["fg_all"] / extracted["all"]
        metrics["fg_best"] = extracted["fg_best"] / extracted["kept"]
    return metrics


def extract_with_cfg(model, eval_set, cfg, device, miss: Optional[str] = None) -> Dict:
    """``extract`` with the config's test options (TEST.FEAT, NECK_FEAT, FEAT_NORM, REPORT_FEATS,
    MISS, FLIP, AMP)."""
    return extract(model, eval_set, device, cfg.TEST.FEAT, cfg.TEST.NECK_FEAT,
                   miss if miss is not None else cfg.TEST.MISS, cfg.TEST.FLIP, cfg.TEST.AMP,
                   cfg.TEST.FEAT_NORM, cfg.TEST.REPORT_FEATS)


def score_extracted(extracted: Dict, eval_set, cfg) -> Dict:
    """Metrics of ``extracted["feats"]`` (``rank_metrics``, re-ranked if configured), with
    ``by_feat``: {name: metrics} of each ``TEST.REPORT_FEATS`` feature (TEST.FEAT included)."""
    reranker = build_reranker(cfg)
    metrics = rank_metrics(extracted, eval_set, cfg.TEST.DIST, reranker)
    metrics["num_skipped"] = extracted["num_skipped"]
    if extracted["extra_feats"] or cfg.TEST.REPORT_FEATS:
        metrics["by_feat"] = {}
        for name in cfg.TEST.REPORT_FEATS:
            other = metrics if name == cfg.TEST.FEAT else rank_metrics(
                {**extracted, "feats": extracted["extra_feats"][name]}, eval_set, cfg.TEST.DIST, reranker)
            metrics["by_feat"][name] = {k: other[k] for k in RANK_KEYS}
    return metrics


def evaluate(model, eval_set, cfg, device, miss: Optional[str] = None) -> Dict:
    """Extract and score one evaluation set with the config's test options (re-ranking too)."""
    return score_extracted(extract_with_cfg(model, eval_set, cfg, device, miss), eval_set, cfg)


def build_reranker(cfg):
    """k-reciprocal re-ranking as a (qf, gf) -> distance callable, or None (TEST.RERANK)."""
    r = cfg.TEST.RERANK
    if not r.ENABLED:
        return None
    from utils.rerank import re_ranking

    return lambda qf, gf: re_ranking(qf, gf, k1=r.K1, k2=r.K2, lambda_value=r.LAMBDA)


def format_metrics(metrics: Dict) -> str:
    text = (f"mAP {metrics['mAP'] * 100:.2f}  R1 {metrics['R1'] * 100:.2f}  "
            f"R5 {metrics['R5'] * 100:.2f}  R10 {metrics['R10'] * 100:.2f}  "
            f"mINP {metrics['mINP'] * 100:.2f}  ({metrics['num_query']} queries, "
            f"{metrics['num_gallery']} gallery; chance mAP {metrics['chance_mAP'] * 100:.2f}, "
            f"{metrics['mAP'] / metrics['chance_mAP']:.1f}x chance)")
    if "fg_precision" in metrics:
        text += (f"  kept-token foreground precision {metrics['fg_precision'] * 100:.1f}% "
                 f"(all patches {metrics['fg_share'] * 100:.1f}%, perfect selection "
                 f"{metrics['fg_best'] * 100:.1f}%)")
    if metrics.get("by_feat"):
        text += "  | " + "  | ".join(f"{name}: mAP {m['mAP'] * 100:.2f} R1 {m['R1'] * 100:.2f}"
                                      for name, m in metrics["by_feat"].items())
    if metrics.get("num_skipped"):
        text += f"  [{metrics['num_skipped']} unreadable sample(s) skipped]"
    return text


def export_features(path: str, extracted: Dict, eval_set) -> None:
    """Write features, pids, camids, sceneids and image paths of the query and gallery rows to a
    .npz file (keys ``query_feats``, ``query_pids``, ..., ``gallery_paths``; paths joined by '|'
    for the three modalities)."""
    q, g = split_query_gallery(extracted, eval_set)
    paths = np.array(["|".join(eval_set.samples[i].paths) for i in extracted["index"]])
    arrays = {}
    for prefix, rows in (("query", q), ("gallery", g)):
        arrays[f"{prefix}_feats"] = extracted["feats"].numpy()[rows]
        for key in ("pids", "camids", "sceneids"):
            arrays[f"{prefix}_{key}"] = extracted[key][rows]
        arrays[f"{prefix}_paths"] = paths[rows]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    np.savez(path, **arrays)
