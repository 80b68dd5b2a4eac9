"""The one sampling loop: :func:`integrate` walks a :class:`~diffsampler.plan.Plan`'s grid with its solver.

:func:`run_plan` is one whole run (noise in, samples and the measured NFE out); ``sample()``
(:mod:`diffsampler.sampling`) resolves a request into a plan and calls it.  The loop
owns everything solvers should not care about: scaling the noise by the first sigma, conditioning
and dtypes (through the :class:`Evaluator`), NFE counting (measured at the model), the analytical
first step, the optional final denoising, callbacks and progress.

The same loop serves inference (``sample()`` runs it under ``torch.no_grad()``), teachers, and
learned samplers in training (``grad=True``; ``truncate=True`` detaches the state between steps
so each step's loss back-propagates through that step only).  Numbers: the solver arithmetic runs
in float64 where the device has it (float32 on Apple MPS); the model sees ``noise.dtype``.
Non-finite model outputs are flagged on the device without a host sync per step and reported
after the loop, naming the first bad step and its sigma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .models.base import check_sample_shape, per_sample_sigma, work_dtype
from .models.features import FeatureTap
from .plan import Plan


@dataclass
class SampleResult:
    """What ``sample`` returns, whatever the options."""

    samples: torch.Tensor      # same shape, dtype and device as the noise
    nfe: int                   # model evaluations actually made
    sigmas: torch.Tensor       # the grid used (CPU float64, descending)
    solver: str
    plan: Optional[Plan] = None  # the resolved request (its .record describes it)
    rounds: Optional[int] = None  # sequential model calls (< nfe only when points are evaluated in parallel)


@dataclass
class StepInfo:
    """Passed to ``callback`` once per step."""

    index: int
    sigma: float
    x: torch.Tensor
    denoised: torch.Tensor
    sigma_next: float
    x_next: torch.Tensor


class NonFiniteOutputError(FloatingPointError):
    pass


class Evaluator:
    """The model as solvers see it: ``evaluate(x, sigma) -> denoised`` in the working dtype.

    Passes the conditioning to every call, casts to the model dtype and back, counts calls and
    records (on the device) whether an output was not finite.  With ``reads`` (a feature module
    name, see :mod:`diffsampler.models.features`) it also reads the model's feature of each call:
    :meth:`features` returns the latest one.  Features belong to the run, never to a solver, so
    one solver object can serve any number of runs at once.  Use it as a context manager when it
    reads features (the hook is installed on entry and removed on exit).

    :meth:`parallel` evaluates several points in one batched network call (EPD's parallel
    directions): each point counts as one evaluation (NFE is honest), the call as one sequential
    round (``rounds``).
    """

    def __init__(self, denoiser, cond: Dict[str, Any], model_dtype: torch.dtype, work_dtype: torch.dtype,
                 batch: int, device: torch.device, max_calls: int, reads: Optional[str] = None,
                 feature_dim: Optional[int] = None):
        self.denoiser, self.cond = denoiser, cond
        self.tap = FeatureTap(denoiser, reads, feature_dim) if reads is not None else None
        self.model_dtype, self.work_dtype = model_dtype, work_dtype
        self.batch, self.device = batch, device
        self.calls = 0
        self.rounds = 0                                # sequential model calls (parallel ones count once)
        self.step = 0                                  # set by the loop, for error messages
        self.called_at: List[Tuple[int, float]] = []   # (step, sigma) of every call
        self.bad = torch.zeros(max_calls, dtype=torch.bool, device=device)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``sigma``: a float, or a per-sample tensor (batch entries; AMED's learned points)."""
        if self.tap is not None:
            self.tap.clear()
        if isinstance(sigma, torch.Tensor):
            sigma_t = per_sample_sigma(sigma, self.batch, self.device, self.model_dtype)
        else:
            sigma_t = torch.full((self.batch,), sigma, dtype=self.model_dtype, device=self.device)
        out = self.denoiser(x.to(self.model_dtype), sigma_t, **self.cond)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the denoiser returned {got} for input of shape {tuple(x.shape)}; "
                             "it must return an x0 estimate of the same shape")
        self._record(out, sigma, 1)
        return out.to(self.work_dtype)

    def _record(self, out: torch.Tensor, sigma, evaluations: int) -> None:
        flag = ~torch.isfinite(out).all()
        for _ in range(evaluations):
            if self.calls < len(self.bad):
                self.bad[self.calls] = flag
            self.calls += 1
            self.called_at.append((self.step, sigma.detach() if isinstance(sigma, torch.Tensor) else sigma))
        self.rounds += 1

    def parallel(self, xs: List[torch.Tensor], sigmas: List) -> List[torch.Tensor]:
        """``[D(x_k, sigma_k)]`` for K points in one network call of K x batch samples (the
        conditioning repeated K times); K evaluations, one round."""
        k = len(xs)
        sigma_t = torch.cat([per_sample_sigma(s, self.batch, self.device, self.model_dtype) for s in sigmas])
        cond = {name: _repeat_batch(value, k, self.batch) for name, value in self.cond.items()}
        x = torch.cat([x.to(self.model_dtype) for x in xs])
        out = self.denoiser(x, sigma_t, **cond)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the denoiser returned {got} for input of shape {tuple(x.shape)}; "
                             "it must return an x0 estimate of the same shape")
        self._record(out, sigmas[0], k)
        return list(out.to(self.work_dtype).chunk(k))

    def skip(self) -> None:
        """An evaluation answered without the model (AFS): its feature is the 'no call' one."""
        if self.tap is not None:
            self.tap.clear()

    def features(self, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """The feature of the latest evaluation (``x``, ``denoised``: its input and output)."""
        if self.tap is None:
            raise RuntimeError("this evaluator reads no features: build the plan from a learned sampler that "
                               "declares what it reads")
        return self.tap.take(x, denoised)

    def __enter__(self) -> "Evaluator":
        if self.tap is not None:
            self.tap.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.tap is not None:
            self.tap.__exit__(*exc)


def _repeat_batch(value, k: int, batch: int):
    """Conditioning for K stacked copies of the batch (tensors with a leading batch dimension,
    nested dicts recursively; anything else is shared)."""
    if isinstance(value, dict):
        return {name: _repeat_batch(v, k, batch) for name, v in value.items()}
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value.repeat(k, *([1] * (value.ndim - 1)))
    return value


def analytical_first_step(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """AFS (Dockhorn et al. 2022; used by AMED and GITS): at sigma_max the noisy sample is almost
    pure noise, so the first direction is taken as ``d = x / sqrt(1 + sigma^2)`` without calling the
    model; the matching denoised estimate is ``x - sigma * d``."""
    return x - sigma / math.sqrt(1 + sigma ** 2) * x


class _FirstCallAnalytic:
    """An evaluator whose first call is the analytical first step (AFS) and the rest the model."""

    def __init__(self, evaluate: Evaluator):
        self.evaluate, self.used = evaluate, False

    def __call__(self, x, sigma):
        if self.used:
            return self.evaluate(x, sigma)
        self.used = True
        self.evaluate.skip()
        return analytical_first_step(x, sigma)

    def features(self, x, denoised):
        return self.evaluate.features(x, denoised)


def detach_state(state):
    """The solver state with every tensor detached (truncated back-propagation between steps)."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(detach_state(s) for s in state)
    return state


def integrate(plan: Plan, evaluate: Evaluator, x: torch.Tensor, *, callback: Optional[Callable[["StepInfo"], None]] = None,
              progress: bool = False, truncate: bool = False) -> torch.Tensor:
    """The one loop: walk ``plan``'s grid from ``x`` (already at the first sigma) with its solver.

    With ``plan.afs`` the first model evaluation of step 0 is the analytical first step; with
    ``plan.denoise_to_zero`` the loop ends with ``D(x, sigma_min)``.  ``callback`` receives a
    :class:`StepInfo` after every step (with gradients, when enabled); ``truncate`` detaches the
    state after the callback, so a loss taken there back-propagates through its own step only."""
    solver, sigmas = plan.solver, plan.sigmas
    state = solver.init_state()
    steps = range(plan.steps)
    if progress:
        from .progress import bar
        steps = bar(steps, desc=f"{solver.name} nfe={plan.nfe}", leave=False)
    for i in steps:
        evaluate.step = i
        step_evaluate = _FirstCallAnalytic(evaluate) if (plan.afs and i == 0) else evaluate
        x_next, denoised, state = solver.step(step_evaluate, x, i, sigmas, state)
        if callback is not None:
            callback(StepInfo(i, sigmas[i], x, denoised, sigmas[i + 1], x_next))
        x = x_next
        if truncate:
            x, state = x.detach(), detach_state(state)
    if plan.denoise_to_zero:
        evaluate.step = plan.steps
        x = evaluate(x, sigmas[-1])
    return x


def check_noise(noise) -> None:
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a tensor of shape (batch, *sample_shape) with at least 2 dims, got {shape}")
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor, got {noise.dtype}")


def evaluator_for(plan: Plan, denoiser, noise: torch.Tensor, cond: Optional[Dict[str, Any]] = None) -> Evaluator:
    """The evaluator of one run of ``plan`` on ``noise``'s batch, device and dtype."""
    return Evaluator(denoiser, {**(cond or {}), **plan.model_inputs}, noise.dtype, work_dtype(noise.device),
                     noise.shape[0], noise.device, max_calls=plan.nfe, reads=plan.reads,
                     feature_dim=plan.feature_dim)


def _raise_if_not_finite(evaluate: Evaluator) -> None:
    bad = evaluate.bad[: evaluate.calls]
    if bool(bad.any()):
        call = int(bad.nonzero()[0])
        step, sigma = evaluate.called_at[call]
        if isinstance(sigma, torch.Tensor):
            sigma = float(sigma.flatten()[0])      # a per-sample sigma: name the first sample's
        raise NonFiniteOutputError(
            f"the model returned NaN or Inf at step {step} (sigma={sigma:.6g}, model evaluation {call + 1} "
            f"of {evaluate.calls}); check the model and its input range")


def run_plan(plan: Plan, denoiser, noise: torch.Tensor, *, cond: Optional[Dict[str, Any]] = None,
             callback: Optional[Callable[[StepInfo], None]] = None, progress: bool = False,
             grad: bool = False) -> SampleResult:
    """One run of ``plan`` from ``noise`` (standard normal, scaled here by the first sigma)."""
    check_noise(noise)
    check_sample_shape(denoiser, noise.shape)
    with torch.set_grad_enabled(grad), evaluator_for(plan, denoiser, noise, cond) as evaluate:
        x = noise.to(evaluate.work_dtype) * plan.sigmas[0]
        x = integrate(plan, evaluate, x, callback=callback, progress=progress)
    _raise_if_not_finite(evaluate)
    return SampleResult(samples=x.to(noise.dtype), nfe=evaluate.calls, sigmas=plan.sigma_tensor(),
                        solver=plan.solver.name, plan=plan, rounds=evaluate.rounds)
