"""Recording sampling and denoising trajectories through the ``sample()`` callback.

The *sampling trajectory* of one seed is the sequence of states ``x_0, x_1, ..., x_T`` at the
grid's sigmas (``x_0 = sigma_max * noise``, ``x_T`` the state at ``sigma_min``).  The *denoising
trajectory* is the sequence of the model's x0 estimates ``D(x_i, sigma_i)`` that the solver used
at each step (for multi-stage solvers such as Heun: the estimate at the start of the step; with the
analytical first step: its closed-form estimate).  Any model, solver, schedule and conditioning
that ``sample()`` accepts can be recorded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch

from ..sampling import sample
from ._tensors import work_dtype


@dataclass
class Trajectories:
    """Recorded trajectories of a batch of seeds (float64 where the device has it).

    sigmas:    (T+1,) descending grid (CPU float64); ``sampling[i]`` sits at ``sigmas[i]``.
    sampling:  (T+1, B, *shape) the states x_i, from ``sigma_max * noise`` to the state at sigma_min.
    denoising: (T, B, *shape) the x0 estimates D(x_i, sigma_i) used at steps i = 0..T-1.
    samples:   (B, *shape) what ``sample()`` returned (``sampling[-1]`` unless ``denoise_to_zero``).
    nfe:       model evaluations per sample; ``solver``: the solver's name.
    """

    sigmas: torch.Tensor
    sampling: torch.Tensor
    denoising: torch.Tensor
    samples: torch.Tensor
    nfe: int = 0
    solver: str = ""

    @property
    def steps(self) -> int:
        return self.sampling.shape[0] - 1

    @property
    def batch(self) -> int:
        return self.sampling.shape[1]

    @property
    def shape(self):
        return tuple(self.sampling.shape[2:])

    @property
    def denoising_aligned(self) -> torch.Tensor:
        """(T+1, B, *shape): the denoising trajectory with the final sample appended, so that point
        i sits at ``sigmas[i]`` like the sampling trajectory (both end at the same sample)."""
        return torch.cat([self.denoising, self.samples[None].to(self.denoising)], dim=0)

    def select(self, index) -> "Trajectories":
        """A subset of the seeds (``index``: int, slice, list or bool/long tensor over the batch)."""
        if isinstance(index, int):
            index = [index]
        return Trajectories(self.sigmas, self.sampling[:, index], self.denoising[:, index], self.samples[index],
                            self.nfe, self.solver)

    def to(self, device) -> "Trajectories":
        return Trajectories(self.sigmas, self.sampling.to(device), self.denoising.to(device),
                            self.samples.to(device), self.nfe, self.solver)


def _slice_cond(cond: Dict[str, Any], batch: int, part: slice) -> Dict[str, Any]:
    """Per-sample conditioning (tensors whose first dim is the batch) follows the batch chunk."""
    return {k: (v[part] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == batch else v)
            for k, v in cond.items()}


@torch.no_grad()
def record_trajectories(denoiser, noise: torch.Tensor, solver=None, nfe: Optional[int] = None, *,
                        batch_size: Optional[int] = None, store_device: Optional[Union[str, torch.device]] = None,
                        cond: Optional[Dict[str, Any]] = None, **sample_kwargs) -> Trajectories:
    """Run ``sample(denoiser, noise, solver=solver, nfe=nfe, ...)`` and record every step.

    Args:
        denoiser, noise, solver, nfe, cond, **sample_kwargs: as for :func:`diffsampler.sample`
            (``plan=``, ``sigmas=``, ``schedule=``, ``afs=``, ``denoise_to_zero=``, solver options, ...);
            the solver defaults to ``heun`` (fine trajectories need a smooth, accurate solver).
            A ``callback=`` given here is still called at every step.
        batch_size: sample the noise in chunks of this many seeds (results do not depend on it).
        store_device: where the recorded float64 tensors live (default: the noise's device);
            ``"cpu"`` keeps GPU memory free for the model.

    Returns:
        :class:`Trajectories` with ``T + 1`` states and ``T`` denoised estimates per seed.
    """
    if not isinstance(noise, torch.Tensor) or noise.ndim < 2:
        raise ValueError("noise must be a tensor shaped (batch, *sample_shape)")
    batch = noise.shape[0]
    batch_size = batch if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = noise.device if store_device is None else torch.device(store_device)
    dtype = work_dtype(device)
    user_callback = sample_kwargs.pop("callback", None)
    if solver is None and sample_kwargs.get("plan") is None:
        solver = "heun"
    cond = dict(cond or {})
    states, denoised, finals = [], [], []
    sigmas, nfe_used, name = None, 0, ""
    for start in range(0, batch, batch_size):
        part = slice(start, min(batch, start + batch_size))
        xs, ds = [], []

        def record(step, xs=xs, ds=ds):
            if not xs:
                xs.append(step.x.to(device, dtype))
            xs.append(step.x_next.to(device, dtype))
            ds.append(step.denoised.to(device, dtype))
            if user_callback is not None:
                user_callback(step)

        result = sample(denoiser, noise[part], solver=solver, nfe=nfe, cond=_slice_cond(cond, batch, part),
                        callback=record, **sample_kwargs)
        states.append(torch.stack(xs))
        denoised.append(torch.stack(ds))
        finals.append(result.samples.to(device, dtype))
        sigmas, nfe_used, name = result.sigmas, result.nfe, result.solver
    return Trajectories(sigmas=sigmas.to(torch.float64).cpu(), sampling=torch.cat(states, dim=1),
                        denoising=torch.cat(denoised, dim=1), samples=torch.cat(finals), nfe=nfe_used, solver=name)
