"""Per-point measures of trajectories and their summaries over the batch.

All functions take trajectories shaped ``(points, batch, *sample_shape)`` and return float64
tensors shaped ``(points, batch)`` (or ``(points - 1, batch)`` for per-step quantities) on the
input's device.  They only use distances and inner products, so they are invariant to any
orthogonal transformation (rotation or reflection) and translation of the data space.

* :func:`line_deviation`: distance of each point from the straight line through the trajectory's
  first and last points (the papers' "trajectory deviation"); ``relative=True`` divides by the
  chord length ``|x_end - x_start|``.
* :func:`distance_to_final`: ``|x_i - x_final|`` (for the denoising trajectory: how fast the x0
  estimates approach the final sample).
* :func:`step_cosine`: cosine between the step ``x_{i+1} - x_i`` and the direction to the final
  sample ``x_final - x_i`` (1 = the step points straight at the final sample).
* :func:`norms`, :func:`step_sizes`: magnitudes of the points and of the steps.
* :func:`summarize`: mean / std / median / min / max over the batch, NaN-aware.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ._tensors import MAX_ELEMENTS, batch_slices, check_points, check_trajectory, f64, work_dtype


def _endpoints(flat: torch.Tensor, start: Optional[torch.Tensor], end: Optional[torch.Tensor]):
    t, b, d = flat.shape
    start = flat[0] if start is None else check_points(start, b, d, "start")
    end = flat[-1] if end is None else check_points(end, b, d, "end")
    return start, end


def chord_length(traj: torch.Tensor) -> torch.Tensor:
    """``|x_end - x_start|`` per trajectory, shape (batch,)."""
    flat = check_trajectory(traj)
    return (f64(flat[-1]) - f64(flat[0])).norm(dim=-1)


def line_deviation(traj: torch.Tensor, start: Optional[torch.Tensor] = None, end: Optional[torch.Tensor] = None, *,
                   relative: bool = False, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Distance of every point from the line through ``start`` and ``end`` (default: the
    trajectory's first and last points), shape (points, batch).

    ``relative=True`` divides by the chord length ``|end - start|`` (NaN where it is 0).  A
    straight trajectory has deviation 0 everywhere; the endpoints always have deviation 0.
    """
    flat = check_trajectory(traj)
    t, b, d = flat.shape
    start, end = _endpoints(flat, start, end)
    out = torch.empty(t, b, dtype=work_dtype(flat.device), device=flat.device)
    for part in batch_slices(t, b, d, max_elements):
        s, e = f64(start[part]), f64(end[part])
        length = (e - s).norm(dim=-1, keepdim=True)
        unit = torch.where(length > 0, (e - s) / length.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
        rel = f64(flat[:, part]) - s
        along = (rel * unit).sum(-1, keepdim=True)
        dev = (rel - along * unit).norm(dim=-1)
        if relative:
            dev = dev / length[:, 0]
        out[:, part] = dev
    return out


def distance_to_final(traj: torch.Tensor, final: Optional[torch.Tensor] = None, *,
                      max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """``|x_i - final|`` for every point, shape (points, batch); ``final`` defaults to the last point."""
    flat = check_trajectory(traj, min_points=1)
    t, b, d = flat.shape
    final = flat[-1] if final is None else check_points(final, b, d, "final")
    out = torch.empty(t, b, dtype=work_dtype(flat.device), device=flat.device)
    for part in batch_slices(t, b, d, max_elements):
        out[:, part] = (f64(flat[:, part]) - f64(final[part])).norm(dim=-1)
    return out


def step_cosine(traj: torch.Tensor, final: Optional[torch.Tensor] = None, *,
                max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Cosine between the step ``x_{i+1} - x_i`` and ``final - x_i``, shape (points - 1, batch).

    ``final`` defaults to the last point (then the last step's cosine is exactly 1).  NaN where a
    step or the direction to the final point has length 0.
    """
    flat = check_trajectory(traj)
    t, b, d = flat.shape
    final = flat[-1] if final is None else check_points(final, b, d, "final")
    out = torch.empty(t - 1, b, dtype=work_dtype(flat.device), device=flat.device)
    for part in batch_slices(t, b, d, max_elements, factor=2):
        x = f64(flat[:, part])
        step = x[1:] - x[:-1]
        to_final = f64(final[part])[None] - x[:-1]
        out[:, part] = (step * to_final).sum(-1) / (step.norm(dim=-1) * to_final.norm(dim=-1))
    return out


def norms(traj: torch.Tensor, *, rms: bool = False, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """``|x_i|`` for every point, shape (points, batch); ``rms=True`` divides by sqrt(dim)."""
    flat = check_trajectory(traj, min_points=1)
    t, b, d = flat.shape
    out = torch.empty(t, b, dtype=work_dtype(flat.device), device=flat.device)
    for part in batch_slices(t, b, d, max_elements):
        out[:, part] = f64(flat[:, part]).norm(dim=-1)
    return out / d ** 0.5 if rms else out


def step_sizes(traj: torch.Tensor, *, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """``|x_{i+1} - x_i|``, shape (points - 1, batch)."""
    flat = check_trajectory(traj)
    t, b, d = flat.shape
    out = torch.empty(t - 1, b, dtype=work_dtype(flat.device), device=flat.device)
    for part in batch_slices(t, b, d, max_elements):
        x = f64(flat[:, part])
        out[:, part] = (x[1:] - x[:-1]).norm(dim=-1)
    return out


def summarize(values: torch.Tensor, dim: int = -1) -> Dict[str, torch.Tensor]:
    """Mean, std (unbiased; 0 for a single sample), median, min and max over ``dim`` (default: the
    batch, the last dim of a (points, batch) measure), ignoring NaNs.  CPU float64 tensors."""
    v = values.detach().to(torch.float64).cpu()
    mean = v.nanmean(dim=dim)
    count = (~v.isnan()).sum(dim=dim)
    centered = torch.where(v.isnan(), torch.zeros_like(v), v - mean.unsqueeze(dim))
    var = centered.square().sum(dim=dim) / (count - 1).clamp_min(1)
    filled_lo = torch.where(v.isnan(), torch.full_like(v, float("inf")), v)
    filled_hi = torch.where(v.isnan(), torch.full_like(v, float("-inf")), v)
    return {"mean": mean, "std": var.sqrt(), "median": v.nanmedian(dim=dim).values,
            "min": filled_lo.amin(dim=dim), "max": filled_hi.amax(dim=dim)}
