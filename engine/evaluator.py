"""Evaluation: evaluators (detectron2's reset / process / evaluate) and the one driver.

:func:`inference_on_dataset` runs the model (eval mode) over an :class:`~data.build.EvalSet`
(every rank its contiguous shard) and hands each batch's outputs to the evaluators; their
``evaluate`` gathers the shards in rank order, so every sample is counted once and the order is
kept. :func:`evaluate` does it with the evaluators ``TEST.EVALUATORS`` names and the config's
test options; training, ``test_net.py`` and the tools all go through it.

Missing-modality evaluation (``TEST.MISS``): the named modalities' inputs are replaced by zeros
after normalisation, as in the published protocol. ``TEST.QUERY_MISS`` / ``TEST.GALLERY_MISS``
give the query and the gallery different subsets: the gallery's features come from a second pass
(:class:`FeatureCollector`) and :func:`rank_metrics` ranks them against the query's. Flip TTA (``TEST.FLIP``) averages the features
of the image and its horizontal mirror.
"""
import sys
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from modeling.heads import retrieval_feature
from utils.dist import all_gather_tensor, collective_device, is_main_process
from utils.metrics import compute_distance, evaluate_rank, junk_mask, random_ranking_map
from utils.outputs import replacing
from utils.registry import Registry

# The retrieval metrics of rank_metrics that every report shows.
RANK_KEYS = ("mAP", "R1", "R5", "R10", "mINP")

MISS_TO_MODALITIES = {"none": (), "r": (0,), "n": (1,), "t": (2,), "rn": (0, 1), "rt": (0, 2),
                      "nt": (1, 2)}

# Evaluator classes by the names ``TEST.EVALUATORS`` lists; each has ``from_config(cfg, eval_set)``.
EVALUATOR_REGISTRY = Registry("evaluator")


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


# Device types on which SOLVER.AMP / TEST.AMP fp16 runs (autocast + grad scaler). Elsewhere fp16
# falls back to fp32 (the trainer logs it): CPUs compute fp16 products through slow paths, and
# DeMo's configs ask for fp16. The fp16 code itself is the same on every device; the tests add
# "cpu" here to run CUDA's fp16 path on the CPU.
FP16_DEVICE_TYPES = {"cuda"}


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision used for ``amp`` on ``device``: "fp16" outside FP16_DEVICE_TYPES is "off"."""
    return "off" if amp == "fp16" and device.type not in FP16_DEVICE_TYPES else amp


def autocast_context(device: torch.device, amp: str):
    """Autocast for SOLVER.AMP / TEST.AMP: "bf16" anywhere, "fp16" on FP16_DEVICE_TYPES (fp32
    elsewhere)."""
    amp = resolve_amp(amp, device)
    if amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def model_outputs(model, images: torch.Tensor, cams: torch.Tensor, miss: str = "none",
                  flip: bool = False, amp: str = "off"):
    """The eval-mode outputs of one normalised batch, as every evaluation computes them: images
    (B, 3, 3, H, W), cams (B,) -> (outputs, flipped): the model's outputs with the modalities
    ``miss`` names zeroed (:func:`zero_missing`), and with ``flip`` those of the mirrored images
    (else None), under ``amp``'s autocast."""
    images = zero_missing(images, miss)
    with autocast_context(images.device, amp):
        outputs = model({"images": images, "camids": cams})
        flipped = model({"images": images.flip(-1), "camids": cams}) if flip else None
    return outputs, flipped


def batch_feature(outputs: Dict, flipped: Optional[Dict], feat: str, neck_feat: str,
                  feat_norm: str) -> torch.Tensor:
    """Retrieval feature ``feat`` (B, D) float32 of :func:`model_outputs`' results: the mean of
    the plain and mirrored features with flip TTA."""
    f = retrieval_feature(outputs["heads"], feat, neck_feat, feat_norm).float()
    if flipped is not None:
        f = (f + retrieval_feature(flipped["heads"], feat, neck_feat, feat_norm).float()) / 2
    return f


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's ``tensor`` in rank order (the tensor itself without DDP)."""
    return torch.cat(all_gather_tensor(tensor.to(collective_device()))).cpu()


