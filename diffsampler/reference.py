"""Reference ODE solutions: adaptive high-order integration to a tolerance, for ground truth.

Integrates the probability-flow ODE in u = log(sigma), where it reads dx/du = x - D(x, e^u), with
SciPy's DOP853 (8th-order Dormand-Prince, adaptive) in float64.  The whole batch is one system, so
the step size adapts to the hardest sample.  Slow but exact to the tolerance: use it for
endpoints and trajectories the solvers are measured against.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from scipy.integrate import solve_ivp


def solve_ode(denoiser, x: torch.Tensor, sigma_from: float, sigma_to: float, *, tol: float = 1e-9,
              cond: Optional[Dict[str, Any]] = None, sigmas_out: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Solve from ``x`` at ``sigma_from`` to ``sigma_to``; returns x at ``sigma_to`` (float64), or at every
    sigma of ``sigmas_out`` (stacked on a new first dim) when given."""
    cond = dict(cond or {})
    shape, device = x.shape, x.device
    batch = shape[0]

    def rhs(u, flat):
        xt = torch.from_numpy(flat).to(device).reshape(shape)
        sigma = torch.full((batch,), math.exp(u), dtype=torch.float64, device=device)
        return (xt - denoiser(xt, sigma, **cond).to(torch.float64)).reshape(-1).cpu().numpy()

    t_eval = None if sigmas_out is None else np.log(np.asarray(sigmas_out, dtype=np.float64))
    solution = solve_ivp(rhs, (math.log(sigma_from), math.log(sigma_to)),
                         x.to(torch.float64).reshape(-1).cpu().numpy(), method="DOP853",
                         rtol=tol, atol=tol, t_eval=t_eval)
    if not solution.success:
        raise RuntimeError(f"reference ODE solve failed: {solution.message}")
    if sigmas_out is None:
        return torch.from_numpy(solution.y[:, -1]).reshape(shape).to(device)
    return torch.from_numpy(solution.y.T.copy()).reshape(len(t_eval), *shape).to(device)
