"""Seeding and determinism helpers."""
import os
import random
import signal
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def derive_seed(*key: int) -> int:
    """A seed in [0, 2**63) that depends only on the integers ``key`` (numpy's SeedSequence
    hash): distinct keys give unrelated streams. Keys the augmentation of a sample by
    (SOLVER.SEED, epoch, position in the epoch, modality), so no worker or process owns it."""
    entropy = [int(k) % 2**64 for k in key]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


@contextmanager
def seeded_rng(seed: Optional[int]):
    """Inside the block python's ``random`` and torch's CPU generator draw from ``seed``; after
    it both continue exactly as before (the caller's streams are not consumed). ``None``: the
    block draws from the caller's streams as they are."""
    if seed is None:
        yield
        return
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        torch.set_rng_state(torch_state)


def set_deterministic(enabled: bool) -> None:
    """Ask torch for deterministic kernels (bit-reproducible runs on CPU; slower on CUDA)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def worker_init_fn(worker_id: int) -> None:
    """Seed python and numpy in a data-loader worker from torch's per-worker seed.

    The training augmentation does not draw from these streams (it is keyed per sample, see
    ``derive_seed``); a user transform that does is reproducible for a fixed worker count.

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
