"""Atomic checkpoint writing and safe resume.

Every file is written to a temporary name in the same folder, flushed to disk and renamed into
place, so a process killed at any moment leaves either the old file or the new one, never a torn
one. ``last_checkpoint`` (a text file, also replaced atomically) names the newest complete epoch
checkpoint; on resume, a file that fails to load is reported and the next older one is tried.
"""
import glob
import os
import re
from typing import Optional, Tuple

import torch

from utils.logger import get_logger

LAST_POINTER = "last_checkpoint"
EPOCH_PATTERN = re.compile(r"checkpoint_epoch(\d+)\.pth$")


def atomic_torch_save(obj, path: str) -> None:
    """torch.save ``obj`` to ``path`` via a temporary file + fsync + os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def epoch_checkpoints(output_dir: str):
    """Epoch checkpoints in ``output_dir``, newest first, as (epoch, path)."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint_epoch*.pth")):
        match = EPOCH_PATTERN.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def save_epoch_checkpoint(state: dict, output_dir: str, epoch: int, keep_last: int) -> str:
    """Write ``checkpoint_epoch{epoch}.pth``, point ``last_checkpoint`` at it, prune old ones."""
    path = os.path.join(output_dir, f"checkpoint_epoch{epoch}.pth")
    atomic_torch_save(state, path)
    atomic_write_text(os.path.basename(path), os.path.join(output_dir, LAST_POINTER))
    if keep_last > 0:
        for _, old in epoch_checkpoints(output_dir)[keep_last:]:
            os.remove(old)
    return path


def load_checkpoint_file(path: str, map_location="cpu") -> dict:
    """Load a checkpoint; a missing file is a FileNotFoundError naming the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torn or foreign file
        raise RuntimeError(f"cannot read checkpoint {path}: {exc}") from exc


def find_resume_checkpoint(output_dir: str) -> Optional[Tuple[str, dict]]:
    """The newest epoch checkpoint in ``output_dir`` that loads, as (path, state); None if none.

    ``last_checkpoint`` is tried first; any file that does not load (torn write from an older
    version, disk error) is logged and skipped in favour of the next older one.
    """
    logger = get_logger()
    candidates = []
    pointer = os.path.join(output_dir, LAST_POINTER)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            candidates.append(os.path.join(output_dir, f.read().strip()))
    candidates += [p for _, p in epoch_checkpoints(output_dir) if p not in candidates]
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            state = load_checkpoint_file(path)
        except RuntimeError as exc:
            logger.warning("skipping unreadable checkpoint: %s", exc)
            continue
        if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
            logger.warning("skipping %s: not a training checkpoint", path)
            continue
        return path, state
    return None


def extract_model_state(obj: dict) -> dict:
    """The model state dict from a training checkpoint or a bare state dict."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    return obj


def load_model_weights(model: torch.nn.Module, state_dict: dict, strict: bool, source: str) -> None:
    """Load weights, with an error that lists mismatched keys and shapes.

    With ``strict`` False, mismatched keys are skipped and listed in a warning instead.
    """
    logger = get_logger()
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    wrong_shape = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and hasattr(state_dict[k], "shape") and state_dict[k].shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): {'; '.join(wrong_shape[:20])}")
    if problems and strict:
        raise RuntimeError(
            f"checkpoint {source} does not match this model (another architecture or config?):\n  "
            + "\n  ".join(problems)
            + "\nSet MODEL.LOAD_STRICT False to load the matching keys only."
        )
    if problems:
        logger.warning("loading %s non-strictly:\n  %s", source, "\n  ".join(problems))
    compatible = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(compatible, strict=False)
