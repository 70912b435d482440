"""Atomic checkpoint writing and safe resume.

Every file is written to a temporary name in the same folder, flushed to disk and renamed into
place, so a process killed at any moment leaves either the old file or the new one, never a torn
one. ``last_checkpoint`` (a text file, also replaced atomically) names the newest complete epoch
checkpoint; on resume, a file that fails to load is reported and the next older one is tried.

Epoch checkpoints and ``model_best.pth`` also carry a CRC32 of their content (``checksum``),
checked on every load: a file that is complete as a zip archive but damaged inside (bit rot, a
copy that filled blocks with zeros) is refused instead of silently loading wrong weights. A
truncated file already fails to load (its zip directory, written last, is missing).

Every checkpoint or weight file is opened by :func:`safe_load` (``weights_only=True``): it
rebuilds tensors, containers and plain values only, so nothing stored in a file can run. What
this project writes is made of those types; a file holding other Python objects is refused with
:class:`UnsafeFileError` (for a checkpoint of an earlier version, whose RNG states hold numpy
arrays, the message names ``tools/convert_checkpoint.py``, which rewrites it once).
"""
import errno
import glob
import os
import pickle
import re
import zlib
from typing import Optional, Tuple

import numpy as np
import torch

from utils.logger import get_logger

LAST_POINTER = "last_checkpoint"
EPOCH_PATTERN = re.compile(r"checkpoint_epoch(\d+)\.pth$")
CHECKSUM_KEY = "checksum"
UNSAFE_REASON = "it holds Python objects besides tensors, which are not loaded for safety"
_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # how torch names the object it refused
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+)")


