"""Which patch-ranking signals pick the person? Foreground precision of the top-K patches.

    python tools/probe_selection.py --config_file F [--ratios 0.3,0.5,0.7] [--output probe.md] TEST.WEIGHT W

(Options go before the trailing KEY VALUE config overrides.)

For every test sample and modality the N patches are ranked by each signal below, the top
K = max(1, ceil(N * ratio)) are taken, and the tool reports the share of them that are on the
person (at least half of the patch's pixels on the person mask, the evaluation's rule). It needs
a dataset with person masks (the synthetic one). Signals, computed from the model's own forward:

* ``sdtps``: SDTPS's combined score (what the model keeps at its own ratio; models with
  ``MODEL.SELECTION.NAME sdtps``);
* ``cls_attn``: the backbone's last block, attention of the global (CLS) token to each patch,
  mean over heads (a reference: what the backbone itself attends to);
* ``cos_own`` / ``cos_other``: cosine of each patch to its own modality's global token / mean
  cosine to the other two modalities' globals (the raw input of SDTPS's gate);
* ``norm``: the patch feature's L2 norm;
* ``sdtps RGB`` / ``sdtps NI`` / ``sdtps TI``: the ``sdtps`` row per modality (the person mask is
  shared by the three pixel-aligned images, so ``random`` and ``perfect`` hold for each);
* ``random``: the expected precision of a uniformly random choice (= the share of all patches
  on the person, exact, not sampled); ``perfect``: the best any choice of K patches can reach.

At the model's own ratio the ``sdtps`` row equals the kept-token foreground precision logged by
the evaluation. Used in docs/sdtps.md to show whether the learned scorer beats trivial signals.
The probe is an evaluator (:class:`SelectionProbe`) run by the evaluation driver.
"""
import argparse
import os
import sys
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_cli  # noqa: E402
from utils.outputs import check_output, replacing  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from config import ConfigArgumentParser, build_cfg  # noqa: E402
from engine.defaults import load_trained  # noqa: E402
from engine.evaluator import DatasetEvaluator, inference_on_dataset, patch_foreground  # noqa: E402
from modeling.sdtps import MODALITIES, num_kept  # noqa: E402

SIGNALS = ("sdtps", "cls_attn", "cos_own", "cos_other", "norm")


class NoMasksError(ValueError):
    """The test split has no person masks (only the synthetic dataset has them)."""


