"""DEIS tAB (Zhang & Chen 2023): Adams-Bashforth in the VP time variable t.

In the VE form the noise prediction is the ODE direction, d = (x - D(x, sigma)) / sigma.  tAB
interpolates d_i, ..., d_{i-k+1} by a polynomial in VP time t (sigma(t)^2 = exp(beta_d t^2/2 +
beta_min t) - 1) and integrates it exactly over the step:

    x_next = x_i + sum_j c_ij d_{i-j},     c_ij = integral_{sigma_i}^{sigma_next} l_j(t(sigma)) dsigma

with l_j the Lagrange basis on t_i, ..., t_{i-k+1}.  The weights come from the actual grid.
``max_order = k`` combines k directions (polynomial degree k - 1, i.e. DEIS "tAB{k-1}");
the default 4 is tAB3, cubic extrapolation through the last 4 directions.

The two variants differ only in the time map t(sigma), i.e. in the (beta_d, beta_min) above:

- ``variant="vp"`` (default): the standard VP SDE of DEIS and DPM-Solver, beta_min = 0.1,
  beta_d = 19.9 (``diffsampler.schedules.vp_time``, the time of the ``time_uniform`` schedule).
- ``variant="diff-sampler"``: the time map of diff-sampler's ``deis_tab`` (zju-pi/diff-sampler,
  ``get_deis_coeff_list``, also ComfyUI's ``deis`` sampler): the VP schedule refitted so that
  t = 1 is sigma = 80 and t = 1e-3 is sigma = 0.002 (whatever the model's range), which gives
  beta_d = 2 (log(1 + 0.002^2)/1e-3 - log(1 + 80^2)) / (1e-3 - 1) = 17.538 and
  beta_min = log(1 + 80^2) - beta_d/2 = -0.00477.  With beta_min ~ 0 this t is nearly
  proportional to sigma at small sigma, where the default t grows like 10 sigma^2 (below
  sigma ~ 0.02): the two differ most over the last steps.  They write the
  same integral in t, integral l_j(t) (dsigma/dt) dt with dsigma/dt = -1/2 (d log alpha/dt) /
  sqrt(alpha (1 - alpha)), alpha = 1/(1 + sigma^2); this is the same number.

Measured on the same grids (5-10 steps, 0.002-80) the two variants' weights differ by up to 3%
(time_uniform rho=1), 9% (rho=2) and 6% (polynomial rho=7) of the step size.  diff-sampler
evaluates its integral by a 10,000-point rectangle sum in t (both endpoints included, times
(t_next - t_i)/10,000), which is off the exact integral by up to 8e-5 of the step in float64 and
up to ~1e-3 in float32 (how their samplers run); this variant integrates exactly (64-point
Gauss-Legendre in sigma), so it matches their formula to rounding and their numbers to their
quadrature error (tests/test_solver_parity.py).  On a 3x32x32 Gaussian mixture (64 seeds, tAB3,
NFE 5-10) the diff-sampler time map gives 1-8% smaller endpoint errors on time_uniform rho=2
grids, 0.3-0.6% larger ones on rho=1, and within 2% on polynomial grids.  Their time-uniform grid
is ``time_uniform`` with ``beta_d=DIFF_SAMPLER_BETA_D, beta_min=DIFF_SAMPLER_BETA_MIN``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..schedules import vp_time
from .adams import AdamsBashforth, is_tensor_grid, lagrange_integrals, lagrange_integrals_torch
from .registry import register

# diff-sampler's VP time: t(0.002) = 1e-3 and t(80) = 1.
_EPS_T, _SIGMA_LO, _SIGMA_HI = 1e-3, 0.002, 80.0
DIFF_SAMPLER_BETA_D = 2 * (math.log1p(_SIGMA_LO ** 2) / _EPS_T - math.log1p(_SIGMA_HI ** 2)) / (_EPS_T - 1)
DIFF_SAMPLER_BETA_MIN = math.log1p(_SIGMA_HI ** 2) - 0.5 * DIFF_SAMPLER_BETA_D


def _vp_time(sigma):
    return vp_time(torch.as_tensor(sigma, dtype=torch.float64)).numpy()


def _diff_sampler_time(sigma):
    sigma = np.asarray(sigma, dtype=np.float64)
    b, b0 = DIFF_SAMPLER_BETA_D, DIFF_SAMPLER_BETA_MIN
    return (np.sqrt(b0 ** 2 + 2 * b * np.log1p(sigma ** 2)) - b0) / b


_TIME = {"vp": _vp_time, "diff-sampler": _diff_sampler_time}
# The same maps in torch, for differentiable (learned) grids.
_TIME_TORCH = {"vp": vp_time,
               "diff-sampler": lambda s: vp_time(s, DIFF_SAMPLER_BETA_D, DIFF_SAMPLER_BETA_MIN)}


@register("deis")
@dataclass
class DEIS(AdamsBashforth):
    variant: str = "vp"
    summary = "DEIS tAB: Adams-Bashforth in VP time, orders 1-4 (4 = tAB3); variant='diff-sampler': their time map"

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in _TIME:
            raise ValueError(f"deis: variant must be one of {', '.join(map(repr, _TIME))}, got {self.variant!r}")

    def coefficients(self, sigmas, i, order):
        if is_tensor_grid(*(sigmas[i - j] for j in range(order)), sigmas[i + 1]):
            time = _TIME_TORCH[self.variant]
            nodes = tuple(time(torch.as_tensor(sigmas[i - j], dtype=torch.float64)) for j in range(order))
            return lagrange_integrals_torch(nodes, sigmas[i], sigmas[i + 1], variable=time)
        time = _TIME[self.variant]
        nodes = tuple(float(time(sigmas[i - j])) for j in range(order))
        return lagrange_integrals(nodes, sigmas[i], sigmas[i + 1], variable=time)
