"""Rotating every trajectory into a common frame: the calibrated "boomerang" picture.

Each trajectory gets its own orthonormal frame, built only from its own geometry:

1. ``e1``: the unit chord, from the first point to the last.
2. ``e2``: the direction in the trajectory's top-2 principal plane that is perpendicular to the
   chord: the in-plane rotation by 90 degrees of the chord's projection on the plane, then
   Gram-Schmidt against ``e1`` (if the plane is degenerate, e.g. for a straight trajectory: the
   direction of largest spread perpendicular to the chord).  Sign: the trajectory's mean
   coordinate along ``e2`` is >= 0 (the trajectory bulges towards +e2).
3. ``e3``: the top principal direction of what is left after removing the ``e1`` and ``e2``
   components (sign: its largest-magnitude coordinate is positive).

Coordinates are taken relative to the first point and, with ``normalize=True``, divided by the
chord length, so every trajectory runs from (0, 0, 0) to (1, 0, 0): overlaying many trajectories
shows whether they share one shape (the papers' observation) and how far they bulge off the chord
(the deviation, in units of the chord).  ``residual`` is the part of each point's displacement
outside the frame, in the same units.  Built from distances and projections only, the frame and
the coordinates are invariant to rotations and reflections of the data space.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._tensors import MAX_ELEMENTS, batch_slices, check_trajectory, f64, work_dtype
from .pca import pca_chunk


@dataclass
class FrameCoordinates:
    """coords: (points, batch, 3) along (e1, e2, e3); residual: (points, batch); chord: (batch,)."""

    coords: torch.Tensor
    residual: torch.Tensor
    chord: torch.Tensor


def _orthonormalize(v: torch.Tensor, basis, tol: float = 1e-6) -> torch.Tensor:
    """Gram-Schmidt of ``v`` (b, dim) against unit vectors ``basis`` (each (b, dim)), done twice for
    accuracy; unit result, or zero where less than ``tol`` of ``v`` is left (no such direction)."""
    before = v.norm(dim=-1, keepdim=True)
    for _ in range(2):
        for e in basis:
            v = v - (v * e).sum(-1, keepdim=True) * e
    after = v.norm(dim=-1, keepdim=True)
    ok = after > tol * before
    return torch.where(ok, v / after.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(v))


def _frame_chunk(x: torch.Tensor):
    """x: (b, points, dim) float -> basis (b, 3, dim), origin (b, dim), chord (b,)."""
    tiny = torch.finfo(x.dtype).tiny
    origin = x[:, 0]
    chord_vec = x[:, -1] - origin
    chord = chord_vec.norm(dim=-1)
    e1 = chord_vec / chord.clamp_min(tiny)[:, None]
    rel = x - origin[:, None]
    _, _, plane = pca_chunk(x, 2, want_basis=True)                          # (b, 2, d)
    c = (plane @ e1[:, :, None])[..., 0]                                    # chord in plane coords (b, 2)
    w = -c[:, 1:2] * plane[:, 0] + c[:, 0:1] * plane[:, 1]                  # in-plane perpendicular
    e2 = _orthonormalize(w, [e1])
    # degenerate plane (a straight trajectory, or a chord orthogonal to the plane): the direction of
    # the largest spread perpendicular to the chord instead
    missing = e2.norm(dim=-1) == 0
    if bool(missing.any()):
        perp = rel - (rel @ e1[:, :, None]) * e1[:, None]
        _, _, top = pca_chunk(perp, 1, want_basis=True)
        e2 = torch.where(missing[:, None], _orthonormalize(top[:, 0], [e1]), e2)
    side = (rel @ e2[:, :, None]).mean(dim=(1, 2))
    e2 = torch.where(side[:, None] < 0, -e2, e2)
    resid = rel - (rel @ e1[:, :, None]) * e1[:, None] - (rel @ e2[:, :, None]) * e2[:, None]
    _, _, third = pca_chunk(resid, 1, want_basis=True)
    e3 = _orthonormalize(third[:, 0], [e1, e2])
    c3 = rel @ e3[:, :, None]
    pick = c3.abs().argmax(dim=1, keepdim=True)
    e3 = torch.where(c3.gather(1, pick)[:, 0] < 0, -e3, e3)
    return torch.stack([e1, e2, e3], dim=1), origin, chord


def frame_coordinates(traj: torch.Tensor, *, normalize: bool = True, max_elements: int = MAX_ELEMENTS) -> FrameCoordinates:
    """Coordinates of every point in its trajectory's own (chord, bulge, third) frame.

    ``traj`` (points, batch, *shape); returns :class:`FrameCoordinates`.  With ``normalize=True``
    coordinates and residuals are in units of the chord length (NaN for a zero chord).
    """
    flat = check_trajectory(traj, min_points=2)
    t, b, d = flat.shape
    dtype = work_dtype(flat.device)
    coords = torch.empty(t, b, 3, dtype=dtype, device=flat.device)
    residual = torch.empty(t, b, dtype=dtype, device=flat.device)
    chords = torch.empty(b, dtype=dtype, device=flat.device)
    for part in batch_slices(t, b, max(d, t), max_elements, factor=3):
        x = f64(flat[:, part]).transpose(0, 1)
        basis, origin, chord = _frame_chunk(x)
        rel = x - origin[:, None]
        c = rel @ basis.transpose(1, 2)                                      # (b, t, 3)
        r = (rel - c @ basis).norm(dim=-1)
        if normalize:
            c = c / chord[:, None, None]
            r = r / chord[:, None]
        coords[:, part] = c.transpose(0, 1)
        residual[:, part] = r.transpose(0, 1)
        chords[part] = chord
    return FrameCoordinates(coords, residual, chords)


def frame_spread(coords: torch.Tensor) -> torch.Tensor:
    """How much trajectories differ in the common frame: at every point, the root of the summed
    variance over the batch of the 3 coordinates, shape (points,).  0 = all trajectories trace the
    same calibrated curve (in units of the chord when the coordinates are normalized)."""
    if coords.ndim != 3 or coords.shape[-1] != 3:
        raise ValueError(f"coords must be (points, batch, 3), got {tuple(coords.shape)}")
    if coords.shape[1] < 2:
        return torch.zeros(coords.shape[0], dtype=coords.dtype, device=coords.device)
    return coords.var(dim=1).sum(-1).sqrt()
