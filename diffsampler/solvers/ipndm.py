"""Improved PNDM (iPNDM; Zhang & Chen 2023, DEIS paper): Adams-Bashforth with fixed coefficients.

    x_next = x_i + h_i * sum_j b_j d_{i-j},       h_i = sigma_next - sigma_i

with the constant-step Adams-Bashforth weights b = [1], [3, -1]/2, [23, -16, 5]/12,
[55, -59, 37, -9]/24.  Order ``max_order`` (1-4) on uniform grids; on other grids the weights
ignore the changing step size (see ``ipndm_v`` for the exact variable-step method).
"""
from __future__ import annotations

from dataclasses import dataclass

from .adams import AdamsBashforth
from .registry import register

ADAMS_BASHFORTH_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@register("ipndm")
@dataclass
class IPNDM(AdamsBashforth):
    summary = "improved PNDM: Adams-Bashforth with constant-step weights, orders 1-4"

    def coefficients(self, sigmas, i, order):
        h = sigmas[i + 1] - sigmas[i]
        return [h * b for b in ADAMS_BASHFORTH_WEIGHTS[order]]
