"""``sample(denoiser, noise, solver=..., nfe=...)``: a request resolved into a plan, run by the one loop.

The request (solver, NFE or steps, schedule or grid, AFS, denoise-to-zero, a learned sampler) is
resolved by :func:`diffsampler.plan.make_plan`; the run is :func:`diffsampler.loop.run_plan`.
Sampling is inference: no gradients unless ``grad=True``.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .learned import load_learned
from .loop import (Evaluator, NonFiniteOutputError, SampleResult, StepInfo, analytical_first_step,  # noqa: F401
                   check_noise, evaluator_for, integrate, run_plan)
from .plan import Plan, make_plan


def sample(denoiser: Callable, noise: torch.Tensor, solver=None, nfe: Optional[int] = None,
           schedule=None, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, *,
           sigmas: Optional[Sequence[float]] = None, schedule_options: Optional[dict] = None,
           cond: Optional[Dict[str, Any]] = None, afs: Optional[bool] = None, denoise_to_zero: bool = False,
           steps: Optional[int] = None, plan: Optional[Plan] = None, learned=None, amed=None,
           callback: Optional[Callable[[StepInfo], None]] = None, progress: bool = False, grad: bool = False,
           **solver_options) -> SampleResult:
    """Solve the probability-flow ODE from ``sigma_max * noise`` down to ``sigma_min``.

    Args:
        denoiser: ``D(x, sigma, **cond) -> x0`` (EDM parametrization; sigma is a (batch,) tensor).
        noise: standard normal tensor ``(batch, *shape)``; scaled by the grid's first sigma here.
        solver: a registered solver name or alias (see ``diffsampler list``) or a Solver instance;
            default :data:`diffsampler.plan.DEFAULT_SOLVER`.
        nfe: model evaluations to spend (the solver's NFE rule picks the number of steps);
            ``steps=`` gives the number of steps instead.
        schedule: a schedule name, a :class:`~diffsampler.schedules.Schedule`, a schedule file, or a
            function; default: the solver's recommended schedule.  Options in ``schedule_options``.
        sigma_min, sigma_max: the grid's range; default: the denoiser's own (EDM's 0.002 and 80
            for a plain callable).
        sigmas: an explicit descending grid instead of ``nfe`` / ``schedule``.
        cond: keyword arguments passed to every model call (labels, prompt embeddings, ...).
        afs: analytical first step (saves the first model evaluation); default: what a schedule
            file records (GITS schedules tuned with AFS), otherwise False.
        denoise_to_zero: finish with ``x = D(x, sigma_min)`` (one more evaluation).
        plan: an already resolved :class:`~diffsampler.plan.Plan` (then give no other request).
        learned: a learned sampler or its file (:mod:`diffsampler.learned`): samples with the
            solver, grid and AFS it was trained for (conflicting requests are refused).
            ``amed=`` is the same for AMED predictors (kept for existing code).
        callback: called with a :class:`StepInfo` after every step.
        progress: show a tqdm progress bar.
        grad: keep gradients (training learned samplers through this loop); default off.
        **solver_options: the solver's dataclass fields, e.g. ``max_order=3``.
    """
    check_noise(noise)
    if learned is not None and amed is not None:
        raise ValueError("give learned= or amed=, not both")
    learned = amed if learned is None else learned
    if isinstance(learned, (str, os.PathLike)):
        learned = load_learned(learned, device=noise.device)
    if plan is None:
        plan = make_plan(solver, nfe, schedule, sigmas=sigmas, schedule_options=schedule_options,
                         sigma_min=sigma_min, sigma_max=sigma_max, afs=afs, denoise_to_zero=denoise_to_zero,
                         steps=steps, learned=learned, model=denoiser, shape=tuple(noise.shape[1:]),
                         **solver_options)
        for note in plan.warnings:
            warnings.warn(note, stacklevel=2)
    else:
        asked = {"solver": solver, "nfe": nfe, "schedule": schedule, "sigma_min": sigma_min, "sigma_max": sigma_max,
                 "sigmas": sigmas, "schedule_options": schedule_options, "afs": afs, "steps": steps,
                 "learned": learned}
        given = [k for k, v in asked.items() if v is not None] + (["denoise_to_zero"] if denoise_to_zero else []) + \
            sorted(solver_options)
        if given:
            raise ValueError(f"plan= is a resolved request: drop {', '.join(given)}")
    return run_plan(plan, denoiser, noise, cond=cond, callback=callback, progress=progress, grad=grad)
