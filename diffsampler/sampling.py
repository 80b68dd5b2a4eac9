"""The one sampling loop: ``sample(denoiser, noise, solver=..., nfe=...)``.

The loop owns everything solvers should not care about: the sigma grid (from ``nfe`` and a
schedule, or explicit ``sigmas``), scaling the noise by ``sigma_max``, conditioning, dtype
handling, NFE counting (measured at the model, not computed from a table), the analytical first
step, the optional final denoising, callbacks and progress.

Sampling is inference: it runs under ``torch.no_grad()``.  Numbers: the solver arithmetic runs in float64 where the device has it (float32 on Apple MPS);
the model sees ``noise.dtype``.  Non-finite model outputs are flagged on the device without a
host sync per step and reported after the loop, naming the first bad step and its sigma.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import schedules as schedules_module
from .models.base import Denoiser, check_sample_shape, per_sample_sigma, sigma_range, work_dtype
from .solvers import get_solver


@dataclass
class SampleResult:
    """What ``sample`` returns, whatever the options."""

    samples: torch.Tensor      # same shape, dtype and device as the noise
    nfe: int                   # model evaluations actually made
    sigmas: torch.Tensor       # the grid used (CPU float64, descending)
    solver: str


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
    records (on the device) whether an output was not finite.
    """

    def __init__(self, denoiser, cond: Dict[str, Any], model_dtype: torch.dtype, work_dtype: torch.dtype,
                 batch: int, device: torch.device, max_calls: int):
        self.denoiser, self.cond = denoiser, cond
        self.model_dtype, self.work_dtype = model_dtype, work_dtype
        self.batch, self.device = batch, device
        self.calls = 0
        self.step = 0                                  # set by the loop, for error messages
        self.called_at: List[Tuple[int, float]] = []   # (step, sigma) of every call
        self.bad = torch.zeros(max_calls, dtype=torch.bool, device=device)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """``sigma``: a float, or a per-sample tensor (batch entries; AMED's learned points)."""
        if isinstance(sigma, torch.Tensor):
            sigma_t = per_sample_sigma(sigma, self.batch, self.device, self.model_dtype)
        else:
            sigma_t = torch.full((self.batch,), sigma, dtype=self.model_dtype, device=self.device)
        out = self.denoiser(x.to(self.model_dtype), sigma_t, **self.cond)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the denoiser returned {got} for input of shape {tuple(x.shape)}; "
                             "it must return an x0 estimate of the same shape")
        if self.calls < len(self.bad):
            self.bad[self.calls] = ~torch.isfinite(out).all()
        self.calls += 1
        self.called_at.append((self.step, sigma.detach() if isinstance(sigma, torch.Tensor) else sigma))
        return out.to(self.work_dtype)


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
        return analytical_first_step(x, sigma)


def take_step(solver, evaluate: Evaluator, x, i: int, sigmas, state, afs: bool):
    """One step of the sampling loop (shared with AMED training): tags the evaluator with the step
    index and, with ``afs``, makes step 0's first model call the analytical first step."""
    evaluate.step = i
    return solver.step(_FirstCallAnalytic(evaluate) if (afs and i == 0) else evaluate, x, i, sigmas, state)


def fixed_schedule_request(schedule, schedule_options, denoiser, sample_shape, afs):
    """``(schedule, afs)`` for a request naming a schedule file or Schedule: the file is checked
    against the model (:func:`check_schedule_fits`) and, when ``afs`` is None, supplies its AFS
    setting.  Other requests come back unchanged."""
    if schedule is None or schedule_options:
        return schedule, afs
    fixed, _ = schedules_module.resolve(schedule)
    if fixed is None:
        return schedule, afs
    check_schedule_fits(fixed, denoiser, (1, *sample_shape))
    return fixed, bool(fixed.info.get("afs", False)) if afs is None else afs


def resolve_grid(solver, nfe: Optional[int], schedule, schedule_options: Optional[dict],
                 sigmas, sigma_min: float, sigma_max: float, afs: bool, denoise_to_zero: bool) -> torch.Tensor:
    """The sigma grid for a request: explicit ``sigmas``, a fixed schedule, or nfe + schedule."""
    fixed = None
    if sigmas is not None:
        if schedule is not None or schedule_options:
            raise ValueError("give either sigmas= or schedule=, not both")
        fixed = schedules_module.check_sigmas(sigmas)
        schedule_fn = None
    else:
        if schedule is None:
            schedule = solver.default_schedule
            schedule_options = {**solver.default_schedule_options, **(schedule_options or {})}
        fixed_schedule, schedule_fn = schedules_module.resolve(schedule, schedule_options)
        fixed = None if fixed_schedule is None else fixed_schedule.sigmas
    if fixed is not None:
        implied = solver.num_evals(len(fixed) - 1, afs, denoise_to_zero)
        if nfe is not None and nfe != implied:
            raise ValueError(f"nfe={nfe} does not match the given grid: {len(fixed)} sigmas make {len(fixed) - 1} "
                             f"steps, which cost {implied} evaluations with solver {solver.name!r} "
                             f"({solver.nfe_rule()}); leave nfe out or change the grid")
        return fixed
    if nfe is None:
        raise ValueError("give nfe= (number of model evaluations) or an explicit sigmas= grid")
    num_steps = solver.steps_for_nfe(nfe, afs, denoise_to_zero)
    return schedules_module.check_sigmas(schedule_fn(num_steps, sigma_min, sigma_max))


