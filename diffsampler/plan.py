"""A sampling request, resolved once: :class:`Plan` and :func:`make_plan`.

Everything that samples (``sample()``, every CLI command, ``pipelines.run``, GITS, learned-sampler
training, the trajectory recorder) turns what the user asked for into one frozen plan here and
nowhere else:

    plan = make_plan(solver="unipc", nfe=6, model=denoiser)          # or sigmas=, schedule=, steps=, learned=
    plan.solver, plan.sigmas, plan.afs, plan.denoise_to_zero, plan.nfe, plan.record

What a request may say, and how it is resolved:

* **solver**: a registered name or alias (``diffsampler list``), or a Solver instance; default:
  a schedule file's own solver (with its recorded options), else ``DEFAULT_SOLVER``.  Solver
  options are keyword arguments.
* **grid**: exactly one of an explicit ``sigmas`` list; a fixed schedule (a :class:`Schedule` or a
  schedule file: checked against the model's shape, sigma range and fingerprint, and supplying
  its AFS setting unless ``afs`` is given); or a schedule name / function (default: the solver's
  own) with ``nfe`` model evaluations or ``steps`` steps over ``[sigma_min, sigma_max]`` (default:
  the model's range).  ``default_nfe`` is what callers with a default use when nothing fixes the
  grid (the CLI's 10, ``pipelines.run``'s 5).
* **learned**: a learned sampler (:mod:`diffsampler.learned`; ``load_learned(path)`` reads its file)
  brings its own solver, grid and AFS setting through its ``plan()``; a conflicting request is
  refused with a message.

The NFE of a plan is the solver's documented rule (:mod:`diffsampler.solvers.base`); the loop
measures the real count at the model and the tests check they agree.  ``plan.record`` is a
JSON-able description of the plan (what run folders' ``settings.json`` store and what decides
whether a rerun may reuse their images).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import types
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from . import schedules as schedules_module
from .defaults import DEFAULT_SOLVER
from .models.base import Denoiser, sigma_range
from .models.identity import model_fingerprint
from .solvers import Solver, get_solver


@dataclass(frozen=True)
class Plan:
    """A resolved sampling request (build it with :func:`make_plan`)."""

    solver: Solver                       # the step rule (a learned sampler's, where one is used)
    sigmas: Tuple[Any, ...]              # the grid, descending (floats; a learned grid in training: tensors)
    afs: bool                            # analytical first step
    denoise_to_zero: bool                # a final D(x, sigma_min)
    nfe: int                             # model evaluations the solver's rule says it makes
    record: Mapping[str, Any] = field(default_factory=dict)   # how it was made (JSON-able)
    learned: Any = None                  # the learned sampler behind ``solver``, if any
    warnings: Tuple[str, ...] = ()       # what the user should know about this request
    model_inputs: Mapping[str, Any] = field(default_factory=dict)   # extra inputs of every model call

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def reads(self) -> Optional[str]:
        """What the step rule reads from the model besides its output (a feature module), or None."""
        return self.learned.reads if self.learned is not None else None

    @property
    def feature_dim(self) -> Optional[int]:
        """How many numbers the step rule reads per evaluation (None: it reads none)."""
        return self.learned.feature_dim if self.learned is not None else None

    def sigma_tensor(self):
        import torch
        return torch.tensor([float(s) for s in self.sigmas], dtype=torch.float64)


def solver_record(solver: Solver) -> Dict[str, Any]:
    """``{"name": ..., option: value, ...}`` of a solver instance (nested solvers recorded alike)."""
    out: Dict[str, Any] = {"name": solver.name}
    for f in dataclasses.fields(solver):
        value = getattr(solver, f.name)
        out[f.name] = solver_record(value) if isinstance(value, Solver) else value
    return out


def _schedule_record(schedule, schedule_options) -> Any:
    if isinstance(schedule, schedules_module.Schedule):
        return {"file": dict(schedule.info)}
    if callable(schedule):
        return {"function": schedule.__qualname__ if isinstance(schedule, types.FunctionType) else "custom",
                "options": dict(schedule_options or {})}
    name = schedules_module.SCHEDULE_ALIASES.get(str(schedule), str(schedule))
    plain = (bool, int, float, str, type(None))
    options = {**_keyword_defaults(schedules_module.SCHEDULES.get(name)), **(schedule_options or {})}
    return {"name": name, "options": {k: (v if isinstance(v, plain) else "the model's own table")
                                      for k, v in options.items()}}


def _keyword_defaults(fn) -> Dict[str, Any]:
    """The options a schedule function uses when not given (recorded, so the record is exact)."""
    if fn is None:
        return {}
    params = list(inspect.signature(fn).parameters.values())[3:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def make_plan(solver=None, nfe: Optional[int] = None, schedule=None, *, sigmas: Optional[Sequence[float]] = None,
              schedule_options: Optional[dict] = None, sigma_min: Optional[float] = None,
              sigma_max: Optional[float] = None, afs: Optional[bool] = None, denoise_to_zero: bool = False,
              steps: Optional[int] = None, learned=None, model=None, shape: Optional[Sequence[int]] = None,
              default_nfe: Optional[int] = None, **solver_options) -> Plan:
    """The :class:`Plan` for a request (see the module docstring for what each argument means).

    ``model`` (a denoiser) supplies the default sigma range and the sample shape that schedule
    files and learned samplers are checked against (``shape`` overrides it)."""
    if shape is None and isinstance(model, Denoiser) and model.shape is not None:
        shape = model.shape
    if learned is not None:
        return _learned_plan(learned, model, shape, solver, nfe, schedule, sigmas, schedule_options, sigma_min,
                             sigma_max, afs, denoise_to_zero, steps, solver_options)
    native = model.native_plans() if isinstance(model, Denoiser) else {}
    if native and solver is None and schedule is None and sigmas is None and steps is None:
        return _native_plan(native, nfe, default_nfe, afs, denoise_to_zero, schedule_options, solver_options)
    if solver is None:
        solver, solver_options, schedule = _file_solver(schedule, schedule_options, solver_options)
    solver = get_solver(solver, **solver_options)
    if nfe is not None and steps is not None:
        raise ValueError("give nfe= (model evaluations) or steps= (solver steps), not both")
    if sigmas is not None and (schedule is not None or schedule_options):
        raise ValueError("give either sigmas= or schedule=, not both")
    fixed = None
    if sigmas is not None:
        grid = schedules_module.check_sigmas(sigmas)
        how: Any = "explicit sigmas"
    else:
        if schedule is None:
            schedule = solver.default_schedule
            schedule_options = {**solver.default_schedule_options, **(schedule_options or {})}
        schedule_options = _with_model_table(schedule, schedule_options, model)
        fixed, schedule_fn = schedules_module.resolve(schedule, schedule_options)
        how = _schedule_record(fixed if fixed is not None else schedule, schedule_options)
        if fixed is not None:
            check_schedule_fits(fixed, model, shape)
            afs = bool(fixed.info.get("afs", False)) if afs is None else afs
            grid = fixed.sigmas
    afs = bool(afs)
    if sigmas is not None or fixed is not None:
        implied = solver.num_evals(len(grid) - 1, afs, denoise_to_zero)
        if nfe is not None and nfe != implied:
            raise ValueError(f"nfe={nfe} does not match the given grid: {len(grid)} sigmas make {len(grid) - 1} "
                             f"steps, which cost {implied} evaluations with solver {solver.name!r} "
                             f"({solver.nfe_rule()}); leave nfe out or change the grid")
        if steps is not None and steps != len(grid) - 1:
            raise ValueError(f"steps={steps} does not match the given grid of {len(grid) - 1} steps")
    else:
        if nfe is None and steps is None:
            nfe = default_nfe
        if nfe is None and steps is None:
            raise ValueError("give nfe= (number of model evaluations), steps=, or an explicit sigmas= grid")
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be a positive integer, got {steps!r}")
            num_steps = steps
        else:
            num_steps = solver.steps_for_nfe(nfe, afs, denoise_to_zero)
        lo, hi = sigma_range(model)
        lo = lo if sigma_min is None else float(sigma_min)
        hi = hi if sigma_max is None else float(sigma_max)
        grid = schedules_module.check_sigmas(schedule_fn(num_steps, lo, hi))
    sigma_list = tuple(float(s) for s in grid)
    expected = solver.num_evals(len(sigma_list) - 1, afs, denoise_to_zero)
    if expected < 1:
        raise ValueError(f"this request makes no model evaluation ({solver.name}, {len(sigma_list) - 1} step(s), "
                         f"AFS {'on' if afs else 'off'}): take more steps")
    record = {"solver": solver_record(solver), "schedule": how, "sigmas": list(sigma_list), "afs": afs,
              "denoise_to_zero": bool(denoise_to_zero), "nfe": expected, "steps": len(sigma_list) - 1,
              "learned": None}
    notes = []
    if solver.evals_per_step > 1 and expected <= 4:
        notes.append(f"{solver.name} makes {solver.evals_per_step} evaluations per step, so NFE {expected} is only "
                     f"{len(sigma_list) - 1} step(s) and its last evaluation sits at sigma_min: at NFE <= 4 the "
                     "one-evaluation solvers (unipc, dpmpp, ipndm) are far more accurate (evaluation/README.md)")
    return Plan(solver, sigma_list, afs, bool(denoise_to_zero), expected, record, warnings=tuple(notes))


def _with_model_table(schedule, schedule_options, model) -> Optional[dict]:
    """The ``discrete`` schedule takes the model's own training timesteps unless given them."""
    if not isinstance(schedule, str) or schedules_module.SCHEDULE_ALIASES.get(schedule, schedule) != "discrete" \
            or "sigma_fn" in (schedule_options or {}):
        return schedule_options
    table = model.discrete_schedule() if isinstance(model, Denoiser) else None
    if table is None:
        raise ValueError("schedule 'discrete' takes the model's own integer training timesteps, and this model has "
                         "none (it is a continuous-time model): use polynomial, logsnr, time_uniform or time_quadratic")
    return {**table, **(schedule_options or {})}


