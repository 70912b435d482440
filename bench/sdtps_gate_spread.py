"""Spread of SDTPS's raw pair scores and gates on real (synthetic) images, at initialisation and
for trained checkpoints. Figures for docs/sdtps.md.

    python bench/sdtps_gate_spread.py --config_file configs/Synthetic/sdtps_dgaf.yml \\
        [--weights none=output/a/checkpoint_epoch10.pth heads=output/b/checkpoint_epoch10.pth] \\
        [--gate_norms none patches heads] [--batches 2] [KEY VALUE ...]

For each model it runs the test split's first ``--batches`` batches and prints, over samples,
the 9 pairs and (for the gate) the heads:

* score spread: ``max_N - min_N`` of each pair's raw score (before the min-max normalisation);
  its inverse is the factor by which min-max normalising amplifies the selection gradient;
* gate spread: ``max_N - min_N`` and the standard deviation over the N patches of each head's gate.

At initialisation one model per ``--gate_norms`` entry is built (seed SOLVER.SEED, random init);
``--weights label=path`` adds trained checkpoints (each built from the config stored in it).
"""
import argparse
import os
import sys

import torch
from yacs.config import CfgNode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import build_cfg  # noqa: E402
from data.build import build_data  # noqa: E402
from data.datasets import dataset_class  # noqa: E402
from modeling.model import build_model  # noqa: E402
from utils.checkpoint import extract_model_state, load_checkpoint_file  # noqa: E402
from utils.logger import setup_logger  # noqa: E402


def quantiles(x: torch.Tensor) -> str:
    q = torch.quantile(x.flatten().double(), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    return f"{q[0]:.2e} / {q[1]:.2e} / {q[2]:.2e}"


@torch.no_grad()
def pair_outputs(model, loader, batches: int):
    """SDTPS's raw pair scores (B, 3, 3, N) and gates (B, 3, 3, H, N) over the first batches."""
    scores, gates = [], []
    model.eval()
    for i, batch in enumerate(loader):
        if i == batches:
            break
        tokens = model.encode(batch["images"], batch["camids"])
        pairs = model.selection.pair_scores(tokens[:, :, 1:], tokens[:, :, 0])
        scores.append(pairs.score)  # (B, 3, 3, N)
        gates.append(pairs.gate)  # (B, 3, 3, H, N)
    return torch.cat(scores), torch.cat(gates)


def model_at_init(cfg, num_classes: int, num_cams: int):
    """The config's model as initialised with its seed (SOLVER.SEED)."""
    torch.manual_seed(cfg.SOLVER.SEED)
    return build_model(cfg, num_classes, num_cams)


def trained_model(path: str):
    """A checkpoint's model, built from the config stored in it (its classes: less VAL_IDS)."""
    checkpoint = load_checkpoint_file(path)
    cfg = CfgNode.load_cfg(checkpoint["cfg"])
    model = build_model(cfg, *dataset_class(cfg.DATASETS.NAMES).train_size(cfg))
    model.load_state_dict(extract_model_state(checkpoint))
    return cfg, model


def spreads(model, loader, batches: int):
    score, gate = pair_outputs(model, loader, batches)
    return {"score_range": score.amax(-1) - score.amin(-1),
            "gate_range": gate.amax(-1) - gate.amin(-1), "gate_std": gate.std(-1, correction=0)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", default="configs/Synthetic/sdtps_dgaf.yml")
    parser.add_argument("--gate_norms", nargs="*", default=["none", "patches", "heads"])
    parser.add_argument("--weights", nargs="*", default=[], metavar="LABEL=PATH")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    setup_logger()
    base = build_cfg(args.config_file, args.opts + ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"])
    data = build_data(base)
    loader = data.eval_sets["test"].loader
    rows = []
    for norm in args.gate_norms:
        cfg = build_cfg(args.config_file, args.opts + ["MODEL.SDTPS.GATE_NORM", norm])
        model = model_at_init(cfg, data.num_classes, data.num_cams)
        rows.append((f"init, gate_norm {norm}", spreads(model, loader, args.batches)))
    for item in args.weights:
        label, path = item.split("=", 1)
        cfg, model = trained_model(path)
        rows.append((f"{label} (gate_norm {cfg.MODEL.SDTPS.GATE_NORM})", spreads(model, loader, args.batches)))
    print(f"{args.config_file}: min / median / max over samples x 9 pairs (x heads for the gate)")
    print("| model | score max-min | 1 / (score max-min) | gate max-min | gate std over N |")
    print("|---|---|---|---|---|")
    for label, s in rows:
        print(f"| {label} | {quantiles(s['score_range'])} | {quantiles(1 / s['score_range'])} | "
              f"{quantiles(s['gate_range'])} | {quantiles(s['gate_std'])} |")
    return rows


if __name__ == "__main__":
    main()