def state_checksum(state) -> str:
    """CRC32 over a checkpoint's content: every tensor (dtype, shape, bytes) and plain value,
    walked in a fixed order (dict keys sorted); the ``checksum`` entry itself is left out."""
    crc = 0

    def add(data) -> None:
        nonlocal crc
        crc = zlib.crc32(data, crc)

    def walk(obj) -> None:
        if torch.is_tensor(obj):
            flat = obj.detach().cpu().contiguous().reshape(-1)
            add(f"T{flat.dtype}{tuple(obj.shape)}".encode())
            add(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(obj, np.ndarray):
            add(f"A{obj.dtype}{obj.shape}".encode())
            add(np.ascontiguousarray(obj).tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=repr):
                if key != CHECKSUM_KEY:
                    add(repr(key).encode())
                    walk(obj[key])
        elif isinstance(obj, (list, tuple)):
            add(b"[")
            for item in obj:
                walk(item)
            add(b"]")
        elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
            add(repr(obj).encode())

    walk(state)
    return f"crc32:{crc:08x}"


def with_checksum(state: dict) -> dict:
    """``state`` plus its ``checksum`` entry (a shallow copy)."""
    return {**state, CHECKSUM_KEY: state_checksum(state)}


class WriteError(OSError):
    """A file of the run could not be written (disk full, no permission); nothing partial is left."""


def _write_failure(path: str, exc: BaseException) -> WriteError:
    """A WriteError naming ``path`` and the cause (disk full is found anywhere in the chain)."""
    cause, reason = exc, None
    while cause is not None and reason is None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            reason = "no space left on device"
        cause = cause.__cause__ or cause.__context__
    if reason is None:
        reason = getattr(exc, "strerror", None) or short_reason(exc)
    return WriteError(f"cannot write {path}: {reason} (OUTPUT_DIR {os.path.dirname(path)}); "
                      "the files written before are intact. Free space or choose another "
                      "OUTPUT_DIR, then continue with --resume")


def _atomic_write(path: str, write) -> None:
    """``write(file)`` into ``path.tmp``, fsync, then os.replace; on failure the temporary file is
    removed and a :class:`WriteError` raised."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - torch's zip writer reports a full disk as RuntimeError
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise _write_failure(path, exc) from exc


def atomic_torch_save(obj, path: str) -> None:
    """torch.save ``obj`` to ``path`` via a temporary file + fsync + os.replace."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + os.replace."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


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
    atomic_torch_save(with_checksum(state), path)
    atomic_write_text(os.path.basename(path), os.path.join(output_dir, LAST_POINTER))
    if keep_last > 0:
        for _, old in epoch_checkpoints(output_dir)[keep_last:]:
            os.remove(old)
    return path


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, shortened (loaders' messages run long)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def converted_name(path: str) -> str:
    """Where the conversion command suggested for ``path`` writes: ``<name>.converted.pth``
    beside it (no epoch-checkpoint name, so ``--resume`` never picks it up by itself)."""
    return os.path.splitext(path)[0] + ".converted.pth"


class UnsafeFileError(Exception):
    """A checkpoint or weight file holds Python objects besides tensors; it was not loaded and
    nothing in it ran. Not a RuntimeError, so ``--resume`` stops on it instead of skipping it.

    ``found`` is the object torch refused. A numpy one is what checkpoints of earlier versions
    hold (their RNG states): the message then gives the conversion command, writing to ``target``
    (default :func:`converted_name`; the file itself, with ``--overwrite``, for ``--resume``)."""

    def __init__(self, path: str, found: str, target: Optional[str] = None):
        self.path, self.found = path, found
        message = f"{path} was not loaded: {UNSAFE_REASON} ({found})"
        if found.startswith("numpy."):
            target = target or converted_name(path)
            overwrite = " --overwrite" if target == path else ""
            message += (", as checkpoints of earlier versions of this project do (numpy RNG "
                        "states). If you trust where it came from, convert it once: python "
                        f"tools/convert_checkpoint.py --from legacy --trust {path} {target}"
                        f"{overwrite}")
        else:
            message += ("; no checkpoint of this project holds one: do not open the file by other "
                        "means unless you trust where it came from")
        super().__init__(message)


def safe_load(path: str, map_location="cpu"):
    """The one loader of checkpoint and weight files: ``torch.load(weights_only=True)``.

    Raises :class:`UnsafeFileError` for a file that holds other Python objects (naming the first
    one torch refused), and ``pickle.UnpicklingError`` with the unpickler's own reason (not
    torch's advice to turn ``weights_only`` off) for a file torch.save did not write."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = _BLOCKED_GLOBAL.search(str(exc))
        if blocked:
            raise UnsafeFileError(path, blocked.group(1)) from exc
        detail = _UNPICKLER_ERROR.search(str(exc))
        if detail:
            raise pickle.UnpicklingError(f"not a file torch.save wrote: {detail.group(1)}") from exc
        raise


def load_checkpoint_file(path: str, map_location="cpu") -> dict:
    """Load a checkpoint with :func:`safe_load`; a missing file is a FileNotFoundError naming the
    path, one holding Python objects an UnsafeFileError, an unreadable or damaged one (checksum
    mismatch) a RuntimeError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = safe_load(path, map_location=map_location)
    except UnsafeFileError:
        raise
    except Exception as exc:  # torn or foreign file
        raise RuntimeError(f"{path} is not a checkpoint torch can read ({short_reason(exc)}): name a "
                           "checkpoint_epoch<N>.pth or model_best.pth written by train_net.py") from exc
    if isinstance(state, dict) and CHECKSUM_KEY in state:
        actual = state_checksum(state)
        if actual != state[CHECKSUM_KEY]:
            raise RuntimeError(f"cannot read checkpoint {path}: checksum mismatch (stored "
                               f"{state[CHECKSUM_KEY]}, content {actual}); the file is damaged")
    return state


def find_resume_checkpoint(output_dir: str) -> Optional[Tuple[str, dict]]:
    """The newest epoch checkpoint in ``output_dir`` that loads, as (path, state); None if none.

    ``last_checkpoint`` is tried first; any file that does not load (torn write from an older
    version, disk error) is logged and skipped in favour of the next older one. A file holding
    Python objects stops the search (UnsafeFileError suggesting its conversion in place): an
    older checkpoint would silently lose the newer epochs.
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
        except UnsafeFileError as exc:
            raise UnsafeFileError(path, exc.found, target=path) from exc
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


def load_model_weights(model: torch.nn.Module, state_dict: dict, strict: bool, source: str) -> list:
    """Load weights, with an error that lists mismatched keys and shapes.

    With ``strict`` False, mismatched keys are skipped and listed in a warning instead. Returns
    the list of problems (empty when the checkpoint matches the model exactly).
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
    def listed(items, sep=", ", shown=20):
        more = f"{sep}... and {len(items) - shown} more" if len(items) > shown else ""
        return sep.join(items[:shown]) + more

    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {listed(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): {listed(wrong_shape, '; ')}")
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
    return problems