@torch.no_grad()
def sample(denoiser: Callable, noise: torch.Tensor, solver=None, nfe: Optional[int] = None,
           schedule=None, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, *,
           sigmas: Optional[Sequence[float]] = None, schedule_options: Optional[dict] = None,
           cond: Optional[Dict[str, Any]] = None, afs: Optional[bool] = None, denoise_to_zero: bool = False,
           callback: Optional[Callable[[StepInfo], None]] = None, progress: bool = False,
           amed=None, **solver_options) -> SampleResult:
    """Solve the probability-flow ODE from ``sigma_max * noise`` down to ``sigma_min``.

    Args:
        denoiser: ``D(x, sigma, **cond) -> x0`` (EDM parametrization; sigma is a (batch,) tensor).
        noise: standard normal tensor ``(batch, *shape)``; scaled by the grid's first sigma here.
        solver: a registered solver name (see ``diffsampler list``) or a Solver instance; default ipndm.
        nfe: model evaluations to spend (the solver's NFE rule picks the number of steps).
        schedule: a schedule name, a :class:`~diffsampler.schedules.Schedule`, a schedule file, or a
            function; default: the solver's recommended schedule.  Options in ``schedule_options``.
        sigma_min, sigma_max: the grid's range; default: the denoiser's own (EDM's 0.002 and 80
            for a plain callable).
        sigmas: an explicit descending grid instead of ``nfe`` / ``schedule``.
        cond: keyword arguments passed to every model call (labels, prompt embeddings, ...).
        afs: analytical first step (saves the first model evaluation); default: what a schedule
            file records (GITS schedules tuned with AFS), otherwise False.
        denoise_to_zero: finish with ``x = D(x, sigma_min)`` (one more evaluation).
        callback: called with a :class:`StepInfo` after every step.
        progress: show a tqdm progress bar.
        amed: an AMED predictor (or its file, see :mod:`diffsampler.amed`): samples with the AMED
            solver it was trained for, on its grid and AFS setting (conflicting requests are refused).
        **solver_options: the solver's dataclass fields, e.g. ``max_order=3``.
    """
    if amed is not None:
        if solver_options:
            raise ValueError("solver options cannot be combined with amed= (the predictor fixes the solver)")
        solver, sigmas, afs = _amed_request(amed, denoiser, noise, solver, nfe, schedule, sigmas, afs)
        nfe, schedule = None, None
    solver = get_solver("ipndm" if solver is None else solver, **solver_options)
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a tensor of shape (batch, *sample_shape) with at least 2 dims, got {shape}")
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor, got {noise.dtype}")
    check_sample_shape(denoiser, noise.shape)
    default_min, default_max = sigma_range(denoiser)
    if sigmas is None:
        schedule, afs = fixed_schedule_request(schedule, schedule_options, denoiser, noise.shape[1:], afs)
    afs = bool(afs)
    sigma_min = default_min if sigma_min is None else float(sigma_min)
    sigma_max = default_max if sigma_max is None else float(sigma_max)
    grid = resolve_grid(solver, nfe, schedule, schedule_options, sigmas, sigma_min, sigma_max, afs, denoise_to_zero)
    grid_list = tuple(float(s) for s in grid)
    num_steps = len(grid_list) - 1

    work = work_dtype(noise.device)
    expected = solver.num_evals(num_steps, afs, denoise_to_zero)
    evaluate = Evaluator(denoiser, dict(cond or {}), noise.dtype, work, noise.shape[0], noise.device,
                         max_calls=expected)
    x = noise.to(work) * grid_list[0]
    state = solver.init_state()
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"{solver.name} nfe={expected}", leave=False)
    with solver.attach(denoiser):
        for i in steps:
            x_next, denoised, state = take_step(solver, evaluate, x, i, grid_list, state, afs)
            if callback is not None:
                callback(StepInfo(i, grid_list[i], x, denoised, grid_list[i + 1], x_next))
            x = x_next
    if denoise_to_zero:
        evaluate.step = num_steps
        x = evaluate(x, grid_list[-1])
    _raise_if_not_finite(evaluate)
    return SampleResult(samples=x.to(noise.dtype), nfe=evaluate.calls, sigmas=grid, solver=solver.name)


def _amed_request(amed, denoiser, noise, solver, nfe, schedule, sigmas, afs):
    from . import amed as amed_module
    predictor = amed if isinstance(amed, amed_module.Predictor) else amed_module.load(amed, device=noise.device)
    shape = tuple(noise.shape[1:]) if isinstance(noise, torch.Tensor) else ()
    return predictor.sampling_request(denoiser, shape, solver, nfe, schedule, sigmas, afs)


def check_schedule_fits(schedule: "schedules_module.Schedule", denoiser, noise_shape) -> None:
    """Refuse a schedule file made for another sample shape or outside the model's sigma range."""
    made_for = schedule.info.get("shape")
    if made_for is not None and tuple(made_for) != tuple(noise_shape[1:]):
        raise ValueError(f"this schedule was made for samples of shape {tuple(made_for)}, not {tuple(noise_shape[1:])}; "
                         "make one for this model (diffsampler schedule gits ...)")
    if isinstance(denoiser, Denoiser):
        lo, hi = float(schedule.sigmas[-1]), float(schedule.sigmas[0])
        if hi > denoiser.sigma_max * (1 + 1e-6) or lo < denoiser.sigma_min * (1 - 1e-6):
            raise ValueError(f"this schedule spans sigma {lo:g}..{hi:g}, outside the model's range "
                             f"{denoiser.sigma_min:g}..{denoiser.sigma_max:g}; it was made for another model")


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
