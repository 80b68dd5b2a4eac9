"""What every solver is: a small dataclass with a ``step`` rule, and the NFE <-> steps mapping.

A solver advances the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` over one
interval ``sigmas[i] -> sigmas[i + 1]`` of a descending grid:

    x_next, denoised, state = solver.step(evaluate, x, i, sigmas, state)

``evaluate(x, sigma) -> denoised`` is the (counted, conditioned) model; ``sigmas`` is a tuple of
Python floats (AMED's learned intermediate points make some entries per-sample tensors of shape
``(batch, 1, ...)``; the solvers it plugs into use only arithmetic that broadcasts); ``denoised`` is the model's estimate at ``(x, sigmas[i])``; ``state`` is whatever
history the method carries from step to step (``None`` for single-step methods).  The state is
explicit: it goes in and comes out, nothing is mutated behind the caller's back.

NFE (number of function evaluations) is what users budget.  It is defined once, here:

    nfe = evals_per_step * num_steps - (1 if afs else 0) + (1 if denoise_to_zero else 0)

AFS (analytical first step) replaces the first model evaluation with a closed-form estimate, and
denoise-to-zero adds one final evaluation at ``sigma_min``.  A grid of ``num_steps`` intervals has
``num_steps + 1`` sigmas.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from ..defaults import DEFAULT_SCHEDULE, DEFAULT_SCHEDULE_OPTIONS

Evaluate = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass
class Solver:
    """Base class of all solvers; subclasses are dataclasses whose fields are the options."""

    name: ClassVar[str] = ""
    evals_per_step: ClassVar[int] = 1
    default_schedule: ClassVar[str] = DEFAULT_SCHEDULE
    default_schedule_options: ClassVar[Dict[str, Any]] = DEFAULT_SCHEDULE_OPTIONS
    summary: ClassVar[str] = ""

    @property
    def order(self) -> int:
        """Nominal global order of convergence with these options."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """How messages name this solver with its options (AMED-Plugin: ``amed-plugin:ipndm``)."""
        return self.name

    def init_state(self) -> Any:
        return None

    def step(self, evaluate: Evaluate, x: torch.Tensor, i: int, sigmas: Sequence[float],
             state: Any) -> Tuple[torch.Tensor, torch.Tensor, Any]:
        raise NotImplementedError

    # --- NFE accounting -------------------------------------------------------------------------

    def num_evals(self, num_steps: int, afs: bool = False, denoise_to_zero: bool = False) -> int:
        """Model evaluations made by ``num_steps`` steps (the documented rule; tests measure it)."""
        return self.evals_per_step * num_steps - int(afs) + int(denoise_to_zero)

    def steps_for_nfe(self, nfe: int, afs: bool = False, denoise_to_zero: bool = False) -> int:
        """Number of steps that spends exactly ``nfe`` evaluations, or a ValueError naming valid values."""
        if isinstance(nfe, bool) or not isinstance(nfe, int):
            raise ValueError(f"nfe must be an integer, got {nfe!r}")
        for steps in range(1, nfe + 3):
            if self.num_evals(steps, afs, denoise_to_zero) == nfe:
                return steps
        valid = self.valid_nfes(afs, denoise_to_zero)
        flags = ", ".join(f for f, on in (("afs", afs), ("denoise_to_zero", denoise_to_zero)) if on)
        hint = ""
        if self.evals_per_step > 1 and not (afs or denoise_to_zero):
            hint = ("; an odd NFE needs the analytical first step (afs=True, --afs) or a final denoising step "
                    "(denoise_to_zero=True, --denoise-to-zero): EDM's 18-step Heun is --nfe 35 --denoise-to-zero")
        raise ValueError(
            f"solver {self.name!r} cannot use nfe={nfe}{' with ' + flags if flags else ''}: it makes "
            f"{self.evals_per_step} model evaluation{'s' if self.evals_per_step > 1 else ''} per step "
            f"({self.nfe_rule()}), so nfe must be one of {', '.join(map(str, valid[:6]))}, ...{hint}")

    def valid_nfes(self, afs: bool = False, denoise_to_zero: bool = False, up_to: int = 40) -> List[int]:
        nfes = (self.num_evals(steps, afs, denoise_to_zero) for steps in range(1, up_to + 1))
        return [n for n in nfes if n >= 1]

    @classmethod
    def nfe_rule(cls) -> str:
        per = "steps" if cls.evals_per_step == 1 else f"{cls.evals_per_step} x steps"
        return f"NFE = {per} - afs + denoise_to_zero"

    @classmethod
    def options(cls) -> List[str]:
        return [f.name for f in fields(cls)]


class Answered:
    """An evaluator whose first call returns an estimate already computed for that (x, sigma):
    lets a wrapper hand a base solver's step the evaluation it has made itself."""

    def __init__(self, evaluate, denoised):
        self.evaluate, self.denoised = evaluate, denoised

    def __call__(self, x, sigma):
        if self.denoised is not None:
            denoised, self.denoised = self.denoised, None
            return denoised
        return self.evaluate(x, sigma)


@dataclass
class Wrapped(Solver):
    """A solver built around a ``base`` solver (learned samplers' step rules): its name, order and
    NFE rule are the base's unless the wrapper says otherwise."""

    base: Optional["Solver"] = None

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def order(self) -> int:
        return self.base.order

    def num_evals(self, num_steps: int, afs: bool = False, denoise_to_zero: bool = False) -> int:
        return self.base.num_evals(num_steps, afs, denoise_to_zero)

    def nfe_rule(self) -> str:
        return self.base.nfe_rule()


def check_order(value: int, allowed: Sequence[int], solver: str) -> None:
    if value not in allowed:
        raise ValueError(f"{solver}: max_order must be one of {list(allowed)}, got {value!r}")
