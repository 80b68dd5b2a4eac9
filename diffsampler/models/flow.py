"""Flow matching / rectified flow models (SD3-style) seen as EDM denoisers.

A flow model is trained on ``x_t = (1 - t) x0 + t n`` (t in [0, 1], t = 1 pure noise) and predicts
the velocity ``v = n - x0``.  Dividing by ``1 - t`` gives the VE form::

    sigma = t / (1 - t),      t = sigma / (1 + sigma),      x_ve = x_t / (1 - t) = (1 + sigma) x_t,

and the x0 estimate is ``x0 = x_t - t v``.  Euler on the flow ODE in t and Euler on the VE ODE in
sigma take exactly the same steps (both are DDIM), so ``euler`` here reproduces diffusers'
``FlowMatchEulerDiscreteScheduler`` on the same sigmas.

The network gets ``x_t`` and ``timestep = t * timestep_scale``; diffusers' SD3 transformer expects
``t * num_train_timesteps`` (its pipeline passes ``scheduler.timesteps = sigmas * 1000``), which is
the default.  (Flux-style transformers multiply by 1000 inside: use ``timestep_scale=1``.)

Sigma range: the training timesteps of ``FlowMatchEulerDiscreteScheduler`` are
``t_i = shift(i / T)``, i = 1 .. T, with ``shift(u) = s u / (1 + (s - 1) u)``.  Its top one is
t = 1 (pure noise, sigma = inf), so ``sigma_max`` is that of the next one, ``shift((T-1) / T)``
(sigma ~ T - 1 for s = 1, ~ s (T - 1) for larger s), and ``sigma_min`` that of ``shift(1 / T)``.
Starting at ``sigma_max`` instead of t = 1 leaves out a ``(1 - t_max) x0 ~ x0 / T`` part of the
starting point.

Shifted schedules: :func:`shifted_schedule` (uniform in unshifted time, then shifted, as
diffusers' flow schedulers space their steps) has the schedule signature and works as
``sample(den, noise, nfe=..., schedule=den.schedule())`` or with ``schedule_options=dict(shift=3)``.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Optional, Tuple

import torch

from .base import Denoiser, check_sample_shape, per_sample_sigma, work_dtype


def shift_time(u, shift: float):
    """t = shift * u / (1 + (shift - 1) * u) (SD3's timestep shift; shift=1 is the identity)."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_time(t, shift: float):
    """Inverse of :func:`shift_time`: u = t / (shift - (shift - 1) * t)."""
    return t / (shift - (shift - 1) * t)


def t_to_sigma(t):
    return t / (1 - t)


def sigma_to_t(sigma):
    return sigma / (1 + sigma)


def shifted_schedule(num_steps: int, sigma_min: float, sigma_max: float, shift: float = 1.0) -> torch.Tensor:
    """Flow-matching schedule: uniform in unshifted time u between the ends, then shifted, in VE sigmas.

    The ends are exact: ``u`` runs from ``unshift(t(sigma_max))`` to ``unshift(t(sigma_min))``, so the
    grid starts at sigma_max and ends at sigma_min whatever the shift.  ``shift=1`` is uniform in
    flow time t."""
    from ..schedules import check_sigmas
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not 0 < sigma_min < sigma_max < float("inf"):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    t_hi = sigma_to_t(torch.tensor(float(sigma_max), dtype=torch.float64))
    t_lo = sigma_to_t(torch.tensor(float(sigma_min), dtype=torch.float64))
    u = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    u = unshift_time(t_hi, shift) + u * (unshift_time(t_lo, shift) - unshift_time(t_hi, shift))
    sigmas = t_to_sigma(shift_time(u, shift))
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return check_sigmas(sigmas)


def _is_diffusers_model(model) -> bool:
    """Whether ``model`` is a diffusers module (no import: if diffusers is not loaded, it is not one)."""
    module = sys.modules.get("diffusers")
    return module is not None and isinstance(model, module.ModelMixin)


class FlowDenoiser(Denoiser):
    """A velocity-predicting flow model as ``D(x, sigma, **cond) -> x0`` (see the module docstring).

    Args:
        model: a diffusers transformer (``SD3Transformer2DModel``, ...), called as
            ``model(hidden_states=x_t, timestep=..., **cond, return_dict=False)``, or any callable
            ``model(x_t, timestep, **cond) -> velocity``.
        num_train_timesteps: T of the training schedule (1000 for SD3).
        shift: the scheduler's static timestep shift (3.0 for SD3); sets the sigma range and
            :meth:`schedule`.
        timestep_scale: the network's timestep is ``t * timestep_scale``; default T.
        shape: per-sample shape; default from the transformer config
            (``in_channels, sample_size, sample_size``).
        sigma_min, sigma_max: override the range described in the module docstring.
    """

    def __init__(self, model: Callable, *, num_train_timesteps: int = 1000, shift: float = 1.0,
                 timestep_scale: Optional[float] = None, shape: Optional[Tuple[int, ...]] = None,
                 sigma_min: Optional[float] = None, sigma_max: Optional[float] = None):
        if int(num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        if not float(shift) > 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.model = model
        self.is_module = _is_diffusers_model(model)
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        self.timestep_scale = float(self.num_train_timesteps if timestep_scale is None else timestep_scale)
        n = self.num_train_timesteps
        self.sigma_min = float(sigma_min) if sigma_min is not None else float(t_to_sigma(shift_time(1 / n, self.shift)))
        self.sigma_max = float(sigma_max) if sigma_max is not None else float(t_to_sigma(shift_time((n - 1) / n, self.shift)))
        if not 0 < self.sigma_min < self.sigma_max < float("inf"):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}")
        if shape is None and self.is_module:
            config = model.config
            size = config.get("sample_size")
            if size is not None and config.get("in_channels") is not None:
                size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
                shape = (config["in_channels"], *size)
        self.shape = tuple(int(s) for s in shape) if shape is not None else None

    @property
    def network(self) -> Optional[torch.nn.Module]:
        return self.model if isinstance(self.model, torch.nn.Module) else None

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> "FlowDenoiser":
        """From a loaded flow pipeline (``transformer`` + ``FlowMatchEulerDiscreteScheduler``-style
        scheduler, e.g. StableDiffusion3Pipeline): T and shift come from the scheduler config."""
        transformer = getattr(pipe, "transformer", None)
        scheduler = getattr(pipe, "scheduler", None)
        if transformer is None or scheduler is None:
            raise ValueError(f"{type(pipe).__name__} has no transformer or no scheduler: FlowDenoiser.from_pipeline "
                             "needs a flow-matching pipeline such as StableDiffusion3Pipeline")
        return cls(transformer, **{**flow_config(scheduler), **kwargs})

    def schedule(self) -> Callable[..., torch.Tensor]:
        """:func:`shifted_schedule` with this model's shift, for ``sample(schedule=...)``."""
        return functools.partial(shifted_schedule, shift=self.shift)

    def model_input_scale(self, sigma) -> torch.Tensor:
        """The factor c(sigma) with x_model = c * x_ve: 1 - t = 1 / (1 + sigma)."""
        return 1 / (1 + torch.as_tensor(sigma, dtype=torch.float64))

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return next(self.model.parameters()).dtype if self.is_module else None

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """The network's velocity at flow time t (a (batch,) tensor)."""
        timestep = t * self.timestep_scale
        if self.is_module:
            out = self.model(hidden_states=x_t.to(self.dtype), timestep=timestep.to(torch.float32),
                             return_dict=False, **cond)
            return out[0] if isinstance(out, (tuple, list)) else out
        return self.model(x_t, timestep.to(x_t.dtype), **cond)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        check_sample_shape(self, x.shape)
        batch = x.shape[0]
        work = work_dtype(x.device)
        s = per_sample_sigma(sigma, batch, x.device, work)
        t = sigma_to_t(s)
        bshape = (batch,) + (1,) * (x.ndim - 1)
        x_t = x.to(work) / (1 + s).reshape(bshape)
        v = self.velocity(x_t.to(x.dtype), t, **cond)
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"the flow model returned {got} for input of shape {tuple(x.shape)}")
        return (x_t - t.reshape(bshape) * v.to(work)).to(x.dtype)

    def __repr__(self) -> str:
        return (f"FlowDenoiser({type(self.model).__name__}, T={self.num_train_timesteps}, shift={self.shift}, "
                f"sigma=[{self.sigma_min:.4g}, {self.sigma_max:.4g}], shape={self.shape})")


def flow_config(scheduler) -> dict:
    """FlowDenoiser keyword arguments from a flow-matching scheduler's config."""
    config = scheduler.config
    if "shift" not in config or "num_train_timesteps" not in config:
        raise ValueError(f"{type(scheduler).__name__} is not a flow-matching scheduler (its config has no shift); "
                         "DDPM-style schedulers go with diffsampler.models.diffusers_pixel.DiffusersDenoiser")
    if config.get("use_dynamic_shifting"):
        # the model itself does not depend on the shift; only the default range and schedule do
        shift = 1.0
    else:
        shift = float(config["shift"])
    return {"num_train_timesteps": int(config["num_train_timesteps"]), "shift": shift}
