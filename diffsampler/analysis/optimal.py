"""The optimal denoiser of a finite dataset, mean shift, and comparing two denoisers.

For a dataset ``y_1..y_N`` (the empirical distribution, the kernel density estimate with
bandwidth 0), the optimal denoiser is a softmax-weighted mean of the data:

    D(x, sigma) = sum_n w_n(x) y_n,     w_n proportional to exp(-|x - y_n|^2 / (2 sigma^2)),

which is exactly one mean-shift update with a Gaussian kernel of bandwidth sigma.  Writing
``m(x) = D(x, sigma) - x`` for the mean-shift vector, one Euler step of the probability-flow ODE
from sigma to ``sigma - h`` is

    x_next = x + (sigma_next - sigma) (x - D) / sigma = x + (h / sigma) m(x),

a mean-shift step shortened by ``h / sigma``; the step to sigma = 0 (h = sigma) is a full
mean-shift iteration.  :func:`mean_shift_vector` computes m(x) directly from the data (a kernel
average written out here, independent of :class:`~diffsampler.models.gmm.GaussianMixture`) and
:func:`mean_shift_step` the step above.

:func:`denoiser_gap` evaluates two denoisers (for example a trained network and the optimal
denoiser of its training set) at the same points of a trajectory and returns their distance.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch

from ._tensors import check_trajectory, work_dtype

Bandwidth = Union[float, torch.Tensor]


def _as_matrix(data: torch.Tensor, x: torch.Tensor):
    if data.ndim < 2 or x.ndim < 2 or tuple(data.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"data (N, *shape) and x (B, *shape) must share the sample shape, got "
                         f"{tuple(data.shape)} and {tuple(x.shape)}")
    dtype = work_dtype(x.device)
    return data.reshape(data.shape[0], -1).to(x.device, dtype), x.reshape(x.shape[0], -1).to(dtype)


def _bandwidth(bandwidth: Bandwidth, batch: int, like: torch.Tensor) -> torch.Tensor:
    h = torch.as_tensor(bandwidth, dtype=like.dtype, device=like.device).reshape(-1)
    if h.numel() == 1:
        h = h.expand(batch)
    if h.shape != (batch,) or bool((h <= 0).any()):
        raise ValueError(f"bandwidth must be a positive number or one per sample ({batch})")
    return h


def kernel_weights(data: torch.Tensor, x: torch.Tensor, bandwidth: Bandwidth) -> torch.Tensor:
    """Normalized Gaussian-kernel weights of every data point for every x, shape (B, N)."""
    y, xf = _as_matrix(data, x)
    h = _bandwidth(bandwidth, xf.shape[0], xf)
    sq = torch.cdist(xf, y).square()
    return torch.softmax(-sq / (2 * h[:, None] ** 2), dim=1)


def mean_shift_vector(data: torch.Tensor, x: torch.Tensor, bandwidth: Bandwidth, chunk: int = 1024) -> torch.Tensor:
    """``m(x) = sum_n w_n(x) y_n - x`` with Gaussian-kernel weights of bandwidth ``bandwidth``
    (a number or one per sample); same shape as ``x``, float64 (float32 on MPS)."""
    y, xf = _as_matrix(data, x)
    h = _bandwidth(bandwidth, xf.shape[0], xf)
    out = torch.empty_like(xf)
    for start in range(0, xf.shape[0], chunk):
        part = slice(start, start + chunk)
        w = torch.softmax(-torch.cdist(xf[part], y).square() / (2 * h[part, None] ** 2), dim=1)
        out[part] = w @ y - xf[part]
    return out.reshape(x.shape)


def mean_shift_step(data: torch.Tensor, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """The Euler step of the optimal denoiser's ODE from ``sigma`` to ``sigma_next``, written as a
    mean-shift step: ``x + ((sigma - sigma_next) / sigma) * m(x)`` with bandwidth sigma."""
    if not sigma > 0 or sigma_next < 0:
        raise ValueError(f"need sigma > 0 and sigma_next >= 0, got {sigma} and {sigma_next}")
    m = mean_shift_vector(data, x, sigma)
    return x.to(m.dtype) + (sigma - sigma_next) / sigma * m


@torch.no_grad()
def denoiser_gap(points: torch.Tensor, sigmas, denoiser, reference, *, cond: Optional[Dict[str, Any]] = None,
                 reference_cond: Optional[Dict[str, Any]] = None, batch_size: int = 256, rms: bool = True,
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Distance between two denoisers evaluated at the same points, shape (points, batch).

    Args:
        points: (P, B, *shape) states, e.g. ``trajectories.sampling[:-1]``.
        sigmas: (P,) the noise level of each row of ``points`` (e.g. ``trajectories.sigmas[:-1]``).
        denoiser, reference: ``D(x, sigma, **cond)`` callables.
        cond, reference_cond: conditioning for each (per-sample tensors with the batch first).
        batch_size: samples per model call; rms: divide the L2 distance by sqrt(dim) (per-pixel RMS).
        dtype: dtype the denoisers see (default: that of ``points``).
    """
    flat = check_trajectory(points, "points", min_points=1)
    p, b, d = flat.shape
    sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    if sig.numel() != p:
        raise ValueError(f"need one sigma per row of points ({p}), got {sig.numel()}")
    dtype = points.dtype if dtype is None else dtype
    out = torch.empty(p, b, dtype=work_dtype(points.device), device=points.device)

    def call(fn, x, sigma, c, part):
        kw = {k: (v[part] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == b else v)
              for k, v in (c or {}).items()}
        s = torch.full((x.shape[0],), float(sigma), dtype=dtype, device=x.device)
        return fn(x.to(dtype), s, **kw).to(out.dtype)

    for i in range(p):
        for start in range(0, b, batch_size):
            part = slice(start, min(b, start + batch_size))
            x = points[i, part]
            a = call(denoiser, x, sig[i], cond, part)
            r = call(reference, x, sig[i], reference_cond, part)
            out[i, part] = (a - r).reshape(a.shape[0], -1).norm(dim=-1)
    return out / d ** 0.5 if rms else out
