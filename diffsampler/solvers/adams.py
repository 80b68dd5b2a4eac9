"""The Adams-Bashforth family (iPNDM, iPNDM_v, DEIS): one step rule, different coefficients.

Each step evaluates the direction ``d_i = (x_i - D(x_i, sigma_i)) / sigma_i`` and combines it with
the directions of the previous steps (explicit state, newest first):

    x_next = x_i + sum_j c_ij * d_{i-j},      j = 0 .. k-1,   k = min(max_order, i + 1)

The members differ only in ``coefficients``.  Lower orders are used while the history fills up
(warm-up), so the first step is an Euler step.  ``max_order`` counts the directions combined,
which is the method's order of convergence.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch

from .base import Solver, check_order

_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(64)


@dataclass
class AdamsBashforth(Solver):
    max_order: int = 4

    def __post_init__(self):
        check_order(self.max_order, (1, 2, 3, 4), self.name)

    @property
    def order(self) -> int:
        return self.max_order

    def init_state(self):
        return ()

    def coefficients(self, sigmas: Sequence[float], i: int, order: int) -> List[float]:
        """Weights c_ij (step size included) of d_i, d_{i-1}, ..., d_{i-order+1}."""
        raise NotImplementedError

    def step(self, evaluate, x, i, sigmas, state):
        sigma = sigmas[i]
        denoised = evaluate(x, sigma)
        directions = ((x - denoised) / sigma,) + tuple(state)
        order = min(self.max_order, len(directions))
        x_next = x
        for c, d in zip(self.coefficients(sigmas, i, order), directions[:order]):
            x_next = x_next + c * d
        return x_next, denoised, directions[: self.max_order - 1]


def _identity(sigma):
    return sigma


@lru_cache(maxsize=4096)
def lagrange_integrals(nodes: Tuple[float, ...], lo: float, hi: float,
                       variable: Callable[[np.ndarray], np.ndarray] = _identity) -> List[float]:
    """``[integral from lo to hi of l_j(variable(sigma)) dsigma]`` for the Lagrange basis l_j on ``nodes``.

    The basis is built in the variable ``u = variable(sigma)`` (nodes are given in that variable).
    Integration is 64-point Gauss-Legendre in sigma, exact for polynomial integrands up to degree
    127 and accurate to rounding for the smooth VP-time integrands of DEIS.  Cached: a grid's
    weights are computed once, not at every batch.
    """
    sigma = 0.5 * (hi - lo) * _GAUSS_NODES + 0.5 * (hi + lo)
    u = variable(sigma)
    nodes = np.asarray(nodes, dtype=np.float64)
    integrals = []
    for j, node in enumerate(nodes):
        basis = np.ones_like(u)
        for m, other in enumerate(nodes):
            if m != j:
                basis *= (u - other) / (node - other)
        integrals.append(float(0.5 * (hi - lo) * np.dot(_GAUSS_WEIGHTS, basis)))
    return integrals


def lagrange_integrals_torch(nodes, lo, hi, variable=None) -> List:
    """:func:`lagrange_integrals` for tensor grids (a learned grid in training): the same
    Gauss-Legendre rule in torch, differentiable in the nodes and the endpoints, not cached."""
    as_t = lambda v: torch.as_tensor(v, dtype=torch.float64)
    lo, hi = as_t(lo), as_t(hi)
    sigma = 0.5 * (hi - lo) * as_t(_GAUSS_NODES) + 0.5 * (hi + lo)
    u = sigma if variable is None else variable(sigma)
    nodes = [as_t(n) for n in nodes]
    integrals = []
    for j, node in enumerate(nodes):
        basis = torch.ones_like(u)
        for m, other in enumerate(nodes):
            if m != j:
                basis = basis * (u - other) / (node - other)
        integrals.append(0.5 * (hi - lo) * (as_t(_GAUSS_WEIGHTS) * basis).sum())
    return integrals


def is_tensor_grid(*sigmas) -> bool:
    """Whether a step's sigmas are tensors (a differentiable grid) rather than floats."""
    return any(isinstance(s, torch.Tensor) for s in sigmas)
