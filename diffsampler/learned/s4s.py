"""S4S (Frankel et al., "S4S: Solving for a Diffusion Model Solver", 2025): a learned grid and
learned per-step solver coefficients, together.

The step rule is the base multistep solver's update plus a learned correction on the directions
it has seen (d_j = (x_j - D(x_j, sigma_j)) / sigma_j, newest first):

    x_next = base_update(x_i) + (sigma_next - sigma_i) * sum_{j < k} c_{i,j} d_{i-j},    k = min(history, i + 1)

so each step learns ``history`` numbers (default 3) besides the grid's one per interval
(:class:`~diffsampler.learned.grid.LearnedGrid`); ``c = 0`` and the base grid are the base solver
exactly.  Trained against the teacher's final sample (the grid moves).

Departure from the paper: S4S learns all coefficients of a generic linear multistep update from
scratch-like initialisations (its "S4S-Alt" alternates between grid and coefficients); here the
coefficients are corrections on top of a known-good multistep solver (iPNDM, DPM-Solver++,
UniPC, ...) and grid and corrections are trained jointly, with held-out seeds choosing the best
iterate, so training starts at the base solver and can only keep what validates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..solvers import get_solver
from ..solvers.base import Wrapped
from .base import LearnedSampler
from .grid import LearnedGrid, base_plan, plan_settings
from .registry import register_learned


@dataclass
class CorrectedMultistep(Wrapped):
    """A one-evaluation solver's step plus ``h * sum_j c[i, j] d_{i-j}`` (the S4S correction)."""

    coefficients: Optional[Any] = None       # (steps, history) tensor

    def init_state(self):
        return self.base.init_state(), ()

    def step(self, evaluate, x, i, sigmas, state):
        base_state, directions = state
        x_next, denoised, base_state = self.base.step(evaluate, x, i, sigmas, base_state)
        k = self.coefficients.shape[1]
        directions = ((x - denoised) / sigmas[i],) + tuple(directions)[:k - 1]
        c = self.coefficients[i].to(x.dtype)
        correction = sum(c[j] * d for j, d in enumerate(directions))
        return x_next + (sigmas[i + 1] - sigmas[i]) * correction, denoised, (base_state, directions)


@register_learned("s4s")
class S4S(LearnedSampler):
    summary = "S4S: a learned grid plus per-step corrections on a multistep solver's directions"
    targets = "endpoint"
    default_solver = "auto"
    accepts = ("euler", "ipndm", "ipndm_v", "deis", "dpmpp", "unipc")
    default_lr = 0.01
    default_iters = 60
    default_train_images = 256

    def __init__(self, settings: dict, history: int = 3):
        super().__init__(settings)
        self.history = int(history)
        steps = len(settings["sigmas"]) - 1
        self.grid_params = LearnedGrid(settings["sigmas"])
        self.coefficients = nn.Parameter(torch.zeros(steps, self.history, dtype=torch.float64))

    def config(self):
        return {"history": self.history}

    def grid(self, differentiable: bool = False):
        return self.grid_params(differentiable)

    def step_rule(self):
        base = get_solver(self.settings["solver"], **self.settings.get("solver_options", {}))
        return CorrectedMultistep(base=base, coefficients=self.coefficients)

    @classmethod
    def create(cls, model, shape: Sequence[int], *, nfe: Optional[int], solver="unipc", history: int = 3, cond=None,
               first_seed=0, dtype=None, device="cpu", **request) -> "S4S":
        plan = base_plan(model, shape, nfe, solver, **request)
        if plan.solver.evals_per_step != 1:
            raise ValueError(f"s4s corrects one-evaluation multistep solvers (euler, ipndm, ipndm_v, deis, dpmpp, "
                             f"unipc), not {plan.solver.name!r}")
        if not 1 <= int(history) <= 4:
            raise ValueError(f"s4s: history must be 1-4 directions, got {history}")
        return cls(plan_settings(plan, shape=list(shape)), history).to(device)
