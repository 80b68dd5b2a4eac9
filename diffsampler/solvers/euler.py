"""Euler's method on the probability-flow ODE, i.e. DDIM (Song et al. 2021) in the VE form.

    d = (x - D(x, sigma_i)) / sigma_i,      x_next = x + (sigma_next - sigma_i) * d

First order, one model evaluation per step.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Solver
from .registry import register


@register("euler")
@dataclass
class Euler(Solver):
    summary = "Euler / DDIM, first order"

    @property
    def order(self) -> int:
        return 1

    def step(self, evaluate, x, i, sigmas, state):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = evaluate(x, sigma)
        return x + (sigma_next - sigma) / sigma * (x - denoised), denoised, state
