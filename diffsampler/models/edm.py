"""Network preconditioning in the style of Karras et al. 2022 ("Elucidating the design space of
diffusion-based generative models", EDM), Table 1.

A raw network ``F(x_in, c_noise, class_labels)`` becomes a denoiser in the VE parametrization
``x = x0 + sigma * n`` through four sigma-dependent scalars:

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma), labels)

Three families are implemented (``sd`` = sigma_data, the data standard deviation):

``"edm"``  c_skip = sd^2 / (sigma^2 + sd^2)      c_out  = sigma * sd / sqrt(sigma^2 + sd^2)
           c_in   = 1 / sqrt(sigma^2 + sd^2)     c_noise = ln(sigma) / 4

``"ve"``   c_skip = 1      c_out = sigma      c_in = 1      c_noise = ln(sigma / 2)

``"vp"``   c_skip = 1      c_out = -sigma     c_in = 1 / sqrt(sigma^2 + 1)
           c_noise = (M - 1) * t(sigma), where t(sigma) inverts the VP noise level
           sigma(t) = sqrt(exp(beta_d * t^2 / 2 + beta_min * t) - 1):
           t(sigma) = (sqrt(beta_min^2 + 2 * beta_d * ln(1 + sigma^2)) - beta_min) / beta_d
           (defaults beta_d = 19.9, beta_min = 0.1, M = 1000).

The matching training loss weight is ``lambda(sigma) = 1 / c_out(sigma)^2``; for EDM it equals
``(sigma^2 + sd^2) / (sigma * sd)^2``, for VP and VE ``1 / sigma^2``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .base import EDM_SIGMA_MAX, EDM_SIGMA_MIN, NetworkDenoiser, per_sample_sigma

Coefficients = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class EDMPrecond:
    """EDM's own preconditioning: unit-variance network input and target for every sigma."""

    sigma_data: float = 0.5
    name = "edm"

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        sd2 = self.sigma_data ** 2
        denom = (sigma ** 2 + sd2).sqrt()
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / denom
        c_in = 1.0 / denom
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


@dataclass(frozen=True)
class VEPrecond:
    """Variance-exploding (score SDE / NCSN++) preconditioning."""

    name = "ve"

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        one = torch.ones_like(sigma)
        return one, sigma, one, (0.5 * sigma).log()


@dataclass(frozen=True)
class VPPrecond:
    """Variance-preserving (DDPM++) preconditioning with a linear-beta noise schedule."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    name = "vp"

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return ((self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma ** 2)).sqrt() - self.beta_min) / self.beta_d

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.expm1(0.5 * self.beta_d * t ** 2 + self.beta_min * t).sqrt()

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1.0 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_to_t(sigma)
        return c_skip, c_out, c_in, c_noise


PRECONDS = ("edm", "ve", "vp")


def make_precond(precond: str = "edm", sigma_data: float = 0.5, **kwargs):
    """Build a preconditioning object by family name (``"edm"``, ``"ve"`` or ``"vp"``)."""
    if precond == "edm":
        return EDMPrecond(sigma_data=sigma_data)
    if precond == "ve":
        return VEPrecond()
    if precond == "vp":
        return VPPrecond(**kwargs)
    raise ValueError(f"unknown preconditioning {precond!r}; expected one of {PRECONDS}")


def loss_weight(precond, sigma: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) = 1 / c_out(sigma)^2, which makes the effective network target unit-weighted."""
    return 1.0 / precond.coefficients(sigma)[1] ** 2


class EDMDenoiser(NetworkDenoiser):
    """A raw network wrapped with preconditioning into a :class:`~diffsampler.models.base.Denoiser`.

    ``net(x_in, c_noise, class_labels=...)`` is any module with that signature (for example
    :class:`~diffsampler.models.unet.UNet`).  ``class_labels`` is a float one-hot tensor
    ``(batch, num_classes)``; an all-zero row (or ``class_labels=None``) is unconditional.
    Integer labels of shape ``(batch,)`` are accepted and one-hot encoded.

    Computation happens in the network's dtype; the result is returned in ``x``'s dtype.
    Gradients are not disabled here (training uses the same object); wrap sampling in
    ``torch.no_grad()`` or rely on the sampler to do so.
    """

    def __init__(
        self,
        net: nn.Module,
        precond: str = "edm",
        sigma_data: float = 0.5,
        sigma_min: float = EDM_SIGMA_MIN,
        sigma_max: float = EDM_SIGMA_MAX,
        shape: Optional[Tuple[int, ...]] = None,
        num_classes: int = 0,
        channels_last: bool = False,
        **precond_kwargs,
    ):
        self.net = net
        self.precond_name = precond
        self.sigma_data = float(sigma_data)
        self.precond = make_precond(precond, sigma_data=sigma_data, **precond_kwargs)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.shape = tuple(shape) if shape is not None else None
        self.num_classes = int(num_classes)
        self.channels_last = channels_last

    # -- the denoiser ------------------------------------------------------------------------
    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return self.precond.coefficients(sigma)

    def _labels(self, class_labels, batch: int, dtype, device) -> Optional[torch.Tensor]:
        if self.num_classes <= 0:
            if class_labels is not None and torch.as_tensor(class_labels).abs().sum() > 0:
                raise ValueError("this denoiser is unconditional; class_labels must be None or zeros")
            return None
        if class_labels is None:
            return torch.zeros(batch, self.num_classes, dtype=dtype, device=device)
        class_labels = torch.as_tensor(class_labels, device=device)
        if class_labels.ndim == 1 and not class_labels.is_floating_point():
            class_labels = torch.nn.functional.one_hot(class_labels.long(), self.num_classes)
        if class_labels.ndim == 2 and class_labels.shape[0] == 1 and batch > 1:
            class_labels = class_labels.expand(batch, -1)
        if class_labels.shape != (batch, self.num_classes):
            raise ValueError(
                f"class_labels must have shape ({batch}, {self.num_classes}), got {tuple(class_labels.shape)}"
            )
        return class_labels.to(dtype)

    def denoise(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:
        if cond:
            raise TypeError(f"unexpected conditioning keywords {sorted(cond)}; only class_labels is supported")
        dtype = self.dtype
        batch = x.shape[0]
        sigma = per_sample_sigma(sigma, batch, x.device, dtype)
        labels = self._labels(class_labels, batch, dtype, x.device)
        c_skip, c_out, c_in, _ = self.precond.coefficients(sigma)
        # sigma = 0 would give c_noise = -inf; the output there is x anyway (c_out = 0).
        c_noise = self.precond.coefficients(sigma.clamp_min(1e-12))[3]
        bshape = (batch,) + (1,) * (x.ndim - 1)
        xin = x.to(dtype)
        net_in = c_in.reshape(bshape) * xin
        if self.channels_last and net_in.ndim == 4:
            net_in = net_in.contiguous(memory_format=torch.channels_last)
        f = self.net(net_in, c_noise, class_labels=labels)
        out = c_skip.reshape(bshape) * xin + c_out.reshape(bshape) * f.to(dtype)
        return out.to(x.dtype).contiguous()

    def __repr__(self) -> str:
        return (
            f"EDMDenoiser(precond={self.precond_name!r}, sigma_data={self.sigma_data}, shape={self.shape}, "
            f"num_classes={self.num_classes}, sigma=[{self.sigma_min}, {self.sigma_max}])"
        )

    def config(self) -> Dict:
        return {
            "precond": self.precond_name,
            "sigma_data": self.sigma_data,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "shape": list(self.shape) if self.shape else None,
            "num_classes": self.num_classes,
        }
