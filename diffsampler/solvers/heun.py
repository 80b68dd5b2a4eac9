"""Heun's second-order method as used by EDM (Karras et al. 2022, Algorithm 1 without churn).

    d = (x - D(x, sigma_i)) / sigma_i,          x' = x + h d,        h = sigma_next - sigma_i
    d' = (x' - D(x', sigma_next)) / sigma_next,  x_next = x + h (d + d') / 2

Second order, two model evaluations per step (the grid never reaches sigma = 0, so every step
is a full Heun step).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Solver
from .registry import register


@register("heun")
@dataclass
class Heun(Solver):
    evals_per_step = 2
    summary = "EDM Heun, second order, 2 evaluations per step"

    @property
    def order(self) -> int:
        return 2

    def step(self, evaluate, x, i, sigmas, state):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = evaluate(x, sigma)
        d = (x - denoised) / sigma
        x_euler = x + (sigma_next - sigma) * d
        d_next = (x_euler - evaluate(x_euler, sigma_next)) / sigma_next
        return x + (sigma_next - sigma) * 0.5 * (d + d_next), denoised, state