def _file_solver(schedule, schedule_options, solver_options):
    """Without a named solver: ``(solver, options, schedule)`` with a schedule file's own solver (the
    one it was fitted for, its recorded options under the given ones), else the package default.
    A file is read here once and handed on as its :class:`Schedule`."""
    fixed = None
    if isinstance(schedule, schedules_module.Schedule):
        fixed = schedule
    elif schedule is not None and not callable(schedule):
        fixed = schedules_module.resolve(schedule, schedule_options)[0]
    recorded = fixed.info.get("solver") if fixed is not None else None
    if not isinstance(recorded, str):
        return DEFAULT_SOLVER, solver_options, fixed if fixed is not None else schedule
    return recorded, {**dict(fixed.info.get("solver_options") or {}), **solver_options}, fixed


def _native_plan(native, nfe, default_nfe, afs, denoise_to_zero, schedule_options, solver_options) -> Plan:
    """The request a distilled model was trained for at ``nfe`` (see ``Denoiser.native_plans``)."""
    supported = sorted(native)
    if nfe is None:
        nfe = default_nfe if default_nfe in native else supported[-1]
    if nfe not in native:
        raise ValueError(f"this model was distilled for NFE {', '.join(map(str, supported))}, not {nfe}: use one of "
                         "those (or name a solver and schedule to sample it like an ordinary model)")
    spec = native[nfe]
    given = [k for k, v in (("afs", afs), ("denoise_to_zero", denoise_to_zero or None),
                            ("schedule_options", schedule_options or None), ("solver options", solver_options or None))
             if v is not None and (k != "afs" or bool(v) != bool(spec.get("afs", False)))]
    if given:
        raise ValueError(f"this model samples with the rule it was distilled for; drop {', '.join(given)} (or name "
                         "a solver and schedule to sample it like an ordinary model)")
    plan = make_plan(spec["solver"], sigmas=spec["sigmas"], afs=bool(spec.get("afs", False)),
                     denoise_to_zero=bool(spec.get("denoise_to_zero", False)), **spec.get("solver_options", {}))
    if plan.nfe != nfe:
        raise ValueError(f"the model's native plan for NFE {nfe} makes {plan.nfe} evaluations (a corrupt model card)")
    record = {**plan.record, "schedule": {"native": "the grid the model was distilled for"}}
    return dataclasses.replace(plan, record=record, model_inputs=dict(spec.get("model_inputs", {})))


