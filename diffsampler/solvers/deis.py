"""DEIS tAB (Zhang & Chen 2023): Adams-Bashforth in the VP time variable t.

In the VE form the noise prediction is the ODE direction, d = (x - D(x, sigma)) / sigma.  tAB
interpolates d_i, ..., d_{i-k+1} by a polynomial in VP time t (sigma(t)^2 = exp(beta_d t^2/2 +
beta_min t) - 1) and integrates it exactly over the step:

    x_next = x_i + sum_j c_ij d_{i-j},     c_ij = integral_{sigma_i}^{sigma_next} l_j(t(sigma)) dsigma

with l_j the Lagrange basis on t_i, ..., t_{i-k+1}.  The weights come from the actual grid.
``max_order = k`` combines k directions (polynomial degree k - 1, i.e. DEIS "tAB{k-1}");
the default 4 is tAB3, cubic extrapolation through the last 4 directions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedules import vp_time
from .adams import AdamsBashforth, lagrange_integrals
from .registry import register


def _vp_time(sigma):
    return vp_time(torch.as_tensor(sigma, dtype=torch.float64)).numpy()


@register("deis")
@dataclass
class DEIS(AdamsBashforth):
    default_schedule = "time_uniform"
    default_schedule_options = {"rho": 2.0}
    summary = "DEIS tAB: Adams-Bashforth in VP time, orders 1-4 (4 = tAB3)"

    def coefficients(self, sigmas, i, order):
        nodes = tuple(float(_vp_time(sigmas[i - j])) for j in range(order))
        return lagrange_integrals(nodes, sigmas[i], sigmas[i + 1], variable=_vp_time)
