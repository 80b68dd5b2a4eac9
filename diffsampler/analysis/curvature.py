"""Curvature and torsion of trajectories, from their 3-D principal-component projection.

For a curve r(s) in R^3 (any parameter s):

    kappa = |r' x r''| / |r'|^3,        tau = (r' x r'') . r''' / |r' x r''|^2

(for a helix of radius a and pitch 2 pi c: kappa = a / (a^2 + c^2), tau = c / (a^2 + c^2)).

Derivatives by smoothed finite differences: the curve is parametrized by its cumulative chord
(polygonal arc) length, and at every point a polynomial of degree ``degree`` (default 3, the least
that gives r''') is fitted by least squares to ``window`` consecutive points centred on it (shifted
inwards at the ends; default 7), separately for each coordinate; the derivatives at the point are
those of the fitted polynomial.  ``window = degree + 1`` is plain interpolating finite differences
(no smoothing); larger windows average out step-to-step jitter of a solver at the price of
blurring features narrower than the window.  Points where the curve does not move (zero arc
length across a window) or is locally straight (r' x r'' = 0, torsion undefined) give NaN.

:func:`trajectory_curvature` applies this to the projection of every trajectory on its own top-3
principal components (see :mod:`.pca`), optionally scaled by the chord length so that curvature
is measured in units of 1 / chord and comparable across models and dimensions.  Curvature and
torsion of that projection ignore any bending outside the top-3 subspace; the fraction of the
variance left out is reported by :func:`~diffsampler.analysis.pca.pca_variance`.  The sign of the
torsion follows the components' sign convention (see :mod:`.pca`), which is invariant to
rotations and reflections of the data space; only its magnitude is a property of the curve in
the full space.
"""
from __future__ import annotations

from math import factorial
from typing import Tuple

import torch

from ._tensors import MAX_ELEMENTS, check_trajectory
from .measures import chord_length
from .pca import pca_project


def arc_length(points: torch.Tensor) -> torch.Tensor:
    """Cumulative polygonal length along ``points`` (..., n, dim) -> (..., n), starting at 0."""
    seg = (points[..., 1:, :] - points[..., :-1, :]).norm(dim=-1)
    return torch.cat([seg.new_zeros(seg.shape[:-1] + (1,)), seg.cumsum(-1)], dim=-1)


def curve_derivatives(points: torch.Tensor, param: torch.Tensor, window: int = 7, degree: int = 3,
                      min_span: float = 1e-7):
    """Derivatives of orders 1..degree of a sampled curve by local least-squares polynomial fits.

    Args:
        points: (..., n, dim) samples of the curve.
        param: (..., n) increasing parameter values at the samples (e.g. arc length).
        window: points per local fit (clipped to n); degree: polynomial degree (< window).
        min_span: a window whose parameter range is below ``min_span`` times the whole curve's
            (where the curve stands still, up to rounding) gives NaN instead of rounding noise.

    Returns:
        (..., degree, n, dim): ``out[..., j]`` is the (j+1)-th derivative at every sample; NaN
        where a window holds fewer than degree + 1 distinct parameter values or spans too little.
    """
    n = points.shape[-2]
    window = min(int(window), n)
    if degree < 1 or degree >= window:
        raise ValueError(f"need 1 <= degree < window <= points; got degree={degree}, window={window}, points={n}")
    first = (torch.arange(n, device=points.device) - window // 2).clamp(0, n - window)
    idx = first[:, None] + torch.arange(window, device=points.device)[None, :]            # (n, w)
    offsets = param[..., idx] - param[..., :, None]                                         # (..., n, w)
    scale = offsets.abs().amax(-1, keepdim=True)                                            # (..., n, 1)
    u = offsets / scale
    powers = torch.arange(degree + 1, device=points.device, dtype=points.dtype)
    vander = u[..., None] ** powers                                                         # (..., n, w, p)
    values = points[..., idx, :] - points[..., :, None, :]                                  # (..., n, w, dim), centred
    # least squares through QR (no squared condition number); singular windows are masked below
    q, r = torch.linalg.qr(vander)                                                          # (..., n, w, p), (..., n, p, p)
    coef = torch.linalg.solve_triangular(r, q.transpose(-1, -2) @ values, upper=True)       # (..., n, p, dim)
    # a fit needs degree + 1 distinct parameter values in its window (the curve may stand still)
    distinct = 1 + (u.diff(dim=-1).abs() > 1e-9).sum(-1)                                    # (..., n)
    total = (param[..., -1] - param[..., 0]).abs()[..., None]                               # (..., 1)
    bad = (distinct <= degree) | ~torch.isfinite(scale[..., 0]) | ~(scale[..., 0] > min_span * total)
    coef = torch.where(bad[..., None, None], torch.full_like(coef, float("nan")), coef)
    derivs = [coef[..., j, :] * factorial(j) / scale ** j for j in range(1, degree + 1)]    # (..., n, dim)
    return torch.stack(derivs, dim=-3)


def curvature_torsion(points: torch.Tensor, param: torch.Tensor = None, *, window: int = 7,
                      degree: int = 3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Curvature and (signed) torsion of 3-D curves ``points`` (..., n, 3) -> two (..., n) tensors.

    ``param`` defaults to the cumulative arc length; see the module docstring for the smoothing.
    """
    if points.shape[-1] != 3:
        raise ValueError(f"curvature_torsion needs 3-D points (..., n, 3), got shape {tuple(points.shape)}")
    if points.shape[-2] < 4:
        raise ValueError(f"need at least 4 points along a curve for torsion, got {points.shape[-2]}")
    dtype = torch.float32 if points.device.type == "mps" else torch.float64
    points = points.to(dtype)
    param = arc_length(points) if param is None else param.to(dtype)
    with torch.no_grad():
        d = curve_derivatives(points, param, window=window, degree=max(3, degree))
    r1, r2, r3 = d[..., 0, :, :], d[..., 1, :, :], d[..., 2, :, :]
    cross = torch.linalg.cross(r1, r2, dim=-1)
    cross_norm = cross.norm(dim=-1)
    kappa = cross_norm / r1.norm(dim=-1) ** 3
    tau = (cross * r3).sum(-1) / cross_norm ** 2
    return kappa, tau


def trajectory_curvature(traj: torch.Tensor, *, normalize: bool = True, window: int = 7, degree: int = 3,
                         max_elements: int = MAX_ELEMENTS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Curvature and torsion along each trajectory's 3-D PCA projection, two (points, batch) tensors.

    ``normalize=True`` divides the projection by the trajectory's chord length first, so that
    curvature and torsion are in units of 1 / chord (dimensionless shape measures); with
    ``normalize=False`` they are in the data's units.
    """
    flat = check_trajectory(traj, min_points=4)
    coords, _ = pca_project(flat, 3, max_elements=max_elements)                # (points, batch, 3)
    if normalize:
        coords = coords / chord_length(flat)[None, :, None]
    kappa, tau = curvature_torsion(coords.transpose(0, 1), window=window, degree=degree)
    return kappa.transpose(0, 1), tau.transpose(0, 1)
