"""diffsampler's solvers as k-diffusion sampler functions (the signature ComfyUI and Forge take).

    from diffsampler.integrations.k_diffusion import sampler
    sample_unipc = sampler("unipc")            # any name in diffsampler.solvers.solver_names()
    x0 = sample_unipc(model, x, sigmas, extra_args={...}, callback=fn, disable=True)

``sampler(name, **options)`` returns a function with k-diffusion's signature
``fn(model, x, sigmas, extra_args=None, callback=None, disable=None)`` that follows k-diffusion's
convention exactly (ComfyUI's ``comfy.samplers.KSAMPLER`` and Forge's ``KDiffusionSampler`` call
their samplers this way):

* ``model(x, sigma, **extra_args) -> denoised``, ``sigma`` a ``(batch,)`` tensor in ``x``'s dtype
  and device: a denoiser of the ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` in the caller's
  sigmas, which is diffsampler's model contract already.  ``extra_args`` reach every call.
* ``x`` arrives already at ``sigmas[0]`` (scaled by the caller) and is integrated as it is.
* ``sigmas`` is the descending grid.  A trailing 0 means the last step goes to sigma = 0; an ODE
  step to 0 is ``x = D(x, sigmas[-2])`` (k-diffusion's Euler and DPM-Solver++ steps to 0 are exactly
  that), i.e. diffsampler's denoise-to-zero: one more model evaluation.  Without a trailing 0 the
  result is the state at ``sigmas[-1]``.
* ``callback`` gets k-diffusion's dict ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per
  step (``sigma_hat == sigma``: no churn), the step to 0 included; ``disable=True`` turns the
  progress bar off (``None`` and ``False`` show it).
* The result has ``x``'s dtype and device; the solver arithmetic runs in float64 where the device
  has it (float32 on Apple MPS), and the model always sees ``x``'s dtype.

Options are the solver's (``max_order=3``, ``variant="bh1"``, ...), plus ``afs=True`` (the
analytical first step).  ``name`` may also be a file that brings its own grid:

* a **schedule file** (``.json``, e.g. from ``diffsampler schedule gits``): sampled with the
  solver, solver options and AFS setting the file records (``options`` override them);
* a **learned-sampler file** (``.pt``, from ``diffsampler learn`` or ``diffsampler amed train``):
  sampled with the solver and grid it was trained on.  It was made for one model (its
  fingerprint is recorded), so it needs that model (a diffsampler denoiser passed as ``model``);
  another model is refused.

With a file the incoming grid is replaced by the file's: ``x`` is rescaled from ``sigmas[0]`` to
the file's first sigma (``x * file[0] / sigmas[0]``), the file's sigmas are walked, and a trailing
0 in ``sigmas`` still adds the final step to 0.  A ``UserWarning`` says so when the incoming grid
(without its trailing 0) differs from the file's; pass the file's sigmas (``diffsampler schedule
show FILE --plain``, plus a 0) to silence it.  File grids are in the sigmas of the model they were
made on (VE sigmas: the ones ComfyUI and Forge use for SD 1.x/2.x/SDXL).
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .. import sample
from ..models.base import Denoiser, work_dtype
from ..schedules import Schedule
from ..solvers import get_solver, solver_names

Callback = Callable[[Dict[str, Any]], None]


def sampler(name: str, **options) -> "KDiffusionSampler":
    """A k-diffusion sampler function running diffsampler's ``name`` (see the module docstring).

    ``name``: a solver name or alias (:func:`diffsampler.solvers.solver_names`), a schedule file
    (``.json``) or an AMED predictor file (``.pt``).  Bad names and options raise ``ValueError``
    here, before any sampling."""
    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(f"sampler name must be a solver name or a file path, got {type(name).__name__}")
    afs = options.pop("afs", None)
    if str(name) in solver_names():
        get_solver(str(name), **options)                      # refuse unknown options now
        return KDiffusionSampler(str(name), options, afs=afs)
    path = Path(name)
    if path.suffix == ".json" or (path.is_file() and path.suffix != ".pt"):
        schedule = Schedule.load(path)
        solver = schedule.info.get("solver")
        if not isinstance(solver, str):
            raise ValueError(f"{path} records no solver: use sampler(SOLVER) with the schedule's sigmas instead")
        merged = {**dict(schedule.info.get("solver_options") or {}), **options}
        get_solver(solver, **merged)
        return KDiffusionSampler(solver, merged, afs=afs, schedule=path)
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"no learned-sampler file at {path}")
        if options or afs is not None:
            raise ValueError("a learned-sampler file fixes its solver, grid and AFS: give no options")
        return KDiffusionSampler("amed", {}, learned=path)
    raise ValueError(f"unknown sampler {str(name)!r}: give a solver name ({', '.join(solver_names())}), "
                     "a schedule file (.json) or a learned-sampler file (.pt)")


class KDiffusionSampler:
    """The sampler function :func:`sampler` returns; call it as
    ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None)``."""

    def __init__(self, solver: str, options: Dict[str, Any], *, afs: Optional[bool] = None,
                 schedule: Optional[Path] = None, learned: Optional[Path] = None):
        self.solver, self.options, self.afs = solver, dict(options), afs
        self.schedule, self.learned = schedule, learned
        source = learned or schedule
        self.__name__ = f"sample_diffsampler_{solver}" + (f"_{Path(source).stem}" if source else "")

    def __repr__(self) -> str:
        what = f"file {self.learned or self.schedule}" if (self.learned or self.schedule) else "the given sigmas"
        options = "".join(f" {k}={v!r}" for k, v in self.options.items())
        return f"<k-diffusion sampler: diffsampler {self.solver}{options} on {what}>"

    @torch.no_grad()
    def __call__(self, model, x: torch.Tensor, sigmas, extra_args: Optional[Dict[str, Any]] = None,
                 callback: Optional[Callback] = None, disable: Optional[bool] = None) -> torch.Tensor:
        grid, to_zero = _split_sigmas(sigmas)
        if len(grid) == 1 and not to_zero and self.schedule is None and self.learned is None:
            return x                                          # no step, as in k-diffusion
        den = CallerModel(model, x.dtype)
        cond = dict(extra_args or {})
        work = work_dtype(x.device)
        noise = x.to(work) / grid[0]                          # sample() multiplies by the first sigma again
        last: Dict[str, torch.Tensor] = {}

        def on_step(info) -> None:
            last["x"] = info.x_next
            if callback is not None:
                sigma = _sigma_value(sigmas, info.index, info.sigma, own_grid)
                callback({"x": info.x.to(x.dtype), "i": info.index, "sigma": sigma, "sigma_hat": sigma,
                          "denoised": info.denoised.to(x.dtype)})

        own_grid = self.schedule is not None or self.learned is not None
        if len(grid) == 1 and not own_grid:
            used, state = grid, x.to(work)                    # [sigma, 0]: the one step to 0 only
        else:
            request: Dict[str, Any] = dict(cond=cond, callback=on_step, progress=disable is not True)
            if self.learned is not None:
                result = _learned_sample(den, noise, self.learned, **request)
            elif self.schedule is not None:
                result = sample(den, noise, self.solver, schedule=str(self.schedule), afs=self.afs,
                                **request, **self.options)
            else:
                result = sample(den, noise, self.solver, sigmas=grid, afs=self.afs, **request, **self.options)
            used = [float(s) for s in result.sigmas]
            state = result.samples
            if own_grid and not _same_grid(grid, used):
                warnings.warn(f"{self}: the file's grid ({len(used) - 1} steps, sigma {used[0]:.4g} .. {used[-1]:.4g}) "
                              f"replaces the incoming sigmas ({len(grid) - 1} steps, {grid[0]:.4g} .. {grid[-1]:.4g}); "
                              f"x was rescaled from sigma {grid[0]:.4g} to {used[0]:.4g}", stacklevel=2)
        if not to_zero:
            return state.to(x.dtype)
        steps = len(used) - 1
        sigma_last = torch.full((x.shape[0],), used[-1], dtype=x.dtype, device=x.device)
        before = state.to(x.dtype)
        denoised = den(before, sigma_last, **cond)
        if callback is not None:
            sigma = _sigma_value(sigmas, steps, used[-1], own_grid)
            callback({"x": before, "i": steps, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised.to(x.dtype)})
        return denoised.to(x.dtype)


class CallerModel(Denoiser):
    """The caller's k-diffusion model as a diffsampler denoiser: the model sees the dtype ``x``
    came in (the solver works in float64), sigma as a ``(batch,)`` tensor of that dtype.

    A diffsampler denoiser passed as the model keeps its identity (sigma range, shape, weights,
    feature module), so schedule and AMED files made for it are checked against it; any other
    model has no declared range (the caller's sigmas are taken as they are)."""

    def __init__(self, model, dtype: torch.dtype):
        if not callable(model):
            raise ValueError(f"model must be callable as model(x, sigma, **extra_args), got {type(model).__name__}")
        self.inner, self.model_dtype = model, dtype
        if isinstance(model, Denoiser):
            self.sigma_min, self.sigma_max, self.shape = model.sigma_min, model.sigma_max, model.shape
            self.num_classes = model.num_classes
        else:
            self.sigma_min, self.sigma_max = 0.0, math.inf

    @property
    def network(self):
        return getattr(self.inner, "network", None) if isinstance(self.inner, Denoiser) else None

    def identity_tensors(self):
        method = getattr(self.inner, "identity_tensors", None)
        return method() if isinstance(self.inner, Denoiser) and method is not None else []

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.inner(x.to(self.model_dtype), sigma.to(self.model_dtype), **cond)


def _learned_sample(den, noise, path, **request):
    """Sampling with a learned-sampler file (any method: ``sample(learned=...)``)."""
    return sample(den, noise, learned=str(path), **request)


def _split_sigmas(sigmas):
    """(positive descending grid as floats, whether a trailing 0 asks for the step to sigma = 0)."""
    values = torch.as_tensor(sigmas).detach().reshape(-1)
    if values.numel() == 0:
        raise ValueError("sigmas is empty: give the descending noise levels, optionally ending with 0")
    values = [float(s) for s in values.double().cpu()]
    to_zero = len(values) > 1 and values[-1] == 0.0
    grid = values[:-1] if to_zero else values
    bad = [s for s in grid if not (math.isfinite(s) and s > 0)]
    if bad:
        raise ValueError(f"sigmas must be positive and finite (only the last may be 0), got {values}")
    if any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"sigmas must be strictly descending, got {values}")
    return grid, to_zero


def _same_grid(incoming, used, rtol: float = 1e-5) -> bool:
    return len(incoming) == len(used) and all(abs(a - b) <= rtol * abs(b) for a, b in zip(incoming, used))


def _sigma_value(sigmas, index: int, value: float, own_grid: bool):
    """k-diffusion's callback ``sigma``: the caller's ``sigmas[i]`` (a 0-dim tensor), or the file grid's."""
    if not own_grid and isinstance(sigmas, torch.Tensor):
        return sigmas[index]
    return torch.tensor(value, dtype=torch.float32)
