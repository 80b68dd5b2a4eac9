"""iPNDM_v: the exact variable-step Adams-Bashforth method in sigma.

The directions d_i, ..., d_{i-k+1} at sigma_i, ..., sigma_{i-k+1} are interpolated by their Lagrange
polynomial p(sigma) and the step integrates it exactly:

    x_next = x_i + integral_{sigma_i}^{sigma_next} p(sigma) dsigma = x_i + sum_j c_ij d_{i-j}

so a step of order k integrates any direction that is a polynomial of degree < k in sigma
exactly, on any grid.  (A widely used implementation gets the order-3 and order-4 weights wrong;
the tests check exactness on random non-uniform grids.)
"""
from __future__ import annotations

from dataclasses import dataclass

from .adams import AdamsBashforth, lagrange_integrals
from .registry import register


@register("ipndm_v")
@dataclass
class IPNDMVariable(AdamsBashforth):
    summary = "variable-step Adams-Bashforth (exact on polynomials), orders 1-4"

    def coefficients(self, sigmas, i, order):
        return lagrange_integrals(tuple(sigmas[i - j] for j in range(order)), sigmas[i], sigmas[i + 1])
