"""Thin helpers around torch.distributed for runs launched by ``torchrun``.

A plain ``python train_net.py`` run is a world of one process; every helper works there too.
"""
import os
from typing import List

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device: torch.device) -> None:
    """Initialise the default process group from torchrun's environment (NCCL on CUDA, gloo on CPU)."""
    if not launched_by_torchrun() or is_distributed():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_tensor(tensor: torch.Tensor) -> List[torch.Tensor]:
    """Gather a tensor whose first dimension may differ across ranks; returns one tensor per rank.

    gloo and NCCL need equal shapes, so every rank pads to the largest length and the padding is
    cut off after the gather.
    """
    world = get_world_size()
    if world == 1:
        return [tensor]
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    max_len = int(max(int(x) for x in lengths))
    padded = tensor.new_zeros((max_len,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[: int(n)] for g, n in zip(gathered, lengths)]


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
