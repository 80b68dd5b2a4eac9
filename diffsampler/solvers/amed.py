"""AMED (Zhou et al., "Fast ODE-based Sampling for Diffusion Models in Around 5 Steps", CVPR 2024).

Sampling trajectories lie almost in a plane, so the mean direction over a step is well
approximated by the direction at one intermediate time.  A tiny predictor (the learned sampler
:mod:`diffsampler.learned.amed`) reads the bottleneck feature of the evaluation at ``sigma_i`` and
the two times, and returns ``r`` in (0, 1) and optional scales ``s_dir``, ``s_time`` in [1 - c, 1 + c]:

    sigma_mid = sigma_i^(1 - r) * sigma_next^r          (per sample)

* **AMED-Solver** (``base=None``): Euler to sigma_mid, evaluate there (the model sees
  ``s_time * sigma_mid``), then the whole step along that direction:
  ``x_next = x + s_dir (sigma_next - sigma_i) d_mid``.
* **AMED-Plugin** (``base=`` a solver): the learned points are given to an existing solver,
  which keeps its own update rule.  A two-stage solver (``dpm2``) takes ``r`` as its own
  intermediate fraction; a one-evaluation solver (``euler``, ``ipndm``, ``dpmpp``) steps
  ``sigma_i -> sigma_mid -> sigma_next`` on the interleaved grid, its own history included, and the
  second sub-step's increment is multiplied by ``s_dir``.

Both make two model evaluations per step (``NFE = 2 steps - afs``: 3 steps with AFS are NFE 5).
``plain_first=True`` is the other way to an odd NFE: step 0 is the base update with its single
evaluation at ``sigma_0`` and no intermediate point (Euler for AMED-Solver and dpm2), so
``NFE = 2 steps - 1 - afs``.  Both drop one of step 0's two evaluations; AFS drops the one at
``sigma_0`` and replaces it with the zero-mean guess ``denoised = 0`` (paper), ``plain_first``
drops the intermediate one.  The guess is good for data centred at 0 (CIFAR-10 in [-1, 1]) and poor
when the data mean is far from it (the bundled Fashion-MNIST model: mean image -0.44).
Here, without a predictor, ``r`` is the fixed option ``r`` and no scale is applied: with r = 0.5
the AMED-Solver is exactly ``dpm2`` (the midpoint method in log sigma), and a plugin is its base on
the grid with geometric midpoints inserted.  The learned sampler overrides :meth:`AMED.intermediate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .base import Answered, Solver
from .dpm2 import midpoint_step
from .registry import get_solver, register

PLUGIN_BASES = ("euler", "ipndm", "dpmpp", "dpm2")
# The plugin bases as AMED was built and measured with (DPM-Solver++ with its exact third-order
# weight, the default then), so predictor files keep sampling as they were trained.
PLUGIN_OPTIONS = {"dpmpp": {"legacy_third_order": False}}


def _time_scaled(evaluate, scale_time):
    return evaluate if isinstance(scale_time, float) and scale_time == 1.0 else \
        (lambda x, sigma: evaluate(x, sigma * scale_time))


@register("amed")
@dataclass
class AMED(Solver):
    r: float = 0.5
    base: Optional[Union[str, Solver]] = None
    plain_first: bool = False
    evals_per_step = 2
    default_schedule, default_schedule_options = "polynomial", {}    # AMED's, as trained and measured
    summary = "AMED-Solver / AMED-Plugin (learned intermediate time; r=0.5 without a predictor)"

    def __post_init__(self):
        if not 0 < self.r < 1:
            raise ValueError(f"amed: r must lie in (0, 1), got {self.r}")
        if isinstance(self.base, str):
            if self.base not in PLUGIN_BASES:
                raise ValueError(f"amed: base solver must be one of {', '.join(PLUGIN_BASES)} (or none for "
                                 f"AMED-Solver), got {self.base!r}")
            self.base = get_solver(self.base, **PLUGIN_OPTIONS.get(self.base, {}))
        if self.base is not None and self.base.name not in PLUGIN_BASES:
            raise ValueError(f"amed: base solver must be one of {', '.join(PLUGIN_BASES)}, got {self.base.name!r}")

    def num_evals(self, num_steps: int, afs: bool = False, denoise_to_zero: bool = False) -> int:
        return super().num_evals(num_steps, afs, denoise_to_zero) - int(self.plain_first)

    @classmethod
    def nfe_rule(cls) -> str:
        return "NFE = 2 x steps - afs - plain_first + denoise_to_zero"

    @property
    def label(self) -> str:
        return "amed" if self.base is None else f"amed-plugin:{self.base.name}"

    @property
    def order(self) -> int:
        return 2 if self.base is None or self.base.evals_per_step == 2 else self.base.order

    @property
    def interleaves(self) -> bool:
        return self.base is not None and self.base.evals_per_step == 1

    def init_state(self):
        return (self.base.init_state(), None) if self.interleaves else None

    def intermediate(self, evaluate, x, denoised, sigma, sigma_next):
        """``(r, s_dir, s_time)`` of a step from ``(x, sigma)`` (``denoised``: the model's estimate
        there, just made by ``evaluate``): the fixed ``r`` and no scales here; the learned sampler
        returns per-sample (batch, 1, ...) tensors from its predictor."""
        return self.r, 1.0, 1.0

    def step(self, evaluate, x, i, sigmas, state):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        plain = self.plain_first and i == 0
        if not self.interleaves:
            denoised = evaluate(x, sigma)
            d = (x - denoised) / sigma
            if plain:
                return x + (sigma_next - sigma) * d, denoised, state
            r, scale_dir, scale_time = self.intermediate(evaluate, x, denoised, sigma, sigma_next)
            mid_weight = 1.0 if self.base is None else 1 / (2 * r)
            x_next = midpoint_step(evaluate, x, d, sigma, sigma_next, r, mid_weight, scale_dir, scale_time)
            return x_next, denoised, state
        base_state, fine = state
        if fine is None:            # the interleaved grid, geometric midpoints until predicted
            fine = [s for k, (a, b) in enumerate(zip(sigmas[:-1], sigmas[1:]))
                    for s in ((a,) if self.plain_first and k == 0 else (a, (a * b) ** 0.5))] + [sigmas[-1]]
        at = 2 * i - int(self.plain_first)          # position of sigma_i on the interleaved grid
        if plain:
            x_next, denoised, base_state = self.base.step(evaluate, x, 0, tuple(fine), base_state)
            return x_next, denoised, (base_state, fine)
        denoised = evaluate(x, sigma)
        r, scale_dir, scale_time = self.intermediate(evaluate, x, denoised, sigma, sigma_next)
        fine = fine[:at + 1] + [sigma ** (1 - r) * sigma_next ** r] + fine[at + 2:]
        grid = tuple(fine)
        x_mid, _, base_state = self.base.step(Answered(evaluate, denoised), x, at, grid, base_state)
        x_base, _, base_state = self.base.step(_time_scaled(evaluate, scale_time), x_mid, at + 1, grid, base_state)
        x_next = x_base if isinstance(scale_dir, float) and scale_dir == 1.0 else x_mid + scale_dir * (x_base - x_mid)
        return x_next, denoised, (base_state, fine)
