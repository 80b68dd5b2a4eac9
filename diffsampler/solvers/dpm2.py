"""DPM-Solver-2 (Lu et al. 2022, noise prediction, single step) in the VE form.

The intermediate point sits at fraction ``r`` of the step in lambda = -log(sigma):

    sigma_mid = sigma_i^(1 - r) * sigma_next^r,     x_mid = x + (sigma_mid - sigma_i) d
    x_next = x + (sigma_next - sigma_i) * ((1 - 1/(2r)) d + 1/(2r) d_mid)

with ``d = (x - D(x, sigma)) / sigma`` (the noise prediction).  Second order, two model
evaluations per step; r = 0.5 is the midpoint method in log-sigma.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Solver
from .registry import register


@register("dpm2")
@dataclass
class DPM2(Solver):
    r: float = 0.5
    evals_per_step = 2
    summary = "DPM-Solver-2, second order, 2 evaluations per step"

    def __post_init__(self):
        if not 0 < self.r <= 1:
            raise ValueError(f"dpm2: r must lie in (0, 1], got {self.r}")

    @property
    def order(self) -> int:
        return 2

    def step(self, evaluate, x, i, sigmas, state):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_mid = sigma ** (1 - self.r) * sigma_next ** self.r
        denoised = evaluate(x, sigma)
        d = (x - denoised) / sigma
        x_mid = x + (sigma_mid - sigma) * d
        d_mid = (x_mid - evaluate(x_mid, sigma_mid)) / sigma_mid
        weight = 1 / (2 * self.r)
        return x + (sigma_next - sigma) * ((1 - weight) * d + weight * d_mid), denoised, state
