"""Where this process stands under torchrun: its rank, the number of processes, a barrier.

Outside a process group (a plain ``python`` run) it is rank 0 of 1 and the barrier does nothing.
"""
from __future__ import annotations

import atexit
import os
from typing import Tuple

import torch


def rank_and_world() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over the processes (a new tensor; ``value`` itself outside a group)."""
    if rank_and_world()[1] > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The float64 mean of ``value`` over the processes, on its own device (nccl reduces only
    CUDA tensors)."""
    return all_reduce_sum(value.detach().to(torch.float64)) / rank_and_world()[1]


def join_process_group(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1) join the process group (nccl for a CUDA device, else gloo)
    and return this rank's device (``cuda:LOCAL_RANK``); otherwise return ``device`` unchanged.

    The group is destroyed at exit: a rank that leaves with a live gloo group can abort in its
    own teardown ("terminate called without an active exception") while the others still work."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    cuda = device.startswith("cuda")
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    atexit.register(torch.distributed.destroy_process_group)
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device
