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


def collective_device() -> torch.device:
    """Where tensors must live for a collective: the current GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    # Every dimension is agreed, not only the first: a rank with an empty shard may not know the
    # feature width (it holds a (0, 0) tensor) and must still match the others' shape.
    shape = torch.tensor(tuple(tensor.shape), dtype=torch.long, device=tensor.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    full = torch.stack(shapes).max(dim=0).values.tolist()
    padded = tensor.new_zeros(full)
    padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [g[: int(s[0])] for g, s in zip(gathered, shapes)]


def all_gather_object(obj) -> list:
    """Picklable ``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one rank (a collective under DDP)."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (e.g. BatchNorm running statistics) to every rank.

    DDP broadcasts rank 0's buffers at the start of each training forward, but the forward then
    updates each rank's running statistics from its own batch, so after training the ranks differ
    slightly; evaluation and checkpoints must all use rank 0's values.
    """
    if not is_distributed():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
