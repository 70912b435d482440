"""Identity sampler: batches of P identities x K instances, reproducible per epoch, DDP-aware.

Every rank builds the same global list of P x K batches from ``seed + epoch`` and takes its own
slice of each global batch (whole identities), so the global batch equals
``SOLVER.IMS_PER_BATCH`` and no two ranks draw the same identity group in a step.
"""
from collections import defaultdict
from typing import Iterator, List, Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler

from utils.logger import get_logger
from utils.seed import derive_seed


class RandomIdentitySampler(Sampler[int]):
    """Yields dataset indices; every consecutive ``batch_size // world_size`` indices form this
    rank's part of one global P x K batch.

    Args:
        pids: identity of each training sample.
        batch_size: global batch size P x K (``SOLVER.IMS_PER_BATCH``).
        num_instances: K, instances per identity.
        seed: shared seed; the batches of epoch e come from ``seed + e`` (call ``set_epoch``).
        rank, world_size: this process's slice of each global batch.

    An identity with fewer than K samples is drawn with replacement (a warning says how many).
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size % num_instances != 0:
            raise ValueError(
                f"batch size {batch_size} is not divisible by instances per identity {num_instances}"
            )
        self.num_pids_per_batch = batch_size // num_instances
        if self.num_pids_per_batch % world_size != 0:
            raise ValueError(
                f"identities per batch (SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE = "
                f"{self.num_pids_per_batch}) must be divisible by the number of processes "
                f"({world_size}): each process takes whole identities of every global batch"
            )
        self.num_instances = num_instances
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.index_dict = defaultdict(list)
        for index, pid in enumerate(pids):
            self.index_dict[int(pid)].append(index)
        self.pids = sorted(self.index_dict)
        if len(self.pids) < self.num_pids_per_batch:
            raise ValueError(
                f"a batch needs {self.num_pids_per_batch} identities but the training split has "
                f"only {len(self.pids)}; lower SOLVER.IMS_PER_BATCH or raise DATALOADER.NUM_INSTANCE"
            )
        short = [p for p in self.pids if len(self.index_dict[p]) < num_instances]
        if short:
            get_logger().warning(
                "%d of %d identities have fewer than %d images; they are sampled with replacement",
                len(short), len(self.pids), num_instances)
        self._per_rank_batch = batch_size // world_size
        self._lengths = {}  # epoch -> indices of this rank in that epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self, epoch: int) -> List[List[int]]:
        rng = np.random.default_rng(self.seed + epoch)
        chunks = {}
        for pid in self.pids:
            idxs = list(self.index_dict[pid])
            if len(idxs) < self.num_instances:
                idxs = list(rng.choice(idxs, size=self.num_instances, replace=True))
            idxs = [idxs[i] for i in rng.permutation(len(idxs))]
            usable = len(idxs) - len(idxs) % self.num_instances
            chunks[pid] = [idxs[i:i + self.num_instances] for i in range(0, usable, self.num_instances)]
        batches = []
        available = [p for p in self.pids if chunks[p]]
        while len(available) >= self.num_pids_per_batch:
            chosen = rng.choice(len(available), size=self.num_pids_per_batch, replace=False)
            batch = []
            for i in sorted(chosen):
                batch.extend(int(x) for x in chunks[available[i]].pop(0))
            batches.append(batch)
            available = [p for p in available if chunks[p]]
        return batches

    def keyed(self) -> Iterator[Tuple[int, int]]:
        """(position in the epoch's global index list, dataset index) of this rank's samples."""
        global_batch = self.num_pids_per_batch * self.num_instances
        start = self.rank * self._per_rank_batch
        for b, batch in enumerate(self._global_batches(self.epoch)):
            for j, index in enumerate(batch[start:start + self._per_rank_batch]):
                yield b * global_batch + start + j, index

    def __iter__(self) -> Iterator[int]:
        return (index for _, index in self.keyed())

    def __len__(self) -> int:
        """Indices of this rank in the current epoch (the batch count varies a little by epoch)."""
        if self.epoch not in self._lengths:
            self._lengths[self.epoch] = len(self._global_batches(self.epoch)) * self._per_rank_batch
        return self._lengths[self.epoch]


class AugmentKeySampler(Sampler[Tuple[int, int]]):
    """Yields (dataset index, augmentation seed) for the indices of ``sampler`` (an epoch-aware
    :class:`RandomIdentitySampler`): the seed is ``derive_seed(seed, epoch, position)``, a
    function of the sample's position in the epoch's global index list only. The training
    dataset draws the sample's augmentation from it, so a config and seed give the same images
    for any DATALOADER.NUM_WORKERS, and ranks of a multi-process run the images of one process."""

    def __init__(self, sampler: RandomIdentitySampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        s = self.sampler
        return ((index, derive_seed(s.seed, s.epoch, position)) for position, index in s.keyed())

    def __len__(self) -> int:
        return len(self.sampler)


class ShardSampler(Sampler[int]):
    """Contiguous, non-overlapping shard of ``range(num_samples)`` for one rank (evaluation).

    Shards are concatenated in rank order after gathering, so every sample is seen exactly once
    and the original order is kept (unlike DistributedSampler, which pads with duplicates).
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        per_rank = -(-num_samples // world_size)
        self.start = min(num_samples, rank * per_rank)
        self.end = min(num_samples, (rank + 1) * per_rank)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start