def _learned_plan(learned, model, shape, solver, nfe, schedule, sigmas, schedule_options, sigma_min, sigma_max,
                  afs, denoise_to_zero, steps, solver_options) -> Plan:
    if isinstance(learned, (str, os.PathLike)):
        raise TypeError("make_plan takes a loaded learned sampler: diffsampler.load_learned(path) reads its file")
    fixes = {"solver options": bool(solver_options), "schedule_options": bool(schedule_options),
             "sigma_min": sigma_min is not None, "sigma_max": sigma_max is not None,
             "denoise_to_zero": bool(denoise_to_zero), "steps": steps is not None}
    given = [name for name, on in fixes.items() if on]
    if given:
        raise ValueError(f"a learned sampler fixes its solver and grid: drop {', '.join(given)}")
    return learned.plan(model, shape, solver=solver, nfe=nfe, schedule=schedule, sigmas=sigmas, afs=afs)


def check_schedule_fits(schedule: "schedules_module.Schedule", model, shape) -> None:
    """Refuse a schedule file made for another sample shape, outside the model's sigma range, or
    (where the file records one) for another model (parameter fingerprint)."""
    made_for = schedule.info.get("shape")
    if made_for is not None and shape is not None and tuple(made_for) != tuple(shape):
        raise ValueError(f"this schedule was made for samples of shape {tuple(made_for)}, not {tuple(shape)}; "
                         "make one for this model (diffsampler schedule gits ...)")
    if isinstance(model, Denoiser):
        lo, hi = float(schedule.sigmas[-1]), float(schedule.sigmas[0])
        if hi > model.sigma_max * (1 + 1e-6) or lo < model.sigma_min * (1 - 1e-6):
            raise ValueError(f"this schedule spans sigma {lo:g}..{hi:g}, outside the model's range "
                             f"{model.sigma_min:g}..{model.sigma_max:g}; it was made for another model")
    made_on = schedule.info.get("model_fingerprint")
    if made_on is not None and model is not None:
        actual = model_fingerprint(model)
        if actual is not None and actual != made_on:
            raise ValueError(f"this schedule was fitted to another model ({schedule.info.get('model') or 'unnamed'}, "
                             f"fingerprint {made_on}); the given model's fingerprint is {actual}: fit one for this "
                             "model (diffsampler schedule gits ...)")