class DatasetEvaluator:
    """Accumulates what it needs from each batch and reduces it to metrics.

    ``reset()`` before a pass; ``process(batch, outputs, flipped)`` for each batch of this rank's
    shard (``outputs``: the model's eval outputs, ``flipped``: those of the mirrored images with
    ``TEST.FLIP``, else None); ``evaluate()`` -> {metric: value}, called on every rank (it gathers
    the shards; every rank gets the same result).
    """

    def reset(self) -> None:
        pass

    def process(self, batch: Dict, outputs: Dict, flipped: Optional[Dict] = None) -> None:
        pass

    def evaluate(self) -> Dict:
        return {}


@EVALUATOR_REGISTRY.register("reid")
class ReIDEvaluator(DatasetEvaluator):
    """Retrieval metrics (mAP, CMC R1/R5/R10, mINP, chance mAP; re-ranked if configured) of the
    feature ``feat``, and ``by_feat`` for each of ``report_feats`` (from the same passes).

    After ``evaluate``, ``extracted`` holds feats (M, D) float32, extra_feats {name: (M, D')},
    pids / camids / sceneids / index (M,) int64 numpy, in the evaluation set's order.
    """

    def __init__(self, eval_set, feat: str = "ori", neck_feat: str = "before",
                 feat_norm: str = "once", report_feats: Sequence[str] = (),
                 dist: str = "euclidean", reranker=None):
        self.eval_set = eval_set
        self.feat, self.neck_feat, self.feat_norm = feat, neck_feat, feat_norm
        self.report_feats = tuple(report_feats)
        self.names = (feat,) + tuple(n for n in report_feats if n != feat)
        self.dist, self.reranker = dist, reranker
        self.extracted: Optional[Dict] = None
        # ``extracted`` of another pass over the same set whose gallery rows are ranked instead
        # of this pass's (TEST.GALLERY_MISS; set by :func:`evaluate`)
        self.gallery_from: Optional[Dict] = None
        self.reset()

    @classmethod
    def from_config(cls, cfg, eval_set) -> "ReIDEvaluator":
        t = cfg.TEST
        return cls(eval_set, t.FEAT, t.NECK_FEAT, t.FEAT_NORM, t.REPORT_FEATS, t.DIST,
                   build_reranker(cfg))

    def reset(self) -> None:
        self._feats: Dict[str, List[torch.Tensor]] = {name: [] for name in self.names}
        self._meta: Dict[str, List[torch.Tensor]] = {k: [] for k in ("pids", "camids", "sceneids", "index")}

    def process(self, batch: Dict, outputs: Dict, flipped: Optional[Dict] = None) -> None:
        for name in self.names:
            f = batch_feature(outputs, flipped, name, self.neck_feat, self.feat_norm)
            self._feats[name].append(f.cpu())
        for key in self._meta:
            self._meta[key].append(batch[key])

    def extract(self) -> Dict:
        """Gather the shards into ``extracted`` (see the class) and return it."""
        local = {name: torch.cat(v) if v else torch.zeros(0, 0) for name, v in self._feats.items()}
        feats = {name: gather(v).float() for name, v in local.items()}
        ex = {"feats": feats[self.feat], "extra_feats": {n: feats[n] for n in self.names[1:]}}
        for key, v in self._meta.items():
            ex[key] = gather(torch.cat(v) if v else torch.zeros(0, dtype=torch.long)).numpy().astype(np.int64)
        self.extracted = ex
        return ex

    def evaluate(self) -> Dict:
        ex, gal = self.extract(), self.gallery_from
        metrics = rank_metrics(ex, self.eval_set, self.dist, self.reranker, gal)
        if self.report_feats:
            metrics["by_feat"] = {}
            for name in self.report_feats:
                other = metrics if name == self.feat else rank_metrics(
                    {**ex, "feats": ex["extra_feats"][name]}, self.eval_set, self.dist, self.reranker,
                    None if gal is None else {**gal, "feats": gal["extra_feats"][name]})
                metrics["by_feat"][name] = {k: other[k] for k in RANK_KEYS}
        return metrics


