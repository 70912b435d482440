"""Worker functions for spawned multi-process unit tests (kept light: spawn re-imports this
module in every child, so it imports torch and the helpers under test only)."""
import torch
import torch.distributed as dist

from data.samplers import ShardSampler
from utils.dist import all_gather_tensor


def gather_shards(rank: int, world: int, port: int, sample_counts, queue) -> None:
    """For each count: shard ``range(count)`` with ShardSampler, gather ids and (n, 3) features
    with ``all_gather_tensor`` and report (rank, count, shard size, gathered ids, features)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        for count in sample_counts:
            shard = list(ShardSampler(count, rank, world))
            ids = torch.tensor(shard, dtype=torch.long)
            # a rank without samples does not know the feature width: (0, 0), as extract() has it
            feats = (torch.stack([torch.full((3,), float(i)) for i in shard]) if shard
                     else torch.zeros(0, 0))
            got_ids = torch.cat(all_gather_tensor(ids)).tolist()
            got_feats = torch.cat(all_gather_tensor(feats))
            queue.put((rank, count, len(shard), got_ids, got_feats.tolist()))
    finally:
        dist.destroy_process_group()