class LastBlockClsAttention:
    """Forward hook on a timm ViT block's ``attn``: records the CLS -> patch attention (R, N),
    head mean, recomputed from the block's own projections (the fused kernel returns no weights)."""

    def __init__(self, attn_module, num_prefix_tokens: int):
        self.module, self.prefix = attn_module, num_prefix_tokens
        self.value = None
        self.handle = attn_module.register_forward_hook(self)

    def __call__(self, module, inputs, output) -> None:
        x = inputs[0]
        r, n, c = x.shape
        h = module.num_heads
        qkv = module.qkv(x).reshape(r, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
        attn = (q[:, :, :1] @ k.transpose(-2, -1) * module.scale).softmax(dim=-1)  # (R, H, 1, n)
        self.value = attn[:, :, 0, self.prefix:].mean(dim=1)

    def remove(self) -> None:
        self.handle.remove()


def signals(outputs: Dict, cls_attn: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every signal of one batch from the model's outputs: name -> (B, 3, N)."""
    tokens = outputs["tokens"]  # (B, 3, 1 + N, C), as inside the model
    b = tokens.shape[0]
    globals_, patches = tokens[:, :, 0].float(), tokens[:, :, 1:].float()
    cos = torch.einsum("bmnc,bgc->bmgn", F.normalize(patches, dim=-1), F.normalize(globals_, dim=-1))
    own = torch.diagonal(cos, dim1=1, dim2=2).permute(0, 2, 1)  # (B, 3, N): cos[:, m, m]
    other = (cos.sum(dim=2) - own) / 2.0
    out = {
        "cls_attn": cls_attn.float().view(3, b, -1).transpose(0, 1),
        "cos_own": own,
        "cos_other": other,
        "norm": patches.norm(dim=-1),
    }
    if "selection" in outputs and hasattr(outputs["selection"], "scores"):
        out["sdtps"] = outputs["selection"].scores.float()
    return out


class SelectionProbe(DatasetEvaluator):
    """Foreground precision of every signal's top-K for every ratio (see the module docstring).

    ``evaluate()`` -> {"ratios", "K", "N", "precision": {signal: [per ratio]}} with the rows
    ``random`` and ``perfect`` included. Single process. Installs a forward hook on the
    backbone's last block; ``close()`` removes it.
    """

    def __init__(self, model, eval_set, ratios: Sequence[float]):
        self.eval_set, self.ratios = eval_set, list(ratios)
        vit = model.backbone.vit
        self.hook = LastBlockClsAttention(vit.blocks[-1].attn, vit.num_prefix_tokens)
        self.reset()

    def reset(self) -> None:
        self.hits: Dict[str, List[float]] = {}
        self.best = [0.0] * len(self.ratios)
        self.kept = [0.0] * len(self.ratios)
        self.fg_total = self.total = 0.0
        self.n = None

    def process(self, batch: Dict, outputs: Dict, flipped=None) -> None:
        if "masks" not in batch:
            raise NoMasksError(
                f"the {self.eval_set.name} split has no person masks; the probe needs the synthetic "
                "dataset (DATASETS.NAMES Synthetic)")
        sigs = signals(outputs, self.hook.value)
        b, _, n = sigs["norm"].shape
        self.n = n
        patch_size, stride = outputs["patch_geometry"]
        fg = patch_foreground(batch["masks"], patch_size, stride) >= 0.5
        fg = fg.to(sigs["norm"].device).unsqueeze(1).expand(b, 3, n)
        self.fg_total += float(fg.sum())
        self.total += fg.numel()
        for i, ratio in enumerate(self.ratios):
            k = num_kept(n, ratio)
            self.kept[i] += b * 3 * k
            self.best[i] += float(fg.sum(-1).clamp(max=k).sum())
            for name, value in sigs.items():
                idx = value.topk(k, dim=-1).indices
                on_person = fg.gather(-1, idx).sum(dim=(0, 2)).tolist()  # per modality
                self.hits.setdefault(name, [0.0] * len(self.ratios))[i] += sum(on_person)
                if name == "sdtps":
                    for m, modality in enumerate(MODALITIES):
                        # x3: the per-modality count is divided by the all-modality kept total
                        self.hits.setdefault(f"sdtps {modality}", [0.0] * len(self.ratios))[i] += 3 * on_person[m]

    def evaluate(self) -> Dict:
        if self.total == 0:
            raise ValueError(f"the {self.eval_set.name} split yielded no readable samples")
        names = [n for n in SIGNALS if n in self.hits]
        if "sdtps" in self.hits:
            names[1:1] = [f"sdtps {modality}" for modality in MODALITIES]
        precision = {name: [h / kk for h, kk in zip(self.hits[name], self.kept)] for name in names}
        precision["random"] = [self.fg_total / self.total] * len(self.ratios)
        precision["perfect"] = [bb / kk for bb, kk in zip(self.best, self.kept)]
        return {"ratios": list(self.ratios), "K": [num_kept(self.n, r) for r in self.ratios],
                "N": self.n, "precision": precision}

    def close(self) -> None:
        self.hook.remove()


def probe(model, eval_set, device, ratios: Sequence[float]) -> Dict:
    """Run :class:`SelectionProbe` over ``eval_set`` (fp32, all modalities)."""
    evaluator = SelectionProbe(model, eval_set, ratios)
    try:
        result = inference_on_dataset(model, eval_set, [evaluator], device)
    finally:
        evaluator.close()
    result.pop("num_skipped", None)
    return result


def format_table(result: Dict) -> str:
    head = "| signal | " + " | ".join(f"ratio {r:g} (K={k})" for r, k in zip(result["ratios"], result["K"]))
    lines = [head + " |", "|---|" + "---:|" * len(result["ratios"])]
    for name, values in result["precision"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v * 100:.1f} %" for v in values) + " |")
    return "\n".join(lines)


def ratio_list(text: str) -> List[float]:
    """'0.3,0.5,0.7' -> [0.3, 0.5, 0.7], each in (0, 1] (argparse type of --ratios).

    Comma-separated rather than space-separated, so that the trailing config overrides
    (TEST.WEIGHT W ...) cannot be taken for more ratios.
    """
    try:
        ratios = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.3,0.5,0.7, "
                                         f"got {text!r}") from None
    if not ratios:
        raise argparse.ArgumentTypeError("expected at least one ratio")
    for ratio in ratios:
        try:
            num_kept(1, ratio)  # the model's own check of a keep ratio
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return ratios


def build_parser() -> argparse.ArgumentParser:
    parser = ConfigArgumentParser(description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", default="", metavar="FILE", help="path to a yaml config")
    parser.add_argument("--ratios", type=ratio_list, default=[0.3, 0.5, 0.7], metavar="R1,R2,...",
                        help="comma-separated keep ratios to evaluate, each in (0, 1] "
                             "(default 0.3,0.5,0.7)")
    parser.add_argument("--output", default="", metavar="FILE.md", help="also write the table here")
    return parser


def main(argv=None) -> Dict:
    args = build_parser().parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    if args.output:  # before the work: an input or a file of another kind is never overwritten
        check_output(args.output, "--output", (".md", ".txt"),
                     {"--config_file": args.config_file, "TEST.WEIGHT": cfg.TEST.WEIGHT})
    device, data, model, logger = load_trained(cfg)
    result = probe(model, data.eval_sets["test"], device, args.ratios)
    table = format_table(result)
    logger.info("foreground precision of the top-K patches by each signal (N = %d patches per "
                "modality, test split, %s):\n%s", result["N"], cfg.TEST.WEIGHT, table)
    if args.output:
        with replacing(args.output, "--output") as tmp, open(tmp, "w", encoding="utf-8") as handle:
            handle.write(f"Foreground precision of the top-K patches, `{cfg.TEST.WEIGHT}`, "
                         f"N = {result['N']}\n\n{table}\n")
        logger.info("wrote %s", args.output)
    return result


if __name__ == "__main__":
    run_cli(main)
