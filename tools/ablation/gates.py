"""Gate values of an SDTPS run (the cosine gate of every pair, head and patch on the first test
batches) at initialisation and at its last epoch, with bench/sdtps_gate_spread.py's forward."""
import os
from typing import Dict, Optional

import torch

from bench.sdtps_gate_spread import model_at_init, pair_outputs, trained_model
from config import build_cfg
from tools.ablation.plan import STAMP, read_json

BATCHES = 2  # test batches (TEST.IMS_PER_BATCH samples each)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
BINS = 40  # histogram bins over [0, 1] (the gate is a sigmoid)


def run_cwd(folder: str) -> str:
    """The working directory the run was trained in (its relative DATASETS.ROOT_DIR starts there)."""
    stamp = read_json(os.path.join(folder, STAMP)) or {}
    attempts = [a for a in stamp.get("attempts", []) if a.get("cwd")]
    return attempts[-1]["cwd"] if attempts else os.getcwd()


def is_sdtps(run) -> bool:
    return run.config.get("MODEL.SELECTION.NAME") == "sdtps"


def describe(values: torch.Tensor) -> Dict[str, object]:
    """Mean, quantiles and the histogram density over [0, 1] of a flat tensor of gates."""
    values = values.double().flatten()
    hist = torch.histc(values, bins=BINS, min=0.0, max=1.0)
    return {"mean": float(values.mean()),
            "quantiles": [float(q) for q in torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64))],
            "density": [float(h) / len(values) * BINS for h in hist], "count": len(values)}


@torch.no_grad()
def gate_values(folder: str, last_epoch: int) -> Dict[str, Dict[str, object]]:
    """{"init": describe(...), "end": describe(...)} of the run in ``folder``: its model built
    from its config.yaml with its seed, and its last checkpoint, on its own test data (never
    generated here). Raises OSError / ValueError / RuntimeError naming what is missing."""
    from data.build import build_data  # heavy: only when a report asks for gates

    weights = os.path.join(folder, f"checkpoint_epoch{last_epoch}.pth")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no last checkpoint {weights}")
    cfg = build_cfg(os.path.join(folder, "config.yaml"))
    root = cfg.DATASETS.ROOT_DIR
    if not os.path.isabs(root):
        root = os.path.join(run_cwd(folder), root)
    cfg = build_cfg(os.path.join(folder, "config.yaml"),
                    ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "DATASETS.GENERATE", "False",
                     "DATASETS.ROOT_DIR", root, "OUTPUT_DIR", folder])
    data = build_data(cfg)
    loader = data.eval_sets["test"].loader
    init = pair_outputs(model_at_init(cfg, data.num_classes, data.num_cams), loader, BATCHES)[1]
    end = pair_outputs(trained_model(weights)[1], loader, BATCHES)[1]
    return {"init": describe(init), "end": describe(end)}


def try_gate_values(folder: str, last_epoch: Optional[int]) -> Dict[str, object]:
    """gate_values, or {"error": reason} (the report says why a row has none)."""
    if last_epoch is None:
        return {"error": "not finished"}
    try:
        return gate_values(folder, last_epoch)
    except Exception as exc:  # noqa: BLE001 - any failure is reported in REPORT.md, not fatal
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
