"""Seeds: parsing ``0-63`` / ``1,5,10-20`` and drawing each sample's noise from its own seed.

Every sample's noise comes from a generator seeded with that sample's seed (on the CPU, in
float64), so an image depends only on its seed: not on the batch size, the order, the device or
the number of processes.
"""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple


def parse_ranges(text: str, what: str = "seeds", one: str = "seed", example: str = "0-63 or 1,5,10-20") -> List[int]:
    """``"0-3,10"`` -> [0, 1, 2, 3, 10] (ranges inclusive; duplicates rejected); ``what`` / ``one``
    name the values in the errors."""
    values: List[int] = []
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"cannot read {what} {text!r}: use non-negative integers and ranges, e.g. {example}")
        lo = int(match[1])
        hi = int(match[2]) if match[2] is not None else lo
        if hi < lo:
            raise ValueError(f"{one} range {part.strip()!r} is empty: write low-high with low <= high")
        values.extend(range(lo, hi + 1))
    if len(set(values)) != len(values):
        raise ValueError(f"{what} {text!r} list a {one} more than once")
    return values


def parse_seeds(text: str) -> List[int]:
    """``"0-3,10"`` -> [0, 1, 2, 3, 10]: the seed lists of the CLI."""
    return parse_ranges(text, "seeds")


def seed_noise(seeds: Sequence[int], shape: Tuple[int, ...], dtype=None, device="cpu"):
    """Standard normal noise (len(seeds), *shape), one generator per seed (float32 by default)."""
    import torch          # here, so that parsing seeds (the CLI's --seeds) does not load torch
    dtype = torch.float32 if dtype is None else dtype
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)
