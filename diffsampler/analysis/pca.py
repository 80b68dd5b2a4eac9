"""Principal components of each trajectory: how many dimensions does one trajectory span?

Each trajectory (its ``points`` states, each a vector of ``dim`` values) is centered on its own
mean point and decomposed; the variance fractions say how much of the spread of its points the
top principal directions capture.  Points count equally, as recorded, so the grid matters: record
on a fine grid for a picture of the continuous trajectory.

Computed per trajectory from the smaller of the two Gram matrices (points x points or dim x dim),
so long trajectories in high dimension cost little.  Sign convention of the components: the
coordinate with the largest magnitude along each component is positive, which makes the
projections invariant to rotations *and* reflections of the data space.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ._tensors import MAX_ELEMENTS, batch_slices, check_trajectory, f64, work_dtype


def pca_chunk(x: torch.Tensor, k: int, want_basis: bool = False):
    """PCA of each trajectory in a chunk ``x`` (b, points, dim), any float dtype.

    Returns ``(variances (b, r), coords (b, points, k), basis (b, k, dim) or None)`` where
    ``variances`` are all r = min(points, dim) eigenvalues of the centered scatter matrix in
    descending order, ``coords`` the coordinates of the centered points on the top-k components
    (zero-padded if k > r) and ``basis`` the components as unit row vectors (zero rows where the
    variance is 0).
    """
    b, t, d = x.shape
    xc = x - x.mean(dim=1, keepdim=True)
    if t <= d:
        evals, u = torch.linalg.eigh(xc @ xc.transpose(1, 2))            # (b, t), (b, t, t)
        evals, u = evals.flip(-1).clamp_min(0), u.flip(-1)
        coords = u * evals.sqrt()[:, None, :]                             # = xc @ basis^T
        basis = None
        if want_basis:
            scale = evals.sqrt()
            inv = torch.where(scale > scale[:, :1] * 1e-12, 1 / scale.clamp_min(torch.finfo(x.dtype).tiny),
                              torch.zeros_like(scale))
            basis = (xc.transpose(1, 2) @ u * inv[:, None, :]).transpose(1, 2)   # (b, t, d)
    else:
        evals, v = torch.linalg.eigh(xc.transpose(1, 2) @ xc)            # (b, d), (b, d, d)
        evals, v = evals.flip(-1).clamp_min(0), v.flip(-1)
        coords = xc @ v
        basis = v.transpose(1, 2) if want_basis else None
    r = coords.shape[-1]
    coords = coords[..., :k]
    # sign convention: the largest-magnitude coordinate along each component is positive
    idx = coords.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(coords.gather(1, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    coords = coords * sign
    if basis is not None:
        basis = basis[:, :k] * sign.transpose(1, 2)
    if k > r:
        coords = torch.cat([coords, coords.new_zeros(b, t, k - r)], dim=-1)
        if basis is not None:
            basis = torch.cat([basis, basis.new_zeros(b, k - r, d)], dim=1)
    return evals, coords, basis


def pca_variance(traj: torch.Tensor, k: int = 3, *, cumulative: bool = True,
                 max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """Fraction of each trajectory's variance captured by its top principal components.

    Returns (batch, k): with ``cumulative=True`` (default) column j is the fraction captured by the
    top j+1 components together (so the columns are "top 1", "top 2", "top 3"); otherwise each
    component's own fraction.  NaN for a trajectory whose points all coincide.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    flat = check_trajectory(traj)
    t, b, d = flat.shape
    out = torch.empty(b, k, dtype=work_dtype(flat.device), device=flat.device)
    for part in batch_slices(t, b, max(d, t), max_elements, factor=2):
        evals, _, _ = pca_chunk(f64(flat[:, part]).transpose(0, 1), 1)
        total = evals.sum(-1, keepdim=True)
        frac = evals[:, :k] / total
        if frac.shape[1] < k:
            frac = torch.cat([frac, frac.new_zeros(frac.shape[0], k - frac.shape[1])], dim=1)
        out[part] = frac.cumsum(-1) if cumulative else frac
    return out


def pca_project(traj: torch.Tensor, k: int = 3, *, max_elements: int = MAX_ELEMENTS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of each trajectory's centered points on its own top-k principal components.

    Returns ``(coords (points, batch, k), fractions (batch, k))``: the projection and each
    component's fraction of the trajectory's variance (non-cumulative).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    flat = check_trajectory(traj)
    t, b, d = flat.shape
    coords = torch.empty(t, b, k, dtype=work_dtype(flat.device), device=flat.device)
    fractions = torch.empty(b, k, dtype=coords.dtype, device=flat.device)
    for part in batch_slices(t, b, max(d, t), max_elements, factor=2):
        evals, c, _ = pca_chunk(f64(flat[:, part]).transpose(0, 1), k)
        coords[:, part] = c.transpose(0, 1)
        frac = evals[:, :k] / evals.sum(-1, keepdim=True)
        if frac.shape[1] < k:
            frac = torch.cat([frac, frac.new_zeros(frac.shape[0], k - frac.shape[1])], dim=1)
        fractions[part] = frac
    return coords, fractions