class FeatureCollector(ReIDEvaluator):
    """A :class:`ReIDEvaluator` that only gathers ``extracted`` and reports nothing: the gallery
    pass of ``TEST.GALLERY_MISS`` and the seven passes of ``TEST.MISS matrix``."""

    @classmethod
    def like(cls, reid: ReIDEvaluator) -> "FeatureCollector":
        """A collector of the features ``reid`` ranks (same feature, neck, norm, report feats)."""
        return cls(reid.eval_set, reid.feat, reid.neck_feat, reid.feat_norm, reid.report_feats)

    def evaluate(self) -> Dict:
        self.extract()
        return {}


@EVALUATOR_REGISTRY.register("foreground")
class ForegroundPrecisionEvaluator(DatasetEvaluator):
    """Share of the kept patches that lie on the person, from the dataset's foreground masks and
    the model's ``keep_mask`` (B, 3, N): ``fg_precision`` = kept foreground / kept, ``fg_share``
    = foreground / all patches (a random selection's precision), ``fg_best`` = a perfect
    selection's precision (per row min(foreground, kept) / kept). A patch is foreground when at
    least half of its pixels are. Reports nothing without masks or without a selection."""

    def __init__(self, eval_set=None):
        self.eval_set = eval_set
        self.reset()

    @classmethod
    def from_config(cls, cfg, eval_set) -> "ForegroundPrecisionEvaluator":  # noqa: ARG003
        return cls(eval_set)

    def reset(self) -> None:
        self._counts = torch.zeros(5, dtype=torch.float64)  # fg kept, kept, fg, all, best

    def process(self, batch: Dict, outputs: Dict, flipped: Optional[Dict] = None) -> None:
        if "keep_mask" not in outputs or "masks" not in batch:
            return
        patch_size, stride = outputs["patch_geometry"]
        fg = patch_foreground(batch["masks"], patch_size, stride) >= 0.5  # (B, N)
        keep = outputs["keep_mask"].cpu()  # (B, 3, N)
        fg3 = fg.unsqueeze(1).expand_as(keep)
        best = torch.minimum(fg3.sum(-1), keep.sum(-1)).sum()
        self._counts += torch.tensor([(keep & fg3).sum(), keep.sum(), fg3.sum(), fg3.numel(), best],
                                     dtype=torch.float64)

    def evaluate(self) -> Dict:
        fg_kept, kept, fg_all, total, best = gather(self._counts.unsqueeze(0)).sum(0).tolist()
        if kept == 0:
            return {}
        return {"fg_precision": fg_kept / kept, "fg_share": fg_all / total, "fg_best": best / kept}


def build_evaluators(cfg, eval_set) -> List[DatasetEvaluator]:
    """The evaluators ``TEST.EVALUATORS`` names, built for ``eval_set``."""
    return [EVALUATOR_REGISTRY.build(name, cfg, eval_set) for name in cfg.TEST.EVALUATORS]


@torch.no_grad()
def inference_on_dataset(model, eval_set, evaluators: Sequence[DatasetEvaluator], device,
                         miss: str = "none", flip: bool = False, amp: str = "off") -> Dict:
    """Run ``model`` in eval mode over ``eval_set`` (this rank's shard) feeding ``evaluators``;
    returns their merged results plus ``num_skipped`` (unreadable samples, all ranks)."""
    was_training = model.training
    model.eval()
    for evaluator in evaluators:
        evaluator.reset()
    skipped = 0
    bar = tqdm(eval_set.loader, desc="extracting features", leave=False,
               disable=not (is_main_process() and sys.stderr.isatty()))
    for batch in bar:
        skipped += batch["num_skipped"]
        if "images" not in batch:
            continue
        outputs, flipped = model_outputs(model, batch["images"].to(device, non_blocking=True),
                                         batch["camids"].to(device), miss, flip, amp)
        for evaluator in evaluators:
            evaluator.process(batch, outputs, flipped)
    model.train(was_training)
    results: Dict = {}
    for evaluator in evaluators:
        results.update(evaluator.evaluate())
    results["num_skipped"] = int(gather(torch.tensor([float(skipped)])).sum())
    return results


