"""Shared machinery of the exponential integrators (DPM-Solver++, UniPC) in lambda = -log(sigma).

In the VE form (alpha = 1) the probability-flow ODE in lambda is linear in x,

    dx/dlambda = D(x, sigma) - x,        so over a step of size h = lambda_next - lambda_i
    x_next = (sigma_next / sigma_i) x_i + integral of e^(lambda - lambda_next) D dlambda,

and the methods differ in how they approximate D over the step from the history of model outputs.
The state is the history: a tuple of ``(lambda, denoised)`` pairs, newest first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Solver, check_order


def lam(sigma):
    """lambda = -log(sigma), for a float or a per-sample tensor of sigmas."""
    return -torch.log(sigma) if isinstance(sigma, torch.Tensor) else -math.log(sigma)


def expm1(value):
    """exp(value) - 1 without cancellation, for a float or a tensor."""
    return torch.expm1(value) if isinstance(value, torch.Tensor) else math.expm1(value)


@dataclass
class ExponentialMultistep(Solver):
    max_order: int = 3
    lower_order_final: bool = True

    def __post_init__(self):
        check_order(self.max_order, (1, 2, 3), self.name)

    def init_state(self):
        return ()

    def step_order(self, i: int, num_steps: int, history_len: int) -> int:
        """Warm-up uses the history available; with ``lower_order_final`` the last steps drop the
        order to the number of steps left (more stable at very few steps)."""
        order = min(self.max_order, history_len)
        return min(order, num_steps - i) if self.lower_order_final else order
