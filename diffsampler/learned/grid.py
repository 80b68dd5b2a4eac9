"""What the learned samplers share: a request resolved into a base plan, the settings a file
records of it, and a learnable grid.

**Learned grid** (LD3, S4S).  The interior points of the base grid move, the endpoints stay.  With
``l_k = log sigma_k`` and the base increments ``delta_k = l_k - l_{k+1} > 0``,

    l_k(theta) = l_0 - (l_0 - l_K) * sum_{m < k} softmax(log delta + theta)_m

so the grid is strictly decreasing for every ``theta`` and ``theta = 0`` is the base grid (returned
as the base floats themselves, so neutral parameters reproduce the base solver exactly).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..plan import Plan, make_plan


def base_plan(model, shape: Sequence[int], nfe: Optional[int], solver, *, schedule=None,
              schedule_options: Optional[dict] = None, afs: Optional[bool] = None, sigma_min: Optional[float] = None,
              sigma_max: Optional[float] = None, **solver_options) -> Plan:
    """The untrained plan a learned sampler starts from (the same rules as ``sample()``)."""
    return make_plan(solver, nfe, schedule, schedule_options=schedule_options, afs=afs, sigma_min=sigma_min,
                     sigma_max=sigma_max, model=model, shape=shape, **solver_options)


def plan_settings(plan: Plan, **extra) -> Dict[str, Any]:
    """What a learned-sampler file records of its base plan."""
    solver = dict(plan.record["solver"])
    name = solver.pop("name")
    return {"solver": name, "solver_options": solver, "nfe": plan.nfe, "afs": plan.afs,
            "sigmas": list(plan.sigmas), "schedule": plan.record["schedule"], **extra}


class LearnedGrid(nn.Module):
    """A grid whose interior points are trained (see the module docstring)."""

    def __init__(self, sigmas: Sequence[float]):
        super().__init__()
        self.base = tuple(float(s) for s in sigmas)
        self.offsets = nn.Parameter(torch.zeros(len(self.base) - 1, dtype=torch.float64))

    def forward(self, differentiable: bool = False) -> Tuple[Any, ...]:
        if not differentiable and not bool(self.offsets.detach().any()):
            return self.base
        logs = torch.tensor(self.base, dtype=torch.float64, device=self.offsets.device).log()
        increments = logs[:-1] - logs[1:]
        weights = torch.softmax(increments.log() + self.offsets, dim=0)
        inner = (logs[0] - (logs[0] - logs[-1]) * torch.cumsum(weights, 0)[:-1]).exp()
        if not differentiable:
            return (self.base[0], *[float(s) for s in inner.detach()], self.base[-1])
        return (torch.tensor(self.base[0], dtype=torch.float64), *inner,
                torch.tensor(self.base[-1], dtype=torch.float64))