def query_gallery_miss(cfg) -> Tuple[str, str]:
    """(query, gallery) missing-modality codes: TEST.QUERY_MISS / TEST.GALLERY_MISS, each
    TEST.MISS when empty."""
    t = cfg.TEST
    return t.QUERY_MISS or t.MISS, t.GALLERY_MISS or t.MISS


def evaluate(model, eval_set, cfg, device, miss: Optional[str] = None,
             evaluators: Optional[Sequence[DatasetEvaluator]] = None) -> Dict:
    """Evaluate one evaluation set with the config's evaluators (or ``evaluators``) and test
    options (FLIP, AMP; missing modalities :func:`query_gallery_miss`, or ``miss`` for query and
    gallery alike). With different query and gallery codes the query pass feeds ``evaluators``
    and a second pass collects each ReID evaluator's gallery features."""
    if evaluators is None:
        evaluators = build_evaluators(cfg, eval_set)
    query_miss, gallery_miss = query_gallery_miss(cfg) if miss is None else (miss, miss)
    for reid in (e for e in evaluators if isinstance(e, ReIDEvaluator)):
        reid.gallery_from = None
        if gallery_miss != query_miss:
            collector = FeatureCollector.like(reid)
            inference_on_dataset(model, eval_set, [collector], device, gallery_miss, cfg.TEST.FLIP,
                                 cfg.TEST.AMP)
            reid.gallery_from = collector.extracted
    return inference_on_dataset(model, eval_set, evaluators, device, query_miss, cfg.TEST.FLIP,
                                cfg.TEST.AMP)


def split_query_gallery(extracted: Dict, eval_set):
    """Boolean masks (M,) of query and gallery rows of ``extracted``."""
    index = extracted["index"]
    if eval_set.shared:
        everything = np.ones(len(index), dtype=bool)
        return everything, everything
    is_query = index < eval_set.num_query
    return is_query, ~is_query


def rank_metrics(extracted: Dict, eval_set, dist_metric: str, rerank=None,
                 gallery: Optional[Dict] = None) -> Dict:
    """mAP, CMC (R1/R5/R10) and mINP (fractions in [0, 1]) of extracted features.

    ``rerank``: optional callable (qf, gf) -> (Q, G) distance replacing the plain distance.
    ``gallery``: the ``extracted`` of another pass over the same set (other missing modalities):
    its gallery rows' features are ranked against ``extracted``'s query rows. The labels are the
    same samples', so a shared query / gallery list still drops each query's own triplet (same
    identity and camera: junk).
    """
    gallery = extracted if gallery is None else gallery
    if not np.array_equal(gallery["index"], extracted["index"]):
        raise ValueError("query and gallery features come from passes over different samples")
    q, g = split_query_gallery(extracted, eval_set)
    distmat = query_gallery_distance(extracted["feats"][torch.from_numpy(q)],
                                     gallery["feats"][torch.from_numpy(g)], dist_metric, rerank)
    scenes = {}
    if eval_set.uses_scenes:
        scenes = dict(q_scenes=extracted["sceneids"][q], g_scenes=extracted["sceneids"][g])
    return distance_metrics(distmat, extracted["pids"][q], extracted["pids"][g],
                            extracted["camids"][q], extracted["camids"][g], **scenes)


def query_gallery_distance(qf: torch.Tensor, gf: torch.Tensor, dist_metric: str,
                           rerank=None) -> torch.Tensor:
    """(Q, G) distance of the L2-normalised query (Q, D) and gallery (G, D) features: TEST.DIST's
    metric, or ``rerank(qf, gf)`` when given."""
    qf, gf = F.normalize(qf.float(), dim=1), F.normalize(gf.float(), dim=1)
    return rerank(qf, gf) if rerank is not None else compute_distance(qf, gf, dist_metric)


