"""LD3 (Tong et al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025): a learned grid.

Only the time steps are trained (:class:`~diffsampler.learned.grid.LearnedGrid`: one number per
interval, the endpoints fixed); the solver is any registered one, unchanged.  The loss compares the
student's final sample with the teacher's (``targets="endpoint"``: the grid moves, so there are no
fixed intermediate times to compare at).

Departure from the paper: LD3 relaxes the endpoint match by letting the student start from a
slightly perturbed noise within a small ball (a slack variable per training sample) and scores
with LPIPS; here the start is the training noise itself and the loss is the per-sample Euclidean
distance (no learned perceptual network exists offline for arbitrary models), and held-out
validation seeds pick the best iterate, which is what keeps a small training set from overfitting.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..solvers import get_solver
from .base import LearnedSampler
from .grid import LearnedGrid, base_plan, plan_settings
from .registry import register_learned


@register_learned("ld3")
class LD3(LearnedSampler):
    summary = "LD3: a learned grid (time steps) for any registered solver"
    targets = "endpoint"
    default_solver = "auto"
    default_lr = 0.05
    default_iters = 60
    default_train_images = 256

    def __init__(self, settings: dict):
        super().__init__(settings)
        self.grid_params = LearnedGrid(settings["sigmas"])

    def grid(self, differentiable: bool = False):
        return self.grid_params(differentiable)

    def step_rule(self):
        return get_solver(self.settings["solver"], **self.settings.get("solver_options", {}))

    @classmethod
    def create(cls, model, shape: Sequence[int], *, nfe: Optional[int], solver="unipc", cond=None, first_seed=0,
               dtype=None, device="cpu", **request) -> "LD3":
        plan = base_plan(model, shape, nfe, solver, **request)
        return cls(plan_settings(plan, shape=list(shape))).to(device)
