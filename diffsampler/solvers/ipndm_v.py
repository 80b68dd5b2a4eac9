"""iPNDM_v: the exact variable-step Adams-Bashforth method in sigma (default), or the weights of
diff-sampler and ComfyUI (``legacy=True``).

Default: the directions d_i, ..., d_{i-k+1} at sigma_i, ..., sigma_{i-k+1} are interpolated by
their Lagrange polynomial p(sigma) and the step integrates it exactly:

    x_next = x_i + integral_{sigma_i}^{sigma_next} p(sigma) dsigma = x_i + sum_j c_ij d_{i-j}

so a step of order k integrates any direction that is a polynomial of degree < k in sigma
exactly, on any grid.

``legacy=True``: the variable-step weights of the ``ipndm_v`` sampler of diff-sampler
(zju-pi/diff-sampler, ``diff-solvers-main/solvers.py``) and of ComfyUI's ``sample_ipndm_v``
(which takes them from there).  With the step sizes

    h = sigma_next - sigma_i,  h1 = sigma_i - sigma_{i-1},  h2 = sigma_{i-1} - sigma_{i-2},
    h3 = sigma_{i-2} - sigma_{i-3}

the step is ``x_next = x_i + h * (w_0 d_i + w_1 d_{i-1} + ...)`` with

    order 1:  w = [1]
    order 2:  w = [1 + h/(2 h1), -h/(2 h1)]                                  (exact)
    order 3:  w = order-2 w + a * [1, -(1 + h1/h2), h1/h2]
              a = 1/2 - h^2 / (6 h1 (h1 + h2))
    order 4:  w = order-3 w + b * [1, -(1 + h1/h2 + q), h1/h2 + q (1 + h2/h3), -q h1/h2]
              q = h1 (h1 + h2) / (h2 (h2 + h3))
              b = h [2 (2h + 3 h1)(h + h1 + h2) + h (h + 2 h1)] / (12 h1 (h1 + h2)(h1 + h2 + h3))

The order-2 weights are the exact ones.  The order-3 ``a`` equals the exact second-difference
weight ``(h^2/3 + h h1/2) / (h1 (h1 + h2))`` only when h = h1 = h2 (uniform steps: the classical
[23, -16, 5]/12); on other grids it differs by O(h/h1 - 1), which keeps order 3 on smoothly
varying grids.  The order-4 weights are [57, -65, 43, -11]/24 on uniform steps (the classical
AB4 is [55, -59, 37, -9]/24), so order 4 is third order there; on non-uniform steps the weights
do not even sum to 1 (the third-difference vector sums to q (h2/h3 - h1/h2)), which costs one
more order on smoothly varying grids (measured order 2 on polynomial grids, see
tests/test_solver_parity.py).  Measured on a 3x32x32 Gaussian mixture, the legacy weights are
nonetheless 1.4-4x more accurate than the exact ones at NFE 5-10 and stay ahead up to NFE ~60
(README, "What the measurements found").  The formulas are written here from their definition
in those sources; the tests re-derive them independently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

from .adams import AdamsBashforth, is_tensor_grid, lagrange_integrals, lagrange_integrals_torch
from .registry import register


def legacy_weights(steps: Sequence[float]) -> List[float]:
    """diff-sampler's / ComfyUI's iPNDM_v weights ``w`` (without the factor ``h``), newest first,
    for ``steps = [h, h1, ...]`` (``len(steps)`` = the order).  Plain arithmetic, so per-sample
    tensor step sizes (AMED) broadcast."""
    order = len(steps)
    h, h1, h2, h3 = list(steps) + [None] * (4 - order)
    w = [1.0]
    if order >= 2:
        r = h / h1
        w = [1 + r / 2, -r / 2]
    if order >= 3:
        a = 0.5 - h * h / (6 * h1 * (h1 + h2))
        w = [w[0] + a, w[1] - a * (1 + h1 / h2), a * h1 / h2]
    if order >= 4:
        q = h1 * (h1 + h2) / (h2 * (h2 + h3))
        b = h * (2 * (2 * h + 3 * h1) * (h + h1 + h2) + h * (h + 2 * h1)) / (12 * h1 * (h1 + h2) * (h1 + h2 + h3))
        w = [w[0] + b, w[1] - b * (1 + h1 / h2 + q), w[2] + b * (h1 / h2 + q * (1 + h2 / h3)), -b * q * h1 / h2]
    return w


@register("ipndm_v")
@dataclass
class IPNDMVariable(AdamsBashforth):
    legacy: bool = True
    summary = ("variable-step Adams-Bashforth, orders 1-4: diff-sampler/ComfyUI's weights (default, measured more "
               "accurate at NFE 3-10); legacy=False: the exact weights")

    @property
    def order(self) -> int:
        # legacy order 4 is third order on uniform grids (the convergence tests' grids) and
        # second order on smoothly varying non-uniform ones; orders 1-3 keep their order.
        return min(self.max_order, 3) if self.legacy else self.max_order

    def coefficients(self, sigmas, i, order):
        if self.legacy:
            steps = [sigmas[i + 1] - sigmas[i]] + [sigmas[i - j] - sigmas[i - j - 1] for j in range(order - 1)]
            return [steps[0] * w for w in legacy_weights(steps)]
        nodes = tuple(sigmas[i - j] for j in range(order))
        if is_tensor_grid(*nodes, sigmas[i + 1]):
            return lagrange_integrals_torch(nodes, sigmas[i], sigmas[i + 1])
        return lagrange_integrals(nodes, sigmas[i], sigmas[i + 1])