def distance_metrics(distmat, q_pids, g_pids, q_camids, g_camids, q_scenes=None,
                     g_scenes=None) -> Dict:
    """mAP, CMC (R1/R5/R10), mINP and chance mAP (fractions) of a (Q, G) distance matrix and the
    identity / camera (/ scene) labels of its rows and columns (:func:`utils.metrics.evaluate_rank`)."""
    scenes = {} if q_scenes is None else dict(q_scenes=q_scenes, g_scenes=g_scenes)
    cmc, mean_ap, minp = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, **scenes)
    chance = random_ranking_map(q_pids, g_pids, q_camids, g_camids, **scenes)
    q_keys, g_keys = (q_camids, g_camids) if q_scenes is None else (q_scenes, g_scenes)
    has_positive = ((np.asarray(g_pids)[None, :] == np.asarray(q_pids)[:, None]) &
                    ~junk_mask(np.asarray(q_pids)[:, None], np.asarray(q_keys)[:, None], g_pids,
                               g_keys)).any(1)
    metrics = {"mAP": float(mean_ap), "mINP": float(minp), "num_query": int(len(q_pids)),
               "num_gallery": int(len(g_pids)), "chance_mAP": chance,
               # queries without a positive in the gallery are dropped by the protocol
               "num_valid_query": int(has_positive.sum())}
    for k in (1, 5, 10):
        metrics[f"R{k}"] = float(cmc[min(k, len(cmc)) - 1])
    return metrics


def build_reranker(cfg):
    """k-reciprocal re-ranking as a (qf, gf) -> distance callable, or None (TEST.RERANK)."""
    r = cfg.TEST.RERANK
    if not r.ENABLED:
        return None
    from utils.rerank import re_ranking

    return lambda qf, gf: re_ranking(qf, gf, k1=r.K1, k2=r.K2, lambda_value=r.LAMBDA)


def dropped_queries(metrics: Dict) -> str:
    """"N without a positive in the gallery, not counted; " when the protocol dropped queries."""
    valid = metrics.get("num_valid_query", metrics["num_query"])
    dropped = metrics["num_query"] - valid
    return (f"{dropped} without a positive in the gallery, not counted (metrics over {valid}); "
            if dropped else "")


def format_metrics(metrics: Dict) -> str:
    text = (f"mAP {metrics['mAP'] * 100:.2f}  R1 {metrics['R1'] * 100:.2f}  "
            f"R5 {metrics['R5'] * 100:.2f}  R10 {metrics['R10'] * 100:.2f}  "
            f"mINP {metrics['mINP'] * 100:.2f}  ({metrics['num_query']} queries, "
            f"{dropped_queries(metrics)}{metrics['num_gallery']} gallery; chance mAP {metrics['chance_mAP'] * 100:.2f}, "
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


def export_features(path: str, extracted: Dict, eval_set, gallery: Optional[Dict] = None) -> None:
    """Write features, pids, camids, sceneids and image paths of the query and gallery rows to a
    .npz file (keys ``query_feats``, ``query_pids``, ..., ``gallery_paths``; paths joined by '|'
    for the three modalities). ``gallery``: the gallery pass's ``extracted`` (TEST.GALLERY_MISS),
    whose features the gallery rows get."""
    q, g = split_query_gallery(extracted, eval_set)
    paths = np.array(["|".join(eval_set.samples[i].paths) for i in extracted["index"]])
    arrays = {}
    for prefix, rows, source in (("query", q, extracted), ("gallery", g, gallery or extracted)):
        arrays[f"{prefix}_feats"] = source["feats"].numpy()[rows]
        for key in ("pids", "camids", "sceneids"):
            arrays[f"{prefix}_{key}"] = extracted[key][rows]
        arrays[f"{prefix}_paths"] = paths[rows]
    path = path if path.endswith(".npz") else path + ".npz"  # np.savez's naming
    with replacing(path, "TEST.EXPORT") as tmp, open(tmp, "wb") as f:  # an old file survives a failure
        np.savez(f, **arrays)
