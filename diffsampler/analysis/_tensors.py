"""Shared tensor plumbing for the analysis functions: shapes, float64, chunking over the batch.

Every measure takes trajectories shaped ``(points, batch, *sample_shape)``.  Internally a
trajectory is a ``(points, dim)`` matrix: the sample shape is flattened, values are cast to
float64 on the tensor's own device (float32 on Apple MPS, which has no float64), and the batch is
processed in chunks so that at most ``max_elements`` float64 values are materialized at once.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..models.base import work_dtype  # noqa: F401  (re-exported for the analysis modules)

MAX_ELEMENTS = 2 ** 24        # about 128 MB of float64 per chunk


def check_trajectory(traj: torch.Tensor, name: str = "trajectory", min_points: int = 2) -> torch.Tensor:
    """Validate a ``(points, batch, *shape)`` tensor; return it as a ``(points, batch, dim)`` view."""
    if not isinstance(traj, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor shaped (points, batch, *sample_shape), "
                        f"got {type(traj).__name__}")
    if traj.ndim < 3:
        raise ValueError(f"{name} must be shaped (points, batch, *sample_shape) with at least 3 dims, "
                         f"got shape {tuple(traj.shape)}")
    if traj.shape[0] < min_points:
        raise ValueError(f"{name} needs at least {min_points} points along its first dim, got {traj.shape[0]}")
    if traj.shape[1] < 1:
        raise ValueError(f"{name} has an empty batch")
    if not (traj.is_floating_point()):
        raise ValueError(f"{name} must be floating point, got {traj.dtype}")
    return traj.reshape(traj.shape[0], traj.shape[1], -1)


def check_points(x: torch.Tensor, batch: int, dim: int, name: str) -> torch.Tensor:
    """A ``(batch, *shape)`` tensor that goes with a trajectory, as ``(batch, dim)``."""
    if not isinstance(x, torch.Tensor) or x.shape[0] != batch or x[0].numel() != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be shaped (batch={batch}, *sample_shape) with {dim} values per sample, got {got}")
    return x.reshape(batch, dim)


def batch_slices(points: int, batch: int, dim: int, max_elements: int = MAX_ELEMENTS,
                 factor: int = 1) -> Iterator[slice]:
    """Slices of the batch such that ``factor * points * chunk * dim <= max_elements`` (at least 1 sample)."""
    per_sample = max(1, factor * points * dim)
    chunk = max(1, int(max_elements) // per_sample)
    for start in range(0, batch, chunk):
        yield slice(start, min(batch, start + chunk))


def f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(work_dtype(x.device))
