"""The one model contract: a denoiser in the EDM ("VE", Karras) parametrization.

    x = x0 + sigma * n,        D(x, sigma, **cond) -> estimate of x0,
    dx/dsigma = (x - D(x, sigma)) / sigma.

Any callable with that signature can be sampled.  Subclassing :class:`Denoiser` adds what a
sampler wants to know without being told: the sigma range the model was trained on and the
shape of one sample.  Model wrappers (EDM networks, diffusers pipelines, flow matching, the
analytic Gaussian mixture) all subclass it; solvers never look past ``__call__``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0


class Denoiser:
    """Base class for denoisers ``D(x, sigma, **cond) -> x0``.

    ``x`` has shape ``(batch, *shape)``; ``sigma`` is a tensor of shape ``(batch,)`` (one noise
    level per sample) in the model's dtype and device.  Subclasses implement :meth:`denoise`.
    """

    sigma_min: float = EDM_SIGMA_MIN
    sigma_max: float = EDM_SIGMA_MAX
    shape: Optional[Tuple[int, ...]] = None
    num_classes: int = 0          # > 0: class-conditional through cond ``class_labels`` (one-hot rows)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.denoise(x, sigma, **cond)


class NetworkDenoiser(Denoiser):
    """A denoiser around one ``torch.nn.Module`` (``self.net``), handled like a module."""

    net: torch.nn.Module

    def to(self, *args, **kwargs):
        self.net.to(*args, **kwargs)
        return self

    def eval(self):
        self.net.eval()
        return self

    def train(self, mode: bool = True):
        self.net.train(mode)
        return self

    def parameters(self):
        return self.net.parameters()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype


def sigma_range(denoiser) -> Tuple[float, float]:
    """The (sigma_min, sigma_max) a denoiser declares; EDM's (0.002, 80) for a plain callable."""
    if isinstance(denoiser, Denoiser):
        return float(denoiser.sigma_min), float(denoiser.sigma_max)
    return EDM_SIGMA_MIN, EDM_SIGMA_MAX


def check_sample_shape(denoiser, input_shape) -> None:
    """Refuse an input whose per-sample shape differs from the one the denoiser declares."""
    if isinstance(denoiser, Denoiser) and denoiser.shape is not None:
        if tuple(input_shape[1:]) != tuple(denoiser.shape):
            raise ValueError(f"input has sample shape {tuple(input_shape[1:])} but the model expects "
                             f"{tuple(denoiser.shape)} (input must be (batch, *{tuple(denoiser.shape)}))")


def work_dtype(device: torch.device) -> torch.dtype:
    """float64 for solver and wrapper arithmetic wherever the device has it (not on Apple MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def per_sample_sigma(sigma, batch: int, device, dtype) -> torch.Tensor:
    """``sigma`` (a number, a 1-element or a (batch,) tensor) as a (batch,) tensor, checked."""
    sigma = torch.as_tensor(sigma, device=device).to(dtype).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(batch)
    if sigma.shape[0] != batch:
        raise ValueError(f"sigma must have shape ({batch},), got {tuple(sigma.shape)}")
    return sigma
