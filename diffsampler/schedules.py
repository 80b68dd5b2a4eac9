"""Time schedules: pure functions that return descending float64 sigma grids.

Every schedule function has the signature ``fn(num_steps, sigma_min, sigma_max, **options)`` and
returns a CPU float64 tensor of ``num_steps + 1`` strictly decreasing sigmas, from ``sigma_max``
down to ``sigma_min`` (both included).  A solver takes one step per interval.

Fixed grids (explicit lists, optimized GITS schedules, grids saved by another tool) are
:class:`Schedule` objects; they save to and load from a JSON schedule file that records the sigmas
and how they were made, and print as a plain comma-separated list (for diffusers ``sigmas=`` or
ComfyUI).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import torch

from .fileio import write_atomic

SCHEDULE_FILE_FORMAT = "diffsampler-schedule/1"

# Variance-preserving SDE of Song et al. (2021), as used by EDM's "VP" setting.
VP_BETA_D = 19.9
VP_BETA_MIN = 0.1


def _check_range(num_steps: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(
            f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def polynomial(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM schedule (Karras et al. 2022, eq. 5): uniform steps in ``sigma ** (1/rho)``."""
    _check_range(num_steps, sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _pin_ends((hi + ramp * (lo - hi)) ** rho, sigma_min, sigma_max)


def logsnr(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform steps in log-SNR, i.e. in ``lambda = -log(sigma)`` (DPM-Solver, UniPC)."""
    _check_range(num_steps, sigma_min, sigma_max)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps + 1, dtype=torch.float64)
    return _pin_ends(log_sigmas.exp(), sigma_min, sigma_max)


def vp_sigma(t: torch.Tensor, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """sigma(t) of the VP SDE in the VE parametrization: sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t).sqrt()


def vp_time(sigma: torch.Tensor, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """Inverse of :func:`vp_sigma`."""
    return ((beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2)).sqrt() - beta_min) / beta_d


def time_uniform(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                 beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """Uniform steps in ``t ** (1/rho)`` of VP time t (rho=1: time-uniform, rho=2: time-quadratic)."""
    _check_range(num_steps, sigma_min, sigma_max)
    t_max = vp_time(torch.tensor(sigma_max, dtype=torch.float64), beta_d, beta_min)
    t_min = vp_time(torch.tensor(sigma_min, dtype=torch.float64), beta_d, beta_min)
    ramp = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    t = (t_max ** (1 / rho) + ramp * (t_min ** (1 / rho) - t_max ** (1 / rho))) ** rho
    return _pin_ends(vp_sigma(t, beta_d, beta_min), sigma_min, sigma_max)


def time_quadratic(num_steps: int, sigma_min: float, sigma_max: float,
                   beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """Time-quadratic VP schedule (DEIS): :func:`time_uniform` with rho=2."""
    return time_uniform(num_steps, sigma_min, sigma_max, rho=2.0, beta_d=beta_d, beta_min=beta_min)


def discrete(num_steps: int, sigma_min: float, sigma_max: float, *,
             sigma_fn: Callable[[torch.Tensor], torch.Tensor],
             sigma_inv: Callable[[torch.Tensor], torch.Tensor], rho: float = 1.0) -> torch.Tensor:
    """A model's own training timesteps: uniform in ``t ** (1/rho)`` and rounded to integers.

    ``sigma_fn`` maps (float64) timesteps to sigmas and ``sigma_inv`` sigmas to (fractional)
    timesteps, e.g. from a DDPM ``alphas_cumprod`` table.  The endpoints are the timesteps closest
    to ``sigma_max`` and ``sigma_min``, so the grid ends where the model's table does.
    """
    _check_range(num_steps, sigma_min, sigma_max)
    t_hi = float(sigma_inv(torch.tensor(sigma_max, dtype=torch.float64)))
    t_lo = float(sigma_inv(torch.tensor(sigma_min, dtype=torch.float64)))
    if t_hi <= t_lo:
        raise ValueError("sigma_inv must be increasing in sigma")
    ramp = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    t = (t_hi ** (1 / rho) + ramp * (t_lo ** (1 / rho) - t_hi ** (1 / rho))) ** rho
    t = t.round()
    if not bool((t[1:] < t[:-1]).all()):
        raise ValueError(
            f"{num_steps} steps do not fit between timesteps {t_lo:.1f} and {t_hi:.1f} without repeating one;"
            " use fewer steps")
    return sigma_fn(t).to(torch.float64)


def _pin_ends(sigmas: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Make the endpoints exact (powers and exps round by an ulp)."""
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas


SCHEDULES: Dict[str, Callable[..., torch.Tensor]] = {
    "polynomial": polynomial,
    "logsnr": logsnr,
    "time_uniform": time_uniform,
    "time_quadratic": time_quadratic,
    "discrete": discrete,
}
# Names users know from k-diffusion / ComfyUI: alias -> schedule name.
SCHEDULE_ALIASES: Dict[str, str] = {"karras": "polynomial", "exponential": "logsnr"}


def check_sigmas(sigmas) -> torch.Tensor:
    """Validate an explicit grid and return it as a CPU float64 tensor."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().flatten()
    if sigmas.numel() < 2:
        raise ValueError(f"a sigma grid needs at least 2 points (one step), got {sigmas.numel()}")
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError(f"sigmas must be finite, got {sigmas.tolist()}")
    if not bool((sigmas > 0).all()):
        raise ValueError(
            "sigmas must be positive (the grid ends at sigma_min > 0; use denoise_to_zero=True for a final"
            f" step to sigma = 0), got {sigmas.tolist()}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must be strictly descending, got {sigmas.tolist()}")
    return sigmas


def subsample(sigmas, indices: Sequence[int]) -> torch.Tensor:
    """The points ``sigmas[indices]`` of a grid (indices increasing, so the result stays descending)."""
    sigmas = check_sigmas(sigmas)
    idx = [int(i) for i in indices]
    if any(b <= a for a, b in zip(idx, idx[1:])):
        raise ValueError(f"indices must be strictly increasing, got {idx}")
    if idx and (idx[0] < -len(sigmas) or idx[-1] >= len(sigmas)):
        raise ValueError(f"indices must lie in [0, {len(sigmas) - 1}], got {idx}")
    return check_sigmas(sigmas[idx])


@dataclass
class Schedule:
    """A fixed sigma grid plus a record of how it was made (schedule file contents)."""

    sigmas: torch.Tensor
    info: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        self.sigmas = check_sigmas(self.sigmas)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def __str__(self) -> str:
        return ", ".join(repr(float(s)) for s in self.sigmas)

    def to_dict(self) -> Dict[str, object]:
        return {"format": SCHEDULE_FILE_FORMAT, "sigmas": [float(s) for s in self.sigmas], **self.info}

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the schedule file atomically (a reader never sees a half-written file)."""
        path = Path(path)
        write_atomic(path, json.dumps(self.to_dict(), indent=2).encode() + b"\n")
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Schedule":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"schedule file not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a schedule file (not JSON: {err})") from None
        if not isinstance(data, dict) or data.get("format") != SCHEDULE_FILE_FORMAT or "sigmas" not in data:
            raise ValueError(f"{path} is not a schedule file: expected a JSON object with"
                             f" format={SCHEDULE_FILE_FORMAT!r} and a 'sigmas' list")
        sigmas = data.pop("sigmas")
        data.pop("format")
        return cls(torch.tensor(sigmas, dtype=torch.float64), data)


ScheduleLike = Union[str, os.PathLike, Schedule, Callable[..., torch.Tensor]]


def resolve(schedule: ScheduleLike, options: Optional[dict] = None):
    """Turn ``schedule=`` into either a fixed :class:`Schedule` or a schedule function.

    Accepted: a registered name, a path to a schedule file, a :class:`Schedule`, or a function
    with the schedule signature.  Returns ``(fixed_schedule_or_None, function_or_None)``.
    """
    options = options or {}
    if isinstance(schedule, Schedule):
        _no_options(options, "a Schedule object")
        return schedule, None
    if callable(schedule):
        return None, _bind(schedule, options)
    if isinstance(schedule, (str, os.PathLike)):
        name = SCHEDULE_ALIASES.get(str(schedule), str(schedule))
        if name in SCHEDULES:
            return None, _bind(SCHEDULES[name], options)
        if name.endswith(".json") or os.path.exists(name):
            _no_options(options, "a schedule file")
            return Schedule.load(name), None
        raise ValueError(f"unknown schedule {name!r}: use one of {', '.join([*SCHEDULES, *SCHEDULE_ALIASES])} "
                         "or a schedule file (.json)")
    raise TypeError(f"schedule must be a name, a Schedule, a schedule file path or a function, got {type(schedule)}")


def _bind(fn, options):
    def schedule_fn(num_steps, sigma_min, sigma_max):
        try:
            return fn(num_steps, sigma_min, sigma_max, **options)
        except TypeError as err:
            if "unexpected keyword" in str(err):
                raise ValueError(f"schedule option not accepted: {err}") from None
            raise
    return schedule_fn


def _no_options(options, what):
    if options:
        raise ValueError(f"schedule_options {sorted(options)} cannot apply to {what} (its sigmas are fixed)")
