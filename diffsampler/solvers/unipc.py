"""UniPC (Zhao et al. 2023): unified predictor-corrector, data prediction, orders 1-3, VE form.

With h = lambda_next - lambda_i, the history ratios r_k = (lambda_{i-k} - lambda_i) / h and scaled
differences D1_k = (D_{i-k} - D_i) / r_k (k = 1 .. p-1):

    base      = (sigma_next / sigma_i) x_i - expm1(-h) D_i
    predictor: x_pred = base - B(h) * sum_k rho^p_k D1_k                         (UniP-p)
    corrector: x_next = base - B(h) * (sum_k rho^c_k D1_k + rho^c_p (D(x_pred) - D_i))   (UniC)

B(h) = -h ("bh1") or expm1(-h) ("bh2"); the rho solve the order conditions R rho = b built from the
phi-functions of -h (rho^p = 1/2 at order 2, rho^c = 1/2 at order 1).  The model output at x_pred,
which the corrector needs, is reused as the next step's D_i, so the cost stays one evaluation per
step; the last step is not corrected (its evaluation would be wasted).  ``max_order`` is the
predictor order p; with the corrector the method converges with order p + 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .exponential import ExponentialMultistep, expm1, lam
from .registry import register


@register("unipc")
@dataclass
class UniPC(ExponentialMultistep):
    variant: str = "bh2"
    corrector: bool = True
    summary = "UniPC predictor-corrector (bh1/bh2), predictor orders 1-3, +1 with the corrector"

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in ("bh1", "bh2"):
            raise ValueError(f"unipc: variant must be 'bh1' or 'bh2', got {self.variant!r}")

    @property
    def order(self) -> int:
        return self.max_order + int(self.corrector)

    def init_state(self):
        return (), None

    def step(self, evaluate, x, i, sigmas, state):
        history, denoised = state
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if denoised is None:
            denoised = evaluate(x, sigma)
        history = ((lam(sigma), denoised),) + tuple(history)
        num_steps = len(sigmas) - 1
        order = self.step_order(i, num_steps, len(history))
        h = lam(sigma_next) - lam(sigma)

        ratios = [(lam_k - history[0][0]) / h for lam_k, _ in history[1:order]]
        diffs = [(d_k - denoised) / r for (_, d_k), r in zip(history[1:order], ratios)]
        b_h = -h if self.variant == "bh1" else expm1(-h)
        rhs_matrix, rhs = self._order_conditions(ratios, -h, b_h)
        base = (sigma_next / sigma) * x - expm1(-h) * denoised

        x_next = base
        if order >= 2:
            rho_p = [0.5] if order == 2 else _solve(rhs_matrix[:-1, :-1], rhs[:-1])
            x_next = base - b_h * _combine(rho_p, diffs)
        kept = history[: self.max_order - 1]
        if not self.corrector or i == num_steps - 1:
            return x_next, denoised, (kept, None)

        denoised_next = evaluate(x_next, sigma_next)
        rho_c = [0.5] if order == 1 else _solve(rhs_matrix, rhs)
        correction = rho_c[-1] * (denoised_next - denoised)
        if order >= 2:
            correction = correction + _combine(rho_c[:-1], diffs)
        return base - b_h * correction, denoised, (kept, denoised_next)

    @staticmethod
    def _order_conditions(ratios, hh, b_h):
        """The linear system R rho = b of UniPC's order conditions for the nodes r = ratios + [1]:
        R[k] = r^k and b[k] = k! * h*phi_{k+1}(hh) / B(h), k = 0 .. p-1, where hh = -h and the
        phi-functions follow the recursion phi_{k+1}(hh) = (phi_k(hh) - 1/k!) / hh.  Numpy for a
        float grid; torch (differentiable) when the grid holds tensors (a learned grid in training)."""
        rhs, factorial, h_phi = [], 1.0, expm1(hh) / hh - 1
        for k in range(1, len(ratios) + 2):
            rhs.append(h_phi * factorial / b_h)
            factorial *= k + 1
            h_phi = h_phi / hh - 1 / factorial
        if not isinstance(hh, torch.Tensor):
            nodes = np.array(list(ratios) + [1.0])
            return np.stack([nodes ** k for k in range(len(nodes))]), np.array(rhs)
        nodes = torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in list(ratios) + [1.0]])
        return torch.stack([nodes ** k for k in range(len(nodes))]), torch.stack(rhs)


def _solve(matrix, rhs):
    return torch.linalg.solve(matrix, rhs) if isinstance(matrix, torch.Tensor) else np.linalg.solve(matrix, rhs)


def _combine(weights, tensors):
    scalar = (lambda w: w) if isinstance(weights, torch.Tensor) else float
    out = scalar(weights[0]) * tensors[0]
    for w, t in zip(weights[1:], tensors[1:]):
        out = out + scalar(w) * t
    return out
