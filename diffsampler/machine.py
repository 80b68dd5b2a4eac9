"""What a run was made on, for the records that cards and benchmark results keep."""
from __future__ import annotations

import platform

import torch


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` where there is one, else what ``platform`` knows)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def describe(gpu: bool = False) -> str:
    """``"<cpu>[, <gpu>], <os>, torch <version>"`` in one line."""
    accelerator = f", {torch.cuda.get_device_name(0)}" if gpu and torch.cuda.is_available() else ""
    return f"{cpu_name()}{accelerator}, {platform.system()}, torch {torch.__version__}"
