"""PAS (Wang et al., "Diffusion Sampling Correction via Approximately 10 Parameters", 2024):
corrects each step's direction in a few-vector basis taken from the trajectory itself.

Sampling trajectories lie almost in a low-dimensional subspace, so a step's error is mostly a
combination of the directions already seen.  With v the base solver's effective direction over
step i, ``v = (x_base - x_i) / h``, and an orthonormal basis u_1..u_B per sample of
span{v, x_0, previous effective directions} (QR with v first, so u_1 = v / |v|):

    x_next = x_base + h |v| sum_b c_{i,b} u_b                                    (B = 4 by default)

``c = 0`` is the base solver exactly; B numbers per step are trained against the teacher's state
at the end of every step (``targets="steps"``), on the base grid.

Departures from the paper: PAS takes the basis from a PCA of the trajectory and, in a sequential
"adaptive search", trains and keeps a correction only at the steps where it lowers the loss by a
threshold; here the basis keeps the step's own direction first (so the neutral point is exact for
every base solver), all steps are trained together, and held-out validation seeds decide which
iterate (the neutral one included) is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..solvers import get_solver
from ..solvers.base import Wrapped
from .base import LearnedSampler
from .grid import base_plan, plan_settings
from .registry import register_learned


def trajectory_basis(vectors, size: int) -> torch.Tensor:
    """(batch, size, D) orthonormal rows per sample spanning ``vectors`` (newest first, the step's
    direction first); missing or degenerate directions are zero rows."""
    stack = torch.stack([v.flatten(1) for v in vectors], dim=2)            # (batch, D, m)
    q, r = torch.linalg.qr(stack)                                          # columns in the given order
    keep = (r.diagonal(dim1=1, dim2=2).abs() > 1e-12 * r.diagonal(dim1=1, dim2=2).abs()[:, :1]).to(q.dtype)
    q = q * keep[:, None, :]
    q = q * torch.sign(r.diagonal(dim1=1, dim2=2))[:, None, :]               # u_1 along +v, not -v
    rows = q.transpose(1, 2)[:, :size]
    if rows.shape[1] < size:
        rows = torch.cat([rows, rows.new_zeros(rows.shape[0], size - rows.shape[1], rows.shape[2])], dim=1)
    return rows


@dataclass
class PCACorrected(Wrapped):
    """A base solver's step with its direction corrected in the trajectory's own basis (PAS)."""

    coefficients: Optional[Any] = None       # (steps, basis) tensor

    def init_state(self):
        return self.base.init_state(), None, ()

    def step(self, evaluate, x, i, sigmas, state):
        base_state, start, seen = state
        start = x if start is None else start
        x_base, denoised, base_state = self.base.step(evaluate, x, i, sigmas, base_state)
        h = sigmas[i + 1] - sigmas[i]
        v = (x_base - x) / h
        size = self.coefficients.shape[1]
        basis = trajectory_basis([v, start, *seen][:size], size)              # (batch, size, D)
        c = self.coefficients[i].to(x.dtype)
        scale = v.flatten(1).norm(dim=1)
        correction = (scale[:, None] * (c[None, :, None] * basis).sum(1)).reshape(x.shape)
        x_next = x_base + h * correction
        return x_next, denoised, (base_state, start, (v,) + tuple(seen)[:size - 2])


@register_learned("pas")
class PAS(LearnedSampler):
    summary = "PAS: a per-step correction of the direction in a 4-vector basis of the trajectory (any base solver)"
    targets = "steps"
    default_solver = "auto"
    default_lr = 0.002
    default_iters = 60
    default_train_images = 256

    def __init__(self, settings: dict, basis: int = 4):
        super().__init__(settings)
        self.basis = int(basis)
        steps = len(settings["sigmas"]) - 1
        self.coefficients = nn.Parameter(torch.zeros(steps, self.basis, dtype=torch.float64))

    def config(self):
        return {"basis": self.basis}

    def step_rule(self):
        base = get_solver(self.settings["solver"], **self.settings.get("solver_options", {}))
        return PCACorrected(base=base, coefficients=self.coefficients)

    @classmethod
    def create(cls, model, shape: Sequence[int], *, nfe: Optional[int], solver="ipndm", basis: int = 4, cond=None,
               first_seed=0, dtype=None, device="cpu", **request) -> "PAS":
        if not 1 <= int(basis) <= 8:
            raise ValueError(f"pas: basis must be 1-8 vectors, got {basis}")
        plan = base_plan(model, shape, nfe, solver, **request)
        return cls(plan_settings(plan, shape=list(shape)), basis).to(device)
