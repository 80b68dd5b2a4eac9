"""Analytic ground truth: a mixture of isotropic Gaussians and its exact denoiser.

For data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` the noisy marginal at level sigma is
``sum_k w_k N(mu_k, (s_k^2 + sigma^2) I)`` and the optimal denoiser (posterior mean) is

    D(x, sigma) = sum_k gamma_k(x, sigma) * (sigma^2 mu_k + s_k^2 x) / (s_k^2 + sigma^2),
    gamma_k proportional to w_k N(x; mu_k, (s_k^2 + sigma^2) I)     (softmax over k).

With all s_k = 0 and the means equal to a finite dataset this is the "optimal denoiser" of that
dataset (the kernel density estimate of the trajectory-geometry papers); with s_k > 0 it is a
KDE with bandwidth s.  Computed in float64 whatever the input dtype.  With a single component
the ODE has the closed-form solution used by :meth:`exact_flow`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from .base import EDM_SIGMA_MAX, EDM_SIGMA_MIN, Denoiser


class GaussianMixture(Denoiser):
    def __init__(self, means: torch.Tensor, stds: Union[float, Sequence[float], torch.Tensor] = 0.0,
                 weights: Optional[torch.Tensor] = None, sigma_min: float = EDM_SIGMA_MIN,
                 sigma_max: float = EDM_SIGMA_MAX, chunk: int = 4096):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must have shape (components, *sample_shape), got {tuple(means.shape)}")
        k = means.shape[0]
        self.shape = tuple(means.shape[1:])
        self.means = means.reshape(k, -1)
        stds = torch.as_tensor(stds, dtype=torch.float64).flatten()
        self.stds = stds.expand(k).clone() if stds.numel() == 1 else stds
        if self.stds.shape != (k,) or bool((self.stds < 0).any()):
            raise ValueError(f"stds must be one non-negative number or one per component ({k})")
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64).flatten()
        if weights.shape != (k,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be {k} non-negative numbers with a positive sum")
        self.weights = weights / weights.sum()
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.chunk = chunk

    @classmethod
    def from_data(cls, images: torch.Tensor, std: float = 0.0, **kwargs) -> "GaussianMixture":
        """The optimal denoiser of a finite dataset ``images`` (N, *shape): equal weights, bandwidth ``std``."""
        return cls(images, stds=std, **kwargs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def identity_tensors(self):
        return [self.means, self.stds]

    def to(self, device) -> "GaussianMixture":
        self.means, self.stds, self.weights = (t.to(device) for t in (self.means, self.stds, self.weights))
        return self

    def _log_components(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log(w_k N(x; mu_k, (s_k^2 + sigma^2) I)) for x (B, dim), sigma (B,) -> (B, K)."""
        var = self.stds[None, :] ** 2 + sigma[:, None] ** 2
        sq = (x.square().sum(1, keepdim=True) - 2 * x @ self.means.T + self.means.square().sum(1)[None, :]).clamp_min(0)
        return self.weights.log()[None, :] - 0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        out = torch.empty_like(flat)
        for start in range(0, flat.shape[0], self.chunk):
            xs, ss = flat[start:start + self.chunk], sigma[start:start + self.chunk]
            resp = torch.softmax(self._log_components(xs, ss), dim=1)
            var = self.stds[None, :] ** 2 + ss[:, None] ** 2
            out[start:start + self.chunk] = (ss[:, None] ** 2) * ((resp / var) @ self.means) \
                + xs * (resp * self.stds[None, :] ** 2 / var).sum(1, keepdim=True)
        return out.reshape(x.shape).to(x.dtype)

    def log_prob(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Log density of the noisy marginal at level sigma, per sample."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        return torch.logsumexp(self._log_components(flat, sigma), dim=1)

    def sample_data(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw n clean samples x0 from the mixture."""
        idx = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        x0 = self.means.cpu()[idx] + self.stds.cpu()[idx, None] * eps
        return x0.reshape(n, *self.shape)

    def exact_flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """Closed-form ODE solution for a single Gaussian: x(s) = mu + (x - mu) sqrt(s0^2 + s^2) / sqrt(s0^2 + s_from^2)."""
        if self.means.shape[0] != 1:
            raise ValueError("the closed-form flow exists for a single Gaussian component only; "
                             "use diffsampler.reference.solve_ode for mixtures")
        mu = self.means[0].reshape(self.shape).to(x.device, torch.float64)
        s2 = float(self.stds[0]) ** 2
        scale = math.sqrt((s2 + sigma_to ** 2) / (s2 + sigma_from ** 2))
        return mu + (x.to(torch.float64) - mu) * scale
