"""DPM-Solver-2 (Lu et al. 2022, noise prediction, single step) in the VE form.

The intermediate point sits at fraction ``r`` of the step in lambda = -log(sigma):

    sigma_mid = sigma_i^(1 - r) * sigma_next^r,     x_mid = x + (sigma_mid - sigma_i) d
    x_next = x + (sigma_next - sigma_i) * ((1 - 1/(2r)) d + 1/(2r) d_mid)

with ``d = (x - D(x, sigma)) / sigma`` (the noise prediction).  Second order, two model
evaluations per step; r = 0.5 is the midpoint method in log-sigma.  :func:`midpoint_step` is
the update itself, shared with AMED (which learns ``r`` and weights ``d_mid`` alone).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Solver
from .registry import register


def midpoint_step(evaluate, x, d, sigma, sigma_next, r, mid_weight, scale_dir=1.0, scale_time=1.0):
    """One two-stage step: Euler to ``sigma_mid = sigma^(1-r) sigma_next^r``, evaluate there (the
    model sees ``scale_time * sigma_mid``), then ``x + scale_dir (sigma_next - sigma) ((1-w) d + w d_mid)``
    with ``w = mid_weight``.  ``r`` and the scales may be floats or per-sample tensors."""
    sigma_mid = sigma ** (1 - r) * sigma_next ** r
    x_mid = x + (sigma_mid - sigma) * d
    d_mid = (x_mid - evaluate(x_mid, sigma_mid * scale_time)) / sigma_mid
    return x + scale_dir * (sigma_next - sigma) * ((1 - mid_weight) * d + mid_weight * d_mid)


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
        denoised = evaluate(x, sigma)
        d = (x - denoised) / sigma
        return midpoint_step(evaluate, x, d, sigma, sigma_next, self.r, 1 / (2 * self.r)), denoised, state
