"""Where this process stands under torchrun: its rank, the number of processes, a barrier.

Outside a process group (a plain ``python`` run) it is rank 0 of 1 and the barrier does nothing.
"""
from __future__ import annotations

from typing import Tuple

import torch


def rank_and_world() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()
