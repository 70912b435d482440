"""Seeding and determinism helpers."""
import os
import random
import signal

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Ask torch for deterministic kernels (bit-reproducible runs on CPU; slower on CUDA)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def worker_init_fn(worker_id: int) -> None:
    """Seed python and numpy in a data-loader worker from torch's per-worker seed.

    torch already seeds each worker from the loader's generator, so seeding the generator per
    epoch makes the workers' augmentations reproducible too.

    Workers ignore SIGTERM: a scheduler that pre-empts a job signals every process of it, and a
    worker killed that way would crash the main process before it writes its SIGTERM checkpoint.
    Workers still end when the main process closes the loader or dies.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed = torch.initial_seed() % (2**32)
    random.seed(seed)
    np.random.seed(seed)


def get_rng_state() -> dict:
    """Snapshot of every RNG the training loop touches, in types a ``weights_only`` load accepts
    (stored in checkpoints): python's state is a tuple of ints, torch's a tensor, and numpy's
    ``(name, keys, pos, has_gauss, cached_gaussian)`` with the uint32 keys as an int64 tensor."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached_gaussian)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a snapshot taken by :func:`get_rng_state` (numpy's keys may also be the ndarray
    that ``np.random.get_state`` returns, as in checkpoints of earlier versions)."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
